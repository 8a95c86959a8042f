"""`ip_scans` (one lookup result per IP) and `exposures` (one snapshot per org and IP).

`exposures` document:

    {organization_id, ip, version, status: active|retired, last_queried, provider, sample,
     services: [{transport, port, service: {...}, first_seen, last_seen}],
     accepted: ["tcp/3389", ...],           # risk accepted by the customer
     pending: [<CloudEvent>, ...]}          # the outbox

A lookup is applied to a snapshot in ONE conditional update (`version` must be
unchanged) that also appends the resulting events to `pending`; the events are
published afterwards and pulled by id. A crash in between leaves them pending
and the relay publishes them, with the ids they were stored with.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from recon_stream.adapters.mongo import ORG_IPS
from recon_stream.domain.exposures import (
    Change,
    ExposureEvent,
    ExposureKey,
    build_events,
    diff,
    retire,
    snapshot_of,
)
from recon_stream.domain.scans import HostScan, Service

IP_SCANS = "ip_scans"
EXPOSURES = "exposures"
Document = dict[str, Any]


async def ensure_indexes(db: AsyncDatabase[Document]) -> list[str]:
    return [
        await db[EXPOSURES].create_index(
            [("organization_id", ASCENDING), ("ip", ASCENDING)], unique=True, name="org_ip_unique"
        ),
        await db[EXPOSURES].create_index([("pending.id", ASCENDING)], name="outbox"),
        await db[IP_SCANS].create_index([("next_scan_at", ASCENDING)], name="next_scan_at"),
    ]


def _key_text(key: ExposureKey) -> str:
    return f"{key[0]}/{key[1]}"


@dataclass(frozen=True, slots=True)
class OrgContext:
    """What an org's own agents told us about an IP (from `org_ips`)."""

    organization_id: str
    candidate_agents: tuple[str, ...]
    site_ids: tuple[str, ...]


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

    async def oldest_query(self) -> datetime | None:
        doc = await self._collection.find_one({}, {"last_queried": 1}, sort=[("last_queried", 1)])
        return doc["last_queried"] if doc else None


