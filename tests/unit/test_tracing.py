"""Tracing helpers and the ingest stage's discovery spans (in-memory exporter, fakes)."""

from __future__ import annotations

import json

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from recon_stream import tracing
from recon_stream.ingest import IngestService
from recon_stream.metrics import Metrics
from recon_stream.retry import Backoff
from recon_stream.seen import SeenPairs
from tests.unit.test_ingest_service import (
    REFRESH,
    Clock,
    FakeDeadLetters,
    FakeOrgIps,
    FakeScanRequests,
    Record,
    heartbeat,
)

pytestmark = pytest.mark.unit

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_configure_exports_only_when_an_endpoint_is_set() -> None:
    assert tracing.configure("recon-stream-test", {}) is None
    assert (
        tracing.configure(
            "x", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}
        )
        is None
    )
    assert (
        tracing.configure(
            "x", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}
        )
        is None
    )
    provider = tracing.configure(
        "recon-stream-test", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}
    )
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "recon-stream-test"
    provider.shutdown()


def test_carrier_and_context_read_only_valid_w3c_headers() -> None:
    headers = [("traceparent", TRACEPARENT.encode()), ("other", b"x"), ("tracestate", b"\xff")]
    carrier = tracing.carrier_of(headers)
    assert carrier == {"traceparent": TRACEPARENT}
    context = tracing.context_of(carrier)
    assert context is not None
    assert format(trace.get_current_span(context).get_span_context().trace_id, "032x") == TRACE_ID
    assert tracing.context_of({"traceparent": "00-garbage"}) is None
    assert tracing.context_of({}) is None


def test_parent_and_links_takes_the_first_valid_context_as_parent() -> None:
    other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    parent, links = tracing.parent_and_links(
        [{"traceparent": "bad"}, {"traceparent": TRACEPARENT}, {"traceparent": other}]
    )
    assert parent is not None
    assert format(trace.get_current_span(parent).get_span_context().trace_id, "032x") == TRACE_ID
    assert [format(link.context.trace_id, "032x") for link in links] == [other[3:35]]
    assert tracing.parent_and_links([]) == (None, [])


def test_headers_of_carry_a_valid_span_only(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, _ = spans
    span = tracing.tracer_from(provider).start_span("publish")
    ids = span.get_span_context()
    expected = f"00-{ids.trace_id:032x}-{ids.span_id:016x}-{ids.trace_flags:02x}"
    assert tracing.headers_of(span) == [("traceparent", expected.encode())]
    assert tracing.headers_of(trace.INVALID_SPAN) == []
    span.end()


async def test_with_tracing_off_only_a_heartbeats_own_trace_travels() -> None:
    requests = FakeScanRequests()
    service = IngestService(
        FakeOrgIps(),
        requests,
        FakeDeadLetters(),
        SeenPairs(100, REFRESH),
        Metrics(),
        Backoff(0.0001, 0.001),
        clock=Clock(),
        tracer=tracing.tracer_from(trace.NoOpTracerProvider()),
    )
    traced = Record(
        json.dumps(heartbeat(ip="8.8.8.8")).encode(),
        headers=[("traceparent", TRACEPARENT.encode())],
    )
    untraced = Record(json.dumps(heartbeat(ip="1.1.1.1")).encode(), offset=1)
    await service.handle_batch([traced, untraced])
    contexts = dict(zip([r.ip for r in requests.published], requests.contexts, strict=True))
    # The no-op tracer hands the heartbeat's own context on, as it is.
    span = trace.get_current_span(contexts["8.8.8.8"])
    assert tracing.headers_of(span) == [("traceparent", TRACEPARENT.encode())]
    assert contexts["1.1.1.1"] is None


async def test_a_new_pair_continues_its_heartbeat_trace(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    requests = FakeScanRequests()
    service = IngestService(
        FakeOrgIps(),
        requests,
        FakeDeadLetters(),
        SeenPairs(100, REFRESH),
        Metrics(),
        Backoff(0.0001, 0.001),
        clock=Clock(),
        tracer=tracing.tracer_from(provider),
    )
    traced = Record(
        json.dumps(heartbeat(ip="8.8.8.8")).encode(),
        headers=[("traceparent", TRACEPARENT.encode())],
    )
    untraced = Record(json.dumps(heartbeat(ip="1.1.1.1")).encode(), offset=1)
    batch_tracer = tracing.tracer_from(provider)
    with batch_tracer.start_as_current_span("batch") as batch:
        await service.handle_batch([traced, untraced])

    discovered = {
        s.attributes["recon.ip"]: s
        for s in exporter.get_finished_spans()
        if s.name == "recon.pair.discovered"
    }
    assert set(discovered) == {"8.8.8.8", "1.1.1.1"}
    # The traced heartbeat's pair continues its trace and links back to the batch.
    child = discovered["8.8.8.8"]
    assert format(child.context.trace_id, "032x") == TRACE_ID
    assert [link.context.span_id for link in child.links] == [batch.get_span_context().span_id]
    # The untraced one is simply part of the batch's trace.
    assert discovered["1.1.1.1"].parent.span_id == batch.get_span_context().span_id
    # Each scan request was published inside its pair's span.
    published = {
        r.ip: trace.get_current_span(c).get_span_context().span_id
        for r, c in zip(requests.published, requests.contexts, strict=True)
    }
    assert published == {ip: s.context.span_id for ip, s in discovered.items()}
