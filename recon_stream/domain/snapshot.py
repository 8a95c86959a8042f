"""The exposure decision: given an organization's snapshot of one IP and what just
happened (a lookup, a retirement, a change of acceptances or of the feeds), what is
open now, what changed, and which events, state rows and history entries follow.

Three things happen to a snapshot, each in two pure steps:

1. `plan_lookup`, `plan_retirement` or `plan_reassessment` says what is open after it
   and what changed in substance (opened, closed, changed service), or None when
   nothing is to be done (a lookup no newer than the snapshot, a retired or empty
   snapshot). The plan names the CVEs and whether acceptances matter, so the caller
   loads only the context it needs.
2. `decide` adds the acceptances in force and the assessment (policy, KEV, EPSS):
   acceptance changes, severity changes, the state row of every open exposure and
   one event per change. It returns the new snapshot with its outboxes, or None
   when a retirement or re-assessment changes nothing (a lookup always updates the
   snapshot: its time and agents are news even when its ports are not).

The store compare-and-swaps the new snapshot (and appends its outboxes) against the
version it loaded; on a conflict the caller loads again and decides again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

from recon_stream.domain.acceptance import Acceptance, AcceptanceInfo, acceptance_for
from recon_stream.domain.exposures import (
    Assessor,
    Change,
    ChangeKind,
    ChangeReason,
    ExposureEvent,
    ExposureKey,
    ExposureState,
    Sighting,
    acceptance_changes,
    build_events,
    build_state,
    diff,
    retire,
    severity_changes,
    snapshot_of,
    state_key,
)
from recon_stream.domain.risk import Severity
from recon_stream.domain.scans import HostScan, ProviderName, ScanRecord, Service
from recon_stream.domain.verification import Check, CheckState, VerificationInfo


@dataclass(frozen=True, slots=True)
class OrgContext:
    """What an organization's own agents told us about an IP (from `org_ips`)."""

    organization_id: str
    candidate_agents: tuple[str, ...]
    site_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class OpenExposure:
    """One open port as the snapshot keeps it."""

    service: Service
    first_seen: datetime
    last_seen: datetime
    severity: Severity | None = None
    """As last assessed; None in snapshots written before severities were stored."""
    stale: bool = False
    acceptance: AcceptanceInfo | None = None
    lapsed: AcceptanceInfo | None = None
    """An acceptance that lapsed on this exposure when its service changed module: it
    stays lapsed (a new `accept` is a new acceptance) until the port closes."""
    verification: VerificationInfo | None = None
    """The last TCP check of the port, if any."""
    failing_since: datetime | None = None
    """When the current run of checks in the last check's state (closed or no_answer)
    began: two such checks RECON_VERIFY_CONFIRM_SECONDS apart close the exposure."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one organization last knew about one IP."""

    organization_id: str
    ip: str
    stored: bool = False
    """False: nothing stored yet for this (organization, IP)."""
    version: int = 0
    status: str | None = None
    """`active`, or why the organization is no longer told about the IP: `retired`,
    `excluded`, `shared_egress`, `dismissed` (`domain.pairs.PairStatus`)."""
    last_queried: datetime | None = None
    provider: ProviderName = "api"
    sample: bool = False
    hostnames: tuple[str, ...] = ()
    candidate_agents: tuple[str, ...] = ()
    site_ids: tuple[str, ...] = ()
    retired_at: datetime | None = None
    services: Mapping[ExposureKey, OpenExposure] = field(default_factory=dict)
    scan: ScanRecord | None = None
    """The on-demand scan the last lookup waited for, if any."""
    check_closed: Mapping[ExposureKey, datetime] = field(default_factory=dict)
    """Ports a TCP check closed, with when: a provider record of the port no newer
    than that never reopens it (only a newer observation does)."""

    @property
    def retired(self) -> bool:
        """Closed for the organization (retired, excluded, shared egress, dismissed)."""
        return self.status is not None and self.status != "active"

    def open_services(self) -> dict[ExposureKey, Service]:
        return {key: entry.service for key, entry in self.services.items()}


@dataclass(frozen=True, slots=True)
class StateRow:
    """A state-topic record: key, value (None: tombstone) and the version that wrote it."""

    key: str
    value: ExposureState | None
    version: int


