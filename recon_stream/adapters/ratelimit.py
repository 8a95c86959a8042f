"""The global Shodan budget: lookups per second across every scanner replica.

The promise: in any window of W seconds (W = max(1, 1/rate), sliding, as Shodan
and a strict server count), the requests of all replicas together number at most
C = floor(rate * W), however late any replica's event loop, thread or process runs.

How it is kept:

1. Slots. One MongoDB document holds the next free slot in the server's clock
   (`$$NOW`, milliseconds). `reserve` atomically takes `start = max(now, next)`
   and moves `next` to `start + interval`, with interval = (1 + margin) / rate.
   Slot starts are therefore at least `interval` apart, whoever took them.
2. A send window per slot: [start, start + tolerance] in server time, with
   tolerance = (C * interval - W) / 2, half the slack the margin buys. A request
   may leave only inside its slot's window; a replica that arrives late (stalled
   loop, busy core, slow thread hand-off) forfeits the slot and reserves another.
   The forfeited slot stays unused, so lateness costs budget, never the promise.
3. The gate. `Slot.enter` runs in the thread that sends, immediately before the
   request is handed to the HTTP client: it sleeps until the window opens and
   answers False if the window has closed. The server's time is known only within
   bounds (`ServerClock`: each reservation's round trip brackets `$$NOW`); the gate
   opens only when the lower bound has reached `start` and refuses once the upper
   bound may have passed `start + tolerance`.

Invariant: every request sent through a slot leaves at a server time within
[start, start + tolerance]. Any C + 1 requests use C + 1 distinct slots, so the
first and the last leave at least C * interval - tolerance = W + tolerance apart:
never C + 1 in one window. The other half of the slack (`tolerance` again, 15 ms
per second of window at the default 3% margin) absorbs what happens after the
gate: the HTTP client's own work and network jitter on the way to Shodan.

The slot is stored as a number (epoch milliseconds), not a date: SecantusDB
mis-compares `$$NOW` with stored dates. This stays for the SecantusDB fallback
(where mongod's wheel cannot install) and is as correct on mongod, where
`$toLong` of `$$NOW` compares and adds exactly as the date would.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

# How fast the server's clock may run against ours: two NTP-disciplined clocks stay
# within a few ppm of each other; 100 ppm leaves room for a slewing correction.
DRIFT = 100e-6
# `$$NOW` has millisecond resolution: the true instant is up to 1 ms after it.
_NOW_RESOLUTION = 0.001


def window_of(rate: float) -> tuple[float, int]:
    """The window (seconds) and capacity (requests) that a rate promises."""
    window = max(1.0, 1.0 / rate)
    return window, max(1, math.floor(rate * window + 1e-9))


def tolerance_of(rate: float, margin: float) -> float:
    """How late (seconds) a request may leave its slot and still keep the promise."""
    window, capacity = window_of(rate)
    interval = (1.0 + margin) / rate
    return max(0.0, capacity * interval - window) / 2.0


class ServerClock:
    """Bounds on `server time - time.monotonic()`, from request round trips.

    A server reading taken between local instants `sent` and `received` puts the
    offset within [reading - received, reading + resolution - sent]. Bounds kept
    from earlier readings widen with the possible drift since, and are intersected
    with each new one, so one quick round trip keeps later slow ones precise. Bounds
    that no longer meet a new reading (the server's clock was stepped) restart from it.
    """

    def __init__(self, drift: float = DRIFT) -> None:
        self._drift = drift
        self._lo = -math.inf
        self._hi = math.inf
        self._at = 0.0

    def observe(self, sent: float, received: float, server: float) -> None:
        """Record a server reading (`server`, seconds) taken during [sent, received]."""
        lo, hi = server - received, server + _NOW_RESOLUTION - sent
        old_lo, old_hi = self.bounds(received)
        if old_lo <= hi and lo <= old_hi:
            lo, hi = max(lo, old_lo), min(hi, old_hi)
        self._lo, self._hi, self._at = lo, hi, received

    def bounds(self, at: float) -> tuple[float, float]:
        """The offset's bounds at local instant `at`."""
        spread = self._drift * abs(at - self._at)
        return self._lo - spread, self._hi + spread


def send_window(
    start: float, tolerance: float, offset_lo: float, offset_hi: float
) -> tuple[float, float]:
    """The local instants between which a send surely lands in [start, start + tolerance].

    `start` is in the server's clock; the offset (server - local) is within the bounds.
    The window is empty (first > second) when the bounds are wider than the tolerance.
    """
    return start - offset_lo, start + tolerance - offset_hi


class Slot:
    """One reserved request: `enter` in the sending thread, right before the request."""

    def __init__(
        self,
        start: float,
        earliest: float,
        latest: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        self.start = start
        """The slot's start in the server's clock (seconds)."""
        self.earliest = earliest
        """Local monotonic instant from which the window is surely open."""
        self.latest = latest
        """Local monotonic instant after which it may have closed."""
        self.entered_at: float | None = None
        """When `enter` let the request go (local monotonic), None until it did."""
        self._abandoned = threading.Event()
        self._clock = clock
        self._sleep = sleep or self._abandoned.wait

    def __repr__(self) -> str:
        return f"Slot(start={self.start:.3f}, window={max(0.0, self.latest - self.earliest):.4f}s)"

    @property
    def wait(self) -> float:
        """Seconds from now until the window opens (0 when open or past)."""
        return max(0.0, self.earliest - self._clock())

    def enter(self) -> bool:
        """Block until the window opens; True if the request may leave now, False if too late.

        Call it in the thread that sends, as the last thing before the request: a False
        means nothing may be sent on this slot; reserve another.
        """
        now = self._clock()
        if now < self.earliest:
            self._sleep(self.earliest - now)
            now = self._clock()
        if self._abandoned.is_set() or not self.earliest <= now <= self.latest:
            return False
        self.entered_at = now
        return True

    def abandon(self) -> None:
        """Give the slot up: a waiting or later `enter` answers False at once."""
        self._abandoned.set()


class Pacer:
    """The arithmetic of slots for one replica: spacing, tolerance, clock bounds."""

    def __init__(
        self,
        rate: float,
        margin: float = 0.03,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if margin <= 0:
            raise ValueError("margin must be positive: it is what late requests spend")
        self.interval_ms = 1000.0 / rate * (1.0 + margin)
        self.tolerance = tolerance_of(rate, margin)
        self.server_clock = ServerClock()
        self.clock = clock
        self._sleep = sleep

    def slot(self, sent: float, received: float, now_ms: float, start_ms: float) -> Slot:
        """The slot starting at `start_ms`, from a reservation that read `now_ms` in the
        server's clock between local instants `sent` and `received`."""
        self.server_clock.observe(sent, received, now_ms / 1000.0)
        start = start_ms / 1000.0
        lo, _ = self.server_clock.bounds(received)
        # The bounds as they will be when the window opens: they widen as we wait.
        lo, hi = self.server_clock.bounds(max(received, start - lo))
        earliest, latest = send_window(start, self.tolerance, lo, hi)
        return Slot(start, earliest, latest, clock=self.clock, sleep=self._sleep)


class SharedRateLimiter:
    """Hands out send slots, at most `rate` per second, shared through MongoDB."""

    def __init__(
        self,
        collection: AsyncCollection[dict[str, Any]],
        key: str,
        rate: float,
        *,
        margin: float = 0.03,
    ) -> None:
        self._collection = collection
        self._key = key
        self.pacer = Pacer(rate, margin)

    async def reserve(self) -> Slot:
        """Take the next slot."""
        pacer = self.pacer
        interval = pacer.interval_ms
        now = {"$toLong": "$$NOW"}
        update = [
            {
                "$set": {
                    "now_ms": now,
                    "next_ms": {"$add": [{"$max": [{"$ifNull": ["$next_ms", 0]}, now]}, interval]},
                }
            }
        ]
        for _ in range(2):
            sent = pacer.clock()
            doc = await self._collection.find_one_and_update(
                {"_id": self._key}, update, return_document=ReturnDocument.AFTER
            )
            received = pacer.clock()
            if doc is not None:
                start = float(doc["next_ms"]) - interval
                return pacer.slot(sent, received, float(doc["now_ms"]), start)
            # No upsert: SecantusDB answers None to an upserting pipeline update.
            # Insert, then try again: this stays for the SecantusDB fallback and is
            # as correct on mongod (the update is atomic either way; a replica that
            # loses the insert race gets DuplicateKeyError and just retries), at
            # the cost of one round trip, once per budget.
            with contextlib.suppress(DuplicateKeyError):
                await self._collection.insert_one({"_id": self._key, "next_ms": 0})
        raise RuntimeError(f"rate budget {self._key!r} could not be created")
