"""The ingest worker against real Kafka- and MongoDB-protocol servers."""

from __future__ import annotations

import json
from typing import Any

from recon_stream.settings import Settings

from .support import (
    T0,
    assigned_partitions,
    eventually,
    heartbeat,
    minutes,
    produce,
    read_all,
    running,
    sample,
)


async def _docs(db: Any, **query: Any) -> list[dict[str, Any]]:
    return [d async for d in db.org_ips.find(query, {"_id": 0})]


async def test_heartbeats_land_with_first_and_last_seen(settings: Settings, db: Any) -> None:
    await produce(
        settings.kafka_bootstrap_servers,
        settings.topic_heartbeats,
        [
            heartbeat("acme", "8.8.8.8", "a1", T0 + minutes(5), site_id="hq", hostname="web-1"),
            heartbeat("acme", "8.8.8.8", "a2", T0, site_id="branch"),
            heartbeat("acme", "8.8.8.8", "a1", T0 + minutes(1), hostname="old-name"),
            heartbeat("globex", "8.8.8.8", "g1", T0 + minutes(2)),
            heartbeat("acme", "2001:4860:4860::8888", "a3", T0),
        ],
    )
    async with running(settings):
        docs = await eventually(lambda: _sent(db, 3))
    by_pair = {(d["organization_id"], d["ip"]): d for d in docs}
    acme = by_pair[("acme", "8.8.8.8")]
    assert acme["first_seen"] == T0
    assert acme["last_seen"] == T0 + minutes(5)
    assert sorted(acme["site_ids"]) == ["branch", "hq"]
    assert [a["agent_id"] for a in acme["agents"]] == ["a1", "a2"]  # most recent first
    assert acme["agents"][0]["last_seen"] == T0 + minutes(5)
    assert acme["agents"][0]["hostname"] == "web-1"
    assert by_pair[("globex", "8.8.8.8")]["first_seen"] == T0 + minutes(2)
    assert by_pair[("acme", "2001:4860:4860::8888")]["ip_version"] == 6

    # A late, older heartbeat moves nothing back in time; a newer one moves last_seen.
    await produce(
        settings.kafka_bootstrap_servers,
        settings.topic_heartbeats,
        [
            heartbeat("acme", "8.8.8.8", "a9", T0 - minutes(30)),
            heartbeat("acme", "8.8.8.8", "a1", T0 + minutes(60)),
        ],
    )
    async with running(settings):

        async def moved() -> Any:
            doc = await db.org_ips.find_one({"organization_id": "acme", "ip": "8.8.8.8"})
            return doc if doc["last_seen"] == T0 + minutes(60) else None

        doc = await eventually(moved)
    assert doc["first_seen"] == T0 - minutes(30)
    assert [a["agent_id"] for a in doc["agents"]] == ["a1", "a2", "a9"]


async def _sent(db: Any, n: int) -> list[dict[str, Any]] | None:
    docs = await _docs(db, **{"scan_request.state": "sent"})
    return docs if len(docs) >= n else None


async def test_repeats_coalesce_and_each_new_pair_is_requested_once(
    settings: Settings, db: Any
) -> None:
    pairs = [(f"org-{i % 3}", f"1.1.{i}.1") for i in range(6)]
    values = [
        heartbeat(org, ip, f"agent-{j % 4}", T0 + minutes(j))
        for j in range(40)
        for org, ip in pairs
    ]
    await produce(settings.kafka_bootstrap_servers, settings.topic_heartbeats, values)
    async with running(settings) as worker:
        await eventually(lambda: _sent(db, len(pairs)))

        async def all_counted() -> bool:
            outcomes = ("accepted", "duplicate", "non_public", "invalid")
            counted = sum(sample(worker, "recon_heartbeats_total", outcome=o) for o in outcomes)
            return counted == len(values)

        await eventually(all_counted)
        writes = sample(
            worker, "recon_mongodb_writes_total", collection="org_ips", operation="upsert"
        )
        counted = {
            outcome: sample(worker, "recon_heartbeats_total", outcome=outcome)
            for outcome in ("accepted", "duplicate", "non_public", "invalid")
        }
    docs = await _docs(db)
    assert sorted((d["organization_id"], d["ip"]) for d in docs) == sorted(pairs)
    assert all(len(d["agents"]) == 4 for d in docs)
    assert all(d["last_seen"] == T0 + minutes(39) for d in docs)
    # Coalescing: far fewer writes than heartbeats (batches fold repeats).
    assert writes < len(values) / 4
    assert sum(counted.values()) == len(values)
    assert counted["accepted"] == writes

    requests = await read_all(
        settings.kafka_bootstrap_servers, settings.topic_scan_requests, expect=len(pairs)
    )
    bodies = [json.loads(r.value) for r in requests]
    assert sorted((b["organization_id"], b["ip"]) for b in bodies) == sorted(pairs)
    assert all(b["reason"] == "new" for b in bodies)
    assert all(r.key == json.loads(r.value)["ip"].encode() for r in requests)
    # Tracing is off here: no trace headers, only the body's type.
    assert all(list(r.headers) == [("content-type", b"application/json")] for r in requests)


