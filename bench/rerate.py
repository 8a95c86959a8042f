"""Re-rating benchmark: a CVE added to the KEV catalog, N open exposures carrying it.

Runs against real servers (embedded Tansu + MongoDB unless --kafka / --mongodb are
given: genuine mongod where its wheel is installed, else SecantusDB; the output's
`mongodb` says which). One scheduler worker runs in-process (`build_worker`), its feed
refresher pointed at a KEV file (RECON_KEV_SOURCE) refreshed every second.

1. The first load of the KEV file (without the CVE) completes and its marks clear.
2. --exposures (100,000) open exposures over --orgs (10,000) organizations, one per
   (organization, IP) snapshot, each carrying the CVE and rated without KEV, are
   written straight into `exposures` (copies of one snapshot the real updater wrote:
   a bulk insert, not the scanner, so the set-up takes seconds).
3. The CVE is added to the KEV file; t0. The leader's next refresh marks it and
   re-assesses every snapshot carrying it, in batches of `rerating.BATCH` (500),
   --concurrency (RECON_RERATE_CONCURRENCY) batches at a time, publishing
   `changed[severity]` events (and their history entries, state rows and OCSF
   findings, as in production): every exposure becomes critical.
4. Every `changed` event is read back from the exposures topic.
5. --rounds > 1: the next round removes the CVE from the file again (every exposure
   back to its old severity), the one after adds it, and so on; each round is timed.

Reported: `to_first_event_s` and `to_last_event_s` from t0 (t0 to the refresh is at
most a refresh interval plus a tick, ~1.5 s here), `rerate_s` (first to last event),
`exposures_per_s` (N / rerate_s) and `overall_per_s` (N / to_last_event_s), with
--rounds repetitions (a fresh CVE each) and their medians. No Shodan request is made
(no provider is even built: the scheduler role has none).

Prints one JSON object on stdout (logs go to stderr). Example:
    python bench/rerate.py                     # 100,000 exposures, a few minutes
    python bench/rerate.py --exposures 10000   # a quick run
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from pymongo import AsyncMongoClient

from recon_stream.adapters.vuln_feeds import VulnFeeds
from recon_stream.app import snapshot_updater
from recon_stream.domain.scans import HostScan, Service
from recon_stream.domain.snapshot import OrgContext

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.harness import run_on_servers
from tests.integration import support
from tests.integration.support import prepare, running

log = logging.getLogger("bench.rerate")

CVE = "CVE-2031-1000"


def kev_file(path: Path, cves: list[str]) -> None:
    rows = [{"cveID": "CVE-2023-4966", "dateAdded": "2023-10-18"}]
    rows += [{"cveID": cve, "dateAdded": "2031-01-01"} for cve in cves]
    # Replaced in one rename: a refresh never reads half a file.
    part = path.with_suffix(".part")
    part.write_text(json.dumps({"vulnerabilities": rows}), encoding="utf-8")
    part.replace(path)


def pair_ip(n: int) -> str:
    # 11.0.0.0/8 and up: public, never special-purpose; unique per n.
    return f"{11 + n // 65536 % 80}.{n // 256 % 256}.{n % 256}.{1 + n // 5_242_880}"


async def seed(db: Any, exposures: int, orgs: int, cves: list[str]) -> float:
    """N snapshots, each with one open https exposure carrying every CVE of `cves`,
    assessed without KEV; returns the seconds it took."""
    started = time.monotonic()
    service = Service(
        port=443,
        module="https",
        product="PAN-OS GlobalProtect",
        vulns=tuple(cves),
        cvss=tuple((cve, 5.0) for cve in cves),
        max_cvss=5.0,
        shodan_timestamp=datetime.now(UTC),
    )
    scan = HostScan(ip="11.250.250.250", provider="api", queried_at=datetime.now(UTC))
    scan = scan.model_copy(update={"services": (service,)})
    outbox = await snapshot_updater(db).apply(OrgContext("template", ("a",), ()), scan)
    severity = outbox.events[0].data.severity.value
    template = await db["exposures"].find_one({"organization_id": "template"})
    await db["exposures"].delete_one({"_id": template["_id"]})
    del template["_id"]
    template.update(pending=[], pending_state=[])
    batch: list[dict[str, Any]] = []
    for n in range(exposures):
        batch.append({**template, "organization_id": f"org-{n % orgs:05d}", "ip": pair_ip(n)})
        if len(batch) == 5000:
            await db["exposures"].insert_many(batch, ordered=False)
            batch = []
    if batch:
        await db["exposures"].insert_many(batch, ordered=False)
    log.warning("seeded %d exposures rated %s without KEV", exposures, severity)
    return time.monotonic() - started


async def changed_events(
    bootstrap: str, topic: str, since: datetime, n: int, t0: float, limit: float
) -> tuple[list[float], int]:
    """Arrival times (seconds after t0) of the first `n` changed[severity] events that
    occurred after `since`, and how many of them were critical."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    arrivals: list[float] = []
    critical = 0
    try:
        deadline = time.monotonic() + limit
        while len(arrivals) < n and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            now = time.monotonic() - t0
            for records in batch.values():
                for record in records:
                    event = json.loads(record.value)
                    data = event["data"]
                    if (
                        data["change"] == "changed"
                        and "severity" in data["changed_fields"]
                        and datetime.fromisoformat(event["time"]) >= since
                    ):
                        arrivals.append(now)
                        critical += data["severity"] == "critical"
    finally:
        await consumer.stop()
    return arrivals, critical


