"""An organization's consent to TCP verification, and how a `verification` command
changes it.

The scanner connects to an organization's exposures only while its consent is on
record as enabled (and `RECON_VERIFY_TCP` is on). Consent is one record per
organization: the last decision, who made it, when and why. Commands are applied in
the order they were requested (`requested_at`, as MongoDB stores it: to the
millisecond), so a redelivered older command never overrides a newer one, and a
command repeating what is on record changes nothing (who and when stay those of the
decision that set it). Commands requested in the same millisecond take effect in the
order they arrive: an organization's commands share a partition (key = organization),
and a redelivered one was marked applied before any later one was read.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Consent:
    """An organization's decision about TCP verification, as on record."""

    organization_id: str
    enabled: bool
    requested_by: str
    reason: str
    at: datetime
    """When it was decided: the `requested_at` of the command that set it."""
    command_id: str

    @property
    def order(self) -> tuple[datetime, str]:
        """Where the command that made this decision stands among the org's commands."""
        return (self.at, self.command_id)


class ConsentChange(enum.StrEnum):
    """What storing a decision did."""

    CHANGED = "changed"
    """Stored: consent went from enabled to disabled, or back, or was set the first time."""
    REPEATED = "repeated"
    """This very command set the consent on record already (a redelivery)."""
    UNCHANGED = "unchanged"
    """The consent on record already says so; nothing stored."""
    OUTDATED = "outdated"
    """A command requested later was applied already; nothing stored."""

    @property
    def applied(self) -> bool:
        """True when the consent on record is this command's decision."""
        return self in (ConsentChange.CHANGED, ConsentChange.REPEATED)


def decide_consent(
    stored: Consent | None, newest: tuple[datetime, str] | None, wanted: Consent
) -> ConsentChange:
    """What `wanted` does to the consent on record (`stored`), given the order of the
    newest command seen for the organization so far (`newest`: applied or not)."""
    if stored is not None and stored.command_id == wanted.command_id:
        return ConsentChange.REPEATED
    if newest is not None and (wanted.at < newest[0] or wanted.order == newest):
        return ConsentChange.OUTDATED
    if stored is not None and stored.enabled == wanted.enabled:
        return ConsentChange.UNCHANGED
    return ConsentChange.CHANGED
