"""The identifier types every message shares (organizations, agents, sites, IPs)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

Identifier = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@-]+$"),
]
# The address is checked by `domain.addresses.parse_address`, once per distinct
# text (cached); the schema still states the format so producers can validate.
IpText = Annotated[
    str,
    StringConstraints(min_length=2, max_length=45),
    Field(json_schema_extra={"anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]}),
]
