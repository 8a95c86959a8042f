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
            "duplicate (pair already written recently), non_public, invalid (sent to the DLQ), "
            "excluded (a pair new to the worker that the scope file excludes: never requested).",
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
        self.scan_requests_received = Counter(
            "recon_scan_requests_received",
            "Scan requests the scanner queued, by reason.",
            ["reason"],
            registry=r,
        )
        self.shodan_requests = Counter(
            "recon_shodan_requests",
            "Shodan lookups by provider and outcome: ok, not_found, rate_limited, "
            "unauthorized, transient, permanent.",
            ["provider", "outcome"],
            registry=r,
        )
        self.shodan_latency = Histogram(
            "recon_shodan_request_duration_seconds",
            "Time of one Shodan lookup (after the rate limiter).",
            ["provider"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.rate_wait = Histogram(
            "recon_rate_limiter_wait_seconds",
            "Time a lookup waited for a slot of the shared Shodan budget.",
            buckets=(0, 0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.vuln_feed_age = Gauge(
            "recon_vuln_feed_age_seconds",
            "Age of the last good copy of a vulnerability feed (kev, epss), sampled.",
            ["feed"],
            registry=r,
        )
        self.vuln_feed_failures = Counter(
            "recon_vuln_feed_failures",
            "Failed refreshes of a vulnerability feed (the last good copy is kept).",
            ["feed"],
            registry=r,
        )
        self.vuln_reassessments = Counter(
            "recon_vuln_reassessments",
            "Snapshots re-assessed (no lookup) because a KEV or EPSS refresh changed one of "
            "their CVEs.",
            registry=r,
        )
        self.vuln_rerate_pending = Gauge(
            "recon_vuln_rerate_pending_cves",
            "CVEs a feed refresh changed whose exposures are not re-assessed yet (sampled, "
            "at most 1000).",
            registry=r,
        )
        self.shodan_scans = Counter(
            "recon_shodan_scans",
            "On-demand Shodan scans for rescans, by outcome: submitted, done, timed_out, "
            "stale_after_done (DONE, yet no port newer than the submit), budget_spent (the "
            "day's RECON_SHODAN_SCAN_CREDITS_PER_DAY used up), no_credits, unauthorized, "
            "recently_crawled, rate_limited, unknown_scan, refused, error; verified_open: "
            "none needed, TCP checks found every reported port open. Every outcome but "
            "submitted and done means the plain lookup was made instead.",
            ["outcome"],
            registry=r,
        )
        self.shodan_scan_credits_left = Gauge(
            "recon_shodan_scan_credits_left",
            "Scan credits Shodan said were left (`credits_left` of its last scan submit).",
            registry=r,
        )
        self.shodan_scan_credits_used = Gauge(
            "recon_shodan_scan_credits_used_today",
            "On-demand scan credits spent this UTC day across replicas, of "
            "RECON_SHODAN_SCAN_CREDITS_PER_DAY (sampled).",
            registry=r,
        )
        self.verification_checks = Counter(
            "recon_verification_checks",
            "TCP checks of reported ports, by result: open, closed (refused), no_answer "
            "(timed out, unreachable, prohibited), error (failed on our side), "
            "not_checkable (a non-public target, refused before any connect).",
            ["result"],
            registry=r,
        )
        self.verification_rounds = Counter(
            "recon_verification_rounds",
            "Rounds of TCP checks of one IP, by trigger: lookup, rescan, confirm (the "
            "second check of a refused or silent port), too_many_ports (not checked).",
            ["trigger"],
            registry=r,
        )
        self.shared_egress_ips = Gauge(
            "recon_shared_egress_ips",
            "IPs reported by at least the scope file's shared_egress_organizations "
            "organizations: reported to none that did not declare them own (sampled by the "
            "scheduler's leader at each attribution pass).",
            registry=r,
        )
        self.critical_observation_age = Gauge(
            "recon_critical_observation_age_seconds",
            "Age of the observation behind the open critical exposures (Shodan's, or our TCP "
            "check's when it found the port open later): quantile 0.5, 0.9 and 1 (the "
            "oldest), sampled by the scanner role.",
            ["quantile"],
            registry=r,
        )
        self.critical_exposures = Gauge(
            "recon_critical_exposures",
            "Open critical exposures with a Shodan observation time (sampled).",
            registry=r,
        )
        self.stale_exposures = Gauge(
            "recon_stale_exposures",
            "Open exposures whose Shodan observation is older than "
            "RECON_STALE_OBSERVATION_DAYS (sampled).",
            registry=r,
        )
        self.commands = Counter(
            "recon_commands",
            "Commands read from the commands topic, by command (accept, unaccept, rescan) "
            "and outcome (applied, duplicate: already applied; rejected: not applicable).",
            ["command", "outcome"],
            registry=r,
        )
        self.slots_missed = Counter(
            "recon_rate_limiter_slots_missed",
            "Budget slots left unused because their lookup was too late to send inside "
            "the slot's window (a stalled event loop or a busy core); the lookup took "
            "another slot.",
            registry=r,
        )
        self.lookups_saved = Counter(
            "recon_lookups_saved",
            "Scan requests served from a fresh stored lookup (no Shodan call).",
            registry=r,
        )
        self.exposure_events = Counter(
            "recon_exposure_events",
            "Exposure events published, by change and severity.",
            ["change", "severity"],
            registry=r,
        )
        self.outbox_pending = Gauge(
            "recon_outbox_pending",
            "Messages waiting in an outbox (sampled): exposure_events (scanner) or "
            "scan_requests (ingest: new pairs whose request is not yet sent).",
            ["outbox"],
            registry=r,
        )
        self.scan_backlog = Gauge(
            "recon_scan_backlog",
            "IPs waiting in the scan queue, by priority (0 new, 1 rescan; sampled).",
            ["priority"],
            registry=r,
        )
        self.oldest_scan_age = Gauge(
            "recon_oldest_scan_age_seconds",
            "Age of the oldest lookup among IPs some organization still uses (sampled).",
            registry=r,
        )
        self.scheduler_leader = Gauge(
            "recon_scheduler_leader", "1 while this process is the scheduler leader.", registry=r
        )
        self.pairs_retired = Counter(
            "recon_pairs_retired", "(organization, IP) pairs retired after disuse.", registry=r
        )
        self.consumer_lag = Gauge(
            "recon_consumer_lag",
            "Records not yet consumed: end offset minus the group's committed offset "
            "(sampled by every replica of the consuming role; aggregate with max).",
            ["group", "topic", "partition"],
            registry=r,
        )
        self.shodan_rate_limit = Gauge(
            "recon_shodan_rate_limit",
            "Configured Shodan budget in lookups per second, shared by all scanner replicas.",
            registry=r,
        )
        self.rescan_interval = Gauge(
            "recon_rescan_interval_seconds",
            "Configured interval between lookups of the same IP.",
            registry=r,
        )
        self.build_info = Gauge(
            "recon_build_info",
            "Always 1; labels name the version and the roles this process runs "
            "(`roles`, comma-separated: scrape configs usually add a `role` label of their own).",
            ["version", "roles"],
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

        self.notifier_delivered = Counter(
            "recon_notifier_delivered",
            "Exposure events a webhook destination accepted (2xx), by destination name.",
            ["destination"],
            registry=r,
        )
        self.notifier_failed_attempts = Counter(
            "recon_notifier_failed_attempts",
            "Webhook deliveries that failed and will be retried, by destination and reason: "
            "http_4xx, http_5xx, http_other, timeout, connection.",
            ["destination", "reason"],
            registry=r,
        )
        self.notifier_parked = Counter(
            "recon_notifier_parked",
            "Exposure events a destination refused for good (HTTP 400, 404, 410, 413, 422), "
            "written to the notify DLQ and not retried, by destination and status.",
            ["destination", "status"],
            registry=r,
        )
        self.notifier_filtered = Counter(
            "recon_notifier_filtered",
            "Exposure events a destination is not sent, by destination and reason: filter "
            "(its min_severity, changes, organizations, accepted or sample), invalid (not an "
            "exposure event).",
            ["destination", "reason"],
            registry=r,
        )
        self.notifier_oldest_undelivered = Gauge(
            "recon_notifier_oldest_undelivered_age_seconds",
            "Age (since it reached Kafka) of the oldest event read for a destination and not "
            "yet delivered; 0 when it has everything read so far (sampled).",
            ["destination"],
            registry=r,
        )

    def shodan_key_gauge(self) -> Gauge:
        """`recon_shodan_key_accepted`, registered only by processes that check the key:
        an unlabelled gauge reads 0 until set, and 0 means "rejected"."""
        return Gauge(
            "recon_shodan_key_accepted",
            "1 while Shodan accepts the API key, 0 while it rejects it (lookups paused).",
            registry=self.registry,
        )
