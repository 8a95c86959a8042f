"""The scope file (`RECON_SCOPE_FILE`, schema schemas/scope.v1.json): what is not a customer's.

An agent's public IP is not always its organization's: a SASE or VPN exit, a hotel, a
carrier's CGNAT. The file says so: `exclude` entries (a CIDR or an ASN, with a reason) for
every organization and per organization, the CIDRs an organization declares its `own`
(never treated as shared egress), and `shared_egress_organizations`, the number of
organizations from which an IP counts as shared egress (absent: no such detection).

`parse_scope` / `load_scope` turn a file into a `Scope` that answers the hot path's
questions (`excluded`, `excluded_asn`, `owns`); a file that cannot be used raises
`ScopeError`, whose `problems` name the line and the field of each mistake, and nothing of
it applies. `dump_scope` writes a scope back as a normalized file that loads to the same
scope; `EMPTY_SCOPE` is the scope without a file: nothing excluded, nothing shared.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from recon_stream.domain.identifiers import Identifier
from recon_stream.domain.policy_file import line_of, yaml_lines

SCHEMA_ID = "https://recon-stream.dev/schemas/scope.v1.json"
MAX_ASN = 4_294_967_295
MAX_SHOWN = 20
"""Problems a `ScopeError`'s message lists (its `problems` keep all of them)."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_ASN = re.compile(r"AS([0-9]+)")
# The C parser when PyYAML has it: a file of 10,000 CIDRs loads in a fraction of the time.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# Before-validators, so that a bad value is one error at its field, not one per member of
# `X | None` (pydantic names each union member in the error's path).
def _network(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, str):
        raise PydanticCustomError(
            "cidr", "a network as text, e.g. 185.46.212.0/22 (quote what YAML reads as a number)"
        )
    try:
        return str(ipaddress.ip_network(value))
    except ValueError:
        pass
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise PydanticCustomError(
            "cidr", "not an IPv4 or IPv6 network: {given}", {"given": repr(value[:64])}
        ) from None
    raise PydanticCustomError(
        "cidr_host_bits",
        "{given} has host bits set: the network is {network}",
        {"given": value, "network": str(network)},
    )


def _asn(value: Any) -> Any:
    if value is None:
        return None
    match = _ASN.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise PydanticCustomError(
            "asn", "not AS<digits> (e.g. AS62044): {given}", {"given": repr(value)[:64]}
        )
    number = _number(match.group(1))
    if not 1 <= number <= MAX_ASN:
        raise PydanticCustomError(
            "asn_range", "{given}: AS numbers run from 1 to {top}", {"given": value, "top": MAX_ASN}
        )
    return f"AS{number}"


def _threshold(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PydanticCustomError("threshold", "a whole number of organizations, 2 or more")
    if value < 2:
        raise PydanticCustomError(
            "threshold",
            "{given}: at least 2 organizations (leave it out to detect no shared egress)",
            {"given": value},
        )
    return value


_CIDR = Field(
    description="An IPv4 or IPv6 network (`185.46.212.0/22`, `2a03:b0c0::/32`; no host bits "
    "set); an address alone is its /32 or /128.",
    json_schema_extra={"pattern": r"^[0-9A-Fa-f:.]+(/[0-9]{1,3})?$"},
)
Cidr = Annotated[str, BeforeValidator(_network), _CIDR]
OptionalCidr = Annotated[str | SkipJsonSchema[None], BeforeValidator(_network), _CIDR]
OptionalAsn = Annotated[
    str | SkipJsonSchema[None],
    BeforeValidator(_asn),
    Field(
        description="An autonomous system, `AS<digits>` (1 to 4294967295): the `asn` of the "
        "IP's provider record, so it takes effect after the IP's first lookup.",
        json_schema_extra={"pattern": r"^AS[0-9]+$"},
    ),
]
Reason = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=500),
    Field(description="Why, in words an operator reads in the IP inventory."),
]
Threshold = Annotated[
    int | SkipJsonSchema[None],
    BeforeValidator(_threshold),
    Field(json_schema_extra={"minimum": 2}),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExclusionSpec(_Strict):
    """Never looked up, never reported: a network or an autonomous system, and why."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={"oneOf": [{"required": ["cidr"]}, {"required": ["asn"]}]},
    )

    cidr: OptionalCidr = None
    asn: OptionalAsn = None
    reason: Reason

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        if (self.cidr is None) == (self.asn is None):
            raise PydanticCustomError("exclusion", "give exactly one of cidr or asn")
        return self


class OwnSpec(_Strict):
    """A network the organization declares its own: never treated as shared egress."""

    cidr: Cidr
    reason: Reason | SkipJsonSchema[None] = None


class OrganizationSpec(_Strict):
    """What one organization adds: its own exclusions, and the networks it owns."""

    exclude: list[ExclusionSpec] = []
    own: list[OwnSpec] = []


class ScopeFile(_Strict):
    """A scope file (`RECON_SCOPE_FILE`)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        title="Scope",
        json_schema_extra={"$id": SCHEMA_ID},
    )

    version: Literal[1]
    exclude: list[ExclusionSpec] = Field([], description="For every organization.")
    shared_egress_organizations: Threshold = Field(
        None,
        description="An IP active for this many organizations or more is shared egress, "
        "reported to none that has not declared it `own`; absent: no such detection.",
    )
    organizations: dict[Identifier, OrganizationSpec] = Field(
        {}, description="By organization id: its own exclusions and the networks it owns."
    )


