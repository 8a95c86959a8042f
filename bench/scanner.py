"""Scanner benchmark: exposure latency and Shodan rate-budget use, in one run.

Runs against real servers (embedded Tansu + MongoDB unless --kafka /
--mongodb are given: genuine mongod where its wheel is installed, else
SecantusDB; the output's `mongodb` says which) and the Shodan emulator (tests/emulators/shodan.py),
reached through the real `shodan` client (provider "api"). Workers run
in-process (`build_worker`). Two measurements, each on fresh topics and a
fresh database:

(a) latency: one ingest+scanner worker, the budget not binding (emulator
    unlimited, RECON_SHODAN_RATE=--latency-rate). N heartbeats for N new
    (org, IP) pairs, one every --interval-ms; latency = arrival of the pair's
    first exposure event on the exposures topic - the heartbeat's publish time.
    A few warm-up pairs first, so consumer-group joins are not timed.
(b) budget use: a backlog of M new pairs turned into scan requests by an ingest
    worker (stopped before the scanners start), then three scanner replicas
    with RECON_SHODAN_RATE=R against an emulator enforcing R per key. Lookup
    rate seen by the emulator over the steady window (first 2 s after the first
    lookup and last 2 s before the last one left out), divided by R. The
    limiter keeps a 3% margin (recon_stream/ratelimit.py): ~0.97 is the ceiling.
    With --burn-cores N, N other processes spin on a core each meanwhile: the
    budget must hold and stay used on a loaded machine (slots a late lookup
    forfeits are reported as `slots_missed`).

Prints one JSON object on stdout (logs go to stderr). Example:
    python bench/scanner.py            # full run, ~1-2 minutes
    python bench/scanner.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import random
import statistics
import sys
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from recon_stream.app import build_worker
from recon_stream.settings import Settings

# The emulator lives with the tests; make the repository root importable when
# this file is run as a script (`python bench/scanner.py`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.harness import run_on_servers
from tests.emulators.shodan import ShodanEmulator
from tests.integration import support
from tests.integration.support import prepare, running
from tests.load.burn import burning

HOST_PATH = "/shodan/host/"


# -- data ----------------------------------------------------------------------------------


def public_ips(n: int, rng: random.Random, taken: set[str]) -> list[str]:
    ips: list[str] = []
    while len(ips) < n:
        octets = (
            rng.randint(11, 99),
            rng.randint(0, 255),
            rng.randint(0, 255),
            rng.randint(1, 254),
        )
        ip = ".".join(map(str, octets))
        if ip not in taken and ipaddress.ip_address(ip).is_global:
            taken.add(ip)
            ips.append(ip)
    return ips


def host(ip: str, port: int) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "ip_str": ip,
        "ports": [port],
        "hostnames": [],
        "org": "Example",
        "isp": "Example",
        "asn": "AS64500",
        "last_update": now.strftime("%Y-%m-%dT%H:%M:%S.%f"),
        "data": [
            {
                "port": port,
                "transport": "tcp",
                "product": "Remote Desktop Protocol",
                "timestamp": (now - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S.%f"),
                "data": "rdp banner",
                "_shodan": {"module": "rdp", "crawler": "x", "id": "y"},
            }
        ],
    }


def heartbeat(org: str, ip: str) -> bytes:
    body = {
        "organization_id": org,
        "agent_id": f"{org}-agent",
        "public_ip": ip,
        "observed_at": datetime.now(UTC).isoformat(),
    }
    return json.dumps(body, separators=(",", ":")).encode()


# -- infrastructure ------------------------------------------------------------------------


def make_settings(
    kafka: str, mongodb: str, emulator: ShodanEmulator, unique: str, **overrides: Any
) -> Settings:
    """The integration tests' settings, plus the scanner pointed at `emulator`."""
    return support.make_settings(
        kafka,
        mongodb,
        unique,
        **{
            "mongodb_database": f"bench_{unique}",
            "scanner_group_id": f"scanner_{unique}",
            "ingest_batch_timeout_ms": 20,
            "shodan_provider": "api",
            "shodan_api_key": emulator.api_key,
            "shodan_api_url": emulator.url,
            "shodan_timeout_seconds": 5.0,
            **overrides,
        },
    )


