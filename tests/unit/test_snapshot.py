"""The exposure decision (`domain.snapshot`): given a snapshot and what happened, what
changes and which events, state rows and new snapshot follow. Pure: no servers."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from recon_stream.domain.acceptance import Acceptance
from recon_stream.domain.exposures import Assessor, ChangeReason, ExposureEvent
from recon_stream.domain.policy_file import DEFAULT_POLICY, parse_policy
from recon_stream.domain.risk import Severity
from recon_stream.domain.scans import HostScan, ScanRecord, ScanStatus, Service
from recon_stream.domain.snapshot import (
    OrgContext,
    Snapshot,
    Update,
    decide,
    plan_lookup,
    plan_reassessment,
    plan_retirement,
    plan_verification,
)
from recon_stream.domain.verification import Check, CheckReason, CheckState
from recon_stream.domain.vulns import KevEntry, VulnContext
from tests.fakes import BUILT_IN

T0 = datetime(2026, 11, 1, 12, tzinfo=UTC)
IP = "203.0.113.9"
ORG = OrgContext("acme", ("agent-2", "agent-1"), ("hq",))
RDP = Service(port=3389, module="rdp", product="Remote Desktop Protocol")
WEB = Service(port=443, module="https", product="nginx", version="1.18.0")
SSH = Service(port=22, module="ssh", product="OpenSSH")


def lookup(*services: Service, at: datetime = T0, **fields: object) -> HostScan:
    return HostScan(ip=IP, provider="api", queried_at=at, services=services, **fields)  # type: ignore[arg-type]


def after_lookup(
    snapshot: Snapshot,
    scan: HostScan,
    acceptances: list[Acceptance] | None = None,
    assessor: Assessor = BUILT_IN,
    org: OrgContext = ORG,
) -> Update:
    plan = plan_lookup(snapshot, org, scan, scan.queried_at)
    assert plan is not None
    update = decide(plan, acceptances or [], assessor)
    assert update is not None
    return update


def changes(update: Update) -> list[tuple[str, int, str, str | None]]:
    return [
        (e.data.change.value, e.data.port, ",".join(e.data.changed_fields), e.data.reason)
        for e in update.events
    ]


def acceptance(port: int, *, ip: str | None = IP, until: datetime | None = None) -> Acceptance:
    return Acceptance("acme", ip, "tcp", port, "jump host", "tech@msp", T0, until)


EMPTY = Snapshot("acme", IP)


def test_a_first_lookup_opens_every_port_and_stores_the_snapshot() -> None:
    update = after_lookup(EMPTY, lookup(RDP, WEB))
    assert changes(update) == [("opened", 443, "", None), ("opened", 3389, "", None)]
    after = update.after
    assert (after.stored, after.version, after.status) == (True, 1, "active")
    assert after.candidate_agents == ("agent-2", "agent-1")
    assert after.last_queried == T0
    assert after.services[("tcp", 3389)].severity is Severity.CRITICAL
    assert after.services[("tcp", 3389)].first_seen == T0
    assert [row.key for row in update.state] == [f"acme/{IP}/tcp/443", f"acme/{IP}/tcp/3389"]
    assert all(row.version == 1 and row.value is not None for row in update.state)
    assert {e.data.severity for e in update.events} == {Severity.CRITICAL, Severity.LOW}


def test_the_same_ports_again_update_the_snapshot_but_announce_nothing() -> None:
    first = after_lookup(EMPTY, lookup(RDP))
    moved = RDP.model_copy(update={"shodan_timestamp": datetime(2026, 10, 30)})
    again = after_lookup(first.after, lookup(moved, at=T0 + timedelta(days=3)))
    assert again.events == []  # a new Shodan timestamp alone is no change
    assert again.after.version == 2
    assert again.after.last_queried == T0 + timedelta(days=3)
    assert again.after.services[("tcp", 3389)].first_seen == T0
    assert [row.key for row in again.state] == [f"acme/{IP}/tcp/3389"]


def test_a_lookup_no_newer_than_the_snapshot_is_no_plan() -> None:
    first = after_lookup(EMPTY, lookup(RDP))
    assert plan_lookup(first.after, ORG, lookup(WEB), T0) is None
    assert plan_lookup(first.after, ORG, lookup(WEB, at=T0 - timedelta(hours=1)), T0) is None


def test_a_changed_service_names_the_fields_and_the_service_before() -> None:
    first = after_lookup(EMPTY, lookup(WEB))
    newer = WEB.model_copy(update={"version": "1.25.3", "vulns": ("CVE-2023-44487",)})
    update = after_lookup(first.after, lookup(newer, at=T0 + timedelta(days=1)))
    # A CVE raises the severity too: one `changed` names both.
    assert changes(update) == [("changed", 443, "version,vulns,severity", None)]
    (event,) = update.events
    assert event.data.previous is not None
    assert event.data.previous.version == "1.18.0"
    assert event.data.previous_vulns == ()


def test_a_port_gone_from_the_lookup_closes_with_its_last_service_and_a_tombstone() -> None:
    first = after_lookup(EMPTY, lookup(RDP, WEB))
    update = after_lookup(first.after, lookup(WEB, at=T0 + timedelta(days=1)))
    assert changes(update) == [("closed", 3389, "", "port_closed")]
    (closed,) = update.events
    assert closed.data.service.name == "rdp"
    assert closed.data.last_seen == T0
    tombstones = [row.key for row in update.state if row.value is None]
    assert tombstones == [f"acme/{IP}/tcp/3389"]
    assert set(update.after.services) == {("tcp", 443)}


def test_event_ids_follow_the_snapshot_version_so_a_redo_repeats_them() -> None:
    one = after_lookup(EMPTY, lookup(RDP))
    two = after_lookup(EMPTY, lookup(RDP))
    assert [e.id for e in one.events] == [e.id for e in two.events]
    globex = Snapshot("globex", IP)
    elsewhere = after_lookup(globex, lookup(RDP), org=OrgContext("globex", ("a",), ()))
    assert {e.id for e in one.events}.isdisjoint(e.id for e in elsewhere.events)


def test_retirement_closes_every_open_exposure_and_marks_the_snapshot_retired() -> None:
    first = after_lookup(EMPTY, lookup(RDP, WEB))
    at = T0 + timedelta(days=40)
    plan = plan_retirement(first.after, at)
    assert plan is not None
    update = decide(plan, [], BUILT_IN)
    assert update is not None
    assert changes(update) == [
        ("closed", 443, "", "ip_retired"),
        ("closed", 3389, "", "ip_retired"),
    ]
    assert {e.time for e in update.events} == {at}
    assert (update.after.status, update.after.retired_at, update.after.services) == (
        "retired",
        at,
        {},
    )
    assert all(row.value is None for row in update.state)


def test_a_snapshot_closed_for_the_org_reopens_on_the_lookup_it_last_held() -> None:
    """An org told again about an IP (undismissed, no longer excluded or shared, seen
    again after retirement) is served the stored lookup: no newer than the snapshot,
    yet it reopens, once; an older one does not."""
    first = after_lookup(EMPTY, lookup(RDP))
    closed = decide(
        plan_retirement(first.after, T0 + timedelta(hours=1), ChangeReason.DISMISSED, "dismissed")
        or pytest.fail("no plan"),
        [],
        BUILT_IN,
    )
    assert closed is not None
    assert plan_lookup(closed.after, ORG, lookup(RDP, at=T0 - timedelta(days=1)), T0) is None
    again = after_lookup(closed.after, lookup(RDP))
    assert changes(again) == [("opened", 3389, "", None)]
    assert again.after.status == "active"
    assert plan_lookup(again.after, ORG, lookup(RDP), T0) is None


def test_nothing_to_retire_or_reassess_is_no_plan() -> None:
    assert plan_retirement(EMPTY, T0) is None
    assert plan_reassessment(EMPTY, T0) is None
    first = after_lookup(EMPTY, lookup(RDP))
    retired = decide(plan_retirement(first.after, T0) or pytest.fail("no plan"), [], BUILT_IN)
    assert retired is not None
    assert plan_retirement(retired.after, T0) is None
    assert plan_reassessment(retired.after, T0) is None
    nothing_open = after_lookup(EMPTY, lookup())
    assert plan_reassessment(nothing_open.after, T0) is None


def reassess(snapshot: Snapshot, acceptances: list[Acceptance], at: datetime) -> Update | None:
    plan = plan_reassessment(snapshot, at)
    assert plan is not None
    return decide(plan, acceptances, BUILT_IN)


def test_an_acceptance_that_starts_ends_or_expires_is_a_change_of_accepted() -> None:
    first = after_lookup(EMPTY, lookup(RDP, WEB))
    at = T0 + timedelta(hours=1)
    until_tomorrow = acceptance(3389, until=T0 + timedelta(days=1))
    accepted = reassess(first.after, [until_tomorrow], at)
    assert accepted is not None
    assert changes(accepted) == [("changed", 3389, "accepted", "accepted")]
    (event,) = accepted.events
    assert event.data.accepted
    assert event.data.acceptance is not None
    assert event.data.acceptance.reason == "jump host"
    assert event.data.severity is Severity.CRITICAL  # acceptance never changes severity
    assert event.time == at
    assert event.data.last_seen == T0  # not seen again: it was not looked up
    assert reassess(accepted.after, [until_tomorrow], at) is None  # the same, again: nothing
    expired = reassess(accepted.after, [], T0 + timedelta(days=2))
    assert expired is not None
    assert changes(expired) == [("changed", 3389, "accepted", "acceptance_expired")]
    taken_back = reassess(accepted.after, [], at)
    assert taken_back is not None
    assert changes(taken_back) == [("changed", 3389, "accepted", "unaccepted")]


def test_a_reassessment_that_changes_nothing_is_no_update() -> None:
    first = after_lookup(EMPTY, lookup(RDP), [acceptance(3389)])
    assert first.events[0].data.accepted  # accepted before it opened
    assert reassess(first.after, [acceptance(3389)], T0) is None


def test_the_ips_own_acceptance_wins_over_the_organizations() -> None:
    org_wide = Acceptance("acme", None, "tcp", 3389, "everywhere", "ciso", T0, None)
    own = acceptance(3389)
    update = after_lookup(EMPTY, lookup(RDP), [org_wide, own])
    acceptance_info = update.events[0].data.acceptance
    assert acceptance_info is not None
    assert acceptance_info.reason == "jump host"
    other = after_lookup(EMPTY, lookup(RDP), [org_wide])
    acceptance_info = other.events[0].data.acceptance
    assert acceptance_info is not None
    assert acceptance_info.reason == "everywhere"


def test_a_closed_exposure_shows_the_acceptance_it_had() -> None:
    first = after_lookup(EMPTY, lookup(RDP), [acceptance(3389)])
    closed = after_lookup(first.after, lookup(at=T0 + timedelta(days=1)), [acceptance(3389)])
    (event,) = closed.events
    assert event.data.change.value == "closed"
    assert event.data.accepted


def test_a_new_policy_changes_severity_on_the_next_lookup() -> None:
    first = after_lookup(EMPTY, lookup(SSH))
    assert first.after.services[("tcp", 22)].severity is Severity.MEDIUM
    strict = parse_policy(
        "services:\n  - {name: SSH, severity: critical, modules: [ssh]}\n", "s", DEFAULT_POLICY
    )
    update = after_lookup(
        first.after, lookup(SSH, at=T0 + timedelta(days=1)), assessor=Assessor(strict)
    )
    assert changes(update) == [("changed", 22, "severity", None)]
    assert update.events[0].data.severity is Severity.CRITICAL
    assert update.after.services[("tcp", 22)].severity is Severity.CRITICAL


def test_a_snapshot_without_stored_severities_never_reports_a_severity_change() -> None:
    first = after_lookup(EMPTY, lookup(SSH))
    entry = first.after.services[("tcp", 22)]
    legacy = dataclasses.replace(
        first.after, services={("tcp", 22): dataclasses.replace(entry, severity=None)}
    )
    strict = Assessor(
        parse_policy(
            "services:\n  - {name: SSH, severity: critical, modules: [ssh]}\n", "s", DEFAULT_POLICY
        )
    )
    update = after_lookup(legacy, lookup(SSH, at=T0 + timedelta(days=1)), assessor=strict)
    assert update.events == []
    assert update.after.services[("tcp", 22)].severity is Severity.CRITICAL


def test_a_kev_listing_re_rates_an_open_exposure_without_a_lookup() -> None:
    portal = Service(port=443, product="Citrix Gateway", vulns=("CVE-2023-4966",), max_cvss=7.5)
    first = after_lookup(EMPTY, lookup(portal))
    assert first.after.services[("tcp", 443)].severity is Severity.MEDIUM
    plan = plan_reassessment(first.after, T0 + timedelta(hours=2))
    assert plan is not None
    assert plan.cves == {"CVE-2023-4966"}
    kev = {"CVE-2023-4966": VulnContext(kev=KevEntry("CVE-2023-4966", None, True), epss=None)}
    update = decide(plan, [], Assessor(DEFAULT_POLICY, kev))
    assert update is not None
    assert changes(update) == [("changed", 443, "severity", None)]
    (event,) = update.events
    assert event.data.severity is Severity.CRITICAL
    assert event.data.vulnerabilities[0].kev


def test_a_plan_asks_for_acceptances_only_when_something_stays_open() -> None:
    first = after_lookup(EMPTY, lookup(RDP))
    closing = plan_lookup(first.after, ORG, lookup(at=T0 + timedelta(days=1)), T0)
    assert closing is not None
    assert not closing.needs_acceptances
    assert closing.cves == frozenset()
    opening = plan_lookup(EMPTY, ORG, lookup(RDP), T0)
    assert opening is not None
    assert opening.needs_acceptances


def test_the_outbox_carries_the_events_and_rows_of_the_update() -> None:
    update = after_lookup(EMPTY, lookup(RDP))
    outbox = update.outbox
    assert (outbox.organization_id, outbox.ip) == ("acme", IP)
    assert outbox.events == update.events
    assert outbox.state == update.state
    assert all(isinstance(e, ExposureEvent) for e in outbox.events)


def test_every_event_and_row_names_its_exposure_and_the_deployment() -> None:
    plan = plan_lookup(EMPTY, ORG, lookup(RDP), T0)
    assert plan is not None
    update = decide(plan, [], BUILT_IN, source="recon-stream/eu-prod")
    assert update is not None
    (event,) = update.events
    assert event.source == "recon-stream/eu-prod"
    assert event.data.exposure_id == f"acme/{IP}/tcp/3389"
    assert [row.value.exposure_id for row in update.state if row.value] == [
        row.key for row in update.state
    ]


def test_a_severity_change_says_what_the_severity_was() -> None:
    first = after_lookup(EMPTY, lookup(SSH))
    strict = Assessor(
        parse_policy(
            "services:\n  - {name: SSH, severity: critical, modules: [ssh]}\n", "s", DEFAULT_POLICY
        )
    )
    update = after_lookup(first.after, lookup(SSH, at=T0 + timedelta(days=1)), assessor=strict)
    (event,) = update.events
    assert (event.data.previous_severity, event.data.severity) == (
        Severity.MEDIUM,
        Severity.CRITICAL,
    )
    assert first.events[0].data.previous_severity is None


def test_an_acceptance_taken_back_says_which_one_it_was() -> None:
    first = after_lookup(EMPTY, lookup(RDP), [acceptance(3389)])
    taken_back = reassess(first.after, [], T0 + timedelta(hours=1))
    assert taken_back is not None
    (event,) = taken_back.events
    assert event.data.previous_acceptance is not None
    assert event.data.previous_acceptance.reason == "jump host"
    assert event.data.acceptance is None


def test_an_acceptance_lapses_when_the_service_changes_module_and_stays_lapsed() -> None:
    web_on_443 = Service(port=443, module="https", product="nginx")
    accepted = acceptance(443)
    first = after_lookup(EMPTY, lookup(web_on_443), [accepted])
    assert first.events[0].data.accepted
    rdp_on_443 = Service(port=443, module="rdp")
    lapsed = after_lookup(first.after, lookup(rdp_on_443, at=T0 + timedelta(days=1)), [accepted])
    assert changes(lapsed) == [
        ("changed", 443, "name,product,accepted,severity", "acceptance_lapsed")
    ]
    (event,) = lapsed.events
    assert not event.data.accepted
    assert event.data.previous_acceptance is not None
    # The next lookup of the same service does not accept it again...
    later = after_lookup(lapsed.after, lookup(rdp_on_443, at=T0 + timedelta(days=2)), [accepted])
    assert later.events == []
    assert later.after.services[("tcp", 443)].acceptance is None
    # ...but a new acceptance (a new decision, a new time) does.
    renewed = dataclasses.replace(accepted, accepted_at=T0 + timedelta(days=3))
    again = reassess(later.after, [renewed], T0 + timedelta(days=3))
    assert again is not None
    assert changes(again) == [("changed", 443, "accepted", "accepted")]


def test_a_product_change_keeps_the_acceptance() -> None:
    first = after_lookup(EMPTY, lookup(WEB), [acceptance(443)])
    newer = WEB.model_copy(update={"version": "1.25.3"})
    update = after_lookup(first.after, lookup(newer, at=T0 + timedelta(days=1)), [acceptance(443)])
    (event,) = update.events
    assert event.data.accepted
    assert "accepted" not in event.data.changed_fields


# -- verification ---------------------------------------------------------------------

CONFIRM = timedelta(seconds=60)


def checked(snapshot: Snapshot, at: datetime, **states: CheckReason) -> Update | None:
    """A round of checks at `at`: port name (`p3389`) -> nmap reason."""
    round_ = [Check(IP, int(name[1:]), reason, at) for name, reason in states.items()]
    plan = plan_verification(snapshot, round_, CONFIRM, at)
    return decide(plan, [], BUILT_IN) if plan is not None else None


def open_rdp_and_ssh() -> Snapshot:
    return after_lookup(Snapshot("acme", IP), lookup(RDP, SSH)).after


def test_a_first_check_is_a_change_of_verification_and_an_agreeing_one_is_kept_quietly() -> None:
    snapshot = open_rdp_and_ssh()
    first = checked(snapshot, T0 + timedelta(minutes=1), p3389=CheckReason.CONN_ACCEPT)
    assert first is not None
    assert changes(first) == [("changed", 3389, "verification", None)]
    assert first.events[0].data.verification is not None
    assert first.events[0].data.verification.state == CheckState.OPEN
    assert [row.value.verification for row in first.state if row.value][1] is not None
    again = checked(first.after, T0 + timedelta(minutes=2), p3389=CheckReason.CONN_ACCEPT)
    assert again is not None
    assert again.events == []
    assert again.state == []
    stored = again.after.services[("tcp", 3389)].verification
    assert stored is not None
    assert stored.checked_at == T0 + timedelta(minutes=2)


def test_two_refusals_a_confirm_interval_apart_close_the_exposure() -> None:
    snapshot = open_rdp_and_ssh()
    refused = CheckReason.CONN_REFUSED
    first = checked(snapshot, T0 + timedelta(minutes=1), p3389=refused)
    assert first is not None
    assert changes(first) == [("changed", 3389, "verification", None)]
    # Too soon after the first (a service restarting refuses twice): still open.
    soon = checked(first.after, T0 + timedelta(minutes=1, seconds=30), p3389=refused)
    assert soon is not None
    assert soon.events == []
    assert ("tcp", 3389) in soon.after.services
    later = checked(soon.after, T0 + timedelta(minutes=2), p3389=refused)
    assert later is not None
    assert changes(later) == [("closed", 3389, "", "verified_closed")]
    assert ("tcp", 3389) not in later.after.services
    assert later.after.check_closed == {("tcp", 3389): T0 + timedelta(minutes=2)}
    # An answer in between starts the run again.
    answered = checked(
        first.after, T0 + timedelta(minutes=1, seconds=40), p3389=CheckReason.CONN_ACCEPT
    )
    assert answered is not None
    after = checked(answered.after, T0 + timedelta(minutes=3), p3389=refused)
    assert after is not None
    assert ("tcp", 3389) in after.after.services


def test_silence_closes_a_port_only_while_another_port_of_the_ip_answers() -> None:
    snapshot = open_rdp_and_ssh()
    silent, answer = CheckReason.NO_RESPONSE, CheckReason.CONN_ACCEPT
    first = checked(snapshot, T0 + timedelta(minutes=1), p3389=silent, p22=answer)
    assert first is not None
    second = checked(first.after, T0 + timedelta(minutes=3), p3389=silent, p22=answer)
    assert second is not None
    assert changes(second) == [("closed", 3389, "", "verified_unreachable")]
    # The whole IP silent (unreachable, prohibited, timed out): nothing closes.
    gone = CheckReason.HOST_UNREACH
    one = checked(snapshot, T0 + timedelta(minutes=1), p3389=gone, p22=gone)
    assert one is not None
    two = checked(one.after, T0 + timedelta(minutes=5), p3389=gone, p22=silent)
    assert two is not None
    assert set(two.after.services) == {("tcp", 3389), ("tcp", 22)}
    assert all(e.data.change.value == "changed" for e in two.events)


def test_an_older_provider_record_never_reopens_what_a_check_closed() -> None:
    snapshot = open_rdp_and_ssh()
    refused = CheckReason.CONN_REFUSED
    first = checked(snapshot, T0 + timedelta(minutes=1), p3389=refused)
    assert first is not None
    closed = checked(first.after, T0 + timedelta(minutes=2), p3389=refused)
    assert closed is not None
    # Shodan still lists RDP as crawled days ago: it stays closed.
    stale_rdp = RDP.model_copy(update={"shodan_timestamp": T0 - timedelta(days=3)})
    held = after_lookup(closed.after, lookup(stale_rdp, SSH, at=T0 + timedelta(hours=1)))
    assert changes(held) == []
    assert ("tcp", 3389) not in held.after.services
    assert ("tcp", 3389) in held.after.check_closed
    # A crawl newer than the check reopens it.
    new_rdp = RDP.model_copy(update={"shodan_timestamp": T0 + timedelta(hours=2)})
    reopened = after_lookup(held.after, lookup(new_rdp, SSH, at=T0 + timedelta(hours=3)))
    assert changes(reopened) == [("opened", 3389, "", None)]
    assert reopened.after.check_closed == {}


def test_udp_and_ports_not_open_are_never_part_of_a_round() -> None:
    snmp = Service(port=161, transport="udp", module="snmp")
    snapshot = after_lookup(Snapshot("acme", IP), lookup(snmp)).after
    plan = plan_verification(snapshot, [Check(IP, 161, CheckReason.CONN_REFUSED, T0)], CONFIRM, T0)
    assert plan is None
    other = plan_verification(
        open_rdp_and_ssh(), [Check(IP, 8080, CheckReason.CONN_REFUSED, T0)], CONFIRM, T0
    )
    assert other is None


def test_a_lookup_keeps_the_last_check_and_its_scan_shows_in_every_row() -> None:
    first = checked(open_rdp_and_ssh(), T0 + timedelta(minutes=1), p3389=CheckReason.CONN_ACCEPT)
    assert first is not None
    record = ScanRecord(id="S1", submitted_at=T0, status=ScanStatus.DONE)
    update = after_lookup(first.after, lookup(RDP, SSH, at=T0 + timedelta(hours=1), scan=record))
    rows = {row.key: row.value for row in update.state}
    rdp = rows[f"acme/{IP}/tcp/3389"]
    assert rdp is not None
    assert rdp.scan == record
    assert rdp.verification is not None
    assert rdp.verification.state == CheckState.OPEN
    assert update.after.scan == record
