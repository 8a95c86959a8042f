"""Risk policy: services are recognized by module, product and port; CVEs raise severity."""

from __future__ import annotations

from typing import Any

import pytest

from recon_stream.domain.policy_file import DEFAULT_POLICY
from recon_stream.domain.risk import (
    RiskPolicy,
    ServiceRule,
    Severity,
    VulnRule,
    assess,
)
from recon_stream.domain.scans import Service


def severity(**fields: Any) -> Severity:
    return assess(Service(**fields), DEFAULT_POLICY)[0]


def test_severity_orders_by_risk_not_alphabet() -> None:
    assert sorted(Severity) == [
        Severity.INFO,
        Severity.LOW,
        Severity.MEDIUM,
        Severity.HIGH,
        Severity.CRITICAL,
    ]
    assert Severity.CRITICAL > Severity.HIGH > Severity.MEDIUM > Severity.LOW > Severity.INFO
    assert max(Severity.LOW, Severity.CRITICAL, Severity.HIGH) is Severity.CRITICAL
    assert Severity.HIGH >= "high"
    assert Severity.HIGH < "critical"
    assert [s.rank for s in sorted(Severity)] == [0, 1, 2, 3, 4]
    assert Severity("critical") is Severity.CRITICAL
    assert f"{Severity.CRITICAL}" == "critical"
    with pytest.raises(TypeError):
        _ = Severity.HIGH < 3


@pytest.mark.parametrize(
    "service",
    [
        Service(port=3389),
        Service(port=3389, module="rdp"),
        Service(port=3390, module="rdp"),
        Service(port=3390, product="Microsoft Terminal Services"),
        Service(port=13389, module="RDP"),
        Service(port=3389, transport="udp"),
    ],
    ids=["3389-port", "3389-module", "3390-module", "3390-product", "module-case", "udp"],
)
def test_rdp_is_critical_wherever_it_listens(service: Service) -> None:
    level, reasons = assess(service, DEFAULT_POLICY)
    assert level is Severity.CRITICAL
    assert "RDP exposed to the internet" in reasons


def test_a_non_standard_port_is_explained() -> None:
    _, by_module = assess(Service(port=3390, module="rdp"), DEFAULT_POLICY)
    assert "service identified by Shodan module 'rdp' on non-standard port tcp/3390" in by_module
    _, by_product = assess(
        Service(port=3390, product="Microsoft Terminal Services"), DEFAULT_POLICY
    )
    assert any("product 'Microsoft Terminal Services'" in r for r in by_product)
    _, by_port = assess(Service(port=3389), DEFAULT_POLICY)
    assert any("standard port tcp/3389" in r for r in by_port)
    _, standard = assess(Service(port=3389, module="rdp"), DEFAULT_POLICY)
    assert standard == ("RDP exposed to the internet",)


def test_smb_on_a_forwarded_port_is_critical() -> None:
    level, reasons = assess(Service(port=4455, module="smb"), DEFAULT_POLICY)
    assert level is Severity.CRITICAL
    assert "SMB exposed to the internet" in reasons
    assert severity(port=4455, product="Samba smbd") is Severity.CRITICAL
    assert severity(port=445) is Severity.CRITICAL


@pytest.mark.parametrize(
    ("fields", "label"),
    [
        ({"port": 3389, "module": "rdp"}, "RDP"),
        ({"port": 445, "module": "smb"}, "SMB"),
        ({"port": 1433, "module": "mssql"}, "SQL Server"),
        ({"port": 14330, "product": "Microsoft SQL Server 2019"}, "SQL Server"),
        ({"port": 23, "module": "telnet"}, "Telnet"),
        ({"port": 5900, "module": "vnc"}, "VNC"),
        ({"port": 5999, "product": "RealVNC"}, "VNC"),
        ({"port": 3306, "module": "mysql"}, "MySQL"),
        ({"port": 3307, "product": "MySQL"}, "MySQL"),
        ({"port": 5432, "module": "postgresql"}, "PostgreSQL"),
        ({"port": 27017, "module": "mongodb"}, "MongoDB"),
        ({"port": 27000, "product": "MongoDB"}, "MongoDB"),
        ({"port": 6379, "module": "redis"}, "Redis"),
        ({"port": 6380, "product": "Redis key-value store"}, "Redis"),
        ({"port": 9200, "module": "elastic"}, "Elasticsearch"),
        ({"port": 9201, "module": "http", "product": "Elastic"}, "Elasticsearch"),
        ({"port": 11211, "module": "memcache"}, "Memcached"),
        ({"port": 11211, "transport": "udp"}, "Memcached"),
        # Reviewed in the policy file: an open Docker API is root on the host.
        ({"port": 2375, "module": "docker"}, "Docker API"),
        ({"port": 502, "module": "modbus"}, "Industrial control protocol"),
        ({"port": 623, "transport": "udp", "module": "ipmi"}, "Out-of-band management"),
    ],
)
def test_default_critical_services(fields: dict[str, Any], label: str) -> None:
    level, reasons = assess(Service(**fields), DEFAULT_POLICY)
    assert level is Severity.CRITICAL
    assert reasons[0] == f"{label} exposed to the internet"


@pytest.mark.parametrize(
    "fields",
    [
        {"port": 21, "module": "ftp"},
        {"port": 2121, "product": "ProFTPD"},
        {"port": 161, "transport": "udp", "module": "snmp"},
        {"port": 389, "module": "ldap"},
        {"port": 137, "transport": "udp", "module": "netbios"},
        {"port": 6443, "module": "kubernetes"},
        {"port": 135},
        {"port": 5985},
        # WinRM speaks HTTP: Shodan's "http" must not hide what the port says.
        {"port": 5986, "module": "https"},
    ],
)
def test_default_high_services(fields: dict[str, Any]) -> None:
    assert severity(**fields) is Severity.HIGH


