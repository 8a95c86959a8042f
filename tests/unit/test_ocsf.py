"""OCSF Detection Findings from exposure events: valid OCSF 1.8.0 over an exposure's whole
life, with the ids, statuses and times DESIGN.md fixes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from recon_stream.domain.acceptance import AcceptanceInfo
from recon_stream.domain.exposures import (
    Change,
    ChangeKind,
    ChangeReason,
    ExposureEvent,
    VulnerabilityInfo,
    build_events,
    diff,
    retire,
)
from recon_stream.domain.ocsf import to_finding
from recon_stream.domain.scans import HostScan, Service
from tests.fakes import BUILT_IN
from tests.ocsf_check import assert_valid, problems

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
IP = "203.0.114.7"
RDP = Service(
    port=3389,
    module="rdp",
    product="Microsoft Terminal Services",
    version="10.0",
    cpe=("cpe:2.3:o:microsoft:windows:-:*:*:*:*:*:*:*",),
    vulns=("CVE-2019-0708",),
    max_cvss=9.8,
    shodan_timestamp=datetime(2026, 2, 28, 8, 49, 35, 190817),
)
ACCEPTANCE = AcceptanceInfo(
    reason="jump host", requested_by="tech@msp.example", accepted_at=T0, expires_at=None
)


def scan(*services: Service, at: datetime) -> HostScan:
    return HostScan(
        ip=IP, provider="api", queried_at=at, services=services, hostnames=("vpn.example.com",)
    )


def events(
    changes: list[Change], current: HostScan, version: int, accepted: bool = False
) -> list[ExposureEvent]:
    return build_events(
        "org-42",
        IP,
        changes,
        current,
        version=version,
        candidate_agents=["agent-1", "agent-2"],
        site_ids=["site-1"],
        acceptance_by_key={RDP.key: ACCEPTANCE if accepted else None},
        first_seen_by_key={RDP.key: T0},
        assessor=BUILT_IN,
    )


def lifecycle() -> list[ExposureEvent]:
    """Opened, changed (a new version), accepted, unaccepted, closed; and a second port
    opened then retired with its IP."""
    first = scan(RDP, at=T0)
    newer = RDP.model_copy(update={"version": "10.1", "vulns": ()})
    second = scan(newer, at=T0 + timedelta(days=1))
    later = T0 + timedelta(days=2)
    ssh = Service(port=22, module="ssh", product="OpenSSH")
    return [
        *events(diff({}, first), first, 1),
        *events(diff({RDP.key: RDP}, second), second, 2),
        *events(
            [Change(ChangeKind.CHANGED, RDP.key, newer, newer, ChangeReason.ACCEPTED, True)],
            scan(newer, at=later),
            3,
            accepted=True,
        ),
        *events(
            [Change(ChangeKind.CHANGED, RDP.key, newer, newer, ChangeReason.UNACCEPTED, True)],
            scan(newer, at=later),
            4,
        ),
        *events(diff({RDP.key: newer}, scan(at=later)), scan(at=later), 5),
        *events(diff({}, scan(ssh, at=later)), scan(ssh, at=later), 6),
        *events(retire({ssh.key: ssh}), scan(at=later), 7),
    ]


def test_every_finding_of_an_exposures_life_is_valid_ocsf_with_one_finding_uid() -> None:
    stream = lifecycle()
    findings = [to_finding(e, product_version="1.2.3") for e in stream]
    assert assert_valid(findings) == 7
    rdp = [f for f in findings if f["unmapped"]["cloudevents"]["subject"].endswith("/3389")]
    assert {f["finding_info"]["uid"] for f in rdp} == {f"org-42/{IP}/tcp/3389"}
    assert [(f["activity_id"], f["status_id"], f["type_uid"]) for f in rdp] == [
        (1, 1, 200401),
        (2, 1, 200402),
        (2, 3, 200402),  # accepted: Suppressed
        (2, 1, 200402),  # unaccepted: New again
        (3, 4, 200403),
    ]
    assert [f["metadata"]["uid"] for f in findings] == [e.id for e in stream]
    assert findings[-1]["status_detail"] == "ip_retired"
    assert findings[2]["status_detail"] == "Risk accepted: jump host"
    assert findings[2]["is_alert"] is False
    assert findings[0]["is_alert"] is True


def test_a_finding_carries_what_a_siem_needs() -> None:
    (opened,) = events(diff({}, scan(RDP, at=T0)), scan(RDP, at=T0), 1)
    f = to_finding(opened, product_version="1.2.3")
    assert f["time"] == int(T0.timestamp() * 1000)
    assert (f["severity_id"], f["severity"]) == (5, "Critical")
    assert f["metadata"]["tenant_uid"] == "org-42"
    assert f["metadata"]["product"]["version"] == "1.2.3"
    assert f["device"]["ip"] == IP
    assert f["device"]["hostname"] == "vpn.example.com"
    assert f["device"]["network_interfaces"][0]["open_ports"] == [
        {"port": 3389, "protocol_name": "tcp", "protocol_num": 6}
    ]
    assert [v["cve"]["uid"] for v in f["vulnerabilities"]] == ["CVE-2019-0708"]
    assert f["vulnerabilities"][0]["affected_packages"][0]["cpe_name"].startswith("cpe:2.3:o")
    assert {(o["type_id"], o["value"]) for o in f["observables"]} == {
        (2, IP),
        (11, "3389"),
        (1, "vpn.example.com"),
        (18, "CVE-2019-0708"),
    }
    service, *agents = f["resources"]
    assert (service["name"], service["role"], service["version"]) == ("rdp", "Affected", "10.0")
    assert [(a["uid"], a["role_id"]) for a in agents] == [("agent-1", 4), ("agent-2", 4)]
    assert f["unmapped"]["site_ids"] == ["site-1"]
    assert f["unmapped"]["max_cvss"] == 9.8


def test_feed_context_reaches_the_cve_entries() -> None:
    (opened,) = events(diff({}, scan(RDP, at=T0)), scan(RDP, at=T0), 1)
    data = opened.data.model_copy(
        update={
            "vulnerabilities": (
                VulnerabilityInfo(id="CVE-2019-0708", cvss=9.8, epss=0.97, kev=True),
            )
        }
    )
    f = to_finding(opened.model_copy(update={"data": data}))
    assert assert_valid([f]) == 1
    (entry,) = f["vulnerabilities"]
    assert entry["cve"]["epss"] == {"score": "0.97"}
    assert entry["is_exploit_available"] is True
    # A list of {cve, score}: an object keyed by CVE would make a SIEM field per CVE.
    assert f["unmapped"]["cvss"] == [{"cve": "CVE-2019-0708", "score": 9.8}]


def test_an_exposure_accepted_before_it_opened_opens_suppressed() -> None:
    current = scan(RDP, at=T0)
    (opened,) = events(diff({}, current), current, 1, accepted=True)
    assert opened.data.accepted
    f = to_finding(opened)
    assert assert_valid([f]) == 1
    assert (f["activity_id"], f["status_id"], f["status"]) == (1, 3, "Suppressed")
    assert f["status_detail"] == "Risk accepted: jump host"
    assert f["is_alert"] is False
    # Closing it still resolves it, accepted or not.
    gone = scan(at=T0 + timedelta(hours=1))
    (closed,) = events(diff({RDP.key: RDP}, gone), gone, 2, accepted=True)
    assert to_finding(closed)["status_id"] == 4


def test_the_checks_catch_what_the_schema_cannot() -> None:
    (opened,) = events(diff({}, scan(RDP, at=T0)), scan(RDP, at=T0), 1)
    good = to_finding(opened)
    for broken, expected in (
        ({"type_uid": 200402}, "type_uid"),
        ({"time": int(T0.timestamp())}, "milliseconds"),
        ({"status": "Resolved"}, "caption"),
    ):
        assert any(expected in p for p in problems({**good, **broken})), broken


services = st.builds(
    Service,
    port=st.integers(0, 65535),
    transport=st.sampled_from(["tcp", "udp"]),
    module=st.none() | st.sampled_from(["rdp", "smb", "https", "telnet", "dns-udp"]),
    product=st.none() | st.text(min_size=1, max_size=20),
    version=st.none() | st.text(min_size=1, max_size=10),
    cpe=st.lists(st.just("cpe:2.3:a:nginx:nginx:1.18.0:*:*:*:*:*:*:*"), max_size=1).map(tuple),
    vulns=st.lists(st.from_regex(r"CVE-20[0-9]{2}-[0-9]{4,6}", fullmatch=True), max_size=3).map(
        lambda v: tuple(sorted(set(v)))
    ),
)


@settings(max_examples=60, deadline=None)
@given(service=services, hostnames=st.lists(st.just("host.example.com"), max_size=1))
def test_any_service_opened_and_closed_maps_to_valid_ocsf(
    service: Service, hostnames: list[str]
) -> None:
    current = HostScan(
        ip=IP, provider="internetdb", queried_at=T0, services=(service,), hostnames=tuple(hostnames)
    )
    stream: list[Any] = [*events(diff({}, current), current, 1)]
    gone = scan(at=T0 + timedelta(hours=1))
    stream += events(diff({service.key: service}, gone), gone, 2)
    assert assert_valid(to_finding(e) for e in stream) == 2
