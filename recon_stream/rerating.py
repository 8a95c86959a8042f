"""Re-rating in batches: after a KEV or EPSS change, many snapshots judged again at once.

What `SnapshotUpdater.reassess` and `OutboxPublisher.publish` do for one snapshot, done
for a batch of them with a round trip per step rather than per snapshot:

1. the snapshots arrive whole from the `carrying` query (`carrying_snapshots`);
2. the acceptances of the batch's pairs are read in one query, what the feeds say about
   the batch's CVEs in one lookup (memoized per pass by the caller);
3. each snapshot is planned and decided in pure code (`plan_reassessment`, `decide`);
   an unchanged severity decides nothing and emits nothing;
4. the updates are compare-and-swapped in one unordered bulk write, each conditioned on
   the version it was decided against, with its outboxes in the same document update;
   one that lost to another writer is re-assessed alone (`OutboxPublisher.reassess`:
   load, decide, swap, publish, as any other re-assessment);
5. the batch's history entries, events, OCSF findings and state rows are published
   together, in the order of `OutboxPublisher.publish`, then pulled from the outboxes
   in one bulk write.

A crash anywhere after step 4 leaves the outboxes to the relay (same ids); one before
leaves nothing written. Either way the caller's CVE marks stay, and the next pass
decides again (idempotent).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import cast

from recon_stream.domain.acceptance import Acceptance
from recon_stream.domain.exposures import Assessor
from recon_stream.domain.snapshot import Outbox, Plan, Snapshot, Update, decide, plan_reassessment
from recon_stream.outbox import OutboxPublisher
from recon_stream.ports import AcceptanceBatches, AcceptanceStore, SnapshotBatches

BATCH = 500
"""Snapshots per batch: one bulk write of their swaps, one publish of their events."""


@dataclass(frozen=True)
class BatchReassessor:
    """Re-assesses batches of stored snapshots and publishes what changed; `outbox`
    supplies the assessment (its updater's feeds, policy and source), the sinks, the
    retries, and the per-snapshot path for conflicts."""

    snapshots: SnapshotBatches
    acceptances: AcceptanceBatches
    outbox: OutboxPublisher

    async def reassess(self, batch: Sequence[Snapshot], now: datetime) -> int:
        """Apply the acceptances in force at `now`, and the feeds as they are, to the
        batch's open exposures and publish what changed; returns how many snapshots
        were re-assessed (all of them)."""
        updates = await self.decide(batch, now)
        retrying = self.outbox.retrying
        swapped = (
            await retrying(
                "storing re-assessed snapshots", partial(self.snapshots.swap_many, updates)
            )
            if updates
            else []
        )
        await self.publish([u.outbox for u, won in zip(updates, swapped, strict=True) if won])
        for update, won in zip(updates, swapped, strict=True):
            if not won:  # another writer got there first: decide again on theirs, alone
                before = update.before
                await self.outbox.reassess(before.organization_id, before.ip, now)
        return len(batch)

    async def decide(self, batch: Sequence[Snapshot], now: datetime) -> list[Update]:
        """The batch's updates: what `SnapshotUpdater.reassess` would store for each
        snapshot as loaded (none for one whose severities and acceptances stay)."""
        plans = [plan for s in batch if (plan := plan_reassessment(s, now)) is not None]
        if not plans:
            return []
        retrying, updater = self.outbox.retrying, self.outbox.updater
        wanted = {(p.before.organization_id, p.before.ip) for p in plans if p.needs_acceptances}
        accepted = (
            await retrying("reading acceptances", partial(self.acceptances.acceptances_of, wanted))
            if wanted
            else {}
        )
        cves = frozenset().union(*(plan.cves for plan in plans))
        context = await retrying("reading the feeds", partial(updater.feeds.lookup, cves))
        judge = Assessor(updater.policy, context, updater.stale_after)
        return [
            update
            for plan in plans
            if (update := decide(plan, _of(accepted, plan), judge, source=updater.source))
        ]

    async def publish(self, outboxes: Sequence[Outbox]) -> int:
        """`OutboxPublisher.publish` for many outboxes at once: history, events, OCSF
        findings, state rows, then the outboxes cleared; returns events and rows sent."""
        outboxes = [o for o in outboxes if o.events or o.state]
        if not outboxes:
            return 0
        out = self.outbox
        events = [e for o in outboxes for e in o.events]
        rows = [r for o in outboxes for r in o.state] if out.state is not None else []
        if events:
            await out.retrying("recording history", partial(out.history.record, events))
            await out.retrying("publishing exposure events", partial(out.events.publish, events))
            if (ocsf := out.ocsf) is not None:
                await out.retrying("publishing OCSF findings", partial(ocsf.publish, events))
            counts = Counter((e.data.change.value, e.data.severity.value) for e in events)
            for labels, n in counts.items():
                out.metrics.exposure_events.labels(*labels).inc(n)
        if (state := out.state) is not None and rows:
            await out.retrying("publishing exposure state", partial(state.publish, rows))
        await out.retrying(
            "clearing the outboxes", partial(self.snapshots.published_many, outboxes)
        )
        return len(events) + len(rows)


def _of(accepted: dict[tuple[str, str], list[Acceptance]], plan: Plan) -> list[Acceptance]:
    return accepted.get((plan.before.organization_id, plan.before.ip), [])


def acceptance_batches(store: AcceptanceStore) -> AcceptanceBatches:
    """`store` itself where it reads many pairs at once, else one read per organization."""
    if callable(getattr(store, "acceptances_of", None)):
        return cast(AcceptanceBatches, store)
    return _PerOrganization(store)


@dataclass(frozen=True)
class _PerOrganization:
    store: AcceptanceStore

    async def acceptances_of(
        self, pairs: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], list[Acceptance]]:
        by_org = {org: await self.store.acceptances(org) for org in sorted({o for o, _ in pairs})}
        return {(org, ip): [a for a in by_org[org] if a.ip in (ip, None)] for org, ip in pairs}
