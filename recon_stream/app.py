"""The composition root: builds the broker, the MongoDB client, the workers and
the status endpoint, and wires their lifecycles into one FastStream app.

Resources open in startup hooks and close after shutdown, so in-flight
handlers keep their connections until the broker has stopped them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from faststream import AckPolicy, FastStream
from faststream.kafka import KafkaBroker
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from pymongo import AsyncMongoClient

from recon_stream.adapters import kafka, mongo
from recon_stream.ingest import IngestService, RawRecord
from recon_stream.metrics import Metrics
from recon_stream.retry import Backoff
from recon_stream.seen import SeenPairs
from recon_stream.settings import Settings
from recon_stream.status import StatusServer

log = logging.getLogger(__name__)

ROLES = ("ingest",)


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


def build_worker(settings: Settings, roles: Collection[str]) -> Worker:
    """Assemble a worker running `roles` (a subset of `ROLES`)."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles: {sorted(unknown)}; known: {ROLES}")
    metrics = Metrics()
    broker = kafka.build_broker(
        settings,
        # No broker-wide KafkaTelemetryMiddleware: it extracts W3C baggage from
        # every record of a batch, which cost ~30% of the ingest hot path
        # (measured with cProfile). Tracing is added per hop instead.
        middlewares=(
            KafkaPrometheusMiddleware(registry=metrics.registry, metrics_prefix="recon_faststream"),
        ),
    )
    # Creating the client opens no connection; it connects on first use.
    client = mongo.connect(settings)
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

    if "ingest" in roles:
        service = IngestService(
            mongo.MongoOrgIps(
                db,
                max_agents=settings.ingest_max_agents_per_ip,
                max_sites=settings.ingest_max_sites_per_ip,
                lease=timedelta(seconds=settings.ingest_request_lease_seconds),
            ),
            kafka.KafkaScanRequests(broker, settings.topic_scan_requests),
            kafka.KafkaDeadLetters(broker, settings.topic_dlq),
            SeenPairs(settings.ingest_cache_size, settings.ingest_refresh_interval_seconds),
            metrics,
            backoff,
            on_outage=outages.failed,
            on_recovery=outages.recovered,
        )
        worker.ingest = service

        # NACK_ON_ERROR: commit only after the handler returned; on an
        # unexpected error rewind to the batch start. Outages never reach it:
        # the service retries them inside the handler, committing nothing.
        @broker.subscriber(
            settings.topic_heartbeats,
            batch=True,
            group_id=settings.ingest_group_id,
            auto_offset_reset="earliest",
            max_records=settings.ingest_max_records,
            batch_timeout_ms=settings.ingest_batch_timeout_ms,
            ack_policy=AckPolicy.NACK_ON_ERROR,
            session_timeout_ms=settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
            parser=kafka.raw_batch_parser,
            decoder=kafka.raw_batch_decoder,
        )
        async def on_heartbeats(records: Any) -> None:
            batch: tuple[RawRecord, ...] = records
            try:
                await service.handle_batch(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("heartbeat batch failed; it will be redelivered")
                await asyncio.sleep(backoff.maximum / 10)
                raise

        @app.after_startup
        async def start_relay() -> None:
            background.append(
                asyncio.create_task(service.run_relay(settings.ingest_relay_interval_seconds))
            )

    @app.on_startup
    async def start_status() -> None:
        await status.start()

    @app.on_shutdown
    async def stop_background() -> None:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @app.after_shutdown
    async def close_resources() -> None:
        await client.close()
        await status.stop()

    return worker
