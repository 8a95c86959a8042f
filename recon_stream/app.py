"""The composition root: the shared pieces of a worker process, built once, and
one wiring function per role.

`build_worker` builds what every role uses (`Shared`: the broker, the MongoDB
client, the status server, the metrics, the outage record, the backoff, the
gauge samplers and the background tasks), then calls the wiring function of
each role it runs, in `ROLE_WIRING` order. A role's function is the one place
that says what runs in that role. To add a role, write `wire_<role>(shared, worker)`
and add one line to `ROLE_WIRING`.

Resources open in startup hooks and close after shutdown, so in-flight
handlers keep their connections until the broker has stopped them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from faststream import AckPolicy, FastStream
from faststream.kafka import KafkaBroker
from faststream.kafka.opentelemetry import KafkaTelemetryMiddleware
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Tracer
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from recon_stream import __version__, tracing
from recon_stream.adapters import kafka, mongo
from recon_stream.adapters.acceptances import Acceptances
from recon_stream.adapters.collections import LEASES, RATE_BUDGETS
from recon_stream.adapters.command_log import CommandLog
from recon_stream.adapters.consents import MongoConsents
from recon_stream.adapters.exposures import MongoSnapshots
from recon_stream.adapters.history import History
from recon_stream.adapters.ip_scans import IpScans
from recon_stream.adapters.leadership import Lease
from recon_stream.adapters.org_ips import MongoOrgIps
from recon_stream.adapters.probe import TcpProber, verify_budget
from recon_stream.adapters.ratelimit import SharedRateLimiter
from recon_stream.adapters.scan_credits import MongoScanCredits
from recon_stream.adapters.scan_queue import PRIORITY, ScanQueue
from recon_stream.adapters.shodan import build_provider
from recon_stream.adapters.vuln_feeds import VulnFeeds
from recon_stream.adapters.webhooks import WebhookClient
from recon_stream.attribution import Attribution
from recon_stream.commands import CommandService
from recon_stream.dead_letters import RawRecord
from recon_stream.dismissals import Dismissing
from recon_stream.domain.freshness import observation_ages
from recon_stream.domain.policy_file import DEFAULT_POLICY
from recon_stream.domain.risk import RiskPolicy
from recon_stream.domain.scope import EMPTY_SCOPE, Scope, load_scope
from recon_stream.domain.vulns import Feed
from recon_stream.feeds import FeedRefresher
from recon_stream.ingest import IngestService
from recon_stream.metrics import Metrics
from recon_stream.notifier import DestinationNotifier, load_destinations
from recon_stream.outbox import OutboxPublisher
from recon_stream.policy import effective_policy
from recon_stream.ports import OrganizationData
from recon_stream.providers import ScanningProvider, ShodanProvider
from recon_stream.retry import Backoff, Retrier
from recon_stream.roles import ROLES
from recon_stream.scanner import KeyGate, OnDemandScans, ScannerService
from recon_stream.scheduler import Scheduler
from recon_stream.seen import SeenPairs
from recon_stream.settings import Settings
from recon_stream.snapshots import SnapshotUpdater
from recon_stream.status import StatusServer
from recon_stream.verifier import Verifier

log = logging.getLogger(__name__)

SENDER_SWITCH_INTERVAL = 0.001

Sampler = Callable[[], Awaitable[None]]


@dataclass
class Outages:
    """Dependencies currently failing, as seen by the workers' retries."""

    failing: dict[str, str] = field(default_factory=dict)

    def failed(self, dependency: str, error: BaseException) -> None:
        self.failing[dependency] = f"{dependency} unavailable ({type(error).__name__}), retrying"

    def recovered(self) -> None:
        self.failing.clear()

    async def check(self) -> str | None:
        return "; ".join(self.failing.values()) or None