@dataclass(frozen=True, slots=True)
class Outbox:
    """What one update left to publish for one (organization, IP)."""

    organization_id: str
    ip: str
    events: list[ExposureEvent]
    state: list[StateRow]

    @classmethod
    def empty(cls, organization_id: str, ip: str) -> Outbox:
        return cls(organization_id, ip, [], [])


PlanKind = Literal["lookup", "retirement", "reassessment", "verification"]


@dataclass(frozen=True, slots=True)
class Plan:
    """What a lookup, a retirement or a re-assessment does to a snapshot, before the
    acceptances and the feeds are consulted."""

    kind: PlanKind
    before: Snapshot
    after: Mapping[ExposureKey, Service]
    """The exposures open afterwards."""
    basis: HostScan
    """The lookup the rows are built on (for non-lookups, the stored one's summary)."""
    changes: Sequence[Change]
    at: datetime
    """When: acceptance expiry is judged at this time."""
    org: OrgContext | None = None
    """The organization's agents and sites now (lookups only)."""
    checks: Mapping[ExposureKey, tuple[VerificationInfo, datetime | None]] = field(
        default_factory=dict
    )
    """Verification only: each checked exposure's new check and the start of its
    failing run (None when the check answered open)."""
    check_closed: Mapping[ExposureKey, datetime] = field(default_factory=dict)
    """Ports this plan closes on the strength of checks, with the closing check's time."""
    status: str = "retired"
    """Retirements: the snapshot's status afterwards (`domain.pairs.PairStatus`)."""

    @property
    def cves(self) -> frozenset[str]:
        """The CVEs whose KEV and EPSS context the assessment needs."""
        services = (*self.after.values(), *self.before.open_services().values())
        return frozenset(cve for service in services for cve in service.vulns)

    @property
    def needs_acceptances(self) -> bool:
        return bool(self.after)


@dataclass(frozen=True, slots=True)
class Update:
    """The decision: the snapshot to store (replacing `before` at its version) and what
    it leaves in the outboxes."""

    before: Snapshot
    after: Snapshot
    events: list[ExposureEvent]
    state: list[StateRow]

    @property
    def outbox(self) -> Outbox:
        return Outbox(self.after.organization_id, self.after.ip, self.events, self.state)


def plan_lookup(before: Snapshot, org: OrgContext, scan: HostScan, now: datetime) -> Plan | None:
    """A lookup of the IP, for `org`; None when the snapshot is as new or newer
    (idempotent: a redelivered or reused lookup changes nothing), or, when the snapshot
    was closed for the org, newer.

    A port a TCP check closed stays closed while the provider's observation of it is
    no newer than that check (Shodan's record lags for days); a newer one reopens it.
    """
    if before.last_queried is not None:
        last, this = _aware(before.last_queried), _aware(scan.queried_at)
        # A closed-for-the-org snapshot (retired, excluded, dismissed...) takes the very
        # lookup it last held: the org is told again (the scanner asks only for orgs
        # whose pair is active), and a stored result reused for it is no newer.
        if this < last or (this == last and not before.retired):
            return None
    at = max(_aware(now), _aware(scan.queried_at))
    held = {
        key
        for key, service in snapshot_of(scan).items()
        if key in before.check_closed
        and (
            service.shodan_timestamp is None
            or _aware(service.shodan_timestamp) <= _aware(before.check_closed[key])
        )
    }
    if held:
        kept = tuple(service for service in scan.services if service.key not in held)
        scan = scan.model_copy(update={"services": kept})
    changes = diff(before.open_services(), scan)
    still = {key: before.check_closed[key] for key in held}
    return Plan("lookup", before, snapshot_of(scan), scan, changes, at, org, check_closed=still)


