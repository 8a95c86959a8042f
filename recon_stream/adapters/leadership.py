"""One active scheduler across replicas: a lease in MongoDB.

    {_id: name, holder, until}

The leader renews well before `until`; if it dies, another replica takes the
lease once `until` has passed. Times are the replicas' own clocks, so the TTL
must dwarf the clock skew NTP allows (seconds vs. milliseconds).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError


class Lease:
    def __init__(
        self,
        collection: AsyncCollection[dict[str, Any]],
        name: str,
        holder: str,
        ttl: timedelta,
    ) -> None:
        self._collection = collection
        self.name = name
        self.holder = holder
        self.ttl = ttl
        self.held = False

    async def try_acquire(self, now: datetime | None = None) -> bool:
        """Take or renew the lease; True while this holder leads."""
        now = now or datetime.now(UTC)
        result = await self._collection.update_one(
            {"_id": self.name, "$or": [{"until": {"$lte": now}}, {"holder": self.holder}]},
            {"$set": {"holder": self.holder, "until": now + self.ttl, "renewed_at": now}},
        )
        if result.matched_count:
            self.held = True
            return True
        # An update, then an insert on a miss, not one upsert: SecantusDB (the
        # fallback where mongod cannot install) mishandled upserts (DESIGN.md).
        # On mongod the two steps are as correct: a lease someone else holds
        # makes the insert fail on `_id`, which is the answer "not leading".
        try:
            await self._collection.insert_one(
                {
                    "_id": self.name,
                    "holder": self.holder,
                    "until": now + self.ttl,
                    "renewed_at": now,
                }
            )
            self.held = True
        except DuplicateKeyError:
            self.held = False
        return self.held

    async def release(self) -> None:
        """Give the lease up at once (clean shutdown), so a standby takes over now."""
        if self.held:
            await self._collection.update_one(
                {"_id": self.name, "holder": self.holder},
                {"$set": {"until": datetime(1970, 1, 1, tzinfo=UTC)}},
            )
            self.held = False
