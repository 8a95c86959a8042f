"""Risk that fits each customer: the policy file, KEV and EPSS, stale observations."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from recon_stream.domain.exposures import (
    Assessor,
    Change,
    ChangeKind,
    build_events,
    severity_changes,
)
from recon_stream.domain.policy_file import (
    DEFAULT_POLICY,
    PolicyError,
    dump_policy,
    parse_policy,
)
from recon_stream.domain.risk import (
    OrgOverride,
    RiskPolicy,
    ServiceRule,
    Severity,
    VulnRule,
    assess,
)
from recon_stream.domain.scans import HostScan, Service
from recon_stream.domain.vulns import (
    EpssEntry,
    FeedError,
    KevEntry,
    VulnContext,
    parse_epss,
    parse_kev,
)

SCHEMA = json.loads(
    (Path(__file__).parents[2] / "schemas" / "risk-policy.v1.json").read_text(encoding="utf-8")
)
T0 = datetime(2026, 11, 1, 12, tzinfo=UTC)

TUNED = """\
version: 1
organizations:
  acme:            # sells a web-based remote console: expected on their IPs
    - port: tcp/8443
      severity: info
      why: their own product, reviewed 2026-10
  globex:
    - port: tcp/8443
      severity: critical
      why: nothing should answer there
    - service: SSH
      severity: high
