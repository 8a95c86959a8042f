"""The TCP prober against a real kernel, in a network namespace of the test's own.

Each test makes a fresh namespace (tests/netns.py) whose only interface is `lo`, with
81.2.69.142/32 on it, and runs the listeners and the prober inside it, in a Python
subprocess (`Namespace.call` of a function of this module): nothing leaves the machine.
The states are made by the namespace's own kernel, as measured here:

- open: a listener on 81.2.69.142:3389; closed: 81.2.69.142:445, nothing listening (RST);
- host-unreach / admin-prohibited / a local error: `unreachable`, `prohibit` and
  `blackhole` routes (EHOSTUNREACH, EACCES, EINVAL at once, nothing on any wire);
- net-unreach: 8.8.8.8, for which the namespace has no route;
- no-response: a listener with `listen(0)` whose one-connection accept queue is full and
  which never accepts: with `tcp_abort_on_overflow=0` (the default, checked) Linux drops
  the SYN and the connect times out;
- a self-connect and EADDRNOTAVAIL: the namespace's ephemeral range narrowed to the
  destination's own port (`ip_local_port_range` is per namespace).

The budget. Classification runs each probe through an always-open slot (`OpenBudget`):
what a connect answers does not depend on when it leaves. The shared budget is tested on
its own, still in a namespace (the prober connects to public addresses only, so it has no
other place to run): that test starts its own mongod inside the namespace, on the
namespace's 127.0.0.1 (the session's MongoDB, external or embedded, cannot be reached
from there), and three probers, each on a MongoClient and `verify_budget` of its own,
check listeners that accept every connection: each attempt arrives (a SYN, timestamped
by the kernel on the namespace's `lo`, `SynLog`) and no 1 s window holds more than the
rate. bench/verify.py measures the same for 20 s with three processes.

Ports are below 32768, outside the default ephemeral range, so no probe self-connects by
chance. Waits are on conditions (a queue's state, a connection's arrival), never sleeps.
"""

from __future__ import annotations

import asyncio
import errno
import selectors
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from recon_stream.adapters.probe import ProbeError, TcpProber, verify_budget
from recon_stream.domain.verification import Check
from recon_stream.embedded import EmbeddedMongo
from tests import netns
from tests.netns import PUBLIC_ADDRESS, Namespace, SynLog, max_in_window

UNREACHABLE = "81.2.69.144"
PROHIBITED = "81.2.69.145"
BLACKHOLED = "81.2.69.146"
NO_ROUTE = "8.8.8.8"
TIMEOUT = 0.5


@pytest.fixture
def ns() -> Iterator[Namespace]:
    with netns.namespace_or_skip() as made:
        made.route("unreachable", f"{UNREACHABLE}/32")
        made.route("prohibit", f"{PROHIBITED}/32")
        made.route("blackhole", f"{BLACKHOLED}/32")
        yield made


# -- run inside the namespace (Namespace.call) --------------------------------------------


@dataclass
class _Open:
    entered_at: float | None = None

    @property
    def wait(self) -> float:
        return 0.0

    def enter(self) -> bool:
        self.entered_at = time.monotonic()
        return True

    def abandon(self) -> None:
        pass


class OpenBudget:
    """Every slot open at once: for tests of what a connect answers, not when."""

    async def reserve(self) -> _Open:
        return _Open()


async def _outcome(prober: TcpProber, ip: str, port: int) -> dict[str, Any]:
    try:
        check: Check = await prober.check(ip, port)
    except ProbeError as error:
        code = None if error.errno is None else errno.errorcode[error.errno]
        return {"probe_error": code, "message": str(error)}
    return {"reason": check.reason.value, "state": check.state.value, "rtt_ms": check.rtt_ms}


def _listener(port: int, backlog: int = 8) -> socket.socket:
    sock = socket.socket()
    sock.bind((PUBLIC_ADDRESS, port))
    sock.listen(backlog)
    return sock


async def probe_once(ip: str, port: int) -> dict[str, Any]:
    return await _outcome(TcpProber(TIMEOUT, OpenBudget()), ip, port)


async def probe_listener(port: int) -> dict[str, Any]:
    """A check of a listening port, and what the listener then received."""
    with _listener(port) as listening:
        result = await _outcome(TcpProber(TIMEOUT, OpenBudget()), PUBLIC_ADDRESS, port)
        listening.settimeout(10)
        conn, _ = listening.accept()
        with conn:
            conn.settimeout(10)
            try:
                received = "data" if conn.recv(1) else "fin"
            except ConnectionResetError:
                received = "reset"
    return {**result, "listener_received": received}


def _queue(listening: socket.socket) -> tuple[int, int]:
    """(connections waiting in the accept queue, backlog) of a listening socket: Linux's
    TCP_INFO gives them as tcpi_unacked and tcpi_sacked."""
    info = listening.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    unacked, sacked = struct.unpack_from("II", info, 24)
    return unacked, sacked


async def probe_full_backlog(port: int) -> dict[str, Any]:
    abort = Path("/proc/sys/net/ipv4/tcp_abort_on_overflow").read_text().strip()
    with _listener(port, backlog=0) as listening:
        # listen(0) queues one connection; the queue is full once it holds more than 0.
        filler = socket.create_connection((PUBLIC_ADDRESS, port), timeout=10)
        with filler:
            deadline = time.monotonic() + 10
            while _queue(listening)[0] <= _queue(listening)[1]:
                assert time.monotonic() < deadline, "the accept queue never filled"
                await asyncio.sleep(0.01)
            result = await _outcome(TcpProber(TIMEOUT, OpenBudget()), PUBLIC_ADDRESS, port)
            queued = _queue(listening)[0]
    return {**result, "tcp_abort_on_overflow": abort, "queued": queued}