def plan_verification(
    before: Snapshot, checks: Sequence[Check], confirm: timedelta, at: datetime
) -> Plan | None:
    """A round of TCP checks of the IP's open TCP ports (one per port at most).

    A check in another state than the last one is a `changed[verification]`. Two
    refusals at least `confirm` apart close the exposure (`verified_closed`); two
    unanswered checks that far apart close it (`verified_unreachable`) only when
    another port of the IP answered (open or refused) in this round: when every port
    stops answering at once, the host, its address or our own path is the likelier
    cause, and nothing closes. UDP exposures are never checked.
    """
    if not before.stored or before.retired or not before.services:
        return None
    open_now = before.open_services()
    round_ = {
        ("tcp", check.port): check
        for check in checks
        if check.ip == before.ip and ("tcp", check.port) in open_now
    }
    if not round_:
        return None
    answered = {key for key, check in round_.items() if check.state is not CheckState.NO_ANSWER}
    checked: dict[ExposureKey, tuple[VerificationInfo, datetime | None]] = {}
    closing: dict[ExposureKey, ChangeReason] = {}
    changes: list[Change] = []
    for key, check in sorted(round_.items()):
        entry = before.services[key]
        info = VerificationInfo.of(check)
        last = entry.verification
        since: datetime | None = None
        if check.state is not CheckState.OPEN:
            same_run = last is not None and last.state is check.state and entry.failing_since
            since = entry.failing_since if same_run else check.checked_at
        checked[key] = (info, since)
        confirmed = since is not None and _aware(check.checked_at) - _aware(since) >= confirm
        if confirmed and check.state is CheckState.CLOSED:
            closing[key] = ChangeReason.VERIFIED_CLOSED
        elif confirmed and answered - {key}:
            closing[key] = ChangeReason.VERIFIED_UNREACHABLE
        elif last is None or last.state is not check.state:
            changes.append(
                Change(
                    ChangeKind.CHANGED,
                    key,
                    entry.service,
                    previous=entry.service,
                    verification_changed=True,
                )
            )
    for key, reason in closing.items():
        changes.append(Change(ChangeKind.CLOSED, key, before.services[key].service, reason=reason))
    changes.sort(key=lambda change: (change.key[1], change.key[0]))
    after = {key: service for key, service in open_now.items() if key not in closing}
    return Plan(
        "verification",
        before,
        after,
        _stored_basis(before, at),
        changes,
        at,
        checks=checked,
        check_closed={key: round_[key].checked_at for key in closing},
    )


def plan_retirement(
    before: Snapshot,
    at: datetime,
    reason: ChangeReason = ChangeReason.IP_RETIRED,
    status: str = "retired",
) -> Plan | None:
    """The organization stopped using the IP, or is no longer to be told about it
    (`reason`: excluded, shared egress, dismissed, purged): every open exposure closes,
    and the snapshot takes `status`. None when it is closed already."""
    if not before.stored or before.retired:
        return None
    closing = retire(before.open_services(), reason)
    basis = _stored_basis(before, at)
    return Plan("retirement", before, {}, basis, closing, at, status=status)


def plan_reassessment(before: Snapshot, at: datetime) -> Plan | None:
    """The acceptances or the assessment may have changed: judge the open exposures again."""
    if not before.stored or before.retired or not before.services:
        return None
    return Plan("reassessment", before, before.open_services(), _stored_basis(before, at), [], at)


