"""Commands: how the platform and operators act on exposures (schemas/command.v1.json).

Published on `recon.commands.v1` with Kafka key = `organization_id`, so one
organization's commands are applied in the order they were sent.

- `accept`: the organization declares an exposure (transport/port, on one IP or on
  every IP of the organization, now and later) intended, with a reason and an
  optional expiry. It may come before the port ever opens.
- `unaccept`: takes an acceptance back.
- `rescan`: a fresh lookup of one IP or of every active IP of the organization.
- `verification`: the organization consents to TCP verification of its exposures
  (`enabled` true), or takes its consent back (false), with who and why.
- `dismiss`: "this IP is not ours" (a home office, a hotel): the IP is treated as
  excluded for the organization, until `undismiss` or the optional expiry.
- `undismiss`: takes a dismissal back.
- `purge`: the organization left: its exposures close and its data is deleted.

A command without `command_id` is identified by its content: the same message
delivered twice is one command.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    StrictBool,
    StringConstraints,
    TypeAdapter,
    field_validator,
)

from recon_stream.domain.acceptance import Acceptance
from recon_stream.domain.addresses import InvalidAddress, parse_address
from recon_stream.domain.identifiers import Identifier, IpText
from recon_stream.domain.messages import parse_message
from recon_stream.domain.pairs import Dismissal
from recon_stream.domain.scans import Transport
from recon_stream.domain.verification_consent import Consent

SCHEMA_ID = "https://recon-stream.dev/schemas/command.v1.json"
MAX_COMMAND_BYTES = 64 * 1024

Port = Annotated[int, Field(ge=0, le=65535)]
CommandId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Requester = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Reason = Annotated[str, StringConstraints(min_length=1, max_length=500)]
# Consent to connect to an organization's addresses needs a real who and why.
NamedRequester = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"\S")]
StatedReason = Annotated[str, StringConstraints(min_length=1, max_length=500, pattern=r"\S")]


class _Command(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    organization_id: Identifier
    requested_by: Requester = Field(description="Who asked: a user, a service, a ticket.")
    requested_at: AwareDatetime = Field(description="RFC 3339 time with offset.")
    command_id: CommandId | None = Field(
        None, description="A redelivered command with the same id has no second effect."
    )

    @field_validator("ip", check_fields=False)
    @classmethod
    def _canonical_ip(cls, value: str | None) -> str | None:
        # The name the pipeline stores the address under (IPv4-mapped IPv6 as IPv4).
        if value is None:
            return None
        try:
            return parse_address(value).text
        except InvalidAddress as error:
            raise ValueError(str(error)) from None

    def kafka_key(self) -> bytes:
        return self.organization_id.encode()

    @property
    def identity(self) -> str:
        """`command_id`, or a digest of the content when there is none."""
        if self.command_id is not None:
            return self.command_id
        content = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return "sha256:" + hashlib.sha256(content.encode()).hexdigest()


class AcceptCommand(_Command):
    """Declare an exposure intended: on `ip`, or on every IP of the organization."""

    command: Literal["accept"]
    transport: Transport = "tcp"
    port: Port
    ip: IpText | None = Field(None, description="Absent: every IP of the organization.")
    reason: Reason
    expires_at: AwareDatetime | None = Field(None, description="Absent: until taken back.")


class UnacceptCommand(_Command):
    """Take an acceptance back."""

    command: Literal["unaccept"]
    transport: Transport = "tcp"
    port: Port
    ip: IpText | None = Field(None, description="Absent: the organization-wide acceptance.")


class RescanCommand(_Command):
    """A fresh lookup, ahead of routine rescans, within the shared budget."""

    command: Literal["rescan"]
    ip: IpText | None = Field(None, description="Absent: every active IP of the organization.")


class VerificationCommand(_Command):
    """Consent to TCP verification of the organization's exposures, or take it back.

    It may come before the organization's first heartbeat. Verification also needs
    `RECON_VERIFY_TCP` on the scanner workers."""

    command: Literal["verification"]
    # Strict: "yes" or 1 is not consent (and the schema says boolean).
    enabled: StrictBool = Field(description="true: consent given; false: consent taken back.")
    requested_by: NamedRequester = Field(
        description="Who decides: a user, a service, a ticket (not blank)."
    )
    reason: StatedReason = Field(description="Why (not blank).")


class DismissCommand(_Command):
    """ "This IP is not ours": no lookup on the organization's behalf, its open exposures
    close (reason `dismissed`), nothing more is reported on it until `undismiss` or
    `expires_at`. Only an IP the organization's agents reported can be dismissed."""

    command: Literal["dismiss"]
    ip: IpText
    reason: StatedReason = Field(description="Why the IP is not the organization's (not blank).")
    expires_at: AwareDatetime | None = Field(None, description="Absent: until undismissed.")


