"""Risk policy: how severe one exposed service is, and why (pure, data-driven)."""

from __future__ import annotations

import enum
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

from recon_stream.domain.scans import Service, Transport


class Severity(enum.StrEnum):
    """Severity of an exposure. Ordered by risk: INFO < LOW < MEDIUM < HIGH < CRITICAL."""

    CRITICAL = "critical"
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"
    INFO = "info"

    @property
    def rank(self) -> int:
        """0 for INFO up to 4 for CRITICAL."""
        return _RANKS[self]

    # A StrEnum would otherwise compare alphabetically ("critical" < "high").
    def __lt__(self, other: object) -> bool:
        rank = _rank_of(other)
        return NotImplemented if rank is None else self.rank < rank

    def __le__(self, other: object) -> bool:
        rank = _rank_of(other)
        return NotImplemented if rank is None else self.rank <= rank

    def __gt__(self, other: object) -> bool:
        rank = _rank_of(other)
        return NotImplemented if rank is None else self.rank > rank

    def __ge__(self, other: object) -> bool:
        rank = _rank_of(other)
        return NotImplemented if rank is None else self.rank >= rank


_RANKS = {severity: rank for rank, severity in enumerate(reversed(Severity))}


def _rank_of(other: object) -> int | None:
    # Plain strings compare by value too, so a severity read back from storage
    # never silently falls back to str ordering.
    if isinstance(other, str) and other in Severity._value2member_map_:
        return _RANKS[Severity(other)]
    return None


class ServiceRule(BaseModel):
    """One kind of service and the severity of exposing it.

    A service matches when its Shodan module is one of `modules` (or starts with
    one followed by "-", as in "https-simple-new" or "dns-udp"), when its product
    contains one of `products` (case-insensitive), or when it sits on one of the
    rule's standard `ports`.
    """

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1)
    """Human label used in reasons, e.g. "RDP"."""
    severity: Severity
    modules: frozenset[str] = frozenset()
    products: tuple[str, ...] = ()
    ports: frozenset[tuple[Transport, int]] = frozenset()
    carrier: bool = False
    """The protocol carries other services (HTTP carries WinRM, the Docker API,
    Elasticsearch…): identifying it does not rule out what its port suggests."""

    def matches_module(self, module: str | None) -> bool:
        if not module:
            return False
        module = module.lower()
        return any(module == m or module.startswith(m + "-") for m in self.modules)

    def matches_product(self, product: str | None) -> bool:
        if not product:
            return False
        product = product.lower()
        return any(p.lower() in product for p in self.products)

    def matches_port(self, key: tuple[str, int]) -> bool:
        return key in self.ports


class VulnRule(BaseModel):
    """Raise the severity of services with known vulnerabilities.

    Applies to services with any CVE when `min_cvss` is None, else to services
    whose highest CVSS score is at least `min_cvss`. The result is at least
    `at_least`; with `escalate=(from, to)`, a service whose own severity is
    already `from` or worse becomes at least `to`.
    """

    model_config = ConfigDict(frozen=True)

    min_cvss: float | None = None
    at_least: Severity
    escalate: tuple[Severity, Severity] | None = None

    def applies(self, service: Service) -> bool:
        if self.min_cvss is None:
            return bool(service.vulns) or service.max_cvss is not None
        return service.max_cvss is not None and service.max_cvss >= self.min_cvss

    def raised(self, base: Severity) -> Severity:
        severity = max(base, self.at_least)
        if self.escalate is not None and base >= self.escalate[0]:
            severity = max(severity, self.escalate[1])
        return severity


class RiskPolicy(BaseModel):
    """The rules `assess` applies. Build a variant with `model_copy(update=...)`
    or by extending `DEFAULT_POLICY.rules`."""

    model_config = ConfigDict(frozen=True)

    rules: tuple[ServiceRule, ...]
    vuln_rules: tuple[VulnRule, ...] = ()
    default: Severity = Severity.INFO
    """Severity of a service no rule matches."""
    max_listed_vulns: int = Field(default=5, ge=1)
    """How many CVE ids a reason names before it says "and N more"."""


def _tcp(*ports: int) -> frozenset[tuple[Transport, int]]:
    return frozenset(("tcp", port) for port in ports)


def _udp(*ports: int) -> frozenset[tuple[Transport, int]]:
    return frozenset(("udp", port) for port in ports)