@dataclass(frozen=True)
class ScopeProblem:
    """One mistake in a scope file: where (`line` is None when there is no line to name)."""

    source: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.field}: {self.message}"


class ScopeError(ValueError):
    """A scope file that cannot be used; each of `problems` names the line and the field,
    one `FILE:LINE: field: message` line of the message each."""

    def __init__(self, problems: Sequence[ScopeProblem]) -> None:
        self.problems = tuple(problems)
        shown = [str(p) for p in self.problems[:MAX_SHOWN]]
        if len(self.problems) > MAX_SHOWN:
            shown.append(f"... and {len(self.problems) - MAX_SHOWN} more")
        super().__init__("\n".join(shown))


class _Networks:
    """Networks to reasons: one hash table per (family, prefix length), probed longest
    prefix first, so a lookup costs at most 33 (IPv4) or 129 (IPv6) probes however many
    networks there are. The first entry given for a network keeps it."""

    __slots__ = ("_v4", "_v6")

    def __init__(self, entries: Iterable[tuple[IPNetwork, str]]) -> None:
        tables: dict[tuple[int, int], dict[int, str]] = {}
        for network, reason in entries:
            shift = network.max_prefixlen - network.prefixlen
            table = tables.setdefault((network.version, network.prefixlen), {})
            table.setdefault(int(network.network_address) >> shift, reason)
        self._v4 = tuple(
            (length, 32 - length, tables[(4, length)])
            for length in sorted((n for v, n in tables if v == 4), reverse=True)
        )
        self._v6 = tuple(
            (length, 128 - length, tables[(6, length)])
            for length in sorted((n for v, n in tables if v == 6), reverse=True)
        )

    def match(self, address: IPAddress) -> tuple[int, str] | None:
        """(prefix length, reason) of the longest network holding `address`."""
        value = int(address)
        for length, shift, table in self._v4 if address.version == 4 else self._v6:
            reason = table.get(value >> shift)
            if reason is not None:
                return length, reason
        return None


_NOTHING = _Networks(())


class Scope:
    """A loaded scope file, ready for the questions of the hot path.

    `ip` arguments are an address or its text (`ValueError` for text that is no address);
    an IPv4-mapped IPv6 address is judged as the IPv4 address it carries. An organization
    the file does not name gets the global entries only.
    """

    __slots__ = (
        "_asns",
        "_excluded",
        "_org_asns",
        "_org_excluded",
        "_own",
        "spec",
    )

    def __init__(self, spec: ScopeFile) -> None:
        self.spec = spec
        self._excluded = _Networks(_cidrs(spec.exclude))
        self._asns = _asns(spec.exclude)
        self._org_excluded = {
            org: _Networks(_cidrs(o.exclude)) for org, o in spec.organizations.items() if o.exclude
        }
        self._org_asns = {
            org: table for org, o in spec.organizations.items() if (table := _asns(o.exclude))
        }
        self._own = {
            org: _Networks((ipaddress.ip_network(e.cidr), e.reason or "") for e in o.own)
            for org, o in spec.organizations.items()
            if o.own
        }

    @property
    def shared_egress_threshold(self) -> int | None:
        """Organizations from which an IP is shared egress; None: no such detection."""
        return self.spec.shared_egress_organizations

    def excluded(self, organization_id: str, ip: IPAddress | str) -> str | None:
        """The reason `ip` is excluded for the organization (by CIDR), or None.

        The most specific network decides (the longest prefix); at equal length the
        organization's own entry goes before the global one.
        """
        address = _address(ip)
        found = self._excluded.match(address)
        mine = self._org_excluded.get(organization_id, _NOTHING).match(address)
        if mine is not None and (found is None or mine[0] >= found[0]):
            found = mine
        return found[1] if found is not None else None

    def excluded_asn(self, organization_id: str, asn: str | int) -> str | None:
        """The reason the autonomous system (`AS62044` as Shodan writes it, or 62044) is
        excluded for the organization, the organization's entry first; None if it is not,
        or if `asn` is no AS number."""
        number = _asn_number(asn)
        if number is None:
            return None
        mine = self._org_asns.get(organization_id)
        if mine is not None and number in mine:
            return mine[number]
        return self._asns.get(number)

    def owns(self, organization_id: str, ip: IPAddress | str) -> bool:
        """Whether the organization declares `ip` its own (never shared egress for it)."""
        own = self._own.get(organization_id)
        return own is not None and own.match(_address(ip)) is not None

    def summary(self) -> str:
        """One line of counts, e.g. for `recon-stream scope check`."""
        spec = self.spec
        cidrs = sum(e.cidr is not None for e in spec.exclude)
        asns = len(spec.exclude) - cidrs
        excluded = sum(len(o.exclude) for o in spec.organizations.values())
        owned = sum(len(o.own) for o in spec.organizations.values())
        threshold = self.shared_egress_threshold
        return (
            f"{cidrs} CIDRs and {asns} ASNs excluded for every organization; "
            f"{len(spec.organizations)} organizations with {excluded} exclusions and {owned} "
            "own networks; "
            + (
                f"shared egress from {threshold} organizations"
                if threshold is not None
                else "no shared-egress detection"
            )
        )

    def document(self) -> dict[str, Any]:
        """The scope as a normalized file's content (JSON types; what `dump_scope` writes)."""
        return self.spec.model_dump(mode="json", exclude_none=True)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scope) and other.spec == self.spec

    def __repr__(self) -> str:
        return f"Scope({self.spec!r})"