@dataclass
class Shared:
    """What every role of a process uses, built once by `build_worker`."""

    settings: Settings
    app: FastStream
    broker: KafkaBroker
    client: AsyncMongoClient[mongo.Document]
    db: AsyncDatabase[mongo.Document]
    metrics: Metrics
    status: StatusServer
    outages: Outages
    backoff: Backoff
    tracer: Tracer
    lag_probe: kafka.LagProbe
    policy: RiskPolicy
    retrying: Retrier
    """Every role's retries, with the outage record's callbacks (readiness)."""
    stores: Stores
    outbox: OutboxPublisher
    """Publishes what snapshot updates left in outboxes (scanner, commands, scheduler)."""
    dead_letters: kafka.KafkaDeadLetters
    scope: Scope = field(default_factory=lambda: EMPTY_SCOPE)
    """RECON_SCOPE_FILE, read at start (a change takes effect at the next restart)."""
    samplers: list[Sampler] = field(default_factory=list)
    tasks: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def subscribe(
        self,
        topic: str,
        group_id: str,
        handle: Callable[[Sequence[RawRecord]], Awaitable[object]],
        *,
        what: str,
        max_records: int,
        batch_timeout_ms: int,
        max_partition_fetch_bytes: int = 1024 * 1024,
    ) -> None:
        """`subscribe_batches` on this process's broker, pausing a tenth of the backoff."""
        subscribe_batches(
            self.broker,
            self.settings,
            topic,
            group_id,
            handle,
            what=what,
            max_records=max_records,
            batch_timeout_ms=batch_timeout_ms,
            pause=self.backoff.maximum / 10,
            max_partition_fetch_bytes=max_partition_fetch_bytes,
        )

    def run(self, task: Callable[[], Coroutine[Any, Any, None]], copies: int = 1) -> None:
        """Run `task` in the background from startup until shutdown (`copies` times)."""
        self.tasks.extend([task] * copies)

    def sample(self, *samplers: Sampler) -> None:
        """Call `samplers` every RECON_GAUGE_SAMPLE_SECONDS."""
        self.samplers.extend(samplers)

    def sample_lag(self, group: str, topic: str) -> None:
        """Sample the consumer lag of `group` on `topic`."""

        async def sample() -> None:
            for partition, lag in (await self.lag_probe.lag(group, topic)).items():
                self.metrics.consumer_lag.labels(group, topic, str(partition)).set(lag)

        self.sample(sample)

    def on_close(self, close: Callable[[], Awaitable[None]]) -> None:
        """Call `close` after the broker stopped, before the shared resources close."""
        self.closers.append(close)


@dataclass
class Worker:
    """A built, not yet started, worker process, and the services of its roles."""

    app: FastStream
    broker: KafkaBroker
    settings: Settings
    metrics: Metrics
    status: StatusServer
    mongo_client: AsyncMongoClient[mongo.Document]
    ingest: IngestService | None = None
    scanner: ScannerService | None = None
    commands: CommandService | None = None
    scheduler: Scheduler | None = None
    notifiers: list[DestinationNotifier] = field(default_factory=list)


@dataclass(frozen=True)
class Stores:
    """The MongoDB adapters, one of each per process (none connects until used)."""

    org_ips: MongoOrgIps
    ip_scans: IpScans
    snapshots: MongoSnapshots
    acceptances: Acceptances
    history: History
    feeds: VulnFeeds
    queue: ScanQueue
    command_log: CommandLog
    consents: MongoConsents

    @property
    def of_organizations(self) -> tuple[OrganizationData, ...]:
        """Every collection holding an organization's own documents (what `purge`
        deletes): not `ip_scans` nor the scan queue (an IP's, shared by organizations),
        nor the command log (it keeps the purge's outcome)."""
        return (self.org_ips, self.snapshots, self.acceptances, self.history, self.consents)

    @classmethod
    def on(cls, db: AsyncDatabase[mongo.Document], settings: Settings) -> Stores:
        return cls(
            org_ips=MongoOrgIps(
                db,
                max_agents=settings.ingest_max_agents_per_ip,
                max_sites=settings.ingest_max_sites_per_ip,
                lease=timedelta(seconds=settings.ingest_request_lease_seconds),
            ),
            ip_scans=IpScans(db, settings.rescan_interval_seconds),
            snapshots=MongoSnapshots(db),
            acceptances=Acceptances(db),
            history=History(db),
            feeds=VulnFeeds(db),
            queue=ScanQueue(db),
            command_log=CommandLog(db),
            consents=MongoConsents(db),
        )


