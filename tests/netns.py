"""A network namespace of a test's own, whose only interface is its own `lo`.

Verification probes connect only to public addresses, so their tests put a public
address (81.2.69.142/32) on the `lo` of a fresh namespace and run the listeners and the
probes inside it (DESIGN.md, "Real components in tests"). The namespace has no other
interface and no route out: nothing it does can leave the machine. Inside it,
127.0.0.1 is the namespace's own loopback (a mongod started inside listens there).

    from tests import netns

    with netns.namespace() as ns:               # NamespaceUnavailable if it cannot be made
        ns.route("unreachable", "81.2.69.144/32")
        result = ns.call("tests.integration.test_probe:probe_once", "81.2.69.142", 3389)
        ns.run("ss", "-ltn")                    # any command, inside

`call` runs a module-level function (sync or async) in a Python subprocess inside the
namespace (`ip netns exec NAME python -m tests.netns call module:function ARGS`): the
arguments and the return value travel as JSON; an exception inside is raised here as
`NamespaceCallError` with the inner traceback. `argv(...)` gives the prefix for any other
process to start inside (`Popen(ns.argv(sys.executable, "bench/verify.py", ...))`).

In pytest, the `namespace_or_skip()` context manager skips the test, saying why, when
not root, when `ip` (iproute2) is missing, or when `ip netns add` fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

PUBLIC_ADDRESS = "81.2.69.142"
"""The public address on the namespace's `lo` (a GeoIP test address, used by no service
we could reach: the namespace has no route out anyway)."""

RouteType = Literal["unreachable", "prohibit", "blackhole"]

_ETH_P_IP = 0x0800
_PACKET_OUTGOING = 4
# SO_TIMESTAMPNS (asm-generic and x86): Python's socket module does not name it.
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_SYN, _ACK = 0x02, 0x10

_ROOT = Path(__file__).resolve().parents[1]
_MARK = "@@netns-result@@ "


class NamespaceUnavailable(RuntimeError):
    """No network namespace can be made here (the reason is the message)."""


class NamespaceCallError(RuntimeError):
    """A function called inside the namespace raised; the message holds its traceback."""


def unavailable() -> str | None:
    """Why no namespace can be made here, or None when one may be."""
    if not sys.platform.startswith("linux"):
        return "network namespaces exist on Linux only"
    if os.geteuid() != 0:
        return "making a network namespace (ip netns add) needs root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    return None


class Namespace:
    """One network namespace, `recon-<random>`, with `lo` up and PUBLIC_ADDRESS on it."""

    def __init__(self, address: str = PUBLIC_ADDRESS) -> None:
        self.name = f"recon-{uuid.uuid4().hex[:10]}"
        self.address = address
        self._made = False

    def create(self) -> Namespace:
        reason = unavailable()
        if reason is not None:
            raise NamespaceUnavailable(reason)
        added = subprocess.run(
            ["ip", "netns", "add", self.name], capture_output=True, text=True, check=False
        )
        if added.returncode != 0:
            raise NamespaceUnavailable(f"ip netns add failed: {added.stderr.strip()}")
        self._made = True
        try:
            self._ip("link", "set", "lo", "up")
            self._ip("addr", "add", f"{self.address}/32", "dev", "lo")
            links = self._ip("-o", "link", "show").stdout.splitlines()
            # The promise that nothing leaves: `lo` is the only interface.
            if len(links) != 1 or ": lo:" not in links[0]:
                raise NamespaceUnavailable(f"namespace {self.name} has other links: {links}")
        except BaseException:
            self.delete()
            raise
        return self

    def delete(self) -> None:
        """Delete the namespace (its processes' sockets go with it); safe to repeat."""
        if self._made:
            self._made = False
            subprocess.run(["ip", "netns", "delete", self.name], capture_output=True, check=False)

    def __enter__(self) -> Namespace:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def route(self, kind: RouteType, prefix: str) -> None:
        """Add a route of `kind` for `prefix`: `unreachable` (connect: EHOSTUNREACH),
        `prohibit` (EACCES) or `blackhole` (EINVAL), answered by the namespace's own
        kernel with nothing on any wire."""
        self._ip("route", "add", kind, prefix)

    def argv(self, *command: str) -> list[str]:
        """The command line that runs `command` inside the namespace."""
        return ["ip", "netns", "exec", self.name, *command]

    def run(self, *command: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run `command` inside the namespace to completion (output captured, checked)."""
        return subprocess.run(
            self.argv(*command), capture_output=True, text=True, timeout=timeout, check=True
        )

    def call(self, function: str | Callable[..., Any], *args: Any, timeout: float = 120.0) -> Any:
        """`function(*args)` in a Python subprocess inside the namespace; its JSON result.

        `function` is a module-level function or its "module:name"; a coroutine function
        is run with `asyncio.run`. Arguments and result must be JSON.
        """
        target = function if isinstance(function, str) else _target_of(function)
        command = self.argv(sys.executable, "-m", "tests.netns", "call", target, json.dumps(args))
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=_ROOT, check=False
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith(_MARK)]
        if not lines:
            raise NamespaceCallError(
                f"{target} exited with {done.returncode} and no result; stderr:\n{done.stderr}"
            )
        answer = json.loads(lines[-1][len(_MARK) :])
        if "error" in answer:
            raise NamespaceCallError(f"{target} raised inside {self.name}:\n{answer['error']}")
        return answer["result"]

    def _ip(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "-n", self.name, *args], capture_output=True, text=True, check=True
        )


@contextlib.contextmanager
def namespace(address: str = PUBLIC_ADDRESS) -> Iterator[Namespace]:
    """A fresh namespace for the `with` block; `NamespaceUnavailable` when none can be made."""
    with Namespace(address) as ns:
        yield ns


@contextlib.contextmanager
def namespace_or_skip(address: str = PUBLIC_ADDRESS) -> Iterator[Namespace]:
    """As `namespace`, but skips the running pytest test when no namespace can be made."""
    import pytest

    try:
        ns = Namespace(address).create()
    except NamespaceUnavailable as reason:
        pytest.skip(f"no network namespace: {reason}")
    try:
        yield ns
    finally:
        ns.delete()


class SynLog:
    """The kernel's arrival time of every TCP SYN (a connection attempt) to `ports`, on the
    namespace's `lo`: run it inside a namespace, as root.

    A packet socket on `lo` with kernel timestamps (SO_TIMESTAMPNS): the instant the SYN
    reached the listeners' stack, free of any user-space scheduling delay (an accept
    loop's timestamps carry its wake-up latency). Times are in CLOCK_REALTIME seconds:
    compare them with each other only.
    """

    def __init__(self, ports: set[int]) -> None:
        self.times: list[float] = []
        self._ports = ports
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_IP))
        self._sock.bind(("lo", 0))
        self._sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        self._sock.setblocking(False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="syn-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            select.select([self._sock], [], [], 0.1)
            self._drain()

    def _drain(self) -> None:
        while True:
            try:
                data, ancillary, _, address = self._sock.recvmsg(128, 64)
            except BlockingIOError:
                return
            if address[2] == _PACKET_OUTGOING:
                continue
            ip = data[14:]  # lo frames carry an (all-zero) Ethernet header
            if len(ip) < 20 or ip[9] != socket.IPPROTO_TCP:
                continue
            tcp = ip[(ip[0] & 0x0F) * 4 :]
            (port,) = struct.unpack_from("!H", tcp, 2)
            if tcp[13] & (_SYN | _ACK) != _SYN or port not in self._ports:
                continue
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                    seconds, nanoseconds = struct.unpack_from("qq", value)
                    self.times.append(seconds + nanoseconds / 1e9)

    def close(self) -> list[float]:
        """Stop, and the SYN times seen, in order."""
        self._stop.set()
        self._thread.join()
        self._drain()
        self._sock.close()
        return sorted(self.times)


def max_in_window(times: list[float], window: float) -> int:
    """The most of `times` (sorted) in any half-open sliding window [t, t + window)."""
    best, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


def _target_of(function: Callable[..., Any]) -> str:
    if "." in function.__qualname__ or function.__qualname__ == "<lambda>":
        raise ValueError("only module-level functions can be called inside a namespace")
    module = function.__module__
    if module == "__main__":
        raise ValueError("a function of __main__ cannot be imported inside a namespace")
    return f"{module}:{function.__qualname__}"


def _call_inside(target: str, args_json: str) -> None:
    module, _, name = target.partition(":")
    try:
        function = getattr(importlib.import_module(module), name)
        args = json.loads(args_json)
        result = function(*args)
        if inspect.isawaitable(result):
            result = asyncio.run(_awaited(result))
        answer = {"result": result}
    except BaseException:
        answer = {"error": traceback.format_exc()}
    sys.stdout.flush()
    print(_MARK + json.dumps(answer), flush=True)


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "call":
        sys.exit("usage: python -m tests.netns call module:function JSON-ARGS")
    _call_inside(sys.argv[2], sys.argv[3])