def parse_scope(text: str, source: str = "scope") -> Scope:
    """The scope `text` means; `ScopeError` naming the line and the field of each mistake."""
    try:
        node, data = _compose(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error)
        line = mark.line + 1 if mark is not None else None
        raise ScopeError(
            [ScopeProblem(source, line, "(document)", f"not valid YAML ({problem})")]
        ) from None
    if not isinstance(data, dict):
        raise ScopeError(
            [
                ScopeProblem(
                    source,
                    1 if node is None else node.start_mark.line + 1,
                    "(document)",
                    "a scope file is a mapping (version, exclude, organizations, ...)",
                )
            ]
        )
    problems = [ScopeProblem(source, line, field, message) for line, field, message in _twice(node)]
    try:
        spec = ScopeFile.model_validate(data)
    except ValidationError as error:
        lines = yaml_lines(node)
        for e in error.errors(include_input=False, include_url=False):
            path = tuple(e["loc"])
            field = ".".join(str(p) for p in path) or "(document)"
            problems.append(ScopeProblem(source, line_of(lines, path), field, _message(e)))
    if problems:
        raise ScopeError(sorted(problems, key=lambda p: p.line or 0))
    return Scope(spec)


def load_scope(path: Path) -> Scope:
    """The scope of the file at `path`; `ScopeError` if it cannot be read or used."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        why = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ScopeError(
            [ScopeProblem(str(path), None, "(file)", f"cannot read the scope file ({why})")]
        ) from None
    return parse_scope(text, str(path))


def dump_scope(scope: Scope) -> str:
    """The scope as a normalized YAML file that `parse_scope` reads back to it."""
    return yaml.safe_dump(scope.document(), sort_keys=False, allow_unicode=True, width=100)


def _compose(text: str) -> tuple[yaml.Node | None, Any]:
    # One parse for both the data and the lines of its nodes.
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    finally:
        loader.dispose()


def _twice(node: yaml.Node | None, path: str = "") -> Iterable[tuple[int, str, str]]:
    """Keys given twice in one mapping: YAML keeps the last silently, and a second
    `org-a:` would drop the first one's exclusions."""
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key, value in node.value:
            here = f"{path}.{key.value}" if path else str(key.value)
            if key.value in seen:
                yield key.start_mark.line + 1, here, "given twice in the same mapping"
            seen.add(key.value)
            yield from _twice(value, here)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _twice(item, f"{path}.{i}" if path else str(i))


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    return str(error["msg"])


def _cidrs(entries: Iterable[ExclusionSpec]) -> Iterable[tuple[IPNetwork, str]]:
    return ((ipaddress.ip_network(e.cidr), e.reason) for e in entries if e.cidr is not None)


def _asns(entries: Iterable[ExclusionSpec]) -> dict[int, str]:
    table: dict[int, str] = {}
    for e in entries:
        if e.asn is not None:
            table.setdefault(int(e.asn[2:]), e.reason)
    return table


def _asn_number(asn: str | int) -> int | None:
    if isinstance(asn, int):
        return asn if 1 <= asn <= MAX_ASN else None
    match = _ASN.fullmatch(asn.strip().upper())
    number = _number(match.group(1)) if match is not None else 0
    return number if 1 <= number <= MAX_ASN else None


def _number(digits: str) -> int:
    # int() refuses thousands of digits; anything past ten is out of range anyway.
    return int(digits) if len(digits) <= 10 else MAX_ASN + 1


def _address(ip: IPAddress | str) -> IPAddress:
    address = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


EMPTY_SCOPE = Scope(ScopeFile(version=1))
"""No scope file: nothing excluded, nothing owned, no shared-egress detection."""