async def serve(worker: Worker) -> None:
    """Run `worker` as the process's one job, until SIGTERM or SIGINT."""

    @worker.app.after_startup
    async def settle_heap() -> None:
        # Start-up leaves a large heap that every full collection would walk again,
        # holding the GIL for 40-150 ms (measured on a busy 2-core machine): long enough
        # to make a lookup whose slot has opened leave late. Frozen, it is skipped.
        gc.collect()
        gc.freeze()

    await worker.app.run()


def subscribe_batches(
    broker: KafkaBroker,
    settings: Settings,
    topic: str,
    group_id: str,
    handle: Callable[[Sequence[RawRecord]], Awaitable[object]],
    *,
    what: str,
    max_records: int,
    batch_timeout_ms: int,
    pause: float,
    max_partition_fetch_bytes: int = 1024 * 1024,
) -> None:
    """Subscribe `handle` to raw record batches of `topic`, at least once.

    NACK_ON_ERROR: offsets are committed only after `handle` returned; on an
    unexpected error the batch is rewound and redelivered after `pause`.
    Outages never get that far: the services retry them inside the handler,
    committing nothing meanwhile. A new group starts at the earliest offset.
    """

    @broker.subscriber(
        topic,
        batch=True,
        group_id=group_id,
        auto_offset_reset="earliest",
        max_records=max_records,
        batch_timeout_ms=batch_timeout_ms,
        ack_policy=AckPolicy.NACK_ON_ERROR,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
        parser=kafka.raw_batch_parser,
        decoder=kafka.raw_batch_decoder,
        max_partition_fetch_bytes=max_partition_fetch_bytes,
    )
    async def on_batch(records: Any) -> None:
        try:
            await handle(records)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed; it will be redelivered", what)
            await asyncio.sleep(pause)
            raise


# --- the roles ---------------------------------------------------------------------


def wire_ingest(shared: Shared, worker: Worker) -> None:
    """Heartbeats in, (organization, IP) pairs upserted, scan requests out; the relay."""
    settings, metrics, org_ips = shared.settings, shared.metrics, shared.stores.org_ips
    service = IngestService(
        org_ips,
        kafka.KafkaScanRequests(shared.broker, settings.topic_scan_requests, shared.tracer),
        shared.dead_letters,
        SeenPairs(settings.ingest_cache_size, settings.ingest_refresh_interval_seconds),
        metrics,
        shared.backoff,
        on_outage=shared.outages.failed,
        on_recovery=shared.outages.recovered,
        tracer=shared.tracer,
        scope=shared.scope,
    )
    shared.subscribe(
        settings.topic_heartbeats,
        settings.ingest_group_id,
        service.handle_batch,
        what="heartbeat batch",
        max_records=settings.ingest_max_records,
        batch_timeout_ms=settings.ingest_batch_timeout_ms,
        max_partition_fetch_bytes=settings.ingest_max_partition_fetch_bytes,
    )
    shared.run(lambda: service.run_relay(settings.ingest_relay_interval_seconds))

    async def sample_outbox() -> None:
        metrics.outbox_pending.labels("scan_requests").set(await org_ips.unsent_count())

    shared.sample_lag(settings.ingest_group_id, settings.topic_heartbeats)
    shared.sample(sample_outbox)

    async def flush() -> None:
        # Pairs whose marking does not finish in time are sent again by a
        # relay after their lease: a duplicate, never a loss.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settings.graceful_timeout_seconds):
                await service.flush()

    shared.on_close(flush)
    worker.ingest = service


def on_demand_scans(
    db: AsyncDatabase[mongo.Document], settings: Settings, provider: ShodanProvider
) -> OnDemandScans | None:
    """Rescans' on-demand scans, when credits are configured and the provider scans
    (Shodan's API, or the sample provider's simulation)."""
    per_day = settings.shodan_scan_credits_per_day
    if per_day <= 0 or not isinstance(provider, ScanningProvider):
        return None
    return OnDemandScans(
        provider,
        MongoScanCredits(db, per_day),
        poll=settings.shodan_scan_poll_seconds,
        timeout=settings.shodan_scan_timeout_seconds,
    )