@pytest.mark.parametrize(
    "fields",
    [
        {"port": 22, "module": "ssh"},
        {"port": 2222, "product": "OpenSSH"},
        {"port": 1723, "module": "pptp"},
        {"port": 500, "transport": "udp", "module": "ike"},
        {"port": 4500, "transport": "udp", "module": "ike-nat-t"},
        {"port": 1194, "transport": "udp", "module": "openvpn"},
        {"port": 443, "module": "https", "product": "Fortinet FortiGate SSL VPN"},
        {"port": 10443, "module": "https", "product": "Palo Alto GlobalProtect"},
        {"port": 443, "module": "https", "product": "Pulse Secure"},
        {"port": 25, "module": "smtp"},
        {"port": 993, "module": "imap"},
        {"port": 110, "module": "pop3"},
    ],
)
def test_default_medium_services(fields: dict[str, Any]) -> None:
    assert severity(**fields) is Severity.MEDIUM


def test_what_shodan_identified_beats_the_port_number() -> None:
    # SSH forwarded to MySQL's port is SSH, not an exposed database.
    assert severity(port=3306, module="ssh") is Severity.MEDIUM


@pytest.mark.parametrize(
    "fields",
    [
        {"port": 443, "module": "https"},
        {"port": 80, "module": "http"},
        {"port": 8080, "module": "http-simple-new"},
        {"port": 8443, "module": "https-simple-new", "product": "nginx"},
        {"port": 443},
    ],
)
def test_web_without_vulns_is_low(fields: dict[str, Any]) -> None:
    assert severity(**fields) is Severity.LOW


def test_anything_else_is_info() -> None:
    level, reasons = assess(Service(port=53, transport="udp", module="dns-udp"), DEFAULT_POLICY)
    assert level is Severity.INFO
    assert reasons == ("dns-udp open on udp/53",)
    assert severity(port=40000) is Severity.INFO


def test_any_vulnerability_makes_at_least_medium() -> None:
    level, reasons = assess(
        Service(port=443, module="https", vulns=("CVE-2023-44487",), max_cvss=7.5), DEFAULT_POLICY
    )
    assert level is Severity.MEDIUM
    assert "known vulnerabilities: CVE-2023-44487 (CVSS 7.5)" in reasons
    # InternetDB lists CVEs without scores.
    assert severity(port=80, vulns=("CVE-2021-41773",)) is Severity.MEDIUM


def test_cvss_9_8_raises_to_high() -> None:
    level, reasons = assess(
        Service(port=443, module="https", vulns=("CVE-2024-3400",), max_cvss=9.8), DEFAULT_POLICY
    )
    assert level is Severity.HIGH
    assert "known vulnerabilities: CVE-2024-3400 (CVSS 9.8)" in reasons
    assert "CVSS 9.8 (>= 9.0) raises severity to high" in reasons
    assert severity(port=22, module="ssh", vulns=("CVE-2024-6387",), max_cvss=9.8) is Severity.HIGH


def test_cvss_9_8_on_a_high_service_is_critical() -> None:
    assert severity(port=21, module="ftp", vulns=("CVE-2011-2523",), max_cvss=9.8) is (
        Severity.CRITICAL
    )
    assert severity(port=21, module="ftp", vulns=("CVE-2011-2523",), max_cvss=8.9) is (
        Severity.HIGH
    )
    level, reasons = assess(
        Service(port=3389, module="rdp", vulns=("CVE-2019-0708",), max_cvss=9.8), DEFAULT_POLICY
    )
    assert level is Severity.CRITICAL
    assert "known vulnerabilities: CVE-2019-0708 (CVSS 9.8)" in reasons


def test_long_cve_lists_are_shortened() -> None:
    vulns = tuple(f"CVE-2020-{n:04d}" for n in range(8))
    _, reasons = assess(Service(port=80, vulns=vulns, max_cvss=6.1), DEFAULT_POLICY)
    assert (
        "known vulnerabilities: CVE-2020-0000, CVE-2020-0001, CVE-2020-0002, CVE-2020-0003, "
        "CVE-2020-0004 and 3 more (max CVSS 6.1)"
    ) in reasons


def test_custom_policy_overrides_the_defaults() -> None:
    ssh = Service(port=22, module="ssh")
    strict = RiskPolicy(
        rules=(
            ServiceRule(name="SSH", severity=Severity.CRITICAL, modules=frozenset({"ssh"})),
            *DEFAULT_POLICY.rules,
        ),
        vuln_rules=(VulnRule(min_cvss=7.0, at_least=Severity.CRITICAL),),
        default=Severity.LOW,
    )
    assert assess(ssh, strict)[0] is Severity.CRITICAL
    assert assess(ssh, DEFAULT_POLICY)[0] is Severity.MEDIUM
    assert assess(Service(port=53, transport="udp"), strict)[0] is Severity.LOW
    web = Service(port=443, module="https", vulns=("CVE-2023-1",), max_cvss=7.5)
    assert assess(web, strict)[0] is Severity.CRITICAL
    assert assess(web, DEFAULT_POLICY)[0] is Severity.MEDIUM

    no_vuln_rules = DEFAULT_POLICY.model_copy(update={"vuln_rules": ()})
    assert assess(web, no_vuln_rules)[0] is Severity.LOW


def test_policy_is_plain_data() -> None:
    dumped = DEFAULT_POLICY.model_dump(mode="json")
    assert RiskPolicy.model_validate(dumped) == DEFAULT_POLICY
    names = [rule.name for rule in DEFAULT_POLICY.rules]
    assert len(names) == len(set(names))
