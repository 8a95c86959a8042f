"""Smoke tests: the Kafka and MongoDB servers the suite runs against really work."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from pymongo import AsyncMongoClient

PARTITIONS = 4
RECORDS = 10


@pytest.mark.asyncio
async def test_kafka_topic_produce_consume_commit(kafka_bootstrap: str, unique_name: str) -> None:
    topic = f"test.infra.{unique_name}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name=topic, num_partitions=PARTITIONS, replication_factor=1)]
        )
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        # One record per send_and_wait keeps every batch single-record (see DESIGN.md
        # on Tansu's ListOffsets quirk).
        for i in range(RECORDS):
            await producer.send_and_wait(
                topic,
                value=f"v{i}".encode(),
                key=f"k{i}".encode(),
                partition=i % PARTITIONS,
            )
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"test-infra-{unique_name}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        # Tansu's first group join takes about session_timeout/2; 6 s is the
        # smallest session timeout Apache Kafka accepts by default.
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    await consumer.start()
    try:
        received: dict[int, list[bytes]] = {}
        async with asyncio.timeout(30):
            while sum(len(v) for v in received.values()) < RECORDS:
                batches = await consumer.getmany(timeout_ms=500)
                for tp, records in batches.items():
                    received.setdefault(tp.partition, []).extend(
                        r.value for r in records if r.value is not None
                    )
        await consumer.commit()

        assert sorted(v for vs in received.values() for v in vs) == sorted(
            f"v{i}".encode() for i in range(RECORDS)
        )
        for partition in range(PARTITIONS):
            expected = [f"v{i}".encode() for i in range(partition, RECORDS, PARTITIONS)]
            assert received.get(partition) == expected
            committed = await consumer.committed(TopicPartition(topic, partition))
            assert committed == len(expected)
    finally:
        await consumer.stop()


@pytest.mark.asyncio
async def test_mongodb_upsert_and_read(mongodb_uri: str, unique_name: str) -> None:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongodb_uri)
    db = client[f"test_infra_{unique_name}"]
    try:
        result = await db.things.update_one({"_id": "a"}, {"$set": {"n": 1}}, upsert=True)
        assert result.upserted_id == "a"
        await db.things.update_one({"_id": "a"}, {"$inc": {"n": 1}}, upsert=True)
        assert await db.things.find_one({"_id": "a"}) == {"_id": "a", "n": 2}
    finally:
        await client.drop_database(db.name)
        await client.close()