class EventReader:
    """Reads the exposures topic from the start; first arrival time per (org, ip)."""

    def __init__(self, settings: Settings) -> None:
        self._consumer = AIOKafkaConsumer(
            settings.topic_exposures,
            bootstrap_servers=settings.kafka_bootstrap_servers,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            # A short fetch wait keeps the reader's own polling (aiokafka's
            # default waits up to 500 ms) out of the measured latency.
            fetch_max_wait_ms=50,
        )
        self.first: dict[tuple[str, str], float] = {}
        self.events = 0
        self.ids: set[str] = set()
        self.subjects: set[tuple[str, str]] = set()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventReader:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    async def _run(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            arrived = time.time()
            for records in batch.values():
                for record in records:
                    event = json.loads(record.value)
                    data = event["data"]
                    self.events += 1
                    self.ids.add(event["id"])
                    self.subjects.add((data["organization_id"], event["subject"]))
                    self.first.setdefault((data["organization_id"], data["ip"]), arrived)

    async def wait_for(self, pairs: list[tuple[str, str]], within: float) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if all(p in self.first for p in pairs):
                return True
            await asyncio.sleep(0.05)
        return False


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


# -- (a) latency ---------------------------------------------------------------------------


async def measure_latency(
    kafka: str, mongodb: str, args: argparse.Namespace, rng: random.Random, taken: set[str]
) -> dict[str, Any]:
    warmup_n = 3
    ips = public_ips(args.pairs + warmup_n, rng, taken)
    with ShodanEmulator(rate=None) as emulator:
        for ip in ips:
            emulator.set_host(ip, host(ip, 3389))
        settings = make_settings(
            kafka,
            mongodb,
            emulator,
            f"lat_{time.time_ns()}",
            shodan_rate=args.latency_rate,
        )
        await prepare(settings)
        pairs = [(f"org-{i:04d}", ip) for i, ip in enumerate(ips)]
        warmup, timed = pairs[:warmup_n], pairs[warmup_n:]
        producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all")
        async with AsyncExitStack() as stack:
            await producer.start()
            stack.push_async_callback(producer.stop)
            reader = await stack.enter_async_context(EventReader(settings))
            await stack.enter_async_context(running(settings, ("ingest", "scanner")))

            # Warm-up: consumer groups joined, connections open, nothing timed.
            t_warm = time.time()
            for org, ip in warmup:
                await producer.send_and_wait(settings.topic_heartbeats, heartbeat(org, ip))
            if not await reader.wait_for(warmup, within=120):
                raise RuntimeError("warm-up exposure events never arrived")
            warmup_s = max(reader.first[p] for p in warmup) - t_warm

            published: dict[tuple[str, str], float] = {}
            start = time.monotonic()
            for i, (org, ip) in enumerate(timed):
                delay = start + i * args.interval_ms / 1000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                body = heartbeat(org, ip)
                published[(org, ip)] = time.time()
                await producer.send_and_wait(settings.topic_heartbeats, body)
            publish_s = time.monotonic() - start
            await reader.wait_for(timed, within=60)
            lookups = sum(1 for r in emulator.requests if r.path.startswith(HOST_PATH))

    latencies = [(reader.first[p] - t) * 1000 for p, t in published.items() if p in reader.first]
    missing = len(timed) - len(latencies)
    p99 = percentile(latencies, 99) if latencies else float("inf")
    return {
        "pairs": len(timed),
        "interval_ms": args.interval_ms,
        "publish_s": round(publish_s, 2),
        "shodan_rate": args.latency_rate,
        "warmup_first_events_s": round(warmup_s, 2),
        "events_missing": missing,
        "events": reader.events,
        "distinct_event_ids": len(reader.ids),
        "lookups": lookups - warmup_n,
        "latency_ms": {
            "p50": round(percentile(latencies, 50), 1) if latencies else None,
            "p90": round(percentile(latencies, 90), 1) if latencies else None,
            "p99": round(p99, 1) if latencies else None,
            "max": round(max(latencies), 1) if latencies else None,
            "mean": round(statistics.fmean(latencies), 1) if latencies else None,
        },
        "target_p99_ms": 2000,
        "ok": missing == 0 and p99 < 2000,
    }


# -- (b) rate-budget use -------------------------------------------------------------------


async def measure_budget(
    kafka: str, mongodb: str, args: argparse.Namespace, rng: random.Random, taken: set[str]
) -> dict[str, Any]:
    rate = args.rate
    ips = public_ips(args.backlog, rng, taken)
    with ShodanEmulator(rate=rate) as emulator:
        for ip in ips:
            emulator.set_host(ip, host(ip, 445))
        settings = make_settings(
            kafka,
            mongodb,
            emulator,
            f"budget_{time.time_ns()}",
            shodan_rate=rate,
            **({"scanner_concurrency": args.concurrency} if args.concurrency else {}),
        )
        await prepare(settings)
        pairs = [(f"org-{i:04d}", ip) for i, ip in enumerate(ips)]

        # The backlog: heartbeats, then scan requests from an ingest worker
        # stopped before any scanner starts.
        producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all")
        await producer.start()
        try:
            for org, ip in pairs:
                await producer.send_and_wait(settings.topic_heartbeats, heartbeat(org, ip))
        finally:
            await producer.stop()
        async with running(settings, ("ingest",)) as ingest:
            deadline = time.monotonic() + 120
            sent = 0.0
            while time.monotonic() < deadline:
                sent = (
                    ingest.metrics.registry.get_sample_value(
                        "recon_scan_requests_published_total", {"reason": "new", "path": "ingest"}
                    )
                    or 0.0
                )
                if sent >= len(pairs):
                    break
                await asyncio.sleep(0.1)
            if sent < len(pairs):
                raise RuntimeError(f"ingest published {sent:.0f} of {len(pairs)} scan requests")

        def host_requests() -> list[Any]:
            return [r for r in emulator.requests if r.path.startswith(HOST_PATH)]

        async with AsyncExitStack() as stack:
            stack.enter_context(burning(args.burn_cores))
            reader = await stack.enter_async_context(EventReader(settings))
            started = time.monotonic()
            workers = [build_worker(settings, ("scanner",)) for _ in range(args.replicas)]
            for worker in workers:
                await worker.app.start()
                stack.push_async_callback(worker.app.stop)
            limit = 60 + 3 * len(ips) / rate
            while time.monotonic() - started < limit:
                if len({r.path for r in host_requests() if r.status == 200}) >= len(ips):
                    break
                await asyncio.sleep(0.1)
            await reader.wait_for(pairs, within=30)
            await asyncio.sleep(2.0)  # would-be duplicate lookups show up here
            missed = sum(
                w.metrics.registry.get_sample_value("recon_rate_limiter_slots_missed_total") or 0.0
                for w in workers
            )

        lookups = host_requests()
        times = sorted(r.at for r in lookups)
        first, last = times[0], times[-1]
        w0, w1 = first + args.skip_s, last - args.skip_s
        in_window = [t for t in times if w0 <= t < w1]
        window = w1 - w0
        rate_seen = len(in_window) / window if window > 0 else float("nan")
        # The same, from the spacing of the windowed lookups (no edge effects).
        spaced = (
            (len(in_window) - 1) / (in_window[-1] - in_window[0])
            if len(in_window) > 1
            else float("nan")
        )
        # Every request of the key spends the budget (each replica checks the
        # key once at start, through the limiter): the same window, all paths.
        all_in_window = [
            r for r in emulator.requests if r.key == emulator.api_key and w0 <= r.at < w1
        ]
        per_ip: dict[str, int] = {}
        for r in lookups:
            per_ip[r.path] = per_ip.get(r.path, 0) + 1
        max_1s = emulator.max_requests_in_any_window(1.0, key=emulator.api_key)
        max_1s_lookups = emulator.max_requests_in_any_window(1.0, path_prefix=HOST_PATH)
        result = {
            "backlog_ips": len(ips),
            "scanner_replicas": args.replicas,
            "cores_burned": args.burn_cores,
            "lookup_loops_per_replica": settings.scanner_concurrency,
            "shodan_rate": rate,
            "emulator_rate": rate,
            "drain_s": round(last - first, 2),
            "window_s": round(window, 2),
            "lookups_in_window": len(in_window),
            "lookups_per_s": round(rate_seen, 3),
            "lookups_per_s_by_spacing": round(spaced, 3),
            # The budget is per key: every request counts (lookups and the
            # replicas' start-up key checks alike).
            "budget_use": round(len(all_in_window) / window / rate, 3),
            "target_budget_use": 0.95,
            "key_requests_in_window": len(all_in_window),
            "lookups_use": round(rate_seen / rate, 3),
            "budget_use_ceiling": round(1 / 1.03, 3),
            "max_requests_in_any_1s_window": max_1s,
            "max_lookups_in_any_1s_window": max_1s_lookups,
            "violations": emulator.violations,
            "slots_missed": int(missed),
            "non_200_lookups": sum(1 for r in lookups if r.status != 200),
            "lookups_per_ip": round(len(lookups) / len(ips), 3),
            "ips_looked_up_more_than_once": sum(1 for n in per_ip.values() if n > 1),
            "events": reader.events,
            # Redelivery (at-least-once) repeats an id; a second id for one
            # exposure would be a bug.
            "distinct_event_ids": len(reader.ids),
            "distinct_exposures": len(reader.subjects),
            "pairs_with_event": sum(1 for p in pairs if p in reader.first),
        }
    result["ok"] = (
        result["budget_use"] >= 0.95
        and max_1s <= rate
        and result["violations"] == 0
        and result["lookups_per_ip"] == 1.0
    )
    return result


# -- main ----------------------------------------------------------------------------------


async def run(
    kafka: str, mongodb: str, mongodb_server: str, args: argparse.Namespace
) -> dict[str, Any]:
    rng = random.Random(args.seed)
    taken: set[str] = set()
    started = time.monotonic()
    latency = await measure_latency(kafka, mongodb, args, rng, taken)
    budget = await measure_budget(kafka, mongodb, args, rng, taken)
    return {
        "benchmark": "scanner",
        "kafka": "external" if args.kafka else "embedded tansu",
        "mongodb": mongodb_server,
        "latency": latency,
        "budget": budget,
        "ok": latency["ok"] and budget["ok"],
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=200, help="(a) new pairs timed")
    parser.add_argument("--interval-ms", type=float, default=50.0, help="(a) heartbeat spacing")
    parser.add_argument("--latency-rate", type=float, default=50.0, help="(a) RECON_SHODAN_RATE")
    parser.add_argument("--backlog", type=int, default=120, help="(b) IPs in the backlog")
    parser.add_argument("--rate", type=float, default=5.0, help="(b) RECON_SHODAN_RATE")
    parser.add_argument("--replicas", type=int, default=3, help="(b) scanner replicas")
    parser.add_argument(
        "--concurrency", type=int, help="(b) lookup loops per replica (default: the setting's)"
    )
    parser.add_argument("--skip-s", type=float, default=2.0, help="(b) window trim, each end")
    parser.add_argument(
        "--burn-cores", type=int, default=0, help="(b) processes spinning on a core meanwhile"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes")
    parser.add_argument("--kafka", help="bootstrap servers (default: embedded Tansu)")
    parser.add_argument("--mongodb", help="URI (default: embedded mongod, else SecantusDB)")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.backlog = min(args.pairs, 30), min(args.backlog, 40)
    run_on_servers(run, args)


if __name__ == "__main__":
    main()