def verifier(shared: Shared) -> Verifier:
    """TCP verification of reported ports, for the organizations that consented."""
    settings = shared.settings
    budget = verify_budget(shared.db, settings.verify_rate)
    return Verifier(
        TcpProber(settings.verify_timeout_seconds, budget),
        shared.stores.consents,
        shared.stores.org_ips,
        shared.outbox,
        shared.metrics,
        confirm=settings.verify_confirm_seconds,
    )


def wire_scanner(shared: Shared, worker: Worker) -> None:
    """Scan requests into the durable queue; lookups within the shared budget; events out."""
    settings, metrics, stores = shared.settings, shared.metrics, shared.stores
    # A lookup's thread sends the moment its rate-limit slot opens, then waits for
    # the GIL at each socket call; behind a busy event loop Python's default 5 ms
    # hand-off would spend the slack the budget keeps for exactly that moment.
    sys.setswitchinterval(min(sys.getswitchinterval(), SENDER_SWITCH_INTERVAL))
    gate = KeyGate(metrics)
    metrics.shodan_rate_limit.set(settings.shodan_rate)
    shared.status.add_check("shodan", gate.check)
    provider = build_provider(settings, timeout=settings.shodan_timeout_seconds)
    limiter = SharedRateLimiter(
        shared.db[RATE_BUDGETS], "shodan", settings.shodan_rate, margin=settings.shodan_rate_margin
    )
    scans = on_demand_scans(shared.db, settings, provider)
    if scans is not None:
        shared.status.add_state("shodan_scans", scans.state)
    scanner = ScannerService(
        stores.queue,
        provider,
        limiter,
        stores.ip_scans,
        stores.org_ips,
        shared.outbox,
        shared.dead_letters,
        metrics,
        shared.retrying,
        gate,
        reuse_age=settings.scan_reuse_seconds,
        lease=timedelta(seconds=settings.scan_claim_lease_seconds),
        tracer=shared.tracer,
        scans=scans,
        verifier=verifier(shared) if settings.verify_tcp else None,
        attribution=Attribution(stores.org_ips, shared.scope, shared.outbox, metrics),
    )
    if scanner.verifier is not None:
        shared.on_close(scanner.verifier.stop)
    # Requests are only moved into the durable scan queue here; while the
    # key is rejected the handler waits and nothing is committed.
    shared.subscribe(
        settings.topic_scan_requests,
        settings.scanner_group_id,
        scanner.accept,
        what="scan-request batch",
        max_records=500,
        batch_timeout_ms=100,
    )
    shared.run(lambda: scanner.run_key_checks(settings.shodan_key_check_seconds))
    shared.run(scanner.run_lookups, copies=settings.scanner_concurrency)
    shared.run(lambda: scanner.run_relay(settings.exposure_relay_interval_seconds))

    async def sample_queue() -> None:
        depth = await stores.queue.depth()
        for priority in sorted(set(PRIORITY.values())):
            metrics.scan_backlog.labels(str(priority)).set(depth.get(priority, 0))
        metrics.outbox_pending.labels("exposure_events").set(await stores.snapshots.outbox_size())
        if scans is not None:
            await scans.sample(metrics)
        metrics.stale_exposures.set(await stores.snapshots.stale_count())
        observed = await stores.snapshots.critical_observations()
        metrics.critical_exposures.set(len(observed))
        for quantile, age in observation_ages(observed, datetime.now(UTC)).items():
            metrics.critical_observation_age.labels(quantile).set(age)
        # Among IPs some organization still uses: a retired IP's lookup ages forever.
        oldest = await stores.ip_scans.oldest_query(stores.org_ips.in_use)
        if oldest is not None:
            if oldest.tzinfo is None:
                oldest = oldest.replace(tzinfo=UTC)
            metrics.oldest_scan_age.set((datetime.now(UTC) - oldest).total_seconds())

    shared.sample_lag(settings.scanner_group_id, settings.topic_scan_requests)
    shared.sample(sample_queue)
    shared.on_close(provider.close)
    worker.scanner = scanner


