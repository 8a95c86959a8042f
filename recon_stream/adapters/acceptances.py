"""`acceptances`: one document per accepted (organization, IP or every IP `*`,
transport, port), replaced by a newer `accept`, deleted by `unaccept` or, once
applied to the snapshots, by expiry.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from datetime import datetime
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from recon_stream.adapters.collections import ACCEPTANCES
from recon_stream.adapters.mongo import aware, delete_organization
from recon_stream.domain.acceptance import Acceptance

Document = dict[str, Any]


async def ensure_indexes(db: AsyncDatabase[Document]) -> list[str]:
    return [
        await db[ACCEPTANCES].create_index(
            [("organization_id", ASCENDING), ("ip", ASCENDING)], name="org_ip"
        ),
        await db[ACCEPTANCES].create_index([("expires_at", ASCENDING)], name="expires_at"),
    ]


class Acceptances:
    """The acceptances on record."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._collection: AsyncCollection[Document] = db[ACCEPTANCES]

    async def forget_organization(self, organization_id: str) -> int:
        """Delete the organization's acceptances; how many."""
        return await delete_organization(self._collection, organization_id)

    async def accept(self, acceptance: Acceptance, command_id: str) -> None:
        """Put `acceptance` on record, replacing any for the same exposure and scope."""
        await self._collection.replace_one(
            {"_id": acceptance_id(acceptance.organization_id, acceptance.ip, acceptance)},
            {**acceptance_doc(acceptance), "command_id": command_id},
            upsert=True,
        )

    async def keep(self, acceptance: Acceptance) -> None:
        """Put `acceptance` on record unless one is there already (migrations)."""
        await self._collection.update_one(
            {"_id": acceptance_id(acceptance.organization_id, acceptance.ip, acceptance)},
            {"$setOnInsert": acceptance_doc(acceptance)},
            upsert=True,
        )

    async def unaccept(
        self, organization_id: str, ip: str | None, transport: str, port: int
    ) -> bool:
        """Take an acceptance back; False when there was none."""
        result = await self._collection.delete_one(
            {"_id": acceptance_id(organization_id, ip, (transport, port))}
        )
        return result.deleted_count > 0

    async def acceptances(self, organization_id: str, ip: str | None = None) -> list[Acceptance]:
        """The org's acceptances (those for `ip` and the organization-wide ones, if given)."""
        query: Document = {"organization_id": organization_id}
        if ip is not None:
            query["ip"] = {"$in": [ip, None]}
        return [_acceptance_of(doc) async for doc in self._collection.find(query)]

    async def acceptances_of(
        self, pairs: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], list[Acceptance]]:
        """For each (organization, IP), what `acceptances(organization_id, ip)` returns:
        one query for all the organizations (few acceptances each), sorted out here."""
        by_org: dict[str, list[Acceptance]] = {org: [] for org, _ in pairs}
        if by_org:
            cursor = self._collection.find({"organization_id": {"$in": sorted(by_org)}})
            async for doc in cursor:
                by_org[doc["organization_id"]].append(_acceptance_of(doc))
        return {(org, ip): [a for a in by_org[org] if a.ip in (ip, None)] for org, ip in pairs}

    async def expired_acceptances(self, now: datetime, limit: int = 100) -> list[Acceptance]:
        cursor = self._collection.find({"expires_at": {"$lte": now}}, limit=limit)
        return [_acceptance_of(doc) async for doc in cursor]

    async def forget_acceptance(self, acceptance: Acceptance) -> None:
        """Delete an expired acceptance (only if it was not replaced meanwhile)."""
        await self._collection.delete_one(
            {
                "_id": acceptance_id(acceptance.organization_id, acceptance.ip, acceptance),
                "accepted_at": acceptance.accepted_at,
                "expires_at": acceptance.expires_at,
            }
        )


def acceptance_id(organization_id: str, ip: str | None, key: Any) -> str:
    transport, port = (key.transport, key.port) if isinstance(key, Acceptance) else key
    return json.dumps([organization_id, ip or "*", transport, int(port)])


def acceptance_doc(acceptance: Acceptance) -> Document:
    return {
        "organization_id": acceptance.organization_id,
        "ip": acceptance.ip,
        "transport": acceptance.transport,
        "port": acceptance.port,
        "reason": acceptance.reason,
        "requested_by": acceptance.requested_by,
        "accepted_at": acceptance.accepted_at,
        "expires_at": acceptance.expires_at,
    }


def _acceptance_of(doc: Document) -> Acceptance:
    return Acceptance(
        organization_id=doc["organization_id"],
        ip=doc.get("ip"),
        transport=doc["transport"],
        port=int(doc["port"]),
        reason=doc["reason"],
        requested_by=doc["requested_by"],
        accepted_at=aware(doc["accepted_at"]),
        expires_at=aware(doc["expires_at"]) if doc.get("expires_at") else None,
    )
