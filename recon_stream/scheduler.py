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
from typing import Protocol

from recon_stream.domain.scan_requests import ScanReason, ScanRequest
from recon_stream.metrics import Metrics
from recon_stream.outbox import OutboxPublisher
from recon_stream.ports import AcceptanceStore, LeaderLease, PairRetirement, RescanSchedule
from recon_stream.retry import Retrier

log = logging.getLogger(__name__)


class RequestSink(Protocol):
    async def publish(self, requests: Sequence[ScanRequest]) -> None: ...


class Scheduler:
    def __init__(
        self,
        lease: LeaderLease,
        schedule: RescanSchedule,
        pairs: PairRetirement,
        acceptances: AcceptanceStore,
        outbox: OutboxPublisher,
        requests: RequestSink,
        metrics: Metrics,
        retrying: Retrier,
        *,
        rescan_interval: float,
        retention: float,
        batch: int = 500,
    ) -> None:
        self.lease = lease
        self._schedule = schedule
        self._pairs = pairs
        self._acceptances = acceptances
        self.outbox = outbox
        self._requests = requests
        self._metrics = metrics
        self._retrying = retrying
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
            "finding due rescans", lambda: self._schedule.due(now, self._batch)
        )
        pairs = await self._retrying(
            "reading the orgs behind due IPs", lambda: self._pairs.users(due)
        )
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
                lambda: self._schedule.postpone(due, now + timedelta(seconds=self._rescan)),
            )
        return len(requests)

    async def retire_unused(self, now: datetime) -> int:
        cutoff = now - timedelta(seconds=self._retention)
        stale = await self._retrying(
            "finding unused pairs", lambda: self._pairs.unused(cutoff, self._batch)
        )
        retired = 0
        for org, ip in stale:
            if await self._retire_pair(org, ip, cutoff, now):
                retired += 1
        if retired:
            self._metrics.pairs_retired.inc(retired)
            log.info("retired %d (organization, IP) pairs unused since %s", retired, cutoff)
        return retired

    async def _retire_pair(self, org: str, ip: str, cutoff: datetime, now: datetime) -> bool:
        if not await self._retrying(
            "retiring a pair", partial(self._pairs.retire, org, ip, cutoff, now)
        ):
            return False  # seen again meanwhile
        outbox = await self._retrying(
            "closing exposures", lambda: self.outbox.updater.retire(org, ip, now)
        )
        await self.outbox.publish(outbox)
        return True

    async def expire_acceptances(self, now: datetime) -> int:
        """Apply acceptances that reached their expiry, then forget them; returns how many.

        The exposures they covered get `changed` (reason `acceptance_expired`) now,
        not at their next lookup. Forgotten only once applied: a crash repeats this.
        """
        store = self._acceptances
        expired = await self._retrying(
            "finding expired acceptances", lambda: store.expired_acceptances(now, self._batch)
        )
        for acceptance in expired:
            await self.outbox.reassess(acceptance.organization_id, acceptance.ip, now)
            await self._retrying(
                "forgetting an expired acceptance", partial(store.forget_acceptance, acceptance)
            )
        return len(expired)
