"""The public-IP rule, checked against an oracle written here from the RFCs.

The oracle does integer prefix arithmetic on its own table (IANA IPv4/IPv6
Special-Purpose Address Registries, RFC 6890 and successors) and never reads
the module's tables, so a range dropped from or mistyped in the module shows up.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from recon_stream.domain.addresses import (
    AddressClass,
    InvalidAddress,
    ParsedAddress,
    classify,
    parse_address,
)

V4_BITS = 32
V6_BITS = 128


def _prefix(text: str) -> tuple[int, int, int]:
    """(first, last, prefix length) of `a.b.c.d/n` or `x:y::/n`, by hand."""
    address, length = text.split("/")
    bits = V6_BITS if ":" in address else V4_BITS
    first = int(ipaddress.ip_address(address))
    size = 1 << (bits - int(length))
    assert first % size == 0, f"{text} is not a network address"
    return first, first + size - 1, int(length)


# IPv4 addresses never looked up (RFC 1122, 1918, 3927, 5737, 6598, 2544, 6890,
# 7526, 5771 multicast, 1112 class E incl. limited broadcast).
V4_NOT_PUBLIC = {
    "0.0.0.0/8": "this network (RFC 1122)",
    "10.0.0.0/8": "private (RFC 1918)",
    "100.64.0.0/10": "CGNAT shared space (RFC 6598)",
    "127.0.0.0/8": "loopback (RFC 1122)",
    "169.254.0.0/16": "link-local (RFC 3927)",
    "172.16.0.0/12": "private (RFC 1918)",
    "192.0.0.0/24": "IETF protocol assignments (RFC 6890)",
    "192.0.2.0/24": "TEST-NET-1 documentation (RFC 5737)",
    "192.88.99.0/24": "deprecated 6to4 relay anycast (RFC 7526)",
    "192.168.0.0/16": "private (RFC 1918)",
    "198.18.0.0/15": "benchmarking (RFC 2544)",
    "198.51.100.0/24": "TEST-NET-2 documentation (RFC 5737)",
    "203.0.113.0/24": "TEST-NET-3 documentation (RFC 5737)",
    "224.0.0.0/4": "multicast (RFC 5771)",
    "240.0.0.0/4": "reserved class E, incl. 255.255.255.255 (RFC 1112, 919)",
}
# IPv6 addresses never looked up inside global unicast 2000::/3 (RFC 4291);
# everything outside 2000::/3 (loopback, unspecified, ULA fc00::/7, link-local
# fe80::/10, multicast ff00::/8, 100::/64 discard, ...) is not public either.
# The whole of 2001::/23 counts as reserved: its few globally reachable
# sub-blocks are anycast protocol services, never an agent's edge.
V6_NOT_PUBLIC_IN_GLOBAL_UNICAST = {
    "2001::/23": "IETF protocol assignments (RFC 2928), incl. Teredo 2001::/32",
    "2001:db8::/32": "documentation (RFC 3849)",
    "3fff::/20": "documentation (RFC 9637)",
}
V6_GLOBAL_UNICAST = "2000::/3"
# These carry an IPv4 address in their low 32 bits and are judged by it.
V6_MAPPED = "::ffff:0:0/96"  # RFC 4291 IPv4-mapped
V6_NAT64 = "64:ff9b::/96"  # RFC 6052 well-known prefix, globally reachable per IANA
V6_6TO4 = "2002::/16"  # RFC 3056: bits 16-48 are the 6to4 router's IPv4 address

_V4_RANGES = [_prefix(net) for net in V4_NOT_PUBLIC]
_V6_RANGES = [_prefix(net) for net in V6_NOT_PUBLIC_IN_GLOBAL_UNICAST]


def _inside(value: int, net: str) -> bool:
    first, last, _ = _prefix(net)
    return first <= value <= last


def oracle_is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    value = int(address)
    if address.version == 4:
        return not any(first <= value <= last for first, last, _ in _V4_RANGES)
    if _inside(value, V6_MAPPED) or _inside(value, V6_NAT64):
        return oracle_is_public(ipaddress.IPv4Address(value & 0xFFFF_FFFF))
    if not _inside(value, V6_GLOBAL_UNICAST):
        return False
    if _inside(value, V6_6TO4) and not oracle_is_public(
        ipaddress.IPv4Address((value >> 80) & 0xFFFF_FFFF)
    ):
        return False
    return not any(first <= value <= last for first, last, _ in _V6_RANGES)


# --- strategies: uniform addresses hardly ever land in a small range, so mix in
# addresses inside each range and right at (and just past) its edges.


def _near_ranges(nets: list[str], bits: int) -> st.SearchStrategy[int]:
    edges: list[int] = []
    for net in nets:
        first, last, _ = _prefix(net)
        edges += [first, last, max(first - 1, 0), min(last + 1, (1 << bits) - 1)]
    inside = st.sampled_from(nets).flatmap(
        lambda net: st.integers(_prefix(net)[0], _prefix(net)[1])
    )
    return st.one_of(st.sampled_from(edges), inside)


V4_SPECIAL = list(V4_NOT_PUBLIC)
V6_SPECIAL = [
    *V6_NOT_PUBLIC_IN_GLOBAL_UNICAST,
    V6_GLOBAL_UNICAST,
    V6_MAPPED,
    V6_NAT64,
    "::/128",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
    "100::/64",
    "64:ff9b:1::/48",
    "2002::/16",
]

ipv4_ints = st.one_of(st.integers(0, 2**32 - 1), _near_ranges(V4_SPECIAL, V4_BITS))
ipv4s = ipv4_ints.map(ipaddress.IPv4Address)
ipv6s = st.one_of(
    st.integers(0, 2**128 - 1),
    _near_ranges(V6_SPECIAL, V6_BITS),
    # IPv4 carried in IPv6, with the IPv4 part near the special ranges too.
    ipv4_ints.map(lambda v4: _prefix(V6_MAPPED)[0] | v4),
    ipv4_ints.map(lambda v4: _prefix(V6_NAT64)[0] | v4),
).map(ipaddress.IPv6Address)
addresses = st.one_of(ipv4s, ipv6s)


@given(addresses)
def test_public_iff_in_no_special_purpose_range(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    expected = oracle_is_public(address)
    assert (classify(address) is AddressClass.PUBLIC) == expected, address


def _edges(net: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    first, last, _ = _prefix(net)
    top = (1 << (V6_BITS if ":" in net else V4_BITS)) - 1
    values = {first, last, (first + last) // 2, max(first - 1, 0), min(last + 1, top)}
    make = ipaddress.IPv6Address if ":" in net else ipaddress.IPv4Address
    return [make(v) for v in sorted(values)]


@pytest.mark.parametrize("net", [*V4_SPECIAL, *V6_SPECIAL])
def test_range_edges_agree_with_oracle(net: str) -> None:
    for address in _edges(net):
        assert (classify(address) is AddressClass.PUBLIC) == oracle_is_public(address), address


@given(addresses)
def test_parse_address_agrees_with_classify(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    parsed = parse_address(str(address))
    assert parsed.cls is classify(address)
    assert parsed.is_public is (parsed.cls is AddressClass.PUBLIC)


@given(ipv4_ints)
def test_ipv4_mapped_ipv6_is_its_ipv4_address(v4: int) -> None:
    ipv4 = ipaddress.IPv4Address(v4)
    mapped = ipaddress.IPv6Address(_prefix(V6_MAPPED)[0] | v4)
    assert classify(mapped) is classify(ipv4)
    for spelling in (f"::ffff:{ipv4}", f"::FFFF:{ipv4}", mapped.exploded, str(mapped)):
        assert parse_address(spelling) == ParsedAddress(str(ipv4), 4, classify(ipv4))


@given(ipv4s)
def test_ipv4_canonical_text_round_trips(address: ipaddress.IPv4Address) -> None:
    parsed = parse_address(str(address))
    assert parsed.text == str(address)
    assert parsed.version == 4
    assert parse_address(parsed.text) == parsed


def _carries_ipv4(a: ipaddress.IPv6Address) -> bool:
    value = int(a)
    return _inside(value, V6_MAPPED) or _inside(value, V6_NAT64)


def _stored_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if address.version == 6 and _carries_ipv4(address):  # type: ignore[arg-type]
        return str(ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF))
    return str(address)


@given(ipv6s.filter(lambda a: not _carries_ipv4(a)))
def test_ipv6_canonical_text_round_trips(address: ipaddress.IPv6Address) -> None:
    parsed = parse_address(str(address))
    assert parsed.text == address.compressed
    assert parsed.version == 6
    assert parse_address(parsed.text) == parsed


@given(ipv6s.filter(lambda a: not _carries_ipv4(a)))
def test_ipv6_spellings_normalize_to_compressed_lowercase(address: ipaddress.IPv6Address) -> None:
    assert parse_address(address.exploded.upper()).text == address.compressed


@given(st.text(max_size=64))
@example("fe80::1%eth0")
@example("1.2.3.4/32")
@example("1.2.3.4\n")
@example("01.2.3.4")
@example("")
@example("::ffff:1.2.3.4%1")
@example("\u0661.\u0662.\u0663.\u0664")  # Arabic-Indic digits
def test_arbitrary_text_raises_nothing_but_invalid_address(text: str) -> None:
    try:
        parsed = parse_address(text)
    except InvalidAddress:
        return
    # Whatever is accepted is a plain address and normalizes to Python's canonical form.
    address = ipaddress.ip_address(text)
    assert "%" not in text
    assert parsed.text == _stored_text(address)


@pytest.mark.parametrize(
    "text",
    [
        "fe80::1%eth0",
        "fe80::1%1",
        "2001:4860::1%25eth0",
        "8.8.8.8/32",
        "2606:4700::/32",
        "10.0.0.0/8",
        "",
        " 8.8.8.8",
        "8.8.8.8 ",
        "8.8.8",
        "8.8.8.8.8",
        "256.1.1.1",
        "08.8.8.8",
        "8.8.8.8:53",
        "[2606:4700::1111]",
        "2606:4700:::1111",
        "2606:4700::1111::1",
        "g::1",
        "localhost",
        "not an ip",
        "0x08080808",
        "134744072",
    ],
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(InvalidAddress):
        parse_address(text)


@pytest.mark.parametrize(
    ("text", "cls"),
    [
        # IPv4
        ("0.0.0.0", AddressClass.UNSPECIFIED),
        ("0.1.2.3", AddressClass.RESERVED),
        ("10.0.0.0", AddressClass.PRIVATE),
        ("10.255.255.255", AddressClass.PRIVATE),
        ("172.16.0.1", AddressClass.PRIVATE),
        ("172.31.255.255", AddressClass.PRIVATE),
        ("192.168.1.1", AddressClass.PRIVATE),
        ("127.0.0.1", AddressClass.LOOPBACK),
        ("127.255.255.254", AddressClass.LOOPBACK),
        ("169.254.169.254", AddressClass.LINK_LOCAL),
        ("100.64.0.0", AddressClass.CGNAT),
        ("100.127.255.255", AddressClass.CGNAT),
        ("224.0.0.1", AddressClass.MULTICAST),
        ("239.255.255.250", AddressClass.MULTICAST),
        ("240.0.0.1", AddressClass.RESERVED),
        ("255.255.255.255", AddressClass.RESERVED),
        ("192.0.0.8", AddressClass.RESERVED),
        ("198.18.0.1", AddressClass.RESERVED),
        ("198.19.255.255", AddressClass.RESERVED),
        ("192.0.2.1", AddressClass.DOCUMENTATION),
        ("198.51.100.7", AddressClass.DOCUMENTATION),
        ("203.0.113.255", AddressClass.DOCUMENTATION),
        # IPv6
        ("::", AddressClass.UNSPECIFIED),
        ("::1", AddressClass.LOOPBACK),
        ("fe80::1", AddressClass.LINK_LOCAL),
        ("febf:ffff::1", AddressClass.LINK_LOCAL),
        ("fc00::1", AddressClass.PRIVATE),
        ("fd12:3456:789a::1", AddressClass.PRIVATE),
        ("ff02::1", AddressClass.MULTICAST),
        ("ff0e::1", AddressClass.MULTICAST),
        ("2001:db8::1", AddressClass.DOCUMENTATION),
        ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", AddressClass.DOCUMENTATION),
        ("3fff::1", AddressClass.DOCUMENTATION),
        ("2001::1", AddressClass.RESERVED),  # Teredo
        ("100::1", AddressClass.RESERVED),
        ("::2", AddressClass.RESERVED),  # outside 2000::/3
        ("4000::1", AddressClass.RESERVED),  # outside 2000::/3
        ("1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", AddressClass.RESERVED),
        # IPv4 carried in IPv6 takes the class of the IPv4 address.
        ("::ffff:10.1.2.3", AddressClass.PRIVATE),
        ("::ffff:127.0.0.1", AddressClass.LOOPBACK),
        ("::ffff:100.64.1.1", AddressClass.CGNAT),
        ("::ffff:192.0.2.1", AddressClass.DOCUMENTATION),
    ],
)
def test_special_purpose_examples(text: str, cls: AddressClass) -> None:
    assert parse_address(text).cls is cls
    assert not parse_address(text).is_public


@pytest.mark.parametrize(
    "text",
    [
        "8.8.8.8",
        "1.1.1.1",
        "9.255.255.255",  # just below 10/8
        "11.0.0.0",  # just above 10/8
        "100.63.255.255",  # just below CGNAT
        "100.128.0.0",  # just above CGNAT
        "172.15.255.255",
        "172.32.0.0",
        "192.0.3.0",
        "198.51.99.255",
        "203.0.112.255",
        "203.0.114.0",
        "223.255.255.255",  # just below multicast
        "2000::1",
        "2001:200::1",  # just past 2001::/23
        "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff",
        "2001:db9::1",
        "2606:4700:4700::1111",
        "2a00:1450:4001:82a::200e",
        "3ffe:ffff::1",  # just below 3fff::/20
        "3fff:1000::1",  # just above 3fff::/20
        "::ffff:8.8.8.8",
    ],
)
def test_public_examples(text: str) -> None:
    parsed = parse_address(text)
    assert parsed.cls is AddressClass.PUBLIC
    assert parsed.is_public


def test_ipv4_mapped_is_stored_as_ipv4_text() -> None:
    assert parse_address("::ffff:8.8.8.8") == ParsedAddress("8.8.8.8", 4, AddressClass.PUBLIC)
    assert parse_address("0:0:0:0:0:FFFF:0808:0808").text == "8.8.8.8"


def test_ipv6_text_is_normalized() -> None:
    assert parse_address("2606:4700:4700:0000:0000:0000:0000:1111").text == "2606:4700:4700::1111"
    assert parse_address("2606:4700:4700::1111".upper()).text == "2606:4700:4700::1111"