def wire_commands(shared: Shared, worker: Worker) -> None:
    """accept, unaccept, rescan and verification from the commands topic (`run scanner`
    runs it too).

    It shares the scanner's snapshots, queue and outbox; offsets are committed after
    a batch's effects are stored, invalid commands go to the DLQ.
    """
    settings, stores = shared.settings, shared.stores
    commands = CommandService(
        stores.acceptances,
        stores.org_ips,
        stores.queue,
        stores.command_log,
        shared.outbox,
        shared.dead_letters,
        shared.metrics,
        shared.retrying,
        consents=stores.consents,
        consent_history=stores.history,
        dismissing=Dismissing(stores.org_ips, stores.history, shared.scope, shared.outbox),
        snapshots=stores.snapshots,
        organization_data=stores.of_organizations,
    )
    shared.subscribe(
        settings.topic_commands,
        settings.commands_group_id,
        commands.handle,
        what="command batch",
        max_records=100,
        batch_timeout_ms=100,
    )
    shared.sample_lag(settings.commands_group_id, settings.topic_commands)
    worker.commands = commands


def wire_scheduler(shared: Shared, worker: Worker) -> None:
    """One leader under a lease: rescans of stale IPs, retirement of unused pairs,
    acceptance and dismissal expiry, attribution, and the KEV and EPSS copies kept fresh."""
    settings, stores = shared.settings, shared.stores
    holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    scheduler = Scheduler(
        Lease(
            shared.db[LEASES],
            "scheduler",
            holder,
            timedelta(seconds=settings.scheduler_lease_seconds),
        ),
        stores.ip_scans,
        stores.org_ips,
        stores.acceptances,
        shared.outbox,
        kafka.KafkaScanRequests(shared.broker, settings.topic_scan_requests, shared.tracer),
        shared.metrics,
        shared.retrying,
        rescan_interval=settings.rescan_interval_seconds,
        retention=settings.ip_retention_seconds,
    )
    shared.status.add_check("scheduler", scheduler.ready)
    shared.status.add_state("scheduler", lambda: scheduler.state)
    shared.run(lambda: scheduler.run(settings.scheduler_tick_seconds))
    _wire_feeds(shared, lambda: scheduler.state == "leading")
    leading: Callable[[], bool] = lambda: scheduler.state == "leading"  # noqa: E731
    attribution = Attribution(stores.org_ips, shared.scope, shared.outbox, shared.metrics)
    shared.run(lambda: attribution.run(settings.scheduler_tick_seconds, leading))
    dismissing = Dismissing(stores.org_ips, stores.history, shared.scope, shared.outbox)
    shared.run(lambda: dismissing.run(settings.scheduler_tick_seconds, leading))
    worker.scheduler = scheduler


def _wire_feeds(shared: Shared, leading: Callable[[], bool]) -> None:
    settings = shared.settings
    sources: dict[Feed, str] = {}
    if settings.kev_source:
        sources["kev"] = settings.kev_source
    if settings.epss_source:
        sources["epss"] = settings.epss_source
    if not sources:
        return
    feeds = FeedRefresher(
        shared.stores.feeds,
        sources,
        shared.metrics,
        every=settings.vuln_feed_refresh_seconds,
        retry=settings.vuln_feed_retry_seconds,
        snapshots=shared.stores.snapshots,
        outbox=shared.outbox,
        parallel=settings.rerate_concurrency,
    )
    for name in sources:
        shared.status.add_state(f"{name}_feed", partial(feeds.states.__getitem__, name))
    shared.run(lambda: feeds.run(settings.scheduler_tick_seconds, leading))
    shared.sample(feeds.sample)


