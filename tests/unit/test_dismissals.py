"""`dismiss`, `undismiss` and `purge` on fakes: the contract, what each does to the pair,
its exposures, history and the organization's data, and how bad ones are refused."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from recon_stream.dismissals import Dismissing
from recon_stream.domain.commands import (
    DismissCommand,
    PurgeCommand,
    UndismissCommand,
    dismissal_of,
    parse_command,
)
from recon_stream.domain.messages import InvalidMessage, RejectReason
from recon_stream.domain.pairs import DismissalChange, PairStatus
from recon_stream.domain.scans import HostScan, Service
from recon_stream.domain.scope import EMPTY_SCOPE, parse_scope
from recon_stream.domain.snapshot import OrgContext
from recon_stream.domain.verification_consent import Consent
from tests.fakes import FakeRecord, Parts

pytestmark = pytest.mark.unit

SCHEMA = json.loads(
    (Path(__file__).parents[2] / "schemas" / "command.v1.json").read_text(encoding="utf-8")
)
T0 = datetime(2026, 12, 1, 12, tzinfo=UTC)
IP = "81.2.69.142"
OTHER = "81.2.69.143"
RDP = Service(port=3389, module="rdp")
SMB = Service(port=445, module="smb")


def command(kind: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "command": kind,
        "organization_id": "acme",
        "requested_by": "tech@msp",
        "requested_at": "2026-12-01T12:00:00Z",
    }
    if kind in ("dismiss", "undismiss"):
        base["ip"] = IP
    if kind == "dismiss":
        base["reason"] = "a technician's home office"
    return {**base, **fields}


def record(kind: str, **fields: Any) -> FakeRecord:
    return FakeRecord(json.dumps(command(kind, **fields)).encode(), key=b"acme")


async def opened(parts: Parts, org: str, ip: str, *services: Service) -> None:
    parts.org_ips.add(org, ip)
    scan = HostScan(ip=ip, provider="api", queried_at=T0, services=services or (RDP,))
    await parts.outbox.publish(await parts.updater.apply(OrgContext(org, ("a",), ()), scan))


def closed(parts: Parts) -> list[tuple[str, str, int, str | None]]:
    return [
        (e.data.organization_id, e.data.ip, e.data.port, e.data.reason and e.data.reason.value)
        for e in parts.events.published
        if e.data.change.value == "closed"
    ]


# -- the contract ------------------------------------------------------------------------


def test_each_new_command_parses_and_validates_against_the_published_schema() -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    cases = [
        (command("dismiss", expires_at="2027-01-01T00:00:00+01:00"), DismissCommand),
        (command("undismiss"), UndismissCommand),
        (command("undismiss", reason="it is ours after all"), UndismissCommand),
        (command("purge", command_id="p-1"), PurgeCommand),
    ]
    for fields, kind in cases:
        validator.validate(fields)
        assert isinstance(parse_command(json.dumps(fields).encode()), kind)


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        (command("dismiss", ip=None), "ip"),
        (command("dismiss", ip="10.0.0.300"), "ip"),
        (command("dismiss", reason=" "), "reason"),
        (command("dismiss", reason="x" * 501), "reason"),
        (command("dismiss", expires_at="tomorrow"), "expires_at"),
        (command("undismiss", ip=None), "ip"),
        (command("purge", requested_by=" "), "requested_by"),
        (command("purge", organization_id="a b"), "organization_id"),
    ],
)
def test_a_bad_command_is_refused_with_the_field_named(fields: dict[str, Any], where: str) -> None:
    body = {k: v for k, v in fields.items() if v is not None}
    with pytest.raises(InvalidMessage) as caught:
        parse_command(json.dumps(body).encode())
    assert caught.value.reason is RejectReason.SCHEMA
    assert where in caught.value.detail
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    validator = jsonschema.Draft202012Validator(SCHEMA, format_checker=checker)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(body)


# -- dismiss and undismiss ---------------------------------------------------------------


async def test_a_dismissal_closes_the_ips_exposures_for_that_organization_only() -> None:
    parts = Parts()
    await opened(parts, "acme", IP, RDP, SMB)
    await opened(parts, "globex", IP, RDP)
    commands = parts.command_service()
    dismiss = record("dismiss", command_id="d-1")
    assert await commands.handle([dismiss, dismiss]) == 2  # the second: a duplicate
    assert sorted(closed(parts)) == [
        ("acme", IP, 445, "dismissed"),
        ("acme", IP, 3389, "dismissed"),
    ]
    assert parts.org_ips.pairs[("acme", IP)]["status"] == "dismissed"
    assert parts.org_ips.pairs[("globex", IP)]["status"] == "active"
    assert await parts.org_ips.orgs_behind(IP) == [OrgContext("globex", ("agent-1",), ())]
    assert parts.command_log.outcomes["d-1"] == (parts.command_log.outcomes["d-1"][0], None)
    assert parts.command_log.outcomes["d-1"][0].value == "applied"
    (entry,) = parts.history.dismissals.values()
    assert (entry.change, entry.requested_by, entry.why, entry.ip) == (
        DismissalChange.DISMISSED,
        "tech@msp",
        "a technician's home office",
        IP,
    )
    tombstones = [row for row in parts.state.published if row.value is None]
    assert sorted(row.key for row in tombstones) == [
        f"acme/{IP}/tcp/3389",
        f"acme/{IP}/tcp/445",
    ]


async def test_an_ip_never_reported_cannot_be_dismissed_and_goes_to_the_dlq() -> None:
    parts = Parts()
    parts.org_ips.add("globex", IP)  # someone else's IP is not acme's to dismiss
    commands = parts.command_service()
    assert await commands.handle([record("dismiss", command_id="d-1")]) == 0
    (rejected,) = parts.dead_letters.rejected
    assert rejected.reason is RejectReason.UNKNOWN_TARGET
    assert parts.command_log.outcomes["d-1"] == (
        parts.command_log.outcomes["d-1"][0],
        "unknown_target",
    )
    assert parts.org_ips.pairs[("globex", IP)]["status"] == "active"


async def test_a_retired_or_excluded_ip_can_be_dismissed_and_a_heartbeat_keeps_it() -> None:
    parts = Parts()
    parts.org_ips.add("acme", IP)
    parts.org_ips.pairs[("acme", IP)]["status"] = "retired"
    commands = parts.command_service()
    await commands.handle([record("dismiss", command_id="d-1")])
    assert parts.org_ips.pairs[("acme", IP)]["status"] == "dismissed"
    assert parts.dead_letters.rejected == []


async def test_undismiss_makes_the_ip_active_and_looked_up_again_or_excluded_by_scope() -> None:
    parts = Parts()
    await opened(parts, "acme", IP)
    await opened(parts, "acme", OTHER)
    scope = parse_scope(
        "version: 1\norganizations:\n  acme:\n"
        f"    exclude: [{{cidr: {OTHER}/32, reason: guests}}]\n",
        "scope.yaml",
    )
    commands = parts.command_service(scope)
    await commands.handle([record("dismiss", command_id="d-1")])
    await commands.handle([record("dismiss", ip=OTHER, command_id="d-2")])
    later = "2026-12-01T13:00:00Z"
    await commands.handle(
        [
            record("undismiss", command_id="u-1", requested_at=later, reason="ours after all"),
            record("undismiss", ip=OTHER, command_id="u-2", requested_at=later),
            record("undismiss", command_id="u-3", requested_at=later),  # not dismissed now
        ]
    )
    assert parts.org_ips.pairs[("acme", IP)]["status"] == "active"
    assert parts.org_ips.pairs[("acme", IP)]["requested_at"] == datetime(
        2026, 12, 1, 13, tzinfo=UTC
    )
    assert parts.org_ips.pairs[("acme", OTHER)]["status"] == "excluded"
    assert parts.org_ips.pairs[("acme", OTHER)]["reason"] == "guests"
    outcomes = {k: v[0].value for k, v in parts.command_log.outcomes.items()}
    assert outcomes == {
        "d-1": "applied",
        "d-2": "applied",
        "u-1": "applied",
        "u-2": "applied",
        "u-3": "no_effect",
    }
    ends = {
        entry.entry_id: (entry.change, entry.why)
        for entry in parts.history.dismissals.values()
        if entry.change is DismissalChange.UNDISMISSED
    }
    assert ends == {
        "undismiss:u-1": (DismissalChange.UNDISMISSED, "ours after all"),
        "undismiss:u-2": (DismissalChange.UNDISMISSED, None),
    }


async def test_a_dismissal_past_its_expiry_ends_and_a_newer_one_is_left_alone() -> None:
    parts = Parts()
    parts.org_ips.add("acme", IP)
    parts.org_ips.add("acme", OTHER)
    dismissing = Dismissing(parts.org_ips, parts.history, EMPTY_SCOPE, parts.outbox)
    soon = parse_command(
        json.dumps(command("dismiss", expires_at="2026-12-02T00:00:00Z", command_id="d-1")).encode()
    )
    never = parse_command(json.dumps(command("dismiss", ip=OTHER, command_id="d-2")).encode())
    assert isinstance(soon, DismissCommand)
    assert isinstance(never, DismissCommand)
    assert await dismissing.dismiss(dismissal_of(soon))
    assert await dismissing.dismiss(dismissal_of(never))
    assert await dismissing.expire(datetime(2026, 12, 1, 23, tzinfo=UTC)) == 0
    assert await dismissing.expire(datetime(2026, 12, 2, tzinfo=UTC)) == 1
    assert parts.org_ips.pairs[("acme", IP)]["status"] == "active"
    assert parts.org_ips.pairs[("acme", OTHER)]["status"] == "dismissed"
    assert "dismissal_expired:d-1" in parts.history.dismissals
    assert await dismissing.expire(datetime(2027, 12, 2, tzinfo=UTC)) == 0


async def test_a_dismissal_stored_before_a_crash_still_closes_on_redelivery() -> None:
    parts = Parts()
    await opened(parts, "acme", IP)
    raw = command("dismiss", command_id="d-1")
    parsed = parse_command(json.dumps(raw).encode())
    assert isinstance(parsed, DismissCommand)
    # Stored, then the worker died before closing, history and the outcome.
    assert await parts.org_ips.dismiss(dismissal_of(parsed)) is PairStatus.ACTIVE
    await parts.command_service().handle([FakeRecord(json.dumps(raw).encode())])
    assert closed(parts) == [("acme", IP, 3389, "dismissed")]
    assert list(parts.history.dismissals) == ["dismiss:d-1"]


# -- purge -------------------------------------------------------------------------------


async def test_purge_closes_every_open_exposure_then_deletes_the_organization() -> None:
    parts = Parts()
    await opened(parts, "acme", IP, RDP, SMB)
    await opened(parts, "acme", OTHER)
    await opened(parts, "globex", IP)
    await parts.consents.set(Consent("acme", True, "ciso@acme", "contract", T0, "v-1"))
    commands = parts.command_service()
    events_before = len(parts.events.published)
    await commands.handle([record("purge", command_id="p-1")])
    assert parts.command_log.outcomes["p-1"][0].value == "applied"
    purged = parts.events.published[events_before:]
    assert sorted((e.data.ip, e.data.port) for e in purged) == [
        (IP, 445),
        (IP, 3389),
        (OTHER, 3389),
    ]
    assert {(e.data.change.value, e.data.reason and e.data.reason.value) for e in purged} == {
        ("closed", "organization_purged")
    }
    tombstones = [row.key for row in parts.state.published if row.value is None]
    assert sorted(tombstones) == [
        f"acme/{IP}/tcp/3389",
        f"acme/{IP}/tcp/445",
        f"acme/{OTHER}/tcp/3389",
    ]
    assert [key for key in parts.org_ips.pairs] == [("globex", IP)]
    assert [key for key in parts.snapshots.snapshots] == [("globex", IP)]
    assert all(e.data.organization_id == "globex" for e in parts.history.entries.values())
    assert await parts.consents.get("acme") is None
    # Again (another id): nothing left, nothing to do.
    await commands.handle([record("purge", command_id="p-2")])
    assert parts.command_log.outcomes["p-2"][0].value == "no_effect"
    assert len(parts.events.published) == events_before + 3


async def test_purge_of_an_unknown_organization_has_no_effect() -> None:
    parts = Parts()
    await opened(parts, "globex", IP)
    await parts.command_service().handle([record("purge", command_id="p-1")])
    assert parts.command_log.outcomes["p-1"][0].value == "no_effect"
    assert parts.dead_letters.rejected == []
    assert ("globex", IP) in parts.org_ips.pairs


async def test_an_expired_dismissals_end_is_kept_even_if_history_went_first() -> None:
    parts = Parts()
    parts.org_ips.add("acme", IP)
    dismissing = Dismissing(parts.org_ips, parts.history, EMPTY_SCOPE, parts.outbox)
    parsed = parse_command(
        json.dumps(command("dismiss", expires_at="2026-12-01T12:30:00Z", command_id="d-1")).encode()
    )
    assert isinstance(parsed, DismissCommand)
    await dismissing.dismiss(dismissal_of(parsed))
    now = T0 + timedelta(hours=1)
    assert await dismissing.expire(now) == 1
    entry = parts.history.dismissals["dismissal_expired:d-1"]
    assert (entry.at, entry.requested_by, entry.why) == (
        now,
        "tech@msp",
        "a technician's home office",
    )
