"""`scan_credits`: the on-demand scan credits rescans may spend, counted across replicas.

    {_id: "2026-12-02" (the UTC day), used: n, last_credits_left: m, updated_at}

`take` spends one of the day's `per_day` atomically: an update that matches only a day
with `used < per_day`, upserting the day's document when it is the first spend; when
the day is spent the upsert collides with the existing document (a duplicate key) and
nothing is spent (a collision with another replica's first insert is tried once more
without the upsert). However many replicas race, the count never passes `per_day`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from recon_stream.adapters.collections import SCAN_CREDITS

Document = dict[str, Any]


def _day(now: datetime) -> str:
    return now.astimezone(UTC).date().isoformat()


class MongoScanCredits:
    """The daily budget of on-demand scans (`RECON_SHODAN_SCAN_CREDITS_PER_DAY`)."""

    def __init__(self, db: AsyncDatabase[Document], per_day: int) -> None:
        self._collection: AsyncCollection[Document] = db[SCAN_CREDITS]
        self.per_day = per_day

    async def take(self, now: datetime | None = None) -> bool:
        """Spend one of today's credits; False (nothing spent) when none is left."""
        if self.per_day <= 0:
            return False
        now = now or datetime.now(UTC)
        query = {"_id": _day(now), "used": {"$lt": self.per_day}}
        update = {"$inc": {"used": 1}, "$set": {"updated_at": now}}
        try:
            await self._collection.find_one_and_update(query, update, upsert=True)
            return True
        except DuplicateKeyError:
            # Today's document exists and did not match: spent, or another replica's
            # first spend of the day inserted it a moment ago. Once more, no upsert.
            return await self._collection.find_one_and_update(query, update) is not None

    async def used(self, now: datetime | None = None) -> int:
        """Credits spent today."""
        doc = await self._collection.find_one({"_id": _day(now or datetime.now(UTC))})
        return int(doc.get("used", 0)) if doc else 0