def _rule(
    name: str,
    severity: Severity,
    *,
    modules: Iterable[str] = (),
    products: Iterable[str] = (),
    ports: frozenset[tuple[Transport, int]] = frozenset(),
    carrier: bool = False,
) -> ServiceRule:
    return ServiceRule(
        name=name,
        severity=severity,
        modules=frozenset(modules),
        products=tuple(products),
        ports=ports,
        carrier=carrier,
    )


_C, _H, _M, _L = Severity.CRITICAL, Severity.HIGH, Severity.MEDIUM, Severity.LOW

DEFAULT_RULES: tuple[ServiceRule, ...] = (
    # Remote access and file sharing that attackers scan for first.
    _rule(
        "RDP",
        _C,
        modules=("rdp",),
        products=("Microsoft Terminal Services", "Remote Desktop", "xrdp"),
        ports=_tcp(3389) | _udp(3389),
    ),
    _rule("SMB", _C, modules=("smb",), products=("Samba",), ports=_tcp(445)),
    _rule(
        "SQL Server",
        _C,
        modules=("mssql",),
        products=("Microsoft SQL Server",),
        ports=_tcp(1433) | _udp(1434),
    ),
    _rule("Telnet", _C, modules=("telnet",), ports=_tcp(23, 2323)),
    _rule("VNC", _C, modules=("vnc",), products=("VNC",), ports=_tcp(5900, 5901)),
    # Databases: exposed means data exposed.
    _rule("MySQL", _C, modules=("mysql",), products=("MySQL", "MariaDB"), ports=_tcp(3306)),
    _rule(
        "PostgreSQL",
        _C,
        modules=("postgresql", "postgres"),
        products=("PostgreSQL",),
        ports=_tcp(5432),
    ),
    _rule("MongoDB", _C, modules=("mongodb",), products=("MongoDB",), ports=_tcp(27017, 27018)),
    _rule("Redis", _C, modules=("redis",), products=("Redis",), ports=_tcp(6379)),
    _rule(
        "Elasticsearch",
        _C,
        modules=("elastic", "elasticsearch"),
        products=("Elastic",),
        ports=_tcp(9200, 9300),
    ),
    _rule(
        "Memcached",
        _C,
        modules=("memcache", "memcached"),
        products=("Memcached",),
        ports=_tcp(11211) | _udp(11211),
    ),
    # Management and directory services.
    _rule("FTP", _H, modules=("ftp",), products=("ftpd", "FTP server"), ports=_tcp(21)),
    _rule("SNMP", _H, modules=("snmp",), ports=_udp(161)),
    _rule(
        "LDAP",
        _H,
        modules=("ldap", "ldaps"),
        products=("LDAP",),
        ports=_tcp(389, 636, 3268, 3269) | _udp(389),
    ),
    _rule("NetBIOS", _H, modules=("netbios",), ports=_tcp(139) | _udp(137, 138)),
    _rule("Docker API", _H, modules=("docker",), products=("Docker",), ports=_tcp(2375, 2376)),
    _rule(
        "Kubernetes API",
        _H,
        modules=("kubernetes", "kubelet"),
        products=("Kubernetes",),
        ports=_tcp(6443, 10250),
    ),
    _rule("Microsoft RPC", _H, modules=("msrpc", "rpc"), ports=_tcp(135)),
    _rule("WinRM", _H, modules=("winrm",), ports=_tcp(5985, 5986)),
    # Remote access that is meant to face the internet, but is still a target.
    _rule("SSH", _M, modules=("ssh",), products=("OpenSSH", "Dropbear"), ports=_tcp(22)),
    _rule("PPTP VPN", _M, modules=("pptp",), ports=_tcp(1723)),
    _rule("IPsec VPN (IKE)", _M, modules=("ike", "ipsec"), ports=_udp(500, 4500)),
    _rule(
        "OpenVPN", _M, modules=("openvpn",), products=("OpenVPN",), ports=_tcp(1194) | _udp(1194)
    ),
    _rule(
        "VPN portal",
        _M,
        products=("Fortinet", "FortiGate", "Pulse Secure", "GlobalProtect"),
    ),
    _rule(
        "SMTP",
        _M,
        modules=("smtp", "smtps"),
        products=("Postfix", "Exim"),
        ports=_tcp(25, 465, 587),
    ),
    _rule("IMAP", _M, modules=("imap", "imaps"), products=("Dovecot",), ports=_tcp(143, 993)),
    _rule("POP3", _M, modules=("pop3", "pop3s"), ports=_tcp(110, 995)),
    # The web is expected to face the internet.
    _rule(
        "Web server",
        _L,
        modules=("http", "https"),
        ports=_tcp(80, 443, 8080, 8443),
        carrier=True,
    ),
)

