"""The risk policy as a YAML file (schema: schemas/risk-policy.v1.json), and the built-in one.

`parse_policy` turns a file's text into the `RiskPolicy` it means: alone
(`extends: none`) or on top of the built-in policy (`extends: default`, the
default): a service rule with a built-in rule's name replaces it, other names are
added; `vulnerabilities`, when given, replaces the built-in list; per-organization
overrides are added. A bad file raises `PolicyError` naming the line and the
field. `dump_policy` writes a policy back as a file that parses to the same policy.
`yaml_lines` and `line_of`, which find those lines, serve the scope file too.
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from recon_stream.domain.identifiers import Identifier
from recon_stream.domain.risk import OrgOverride, RiskPolicy, ServiceRule, Severity, VulnRule
from recon_stream.domain.scans import Transport

SCHEMA_ID = "https://recon-stream.dev/schemas/risk-policy.v1.json"
DEFAULT_RESOURCE = "risk-policy.default.yaml"

PortText = Annotated[
    str,
    StringConstraints(pattern=r"^(tcp|udp)/([0-9]{1,5})$"),
    Field(description='"tcp/3389" or "udp/161"'),
]


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the line and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServiceRuleSpec(_Strict):
    """A kind of service and the severity of exposing it."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    severity: Severity
    why: str = Field("", description="Why this severity, in words a technician accepts.")
    modules: list[str] = Field([], description="Shodan crawler modules (`_shodan.module`).")
    products: list[str] = Field([], description="Substrings of the product Shodan names.")
    ports: list[PortText] = Field([], description="Standard ports, when nothing else is known.")
    carrier: bool = Field(False, description="Carries other services (HTTP): ports still count.")


class VulnRuleSpec(_Strict):
    """Raise the severity of a service with CVEs that meet every condition given."""

    why: str = ""
    min_cvss: float | None = Field(None, ge=0, le=10)
    known_exploited: bool = Field(False, description="In CISA's KEV catalog.")
    min_epss: float | None = Field(None, ge=0, le=1, description="FIRST EPSS probability.")
    at_least: Severity
    escalate: tuple[Severity, Severity] | None = Field(
        None, description="[from, to]: a service already `from` or worse becomes `to`."
    )


class OverrideSpec(_Strict):
    """For one organization: the severity of a port, or of a service rule by name."""

    port: PortText | None = None
    service: str | None = Field(None, description="The name of a service rule.")
    severity: Severity
    why: str = ""


class PolicyFile(_Strict):
    """A risk policy file (`RECON_RISK_POLICY_FILE`)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        title="RiskPolicy",
        json_schema_extra={"$id": SCHEMA_ID},
    )

    version: Literal[1] = 1
    extends: Literal["default", "none"] = Field(
        "default", description="default: change the built-in policy; none: replace it."
    )
    default_severity: Severity | None = Field(None, description="For services no rule matches.")
    services: list[ServiceRuleSpec] = []
    vulnerabilities: list[VulnRuleSpec] | None = Field(
        None, description="Replaces the built-in list when given."
    )
    organizations: dict[Identifier, list[OverrideSpec]] = {}


def parse_policy(text: str, source: str = "policy", base: RiskPolicy | None = None) -> RiskPolicy:
    """The policy `text` means (`extends: default` builds on `base`, the built-in one)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "somewhere"
        problem = getattr(error, "problem", None) or str(error)
        raise PolicyError(f"{source}, {where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{source}, line 1: a policy is a mapping (version, services, ...)")
    try:
        spec = PolicyFile.model_validate(data)
    except ValidationError as error:
        lines = yaml_lines(node)
        problems = []
        for e in error.errors(include_input=False)[:5]:
            path = tuple(e["loc"])
            field = ".".join(str(p) for p in path) or "(top)"
            problems.append(f"{source}, line {line_of(lines, path)}: {field}: {e['msg']}")
        raise PolicyError("\n".join(problems)) from None
    problems = _problems(spec, yaml_lines(node), source)
    if problems:
        raise PolicyError("\n".join(problems))
    return _policy_of(spec, base if spec.extends == "default" else None)


def dump_policy(policy: RiskPolicy) -> str:
    """The policy as a standalone file (`extends: none`) that parses back to it."""
    document: dict[str, Any] = {
        "version": 1,
        "extends": "none",
        "default_severity": policy.default.value,
        "services": [
            _without_defaults(
                {
                    "name": rule.name,
                    "severity": rule.severity.value,
                    "why": rule.why,
                    "modules": sorted(rule.modules),
                    "products": list(rule.products),
                    "ports": [f"{t}/{p}" for t, p in sorted(rule.ports)],
                    "carrier": rule.carrier,
                }
            )
            for rule in policy.rules
        ],
        "vulnerabilities": [
            _without_defaults(
                {
                    "why": rule.why,
                    "min_cvss": rule.min_cvss,
                    "known_exploited": rule.known_exploited,
                    "min_epss": rule.min_epss,
                    "at_least": rule.at_least.value,
                    "escalate": [s.value for s in rule.escalate] if rule.escalate else None,
                }
            )
            for rule in policy.vuln_rules
        ],
        "organizations": {
            org: [
                _without_defaults(
                    {
                        "port": f"{o.port[0]}/{o.port[1]}" if o.port else None,
                        "service": o.service,
                        "severity": o.severity.value,
                        "why": o.why,
                    }
                )
                for o in overrides
            ]
            for org, overrides in sorted(policy.organizations.items())
        },
    }
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)


