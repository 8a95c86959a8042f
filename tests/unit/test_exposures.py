"""Exposure diff and CloudEvents: what counts as a change, and what gets published."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from recon_stream.domain.acceptance import AcceptanceInfo
from recon_stream.domain.exposures import (
    CONTENT_TYPE,
    Change,
    ChangeKind,
    ChangeReason,
    ExposureEvent,
    ExposureKey,
    apply_changes,
    build_events,
    diff,
    event_id,
    retire,
    same_exposure,
    snapshot_of,
)
from recon_stream.domain.risk import Severity
from recon_stream.domain.scans import HostScan, Service
from tests.fakes import BUILT_IN

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "exposure-event.v1.json"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
T1 = T0 + timedelta(days=3)
IP = "203.0.114.7"

RDP = Service(
    port=3389,
    module="rdp",
    product="Microsoft Terminal Services",
    cpe=("cpe:2.3:o:microsoft:windows:-:*:*:*:*:*:*:*",),
    shodan_timestamp=datetime(2024, 4, 30, 8, 49, 35, 190817),
)
SSH = Service(port=22, module="ssh", product="OpenSSH", version="8.9p1")
HTTPS = Service(port=443, module="https", product="nginx")
DNS = Service(port=53, transport="udp", module="dns-udp")


def scan(*services: Service, at: datetime = T1, **fields: Any) -> HostScan:
    return HostScan(ip=IP, provider="api", queried_at=at, services=services, **fields)


def snap(*services: Service) -> dict[ExposureKey, Service]:
    return {s.key: s for s in services}


def kinds(changes: list[Change]) -> list[tuple[str, ExposureKey]]:
    return [(c.kind, c.key) for c in changes]


# --- diff -------------------------------------------------------------------------


def test_diff_reports_opened_closed_and_changed_in_port_order() -> None:
    newer_ssh = SSH.model_copy(update={"version": "9.6p1"})
    changes = diff(snap(RDP, SSH, DNS), scan(HTTPS, newer_ssh, DNS))
    assert kinds(changes) == [
        ("changed", ("tcp", 22)),
        ("opened", ("tcp", 443)),
        ("closed", ("tcp", 3389)),
    ]
    changed, opened, closed = changes
    assert changed.service == newer_ssh
    assert changed.previous == SSH
    assert changed.reason is None
    assert opened.service == HTTPS
    assert (opened.previous, opened.reason) == (None, None)
    assert closed.service == RDP
    assert closed.reason is ChangeReason.PORT_CLOSED


def test_diff_from_nothing_opens_everything() -> None:
    assert kinds(diff({}, scan(DNS, RDP, SSH))) == [
        ("opened", ("tcp", 22)),
        ("opened", ("udp", 53)),
        ("opened", ("tcp", 3389)),
    ]


def test_same_port_on_tcp_and_udp_are_two_exposures() -> None:
    tcp_dns = Service(port=53, module="dns-tcp")
    assert kinds(diff(snap(DNS), scan(DNS, tcp_dns))) == [("opened", ("tcp", 53))]


def test_a_new_shodan_timestamp_alone_is_no_change() -> None:
    rescanned = RDP.model_copy(update={"shodan_timestamp": datetime(2024, 5, 3, 1, 2, 3)})
    assert diff(snap(RDP), scan(rescanned)) == []


def test_a_new_cvss_score_alone_is_no_change() -> None:
    scored = SSH.model_copy(update={"vulns": ("CVE-2024-6387",), "max_cvss": 8.1})
    rescored = scored.model_copy(update={"max_cvss": 8.3})
    assert diff(snap(scored), scan(rescored)) == []


@pytest.mark.parametrize(
    "update",
    [
        {"vulns": ("CVE-2024-6387",)},
        {"module": "ssh-alt"},
        {"product": "Dropbear sshd"},
        {"version": "9.6p1"},
        {"version": None},
        {"cpe": ("cpe:2.3:a:openbsd:openssh:8.9p1:*:*:*:*:*:*:*",)},
    ],
)
def test_identity_differences_are_changes(update: dict[str, Any]) -> None:
    changes = diff(snap(SSH), scan(SSH.model_copy(update=update)))
    assert kinds(changes) == [("changed", ("tcp", 22))]


def test_cpe_and_vuln_order_do_not_matter() -> None:
    a, b = "cpe:2.3:a:x:y:1:*:*:*:*:*:*:*", "cpe:2.3:o:x:z:2:*:*:*:*:*:*:*"
    before = SSH.model_copy(update={"cpe": (a, b), "vulns": ("CVE-1", "CVE-2")})
    after = SSH.model_copy(update={"cpe": (b, a), "vulns": ("CVE-2", "CVE-1")})
    assert same_exposure(before, after)
    assert diff(snap(before), scan(after)) == []


def test_an_empty_lookup_closes_everything() -> None:
    changes = diff(snap(RDP, SSH), scan())
    assert kinds(changes) == [("closed", ("tcp", 22)), ("closed", ("tcp", 3389))]
    assert {c.reason for c in changes} == {ChangeReason.PORT_CLOSED}


def test_duplicate_banners_for_one_port_are_picked_independently_of_order() -> None:
    old = HTTPS.model_copy(update={"shodan_timestamp": datetime(2024, 4, 1)})
    new = HTTPS.model_copy(
        update={"module": "https-simple-new", "shodan_timestamp": datetime(2024, 4, 2)}
    )
    assert snapshot_of(scan(old, new)) == snapshot_of(scan(new, old)) == {("tcp", 443): new}


def test_retire_closes_everything() -> None:
    changes = retire(snap(RDP, DNS, SSH))
    assert kinds(changes) == [
        ("closed", ("tcp", 22)),
        ("closed", ("udp", 53)),
        ("closed", ("tcp", 3389)),
    ]
    assert {c.reason for c in changes} == {ChangeReason.IP_RETIRED}
    assert [c.service for c in changes] == [SSH, DNS, RDP]
    assert retire({}) == []


# --- diff properties --------------------------------------------------------------

services = st.builds(
    Service,
    port=st.integers(0, 6),  # a few ports, so scans collide with snapshots
    transport=st.sampled_from(["tcp", "udp"]),
    module=st.sampled_from([None, "rdp", "smb", "https", "ssh"]),
    product=st.sampled_from([None, "OpenSSH", "Samba"]),
    version=st.sampled_from([None, "1", "2"]),
    cpe=st.lists(st.sampled_from(["cpe:a", "cpe:b", "cpe:c"]), unique=True).map(tuple),
    vulns=st.lists(st.sampled_from(["CVE-1", "CVE-2"]), unique=True).map(tuple),
    max_cvss=st.none() | st.floats(0, 10),
    shodan_timestamp=st.none() | st.datetimes(timezones=st.just(UTC)),
)
snapshots = st.lists(services).map(lambda s: {x.key: x for x in s})
scans = st.lists(services, max_size=12).map(lambda s: scan(*s))


@given(snapshots, scans)
def test_applying_the_diff_yields_the_scan(
    previous: dict[ExposureKey, Service], current: HostScan
) -> None:
    changes = diff(previous, current)
    after = apply_changes(previous, changes)
    expected = snapshot_of(current)
    assert after.keys() == expected.keys()
    assert all(same_exposure(after[k], expected[k]) for k in expected)
    keys = [c.key for c in changes]
    assert keys == sorted(set(keys), key=lambda k: (k[1], k[0]))
    for change in changes:
        if change.kind is ChangeKind.CHANGED:
            assert change.previous is not None
            assert not same_exposure(change.previous, change.service)


@given(scans)
def test_diff_against_its_own_snapshot_is_empty(current: HostScan) -> None:
    assert diff(snapshot_of(current), current) == []
    rescanned = scan(
        *(s.model_copy(update={"shodan_timestamp": T1}) for s in snapshot_of(current).values()),
        at=T1 + timedelta(days=1),
    )
    assert diff(snapshot_of(current), rescanned) == []


@given(snapshots)
def test_retire_then_apply_leaves_nothing(previous: dict[ExposureKey, Service]) -> None:
    assert apply_changes(previous, retire(previous)) == {}


# --- event ids --------------------------------------------------------------------


def test_event_ids_are_deterministic() -> None:
    first = event_id("org-1", IP, "opened", ("tcp", 3389), "7")
    assert first == event_id("org-1", IP, ChangeKind.OPENED, ("tcp", 3389), "7")
    assert len(first) == 36


def test_event_ids_ignore_how_an_ipv6_address_is_written() -> None:
    short = event_id("org-1", "2606:4700::1111", "opened", ("tcp", 22), "1")
    long = event_id("org-1", "2606:4700:0:0:0:0:0:1111", "opened", ("tcp", 22), "1")
    assert short == long


def test_event_ids_differ_in_every_part() -> None:
    base: tuple[Any, ...] = ("org-1", IP, "opened", ("tcp", 3389), "7")
    variants = [
        ("org-2", IP, "opened", ("tcp", 3389), "7"),
        ("org-1", "203.0.114.8", "opened", ("tcp", 3389), "7"),
        ("org-1", IP, "closed", ("tcp", 3389), "7"),
        ("org-1", IP, "changed", ("tcp", 3389), "7"),
        ("org-1", IP, "opened", ("udp", 3389), "7"),
        ("org-1", IP, "opened", ("tcp", 3390), "7"),
        ("org-1", IP, "opened", ("tcp", 3389), "8"),
        # No separator games: these two would collide if fields were just joined.
        ("org-1/", IP, "opened", ("tcp", 3389), "7"),
    ]
    ids = {event_id(*base), *(event_id(*v) for v in variants)}
    assert len(ids) == len(variants) + 1


# --- events -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


INTENDED = AcceptanceInfo(
    reason="the customer's web shop", requested_by="tech@msp", accepted_at=T0, expires_at=None
)


def events_for(changes: list[Change], current: HostScan, **overrides: Any) -> list[ExposureEvent]:
    arguments: dict[str, Any] = {
        "version": 7,
        "candidate_agents": ["agent-b", "agent-a", "agent-b"],
        "site_ids": ["hq"],
        "acceptance_by_key": {("tcp", 443): INTENDED},
        "first_seen_by_key": {("tcp", 22): T0, ("tcp", 3389): T0},
        **overrides,
    }
    return build_events("org-42", IP, changes, current, **arguments, assessor=BUILT_IN)


def test_events_carry_the_cloudevents_envelope() -> None:
    current = scan(HTTPS, SSH.model_copy(update={"version": "9.6p1"}))
    events = events_for(diff(snap(RDP, SSH), current), current)
    assert [e.type for e in events] == [
        "com.recon-stream.exposure.changed",
        "com.recon-stream.exposure.opened",
        "com.recon-stream.exposure.closed",
    ]
    assert all(e.type.endswith(f".exposure.{e.data.change}") for e in events)
    for event in events:
        assert event.specversion == "1.0"
        assert event.datacontenttype == "application/json"
        assert event.source == "recon-stream"
        assert event.time == T1
        assert event.subject == f"{IP}/{event.data.transport}/{event.data.port}"
        assert event.kafka_key() == b"org-42"
        assert event.id == event_id(
            "org-42", IP, event.data.change, (event.data.transport, event.data.port), "7"
        )
    assert CONTENT_TYPE == "application/cloudevents+json"
    wire = json.loads(events[0].model_dump_json())
    assert wire["specversion"] == "1.0"
    assert set(wire) == {
        "specversion",
        "id",
        "source",
        "type",
        "subject",
        "time",
        "datacontenttype",
        "data",
    }


def test_event_data_describes_the_exposure() -> None:
    current = scan(HTTPS, SSH.model_copy(update={"version": "9.6p1"}), hostnames=("vpn.example",))
    changed, opened, closed = events_for(diff(snap(RDP, SSH), current), current)

    assert changed.data.previous is not None
    assert changed.data.previous.version == "8.9p1"
    assert changed.data.service.version == "9.6p1"
    assert changed.data.changed_fields == ("version",)
    assert changed.data.previous_vulns == ()
    assert changed.data.first_seen == T0
    assert changed.data.last_seen == T1
    assert changed.data.severity is Severity.MEDIUM

    assert opened.data.service.name == "https"
    assert opened.data.first_seen == T1  # no first sighting on record: it opened now
    assert opened.data.accepted is True
    assert opened.data.previous is None
    assert opened.data.severity is Severity.LOW
    assert opened.data.risk_reasons

    assert closed.data.reason is ChangeReason.PORT_CLOSED
    assert closed.data.service.name == "rdp"
    assert closed.data.severity is Severity.CRITICAL
    assert "RDP exposed to the internet" in closed.data.risk_reasons
    assert closed.data.accepted is False
    # Without a recorded last sighting, Shodan's own (zone-less, UTC) time stands in.
    assert closed.data.shodan_last_scanned == datetime(2024, 4, 30, 8, 49, 35, 190817, UTC)
    assert closed.data.last_seen == closed.data.shodan_last_scanned

    for event in (changed, opened, closed):
        data = event.data
        assert (data.organization_id, data.ip) == ("org-42", IP)
        assert data.last_queried == T1
        assert data.candidate_agents == ("agent-a", "agent-b")
        assert data.site_ids == ("hq",)
        assert data.hostnames == ("vpn.example",)
        assert data.provider == "api"
        assert data.sample is False
        assert data.first_seen <= data.last_seen


def test_closed_events_report_when_the_port_was_last_seen_open() -> None:
    last_open = T0 + timedelta(days=1)
    (event,) = events_for(diff(snap(RDP), scan()), scan(), last_seen_by_key={RDP.key: last_open})
    assert event.data.last_seen == last_open
    assert event.data.first_seen == T0
    assert event.data.last_queried == T1


def test_retirement_events_happen_when_the_ip_is_retired() -> None:
    retired_at = T1 + timedelta(days=30)
    last_scan = scan(RDP, SSH)
    events = events_for(retire(snapshot_of(last_scan)), last_scan, occurred_at=retired_at)
    assert [e.data.reason for e in events] == [ChangeReason.IP_RETIRED] * 2
    assert all(e.time == retired_at and e.data.last_queried == T1 for e in events)


def test_vulnerable_service_events_list_cves_and_raise_severity() -> None:
    vulnerable = HTTPS.model_copy(update={"vulns": ("CVE-2024-3400",), "max_cvss": 10.0})
    current = scan(vulnerable)
    (event,) = events_for(diff(snap(HTTPS), current), current)
    assert event.data.change is ChangeKind.CHANGED
    assert event.data.changed_fields == ("vulns",)
    assert event.data.vulns == ("CVE-2024-3400",)
    assert event.data.previous_vulns == ()
    assert event.data.max_cvss == 10.0
    assert event.data.severity is Severity.HIGH


def test_sample_data_is_flagged() -> None:
    current = HostScan(ip=IP, provider="sample", queried_at=T1, services=(RDP,), sample=True)
    (event,) = events_for(diff({}, current), current)
    assert (event.data.sample, event.data.provider) == (True, "sample")


def test_same_changes_same_ids_new_version_new_ids() -> None:
    current = scan(RDP, SSH)
    changes = diff({}, current)
    again = [e.id for e in events_for(changes, current)]
    assert again == [e.id for e in events_for(changes, current)]
    assert not set(again) & {e.id for e in events_for(changes, current, version=8)}
    assert len(set(again)) == len(again)


def test_events_validate_against_the_published_schema(
    validator: jsonschema.Draft202012Validator,
) -> None:
    current = scan(HTTPS, DNS, SSH.model_copy(update={"version": "9.6p1"}))
    changes = diff(snap(RDP, SSH), current) + retire(snap(RDP))
    events = events_for(changes, current)
    ipv6 = HostScan(ip="2606:4700::1111", provider="internetdb", queried_at=T1, services=(DNS,))
    events += build_events(
        "org-42",
        "2606:4700::1111",
        diff({}, ipv6),
        ipv6,
        version=1,
        candidate_agents=[],
        site_ids=[],
        acceptance_by_key={},
        first_seen_by_key={},
        source="https://recon-stream.example/scanner",
        assessor=BUILT_IN,
    )
    for event in events:
        wire = json.loads(event.model_dump_json())
        validator.validate(wire)
        assert ExposureEvent.model_validate_json(event.model_dump_json()) == event


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("time",), "yesterday"),
        (("data", "last_queried"), "2024-05-01T12:00:00"),  # no offset
        (("data", "ip"), "not-an-ip"),
        (("data", "severity"), "urgent"),
        (("type",), "com.recon-stream.exposure.deleted"),
        (("specversion",), "0.3"),
        (("data", "candidate_agents"), ["has space"]),
    ],
)
def test_the_schema_rejects_bad_events(
    validator: jsonschema.Draft202012Validator, path: tuple[str, ...], value: Any
) -> None:
    current = scan(RDP)
    (event,) = events_for(diff({}, current), current)
    wire = json.loads(event.model_dump_json())
    validator.validate(wire)
    target = wire
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    assert not validator.is_valid(wire)


def test_the_schema_requires_the_cloudevents_attributes(
    validator: jsonschema.Draft202012Validator,
) -> None:
    current = scan(RDP)
    (event,) = events_for(diff({}, current), current)
    wire = json.loads(event.model_dump_json())
    for attribute in ("specversion", "id", "source", "type", "datacontenttype", "data"):
        assert not validator.is_valid({k: v for k, v in wire.items() if k != attribute})
