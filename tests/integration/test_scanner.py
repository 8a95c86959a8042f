"""The scanner and scheduler end to end: Tansu, MongoDB (genuine mongod where installed,
else SecantusDB) and the Shodan emulator, reached through the real `shodan` client."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from recon_stream.app import snapshot_updater
from recon_stream.domain.scans import HostScan, Service
from recon_stream.domain.snapshot import OrgContext
from recon_stream.settings import Settings
from tests.emulators.shodan import ShodanEmulator

from .support import (
    NOW,
    banner,
    events_on,
    eventually,
    heartbeat,
    host,
    produce,
    read_all,
    running,
    sample,
    start_worker,
)


def host_requests(emulator: ShodanEmulator, ip: str) -> int:
    path = f"/shodan/host/{ip}"
    return sum(1 for r in emulator.requests if r.path.split("?", 1)[0] == path)


async def test_two_orgs_behind_one_ip_get_their_own_events_from_one_lookup(
    scan_settings: Settings, shodan_emulator: ShodanEmulator
) -> None:
    ip = "203.0.114.10"  # public (just outside TEST-NET-3)
    shodan_emulator.set_host(
        ip,
        host(
            ip,
            banner(3390, "rdp", product="Remote Desktop Protocol"),
            banner(
                443,
                "https",
                product="nginx",
                version="1.18.0",
                vulns={"CVE-2021-23017": {"cvss": "7.7", "summary": "x"}},
            ),
        ),
    )
    await produce(
        scan_settings.kafka_bootstrap_servers,
        scan_settings.topic_heartbeats,
        [
            heartbeat("acme", ip, "a1", NOW),
            heartbeat("globex", ip, "g1", NOW),
            heartbeat("globex", ip, "g2", NOW),
        ],
    )
    async with running(scan_settings, ("ingest", "scanner")):
        events = await events_on(scan_settings, 4)
        await asyncio.sleep(1.5)
        events = await events_on(scan_settings, 4)
    assert host_requests(shodan_emulator, ip) == 1
    assert len(events) == 4
    by_org: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_org.setdefault(e["data"]["organization_id"], []).append(e)
    assert set(by_org) == {"acme", "globex"}
    for org, agents in (("acme", ["a1"]), ("globex", ["g1", "g2"])):
        mine = sorted(by_org[org], key=lambda e: e["data"]["port"])
        assert [e["data"]["port"] for e in mine] == [443, 3390]
        assert all(e["type"].endswith(".exposure.opened") for e in mine)
        assert all(e["specversion"] == "1.0" for e in mine)
        assert sorted(mine[0]["data"]["candidate_agents"]) == agents
        rdp = mine[1]
        assert rdp["subject"] == f"{ip}/tcp/3390"
        assert rdp["data"]["severity"] == "critical"  # RDP on a non-default port
        assert rdp["data"]["service"]["name"] == "rdp"
        assert rdp["data"]["shodan_last_scanned"] is not None
        assert rdp["data"]["last_queried"] is not None
        assert mine[0]["data"]["vulns"] == ["CVE-2021-23017"]
    assert len({e["id"] for e in events}) == 4


async def test_a_rescan_that_closes_one_port_and_opens_another_emits_exactly_that(
    scan_settings: Settings, shodan_emulator: ShodanEmulator
) -> None:
    ip = "44.1.2.3"
    shodan_emulator.set_host(ip, host(ip, banner(22, "ssh", product="OpenSSH"), banner(445, "smb")))
    settings = scan_settings.model_copy(update={"rescan_interval_seconds": 2.0})
    await produce(
        settings.kafka_bootstrap_servers,
        settings.topic_heartbeats,
        [heartbeat("acme", ip, "a1", NOW)],
    )
    async with running(settings, ("ingest", "scanner", "scheduler")) as worker:
        first = await events_on(settings, 2)
        assert sorted(e["data"]["port"] for e in first) == [22, 445]
        smb = next(e for e in first if e["data"]["port"] == 445)
        assert smb["data"]["severity"] == "critical"
        shodan_emulator.set_host(
            ip,
            host(ip, banner(22, "ssh", product="OpenSSH"), banner(3306, "mysql", product="MySQL")),
        )
        events = await events_on(settings, 4, timeout=60)
        await asyncio.sleep(3)  # further rescans of an unchanged host add nothing
        events = await events_on(settings, 4)
        assert (
            sample(worker, "recon_scan_requests_published_total", reason="rescan", path="scheduler")
            >= 1
        )
    later = events[2:]
    assert len(events) == 4
    assert sorted((e["data"]["change"], e["data"]["port"]) for e in later) == [
        ("closed", 445),
        ("opened", 3306),
    ]
    closed = next(e for e in later if e["data"]["change"] == "closed")
    assert closed["data"]["reason"] == "port_closed"


async def test_a_rescan_of_a_shared_ip_is_requested_for_every_org_and_looked_up_once(
    scan_settings: Settings, shodan_emulator: ShodanEmulator
) -> None:
    ip = "44.1.2.4"
    shodan_emulator.set_host(ip, host(ip, banner(22, "ssh", product="OpenSSH")))
    settings = scan_settings.model_copy(update={"rescan_interval_seconds": 2.0})
    await produce(
        settings.kafka_bootstrap_servers,
        settings.topic_heartbeats,
        [heartbeat("acme", ip, "a1", NOW), heartbeat("globex", ip, "g1", NOW)],
    )
    async with running(settings, ("ingest", "scanner", "scheduler")) as worker:
        await events_on(settings, 2)

        async def rescanned() -> bool:
            return host_requests(shodan_emulator, ip) >= 2 and (
                sample(worker, "recon_shodan_requests_total", provider="api", outcome="ok") >= 2
            )

        await eventually(rescanned, timeout=60)
        lookups = host_requests(shodan_emulator, ip)
        published = sample(
            worker, "recon_scan_requests_published_total", reason="rescan", path="scheduler"
        )
    records = await read_all(settings.kafka_bootstrap_servers, settings.topic_scan_requests)
    rescans = [json.loads(r.value) for r in records if json.loads(r.value)["reason"] == "rescan"]
    assert len(rescans) == published
    assert all(r["ip"] == ip for r in rescans)
    by_org = {org: sum(r["organization_id"] == org for r in rescans) for org in ("acme", "globex")}
    # Each round asks on behalf of both orgs, never one standing for the other.
    assert by_org["acme"] == by_org["globex"] >= 1
    assert len(rescans) == 2 * by_org["acme"]
    # Two requests a round, one lookup a round (plus the first, for the new pair).
    assert lookups <= 1 + by_org["acme"]


@pytest.mark.parametrize("status", [404, 429, 500, 503, "slow"])
async def test_lookup_failures_recover(
    scan_settings: Settings, shodan_emulator: ShodanEmulator, status: int | str
) -> None:
    ip = "45.33.32.156"
    shodan_emulator.set_host(ip, host(ip, banner(23, "telnet")))
    if status == "slow":
        shodan_emulator.fail_next(ip, 200, count=1, delay=3.0)
    elif status == 404:
        shodan_emulator.remove_host(ip)
    else:
        shodan_emulator.fail_next(ip, status, count=2)
    await produce(
        scan_settings.kafka_bootstrap_servers,
        scan_settings.topic_heartbeats,
        [heartbeat("acme", ip, "a1", NOW)],
    )
    settings = scan_settings.model_copy(update={"scan_reuse_seconds": 0.0})
    async with running(settings, ("ingest", "scanner")) as worker:
        if status == 404:
            # Nothing known: no event, the lookup is stored and done.
            await eventually(lambda: _counted(worker, "not_found", 1))
            shodan_emulator.set_host(ip, host(ip, banner(23, "telnet")))
            await produce(
                settings.kafka_bootstrap_servers,
                settings.topic_scan_requests,
                [
                    json.dumps(
                        {
                            "organization_id": "acme",
                            "ip": ip,
                            "reason": "manual",
                            "requested_at": datetime.now(UTC).isoformat(),
                        }
                    ).encode()
                ],
            )
        events = await events_on(settings, 1, timeout=90)
    assert [e["data"]["port"] for e in events] == [23]
    assert events[0]["data"]["severity"] == "critical"


async def test_a_refused_lookup_is_recorded_counted_and_asked_again_after_the_interval(
    scan_settings: Settings, shodan_emulator: ShodanEmulator, db: Any
) -> None:
    refused, other = "45.33.32.158", "45.33.32.159"
    key = shodan_emulator.api_key
    shodan_emulator.set_host(refused, host(refused, banner(23, "telnet")))
    shodan_emulator.set_host(other, host(other, banner(5900, "vnc")))
    # An unknown 400, echoing the key back: never retried at once, never stored with the key.
    shodan_emulator.fail_next(refused, 400, body={"error": f"Invalid request ?key={key}"})
    interval = 8.0
    settings = scan_settings.model_copy(update={"rescan_interval_seconds": interval})
    bootstrap, heartbeats = settings.kafka_bootstrap_servers, settings.topic_heartbeats
    async with running(settings, ("ingest", "scanner")) as worker:
        await produce(bootstrap, heartbeats, [heartbeat("acme", refused, "a1", NOW)])

        async def recorded() -> Any:
            item = await db.scan_queue.find_one({"_id": refused})
            return item if item and "last_error" in item else None

        item = await eventually(recorded)
        # Counted as the lookup ends, a moment after the error is kept on the item.
        assert await eventually(lambda: _counted(worker, "permanent", 1))
        # While the refused IP waits, the queue serves others.
        await produce(bootstrap, heartbeats, [heartbeat("acme", other, "a2", NOW)])
        first = await events_on(settings, 1)
        events = await events_on(settings, 2, timeout=60)
        permanent = sample(
            worker, "recon_shodan_requests_total", provider="api", outcome="permanent"
        )
    error = item["last_error"]
    assert "HTTP 400" in error["message"]
    assert key not in error["message"]
    assert item["not_before"] - error["at"] == timedelta(seconds=interval)
    assert permanent == 1
    assert [e["data"]["ip"] for e in first] == [other]
    assert sorted(e["data"]["ip"] for e in events) == sorted([refused, other])

    def times(ip: str) -> list[float]:
        path = f"/shodan/host/{ip}"
        return [r.at for r in shodan_emulator.requests if r.path.split("?", 1)[0] == path]

    tries, others = times(refused), times(other)
    assert len(tries) == 2
    assert tries[1] - tries[0] >= interval
    assert others[0] < tries[1]


async def _counted(worker: Any, outcome: str, n: int) -> bool:
    return sample(worker, "recon_shodan_requests_total", provider="api", outcome=outcome) >= n


async def test_a_rejected_key_stops_cleanly_and_loses_nothing(
    scan_settings: Settings, shodan_emulator: ShodanEmulator
) -> None:
    import urllib.error
    import urllib.request

    ip = "45.33.32.157"
    shodan_emulator.set_host(ip, host(ip, banner(5900, "vnc")))
    good_keys = set(shodan_emulator.keys)
    shodan_emulator.keys = set()  # every key rejected
    await produce(
        scan_settings.kafka_bootstrap_servers,
        scan_settings.topic_heartbeats,
        [heartbeat("acme", ip, "a1", NOW)],
    )
    async with running(scan_settings, ("ingest", "scanner")) as worker:

        def readyz() -> tuple[int, dict[str, Any]]:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{worker.status.port}/readyz", timeout=5
                ) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read())

        async def not_ready() -> tuple[int, dict[str, Any]] | None:
            status, body = await asyncio.to_thread(readyz)
            return (status, body) if status == 503 else None

        status, body = await eventually(not_ready)
        assert "API key" in body["checks"]["shodan"]
        assert shodan_emulator.api_key not in json.dumps(body)
        # At most the one lookup that met the 401 (it may race the start-up key
        # check); after that, nothing until the key is accepted again.
        tried = host_requests(shodan_emulator, ip)
        assert tried <= 1
        await asyncio.sleep(2)
        assert host_requests(shodan_emulator, ip) == tried
        shodan_emulator.keys = good_keys  # the operator fixes the plan/key
        events = await events_on(scan_settings, 1, timeout=60)
        status, _ = await asyncio.to_thread(readyz)
        assert status == 200
    assert [e["data"]["port"] for e in events] == [5900]


async def test_an_event_stored_but_not_published_goes_out_once_with_its_id(
    scan_settings: Settings, shodan_emulator: ShodanEmulator, db: Any
) -> None:
    # The state a crash between the snapshot update and the publish leaves.
    store = snapshot_updater(db)
    scan = HostScan(
        ip="45.33.32.158",
        provider="api",
        queried_at=NOW,
        services=(Service(port=6379, module="redis", product="Redis"),),
    )
    stored = (await store.apply(OrgContext("acme", ("a1",), ()), scan)).events
    assert len(stored) == 1
    async with running(scan_settings, ("scanner",)):
        events = await events_on(scan_settings, 1)
        await asyncio.sleep(2)
    async with running(scan_settings, ("scanner",)):  # a restart re-emits nothing new
        await asyncio.sleep(3)
    events = await events_on(scan_settings, 1)
    assert [e["id"] for e in events] == [stored[0].id]
    assert events[0]["data"]["severity"] == "critical"
    doc = await db.exposures.find_one({"organization_id": "acme"})
    assert doc["pending"] == []


async def test_restarting_every_worker_re_emits_nothing_new(
    scan_settings: Settings, shodan_emulator: ShodanEmulator
) -> None:
    ip = "45.33.32.159"
    shodan_emulator.set_host(ip, host(ip, banner(1433, "mssql", product="Microsoft SQL Server")))
    await produce(
        scan_settings.kafka_bootstrap_servers,
        scan_settings.topic_heartbeats,
        [heartbeat("acme", ip, "a1", NOW), heartbeat("acme", ip, "a2", NOW)],
    )
    roles = ("ingest", "scanner", "scheduler")
    async with running(scan_settings, roles):
        first = await events_on(scan_settings, 1)
    async with running(scan_settings, roles):
        await asyncio.sleep(4)
    after = await events_on(scan_settings, 1)
    assert [e["id"] for e in after] == [e["id"] for e in first]


async def test_scheduler_failover(scan_settings: Settings, db: Any, tmp_path: Any) -> None:
    settings = scan_settings.model_copy(update={"scheduler_lease_seconds": 3.0})
    leader = start_worker(settings, "scheduler", tmp_path / "a.log")
    try:

        async def a_leads() -> Any:
            lease = await db.leases.find_one({"_id": "scheduler"})
            return lease if lease and f"-{leader.pid}-" in lease["holder"] else None

        await eventually(a_leads, timeout=30)
        async with running(settings, ("scheduler",)) as standby:
            scheduler = standby.scheduler
            assert scheduler is not None

            async def standing_by() -> bool:
                return scheduler.state == "standing by"

            # It has tried the lease, found it held, and does not lead.
            await eventually(standing_by, timeout=20)
            assert sample(standby, "recon_scheduler_leader") == 0.0
            # Standing by is ready; /readyz says which.
            assert (await standby.status.readiness())["scheduler"] == "ok"
            leader.kill()  # dies: no hand-over, the lease must expire
            leader.wait(10)
            await eventually(lambda: _gauge(standby, 1.0), timeout=20)
            assert scheduler.state == "leading"
            lease = await db.leases.find_one({"_id": "scheduler"})
            assert lease["holder"] == scheduler.lease.holder
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait(10)


async def _gauge(worker: Any, value: float) -> bool:
    return sample(worker, "recon_scheduler_leader") == value


async def test_a_pair_no_longer_seen_is_retired_and_its_exposures_closed(
    scan_settings: Settings, shodan_emulator: ShodanEmulator, db: Any
) -> None:
    ip = "45.33.32.160"
    shodan_emulator.set_host(ip, host(ip, banner(3389, "rdp"), banner(80, "http")))
    an_hour_ago = NOW - timedelta(hours=1)
    await produce(
        scan_settings.kafka_bootstrap_servers,
        scan_settings.topic_heartbeats,
        [heartbeat("acme", ip, "a1", an_hour_ago)],
    )
    async with running(scan_settings, ("ingest", "scanner")):
        await events_on(scan_settings, 2)
    settings = scan_settings.model_copy(update={"ip_retention_seconds": 600.0})
    async with running(settings, ("scheduler",)) as worker:
        events = await events_on(settings, 4)
        assert sample(worker, "recon_pairs_retired_total") == 1
    closed = [e for e in events if e["data"]["change"] == "closed"]
    assert sorted(e["data"]["port"] for e in closed) == [80, 3389]
    assert all(e["data"]["reason"] == "ip_retired" for e in closed)
    pair = await db.org_ips.find_one({"organization_id": "acme", "ip": ip})
    assert pair["status"] == "retired"


async def test_new_ips_go_before_a_large_rescan_backlog(db: Any) -> None:
    from recon_stream.adapters.scan_queue import ScanQueue, ensure_indexes
    from recon_stream.domain.scan_requests import ScanReason, ScanRequest

    await ensure_indexes(db)
    queue = ScanQueue(db)
    old = NOW - timedelta(days=1)
    rescans = [
        ScanRequest(
            organization_id="acme",
            ip=f"60.0.{i // 200}.{i % 200}",
            reason=ScanReason.RESCAN,
            requested_at=old + timedelta(seconds=i),
        )
        for i in range(300)
    ]
    await queue.enqueue(rescans)
    fresh = [
        ScanRequest(
            organization_id="globex",
            ip=f"61.0.0.{i}",
            reason=ScanReason.NEW,
            requested_at=NOW + timedelta(seconds=i),
        )
        for i in range(3)
    ]
    await queue.enqueue(fresh)
    # The same IP asked for again by another org merges into one item.
    await queue.enqueue([fresh[0].model_copy(update={"organization_id": "initech"})])
    claimed = [await queue.claim(timedelta(minutes=1)) for _ in range(4)]
    assert [c.ip for c in claimed if c] == ["61.0.0.0", "61.0.0.1", "61.0.0.2", "60.0.0.0"]
    assert claimed[0] is not None
    assert set(claimed[0].orgs) == {"globex", "initech"}
    assert not claimed[0].forced
    assert claimed[3] is not None
    assert claimed[3].forced
    assert (await queue.depth()) == {0: 3, 2: 300}  # 0 new, 1 manual, 2 routine rescan


async def test_the_exposures_command_shows_the_dashboard_table(
    scan_settings: Settings, shodan_emulator: ShodanEmulator
) -> None:
    import csv
    import io
    import subprocess
    import sys

    from .support import worker_env

    ip = "45.33.32.161"
    shodan_emulator.set_host(
        ip, host(ip, banner(3389, "rdp", product="Remote Desktop Protocol"), banner(22, "ssh"))
    )
    await produce(
        scan_settings.kafka_bootstrap_servers,
        scan_settings.topic_heartbeats,
        [heartbeat("acme", ip, "laptop-7", NOW)],
    )
    async with running(scan_settings, ("ingest", "scanner")):
        await events_on(scan_settings, 2)

    def run(fmt: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "recon_stream", "exposures", "--org", "acme", "--format", fmt],
            env=worker_env(scan_settings),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return result.stdout

    rows = json.loads(run("json"))
    assert [(r["ip"], r["port"], r["severity"]) for r in rows] == [
        (ip, 22, "medium"),
        (ip, 3389, "critical"),
    ]
    assert rows[1]["candidate_agents"] == ["laptop-7"]
    assert rows[1]["last_queried"]
    assert rows[1]["shodan_last_scanned"]
    assert rows[1]["accepted"] is False
    table = run("table")
    assert "LAST QUERIED" in table
    assert "3389" in table
    assert "critical" in table
    parsed = list(csv.DictReader(io.StringIO(run("csv"))))
    assert [r["port"] for r in parsed] == ["22", "3389"]
