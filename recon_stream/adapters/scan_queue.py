"""`scan_queue`: the durable, de-duplicated, prioritized work list of the scanner.

The scanner's Kafka consumer only moves scan requests in here (one document per
IP, however many organizations asked) and commits; lookup loops on every
replica then claim the most urgent IP: new IPs first, then manual rescans, then
routine rescans, oldest first within each, whatever order Kafka delivered them in. So
an organization-wide rescan (a manual request per IP) never holds up another
organization's new IPs, and the scheduler's routine rescans never hold up either.

    {_id: ip, priority: 0 (new) | 1 (manual) | 2 (rescan), requested_at, orgs: [...],
     reasons: [...], seq, attempts, not_before, claim_until,
     traces: [{traceparent, tracestate}, ...],
     last_error: {message, at},    # why the last lookup failed, when it was recorded
     scan: {id, submitted_at, status},   # a manual rescan's on-demand scan, polled
     scan_tried: true}             # a scan was asked for (or refused): never again

`seq` grows with every request for the IP; a finished lookup deletes the item
only if no request arrived meanwhile, otherwise releases it to run again.
`traces` keeps the W3C trace context of the first few traced requests, so the
lookup continues their traces (see `recon_stream.tracing`). While an on-demand scan
runs, the item waits (`not_before`) between polls, claimed by nobody: a crash loses
nothing, and whichever replica claims it next polls on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, ReturnDocument, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from recon_stream.adapters.collections import SCAN_QUEUE
from recon_stream.domain.scan_requests import ScanReason, ScanRequest
from recon_stream.domain.scans import ScanRecord

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PRIORITY = {ScanReason.NEW: 0, ScanReason.MANUAL: 1, ScanReason.RESCAN: 2}
"""The most urgent reason an item holds wins (`$min`). Items queued before manual
rescans had a priority of their own (0 new or manual, 1 routine rescan) keep their
number until their lookup completes: an old routine rescan then ranks as a manual one
(still after every new IP), an old manual one as a new IP. Both are transient, last
at most one pass of the queue, and need no migration."""
MAX_ORGS = 1000
MAX_TRACES = 8
MAX_ERROR = 500


@dataclass(frozen=True, slots=True)
class QueueItem:
    ip: str
    priority: int
    seq: int
    attempts: int
    reasons: tuple[str, ...]
    orgs: tuple[str, ...]
    claim_until: datetime
    traces: tuple[dict[str, str], ...] = ()
    requested_at: datetime | None = None
    """When the oldest request the item holds was made."""
    scan: ScanRecord | None = None
    """The on-demand scan submitted for it, while it runs."""
    scan_tried: bool = False
    """A scan was submitted or refused for the requests it holds: none is asked again."""

    @property
    def manual(self) -> bool:
        """Someone asked for this IP (a `rescan` command), not the schedule."""
        return ScanReason.MANUAL.value in self.reasons

    @property
    def forced(self) -> bool:
        """A rescan or manual request wants a fresh lookup, not a stored result."""
        return any(r != ScanReason.NEW.value for r in self.reasons)


async def ensure_indexes(db: AsyncDatabase[dict[str, Any]]) -> list[str]:
    return [
        await db[SCAN_QUEUE].create_index(
            [("priority", ASCENDING), ("requested_at", ASCENDING)], name="priority_order"
        ),
        await db[SCAN_QUEUE].create_index([("claim_until", ASCENDING)], name="claim_until"),
    ]


class ScanQueue:
    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self._collection: AsyncCollection[dict[str, Any]] = db[SCAN_QUEUE]

    async def enqueue(
        self, requests: Sequence[ScanRequest], traces: Sequence[Mapping[str, str]] = ()
    ) -> int:
        """Add requests (idempotent per org and reason); returns documents touched.

        `traces[i]`, when given and not empty, is request i's W3C trace context.
        """
        if not requests:
            return 0
        ops = []
        for i, r in enumerate(requests):
            update: dict[str, Any] = {
                "$min": {"priority": PRIORITY[r.reason], "requested_at": r.requested_at},
                "$addToSet": {"orgs": r.organization_id, "reasons": r.reason.value},
                "$inc": {"seq": 1},
                "$setOnInsert": {"attempts": 0, "not_before": EPOCH, "claim_until": EPOCH},
            }
            if r.reason is ScanReason.MANUAL:
                # Someone asked for it now: not after a backoff or a permanent error's wait.
                del update["$setOnInsert"]["not_before"]
                update["$set"] = {"not_before": EPOCH}
            if i < len(traces) and traces[i]:
                update["$push"] = {"traces": {"$each": [dict(traces[i])], "$slice": MAX_TRACES}}
            ops.append(UpdateOne({"_id": r.ip}, update, upsert=True))
        result = await self._collection.bulk_write(ops, ordered=False)
        return result.upserted_count + result.matched_count

    async def pending_manual(self, ips: Sequence[str]) -> set[str]:
        """Those of `ips` with a manual request waiting (not yet claimed by a lookup)."""
        cursor = self._collection.find(
            {
                "_id": {"$in": list(ips)},
                "reasons": ScanReason.MANUAL.value,
                "claim_until": {"$lte": datetime.now(UTC)},
            },
            {"_id": 1},
        )
        return {doc["_id"] async for doc in cursor}

    async def claim(self, lease: timedelta, now: datetime | None = None) -> QueueItem | None:
        """Claim the most urgent item that is due and not claimed by anyone alive."""
        now = now or datetime.now(UTC)
        doc = await self._collection.find_one_and_update(
            {"claim_until": {"$lte": now}, "not_before": {"$lte": now}},
            {"$set": {"claim_until": now + lease}},
            sort=[("priority", ASCENDING), ("requested_at", ASCENDING)],
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            return None
        return QueueItem(
            ip=doc["_id"],
            priority=int(doc["priority"]),
            seq=int(doc["seq"]),
            attempts=int(doc.get("attempts", 0)),
            reasons=tuple(doc.get("reasons", ())),
            orgs=tuple(doc.get("orgs", ())[:MAX_ORGS]),
            claim_until=doc["claim_until"],
            traces=tuple(doc.get("traces", ())),
            requested_at=doc.get("requested_at"),
            scan=ScanRecord.model_validate(doc["scan"]) if doc.get("scan") else None,
            scan_tried=bool(doc.get("scan_tried", False)),
        )

    async def complete(self, item: QueueItem) -> bool:
        """Remove the item if nothing new arrived for it; else release it. True if removed."""
        result = await self._collection.delete_one({"_id": item.ip, "seq": item.seq})
        if result.deleted_count:
            return True
        # New requests arrived while we worked: they run again (cheaply, from
        # the stored result) as plain "new" work.
        await self._collection.update_one(
            {"_id": item.ip},
            {
                "$set": {"claim_until": EPOCH, "attempts": 0, "reasons": [ScanReason.NEW.value]},
                "$pullAll": {"orgs": list(item.orgs)},
                "$unset": {"scan": "", "scan_tried": ""},
            },
        )
        return False

    async def scan_tried(self, item: QueueItem, scan: ScanRecord | None) -> QueueItem:
        """Record that a scan was asked for the item (`scan`), or refused (None)."""
        fields: dict[str, Any] = {"scan_tried": True}
        if scan is not None:
            fields["scan"] = scan.model_dump(mode="python")
        await self._collection.update_one({"_id": item.ip}, {"$set": fields})
        return replace(item, scan=scan, scan_tried=True)

    async def poll_later(
        self, item: QueueItem, scan: ScanRecord, delay: float, now: datetime | None = None
    ) -> None:
        """Give the item back while its scan runs: due again (for a poll) after `delay`."""
        now = now or datetime.now(UTC)
        await self._collection.update_one(
            {"_id": item.ip},
            {
                "$set": {
                    "scan": scan.model_dump(mode="python"),
                    "scan_tried": True,
                    "claim_until": EPOCH,
                    "not_before": now + timedelta(seconds=delay),
                }
            },
        )

    async def retry_later(
        self,
        item: QueueItem,
        delay: float,
        now: datetime | None = None,
        *,
        error: str | None = None,
    ) -> None:
        """Give the item back, due again after `delay` seconds; `error` (already free of
        secrets) is kept on the item as `last_error`."""
        now = now or datetime.now(UTC)
        fields: dict[str, Any] = {
            "claim_until": EPOCH,
            "not_before": now + timedelta(seconds=delay),
        }
        if error is not None:
            fields["last_error"] = {"message": error[:MAX_ERROR], "at": now}
        await self._collection.update_one(
            {"_id": item.ip}, {"$set": fields, "$inc": {"attempts": 1}}
        )

    async def release(self, item: QueueItem) -> None:
        """Give the item back at once (shutdown, paused provider)."""
        await self._collection.update_one({"_id": item.ip}, {"$set": {"claim_until": EPOCH}})

    async def items_of(self, ips: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The queued items of those of `ips` waiting for a lookup: `last_error`,
        `not_before`, `requested_at` (`recon-stream ips`)."""
        cursor = self._collection.find(
            {"_id": {"$in": list(ips)}}, {"last_error": 1, "not_before": 1, "requested_at": 1}
        )
        return {doc["_id"]: doc async for doc in cursor}

    async def depth(self) -> dict[int, int]:
        """Items waiting, by priority."""
        counts: dict[int, int] = {}
        async for row in await self._collection.aggregate(
            [{"$group": {"_id": "$priority", "n": {"$sum": 1}}}]
        ):
            counts[int(row["_id"])] = int(row["n"])
        return counts