def wire_notifier(shared: Shared, worker: Worker) -> None:
    """Exposure events to each webhook destination of RECON_NOTIFY_FILE: a consumer group,
    an HTTP client and a task per destination, so none waits for another."""
    settings = shared.settings
    if settings.notify_file is None:
        log.warning("notifier: RECON_NOTIFY_FILE is not set, no webhook destinations")
        return
    from recon_stream.adapters.webhooks import KafkaParking

    parking = KafkaParking(shared.broker, settings.topic_notify_dlq)
    notifiers = []
    for destination in load_destinations(settings.notify_file):
        group = f"{settings.notifier_group_id}.{destination.name}"
        client = WebhookClient(destination.url, destination.timeout_seconds)
        notifier = DestinationNotifier(
            destination,
            partial(kafka.group_consumer, settings, settings.topic_exposures, group),
            client,
            parking,
            shared.metrics,
            shared.backoff,
            batch=settings.notifier_batch_size,
            product_version=__version__,
        )
        shared.run(notifier.run)
        shared.on_close(client.close)
        notifiers.append(notifier)

    async def sample_ages() -> None:
        for notifier in notifiers:
            notifier.sample()

    shared.sample(sample_ages)
    worker.notifiers = notifiers


Wiring = Callable[[Shared, Worker], None]

ROLE_WIRING: Mapping[str, tuple[Wiring, ...]] = {
    "ingest": (wire_ingest,),
    # The commands act on the scanner's snapshots and queue: `run scanner` takes them.
    "scanner": (wire_scanner, wire_commands),
    "scheduler": (wire_scheduler,),
    "notifier": (wire_notifier,),
}
"""Each role (`recon-stream run ROLE`) and what wires it, in the order they are wired."""

if tuple(ROLE_WIRING) != ROLES:  # pragma: no cover - a wiring mistake, caught by any test
    raise RuntimeError(f"ROLE_WIRING {tuple(ROLE_WIRING)} does not match the roles {ROLES}")


# --- the process -------------------------------------------------------------------


def snapshot_updater(
    db: AsyncDatabase[mongo.Document],
    policy: RiskPolicy | None = None,
    stale_after: timedelta = timedelta(days=30),
) -> SnapshotUpdater:
    """A `SnapshotUpdater` on `db`'s collections, under `policy` (default: the built-in
    one), for tools and tests that update snapshots outside a worker."""
    return SnapshotUpdater(
        MongoSnapshots(db),
        Acceptances(db),
        VulnFeeds(db),
        policy if policy is not None else DEFAULT_POLICY,
        stale_after=stale_after,
    )


def build_worker(
    settings: Settings,
    roles: Collection[str],
    *,
    tracer_provider: TracerProvider | None = None,
) -> Worker:
    """Assemble a worker running `roles` (a subset of `ROLES`).

    Spans go to `tracer_provider` when given (tests pass an in-memory one), else
    to OTLP when the standard `OTEL_*` variables ask for it, else nowhere.
    """
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles: {sorted(unknown)}; known: {ROLES}")
    ordered = [role for role in ROLES if role in roles]
    own_provider = tracer_provider is None
    exporting = tracer_provider or tracing.configure("recon-stream-" + "-".join(ordered))
    shared = _build_shared(settings, exporting, ordered)
    worker = Worker(
        shared.app, shared.broker, settings, shared.metrics, shared.status, shared.client
    )
    for role in ordered:
        for wire in ROLE_WIRING[role]:
            wire(shared, worker)
    _manage_lifecycle(shared, close_provider=exporting if own_provider else None)
    return worker


