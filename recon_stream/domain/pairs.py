"""What an (organization, IP) pair is to that organization: its status.

Only an `active` pair is reported to: its lookups are applied to the organization's
snapshot and its exposures announced. The others keep the pair on record (for
`recon-stream ips`), close its open exposures with the matching reason, and announce
nothing more until the pair is active again:

- `excluded`: the scope file excludes the IP (a CIDR, or the ASN its lookup named),
  globally or for this organization (close reason `excluded`);
- `shared_egress`: so many organizations report from the IP that it is someone else's
  (a SASE or VPN exit, a hotel, CGNAT) and this one did not declare it `own`
  (`shared_egress`);
- `dismissed`: the organization said "this IP is not ours" (`dismiss`; `dismissed`);
- `retired`: no agent of the organization reported it for a while (`ip_retired`).

A heartbeat brings a `retired` pair back to `active`; the other statuses change only
by the decision that set them (the scope file, the shared-egress count, `undismiss`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from recon_stream.domain.exposures import ChangeReason


class PairStatus(enum.StrEnum):
    ACTIVE = "active"
    EXCLUDED = "excluded"
    SHARED_EGRESS = "shared_egress"
    DISMISSED = "dismissed"
    RETIRED = "retired"

    @property
    def reported(self) -> bool:
        """Whether the organization is told about the IP's exposures."""
        return self is PairStatus.ACTIVE

    @property
    def close_reason(self) -> ChangeReason | None:
        """Why open exposures close when a pair takes this status (None: active)."""
        return _REASONS.get(self)


_REASONS = {
    PairStatus.EXCLUDED: ChangeReason.EXCLUDED,
    PairStatus.SHARED_EGRESS: ChangeReason.SHARED_EGRESS,
    PairStatus.DISMISSED: ChangeReason.DISMISSED,
    PairStatus.RETIRED: ChangeReason.IP_RETIRED,
}


@dataclass(frozen=True, slots=True)
class Dismissal:
    """An organization's "this IP is not ours" on record (`dismiss`), with who and why."""

    organization_id: str
    ip: str
    reason: str
    requested_by: str
    dismissed_at: datetime
    expires_at: datetime | None
    command_id: str

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now


class DismissalChange(enum.StrEnum):
    """A dismissal's history entry: how it started or ended (the entry's reason)."""

    DISMISSED = "dismissed"
    UNDISMISSED = "undismissed"
    EXPIRED = "dismissal_expired"


@dataclass(frozen=True, slots=True)
class DismissalEntry:
    """A dismissal's start or end in the organization's history (idempotent by `entry_id`)."""

    entry_id: str
    organization_id: str
    ip: str
    change: DismissalChange
    at: datetime
    requested_by: str
    why: str | None

    @classmethod
    def started(cls, dismissal: Dismissal) -> DismissalEntry:
        return cls(
            f"dismiss:{dismissal.command_id}",
            dismissal.organization_id,
            dismissal.ip,
            DismissalChange.DISMISSED,
            dismissal.dismissed_at,
            dismissal.requested_by,
            dismissal.reason,
        )

    @classmethod
    def undismissed(
        cls,
        organization_id: str,
        ip: str,
        requested_by: str,
        why: str | None,
        at: datetime,
        command_id: str,
    ) -> DismissalEntry:
        return cls(
            f"undismiss:{command_id}",
            organization_id,
            ip,
            DismissalChange.UNDISMISSED,
            at,
            requested_by,
            why,
        )

    @classmethod
    def expired(cls, dismissal: Dismissal, now: datetime) -> DismissalEntry:
        return cls(
            f"dismissal_expired:{dismissal.command_id}",
            dismissal.organization_id,
            dismissal.ip,
            DismissalChange.EXPIRED,
            now,
            dismissal.requested_by,
            dismissal.reason,
        )
