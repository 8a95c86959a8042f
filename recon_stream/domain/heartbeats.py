"""The heartbeat contract (schemas/heartbeat.v1.json is generated from `Heartbeat`)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

import msgspec
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from recon_stream.domain.identifiers import Identifier, IpText
from recon_stream.domain.messages import (
    InvalidMessage,
    RejectReason,
    check_size,
    describe,
)

MAX_HEARTBEAT_BYTES = 64 * 1024
EVENT_ID_MAX = 128
HOSTNAME_MAX = 255
AGENT_VERSION_MAX = 64

# RFC 3339 `date-time` (offset required). Kept as text in the model and parsed
# with `datetime.fromisoformat`: pydantic's datetime parser would also accept
# "1714564800" or a space separator, and costs more than the rest of the
# heartbeat together on the ingest hot path.
RFC3339_PATTERN = (
    r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])[Tt]([01]\d|2[0-3]):[0-5]\d:[0-5]\d"
    r"(\.\d{1,9})?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)$"
)
Rfc3339Text = Annotated[
    str,
    StringConstraints(pattern=RFC3339_PATTERN),
    Field(json_schema_extra={"format": "date-time"}),
]


class Heartbeat(BaseModel):
    """One agent heartbeat as the platform publishes it on `agent.heartbeats.v1`."""

    model_config = ConfigDict(
        extra="ignore",
        frozen=True,
        title="Heartbeat",
        json_schema_extra={
            "$id": "https://recon-stream.dev/schemas/heartbeat.v1.json",
            "description": (
                "An endpoint agent's heartbeat. Unknown fields are ignored; "
                f"messages over {MAX_HEARTBEAT_BYTES} bytes are rejected."
            ),
        },
    )

    organization_id: Identifier
    agent_id: Identifier
    public_ip: IpText = Field(description="Source address seen at the cloud edge.")
    observed_at: Rfc3339Text = Field(description="RFC 3339 date-time with offset.")
    event_id: Annotated[str, StringConstraints(min_length=1, max_length=EVENT_ID_MAX)] | None = None
    site_id: Identifier | None = None
    hostname: Annotated[str, StringConstraints(max_length=HOSTNAME_MAX)] | None = None
    agent_version: Annotated[str, StringConstraints(max_length=AGENT_VERSION_MAX)] | None = None
    # Not Literal[1]: that would take JSON `true`, and strict literals don't exist.
    schema_version: Annotated[
        int, Field(ge=1, le=1, strict=True, json_schema_extra={"const": 1})
    ] = 1


def observed_time(heartbeat: Heartbeat) -> datetime:
    """`observed_at` as an aware datetime (ValueError for a date like Feb 30)."""
    # A function, not a cached property: functools.cached_property takes a lock
    # and costs more than the parse on this hot path.
    return datetime.fromisoformat(heartbeat.observed_at.upper())


class InvalidHeartbeat(InvalidMessage):
    """A message that can never become a heartbeat; it goes to the DLQ."""


_validate_json = Heartbeat.__pydantic_validator__.validate_json  # skips a wrapper per call
_valid_days: set[str] = set()


def parse_heartbeat(raw: bytes | None) -> Heartbeat:
    """Validate one raw Kafka value against the heartbeat schema.

    Raises `InvalidHeartbeat` with the reason the message is rejected.
    """
    try:
        value = check_size(raw, MAX_HEARTBEAT_BYTES)
    except InvalidMessage as error:
        raise InvalidHeartbeat(error.reason, error.detail) from None
    try:
        heartbeat: Heartbeat = _validate_json(value)
    except ValidationError as error:
        described = describe(error)
        raise InvalidHeartbeat(described.reason, described.detail) from None
    # The pattern checked the form; the calendar (Feb 30) depends on the date
    # alone, and a stream carries few distinct dates: check each one once.
    day = heartbeat.observed_at[:10]
    if day not in _valid_days:
        try:
            observed_time(heartbeat)
        except ValueError as error:
            raise InvalidHeartbeat(RejectReason.SCHEMA, f"observed_at: {error}") from None
        if len(_valid_days) > 10_000:
            _valid_days.clear()
        _valid_days.add(day)
    return heartbeat


# --- the ingest hot path's pre-check ------------------------------------------


class Prevalidated(msgspec.Struct, frozen=True, gc=False):
    """A heartbeat whose every field but the identity is known to be valid."""

    organization_id: str
    agent_id: str
    public_ip: str
    observed_at: str
    event_id: Annotated[str, msgspec.Meta(min_length=1, max_length=EVENT_ID_MAX)] | None = None
    site_id: str | None = None
    hostname: Annotated[str, msgspec.Meta(max_length=HOSTNAME_MAX)] | None = None
    agent_version: Annotated[str, msgspec.Meta(max_length=AGENT_VERSION_MAX)] | None = None
    schema_version: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1


_decode_prevalidated = msgspec.json.Decoder(Prevalidated).decode
_rfc3339 = re.compile(RFC3339_PATTERN, re.ASCII).fullmatch
# pydantic's JSON parser refuses more than 200 nested levels; msgspec skips
# unknown fields without that limit and without checking their UTF-8. A
# message this short cannot nest deeper, nor can one with fewer brackets.
_DEEPEST_ACCEPTED = 200
_SHALLOW_BYTES = 2 * _DEEPEST_ACCEPTED


def prevalidate(raw: bytes | None) -> Prevalidated | None:
    """The ingest hot path's pre-check: the heartbeat, if all but its identity is valid.

    On an answer, every field except the four identity values
    (`organization_id`, `public_ip`, `agent_id`, `site_id`) is valid, and so
    are size, encoding and JSON; the identity values are only known to be text
    (or a null site). A caller that finds all four among values
    `parse_heartbeat` accepted before (the ingest cache) has validated the
    heartbeat for about half the cost. Returns None whenever it is not
    certain; the caller then runs `parse_heartbeat`. It may be stricter than
    the schema, never looser: a property test holds it to that.
    """
    if not raw or len(raw) > MAX_HEARTBEAT_BYTES:
        return None
    if len(raw) > _SHALLOW_BYTES and raw.count(b"[") + raw.count(b"{") > _DEEPEST_ACCEPTED:
        return None
    try:
        if not raw.isascii():
            raw.decode()
        heartbeat = _decode_prevalidated(raw)
    except (UnicodeDecodeError, msgspec.DecodeError):
        return None
    observed = heartbeat.observed_at
    # The pattern checks the form; the calendar was checked once per day.
    if observed[:10] in _valid_days and _rfc3339(observed) is not None:
        return heartbeat
    return None
