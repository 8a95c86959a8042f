"""Commands benchmark: rescan latency and an organization-wide acceptance, in one run.

Real servers (embedded Tansu + MongoDB unless --kafka / --mongodb are given) and
the Shodan emulator through the real `shodan` client; one scanner worker
in-process (`build_worker`), the budget idle (RECON_SHODAN_RATE=--rate, the
emulator unlimited). Two measurements, on fresh topics and a fresh database:

(a) rescan: an organization with --rescans IPs, each looked up once. Then, one
    after the other, the emulator's answer for an IP changes (its port closes, or
    opens again) and a `rescan` command for that IP is published; latency = the
    arrival of the resulting event on the exposures topic - the command's publish.
(b) acceptance: an organization with --ips IPs, one open RDP port each (snapshots
    written straight into MongoDB). One organization-wide `accept` of 3389/tcp;
    time until its events have all arrived, and how many arrived (exactly one per
    open exposure is the promise).

Prints one JSON object on stdout (logs go to stderr):
    python bench/commands.py            # ~1 minute
    python bench/commands.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pymongo import AsyncMongoClient

from recon_stream.app import snapshot_updater
from recon_stream.domain.scans import HostScan, Service
from recon_stream.domain.snapshot import OrgContext

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.ingest import servers
from bench.scanner import host, make_settings, public_ips
from tests.emulators.shodan import ShodanEmulator
from tests.integration.support import heartbeat, prepare, running


def command(kind: str, org: str, **fields: Any) -> bytes:
    body = {
        "command": kind,
        "organization_id": org,
        "requested_by": "bench",
        "requested_at": datetime.now(UTC).isoformat(),
        "command_id": str(uuid.uuid4()),
        **fields,
    }
    return json.dumps(body).encode()


class Events:
    """Reads the exposures topic from its end; arrival time of each event by (ip, change)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_wait_ms=20,
        )
        self.seen: list[tuple[float, dict[str, Any]]] = []

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def poll(self) -> None:
        batch = await self._consumer.getmany(timeout_ms=20)
        arrived = time.monotonic()
        for records in batch.values():
            self.seen.extend((arrived, json.loads(r.value)["data"]) for r in records)

    async def wait(self, count: int, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        while len(self.seen) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(self.seen)} of {count} events within {within}s")
            await self.poll()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure_rescans(kafka: str, mongodb: str, args: argparse.Namespace) -> dict[str, Any]:
    ips = public_ips(args.rescans, random.Random(args.seed), set())
    with ShodanEmulator(rate=None) as emulator:
        for ip in ips:
            emulator.set_host(ip, host(ip, 3389))
        settings = make_settings(
            kafka, mongodb, emulator, f"rescan_{uuid.uuid4().hex[:8]}", shodan_rate=args.rate
        )
        await prepare(settings)
        producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all")
        await producer.start()
        events = Events(kafka, settings.topic_exposures)
        await events.start()
        latencies: list[float] = []
        try:
            for ip in ips:
                await producer.send_and_wait(settings.topic_heartbeats, heartbeat("bench", ip))
            async with running(settings, ("ingest", "scanner")):
                await events.wait(len(ips))
                for ip in ips:
                    emulator.set_host(ip, host(ip, 5900))  # 3389 closed, 5900 opened
                    expected = len(events.seen) + 2
                    sent = time.monotonic()
                    await producer.send_and_wait(
                        settings.topic_commands, command("rescan", "bench", ip=ip), key=b"bench"
                    )
                    await events.wait(expected)
                    latencies.append(events.seen[expected - 2][0] - sent)
        finally:
            await events.stop()
            await producer.stop()
    ms = [x * 1000 for x in latencies]
    return {
        "rescans": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p90_ms": round(percentile(ms, 0.9), 1),
        "p99_ms": round(percentile(ms, 0.99), 1),
        "max_ms": round(max(ms), 1),
        "target_p99_ms": 2000,
        "ok": percentile(ms, 0.99) < 2000,
    }


async def measure_acceptance(kafka: str, mongodb: str, args: argparse.Namespace) -> dict[str, Any]:
    ips = public_ips(args.ips, random.Random(args.seed + 1), set())
    with ShodanEmulator(rate=None) as emulator:
        settings = make_settings(kafka, mongodb, emulator, f"accept_{uuid.uuid4().hex[:8]}")
        await prepare(settings)
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb, tz_aware=True)
        store = snapshot_updater(client[settings.mongodb_database])
        org = OrgContext("bench", ("bench-agent",), ())
        now = datetime.now(UTC)
        for ip in ips:
            scan = HostScan(
                ip=ip,
                provider="api",
                queried_at=now,
                services=(Service(port=3389, module="rdp", product="Remote Desktop Protocol"),),
            )
            await store.apply(org, scan)  # outboxes left for the worker's relay
        await client.close()
        producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all")
        await producer.start()
        events = Events(kafka, settings.topic_exposures)
        await events.start()
        try:
            async with running(settings, ("scanner",)):
                await events.wait(len(ips), within=120)  # the relayed `opened` events
                opened = len(events.seen)
                sent = time.monotonic()
                await producer.send_and_wait(
                    settings.topic_commands,
                    command("accept", "bench", port=3389, reason="bench"),
                    key=b"bench",
                )
                await events.wait(opened + len(ips), within=300)
                took = events.seen[-1][0] - sent
                # Anything extra would arrive now.
                quiet = time.monotonic() + 2.0
                while time.monotonic() < quiet:
                    await events.poll()
        finally:
            await events.stop()
            await producer.stop()
    accepted = [d for _, d in events.seen if d["change"] == "changed" and d["reason"] == "accepted"]
    return {
        "ips": len(ips),
        "open_exposures": len(ips),
        "apply_s": round(took, 2),
        "exposures_per_s": round(len(ips) / took, 1),
        "accepted_events": len(accepted),
        "distinct_exposures_accepted": len({d["ip"] for d in accepted}),
        "ok": len(accepted) == len(ips) == len({d["ip"] for d in accepted}),
    }


async def run(kafka: str, mongodb: str, args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    rescan = await measure_rescans(kafka, mongodb, args)
    acceptance = await measure_acceptance(kafka, mongodb, args)
    return {
        "benchmark": "commands",
        "rescan": rescan,
        "acceptance": acceptance,
        "ok": rescan["ok"] and acceptance["ok"],
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rescans", type=int, default=40, help="(a) rescans timed")
    parser.add_argument("--rate", type=float, default=50.0, help="(a) RECON_SHODAN_RATE")
    parser.add_argument("--ips", type=int, default=1000, help="(b) IPs of the organization")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes")
    parser.add_argument("--kafka", help="bootstrap servers (default: embedded Tansu)")
    parser.add_argument("--mongodb", help="URI (default: embedded MongoDB)")
    args = parser.parse_args()
    if args.quick:
        args.rescans, args.ips = min(args.rescans, 5), min(args.ips, 50)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("faststream.access.kafka").addFilter(
        lambda record: record.levelno >= logging.WARNING
    )
    out, sys.stdout = sys.stdout, sys.stderr  # stdout carries the JSON only
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="recon-bench-")))
        kafka, mongodb, _, _ = servers(stack, args, tmp)
        result = asyncio.run(run(kafka, mongodb, args))
    print(json.dumps(result, indent=2), file=out)


if __name__ == "__main__":
    main()
