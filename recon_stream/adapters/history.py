"""`exposure_history`: one document per event (`_id` = event id), written from the
outbox before the event is published, kept for `RECON_HISTORY_RETENTION_SECONDS` by
a TTL index on `time` (created, and changed when the retention changes, by
`adapters.migrations`).

An organization's verification consent changes are entries too (`_id` =
`verification:<command id>`), about no single exposure: `ip` and `port` are `*`,
`change` is `verification`, `reason` `enabled` or `disabled`, with who and why.
So are dismissals (`_id` = `dismiss:`, `undismiss:` or `dismissal_expired:` and a command
id): `ip` is the IP, `port` `*`, `change` `dismissal`, `reason` `dismissed`,
`undismissed` or `dismissal_expired`, with who and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReplaceOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from recon_stream.adapters.collections import HISTORY
from recon_stream.adapters.mongo import delete_organization
from recon_stream.domain.exposures import ExposureEvent
from recon_stream.domain.pairs import DismissalEntry
from recon_stream.domain.verification_consent import Consent

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

    async def forget_organization(self, organization_id: str) -> int:
        """Delete the organization's history entries; how many."""
        return await delete_organization(self._collection, organization_id)

    async def record(self, events: Sequence[ExposureEvent]) -> None:
        """Keep each event's entry (idempotent by event id)."""
        if not events:
            return
        await self._collection.bulk_write(
            [ReplaceOne({"_id": event.id}, _history_doc(event), upsert=True) for event in events],
            ordered=False,
        )

    async def record_consent(self, consent: Consent) -> None:
        """Keep the entry of a consent change (idempotent by its command id)."""
        entry_id = f"verification:{consent.command_id}"
        await self._collection.replace_one(
            {"_id": entry_id}, _consent_doc(consent, entry_id), upsert=True
        )

    async def record_dismissal(self, entry: DismissalEntry) -> None:
        """Keep a dismissal's start or end (idempotent by the entry's id)."""
        await self._collection.replace_one(
            {"_id": entry.entry_id}, _dismissal_doc(entry), upsert=True
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
        "scan": data.scan.model_dump(mode="python") if data.scan is not None else None,
        "verification": (
            data.verification.model_dump(mode="python") if data.verification is not None else None
        ),
    }


def _decision_doc(
    entry_id: str,
    organization_id: str,
    ip: str,
    at: datetime,
    change: str,
    reason: str,
    requested_by: str,
    why: str | None,
) -> Document:
    # A decision about no single exposure (consent, dismissal): the same fields as an
    # exposure's entry, so `recon-stream history` lists it with them.
    return {
        "organization_id": organization_id,
        "ip": ip,
        "transport": "tcp",
        "port": "*",
        "time": at,
        "change": change,
        "reason": reason,
        "changed_fields": [],
        "severity": "",
        "accepted": False,
        "requested_by": requested_by,
        "acceptance_reason": why,
        "event_id": entry_id,
        "service": {},
        "scan": None,
        "verification": None,
    }


def _consent_doc(consent: Consent, entry_id: str) -> Document:
    reason = "enabled" if consent.enabled else "disabled"
    return _decision_doc(
        entry_id,
        consent.organization_id,
        "*",
        consent.at,
        "verification",
        reason,
        consent.requested_by,
        consent.reason,
    )


def _dismissal_doc(entry: DismissalEntry) -> Document:
    return _decision_doc(
        entry.entry_id,
        entry.organization_id,
        entry.ip,
        entry.at,
        "dismissal",
        entry.change.value,
        entry.requested_by,
        entry.why,
    )