def _build_shared(
    settings: Settings, exporting: TracerProvider | None, roles: Sequence[str]
) -> Shared:
    tracer = tracing.tracer_from(exporting)
    metrics = Metrics()
    metrics.build_info.labels(__version__, ",".join(roles)).set(1)
    metrics.rescan_interval.set(settings.rescan_interval_seconds)
    broker = kafka.build_broker(
        settings,
        middlewares=(
            # W3C context in and out of Kafka headers. Our raw batch parser hands
            # it no per-record headers, so it opens one span per batch and costs
            # nothing per record; per-pair context is handled in `tracing`.
            KafkaTelemetryMiddleware(tracer_provider=exporting),
            KafkaPrometheusMiddleware(registry=metrics.registry, metrics_prefix="recon_faststream"),
        ),
    )
    # Creating the client opens no connection; it connects on first use.
    client = mongo.connect(
        settings, listeners=[tracing.MongoSpans(tracer)] if exporting is not None else []
    )
    status = StatusServer(metrics.registry, settings.http_host, settings.http_port)
    outages = Outages()

    async def kafka_ready() -> str | None:
        return None if await broker.ping(timeout=2.0) else "Kafka unreachable"

    async def mongodb_ready() -> str | None:
        await client.admin.command("ping")
        return None

    status.add_check("kafka", kafka_ready)
    status.add_check("mongodb", mongodb_ready)
    status.add_check("pipeline", outages.check)
    db = client[settings.mongodb_database]
    stores = Stores.on(db, settings)
    policy = effective_policy(settings)
    scope = load_scope(settings.scope_file) if settings.scope_file else EMPTY_SCOPE
    retrying = Retrier(
        Backoff(settings.retry_initial_seconds, settings.retry_max_seconds),
        metrics,
        outages.failed,
        outages.recovered,
    )
    updater = SnapshotUpdater(
        stores.snapshots,
        stores.acceptances,
        stores.feeds,
        policy,
        stale_after=timedelta(days=settings.stale_observation_days),
        source=settings.event_source,
    )
    state, ocsf = settings.topic_exposure_state, settings.topic_exposures_ocsf
    outbox = OutboxPublisher(
        stores.snapshots,
        stores.history,
        updater,
        kafka.KafkaExposureEvents(broker, settings.topic_exposures),
        kafka.KafkaExposureState(broker, state) if state else None,
        metrics,
        retrying,
        ocsf=kafka.KafkaOcsfFindings(broker, ocsf) if ocsf else None,
    )
    return Shared(
        settings=settings,
        app=FastStream(broker),
        broker=broker,
        client=client,
        db=db,
        metrics=metrics,
        status=status,
        outages=outages,
        backoff=retrying.backoff,
        tracer=tracer,
        lag_probe=kafka.LagProbe(settings),
        policy=policy,
        retrying=retrying,
        stores=stores,
        outbox=outbox,
        dead_letters=kafka.KafkaDeadLetters(broker, settings.topic_dlq),
        scope=scope,
    )


async def stop_tasks(tasks: Sequence[asyncio.Task[None]], patience: float) -> None:
    """Cancel `tasks` and wait for them, at most `patience` seconds a round.

    A task still running after the first round is cancelled again: a second
    cancellation breaks through what the first one let finish (a shielded commit, a
    close that waits on the broker), so shutdown never hangs on one task.
    """
    for task in tasks:
        task.cancel()
    pending = {task for task in tasks if not task.done()}
    for _ in range(2):
        if not pending:
            break
        _, pending = await asyncio.wait(pending, timeout=patience)
        if pending:
            log.warning(
                "%d background task(s) still stopping after %.0f s; cancelling again",
                len(pending),
                patience,
            )
            for task in pending:
                task.cancel()
    for task in tasks:
        if task.done() and not task.cancelled() and (error := task.exception()) is not None:
            log.warning("a background task ended with %s while stopping", type(error).__name__)


def _manage_lifecycle(shared: Shared, *, close_provider: TracerProvider | None) -> None:
    """Status server up first; background tasks and sampling after startup; the roles'
    closers, then the shared resources, after shutdown."""
    app, settings = shared.app, shared.settings
    background: list[asyncio.Task[None]] = []

    async def sample_gauges() -> None:
        while True:
            for sample in shared.samplers:
                try:
                    await sample()
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    log.warning("sampling gauges failed: %s", type(error).__name__)
            await asyncio.sleep(settings.gauge_sample_seconds)

    @app.on_startup
    async def start_status() -> None:
        await shared.status.start()

    @app.after_startup
    async def start_background() -> None:
        background.extend(asyncio.create_task(task()) for task in shared.tasks)
        if shared.samplers:
            background.append(asyncio.create_task(sample_gauges()))

    @app.on_shutdown
    async def stop_background() -> None:
        await stop_tasks(background, settings.graceful_timeout_seconds)

    @app.after_shutdown
    async def close_resources() -> None:
        for close in shared.closers:
            await close()
        await shared.lag_probe.close()
        await shared.client.close()
        await shared.status.stop()
        if close_provider is not None:
            close_provider.shutdown()  # flushes the spans still batched
