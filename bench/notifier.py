"""Notifier benchmark: webhook throughput, and what a dead destination costs a healthy one.

Real servers (embedded Tansu + MongoDB unless --kafka / --mongodb are given); the
receiver is tests/emulators/webhooks.py in a process of its own, answering 200 at
once (or never, on the dead destination's path). --events exposure events are
published to the exposures topic first; then, each on a fresh set of consumer
groups, an in-process notifier worker (`build_worker`, role notifier) delivers them:

(a) one destination: events/s, from the first delivery to the last;
(b) ten destinations: events/s summed over them (and the slowest one's time);
(c) one healthy destination next to a dead one (hangs; --dead-timeout seconds per
    attempt, retried with backoff): the healthy one's time against (a)'s.
(a) and (c) run twice, alternating; the best of each is compared.
(d) two destinations, one of which answers 422 to a tenth of the event ids (each such
    event is parked on the notify DLQ, once): events/s handled (delivered + parked) by
    it and by its healthy neighbour, against two healthy destinations side by side;
    --rounds times each, alternating, medians compared.

Prints one JSON object on stdout (logs go to stderr):
    python -m bench.notifier                     # ~3 minutes on a quiet machine
    python -m bench.notifier --rejections-only   # (d) only
    python -m bench.notifier --quick             # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml
from aiokafka import AIOKafkaProducer

from recon_stream.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.ingest import servers
from tests.integration.support import make_settings, prepare, running, sample
from tests.integration.test_notifier import opened

ROOT = Path(__file__).resolve().parents[1]


async def publish(settings: Settings, n: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        futures = []
        for i in range(n):
            event = opened(f"org-{i % 50}", f"45.33.{i % 200}.{i % 250}", 1 + i % 60000, "http", i)
            futures.append(
                await producer.send(
                    settings.topic_exposures, event.model_dump_json().encode(), event.kafka_key()
                )
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def deliver(
    settings: Settings, tmp: Path, destinations: list[dict[str, Any]], watch: list[str], n: int
) -> dict[str, float]:
    """Run a notifier until every destination in `watch` has handled `n` events (delivered
    or parked); seconds from the first delivery to each one's last, and in all (group
    joins included)."""
    path = tmp / f"notify-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump({"destinations": destinations}))
    run = settings.model_copy(
        update={"notify_file": path, "notifier_group_id": f"bench-{uuid.uuid4().hex[:8]}"}
    )
    started = time.monotonic()
    done: dict[str, float] = {}
    first = None
    async with running(run, ("notifier",)) as worker:
        while len(done) < len(watch):
            await asyncio.sleep(0.005)
            now = time.monotonic()
            for name in watch:
                delivered = sample(worker, "recon_notifier_delivered_total", destination=name)
                parked = sample(
                    worker, "recon_notifier_parked_total", destination=name, status="422"
                )
                if first is None and delivered:
                    first = now
                if name not in done and delivered + parked >= n:
                    done[name] = now
    assert first is not None
    return {
        **{name: at - first for name, at in done.items()},
        "with_group_joins": max(done.values()) - started,
    }


async def run(kafka: str, mongodb: str, args: argparse.Namespace, url: str) -> dict[str, Any]:
    settings = make_settings(kafka, mongodb, uuid.uuid4().hex[:10])
    await prepare(settings)
    await publish(settings, args.events)
    tmp = Path(tempfile.mkdtemp(prefix="recon-bench-notifier-"))
    n = args.events

    def dest(name: str, path: str = "/ok", **more: Any) -> dict[str, Any]:
        return {
            "name": name,
            "url": url + path,
            "secret": "bench-secret",
            "start_at": "earliest",
            **more,
        }

    if args.rejections_only:
        return {
            "events": n,
            "partitions": settings.kafka_topic_partitions,
            "batch_size": settings.notifier_batch_size,
            "one_rejecting_10_percent_with_422": await _rejections(
                settings, tmp, dest, n, args.rounds
            ),
        }
    # (a) and (c) alternate, twice each, so a noisy neighbour on the machine shows as
    # spread instead of as a difference between them.
    alone: list[float] = []
    beside_dead: list[float] = []
    for _ in range(2):
        one = await deliver(settings, tmp, [dest("one")], ["one"], n)
        alone.append(one["one"])
        dead = await deliver(
            settings,
            tmp,
            [dest("healthy"), dest("dead", "/dead", timeout_seconds=args.dead_timeout)],
            ["healthy"],
            n,
        )
        beside_dead.append(dead["healthy"])
    names = [f"d{i}" for i in range(10)]
    ten = await deliver(settings, tmp, [dest(name) for name in names], names, n)
    slowest = max(ten[name] for name in names)
    best_alone, best_dead = min(alone), min(beside_dead)
    rejections = await _rejections(settings, tmp, dest, n, args.rounds)
    return {
        "events": n,
        "partitions": settings.kafka_topic_partitions,
        "batch_size": settings.notifier_batch_size,
        "one_destination": {
            "seconds": [round(t, 3) for t in alone],
            "events_per_s": round(n / best_alone),
            "with_group_join_s": round(one["with_group_joins"], 2),
        },
        "ten_destinations": {
            "slowest_seconds": round(slowest, 3),
            "events_per_s_total": round(10 * n / slowest),
            "events_per_s_per_destination": round(n / slowest),
        },
        "healthy_next_to_dead": {
            "seconds": [round(t, 3) for t in beside_dead],
            "events_per_s": round(n / best_dead),
            "added_delay_s_best_of_two": round(best_dead - best_alone, 3),
            "dead_timeout_s": args.dead_timeout,
        },
        "one_rejecting_10_percent_with_422": rejections,
    }


async def _rejections(
    settings: Settings, tmp: Path, dest: Any, n: int, rounds: int
) -> dict[str, Any]:
    """(d): two healthy destinations, then a rejecting one beside a healthy one, alternating."""
    healthy_pair: list[float] = []
    rejecting: list[float] = []
    neighbour: list[float] = []
    for _ in range(rounds):
        pair = await deliver(settings, tmp, [dest("a"), dest("b")], ["a", "b"], n)
        healthy_pair.append(max(pair["a"], pair["b"]))
        mixed = await deliver(
            settings,
            tmp,
            [dest("rejecting", "/reject"), dest("neighbour")],
            ["rejecting", "neighbour"],
            n,
        )
        rejecting.append(mixed["rejecting"])
        neighbour.append(mixed["neighbour"])
    base = statistics.median(healthy_pair)
    rej, nei = statistics.median(rejecting), statistics.median(neighbour)
    return {
        "rounds": rounds,
        "without_rejections": {
            "seconds": [round(t, 3) for t in healthy_pair],
            "events_per_s_per_destination_median": round(n / base),
        },
        "rejecting": {
            "seconds": [round(t, 3) for t in rejecting],
            "events_per_s_median": round(n / rej),
            "of_without_rejections": round(base / rej, 3),
        },
        "healthy_neighbour": {
            "seconds": [round(t, 3) for t in neighbour],
            "events_per_s_median": round(n / nei),
            "of_without_rejections": round(base / nei, 3),
        },
        "refused_share": 0.1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--dead-timeout", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (d)")
    parser.add_argument("--rejections-only", action="store_true", help="run (d) only")
    parser.add_argument("--verbose", action="store_true", help="log warnings to stderr")
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 events")
    parser.add_argument("--kafka", help="bootstrap servers (default: embedded Tansu)")
    parser.add_argument("--mongodb", help="URI (default: embedded MongoDB)")
    args = parser.parse_args()
    if args.quick:
        args.events = min(args.events, 300)
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR, stream=sys.stderr)
    out, sys.stdout = sys.stdout, sys.stderr  # stdout carries the JSON only
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="recon-bench-")))
        kafka, mongodb, _, _ = servers(stack, args, tmp)
        receiver = subprocess.Popen(
            [sys.executable, "-m", "tests.emulators.webhooks", "/dead", "/reject=0.1"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        stack.callback(receiver.wait, 10)
        stack.callback(receiver.stdin.close)  # type: ignore[union-attr]
        port = receiver.stdout.readline().strip()  # type: ignore[union-attr]
        result = asyncio.run(run(kafka, mongodb, args, f"http://127.0.0.1:{port}"))
    print(json.dumps(result, indent=2), file=out)


if __name__ == "__main__":
    main()
