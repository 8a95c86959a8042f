"""Applying lookups, retirements and re-assessments to organizations' snapshots.

`SnapshotUpdater` is the loop around the decision of `domain.snapshot`: load the
snapshot, plan, load only the context the plan needs (the acceptances in force, what
the KEV and EPSS feeds say about its CVEs), decide, and compare-and-swap the result
with its outboxes; on a conflict (another replica wrote the snapshot meanwhile) load
and decide again. What it returns is published by `outbox.OutboxPublisher`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from recon_stream.domain.exposures import Assessor, ChangeReason
from recon_stream.domain.pairs import PairStatus
from recon_stream.domain.risk import RiskPolicy
from recon_stream.domain.scans import HostScan
from recon_stream.domain.snapshot import (
    OrgContext,
    Outbox,
    Plan,
    Snapshot,
    decide,
    plan_lookup,
    plan_reassessment,
    plan_retirement,
    plan_verification,
)
from recon_stream.domain.verification import Check
from recon_stream.ports import AcceptanceStore, SnapshotStore, VulnContextSource

ATTEMPTS = 20


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class SnapshotUpdater:
    """Decides and stores changes to snapshots; each call returns what is left to publish."""

    snapshots: SnapshotStore
    acceptances: AcceptanceStore
    feeds: VulnContextSource
    policy: RiskPolicy
    stale_after: timedelta = timedelta(days=30)
    source: str = "recon-stream"
    """The events' CloudEvents `source` (RECON_EVENT_SOURCE)."""
    clock: Callable[[], datetime] = field(default=_now)

    async def apply(self, org: OrgContext, scan: HostScan) -> Outbox:
        """Diff `scan` against the org's snapshot and store the result with its outboxes.

        Idempotent: a lookup older than (or as old as) the snapshot changes nothing.
        """
        return await self._update(
            org.organization_id,
            scan.ip,
            lambda snapshot: plan_lookup(snapshot, org, scan, self.clock()),
        )

    async def retire(
        self,
        organization_id: str,
        ip: str,
        now: datetime,
        status: PairStatus = PairStatus.RETIRED,
    ) -> Outbox:
        """Close every open exposure of a pair the org stopped using (reason `ip_retired`),
        or that took another status (excluded, shared egress, dismissed: its reason)."""
        reason = status.close_reason or ChangeReason.IP_RETIRED
        return await self._update(
            organization_id, ip, lambda s: plan_retirement(s, now, reason, status.value)
        )

    async def purge(self, organization_id: str, ip: str, now: datetime) -> Outbox:
        """Close every open exposure of a pair of an organization that left
        (`organization_purged`), before its documents are deleted."""
        reason = ChangeReason.ORGANIZATION_PURGED
        return await self._update(
            organization_id, ip, lambda s: plan_retirement(s, now, reason, "purged")
        )

    async def verify(
        self, organization_id: str, ip: str, checks: Sequence[Check], confirm: timedelta
    ) -> Outbox:
        """Apply a round of TCP checks of `ip` to the org's open exposures on it."""
        at = max((check.checked_at for check in checks), default=self.clock())
        return await self._update(
            organization_id, ip, lambda s: plan_verification(s, checks, confirm, at)
        )

    async def reassess(self, organization_id: str, ip: str, now: datetime) -> Outbox:
        """Apply the acceptances in force at `now`, and the feeds as they are, to the org's
        open exposures on `ip`."""
        return await self._update(organization_id, ip, lambda s: plan_reassessment(s, now))

    async def _update(
        self, organization_id: str, ip: str, plan_of: Callable[[Snapshot], Plan | None]
    ) -> Outbox:
        for _ in range(ATTEMPTS):
            snapshot = await self.snapshots.load(organization_id, ip)
            plan = plan_of(snapshot)
            if plan is None:
                return Outbox.empty(organization_id, ip)
            acceptances = (
                await self.acceptances.acceptances(organization_id, ip)
                if plan.needs_acceptances
                else []
            )
            context = await self.feeds.lookup(plan.cves)
            judge = Assessor(self.policy, context, self.stale_after)
            update = decide(plan, acceptances, judge, source=self.source)
            if update is None:
                return Outbox.empty(organization_id, ip)
            if await self.snapshots.swap(update):
                return update.outbox
        raise RuntimeError(f"snapshot of {organization_id}/{ip} kept changing under us")
