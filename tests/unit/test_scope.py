"""The scope file: refused with line and field, or loaded into fast answers."""

from __future__ import annotations

import ipaddress
import json
import os
import random
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from recon_stream.cli import cli
from recon_stream.domain.scope import (
    EMPTY_SCOPE,
    MAX_SHOWN,
    Scope,
    ScopeError,
    dump_scope,
    load_scope,
    parse_scope,
)

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "schemas" / "scope.v1.json").read_text(encoding="utf-8"))
EXAMPLE = ROOT / "deploy" / "scope.example.yaml"

SCOPE = """\
version: 1
exclude:
  - {cidr: 185.46.212.0/22, reason: SASE exits}
  - {cidr: 185.46.0.0/16, reason: the provider's whole range}
  - {cidr: "2a03:b0c0::/32", reason: v6 exits}
  - {cidr: 2a03:b0c0:1::/48, reason: v6 exits of one region}
  - {cidr: 192.0.2.1, reason: one address}
  - {asn: AS62044, reason: SASE provider}
shared_egress_organizations: 5
organizations:
  org-a:
    exclude:
      - {cidr: 81.2.69.160/28, reason: guest Wi-Fi}
      - {cidr: 185.46.212.0/24, reason: org-a's tenant on the exits}
      - {cidr: 185.46.0.0/16, reason: "org-a says the same, its own words"}
      - {asn: AS62044, reason: org-a's words for the provider}
      - {asn: AS13335, reason: WARP}
    own: [{cidr: 81.2.69.128/26}, {cidr: "2001:67c:2e8::/48", reason: data centre}]
  org-b:
    own: [{cidr: 185.46.212.0/22, reason: org-b's own tenant}]
"""


def refused(text: str) -> ScopeError:
    with pytest.raises(ScopeError) as caught:
        parse_scope(text, "s.yaml")
    return caught.value


@pytest.mark.parametrize(
    ("text", "where", "words"),
    [
        (
            "version: 1\nexclude:\n  - cidr: 10.0.0.300/8\n    reason: x\n",
            "s.yaml:3: exclude.0.cidr:",
            "not an IPv4 or IPv6 network: '10.0.0.300/8'",
        ),
        (
            "version: 1\nexclude:\n  - {cidr: 2001:db8::/200, reason: x}\n",
            "s.yaml:3: exclude.0.cidr:",
            "not an IPv4 or IPv6 network",
        ),
        (
            "version: 1\nexclude:\n  - reason: x\n    cidr: 185.46.212.7/22\n",
            "s.yaml:4: exclude.0.cidr:",
            "185.46.212.7/22 has host bits set: the network is 185.46.212.0/22",
        ),
        (
            "version: 1\nexclude:\n  - {cidr: '2001:db8::1/32', reason: x}\n",
            "s.yaml:3: exclude.0.cidr:",
            "has host bits set: the network is 2001:db8::/32",
        ),
        (
            "version: 1\nexclude:\n  - {cidr: 1:2:3:4:5:6:7:8, reason: YAML reads a number}\n",
            "s.yaml:3: exclude.0.cidr:",
            "a network as text",
        ),
        (
            "version: 1\nexclude:\n  - {asn: 62044, reason: x}\n",
            "s.yaml:3: exclude.0.asn:",
            "not AS<digits> (e.g. AS62044)",
        ),
        (
            "version: 1\nexclude:\n  - {asn: as62044, reason: x}\n",
            "s.yaml:3: exclude.0.asn:",
            "not AS<digits>",
        ),
        (
            "version: 1\nexclude:\n  - {asn: AS-1, reason: x}\n",
            "s.yaml:3: exclude.0.asn:",
            "not AS<digits>",
        ),
        (
            "version: 1\nexclude:\n  - {asn: AS0, reason: x}\n",
            "s.yaml:3: exclude.0.asn:",
            "AS numbers run from 1 to 4294967295",
        ),
        (
            "version: 1\nexclude:\n  - {asn: AS4294967296, reason: x}\n",
            "s.yaml:3: exclude.0.asn:",
            "AS numbers run from 1 to 4294967295",
        ),
        (
            "version: 1\nexclude:\n  - {asn: AS" + "9" * 5000 + ", reason: x}\n",
            "s.yaml:3: exclude.0.asn:",
            "AS numbers run from 1 to 4294967295",
        ),
        (
            "version: 1\nexclude:\n  - {cidr: 10.0.0.0/8, asn: AS1, reason: x}\n",
            "s.yaml:3: exclude.0:",
            "give exactly one of cidr or asn",
        ),
        ("version: 1\nexclude:\n  - {reason: x}\n", "s.yaml:3: exclude.0:", "exactly one"),
        (
            "version: 1\nexclude:\n  - {cidr: 10.0.0.0/8}\n",
            "s.yaml:3: exclude.0.reason:",
            "required",
        ),
        (
            "version: 1\nexclude:\n  - {cidr: 10.0.0.0/8, reason: '  '}\n",
            "s.yaml:3: exclude.0.reason:",
            "at least 1 character",
        ),
        ("version: 1\nexcludes: []\n", "s.yaml:2: excludes:", "unknown key"),
        (
            "version: 1\norganizations:\n  org-a:\n    own:\n      - cidr: 81.2.69.128/27\n"
            "        reasons: typo\n",
            "s.yaml:6: organizations.org-a.own.0.reasons:",
            "unknown key",
        ),
        (
            "version: 1\norganizations:\n  org-a:\n    exclude: []\n    owns: []\n",
            "s.yaml:5: organizations.org-a.owns:",
            "unknown key",
        ),
        (
            "version: 1\nshared_egress_organizations: -3\n",
            "s.yaml:2: shared_egress_organizations:",
            "-3: at least 2 organizations",
        ),
        ("version: 1\nshared_egress_organizations: 0\n", "s.yaml:2:", "at least 2"),
        ("version: 1\nshared_egress_organizations: 1\n", "s.yaml:2:", "at least 2"),
        ("version: 1\nshared_egress_organizations: 2.5\n", "s.yaml:2:", "a whole number"),
        ("version: 1\nshared_egress_organizations: yes\n", "s.yaml:2:", "a whole number"),
        ("version: 1\nshared_egress_organizations: '5'\n", "s.yaml:2:", "a whole number"),
        (
            "version: 1\norganizations:\n  org a: {}\n",
            "s.yaml:3: organizations.org a",
            "should match pattern",
        ),
        (
            "version: 1\norganizations:\n  org-a: {own: []}\n  org-a: {}\n",
            "s.yaml:4: organizations.org-a:",
            "given twice",
        ),
        ("version: 2\n", "s.yaml:1: version:", "Input should be 1"),
        ("exclude: []\n", "s.yaml:1: version:", "required"),
        ("version: 1\nexclude:\n", "s.yaml:2: exclude:", "valid list"),
        ("version: 1\nexclude: [\n", "s.yaml:3: (document):", "not valid YAML"),
        ("- version: 1\n", "s.yaml:1: (document):", "a scope file is a mapping"),
        ("", "s.yaml:1: (document):", "a scope file is a mapping"),
    ],
)
def test_a_bad_file_is_refused_naming_its_line_and_field(text: str, where: str, words: str) -> None:
    message = str(refused(text))
    assert message.startswith(where), message
    assert words in message


