"""`exposure_history`: one document per event (`_id` = event id), written from the
outbox before the event is published, kept for `RECON_HISTORY_RETENTION_SECONDS` by
a TTL index on `time` (created, and changed when the retention changes, by
`adapters.migrations`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReplaceOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from recon_stream.adapters.collections import HISTORY
from recon_stream.domain.exposures import ExposureEvent

Document = dict[str, Any]


async def ensure_indexes(db: AsyncDatabase[Document]) -> list[str]:
    return [
        await db[HISTORY].create_index(
            [("organization_id", ASCENDING), ("time", DESCENDING)], name="org_time"
        )
    ]


class History:
    """Every change applied to organizations' exposures."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._collection: AsyncCollection[Document] = db[HISTORY]

    async def record(self, events: Sequence[ExposureEvent]) -> None:
        """Keep each event's entry (idempotent by event id)."""
        if not events:
            return
        await self._collection.bulk_write(
            [ReplaceOne({"_id": event.id}, _history_doc(event), upsert=True) for event in events],
            ordered=False,
        )

    async def entries(
        self,
        organization_id: str,
        ip: str | None = None,
        port: int | None = None,
        limit: int = 1000,
    ) -> list[Document]:
        """The org's history entries, newest first."""
        query: Document = {"organization_id": organization_id}
        if ip is not None:
            query["ip"] = ip
        if port is not None:
            query["port"] = port
        cursor = self._collection.find(
            query, sort=[("time", DESCENDING), ("_id", ASCENDING)], limit=limit
        )
        return [doc async for doc in cursor]


def _history_doc(event: ExposureEvent) -> Document:
    data = event.data
    # Who accepted and why: the acceptance in force, or, when it was taken back, expired
    # or lapsed, the one before; kept here so the decision outlives the acceptance.
    decided = data.acceptance or (
        data.previous_acceptance if "accepted" in data.changed_fields else None
    )
    return {
        "organization_id": data.organization_id,
        "ip": data.ip,
        "transport": data.transport,
        "port": data.port,
        "time": event.time,
        "change": data.change.value,
        "reason": data.reason.value if data.reason is not None else None,
        "changed_fields": list(data.changed_fields),
        "severity": data.severity.value,
        "accepted": data.accepted,
        "requested_by": decided.requested_by if decided is not None else None,
        "acceptance_reason": decided.reason if decided is not None else None,
        "event_id": event.id,
        "service": data.service.model_dump(mode="json"),
    }
