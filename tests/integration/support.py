"""Helpers shared by the integration tests: settings, producers, readers, waits."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import SecretStr

from recon_stream.adapters import initialize
from recon_stream.app import Worker, build_worker
from recon_stream.embedded import EmbeddedKafka, EmbeddedMongo
from recon_stream.settings import Settings
from tests.emulators.shodan import ShodanEmulator

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def make_settings(kafka: str, mongodb: str, unique: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": kafka,
        "mongodb_uri": mongodb,
        "mongodb_database": f"recon_{unique}",
        "topic_heartbeats": f"hb_{unique}",
        "topic_scan_requests": f"sr_{unique}",
        "topic_exposures": f"ex_{unique}",
        "topic_dlq": f"dlq_{unique}",
        "topic_commands": f"cmd_{unique}",
        "topic_exposure_state": f"state_{unique}",
        "topic_exposures_ocsf": f"ocsf_{unique}",
        "notifier_group_id": f"notifier_{unique}",
        "commands_group_id": f"commands_{unique}",
        "ingest_group_id": f"ingest_{unique}",
        "kafka_topic_partitions": 4,
        "http_host": "127.0.0.1",
        "http_port": 0,
        "ingest_batch_timeout_ms": 50,
        "retry_initial_seconds": 0.05,
        "retry_max_seconds": 1.0,
        "mongodb_server_selection_timeout_ms": 1500,
        "graceful_timeout_seconds": 5,
        # The fastest group rebalancing Apache Kafka accepts by default.
        "kafka_session_timeout_ms": 6000,
        "kafka_heartbeat_interval_ms": 1000,
        # A crashed worker's unsent scan requests are relayed within seconds.
        "ingest_request_lease_seconds": 3,
        "ingest_relay_interval_seconds": 1,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def prepare(settings: Settings) -> None:
    """What `recon-stream init` does: the topics and every index."""
    await initialize(settings)


@asynccontextmanager
async def running(
    settings: Settings, roles: Iterable[str] = ("ingest",), **options: Any
) -> AsyncIterator[Worker]:
    worker = build_worker(settings, list(roles), **options)
    await worker.app.start()
    try:
        yield worker
    finally:
        await worker.app.stop()


def heartbeat(
    org: str,
    ip: str,
    agent: str = "agent-1",
    at: datetime = T0,
    **extra: Any,
) -> bytes:
    body = {
        "organization_id": org,
        "agent_id": agent,
        "public_ip": ip,
        "observed_at": at.isoformat(),
        **extra,
    }
    return json.dumps(body).encode()


async def produce(
    bootstrap: str,
    topic: str,
    values: Iterable[bytes | tuple[bytes | None, bytes, list[tuple[str, bytes]]]],
) -> None:
    """Produce each value as its own request (single-record batches, see DESIGN.md)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=2**21)
    await producer.start()
    try:
        for item in values:
            if isinstance(item, bytes):
                await producer.send_and_wait(topic, item)
            else:
                key, value, headers = item
                await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()


async def read_all(
    bootstrap: str, topic: str, idle: float = 2.0, limit: float = 30.0, expect: int = 0
) -> list[Any]:
    """Every record on `topic`: at least `expect` of them (waiting up to `limit`
    seconds for them), then whatever else arrives before `idle` quiet seconds."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + limit
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            got = [r for rs in batch.values() for r in rs]
            if got:
                records.extend(got)
                quiet_since = time.monotonic()
            elif len(records) >= expect and time.monotonic() - quiet_since > (
                idle if records else idle * 3
            ):
                break
    finally:
        await consumer.stop()
    return records


def assigned_partitions(worker: Worker, topic: str) -> set[int]:
    """The partitions of `topic` the worker's consumers hold now."""
    held: set[int] = set()
    for subscriber in worker.broker.subscribers:
        consumer = getattr(subscriber, "consumer", None)
        if consumer is not None:
            held |= {tp.partition for tp in consumer.assignment() if tp.topic == topic}
    return held


async def eventually(
    probe: Callable[[], Awaitable[Any]], timeout: float = 30.0, interval: float = 0.2
) -> Any:
    """Await `probe` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)


def sample(worker: Worker, name: str, **labels: str) -> float:
    """A metric's current value from the worker's registry (0 when never set)."""
    return worker.metrics.registry.get_sample_value(name, labels) or 0.0


def worker_env(settings: Settings) -> dict[str, str]:
    """`settings` as the RECON_* environment of a worker subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECON_")}
    for name, value in settings.model_dump().items():
        if value is None or isinstance(value, dict):
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"RECON_{name.upper()}"] = str(value)
    return env