def test_every_mistake_is_reported_at_once_in_file_order() -> None:
    text = (
        "version: 1\n"
        "exclude:\n"
        "  - {cidr: 10.0.0.1/8, reason: x}\n"
        "  - {asn: AS1x, reason: x}\n"
        "shared_egress_organizations: -1\n"
        "organizations:\n"
        "  org-a:\n"
        "    own: [{cidr: nope}]\n"
        "  org-b: {own: [], own: []}\n"
        "typo: 1\n"
    )
    error = refused(text)
    assert [(p.line, p.field) for p in error.problems] == [
        (3, "exclude.0.cidr"),
        (4, "exclude.1.asn"),
        (5, "shared_egress_organizations"),
        (8, "organizations.org-a.own.0.cidr"),
        (9, "organizations.org-b.own"),
        (10, "typo"),
    ]
    assert str(error).splitlines()[0] == (
        "s.yaml:3: exclude.0.cidr: 10.0.0.1/8 has host bits set: the network is 10.0.0.0/8"
    )


def test_a_long_list_of_mistakes_is_cut_in_the_message_not_in_problems() -> None:
    entries = "".join(f"  - {{cidr: 10.0.0.{i}/8, reason: x}}\n" for i in range(1, 31))
    error = refused("version: 1\nexclude:\n" + entries)
    assert len(error.problems) == 30
    lines = str(error).splitlines()
    assert len(lines) == MAX_SHOWN + 1
    assert lines[-1] == f"... and {30 - MAX_SHOWN} more"