def decide(
    plan: Plan,
    acceptances: Sequence[Acceptance],
    assessor: Assessor,
    *,
    source: str = "recon-stream",
) -> Update | None:
    """The snapshot after `plan` under `acceptances` (those of the IP and the
    organization-wide ones) and `assessor`, with its events (CloudEvents `source`) and
    state rows; None when a retirement or re-assessment changes nothing."""
    before, after, basis, at = plan.before, plan.after, plan.basis, plan.at
    organization_id, ip = before.organization_id, before.ip
    lookup = plan.kind == "lookup"
    stored = before.services
    was = {key: entry.acceptance for key, entry in stored.items()}
    now_accepted, lapsed = _acceptances_now(stored, after, acceptances, ip, at)
    changes = acceptance_changes(plan.changes, after, was, now_accepted, at, lapsed.keys())
    org = plan.org
    agents = org.candidate_agents if org else before.candidate_agents
    sites = org.site_ids if org else before.site_ids
    verified = {
        key: plan.checks[key][0] if key in plan.checks else stored[key].verification
        for key in stored
    }
    sightings = {
        key: Sighting(
            service,
            stored[key].first_seen if key in stored else basis.queried_at,
            basis.queried_at if lookup else stored[key].last_seen,
            now_accepted.get(key),
            verified.get(key),
        )
        for key, service in after.items()
    }
    # The rows assess every open exposure once; their severity is the one stored.
    rows = build_state(
        organization_id,
        ip,
        sightings,
        basis,
        candidate_agents=agents,
        site_ids=sites,
        assessor=assessor,
    )
    changes = severity_changes(
        changes,
        after,
        {key: entry.severity for key, entry in stored.items()},
        {key: row.severity for key, row in rows.items()},
    )
    if not changes and not lookup and not plan.checks:
        return None
    closed = stored.keys() - after.keys()
    for key in closed:
        now_accepted[key] = was.get(key)  # a closed exposure shows its last state
    events = build_events(
        organization_id,
        ip,
        changes,
        basis,
        version=before.version,
        candidate_agents=agents,
        site_ids=sites,
        acceptance_by_key=now_accepted,
        first_seen_by_key={key: entry.first_seen for key, entry in stored.items()},
        last_seen_by_key={key: entry.last_seen for key, entry in stored.items()},
        verification_by_key=verified,
        occurred_at=None if lookup else at,
        source=source,
        assessor=assessor,
    )
    version = before.version + 1
    state = [
        StateRow(state_key(organization_id, ip, *key), row, version) for key, row in rows.items()
    ] + [StateRow(state_key(organization_id, ip, *key), None, version) for key in sorted(closed)]
    if not changes and not lookup:
        state = []  # a check that agrees with the last one is kept, not announced
    services = {
        key: OpenExposure(
            sighting.service,
            sighting.first_seen,
            sighting.last_seen,
            rows[key].severity,
            rows[key].stale,
            sighting.acceptance,
            lapsed.get(key),
            sighting.verification,
            plan.checks[key][1]
            if key in plan.checks
            else stored[key].failing_since
            if key in stored
            else None,
        )
        for key, sighting in sightings.items()
    }
    return Update(before, _after(plan, services, version), events, state)


def _acceptances_now(
    stored: Mapping[ExposureKey, OpenExposure],
    after: Mapping[ExposureKey, Service],
    acceptances: Sequence[Acceptance],
    ip: str,
    at: datetime,
) -> tuple[dict[ExposureKey, AcceptanceInfo | None], dict[ExposureKey, AcceptanceInfo]]:
    """The acceptance in force on each open exposure, and the acceptances that lapsed
    (now, or before and still on record) by exposure.

    An acceptance is of the service seen when it applied: when the port's module changes
    (https becomes rdp), the acceptance that covered it lapses and stays lapsed.
    """
    now: dict[ExposureKey, AcceptanceInfo | None] = {}
    lapsed: dict[ExposureKey, AcceptanceInfo] = {}
    for key, service in after.items():
        found = acceptance_for(list(acceptances), ip, key[0], key[1], at)
        entry = stored.get(key)
        if found is not None and entry is not None and _lapses(entry, found, service):
            lapsed[key], found = found, None
        now[key] = found
    return now, lapsed


def _lapses(entry: OpenExposure, found: AcceptanceInfo, service: Service) -> bool:
    if entry.lapsed == found:
        return True  # lapsed before: it stays lapsed
    before, now = entry.service.module, service.module
    return entry.acceptance == found and None not in (before, now) and before != now


def _after(plan: Plan, services: dict[ExposureKey, OpenExposure], version: int) -> Snapshot:
    before = replace(plan.before, stored=True, version=version, services=services)
    if plan.kind == "verification":
        return replace(before, check_closed={**before.check_closed, **plan.check_closed})
    if plan.kind == "retirement":
        return replace(before, status=plan.status, retired_at=plan.at, check_closed={})
    if plan.kind == "lookup" and plan.org is not None:
        scan = plan.basis
        return replace(
            before,
            status="active",
            last_queried=scan.queried_at,
            provider=scan.provider,
            sample=scan.sample,
            hostnames=tuple(scan.hostnames),
            candidate_agents=tuple(plan.org.candidate_agents),
            site_ids=tuple(plan.org.site_ids),
            scan=scan.scan,
            check_closed=plan.check_closed,
        )
    return before


def _stored_basis(snapshot: Snapshot, at: datetime) -> HostScan:
    return HostScan(
        ip=snapshot.ip,
        provider=snapshot.provider,
        queried_at=snapshot.last_queried or at,
        hostnames=snapshot.hostnames,
        sample=snapshot.sample,
        scan=snapshot.scan,
    )


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
