"""The ports: what each stage needs from storage and from Kafka, as small Protocols.

Stages (ingest, scanner, commands, scheduler, the outbox publisher, the feed
refresher) depend on these, never on an adapter class; the composition root
(`recon_stream.app`) builds the MongoDB and Kafka adapters that satisfy them, and
the unit tests hand the stages the fakes of `tests/fakes.py` instead. Each Protocol
is shaped to what its stages call, nothing more. The lookup provider and the rate
budget are in `recon_stream.providers`; the dead-letter sink in
`recon_stream.dead_letters`.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from recon_stream.domain.acceptance import Acceptance
from recon_stream.domain.commands import CommandOutcome
from recon_stream.domain.exposures import ExposureEvent
from recon_stream.domain.pairs import Dismissal, DismissalEntry, PairStatus
from recon_stream.domain.scan_requests import ScanRequest
from recon_stream.domain.scans import HostScan, ScanRecord
from recon_stream.domain.sightings import PairKey, PairSighting
from recon_stream.domain.snapshot import OrgContext, Outbox, Snapshot, StateRow, Update
from recon_stream.domain.verification import Check
from recon_stream.domain.verification_consent import Consent, ConsentChange
from recon_stream.domain.vulns import Feed, FeedStatus, VulnContext

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from recon_stream.adapters.scan_queue import QueueItem

Created = dict[PairKey, Any]
"""Pairs a write created or a relay claimed, each with its document id (for `mark_requested`)."""


# -- org_ips --------------------------------------------------------------------------


class OrgIpStore(Protocol):
    """What the ingest stage needs from `org_ips`."""

    async def record(
        self,
        sightings: Sequence[PairSighting],
        now: datetime,
        excluded: Mapping[PairKey, str] | None = None,
    ) -> Created:
        """Upsert the sightings; return the pairs this call created (its to announce,
        but for those in `excluded`: created `excluded` with the scope's reason and
        no scan request, ever)."""
        ...

    async def mark_requested(self, ids: Collection[Any], now: datetime) -> None:
        """Flip the outbox of these documents (ids from `record`/`claim_unsent`) to `sent`."""
        ...

    async def claim_unsent(self, now: datetime, limit: int) -> Created:
        """Claim pairs whose scan request is pending past its lease."""
        ...


class OrgDirectory(Protocol):
    """Which organizations use which IPs (`org_ips`), for the scanner and commands."""

    async def orgs_behind(self, ip: str) -> list[OrgContext]:
        """Every organization whose agents report from `ip` and still use it."""
        ...

    async def reported_ips(self, organization_id: str) -> set[str]:
        """The IPs the organization's agents still report from, scanned or not yet."""
        ...


class PairRetirement(Protocol):
    """What the scheduler needs from `org_ips`."""

    async def users(self, ips: Sequence[str]) -> list[tuple[str, str]]:
        """The active (ip, organization) pairs of `ips`, in a stable order."""
        ...

    async def unused(self, cutoff: datetime, limit: int) -> list[tuple[str, str]]:
        """Up to `limit` active (organization, ip) pairs last seen before `cutoff`."""
        ...

    async def retire(self, organization_id: str, ip: str, cutoff: datetime, now: datetime) -> bool:
        """Mark the pair retired if still unused since `cutoff`; False if seen again."""
        ...


# -- lookups and the queue ---------------------------------------------------------------


class LookupStore(Protocol):
    """The latest lookup per IP (`ip_scans`)."""

    @property
    def rescan_interval(self) -> float: ...

    async def get(self, ip: str) -> HostScan | None: ...

    async def put(self, scan: HostScan) -> None: ...


class RescanSchedule(Protocol):
    """When each IP's next routine lookup is due (`ip_scans`), for the scheduler."""

    async def due(self, now: datetime, limit: int) -> list[str]: ...

    async def postpone(self, ips: Sequence[str], until: datetime) -> None: ...


class ScanRequestQueue(Protocol):
    """Where scan requests wait for a lookup (`scan_queue`)."""

    async def pending_manual(self, ips: Sequence[str]) -> set[str]:
        """Those of `ips` with a manual (rescan) request still waiting."""
        ...

    async def enqueue(
        self, requests: Sequence[ScanRequest], traces: Sequence[Mapping[str, str]] = ()
    ) -> int: ...


class ScanWork(ScanRequestQueue, Protocol):
    """The scanner's side of the queue: claim an IP, then complete or give it back."""

    async def claim(self, lease: timedelta, now: datetime | None = None) -> QueueItem | None: ...

    async def complete(self, item: QueueItem) -> bool: ...

    async def retry_later(
        self,
        item: QueueItem,
        delay: float,
        now: datetime | None = None,
        *,
        error: str | None = None,
    ) -> None: ...

    async def release(self, item: QueueItem) -> None: ...

    async def scan_tried(self, item: QueueItem, scan: ScanRecord | None) -> QueueItem: ...

    async def poll_later(
        self, item: QueueItem, scan: ScanRecord, delay: float, now: datetime | None = None
    ) -> None: ...


