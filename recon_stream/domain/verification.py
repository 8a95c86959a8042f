"""TCP verification: what one connect from our own network says about a reported port.

A check is a plain TCP connect (`method` `tcp_connect`), classified as nmap's connect
scan does (nmap `scan_engine_connect.cc`, the reason in brackets):

- `open`: the connect completed (`conn-accept`);
- `closed`: refused, a reset (`conn-refused`);
- `no_answer`: timed out (`no-response`), or the network said no: host or network
  unreachable (`host-unreach`, `net-unreach`), administratively prohibited
  (`admin-prohibited`).

Only public addresses are ever connected to (`checkable`): a private, loopback or
otherwise non-public target is refused before any socket is made.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from recon_stream.domain.addresses import InvalidAddress, parse_address

METHOD = "tcp_connect"


class CheckState(enum.StrEnum):
    OPEN = "open"
    CLOSED = "closed"
    NO_ANSWER = "no_answer"


class CheckReason(enum.StrEnum):
    """nmap's reason names for a connect scan's outcomes."""

    CONN_ACCEPT = "conn-accept"
    CONN_REFUSED = "conn-refused"
    NO_RESPONSE = "no-response"
    HOST_UNREACH = "host-unreach"
    NET_UNREACH = "net-unreach"
    ADMIN_PROHIBITED = "admin-prohibited"

    @property
    def state(self) -> CheckState:
        if self is CheckReason.CONN_ACCEPT:
            return CheckState.OPEN
        if self is CheckReason.CONN_REFUSED:
            return CheckState.CLOSED
        return CheckState.NO_ANSWER


@dataclass(frozen=True, slots=True)
class Check:
    """One connect to (ip, port) over TCP and what it found."""

    ip: str
    port: int
    reason: CheckReason
    checked_at: datetime
    rtt_ms: float | None = None

    @property
    def state(self) -> CheckState:
        return self.reason.state


class NotCheckable(ValueError):
    """The target is not a public address: no connection is ever made to it."""


def checkable(ip: str) -> str:
    """`ip` normalized, when it is a public address; `NotCheckable` otherwise."""
    try:
        parsed = parse_address(ip)
    except InvalidAddress as error:
        raise NotCheckable(str(error)) from None
    if not parsed.is_public:
        raise NotCheckable(f"{parsed.text} is {parsed.cls.value}, not public: never checked")
    return parsed.text


class VerificationInfo(BaseModel):
    """The last check of an exposure, as events and state rows show it (`data.verification`)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    state: CheckState
    checked_at: AwareDatetime
    method: Literal["tcp_connect"] = Field(description="How: a TCP connect from our network.")

    @classmethod
    def of(cls, check: Check) -> VerificationInfo:
        return cls(state=check.state, checked_at=check.checked_at, method=METHOD)
