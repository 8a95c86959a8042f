"""TCP verification probes: one plain connect from our own network, classified as nmap's.

`TcpProber.check(ip, port)` makes one non-blocking TCP connect to a public address and
answers a `Check` (`recon_stream.domain.verification`), as nmap's connect scan
(`scan_engine_connect.cc`) classifies the connect's result:

    connected                    conn-accept       open
    ECONNREFUSED                 conn-refused      closed
    our timeout, ETIMEDOUT,
      EHOSTDOWN                  no-response       no_answer
    EHOSTUNREACH                 host-unreach      no_answer
    ENETUNREACH                  net-unreach       no_answer
    EACCES, EPERM                admin-prohibited  no_answer

The timeout is ours (`timeout`, seconds, from the moment the SYN leaves): the kernel
alone gives up on a SYN only after ~130 s. A connected probe sends nothing and is
closed with `SO_LINGER` 0, a reset, as nmap does.

Errors, and what the caller does with each:

    NotCheckable     (domain) the target is not a public address: refused before any
                     socket is made or any budget is spent; never retried
    ValueError       the port is not 1-65535: nothing was done
    ProbeError       the connect failed on our side, so it says nothing about the
                     target: a blackhole route (EINVAL), no local address
                     (EADDRNOTAVAIL), no file descriptors, an errno nmap has no reason
                     for here, or a self-connect (the kernel connected the socket to
                     itself: nothing listens there, nmap retries). Count it; never read
                     it as closed. `errno` is the error number (None for a self-connect).

Every connect attempt first takes a slot of the shared rate budget (`RateBudget`, for
instance `verify_budget`: a `SharedRateLimiter` of its own, key "verify", in
MongoDB), waits for the slot's window without blocking the event loop, and connects
right after the slot's gate lets it go. A slot whose window passed before the task got
to it is forfeited (`missed_slots`) and another is taken: lateness costs budget, never
the rate.
"""

from __future__ import annotations

import asyncio
import errno as errnos
import socket
import struct
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from recon_stream.adapters.collections import RATE_BUDGETS
from recon_stream.adapters.ratelimit import SharedRateLimiter
from recon_stream.domain.verification import Check, CheckReason, checkable

if TYPE_CHECKING:
    from pymongo.asynchronous.database import AsyncDatabase

    from recon_stream.providers import RateBudget

__all__ = ["VERIFY_BUDGET_KEY", "ProbeError", "TcpProber", "verify_budget"]

VERIFY_BUDGET_KEY = "verify"
"""The verification budget's document in `rate_budgets` (Shodan's is "shodan")."""

_REASONS = {
    errnos.ECONNREFUSED: CheckReason.CONN_REFUSED,
    errnos.ETIMEDOUT: CheckReason.NO_RESPONSE,
    errnos.EHOSTDOWN: CheckReason.NO_RESPONSE,
    errnos.EHOSTUNREACH: CheckReason.HOST_UNREACH,
    errnos.ENETUNREACH: CheckReason.NET_UNREACH,
    errnos.EACCES: CheckReason.ADMIN_PROHIBITED,
    errnos.EPERM: CheckReason.ADMIN_PROHIBITED,
}
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


class ProbeError(Exception):
    """The connect failed on our side: it says nothing about the target (see above)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def verify_budget(
    db: AsyncDatabase[dict[str, Any]], rate: float, *, margin: float = 0.03
) -> SharedRateLimiter:
    """The verification connect budget shared by every replica: `rate` attempts per
    second (`RECON_VERIFY_RATE`), in `rate_budgets` under key "verify"."""
    return SharedRateLimiter(db[RATE_BUDGETS], VERIFY_BUDGET_KEY, rate, margin=margin)


class TcpProber:
    """Checks (ip, port) with one TCP connect, at most as often as `budget` allows."""

    def __init__(self, timeout: float, budget: RateBudget) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.timeout = timeout
        self.missed_slots = 0
        """Slots forfeited because the task reached them too late (nothing was sent)."""
        self._budget = budget

    async def check(self, ip: str, port: int) -> Check:
        """Connect to (ip, port) once and classify the result.

        Raises `NotCheckable` (not a public address: no socket is made), `ValueError`
        (bad port) or `ProbeError` (a local failure).
        """
        address = checkable(ip)
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is not 1-65535")
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as error:
            raise ProbeError(f"no socket for {address}: {error}", error.errno) from None
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
            return await self._connect(sock, address, port)
        finally:
            sock.close()

    async def _connect(self, sock: socket.socket, address: str, port: int) -> Check:
        while True:
            slot = await self._budget.reserve()
            try:
                # Wait on the loop; `enter` then blocks for at most a timer's rounding.
                await asyncio.sleep(slot.wait)
            except BaseException:
                slot.abandon()
                raise
            if slot.enter():
                break
            self.missed_slots += 1
        # Only clock readings between the gate and the SYN: connect_ex sends it at once.
        started = time.monotonic()
        checked_at = datetime.now(UTC)
        started_code = sock.connect_ex((address, port))
        code = await self._finished(sock) if started_code == errnos.EINPROGRESS else started_code
        rtt_ms = (time.monotonic() - started) * 1000.0
        if code is None:
            return Check(address, port, CheckReason.NO_RESPONSE, checked_at)
        if code == 0:
            local, remote = sock.getsockname(), sock.getpeername()
            if local[:2] == remote[:2]:
                raise ProbeError(f"self-connect on {address}:{port}: nothing listens there")
            return Check(address, port, CheckReason.CONN_ACCEPT, checked_at, rtt_ms)
        reason = _REASONS.get(code)
        if reason is None:
            name = errnos.errorcode.get(code, str(code))
            raise ProbeError(f"connect to {address}:{port} failed on our side: {name}", code)
        return Check(address, port, reason, checked_at, rtt_ms)

    async def _finished(self, sock: socket.socket) -> int | None:
        """The connect's result (SO_ERROR) once the socket is writable; None on timeout."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def writable() -> None:
            if not done.done():
                done.set_result(None)

        fd = sock.fileno()
        loop.add_writer(fd, writable)
        try:
            async with asyncio.timeout(self.timeout):
                await done
        except TimeoutError:
            return None
        finally:
            loop.remove_writer(fd)
        code: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return code
