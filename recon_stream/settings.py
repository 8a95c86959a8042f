"""Settings, read from `RECON_*` environment variables (and a `.env` file)."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ShodanProvider = Literal["api", "internetdb", "sample"]

OFF_WHEN_EMPTY = ("topic_exposure_state", "topic_exposures_ocsf")
"""Optional topics: set to an empty value, they are switched off (not defaulted)."""


class _EmptyMeansOff(PydanticBaseSettingsSource):
    # `env_ignore_empty` makes `RECON_X=` mean "unset" everywhere; for the optional
    # topics an empty value is how an operator switches them off.
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return {
            name: ""
            for name in OFF_WHEN_EMPTY
            if os.environ.get(f"RECON_{name.upper()}", "unset").strip() == ""
        }


class Settings(BaseSettings):
    """Every setting of every worker. Secrets are `SecretStr` and never printed."""

    model_config = SettingsConfigDict(
        env_prefix="RECON_",
        env_file=".env",
        extra="ignore",
        frozen=True,
        # `RECON_SHODAN_API_KEY=` (as in a copied .env.example) means unset, not "".
        env_ignore_empty=True,
        # Validation errors are printed at startup; they must not echo the input.
        hide_input_in_errors=True,
    )

    # Kafka
    kafka_bootstrap_servers: str = "localhost:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_ssl_check_hostname: bool = True
    kafka_client_id: str = "recon-stream"
    kafka_session_timeout_ms: int = Field(
        10_000, ge=1000, description="a dead consumer's partitions move after this"
    )
    kafka_heartbeat_interval_ms: int = Field(3_000, ge=100)
    kafka_topic_partitions: int = Field(12, ge=1, description="used by `init`")
    kafka_topic_replication_factor: int = Field(1, ge=1, description="used by `init`")

    # MongoDB
    mongodb_uri: SecretStr = SecretStr("mongodb://localhost:27017")
    mongodb_database: str = "recon"
    mongodb_tls: bool = False
    mongodb_tls_ca_file: Path | None = None
    mongodb_tls_certificate_key_file: Path | None = None
    mongodb_tls_certificate_key_file_password: SecretStr | None = None
    mongodb_tls_allow_invalid_hostnames: bool = False
    mongodb_server_selection_timeout_ms: int = Field(5000, ge=100)

    # Shodan
    shodan_api_key: SecretStr | None = None
    shodan_api_url: str | None = None
    shodan_provider: ShodanProvider | None = None
    shodan_rate: float = Field(1.0, gt=0)
    shodan_rate_margin: float = Field(
        0.03,
        gt=0,
        le=1,
        description="slots are 1/rate x (1 + margin) apart; half the slack is how late a "
        "lookup may leave its slot, the other half absorbs jitter after it leaves",
    )
    rescan_interval_seconds: float = Field(3 * 24 * 3600, gt=0)
    ip_retention_seconds: float = Field(30 * 24 * 3600, gt=0)

    # Topics
    topic_heartbeats: str = "agent.heartbeats.v1"
    topic_scan_requests: str = "recon.scan-requests.v1"
    topic_exposures: str = "recon.exposures.v1"
    event_source: str = Field(
        "recon-stream",
        min_length=1,
        description="The CloudEvents `source` of every exposure event (tells deployments apart).",
    )
    topic_dlq: str = "recon.heartbeats.dlq.v1"
    topic_commands: str = "recon.commands.v1"
    topic_exposure_state: str = Field(
        "recon.exposure-state.v1", description="compacted; empty: no state topic"
    )
    topic_exposures_ocsf: str = Field(
        "recon.exposures.ocsf.v1", description="OCSF 1.8.0 Detection Findings; empty: off"
    )

    # Ingest
    ingest_group_id: str = "recon-ingest"
    ingest_max_records: int = Field(2000, ge=1, description="records per batch")
    ingest_batch_timeout_ms: int = Field(200, ge=1)
    ingest_max_partition_fetch_bytes: int = Field(
        4 * 1024 * 1024,
        ge=64 * 1024,
        description="bytes fetched per partition per request: heartbeats are small and many, "
        "and aiokafka's 1 MiB leaves the worker waiting on fetches",
    )
    ingest_refresh_interval_seconds: float = Field(
        300.0, ge=0, description="a known pair's last_seen is written at most this often"
    )
    ingest_cache_size: int = Field(500_000, ge=0, description="(org, IP) pairs kept in memory")
    ingest_max_agents_per_ip: int = Field(50, ge=1)
    ingest_max_sites_per_ip: int = Field(50, ge=1)
    ingest_request_lease_seconds: float = Field(
        60.0, gt=0, description="after this, an unsent scan request is re-sent by the relay"
    )
    ingest_relay_interval_seconds: float = Field(30.0, gt=0)

    # Scanner
    scanner_group_id: str = "recon-scanner"
    scanner_concurrency: int = Field(2, ge=1, description="lookup loops per replica")
    scan_reuse_seconds: float = Field(
        24 * 3600.0, ge=0, description="a stored lookup younger than this serves a new org"
    )
    shodan_timeout_seconds: float = Field(10.0, gt=0)
    shodan_key_check_seconds: float = Field(60.0, gt=0)
    scan_claim_lease_seconds: float = Field(120.0, gt=0)
    exposure_relay_interval_seconds: float = Field(10.0, gt=0)
    gauge_sample_seconds: float = Field(15.0, gt=0)

    # Risk: the policy, vulnerability feeds, stale observations
    risk_policy_file: Path | None = Field(
        None, description="YAML (schemas/risk-policy.v1.json); unset: the built-in policy"
    )
    scope_file: Path | None = Field(
        None,
        description="YAML (schemas/scope.v1.json): exclusions by CIDR or ASN, the networks "
        "each organization owns, the shared-egress threshold; unset: nothing excluded",
    )
    kev_source: str | None = Field(
        None, description="URL or file of CISA's KEV catalog (JSON); unset: no KEV context"
    )
    epss_source: str | None = Field(
        None, description="URL or file of FIRST's EPSS scores (CSV, gzip accepted); unset: none"
    )
    vuln_feed_refresh_seconds: float = Field(24 * 3600.0, gt=0)
    vuln_feed_retry_seconds: float = Field(900.0, gt=0)
    rerate_concurrency: int = Field(
        32, ge=1, le=512, description="snapshots re-assessed at once after a KEV or EPSS change"
    )
    stale_observation_days: float = Field(
        30.0, gt=0, description="a Shodan observation older than this is marked stale"
    )

    # Freshness: on-demand Shodan scans for rescans, TCP verification
    shodan_scan_credits_per_day: int = Field(
        0,
        ge=0,
        description="on-demand scans (1 credit per IP) a `rescan` may submit per UTC day, "
        "across replicas; 0: never (a rescan is a fresh lookup of Shodan's last crawl)",
    )
    shodan_scan_poll_seconds: float = Field(
        60.0, gt=0, description="how often a submitted scan's status is asked for"
    )
    shodan_scan_timeout_seconds: float = Field(
        21600.0, gt=0, description="a scan not DONE after this falls back to the plain lookup"
    )
    verify_tcp: bool = Field(
        False,
        description="master switch of TCP verification (organizations opt in one by one "
        "with the `verification` command)",
    )
    verify_rate: float = Field(
        20.0, gt=0, le=1000, description="TCP connection attempts per second, across replicas"
    )
    verify_timeout_seconds: float = Field(3.0, gt=0, le=60)
    verify_confirm_seconds: float = Field(
        60.0,
        ge=0,
        description="two checks at least this far apart must agree before a check closes "
        "an exposure",
    )

    # Commands (accept, unaccept, rescan) and history
    commands_group_id: str = "recon-commands"
    history_retention_seconds: float = Field(
        400 * 24 * 3600, gt=0, description="applied changes are kept this long (TTL index)"
    )

    # Webhook notifier
    notify_file: Path | None = Field(
        None, description="YAML destinations (schemas/notify.v1.json); unset: nothing to send"
    )
    notifier_group_id: str = Field(
        "recon-notifier", description="each destination's group: this, a dot, its name"
    )
    topic_notify_dlq: str = Field(
        "recon.notify.dlq.v1",
        description="events a webhook destination refused for good (400, 404, 410, 413, 422)",
    )
    notifier_batch_size: int = Field(
        100,
        ge=1,
        description="events read per destination at a time: at most this many "
        "are sent again after a crash",
    )

    # Scheduler
    scheduler_tick_seconds: float = Field(30.0, gt=0)
    scheduler_lease_seconds: float = Field(90.0, gt=0)

    # Retries of MongoDB / Kafka outages
    retry_initial_seconds: float = Field(0.5, gt=0)
    retry_max_seconds: float = Field(30.0, gt=0)

    # HTTP: /healthz, /readyz, /metrics
    http_host: str = "0.0.0.0"
    http_port: int = Field(8080, ge=0, le=65535)

    # Shutdown
    graceful_timeout_seconds: float = Field(20.0, gt=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            _EmptyMeansOff(settings_cls),
            env_settings,
            dotenv_settings,
            file_secret_settings,
        )

    @model_validator(mode="after")
    def _sasl_needs_credentials(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL") and not (
            self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError(
                "RECON_KAFKA_SASL_USERNAME and RECON_KAFKA_SASL_PASSWORD are required "
                f"with RECON_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol}"
            )
        return self

    @property
    def effective_shodan_provider(self) -> ShodanProvider:
        """`api` when a key is set, `sample` otherwise, unless chosen explicitly."""
        if self.shodan_provider is not None:
            return self.shodan_provider
        return "api" if self.shodan_api_key is not None else "sample"

    def kafka_ssl_context(self) -> ssl.SSLContext | None:
        if self.kafka_security_protocol not in ("SSL", "SASL_SSL"):
            return None
        context = ssl.create_default_context(
            cafile=str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile else None
        )
        if self.kafka_ssl_certfile:
            context.load_cert_chain(
                str(self.kafka_ssl_certfile),
                str(self.kafka_ssl_keyfile) if self.kafka_ssl_keyfile else None,
            )
        context.check_hostname = self.kafka_ssl_check_hostname
        return context
