"""`exposures`: one snapshot per (organization, IP), with its outboxes.

    {organization_id, ip, version, status: active|retired, last_queried, provider, sample,
     hostnames, candidate_agents, site_ids, retired_at,
     services: [{transport, port, service: {...}, first_seen, last_seen, severity, stale,
                 acceptance: {reason, requested_by, accepted_at, expires_at} | null}],
     pending: [<CloudEvent>, ...],                     # the outbox of events
     pending_state: [{key, version, row | null}, ...], # the outbox of state rows
     outbox_at}                                        # when the outboxes were last written

What changes is decided in `domain.snapshot`; this module only loads a snapshot,
stores a decided update in ONE conditional write (`version` must be unchanged) that
also appends its events and state rows to the outboxes, and pulls and lists what is
left in outboxes. A crash between the write and the publish leaves them pending; the
relay publishes them with the ids they were stored with.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from recon_stream.adapters.collections import EXPOSURES
from recon_stream.adapters.mongo import delete_organization
from recon_stream.domain.acceptance import AcceptanceInfo
from recon_stream.domain.exposures import ExposureEvent, ExposureKey, ExposureState
from recon_stream.domain.risk import Severity
from recon_stream.domain.scans import ScanRecord, Service
from recon_stream.domain.snapshot import OpenExposure, Outbox, Snapshot, StateRow, Update
from recon_stream.domain.verification import VerificationInfo

Document = dict[str, Any]


async def ensure_indexes(db: AsyncDatabase[Document]) -> list[str]:
    return [
        await db[EXPOSURES].create_index(
            [("organization_id", ASCENDING), ("ip", ASCENDING)], unique=True, name="org_ip_unique"
        ),
        await db[EXPOSURES].create_index([("pending.id", ASCENDING)], name="outbox"),
        # Re-rating after a KEV or EPSS change: which snapshots carry a CVE (`carrying`).
        await db[EXPOSURES].create_index([("services.service.vulns", ASCENDING)], name="vulns"),
    ]


class MongoSnapshots:
    """Snapshots and their outboxes on the `exposures` collection."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._collection: AsyncCollection[Document] = db[EXPOSURES]

    async def forget_organization(self, organization_id: str) -> int:
        """Delete the organization's snapshots (`purge` closes them first); how many."""
        return await delete_organization(self._collection, organization_id)

    # -- snapshots --------------------------------------------------------------------

    async def load(self, organization_id: str, ip: str) -> Snapshot:
        doc = await self._collection.find_one({"organization_id": organization_id, "ip": ip})
        return snapshot_of(organization_id, ip, doc)

    async def swap(self, update: Update) -> bool:
        before, after = update.before, update.after
        query = {"organization_id": before.organization_id, "ip": before.ip}
        pending = [e.model_dump(mode="json") for e in update.events]
        fields = {**_fields_of(after), "outbox_at": datetime.now(UTC)}
        if not before.stored:
            try:
                await self._collection.insert_one(
                    {
                        **query,
                        **fields,
                        "version": 1,
                        "pending": pending,
                        "pending_state": [_state_doc(row) for row in update.state],
                    }
                )
                return True
            except DuplicateKeyError:
                return False  # another scanner created it first: decide against theirs
        # A state row replaces any still pending for the same key: the topic only needs
        # the latest. Read-modify-write is safe: the version guards the whole document.
        doc = await self._collection.find_one(
            {**query, "version": before.version}, {"pending_state": 1}
        )
        if doc is None:
            return False
        written = {row.key for row in update.state}
        kept = [e for e in doc.get("pending_state", []) if e["key"] not in written]
        result = await self._collection.update_one(
            {**query, "version": before.version},
            {
                "$set": {**fields, "pending_state": kept + [_state_doc(r) for r in update.state]},
                "$inc": {"version": 1},
                "$push": {"pending": {"$each": pending}},
            },
        )
        return bool(result.modified_count)

    async def ips_of(self, organization_id: str) -> list[str]:
        """The IPs with an active snapshot for the org."""
        cursor = self._collection.find(
            {"organization_id": organization_id, "status": "active"}, {"ip": 1}
        )
        return [doc["ip"] async for doc in cursor]

    async def carrying(self, cves: Collection[str]) -> AsyncIterator[tuple[str, str]]:
        """The (organization, IP) of every active snapshot with an open exposure carrying
        one of `cves`, each once (an index scan with `$in` returns a document once)."""
        if not cves:
            return
        cursor = self._collection.find(
            {"services.service.vulns": {"$in": sorted(cves)}, "status": "active"},
            {"organization_id": 1, "ip": 1, "_id": 0},
            batch_size=1000,
        )
        async for doc in cursor:
            yield doc["organization_id"], doc["ip"]

    async def carrying_snapshots(self, cves: Collection[str]) -> AsyncIterator[Snapshot]:
        """The snapshots `carrying` names, read whole from the same query (outboxes left
        out), each as `load` would return it."""
        if not cves:
            return
        cursor = self._collection.find(
            {"services.service.vulns": {"$in": sorted(cves)}, "status": "active"},
            {"_id": 0, "pending": 0, "pending_state": 0},
            batch_size=1000,
        )
        async for doc in cursor:
            yield snapshot_of(doc["organization_id"], doc["ip"], doc)

    async def swap_many(self, updates: Sequence[Update]) -> list[bool]:
        """`swap` for many updates at once: one unordered bulk write of updates, each
        conditioned on the version it was decided against and appending to the outboxes
        in the same document update. False for one whose snapshot had moved on (not
        written); new snapshots are created one by one, as `swap` does."""
        done = [False] * len(updates)
        writes: list[tuple[int, list[Document], list[Document]]] = []
        operations: list[UpdateOne] = []
        # BSON keeps milliseconds: the time read back below compares equal.
        now = datetime.now(UTC)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        for n, update in enumerate(updates):
            before = update.before
            if not before.stored:
                done[n] = await self.swap(update)
                continue
            pending = [e.model_dump(mode="json") for e in update.events]
            rows = [_state_doc(row) for row in update.state]
            fields = {**_fields_of(update.after), "outbox_at": now}
            # An update pipeline, so that a state row replaces any still pending for the
            # same key (as in `swap`) without reading first; values are literals.
            stage: Document = {name: {"$literal": value} for name, value in fields.items()}
            stage["version"] = {"$add": [{"$ifNull": ["$version", 0]}, 1]}
            stage["pending"] = {
                "$concatArrays": [{"$ifNull": ["$pending", []]}, {"$literal": pending}]
            }
            written = sorted({row.key for row in update.state})
            stage["pending_state"] = {
                "$concatArrays": [
                    {
                        "$filter": {
                            "input": {"$ifNull": ["$pending_state", []]},
                            "cond": {"$not": [{"$in": ["$$this.key", {"$literal": written}]}]},
                        }
                    },
                    {"$literal": rows},
                ]
            }
            query = {"organization_id": before.organization_id, "ip": before.ip}
            operations.append(UpdateOne({**query, "version": before.version}, [{"$set": stage}]))
            writes.append((n, pending, rows))
        if not operations:
            return done
        result = await self._collection.bulk_write(operations, ordered=False)
        if result.matched_count == len(operations):
            for n, _, _ in writes:
                done[n] = True
            return done
        # The bulk result counts the writes that matched but does not say which: those
        # now holding what they wrote, at the version they wrote, are the ones.
        found: dict[tuple[str, str], Document] = {}
        pairs = [
            {"organization_id": updates[n].before.organization_id, "ip": updates[n].before.ip}
            for n, _, _ in writes
        ]
        async for doc in self._collection.find(
            {"$or": pairs},
            {
                "_id": 0,
                "organization_id": 1,
                "ip": 1,
                "version": 1,
                "outbox_at": 1,
                "pending": 1,
                "pending_state": 1,
            },
        ):
            found[(doc["organization_id"], doc["ip"])] = doc
        for n, pending, rows in writes:
            before = updates[n].before
            now_stored = found.get((before.organization_id, before.ip))
            done[n] = now_stored is not None and _holds(
                now_stored, before.version + 1, now, pending, rows
            )
        return done

    async def published_many(self, outboxes: Sequence[Outbox]) -> None:
        """`published` for each outbox, in one unordered bulk write."""
        operations = []
        for outbox in outboxes:
            pull: Document = {"pending": {"id": {"$in": [e.id for e in outbox.events]}}}
            if outbox.state:
                pull["pending_state"] = {
                    "$or": [{"key": row.key, "version": row.version} for row in outbox.state]
                }
            operations.append(
                UpdateOne(
                    {"organization_id": outbox.organization_id, "ip": outbox.ip}, {"$pull": pull}
                )
            )
        if operations:
            await self._collection.bulk_write(operations, ordered=False)

    # -- the outboxes -----------------------------------------------------------------

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

    async def unpublished_count(self) -> int:
        """Snapshots with events still in their outbox."""
        return await self._collection.count_documents({"pending.0": {"$exists": True}})

    async def count(self) -> int:
        return await self._collection.count_documents({})

    # -- views ------------------------------------------------------------------------

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

    async def critical_observations(self) -> list[datetime]:
        """When each open critical exposure was last observed open, oldest first: Shodan's
        timestamp, or our own TCP check's when it found the port open later (critical
        exposures are few: the freshness figure's sample is small)."""
        verified = {
            "$cond": [
                {"$eq": ["$services.verification.state", "open"]},
                "$services.verification.checked_at",
                None,
            ]
        }
        rows = await (
            await self._collection.aggregate(
                [
                    {"$match": {"status": "active", "services.severity": "critical"}},
                    {"$unwind": "$services"},
                    {"$match": {"services.severity": "critical"}},
                    {
                        "$project": {
                            "_id": 0,
                            # $max skips what is missing or null.
                            "at": {"$max": ["$services.service.shodan_timestamp", verified]},
                        }
                    },
                    {"$match": {"at": {"$type": "date"}}},
                    {"$sort": {"at": 1}},
                ]
            )
        ).to_list()
        return [row["at"] if row["at"].tzinfo else row["at"].replace(tzinfo=UTC) for row in rows]

    async def table(self, organization_id: str) -> list[Document]:
        """The org's snapshot documents, for `recon-stream exposures`."""
        cursor = self._collection.find(
            {"organization_id": organization_id}, sort=[("ip", ASCENDING)]
        )
        return [doc async for doc in cursor]

    async def table_of_all(self) -> list[Document]:
        """Every organization's snapshot documents, for `exposures --all-orgs`."""
        cursor = self._collection.find({}, sort=[("organization_id", ASCENDING), ("ip", ASCENDING)])
        return [doc async for doc in cursor]

    # -- the migration of hand-edited `accepted` lists (`adapters.migrations`) -----------

    async def with_accepted_lists(self) -> list[Document]:
        return await self._collection.find({"accepted": {"$exists": True}}).to_list()

    async def drop_accepted_list(self, doc: Document, services: list[Document]) -> None:
        await self._collection.update_one(
            {"_id": doc["_id"], "version": doc.get("version", 0)},
            {"$set": {"services": services}, "$unset": {"accepted": ""}},
        )


