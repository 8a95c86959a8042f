"""Keeping the vulnerability feeds fresh: one replica (the scheduler's leader) at a time.

Every `tick` the leader looks at each configured feed (`RECON_KEV_SOURCE`,
`RECON_EPSS_SOURCE`): one whose last good copy is older than the refresh interval
(a day by default) is fetched again; one whose last attempt failed is tried again
after `retry` seconds. A failure keeps the last good copy, is counted, and shows
in `/readyz`'s states; it never blocks scanning (lookups read whatever copy there is).

Re-rating: a refresh marks the CVEs whose KEV listing or EPSS score it changed (a
first load: every CVE it lists; see `adapters.vuln_feeds`). After the refreshes of
every tick (`SETTLE_SECONDS` after a refresh that changed something, for lookups
in flight to store what they decided), the leader re-assesses, from its stored
snapshot and without a lookup,
every open exposure carrying a marked CVE, in batches of `rerating.BATCH` snapshots
(`parallel` batches at a time; `rerating.BatchReassessor`), which emits
`changed[severity]` where a severity changed, then unmarks those CVEs. The marks are
the crash safety: a leader that dies half-way leaves them, and the next one
re-assesses again (idempotent: an unchanged severity emits nothing).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from functools import partial

from recon_stream.domain.snapshot import Snapshot
from recon_stream.domain.vulns import Feed, FeedError, FeedStatus, VulnContext
from recon_stream.metrics import Metrics
from recon_stream.outbox import OutboxPublisher
from recon_stream.ports import FeedCopies, SnapshotBatches, VulnContextSource
from recon_stream.rerating import BATCH, BatchReassessor, acceptance_batches

RERATE_CVES = 1000
"""Marked CVEs re-assessed per round (one `carrying` query each)."""
SETTLE_SECONDS = 5.0
"""After a refresh, how long the re-rating waits for lookups in flight: a lookup that
read the feeds just before the new copy was written stores its snapshot a round trip
later; one whose store conflicts with ours decides again on the new copy. Waiting
lets the `carrying` query see what such lookups stored."""

log = logging.getLogger(__name__)


class FeedRefresher:
    def __init__(
        self,
        feeds: FeedCopies,
        sources: dict[Feed, str],
        metrics: Metrics,
        *,
        every: float,
        retry: float,
        snapshots: SnapshotBatches,
        outbox: OutboxPublisher,
        parallel: int = 32,
        batch: int = BATCH,
    ) -> None:
        self._feeds = feeds
        self._snapshots = snapshots
        self._outbox = outbox
        self._parallel = parallel
        self._batch = batch
        self._sources = sources
        self._metrics = metrics
        self._every = timedelta(seconds=every)
        self._retry = timedelta(seconds=retry)
        self.states: dict[str, str] = {feed: "not loaded yet" for feed in sources}

    async def refresh_due(self, now: datetime | None = None) -> list[Feed]:
        """Refresh the feeds that are due; returns those refreshed successfully."""
        now = now or datetime.now(UTC)
        done: list[Feed] = []
        for feed, source in self._sources.items():
            status = await self._feeds.status(feed)
            if not self._due(status, now):
                continue
            try:
                count = await self._feeds.refresh(feed, source)
            except FeedError as error:
                self._metrics.vuln_feed_failures.labels(feed).inc()
                self.states[feed] = _failing(str(error), status.loaded_at)
                log.warning("%s, will retry", self.states[feed].removeprefix("failing: "))
                continue
            self.states[feed] = f"ok: {count} CVEs loaded {now.isoformat(timespec='seconds')}"
            log.info("%s feed refreshed: %d CVEs", feed, count)
            done.append(feed)
        return done

    async def rerate(self, now: datetime | None = None) -> int:
        """Re-assess the open exposures carrying CVEs a refresh changed, until none is
        marked; returns how many snapshots were re-assessed."""
        retrying = self._outbox.retrying
        done = 0
        while cves := await retrying(
            "reading changed CVEs", lambda: self._feeds.marked(RERATE_CVES)
        ):
            at = now or datetime.now(UTC)
            done += await self._reassess_carrying(cves, at)
            await retrying("unmarking re-assessed CVEs", partial(self._feeds.unmark, cves))
        if done:
            log.info("re-assessed %d snapshots after a KEV or EPSS change", done)
        return done

    async def _reassess_carrying(self, cves: list[str], now: datetime) -> int:
        batches: asyncio.Queue[list[Snapshot] | None] = asyncio.Queue(maxsize=self._parallel)
        done = 0
        # Every snapshot of the pass asks the feeds about the same few CVEs: read each once.
        updater = self._outbox.updater
        outbox = dataclasses.replace(
            self._outbox, updater=dataclasses.replace(updater, feeds=_Remembered(updater.feeds))
        )
        reassessor = BatchReassessor(
            self._snapshots, acceptance_batches(updater.acceptances), outbox
        )

        async def work() -> None:
            nonlocal done
            while (batch := await batches.get()) is not None:
                await reassessor.reassess(batch, now)
                self._metrics.vuln_reassessments.inc(len(batch))
                done += len(batch)

        async with asyncio.TaskGroup() as group:
            for _ in range(self._parallel):
                group.create_task(work())
            # A failure cancels the workers with the group: no sentinel needed then.
            batch: list[Snapshot] = []
            async for snapshot in self._snapshots.carrying_snapshots(cves):
                batch.append(snapshot)
                if len(batch) >= self._batch:
                    await batches.put(batch)
                    batch = []
            if batch:
                await batches.put(batch)
            for _ in range(self._parallel):
                await batches.put(None)
        return done

    def _due(self, status: FeedStatus, now: datetime) -> bool:
        if status.error is not None and status.attempted_at is not None:
            return now - status.attempted_at >= self._retry
        return status.loaded_at is None or now - status.loaded_at >= self._every

    async def sample(self) -> None:
        """Gauges: the age of each feed's last good copy, the changes not re-rated yet."""
        now = datetime.now(UTC)
        self._metrics.vuln_rerate_pending.set(len(await self._feeds.marked(RERATE_CVES)))
        for feed in self._sources:
            status = await self._feeds.status(feed)
            if status.loaded_at is not None:
                age = (now - status.loaded_at).total_seconds()
                self._metrics.vuln_feed_age.labels(feed).set(age)
            if status.error is not None and feed in self.states:
                # Another replica's failure reads as this one's own would.
                self.states[feed] = _failing(f"{feed} feed: {status.error}", status.loaded_at)

    async def run(self, tick: float, leading: Callable[[], bool]) -> None:
        """Refresh due feeds every `tick` seconds while `leading()`, then re-assess what
        their changes (or a previous leader's unfinished ones) touch, until cancelled."""
        while True:
            if leading():
                try:
                    if await self.refresh_due() and await self._feeds.marked(1):
                        await asyncio.sleep(SETTLE_SECONDS)
                    await self.rerate()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("refreshing the vulnerability feeds failed; will try again")
            await asyncio.sleep(tick)


class _Remembered:
    """The feeds' context for one re-rating pass, read once per CVE. The copy does not
    change during a pass: the leader refreshes between passes. (Should a new leader
    refresh meanwhile, its change is marked and re-rated in its own pass.)"""

    def __init__(self, source: VulnContextSource) -> None:
        self._source = source
        self._known: dict[str, VulnContext | None] = {}

    async def lookup(self, cves: Iterable[str]) -> dict[str, VulnContext]:
        wanted = set(cves)
        if missing := wanted - self._known.keys():
            found = await self._source.lookup(missing)
            self._known.update((cve, found.get(cve)) for cve in missing)
        return {cve: known for cve in wanted if (known := self._known[cve]) is not None}


def _failing(error: str, loaded_at: datetime | None) -> str:
    kept = loaded_at.isoformat(timespec="seconds") if loaded_at else "(none)"
    return f"failing: {error}; keeping the copy loaded {kept}"