DEFAULT_VULN_RULES: tuple[VulnRule, ...] = (
    VulnRule(min_cvss=None, at_least=_M),
    VulnRule(min_cvss=9.0, at_least=_H, escalate=(_H, _C)),
)

DEFAULT_POLICY = RiskPolicy(rules=DEFAULT_RULES, vuln_rules=DEFAULT_VULN_RULES)


def _matching_rules(service: Service, policy: RiskPolicy) -> list[tuple[ServiceRule, str]]:
    """Matching rules with how each was identified ("module", "product" or "port")."""
    by_identity: list[tuple[ServiceRule, str]] = []
    by_port: list[tuple[ServiceRule, str]] = []
    for rule in policy.rules:
        if rule.matches_module(service.module):
            by_identity.append((rule, "module"))
        elif rule.matches_product(service.product):
            by_identity.append((rule, "product"))
        elif rule.matches_port(service.key):
            by_port.append((rule, "port"))
    # What Shodan identified beats what the port number suggests (SSH on 3306 is
    # SSH), unless it only identified a carrier such as HTTP on WinRM's 5985.
    if any(not rule.carrier for rule, _ in by_identity):
        return by_identity
    return by_identity + by_port


def _service_reasons(service: Service, rule: ServiceRule, how: str) -> list[str]:
    reasons = [f"{rule.name} exposed to the internet"]
    where = f"{service.transport}/{service.port}"
    standard = not rule.ports or rule.matches_port(service.key)
    if how == "module" and not standard:
        reasons.append(
            f"service identified by Shodan module '{service.module}' on non-standard port {where}"
        )
    elif how == "product" and not standard:
        reasons.append(
            f"service identified by product '{service.product}' on non-standard port {where}"
        )
    elif how == "port":
        seen_as = f" (Shodan module '{service.module}')" if service.module else ""
        reasons.append(f"identified only by its standard port {where}{seen_as}")
    return reasons


def _vulns_reason(service: Service, policy: RiskPolicy) -> str:
    listed = ", ".join(service.vulns[: policy.max_listed_vulns])
    more = len(service.vulns) - policy.max_listed_vulns
    if more > 0:
        listed += f" and {more} more"
    score = ""
    if service.max_cvss is not None:
        label = "CVSS" if len(service.vulns) <= 1 else "max CVSS"
        score = f" ({label} {service.max_cvss:.1f})"
    return f"known vulnerabilities: {listed}{score}" if listed else f"known vulnerabilities{score}"


def assess(
    service: Service, policy: RiskPolicy = DEFAULT_POLICY
) -> tuple[Severity, tuple[str, ...]]:
    """The severity of exposing `service` to the internet and the reasons for it.

    The most severe matching service rule sets the base severity (the policy's
    default when none matches); vulnerability rules can only raise it.
    """
    matched = _matching_rules(service, policy)
    reasons: list[str] = []
    if matched:
        base = max(rule.severity for rule, _ in matched)
        for rule, how in matched:
            # Lesser matches (the HTTP that carries Elasticsearch) add only noise.
            if rule.severity == base:
                reasons.extend(r for r in _service_reasons(service, rule, how) if r not in reasons)
    else:
        base = policy.default
        label = service.module or service.product or "unidentified service"
        reasons.append(f"{label} open on {service.transport}/{service.port}")

    severity = base
    applicable = [vuln_rule for vuln_rule in policy.vuln_rules if vuln_rule.applies(service)]
    if applicable:
        reasons.append(_vulns_reason(service, policy))
    for vuln_rule in applicable:
        raised = vuln_rule.raised(base)
        if raised <= severity:
            continue
        severity = raised
        if vuln_rule.min_cvss is not None:
            score = f"CVSS {service.max_cvss:.1f} (>= {vuln_rule.min_cvss:.1f})"
            reasons.append(f"{score} raises severity to {raised}")
    return severity, tuple(reasons)
