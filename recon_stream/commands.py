"""The commands stage: `accept`, `unaccept` and `rescan` from `recon.commands.v1`.

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

A rescan of an IP the organization does not use goes to the DLQ
(`unknown_target`): the budget is spent only on the organization's own IPs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import partial

from recon_stream.dead_letters import DeadLetterSink, RawRecord, Rejected
from recon_stream.domain.commands import (
    AcceptCommand,
    RescanCommand,
    UnacceptCommand,
    acceptance_of,
    parse_command,
)
from recon_stream.domain.messages import InvalidMessage, RejectReason
from recon_stream.domain.scan_requests import ScanReason, ScanRequest
from recon_stream.metrics import Metrics
from recon_stream.outbox import OutboxPublisher
from recon_stream.ports import AcceptanceStore, CommandLogStore, OrgDirectory, ScanRequestQueue
from recon_stream.retry import Retrier

log = logging.getLogger(__name__)

Command = AcceptCommand | UnacceptCommand | RescanCommand


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
    ) -> None:
        self._acceptances = acceptances
        self._orgs = orgs
        self._queue = queue
        self._log = log_
        self._outbox = outbox
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._retrying = retrying

    async def handle(self, records: Sequence[RawRecord]) -> int:
        """Validate and apply a batch, in order; returns how many commands were applied."""
        applied = 0
        for record in records:
            command, rejected = _decode(record)
            if command is not None:
                rejected = await self.apply(command, record)
                applied += rejected is None
            if rejected is not None:
                await self._retrying(
                    "dead-lettering", partial(self._dead_letters.publish, [rejected])
                )
                self._metrics.dlq.labels(rejected.reason.value).inc()
        return applied

    async def apply(self, command: Command, record: RawRecord | None = None) -> Rejected | None:
        """Apply one command (once per id); a `Rejected` when it cannot apply."""
        identity = command.identity
        if await self._retrying("reading the command log", partial(self._log.applied, identity)):
            self._metrics.commands.labels(command.command, "duplicate").inc()
            return None
        if isinstance(command, RescanCommand):
            problem = await self._rescan(command)
            if problem is not None:
                self._metrics.commands.labels(command.command, "rejected").inc()
                if record is None:
                    raise ValueError(problem)
                return Rejected(record, RejectReason.UNKNOWN_TARGET, problem)
        else:
            await self._decide(command)
        await self._retrying(
            "marking a command applied",
            partial(self._log.mark, identity, command.organization_id, command.command),
        )
        self._metrics.commands.labels(command.command, "applied").inc()
        return None

    async def _decide(self, command: AcceptCommand | UnacceptCommand) -> None:
        store, org = self._acceptances, command.organization_id
        if isinstance(command, AcceptCommand):
            await self._retrying(
                "storing an acceptance",
                partial(store.accept, acceptance_of(command), command.identity),
            )
        else:
            await self._retrying(
                "removing an acceptance",
                partial(store.unaccept, org, command.ip, command.transport, command.port),
            )
        await self._outbox.reassess(org, command.ip, datetime.now(UTC))

    async def _rescan(self, command: RescanCommand) -> str | None:
        org = command.organization_id
        active = await self._retrying(
            "reading the org's IPs", partial(self._orgs.reported_ips, org)
        )
        if command.ip is not None and command.ip not in active:
            return f"{command.ip} is not an active IP of organization {org}"
        ips = [command.ip] if command.ip is not None else sorted(active)
        now = datetime.now(UTC)
        requests = [
            ScanRequest(organization_id=org, ip=ip, reason=ScanReason.MANUAL, requested_at=now)
            for ip in ips
        ]
        if requests:
            await self._retrying("queueing rescans", partial(self._queue.enqueue, requests))
            for _ in requests:
                self._metrics.scan_requests_received.labels(ScanReason.MANUAL.value).inc()
        return None


def _decode(record: RawRecord) -> tuple[Command | None, Rejected | None]:
    try:
        return parse_command(record.value), None
    except InvalidMessage as error:
        return None, Rejected.of(record, error)