def _without_defaults(fields: dict[str, Any]) -> dict[str, Any]:
    # `is`, not `in`: 0.0 == False, and a threshold of 0 is a threshold.
    return {k: v for k, v in fields.items() if not (v is None or v is False or v in ("", []))}


def _port(text: str) -> tuple[Transport, int]:
    transport, _, port = text.partition("/")
    return ("udp" if transport == "udp" else "tcp"), int(port)


def _problems(spec: PolicyFile, lines: dict[tuple[Any, ...], int], source: str) -> list[str]:
    """What the schema cannot say: port range, unique names, one target per override."""
    problems = []
    for i, rule in enumerate(spec.services):
        for j, port in enumerate(rule.ports):
            if not 0 <= _port(port)[1] <= 65535:
                line = line_of(lines, ("services", i, "ports", j))
                problems.append(f"{source}, line {line}: services.{i}.ports.{j}: no port {port}")
    names = [rule.name for rule in spec.services]
    for i, name in enumerate(names):
        if name in names[:i]:
            line = line_of(lines, ("services", i, "name"))
            problems.append(f"{source}, line {line}: services.{i}.name: {name!r} appears twice")
    for org, overrides in spec.organizations.items():
        for i, override in enumerate(overrides):
            if (override.port is None) == (override.service is None):
                line = line_of(lines, ("organizations", org, i))
                problems.append(
                    f"{source}, line {line}: organizations.{org}.{i}: "
                    "give exactly one of port or service"
                )
            elif override.port is not None and not 0 <= _port(override.port)[1] <= 65535:
                line = line_of(lines, ("organizations", org, i, "port"))
                problems.append(f"{source}, line {line}: organizations.{org}.{i}.port: no port")
    return problems


def _policy_of(spec: PolicyFile, base: RiskPolicy | None) -> RiskPolicy:
    rules = [
        ServiceRule(
            name=r.name,
            severity=r.severity,
            why=r.why,
            modules=frozenset(m.lower() for m in r.modules),
            products=tuple(r.products),
            ports=frozenset(_port(p) for p in r.ports),
            carrier=r.carrier,
        )
        for r in spec.services
    ]
    vuln_rules = (
        tuple(
            VulnRule(
                min_cvss=v.min_cvss,
                known_exploited=v.known_exploited,
                min_epss=v.min_epss,
                at_least=v.at_least,
                escalate=v.escalate,
                why=v.why,
            )
            for v in spec.vulnerabilities
        )
        if spec.vulnerabilities is not None
        else None
    )
    organizations = {
        org: tuple(
            OrgOverride(
                port=_port(o.port) if o.port else None,
                service=o.service,
                severity=o.severity,
                why=o.why,
            )
            for o in overrides
        )
        for org, overrides in spec.organizations.items()
    }
    if base is None:
        return RiskPolicy(
            rules=tuple(rules),
            vuln_rules=vuln_rules or (),
            default=spec.default_severity or Severity.INFO,
            organizations=organizations,
        )
    replaced = {rule.name: rule for rule in rules}
    merged = [replaced.pop(rule.name, rule) for rule in base.rules] + list(replaced.values())
    return RiskPolicy(
        rules=tuple(merged),
        vuln_rules=vuln_rules if vuln_rules is not None else base.vuln_rules,
        default=spec.default_severity or base.default,
        max_listed_vulns=base.max_listed_vulns,
        organizations={**base.organizations, **organizations},
    )


def yaml_lines(node: yaml.Node | None, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    """The 1-based line of every key and item, by its path in the document."""
    found: dict[tuple[Any, ...], int] = {}
    if node is None:
        return found
    found[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            here = (*path, key.value)
            found[here] = key.start_mark.line + 1
            found.update({k: v for k, v in yaml_lines(value, here).items() if k != here})
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found.update(yaml_lines(item, (*path, i)))
    return found


def line_of(lines: dict[tuple[Any, ...], int], path: tuple[Any, ...]) -> int:
    """The line of `path` (a pydantic error's `loc`), or of the nearest enclosing node."""
    # pydantic's paths use ints for list items and may name a union member; keep the
    # longest prefix the document has.
    for end in range(len(path), -1, -1):
        prefix = tuple(str(p) if not isinstance(p, int) else p for p in path[:end])
        if prefix in lines:
            return lines[prefix]
    return 1


def _load_default() -> RiskPolicy:
    text = resources.files("recon_stream.domain").joinpath(DEFAULT_RESOURCE).read_text("utf-8")
    return parse_policy(text, f"built-in {DEFAULT_RESOURCE}")


DEFAULT_POLICY = _load_default()
"""The built-in policy: recon_stream/domain/risk-policy.default.yaml."""
