"""The public-IP rule: which addresses are worth an outside-in lookup."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AddressClass(enum.StrEnum):
    """Why an address is, or is not, looked up."""

    PUBLIC = "public"
    PRIVATE = "private"
    LOOPBACK = "loopback"
    LINK_LOCAL = "link_local"
    CGNAT = "cgnat"
    MULTICAST = "multicast"
    RESERVED = "reserved"
    DOCUMENTATION = "documentation"
    UNSPECIFIED = "unspecified"


# An explicit table (IANA special-purpose registries) rather than
# `ipaddress.is_global`: its answers changed between Python releases, and it
# calls multicast "global".
_V4: tuple[tuple[ipaddress.IPv4Network, AddressClass], ...] = tuple(
    (ipaddress.IPv4Network(net), cls)
    for net, cls in (
        ("0.0.0.0/32", AddressClass.UNSPECIFIED),
        ("0.0.0.0/8", AddressClass.RESERVED),
        ("10.0.0.0/8", AddressClass.PRIVATE),
        ("100.64.0.0/10", AddressClass.CGNAT),
        ("127.0.0.0/8", AddressClass.LOOPBACK),
        ("169.254.0.0/16", AddressClass.LINK_LOCAL),
        ("172.16.0.0/12", AddressClass.PRIVATE),
        ("192.0.0.0/24", AddressClass.RESERVED),
        ("192.0.2.0/24", AddressClass.DOCUMENTATION),
        ("192.88.99.0/24", AddressClass.RESERVED),
        ("192.168.0.0/16", AddressClass.PRIVATE),
        ("198.18.0.0/15", AddressClass.RESERVED),
        ("198.51.100.0/24", AddressClass.DOCUMENTATION),
        ("203.0.113.0/24", AddressClass.DOCUMENTATION),
        ("224.0.0.0/4", AddressClass.MULTICAST),
        ("240.0.0.0/4", AddressClass.RESERVED),
    )
)
_V6: tuple[tuple[ipaddress.IPv6Network, AddressClass], ...] = tuple(
    (ipaddress.IPv6Network(net), cls)
    for net, cls in (
        ("::/128", AddressClass.UNSPECIFIED),
        ("::1/128", AddressClass.LOOPBACK),
        ("64:ff9b:1::/48", AddressClass.RESERVED),
        ("100::/64", AddressClass.RESERVED),
        ("2001:db8::/32", AddressClass.DOCUMENTATION),
        ("2001::/23", AddressClass.RESERVED),
        ("3fff::/20", AddressClass.DOCUMENTATION),
        ("fc00::/7", AddressClass.PRIVATE),
        ("fe80::/10", AddressClass.LINK_LOCAL),
        ("fec0::/10", AddressClass.RESERVED),
        ("ff00::/8", AddressClass.MULTICAST),
    )
)
_V6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_V6_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_V6_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def classify(address: IPAddress) -> AddressClass:
    """Classify an address; only `AddressClass.PUBLIC` is ever looked up."""
    if isinstance(address, ipaddress.IPv4Address):
        for network, cls in _V4:
            if address in network:
                return cls
        return AddressClass.PUBLIC
    # An IPv4 address carried in IPv6 is judged as the IPv4 address it carries.
    if address in _V6_MAPPED or address in _V6_NAT64:
        return classify(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    for v6network, cls in _V6:
        if address in v6network:
            return cls
    if address.sixtofour is not None and classify(address.sixtofour) is not AddressClass.PUBLIC:
        return AddressClass.RESERVED  # a 6to4 prefix built on a non-public IPv4
    if address not in _V6_GLOBAL_UNICAST:
        return AddressClass.RESERVED
    return AddressClass.PUBLIC


@dataclass(frozen=True, slots=True)
class ParsedAddress:
    """An address as text normalized for storage, with its class."""

    text: str
    version: int
    cls: AddressClass

    @property
    def is_public(self) -> bool:
        return self.cls is AddressClass.PUBLIC


class InvalidAddress(ValueError):
    """The text is not an IPv4 or IPv6 address."""


@lru_cache(maxsize=65536)
def parse_address(text: str) -> ParsedAddress:
    """Parse IPv4/IPv6 text (no zone ids, no prefixes) into its normalized form.

    Raises `InvalidAddress` when the text is not an address.
    """
    if "%" in text or "/" in text:
        raise InvalidAddress(f"not a plain IP address: {text[:64]!r}")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise InvalidAddress(f"not an IP address: {text[:64]!r}") from None
    cls = classify(address)
    if isinstance(address, ipaddress.IPv6Address) and (
        address in _V6_MAPPED or address in _V6_NAT64
    ):
        # Store the IPv4 form: Shodan and the other orgs know it by that name.
        address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return ParsedAddress(text=address.compressed, version=address.version, cls=cls)
