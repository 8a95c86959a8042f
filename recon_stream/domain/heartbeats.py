"""The heartbeat contract (schemas/heartbeat.v1.json is generated from `Heartbeat`)."""

from __future__ import annotations

import enum
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

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


class Heartbeat(BaseModel):
    """One agent heartbeat as the platform publishes it on `agent.heartbeats.v1`."""

    model_config = ConfigDict(
        extra="ignore",
        frozen=True,
        strict=True,
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