class Prober(Protocol):
    """One TCP connect to a reported port (`adapters.probe.TcpProber`), within the
    verification budget shared by every replica."""

    async def check(self, ip: str, port: int) -> Check:
        """Raises `NotCheckable` for a non-public target (never connected to) and
        `ProbeError` for a failure on our side."""
        ...


class RecentReporters(Protocol):
    """Which organizations' agents reported an IP lately (`org_ips`)."""

    async def reported_since(self, ip: str, since: datetime) -> list[str]: ...


class PairStates(Protocol):
    """The statuses of (organization, IP) pairs (`org_ips`), for attribution."""

    async def set_status(
        self,
        organization_id: str,
        ip: str,
        status: PairStatus,
        reason: str | None = None,
        now: datetime | None = None,
    ) -> PairStatus | None:
        """The status before (None: no such pair, nothing written)."""
        ...

    async def pairs_with_status(self, status: PairStatus) -> list[tuple[str, str]]: ...

    async def crowded_ips(self, min_orgs: int) -> dict[str, list[str]]:
        """IPs with at least `min_orgs` active or shared-egress pairs, with their orgs."""
        ...

    async def reason_of(self, organization_id: str, ip: str) -> str | None:
        """Why the pair has its status (None: no reason on record)."""
        ...

    async def sharing(self, ip: str) -> list[str]:
        """The organizations whose pairs on `ip` are active or shared egress."""
        ...


class Dismissals(Protocol):
    """Organizations' "this IP is not ours" (`org_ips`): the commands stage and the
    scheduler leader's expiry."""

    async def status_of(self, organization_id: str, ip: str) -> PairStatus | None:
        """The pair's status (None: the organization never reported the IP)."""
        ...

    async def dismiss(self, dismissal: Dismissal) -> PairStatus | None:
        """Put the dismissal on record and the pair `dismissed`; the status before (None:
        no such pair, nothing written)."""
        ...

    async def undismiss(
        self,
        organization_id: str,
        ip: str,
        status: PairStatus,
        reason: str,
        now: datetime,
        only: str | None = None,
    ) -> Dismissal | None:
        """Give a dismissed pair `status` (active: looked up afresh) and drop its dismissal;
        the dismissal taken back (None: the pair was not dismissed, or with `only`, not by
        that command id: nothing written)."""
        ...

    async def expired_dismissals(self, now: datetime, limit: int) -> list[Dismissal]: ...


class DismissalHistory(Protocol):
    async def record_dismissal(self, entry: DismissalEntry) -> None:
        """Keep a dismissal's start or end in history (idempotent by its id)."""
        ...


class OrganizationData(Protocol):
    """A collection holding an organization's documents (`purge`)."""

    async def forget_organization(self, organization_id: str) -> int:
        """Delete every document of the organization; how many."""
        ...


class ScanCredits(Protocol):
    """The daily budget of on-demand Shodan scans, shared by every replica."""

    per_day: int

    async def take(self, now: datetime | None = None) -> bool:
        """Spend one of today's credits; False (nothing spent) when none is left."""
        ...

    async def used(self, now: datetime | None = None) -> int: ...


# -- snapshots, acceptances, history ------------------------------------------------------


class SnapshotStore(Protocol):
    """Per-(organization, IP) snapshots with their outboxes (`exposures`)."""

    async def load(self, organization_id: str, ip: str) -> Snapshot:
        """The stored snapshot, or an empty one (`stored` False)."""
        ...

    async def swap(self, update: Update) -> bool:
        """Store `update.after` and append its outboxes if the snapshot is still at
        `update.before`'s version; False when another writer got there first."""
        ...

    async def ips_of(self, organization_id: str) -> list[str]:
        """The IPs with an active snapshot for the organization."""
        ...


class OutboxStore(Protocol):
    """The outboxes of the snapshots (`exposures.pending`, `exposures.pending_state`)."""

    async def published(
        self, organization_id: str, ip: str, ids: Iterable[str], state: Sequence[StateRow] = ()
    ) -> None:
        """Pull what was published from the outboxes."""
        ...

    async def unpublished(self, limit: int, written_before: datetime | None = None) -> list[Outbox]:
        """Outboxes with something left, last written before `written_before` if given."""
        ...