"""


def test_one_lookup_two_organizations_two_severities() -> None:
    policy = parse_policy(TUNED, "tuned.yaml", base=DEFAULT_POLICY)
    jsonschema.Draft202012Validator(SCHEMA).validate(yaml.safe_load(TUNED))
    console = Service(port=8443, module="https", product="Remote console")
    acme, acme_reasons = assess(console, policy, "acme")
    globex, globex_reasons = assess(console, policy, "globex")
    assert (acme, globex) == (Severity.INFO, Severity.CRITICAL)
    assert (
        "info for this organization by policy: their own product, reviewed 2026-10" in acme_reasons
    )
    assert "critical for this organization by policy: nothing should answer there" in globex_reasons
    assert assess(console, policy, "initech")[0] is Severity.LOW  # the built-in rule
    ssh = Service(port=22, module="ssh")
    assert assess(ssh, policy, "globex")[0] is Severity.HIGH
    assert assess(ssh, policy, "acme")[0] is Severity.MEDIUM


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        ("services:\n  - name: RDP\n    severity: urgent\n", 3, "services.0.severity"),
        ("services:\n  - name: RDP\n    severity: low\n    portz: [tcp/1]\n", 4, "portz"),
        ("services:\n  - name: X\n    severity: low\n    ports: [tcp/70000]\n", 4, "ports.0"),
        ("services:\n  - name: X\n    severity: low\n    ports: [sctp/1]\n", 4, "ports.0"),
        ("version: 2\n", 1, "version"),
        ("organizations:\n  acme:\n    - severity: info\n", 3, "organizations.acme.0"),
        (
            "services:\n  - {name: X, severity: low}\n  - {name: X, severity: high}\n",
            3,
            "services.1.name",
        ),
        ("vulnerabilities:\n  - min_epss: 2\n    at_least: high\n", 2, "min_epss"),
        ("services: [\n", 2, "not valid YAML"),
        ("- just a list\n", 1, "mapping"),
    ],
)
def test_a_bad_file_is_refused_naming_its_line_and_field(text: str, line: int, field: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml", base=DEFAULT_POLICY)
    message = str(caught.value)
    assert f"p.yaml, line {line}" in message
    assert field in message


DEFAULT_CRITICAL = [
    ("RDP", "rdp", "Microsoft Terminal Services"),
    ("SMB", "smb", "Samba smbd"),
    ("SQL Server", "mssql", "Microsoft SQL Server 2019"),
    ("VNC", "vnc", "RealVNC Enterprise"),
    ("Telnet", "telnet", "BusyBox telnetd"),
    ("MySQL", "mysql", "MariaDB"),
    ("PostgreSQL", "postgresql", "PostgreSQL"),
    ("MongoDB", "mongodb", "MongoDB"),
    ("Redis", "redis", "Redis key-value store"),
    ("Elasticsearch", "elastic", "Elastic"),
    ("Oracle Database", "oracle-tns", "Oracle TNS Listener"),
    ("CouchDB", "couchdb", "CouchDB"),
    ("Memcached", "memcache", "Memcached"),
]


@pytest.mark.parametrize(("label", "module", "product"), DEFAULT_CRITICAL)
@given(port=st.integers(1024, 65535))
def test_the_built_in_policy_rates_remote_access_file_sharing_and_databases_critical_anywhere(
    label: str, module: str, product: str, port: int
) -> None:
    by_module = assess(Service(port=port, module=module), DEFAULT_POLICY)
    by_product = assess(Service(port=port, module="http", product=product), DEFAULT_POLICY)
    assert by_module[0] is Severity.CRITICAL
    assert by_product[0] is Severity.CRITICAL
    assert f"{label} exposed to the internet" in by_module[1]


def test_every_built_in_rule_says_why() -> None:
    assert all(rule.why for rule in DEFAULT_POLICY.rules)
    assert all(rule.why for rule in DEFAULT_POLICY.vuln_rules)


KEV = {
    "CVE-2023-4966": VulnContext(kev=KevEntry("CVE-2023-4966", date(2023, 10, 18), True)),
    "CVE-2024-0001": VulnContext(epss=EpssEntry("CVE-2024-0001", 0.73, 0.99)),
}


def test_a_known_exploited_cve_makes_a_medium_service_critical_and_says_which() -> None:
    portal = Service(port=443, product="Citrix Gateway", vulns=("CVE-2023-4966",), max_cvss=7.5)
    assert assess(portal, DEFAULT_POLICY)[0] is Severity.MEDIUM  # no KEV context: CVSS 7.5 alone
    level, reasons = assess(portal, DEFAULT_POLICY, context=KEV)
    assert level is Severity.CRITICAL
    assert any(
        r.startswith(
            "CVE-2023-4966 is known to be exploited in the wild (CISA KEV catalog, added "
            "2023-10-18; used in ransomware campaigns)"
        )
        for r in reasons
    )


def test_a_likely_exploited_cve_raises_to_high_and_its_epss_reaches_the_event() -> None:
    web = Service(
        port=443, module="https", vulns=("CVE-2024-0001",), cvss=(("CVE-2024-0001", 5.3),)
    )
    level, reasons = assess(web, DEFAULT_POLICY, context=KEV)
    assert level is Severity.HIGH
    assert any("73% chance of exploitation" in r for r in reasons)
    scan = HostScan(ip="203.0.113.7", provider="api", queried_at=T0, services=(web,))
    event = build_events(
        "acme",
        "203.0.113.7",
        [Change(ChangeKind.OPENED, web.key, web)],
        scan,
        version=1,
        candidate_agents=[],
        site_ids=[],
        acceptance_by_key={},
        first_seen_by_key={},
        assessor=Assessor(DEFAULT_POLICY, context=KEV),
    )[0]
    (vulnerability,) = event.data.vulnerabilities
    assert (vulnerability.id, vulnerability.cvss, vulnerability.epss, vulnerability.kev) == (
        "CVE-2024-0001",
        5.3,
        0.73,
        False,
    )
    assert event.data.vulns == ("CVE-2024-0001",)  # kept as it was


@pytest.mark.parametrize(
    ("age", "stale"),
    [(timedelta(days=30), False), (timedelta(days=30, seconds=1), True), (None, False)],
)
def test_an_observation_older_than_the_limit_is_stale(age: timedelta | None, stale: bool) -> None:
    seen = T0 - age if age is not None else None
    service = Service(port=3389, module="rdp", shodan_timestamp=seen)
    scan = HostScan(ip="203.0.113.7", provider="api", queried_at=T0, services=(service,))
    event = build_events(
        "acme",
        "203.0.113.7",
        [Change(ChangeKind.OPENED, service.key, service)],
        scan,
        version=1,
        candidate_agents=[],
        site_ids=[],
        acceptance_by_key={},
        first_seen_by_key={},
        assessor=Assessor(DEFAULT_POLICY, stale_after=timedelta(days=30)),
    )[0]
    assert event.data.stale is stale
    assert event.data.observation_age_days == (
        round(age.total_seconds() / 86400, 2) if age else None
    )


def test_a_severity_that_changes_under_a_new_policy_is_a_change_naming_severity() -> None:
    ssh = Service(port=22, module="ssh")
    scan = HostScan(ip="203.0.113.7", provider="api", queried_at=T0, services=(ssh,))
    strict = parse_policy(
        "services:\n  - {name: SSH, severity: critical, modules: [ssh]}\n", "s", DEFAULT_POLICY
    )
    judge = Assessor(policy=strict)
    changes = severity_changes(
        [], {ssh.key: ssh}, {ssh.key: Severity.MEDIUM}, {ssh.key: assess(ssh, strict, "acme")[0]}
    )
    assert [(c.kind, c.severity_changed) for c in changes] == [(ChangeKind.CHANGED, True)]
    event = build_events(
        "acme",
        "203.0.113.7",
        changes,
        scan,
        version=2,
        candidate_agents=[],
        site_ids=[],
        acceptance_by_key={},
        first_seen_by_key={},
        assessor=judge,
    )[0]
    assert event.data.changed_fields == ("severity",)
    assert event.data.severity is Severity.CRITICAL
    # A severity never stored is not a change; an unchanged one neither.
    assert severity_changes([], {ssh.key: ssh}, {}, {ssh.key: Severity.CRITICAL}) == []
    assert (
        severity_changes(
            [], {ssh.key: ssh}, {ssh.key: Severity.CRITICAL}, {ssh.key: Severity.CRITICAL}
        )
        == []
    )


def test_the_feeds_parse_cisa_and_first_formats_and_refuse_empty_ones() -> None:
    kev = json.dumps(
        {
            "vulnerabilities": [
                {
                    "cveID": "CVE-2021-44228",
                    "dateAdded": "2021-12-10",
                    "knownRansomwareCampaignUse": "Known",
                },
                {"cveID": "not a cve"},
            ]
        }
    ).encode()
    assert parse_kev(kev) == [KevEntry("CVE-2021-44228", date(2021, 12, 10), True)]
    epss = (
        b"#model_version:v2025.03.14,score_date:2026-11-01T00:00:00+0000\n"
        b"cve,epss,percentile\nCVE-2021-44228,0.94358,0.99957\n"
    )
    assert parse_epss(gzip.compress(epss)) == [EpssEntry("CVE-2021-44228", 0.94358, 0.99957)]
    for bad in (b"<html>", b'{"vulnerabilities": []}', b"{}"):
        with pytest.raises(FeedError):
            parse_kev(bad)
    for bad in (b"<html>", b"cve,epss\n", b"a,b\n1,2\n"):
        with pytest.raises(FeedError):
            parse_epss(bad)


# -- any valid policy round-trips through show (dump) and check (parse) -----------------

severities = st.sampled_from(list(Severity))
words = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=20
)
ports = st.frozensets(st.tuples(st.sampled_from(["tcp", "udp"]), st.integers(0, 65535)), max_size=3)
rules = st.builds(
    ServiceRule,
    name=words,
    severity=severities,
    modules=st.frozensets(st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True), max_size=3),
    products=st.lists(words, max_size=2).map(tuple),
    ports=ports,
    carrier=st.booleans(),
    why=st.one_of(st.just(""), words),
)
vuln_rules = st.builds(
    VulnRule,
    min_cvss=st.one_of(st.none(), st.floats(0, 10)),
    known_exploited=st.booleans(),
    min_epss=st.one_of(st.none(), st.floats(0, 1)),
    at_least=severities,
    escalate=st.one_of(st.none(), st.tuples(severities, severities)),
    why=st.one_of(st.just(""), words),
)
overrides = st.one_of(
    st.builds(
        OrgOverride,
        port=st.tuples(st.sampled_from(["tcp", "udp"]), st.integers(0, 65535)),
        severity=severities,
        why=st.one_of(st.just(""), words),
    ),
    st.builds(OrgOverride, service=words, severity=severities, why=st.one_of(st.just(""), words)),
)
policies = st.builds(
    RiskPolicy,
    rules=st.lists(rules, max_size=5, unique_by=lambda r: r.name).map(tuple),
    vuln_rules=st.lists(vuln_rules, max_size=3).map(tuple),
    default=severities,
    organizations=st.dictionaries(
        st.from_regex(r"[A-Za-z0-9._:@-]{1,20}", fullmatch=True),
        st.lists(overrides, min_size=1, max_size=3).map(tuple),
        max_size=3,
    ),
)


@settings(max_examples=200, deadline=None)
@given(policies)
def test_any_valid_policy_round_trips_through_show_and_check(policy: RiskPolicy) -> None:
    text = dump_policy(policy)
    jsonschema.Draft202012Validator(SCHEMA).validate(yaml.safe_load(text))
    assert parse_policy(text, "shown.yaml", base=DEFAULT_POLICY) == policy


def test_the_built_in_policy_round_trips_too() -> None:
    assert parse_policy(dump_policy(DEFAULT_POLICY), "shown", base=None) == DEFAULT_POLICY
