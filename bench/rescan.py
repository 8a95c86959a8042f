"""Rescan-with-scan benchmark: how long after Shodan says DONE the fix shows as `closed`.

Runs against real servers (embedded Tansu + MongoDB unless --kafka / --mongodb are
given) and the Shodan emulator with its scan endpoints, through the real `shodan`
client; the worker runs in-process. For each of --rescans IPs: RDP and SSH open, as
Shodan crawled them a day ago; a technician closes RDP (the emulator's next scan of
the IP finds SSH only), then a `rescan` command. The emulator says DONE --done-after
seconds after the submit; latency = arrival of the `closed` event (with `data.scan`)
on the exposures topic - the command's publish time, and `beyond` = latency - N, what
recon-stream adds to Shodan's scan. With --poll-seconds P, a poll lands up to P after
DONE: the expected extra is about P/2 on average, plus a lookup.

Prints one JSON object on stdout (logs go to stderr):
    python bench/rescan.py            # 20 rescans, DONE after 3 s, polls every 1 s
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from recon_stream.embedded import EmbeddedKafka, EmbeddedMongo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.scanner import heartbeat, make_settings, percentile
from tests.emulators.shodan import ShodanEmulator
from tests.integration.support import banner, host, prepare, running


def fresh(port: int, module: str) -> dict[str, Any]:
    seen = banner(port, module)
    seen["timestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return seen


async def measure(kafka: str, mongodb: str, args: argparse.Namespace) -> dict[str, Any]:
    emulator = ShodanEmulator(rate=None).start()
    emulator.scan_seconds = args.done_after
    unique = uuid.uuid4().hex[:10]
    settings = make_settings(
        kafka,
        mongodb,
        emulator,
        unique,
        shodan_rate=20.0,
        shodan_scan_credits_per_day=args.rescans,
        shodan_scan_poll_seconds=args.poll_seconds,
        exposure_relay_interval_seconds=0.5,
    )
    await prepare(settings)
    ips = [f"45.33.{80 + n // 200}.{1 + n % 200}" for n in range(args.rescans)]
    for ip in ips:
        emulator.set_host(ip, host(ip, banner(3389, "rdp"), banner(22, "ssh")))
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    consumer = AIOKafkaConsumer(
        settings.topic_exposures,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
    )
    await producer.start()
    await consumer.start()
    closed: dict[str, tuple[float, dict[str, Any]]] = {}
    opened: set[str] = set()
    progress = asyncio.Event()

    async def until(done: Callable[[], bool], limit: float) -> None:
        deadline = time.monotonic() + limit
        while not done() and time.monotonic() < deadline:
            progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(progress.wait(), max(0.0, deadline - time.monotonic()))

    async def read() -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=100)
            arrived = time.time()
            for records in batch.values():
                for record in records:
                    data = json.loads(record.value)["data"]
                    if data["change"] == "opened":
                        opened.add(data["ip"])
                    elif data["change"] == "closed" and data["port"] == 3389:
                        closed.setdefault(data["ip"], (arrived, data))
            progress.set()

    reader = asyncio.create_task(read())
    sent: dict[str, float] = {}
    try:
        async with running(settings, ("ingest", "scanner")) as worker:
            for ip in ips:
                await producer.send_and_wait(settings.topic_heartbeats, heartbeat("acme", ip))
            await until(lambda: len(opened) == len(ips), 120)
            for ip in ips:
                emulator.after_scan(ip, host(ip, fresh(22, "ssh")))
                body = {
                    "command": "rescan",
                    "organization_id": "acme",
                    "ip": ip,
                    "requested_by": "bench",
                    "requested_at": datetime.now(UTC).isoformat(),
                    "command_id": str(uuid.uuid4()),
                }
                sent[ip] = time.time()
                await producer.send_and_wait(
                    settings.topic_commands, json.dumps(body).encode(), key=b"acme"
                )
                await asyncio.sleep(args.spacing)
            await until(lambda: len(closed) == len(ips), args.done_after + 120)
            outcomes = {
                outcome: worker.metrics.registry.get_sample_value(
                    "recon_shodan_scans_total", {"outcome": outcome}
                )
                or 0
                for outcome in ("submitted", "done", "stale_after_done", "error", "timed_out")
            }
    finally:
        reader.cancel()
        await consumer.stop()
        await producer.stop()
        emulator.stop()
    latencies = [closed[ip][0] - sent[ip] for ip in ips if ip in closed]
    with_scan = sum(1 for ip in closed if (closed[ip][1].get("scan") or {}).get("status") == "done")
    beyond = [latency - args.done_after for latency in latencies]
    return {
        "rescans": len(ips),
        "closed": len(latencies),
        "closed_with_scan_done": with_scan,
        "done_after_s": args.done_after,
        "poll_s": args.poll_seconds,
        "latency_median_s": round(statistics.median(latencies), 3) if latencies else None,
        "beyond_done_median_s": round(statistics.median(beyond), 3) if beyond else None,
        "beyond_done_p90_s": round(percentile(beyond, 90), 3) if beyond else None,
        "beyond_done_max_s": round(max(beyond), 3) if beyond else None,
        "scans": outcomes,
        "ok": len(latencies) == len(ips) and with_scan == len(ips),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rescans", type=int, default=20)
    parser.add_argument("--done-after", type=float, default=3.0, help="emulator: DONE after N s")
    parser.add_argument("--poll-seconds", type=float, default=1.0, help="RECON_SHODAN_SCAN_POLL")
    parser.add_argument("--spacing", type=float, default=0.25, help="seconds between rescans")
    parser.add_argument("--kafka", help="bootstrap servers (default: embedded Tansu)")
    parser.add_argument("--mongodb", help="URI (default: embedded mongod, else SecantusDB)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("faststream.access.kafka").addFilter(
        lambda record: record.levelno >= logging.WARNING
    )
    out, sys.stdout = sys.stdout, sys.stderr  # stdout carries the JSON only
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="recon-bench-")))
        kafka = args.kafka or stack.enter_context(EmbeddedKafka(log_dir=tmp)).bootstrap_servers
        mongo = None if args.mongodb else stack.enter_context(EmbeddedMongo(data_dir=tmp / "db"))
        mongodb = args.mongodb or (mongo.uri if mongo else "")
        started = time.monotonic()
        result = asyncio.run(measure(kafka, mongodb, args))
        result = {
            "benchmark": "rescan",
            "mongodb": "external" if args.mongodb else (mongo.engine if mongo else ""),
            **result,
            "elapsed_s": round(time.monotonic() - started, 1),
        }
    print(json.dumps(result, indent=2), file=out)


if __name__ == "__main__":
    main()
