"""`ip_scans` (one lookup per IP), `exposures` (one snapshot per org and IP), `acceptances`,
`exposure_history`.

`exposures` document:

    {organization_id, ip, version, status: active|retired, last_queried, provider, sample,
     hostnames, candidate_agents, site_ids,
     services: [{transport, port, service: {...}, first_seen, last_seen, severity,
                 acceptance: {reason, requested_by, accepted_at, expires_at} | null}],
     pending: [<CloudEvent>, ...],                     # the outbox of events
     pending_state: [{key, version, row | null}, ...]} # the outbox of state rows

A lookup, a retirement or a change of acceptance is applied to a snapshot in ONE
conditional update (`version` must be unchanged) that also appends the resulting
events and state rows to the outboxes; they are published afterwards (history
first, then events, then state rows) and pulled by id. A crash in between leaves
them pending and the relay publishes them, with the ids they were stored with.

`acceptances`: one document per accepted (organization, IP or every IP `*`,
transport, port), replaced by a newer `accept`, deleted by `unaccept` or, once
applied to the snapshots, by expiry. `exposure_history`: one document per event
(`_id` = event id), written from the outbox before the event is published, kept
for `RECON_HISTORY_RETENTION_SECONDS` by a TTL index on `time`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReplaceOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, OperationFailure

from recon_stream.adapters.mongo import ORG_IPS
from recon_stream.adapters.vuln_feeds import VulnFeeds
from recon_stream.domain.acceptance import Acceptance, AcceptanceInfo, acceptance_for
from recon_stream.domain.exposures import (
    Assessor,
    Change,
    ExposureEvent,
    ExposureKey,
    ExposureState,
    Sighting,
    acceptance_changes,
    build_events,
    build_state,
    diff,
    retire,
    severity_changes,
    snapshot_of,
    state_key,
)
from recon_stream.domain.risk import RiskPolicy, Severity
from recon_stream.domain.scans import HostScan, Service

IP_SCANS = "ip_scans"
EXPOSURES = "exposures"
ACCEPTANCES = "acceptances"
HISTORY = "exposure_history"
Document = dict[str, Any]


async def ensure_indexes(
    db: AsyncDatabase[Document], history_retention: float = 400 * 24 * 3600.0
) -> list[str]:
    names = [
        await db[EXPOSURES].create_index(
            [("organization_id", ASCENDING), ("ip", ASCENDING)], unique=True, name="org_ip_unique"
        ),
        await db[EXPOSURES].create_index([("pending.id", ASCENDING)], name="outbox"),
        await db[IP_SCANS].create_index([("next_scan_at", ASCENDING)], name="next_scan_at"),
        await db[ACCEPTANCES].create_index(
            [("organization_id", ASCENDING), ("ip", ASCENDING)], name="org_ip"
        ),
        await db[ACCEPTANCES].create_index([("expires_at", ASCENDING)], name="expires_at"),
        await db[HISTORY].create_index(
            [("organization_id", ASCENDING), ("time", DESCENDING)], name="org_time"
        ),
    ]
    ttl = max(1, int(history_retention))
    try:
        names.append(
            await db[HISTORY].create_index("time", name="retention", expireAfterSeconds=ttl)
        )
    except OperationFailure:
        # The retention changed since the index was made: change it in place.
        await db.command(
            {"collMod": HISTORY, "index": {"name": "retention", "expireAfterSeconds": ttl}}
        )
        names.append("retention")
    await migrate_accepted_lists(db)
    return names


MIGRATED_REASON = "accepted before acceptances had reasons (migrated from the accepted list)"


async def migrate_accepted_lists(db: AsyncDatabase[Document]) -> int:
    """Turn the hand-edited `accepted: ["tcp/3389", ...]` lists into acceptances.

    Each becomes an acceptance of that port on that IP, without expiry, and the
    snapshot's services carry it, so no event announces a change that is none.
    Idempotent: a migrated document has no `accepted` field any more.
    """
    migrated = 0
    cursor = db[EXPOSURES].find({"accepted": {"$exists": True}})
    async for doc in cursor:
        at = datetime.now(UTC)
        keys = {k for k in doc.get("accepted") or [] if isinstance(k, str) and "/" in k}
        services = doc.get("services", [])
        for text in sorted(keys):
            transport, _, port = text.partition("/")
            acceptance = Acceptance(
                doc["organization_id"],
                doc["ip"],
                transport,
                int(port),
                MIGRATED_REASON,
                "migration",
                at,
                None,
            )
            await db[ACCEPTANCES].update_one(
                {"_id": _acceptance_id(acceptance.organization_id, acceptance.ip, acceptance)},
                {"$setOnInsert": _acceptance_doc(acceptance)},
                upsert=True,
            )
            for entry in services:
                if f"{entry['transport']}/{entry['port']}" == text:
                    entry["acceptance"] = acceptance.info.model_dump(mode="python")
        await db[EXPOSURES].update_one(
            {"_id": doc["_id"], "version": doc.get("version", 0)},
            {"$set": {"services": services}, "$unset": {"accepted": ""}},
        )
        migrated += 1
    return migrated


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


@dataclass(frozen=True, slots=True)
class Outbox:
    """What one update left to publish for one (organization, IP)."""

    organization_id: str
    ip: str
    events: list[ExposureEvent]
    state: list[StateRow]


@dataclass(frozen=True, slots=True)
class StateRow:
    """A state-topic record: key, value (None: tombstone) and the version that wrote it."""

    key: str
    value: ExposureState | None
    version: int


class ExposureStore:
    """Per-(org, IP) snapshots, diffed against lookups and acceptances, with outboxes."""

    def __init__(
        self,
        db: AsyncDatabase[Document],
        *,
        policy: RiskPolicy | None = None,
        stale_after: timedelta = timedelta(days=30),
    ) -> None:
        self._db = db
        self._policy = policy
        self._stale_after = stale_after
        self._feeds = VulnFeeds(db)
        self._collection: AsyncCollection[Document] = db[EXPOSURES]
        self._acceptances: AsyncCollection[Document] = db[ACCEPTANCES]
        self._history: AsyncCollection[Document] = db[HISTORY]

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

    async def reported_ips(self, organization_id: str) -> set[str]:
        """The IPs the org's agents still report from (`org_ips`), scanned or not yet."""
        cursor = self._db[ORG_IPS].find(
            {"organization_id": organization_id, "status": "active"}, {"ip": 1}
        )
        return {doc["ip"] async for doc in cursor}

    async def apply(self, org: OrgContext, scan: HostScan) -> Outbox:
        """Diff `scan` against the org's snapshot and store the result with its outboxes.

        Idempotent: a lookup older than (or as old as) the snapshot changes nothing.
        """
        return await self._update(org.organization_id, scan.ip, _Lookup(org, scan))

    async def retire(self, organization_id: str, ip: str, now: datetime) -> Outbox:
        """Close every open exposure of a pair the org stopped using (reason `ip_retired`)."""
        return await self._update(organization_id, ip, _Retire(now))

    async def reassess(self, organization_id: str, ip: str, now: datetime) -> Outbox:
        """Apply the acceptances in force at `now` to the org's open exposures on `ip`."""
        return await self._update(organization_id, ip, _Reassess(now))

    # -- acceptances ------------------------------------------------------------------

    async def accept(self, acceptance: Acceptance, command_id: str) -> None:
        """Put `acceptance` on record, replacing any for the same exposure and scope."""
        await self._acceptances.replace_one(
            {"_id": _acceptance_id(acceptance.organization_id, acceptance.ip, acceptance)},
            {**_acceptance_doc(acceptance), "command_id": command_id},
            upsert=True,
        )

    async def unaccept(
        self, organization_id: str, ip: str | None, transport: str, port: int
    ) -> bool:
        """Take an acceptance back; False when there was none."""
        result = await self._acceptances.delete_one(
            {"_id": _acceptance_id(organization_id, ip, (transport, port))}
        )
        return result.deleted_count > 0

    async def acceptances(self, organization_id: str, ip: str | None = None) -> list[Acceptance]:
        """The org's acceptances (those for `ip` and the organization-wide ones, if given)."""
        query: Document = {"organization_id": organization_id}
        if ip is not None:
            query["ip"] = {"$in": [ip, None]}
        return [_acceptance_of(doc) async for doc in self._acceptances.find(query)]

    async def expired_acceptances(self, now: datetime, limit: int = 100) -> list[Acceptance]:
        cursor = self._acceptances.find({"expires_at": {"$lte": now}}, limit=limit)
        return [_acceptance_of(doc) async for doc in cursor]

    async def forget_acceptance(self, acceptance: Acceptance) -> None:
        """Delete an expired acceptance (only if it was not replaced meanwhile)."""
        await self._acceptances.delete_one(
            {
                "_id": _acceptance_id(acceptance.organization_id, acceptance.ip, acceptance),
                "accepted_at": acceptance.accepted_at,
                "expires_at": acceptance.expires_at,
            }
        )

    async def ips_of(self, organization_id: str) -> list[str]:
        """The IPs with an active snapshot for the org."""
        cursor = self._collection.find(
            {"organization_id": organization_id, "status": "active"}, {"ip": 1}
        )
        return [doc["ip"] async for doc in cursor]

    # -- the update -------------------------------------------------------------------

    async def _update(self, organization_id: str, ip: str, how: _How) -> Outbox:
        query = {"organization_id": organization_id, "ip": ip}
        nothing = Outbox(organization_id, ip, [], [])
        for _ in range(20):
            doc = await self._collection.find_one(query)
            version = int(doc["version"]) if doc else 0
            stored = doc.get("services", []) if doc else []
            previous: dict[ExposureKey, Service] = {
                _key_of(s): Service.model_validate(s["service"]) for s in stored
            }
            first_seen = {_key_of(s): s["first_seen"] for s in stored}
            last_seen = {_key_of(s): s["last_seen"] for s in stored}
            was = {_key_of(s): _acceptance_info(s.get("acceptance")) for s in stored}
            planned = how.plan(ip, doc, previous)
            if planned is None:
                return nothing
            after, basis, org, changes, at, doc_set = planned
            acceptances = await self.acceptances(organization_id, ip) if after else []
            now_accepted = {
                key: acceptance_for(acceptances, ip, key[0], key[1], at) for key in after
            }
            changes = acceptance_changes(changes, after, was, now_accepted, at)
            cves = {
                cve for service in (*after.values(), *previous.values()) for cve in service.vulns
            }
            judge = Assessor(self._policy, await self._feeds.lookup(cves), self._stale_after)
            agents = (
                org.candidate_agents
                if org
                else tuple(doc.get("candidate_agents", []) if doc else ())
            )
            sites = org.site_ids if org else tuple(doc.get("site_ids", []) if doc else ())
            seen_until = {
                key: (basis.queried_at if isinstance(how, _Lookup) else last_seen[key])
                for key in after
            }
            sightings = {
                key: Sighting(
                    after[key],
                    first_seen.get(key, basis.queried_at),
                    seen_until[key],
                    now_accepted.get(key),
                )
                for key in after
            }
            # The rows assess every open exposure once; their severity is the one stored.
            rows = build_state(
                organization_id,
                ip,
                sightings,
                basis,
                candidate_agents=agents,
                site_ids=sites,
                assessor=judge,
            )
            stored_severity = {_key_of(s): _severity(s.get("severity")) for s in stored}
            now_severity = {key: row.severity for key, row in rows.items()}
            changes = severity_changes(changes, after, stored_severity, now_severity)
            if not changes and not isinstance(how, _Lookup):
                return nothing
            for key in previous.keys() - after.keys():
                now_accepted[key] = was.get(key)  # a closed exposure shows its last state
            events = build_events(
                organization_id,
                ip,
                changes,
                basis,
                version=version,
                candidate_agents=agents,
                site_ids=sites,
                acceptance_by_key=now_accepted,
                first_seen_by_key=first_seen,
                last_seen_by_key=last_seen,
                occurred_at=None if isinstance(how, _Lookup) else at,
                assessor=judge,
            )
            state = [
                StateRow(state_key(organization_id, ip, *key), row, version + 1)
                for key, row in rows.items()
            ] + [
                StateRow(state_key(organization_id, ip, *key), None, version + 1)
                for key in sorted(previous.keys() - after.keys())
            ]
            services = [
                {
                    "transport": key[0],
                    "port": key[1],
                    "service": sighting.service.model_dump(mode="python"),
                    "first_seen": sighting.first_seen,
                    "last_seen": sighting.last_seen,
                    "severity": rows[key].severity.value,
                    "stale": rows[key].stale,
                    "acceptance": (
                        sighting.acceptance.model_dump(mode="python")
                        if sighting.acceptance is not None
                        else None
                    ),
                }
                for key, sighting in sightings.items()
            ]
            pending = [e.model_dump(mode="json") for e in events]
            written = {row.key for row in state}
            kept = [
                entry
                for entry in (doc or {}).get("pending_state", [])
                if entry["key"] not in written
            ]
            update: Document = {
                "$set": {
                    **doc_set,
                    "outbox_at": datetime.now(UTC),
                    "services": services,
                    "pending_state": kept + [_state_doc(row) for row in state],
                },
                "$inc": {"version": 1},
                "$push": {"pending": {"$each": pending}},
            }
            if doc is None:
                try:
                    await self._collection.insert_one(
                        {**query, "version": 1, "pending": pending, **update["$set"]}
                    )
                    return Outbox(organization_id, ip, events, state)
                except DuplicateKeyError:
                    continue  # another scanner created it first: diff against theirs
            result = await self._collection.update_one({**query, "version": version}, update)
            if result.modified_count:
                return Outbox(organization_id, ip, events, state)
        raise RuntimeError(f"snapshot of {organization_id}/{ip} kept changing under us")

    # -- the outboxes -----------------------------------------------------------------

    async def record_history(self, events: Sequence[ExposureEvent]) -> None:
        """Keep each event's entry in `exposure_history` (idempotent by event id)."""
        if not events:
            return
        await self._history.bulk_write(
            [ReplaceOne({"_id": event.id}, _history_doc(event), upsert=True) for event in events],
            ordered=False,
        )

    async def published(
        self, organization_id: str, ip: str, ids: Iterable[str], state: Sequence[StateRow] = ()
    ) -> None:
        pull: Document = {"pending": {"id": {"$in": list(ids)}}}
        if state:
            pull["pending_state"] = {
                "$or": [{"key": row.key, "version": row.version} for row in state]
            }
        await self._collection.update_one(
            {"organization_id": organization_id, "ip": ip}, {"$pull": pull}
        )

    async def unpublished(self, limit: int, written_before: datetime | None = None) -> list[Outbox]:
        """Pairs with events or state rows still in their outboxes (for the relay), only
        those whose last update was before `written_before` when given."""
        query: Document = {
            "$or": [{"pending.0": {"$exists": True}}, {"pending_state.0": {"$exists": True}}]
        }
        if written_before is not None:
            settled = {"$or": [{"outbox_at": {"$lt": written_before}}, {"outbox_at": None}]}
            query = {"$and": [query, settled]}
        cursor = self._collection.find(
            query,
            {"organization_id": 1, "ip": 1, "pending": 1, "pending_state": 1},
            limit=limit,
        )
        return [
            Outbox(
                doc["organization_id"],
                doc["ip"],
                [ExposureEvent.model_validate(e) for e in doc.get("pending", [])],
                [_state_row(entry) for entry in doc.get("pending_state", [])],
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

    async def stale_count(self) -> int:
        """Open exposures whose Shodan observation was stale when last written."""
        rows = await (
            await self._collection.aggregate(
                [
                    {"$match": {"status": "active", "services.stale": True}},
                    {"$unwind": "$services"},
                    {"$match": {"services.stale": True}},
                    {"$count": "n"},
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

    async def history(
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
        cursor = self._history.find(
            query, sort=[("time", DESCENDING), ("_id", ASCENDING)], limit=limit
        )
        return [doc async for doc in cursor]


# What an update does, before the shared diff-acceptance-events-state part.
_Plan = tuple[
    dict[ExposureKey, Service],  # the open exposures after
    HostScan,  # the lookup the rows are built on (a stored one for non-lookups)
    "OrgContext | None",
    list[Change],
    datetime,  # when: acceptance expiry is judged at this time
    Document,  # fields of the document to set
]


class _How:
    def plan(
        self, ip: str, doc: Document | None, previous: dict[ExposureKey, Service]
    ) -> _Plan | None:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class _Lookup(_How):
    org: OrgContext
    scan: HostScan

    def plan(
        self, ip: str, doc: Document | None, previous: dict[ExposureKey, Service]
    ) -> _Plan | None:
        scan, org = self.scan, self.org
        last = doc.get("last_queried") if doc else None
        if last is not None and _aware(last) >= _aware(scan.queried_at):
            return None
        fields: Document = {
            "status": "active",
            "last_queried": scan.queried_at,
            "provider": scan.provider,
            "sample": scan.sample,
            "hostnames": list(scan.hostnames),
            "candidate_agents": list(org.candidate_agents),
            "site_ids": list(org.site_ids),
        }
        now = max(datetime.now(UTC), _aware(scan.queried_at))
        return snapshot_of(scan), scan, org, diff(previous, scan), now, fields


@dataclass(frozen=True, slots=True)
class _Retire(_How):
    at: datetime

    def plan(
        self, ip: str, doc: Document | None, previous: dict[ExposureKey, Service]
    ) -> _Plan | None:
        if doc is None or doc.get("status") == "retired":
            return None
        fields: Document = {"status": "retired", "retired_at": self.at}
        return {}, _stored_basis(doc, ip, self.at), None, retire(previous), self.at, fields


@dataclass(frozen=True, slots=True)
class _Reassess(_How):
    at: datetime

    def plan(
        self, ip: str, doc: Document | None, previous: dict[ExposureKey, Service]
    ) -> _Plan | None:
        if doc is None or doc.get("status") == "retired" or not previous:
            return None
        return previous, _stored_basis(doc, ip, self.at), None, [], self.at, {}


def _stored_basis(doc: Document, ip: str, at: datetime) -> HostScan:
    return HostScan(
        ip=ip,
        provider=doc.get("provider", "api"),
        queried_at=doc.get("last_queried") or at,
        hostnames=tuple(doc.get("hostnames", [])),
        sample=bool(doc.get("sample", False)),
    )


def _severity(value: Any) -> Severity | None:
    return Severity(value) if value in Severity._value2member_map_ else None


def _key_of(entry: Document) -> ExposureKey:
    return (entry["transport"], int(entry["port"]))


def _acceptance_id(organization_id: str, ip: str | None, key: Any) -> str:
    transport, port = (key.transport, key.port) if isinstance(key, Acceptance) else key
    return json.dumps([organization_id, ip or "*", transport, int(port)])


def _acceptance_doc(acceptance: Acceptance) -> Document:
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
        accepted_at=_aware(doc["accepted_at"]),
        expires_at=_aware(doc["expires_at"]) if doc.get("expires_at") else None,
    )


def _acceptance_info(value: Document | None) -> AcceptanceInfo | None:
    return AcceptanceInfo.model_validate(value) if value else None


def _state_doc(row: StateRow) -> Document:
    value = row.value.model_dump(mode="json") if row.value is not None else None
    return {"key": row.key, "version": row.version, "row": value}


def _state_row(entry: Document) -> StateRow:
    value = entry.get("row")
    return StateRow(
        entry["key"],
        ExposureState.model_validate(value) if value is not None else None,
        int(entry["version"]),
    )


def _history_doc(event: ExposureEvent) -> Document:
    data = event.data
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
        "event_id": event.id,
        "service": data.service.model_dump(mode="json"),
    }


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
