"""Shodan's answers parse leniently into normalized HostScans."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from recon_stream.domain.scans import Service
from recon_stream.domain.shodan_parsing import parse_host, parse_internetdb, parse_timestamp

QUERIED = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)


def full_host() -> dict[str, Any]:
    """A realistic `/shodan/host/{ip}` answer (trimmed banners, real field shapes)."""
    return {
        "region_code": "CA",
        "ip": 134744072,
        "postal_code": None,
        "country_code": "US",
        "city": "Mountain View",
        "dma_code": None,
        "last_update": "2025-01-05T21:14:02.118834",
        "latitude": 37.4056,
        "tags": ["cloud"],
        "area_code": None,
        "country_name": "United States",
        "hostnames": ["host.example.com", "alt.example.com"],
        "org": "Example Corp",
        "data": [
            {
                "hash": -1573912365,
                "timestamp": "2025-01-03T17:45:19.004512",
                "isp": "Example ISP",
                "transport": "tcp",
                "data": "\\x03\\x00\\x00\\x13\\x0e\\xd0\nRemote Desktop Protocol\n",
                "asn": "AS64500",
                "port": 3389,
                "product": "Remote Desktop Protocol",
                "cpe23": ["cpe:2.3:o:microsoft:windows"],
                "cpe": ["cpe:/o:microsoft:windows"],
                "ip_str": "8.8.8.8",
                "_shodan": {
                    "crawler": "e6df34a5bf1b8ab5e2a1c6d0c6b8d4b3c8f0f4a2",
                    "ptr": True,
                    "id": "0e0b33a4-0a0d-4f2b-bd38-e9c8a1f0aa11",
                    "module": "rdp",
                    "options": {},
                },
                "opts": {},
            },
            {
                "timestamp": "2025-01-04T13:27:58.025561",
                "transport": "tcp",
                "port": 445,
                "product": "Samba smbd",
                "version": "4.6.2",
                "cpe": "cpe:/a:samba:samba:4.6.2",
                "vulns": {
                    "CVE-2017-7494": {"cvss": 10.0, "verified": False, "summary": "…"},
                },
                "_shodan": {"module": "smb", "crawler": "x", "id": "y", "ptr": False},
                "data": "SMB Status:\n  Authentication: enabled\n",
            },
            {
                "timestamp": "2025-01-04T09:02:41.662910",
                "transport": "tcp",
                "port": 443,
                "product": "nginx",
                "version": "1.18.0",
                "cpe23": ["cpe:2.3:a:f5:nginx:1.18.0"],
                "cpe": ["cpe:/a:f5:nginx:1.18.0"],
                "http": {"status": 200, "server": "nginx/1.18.0", "title": "Sign in"},
                "ssl": {"cert": {"expires": "20250330235959Z", "issued": "20241230000000Z"}},
                "vulns": {
                    "CVE-2021-23017": {
                        "cvss": "7.5",
                        "verified": False,
                        "references": ["https://nvd.nist.gov/vuln/detail/CVE-2021-23017"],
                        "summary": "nginx resolver off-by-one",
                    },
                    "CVE-2023-44487": {"cvss": 5.0, "verified": False},
                    "CVE-2009-3555": {"verified": False, "summary": "no cvss at all"},
                },
                "_shodan": {"module": "https", "crawler": "x", "id": "z"},
                "data": "HTTP/1.1 200 OK\r\nServer: nginx/1.18.0\r\n\r\n",
            },
            {
                "timestamp": "2025-01-05T21:14:02.118834",
                "transport": "udp",
                "port": 53,
                "data": "\nRecursion: enabled",
                "_shodan": {"module": "dns-udp", "crawler": "x", "id": "w"},
            },
            {
                "timestamp": "2025-01-02T03:50:16.650480",
                "port": 1433,
                "product": "Microsoft SQL Server 2019",
                "version": 15,
                "_shodan": {"module": "mssql"},
            },
        ],
        "asn": "AS64500",
        "isp": "Example ISP",
        "longitude": -122.0775,
        "country_code3": None,
        "domains": ["example.com"],
        "ip_str": "8.8.8.8",
        "os": "Windows 10",
        "ports": [53, 445, 443, 3389, 1433],
        "vulns": ["CVE-2017-7494", "CVE-2021-23017", "CVE-2023-44487", "CVE-2009-3555"],
    }


def by_port(services: tuple[Service, ...]) -> dict[tuple[str, int], Service]:
    return {s.key: s for s in services}


def test_full_host_answer() -> None:
    scan = parse_host("8.8.8.8", full_host(), QUERIED, "api")

    assert scan.ip == "8.8.8.8"
    assert scan.provider == "api"
    assert scan.queried_at == QUERIED
    assert scan.sample is False
    assert [(s.port, s.transport) for s in scan.services] == [
        (53, "udp"),
        (443, "tcp"),
        (445, "tcp"),
        (1433, "tcp"),
        (3389, "tcp"),
    ]
    services = by_port(scan.services)

    rdp = services["tcp", 3389]
    assert rdp.module == "rdp"
    assert rdp.product == "Remote Desktop Protocol"
    assert rdp.version is None
    assert rdp.cpe == ("cpe:2.3:o:microsoft:windows",)  # cpe23 wins over cpe
    assert rdp.vulns == ()
    assert rdp.max_cvss is None
    assert rdp.shodan_timestamp == datetime(2025, 1, 3, 17, 45, 19, 4512, tzinfo=UTC)

    smb = services["tcp", 445]
    assert (smb.module, smb.product, smb.version) == ("smb", "Samba smbd", "4.6.2")
    assert smb.cpe == ("cpe:/a:samba:samba:4.6.2",)  # only the deprecated cpe, as a string
    assert smb.vulns == ("CVE-2017-7494",)
    assert smb.max_cvss == 10.0

    https = services["tcp", 443]
    assert https.module == "https"
    assert https.cpe == ("cpe:2.3:a:f5:nginx:1.18.0",)
    assert https.vulns == ("CVE-2009-3555", "CVE-2021-23017", "CVE-2023-44487")
    assert https.max_cvss == 7.5  # "7.5" as a string still counts

    dns = services["udp", 53]
    assert dns.module == "dns-udp"
    assert dns.product is None

    mssql = services["tcp", 1433]
    assert mssql.transport == "tcp"  # absent transport defaults to tcp
    assert mssql.version == "15"  # a number becomes text

    assert scan.hostnames == ("host.example.com", "alt.example.com")
    assert scan.tags == ("cloud",)
    assert scan.vulns == ("CVE-2009-3555", "CVE-2017-7494", "CVE-2021-23017", "CVE-2023-44487")
    assert (scan.org, scan.isp, scan.asn, scan.os) == (
        "Example Corp",
        "Example ISP",
        "AS64500",
        "Windows 10",
    )
    assert scan.last_update == datetime(2025, 1, 5, 21, 14, 2, 118834, tzinfo=UTC)


def test_banners_of_one_port_merge_preferring_the_newest() -> None:
    payload = {
        "data": [
            {
                "port": 3389,
                "timestamp": "2024-12-29T04:11:07.393025",
                "product": "Old product",
                "version": "1",
                "cpe23": ["cpe:2.3:o:microsoft:windows"],
                "vulns": {"CVE-2019-0708": {"cvss": 10.0}},
                "_shodan": {"module": "rdp"},
            },
            {
                "port": 3389,
                "transport": "tcp",
                "timestamp": "2025-01-05T18:02:33.712209",
                "product": "Remote Desktop Protocol",
                "cpe23": ["cpe:2.3:o:microsoft:windows_server_2012_r2"],
                "vulns": {"CVE-2012-0002": {"cvss": "9.3"}},
                "_shodan": {},
            },
            {"port": 3389, "transport": "udp", "_shodan": {"module": "rdp-udp"}},
        ]
    }
    scan = parse_host("192.0.2.1", payload, QUERIED, "api")
    services = by_port(scan.services)
    assert len(scan.services) == 2
    rdp = services["tcp", 3389]
    assert rdp.product == "Remote Desktop Protocol"  # newest banner's
    assert rdp.version == "1"  # the newest has none: first non-null, newest first
    assert rdp.module == "rdp"
    assert rdp.cpe == ("cpe:2.3:o:microsoft:windows", "cpe:2.3:o:microsoft:windows_server_2012_r2")
    assert rdp.vulns == ("CVE-2012-0002", "CVE-2019-0708")
    assert rdp.max_cvss == 10.0
    assert rdp.shodan_timestamp == datetime(2025, 1, 5, 18, 2, 33, 712209, tzinfo=UTC)
    assert services["udp", 3389].module == "rdp-udp"
    assert scan.vulns == ("CVE-2012-0002", "CVE-2019-0708")


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"data": None, "ports": None, "hostnames": None, "vulns": None, "tags": "x"},
        {"data": "not a list", "asn": None, "os": 3.5, "last_update": "yesterday"},
        {"data": [None, 7, "banner", [], {"no": "port"}]},
        {"data": [{"port": "not a port"}, {"port": 70000}, {"port": -1}, {"port": True}]},
        {"data": [{"port": 22, "_shodan": "odd", "vulns": "odd", "cpe23": 5, "version": True}]},
        {"data": [{"port": 22, "vulns": {"CVE-1": None, "CVE-2": {"cvss": "n/a"}}}]},
        {"data": [{"port": 22, "vulns": {"CVE-1": {"cvss": float("nan")}}, "timestamp": 5}]},
        {"data": [{"port": 22, "timestamp": "2021-13-45T99:00:00"}], "hostnames": [1, None]},
    ],
)
def test_odd_optional_fields_never_raise(payload: dict[str, Any]) -> None:
    scan = parse_host("192.0.2.1", payload, QUERIED, "api")
    assert scan.ip == "192.0.2.1"


def test_odd_values_are_dropped_not_guessed() -> None:
    payload = {
        "asn": 64500,
        "os": None,
        "data": [
            {
                "port": "22",
                "transport": "SCTP",
                "version": 8.0,
                "cpe23": [],
                "cpe": ["cpe:/a:openbsd:openssh:8.0", 3],
                "vulns": {"cve-2018-15473": {"cvss": 11}, "CVE-2020-1": {"cvss": "5"}},
                "_shodan": {"module": ""},
                "timestamp": "2021-01-22T08:49:35+02:00",
            }
        ],
    }
    scan = parse_host("192.0.2.1", payload, QUERIED, "api")
    (ssh,) = scan.services
    assert ssh.port == 22
    assert ssh.transport == "tcp"
    assert ssh.version == "8.0"
    assert ssh.module is None
    assert ssh.cpe == ("cpe:/a:openbsd:openssh:8.0",)
    assert ssh.vulns == ("CVE-2018-15473", "CVE-2020-1")
    assert ssh.max_cvss == 5.0  # 11 is out of range
    assert ssh.shodan_timestamp == datetime(2021, 1, 22, 6, 49, 35, tzinfo=UTC)
    assert scan.asn == "AS64500"


def test_ports_without_banners_are_open_services_without_details() -> None:
    scan = parse_host("192.0.2.1", {"ports": [8080, 53], "data": [{"port": 53}]}, QUERIED, "api")
    assert [(s.port, s.transport, s.module) for s in scan.services] == [
        (53, "tcp", None),
        (8080, "tcp", None),
    ]


@pytest.mark.parametrize("payload", [None, [], "x", 3, [{"ip_str": "1.2.3.4"}]])
def test_a_payload_that_is_not_an_object_is_rejected(payload: Any) -> None:
    with pytest.raises(ValueError, match="not an object"):
        parse_host("192.0.2.1", payload, QUERIED, "api")
    with pytest.raises(ValueError, match="not an object"):
        parse_internetdb("192.0.2.1", payload, QUERIED)


def test_queried_at_is_normalized_to_utc() -> None:
    ist = timezone(timedelta(hours=5, minutes=30))
    scan = parse_host("192.0.2.1", {}, datetime(2025, 1, 6, 17, 30, tzinfo=ist), "api")
    assert scan.queried_at == QUERIED
    assert scan.queried_at.utcoffset() == timedelta(0)


def test_internetdb_answer() -> None:
    payload = {
        "ip": "192.0.2.7",
        "ports": [3389, 22, 445, 22],
        "cpes": ["cpe:/a:openbsd:openssh:7.4", "cpe:/o:microsoft:windows"],
        "hostnames": ["rdp.example.com"],
        "tags": ["self-signed"],
        "vulns": ["CVE-2018-15473", "CVE-2019-0708", "CVE-2018-15473"],
    }
    scan = parse_internetdb("192.0.2.7", payload, QUERIED)
    assert scan.provider == "internetdb"
    assert [(s.port, s.transport, s.module, s.cpe, s.vulns) for s in scan.services] == [
        (22, "tcp", None, ("cpe:/a:openbsd:openssh:7.4",), ()),
        (445, "tcp", None, (), ()),
        (3389, "tcp", None, (), ()),
    ]
    # The operating system belongs to the host, not to one of its ports.
    assert scan.cpes == ("cpe:/o:microsoft:windows",)
    assert scan.vulns == ("CVE-2018-15473", "CVE-2019-0708")
    assert scan.hostnames == ("rdp.example.com",)
    assert scan.tags == ("self-signed",)


def test_internetdb_odd_fields() -> None:
    scan = parse_internetdb("192.0.2.7", {"ports": "22", "vulns": None, "cpes": 3}, QUERIED)
    assert scan.services == ()
    assert scan.vulns == ()


def test_internetdb_cpes_go_to_the_ports_their_products_serve() -> None:
    payload = {
        "ports": [80, 443, 3306, 3389],
        "cpes": [
            "cpe:2.3:a:f5:nginx:1.18.0:*:*:*:*:*:*:*",
            "cpe:2.3:a:oracle:mysql:8.0.32",
            "cpe:2.3:a:openbsd:openssh:8.9",  # port 22 is not open here
            "cpe:/a:example:unknown_product",
            "cpe:2.3:h:cisco:asa_5505:-",
            "not a cpe",
            "cpe:/x:bad:part",
        ],
    }
    scan = parse_internetdb("192.0.2.7", payload, QUERIED)
    assert {s.port: s.cpe for s in scan.services} == {
        80: ("cpe:2.3:a:f5:nginx:1.18.0:*:*:*:*:*:*:*",),
        443: ("cpe:2.3:a:f5:nginx:1.18.0:*:*:*:*:*:*:*",),
        3306: ("cpe:2.3:a:oracle:mysql:8.0.32",),
        3389: (),
    }
    assert scan.cpes == (
        "cpe:/a:example:unknown_product",
        "cpe:2.3:a:openbsd:openssh:8.9",
        "cpe:2.3:h:cisco:asa_5505:-",
    )


def test_internetdb_application_cpes_of_a_single_port_host_are_that_port_s() -> None:
    payload = {
        "ports": [8090],
        "cpes": ["cpe:/a:example:custom_app:2", "cpe:/o:linux:linux_kernel"],
    }
    scan = parse_internetdb("192.0.2.7", payload, QUERIED)
    assert [(s.port, s.cpe) for s in scan.services] == [(8090, ("cpe:/a:example:custom_app:2",))]
    assert scan.cpes == ("cpe:/o:linux:linux_kernel",)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2021-01-22T08:49:35.190817", datetime(2021, 1, 22, 8, 49, 35, 190817, tzinfo=UTC)),
        ("2021-01-22T08:49:35", datetime(2021, 1, 22, 8, 49, 35, tzinfo=UTC)),
        ("2021-01-22T08:49:35Z", datetime(2021, 1, 22, 8, 49, 35, tzinfo=UTC)),
        ("20220330235959Z", None),
        ("", None),
        (None, None),
        (True, None),
    ],
)
def test_timestamps(text: object, expected: datetime | None) -> None:
    assert parse_timestamp(text) == expected
