"""The `recon-stream` command line."""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError

from recon_stream.domain.policy_file import PolicyError
from recon_stream.domain.risk import Severity
from recon_stream.roles import ROLES, Role
from recon_stream.settings import Settings

if TYPE_CHECKING:
    from recon_stream.domain.commands import RecordedOutcome
    from recon_stream.domain.verification_consent import Consent

cli = typer.Typer(
    name="recon-stream",
    help="Outside-in attack-surface monitoring from endpoint-agent heartbeats.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


DEFAULT_WAIT = 60.0
"""Seconds `--wait` alone waits for a command's outcome."""


Wait = Annotated[
    float | None,
    typer.Option(
        "--wait",
        metavar="[SECONDS]",
        help=f"wait for the outcome (default {DEFAULT_WAIT:.0f} s); exit 0 if applied or "
        "no_effect, 1 if rejected or not applied in time",
    ),
]
"""`--wait [SECONDS]`: wait for the command's outcome."""


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
    from recon_stream.app import build_worker, serve
    from recon_stream.domain.scope import ScopeError
    from recon_stream.notifier import NotifyFileError

    _logging(log_level)
    settings = _settings()
    roles = ROLES if role is Role.all else (role.value,)
    try:
        worker = build_worker(settings, roles)
    except PolicyError as error:
        # A worker never starts on a policy it cannot apply as written.
        typer.echo(f"invalid risk policy, not starting:\n{error}", err=True)
        raise typer.Exit(2) from None
    except NotifyFileError as error:
        typer.echo(f"invalid RECON_NOTIFY_FILE, not starting:\n{error}", err=True)
        raise typer.Exit(2) from None
    except ScopeError as error:
        typer.echo(f"invalid RECON_SCOPE_FILE, not starting:\n{error}", err=True)
        raise typer.Exit(2) from None
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
    org: Annotated[str | None, typer.Option("--org", help="organization_id")] = None,
    all_orgs: Annotated[
        bool, typer.Option("--all-orgs", help="every organization's (not with --org)")
    ] = False,
    output: Annotated[Format, typer.Option("--format", help="table, json or csv")] = Format.table,
    severity: Annotated[
        list[Severity] | None,
        typer.Option("--severity", help="only this severity (repeat for several)"),
    ] = None,
    accepted: Annotated[
        bool | None,
        typer.Option("--accepted/--unaccepted", help="only accepted / only unaccepted ones"),
    ] = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """An organization's exposures (or every organization's): the dashboard's table."""
    from recon_stream.exposure_table import load_all_rows, load_rows, render

    if (org is None) == (not all_orgs):
        typer.echo("give one of --org ORG and --all-orgs", err=True)
        raise typer.Exit(2)
    _logging(log_level)
    settings = _settings()
    wanted = [s.value for s in severity or []]
    if org is not None:
        rows = asyncio.run(load_rows(settings, org, severities=wanted, accepted=accepted))
    else:
        rows = asyncio.run(load_all_rows(settings, severities=wanted, accepted=accepted))
    typer.echo(render(rows, output.value, organizations=org is None), nl=False)


@cli.command()
def ips(
    org: Annotated[str, typer.Option("--org", help="organization_id")],
    output: Annotated[Format, typer.Option("--format", help="table, json or csv")] = Format.table,
    log_level: LogLevel = "WARNING",
) -> None:
    """Every IP an organization's agents reported: its state (active, excluded,
    shared_egress, dismissed, retired) and why, agents, sites, first and last seen,
    the last lookup, the next one due and the last error."""
    from recon_stream.exposure_table import load_ips, render_ips

    _logging(log_level)
    settings = _settings()
    typer.echo(render_ips(asyncio.run(load_ips(settings, org)), output.value), nl=False)


@cli.command()
def history(
    org: Annotated[str, typer.Option("--org", help="organization_id")],
    ip: Annotated[str | None, typer.Option("--ip", help="only this IP")] = None,
    port: Annotated[int | None, typer.Option("--port", help="only this port")] = None,
    output: Annotated[Format, typer.Option("--format", help="table, json or csv")] = Format.table,
    limit: Annotated[int, typer.Option(help="at most this many entries")] = 1000,
    log_level: LogLevel = "WARNING",
) -> None:
    """Every change applied to an organization's exposures, newest first."""
    from recon_stream.exposure_table import load_history, render_history

    _logging(log_level)
    settings = _settings()
    entries = asyncio.run(load_history(settings, org, ip=ip, port=port, limit=limit))
    typer.echo(render_history(entries, output.value), nl=False)


@cli.command()
def accept(
    org: Annotated[str, typer.Option("--org", help="organization_id")],
    port: Annotated[int, typer.Option("--port")],
    reason: Annotated[str, typer.Option("--reason", help="why this exposure is intended")],
    by: Annotated[str, typer.Option("--by", help="who decides (user, ticket)")],
    ip: Annotated[str | None, typer.Option("--ip", help="default: every IP of the org")] = None,
    transport: Annotated[str, typer.Option("--transport", help="tcp or udp")] = "tcp",
    until: Annotated[
        str | None, typer.Option("--until", help="expiry, RFC 3339; default: none")
    ] = None,
    command_id: Annotated[str | None, typer.Option("--id", help="default: a new UUID")] = None,
    wait: Wait = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Accept an exposure as intended (publishes an `accept` command)."""
    _send_command(
        {
            "command": "accept",
            "organization_id": org,
            "ip": ip,
            "transport": transport,
            "port": port,
            "reason": reason,
            "requested_by": by,
            "expires_at": until,
        },
        command_id,
        log_level,
        wait,
    )


@cli.command()
def unaccept(
    org: Annotated[str, typer.Option("--org", help="organization_id")],
    port: Annotated[int, typer.Option("--port")],
    by: Annotated[str, typer.Option("--by", help="who decides (user, ticket)")],
    ip: Annotated[str | None, typer.Option("--ip", help="default: the org-wide one")] = None,
    transport: Annotated[str, typer.Option("--transport", help="tcp or udp")] = "tcp",
    command_id: Annotated[str | None, typer.Option("--id", help="default: a new UUID")] = None,
    wait: Wait = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Take an acceptance back (publishes an `unaccept` command)."""
    _send_command(
        {
            "command": "unaccept",
            "organization_id": org,
            "ip": ip,
            "transport": transport,
            "port": port,
            "requested_by": by,
        },
        command_id,
        log_level,
        wait,
    )


@cli.command()
def rescan(
    org: Annotated[str, typer.Option("--org", help="organization_id")],
    ip: Annotated[str | None, typer.Option("--ip", help="default: every active IP")] = None,
    by: Annotated[str, typer.Option("--by", help="who asks")] = "recon-stream cli",
    command_id: Annotated[str | None, typer.Option("--id", help="default: a new UUID")] = None,
    wait: Wait = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Ask for a fresh look at the IP (or every active IP), ahead of routine rescans
    and never served from a stored result (publishes a `rescan` command).

    Without scan credits (RECON_SHODAN_SCAN_CREDITS_PER_DAY=0, the default) it is a new
    lookup of Shodan's record: its last crawl of each port, which may be days old, so a
    port closed yesterday still shows open. With credits, the scanner first has Shodan
    scan the IP now (one credit per IP, within the day's figure across replicas), waits
    until Shodan says DONE (polled every RECON_SHODAN_SCAN_POLL_SECONDS, at most
    RECON_SHODAN_SCAN_TIMEOUT_SECONDS), then looks up; any refusal falls back to the
    plain lookup at once. With TCP verification on for the organization
    (`recon-stream verification`), the reported ports are checked first: when they all
    answer, no credit is spent; a port refused twice a minute apart closes at once."""
    _send_command(
        {"command": "rescan", "organization_id": org, "ip": ip, "requested_by": by},
        command_id,
        log_level,
        wait,
    )


@cli.command()
def dismiss(
    org: Annotated[str, typer.Option("--org", help="organization_id")],
    ip: Annotated[str, typer.Option("--ip", help="an IP the organization's agents reported")],
    reason: Annotated[str, typer.Option("--reason", help="why it is not the org's")],
    by: Annotated[str, typer.Option("--by", help="who decides (user, ticket)")],
    until: Annotated[
        str | None, typer.Option("--until", help="expiry, RFC 3339; default: none")
    ] = None,
    command_id: Annotated[str | None, typer.Option("--id", help="default: a new UUID")] = None,
    wait: Wait = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Say an IP is not the organization's (a home office, a hotel): its open exposures
    close (reason `dismissed`), no lookup is made for the organization and nothing more is
    reported on it until `undismiss` or the expiry (publishes a `dismiss` command)."""
    _send_command(
        {
            "command": "dismiss",
            "organization_id": org,
            "ip": ip,
            "reason": reason,
            "requested_by": by,
            "expires_at": until,
        },
        command_id,
        log_level,
        wait,
    )


@cli.command()
def undismiss(
    org: Annotated[str, typer.Option("--org", help="organization_id")],
    ip: Annotated[str, typer.Option("--ip")],
    by: Annotated[str, typer.Option("--by", help="who decides (user, ticket)")],
    reason: Annotated[str | None, typer.Option("--reason", help="why (kept in history)")] = None,
    command_id: Annotated[str | None, typer.Option("--id", help="default: a new UUID")] = None,
    wait: Wait = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Take a dismissal back: the IP is the organization's again and is looked up afresh
    (publishes an `undismiss` command)."""
    _send_command(
        {
            "command": "undismiss",
            "organization_id": org,
            "ip": ip,
            "reason": reason,
            "requested_by": by,
        },
        command_id,
        log_level,
        wait,
    )


@cli.command()
def purge(
    org: Annotated[str, typer.Option("--org", help="organization_id")],
    by: Annotated[str, typer.Option("--by", help="who decides (user, ticket)")],
    yes: Annotated[
        bool, typer.Option("--yes", help="confirm: the organization's data is deleted")
    ] = False,
    command_id: Annotated[str | None, typer.Option("--id", help="default: a new UUID")] = None,
    wait: Wait = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Offboard an organization (publishes a `purge` command): its open exposures close
    (reason `organization_purged`, with state tombstones), then its pairs, exposures,
    acceptances, dismissals, consent and history are deleted. Heartbeats that still
    arrive from its agents start it afresh."""
    if not yes:
        typer.echo(
            f"purge deletes every record of organization {org}: add --yes to confirm", err=True
        )
        raise typer.Exit(2)
    _send_command(
        {"command": "purge", "organization_id": org, "requested_by": by},
        command_id,
        log_level,
        wait,
    )


def _send_command(
    body: dict[str, object], command_id: str | None, log_level: str, wait: float | None = None
) -> None:
    """Validate a command, publish it (key = organization) and print its id; with `wait`,
    wait that many seconds for its outcome, print it and exit 0 (applied, no_effect) or 1."""
    from aiokafka import AIOKafkaProducer

    from recon_stream.adapters.kafka import admin_options
    from recon_stream.domain.commands import parse_command
    from recon_stream.domain.messages import InvalidMessage

    _logging(log_level)
    settings = _settings()
    body = {
        **{k: v for k, v in body.items() if v is not None},
        "requested_at": datetime.now(UTC).isoformat(),
        "command_id": command_id or str(uuid.uuid4()),
    }
    value = json.dumps(body).encode()
    try:
        command = parse_command(value)
    except InvalidMessage as error:
        typer.echo(f"not a valid command: {error.detail}", err=True)
        raise typer.Exit(2) from None

    async def go() -> None:
        producer = AIOKafkaProducer(**admin_options(settings), acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(settings.topic_commands, value, key=command.kafka_key())
        finally:
            await producer.stop()

    asyncio.run(go())
    typer.echo(command.identity)
    if wait is None:
        return
    from recon_stream.domain.commands import CommandOutcome

    recorded = asyncio.run(_outcome_of(settings, command.identity, wait))
    if recorded is None:
        typer.echo(f"not applied within {wait:g} s (are the scanner workers running?)", err=True)
        raise typer.Exit(1)
    detail = f" ({recorded.reason}: {recorded.detail})" if recorded.reason else ""
    typer.echo(f"{recorded.outcome.value}{detail}")
    if recorded.outcome is CommandOutcome.REJECTED:
        raise typer.Exit(1)


async def _outcome_of(
    settings: Settings, command_id: str, patience: float
) -> RecordedOutcome | None:
    from recon_stream.adapters import mongo
    from recon_stream.adapters.command_log import CommandLog

    client = mongo.connect(settings)
    try:
        log = CommandLog(client[settings.mongodb_database])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        while True:
            recorded = await log.outcome(command_id)
            if recorded is not None or loop.time() >= deadline:
                return recorded
            await asyncio.sleep(min(0.25, max(0.0, deadline - loop.time())))
    finally:
        await client.close()


class ShowFormat(enum.StrEnum):
    table = "table"
    json = "json"


VERIFICATION_HELP = (
    "Give or take back an organization's consent to TCP verification (publishes a "
    "`verification` command), or show the consent on record (--show, read from MongoDB)."
    "\n\n"
    "With consent, the scanner checks the organization's open TCP exposures with one TCP "
    "connect each, from its own network. Verification also needs RECON_VERIFY_TCP=true on "
    "the scanner workers. Only ports Shodan reported, on IPs the organization's agents "
    "reported in the last 24 h, are ever connected to: nothing else is scanned."
)


@cli.command(help=VERIFICATION_HELP)
def verification(
    org: Annotated[str, typer.Option("--org", help="organization_id")],
    enable: Annotated[
        bool | None,
        typer.Option("--enable/--disable", help="give consent / take it back"),
    ] = None,
    by: Annotated[str | None, typer.Option("--by", help="who decides (user, ticket)")] = None,
    reason: Annotated[str | None, typer.Option("--reason", help="why")] = None,
    show: Annotated[
        bool, typer.Option("--show", help="print the consent on record instead")
    ] = False,
    output: Annotated[
        ShowFormat, typer.Option("--format", help="with --show: table or json")
    ] = ShowFormat.table,
    command_id: Annotated[str | None, typer.Option("--id", help="default: a new UUID")] = None,
    wait: Wait = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Give or take back an organization's consent to TCP verification, or show it."""
    if show:
        if enable is not None or by is not None or reason is not None or wait is not None:
            typer.echo("--show takes no --enable/--disable, --by, --reason or --wait", err=True)
            raise typer.Exit(2)
        _logging(log_level)
        consent = asyncio.run(_consent_of(_settings(), org))
        typer.echo(_render_consent(org, consent, output), nl=False)
        return
    if enable is None or by is None or reason is None:
        typer.echo("--enable or --disable, --by and --reason are required (or --show)", err=True)
        raise typer.Exit(2)
    _send_command(
        {
            "command": "verification",
            "organization_id": org,
            "enabled": enable,
            "requested_by": by,
            "reason": reason,
        },
        command_id,
        log_level,
        wait,
    )


async def _consent_of(settings: Settings, organization_id: str) -> Consent | None:
    from recon_stream.adapters import mongo
    from recon_stream.adapters.consents import MongoConsents

    client = mongo.connect(settings)
    try:
        return await MongoConsents(client[settings.mongodb_database]).get(organization_id)
    finally:
        await client.close()


def _render_consent(org: str, consent: Consent | None, output: ShowFormat) -> str:
    if output is ShowFormat.json:
        return (
            json.dumps(
                {
                    "organization_id": org,
                    "state": _consent_state(consent),
                    "enabled": consent is not None and consent.enabled,
                    "requested_by": consent.requested_by if consent else None,
                    "at": consent.at.isoformat() if consent else None,
                    "reason": consent.reason if consent else None,
                    "command_id": consent.command_id if consent else None,
                },
                indent=2,
            )
            + "\n"
        )
    if consent is None:
        return f"verification for {org}: never set (not enabled)\n"
    rows = [
        ("organization", org),
        ("verification", _consent_state(consent)),
        ("by", consent.requested_by),
        ("at", consent.at.isoformat()),
        ("reason", consent.reason),
        ("command", consent.command_id),
    ]
    return "".join(f"{name:<13}{value}\n" for name, value in rows)


def _consent_state(consent: Consent | None) -> str:
    if consent is None:
        return "never_set"
    return "enabled" if consent.enabled else "disabled"


@cli.command()
def acceptances(
    org: Annotated[str, typer.Option("--org", help="organization_id")],
    output: Annotated[Format, typer.Option("--format", help="table, json or csv")] = Format.table,
    log_level: LogLevel = "WARNING",
) -> None:
    """The acceptances in force: per IP and organization-wide, ports not open included."""
    from recon_stream.exposure_table import load_acceptances, render_acceptances

    _logging(log_level)
    settings = _settings()
    typer.echo(
        render_acceptances(asyncio.run(load_acceptances(settings, org)), output.value), nl=False
    )


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


policy = typer.Typer(help="The risk policy: show the one in force, check a file.")
cli.add_typer(policy, name="policy")


@policy.command("show")
def policy_show(log_level: LogLevel = "WARNING") -> None:
    """Print the policy in force (built-in, changed by RECON_RISK_POLICY_FILE) as a file."""
    from recon_stream.domain.policy_file import dump_policy
    from recon_stream.policy import effective_policy

    _logging(log_level)
    settings = _settings()
    try:
        typer.echo(dump_policy(effective_policy(settings)), nl=False)
    except PolicyError as error:
        typer.echo(f"invalid risk policy:\n{error}", err=True)
        raise typer.Exit(2) from None


@policy.command("check")
def policy_check(
    file: Annotated[Path, typer.Argument(help="a risk policy file (YAML)")],
) -> None:
    """Validate a policy file; say what it would put in force, or where it is wrong."""
    from recon_stream.domain.policy_file import DEFAULT_POLICY, parse_policy

    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        typer.echo(f"{file}: cannot read it ({error.strerror})", err=True)
        raise typer.Exit(2) from None
    try:
        checked = parse_policy(text, str(file), base=DEFAULT_POLICY)
    except PolicyError as error:
        typer.echo(f"invalid risk policy:\n{error}", err=True)
        raise typer.Exit(2) from None
    overrides = sum(len(o) for o in checked.organizations.values())
    typer.echo(
        f"{file}: ok: {len(checked.rules)} service rules, {len(checked.vuln_rules)} "
        f"vulnerability rules, {overrides} overrides for {len(checked.organizations)} "
        "organizations"
    )


scope = typer.Typer(help="The scope file: show the one in force, check a file.")
cli.add_typer(scope, name="scope")


class ScopeFormat(enum.StrEnum):
    yaml = "yaml"
    json = "json"


@scope.command("show")
def scope_show(
    output: Annotated[ScopeFormat, typer.Option("--format")] = ScopeFormat.yaml,
) -> None:
    """Print the scope file in force (RECON_SCOPE_FILE), normalized."""
    from recon_stream.domain.scope import ScopeError, dump_scope, load_scope

    settings = _settings()
    if settings.scope_file is None:
        typer.echo("no scope file: nothing excluded")
        return
    try:
        loaded = load_scope(settings.scope_file)
    except ScopeError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(2) from None
    if output is ScopeFormat.json:
        typer.echo(json.dumps(loaded.document(), indent=2))
    else:
        typer.echo(dump_scope(loaded), nl=False)


@scope.command("check")
def scope_check(
    file: Annotated[Path, typer.Argument(help="a scope file (YAML)")],
) -> None:
    """Validate a scope file: its counts, or FILE:LINE: field: message for each mistake."""
    from recon_stream.domain.scope import ScopeError, load_scope

    try:
        checked = load_scope(file)
    except ScopeError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{file}: ok: {checked.summary()}")


def main() -> None:
    cli(args=_optional_wait(sys.argv[1:]))


def _optional_wait(args: list[str]) -> list[str]:
    """`--wait` may come without its SECONDS (click has no optional option values)."""
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        following = args[i + 1] if i + 1 < len(args) else None
        if arg == "--wait" and (following is None or following.startswith("--")):
            out.append(f"{DEFAULT_WAIT:g}")
    return out
