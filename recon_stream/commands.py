"""The commands stage: `accept`, `unaccept`, `rescan`, `verification`, `dismiss`,
`undismiss` and `purge` from `recon.commands.v1`.

Each record is validated like a heartbeat (an invalid one goes to the DLQ with
its reason and the batch goes on), then applied, in the order of its partition
(key = organization), and only then marked applied; the offset is committed
after the whole batch. A command already marked applied does nothing again.

- `accept` / `unaccept` put the acceptance on record (or take it back), then
  re-assess the organization's open exposures on the IP (or on all its IPs):
  each whose acceptance changed gets `changed` (reason `accepted` /
  `unaccepted`), with its history entry and state row, through the outbox.
- `rescan` queues a `manual` scan request for the IP (or every active IP of the
  organization): ahead of routine rescans, never served from a stored lookup,
  within the shared budget. A second one while the first is pending adds nothing.
- `verification` puts the organization's consent to TCP verification on record
  (`applied`, with a history entry saying who, when and why) unless the consent on
  record already says so, or a command requested later set it (`no_effect`). It needs
  no heartbeat first: consent may come before the organization's first agent.

- `dismiss` / `undismiss`: "this IP is not ours", and taking it back (`dismissals`).
- `purge`: the organization left. Its open exposures close first (reason
  `organization_purged`: events, OCSF findings, state tombstones), then its pairs,
  snapshots, acceptances, dismissals, consent and history are deleted. Every step is
  idempotent: a purge cut short by a crash finishes on redelivery. An organization
  with nothing on record: `no_effect`. The command log keeps the purge's outcome.

An `accept` or `rescan` naming an IP the organization does not use goes to the DLQ
(`unknown_target`): the budget is spent only on the organization's own IPs, and
nobody accepts exposures on someone else's address. A `dismiss` or `undismiss` of an IP
the organization never reported (whatever its status now) goes there too. Every command's outcome is
recorded by id (`applied`, `no_effect`, `rejected` with the reason), which is what
`recon-stream accept|unaccept|rescan --wait` reports.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import partial

from recon_stream.dead_letters import DeadLetterSink, RawRecord, Rejected
from recon_stream.dismissals import Dismissing
from recon_stream.domain.commands import (
    AcceptCommand,
    AnyCommand,
    CommandOutcome,
    DismissCommand,
    PurgeCommand,
    RescanCommand,
    UnacceptCommand,
    UndismissCommand,
    VerificationCommand,
    acceptance_of,
    consent_of,
    dismissal_of,
    parse_command,
)
from recon_stream.domain.messages import InvalidMessage, RejectReason
from recon_stream.domain.pairs import DismissalEntry
from recon_stream.domain.scan_requests import ScanReason, ScanRequest
from recon_stream.metrics import Metrics
from recon_stream.outbox import OutboxPublisher
from recon_stream.ports import (
    AcceptanceStore,
    CommandLogStore,
    ConsentHistory,
    ConsentStore,
    OrganizationData,
    OrgDirectory,
    ScanRequestQueue,
    SnapshotStore,
)
from recon_stream.retry import Retrier

log = logging.getLogger(__name__)

PURGE_PARALLEL = 32
"""IPs a purge closes at once."""

Command = AnyCommand


class CommandService:
    def __init__(
        self,
        acceptances: AcceptanceStore,
        orgs: OrgDirectory,
        queue: ScanRequestQueue,
        log_: CommandLogStore,
        outbox: OutboxPublisher,
        dead_letters: DeadLetterSink,
        metrics: Metrics,
        retrying: Retrier,
        *,
        consents: ConsentStore | None = None,
        consent_history: ConsentHistory | None = None,
        dismissing: Dismissing | None = None,
        snapshots: SnapshotStore | None = None,
        organization_data: Sequence[OrganizationData] = (),
    ) -> None:
        self._dismissing = dismissing
        self._snapshots = snapshots
        self._organization_data = tuple(organization_data)
        self._consents = consents
        self._consent_history = consent_history
        self._acceptances = acceptances
        self._orgs = orgs
        self._queue = queue
        self._log = log_
        self._outbox = outbox
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._retrying = retrying

    async def handle(self, records: Sequence[RawRecord]) -> int:
        """Validate and apply a batch, in order; returns how many commands took effect
        or had nothing to do (`applied` or `no_effect`)."""
        done = 0
        for record in records:
            command, rejected = _decode(record)
            if command is not None:
                rejected = await self.apply(command, record)
                done += rejected is None
            elif rejected is not None:
                await self._record_invalid(record, rejected)
            if rejected is not None:
                await self._retrying(
                    "dead-lettering", partial(self._dead_letters.publish, [rejected])
                )
                self._metrics.dlq.labels(rejected.reason.value).inc()
        return done

    async def apply(self, command: Command, record: RawRecord | None = None) -> Rejected | None:
        """Apply one command (once per id) and record its outcome; a `Rejected` when it
        cannot apply (an IP the organization does not use)."""
        identity = command.identity
        if await self._retrying("reading the command log", partial(self._log.applied, identity)):
            self._metrics.commands.labels(command.command, "duplicate").inc()
            return None
        problem = await self._unknown_target(command)
        if problem is not None:
            await self._mark(command, CommandOutcome.REJECTED, RejectReason.UNKNOWN_TARGET, problem)
            if record is None:
                raise ValueError(problem)
            return Rejected(record, RejectReason.UNKNOWN_TARGET, problem)
        if isinstance(command, RescanCommand):
            outcome = await self._rescan(command)
        elif isinstance(command, VerificationCommand):
            outcome = await self._verification(command)
        elif isinstance(command, DismissCommand | UndismissCommand):
            outcome = await self._dismissal(command)
        elif isinstance(command, PurgeCommand):
            outcome = await self._purge(command)
        else:
            outcome = await self._decide(command)
        await self._mark(command, outcome)
        return None

    async def _mark(
        self,
        command: Command,
        outcome: CommandOutcome,
        reason: RejectReason | None = None,
        detail: str | None = None,
    ) -> None:
        record = partial(
            self._log.mark,
            command.identity,
            command.organization_id,
            command.command,
            outcome,
            reason.value if reason is not None else None,
            detail,
        )
        await self._retrying("recording a command's outcome", record)
        self._metrics.commands.labels(command.command, outcome.value).inc()

    async def _record_invalid(self, record: RawRecord, rejected: Rejected) -> None:
        """A command that names its id but cannot be read is recorded rejected, so whoever
        waits for it learns why."""
        fields = _loose_fields(record.value)
        command_id = fields.get("command_id")
        if not isinstance(command_id, str) or not command_id:
            return
        mark = partial(
            self._log.mark,
            command_id,
            str(fields.get("organization_id", "")),
            str(fields.get("command", "")),
            CommandOutcome.REJECTED,
            rejected.reason.value,
            rejected.detail,
        )
        await self._retrying("recording a command's outcome", mark)

    async def _unknown_target(self, command: Command) -> str | None:
        """Why the command names an IP the organization does not use, if it does."""
        if isinstance(command, UnacceptCommand | VerificationCommand | PurgeCommand):
            # Taking an acceptance back never needs the IP to be in use; the others name none.
            return None
        org = command.organization_id
        if isinstance(command, DismissCommand | UndismissCommand):
            # Any status: a retired, excluded or shared IP can be dismissed (and back).
            if await self._dismissals().known(org, command.ip):
                return None
            return f"{command.ip} was never reported by organization {org}"
        if command.ip is None:
            return None
        active = await self._retrying(
            "reading the org's IPs", partial(self._orgs.reported_ips, org)
        )
        if command.ip in active:
            return None
        return f"{command.ip} is not an active IP of organization {org}"

    async def _decide(self, command: AcceptCommand | UnacceptCommand) -> CommandOutcome:
        store, org = self._acceptances, command.organization_id
        if isinstance(command, AcceptCommand):
            await self._retrying(
                "storing an acceptance",
                partial(store.accept, acceptance_of(command), command.identity),
            )
        else:
            removed = await self._retrying(
                "removing an acceptance",
                partial(store.unaccept, org, command.ip, command.transport, command.port),
            )
            if not removed:
                return CommandOutcome.NO_EFFECT
        await self._outbox.reassess(org, command.ip, datetime.now(UTC))
        return CommandOutcome.APPLIED

    async def _verification(self, command: VerificationCommand) -> CommandOutcome:
        if self._consents is None or self._consent_history is None:
            raise RuntimeError("the commands stage was built without the consent store")
        consent = consent_of(command)
        change = await self._retrying(
            "storing a verification consent", partial(self._consents.set, consent)
        )
        if not change.applied:
            return CommandOutcome.NO_EFFECT
        # Also on a redelivery that finds its consent stored: the entry may not be yet.
        await self._retrying(
            "recording a consent in history",
            partial(self._consent_history.record_consent, consent),
        )
        log.info(
            "verification %s for organization %s by %s",
            "enabled" if consent.enabled else "disabled",
            consent.organization_id,
            consent.requested_by,
        )
        return CommandOutcome.APPLIED

    def _dismissals(self) -> Dismissing:
        if self._dismissing is None:
            raise RuntimeError("the commands stage was built without dismissals")
        return self._dismissing

    async def _dismissal(self, command: DismissCommand | UndismissCommand) -> CommandOutcome:
        dismissing = self._dismissals()
        if isinstance(command, DismissCommand):
            done = await dismissing.dismiss(dismissal_of(command))
        else:
            entry = DismissalEntry.undismissed(
                command.organization_id,
                command.ip,
                command.requested_by,
                command.reason,
                command.requested_at,
                command.identity,
            )
            done = await dismissing.undismiss(entry)
        return CommandOutcome.APPLIED if done else CommandOutcome.NO_EFFECT

    async def _purge(self, command: PurgeCommand) -> CommandOutcome:
        if self._snapshots is None or not self._organization_data:
            raise RuntimeError("the commands stage was built without the organization's data")
        org, retrying = command.organization_id, self._retrying
        ips = await retrying("reading the org's snapshots", partial(self._snapshots.ips_of, org))

        async def close(ip: str) -> int:
            now = datetime.now(UTC)
            outbox = await retrying(
                "closing exposures", partial(self._outbox.updater.purge, org, ip, now)
            )
            await self._outbox.publish(outbox)
            return len(outbox.events)

        closed = 0
        # A few IPs at a time (each a compare-and-swap and a publish); every event,
        # OCSF finding and tombstone is published before anything is deleted.
        for start in range(0, len(ips), PURGE_PARALLEL):
            chunk = ips[start : start + PURGE_PARALLEL]
            closed += sum(await asyncio.gather(*(close(ip) for ip in chunk)))
        deleted = 0
        for data in self._organization_data:
            deleted += await retrying(
                "deleting the org's data", partial(data.forget_organization, org)
            )
        log.info(
            "organization %s purged by %s: %d exposures closed, %d documents deleted",
            org,
            command.requested_by,
            closed,
            deleted,
        )
        return CommandOutcome.APPLIED if closed or deleted else CommandOutcome.NO_EFFECT

    async def _rescan(self, command: RescanCommand) -> CommandOutcome:
        org = command.organization_id
        if command.ip is not None:
            ips = [command.ip]
        else:
            active = await self._retrying(
                "reading the org's IPs", partial(self._orgs.reported_ips, org)
            )
            ips = sorted(active)
        waiting = await self._retrying(
            "reading pending rescans", partial(self._queue.pending_manual, ips)
        )
        if not ips or set(ips) <= waiting:
            return CommandOutcome.NO_EFFECT  # already asked for, and not yet looked up
        now = datetime.now(UTC)
        requests = [
            ScanRequest(organization_id=org, ip=ip, reason=ScanReason.MANUAL, requested_at=now)
            for ip in ips
        ]
        await self._retrying("queueing rescans", partial(self._queue.enqueue, requests))
        for _ in requests:
            self._metrics.scan_requests_received.labels(ScanReason.MANUAL.value).inc()
        return CommandOutcome.APPLIED


def _loose_fields(value: bytes | None) -> dict[str, object]:
    try:
        fields = json.loads(value or b"")
    except ValueError:
        return {}
    return fields if isinstance(fields, dict) else {}


def _decode(record: RawRecord) -> tuple[Command | None, Rejected | None]:
    try:
        return parse_command(record.value), None
    except InvalidMessage as error:
        return None, Rejected.of(record, error)
