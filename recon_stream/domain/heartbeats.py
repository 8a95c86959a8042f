"""The heartbeat contract (schemas/heartbeat.v1.json is generated from `Heartbeat`)."""

from __future__ import annotations

import enum
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

MAX_HEARTBEAT_BYTES = 64 * 1024
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})"
)

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
    observed_at: AwareDatetime = Field(description="RFC 3339 time with offset.")
    event_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    site_id: Identifier | None = None
    hostname: Annotated[str, StringConstraints(max_length=255)] | None = None
    agent_version: Annotated[str, StringConstraints(max_length=64)] | None = None
    schema_version: Literal[1] = 1

    # Lax mode (JSON never coerces numbers to strings there) plus these two
    # guards: strict mode would refuse the string that a wrap validator hands on.
    @field_validator("observed_at", mode="wrap")
    @classmethod
    def _rfc3339_only(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # pydantic would also take "1714564800" or "2026-01-01 00:00Z"; the
        # contract is RFC 3339 with an offset, nothing looser.
        if isinstance(value, datetime):  # built in Python, not parsed from JSON
            return handler(value)
        if not isinstance(value, str) or not _RFC3339.fullmatch(value):
            raise ValueError("must be an RFC 3339 date-time with offset")
        return handler(value)

    @field_validator("schema_version", mode="wrap")
    @classmethod
    def _not_a_bool(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if type(value) is not int:  # JSON true or "1" would pass as Literal[1]
            raise ValueError("must be the integer 1")
        return handler(value)


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
        return Heartbeat.model_validate_json(raw)
    except ValidationError as error:
        raise InvalidHeartbeat(*_describe(error)) from None
