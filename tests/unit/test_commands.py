"""Commands, acceptances and verification consent: the contract, how acceptance changes
become changes, and how a `verification` command changes the consent on record."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from recon_stream.domain.acceptance import Acceptance, AcceptanceInfo, acceptance_for
from recon_stream.domain.commands import (
    AcceptCommand,
    CommandOutcome,
    RescanCommand,
    UnacceptCommand,
    VerificationCommand,
    acceptance_of,
    consent_of,
    parse_command,
)
from recon_stream.domain.exposures import (
    ChangeKind,
    ChangeReason,
    acceptance_changes,
    build_events,
    diff,
)
from recon_stream.domain.messages import InvalidMessage, RejectReason
from recon_stream.domain.scans import HostScan, Service
from recon_stream.domain.verification_consent import Consent, ConsentChange, decide_consent
from tests.fakes import BUILT_IN, FakeConsents, FakeRecord, Parts
from tests.store_cases import CONSENT_CASES

SCHEMA = json.loads(
    (Path(__file__).parents[2] / "schemas" / "command.v1.json").read_text(encoding="utf-8")
)
T0 = datetime(2026, 11, 1, 12, tzinfo=UTC)
RDP = Service(port=3389, module="rdp")
SSH = Service(port=22, module="ssh", product="OpenSSH")


def body(**fields: Any) -> dict[str, Any]:
    return {
        "command": "accept",
        "organization_id": "acme",
        "requested_by": "tech@msp",
        "requested_at": "2026-11-01T12:00:00Z",
        "port": 3389,
        "reason": "jump host",
        **fields,
    }


def test_each_command_parses_and_validates_against_the_published_schema() -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for fields in (
        body(ip="203.0.113.7", expires_at="2027-01-01T00:00:00+01:00", command_id="c-1"),
        body(),
        {**body(), "command": "unaccept", "transport": "udp"},
        {
            "command": "rescan",
            "organization_id": "acme",
            "requested_by": "x",
            "requested_at": "2026-11-01T12:00:00Z",
        },
    ):
        validator.validate(fields)
        parsed = parse_command(json.dumps(fields).encode())
        assert parsed.command == fields["command"]
    accept = parse_command(json.dumps(body()).encode())
    assert isinstance(accept, AcceptCommand)
    assert accept.transport == "tcp"
    assert accept.ip is None


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"command": "delete"}, "command"),
        ({"port": 70000}, "port"),
        ({"reason": ""}, "reason"),
        ({"reason": "x" * 501}, "reason"),
        ({"requested_by": ""}, "requested_by"),
        ({"requested_at": "yesterday"}, "requested_at"),
        ({"requested_at": "2026-11-01T12:00:00"}, "requested_at"),  # no offset
        ({"ip": "10.0.0.300"}, "ip"),
        ({"organization_id": "a b"}, "organization_id"),
        ({"transport": "sctp"}, "transport"),
    ],
)
def test_a_bad_command_is_refused_with_the_field_named(change: dict[str, Any], where: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_command(json.dumps(body(**change)).encode())
    assert caught.value.reason is RejectReason.SCHEMA
    assert where in caught.value.detail


def test_a_command_without_id_is_identified_by_its_content() -> None:
    one = parse_command(json.dumps(body()).encode())
    again = parse_command(json.dumps(dict(reversed(body().items()))).encode())
    other = parse_command(json.dumps(body(reason="another")).encode())
    assert one.identity == again.identity != other.identity
    assert parse_command(json.dumps(body(command_id="c-9")).encode()).identity == "c-9"


def test_addresses_are_stored_under_the_pipelines_name_for_them() -> None:
    mapped = parse_command(json.dumps(body(ip="::ffff:203.0.113.7")).encode())
    assert isinstance(mapped, AcceptCommand)
    assert mapped.ip == "203.0.113.7"
    rescan = parse_command(
        json.dumps(
            {
                "command": "rescan",
                "organization_id": "acme",
                "requested_by": "x",
                "requested_at": "2026-11-01T12:00:00Z",
                "ip": "2001:DB8:0:0::1",
            }
        ).encode()
    )
    assert isinstance(rescan, RescanCommand)
    assert rescan.ip == "2001:db8::1"


def test_a_command_over_64_kib_is_refused() -> None:
    with pytest.raises(InvalidMessage, match="too_large"):
        parse_command(json.dumps(body(reason="x", padding="y" * 70_000)).encode())


def _acceptance(ip: str | None, *, at: datetime = T0, until: datetime | None = None) -> Acceptance:
    return Acceptance("acme", ip, "tcp", 3389, f"for {ip}", "tech", at, until)


def test_the_ips_own_acceptance_wins_and_an_expired_one_is_not_in_force() -> None:
    org_wide, own = _acceptance(None), _acceptance("203.0.113.7", at=T0 - timedelta(days=1))
    assert acceptance_for([org_wide, own], "203.0.113.7", "tcp", 3389, T0) == own.info
    assert acceptance_for([org_wide, own], "203.0.113.8", "tcp", 3389, T0) == org_wide.info
    assert acceptance_for([org_wide], "203.0.113.8", "tcp", 22, T0) is None
    ending = _acceptance("203.0.113.7", until=T0 + timedelta(hours=1))
    assert acceptance_for([ending], "203.0.113.7", "tcp", 3389, T0) == ending.info
    assert acceptance_for([ending], "203.0.113.7", "tcp", 3389, T0 + timedelta(hours=1)) is None


def test_acceptance_of_an_accept_command_is_accepted_when_requested() -> None:
    command = parse_command(json.dumps(body(ip="203.0.113.7")).encode())
    assert isinstance(command, AcceptCommand)
    acceptance = acceptance_of(command)
    assert acceptance.accepted_at == command.requested_at
    assert acceptance.covers("203.0.113.7", "tcp", 3389)
    assert not acceptance.covers("203.0.113.8", "tcp", 3389)
    assert isinstance(
        parse_command(json.dumps({**body(), "command": "unaccept"}).encode()), UnacceptCommand
    )


INFO = AcceptanceInfo(reason="jump host", requested_by="tech", accepted_at=T0, expires_at=None)
ENDS = AcceptanceInfo(
    reason="window", requested_by="tech", accepted_at=T0, expires_at=T0 + timedelta(hours=1)
)


def test_starting_ending_and_expiring_acceptances_are_changes_with_their_reasons() -> None:
    snapshot = {RDP.key: RDP, SSH.key: SSH}
    started = acceptance_changes([], snapshot, {}, {RDP.key: INFO}, T0)
    assert [(c.kind, c.key, c.reason, c.acceptance_changed) for c in started] == [
        (ChangeKind.CHANGED, RDP.key, ChangeReason.ACCEPTED, True)
    ]
    ended = acceptance_changes([], snapshot, {RDP.key: INFO}, {}, T0)
    assert [c.reason for c in ended] == [ChangeReason.UNACCEPTED]
    expired = acceptance_changes([], snapshot, {RDP.key: ENDS}, {}, T0 + timedelta(hours=2))
    assert [c.reason for c in expired] == [ChangeReason.ACCEPTANCE_EXPIRED]
    assert acceptance_changes([], snapshot, {RDP.key: INFO}, {RDP.key: INFO}, T0) == []


def test_an_exposure_that_changes_and_is_accepted_at_once_gets_one_event_naming_both() -> None:
    before = {SSH.key: SSH}
    scan = HostScan(
        ip="203.0.113.7",
        provider="api",
        queried_at=T0,
        services=(SSH.model_copy(update={"version": "9.6"}),),
    )
    changes = acceptance_changes(
        diff(before, scan), {SSH.key: scan.services[0]}, {}, {SSH.key: INFO}, T0
    )
    assert len(changes) == 1
    events = build_events(
        "acme",
        "203.0.113.7",
        changes,
        scan,
        version=3,
        candidate_agents=[],
        site_ids=[],
        acceptance_by_key={SSH.key: INFO},
        first_seen_by_key={},
        assessor=BUILT_IN,
    )
    assert events[0].data.changed_fields == ("version", "accepted")
    assert events[0].data.reason == ChangeReason.ACCEPTED
    assert events[0].data.acceptance == INFO


def test_a_port_that_opens_already_accepted_is_an_opened_event_saying_so() -> None:
    scan = HostScan(ip="203.0.113.7", provider="api", queried_at=T0, services=(RDP,))
    changes = acceptance_changes(diff({}, scan), {RDP.key: RDP}, {}, {RDP.key: INFO}, T0)
    assert [(c.kind, c.acceptance_changed) for c in changes] == [(ChangeKind.OPENED, False)]


@given(
    st.dictionaries(st.sampled_from([RDP.key, SSH.key]), st.sampled_from([INFO, ENDS, None])),
    st.dictionaries(st.sampled_from([RDP.key, SSH.key]), st.sampled_from([INFO, ENDS, None])),
)
def test_exactly_the_exposures_whose_acceptance_differs_change(
    was: dict[Any, AcceptanceInfo | None], now: dict[Any, AcceptanceInfo | None]
) -> None:
    snapshot = {RDP.key: RDP, SSH.key: SSH}
    changes = acceptance_changes([], snapshot, was, now, T0)
    assert {c.key for c in changes} == {k for k in snapshot if was.get(k) != now.get(k)}
    assert all(c.acceptance_changed for c in changes)


# -- verification consent ---------------------------------------------------------------


def verification(**fields: Any) -> dict[str, Any]:
    return {
        "command": "verification",
        "organization_id": "acme",
        "enabled": True,
        "requested_by": "ciso@acme",
        "requested_at": "2026-11-01T12:00:00Z",
        "reason": "pen-test contract 2026-17",
        **fields,
    }


def test_a_verification_command_parses_and_validates_against_the_published_schema() -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for fields in (verification(command_id="v-1"), verification(enabled=False)):
        validator.validate(fields)
        parsed = parse_command(json.dumps(fields).encode())
        assert isinstance(parsed, VerificationCommand)
        assert parsed.enabled is fields["enabled"]
    named = parse_command(json.dumps(verification(command_id="v-1")).encode())
    assert isinstance(named, VerificationCommand)
    consent = consent_of(named)
    assert consent == Consent("acme", True, "ciso@acme", "pen-test contract 2026-17", T0, "v-1")
    # Without an id, the content digest names it (as for every command).
    unnamed = parse_command(json.dumps(verification()).encode())
    assert unnamed.identity.startswith("sha256:")


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"requested_by": ""}, "requested_by"),
        ({"requested_by": "   "}, "requested_by"),
        ({"requested_by": None}, "requested_by"),
        ({"reason": ""}, "reason"),
        ({"reason": " \t"}, "reason"),
        ({"reason": "x" * 501}, "reason"),
        ({"enabled": "yes"}, "enabled"),
        ({"enabled": None}, "enabled"),
        ({"organization_id": "a b"}, "organization_id"),
    ],
)
def test_a_bad_verification_command_is_refused_with_the_field_named(
    change: dict[str, Any], where: str
) -> None:
    fields = verification(**change)
    with pytest.raises(InvalidMessage) as caught:
        parse_command(json.dumps(fields).encode())
    assert caught.value.reason is RejectReason.SCHEMA
    assert where in caught.value.detail
    assert not jsonschema.Draft202012Validator(SCHEMA).is_valid(fields)


@pytest.mark.parametrize("missing", ["reason", "requested_by", "enabled"])
def test_a_verification_command_without_a_required_field_is_refused(missing: str) -> None:
    fields = verification()
    del fields[missing]
    with pytest.raises(InvalidMessage) as caught:
        parse_command(json.dumps(fields).encode())
    assert caught.value.reason is RejectReason.SCHEMA
    assert f"verification.{missing}: Field required" in caught.value.detail


def _decided(enabled: bool, command_id: str, minutes: int) -> Consent:
    return Consent("acme", enabled, "ciso", "why", T0 + timedelta(minutes=minutes), command_id)


def test_a_consent_changes_only_for_a_newer_command_that_says_otherwise() -> None:
    on = _decided(True, "c-1", 0)
    assert decide_consent(None, None, on) is ConsentChange.CHANGED
    assert decide_consent(on, on.order, on) is ConsentChange.REPEATED
    assert decide_consent(on, on.order, _decided(True, "c-2", 1)) is ConsentChange.UNCHANGED
    assert decide_consent(on, on.order, _decided(False, "c-2", 1)) is ConsentChange.CHANGED
    assert decide_consent(on, on.order, _decided(False, "c-0", -1)) is ConsentChange.OUTDATED
    # The same instant (MongoDB keeps milliseconds): the later to arrive wins, whatever
    # its id (the CLI's ids are random).
    assert decide_consent(on, on.order, _decided(False, "c-2", 0)) is ConsentChange.CHANGED
    assert decide_consent(on, on.order, _decided(False, "c-0", 0)) is ConsentChange.CHANGED
    assert decide_consent(None, on.order, on) is ConsentChange.OUTDATED  # seen, no effect
    # A newer command that had no effect still orders those after it.
    newest = _decided(True, "c-3", 5).order
    assert decide_consent(on, newest, _decided(False, "c-2", 3)) is ConsentChange.OUTDATED
    assert [c for c in ConsentChange if c.applied] == [
        ConsentChange.CHANGED,
        ConsentChange.REPEATED,
    ]


@pytest.mark.parametrize("case", CONSENT_CASES, ids=lambda case: case.__name__)
async def test_consent_store_fake(case: Callable[[Any], Awaitable[None]]) -> None:
    await case(FakeConsents())


def _record(**fields: Any) -> FakeRecord:
    return FakeRecord(json.dumps(verification(**fields)).encode(), key=b"acme")


def _count(parts: Parts, outcome: str) -> float:
    return parts.metrics.commands.labels("verification", outcome)._value.get()


async def test_enabling_then_disabling_is_applied_once_each_with_history_entries() -> None:
    parts = Parts()  # no heartbeat from acme yet: consent may come first
    service = parts.command_service()
    enable = _record(command_id="v-1")
    later = "2026-11-01T13:00:00Z"
    assert await service.handle([enable, enable]) == 2  # the second is a duplicate
    assert await parts.consents.enabled_orgs(["acme", "globex"]) == {"acme"}
    assert parts.command_log.outcomes["v-1"] == (CommandOutcome.APPLIED, None)
    assert _count(parts, "duplicate") == 1
    again = _record(command_id="v-2", requested_at=later, requested_by="someone else")
    await service.handle([again])
    assert parts.command_log.outcomes["v-2"] == (CommandOutcome.NO_EFFECT, None)
    kept = await parts.consents.get("acme")
    assert kept is not None
    assert (kept.requested_by, kept.command_id) == ("ciso@acme", "v-1")  # the first decision's
    disable = _record(
        command_id="v-3", enabled=False, requested_at="2026-11-01T14:00:00Z", reason="ended"
    )
    await service.handle([disable])
    assert parts.command_log.outcomes["v-3"] == (CommandOutcome.APPLIED, None)
    assert await parts.consents.enabled_orgs(["acme"]) == set()
    assert [(c.enabled, c.requested_by, c.reason) for c in parts.history.consents.values()] == [
        (True, "ciso@acme", "pen-test contract 2026-17"),
        (False, "ciso@acme", "ended"),
    ]
    assert parts.dead_letters.rejected == []
    assert parts.events.published == []  # consent changes no exposure by itself


async def test_an_older_verification_delivered_late_has_no_effect() -> None:
    parts = Parts()
    service = parts.command_service()
    newer = _record(command_id="v-2", enabled=False, requested_at="2026-11-01T13:00:00Z")
    older = _record(command_id="v-1", enabled=True)
    await service.handle([_record(command_id="v-0", requested_at="2026-11-01T11:00:00Z")])
    await service.handle([newer, older])
    assert parts.command_log.outcomes["v-1"] == (CommandOutcome.NO_EFFECT, None)
    assert await parts.consents.enabled_orgs(["acme"]) == set()
    assert set(parts.history.consents) == {"v-0", "v-2"}


async def test_a_verification_stored_before_a_crash_is_applied_and_kept_in_history() -> None:
    parts = Parts()
    service = parts.command_service()
    raw = verification(command_id="v-1")
    command = parse_command(json.dumps(raw).encode())
    assert isinstance(command, VerificationCommand)
    # Stored, then the worker died before the history entry and the outcome.
    assert await parts.consents.set(consent_of(command)) is ConsentChange.CHANGED
    await service.handle([FakeRecord(json.dumps(raw).encode())])
    assert parts.command_log.outcomes["v-1"] == (CommandOutcome.APPLIED, None)
    assert list(parts.history.consents) == ["v-1"]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (json.dumps(verification(requested_by="", command_id="bad-1")), RejectReason.SCHEMA),
        (json.dumps(verification(command_id="bad-1", reason=None)), RejectReason.SCHEMA),
        (json.dumps(verification(enabled="maybe", command_id="bad-1")), RejectReason.SCHEMA),
        ('{"command": "verification", "command_id": "bad-1"', RejectReason.INVALID_JSON),
    ],
)
async def test_a_bad_verification_goes_to_the_dlq_and_is_recorded_rejected(
    value: str, reason: RejectReason
) -> None:
    parts = Parts()
    service = parts.command_service()
    assert await service.handle([FakeRecord(value.encode()), _record(command_id="ok")]) == 1
    (rejected,) = parts.dead_letters.rejected
    assert rejected.reason is reason
    assert parts.command_log.outcomes["ok"] == (CommandOutcome.APPLIED, None)
    if reason is RejectReason.SCHEMA:  # the id was readable: whoever waits learns why
        assert parts.command_log.outcomes["bad-1"] == (CommandOutcome.REJECTED, reason.value)
    assert await parts.consents.enabled_orgs(["acme"]) == {"acme"}
