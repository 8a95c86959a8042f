"""The scheduler: one leader re-queues stale IPs and retires unused pairs.

Every `tick` seconds each replica tries to take or renew the lease; only the
holder works:

- IPs whose lookup is due (`ip_scans.next_scan_at`, set by the scanner to the
  rescan interval ± 10%) get a scan request with reason `rescan` for every org
  still using the IP, one per (organization, IP) pair like ingest's: each
  request names an org that really is behind the IP, and the scan queue folds
  them into one lookup. IPs no org uses any more are left alone.
- (organization, IP) pairs not seen for the retention period are retired, and
  their open exposures closed with reason `ip_retired` (through the outbox).
- Acceptances past their `expires_at` are applied to the exposures they covered
  (`changed`, reason `acceptance_expired`), then forgotten.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Protocol

from pymongo.asynchronous.database import AsyncDatabase

from recon_stream.adapters.exposure_store import ExposureStore, IpScans
from recon_stream.adapters.mongo import ORG_IPS
from recon_stream.domain.scan_requests import ScanReason, ScanRequest
from recon_stream.leadership import Lease
from recon_stream.metrics import Metrics
from recon_stream.outbox import EventSink, OutboxPublisher, StateSink
from recon_stream.retry import Backoff, Retrier

log = logging.getLogger(__name__)


class RequestSink(Protocol):
    async def publish(self, requests: Sequence[ScanRequest]) -> None: ...


class Scheduler:
    def __init__(
        self,
        db: AsyncDatabase[dict[str, Any]],
        lease: Lease,
        ip_scans: IpScans,
        exposures: ExposureStore,
        requests: RequestSink,
        events: EventSink,
        metrics: Metrics,
        backoff: Backoff,
        *,
        rescan_interval: float,
        retention: float,
        batch: int = 500,
        state: StateSink | None = None,
        ocsf: EventSink | None = None,
    ) -> None:
        self._org_ips = db[ORG_IPS]
        self.lease = lease
        self._ip_scans = ip_scans
        self._exposures = exposures
        self._requests = requests
        self._events = events
        self._metrics = metrics
        self._retrying = Retrier(backoff, metrics)
        self.outbox = OutboxPublisher(exposures, events, state, metrics, self._retrying, ocsf=ocsf)
        self._rescan = rescan_interval
        self._retention = retention
        self._batch = batch
        self.state = "starting"
        self._last_round: float | None = None
        self._tick = 30.0

    async def run(self, tick: float) -> None:
        """Lead or stand by, until cancelled (then hand the lease over at once)."""
        self._tick = tick
        try:
            while True:
                try:
                    leading = await self.lease.try_acquire()
                    self._metrics.scheduler_leader.set(1 if leading else 0)
                    self.state = "leading" if leading else "standing by"
                    self._last_round = time.monotonic()
                    if leading:
                        await self.tick()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("scheduler tick failed; will try again")
                await asyncio.sleep(tick)
        finally:
            self._metrics.scheduler_leader.set(0)
            await asyncio.shield(self.lease.release())

    async def ready(self) -> str | None:
        """Readiness: leading or standing by both count; a stalled lease loop does not."""
        if self._last_round is None:
            return "scheduler has not reached the lease yet"
        silent = time.monotonic() - self._last_round
        limit = 3 * self._tick + self.lease.ttl.total_seconds()
        if silent > limit:
            return f"scheduler stalled: no lease round for {silent:.0f}s"
        return None

    async def tick(self, now: datetime | None = None) -> tuple[int, int]:
        """One round of work; returns (rescans requested, pairs retired).

        Acceptances that expired are applied in the same round.
        """
        now = now or datetime.now(UTC)
        rescans, retired = await self.request_rescans(now), await self.retire_unused(now)
        await self.expire_acceptances(now)
        return rescans, retired

    async def request_rescans(self, now: datetime) -> int:
        """Request a rescan of every due IP, one request per active (org, IP) pair."""
        due = await self._retrying(
            "finding due rescans", lambda: self._ip_scans.due(now, self._batch)
        )
        pairs = await self._retrying("reading the orgs behind due IPs", lambda: self._users(due))
        requests = [
            ScanRequest(organization_id=org, ip=ip, reason=ScanReason.RESCAN, requested_at=now)
            for ip, org in pairs
        ]
        if requests:
            await self._retrying("publishing rescans", lambda: self._requests.publish(requests))
            self._metrics.scan_requests.labels(ScanReason.RESCAN.value, "scheduler").inc(
                len(requests)
            )
        if due:
            # Not due again until a whole interval passed (the scanner resets
            # it when the lookup is done); IPs nobody uses wait a retention period.
            await self._retrying(
                "postponing rescans",
                lambda: self._ip_scans.postpone(due, now + timedelta(seconds=self._rescan)),
            )
        return len(requests)

    async def _users(self, ips: Sequence[str]) -> list[tuple[str, str]]:
        """The active (ip, organization) pairs of `ips`, in a stable order."""
        if not ips:
            return []
        docs = await self._org_ips.find(
            {"ip": {"$in": list(ips)}, "status": "active"}, {"organization_id": 1, "ip": 1}
        ).to_list()
        return sorted((doc["ip"], doc["organization_id"]) for doc in docs)

    async def retire_unused(self, now: datetime) -> int:
        cutoff = now - timedelta(seconds=self._retention)
        stale = await self._retrying(
            "finding unused pairs",
            lambda: self._org_ips.find(
                {"status": "active", "last_seen": {"$lt": cutoff}},
                {"organization_id": 1, "ip": 1},
                limit=self._batch,
            ).to_list(),
        )
        retired = 0
        for doc in stale:
            if await self._retire_pair(doc["organization_id"], doc["ip"], cutoff, now):
                retired += 1
        if retired:
            self._metrics.pairs_retired.inc(retired)
            log.info("retired %d (organization, IP) pairs unused since %s", retired, cutoff)
        return retired

    async def _retire_pair(self, org: str, ip: str, cutoff: datetime, now: datetime) -> bool:
        async def mark() -> bool:
            result = await self._org_ips.update_one(
                {
                    "organization_id": org,
                    "ip": ip,
                    "status": "active",
                    "last_seen": {"$lt": cutoff},
                },
                {"$set": {"status": "retired", "retired_at": now}},
            )
            return bool(result.modified_count)

        if not await self._retrying("retiring a pair", mark):
            return False  # seen again meanwhile
        outbox = await self._retrying(
            "closing exposures", lambda: self._exposures.retire(org, ip, now)
        )
        await self.outbox.publish(outbox)
        return True

    async def expire_acceptances(self, now: datetime) -> int:
        """Apply acceptances that reached their expiry, then forget them; returns how many.

        The exposures they covered get `changed` (reason `acceptance_expired`) now,
        not at their next lookup. Forgotten only once applied: a crash repeats this.
        """
        store = self._exposures
        expired = await self._retrying(
            "finding expired acceptances", lambda: store.expired_acceptances(now, self._batch)
        )
        for acceptance in expired:
            await self.outbox.reassess(acceptance.organization_id, acceptance.ip, now)
            await self._retrying(
                "forgetting an expired acceptance", partial(store.forget_acceptance, acceptance)
            )
        return len(expired)
