"""Prometheus metrics: one registry per process, `recon_` prefix.

Labels are low-cardinality on purpose: never an organization id or an IP.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# `*_created` series double the scrape size and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """Every domain metric, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.heartbeats = Counter(
            "recon_heartbeats",
            "Heartbeats consumed, by outcome: accepted (caused a pair write), "
            "duplicate (pair already written recently), non_public, invalid (sent to the DLQ).",
            ["outcome"],
            registry=r,
        )
        self.non_public = Counter(
            "recon_heartbeats_non_public",
            "Heartbeats whose address is never looked up, by address class.",
            ["address_class"],
            registry=r,
        )
        self.dlq = Counter(
            "recon_dlq_messages",
            "Messages sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.cache_hits = Counter(
            "recon_ingest_cache_hits",
            "Heartbeats answered by the in-process pair cache (no MongoDB write).",
            registry=r,
        )
        self.cache_misses = Counter(
            "recon_ingest_cache_misses",
            "Heartbeats whose pair had to be written (new, stale, or new agent/site).",
            registry=r,
        )
        self.cache_entries = Gauge(
            "recon_ingest_cache_entries", "(org, IP) pairs held by the ingest cache.", registry=r
        )
        self.mongodb_writes = Counter(
            "recon_mongodb_writes",
            "Documents written to MongoDB, by collection and operation.",
            ["collection", "operation"],
            registry=r,
        )
        self.pairs_discovered = Counter(
            "recon_pairs_discovered",
            "(organization, IP) pairs seen for the first time.",
            registry=r,
        )
        self.scan_requests = Counter(
            "recon_scan_requests_published",
            "Scan requests published, by reason and by path (ingest or relay).",
            ["reason", "path"],
            registry=r,
        )
        self.retries = Counter(
            "recon_dependency_retries",
            "Operations retried after a transient failure, by dependency.",
            ["dependency"],
            registry=r,
        )
        self.batch_duration = Histogram(
            "recon_ingest_batch_duration_seconds",
            "Time to process one heartbeat batch, retries included.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.batch_size = Histogram(
            "recon_ingest_batch_size",
            "Records per heartbeat batch.",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
            registry=r,
        )
