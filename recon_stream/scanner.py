"""The scanner stage: scan requests in, Shodan lookups, exposure events out.

Two halves, both on every scanner replica:

- `accept` (the Kafka handler) validates scan requests and moves them into the
  durable `scan_queue` (one item per IP), then the batch is committed.
- `run_lookups` loops claim the most urgent IP, reuse a fresh stored result or
  look it up within the shared rate budget, and apply the result to every
  organization whose agents report from that IP. Events are written to each
  snapshot's outbox in the same update and published afterwards; `run_relay`
  publishes whatever a crash left behind.

A rejected API key closes the `KeyGate`: lookups and the Kafka handler wait
(nothing is committed or dropped), readiness says why, and the key is checked
again periodically.

On-demand scans (`RECON_SHODAN_SCAN_CREDITS_PER_DAY` > 0): an IP someone asked to
rescan (a `rescan` command) first spends one of the day's credits (`ScanCredits`,
shared by every replica) on `POST /shodan/scan`, then waits in the queue between
polls (`RECON_SHODAN_SCAN_POLL_SECONDS`, claimed by nobody meanwhile) until Shodan
says DONE or `RECON_SHODAN_SCAN_TIMEOUT_SECONDS` pass; then its lookup is made, and
its events carry the scan (`data.scan`). Every submit and poll is a request of the
shared budget. A refusal of any kind (the day's credits spent, no credits, "recently
crawled", 401/403/400/404/429, an error) is counted and the plain lookup is made at
once; a request is never submitted twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from recon_stream import tracing
from recon_stream.attribution import Attribution
from recon_stream.dead_letters import DeadLetterSink, RawRecord, Rejected
from recon_stream.domain.messages import InvalidMessage, parse_message
from recon_stream.domain.scan_requests import MAX_SCAN_REQUEST_BYTES, ScanRequest
from recon_stream.domain.scans import HostScan, ScanRecord, ScanStatus
from recon_stream.metrics import Metrics
from recon_stream.outbox import OutboxPublisher
from recon_stream.ports import LookupStore, OrgDirectory, ScanCredits, ScanWork
from recon_stream.providers import (
    NotSent,
    Permanent,
    RateBudget,
    RateLimited,
    ReservedSlot,
    ScanningProvider,
    ScanRefused,
    ShodanProvider,
    Transient,
    Unauthorized,
)
from recon_stream.retry import Backoff, Retrier
from recon_stream.verifier import Verifier

if TYPE_CHECKING:
    from recon_stream.adapters.scan_queue import QueueItem

log = logging.getLogger(__name__)

T = TypeVar("T")

_validate_request = ScanRequest.__pydantic_validator__.validate_json


class KeyGate:
    """Open while the Shodan key is accepted; closed (with the reason) when rejected."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self.reason: str | None = None
        if metrics is not None:
            # Read at scrape time from the gate itself: no copy to keep in step.
            metrics.shodan_key_gauge().set_function(lambda: 1.0 if self.is_open else 0.0)

    def reject(self, reason: str) -> None:
        if self._open.is_set():
            log.error("lookups paused: %s", reason)
        self.reason = reason
        self._open.clear()

    def accept(self) -> None:
        if not self._open.is_set():
            log.warning("Shodan key accepted again; lookups resume")
        self.reason = None
        self._open.set()

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    async def wait(self) -> None:
        await self._open.wait()

    async def check(self) -> str | None:
        """Readiness check."""
        return self.reason


@dataclass
class OnDemandScans:
    """What rescans may spend on on-demand scans, and how they wait for them."""

    provider: ScanningProvider
    credits: ScanCredits
    poll: float = 60.0
    timeout: float = 21600.0
    used_today: int = 0
    """Sampled (`sample`), for readiness and the gauge."""
    credits_left: int | None = None
    """What Shodan last said (`credits_left` of a submit)."""

    def state(self) -> str:
        """Readiness state: the day's budget and what Shodan says is left."""
        left = "unknown" if self.credits_left is None else str(self.credits_left)
        return (
            f"on-demand scans: {self.used_today} of {self.credits.per_day} credits used "
            f"today (UTC); Shodan says {left} left"
        )

    async def sample(self, metrics: Metrics) -> None:
        self.used_today = await self.credits.used()
        metrics.shodan_scan_credits_used.set(self.used_today)


