"""`ip_scans`: the latest lookup per IP, shared by every organization behind it.

    {_id: ip, scan: <HostScan>, last_queried, next_scan_at, provider}

`next_scan_at` is when the scheduler asks for the IP's next routine lookup: a
rescan interval after the lookup, with ±10% jitter.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from recon_stream.adapters.collections import IP_SCANS
from recon_stream.domain.scans import HostScan

Document = dict[str, Any]
_AGE_BATCH = 200


async def ensure_indexes(db: AsyncDatabase[Document]) -> list[str]:
    return [
        await db[IP_SCANS].create_index([("next_scan_at", ASCENDING)], name="next_scan_at"),
        await db[IP_SCANS].create_index([("last_queried", ASCENDING)], name="last_queried"),
    ]


class IpScans:
    """The latest lookup per IP, shared by every organization behind it."""

    def __init__(self, db: AsyncDatabase[Document], rescan_interval: float) -> None:
        self._collection: AsyncCollection[Document] = db[IP_SCANS]
        self._rescan = rescan_interval

    @property
    def rescan_interval(self) -> float:
        """Seconds between lookups of one IP (before jitter)."""
        return self._rescan

    async def get(self, ip: str) -> HostScan | None:
        doc = await self._collection.find_one({"_id": ip})
        return HostScan.model_validate(doc["scan"]) if doc else None

    async def put(self, scan: HostScan) -> None:
        # Jitter spreads rescans of IPs first seen together over time.
        next_scan = scan.queried_at + timedelta(
            seconds=self._rescan * random.uniform(0.9, 1.1)  # noqa: S311
        )
        await self._collection.update_one(
            {"_id": scan.ip},
            {
                "$set": {
                    "scan": scan.model_dump(mode="python"),
                    "last_queried": scan.queried_at,
                    "next_scan_at": next_scan,
                    "provider": scan.provider,
                }
            },
            upsert=True,
        )

    async def due(self, now: datetime, limit: int) -> list[str]:
        cursor = self._collection.find(
            {"next_scan_at": {"$lte": now}}, {"_id": 1}, sort=[("next_scan_at", 1)], limit=limit
        )
        return [doc["_id"] async for doc in cursor]

    async def postpone(self, ips: Sequence[str], until: datetime) -> None:
        await self._collection.update_many(
            {"_id": {"$in": list(ips)}}, {"$set": {"next_scan_at": until}}
        )

    async def lookups(self, ips: Sequence[str]) -> dict[str, Document]:
        """`last_queried` and `next_scan_at` of those of `ips` looked up (`recon-stream ips`)."""
        cursor = self._collection.find(
            {"_id": {"$in": list(ips)}}, {"last_queried": 1, "next_scan_at": 1}
        )
        return {doc["_id"]: doc async for doc in cursor}

    async def oldest_query(
        self, in_use: Callable[[Sequence[str]], Awaitable[set[str]]] | None = None
    ) -> datetime | None:
        """When the least recently looked-up IP was looked up; with `in_use` (which of
        these IPs does some organization still use?), among IPs in use only: a retired
        IP's old lookup is nobody's stale data."""
        cursor = self._collection.find({}, {"last_queried": 1}, sort=[("last_queried", 1)])
        batch: list[Document] = []
        async for doc in cursor:
            batch.append(doc)
            if in_use is None:
                return _query_time(doc)
            if len(batch) == _AGE_BATCH:
                if (found := await _first_used(batch, in_use)) is not None:
                    return found
                batch = []
        return await _first_used(batch, in_use) if batch and in_use is not None else None


async def _first_used(
    docs: list[Document], in_use: Callable[[Sequence[str]], Awaitable[set[str]]]
) -> datetime | None:
    used = await in_use([doc["_id"] for doc in docs])
    return next((_query_time(doc) for doc in docs if doc["_id"] in used), None)


def _query_time(doc: Document) -> datetime | None:
    value = doc.get("last_queried")
    return value if isinstance(value, datetime) else None