def start_worker(settings: Settings, role: str, log: Path, http_port: int = 0) -> Any:
    """`recon-stream run ROLE` as a subprocess (output appended to `log`)."""
    env = worker_env(settings)
    env["RECON_HTTP_PORT"] = str(http_port)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "recon_stream", "run", role],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


# --- the scanner's test data -------------------------------------------------------

NOW = datetime.now(UTC)


def banner(
    port: int,
    module: str,
    *,
    product: str | None = None,
    version: str | None = None,
    vulns: dict[str, Any] | None = None,
    transport: str = "tcp",
) -> dict[str, Any]:
    return {
        "port": port,
        "transport": transport,
        "product": product,
        "version": version,
        "timestamp": (NOW - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S.%f"),
        "data": f"{module} banner",
        "_shodan": {"module": module, "crawler": "x", "id": "y"},
        **({"vulns": vulns} if vulns else {}),
    }


def host(ip: str, *banners: dict[str, Any]) -> dict[str, Any]:
    return {
        "ip_str": ip,
        "ports": [b["port"] for b in banners],
        "hostnames": [],
        "org": "Example",
        "isp": "Example",
        "asn": "AS64500",
        "last_update": NOW.strftime("%Y-%m-%dT%H:%M:%S.%f"),
        "data": list(banners),
    }


async def events_on(settings: Settings, n: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    async def enough() -> list[dict[str, Any]] | None:
        records = await read_all(
            settings.kafka_bootstrap_servers, settings.topic_exposures, idle=1.0, expect=n
        )
        return [json.loads(r.value) for r in records] if len(records) >= n else None

    return await eventually(enough, timeout=timeout, interval=0.5)  # type: ignore[no-any-return]


def run_cli(settings: Settings, *args: str, env: dict[str, str] | None = None) -> Any:
    """`recon-stream ARGS` as users run it: a subprocess with RECON_* variables."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RECON_")}
    base.update(
        {
            "RECON_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
            "RECON_MONGODB_URI": settings.mongodb_uri.get_secret_value(),
            "RECON_MONGODB_DATABASE": settings.mongodb_database,
            "RECON_TOPIC_HEARTBEATS": settings.topic_heartbeats,
            "RECON_TOPIC_SCAN_REQUESTS": settings.topic_scan_requests,
            "RECON_TOPIC_EXPOSURES": settings.topic_exposures,
            "RECON_TOPIC_DLQ": settings.topic_dlq + "-cli",
            "RECON_TOPIC_COMMANDS": settings.topic_commands,
            "RECON_KAFKA_TOPIC_PARTITIONS": "2",
        }
    )
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "recon_stream", *args],
        env=base,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


Command = tuple[bytes, bytes, list[Any]]
"""A command record for `produce`: key (the organization), value, headers."""


def command(kind: str, org: str = "acme", **fields: Any) -> Command:
    """A command of `kind` for `org`, requested now by a technician, with a new id."""
    body = {
        "command": kind,
        "organization_id": org,
        "requested_by": "tech@msp.example",
        "requested_at": datetime.now(UTC).isoformat(),
        "command_id": str(uuid.uuid4()),
        **fields,
    }
    return org.encode(), json.dumps(body).encode(), []


async def send(settings: Settings, *commands: Command) -> None:
    await produce(settings.kafka_bootstrap_servers, settings.topic_commands, list(commands))


@asynccontextmanager
async def verification_world(
    workdir: str, scanner_group_id: str, **overrides: Any
) -> AsyncIterator[tuple[Settings, ShodanEmulator]]:
    """Tansu, mongod and the Shodan emulator (run it inside a test's network namespace),
    and settings for them with TCP verification on: a confirm interval and a connect
    timeout of 1 s unless `overrides` say otherwise."""
    base = Path(workdir)
    with (
        EmbeddedKafka(log_dir=base / "logs") as kafka,
        EmbeddedMongo(data_dir=base / "mongo", log_dir=base / "logs") as mongo,
        ShodanEmulator(rate=None) as shodan,
    ):
        values: dict[str, Any] = {
            "shodan_provider": "api",
            "shodan_api_key": SecretStr(shodan.api_key),
            "shodan_api_url": shodan.url,
            "shodan_rate": 20.0,
            "shodan_timeout_seconds": 2.0,
            "exposure_relay_interval_seconds": 0.5,
            "gauge_sample_seconds": 0.5,
            "verify_tcp": True,
            "verify_rate": 20.0,
            "verify_timeout_seconds": 1.0,
            "verify_confirm_seconds": 1.0,
            "scanner_group_id": scanner_group_id,
            **overrides,
        }
        settings = make_settings(
            kafka.bootstrap_servers, mongo.uri, uuid.uuid4().hex[:10], **values
        )
        await prepare(settings)
        yield settings, shodan
