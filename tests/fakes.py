"""In-memory fakes of the ports (`recon_stream.ports`, `recon_stream.providers`), for
unit tests of the stages.

Each fake keeps what its MongoDB or Kafka adapter would keep, in plain dicts and
lists, and keeps the adapter's promises (compare-and-swap on a snapshot's version,
idempotent writes by id). Where a fake stands in for an adapter, one set of test
cases runs against both: `tests/store_cases.py`, run on the fakes by
`tests/unit/test_store_fakes.py` and on genuine MongoDB by
`tests/integration/test_store_adapters.py`.
"""

from __future__ import annotations

import builtins
import dataclasses
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from recon_stream.adapters.scan_queue import PRIORITY, QueueItem
from recon_stream.commands import CommandService
from recon_stream.dead_letters import Rejected
from recon_stream.dismissals import Dismissing
from recon_stream.domain.acceptance import Acceptance
from recon_stream.domain.commands import CommandOutcome
from recon_stream.domain.exposures import Assessor, ExposureEvent
from recon_stream.domain.pairs import Dismissal, DismissalEntry, PairStatus
from recon_stream.domain.policy_file import DEFAULT_POLICY
from recon_stream.domain.scan_requests import ScanReason, ScanRequest
from recon_stream.domain.scans import HostScan
from recon_stream.domain.scope import EMPTY_SCOPE, Scope
from recon_stream.domain.snapshot import OrgContext, Outbox, Snapshot, StateRow, Update
from recon_stream.domain.verification_consent import Consent, ConsentChange, decide_consent
from recon_stream.domain.vulns import Feed, FeedStatus, VulnContext
from recon_stream.metrics import Metrics
from recon_stream.outbox import OutboxPublisher
from recon_stream.providers import ShodanError
from recon_stream.retry import Backoff, Retrier
from recon_stream.snapshots import SnapshotUpdater

BUILT_IN = Assessor(DEFAULT_POLICY)
"""Exposures judged by the built-in policy, without feed context."""

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class FakeSnapshots:
    """`SnapshotStore` and `OutboxStore`: snapshots by (organization, IP) with outboxes."""

    def __init__(self) -> None:
        self.snapshots: dict[tuple[str, str], Snapshot] = {}
        self.pending: dict[tuple[str, str], list[ExposureEvent]] = {}
        self.pending_state: dict[tuple[str, str], list[StateRow]] = {}
        self.conflicts = 0
        """Swaps to refuse as if another writer got there first (then counted down)."""

    async def load(self, organization_id: str, ip: str) -> Snapshot:
        return self.snapshots.get((organization_id, ip), Snapshot(organization_id, ip))

    async def swap(self, update: Update) -> bool:
        key = (update.before.organization_id, update.before.ip)
        current = self.snapshots.get(key)
        if self.conflicts:
            self.conflicts -= 1
            if current is not None:
                self.snapshots[key] = dataclasses.replace(current, version=current.version + 1)
            return False
        if update.before.stored != (current is not None):
            return False
        if current is not None and current.version != update.before.version:
            return False
        self.snapshots[key] = update.after
        self.pending.setdefault(key, []).extend(update.events)
        written = {row.key for row in update.state}
        kept = [row for row in self.pending_state.get(key, []) if row.key not in written]
        self.pending_state[key] = kept + list(update.state)
        return True

    async def ips_of(self, organization_id: str) -> list[str]:
        return [
            ip
            for (org, ip), snapshot in sorted(self.snapshots.items())
            if org == organization_id and snapshot.status == "active"
        ]

    async def carrying(self, cves: Collection[str]) -> AsyncIterator[tuple[str, str]]:
        for (org, ip), snapshot in sorted(self.snapshots.items()):
            carried = {cve for entry in snapshot.services.values() for cve in entry.service.vulns}
            if snapshot.status == "active" and carried & set(cves):
                yield org, ip

    async def carrying_snapshots(self, cves: Collection[str]) -> AsyncIterator[Snapshot]:
        async for org, ip in self.carrying(cves):
            yield self.snapshots[(org, ip)]

    async def swap_many(self, updates: Sequence[Update]) -> list[bool]:
        return [await self.swap(update) for update in updates]

    async def published_many(self, outboxes: Sequence[Outbox]) -> None:
        for o in outboxes:
            await self.published(o.organization_id, o.ip, [e.id for e in o.events], o.state)

    async def published(
        self, organization_id: str, ip: str, ids: Iterable[str], state: Sequence[StateRow] = ()
    ) -> None:
        key, gone = (organization_id, ip), set(ids)
        self.pending[key] = [e for e in self.pending.get(key, []) if e.id not in gone]
        sent = {(row.key, row.version) for row in state}
        self.pending_state[key] = [
            row for row in self.pending_state.get(key, []) if (row.key, row.version) not in sent
        ]

    async def unpublished(self, limit: int, written_before: datetime | None = None) -> list[Outbox]:
        keys = sorted(k for k in self.snapshots if self.pending.get(k) or self.pending_state.get(k))
        return [
            Outbox(
                org, ip, list(self.pending.get((org, ip), [])), list(self.pending_state[(org, ip)])
            )
            for org, ip in keys[:limit]
        ]

    async def forget_organization(self, organization_id: str) -> int:
        gone = [key for key in self.snapshots if key[0] == organization_id]
        for key in gone:
            del self.snapshots[key]
            self.pending.pop(key, None)
            self.pending_state.pop(key, None)
        return len(gone)


