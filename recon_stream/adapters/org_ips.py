"""`org_ips`: the (organization, IP) pairs heartbeats reported, and their owner.

`org_ips` holds one document per (organization, IP):

    {organization_id, ip, ip_version, status: "active",
     first_seen, last_seen,               # from heartbeats' observed_at
     created_at, updated_at,              # our clock
     site_ids: [...],                     # bounded
     agents: [{agent_id, last_seen, hostname}],  # most recent first, bounded
     scan_request: {state: "pending"|"sent", claim_until, sent_at, claim}}

`scan_request` is the outbox of the ingest stage: it is written `pending` in
the same upsert that creates the pair, and flipped to `sent` only after the
scan request is on Kafka. A crash in between leaves it `pending`, and the relay
sends it once the lease has run out.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId
from pymongo import ASCENDING, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from recon_stream.adapters.collections import ORG_IPS
from recon_stream.adapters.mongo import aware, delete_organization
from recon_stream.domain.pairs import Dismissal, PairStatus
from recon_stream.domain.sightings import PairKey, PairSighting
from recon_stream.domain.snapshot import OrgContext
from recon_stream.ports import Created

Document = dict[str, Any]

HELD = (PairStatus.EXCLUDED, PairStatus.SHARED_EGRESS, PairStatus.DISMISSED)
"""Statuses a heartbeat leaves as they are (set by a decision, not by activity)."""
_HELD = [status.value for status in HELD]
_DUPLICATE_KEY = 11000


async def ensure_indexes(db: AsyncDatabase[Document]) -> list[str]:
    """Create every index the workers rely on; safe to run again."""
    org_ips = db[ORG_IPS]
    return [
        await org_ips.create_index(
            [("organization_id", ASCENDING), ("ip", ASCENDING)],
            unique=True,
            name="org_ip_unique",
        ),
        await org_ips.create_index([("ip", ASCENDING)], name="ip"),
        await org_ips.create_index(
            [("scan_request.state", ASCENDING), ("scan_request.claim_until", ASCENDING)],
            name="scan_request_outbox",
        ),
        await org_ips.create_index(
            [("status", ASCENDING), ("last_seen", ASCENDING)], name="status_last_seen"
        ),
    ]


def _literal(value: Any) -> Document:
    # Heartbeat text must never be read as a field path or an operator.
    return {"$literal": value}


class MongoOrgIps:
    """`OrgIpStore` on a MongoDB collection."""

    def __init__(
        self,
        db: AsyncDatabase[Document],
        *,
        max_agents: int = 50,
        max_sites: int = 50,
        lease: timedelta = timedelta(seconds=60),
    ) -> None:
        self._collection: AsyncCollection[Document] = db[ORG_IPS]
        self._max_agents = max_agents
        self._max_sites = max_sites
        self._lease = lease
        self._merged = self._merge()
        self._merged_excluded = self._merge(excluded=True)

    @property
    def collection(self) -> AsyncCollection[Document]:
        return self._collection

    def _merge(self, *, excluded: bool = False) -> Document:
        """The pair's new state from the stored document (`$$ROOT`, empty when
        inserting) and the sighting's values, bound as variables by `_upsert`.

        Built once: only the variables differ between pairs, so a batch costs a
        small dict per pair instead of this whole expression tree (which took
        most of the worker's time on a stream of new pairs, py-spy).

        `excluded`: the scope file excludes the pair (`$$reason` says why). A pair
        this creates is `excluded` with no scan request at all (state `none`: the
        relay never claims it); a pair already stored keeps its status (the
        scheduler's leader reconciles stored pairs against the file).
        """
        old = {"$ifNull": ["$agents", []]}
        # Agents seen again keep the later of the stored and the new time (a
        # redelivered old heartbeat must not move an agent back in time).
        merged_new = {
            "$map": {
                "input": "$$agents",
                "as": "n",
                "in": {
                    "$let": {
                        "vars": {
                            "o": {
                                "$first": {
                                    "$filter": {
                                        "input": old,
                                        "cond": {"$eq": ["$$this.agent_id", "$$n.agent_id"]},
                                    }
                                }
                            }
                        },
                        "in": {
                            "agent_id": "$$n.agent_id",
                            "last_seen": {
                                "$max": ["$$n.last_seen", {"$ifNull": ["$$o.last_seen", None]}]
                            },
                            # The hostname of the latest report that had one.
                            "hostname": {
                                "$cond": [
                                    {
                                        "$or": [
                                            {"$eq": [{"$ifNull": ["$$o.hostname", None]}, None]},
                                            {"$gte": ["$$n.last_seen", "$$o.last_seen"]},
                                        ]
                                    },
                                    {"$ifNull": ["$$n.hostname", "$$o.hostname"]},
                                    "$$o.hostname",
                                ]
                            },
                        },
                    }
                },
            }
        }
        untouched = {
            "$filter": {
                "input": old,
                "cond": {"$not": [{"$in": ["$$this.agent_id", "$$agent_ids"]}]},
            }
        }
        # A heartbeat brings a retired pair back; the statuses set by a
        # decision (scope, shared egress, dismissal) stay as they are.
        held: Document = {
            "$cond": [
                {"$in": [{"$ifNull": ["$status", "active"]}, _literal(_HELD)]},
                "$status",
                _literal("active"),
            ]
        }
        first_request: Document = {"state": _literal("pending"), "claim_until": "$$lease_end"}
        status: Document = held
        extra: list[Document] = []
        if excluded:
            is_new = {"$eq": [{"$ifNull": ["$status", None]}, None]}
            status = {"$cond": [is_new, _literal(PairStatus.EXCLUDED.value), held]}
            first_request = {"state": _literal("none")}
            extra = [
                {
                    "$cond": [
                        is_new,
                        {"status_reason": "$$reason", "status_at": "$$now"},
                        {},
                    ]
                }
            ]
        return {
            "$mergeObjects": [
                "$$ROOT",
                {
                    "ip_version": "$$ip_version",
                    "first_seen": {
                        "$min": [{"$ifNull": ["$first_seen", "$$first_seen"]}, "$$first_seen"]
                    },
                    "last_seen": {
                        "$max": [{"$ifNull": ["$last_seen", "$$last_seen"]}, "$$last_seen"]
                    },
                    "created_at": {"$ifNull": ["$created_at", "$$now"]},
                    "updated_at": "$$now",
                    "status": status,
                    "site_ids": {
                        "$slice": [
                            {"$setUnion": [{"$ifNull": ["$site_ids", []]}, "$$site_ids"]},
                            self._max_sites,
                        ]
                    },
                    "agents": {
                        "$slice": [
                            {
                                "$sortArray": {
                                    "input": {"$concatArrays": [merged_new, untouched]},
                                    "sortBy": {"last_seen": -1},
                                }
                            },
                            self._max_agents,
                        ]
                    },
                    # A pair seen again after retirement is new again: its request
                    # is due at once (the relay sends it; nothing else announces it).
                    "scan_request": {
                        "$cond": [
                            {"$eq": ["$status", "retired"]},
                            {"state": _literal("pending"), "claim_until": "$$now"},
                            {"$ifNull": ["$scan_request", first_request]},
                        ]
                    },
                },
                *extra,
            ]
        }

    def _upsert(
        self, s: PairSighting, ip_version: int, now: datetime, reason: str | None = None
    ) -> UpdateOne:
        agents = [
            {"agent_id": a.agent_id, "last_seen": a.last_seen, "hostname": a.hostname}
            for a in s.agents_most_recent_first()[: self._max_agents]
        ]
        variables = {
            # Heartbeat text must never be read as a field path or an operator.
            "agents": _literal(agents),
            "agent_ids": _literal([a["agent_id"] for a in agents]),
            "site_ids": _literal(sorted(s.site_ids)),
            "first_seen": s.first_seen,
            "last_seen": s.last_seen,
            "ip_version": ip_version,
            "now": now,
            "lease_end": now + self._lease,
        }
        merged = self._merged
        if reason is not None:
            variables["reason"] = _literal(reason)
            merged = self._merged_excluded
        stage = {"$replaceWith": {"$let": {"vars": variables, "in": merged}}}
        return UpdateOne({"organization_id": s.organization_id, "ip": s.ip}, [stage], upsert=True)

    def upserts(
        self,
        sightings: Sequence[PairSighting],
        now: datetime,
        excluded: Mapping[PairKey, str] | None = None,
    ) -> list[UpdateOne]:
        """The pipeline upserts `record` sends (one per sighting, in order)."""
        reasons = excluded or {}
        return [
            self._upsert(s, 6 if ":" in s.ip else 4, now, reasons.get(s.key)) for s in sightings
        ]

    async def record(
        self,
        sightings: Sequence[PairSighting],
        now: datetime,
        excluded: Mapping[PairKey, str] | None = None,
    ) -> Created:
        """Upsert the sightings; the pairs this call created. Those in `excluded` (the
        scope's reason by pair) are created `excluded`, without a scan request."""
        if not sightings:
            return {}
        ops = self.upserts(sightings, now, excluded)
        created: Created = {}
        pending = list(range(len(ops)))
        # Two workers upserting a new pair at once: one inserts, the other may
        # get a duplicate-key error (mongod retries some of these itself).
        # Re-running the loser turns it into an update of the winner's document.
        for _attempt in range(5):
            try:
                result = await self._collection.bulk_write([ops[i] for i in pending], ordered=False)
                for i, _id in (result.upserted_ids or {}).items():
                    created[sightings[pending[i]].key] = _id
                return created
            except BulkWriteError as error:
                details = error.details
                for u in details.get("upserted", []):
                    created[sightings[pending[u["index"]]].key] = u["_id"]
                write_errors = details.get("writeErrors", [])
                if any(e.get("code") != _DUPLICATE_KEY for e in write_errors):
                    raise
                pending = [pending[e["index"]] for e in write_errors]
        raise RuntimeError("duplicate-key conflicts did not resolve after 5 attempts")

    async def unsent_count(self) -> int:
        """Scan requests still pending in the outbox (a gauge; uses the outbox index)."""
        return await self._collection.count_documents({"scan_request.state": "pending"})

    async def mark_requested(self, ids: Collection[Any], now: datetime) -> None:
        if not ids:
            return
        # One statement by `_id`, not one update per pair by (organization,
        # IP): per-pair statements cost mongod more than the upserts that
        # created the pairs (bench/new_pairs.py: 0.42 -> 0.9 of the bare upsert).
        await self._collection.update_many(
            {"_id": {"$in": list(ids)}, "scan_request.state": "pending"},
            {"$set": {"scan_request.state": "sent", "scan_request.sent_at": now}},
        )

    async def claim_unsent(self, now: datetime, limit: int) -> Created:
        due = {"scan_request.state": "pending", "scan_request.claim_until": {"$lt": now}}
        ids = [doc["_id"] async for doc in self._collection.find(due, {"_id": 1}, limit=limit)]
        if not ids:
            return {}
        # Claim them all in one statement; a relay racing us for some of them
        # takes the others. The token tells which ones this call won.
        token = ObjectId()
        await self._collection.update_many(
            {"_id": {"$in": ids}, **due},
            {"$set": {"scan_request.claim_until": now + self._lease, "scan_request.claim": token}},
        )
        won = self._collection.find(
            {"_id": {"$in": ids}, "scan_request.claim": token}, {"organization_id": 1, "ip": 1}
        )
        return {(doc["organization_id"], doc["ip"]): doc["_id"] async for doc in won}

    # -- who uses which IP (scanner, commands, scheduler) ----------------------------------

    async def orgs_behind(self, ip: str) -> list[OrgContext]:
        """Every org whose agents report from `ip` and still use it."""
        cursor = self._collection.find(
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

    async def reported_since(self, ip: str, since: datetime) -> list[str]:
        """The organizations whose agents reported from `ip` at `since` or later (and
        still use it): the only ones whose consent lets a TCP check reach the IP."""
        cursor = self._collection.find(
            {"ip": ip, "status": "active", "last_seen": {"$gte": since}}, {"organization_id": 1}
        )
        return sorted({doc["organization_id"] async for doc in cursor})

    async def reported_ips(self, organization_id: str) -> set[str]:
        """The IPs the org's agents still report from, scanned or not yet."""
        cursor = self._collection.find(
            {"organization_id": organization_id, "status": "active"}, {"ip": 1}
        )
        return {doc["ip"] async for doc in cursor}

    async def users(self, ips: Sequence[str]) -> list[tuple[str, str]]:
        """The active (ip, organization) pairs of `ips`, in a stable order."""
        if not ips:
            return []
        docs = await self._collection.find(
            {"ip": {"$in": list(ips)}, "status": "active"}, {"organization_id": 1, "ip": 1}
        ).to_list()
        return sorted((doc["ip"], doc["organization_id"]) for doc in docs)

    async def unused(self, cutoff: datetime, limit: int) -> list[tuple[str, str]]:
        """Up to `limit` active (organization, ip) pairs last seen before `cutoff`."""
        docs = await self._collection.find(
            {"status": "active", "last_seen": {"$lt": cutoff}},
            {"organization_id": 1, "ip": 1},
            limit=limit,
        ).to_list()
        return [(doc["organization_id"], doc["ip"]) for doc in docs]

    async def retire(self, organization_id: str, ip: str, cutoff: datetime, now: datetime) -> bool:
        """Mark the pair retired if it was not seen since `cutoff`; False if it was."""
        result = await self._collection.update_one(
            {
                "organization_id": organization_id,
                "ip": ip,
                "status": "active",
                "last_seen": {"$lt": cutoff},
            },
            {"$set": {"status": "retired", "retired_at": now}},
        )
        return bool(result.modified_count)

    async def in_use(self, ips: Sequence[str]) -> set[str]:
        """Those of `ips` some organization still uses."""
        cursor = self._collection.find({"ip": {"$in": list(ips)}, "status": "active"}, {"ip": 1})
        return {doc["ip"] async for doc in cursor}

    # -- statuses (`attribution`, dismissals) ---------------------------------------------

    async def set_status(
        self,
        organization_id: str,
        ip: str,
        status: PairStatus,
        reason: str | None = None,
        now: datetime | None = None,
    ) -> PairStatus | None:
        """Give the pair `status` (with why and when); the status before, `status` itself
        when nothing was written (already so, or dismissed: only `undismiss` ends a
        dismissal), or None when the organization never reported the IP. A pair made
        active again has its scan request due at once: it is looked up for the org afresh."""
        now = now or datetime.now(UTC)
        fields: dict[str, Any] = {
            "status": status.value,
            "status_reason": reason,
            "status_at": now,
        }
        if status is PairStatus.ACTIVE:
            fields["scan_request"] = {"state": "pending", "claim_until": now}
        pair = {"organization_id": organization_id, "ip": ip}
        # A dismissal changes only by `undismiss` or its expiry: attribution's passes,
        # which read statuses a moment earlier, never overwrite one.
        unchanged = [status.value, PairStatus.DISMISSED.value]
        before = await self._collection.find_one_and_update(
            {**pair, "status": {"$nin": unchanged}}, {"$set": fields}, projection={"status": 1}
        )
        if before is None:
            # Already so or dismissed (nothing written, no extra lookup), or no such pair.
            return status if await self._collection.find_one(pair, {"_id": 1}) else None
        return _status(before)

    # -- dismissals (`dismiss`, `undismiss`, their expiry) -------------------------------

    async def status_of(self, organization_id: str, ip: str) -> PairStatus | None:
        doc = await self._collection.find_one(
            {"organization_id": organization_id, "ip": ip}, {"status": 1}
        )
        return None if doc is None else _status(doc)

    async def dismiss(self, dismissal: Dismissal) -> PairStatus | None:
        """Put the dismissal on record and the pair `dismissed`; the status before (None:
        the organization never reported the IP, nothing written)."""
        before = await self._collection.find_one_and_update(
            {"organization_id": dismissal.organization_id, "ip": dismissal.ip},
            {
                "$set": {
                    "status": PairStatus.DISMISSED.value,
                    "status_reason": dismissal.reason,
                    "status_at": dismissal.dismissed_at,
                    "dismissal": {
                        "reason": dismissal.reason,
                        "requested_by": dismissal.requested_by,
                        "dismissed_at": dismissal.dismissed_at,
                        "expires_at": dismissal.expires_at,
                        "command_id": dismissal.command_id,
                    },
                }
            },
            projection={"status": 1},
        )
        return None if before is None else _status(before)

    async def undismiss(
        self,
        organization_id: str,
        ip: str,
        status: PairStatus,
        reason: str,
        now: datetime,
        only: str | None = None,
    ) -> Dismissal | None:
        """Give a dismissed pair `status` (active: its scan request due at once) and drop
        its dismissal; the dismissal taken back, or None when the pair was not dismissed
        (or, with `only`, not by that command)."""
        query: Document = {
            "organization_id": organization_id,
            "ip": ip,
            "status": PairStatus.DISMISSED.value,
        }
        if only is not None:
            query["dismissal.command_id"] = only
        fields: Document = {"status": status.value, "status_reason": reason, "status_at": now}
        if status is PairStatus.ACTIVE:
            fields["scan_request"] = {"state": "pending", "claim_until": now}
        before = await self._collection.find_one_and_update(
            query,
            {"$set": fields, "$unset": {"dismissal": ""}},
            projection={"organization_id": 1, "ip": 1, "dismissal": 1},
        )
        return None if before is None else _dismissal(before)

    async def expired_dismissals(self, now: datetime, limit: int) -> list[Dismissal]:
        docs = await self._collection.find(
            {"status": PairStatus.DISMISSED.value, "dismissal.expires_at": {"$lte": now}},
            {"organization_id": 1, "ip": 1, "dismissal": 1},
            limit=limit,
        ).to_list()
        return [_dismissal(doc) for doc in docs]

    async def forget_organization(self, organization_id: str) -> int:
        """Delete every pair of the organization (`purge`); how many."""
        return await delete_organization(self._collection, organization_id)

    async def reason_of(self, organization_id: str, ip: str) -> str | None:
        doc = await self._collection.find_one(
            {"organization_id": organization_id, "ip": ip}, {"status_reason": 1}
        )
        return doc.get("status_reason") if doc else None

    async def inventory(self, organization_id: str) -> list[Document]:
        """Every pair of the organization, whatever its status, by IP: `ip`, `status`,
        `status_reason`, `status_at`, `agents`, `site_ids`, `first_seen`, `last_seen`."""
        cursor = self._collection.find(
            {"organization_id": organization_id},
            {
                "_id": 0,
                "ip": 1,
                "status": 1,
                "status_reason": 1,
                "status_at": 1,
                "agents": 1,
                "site_ids": 1,
                "first_seen": 1,
                "last_seen": 1,
            },
        ).sort("ip", 1)
        return [
            {"status": "active", "status_reason": None, **doc, "organization_id": organization_id}
            async for doc in cursor
        ]

    async def pairs_with_status(self, status: PairStatus) -> list[tuple[str, str]]:
        """Every (organization, ip) pair with `status`."""
        cursor = self._collection.find(
            {"status": status.value}, {"organization_id": 1, "ip": 1}
        ).sort([("organization_id", 1), ("ip", 1)])
        return [(doc["organization_id"], doc["ip"]) async for doc in cursor]

    async def crowded_ips(self, min_orgs: int) -> dict[str, list[str]]:
        """IPs with at least `min_orgs` active or shared-egress pairs, with their orgs."""
        rows = await (
            await self._collection.aggregate(
                [
                    {"$match": {"status": {"$in": ["active", "shared_egress"]}}},
                    {"$group": {"_id": "$ip", "orgs": {"$addToSet": "$organization_id"}}},
                    {"$match": {f"orgs.{min_orgs - 1}": {"$exists": True}}},
                ]
            )
        ).to_list()
        return {row["_id"]: sorted(row["orgs"]) for row in rows}

    async def sharing(self, ip: str) -> list[str]:
        """The organizations whose pairs on `ip` are active or shared egress: who shares
        the IP (attribution's count, at each lookup)."""
        cursor = self._collection.find(
            {"ip": ip, "status": {"$in": ["active", "shared_egress"]}}, {"organization_id": 1}
        )
        return sorted({doc["organization_id"] async for doc in cursor})

    # -- views (`recon-stream dev`) ---------------------------------------------------------

    async def all_pairs(self) -> list[Document]:
        """Every pair, by organization then IP."""
        return await self._collection.find({}, sort=[("organization_id", 1), ("ip", 1)]).to_list()

    async def active_count(self) -> int:
        return await self._collection.count_documents({"status": "active"})


def _status(doc: Document) -> PairStatus:
    was = doc.get("status", "active")
    return PairStatus(was) if was in PairStatus._value2member_map_ else PairStatus.ACTIVE


def _dismissal(doc: Document) -> Dismissal:
    d = doc.get("dismissal") or {}
    at, expires = d.get("dismissed_at"), d.get("expires_at")
    return Dismissal(
        organization_id=doc["organization_id"],
        ip=doc["ip"],
        reason=d.get("reason", ""),
        requested_by=d.get("requested_by", ""),
        dismissed_at=aware(at) if at is not None else datetime.fromtimestamp(0, UTC),
        expires_at=aware(expires) if expires is not None else None,
        command_id=d.get("command_id", ""),
    )