async def run(kafka: str, mongodb: str, mongodb_server: str, args: argparse.Namespace) -> Any:
    unique = uuid.uuid4().hex[:8]
    tmp = Path(tempfile.mkdtemp(prefix="recon-rerate-"))
    kev = tmp / "kev.json"
    kev_file(kev, [])
    settings = support.make_settings(
        kafka,
        mongodb,
        unique,
        mongodb_database=f"bench_{unique}",
        kev_source=str(kev),
        vuln_feed_refresh_seconds=1.0,
        scheduler_tick_seconds=0.5,
        scheduler_lease_seconds=5.0,
        rerate_concurrency=args.concurrency,
        kafka_topic_partitions=args.partitions,
    )
    await prepare(settings)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb, tz_aware=True)
    db = client[settings.mongodb_database]
    feeds = VulnFeeds(db)
    rounds: list[dict[str, Any]] = []
    try:
        seeded = await seed(db, args.exposures, args.orgs, [CVE])
        async with running(settings, ("scheduler",)):

            async def settled() -> bool:
                return (await feeds.status("kev")).loaded_at is not None and not (
                    await feeds.marked(1)
                )

            await support.eventually(settled, timeout=120.0)
            for r in range(args.rounds):
                added = r % 2 == 0
                since, t0 = datetime.now(UTC), time.monotonic()
                kev_file(kev, [CVE] if added else [])
                arrivals, critical = await changed_events(
                    kafka, settings.topic_exposures, since, args.exposures, t0, args.timeout
                )
                done = len(arrivals) == args.exposures
                first, last = (arrivals[0], arrivals[-1]) if arrivals else (None, None)
                span = (last - first) if done and last is not None and first is not None else None
                rounds.append(
                    {
                        "kev": "added" if added else "removed",
                        "events": len(arrivals),
                        "critical": critical,
                        "complete": done,
                        "to_first_event_s": round(first, 2) if first is not None else None,
                        "to_last_event_s": round(last, 2) if done and last is not None else None,
                        "rerate_s": round(span, 2) if span else None,
                        "exposures_per_s": round(args.exposures / span) if span else None,
                        "overall_per_s": round(args.exposures / last) if done and last else None,
                    }
                )
                log.warning("round %d: %s", r + 1, rounds[-1])
    finally:
        await client.close()

    def median(key: str) -> float | None:
        values = [r[key] for r in rounds if r[key] is not None]
        return round(statistics.median(values), 2) if values else None

    return {
        "benchmark": "rerate",
        "mongodb": mongodb_server,
        "exposures": args.exposures,
        "orgs": args.orgs,
        "concurrency": args.concurrency,
        "partitions": args.partitions,
        "seed_s": round(seeded, 1),
        "rounds": rounds,
        "median": {
            key: median(key)
            for key in ("to_first_event_s", "to_last_event_s", "rerate_s", "exposures_per_s")
        },
        "target": "the last changed event within 60 s of the KEV change",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--exposures", type=int, default=100_000)
    parser.add_argument("--orgs", type=int, default=10_000)
    parser.add_argument(
        "--concurrency", type=int, default=32, help="RECON_RERATE_CONCURRENCY: batches in flight"
    )
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--rounds", type=int, default=3, help="the CVE added, removed, added... to KEV"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per round")
    parser.add_argument("--kafka", help="bootstrap servers (default: embedded Tansu)")
    parser.add_argument("--mongodb", help="MongoDB URI (default: embedded)")
    args = parser.parse_args()
    run_on_servers(run, args)


if __name__ == "__main__":
    main()