class FakeAcceptances:
    """`AcceptanceStore`: acceptances by (organization, IP or None, transport, port)."""

    def __init__(self) -> None:
        self.kept: dict[tuple[str, str | None, str, int], Acceptance] = {}

    async def accept(self, acceptance: Acceptance, command_id: str) -> None:
        a = acceptance
        self.kept[(a.organization_id, a.ip, a.transport, a.port)] = acceptance

    async def unaccept(
        self, organization_id: str, ip: str | None, transport: str, port: int
    ) -> bool:
        return self.kept.pop((organization_id, ip, transport, port), None) is not None

    async def acceptances(self, organization_id: str, ip: str | None = None) -> list[Acceptance]:
        return [
            a
            for a in self.kept.values()
            if a.organization_id == organization_id and (ip is None or a.ip in (ip, None))
        ]

    async def acceptances_of(
        self, pairs: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], list[Acceptance]]:
        return {(org, ip): await self.acceptances(org, ip) for org, ip in pairs}

    async def expired_acceptances(self, now: datetime, limit: int = 100) -> list[Acceptance]:
        return [a for a in self.kept.values() if a.expires_at and a.expires_at <= now][:limit]

    async def forget_acceptance(self, acceptance: Acceptance) -> None:
        a = acceptance
        key = (a.organization_id, a.ip, a.transport, a.port)
        kept = self.kept.get(key)
        # As the adapter: the same acceptance is the same grant time and expiry.
        if kept is not None and (kept.accepted_at, kept.expires_at) == (
            a.accepted_at,
            a.expires_at,
        ):
            del self.kept[key]

    async def forget_organization(self, organization_id: str) -> int:
        gone = [key for key in self.kept if key[0] == organization_id]
        for key in gone:
            del self.kept[key]
        return len(gone)


class FakeHistory:
    """`HistoryLog`, `ConsentHistory` and `DismissalHistory`: entries by event id, consents
    by command id, dismissals' starts and ends by entry id."""

    def __init__(self) -> None:
        self.entries: dict[str, ExposureEvent] = {}
        self.consents: dict[str, Consent] = {}
        self.dismissals: dict[str, DismissalEntry] = {}

    async def record_dismissal(self, entry: DismissalEntry) -> None:
        self.dismissals[entry.entry_id] = entry

    async def forget_organization(self, organization_id: str) -> int:
        gone = [k for k, e in self.entries.items() if e.data.organization_id == organization_id]
        gone_c = [k for k, c in self.consents.items() if c.organization_id == organization_id]
        gone_d = [k for k, d in self.dismissals.items() if d.organization_id == organization_id]
        for key in gone:
            del self.entries[key]
        for key in gone_c:
            del self.consents[key]
        for key in gone_d:
            del self.dismissals[key]
        return len(gone) + len(gone_c) + len(gone_d)

    async def record(self, events: Sequence[ExposureEvent]) -> None:
        self.entries.update((event.id, event) for event in events)

    async def record_consent(self, consent: Consent) -> None:
        self.consents[consent.command_id] = consent


