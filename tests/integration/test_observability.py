"""Observability end to end: one trace from a heartbeat to its exposure events
(in-memory span exporter), and a real Prometheus server scraping a worker."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from recon_stream.settings import Settings
from tests.emulators.shodan import ShodanEmulator

from .support import NOW, banner, events_on, eventually, heartbeat, host, produce, read_all, running

pytestmark = pytest.mark.integration

TRACE_ID = "5b8efff798038103d269b633813fc60c"
TRACEPARENT = f"00-{TRACE_ID}-eee19b7ec3c1b174-01"


def trace_id_of(record: Any) -> str | None:
    headers = dict(record.headers or ())
    value = headers.get("traceparent")
    return value.decode().split("-")[1] if value else None


async def test_one_trace_leads_from_a_heartbeat_to_its_exposure_events(
    scan_settings: Settings, shodan_emulator: ShodanEmulator
) -> None:
    ip = "198.51.99.7"
    shodan_emulator.set_host(ip, host(ip, banner(3389, "rdp"), banner(445, "smb")))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    await produce(
        scan_settings.kafka_bootstrap_servers,
        scan_settings.topic_heartbeats,
        [(None, heartbeat("acme", ip, "a1", NOW), [("traceparent", TRACEPARENT.encode())])],
    )
    async with running(scan_settings, ("ingest", "scanner"), tracer_provider=provider):
        events = await events_on(scan_settings, 2)
    assert {e["data"]["port"] for e in events} == {3389, 445}

    # Over the wire: the scan request and both events carry the heartbeat's trace.
    requests = await read_all(
        scan_settings.kafka_bootstrap_servers, scan_settings.topic_scan_requests, idle=0.5, expect=1
    )
    assert [trace_id_of(r) for r in requests] == [TRACE_ID]
    records = await read_all(
        scan_settings.kafka_bootstrap_servers, scan_settings.topic_exposures, idle=0.5, expect=2
    )
    assert [trace_id_of(r) for r in records] == [TRACE_ID, TRACE_ID]

    # In the spans: discovery -> scan-request publish -> scan -> Shodan, MongoDB, events.
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == int(TRACE_ID, 16)]
    by_id = {s.context.span_id: s for s in spans}
    names = {s.name for s in spans}
    assert {"recon.pair.discovered", "recon.scan", "shodan.lookup"} <= names
    assert f"{scan_settings.topic_scan_requests} publish" in names
    assert f"{scan_settings.topic_exposures} publish" in names
    assert {
        "mongodb findAndModify rate_budgets",  # the shared budget's slot
        "mongodb update ip_scans",  # the stored lookup
        "mongodb update exposures",  # the snapshot and its outbox
        "mongodb delete scan_queue",  # the finished queue item
    } <= names
    # The scanner's Kafka half queued the request inside its batch span.
    assert "mongodb update scan_queue" in {s.name for s in exporter.get_finished_spans()}

    def ancestors(span: ReadableSpan) -> list[str]:
        chain = []
        while span.parent is not None and span.parent.span_id in by_id:
            span = by_id[span.parent.span_id]
            chain.append(span.name)
        return chain

    (scan,) = [s for s in spans if s.name == "recon.scan"]
    (request,) = [s for s in spans if s.name == f"{scan_settings.topic_scan_requests} publish"]
    assert ancestors(scan)[:2] == [request.name, "recon.pair.discovered"]
    assert request.attributes is not None
    assert request.attributes["messaging.destination.name"] == scan_settings.topic_scan_requests
    shodan = next(s for s in spans if s.name == "shodan.lookup")
    assert ancestors(shodan)[0] == "recon.scan"
    assert shodan.attributes is not None
    assert shodan.attributes["recon.shodan.outcome"] == "ok"
    published = [s for s in spans if s.name == f"{scan_settings.topic_exposures} publish"]
    assert all("recon.scan" in ancestors(s) for s in published)
    # The discovery span links back to the ingest batch span (another trace).
    (discovered,) = [s for s in spans if s.name == "recon.pair.discovered"]
    assert len(discovered.links) == 1
    assert discovered.links[0].context.trace_id != int(TRACE_ID, 16)
    # Secrets never reach span attributes.
    key = scan_settings.shodan_api_key
    assert key is not None
    secret = key.get_secret_value()
    for span in exporter.get_finished_spans():
        assert secret not in json.dumps(dict(span.attributes or {}), default=str)


# --- a real Prometheus server ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """Debian's `prometheus` on loopback, scraping the given targets every second."""

    def __init__(self, home: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = home / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {"job_name": "recon-stream", "static_configs": [{"targets": targets}]}
                    ],
                }
            )
        )
        binary = shutil.which("prometheus")
        assert binary, "Debian's prometheus package is missing (tasks.py test installs it)"
        self.log = (home / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={home / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as response:
            return json.loads(response.read()) if path.startswith("/api/") else response.read()

    def query(self, expr: str) -> dict[frozenset[tuple[str, str]], float]:
        """Instant query: each series' labels (job and instance dropped) to its value."""
        result = self.get("/api/v1/query", query=expr)["data"]["result"]
        return {
            frozenset(
                (k, v) for k, v in r["metric"].items() if k not in ("job", "instance")
            ): float(r["value"][1])
            for r in result
        }

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def total(series: dict[frozenset[tuple[str, str]], float], name: str, **labels: str) -> float:
    """The sum of `name`'s series that carry `labels`."""
    wanted = {("__name__", name), *labels.items()}
    return sum(v for k, v in series.items() if wanted <= k)


async def test_real_prometheus_scrapes_the_domain_series_after_a_known_workload(
    scan_settings: Settings, shodan_emulator: ShodanEmulator, tmp_path: Path
) -> None:
    ip = "198.51.99.8"
    shodan_emulator.set_host(ip, host(ip, banner(1433, "mssql", product="MS-SQL")))
    settings = scan_settings.model_copy(update={"http_port": free_port(), "http_host": "127.0.0.1"})
    await produce(
        settings.kafka_bootstrap_servers,
        settings.topic_heartbeats,
        [
            heartbeat("acme", ip, "a1", NOW),
            heartbeat("acme", ip, "a1", NOW),  # a repeat of the same pair
            heartbeat("acme", "10.1.2.3", "a2", NOW),  # private: never looked up
            b"{not json",
        ],
    )
    prometheus = Prometheus(tmp_path, [f"127.0.0.1:{settings.http_port}"])
    everything = '{__name__=~"recon_.+", __name__!~".+_bucket"}'
    try:
        async with running(settings, ("ingest", "scanner", "scheduler")):
            await events_on(settings, 1)

            async def settled() -> dict[frozenset[tuple[str, str]], float] | None:
                try:
                    series = await asyncio.to_thread(prometheus.query, everything)
                except OSError:
                    return None  # not up yet
                done = (
                    total(series, "recon_exposure_events_total") >= 1
                    and total(series, "recon_scheduler_leader") == 1
                    and total(series, "recon_consumer_lag", group=settings.ingest_group_id) == 0
                    and total(series, "recon_outbox_pending", outbox="exposure_events") == 0
                    and total(series, "recon_scan_backlog") == 0  # sampled: may trail the events
                    and any(("__name__", "recon_consumer_lag") in k for k in series)
                )
                return series if done else None

            series = await eventually(settled, timeout=60, interval=1.0)
            targets = await asyncio.to_thread(prometheus.get, "/api/v1/targets")
    finally:
        prometheus.close()

    (target,) = targets["data"]["activeTargets"]
    assert target["health"] == "up"
    assert total(series, "recon_heartbeats_total", outcome="accepted") == 1
    assert total(series, "recon_heartbeats_total", outcome="duplicate") == 1
    assert total(series, "recon_heartbeats_total", outcome="non_public") == 1
    assert total(series, "recon_heartbeats_total", outcome="invalid") == 1
    assert total(series, "recon_dlq_messages_total") == 1
    assert total(series, "recon_pairs_discovered_total") == 1
    assert total(series, "recon_scan_requests_published_total", reason="new") == 1
    assert total(series, "recon_scan_requests_received_total", reason="new") == 1
    assert total(series, "recon_shodan_requests_total", outcome="ok") == 1
    assert total(series, "recon_shodan_request_duration_seconds_count") == 1
    assert total(series, "recon_exposure_events_total", change="opened") == 1
    assert total(series, "recon_shodan_key_accepted") == 1
    assert total(series, "recon_shodan_rate_limit") == settings.shodan_rate
    assert total(series, "recon_rescan_interval_seconds") == settings.rescan_interval_seconds
    assert any(("__name__", "recon_scan_backlog") in k for k in series)
    assert total(series, "recon_build_info", roles="ingest,scanner,scheduler") == 1
    lag = {
        dict(k)["partition"]
        for k in series
        if ("__name__", "recon_consumer_lag") in k and ("topic", settings.topic_heartbeats) in k
    }
    assert lag == {str(p) for p in range(settings.kafka_topic_partitions)}
    # FastStream's Kafka middleware shares the registry, under our prefix.
    assert total(series, "recon_faststream_received_messages_total") >= 1
    # Low cardinality: no label value is an organization id or an IP.
    values = {v for k in series for _, v in k}
    assert not values & {"acme", ip, "10.1.2.3"}
