"""New-pair benchmark: ingest of an onboarding (only new (org, IP) pairs) against a
bare bulk pipeline upsert of the same pairs, in the same run, on the same MongoDB.

A customer onboarding brings tens of thousands of pairs nobody has seen: every
heartbeat is a MongoDB write and a scan request. Measured, in one run:

- `bare`: the exact pipeline upserts ingest sends (`MongoOrgIps.upserts`, built
  before the clock starts), written with `bulk_write(ordered=False)` in batches
  of `--max-records`, one batch at a time, into an empty `org_ips` with the
  same indexes: the rate of the database alone. `--bare-runs` runs, half before
  the ingest run and half after, each into a fresh database; the median counts.
- `ingest`: a `recon-stream run ingest` subprocess over the same heartbeats on
  Kafka (all published before it starts): validate, classify, fold, upsert,
  publish one scan request per pair, mark it sent. Timed from `--settle` of the
  pairs written (group join and first fetches left out) until every pair's
  scan request is marked sent; progress read from its /metrics.

Servers are embedded (Tansu, and genuine mongod where installed) unless
`--kafka` / `--mongodb` are given. `--profile FILE` records the worker with
py-spy over the timed window (speedscope JSON; open at speedscope.app).
Prints one JSON object. Example:
    python bench/new_pairs.py --pairs 40000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from recon_stream.adapters.collections import ORG_IPS
from recon_stream.adapters.org_ips import MongoOrgIps, ensure_indexes
from recon_stream.domain.heartbeats import observed_time, parse_heartbeat
from recon_stream.domain.sightings import PairSighting
from recon_stream.embedded import free_port

# Shared with the steady-state ingest bench; make the repository root importable
# when this file is run as a script (`python bench/new_pairs.py`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.ingest import (
    cpu_seconds,
    peak_rss_mb,
    publish,
    scrape,
    servers,
    start_ingest_worker,
)


def onboarding(pairs: int, seed: int) -> list[bytes]:
    """One heartbeat per new pair: organizations of 1-20 egress IPs, 3 sites each."""
    rng = random.Random(seed)
    at = datetime(2026, 11, 1, tzinfo=UTC)
    addresses: set[str] = set()
    while len(addresses) < pairs:
        a, b, c, d = (
            rng.randint(11, 99),
            rng.randint(0, 255),
            rng.randint(0, 255),
            rng.randint(1, 254),
        )
        addresses.add(f"{a}.{b}.{c}.{d}")
    values = []
    org, left = 0, 0
    for n, ip in enumerate(sorted(addresses, key=lambda _: rng.random())):
        if left == 0:
            org, left = org + 1, rng.randint(1, 20)
        left -= 1
        values.append(
            json.dumps(
                {
                    "organization_id": f"onboard-{org:05d}",
                    "agent_id": f"agent-{n:06d}",
                    "public_ip": ip,
                    "observed_at": (at + timedelta(milliseconds=n)).isoformat(),
                    "site_id": f"site-{n % 3}",
                    "hostname": f"host-{n:06d}",
                    "agent_version": "4.2.0",
                },
                separators=(",", ":"),
            ).encode()
        )
    return values


def sightings_of(values: list[bytes]) -> list[PairSighting]:
    out = []
    for value in values:
        hb = parse_heartbeat(value)
        observed = observed_time(hb)
        sighting = PairSighting(hb.organization_id, hb.public_ip, observed, observed)
        sighting.add(hb, observed)
        out.append(sighting)
    return out


async def bare_bulk_upsert(uri: str, database: str, values: list[bytes], batch: int) -> float:
    """Pairs per second of the pipeline upserts alone, one batch at a time."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, tz_aware=True)
    try:
        db = client[database]
        await ensure_indexes(db)
        store = MongoOrgIps(db)
        now = datetime.now(UTC)
        sightings = sightings_of(values)
        batches = [
            store.upserts(sightings[i : i + batch], now) for i in range(0, len(sightings), batch)
        ]
        started = time.perf_counter()
        for ops in batches:
            result = await db[ORG_IPS].bulk_write(ops, ordered=False)
            assert result.upserted_count == len(ops)
        return len(sightings) / (time.perf_counter() - started)
    finally:
        await client.close()


