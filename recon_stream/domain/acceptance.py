"""Acceptance: an organization's decision, on record, that an exposure is intended.

An acceptance covers one (transport, port) on one IP, or on every IP of the
organization (`ip` None), now and later, until it is taken back or expires. It
never hides an exposure and never changes its severity: events, the table, the
state topic and history all show it, with its reason and expiry.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


class AcceptanceInfo(BaseModel):
    """The acceptance in force on an exposure, as events and the state topic show it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    reason: str
    requested_by: str
    accepted_at: AwareDatetime
    expires_at: AwareDatetime | None = Field(description="Null: until taken back.")


@dataclass(frozen=True, slots=True)
class Acceptance:
    """One stored acceptance."""

    organization_id: str
    ip: str | None
    """None: every IP of the organization."""
    transport: str
    port: int
    reason: str
    requested_by: str
    accepted_at: datetime
    expires_at: datetime | None

    def covers(self, ip: str, transport: str, port: int) -> bool:
        return (self.ip is None or self.ip == ip) and (self.transport, self.port) == (
            transport,
            port,
        )

    def active(self, now: datetime) -> bool:
        return self.expires_at is None or _utc(self.expires_at) > _utc(now)

    @property
    def info(self) -> AcceptanceInfo:
        return AcceptanceInfo(
            reason=self.reason,
            requested_by=self.requested_by,
            accepted_at=_utc(self.accepted_at),
            expires_at=_utc(self.expires_at) if self.expires_at is not None else None,
        )


def acceptance_for(
    acceptances: list[Acceptance], ip: str, transport: str, port: int, now: datetime
) -> AcceptanceInfo | None:
    """The acceptance in force on one exposure: the IP's own before the organization's."""
    found = [a for a in acceptances if a.covers(ip, transport, port) and a.active(now)]
    found.sort(key=lambda a: (a.ip is None, -_utc(a.accepted_at).timestamp()))
    return found[0].info if found else None


def _utc(moment: datetime) -> datetime:
    # MongoDB hands back naive UTC datetimes unless the client is tz-aware.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
