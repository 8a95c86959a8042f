"""Ingest benchmark: the ingest worker against a bare aiokafka consumer, same topic.

Publishes a realistic heartbeat stream to a real broker (embedded Tansu unless
--kafka is given): first one heartbeat per (agent, IP) so every pair is known
(the warm-up), then the steady stream. Measures, in one run:

- bare aiokafka `getmany` rate over the whole topic (no decoding);
- the ingest worker's rate over the steady part (a `recon-stream run ingest`
  subprocess; progress read from its /metrics);
- MongoDB pair writes during the steady part, per heartbeat and per distinct
  pair per refresh interval;
- the worker's peak RSS (VmHWM).

Prints one JSON object. Example:
    python bench/ingest.py --heartbeats 1000000 --agents 100000 --orgs 20000 --ips 25000
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from recon_stream.embedded import EmbeddedKafka, EmbeddedMongo, free_port
from recon_stream.settings import Settings


def build_stream(args: argparse.Namespace) -> tuple[list[bytes], list[bytes], int]:
    """(warm-up heartbeats, steady heartbeats, distinct pairs)."""
    rng = random.Random(args.seed)
    ips = [
        f"{rng.randint(11, 99)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        for _ in range(args.ips)
    ]
    # Each org calls home from 1-2 egress IPs; popular IPs (cloud/VPN egress) are shared.
    org_ips = [
        [ips[rng.randrange(args.ips)] for _ in range(1 + (rng.random() < 0.3))]
        for _ in range(args.orgs)
    ]
    agents = []
    for a in range(args.agents):
        org = a % args.orgs
        agents.append(
            (f"org-{org:05d}", f"agent-{a:06d}", rng.choice(org_ips[org]), f"site-{a % 3}")
        )
    pairs = {(org, ip) for org, _, ip, _ in agents}
    start = datetime(2026, 11, 1, tzinfo=UTC)

    def body(agent: tuple[str, str, str, str], at: datetime) -> bytes:
        org, agent_id, ip, site = agent
        return json.dumps(
            {
                "organization_id": org,
                "agent_id": agent_id,
                "public_ip": ip,
                "observed_at": at.isoformat(),
                "site_id": site,
                "hostname": f"host-{agent_id}",
                "agent_version": "4.2.0",
                "event_id": f"{agent_id}-{int(at.timestamp())}",
            },
            separators=(",", ":"),
        ).encode()

    warm = [body(agent, start) for agent in agents]
    steady = []
    for i in range(args.heartbeats):
        agent = agents[rng.randrange(args.agents)]
        steady.append(body(agent, start + timedelta(seconds=1 + i // 1000)))
    return warm, steady, len(pairs)


async def publish(bootstrap: str, topic: str, values: list[bytes], partitions: int) -> float:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks=1, linger_ms=20, max_batch_size=512 * 1024
    )
    await producer.start()
    t = time.perf_counter()
    try:
        pending = []
        for i, value in enumerate(values):
            pending.append(await producer.send(topic, value, partition=i % partitions))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - t


async def bare_consumer_rate(bootstrap: str, topic: str, total: int) -> float:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"bare-{os.getpid()}-{time.time_ns()}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        seen = 0
        first = await consumer.getmany(timeout_ms=30_000, max_records=10_000)
        t = time.perf_counter()
        seen += sum(len(v) for v in first.values())
        while seen < total:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            seen += sum(len(v) for v in batch.values())
        return (seen - sum(len(v) for v in first.values())) / (time.perf_counter() - t)
    finally:
        await consumer.stop()


def servers(
    stack: ExitStack, args: argparse.Namespace, tmp: Path
) -> tuple[str, str, dict[str, int | None], str]:
    """(Kafka bootstrap, MongoDB URI, server pids, MongoDB engine): `--kafka` and
    `--mongodb` when given, else embedded servers that `stack` stops."""
    pids: dict[str, int | None] = {"kafka": None, "mongodb": None}
    if args.kafka:
        kafka = args.kafka
    else:
        embedded_kafka = stack.enter_context(EmbeddedKafka(log_dir=tmp))
        kafka, pids["kafka"] = embedded_kafka.bootstrap_servers, embedded_kafka.pid
    if args.mongodb:
        return kafka, args.mongodb, pids, "external"
    embedded_mongo = stack.enter_context(EmbeddedMongo(data_dir=tmp / "mongo", log_dir=tmp))
    pids["mongodb"] = embedded_mongo.pid
    return kafka, embedded_mongo.uri, pids, embedded_mongo.engine


def scope_file(n: int, seed: int) -> str:
    """A scope file of `n` distinct CIDRs (global and per organization), none of which
    holds a bench IP (those are in 11-99.x.x.x; these in 130-190.x.x.x)."""
    rng = random.Random(seed + 1)
    cidrs: set[str] = set()
    while len(cidrs) < n:
        prefix = rng.choice((16, 20, 24, 28, 32))
        net = ipaddress.ip_network(
            f"{rng.randint(130, 190)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.0/{prefix}",
            strict=False,
        )
        cidrs.add(str(net))
    ordered = sorted(cidrs)
    half = len(ordered) // 2
    lines = ["version: 1", "exclude:" if half else "exclude: []"]
    lines += [f"  - {{cidr: {c}, reason: bench}}" for c in ordered[:half]]
    lines += ["organizations:", "  org-00000:", "    exclude:"]
    lines += [f"      - {{cidr: {c}, reason: bench}}" for c in ordered[half:]]
    return "\n".join(lines) + "\n"


def start_ingest_worker(
    kafka: str,
    mongodb: str,
    topic: str,
    database: str,
    port: int,
    log: Path,
    extra: dict[str, str],
) -> subprocess.Popen[bytes]:
    """`recon-stream init`, then `recon-stream run ingest` on `topic`, /metrics on `port`."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RECON_")},
        "RECON_KAFKA_BOOTSTRAP_SERVERS": kafka,
        "RECON_MONGODB_URI": mongodb,
        "RECON_MONGODB_DATABASE": database,
        "RECON_TOPIC_HEARTBEATS": topic,
        "RECON_TOPIC_SCAN_REQUESTS": f"{topic}-requests",
        "RECON_TOPIC_DLQ": f"{topic}-dlq",
        "RECON_INGEST_GROUP_ID": f"{topic}-ingest",
        "RECON_HTTP_PORT": str(port),
        "RECON_HTTP_HOST": "127.0.0.1",
        **extra,
    }
    subprocess.run(
        [sys.executable, "-m", "recon_stream", "init"], env=env, check=True, capture_output=True
    )
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "recon_stream", "run", "ingest", "--log-level", "WARNING"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("recon_") and " " in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def processed(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("recon_heartbeats_total{"))