async def test_two_workers_racing_send_exactly_one_request_per_new_pair(
    settings: Settings, db: Any
) -> None:
    pairs = [(f"org-{i % 7}", f"9.{i // 250}.{i % 250}.9") for i in range(300)]
    # Three agents per pair, keyed by agent: one pair's heartbeats spread over
    # partitions, so both workers see most pairs at about the same time.
    values = [
        (f"agent-{a}-{i}".encode(), heartbeat(org, ip, f"agent-{a}-{i}"), [])
        for a in range(3)
        for i, (org, ip) in enumerate(pairs)
    ]
    async with running(settings) as one, running(settings) as two:

        async def both_members_hold_partitions() -> bool:
            mine = assigned_partitions(one, settings.topic_heartbeats)
            theirs = assigned_partitions(two, settings.topic_heartbeats)
            every = set(range(settings.kafka_topic_partitions))
            return bool(mine and theirs) and not mine & theirs and mine | theirs == every

        await eventually(both_members_hold_partitions, timeout=60)
        await produce(settings.kafka_bootstrap_servers, settings.topic_heartbeats, values)
        await eventually(lambda: _sent(db, len(pairs)), timeout=60)
        requests = await read_all(
            settings.kafka_bootstrap_servers, settings.topic_scan_requests, expect=len(pairs)
        )
    keys = [(json.loads(r.value)["organization_id"], json.loads(r.value)["ip"]) for r in requests]
    assert len(keys) == len(pairs), f"{len(keys) - len(set(keys))} duplicates"
    assert set(keys) == set(pairs)
    docs = await _docs(db)
    assert len(docs) == len(pairs)
    assert all(len(d["agents"]) == 3 for d in docs)


async def test_bad_input_goes_to_the_dlq_byte_for_byte_and_the_worker_keeps_going(
    settings: Settings, db: Any
) -> None:
    too_large = heartbeat("acme", "8.8.4.4", padding="x" * 70_000)
    bad = {
        "invalid_json": b"{not json",
        "too_large": too_large,
        "schema_violation": heartbeat("acme corp", "8.8.4.4"),
        "invalid_ip": heartbeat("acme", "999.1.1.1"),
        "empty": b"",
    }
    values: list[Any] = [
        (b"k-" + reason.encode(), body, [("trace", b"t1")]) for reason, body in bad.items()
    ]
    values.append((b"binary", heartbeat("acme", "8.8.4.4", "a-bin"), [("raw", b"\xff\xfe")]))
    values.append(heartbeat("acme", "1.0.0.1", "after"))
    await produce(settings.kafka_bootstrap_servers, settings.topic_heartbeats, values)
    async with running(settings) as worker:
        await eventually(lambda: _sent(db, 2))
        dead = await read_all(settings.kafka_bootstrap_servers, settings.topic_dlq, expect=len(bad))
        dlq_counts = {
            reason: sample(worker, "recon_dlq_messages_total", reason=reason) for reason in bad
        }
    assert {(d["ip"], d["agents"][0]["agent_id"]) for d in await _docs(db)} == {
        ("8.8.4.4", "a-bin"),
        ("1.0.0.1", "after"),
    }
    assert len(dead) == len(bad)
    by_reason = {dict(r.headers)["x-recon-dlq-reason"].decode(): r for r in dead}
    assert set(by_reason) == set(bad)
    for reason, body in bad.items():
        record = by_reason[reason]
        headers = {k: v.decode() for k, v in record.headers}
        assert (record.value or b"") == body, reason
        assert record.key == b"k-" + reason.encode()
        assert headers["x-recon-dlq-original-topic"] == settings.topic_heartbeats
        assert int(headers["x-recon-dlq-original-offset"]) >= 0
        assert headers["x-recon-dlq-original-partition"].isdigit()
        assert headers["x-recon-dlq-detail"]
        assert headers["trace"] == "t1"
        assert dlq_counts[reason] == 1
    assert "public_ip" in dict(by_reason["invalid_ip"].headers)["x-recon-dlq-detail"].decode()
    assert (
        "organization_id"
        in dict(by_reason["schema_violation"].headers)["x-recon-dlq-detail"].decode()
    )


async def test_non_public_addresses_are_counted_and_never_requested(
    settings: Settings, db: Any
) -> None:
    private = [
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "127.0.0.1",
        "169.254.1.1",
        "100.64.0.1",
        "224.0.0.251",
        "240.0.0.1",
        "192.0.2.10",
        "198.51.100.7",
        "203.0.113.9",
        "0.0.0.0",
        "::1",
        "fe80::1",
        "fd00::1",
        "ff02::1",
        "2001:db8::1",
        "::ffff:10.0.0.1",
    ]
    values = [heartbeat("acme", ip, f"a{i}") for i, ip in enumerate(private)]
    values.append(heartbeat("acme", "1.1.1.1", "public-agent"))
    await produce(settings.kafka_bootstrap_servers, settings.topic_heartbeats, values)
    async with running(settings) as worker:
        await eventually(lambda: _sent(db, 1))

        async def all_counted() -> bool:
            return sample(worker, "recon_heartbeats_total", outcome="non_public") == len(private)

        await eventually(all_counted)
        requests = await read_all(
            settings.kafka_bootstrap_servers, settings.topic_scan_requests, expect=1
        )
    assert [d["ip"] for d in await _docs(db)] == ["1.1.1.1"]
    assert [json.loads(r.value)["ip"] for r in requests] == ["1.1.1.1"]
