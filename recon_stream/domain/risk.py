"""Risk policy: how severe one exposed service is, and why (pure, data-driven).

The rules are data (`RiskPolicy`); the built-in ones live in the policy file
`risk-policy.default.yaml` next to this module, read by `policy_file`, where each
rule says why it is rated as it is. `assess` applies a policy to one service, for
one organization (its overrides), with what the vulnerability feeds say about the
service's CVEs (`VulnContext`: CISA KEV, FIRST EPSS).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from recon_stream.domain.scans import Service, Transport
from recon_stream.domain.vulns import VulnContext


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
    why: str = ""
    """Why this severity, in words a technician accepts."""

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

    Applies to a service with at least one CVE that meets every condition the
    rule sets: CVSS at least `min_cvss` (of the service's highest score), listed
    in CISA's KEV catalog (`known_exploited`), an EPSS probability at least
    `min_epss`. A rule with no condition applies to any CVE. The result is at
    least `at_least`; with `escalate=(from, to)`, a service whose own severity is
    already `from` or worse becomes at least `to`.
    """

    model_config = ConfigDict(frozen=True)

    min_cvss: float | None = Field(None, ge=0, le=10)
    known_exploited: bool = False
    min_epss: float | None = Field(None, ge=0, le=1)
    at_least: Severity
    escalate: tuple[Severity, Severity] | None = None
    why: str = ""

    def evidence(self, service: Service, context: Mapping[str, VulnContext]) -> list[str] | None:
        """The CVEs that make the rule apply (`[]`: the service as a whole); None if it does not."""
        if not service.vulns and service.max_cvss is None:
            return None
        if self.min_cvss is not None and (
            service.max_cvss is None or service.max_cvss < self.min_cvss
        ):
            return None
        if not self.known_exploited and self.min_epss is None:
            return []
        found = []
        for cve in service.vulns:
            known = context.get(cve)
            if known is None:
                continue
            if self.known_exploited and known.kev is None:
                continue
            if self.min_epss is not None and (
                known.epss is None or known.epss.epss < self.min_epss
            ):
                continue
            found.append(cve)
        return found or None

    def raised(self, base: Severity) -> Severity:
        severity = max(base, self.at_least)
        if self.escalate is not None and base >= self.escalate[0]:
            severity = max(severity, self.escalate[1])
        return severity


class OrgOverride(BaseModel):
    """For one organization, the base severity of a port or of a service rule."""

    model_config = ConfigDict(frozen=True)

    port: tuple[Transport, int] | None = None
    service: str | None = None
    """The `name` of a service rule."""
    severity: Severity
    why: str = ""

    def matches(self, service: Service, rules: list[ServiceRule]) -> bool:
        if self.port is not None and self.port != service.key:
            return False
        if self.service is not None and self.service not in {rule.name for rule in rules}:
            return False
        return self.port is not None or self.service is not None


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
    organizations: Mapping[str, tuple[OrgOverride, ...]] = Field(default_factory=dict)
    """Per-organization overrides, by organization id."""


MATCH_CACHE_SIZE = 4096
"""How many (rules, module, product, port) matchings `_matching_rules` remembers."""

_MatchKey = tuple[int, str | None, str | None, tuple[str, int]]
_Matched = tuple[tuple[ServiceRule, str], ...]
_match_cache: dict[_MatchKey, tuple[tuple[ServiceRule, ...], _Matched]] = {}


def _matching_rules(service: Service, policy: RiskPolicy) -> _Matched:
    """Matching rules with how each was identified ("module", "product" or "port").

    Memoized: it depends only on the policy's rules and the service's module,
    product and port, and re-rating asks it for the same few services of the same
    policy again and again (twice per exposure: state row and event). The key is
    the rules tuple's identity, and each entry holds that tuple, so an identity
    cannot be reused while its entry lives; the oldest entries go beyond
    `MATCH_CACHE_SIZE`."""
    rules = policy.rules
    key = (id(rules), service.module, service.product, service.key)
    hit = _match_cache.get(key)
    if hit is not None and hit[0] is rules:
        return hit[1]
    matched = _match(service, rules)
    if len(_match_cache) >= MATCH_CACHE_SIZE:
        _match_cache.pop(next(iter(_match_cache)), None)
    _match_cache[key] = (rules, matched)
    return matched


def _match(service: Service, rules: tuple[ServiceRule, ...]) -> _Matched:
    by_identity: list[tuple[ServiceRule, str]] = []
    by_port: list[tuple[ServiceRule, str]] = []
    for rule in rules:
        if rule.matches_module(service.module):
            by_identity.append((rule, "module"))
        elif rule.matches_product(service.product):
            by_identity.append((rule, "product"))
        elif rule.matches_port(service.key):
            by_port.append((rule, "port"))
    # What Shodan identified beats what the port number suggests (SSH on 3306 is
    # SSH), unless it only identified a carrier such as HTTP on WinRM's 5985.
    if any(not rule.carrier for rule, _ in by_identity):
        return tuple(by_identity)
    return (*by_identity, *by_port)


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
    service: Service,
    policy: RiskPolicy,
    organization_id: str | None = None,
    context: Mapping[str, VulnContext] | None = None,
) -> tuple[Severity, tuple[str, ...]]:
    """The severity of exposing `service` to the internet and the reasons for it.

    The most severe matching service rule sets the base severity (the policy's
    default when none matches), an override of `organization_id` replaces it, and
    vulnerability rules can only raise it. `context` holds what the feeds say
    about CVEs (KEV, EPSS); without it, rules that need it do not apply.
    """
    context = context or {}
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
    if organization_id is not None:
        rules = [rule for rule, _ in matched]
        for override in policy.organizations.get(organization_id, ()):
            if override.matches(service, rules):
                why = f": {override.why}" if override.why else ""
                reasons.append(f"{override.severity} for this organization by policy{why}")
                base = override.severity
                break

    severity = base
    applicable = [
        (vuln_rule, found)
        for vuln_rule in policy.vuln_rules
        if (found := vuln_rule.evidence(service, context)) is not None
    ]
    if applicable:
        reasons.append(_vulns_reason(service, policy))
    for vuln_rule, found in applicable:
        raised = vuln_rule.raised(base)
        if raised <= severity:
            continue
        severity = raised
        if vuln_rule.known_exploited:
            reasons.extend(_kev_reason(cve, context[cve], raised) for cve in found[:3])
        elif vuln_rule.min_epss is not None:
            reasons.extend(_epss_reason(cve, context[cve], vuln_rule, raised) for cve in found[:3])
        elif vuln_rule.min_cvss is not None:
            score = f"CVSS {service.max_cvss:.1f} (>= {vuln_rule.min_cvss:.1f})"
            reasons.append(f"{score} raises severity to {raised}")
    return severity, tuple(reasons)


def _kev_reason(cve: str, known: VulnContext, raised: Severity) -> str:
    kev = known.kev
    added = f", added {kev.added.isoformat()}" if kev is not None and kev.added else ""
    ransomware = "; used in ransomware campaigns" if kev is not None and kev.ransomware else ""
    return (
        f"{cve} is known to be exploited in the wild (CISA KEV catalog{added}{ransomware}): "
        f"severity {raised}"
    )


def _epss_reason(cve: str, known: VulnContext, rule: VulnRule, raised: Severity) -> str:
    epss = known.epss
    chance = f"{epss.epss:.0%}" if epss is not None else "?"
    return (
        f"{cve} has a {chance} chance of exploitation in the next 30 days "
        f"(FIRST EPSS, >= {rule.min_epss:.0%}): severity {raised}"
    )