class ScannerService:
    def __init__(
        self,
        queue: ScanWork,
        provider: ShodanProvider,
        limiter: RateBudget,
        ip_scans: LookupStore,
        orgs: OrgDirectory,
        outbox: OutboxPublisher,
        dead_letters: DeadLetterSink,
        metrics: Metrics,
        retrying: Retrier,
        gate: KeyGate,
        *,
        reuse_age: float,
        lease: timedelta = timedelta(minutes=2),
        lookup_backoff: Backoff | None = None,
        tracer: Tracer | None = None,
        scans: OnDemandScans | None = None,
        verifier: Verifier | None = None,
        attribution: Attribution | None = None,
    ) -> None:
        self._tracer = tracer or tracing.tracer_from(None)
        self._queue = queue
        self._provider = provider
        self._limiter = limiter
        self._ip_scans = ip_scans
        self._orgs = orgs
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._backoff = retrying.backoff
        self._retrying = retrying
        self.outbox = outbox
        self._lookup_backoff = lookup_backoff or Backoff(2.0, 300.0)
        self.gate = gate
        self._reuse_age = reuse_age
        self._lease = lease
        self.scans = scans
        self.verifier = verifier
        self.attribution = attribution

    # -- the Kafka half ---------------------------------------------------------------

    async def accept(self, records: Sequence[RawRecord]) -> int:
        """Queue a batch of scan requests durably; returns how many were valid."""
        await self.gate.wait()
        requests: list[ScanRequest] = []
        traces: list[dict[str, str]] = []
        rejected: list[Rejected] = []
        for record in records:
            try:
                requests.append(
                    parse_message(_validate_request, record.value, MAX_SCAN_REQUEST_BYTES)
                )
                traces.append(tracing.carrier_of(record.headers))
            except InvalidMessage as error:
                rejected.append(Rejected.of(record, error))
        if rejected:
            await self._retrying("dead-lettering", lambda: self._dead_letters.publish(rejected))
            for r in rejected:
                self._metrics.dlq.labels(r.reason.value).inc()
        if requests:
            await self._retrying(
                "queueing scan requests", lambda: self._queue.enqueue(requests, traces)
            )
            for request in requests:
                self._metrics.scan_requests_received.labels(request.reason.value).inc()
        return len(requests)

    # -- the lookup half --------------------------------------------------------------

    async def run_lookups(self, idle_poll: float = 0.2) -> None:
        """Claim and process queue items until cancelled."""
        while True:
            await self.gate.wait()
            item: QueueItem | None = None
            try:
                item = await self._retrying(
                    "claiming a scan", lambda: self._queue.claim(self._lease)
                )
                if item is None:
                    await asyncio.sleep(idle_poll)
                    continue
                await self.process(item)
            except asyncio.CancelledError:
                if item is not None:
                    # Best effort: an unreleased claim simply expires.
                    await asyncio.shield(self._release_quietly(item))
                raise
            except Exception:
                log.exception("scan of %s failed; it will be retried", item.ip if item else "?")
                if item is not None:
                    await self._release_quietly(item, delay=self._backoff.maximum)
                await asyncio.sleep(1.0)

    async def _release_quietly(self, item: QueueItem, delay: float = 0.0) -> None:
        try:
            if delay:
                await self._queue.retry_later(item, delay)
            else:
                await self._queue.release(item)
        except Exception:  # the claim expires on its own
            log.warning("could not release the claim on %s; it will expire", item.ip)

    async def process(self, item: QueueItem) -> None:
        """Serve one IP: reuse or look up, then diff for every org behind it.

        Runs in a `recon.scan` span continuing the trace of the (first) request.
        """
        parent, links = tracing.parent_and_links(item.traces)
        with self._tracer.start_as_current_span(
            "recon.scan",
            context=parent,
            links=links,
            attributes={"recon.ip": item.ip, "recon.requests": item.seq},
        ) as span:
            try:
                await self._process(item)
            except Exception as error:
                tracing.fail(span, error)
                raise

    async def _process(self, item: QueueItem) -> None:
        record: ScanRecord | None = None
        checked = False
        if self.verifier is not None and item.manual and not item.scan_tried:
            # A rescan checks the reported ports first: seconds, not Shodan's days.
            checked = True
            stored = await self._retrying(
                "reading the stored lookup", lambda: self._ip_scans.get(item.ip)
            )
            if await self.verifier.agrees(stored) and self.scans is not None:
                self._metrics.shodan_scans.labels("verified_open").inc()
                item = await self._retrying(
                    "recording the scan", lambda: self._queue.scan_tried(item, None)
                )
        if self.scans is not None and item.manual:
            if not item.scan_tried:
                item = await self._submit_scan(item, self.scans)
            if item.scan is not None:
                record = await self._poll_scan(item, item.scan, self.scans)
                if record is None:
                    return  # polled again later
        scan = None if record is not None else await self._stored_if_fresh(item)
        if scan is None:
            scan = await self._look_up(item)
            if scan is None:
                return  # given back to the queue for later
            if record is not None:
                scan = self._after_scan(scan, record)
            stored = scan
            await self._retrying("storing the lookup", lambda: self._ip_scans.put(stored))
        else:
            self._metrics.lookups_saved.inc()
        await self.fan_out(scan)
        await self._retrying("completing the scan", lambda: self._queue.complete(item))
        if self.verifier is not None and not checked:
            self.verifier.after_lookup(scan)  # in the background: `opened` is already out

    # -- on-demand scans --------------------------------------------------------------

    async def _submit_scan(self, item: QueueItem, scans: OnDemandScans) -> QueueItem:
        """Spend a credit and submit a scan of the item's IP; on any refusal, record that
        none is to be asked again and go on to the plain lookup."""
        record: ScanRecord | None = None
        if not await self._retrying("taking a scan credit", lambda: scans.credits.take()):
            self._metrics.shodan_scans.labels("budget_spent").inc()
            log.info("no on-demand scan: today's RECON_SHODAN_SCAN_CREDITS_PER_DAY are spent")
        else:
            submitted_at = datetime.now(UTC)
            try:
                ticket = await self._budgeted(
                    lambda slot: scans.provider.submit_scan(item.ip, slot)
                )
            except ScanRefused as error:
                self._metrics.shodan_scans.labels(error.outcome).inc()
                log.warning("on-demand scan refused (%s); plain lookup instead", error)
            except (Transient, RateLimited, Permanent, Unauthorized) as error:
                self._metrics.shodan_scans.labels("error").inc()
                log.warning("on-demand scan failed (%s); plain lookup instead", error)
            else:
                self._metrics.shodan_scans.labels("submitted").inc()
                if ticket.credits_left is not None:
                    scans.credits_left = ticket.credits_left
                    self._metrics.shodan_scan_credits_left.set(ticket.credits_left)
                record = ScanRecord(
                    id=ticket.id, submitted_at=submitted_at, status=ScanStatus.SUBMITTING
                )
        chosen = record
        return await self._retrying(
            "recording the scan", lambda: self._queue.scan_tried(item, chosen)
        )

    async def _poll_scan(
        self, item: QueueItem, record: ScanRecord, scans: OnDemandScans
    ) -> ScanRecord | None:
        """The scan as its lookup should record it, when the lookup is due (DONE, timed
        out, or lost); None when the item was given back to poll again later."""
        waited = (datetime.now(UTC) - record.submitted_at).total_seconds()
        if waited >= scans.timeout:
            self._metrics.shodan_scans.labels("timed_out").inc()
            return record.model_copy(update={"status": ScanStatus.TIMED_OUT})
        try:
            status = await self._budgeted(lambda slot: scans.provider.scan_status(record.id, slot))
        except ScanRefused as error:
            self._metrics.shodan_scans.labels(error.outcome).inc()
            log.warning("on-demand scan lost (%s); plain lookup instead", error)
            return record
        except (Transient, RateLimited, Permanent, Unauthorized) as error:
            log.warning("polling an on-demand scan failed (%s); polled again later", error)
            status = record.status
        if status is ScanStatus.DONE:
            self._metrics.shodan_scans.labels("done").inc()
            return record.model_copy(update={"status": status})
        polling = record.model_copy(update={"status": status})
        delay = min(scans.poll, max(0.0, scans.timeout - waited))
        await self._retrying(
            "waiting for the scan", lambda: self._queue.poll_later(item, polling, delay)
        )
        return None

    def _after_scan(self, scan: HostScan, record: ScanRecord) -> HostScan:
        if record.status is ScanStatus.DONE:
            newest = max(
                (s.shodan_timestamp for s in scan.services if s.shodan_timestamp), default=None
            )
            if newest is None or _aware(newest) <= _aware(record.submitted_at):
                # DONE means picked up, not crawled: users report old records hours later.
                self._metrics.shodan_scans.labels("stale_after_done").inc()
        return scan.model_copy(update={"scan": record})

    async def _budgeted(self, call: Callable[[ReservedSlot], Awaitable[T]]) -> T:
        """`call` with a slot of the shared budget (a new slot if it was missed)."""
        while True:
            slot = await self._limiter.reserve()
            try:
                return await call(slot)
            except NotSent:
                self._metrics.slots_missed.inc()

    async def _stored_if_fresh(self, item: QueueItem) -> HostScan | None:
        stored = await self._retrying(
            "reading the stored lookup", lambda: self._ip_scans.get(item.ip)
        )
        if stored is None:
            return None
        if item.forced:
            # A forced request wants a lookup made after it was asked for, not a new one
            # per request: the scheduler asks once per org behind an IP, and a request
            # that reaches the queue after that lookup finished must not repeat it.
            asked = item.requested_at
            return stored if asked is not None and stored.queried_at >= asked else None
        age = (datetime.now(UTC) - stored.queried_at).total_seconds()
        if age < self._reuse_age:
            return stored
        # Shared egress (a SASE exit behind dozens of organizations) is looked up at most
        # once per rescan interval: a newcomer on it is told nothing anyway.
        if (
            age < self._ip_scans.rescan_interval
            and self.attribution is not None
            and await self.attribution.shared(item.ip)
        ):
            return stored
        return None

    async def _look_up(self, item: QueueItem) -> HostScan | None:
        reserved = time.monotonic()
        with self._tracer.start_as_current_span(
            "shodan.lookup",
            kind=SpanKind.CLIENT,
            attributes={"recon.shodan.provider": self._provider.name},
        ) as span:
            while True:
                slot = await self._limiter.reserve()
                try:
                    return await self._timed_lookup(item, span, slot, reserved)
                except NotSent:
                    # Late for its slot (a busy loop or core): the slot stays unused.
                    self._metrics.slots_missed.inc()

    async def _timed_lookup(
        self, item: QueueItem, span: Span, slot: ReservedSlot, reserved: float
    ) -> HostScan | None:
        outcome = "ok"
        try:
            scan = await self._provider.lookup(item.ip, slot)
            if not scan.services:
                outcome = "not_found"
            return scan
        except NotSent:
            outcome = "not_sent"
            raise
        except Unauthorized as error:
            outcome = "unauthorized"
            self.gate.reject(f"Shodan rejected the API key ({error}); lookups paused")
            await self._queue.release(item)
            return None
        except (RateLimited, Transient) as error:
            outcome = "rate_limited" if isinstance(error, RateLimited) else "transient"
            delay = self._lookup_backoff.delay(item.attempts)
            if isinstance(error, RateLimited) and error.retry_after:
                delay = max(delay, error.retry_after)
            log.warning("lookup of an IP failed (%s); retry in %.1fs", outcome, delay)
            await self._queue.retry_later(item, delay)
            return None
        except Permanent as error:
            # Asking again soon would only spend budget on the same refusal; the item
            # waits a rescan interval, recorded and counted, while other IPs go on.
            outcome = "permanent"
            delay = self._ip_scans.rescan_interval
            log.warning("lookup of an IP refused (%s); asked again in %.0fs", error, delay)
            await self._queue.retry_later(item, delay, error=str(error))
            return None
        finally:
            if outcome != "not_sent":
                self._record(span, outcome, reserved, slot.entered_at)

    def _record(self, span: Span, outcome: str, reserved: float, sent: float | None) -> None:
        """Metrics and span attributes of a request that was sent (or timed out waiting)."""
        now = time.monotonic()
        sent = now if sent is None else sent
        span.set_attribute("recon.rate_wait", sent - reserved)
        span.set_attribute("recon.shodan.outcome", outcome)
        if outcome not in ("ok", "not_found"):
            span.set_status(Status(StatusCode.ERROR, outcome))
        self._metrics.rate_wait.observe(sent - reserved)
        self._metrics.shodan_requests.labels(self._provider.name, outcome).inc()
        self._metrics.shodan_latency.labels(self._provider.name).observe(now - sent)

    async def fan_out(self, scan: HostScan) -> int:
        """Apply a lookup to every org behind its IP and publish the events."""
        orgs = await self._retrying(
            "reading the orgs behind an IP", lambda: self._orgs.orgs_behind(scan.ip)
        )
        sent = 0
        for org in orgs:
            if self.attribution is not None and not await self.attribution.judge_lookup(
                org.organization_id, scan
            ):
                continue  # the scope file excludes the ASN it names: closed, not applied
            outbox = await self._retrying(
                "updating the exposure snapshot",
                lambda org=org: self.outbox.updater.apply(org, scan),  # type: ignore[misc]
            )
            sent += await self.outbox.publish(outbox)
        return sent

    async def relay_once(self, limit: int = 100) -> int:
        """Publish events a crash left in outboxes; returns how many."""
        return await self.outbox.relay_once(limit)

    async def run_relay(self, interval: float) -> None:
        await self.outbox.run_relay(interval)

    async def _check_key(self) -> None:
        # The check is a request too: it spends from the same budget.
        await self._budgeted(self._provider.check_key)

    async def run_key_checks(self, interval: float) -> None:
        """Check the key at start and, while it is rejected, every `interval` seconds."""
        first = True
        while True:
            if first or not self.gate.is_open:
                first = False
                try:
                    await self._check_key()
                    self.gate.accept()
                except Unauthorized as error:
                    self.gate.reject(f"Shodan rejected the API key ({error}); lookups paused")
                except (RateLimited, Transient, Permanent):
                    pass  # says nothing about the key
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("checking the Shodan key failed")
            await asyncio.sleep(interval)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