class AcceptanceStore(Protocol):
    """Exposures organizations declared intended (`acceptances`)."""

    async def accept(self, acceptance: Acceptance, command_id: str) -> None: ...

    async def unaccept(
        self, organization_id: str, ip: str | None, transport: str, port: int
    ) -> bool: ...

    async def acceptances(
        self, organization_id: str, ip: str | None = None
    ) -> list[Acceptance]: ...

    async def expired_acceptances(self, now: datetime, limit: int = 100) -> list[Acceptance]: ...

    async def forget_acceptance(self, acceptance: Acceptance) -> None: ...


class HistoryLog(Protocol):
    """One entry per event (`exposure_history`), idempotent by event id."""

    async def record(self, events: Sequence[ExposureEvent]) -> None: ...


class ConsentHistory(Protocol):
    """Entries of organizations' verification consent changes (`exposure_history`)."""

    async def record_consent(self, consent: Consent) -> None:
        """Keep the entry of `consent` becoming the one on record (idempotent by its
        command id)."""
        ...


class ConsentStore(Protocol):
    """Organizations' consent to TCP verification (`verification_consents`)."""

    async def set(self, consent: Consent) -> ConsentChange:
        """Store `consent` unless the consent on record already says so or a command
        requested later was applied; idempotent by `consent.command_id`."""
        ...

    async def get(self, organization_id: str) -> Consent | None:
        """The organization's consent on record; None when never set."""
        ...

    # `builtins.set`: in this class, `set` is the method above.
    async def enabled_orgs(self, organization_ids: Iterable[str]) -> builtins.set[str]:
        """Those of `organization_ids` that consented (one query)."""
        ...


class VulnContextSource(Protocol):
    """What the KEV and EPSS feeds say about CVEs (`vuln_context`)."""

    async def lookup(self, cves: Iterable[str]) -> dict[str, VulnContext]: ...


class FeedCopies(Protocol):
    """The feed refresher's side of the feeds: each copy's status, a new copy, and the
    CVEs whose KEV listing or EPSS score changed with it and are not re-assessed yet."""

    async def status(self, feed: Feed) -> FeedStatus: ...

    async def refresh(self, feed: Feed, source: str) -> int: ...

    async def marked(self, limit: int) -> list[str]:
        """Up to `limit` changed CVEs not re-assessed yet, in a stable order."""
        ...

    async def unmark(self, cves: Iterable[str]) -> None:
        """The open exposures carrying `cves` were re-assessed."""
        ...


class SnapshotsByVuln(Protocol):
    """Which snapshots carry which CVEs (`exposures`), for re-rating after a feed change."""

    def carrying(self, cves: Collection[str]) -> AsyncIterator[tuple[str, str]]:
        """The (organization, IP) of every active snapshot with an open exposure that
        carries one of `cves`, each once."""
        ...


class SnapshotBatches(SnapshotsByVuln, Protocol):
    """Re-rating in batches (`exposures`): the snapshots carrying CVEs read whole, their
    updates stored and their outboxes cleared many at a time."""

    def carrying_snapshots(self, cves: Collection[str]) -> AsyncIterator[Snapshot]:
        """Every active snapshot with an open exposure that carries one of `cves`, each
        once, as `load` would return it."""
        ...

    async def swap_many(self, updates: Sequence[Update]) -> list[bool]:
        """`swap` each update (in one round trip where the store can); for each, False
        when another writer got there first (that one is not written)."""
        ...

    async def published_many(self, outboxes: Sequence[Outbox]) -> None:
        """`published` for each outbox: pull its events and state rows."""
        ...


class AcceptanceBatches(Protocol):
    """The acceptances of many (organization, IP) pairs at once, for re-rating."""

    async def acceptances_of(
        self, pairs: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], list[Acceptance]]:
        """For each pair, what `acceptances(organization_id, ip)` returns."""
        ...


class CommandLogStore(Protocol):
    """Which commands were applied already (`applied_commands`)."""

    async def applied(self, command_id: str) -> bool: ...

    async def mark(
        self,
        command_id: str,
        organization_id: str,
        command: str,
        outcome: CommandOutcome = ...,
        reason: str | None = None,
        detail: str | None = None,
    ) -> None: ...


class LeaderLease(Protocol):
    """A lease only one process holds at a time (`leases`)."""

    @property
    def ttl(self) -> timedelta: ...

    async def try_acquire(self, now: datetime | None = None) -> bool: ...

    async def release(self) -> None: ...


# -- Kafka ------------------------------------------------------------------------------


class EventSink(Protocol):
    async def publish(self, events: Sequence[ExposureEvent]) -> None: ...


class StateSink(Protocol):
    async def publish(self, rows: Sequence[StateRow]) -> None: ...


class ScanRequestSink(Protocol):
    async def publish(
        self, requests: Sequence[ScanRequest], contexts: Sequence[Context | None] = ()
    ) -> None: ...
