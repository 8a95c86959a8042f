"""Shodan's JSON answers turned into `HostScan`s: lenient in, normalized out.

Shodan's fields are optional almost everywhere and not always of the documented
type (`version` as a number, `cvss` as a string, `cpe` as a string or a list),
so every field is read defensively: an odd value is dropped, never fatal. Only
an answer that is not a JSON object at all is rejected.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from recon_stream.domain.scans import HostScan, ProviderName, Service, Transport

_MIN_DATETIME = datetime.min.replace(tzinfo=UTC)


def parse_host(
    ip: str, payload: Mapping[str, Any], queried_at: datetime, provider: ProviderName
) -> HostScan:
    """A `/shodan/host/{ip}` answer as a `HostScan`; banners of one port merge into one Service.

    Raises `ValueError` only when `payload` is not a JSON object.
    """
    if not isinstance(payload, Mapping):
        raise ValueError(f"Shodan host answer for {ip} is not an object")
    banners = [b for b in _list(payload.get("data")) if isinstance(b, Mapping)]
    merged: dict[tuple[Transport, int], _Merged] = {}
    # Newest first, so "first non-null" prefers the latest banner's module/product/version.
    parsed = sorted(
        (p for p in map(_banner, banners) if p is not None),
        key=lambda b: b.timestamp or _MIN_DATETIME,
        reverse=True,
    )
    for banner in parsed:
        merged.setdefault((banner.transport, banner.port), _Merged()).add(banner)
    covered_ports = {port for _, port in merged}
    for port in _ports(payload.get("ports")):
        # Listed as open but without a banner (e.g. a `minify` answer): open, details unknown.
        if port not in covered_ports:
            merged[("tcp", port)] = _Merged()
    services = tuple(
        m.service(port, transport)
        for (transport, port), m in sorted(merged.items(), key=lambda kv: (kv[0][1], kv[0][0]))
    )
    host_vulns = set(_vuln_ids(payload.get("vulns")))
    for s in services:
        host_vulns.update(s.vulns)
    return HostScan(
        ip=ip,
        provider=provider,
        queried_at=_as_utc(queried_at),
        services=services,
        hostnames=_strings(payload.get("hostnames")),
        tags=_strings(payload.get("tags")),
        vulns=tuple(sorted(host_vulns)),
        org=_text(payload.get("org")),
        isp=_text(payload.get("isp")),
        asn=_asn(payload.get("asn")),
        os=_text(payload.get("os")),
        last_update=parse_timestamp(payload.get("last_update")),
    )


def parse_internetdb(ip: str, payload: Mapping[str, Any], queried_at: datetime) -> HostScan:
    """An InternetDB answer `{ip, ports, cpes, hostnames, tags, vulns}` as a `HostScan`.

    InternetDB does not say which port a CPE or a CVE belongs to: ports become
    bare TCP services and vulns stay at host level. An application CPE goes to
    the open ports its product is known to serve (OpenSSH on 22, nginx on 80
    and 443, ...), or to the only open port when there is one; the rest
    (operating systems, hardware, products it cannot place) stay on the host
    (`HostScan.cpes`). Raises `ValueError` only when `payload` is not a JSON
    object.
    """
    if not isinstance(payload, Mapping):
        raise ValueError(f"InternetDB answer for {ip} is not an object")
    ports = sorted(set(_ports(payload.get("ports"))))
    by_port, unplaced = _place_cpes(_strings(payload.get("cpes")), ports)
    return HostScan(
        ip=ip,
        provider="internetdb",
        queried_at=_as_utc(queried_at),
        services=tuple(Service(port=p, cpe=tuple(sorted(by_port.get(p, ())))) for p in ports),
        hostnames=_strings(payload.get("hostnames")),
        tags=_strings(payload.get("tags")),
        vulns=tuple(sorted(set(_vuln_ids(payload.get("vulns"))))),
        cpes=tuple(sorted(unplaced)),
    )


_WEB = (80, 443, 8000, 8008, 8080, 8081, 8443, 8888)
_MAIL = (25, 465, 587)
# The ports an application (by its CPE product name) usually listens on.
_CPE_PRODUCT_PORTS: Mapping[str, tuple[int, ...]] = {
    "openssh": (22, 2222),
    "dropbear_ssh": (22, 2222),
    "dropbear_ssh_server": (22, 2222),
    "nginx": _WEB,
    "http_server": _WEB,
    "internet_information_services": _WEB,
    "lighttpd": _WEB,
    "tomcat": _WEB,
    "jetty": _WEB,
    "vsftpd": (21,),
    "proftpd": (21,),
    "pure-ftpd": (21,),
    "filezilla_server": (21,),
    "postfix": _MAIL,
    "exim": _MAIL,
    "sendmail": _MAIL,
    "dovecot": (110, 143, 993, 995),
    "bind": (53,),
    "dnsmasq": (53,),
    "unbound": (53,),
    "samba": (139, 445),
    "mysql": (3306,),
    "mariadb": (3306,),
    "postgresql": (5432,),
    "sql_server": (1433,),
    "redis": (6379,),
    "mongodb": (27017,),
    "elasticsearch": (9200, 9300),
    "memcached": (11211,),
    "rabbitmq": (5672, 15672),
}


def _place_cpes(cpes: Iterable[str], ports: Iterable[int]) -> tuple[dict[int, set[str]], set[str]]:
    # Which open ports each CPE belongs to, as far as the CPE alone tells; and the rest.
    open_ports = set(ports)
    by_port: dict[int, set[str]] = {}
    unplaced: set[str] = set()
    for cpe in cpes:
        parsed = _cpe_fields(cpe)
        if parsed is None:
            continue
        part, _vendor, product = parsed
        targets = open_ports & set(_CPE_PRODUCT_PORTS.get(product, ()))
        if part == "a" and not targets and len(open_ports) == 1:
            targets = open_ports
        if part != "a" or not targets:
            unplaced.add(cpe)
        for port in targets:
            by_port.setdefault(port, set()).add(cpe)
    return by_port, unplaced


def _cpe_fields(cpe: str) -> tuple[str, str, str] | None:
    # (part, vendor, product) of a CPE 2.3 formatted string (`cpe:2.3:a:f5:nginx:1.18.0:…`)
    # or a CPE 2.2 URI (`cpe:/a:openbsd:openssh:7.4`, what InternetDB has been seen to send).
    text = cpe.strip().lower()
    if text.startswith("cpe:2.3:"):
        fields = re.split(r"(?<!\\):", text[len("cpe:2.3:") :])
    elif text.startswith("cpe:/"):
        fields = text[len("cpe:/") :].split(":")
    else:
        return None
    if len(fields) < 3 or fields[0] not in ("a", "o", "h") or not fields[2]:
        return None
    return fields[0], fields[1], fields[2]


def parse_timestamp(value: object) -> datetime | None:
    """Shodan's `2021-01-22T08:49:35.190817` (UTC without a zone) as an aware UTC datetime."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return _as_utc(parsed)