def upserts(m: dict[str, float]) -> float:
    return m.get('recon_mongodb_writes_total{collection="org_ips",operation="upsert"}', 0.0)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (0 when unknown)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--heartbeats", type=int, default=1_000_000)
    parser.add_argument("--agents", type=int, default=100_000)
    parser.add_argument("--orgs", type=int, default=20_000)
    parser.add_argument("--ips", type=int, default=25_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--refresh-interval", type=float, default=300.0)
    parser.add_argument("--max-records", type=int, default=5000)
    parser.add_argument(
        "--fetch-bytes", type=int, help="the worker's RECON_INGEST_MAX_PARTITION_FETCH_BYTES"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--settle", type=float, default=0.2, help="share of steady not timed")
    parser.add_argument(
        "--scope-cidrs",
        type=int,
        default=0,
        help="run with a RECON_SCOPE_FILE of N random CIDRs none of the bench's IPs is in",
    )
    parser.add_argument("--kafka", help="bootstrap servers (default: embedded Tansu)")
    parser.add_argument("--mongodb", help="URI (default: embedded mongod, else SecantusDB)")
    args = parser.parse_args()

    warm, steady, pairs = build_stream(args)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="recon-bench-")))
        kafka, mongodb, pids, _ = servers(stack, args, tmp)
        topic = f"bench-heartbeats-{time.time_ns()}"
        publish_s = asyncio.run(publish(kafka, topic, warm + steady, args.partitions))
        total = len(warm) + len(steady)
        bare = asyncio.run(bare_consumer_rate(kafka, topic, total))

        port = free_port()
        extra = {
            "RECON_INGEST_MAX_RECORDS": str(args.max_records),
            "RECON_INGEST_REFRESH_INTERVAL_SECONDS": str(args.refresh_interval),
        }
        if args.fetch_bytes:
            extra["RECON_INGEST_MAX_PARTITION_FETCH_BYTES"] = str(args.fetch_bytes)
        if args.scope_cidrs:
            scope = tmp / "scope.yaml"
            scope.write_text(scope_file(args.scope_cidrs, args.seed))
            extra["RECON_SCOPE_FILE"] = str(scope)
        worker = start_ingest_worker(
            kafka, mongodb, topic, f"bench_{time.time_ns()}", port, tmp / "worker.log", extra
        )
        try:
            m: dict[str, float] = {}
            deadline = time.monotonic() + 1800
            while time.monotonic() < deadline:
                try:
                    m = scrape(port)
                except OSError:
                    m = {}
                if processed(m) >= len(warm):
                    break
                time.sleep(0.25)
            # Partitions are consumed side by side, so the first steady records
            # arrive while other partitions still replay the warm-up: measure
            # after a further `--settle` share of the steady stream.
            settle = len(warm) + int(len(steady) * args.settle)
            while time.monotonic() < deadline and processed(m) < settle:
                time.sleep(0.25)
                m = scrape(port)
            t0, m0 = time.perf_counter(), m
            pids["worker"] = worker.pid
            cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            while time.monotonic() < deadline and processed(m) < total:
                time.sleep(0.25)
                m = scrape(port)
            t1 = time.perf_counter()
            cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            rss = peak_rss_mb(worker.pid)
        finally:
            worker.terminate()
            worker.wait(60)

    steady_n = processed(m) - processed(m0)
    elapsed = t1 - t0
    ingest = steady_n / elapsed
    steady_writes = upserts(m) - upserts(m0)
    intervals = max(1.0, elapsed / args.refresh_interval)
    result: dict[str, Any] = {
        "benchmark": "ingest",
        "heartbeats_steady": len(steady),
        "heartbeats_timed": int(steady_n),
        "heartbeats_warmup": len(warm),
        "agents": args.agents,
        "organizations": args.orgs,
        "public_ips": args.ips,
        "distinct_pairs": pairs,
        "partitions": args.partitions,
        "scope_cidrs": args.scope_cidrs,
        "max_records": args.max_records,
        "worker_fetch_bytes": args.fetch_bytes
        or Settings.model_fields["ingest_max_partition_fetch_bytes"].default,
        "refresh_interval_s": args.refresh_interval,
        "publish_s": round(publish_s, 2),
        "bare_consumer_msgs_per_s": round(bare),
        "ingest_msgs_per_s": round(ingest),
        "ingest_vs_bare": round(ingest / bare, 3),
        "target_ingest_vs_bare": 0.35,
        "warmup_and_settle_pair_writes": upserts(m0),
        "steady_mongodb_writes": steady_writes,
        "steady_mongodb_writes_per_heartbeat": round(steady_writes / max(1, steady_n), 5),
        "steady_writes_per_pair_per_refresh_interval": round(steady_writes / pairs / intervals, 3),
        "target_writes_per_pair_per_refresh_interval": 1.05,
        # Where the 2 cores went during the timed window (share of one core).
        "timed_window_cpu": {
            name: round((cpu1[name] - cpu0[name]) / elapsed, 2) for name in cpu0 if pids[name]
        },
        "ingest_peak_rss_mb": round(rss, 1),
        "target_rss_mb": 300,
        "dlq": sum(v for k, v in m.items() if k.startswith("recon_dlq_messages_total")),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
