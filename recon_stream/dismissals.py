"""Dismissals: an organization's "this IP is not ours" (a home office, a hotel).

Part of the commands stage (`dismiss`, `undismiss`) and of the scheduler role, whose
leader ends dismissals past their `expires_at` every tick.

- `dismiss` puts the dismissal on record with who, when and why, makes the pair
  `dismissed` (whatever it was: active, excluded, shared egress, retired), closes its
  open exposures (reason `dismissed`) and keeps a history entry. No lookup is made on
  the organization's behalf, and nothing more is reported to it on that IP; a
  heartbeat leaves the status as it is. Dismissing again updates the reason and expiry.
- `undismiss` (or the expiry) makes the pair `active` again, or `excluded` when the
  scope file excludes it, with its scan request due at once: the IP is looked up for
  the organization afresh. An IP not dismissed: `no_effect`.

Each step is idempotent, so a command redelivered after a crash finishes the job: the
dismissal is stored first, then the exposures close, then the history entry is kept
(by the command's id).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial

from recon_stream.domain.pairs import Dismissal, DismissalEntry, PairStatus
from recon_stream.domain.scope import Scope
from recon_stream.outbox import OutboxPublisher
from recon_stream.ports import DismissalHistory, Dismissals

log = logging.getLogger(__name__)

BATCH = 100


class Dismissing:
    def __init__(
        self,
        store: Dismissals,
        history: DismissalHistory,
        scope: Scope,
        outbox: OutboxPublisher,
    ) -> None:
        self._store = store
        self._history = history
        self._scope = scope
        self._outbox = outbox

    async def known(self, organization_id: str, ip: str) -> bool:
        """Whether the organization's agents ever reported the IP."""
        status = await self._outbox.retrying(
            "reading a pair's status", partial(self._store.status_of, organization_id, ip)
        )
        return status is not None

    async def dismiss(self, dismissal: Dismissal) -> bool:
        """Dismiss the pair and close its open exposures; False when the organization
        never reported the IP (nothing done)."""
        retrying = self._outbox.retrying
        before = await retrying("storing a dismissal", partial(self._store.dismiss, dismissal))
        if before is None:
            return False
        # Also when it was dismissed already: a redelivery finishes what a crash cut short.
        outbox = await retrying(
            "closing exposures",
            partial(
                self._outbox.updater.retire,
                dismissal.organization_id,
                dismissal.ip,
                datetime.now(UTC),
                PairStatus.DISMISSED,
            ),
        )
        await self._outbox.publish(outbox)
        await retrying(
            "recording a dismissal in history",
            partial(self._history.record_dismissal, DismissalEntry.started(dismissal)),
        )
        log.info("an IP was dismissed by its organization (%s)", dismissal.requested_by)
        return True

    async def undismiss(self, entry: DismissalEntry, only: str | None = None) -> bool:
        """End the pair's dismissal (`entry` says who, when and why); False when it was not
        dismissed (or, with `only`, not by that command)."""
        retrying = self._outbox.retrying
        org, ip = entry.organization_id, entry.ip
        status = await retrying("reading a pair's status", partial(self._store.status_of, org, ip))
        if status is not PairStatus.DISMISSED:
            return False
        # The entry first: the status change is the step a redelivery can no longer see.
        await retrying(
            "recording a dismissal in history", partial(self._history.record_dismissal, entry)
        )
        excluded = self._scope.excluded(org, ip)
        after, why = (
            (PairStatus.EXCLUDED, excluded)
            if excluded is not None
            else (PairStatus.ACTIVE, entry.change.value)
        )
        ended = await retrying(
            "ending a dismissal",
            partial(self._store.undismiss, org, ip, after, why, entry.at, only),
        )
        if ended is not None:
            log.info("a dismissal ended (%s); the pair is %s", entry.change.value, after.value)
        return ended is not None

    async def expire(self, now: datetime) -> int:
        """End the dismissals past their expiry; how many."""
        expired = await self._outbox.retrying(
            "finding expired dismissals", partial(self._store.expired_dismissals, now, BATCH)
        )
        ended = 0
        for dismissal in expired:
            entry = DismissalEntry.expired(dismissal, now)
            ended += await self.undismiss(entry, only=dismissal.command_id)
        return ended

    async def run(self, tick: float, leading: Callable[[], bool]) -> None:
        """End expired dismissals every `tick` seconds while this replica leads."""
        while True:
            if leading():
                try:
                    for _ in range(100):  # a bounded catch-up; the next tick goes on
                        if await self.expire(datetime.now(UTC)) < BATCH:
                            break
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("ending expired dismissals failed; the next tick tries again")
            await asyncio.sleep(tick)