def snapshot_of(organization_id: str, ip: str, doc: Document | None) -> Snapshot:
    """The snapshot a stored document holds (an empty one for None)."""
    if doc is None:
        return Snapshot(organization_id, ip)
    services = {
        _key_of(entry): OpenExposure(
            Service.model_validate(entry["service"]),
            entry["first_seen"],
            entry["last_seen"],
            _severity(entry.get("severity")),
            bool(entry.get("stale", False)),
            AcceptanceInfo.model_validate(entry["acceptance"]) if entry.get("acceptance") else None,
            AcceptanceInfo.model_validate(entry["lapsed"]) if entry.get("lapsed") else None,
            (
                VerificationInfo.model_validate(entry["verification"])
                if entry.get("verification")
                else None
            ),
            entry.get("failing_since"),
        )
        for entry in doc.get("services", [])
    }
    return Snapshot(
        organization_id,
        ip,
        stored=True,
        version=int(doc.get("version", 0)),
        status=doc.get("status"),
        last_queried=doc.get("last_queried"),
        provider=doc.get("provider", "api"),
        sample=bool(doc.get("sample", False)),
        hostnames=tuple(doc.get("hostnames", [])),
        candidate_agents=tuple(doc.get("candidate_agents", [])),
        site_ids=tuple(doc.get("site_ids", [])),
        retired_at=doc.get("retired_at"),
        services=services,
        scan=ScanRecord.model_validate(doc["scan"]) if doc.get("scan") else None,
        check_closed={_key_of(entry): entry["at"] for entry in doc.get("check_closed", [])},
    )


