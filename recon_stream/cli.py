"""The `recon-stream` command line."""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from recon_stream.settings import Settings

cli = typer.Typer(
    name="recon-stream",
    help="Outside-in attack-surface monitoring from endpoint-agent heartbeats.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Role(enum.StrEnum):
    ingest = "ingest"
    scanner = "scanner"
    scheduler = "scheduler"
    all = "all"


class Format(enum.StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        # pydantic's message names the variable and the rule, never a secret value.
        typer.echo(f"invalid configuration:\n{error}", err=True)
        raise typer.Exit(2) from None


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aiokafka logs every broker reconnect at ERROR with a traceback; our retry
    # loops already report outages once per attempt.
    root = logging.getLogger().level
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root))
    # FastStream logs every batch at INFO ("Received"/"Processed") on its own logger.
    logging.getLogger("faststream").setLevel(max(logging.WARNING, root))


LogLevel = Annotated[str, typer.Option("--log-level", envvar="RECON_LOG_LEVEL")]


@cli.command()
def run(
    role: Annotated[Role, typer.Argument(help="which worker to run")],
    log_level: LogLevel = "INFO",
) -> None:
    """Run a worker until SIGTERM/SIGINT."""
    from recon_stream.app import ROLES, build_worker, serve

    _logging(log_level)
    settings = _settings()
    roles = ROLES if role is Role.all else (role.value,)
    worker = build_worker(settings, roles)
    asyncio.run(serve(worker))


@cli.command()
def init(log_level: LogLevel = "WARNING") -> None:
    """Create the Kafka topics and MongoDB indexes (idempotent)."""
    from recon_stream.adapters import initialize

    _logging(log_level)
    settings = _settings()
    topics, indexes = asyncio.run(initialize(settings))
    for name, outcome in topics.items():
        typer.echo(f"topic {name}: {outcome}")
    typer.echo(f"indexes on {settings.mongodb_database}: {', '.join(indexes)}")


@cli.command("publish-heartbeat")
def publish_heartbeat(
    org: Annotated[str | None, typer.Option("--org", help="organization_id")] = None,
    agent: Annotated[str | None, typer.Option("--agent", help="agent_id")] = None,
    ip: Annotated[str | None, typer.Option("--ip", help="public_ip")] = None,
    observed_at: Annotated[
        str | None, typer.Option(help="RFC 3339 with offset; default: now")
    ] = None,
    site: Annotated[str | None, typer.Option("--site", help="site_id")] = None,
    hostname: Annotated[str | None, typer.Option()] = None,
    agent_version: Annotated[str | None, typer.Option()] = None,
    event_id: Annotated[str | None, typer.Option()] = None,
    raw: Annotated[
        str | None,
        typer.Option(help="publish this exact value, unvalidated ('-' reads stdin)"),
    ] = None,
    key: Annotated[str | None, typer.Option(help="Kafka key; default: the agent id")] = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Publish one heartbeat to the heartbeats topic."""
    from aiokafka import AIOKafkaProducer

    from recon_stream.adapters.kafka import admin_options
    from recon_stream.domain.heartbeats import InvalidHeartbeat, parse_heartbeat

    _logging(log_level)
    settings = _settings()
    if raw is not None:
        value = (sys.stdin.read() if raw == "-" else raw).encode()
    else:
        if not (org and agent and ip):
            typer.echo("--org, --agent and --ip are required (or use --raw)", err=True)
            raise typer.Exit(2)
        body = {
            "organization_id": org,
            "agent_id": agent,
            "public_ip": ip,
            "observed_at": observed_at or datetime.now(UTC).isoformat(),
            "site_id": site,
            "hostname": hostname,
            "agent_version": agent_version,
            "event_id": event_id,
            "schema_version": 1,
        }
        value = json.dumps({k: v for k, v in body.items() if v is not None}).encode()
        try:
            parse_heartbeat(value)
        except InvalidHeartbeat as error:
            typer.echo(f"not a valid heartbeat: {error}", err=True)
            raise typer.Exit(2) from None
    kafka_key = (key or agent or "").encode() or None

    async def go() -> None:
        producer = AIOKafkaProducer(**admin_options(settings), acks="all")
        await producer.start()
        try:
            meta = await producer.send_and_wait(settings.topic_heartbeats, value, key=kafka_key)
        finally:
            await producer.stop()
        typer.echo(f"published to {meta.topic}[{meta.partition}]@{meta.offset}")

    asyncio.run(go())


@cli.command()
def exposures(
    org: Annotated[str, typer.Option("--org", help="organization_id")],
    output: Annotated[Format, typer.Option("--format", help="table, json or csv")] = Format.table,
    log_level: LogLevel = "WARNING",
) -> None:
    """An organization's exposures: the dashboard's table."""
    from recon_stream.exposure_table import load_rows, render

    _logging(log_level)
    settings = _settings()
    rows = asyncio.run(load_rows(settings, org))
    typer.echo(render(rows, output.value), nl=False)


@cli.command()
def dev(
    data_dir: Annotated[
        Path, typer.Option(help="where the embedded MongoDB keeps its data, and the logs")
    ] = Path(".recon-dev"),
    keep_running: Annotated[
        bool, typer.Option(help="keep the stack running until Ctrl-C/SIGTERM")
    ] = False,
    http_port: Annotated[int, typer.Option(help="metrics/health port")] = 8080,
    kafka_port: Annotated[
        int | None, typer.Option(help="the Kafka broker's port; default: a free one")
    ] = None,
    mongodb_port: Annotated[
        int | None, typer.Option(help="MongoDB's port; default: a free one")
    ] = None,
    samples: Annotated[
        bool, typer.Option(help="publish the sample heartbeats and print the results")
    ] = True,
    log_level: LogLevel = "WARNING",
) -> None:
    """The whole pipeline on this machine, with embedded Kafka and MongoDB."""
    from recon_stream.dev import DevOptions, run_dev

    _logging(log_level)
    options = DevOptions(data_dir, keep_running, http_port, kafka_port, mongodb_port, samples)
    asyncio.run(run_dev(options))


@cli.command()
def schemas(
    out: Annotated[Path, typer.Option(help="folder to write into")] = Path("schemas"),
) -> None:
    """Regenerate the JSON Schemas from the models."""
    from recon_stream.contracts import write_schemas

    for path in write_schemas(out):
        typer.echo(f"wrote {path}")


def main() -> None:
    cli()