async def probe_with_one_ephemeral_port(port: int, hold: bool) -> dict[str, Any]:
    """With the ephemeral range narrowed to `port` itself: a probe of `port` with nothing
    listening connects the socket to itself; with `hold`, a connection from that only
    port to a listener on `port` + 1 leaves the probe of `port` + 1 no local port at all."""
    Path("/proc/sys/net/ipv4/ip_local_port_range").write_text(f"{port} {port}")
    prober = TcpProber(TIMEOUT, OpenBudget())
    if not hold:
        return await _outcome(prober, PUBLIC_ADDRESS, port)
    with _listener(port + 1), socket.create_connection((PUBLIC_ADDRESS, port + 1), timeout=10):
        return await _outcome(prober, PUBLIC_ADDRESS, port + 1)


class _AcceptLog:
    """Listeners on `ports` that accept every connection, timestamped, on a thread."""

    def __init__(self, ports: list[int]) -> None:
        self.times: list[float] = []
        self.ports: Counter[int] = Counter()
        self._selector = selectors.DefaultSelector()
        for port in ports:
            sock = _listener(port, backlog=128)
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ, port)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(0.1):
                at = time.monotonic()
                listening: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    conn, _ = listening.accept()
                except BlockingIOError:
                    continue
                conn.close()
                self.times.append(at)
                self.ports[key.data] += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()


async def share_budget(rate: float, checks: int, base: str) -> dict[str, Any]:
    """Three probers, each with a MongoClient and budget of its own, on one mongod."""
    # The accept thread must not hold the GIL for 5 ms while a probe waits at its gate.
    sys.setswitchinterval(0.0005)
    ports = list(range(20000, 20010))
    with EmbeddedMongo(data_dir=Path(base) / "data", log_dir=Path(base)) as mongo:
        clients: list[AsyncMongoClient[dict[str, Any]]] = [
            AsyncMongoClient(mongo.uri) for _ in range(3)
        ]
        probers = [TcpProber(2.0, verify_budget(client["probe_test"], rate)) for client in clients]
        syns = SynLog(set(ports))
        log = _AcceptLog(ports)
        targets = iter(range(checks))
        reasons: Counter[str] = Counter()

        async def work(prober: TcpProber) -> None:
            for n in targets:
                result = await _outcome(prober, PUBLIC_ADDRESS, ports[n % len(ports)])
                reasons[result.get("reason", "probe_error")] += 1

        try:
            await asyncio.gather(*(work(p) for p in probers for _ in range(3)))
            deadline = time.monotonic() + 10
            while len(log.times) < checks and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            log.close()
            syn_times = syns.close()
            for client in clients:
                await client.close()
    return {
        "reasons": dict(reasons),
        "accepted": sorted(log.times),
        "syns": syn_times,
        "missed_slots": sum(p.missed_slots for p in probers),
        "engine": mongo.engine,
    }


# -- the tests -----------------------------------------------------------------------------


def test_a_listening_port_is_open_and_gets_a_reset_and_no_payload(ns: Namespace) -> None:
    result = ns.call(probe_listener, 3389)
    assert result["reason"] == "conn-accept"
    assert result["state"] == "open"
    assert result["rtt_ms"] >= 0
    assert result["listener_received"] == "reset"


def test_a_port_nothing_listens_on_is_closed(ns: Namespace) -> None:
    result = ns.call(probe_once, PUBLIC_ADDRESS, 445)
    assert (result["reason"], result["state"]) == ("conn-refused", "closed")


def test_an_unreachable_route_is_host_unreach(ns: Namespace) -> None:
    result = ns.call(probe_once, UNREACHABLE, 3389)
    assert (result["reason"], result["state"]) == ("host-unreach", "no_answer")


def test_a_prohibit_route_is_admin_prohibited(ns: Namespace) -> None:
    result = ns.call(probe_once, PROHIBITED, 3389)
    assert (result["reason"], result["state"]) == ("admin-prohibited", "no_answer")


def test_no_route_is_net_unreach(ns: Namespace) -> None:
    result = ns.call(probe_once, NO_ROUTE, 443)
    assert (result["reason"], result["state"]) == ("net-unreach", "no_answer")


def test_a_full_accept_queue_is_no_response(ns: Namespace) -> None:
    result = ns.call(probe_full_backlog, 3390)
    assert result["tcp_abort_on_overflow"] == "0"
    assert result["queued"] == 1
    assert (result["reason"], result["state"]) == ("no-response", "no_answer")
    assert result["rtt_ms"] is None


def test_a_blackhole_route_is_a_local_error_never_closed(ns: Namespace) -> None:
    result = ns.call(probe_once, BLACKHOLED, 3389)
    assert result["probe_error"] == "EINVAL"


def test_no_local_port_left_is_a_local_error(ns: Namespace) -> None:
    result = ns.call(probe_with_one_ephemeral_port, 30000, True)
    assert result["probe_error"] == "EADDRNOTAVAIL"


def test_a_self_connect_is_not_open(ns: Namespace) -> None:
    result = ns.call(probe_with_one_ephemeral_port, 30000, False)
    assert result["probe_error"] is None
    assert "self-connect" in result["message"]


def test_three_probers_on_their_own_clients_share_one_rate(ns: Namespace, tmp_path: Path) -> None:
    rate, checks = 10.0, 40
    result = ns.call(share_budget, rate, checks, str(tmp_path), timeout=180)
    assert result["reasons"] == {"conn-accept": checks}
    accepted = result["accepted"]
    assert len(accepted) == checks
    # Counted where each attempt reaches the listeners' stack: the kernel's SYN arrival.
    syns = result["syns"]
    assert len(syns) == checks
    assert max_in_window(syns, 1.0) <= rate