class FakeConsents:
    """`ConsentStore`: the consent on record and the newest command seen, per org."""

    def __init__(self) -> None:
        self.kept: dict[str, Consent] = {}
        self.newest: dict[str, tuple[datetime, str]] = {}

    async def set(self, consent: Consent) -> ConsentChange:
        org = consent.organization_id
        # As the adapter: MongoDB keeps milliseconds.
        at = consent.at.replace(microsecond=consent.at.microsecond // 1000 * 1000)
        consent = dataclasses.replace(consent, at=at)
        change = decide_consent(self.kept.get(org), self.newest.get(org), consent)
        if change in (ConsentChange.CHANGED, ConsentChange.UNCHANGED):
            self.newest[org] = consent.order
        if change is ConsentChange.CHANGED:
            self.kept[org] = consent
        return change

    async def get(self, organization_id: str) -> Consent | None:
        return self.kept.get(organization_id)

    async def enabled_orgs(self, organization_ids: Iterable[str]) -> builtins.set[str]:
        return {o for o in organization_ids if (c := self.kept.get(o)) is not None and c.enabled}

    async def forget_organization(self, organization_id: str) -> int:
        self.newest.pop(organization_id, None)
        return int(self.kept.pop(organization_id, None) is not None)


class FakeFeeds:
    """`VulnContextSource`: what the feeds say, by CVE."""

    def __init__(self, known: Mapping[str, VulnContext] | None = None) -> None:
        self.known = dict(known or {})
        self.asked: list[set[str]] = []

    async def lookup(self, cves: Iterable[str]) -> dict[str, VulnContext]:
        wanted = set(cves)
        self.asked.append(wanted)
        return {cve: self.known[cve] for cve in wanted if cve in self.known}


class FakeFeedCopies:
    """`FeedCopies` over a `FakeFeeds`: `served[source]` is what a source holds now
    ({CVE: context}, or an exception to raise); a refresh marks the CVEs whose KEV
    listing or EPSS score changed, as the adapter does."""

    def __init__(self, feeds: FakeFeeds) -> None:
        self.feeds = feeds
        self.served: dict[str, dict[str, VulnContext] | Exception] = {}
        self.statuses: dict[Feed, FeedStatus] = {}
        self.rerate: set[str] = set()
        self.unmarked: list[list[str]] = []

    async def status(self, feed: Feed) -> FeedStatus:
        return self.statuses.get(feed, FeedStatus(feed, None, 0, None, None))

    async def refresh(self, feed: Feed, source: str) -> int:
        served = self.served[source]
        if isinstance(served, Exception):
            raise served
        for cve, new in served.items():
            old = self.feeds.known.get(cve, VulnContext())
            if feed == "kev":
                changed = (old.kev is None) != (new.kev is None)
                kept = dataclasses.replace(old, kev=new.kev)
            else:
                score = (old.epss.epss if old.epss else None, new.epss.epss if new.epss else None)
                changed = score[0] != score[1]
                kept = dataclasses.replace(old, epss=new.epss)
            if changed:
                self.rerate.add(cve)
            self.feeds.known[cve] = kept
        now = datetime.now(UTC)
        self.statuses[feed] = FeedStatus(feed, now, len(served), now, None)
        return len(served)

    async def marked(self, limit: int) -> list[str]:
        return sorted(self.rerate)[:limit]

    async def unmark(self, cves: Iterable[str]) -> None:
        done = sorted(cves)
        self.unmarked.append(done)
        self.rerate.difference_update(done)


class FakeOrgIps:
    """`OrgDirectory` and `PairRetirement`: active pairs with their agents and last sighting."""

    def __init__(self) -> None:
        self.pairs: dict[tuple[str, str], dict[str, Any]] = {}

    def add(
        self,
        organization_id: str,
        ip: str,
        agents: Sequence[str] = ("agent-1",),
        last_seen: datetime = EPOCH,
    ) -> None:
        self.pairs[(organization_id, ip)] = {
            "agents": tuple(agents),
            "last_seen": last_seen,
            "status": "active",
        }

    async def orgs_behind(self, ip: str) -> list[OrgContext]:
        return [
            OrgContext(org, pair["agents"], ())
            for (org, at), pair in sorted(self.pairs.items())
            if at == ip and pair["status"] == "active"
        ]

    async def reported_ips(self, organization_id: str) -> set[str]:
        return {
            ip
            for (org, ip), pair in self.pairs.items()
            if org == organization_id and pair["status"] == "active"
        }

    async def users(self, ips: Sequence[str]) -> list[tuple[str, str]]:
        return sorted(
            (ip, org)
            for (org, ip), pair in self.pairs.items()
            if ip in ips and pair["status"] == "active"
        )

    async def unused(self, cutoff: datetime, limit: int) -> list[tuple[str, str]]:
        return [
            key
            for key, pair in sorted(self.pairs.items())
            if pair["status"] == "active" and pair["last_seen"] < cutoff
        ][:limit]

    async def retire(self, organization_id: str, ip: str, cutoff: datetime, now: datetime) -> bool:
        pair = self.pairs.get((organization_id, ip))
        if pair is None or pair["status"] != "active" or pair["last_seen"] >= cutoff:
            return False
        pair["status"] = "retired"
        return True

    async def status_of(self, organization_id: str, ip: str) -> PairStatus | None:
        pair = self.pairs.get((organization_id, ip))
        return None if pair is None else PairStatus(pair["status"])

    async def dismiss(self, dismissal: Dismissal) -> PairStatus | None:
        pair = self.pairs.get((dismissal.organization_id, dismissal.ip))
        if pair is None:
            return None
        before = PairStatus(pair["status"])
        pair.update(status="dismissed", reason=dismissal.reason, dismissal=dismissal)
        return before

    async def undismiss(
        self,
        organization_id: str,
        ip: str,
        status: PairStatus,
        reason: str,
        now: datetime,
        only: str | None = None,
    ) -> Dismissal | None:
        pair = self.pairs.get((organization_id, ip))
        if pair is None or pair["status"] != "dismissed":
            return None
        dismissal: Dismissal = pair["dismissal"]
        if only is not None and dismissal.command_id != only:
            return None
        pair.update(status=status.value, reason=reason, dismissal=None)
        if status is PairStatus.ACTIVE:
            pair["requested_at"] = now  # its scan request due at once, as the adapter's
        return dismissal

    async def expired_dismissals(self, now: datetime, limit: int) -> list[Dismissal]:
        return [
            pair["dismissal"]
            for _, pair in sorted(self.pairs.items())
            if pair["status"] == "dismissed" and pair["dismissal"].expired(now)
        ][:limit]

    async def forget_organization(self, organization_id: str) -> int:
        gone = [key for key in self.pairs if key[0] == organization_id]
        for key in gone:
            del self.pairs[key]
        return len(gone)


class FakeIpScans:
    """`LookupStore` and `RescanSchedule`."""

    def __init__(self, rescan_interval: float = 3600.0) -> None:
        self.scans: dict[str, HostScan] = {}
        self.next_scan: dict[str, datetime] = {}
        self._rescan = rescan_interval

    @property
    def rescan_interval(self) -> float:
        return self._rescan

    async def get(self, ip: str) -> HostScan | None:
        return self.scans.get(ip)

    async def put(self, scan: HostScan) -> None:
        self.scans[scan.ip] = scan
        self.next_scan[scan.ip] = scan.queried_at + timedelta(seconds=self._rescan)

    async def due(self, now: datetime, limit: int) -> list[str]:
        return sorted(ip for ip, at in self.next_scan.items() if at <= now)[:limit]

    async def postpone(self, ips: Sequence[str], until: datetime) -> None:
        for ip in ips:
            self.next_scan[ip] = until


class FakeQueue:
    """`ScanWork`: one item per IP, most urgent first; no clock (claims never expire)."""

    def __init__(self) -> None:
        self.items: dict[str, QueueItem] = {}
        self.claimed: set[str] = set()
        self.retried: list[tuple[str, float, str | None]] = []
        self.completed: list[str] = []

    async def enqueue(
        self, requests: Sequence[ScanRequest], traces: Sequence[Mapping[str, str]] = ()
    ) -> int:
        for request in requests:
            item = self.items.get(request.ip)
            reason = request.reason.value
            if item is None:
                self.items[request.ip] = QueueItem(
                    request.ip,
                    PRIORITY[request.reason],
                    1,
                    0,
                    (reason,),
                    (request.organization_id,),
                    EPOCH,
                    requested_at=request.requested_at,
                )
            else:
                self.items[request.ip] = dataclasses.replace(
                    item,
                    priority=min(item.priority, PRIORITY[request.reason]),
                    seq=item.seq + 1,
                    reasons=tuple(sorted({*item.reasons, reason})),
                    orgs=tuple(sorted({*item.orgs, request.organization_id})),
                )
        return len(requests)

    async def claim(self, lease: timedelta, now: datetime | None = None) -> QueueItem | None:
        free = [item for ip, item in self.items.items() if ip not in self.claimed]
        if not free:
            return None
        item = min(free, key=lambda i: (i.priority, i.requested_at or EPOCH))
        self.claimed.add(item.ip)
        return item

    async def complete(self, item: QueueItem) -> bool:
        self.claimed.discard(item.ip)
        self.completed.append(item.ip)
        if self.items.get(item.ip, item).seq == item.seq:
            self.items.pop(item.ip, None)
            return True
        return False

    async def retry_later(
        self,
        item: QueueItem,
        delay: float,
        now: datetime | None = None,
        *,
        error: str | None = None,
    ) -> None:
        self.retried.append((item.ip, delay, error))
        self.claimed.discard(item.ip)

    async def release(self, item: QueueItem) -> None:
        self.claimed.discard(item.ip)

    async def pending_manual(self, ips: Sequence[str]) -> set[str]:
        return {
            ip
            for ip in ips
            if ip in self.items and "manual" in self.items[ip].reasons and ip not in self.claimed
        }


class FakeCommandLog:
    """`CommandLogStore`."""

    def __init__(self) -> None:
        self.marked: dict[str, tuple[str, str]] = {}
        self.outcomes: dict[str, tuple[CommandOutcome, str | None]] = {}

    async def applied(self, command_id: str) -> bool:
        return command_id in self.marked

    async def mark(
        self,
        command_id: str,
        organization_id: str,
        command: str,
        outcome: CommandOutcome = CommandOutcome.APPLIED,
        reason: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.marked.setdefault(command_id, (organization_id, command))
        self.outcomes.setdefault(command_id, (outcome, reason))


class FakeLease:
    """`LeaderLease` held (or not) as the test says."""

    def __init__(self, leading: bool = True) -> None:
        self.leading = leading
        self.ttl = timedelta(seconds=0.2)

    async def try_acquire(self, now: datetime | None = None) -> bool:
        return self.leading

    async def release(self) -> None:
        return None


class Recorder:
    """Any of the Kafka sinks: keeps what was published, in order."""

    def __init__(self) -> None:
        self.published: list[Any] = []
        self.failures = 0
        """Publishes to fail with an outage first (counted down)."""

    async def publish(self, items: Sequence[Any], contexts: Sequence[Any] = ()) -> None:
        if self.failures:
            self.failures -= 1
            from aiokafka.errors import KafkaConnectionError

            raise KafkaConnectionError("broker down (fake)")
        self.published.extend(items)


class FakeDeadLetters:
    def __init__(self) -> None:
        self.rejected: list[Rejected] = []

    async def publish(self, rejected: Sequence[Rejected]) -> None:
        self.rejected.extend(rejected)


@dataclasses.dataclass
class FakeRecord:
    """A raw Kafka record."""

    value: bytes | None
    key: bytes | None = None
    topic: str = "topic"
    partition: int = 0
    offset: int = 0
    timestamp: int = 0
    headers: Sequence[tuple[str, bytes]] = ()


class FakeSlot:
    """A rate-budget slot that is always open."""

    def __init__(self) -> None:
        self.entered_at: float | None = None

    @property
    def wait(self) -> float:
        return 0.0

    def enter(self) -> bool:
        self.entered_at = 0.0
        return True

    def abandon(self) -> None:
        return None


class FakeBudget:
    """`RateBudget`: counts the slots handed out."""

    def __init__(self) -> None:
        self.reserved = 0

    async def reserve(self) -> FakeSlot:
        self.reserved += 1
        return FakeSlot()


class FakeProvider:
    """`ShodanProvider`: answers from `hosts`, or raises what `errors` holds for an IP."""

    name = "fake"

    def __init__(self) -> None:
        self.hosts: dict[str, HostScan] = {}
        self.errors: dict[str, ShodanError] = {}
        self.lookups: list[str] = []

    async def lookup(self, ip: str, gate: Any = None) -> HostScan:
        self.lookups.append(ip)
        if gate is not None:
            gate.enter()
        if ip in self.errors:
            raise self.errors[ip]
        found = self.hosts.get(ip)
        return found or HostScan(ip=ip, provider="api", queried_at=datetime.now(UTC))

    async def check_key(self, gate: Any = None) -> None:
        return None

    async def close(self) -> None:
        return None


@dataclasses.dataclass
class Parts:
    """The pieces a stage is built from, all fakes, wired as the composition root does."""

    snapshots: FakeSnapshots = dataclasses.field(default_factory=FakeSnapshots)
    acceptances: FakeAcceptances = dataclasses.field(default_factory=FakeAcceptances)
    history: FakeHistory = dataclasses.field(default_factory=FakeHistory)
    feeds: FakeFeeds = dataclasses.field(default_factory=FakeFeeds)
    org_ips: FakeOrgIps = dataclasses.field(default_factory=FakeOrgIps)
    ip_scans: FakeIpScans = dataclasses.field(default_factory=FakeIpScans)
    queue: FakeQueue = dataclasses.field(default_factory=FakeQueue)
    command_log: FakeCommandLog = dataclasses.field(default_factory=FakeCommandLog)
    consents: FakeConsents = dataclasses.field(default_factory=FakeConsents)
    events: Recorder = dataclasses.field(default_factory=Recorder)
    state: Recorder = dataclasses.field(default_factory=Recorder)
    ocsf: Recorder = dataclasses.field(default_factory=Recorder)
    requests: Recorder = dataclasses.field(default_factory=Recorder)
    dead_letters: FakeDeadLetters = dataclasses.field(default_factory=FakeDeadLetters)
    metrics: Metrics = dataclasses.field(default_factory=Metrics)
    outages: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.retrying = Retrier(
            Backoff(0.001, 0.01),
            self.metrics,
            lambda dependency, error: self.outages.append(dependency),
        )
        self.updater = SnapshotUpdater(self.snapshots, self.acceptances, self.feeds, DEFAULT_POLICY)
        self.outbox = OutboxPublisher(
            self.snapshots,
            self.history,
            self.updater,
            self.events,
            self.state,
            self.metrics,
            self.retrying,
            ocsf=self.ocsf,
        )

    def command_service(self, scope: Scope = EMPTY_SCOPE) -> CommandService:
        """The commands stage on these fakes, wired as `app.wire_commands` wires it."""
        return CommandService(
            self.acceptances,
            self.org_ips,
            self.queue,
            self.command_log,
            self.outbox,
            self.dead_letters,
            self.metrics,
            self.retrying,
            consents=self.consents,
            consent_history=self.history,
            dismissing=Dismissing(self.org_ips, self.history, scope, self.outbox),
            snapshots=self.snapshots,
            organization_data=(
                self.org_ips,
                self.snapshots,
                self.acceptances,
                self.history,
                self.consents,
            ),
        )


def request(org: str, ip: str, reason: ScanReason = ScanReason.NEW, at: datetime = EPOCH) -> Any:
    """A scan request."""
    return ScanRequest(organization_id=org, ip=ip, reason=reason, requested_at=at)
