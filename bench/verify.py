"""Verification benchmark: three prober replicas sharing one connect budget.

Everything runs inside a network namespace of its own (tests/netns.py: only `lo`, with
81.2.69.142/32 on it; nothing leaves the machine), so this needs root. The script makes
the namespace, runs itself inside it (`--inside`), and deletes it. Inside: an embedded
MongoDB on the namespace's 127.0.0.1 (genuine mongod where its wheel is installed, else
SecantusDB; `mongodb` says which; an external --mongodb could not be reached from the
namespace), listeners on --ports ports of 81.2.69.142 that accept every connection, and
--replicas processes (`--replica`), each with its own MongoClient, `verify_budget`
(SharedRateLimiter, key "verify") and TcpProber, running --concurrency checks at a time
over those ports for --duration seconds at --rate attempts/s in all (RECON_VERIFY_RATE,
default 20). Every check targets an open port, so each attempt reaches the listeners.

Reported: checks/s over the steady window (the first and last --skip-s seconds of the run
left out) and over the whole run, their ratio to the rate (the limiter keeps a 3% margin:
~0.97 is the ceiling), and the most connection attempts in any 1 s sliding window as the
listeners' side saw them: `max_connects_in_any_1s_window` from the kernel's arrival time
of each SYN on the namespace's `lo` (`SynLog`), and `max_accepts_in_any_1s_window` from
the accept loop's own clock. The latter adds the loop's wake-up delay (a late wake-up
bunches accepts: measured once at 21 in a window whose SYNs numbered 20), so it is shown
but `ok` holds the kernel's count. Target: `max_connects_in_any_1s_window` <= rate,
`ratio_steady` >= 0.95, every check `conn-accept`, every attempt's SYN seen and accepted.

Prints one JSON object on stdout (logs go to stderr). Example:
    sudo .venv/bin/python bench/verify.py                 # ~25 s
    .venv/bin/python bench/verify.py --duration 5         # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from recon_stream.adapters.probe import ProbeError, TcpProber, verify_budget
from recon_stream.adapters.ratelimit import window_of
from recon_stream.embedded import EmbeddedMongo

# The namespace helper lives with the tests; make the repository root importable when
# this file is run as a script (`python bench/verify.py`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.netns import PUBLIC_ADDRESS, NamespaceUnavailable, SynLog, max_in_window, namespace

logger = logging.getLogger("bench.verify")
DATABASE = "recon_bench_verify"


# -- a replica: its own client, budget and prober ------------------------------------------


async def replica(args: argparse.Namespace) -> dict[str, Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(args.uri)
    await client.admin.command("ping")
    prober = TcpProber(args.timeout, verify_budget(client[DATABASE], args.rate))
    ports = list(range(args.first_port, args.first_port + args.ports))
    reasons: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    # Ready, then wait for the go: all replicas start together.
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    end = time.monotonic() + args.duration
    turn = iter(range(10**9))

    async def work() -> None:
        while time.monotonic() < end:
            port = ports[next(turn) % len(ports)]
            try:
                check = await prober.check(PUBLIC_ADDRESS, port)
            except ProbeError as error:
                errors[str(error)] += 1
            else:
                reasons[check.reason.value] += 1

    try:
        await asyncio.gather(*(work() for _ in range(args.concurrency)))
    finally:
        await client.close()
    return {
        "checks": sum(reasons.values()) + sum(errors.values()),
        "reasons": dict(reasons),
        "probe_errors": dict(errors),
        "missed_slots": prober.missed_slots,
    }


# -- inside the namespace: mongod, listeners, replicas -------------------------------------


class AcceptLog:
    """Listeners that accept every connection at once, timestamped, on a thread."""

    def __init__(self, ports: list[int]) -> None:
        self.times: list[float] = []
        self._selector = selectors.DefaultSelector()
        for port in ports:
            sock = socket.socket()
            sock.bind((PUBLIC_ADDRESS, port))
            sock.listen(1024)
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="accept", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Woken first when a connection arrives (root, inside the namespace): the accept
        # clock then lags the kernel's by little even on a busy machine.
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        while not self._stop.is_set():
            for key, _ in self._selector.select(0.1):
                at = time.monotonic()
                listening: socket.socket = key.fileobj  # type: ignore[assignment]
                while True:
                    try:
                        conn, _ = listening.accept()
                    except BlockingIOError:
                        break
                    conn.close()
                    self.times.append(at)

    def close(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()
        return sorted(self.times)


def steady_rate(times: list[float], skip: float) -> float:
    inner = [t for t in times if times[0] + skip <= t <= times[-1] - skip]
    if len(inner) < 2:
        return 0.0
    return (len(inner) - 1) / (inner[-1] - inner[0])


def run_replicas(args: argparse.Namespace, uri: str) -> list[dict[str, Any]]:
    """Start the replicas, let them all go at once, and collect their reports."""
    command = [sys.executable, __file__, "--replica", "--uri", uri]
    command += [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in _SHARED]
    replicas = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(args.replicas)
    ]
    try:
        for process in replicas:
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError("a replica did not start (see stderr)")
        for process in replicas:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        return [json.loads(process.communicate()[0]) for process in replicas]
    finally:
        for process in replicas:
            if process.poll() is None:
                process.kill()
                process.wait()


def inside(args: argparse.Namespace) -> dict[str, Any]:
    ports = list(range(args.first_port, args.first_port + args.ports))
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="recon-bench-")))
        mongo = stack.enter_context(EmbeddedMongo(data_dir=tmp / "mongo", log_dir=tmp))
        syns = SynLog(set(ports))
        accepts = AcceptLog(ports)
        results = run_replicas(args, mongo.uri)
        attempts = sum(r["checks"] for r in results)
        deadline = time.monotonic() + 10
        while len(accepts.times) < attempts and time.monotonic() < deadline:
            time.sleep(0.01)
        accepted = accepts.close()
        syn_times = syns.close()
        engine = mongo.engine
    reasons: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for r in results:
        reasons.update(r["reasons"])
        errors.update(r["probe_errors"])
    span = syn_times[-1] - syn_times[0] if len(syn_times) > 1 else 0.0
    steady = steady_rate(syn_times, args.skip_s)
    overall = (len(syn_times) - 1) / span if span else 0.0
    rate = args.rate
    window, capacity = window_of(rate)  # 1 s and `rate` at rates of 1/s and more
    window_syns = max_in_window(syn_times, window)
    window_accepts = max_in_window(accepted, window)
    spans = [syn_times[i + capacity] - syn_times[i] for i in range(len(syn_times) - capacity)]
    ok = (
        window_syns <= capacity
        and steady / rate >= 0.95
        and set(reasons) == {"conn-accept"}
        and not errors
        and len(syn_times) == len(accepted) == attempts
    )
    return {
        "ok": ok,
        "mongodb": f"embedded {engine} (inside the namespace)",
        "rate": rate,
        "replicas": args.replicas,
        "concurrency_per_replica": args.concurrency,
        "ports": args.ports,
        "duration_s": args.duration,
        "checks": attempts,
        "checks_by_replica": [r["checks"] for r in results],
        "reasons": dict(reasons),
        "probe_errors": dict(errors),
        "missed_slots": sum(r["missed_slots"] for r in results),
        "syns_seen": len(syn_times),
        "accepted": len(accepted),
        "checks_per_s_steady": round(steady, 3),
        "ratio_steady": round(steady / rate, 4),
        "checks_per_s_overall": round(overall, 3),
        "ratio_overall": round(overall / rate, 4),
        "max_connects_in_any_1s_window": window_syns,
        "max_accepts_in_any_1s_window": window_accepts,
        f"min_s_spanned_by_{capacity + 1}_connects": round(min(spans), 4) if spans else None,
    }


# -- outside: the namespace ----------------------------------------------------------------

_SHARED = ("rate", "duration", "ports", "first-port", "concurrency", "timeout")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rate", type=float, default=float(os.environ.get("RECON_VERIFY_RATE", "20"))
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of checking")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4, help="checks at a time each")
    parser.add_argument("--ports", type=int, default=50, help="listening ports")
    parser.add_argument("--first-port", type=int, default=20000, help="below 32768")
    parser.add_argument("--timeout", type=float, default=3.0, help="connect timeout, seconds")
    parser.add_argument("--skip-s", type=float, default=2.0, help="left out at each end")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--replica", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.replica:
        print(json.dumps(asyncio.run(replica(args))), flush=True)
        return
    if args.inside:
        out, sys.stdout = sys.stdout, sys.stderr  # stdout carries the JSON only
        print(json.dumps(inside(args), indent=2), file=out)
        return
    try:
        with namespace() as ns:
            command = ns.argv(sys.executable, __file__, "--inside", *sys.argv[1:])
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    except NamespaceUnavailable as reason:
        print(json.dumps({"ok": False, "skipped": f"no network namespace: {reason}"}))
        sys.exit(2)
    if done.returncode != 0:
        sys.exit(f"the run inside the namespace failed ({done.returncode}); see stderr")
    sys.stdout.write(done.stdout)


if __name__ == "__main__":
    main()
