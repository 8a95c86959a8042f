"""The ingest stage: heartbeats in, `org_ips` upserts and scan requests out.

Per batch: validate every record (bad ones to the DLQ), drop non-public
addresses, fold the rest by (organization, IP), skip pairs written recently,
upsert the others in one unordered bulk write, and announce each pair that did
not exist before with one scan request. The subscriber commits the batch only
after all of that succeeded (see `recon_stream.retry` for what is retried).

The scope file (`RECON_SCOPE_FILE`, read at start) is checked for a pair new to
this worker only (a miss of the seen-pairs cache; known pairs never pay for it):
an excluded one is counted `excluded` and stored with status `excluded` and the
scope's reason, and never requested (its stored request is `none`, which the
relay does not send either).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Link, Span, Tracer

from recon_stream import tracing
from recon_stream.dead_letters import DeadLetterSink, RawRecord, Rejected
from recon_stream.domain.addresses import AddressClass, InvalidAddress, parse_address
from recon_stream.domain.heartbeats import (
    Heartbeat,
    InvalidHeartbeat,
    Prevalidated,
    observed_time,
    parse_heartbeat,
    prevalidate,
)
from recon_stream.domain.messages import RejectReason
from recon_stream.domain.scan_requests import ScanReason, ScanRequest
from recon_stream.domain.scope import EMPTY_SCOPE, Scope
from recon_stream.domain.sightings import PairKey, PairSighting
from recon_stream.metrics import Metrics
from recon_stream.ports import Created, OrgIpStore, ScanRequestSink
from recon_stream.retry import Backoff, Retrier, drain_every
from recon_stream.seen import SeenEntry, SeenKey, SeenPairs

log = logging.getLogger(__name__)
T = TypeVar("T")

TRIAGE_SLICE = 250
"""Records triaged between two turns of the event loop (about 0.5 ms of work)."""

WRITE_CHUNK = 500
"""Pairs per upsert; a batch's chunks are written and announced side by side."""


@dataclass(slots=True)
class BatchReport:
    """What one batch did (returned for tests and logs)."""

    records: int = 0
    accepted: int = 0
    duplicate: int = 0
    non_public: int = 0
    invalid: int = 0
    excluded: int = 0
    """Heartbeats of pairs new to the worker that the scope file excludes."""
    written: int = 0
    created: list[PairKey] = field(default_factory=list)


@dataclass(slots=True)
class _Pending:
    sighting: PairSighting
    cache: list[tuple[SeenKey, SeenEntry]]
    origin: RawRecord
    """The batch's first heartbeat of the pair: its trace continues if the pair is new."""
    excluded: str | None = None
    """The scope's reason when the pair was new to the worker and is excluded."""


def _now() -> datetime:
    return datetime.now(UTC)


def _parse_or_reject(record: RawRecord, rejected: list[Rejected]) -> Heartbeat | None:
    try:
        return parse_heartbeat(record.value)
    except InvalidHeartbeat as error:
        rejected.append(Rejected.of(record, error))
        return None


