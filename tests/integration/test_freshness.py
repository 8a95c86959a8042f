"""Freshness on genuine MongoDB: the scan queue's order (new IPs, then manual rescans,
then routine ones), which snapshots carry a CVE, what a feed refresh marks for
re-rating, and the age of the observations behind open critical exposures."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from recon_stream.adapters.exposures import MongoSnapshots
from recon_stream.adapters.scan_queue import ScanQueue
from recon_stream.adapters.vuln_feeds import VulnFeeds
from recon_stream.app import snapshot_updater
from recon_stream.domain.scan_requests import ScanReason, ScanRequest
from recon_stream.domain.scans import HostScan, Service
from recon_stream.domain.snapshot import OrgContext
from recon_stream.domain.verification import Check, CheckReason
from recon_stream.settings import Settings
from tests.emulators.shodan import ShodanEmulator

from .support import NOW, banner, eventually, heartbeat, host, produce, running, sample

CVE, OTHER_CVE = "CVE-2024-3400", "CVE-2023-4966"


def request(org: str, ip: str, reason: ScanReason, at: datetime) -> ScanRequest:
    return ScanRequest(organization_id=org, ip=ip, reason=reason, requested_at=at)


async def test_new_ips_go_before_manual_rescans_and_manual_before_routine(db: Any) -> None:
    queue, at = ScanQueue(db), datetime.now(UTC) - timedelta(minutes=5)
    # Queued before manual rescans had a priority of their own: a routine rescan at 1.
    await db["scan_queue"].insert_one(
        {
            "_id": "198.51.100.99",
            "priority": 1,
            "requested_at": at - timedelta(hours=1),
            "orgs": ["initech"],
            "reasons": ["rescan"],
            "seq": 1,
            "attempts": 0,
            "not_before": at - timedelta(days=1),
            "claim_until": at - timedelta(days=1),
        }
    )
    await queue.enqueue(
        [
            request("acme", f"198.51.100.{n}", ScanReason.RESCAN, at - timedelta(hours=2))
            for n in (1, 2)
        ]
    )
    # An organization-wide rescan of 20 IPs, asked for before another org's new IP.
    await queue.enqueue(
        [request("acme", f"203.0.113.{n}", ScanReason.MANUAL, at) for n in range(1, 21)]
    )
    await queue.enqueue([request("globex", "192.0.2.7", ScanReason.NEW, at + timedelta(seconds=5))])
    # A routine rescan that a manual request joins ranks as manual.
    await queue.enqueue([request("acme", "198.51.100.2", ScanReason.MANUAL, at)])
    order = []
    while (item := await queue.claim(timedelta(minutes=1))) is not None:
        order.append(item.ip)
    assert order[0] == "192.0.2.7"
    assert set(order[1:23]) == {
        *(f"203.0.113.{n}" for n in range(1, 21)),
        "198.51.100.2",
        "198.51.100.99",  # the old document: after every new IP, before routine rescans
    }
    assert order[23:] == ["198.51.100.1"]
    assert await queue.depth() == {0: 1, 1: 22, 2: 1}


def scan(ip: str, *services: Service, at: datetime | None = None) -> HostScan:
    return HostScan(ip=ip, provider="api", queried_at=at or datetime.now(UTC), services=services)


async def test_the_snapshots_carrying_a_cve_and_the_critical_observations(db: Any) -> None:
    updater, snapshots = snapshot_updater(db), MongoSnapshots(db)
    seen = datetime.now(UTC) - timedelta(days=3)
    web = Service(port=443, module="https", vulns=(CVE,), shodan_timestamp=seen)
    rdp = Service(port=3389, module="rdp", shodan_timestamp=seen - timedelta(days=2))
    both = Service(port=8443, module="https", vulns=(CVE, OTHER_CVE))
    for org, ip, services in [
        ("acme", "45.33.60.1", (web, rdp)),
        ("globex", "45.33.60.1", (web,)),
        ("acme", "45.33.60.2", (both,)),
        ("acme", "45.33.60.3", (rdp.model_copy(update={"shodan_timestamp": None}),)),
        ("initech", "45.33.60.4", (web,)),
    ]:
        await updater.apply(OrgContext(org, ("a",), ()), scan(ip, *services))
    await updater.retire("initech", "45.33.60.4", datetime.now(UTC))

    async def carrying(*cves: str) -> list[tuple[str, str]]:
        return sorted([pair async for pair in snapshots.carrying(cves)])

    assert await carrying(CVE, OTHER_CVE) == [
        ("acme", "45.33.60.1"),
        ("acme", "45.33.60.2"),  # once, though it carries both
        ("globex", "45.33.60.1"),
    ]
    assert await carrying(OTHER_CVE) == [("acme", "45.33.60.2")]
    assert await carrying("CVE-1999-0001") == []
    assert await carrying() == []
    assert "vulns" in await db["exposures"].index_information()
    # RDP is critical under the built-in policy; the one without a timestamp is not counted.
    observed = await snapshots.critical_observations()
    assert [round((datetime.now(UTC) - at) / timedelta(days=1)) for at in observed] == [5]
    # A TCP check that found a port open later than Shodan's crawl is the newer
    # observation; one that found it refused is not an observation of it open.
    checked = datetime.now(UTC) - timedelta(hours=12)
    opened = Check("45.33.60.3", 3389, CheckReason.CONN_ACCEPT, checked)
    await updater.verify("acme", "45.33.60.3", [opened], timedelta(minutes=1))
    refused = Check("45.33.60.1", 3389, CheckReason.CONN_REFUSED, checked)
    await updater.verify("acme", "45.33.60.1", [refused], timedelta(minutes=1))
    observed = await snapshots.critical_observations()
    assert [round((datetime.now(UTC) - at) / timedelta(hours=1)) for at in observed] == [
        120,
        12,
    ]


async def test_a_refresh_marks_only_cves_whose_kev_listing_or_epss_score_changed(
    db: Any, tmp_path: Path
) -> None:
    feeds = VulnFeeds(db)
    kev, epss = tmp_path / "kev.json", tmp_path / "epss.csv"

    def serve(kev_cves: list[str], scores: dict[str, tuple[float, float]]) -> None:
        rows = [{"cveID": cve, "dateAdded": "2024-04-12"} for cve in kev_cves]
        kev.write_text(json.dumps({"vulnerabilities": rows}))
        lines = [f"{cve},{s},{p}" for cve, (s, p) in scores.items()]
        epss.write_text(
            "#model_version:v,score_date:2026-12-01\ncve,epss,percentile\n" + "\n".join(lines)
        )

    async def refresh() -> list[str]:
        await feeds.refresh("kev", str(kev))
        await feeds.refresh("epss", str(epss))
        marked = await feeds.marked(100)
        await feeds.unmark(marked)
        return marked

    a, b, c = "CVE-2024-0001", "CVE-2024-0002", "CVE-2024-0003"
    serve([a, b], {a: (0.1, 0.5), c: (0.7, 0.9)})
    assert await refresh() == [a, b, c]  # the first load: everything it lists
    assert await refresh() == []  # the same copy again
    serve([a, b], {a: (0.1, 0.6), c: (0.2, 0.9)})
    assert await refresh() == [c]  # a new percentile alone rates nothing differently
    assert (await feeds.lookup([a]))[a].epss.percentile == 0.6  # type: ignore[union-attr]
    serve([a], {a: (0.1, 0.6), c: (0.2, 0.9)})
    assert await refresh() == [b]  # removed from KEV
    assert (await feeds.lookup([b]))[b].kev is None
    serve([a, b], {a: (0.1, 0.6), c: (0.2, 0.9)})
    assert await refresh() == [b]  # and back


async def test_the_scanner_samples_the_age_of_the_observations_behind_critical_exposures(
    scan_settings: Settings, shodan_emulator: ShodanEmulator
) -> None:
    ip, days = "45.33.60.9", 4
    old = banner(3389, "rdp")
    old["timestamp"] = (NOW - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%S.%f")
    shodan_emulator.set_host(ip, host(ip, old, banner(22, "ssh", product="OpenSSH")))
    await produce(
        scan_settings.kafka_bootstrap_servers,
        scan_settings.topic_heartbeats,
        [heartbeat("acme", ip, "a1", NOW)],
    )
    async with running(scan_settings, ("ingest", "scanner")) as worker:

        async def sampled() -> bool:
            return sample(worker, "recon_critical_exposures") == 1

        await eventually(sampled)
        median = sample(worker, "recon_critical_observation_age_seconds", quantile="0.5")
        assert days * 86400 <= median < (days + 1) * 86400
        oldest = sample(worker, "recon_critical_observation_age_seconds", quantile="1")
        assert oldest >= median
