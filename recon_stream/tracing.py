"""OpenTelemetry tracing: one trace from a heartbeat to the exposure events it caused.

Set-up follows the standard variables: spans are exported over OTLP/HTTP when
`OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set,
and nothing is exported otherwise (`OTEL_SDK_DISABLED=true` or
`OTEL_TRACES_EXPORTER=none` turn it off too). `OTEL_SERVICE_NAME` and
`OTEL_RESOURCE_ATTRIBUTES` win over our default service name.

The hops, and how the context crosses each one:

1. Ingest. FastStream's `KafkaTelemetryMiddleware` opens one span per batch;
   our raw parser hands it no per-record headers, so it costs nothing per
   record. A pair the batch discovers gets a `recon.pair.discovered` span,
   child of the heartbeat's own `traceparent` (when its producer sent one) and
   linked to the batch span; its scan request is published in a
   `{topic} publish` span, child of that one, whose `traceparent` goes with it
   (`KafkaScanRequests` writes it: scan requests skip FastStream's middlewares).
2. Scanner, Kafka half. Each request's `traceparent` is kept on its
   `scan_queue` item (a few per IP: requests for one IP are coalesced).
3. Scanner, lookup half. `recon.scan` is a child of the first stored context
   and links to the others; the Shodan call (`shodan.lookup`) and every
   MongoDB command (`MongoSpans`) are its children, and the exposure events
   are published inside it, so they carry the same trace id.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pymongo import monitoring

INSTRUMENTATION = "recon_stream"
TRACE_HEADERS = ("traceparent", "tracestate")
_PROPAGATOR = TraceContextTextMapPropagator()


def configure(service_name: str, environ: Mapping[str, str] | None = None) -> TracerProvider | None:
    """A tracer provider exporting over OTLP/HTTP, or None when nothing asks for export."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporters = {e.strip() for e in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")}
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if "otlp" not in exporters or not endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    named = "OTEL_SERVICE_NAME" in env or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    # Resource.create reads OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES itself;
    # attributes passed here would override them, so pass ours only as a default.
    resource = Resource.create({} if named else {SERVICE_NAME: service_name})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def tracer_from(provider: trace.TracerProvider | None) -> Tracer:
    """Our tracer: the provider's, or the global one (a no-op unless someone set it)."""
    return trace.get_tracer(INSTRUMENTATION, tracer_provider=provider)


def carrier_of(headers: Iterable[tuple[str, bytes | None]]) -> dict[str, str]:
    """The W3C trace headers of a raw Kafka record, as text (empty when absent)."""
    carrier: dict[str, str] = {}
    for name, value in headers:
        if name in TRACE_HEADERS and value:
            try:
                carrier[name] = value.decode("ascii")
            except UnicodeDecodeError:
                continue
    return carrier


def context_of(carrier: Mapping[str, str]) -> Context | None:
    """The remote span context in `carrier`, or None when it holds no valid one."""
    if "traceparent" not in carrier:
        return None
    context = _PROPAGATOR.extract(carrier)
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def current_carrier() -> dict[str, str]:
    """The current span's context as W3C headers (empty when nothing is recording)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier


def headers_of(span: Span) -> list[tuple[str, bytes]]:
    """`span`'s context as W3C trace headers of a Kafka record (none when invalid)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return [(name, value.encode("ascii")) for name, value in carrier.items()]


def parent_and_links(carriers: Sequence[Mapping[str, str]]) -> tuple[Context | None, list[Link]]:
    """For work that coalesced several traced requests: the first is the parent,
    the rest are links."""
    contexts = [c for c in (context_of(carrier) for carrier in carriers) if c is not None]
    if not contexts:
        return None, []
    links = [Link(trace.get_current_span(c).get_span_context()) for c in contexts[1:]]
    return contexts[0], links


def fail(span: Span, error: BaseException) -> None:
    """Mark a span failed with the error's type only: messages may carry secrets."""
    span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    span.set_attribute("error.type", type(error).__name__)


class MongoSpans(monitoring.CommandListener):
    """A CLIENT span per MongoDB command issued inside a recording span.

    Commands outside any trace (polling loops, readiness pings) make no span,
    so idle workers export nothing. Spans name the command and collection,
    never the command's contents.
    """

    _SKIP = frozenset({"hello", "ismaster", "ping", "endsessions", "saslstart", "saslcontinue"})

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer
        self._spans: dict[tuple[Any, int], Span] = {}

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        name = event.command_name
        if name.lower() in self._SKIP or not trace.get_current_span().is_recording():
            return
        collection = event.command.get(name)
        attributes: dict[str, str] = {
            "db.system": "mongodb",
            "db.name": event.database_name,
            "db.operation": name,
        }
        if isinstance(collection, str):
            attributes["db.mongodb.collection"] = collection
        span = self._tracer.start_span(
            f"mongodb {name} {collection}" if isinstance(collection, str) else f"mongodb {name}",
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        self._spans[(event.connection_id, event.request_id)] = span

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        span = self._spans.pop((event.connection_id, event.request_id), None)
        if span is not None:
            span.end()

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        span = self._spans.pop((event.connection_id, event.request_id), None)
        if span is not None:
            code = event.failure.get("codeName") or event.failure.get("code") or "failed"
            span.set_status(Status(StatusCode.ERROR, str(code)))
            span.end()