async def _concurrently(coroutines: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Await them side by side; on the first error cancel the rest and raise it as is."""
    if len(coroutines) == 1:
        return [await coroutines[0]]
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class IngestService:
    """Turns heartbeat batches into `org_ips` writes and scan requests."""

    def __init__(
        self,
        store: OrgIpStore,
        scan_requests: ScanRequestSink,
        dead_letters: DeadLetterSink,
        seen: SeenPairs,
        metrics: Metrics,
        backoff: Backoff,
        *,
        clock: Callable[[], datetime] = _now,
        on_outage: Callable[[str, BaseException], None] | None = None,
        on_recovery: Callable[[], None] | None = None,
        tracer: Tracer | None = None,
        scope: Scope = EMPTY_SCOPE,
    ) -> None:
        self._tracer = tracer or tracing.tracer_from(None)
        self._scope = scope
        self._store = store
        self._scan_requests = scan_requests
        self._dead_letters = dead_letters
        self._seen = seen
        self._metrics = metrics
        self._clock = clock
        self._retrying = Retrier(backoff, metrics, on_outage, on_recovery)
        self._marking: asyncio.Task[None] | None = None

    def _triage(
        self,
        records: Sequence[RawRecord],
        report: BatchReport,
        rejected: list[Rejected],
        pairs: dict[PairKey, _Pending],
    ) -> None:
        """Validate and classify; add the rejects and the pairs needing a write.

        This is the hot path: a heartbeat whose pair, agent and site were
        written recently costs one JSON parse, a few checks and one dict
        lookup; only the others go through the full pydantic validation.
        """
        seen = self._seen
        lookup = seen.get
        fresh_after = seen.fresh_after()
        public = AddressClass.PUBLIC
        non_public: dict[AddressClass, int] = {}
        hits = 0
        excluded_by = self._scope.excluded
        for record in records:
            hb: Heartbeat | None = None
            known: Heartbeat | Prevalidated | None = prevalidate(record.value)
            if known is None:
                hb = _parse_or_reject(record, rejected)
                if hb is None:
                    continue
                known = hb
            cache_key = (known.organization_id, known.public_ip)
            entry = lookup(cache_key)
            if (
                entry is not None
                and entry.written_at > fresh_after
                and known.agent_id in entry.agents
                and (known.site_id is None or known.site_id in entry.sites)
            ):
                # Every value the cache holds passed `parse_heartbeat`: after
                # the pre-check, a hit on all four identity values completes
                # this heartbeat's validation.
                hits += 1
                continue
            if hb is None:
                hb = _parse_or_reject(record, rejected)
                if hb is None:
                    continue
            new = entry is None
            if entry is None:
                try:
                    address = parse_address(hb.public_ip)
                except InvalidAddress as error:
                    rejected.append(
                        Rejected(record, RejectReason.INVALID_IP, f"public_ip: {error}")
                    )
                    continue
                entry = seen.remember(cache_key, address.cls, address.text)
            if entry.address_class is not public:
                non_public[entry.address_class] = non_public.get(entry.address_class, 0) + 1
                continue
            observed = observed_time(hb)
            pair_key = (hb.organization_id, entry.ip)
            pending = pairs.get(pair_key)
            if pending is None:
                sighting = PairSighting(hb.organization_id, entry.ip, observed, observed)
                # The scope is asked about pairs new to this worker only (a miss); the
                # answer stays with the cache entry for the pair's later heartbeats.
                if new:
                    entry.excluded = excluded_by(hb.organization_id, entry.ip)
                reason = entry.excluded
                pending = pairs[pair_key] = _Pending(sighting, [(cache_key, entry)], record, reason)
            elif all(key != cache_key for key, _ in pending.cache):
                # Another spelling of the same address (e.g. IPv6 case).
                pending.cache.append((cache_key, entry))
            pending.sighting.add(hb, observed)
        for cls, count in non_public.items():
            self._metrics.non_public.labels(cls.value).inc(count)
            report.non_public += count
        report.invalid = len(rejected)
        report.duplicate += hits
        self._metrics.cache_hits.inc(hits)

    async def handle_batch(self, records: Sequence[RawRecord]) -> BatchReport:
        """Process one batch; returns only when everything it owes is durable."""
        started = time.perf_counter()
        report = BatchReport(records=len(records))
        rejected: list[Rejected] = []
        pairs: dict[PairKey, _Pending] = {}
        for start in range(0, len(records), TRIAGE_SLICE):
            if start:
                # Triage never awaits: without this, the consumer's fetches
                # would only be sent and read between batches, and the next
                # batch would often wait for its records.
                await asyncio.sleep(0)
            self._triage(records[start : start + TRIAGE_SLICE], report, rejected, pairs)

        # Every pair left needs a write: it is new, stale, or has a new agent or site.
        to_write = list(pairs.values())
        for pending in to_write:
            if pending.excluded is not None:
                report.excluded += pending.sighting.heartbeats
            else:
                report.accepted += 1
                report.duplicate += pending.sighting.heartbeats - 1
            self._metrics.cache_misses.inc(pending.sighting.heartbeats)

        if rejected:
            await self._retrying("dead-lettering", lambda: self._dead_letters.publish(rejected))
            for r in rejected:
                self._metrics.dlq.labels(r.reason.value).inc()
                log.info(
                    "heartbeat rejected to DLQ: %s (%s) at %s/%d@%d",
                    r.reason.value,
                    r.detail[:200],
                    r.record.topic,
                    r.record.partition,
                    r.record.offset,
                )

        if to_write:
            await self._write(to_write, report)

        m = self._metrics
        m.heartbeats.labels("accepted").inc(report.accepted)
        m.heartbeats.labels("duplicate").inc(report.duplicate)
        m.heartbeats.labels("non_public").inc(report.non_public)
        m.heartbeats.labels("invalid").inc(report.invalid)
        m.heartbeats.labels("excluded").inc(report.excluded)
        m.cache_entries.set(len(self._seen))
        m.batch_size.observe(len(records))
        m.batch_duration.observe(time.perf_counter() - started)
        return report

    async def _write(self, to_write: list[_Pending], report: BatchReport) -> None:
        now = self._clock()
        chunks = [to_write[i : i + WRITE_CHUNK] for i in range(0, len(to_write), WRITE_CHUNK)]
        # Chunks go side by side: while MongoDB applies one, the scan requests
        # of another are on their way to Kafka (one chunk after the other, the
        # worker and the database took turns waiting for each other).
        created: Created = {}
        for done in await _concurrently([self._write_chunk(c, now) for c in chunks]):
            created.update(done)
        report.written = len(to_write)
        if created:
            report.created = sorted(created)
            await self._mark_sent_later(list(created.values()), now)

    async def _write_chunk(self, chunk: list[_Pending], now: datetime) -> Created:
        """Upsert the chunk and announce the pairs it created; returns those."""
        sightings = [p.sighting for p in chunk]
        excluded = {p.sighting.key: p.excluded for p in chunk if p.excluded is not None}
        if excluded:
            created = await self._retrying(
                "upserting org_ips", lambda: self._store.record(sightings, now, excluded)
            )
            # Created excluded: stored without a scan request, never announced.
            created = {key: _id for key, _id in created.items() if key not in excluded}
        else:
            created = await self._retrying(
                "upserting org_ips", lambda: self._store.record(sightings, now)
            )
        self._metrics.mongodb_writes.labels("org_ips", "upsert").inc(len(sightings))
        if created:
            self._metrics.pairs_discovered.inc(len(created))
            origins = {p.sighting.key: p.origin for p in chunk}
            await self._announce(sorted(created), now, path="ingest", origins=origins)
        for pending in chunk:
            s = pending.sighting
            for key, entry in pending.cache:
                self._seen.written(key, entry, s.agents, s.site_ids)
        return created

    async def _announce(
        self,
        pairs: Sequence[PairKey],
        now: datetime,
        *,
        path: str,
        origins: Mapping[PairKey, RawRecord] | None = None,
    ) -> None:
        """Publish one scan request per pair (marking them sent is the caller's)."""
        requests = [
            ScanRequest(organization_id=org, ip=ip, reason=ScanReason.NEW, requested_at=now)
            for org, ip in pairs
        ]
        spans = [self._discovery_span(pair, path, origins) for pair in pairs]
        # With tracing off, a pair whose heartbeat carried no trace has an invalid
        # span: no context to carry (making one for nothing cost 5% of onboarding).
        contexts = [
            trace.set_span_in_context(span) if span.get_span_context().is_valid else None
            for span in spans
        ]
        try:
            await self._retrying(
                "publishing scan requests",
                lambda: self._scan_requests.publish(requests, contexts),
            )
        finally:
            for span in spans:
                span.end()
        self._metrics.scan_requests.labels(ScanReason.NEW.value, path).inc(len(requests))

    async def _mark_sent(self, ids: Sequence[Any], now: datetime) -> None:
        await self._retrying(
            "marking scan requests sent", lambda: self._store.mark_requested(ids, now)
        )
        self._metrics.mongodb_writes.labels("org_ips", "mark_requested").inc(len(ids))

    async def _mark_sent_later(self, ids: Sequence[Any], now: datetime) -> None:
        """Flip the outbox of published pairs to `sent` while the next batch runs.

        The batch can be committed before this is done: a pair left `pending`
        only costs a duplicate scan request once its lease runs out (the relay),
        never a lost one. One marking at a time, so a slow database holds the
        stream back instead of piling marks up.
        """
        await self.flush()
        self._marking = asyncio.create_task(self._mark_sent_or_leave(ids, now))

    async def _mark_sent_or_leave(self, ids: Sequence[Any], now: datetime) -> None:
        try:
            await self._mark_sent(ids, now)
        except Exception:
            log.exception(
                "marking %d scan requests sent failed; the relay sends them again "
                "once their lease has run out",
                len(ids),
            )

    async def flush(self) -> None:
        """Wait for the outbox marking in progress, if any (tests; clean shutdown)."""
        marking, self._marking = self._marking, None
        if marking is not None:
            await marking

    def _discovery_span(
        self, pair: PairKey, path: str, origins: Mapping[PairKey, RawRecord] | None
    ) -> Span:
        """The span a new pair's scan request is published in: a child of the
        heartbeat's own trace when it carried one, linked to the batch span."""
        origin = origins.get(pair) if origins else None
        parent = tracing.context_of(tracing.carrier_of(origin.headers)) if origin else None
        batch = trace.get_current_span().get_span_context()
        links = [Link(batch)] if parent is not None and batch.is_valid else []
        return self._tracer.start_span(
            "recon.pair.discovered",
            context=parent,
            links=links,
            attributes={"recon.organization_id": pair[0], "recon.ip": pair[1], "recon.path": path},
        )

    async def relay_unsent(self, limit: int = 500) -> int:
        """Send scan requests left pending past their lease (a crash between the
        upsert and the publish). Returns how many were sent."""
        now = self._clock()
        claimed = await self._retrying(
            "claiming unsent scan requests", lambda: self._store.claim_unsent(now, limit)
        )
        if claimed:
            log.info("relaying %d scan requests left unsent", len(claimed))
            await self._announce(sorted(claimed), now, path="relay")
            await self._mark_sent(list(claimed.values()), now)
        return len(claimed)

    async def run_relay(self, interval: float) -> None:
        """Relay unsent scan requests now and every `interval` seconds, until cancelled."""
        await drain_every(interval, self.relay_unsent, "scan-request relay")