def _fields_of(snapshot: Snapshot) -> Document:
    fields: Document = {
        "status": snapshot.status,
        "last_queried": snapshot.last_queried,
        "provider": snapshot.provider,
        "sample": snapshot.sample,
        "hostnames": list(snapshot.hostnames),
        "candidate_agents": list(snapshot.candidate_agents),
        "site_ids": list(snapshot.site_ids),
        "retired_at": snapshot.retired_at,
    }
    # Fields a snapshot never had stay absent, as they were.
    fields = {name: value for name, value in fields.items() if value is not None}
    # Replaced by every lookup: a lookup without a scan clears the last one's.
    fields["scan"] = snapshot.scan.model_dump(mode="python") if snapshot.scan else None
    fields["services"] = [
        {
            "transport": key[0],
            "port": key[1],
            "service": entry.service.model_dump(mode="python"),
            "first_seen": entry.first_seen,
            "last_seen": entry.last_seen,
            "severity": entry.severity.value if entry.severity is not None else None,
            "stale": entry.stale,
            "acceptance": (
                entry.acceptance.model_dump(mode="python") if entry.acceptance is not None else None
            ),
            "lapsed": entry.lapsed.model_dump(mode="python") if entry.lapsed is not None else None,
            "verification": (
                entry.verification.model_dump(mode="python")
                if entry.verification is not None
                else None
            ),
            "failing_since": entry.failing_since,
        }
        for key, entry in snapshot.services.items()
    ]
    fields["check_closed"] = [
        {"transport": key[0], "port": key[1], "at": at} for key, at in snapshot.check_closed.items()
    ]
    return fields


def _severity(value: Any) -> Severity | None:
    return Severity(value) if value in Severity._value2member_map_ else None


def _key_of(entry: Document) -> ExposureKey:
    return (entry["transport"], int(entry["port"]))


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


def _holds(
    doc: Document, version: int, at: datetime, pending: list[Document], rows: list[Document]
) -> bool:
    """Whether a snapshot document is at `version`, its outboxes written `at`, with these
    events and state rows in them exactly as written."""
    written = doc.get("outbox_at")
    if written is not None and written.tzinfo is None:
        written = written.replace(tzinfo=UTC)
    if int(doc.get("version", 0)) != version or written != at:
        return False
    events = {e["id"]: e for e in doc.get("pending", [])}
    state = {(e["key"], e["version"]): e for e in doc.get("pending_state", [])}
    return all(events.get(e["id"]) == e for e in pending) and all(
        state.get((r["key"], r["version"])) == r for r in rows
    )