class UndismissCommand(_Command):
    """Take a dismissal back: the IP is the organization's again, and looked up afresh."""

    command: Literal["undismiss"]
    ip: IpText
    reason: Reason | None = Field(None, description="Why (kept in history).")


class PurgeCommand(_Command):
    """The organization left: its open exposures close (reason `organization_purged`,
    with state tombstones), then its pairs, exposures, acceptances, dismissals, consent
    and history are deleted. Late heartbeats of the organization start it afresh."""

    command: Literal["purge"]
    requested_by: NamedRequester = Field(
        description="Who decides: a user, a service, a ticket (not blank)."
    )


AnyCommand = (
    AcceptCommand
    | UnacceptCommand
    | RescanCommand
    | VerificationCommand
    | DismissCommand
    | UndismissCommand
    | PurgeCommand
)
Command = Annotated[AnyCommand, Field(discriminator="command")]


class CommandMessage(RootModel[Command]):
    """A command on `recon.commands.v1` (Kafka key = `organization_id`)."""

    model_config = ConfigDict(
        title="Command",
        json_schema_extra={"$id": SCHEMA_ID},
    )


_ADAPTER: TypeAdapter[AnyCommand] = TypeAdapter(Command)


class CommandOutcome(enum.StrEnum):
    """What a command did (recorded by id; `recon-stream ... --wait` prints it)."""

    APPLIED = "applied"
    NO_EFFECT = "no_effect"
    """Nothing to do: an `unaccept` that matched no acceptance, a `rescan` already pending,
    a `verification` the consent on record already says (or older than the one that set it),
    an `undismiss` of an IP not dismissed, a `purge` of an organization with no data."""
    REJECTED = "rejected"
    """It went to the DLQ (the reason is recorded with it)."""


@dataclass(frozen=True, slots=True)
class RecordedOutcome:
    outcome: CommandOutcome
    reason: str | None = None
    """For `rejected`: the DLQ reason (`unknown_target`, `schema_violation`, ...)."""
    detail: str | None = None


def parse_command(raw: bytes | None) -> AnyCommand:
    """The command in `raw`; `InvalidMessage` with the dead-letter reason if it is none."""
    return parse_message(_ADAPTER.validate_json, raw, MAX_COMMAND_BYTES)


def acceptance_of(command: AcceptCommand) -> Acceptance:
    """What an `accept` command puts on record (accepted when it was requested)."""
    return Acceptance(
        organization_id=command.organization_id,
        ip=command.ip,
        transport=command.transport,
        port=command.port,
        reason=command.reason,
        requested_by=command.requested_by,
        accepted_at=command.requested_at,
        expires_at=command.expires_at,
    )


def dismissal_of(command: DismissCommand) -> Dismissal:
    """What a `dismiss` command puts on record (decided when it was requested)."""
    return Dismissal(
        organization_id=command.organization_id,
        ip=command.ip,
        reason=command.reason,
        requested_by=command.requested_by,
        dismissed_at=command.requested_at,
        expires_at=command.expires_at,
        command_id=command.identity,
    )


def consent_of(command: VerificationCommand) -> Consent:
    """What a `verification` command puts on record (decided when it was requested)."""
    return Consent(
        organization_id=command.organization_id,
        enabled=command.enabled,
        requested_by=command.requested_by,
        reason=command.reason,
        at=command.requested_at,
        command_id=command.identity,
    )
