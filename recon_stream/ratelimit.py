"""The global Shodan budget: lookups per second across every scanner replica.

One MongoDB document holds the next free slot, in the server's milliseconds
(`$$NOW`, so replicas' clocks don't matter). `acquire` atomically takes the
next slot (`max(now, next) + interval`) and sleeps until it starts: slots are
handed out strictly spaced, so the budget holds whatever the number of
replicas, and every replica with work waiting keeps it busy.

Slots are 1/rate * (1 + margin) apart: the budget is used at most at
1/(1 + margin) (97% by default) so that sending jitter never breaks it.

The slot is stored as a number, not a date: SecantusDB mis-compares `$$NOW`
with stored dates, and numbers behave the same on mongod.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

BUDGETS = "rate_budgets"


class SharedRateLimiter:
    """Hands out lookup slots at most `rate` per second, shared through MongoDB."""

    def __init__(
        self,
        collection: AsyncCollection[dict[str, Any]],
        key: str,
        rate: float,
        *,
        margin: float = 0.03,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._collection = collection
        self._key = key
        # Slack: a request leaves its slot a little late (event loop, thread
        # hand-off; 11-15 ms measured on a loaded 2-core machine), and a late
        # first request plus an on-time last one must not fit rate+1 requests
        # into one second at Shodan's end. 3% is 30 ms per second of budget.
        self.interval_ms = 1000.0 / rate * (1.0 + margin)

    async def reserve(self) -> float:
        """Take the next slot; return how many seconds until it starts."""
        now = {"$toLong": "$$NOW"}
        update = [
            {
                "$set": {
                    "now_ms": now,
                    "next_ms": {
                        "$add": [{"$max": [{"$ifNull": ["$next_ms", 0]}, now]}, self.interval_ms]
                    },
                }
            }
        ]
        for _ in range(2):
            doc = await self._collection.find_one_and_update(
                {"_id": self._key}, update, return_document=ReturnDocument.AFTER
            )
            if doc is not None:
                start = float(doc["next_ms"]) - self.interval_ms
                return max(0.0, (start - float(doc["now_ms"])) / 1000.0)
            with contextlib.suppress(DuplicateKeyError):
                await self._collection.insert_one({"_id": self._key, "next_ms": 0})
        raise RuntimeError(f"rate budget {self._key!r} could not be created")

    async def acquire(self) -> float:
        """Wait for a slot; return the seconds waited."""
        started = time.monotonic()
        wait = await self.reserve()
        if wait > 0:
            await asyncio.sleep(wait)
        return time.monotonic() - started
