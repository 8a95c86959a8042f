"""Publishing what a snapshot update left in its outboxes, shared by every stage that
updates snapshots (the scanner, its relay, the scheduler, the commands).

For one (organization, IP), in this order, each step retried until it succeeds:

1. history entries (MongoDB `exposure_history`, idempotent by event id),
2. the events (Kafka `recon.exposures.v1`), then the same events as OCSF findings
   (`recon.exposures.ocsf.v1`, same ids) when the OCSF topic is configured,
3. the state rows (Kafka `recon.exposure-state.v1`, compacted; a tombstone for a
   closed exposure), when the state topic is configured,
4. then both are pulled from the outboxes.

A crash anywhere repeats the steps from the start with the same ids: a history
entry is never without its event for longer than the relay takes, an event is
never without its history entry, and the state topic ends at the table.

The relay leaves alone outboxes written in the last `RELAY_GRACE` seconds: their
writer is publishing them right now, and racing it would only duplicate events.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial

from recon_stream.domain.snapshot import Outbox
from recon_stream.metrics import Metrics
from recon_stream.ports import EventSink, HistoryLog, OutboxStore, StateSink
from recon_stream.retry import Retrier, drain_every
from recon_stream.snapshots import SnapshotUpdater

log = logging.getLogger(__name__)

RELAY_GRACE = 5.0
PARALLEL_IPS = 16


@dataclass(frozen=True)
class OutboxPublisher:
    """Publishes outboxes; `state` (`ocsf`) None when the state (OCSF) topic is off."""

    outboxes: OutboxStore
    history: HistoryLog
    updater: SnapshotUpdater
    events: EventSink
    state: StateSink | None
    metrics: Metrics
    retrying: Retrier
    ocsf: EventSink | None = None

    async def publish(self, outbox: Outbox) -> int:
        """Publish one update's outbox; returns how many events and state rows."""
        events, rows = outbox.events, outbox.state if self.state is not None else []
        if not events and not outbox.state:
            return 0
        outboxes, state, history = self.outboxes, self.state, self.history
        if events:
            await self.retrying("recording history", lambda: history.record(events))
            await self.retrying("publishing exposure events", lambda: self.events.publish(events))
            if (ocsf := self.ocsf) is not None:
                await self.retrying("publishing OCSF findings", lambda: ocsf.publish(events))
            for event in events:
                self.metrics.exposure_events.labels(
                    event.data.change.value, event.data.severity.value
                ).inc()
        if state is not None and rows:
            await self.retrying("publishing exposure state", lambda: state.publish(rows))
        ids = [e.id for e in events]
        await self.retrying(
            "clearing the outbox",
            lambda: outboxes.published(outbox.organization_id, outbox.ip, ids, outbox.state),
        )
        return len(events) + len(rows)

    async def reassess(self, organization_id: str, ip: str | None, now: datetime) -> None:
        """Apply the acceptances in force at `now` to the org's exposures on `ip` (None:
        on every IP with a snapshot) and publish what changed."""
        updater = self.updater
        ips = [ip] if ip is not None else []
        if ip is None:
            ips = await self.retrying(
                "reading the org's IPs", partial(updater.snapshots.ips_of, organization_id)
            )

        async def one(ip: str) -> None:
            outbox = await self.retrying(
                "applying acceptances", partial(updater.reassess, organization_id, ip, now)
            )
            await self.publish(outbox)

        # IPs are independent snapshots: a few at a time, not one round trip after another.
        for start in range(0, len(ips), PARALLEL_IPS):
            await asyncio.gather(*(one(ip) for ip in ips[start : start + PARALLEL_IPS]))

    async def relay_once(self, limit: int = 100) -> int:
        """Publish what a crash left in outboxes; returns how many events and rows."""
        settled = datetime.now(UTC) - timedelta(seconds=RELAY_GRACE)
        pending = await self.retrying(
            "reading the outbox", lambda: self.outboxes.unpublished(limit, settled)
        )
        sent = 0
        for outbox in pending:
            sent += await self.publish(outbox)
        if sent:
            log.info("relayed %d exposure events and state rows left in outboxes", sent)
        return sent

    async def run_relay(self, interval: float) -> None:
        await drain_every(interval, self.relay_once, "exposure relay")
