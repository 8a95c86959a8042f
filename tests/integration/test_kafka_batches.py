"""The exposure publishers send in batches on a real broker: every record arrives with
its key and headers, and any failure in a batch raises (the caller sends it again)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka.errors import KafkaError
from faststream.kafka import KafkaBroker
from faststream.kafka.opentelemetry import KafkaTelemetryMiddleware
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from recon_stream.adapters import kafka
from recon_stream.domain.exposures import CONTENT_TYPE, ExposureEvent, build_events, diff
from recon_stream.domain.scans import HostScan, Service
from recon_stream.domain.snapshot import StateRow
from recon_stream.embedded import EmbeddedKafka
from recon_stream.metrics import Metrics
from recon_stream.settings import Settings
from tests.fakes import BUILT_IN
from tests.integration.support import read_all

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
N = 300


def events(n: int) -> list[ExposureEvent]:
    out: list[ExposureEvent] = []
    for i in range(n):
        ip = f"198.51.100.{i % 250}"
        service = Service(port=1000 + i, module="rdp", product="RDP", max_cvss=9.8)
        current = HostScan(ip=ip, provider="api", queried_at=T0, services=(service,))
        out += build_events(
            f"org-{i % 7}",
            ip,
            diff({}, current),
            current,
            version=1,
            candidate_agents=[],
            site_ids=[],
            acceptance_by_key={},
            first_seen_by_key={},
            assessor=BUILT_IN,
        )
    return out


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator[tuple[KafkaBroker, Metrics]]:
    metrics = Metrics()
    b = kafka.build_broker(
        settings,
        middlewares=(
            KafkaTelemetryMiddleware(tracer_provider=None),
            KafkaPrometheusMiddleware(registry=metrics.registry, metrics_prefix="recon_fs"),
        ),
    )
    await b.connect()
    try:
        yield b, metrics
    finally:
        await b.stop()


async def test_a_batch_of_events_arrives_complete_with_keys_and_headers(
    settings: Settings, broker: tuple[KafkaBroker, Metrics]
) -> None:
    b, metrics = broker
    sent = events(N)
    await kafka.KafkaExposureEvents(b, settings.topic_exposures).publish(sent)
    records = await read_all(settings.kafka_bootstrap_servers, settings.topic_exposures, expect=N)
    assert len(records) == N
    by_id = {e.id: e for e in sent}
    for r in records:
        event = by_id.pop(ExposureEvent.model_validate_json(r.value).id)
        assert r.key == event.kafka_key()
        assert list(r.headers) == [("content-type", CONTENT_TYPE.encode())]
    assert by_id == {}
    # Counted where FastStream's middleware counted them.
    published = metrics.registry.get_sample_value(
        "recon_fs_published_messages_total",
        {
            "app_name": "recon_fs",
            "broker": "kafka",
            "destination": settings.topic_exposures,
            "status": "success",
        },
    )
    assert published == N


async def test_state_rows_and_tombstones_keep_their_keys(
    settings: Settings, broker: tuple[KafkaBroker, Metrics]
) -> None:
    assert settings.topic_exposure_state
    b, _ = broker
    rows = [StateRow(f"org-{i}|198.51.100.{i}|{i}/tcp", None, 2) for i in range(N)]
    await kafka.KafkaExposureState(b, settings.topic_exposure_state).publish(rows)
    records = await read_all(
        settings.kafka_bootstrap_servers, settings.topic_exposure_state, expect=N
    )
    assert sorted(r.key for r in records) == sorted(row.key.encode() for row in rows)
    assert all(r.value is None and list(r.headers) == [] for r in records)


async def test_each_record_published_in_a_trace_carries_its_own_publish_span(
    settings: Settings,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    b = kafka.build_broker(
        settings, middlewares=(KafkaTelemetryMiddleware(tracer_provider=provider),)
    )
    await b.connect()
    try:
        with provider.get_tracer("test").start_as_current_span("recon.rerate") as parent:
            await kafka.KafkaOcsfFindings(b, settings.topic_exposures_ocsf or "").publish(events(5))
    finally:
        await b.stop()
    records = await read_all(
        settings.kafka_bootstrap_servers, settings.topic_exposures_ocsf or "", expect=5
    )
    spans = [s for s in exporter.get_finished_spans() if s.name.endswith(" publish")]
    assert len(spans) == 5
    trace_id = parent.get_span_context().trace_id
    assert all(
        s.parent is not None and s.parent.span_id == parent.get_span_context().span_id
        for s in spans
    )
    traceparents = {dict(r.headers)["traceparent"].decode() for r in records}
    assert {int(t.split("-")[1], 16) for t in traceparents} == {trace_id}
    assert {t.split("-")[2] for t in traceparents} == {f"{s.context.span_id:016x}" for s in spans}


async def test_a_record_failing_mid_batch_fails_the_whole_call(
    settings: Settings, broker: tuple[KafkaBroker, Metrics]
) -> None:
    b, metrics = broker
    sent = events(10)
    # One record over the producer's max_request_size (1 MiB) in the middle.
    huge = sent[5].model_copy(
        update={"data": sent[5].data.model_copy(update={"ip": "198.51.100.1" + " " * 2_000_000})}
    )
    with pytest.raises(KafkaError):
        await kafka.KafkaExposureEvents(b, settings.topic_exposures).publish(
            [*sent[:5], huge, *sent[6:]]
        )
    errors = metrics.registry.get_sample_value(
        "recon_fs_published_messages_total",
        {
            "app_name": "recon_fs",
            "broker": "kafka",
            "destination": settings.topic_exposures,
            "status": "error",
        },
    )
    assert errors == 10


async def test_a_broker_outage_mid_batch_raises(tmp_path: Path, unique_name: str) -> None:
    with EmbeddedKafka(log_dir=tmp_path) as own:
        b = KafkaBroker(own.bootstrap_servers, acks="all", request_timeout_ms=3000)
        await b.connect()
        try:
            publisher = kafka.KafkaExposureEvents(b, f"outage_{unique_name}")
            await publisher.publish(events(3))  # up: topic auto-created, metadata known
            own.stop()
            with pytest.raises(KafkaError):
                await publisher.publish(events(50))
        finally:
            await b.stop()
