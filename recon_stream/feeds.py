"""Keeping the vulnerability feeds fresh: one replica (the scheduler's leader) at a time.

Every `tick` the leader looks at each configured feed (`RECON_KEV_SOURCE`,
`RECON_EPSS_SOURCE`): one whose last good copy is older than the refresh interval
(a day by default) is fetched again; one whose last attempt failed is tried again
after `retry` seconds. A failure keeps the last good copy, is counted, and shows
in `/readyz`'s states; it never blocks scanning (lookups read whatever copy there is).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from recon_stream.domain.vulns import Feed, FeedError, FeedStatus
from recon_stream.metrics import Metrics
from recon_stream.ports import FeedCopies

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
    ) -> None:
        self._feeds = feeds
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

    def _due(self, status: FeedStatus, now: datetime) -> bool:
        if status.error is not None and status.attempted_at is not None:
            return now - status.attempted_at >= self._retry
        return status.loaded_at is None or now - status.loaded_at >= self._every

    async def sample(self) -> None:
        """Gauges: the age of each feed's last good copy."""
        now = datetime.now(UTC)
        for feed in self._sources:
            status = await self._feeds.status(feed)
            if status.loaded_at is not None:
                age = (now - status.loaded_at).total_seconds()
                self._metrics.vuln_feed_age.labels(feed).set(age)
            if status.error is not None and feed in self.states:
                # Another replica's failure reads as this one's own would.
                self.states[feed] = _failing(f"{feed} feed: {status.error}", status.loaded_at)

    async def run(self, tick: float, leading: Callable[[], bool]) -> None:
        """Refresh due feeds every `tick` seconds while `leading()`, until cancelled."""
        while True:
            if leading():
                try:
                    await self.refresh_due()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("refreshing the vulnerability feeds failed; will try again")
            await asyncio.sleep(tick)


def _failing(error: str, loaded_at: datetime | None) -> str:
    kept = loaded_at.isoformat(timespec="seconds") if loaded_at else "(none)"
    return f"failing: {error}; keeping the copy loaded {kept}"