class ExposureStore:
    """Per-(org, IP) snapshots, diffed against lookups, with an outbox of events."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._db = db
        self._collection: AsyncCollection[Document] = db[EXPOSURES]

    async def orgs_behind(self, ip: str) -> list[OrgContext]:
        """Every org whose agents report from `ip` and still use it."""
        cursor = self._db[ORG_IPS].find(
            {"ip": ip, "status": "active"}, {"organization_id": 1, "agents": 1, "site_ids": 1}
        )
        return [
            OrgContext(
                doc["organization_id"],
                tuple(a["agent_id"] for a in doc.get("agents", [])),
                tuple(doc.get("site_ids", [])),
            )
            async for doc in cursor
        ]

    async def apply(self, org: OrgContext, scan: HostScan) -> list[ExposureEvent]:
        """Diff `scan` against the org's snapshot and store the result with its events.

        Idempotent: a lookup older than (or as old as) the snapshot changes nothing.
        """
        return await self._update(org.organization_id, scan.ip, scan, org, retiring=False)

    async def retire(self, organization_id: str, ip: str, now: datetime) -> list[ExposureEvent]:
        """Close every open exposure of a pair the org stopped using (reason `ip_retired`)."""
        return await self._update(organization_id, ip, None, None, retiring=True, now=now)

    async def _update(
        self,
        organization_id: str,
        ip: str,
        scan: HostScan | None,
        org: OrgContext | None,
        *,
        retiring: bool,
        now: datetime | None = None,
    ) -> list[ExposureEvent]:
        query = {"organization_id": organization_id, "ip": ip}
        for _ in range(20):
            doc = await self._collection.find_one(query)
            version = int(doc["version"]) if doc else 0
            stored = doc.get("services", []) if doc else []
            previous: dict[ExposureKey, Service] = {
                (s["transport"], int(s["port"])): Service.model_validate(s["service"])
                for s in stored
            }
            first_seen = {(s["transport"], int(s["port"])): s["first_seen"] for s in stored}
            last_seen = {(s["transport"], int(s["port"])): s["last_seen"] for s in stored}
            accepted = {
                (t, int(p)) for t, p in (k.split("/", 1) for k in (doc or {}).get("accepted", []))
            }
            if retiring:
                if doc is None or doc.get("status") == "retired":
                    return []
                at = now or datetime.now(UTC)
                changes: list[Change] = retire(previous)
                basis = HostScan(
                    ip=ip,
                    provider=doc.get("provider", "api"),
                    queried_at=doc.get("last_queried") or at,
                    sample=bool(doc.get("sample", False)),
                )
                events = build_events(
                    organization_id,
                    ip,
                    changes,
                    basis,
                    version=version,
                    candidate_agents=(),
                    site_ids=(),
                    accepted_keys=accepted,
                    first_seen_by_key=first_seen,
                    last_seen_by_key=last_seen,
                    occurred_at=at,
                )
                update: Document = {
                    "$set": {"services": [], "status": "retired", "retired_at": at},
                    "$inc": {"version": 1},
                    "$push": {"pending": {"$each": [e.model_dump(mode="json") for e in events]}},
                }
            else:
                assert scan is not None
                assert org is not None
                last = doc.get("last_queried") if doc else None
                if last is not None and _aware(last) >= _aware(scan.queried_at):
                    return []
                changes = diff(previous, scan)
                events = build_events(
                    organization_id,
                    ip,
                    changes,
                    scan,
                    version=version,
                    candidate_agents=org.candidate_agents,
                    site_ids=org.site_ids,
                    accepted_keys=accepted,
                    first_seen_by_key=first_seen,
                    last_seen_by_key=last_seen,
                )
                services = [
                    {
                        "transport": s.transport,
                        "port": s.port,
                        "service": s.model_dump(mode="python"),
                        "first_seen": first_seen.get(s.key, scan.queried_at),
                        "last_seen": scan.queried_at,
                    }
                    for _, s in sorted(snapshot_of(scan).items())
                ]
                update = {
                    "$set": {
                        "services": services,
                        "status": "active",
                        "last_queried": scan.queried_at,
                        "provider": scan.provider,
                        "sample": scan.sample,
                        "candidate_agents": list(org.candidate_agents),
                        "site_ids": list(org.site_ids),
                    },
                    "$inc": {"version": 1},
                    "$push": {"pending": {"$each": [e.model_dump(mode="json") for e in events]}},
                }
            if doc is None:
                try:
                    await self._collection.insert_one(
                        {
                            **query,
                            "version": 1,
                            "accepted": [],
                            "pending": [e.model_dump(mode="json") for e in events],
                            **update["$set"],
                        }
                    )
                    return events
                except DuplicateKeyError:
                    continue  # another scanner created it first: diff against theirs
            result = await self._collection.update_one({**query, "version": version}, update)
            if result.modified_count:
                return events
        raise RuntimeError(f"snapshot of {organization_id}/{ip} kept changing under us")

    async def published(self, organization_id: str, ip: str, ids: Iterable[str]) -> None:
        await self._collection.update_one(
            {"organization_id": organization_id, "ip": ip},
            {"$pull": {"pending": {"id": {"$in": list(ids)}}}},
        )

    async def unpublished(self, limit: int) -> list[tuple[str, str, list[ExposureEvent]]]:
        """Pairs with events still in their outbox (for the relay)."""
        cursor = self._collection.find(
            {"pending.0": {"$exists": True}},
            {"organization_id": 1, "ip": 1, "pending": 1},
            limit=limit,
        )
        return [
            (
                doc["organization_id"],
                doc["ip"],
                [ExposureEvent.model_validate(e) for e in doc["pending"]],
            )
            async for doc in cursor
        ]

    async def outbox_size(self) -> int:
        rows = await (
            await self._collection.aggregate(
                [
                    {"$match": {"pending.0": {"$exists": True}}},
                    {"$group": {"_id": None, "n": {"$sum": {"$size": "$pending"}}}},
                ]
            )
        ).to_list()
        return int(rows[0]["n"]) if rows else 0

    async def table(self, organization_id: str) -> list[Document]:
        """The org's open exposures, for `recon-stream exposures`."""
        cursor = self._collection.find(
            {"organization_id": organization_id}, sort=[("ip", ASCENDING)]
        )
        return [doc async for doc in cursor]


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
