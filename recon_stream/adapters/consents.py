"""`verification_consents`: one document per organization, its consent to TCP
verification as on record.

    {_id: organization_id, organization_id, enabled, requested_by, reason,
     at (when decided: the command's requested_at), command_id,
     newest_at, newest_command_id (the newest command seen for the org, applied or not),
     updated_at}

`set` reads the document, lets `domain.verification_consent.decide_consent` decide,
and writes only if the document is still as read (compare-and-swap on the newest
command; a first insert that collides with another writer's is read again), so two
replicas applying the same organization's commands during a rebalance never store an
older decision over a newer one. `_id` is the organization, so `get` and
`enabled_orgs` need no index of their own.
"""

from __future__ import annotations

import builtins
import dataclasses
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from recon_stream.adapters.collections import VERIFICATION_CONSENTS
from recon_stream.adapters.mongo import aware, delete_organization
from recon_stream.domain.verification_consent import Consent, ConsentChange, decide_consent

Document = dict[str, Any]


class MongoConsents:
    """Organizations' consents to TCP verification."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._collection: AsyncCollection[Document] = db[VERIFICATION_CONSENTS]

    async def forget_organization(self, organization_id: str) -> int:
        """Delete the organization's verification consent; how many."""
        return await delete_organization(self._collection, organization_id)

    async def set(self, consent: Consent) -> ConsentChange:
        """Store `consent` if it changes what is on record and no newer command was
        applied; idempotent by `consent.command_id`."""
        # MongoDB keeps milliseconds: compare what it will store, not what was sent.
        wanted = _stored_precision(consent)
        while True:
            doc = await self._collection.find_one({"_id": wanted.organization_id})
            stored = _consent_of(doc) if doc is not None else None
            newest = _newest_of(doc) if doc is not None else None
            change = decide_consent(stored, newest, wanted)
            if change in (ConsentChange.REPEATED, ConsentChange.OUTDATED):
                return change
            fields: Document = {
                "newest_at": wanted.at,
                "newest_command_id": wanted.command_id,
                "updated_at": datetime.now(UTC),
            }
            if change is ConsentChange.CHANGED:
                fields.update(_consent_doc(wanted))
            if doc is None:
                try:
                    await self._collection.insert_one({"_id": wanted.organization_id, **fields})
                except DuplicateKeyError:
                    continue  # another writer stored the first one: decide again
                return change
            result = await self._collection.update_one(
                {
                    "_id": wanted.organization_id,
                    "newest_at": doc.get("newest_at"),
                    "newest_command_id": doc.get("newest_command_id"),
                },
                {"$set": fields},
            )
            if result.matched_count:
                return change

    async def get(self, organization_id: str) -> Consent | None:
        """The organization's consent on record; None when it was never set."""
        doc = await self._collection.find_one({"_id": organization_id})
        return _consent_of(doc) if doc is not None else None

    async def enabled_orgs(self, organization_ids: Iterable[str]) -> builtins.set[str]:
        """Those of `organization_ids` whose consent is on record as enabled (one query)."""
        wanted = sorted(set(organization_ids))
        if not wanted:
            return set()
        cursor = self._collection.find({"_id": {"$in": wanted}, "enabled": True}, {"_id": 1})
        return {doc["_id"] async for doc in cursor}


def _consent_doc(consent: Consent) -> Document:
    return {
        "organization_id": consent.organization_id,
        "enabled": consent.enabled,
        "requested_by": consent.requested_by,
        "reason": consent.reason,
        "at": consent.at,
        "command_id": consent.command_id,
    }


def _consent_of(doc: Document) -> Consent | None:
    if "enabled" not in doc:
        return None
    return Consent(
        organization_id=doc["organization_id"],
        enabled=bool(doc["enabled"]),
        requested_by=doc["requested_by"],
        reason=doc["reason"],
        at=aware(doc["at"]),
        command_id=doc["command_id"],
    )


def _newest_of(doc: Document) -> tuple[datetime, str] | None:
    if doc.get("newest_at") is None:
        return None
    return (aware(doc["newest_at"]), str(doc["newest_command_id"]))


def _stored_precision(consent: Consent) -> Consent:
    at = consent.at.astimezone(UTC)
    return dataclasses.replace(consent, at=at.replace(microsecond=at.microsecond // 1000 * 1000))
