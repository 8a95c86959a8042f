"""The composition root: builds the broker, the MongoDB client, the workers and
the status endpoint, and wires their lifecycles into one FastStream app.

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
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from faststream import AckPolicy, FastStream
from faststream.kafka import KafkaBroker
from faststream.kafka.opentelemetry import KafkaTelemetryMiddleware
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from opentelemetry.sdk.trace import TracerProvider
from pymongo import AsyncMongoClient

from recon_stream import __version__, tracing
from recon_stream.adapters import kafka, mongo
from recon_stream.adapters.exposure_store import ExposureStore, IpScans
from recon_stream.adapters.scan_queue import ScanQueue
from recon_stream.adapters.shodan import build_provider
from recon_stream.ingest import IngestService, RawRecord
from recon_stream.leadership import LEASES, Lease
from recon_stream.metrics import Metrics
from recon_stream.ratelimit import BUDGETS, SharedRateLimiter
from recon_stream.retry import Backoff
from recon_stream.scanner import KeyGate, ScannerService
from recon_stream.scheduler import Scheduler
from recon_stream.seen import SeenPairs
from recon_stream.settings import Settings
from recon_stream.status import StatusServer

log = logging.getLogger(__name__)

ROLES = ("ingest", "scanner", "scheduler")
SENDER_SWITCH_INTERVAL = 0.001


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
class Worker:
    """A built, not yet started, worker process."""

    app: FastStream
    broker: KafkaBroker
    settings: Settings
    metrics: Metrics
    status: StatusServer
    mongo_client: AsyncMongoClient[mongo.Document]
    ingest: IngestService | None = None
    scanner: ScannerService | None = None
    scheduler: Scheduler | None = None


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
    tracer = tracing.tracer_from(exporting)
    metrics = Metrics()
    metrics.build_info.labels(__version__, ",".join(ordered)).set(1)
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
    db = client[settings.mongodb_database]
    status = StatusServer(metrics.registry, settings.http_host, settings.http_port)
    outages = Outages()
    backoff = Backoff(settings.retry_initial_seconds, settings.retry_max_seconds)

    async def kafka_ready() -> str | None:
        return None if await broker.ping(timeout=2.0) else "Kafka unreachable"

    async def mongodb_ready() -> str | None:
        await client.admin.command("ping")
        return None

    status.add_check("kafka", kafka_ready)
    status.add_check("mongodb", mongodb_ready)
    status.add_check("pipeline", outages.check)

    app = FastStream(broker)
    worker = Worker(app, broker, settings, metrics, status, client)
    background: list[asyncio.Task[Any]] = []
    # Gauges read from MongoDB and Kafka every RECON_GAUGE_SAMPLE_SECONDS.
    samplers: list[Callable[[], Awaitable[None]]] = []
    lag_probe = kafka.LagProbe(settings)

    def sample_lag(group: str, topic: str) -> Callable[[], Awaitable[None]]:
        async def sample() -> None:
            for partition, lag in (await lag_probe.lag(group, topic)).items():
                metrics.consumer_lag.labels(group, topic, str(partition)).set(lag)

        return sample

    if "ingest" in roles:
        org_ips = mongo.MongoOrgIps(
            db,
            max_agents=settings.ingest_max_agents_per_ip,
            max_sites=settings.ingest_max_sites_per_ip,
            lease=timedelta(seconds=settings.ingest_request_lease_seconds),
        )
        service = IngestService(
            org_ips,
            kafka.KafkaScanRequests(broker, settings.topic_scan_requests),
            kafka.KafkaDeadLetters(broker, settings.topic_dlq),
            SeenPairs(settings.ingest_cache_size, settings.ingest_refresh_interval_seconds),
            metrics,
            backoff,
            on_outage=outages.failed,
            on_recovery=outages.recovered,
            tracer=tracer,
        )
        worker.ingest = service

        async def sample_ingest_outbox() -> None:
            metrics.outbox_pending.labels("scan_requests").set(await org_ips.unsent_count())

        samplers += [
            sample_lag(settings.ingest_group_id, settings.topic_heartbeats),
            sample_ingest_outbox,
        ]

        subscribe_batches(
            broker,
            settings,
            settings.topic_heartbeats,
            settings.ingest_group_id,
            service.handle_batch,
            what="heartbeat batch",
            max_records=settings.ingest_max_records,
            batch_timeout_ms=settings.ingest_batch_timeout_ms,
            max_partition_fetch_bytes=settings.ingest_max_partition_fetch_bytes,
            pause=backoff.maximum / 10,
        )

        @app.after_startup
        async def start_relay() -> None:
            background.append(
                asyncio.create_task(service.run_relay(settings.ingest_relay_interval_seconds))
            )

    if "scanner" in roles:
        # A lookup's thread sends the moment its rate-limit slot opens, then waits for
        # the GIL at each socket call; behind a busy event loop Python's default 5 ms
        # hand-off would spend the slack the budget keeps for exactly that moment.
        sys.setswitchinterval(min(sys.getswitchinterval(), SENDER_SWITCH_INTERVAL))
        gate = KeyGate(metrics)
        metrics.shodan_rate_limit.set(settings.shodan_rate)
        status.add_check("shodan", gate.check)
        provider = build_provider(settings, timeout=settings.shodan_timeout_seconds)
        limiter = SharedRateLimiter(
            db[BUDGETS], "shodan", settings.shodan_rate, margin=settings.shodan_rate_margin
        )
        ip_scans = IpScans(db, settings.rescan_interval_seconds)
        exposures = ExposureStore(db)
        queue = ScanQueue(db)
        scanner = ScannerService(
            queue,
            provider,
            limiter,
            ip_scans,
            exposures,
            kafka.KafkaExposureEvents(broker, settings.topic_exposures),
            kafka.KafkaDeadLetters(broker, settings.topic_dlq),
            metrics,
            backoff,
            gate,
            reuse_age=settings.scan_reuse_seconds,
            lease=timedelta(seconds=settings.scan_claim_lease_seconds),
            on_outage=outages.failed,
            on_recovery=outages.recovered,
            tracer=tracer,
        )
        worker.scanner = scanner

        # Requests are only moved into the durable scan queue here; while the
        # key is rejected the handler waits and nothing is committed.
        subscribe_batches(
            broker,
            settings,
            settings.topic_scan_requests,
            settings.scanner_group_id,
            scanner.accept,
            what="scan-request batch",
            max_records=500,
            batch_timeout_ms=100,
            pause=backoff.maximum / 10,
        )

        async def sample_scanner() -> None:
            depth = await queue.depth()
            for priority in (0, 1):
                metrics.scan_backlog.labels(str(priority)).set(depth.get(priority, 0))
            metrics.outbox_pending.labels("exposure_events").set(await exposures.outbox_size())
            oldest = await ip_scans.oldest_query()
            if oldest is not None:
                if oldest.tzinfo is None:
                    oldest = oldest.replace(tzinfo=UTC)
                metrics.oldest_scan_age.set((datetime.now(UTC) - oldest).total_seconds())

        samplers += [
            sample_lag(settings.scanner_group_id, settings.topic_scan_requests),
            sample_scanner,
        ]

        @app.after_startup
        async def start_scanner() -> None:
            background.append(
                asyncio.create_task(scanner.run_key_checks(settings.shodan_key_check_seconds))
            )
            background.extend(
                asyncio.create_task(scanner.run_lookups())
                for _ in range(settings.scanner_concurrency)
            )
            background.append(
                asyncio.create_task(scanner.run_relay(settings.exposure_relay_interval_seconds))
            )

        @app.after_shutdown
        async def close_provider() -> None:
            await provider.close()

    if "scheduler" in roles:
        scheduler = Scheduler(
            db,
            Lease(
                db[LEASES],
                "scheduler",
                f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
                timedelta(seconds=settings.scheduler_lease_seconds),
            ),
            IpScans(db, settings.rescan_interval_seconds),
            ExposureStore(db),
            kafka.KafkaScanRequests(broker, settings.topic_scan_requests),
            kafka.KafkaExposureEvents(broker, settings.topic_exposures),
            metrics,
            backoff,
            rescan_interval=settings.rescan_interval_seconds,
            retention=settings.ip_retention_seconds,
        )
        worker.scheduler = scheduler

        status.add_check("scheduler", scheduler.ready)
        status.add_state("scheduler", lambda: scheduler.state)

        @app.after_startup
        async def start_scheduler() -> None:
            background.append(asyncio.create_task(scheduler.run(settings.scheduler_tick_seconds)))

    async def sample_gauges() -> None:
        while True:
            for sample in samplers:
                try:
                    await sample()
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    log.warning("sampling gauges failed: %s", type(error).__name__)
            await asyncio.sleep(settings.gauge_sample_seconds)

    @app.on_startup
    async def start_status() -> None:
        await status.start()

    @app.after_startup
    async def start_sampling() -> None:
        if samplers:
            background.append(asyncio.create_task(sample_gauges()))

    @app.on_shutdown
    async def stop_background() -> None:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @app.after_shutdown
    async def close_resources() -> None:
        if worker.ingest is not None:
            # Pairs whose marking does not finish in time are sent again by a
            # relay after their lease: a duplicate, never a loss.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(settings.graceful_timeout_seconds):
                    await worker.ingest.flush()
        await lag_probe.close()
        await client.close()
        await status.stop()
        if own_provider and exporting is not None:
            exporting.shutdown()  # flushes the spans still batched

    return worker