def counter(m: dict[str, float], name: str) -> float:
    return sum(v for k, v in m.items() if k.startswith(name + "{") or k == name)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=40_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--max-records", type=int, default=2000)
    parser.add_argument("--settle", type=float, default=0.1, help="share of pairs not timed")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--bare-runs", type=int, default=3, help="bare runs (median reported)")
    parser.add_argument("--profile", type=Path, help="py-spy speedscope output of the worker")
    parser.add_argument("--kafka", help="bootstrap servers (default: embedded Tansu)")
    parser.add_argument("--mongodb", help="URI (default: embedded mongod, else SecantusDB)")
    args = parser.parse_args()

    values = onboarding(args.pairs, args.seed)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="recon-bench-")))
        kafka, mongodb, pids, engine = servers(stack, args, tmp)
        run = time.time_ns()

        def bare_run(i: int) -> float:
            database = f"bench_bare_{run}_{i}"
            return asyncio.run(bare_bulk_upsert(mongodb, database, values, args.max_records))

        # Half of the bare runs before the ingest run and half after, so a
        # neighbour's load on this shared machine weighs on both sides alike.
        before = (args.bare_runs + 1) // 2
        bare_rates = [bare_run(i) for i in range(before)]
        topic = f"bench-onboarding-{run}"
        asyncio.run(publish(kafka, topic, values, args.partitions))

        port = free_port()
        extra = {
            "RECON_INGEST_MAX_RECORDS": str(args.max_records),
            "RECON_KAFKA_TOPIC_PARTITIONS": str(args.partitions),
        }
        worker = start_ingest_worker(
            kafka, mongodb, topic, f"bench_ingest_{run}", port, tmp / "worker.log", extra
        )
        profiler: subprocess.Popen[bytes] | None = None
        try:
            m: dict[str, float] = {}
            deadline = time.monotonic() + 1800
            settle = int(args.pairs * args.settle)

            def sent(m: dict[str, float]) -> float:
                return counter(m, "recon_mongodb_writes_total") - counter(
                    m, 'recon_mongodb_writes_total{collection="org_ips",operation="upsert"}'
                )

            while time.monotonic() < deadline and sent(m) < settle:
                time.sleep(0.1)
                try:
                    m = scrape(port)
                except OSError:
                    m = {}
            t0, m0 = time.perf_counter(), m
            pids["worker"] = worker.pid
            cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            if args.profile:
                profiler = subprocess.Popen(
                    [
                        str(Path(sys.executable).parent / "py-spy"),
                        *("record", "--pid", str(worker.pid), "--format", "speedscope"),
                        *("--output", str(args.profile), "--rate", "200", "--idle"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            while time.monotonic() < deadline and sent(m) < args.pairs:
                time.sleep(0.1)
                m = scrape(port)
            t1 = time.perf_counter()
            cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            rss = peak_rss_mb(worker.pid)
        finally:
            if profiler is not None:
                profiler.send_signal(2)
                profiler.wait(60)
            worker.terminate()
            worker.wait(60)
        bare_rates += [bare_run(i) for i in range(before, args.bare_runs)]

    elapsed = t1 - t0
    timed = sent(m) - sent(m0)
    ingest = timed / elapsed
    bare = statistics.median(bare_rates)
    result: dict[str, Any] = {
        "benchmark": "new_pairs",
        "mongodb": engine,
        "pairs": args.pairs,
        "pairs_timed": int(timed),
        "partitions": args.partitions,
        "max_records": args.max_records,
        "bare_bulk_upsert_pairs_per_s": round(bare),
        "bare_runs_pairs_per_s": [round(r) for r in bare_rates],
        "ingest_new_pairs_per_s": round(ingest),
        "ingest_vs_bare": round(ingest / bare, 3),
        "target_ingest_vs_bare": 0.6,
        "pairs_discovered": counter(m, "recon_pairs_discovered_total"),
        "scan_requests_published": counter(m, "recon_scan_requests_published_total"),
        "timed_window_cpu": {
            name: round((cpu1[name] - cpu0[name]) / elapsed, 2) for name in cpu0 if pids[name]
        },
        "ingest_peak_rss_mb": round(rss, 1),
        "dlq": counter(m, "recon_dlq_messages_total"),
    }
    if args.profile:
        result["profile"] = str(args.profile)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
