"""The heartbeat contract (schemas/heartbeat.v1.json is generated from `Heartbeat`)."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

MAX_HEARTBEAT_BYTES = 64 * 1024

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
    event_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    site_id: Identifier | None = None
    hostname: Annotated[str, StringConstraints(max_length=255)] | None = None
    agent_version: Annotated[str, StringConstraints(max_length=64)] | None = None
    # Not Literal[1]: that would take JSON `true`, and strict literals don't exist.
    schema_version: Annotated[
        int, Field(ge=1, le=1, strict=True, json_schema_extra={"const": 1})
    ] = 1


def observed_time(heartbeat: Heartbeat) -> datetime:
    """`observed_at` as an aware datetime (ValueError for a date like Feb 30)."""
    # A function, not a cached property: functools.cached_property takes a lock
    # and costs more than the parse on this hot path.
    return datetime.fromisoformat(heartbeat.observed_at.upper())


class RejectReason(enum.StrEnum):
    """Why a message went to the dead-letter topic (header `x-recon-dlq-reason`)."""

    TOO_LARGE = "too_large"
    EMPTY = "empty"
    INVALID_JSON = "invalid_json"
    SCHEMA = "schema_violation"
    INVALID_IP = "invalid_ip"


class InvalidHeartbeat(ValueError):
    """A message that can never become a heartbeat; it goes to the DLQ."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def _describe(error: ValidationError) -> tuple[RejectReason, str]:
    problems = error.errors(include_url=False, include_input=False, include_context=False)
    if any(p["type"] == "json_invalid" for p in problems):
        return RejectReason.INVALID_JSON, problems[0]["msg"]
    parts = []
    for problem in problems[:5]:
        where = ".".join(str(loc) for loc in problem["loc"]) or "message"
        parts.append(f"{where}: {problem['msg']}")
    return RejectReason.SCHEMA, "; ".join(parts)


_validate_json = Heartbeat.__pydantic_validator__.validate_json  # skips a wrapper per call
_valid_days: set[str] = set()


def parse_heartbeat(raw: bytes | None) -> Heartbeat:
    """Validate one raw Kafka value against the heartbeat schema.

    Raises `InvalidHeartbeat` with the reason the message is rejected.
    """
    if not raw:
        raise InvalidHeartbeat(RejectReason.EMPTY, "empty message value")
    if len(raw) > MAX_HEARTBEAT_BYTES:
        raise InvalidHeartbeat(
            RejectReason.TOO_LARGE, f"{len(raw)} bytes exceeds {MAX_HEARTBEAT_BYTES}"
        )
    try:
        heartbeat: Heartbeat = _validate_json(raw)
    except ValidationError as error:
        raise InvalidHeartbeat(*_describe(error)) from None
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