@dataclass(frozen=True)
class _Banner:
    port: int
    transport: Transport
    module: str | None
    product: str | None
    version: str | None
    cpe: tuple[str, ...]
    vulns: dict[str, float | None]
    timestamp: datetime | None


@dataclass
class _Merged:
    module: str | None = None
    product: str | None = None
    version: str | None = None
    cpe: set[str] = field(default_factory=set)
    vulns: set[str] = field(default_factory=set)
    cvss: dict[str, float] = field(default_factory=dict)
    timestamp: datetime | None = None

    def add(self, banner: _Banner) -> None:
        self.module = self.module or banner.module
        self.product = self.product or banner.product
        self.version = self.version or banner.version
        self.cpe.update(banner.cpe)
        self.vulns.update(banner.vulns)
        for cve, score in banner.vulns.items():
            if score is not None:
                self.cvss[cve] = max(score, self.cvss.get(cve, score))
        if banner.timestamp is not None and (
            self.timestamp is None or banner.timestamp > self.timestamp
        ):
            self.timestamp = banner.timestamp

    def service(self, port: int, transport: Transport) -> Service:
        return Service(
            port=port,
            transport=transport,
            module=self.module,
            product=self.product,
            version=self.version,
            cpe=tuple(sorted(self.cpe)),
            vulns=tuple(sorted(self.vulns)),
            max_cvss=max(self.cvss.values()) if self.cvss else None,
            cvss=tuple(sorted(self.cvss.items())),
            shodan_timestamp=self.timestamp,
        )


def _banner(raw: Mapping[str, Any]) -> _Banner | None:
    port = _port(raw.get("port"))
    if port is None:
        return None
    shodan_meta = raw.get("_shodan")
    module = _text(shodan_meta.get("module")) if isinstance(shodan_meta, Mapping) else None
    cpe = _strings(raw.get("cpe23")) or _strings(raw.get("cpe"))
    return _Banner(
        port=port,
        transport=_transport(raw.get("transport")),
        module=module,
        product=_text(raw.get("product")),
        version=_text(raw.get("version")),
        cpe=cpe,
        vulns=_vulns_with_cvss(raw.get("vulns")),
        timestamp=parse_timestamp(raw.get("timestamp")),
    )


def _transport(value: object) -> Transport:
    if isinstance(value, str) and value.strip().lower() == "udp":
        return "udp"
    return "tcp"


def _port(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value.isdigit():
            return None
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 0 <= value <= 65535:
        return value
    return None


def _ports(value: object) -> list[int]:
    return [p for p in map(_port, _list(value)) if p is not None]


def _text(value: object) -> str | None:
    """A non-empty string; numbers (Shodan's `version: 8`) become their text."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return str(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return value.strip() or None
    return None


def _strings(value: object) -> tuple[str, ...]:
    """A string or a list of strings (others dropped), de-duplicated in first-seen order."""
    items: Iterable[object] = [value] if isinstance(value, str) else _list(value)
    out = dict.fromkeys(t.strip() for t in items if isinstance(t, str) and t.strip())
    return tuple(out)


def _list(value: object) -> list[object]:
    return list(value) if isinstance(value, list | tuple) else []


def _cvss(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 10:
        return float(value)
    return None


def _vuln_id(value: object) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip().upper()
    return None


def _vulns_with_cvss(value: object) -> dict[str, float | None]:
    """Banner vulns: `{"CVE-…": {"cvss": …}}`, or a bare list of ids."""
    out: dict[str, float | None] = {}
    if isinstance(value, Mapping):
        for key, detail in value.items():
            vuln = _vuln_id(key)
            if vuln is not None:
                out[vuln] = _cvss(detail.get("cvss")) if isinstance(detail, Mapping) else None
    else:
        for item in _list(value):
            vuln = _vuln_id(item)
            if vuln is not None:
                out[vuln] = None
    return out


def _vuln_ids(value: object) -> list[str]:
    return list(_vulns_with_cvss(value))


def _asn(value: object) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"AS{value}"
    text = _text(value)
    if text is None:
        return None
    return f"AS{text}" if text.isdigit() else text.upper()


def _as_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)