def test_a_file_that_cannot_be_read_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ScopeError, match=r"missing.yaml: \(file\): cannot read the scope file"):
        load_scope(tmp_path / "missing.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ScopeError, match="not UTF-8"):
        load_scope(binary)


def test_what_the_model_refuses_the_schema_refuses_too() -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    good = yaml.safe_load(SCOPE)
    validator.validate(good)
    for bad in (
        {**good, "typo": 1},
        {**good, "shared_egress_organizations": 1},
        {**good, "exclude": [{"cidr": "10.0.0.0/8", "asn": "AS1", "reason": "x"}]},
        {**good, "exclude": [{"reason": "x"}]},
        {**good, "exclude": [{"asn": "as1", "reason": "x"}]},
        {**good, "exclude": [{"cidr": "10.0.0.0/8"}]},
        {**good, "organizations": {"org-a": {"own": [{"cidr": "10.0.0.0/8", "x": 1}]}}},
        {k: v for k, v in good.items() if k != "version"},
    ):
        assert not validator.is_valid(bad), bad


# -- a valid file, asked ------------------------------------------------------------------


@pytest.fixture(scope="module")
def scope() -> Scope:
    return parse_scope(SCOPE, "s.yaml")


@pytest.mark.parametrize(
    ("org", "ip", "reason"),
    [
        # IPv4: the longest prefix decides, global or the organization's.
        ("org-x", "185.46.212.9", "SASE exits"),
        ("org-x", "185.46.1.1", "the provider's whole range"),
        ("org-x", "185.47.0.1", None),
        ("org-a", "185.46.212.9", "org-a's tenant on the exits"),
        ("org-a", "185.46.213.9", "SASE exits"),  # the global /22 is longer than nothing of org-a
        ("org-a", "185.46.1.1", "org-a says the same, its own words"),  # equal length: org's
        ("org-a", "81.2.69.170", "guest Wi-Fi"),
        ("org-x", "81.2.69.170", None),  # org-a's exclusion is org-a's alone
        ("org-a", "81.2.69.130", None),  # owned, not excluded
        ("org-x", "192.0.2.1", "one address"),
        ("org-x", "192.0.2.2", None),
        # IPv6.
        ("org-x", "2a03:b0c0::1", "v6 exits"),
        ("org-x", "2a03:b0c0:1:ffff::1", "v6 exits of one region"),
        ("org-x", "2a03:b0c1::1", None),
        # An IPv4 address carried in IPv6 is the IPv4 address.
        ("org-x", "::ffff:185.46.212.9", "SASE exits"),
        ("org-x", "2001:67c:2e8::1", None),
    ],
)
def test_excluded_gives_the_most_specific_reason(
    scope: Scope, org: str, ip: str, reason: str | None
) -> None:
    assert scope.excluded(org, ip) == reason
    assert scope.excluded(org, ipaddress.ip_address(ip)) == reason


def test_excluded_asn_is_the_organizations_words_first(scope: Scope) -> None:
    assert scope.excluded_asn("org-x", "AS62044") == "SASE provider"
    assert scope.excluded_asn("org-x", 62044) == "SASE provider"
    assert scope.excluded_asn("org-a", "AS62044") == "org-a's words for the provider"
    assert scope.excluded_asn("org-a", "as13335") == "WARP"
    assert scope.excluded_asn("org-x", "AS13335") is None
    for nothing in ("", "AS", "13335x", "AS0", 0, -1, 2**32, "AS" + "9" * 5000):
        assert scope.excluded_asn("org-a", nothing) is None


def test_owns_is_by_organization(scope: Scope) -> None:
    assert scope.owns("org-a", "81.2.69.129")
    assert scope.owns("org-a", "81.2.69.170")  # also excluded for it: exclusion wins there
    assert not scope.owns("org-a", "81.2.69.200")
    assert not scope.owns("org-a", "81.2.69.127")
    assert scope.owns("org-a", "2001:67c:2e8:1::5")
    assert not scope.owns("org-a", "2001:67c:2e9::5")
    assert scope.owns("org-b", "185.46.212.1")
    assert not scope.owns("org-x", "81.2.69.129")
    assert scope.shared_egress_threshold == 5


def test_no_file_and_an_empty_file_exclude_nothing() -> None:
    bare = parse_scope("version: 1\n")
    assert bare == EMPTY_SCOPE
    for s in (bare, EMPTY_SCOPE):
        assert s.excluded("org-a", "185.46.212.9") is None
        assert s.excluded_asn("org-a", "AS62044") is None
        assert not s.owns("org-a", "185.46.212.9")
        assert s.shared_egress_threshold is None


def test_a_query_of_no_address_is_a_value_error(scope: Scope) -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        scope.excluded("org-a", "not an ip")


def test_show_writes_a_normalized_file_that_loads_to_the_same_scope(scope: Scope) -> None:
    shown = dump_scope(scope)
    assert parse_scope(shown, "shown.yaml") == scope
    jsonschema.Draft202012Validator(SCHEMA).validate(yaml.safe_load(shown))
    document = scope.document()
    assert document == yaml.safe_load(shown)
    assert document["exclude"][2] == {"cidr": "2a03:b0c0::/32", "reason": "v6 exits"}
    assert document["exclude"][4] == {"cidr": "192.0.2.1/32", "reason": "one address"}
    assert document["organizations"]["org-a"]["own"][0] == {"cidr": "81.2.69.128/26"}
    assert "shared_egress_organizations" not in EMPTY_SCOPE.document()


def test_the_example_file_is_valid_and_says_what_an_msp_writes() -> None:
    example = load_scope(EXAMPLE)
    jsonschema.Draft202012Validator(SCHEMA).validate(
        yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    )
    assert example.excluded_asn("org-a", "AS62044") is not None  # Zscaler
    assert example.excluded_asn("org-a", "AS13335") is not None  # Cloudflare WARP
    assert example.excluded("org-a", "185.46.212.1") is not None
    assert example.excluded("org-a", "81.2.69.161") == "guest Wi-Fi (visitors' devices)"
    assert example.excluded("org-b", "81.2.69.161") is None
    assert example.owns("msp-internal", "198.51.100.1")
    assert example.shared_egress_threshold is not None


def test_ten_thousand_networks_load_and_answer_as_a_linear_scan_would() -> None:
    rng = random.Random(19)
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for i in range(10_000):
        if i % 4:
            networks.append(
                ipaddress.IPv4Network((rng.getrandbits(32), rng.randint(8, 32)), strict=False)
            )
        else:
            networks.append(
                ipaddress.IPv6Network((rng.getrandbits(128), rng.randint(16, 128)), strict=False)
            )
    text = "version: 1\nexclude:\n" + "".join(
        f"  - {{cidr: '{n}', reason: r{i}}}\n" for i, n in enumerate(networks)
    )
    scope = parse_scope(text, "big.yaml")
    assert scope.summary().startswith("10000 CIDRs and 0 ASNs")

    # Each network's own addresses: the most specific network holding them answers.
    ranges = [
        (n.version, int(n.network_address), int(n.broadcast_address), n.prefixlen, f"r{i}")
        for i, n in enumerate(networks)
    ]

    def scan(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        value, best = int(address), None
        for version, first, last, length, reason in ranges:
            inside = version == address.version and first <= value <= last
            if inside and (best is None or length > best[0]):
                best = (length, reason)
        return best[1] if best else None

    probes: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [
        n[rng.randrange(n.num_addresses)] for n in rng.sample(networks, 150)
    ]
    probes += [ipaddress.IPv4Address(rng.getrandbits(32)) for _ in range(100)]
    probes += [ipaddress.IPv6Address(rng.getrandbits(128)) for _ in range(50)]
    answered = 0
    for address in probes:
        expected = scan(address)
        assert scope.excluded("org-a", address) == expected, address
        answered += expected is not None
    assert answered >= 150


# -- the command line ---------------------------------------------------------------------


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    for name in list(os.environ):
        if name.upper().startswith("RECON_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env file of the machine's
    return CliRunner()


def test_scope_check_says_ok_with_counts_or_exits_2_with_line_and_field(
    runner: CliRunner, tmp_path: Path
) -> None:
    ok = runner.invoke(cli, ["scope", "check", str(EXAMPLE)])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout == (
        f"{EXAMPLE}: ok: 2 CIDRs and 2 ASNs excluded for every organization; 3 organizations "
        "with 3 exclusions and 3 own networks; shared egress from 5 organizations\n"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nexclude:\n  - {asn: 62044, reason: Zscaler}\n")
    refused = runner.invoke(cli, ["scope", "check", str(bad)])
    assert refused.exit_code == 2
    assert refused.stdout == ""
    assert refused.stderr == f"{bad}:3: exclude.0.asn: not AS<digits> (e.g. AS62044): 62044\n"
    missing = runner.invoke(cli, ["scope", "check", str(tmp_path / "missing.yaml")])
    assert missing.exit_code == 2
    assert "cannot read the scope file" in missing.stderr


def test_scope_show_prints_the_file_in_force(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    unset = runner.invoke(cli, ["scope", "show"])
    assert (unset.exit_code, unset.stdout) == (0, "no scope file: nothing excluded\n")

    monkeypatch.setenv("RECON_SCOPE_FILE", str(EXAMPLE))
    shown = runner.invoke(cli, ["scope", "show"])
    assert shown.exit_code == 0, shown.output
    assert parse_scope(shown.stdout) == load_scope(EXAMPLE)
    as_json = runner.invoke(cli, ["scope", "show", "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == load_scope(EXAMPLE).document()

    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nshared_egress_organizations: -1\n")
    monkeypatch.setenv("RECON_SCOPE_FILE", str(bad))
    refused = runner.invoke(cli, ["scope", "show"])
    assert refused.exit_code == 2
    assert refused.stderr.startswith(f"{bad}:2: shared_egress_organizations: -1: at least 2")
