"""Consumed messages that cannot be used, and why: one parser for every topic we read.

Every consumed topic (heartbeats, scan requests, commands) turns its raw Kafka value
into a model through `parse_message`, so the same bytes get the same dead-letter
reason wherever they arrive:

    empty         no value (whitespace alone is invalid_json, as any non-JSON)
    too_large     over the topic's size limit (checked before decoding)
    invalid_json  not JSON at all
    schema_violation  JSON that breaks the schema ("field: problem; ..." in the detail)
    invalid_ip    (heartbeats) an address that is not an IP
    unknown_target  (commands) an IP the organization does not use

Heartbeats keep a faster path of their own for valid messages (see
`domain.heartbeats.parse_heartbeat`), and describe failures with `describe` too.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TypeVar

from pydantic import ValidationError

T = TypeVar("T")


class RejectReason(enum.StrEnum):
    """Why a message went to the dead-letter topic (header `x-recon-dlq-reason`)."""

    TOO_LARGE = "too_large"
    EMPTY = "empty"
    INVALID_JSON = "invalid_json"
    SCHEMA = "schema_violation"
    INVALID_IP = "invalid_ip"
    UNKNOWN_TARGET = "unknown_target"
    """A command about an IP the organization does not use."""


class InvalidMessage(ValueError):
    """A message that can never be used as sent; it goes to the DLQ with `reason`."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


MAX_LISTED_PROBLEMS = 5


def describe(error: ValidationError) -> InvalidMessage:
    """The DLQ reason and detail of a pydantic validation failure."""
    problems = error.errors(include_url=False, include_input=False, include_context=False)
    if any(p["type"] == "json_invalid" for p in problems):
        return InvalidMessage(RejectReason.INVALID_JSON, problems[0]["msg"])
    parts = []
    for problem in problems[:MAX_LISTED_PROBLEMS]:
        where = ".".join(str(loc) for loc in problem["loc"]) or "message"
        parts.append(f"{where}: {problem['msg']}")
    return InvalidMessage(RejectReason.SCHEMA, "; ".join(parts))


def check_size(raw: bytes | None, limit: int) -> bytes:
    """`raw` when it is neither empty nor over `limit` bytes; `InvalidMessage` otherwise."""
    if not raw:
        raise InvalidMessage(RejectReason.EMPTY, "empty message value")
    if len(raw) > limit:
        raise InvalidMessage(RejectReason.TOO_LARGE, f"{len(raw)} bytes exceeds {limit}")
    return raw


def parse_message(validate_json: Callable[[bytes], T], raw: bytes | None, limit: int) -> T:
    """The model `validate_json` makes of `raw`; `InvalidMessage` with the reason if none."""
    value = check_size(raw, limit)
    try:
        return validate_json(value)
    except ValidationError as error:
        raise describe(error) from None
