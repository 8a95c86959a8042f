"""Crashes and outages lose nothing: kill -9, MongoDB down, a crash before publish."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from recon_stream.embedded import EmbeddedMongo, free_port
from recon_stream.settings import Settings

from .support import (
    eventually,
    heartbeat,
    make_settings,
    prepare,
    produce,
    read_all,
    running,
    sample,
    worker_env,
)


def _env(settings: Settings, http_port: int) -> dict[str, str]:
    return {**worker_env(settings), "RECON_HTTP_PORT": str(http_port)}


def _start_worker(settings: Settings, http_port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "recon_stream", "run", "ingest"],
            env=_env(settings, http_port),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def _count(db: Any, **query: Any) -> int:
    return int(await db.org_ips.count_documents(query))


async def test_a_worker_killed_mid_stream_and_restarted_loses_no_heartbeat(
    settings: Settings, db: Any, tmp_path: Path
) -> None:
    n = 2000
    pairs = [(f"org-{i % 50}", f"5.{i // 250}.{i % 250}.5") for i in range(n)]
    values = [heartbeat(org, ip, f"agent-{i}") for i, (org, ip) in enumerate(pairs)]
    log = tmp_path / "worker.log"
    port = free_port()
    # Small batches, so the kill is likely to fall inside the stream rather than
    # after a single batch that took all of it.
    settings = settings.model_copy(update={"ingest_max_records": 50})
    worker = _start_worker(settings, port, log)
    try:
        bootstrap, topic = settings.kafka_bootstrap_servers, settings.topic_heartbeats
        producing = asyncio.create_task(produce(bootstrap, topic, values[: n // 2]))

        async def some_landed() -> bool:
            return await _count(db) >= 100

        await eventually(some_landed, timeout=60)
        worker.send_signal(signal.SIGKILL)  # no graceful shutdown, no final commit
        worker.wait(10)
        landed_before_restart = await _count(db)
        await producing
        # The second half only after the kill: the restarted worker has work
        # however fast the first one was.
        await produce(bootstrap, topic, values[n // 2 :])
        assert landed_before_restart < n

        worker = _start_worker(settings, port, log)

        async def all_sent() -> bool:
            return await _count(db, **{"scan_request.state": "sent"}) == n

        await eventually(all_sent, timeout=120)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
    assert await _count(db) == n
    requests = await read_all(
        settings.kafka_bootstrap_servers, settings.topic_scan_requests, expect=n
    )
    requested = {
        (json.loads(r.value)["organization_id"], json.loads(r.value)["ip"]) for r in requests
    }
    assert requested == set(pairs)
    assert worker.returncode == 0, log.read_text()[-2000:]


async def test_relay_sends_a_request_left_pending_by_a_crash(settings: Settings, db: Any) -> None:
    # The state a crash between the org_ips upsert and the publish leaves behind.
    past = datetime.now(UTC) - timedelta(minutes=5)
    await db.org_ips.insert_one(
        {
            "organization_id": "acme",
            "ip": "4.4.4.4",
            "status": "active",
            "first_seen": past,
            "last_seen": past,
            "agents": [],
            "site_ids": [],
            "scan_request": {"state": "pending", "claim_until": past},
        }
    )
    async with running(settings):

        async def sent() -> bool:
            return await _count(db, **{"scan_request.state": "sent"}) == 1

        await eventually(sent)
    requests = await read_all(
        settings.kafka_bootstrap_servers, settings.topic_scan_requests, expect=1
    )
    assert [(json.loads(r.value)["ip"], json.loads(r.value)["reason"]) for r in requests] == [
        ("4.4.4.4", "new")
    ]


async def _committed(settings: Settings) -> dict[int, int | None]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, group_id=settings.ingest_group_id
    )
    await consumer.start()
    try:
        return {
            p: await consumer.committed(TopicPartition(settings.topic_heartbeats, p))
            for p in range(settings.kafka_topic_partitions)
        }
    finally:
        await consumer.stop()


def _readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.skipif(
    bool(os.environ.get("RECON_TEST_MONGODB_URI")), reason="needs a MongoDB it can stop"
)
async def test_mongodb_outage_pauses_commits_nothing_and_recovers(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    mongo = EmbeddedMongo(data_dir=tmp_path / "data", log_dir=tmp_path).start()
    settings = make_settings(kafka_bootstrap, mongo.uri, unique_name)
    await prepare(settings)
    try:
        async with running(settings) as worker:
            await produce(
                kafka_bootstrap, settings.topic_heartbeats, [heartbeat("acme", "7.7.7.1")]
            )
            from pymongo import AsyncMongoClient

            client: Any = AsyncMongoClient(mongo.uri)
            db = client[settings.mongodb_database]

            async def landed(n: int) -> bool:
                return await db.org_ips.count_documents({"scan_request.state": "sent"}) == n

            await eventually(lambda: landed(1))

            async def first_batch_committed() -> dict[int, int | None] | None:
                committed = await _committed(settings)
                return committed if sum(c or 0 for c in committed.values()) == 1 else None

            before = await eventually(first_batch_committed)
            await client.close()

            mongo.stop()
            await produce(
                kafka_bootstrap,
                settings.topic_heartbeats,
                [heartbeat("acme", f"7.7.7.{i}", f"a{i}") for i in range(2, 12)],
            )

            async def retrying() -> bool:
                return sample(worker, "recon_dependency_retries_total", dependency="mongodb") >= 2

            await eventually(retrying, timeout=60)
            status, body = await asyncio.to_thread(_readyz, worker.status.port)
            assert status == 503
            assert "mongodb" in body["checks"]["pipeline"]
            assert await _committed(settings) == before, "committed while MongoDB was down"

            mongo.start()
            client = AsyncMongoClient(mongo.uri)
            db = client[settings.mongodb_database]
            await eventually(lambda: landed(11), timeout=90)
            status, body = await asyncio.to_thread(_readyz, worker.status.port)
            assert status == 200, body
            await client.close()
    finally:
        mongo.stop()
