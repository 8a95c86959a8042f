"""Offboarding benchmark: `purge` of an organization with --ips (1,000) IPs and
--exposures-per-ip (5) open exposures on each (5,000).

Runs against real servers (embedded Tansu + MongoDB unless --kafka / --mongodb are
given: genuine mongod where its wheel is installed, else SecantusDB; the output's
`mongodb` says which). One scanner worker (it runs the commands stage) runs in-process
(`build_worker`), with the sample provider: the purge makes no lookup.

1. The organization's pairs (`org_ips`), snapshots (copies of one snapshot the real
   updater wrote, one per IP) and one history entry per exposure are written straight
   into MongoDB, beside another organization's IP that must survive.
2. A `purge` command is published; t0. Its outcome is awaited in the command log (as
   `recon-stream purge --wait` does), then every `closed` event
   (`organization_purged`) is read back from the exposures topic and every tombstone
   from the state topic.

Reported: `purge_s` (t0 to the outcome `applied`), `closed_events`, `tombstones`,
`exposures_per_s` (exposures / purge_s), the organization's documents left (0) and the
other organization's kept.

Prints one JSON object on stdout (logs go to stderr). Example:
    python bench/purge.py
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from recon_stream.adapters.command_log import CommandLog
from recon_stream.app import snapshot_updater
from recon_stream.domain.scans import HostScan, Service
from recon_stream.domain.snapshot import OrgContext

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.harness import run_on_servers
from tests.integration import support
from tests.integration.support import prepare, running

log = logging.getLogger("bench.purge")

ORG = "leaving-org"
MODULES = ("rdp", "smb", "ms-sql", "vnc", "https", "ssh", "redis", "ftp")
PORTS = (3389, 445, 1433, 5900, 443, 22, 6379, 21)


def pair_ip(n: int) -> str:
    # 11.0.0.0/8 and up: public, never special-purpose; unique per n.
    return f"{11 + n // 65536 % 80}.{n // 256 % 256}.{n % 256}.{1 + n // 5_242_880}"


async def seed(db: Any, ips: int, per_ip: int) -> int:
    """The organization's pairs, snapshots and history entries; how many documents."""
    now = datetime.now(UTC)
    services = tuple(
        Service(port=PORTS[i], module=MODULES[i], shodan_timestamp=now) for i in range(per_ip)
    )
    scan = HostScan(ip="11.250.250.250", provider="api", queried_at=now, services=services)
    outbox = await snapshot_updater(db).apply(OrgContext("template", ("a",), ()), scan)
    assert len(outbox.events) == per_ip
    template = await db["exposures"].find_one({"organization_id": "template"})
    await db["exposures"].delete_many({"organization_id": "template"})
    del template["_id"]
    template.update(pending=[], pending_state=[])
    pairs, snapshots, history = [], [], []
    for n in range(ips):
        ip = pair_ip(n)
        pairs.append(
            {
                "organization_id": ORG,
                "ip": ip,
                "ip_version": 4,
                "status": "active",
                "first_seen": now,
                "last_seen": now,
                "agents": [{"agent_id": f"agent-{n}", "last_seen": now, "hostname": None}],
                "site_ids": [],
                "scan_request": {"state": "sent", "sent_at": now},
            }
        )
        snapshots.append({**template, "organization_id": ORG, "ip": ip})
        history += [
            {
                "_id": f"{ORG}/{ip}/{s.port}/opened",
                "organization_id": ORG,
                "ip": ip,
                "port": s.port,
                "time": now,
                "change": "opened",
            }
            for s in services
        ]
    other = {**pairs[0], "organization_id": "staying-org"}
    await db["org_ips"].insert_many([*pairs, other], ordered=False)
    await db["exposures"].insert_many(
        [*snapshots, {**snapshots[0], "organization_id": "staying-org"}], ordered=False
    )
    await db["exposure_history"].insert_many(history, ordered=False)
    return len(pairs) + len(snapshots) + len(history)


async def read_back(bootstrap: str, topic: str, want: int, limit: float) -> list[Any]:
    async def enough() -> list[Any] | None:
        records = await support.read_all(bootstrap, topic, idle=0.5, expect=want)
        return records if len(records) >= want else None

    return list(await support.eventually(enough, timeout=limit, interval=1.0))


async def run(kafka: str, mongodb: str, mongodb_server: str, args: argparse.Namespace) -> Any:
    unique = uuid.uuid4().hex[:8]
    settings = support.make_settings(
        kafka,
        mongodb,
        unique,
        mongodb_database=f"bench_{unique}",
        shodan_provider="sample",
        kafka_topic_partitions=args.partitions,
    )
    await prepare(settings)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb, tz_aware=True)
    db = client[settings.mongodb_database]
    exposures = args.ips * args.exposures_per_ip
    try:
        documents = await seed(db, args.ips, args.exposures_per_ip)
        async with running(settings, ("scanner",)):
            command_id = str(uuid.uuid4())
            body = {
                "command": "purge",
                "organization_id": ORG,
                "requested_by": "bench",
                "requested_at": datetime.now(UTC).isoformat(),
                "command_id": command_id,
            }
            t0 = time.monotonic()
            await support.produce(
                kafka, settings.topic_commands, [(ORG.encode(), json.dumps(body).encode(), [])]
            )
            commands = CommandLog(db)
            outcome = await support.eventually(
                lambda: commands.outcome(command_id), timeout=args.timeout, interval=0.1
            )
            purge_s = time.monotonic() - t0
        events = await read_back(kafka, settings.topic_exposures, exposures, args.timeout)
        closed = [
            e
            for e in (json.loads(r.value)["data"] for r in events)
            if e["change"] == "closed" and e["reason"] == "organization_purged"
        ]
        state = await read_back(kafka, settings.topic_exposure_state, exposures, args.timeout)
        tombstones = sum(r.value is None for r in state)
        left = {
            name: await db[name].count_documents({"organization_id": ORG})
            for name in ("org_ips", "exposures", "exposure_history")
        }
        kept = await db["org_ips"].count_documents({"organization_id": "staying-org"})
    finally:
        await client.close()
    return {
        "benchmark": "purge",
        "mongodb": mongodb_server,
        "ips": args.ips,
        "exposures": exposures,
        "documents_seeded": documents,
        "outcome": outcome.outcome.value,
        "purge_s": round(purge_s, 2),
        "exposures_per_s": round(exposures / purge_s),
        "closed_events": len(closed),
        "tombstones": tombstones,
        "documents_left": left,
        "other_org_pairs_kept": kept,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ips", type=int, default=1000)
    parser.add_argument("--exposures-per-ip", type=int, default=5, choices=range(1, 9))
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--kafka", help="bootstrap servers (default: embedded Tansu)")
    parser.add_argument("--mongodb", help="MongoDB URI (default: embedded)")
    args = parser.parse_args()
    run_on_servers(run, args)


if __name__ == "__main__":
    main()
