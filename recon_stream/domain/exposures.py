"""Exposure changes and the events that announce them.

`diff` compares what an organization last knew about an IP (its snapshot) with
a new lookup and yields `Change`s; `acceptance_changes` adds the exposures whose
acceptance started, ended or expired; `build_events` turns changes into
CloudEvents 1.0 structured-mode messages (schemas/exposure-event.v1.json is
generated from `ExposureEvent`), published with Kafka key = `organization_id`.
`build_state` gives the current row of each exposure for the compacted state
topic (key `organization_id/ip/transport/port`, `ExposureState`).
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import json
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from recon_stream.domain.acceptance import AcceptanceInfo
from recon_stream.domain.identifiers import Identifier, IpText
from recon_stream.domain.risk import RiskPolicy, Severity, assess
from recon_stream.domain.scans import HostScan, ProviderName, ScanRecord, Service, Transport
from recon_stream.domain.verification import VerificationInfo
from recon_stream.domain.vulns import VulnContext

CONTENT_TYPE = "application/cloudevents+json"
EVENT_TYPE_PREFIX = "com.recon-stream.exposure"
SCHEMA_ID = "https://recon-stream.dev/schemas/exposure-event.v1.json"

ExposureKey = tuple[str, int]
"""(transport, port)."""
OpenPorts = dict[ExposureKey, Service]
"""What an organization last knew to be open on one IP."""


class ChangeKind(enum.StrEnum):
    OPENED = "opened"
    CLOSED = "closed"
    CHANGED = "changed"


class ChangeReason(enum.StrEnum):
    PORT_CLOSED = "port_closed"
    """The lookup no longer lists the port."""
    IP_RETIRED = "ip_retired"
    """The organization stopped reporting from the IP."""
    ACCEPTED = "accepted"
    """The organization accepted the exposure (or changed the acceptance's terms)."""
    UNACCEPTED = "unaccepted"
    """The organization took its acceptance back."""
    ACCEPTANCE_EXPIRED = "acceptance_expired"
    """The acceptance reached its `expires_at`."""
    ACCEPTANCE_LAPSED = "acceptance_lapsed"
    """The service on the port changed module (https became rdp): what was accepted is gone."""
    VERIFIED_CLOSED = "verified_closed"
    """Two TCP checks, RECON_VERIFY_CONFIRM_SECONDS apart, were refused (a reset)."""
    VERIFIED_UNREACHABLE = "verified_unreachable"
    """Two TCP checks went unanswered while another port of the IP answered."""
    EXCLUDED = "excluded"
    """The scope file excludes the IP (its network or its ASN) for the organization."""
    SHARED_EGRESS = "shared_egress"
    """So many organizations report from the IP that it is someone else's."""
    DISMISSED = "dismissed"
    """The organization said the IP is not its own (`dismiss`)."""
    ORGANIZATION_PURGED = "organization_purged"
    """The organization left: its data is being deleted (`purge`)."""


@dataclass(frozen=True, slots=True)
class Change:
    """One difference between an organization's snapshot and a new lookup."""

    kind: ChangeKind
    key: ExposureKey
    service: Service
    """The service now, or the last known one when closed."""
    previous: Service | None = None
    """The service before, for `changed`."""
    reason: ChangeReason | None = None
    """Why it closed, or why its acceptance changed; None otherwise."""
    acceptance_changed: bool = False
    """For `changed`: the acceptance started, ended or expired."""
    severity_changed: bool = False
    """For `changed`: the severity differs from the one stored (a new policy, a new
    KEV listing or EPSS score)."""
    previous_severity: Severity | None = None
    """For a severity change: the severity stored before."""
    previous_acceptance: AcceptanceInfo | None = None
    """For an acceptance change: the acceptance in force before (None if there was none)."""
    verification_changed: bool = False
    """For `changed`: a TCP check found the port in another state than the last one."""


@dataclass(frozen=True)
class Assessor:
    """How exposures are judged: the risk policy, what the feeds say about CVEs, and
    how old Shodan's observation of a port may be before it is stale."""

    policy: RiskPolicy
    context: Mapping[str, VulnContext] = field(default_factory=dict)
    stale_after: timedelta = timedelta(days=30)


# What makes two sightings of one port the same exposure. Shodan's timestamp
# and the CVSS score (which follows from the CVE list) are deliberately absent.
# Named as in the event's `service` shape (`name` is the Shodan module).
IdentityField = Literal["name", "product", "version", "cpe", "vulns"]
_IDENTITY_FIELDS: tuple[IdentityField, ...] = ("name", "product", "version", "cpe", "vulns")
ChangedField = Literal[
    "name", "product", "version", "cpe", "vulns", "accepted", "severity", "verification"
]


def _identity(service: Service) -> tuple[object, ...]:
    return (
        service.module,
        service.product,
        service.version,
        frozenset(service.cpe),
        frozenset(service.vulns),
    )


def same_exposure(a: Service, b: Service) -> bool:
    """True when `a` and `b` do not differ in module, product, version, CPE or vulns."""
    return _identity(a) == _identity(b)


def changed_fields(previous: Service, current: Service) -> tuple[IdentityField, ...]:
    """Which of name (the Shodan module), product, version, cpe and vulns differ."""
    return tuple(
        name
        for name, old, new in zip(
            _IDENTITY_FIELDS, _identity(previous), _identity(current), strict=True
        )
        if old != new
    )


def _order(key: ExposureKey) -> tuple[int, str]:
    transport, port = key
    return port, transport


def _preference(service: Service) -> tuple[datetime, str]:
    seen = service.shodan_timestamp
    at = datetime.min.replace(tzinfo=UTC) if seen is None else _utc(seen)
    return at, service.model_dump_json()


def snapshot_of(scan: HostScan) -> OpenPorts:
    """The scan's services by (transport, port).

    Should a scan hold two banners for one port, the one Shodan saw last wins,
    then a content order, so the pick never depends on the order of `services`.
    """
    snapshot: OpenPorts = {}
    for service in scan.services:
        kept = snapshot.get(service.key)
        if kept is None or _preference(service) > _preference(kept):
            snapshot[service.key] = service
    return snapshot


def diff(previous: Mapping[ExposureKey, Service], current: HostScan) -> list[Change]:
    """The changes from `previous` to `current`, ordered by port then transport."""
    now = snapshot_of(current)
    changes: list[Change] = []
    for key in sorted(previous.keys() | now.keys(), key=_order):
        old, new = previous.get(key), now.get(key)
        if old is None and new is not None:
            changes.append(Change(ChangeKind.OPENED, key, new))
        elif new is None and old is not None:
            changes.append(Change(ChangeKind.CLOSED, key, old, reason=ChangeReason.PORT_CLOSED))
        elif old is not None and new is not None and not same_exposure(old, new):
            changes.append(Change(ChangeKind.CHANGED, key, new, previous=old))
    return changes


def retire(
    previous: Mapping[ExposureKey, Service], reason: ChangeReason = ChangeReason.IP_RETIRED
) -> list[Change]:
    """Close every exposure of an IP the organization no longer uses (or is no longer
    told about: `reason`)."""
    return [
        Change(ChangeKind.CLOSED, key, previous[key], reason=reason)
        for key in sorted(previous, key=_order)
    ]


def acceptance_changes(
    changes: Sequence[Change],
    after: Mapping[ExposureKey, Service],
    was: Mapping[ExposureKey, AcceptanceInfo | None],
    now: Mapping[ExposureKey, AcceptanceInfo | None],
    at: datetime,
    lapsed: Collection[ExposureKey] = (),
) -> list[Change]:
    """`changes` plus the exposures, open before and after, whose acceptance changed.

    An exposure that also changed in substance gets one `changed` naming both; the
    reason is the acceptance's: `accepted`, `unaccepted`, `acceptance_expired`, or
    `acceptance_lapsed` for the keys in `lapsed` (the service changed module).
    """
    by_key = {change.key: change for change in changes}
    for key in sorted(after, key=_order):
        before, current = was.get(key), now.get(key)
        change = by_key.get(key)
        if before == current or (change is not None and change.kind is not ChangeKind.CHANGED):
            continue
        if current is not None:
            reason = ChangeReason.ACCEPTED
        elif before is not None and before.expires_at is not None and before.expires_at <= at:
            reason = ChangeReason.ACCEPTANCE_EXPIRED
        elif key in lapsed:
            reason = ChangeReason.ACCEPTANCE_LAPSED
        else:
            reason = ChangeReason.UNACCEPTED
        previous = change.previous if change is not None else after[key]
        by_key[key] = Change(
            ChangeKind.CHANGED,
            key,
            after[key],
            previous,
            reason,
            acceptance_changed=True,
            previous_acceptance=before,
        )
    return sorted(by_key.values(), key=lambda c: _order(c.key))


def severity_changes(
    changes: Sequence[Change],
    after: Mapping[ExposureKey, Service],
    was: Mapping[ExposureKey, Severity | None],
    now: Mapping[ExposureKey, Severity],
) -> list[Change]:
    """`changes` plus the exposures, open before and after, whose severity changed.

    A severity never stored (a snapshot older than stored severities) is no change.
    """
    by_key = {change.key: change for change in changes}
    for key in sorted(after, key=_order):
        before, change = was.get(key), by_key.get(key)
        if before is None or before == now[key]:
            continue
        if change is None:
            by_key[key] = Change(ChangeKind.CHANGED, key, after[key], after[key])
        elif change.kind is not ChangeKind.CHANGED:
            continue
        by_key[key] = replace(by_key[key], severity_changed=True, previous_severity=before)
    return sorted(by_key.values(), key=lambda c: _order(c.key))


def apply_changes(previous: Mapping[ExposureKey, Service], changes: Iterable[Change]) -> OpenPorts:
    """The snapshot after `changes` (closed keys removed, the rest replaced)."""
    snapshot = dict(previous)
    for change in changes:
        if change.kind is ChangeKind.CLOSED:
            snapshot.pop(change.key, None)
        else:
            snapshot[change.key] = change.service
    return snapshot


def _canonical_ip(ip: str) -> str:
    try:
        return ipaddress.ip_address(ip).compressed
    except ValueError:
        return ip


_EVENT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, SCHEMA_ID)


def event_id(
    organization_id: str,
    ip: str,
    change_kind: str,
    key: ExposureKey,
    fingerprint: str,
) -> str:
    """A UUID (v5) that is the same whenever the same change is announced again.

    `fingerprint` pins the change down in time, e.g. the version of the
    organization's snapshot it was computed against.
    """
    transport, port = key
    # JSON, not a joined string, so no field's text can run into its neighbour's.
    canonical = json.dumps(
        [organization_id, _canonical_ip(ip), str(change_kind), transport, port, fingerprint]
    )
    return str(uuid.uuid5(_EVENT_NAMESPACE, canonical))


class ServiceInfo(BaseModel):
    """What answers on the port."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str | None = Field(description="Shodan's crawler module, e.g. 'rdp', 'https'.")
    product: str | None
    version: str | None
    cpe: tuple[str, ...] = Field(description="CPE 2.3 strings, sorted.")

    @classmethod
    def of(cls, service: Service) -> ServiceInfo:
        """The public shape of a normalized `Service`."""
        return cls(
            name=service.module,
            product=service.product,
            version=service.version,
            cpe=tuple(sorted(set(service.cpe))),
        )


Port = Annotated[int, Field(ge=0, le=65535)]


class VulnerabilityInfo(BaseModel):
    """One CVE of a service, with what Shodan and the feeds say about it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    cvss: float | None = Field(description="Shodan's CVSS score for it, if any.")
    epss: float | None = Field(description="FIRST EPSS probability (0-1), if known.")
    kev: bool = Field(description="Listed in CISA's Known Exploited Vulnerabilities catalog.")


class ExposureState(BaseModel):
    """One exposure as it stands: the value of the state topic (`recon.exposure-state.v1`).

    The same fields as an event's `data`, without `change`, `previous`,
    `previous_vulns`, `previous_severity`, `previous_acceptance` and `changed_fields`.
    Key `organization_id/ip/transport/port` (also `exposure_id`); a tombstone (null
    value) when the exposure closes.
    """

    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        title="ExposureState",
        json_schema_extra={"$id": "https://recon-stream.dev/schemas/exposure-state.v1.json"},
    )

    exposure_id: str = Field(
        description=(
            "organization_id/ip/transport/port: the state topic's key and OCSF's "
            "finding_info.uid, the same for the exposure's whole life."
        )
    )
    organization_id: Identifier
    ip: IpText
    port: Port
    transport: Transport
    reason: ChangeReason | None = Field(
        description=(
            "Why it closed (port_closed, ip_retired, verified_closed, verified_unreachable, "
            "excluded, shared_egress, dismissed, organization_purged) or why its acceptance "
            "changed "
            "(accepted, unaccepted, acceptance_expired, acceptance_lapsed); null otherwise "
            "and in state rows."
        )
    )
    service: ServiceInfo = Field(description="The service now; the last one seen when closed.")
    vulns: tuple[str, ...]
    max_cvss: float | None = Field(description="Highest CVSS score among `vulns`.")
    vulnerabilities: tuple[VulnerabilityInfo, ...] = Field(
        description="The CVEs in `vulns` with their CVSS, EPSS and KEV status."
    )
    severity: Severity
    risk_reasons: tuple[str, ...]
    stale: bool = Field(
        description="Shodan's observation of the port is older than RECON_STALE_OBSERVATION_DAYS."
    )
    observation_age_days: float | None = Field(
        description="Age of Shodan's observation of the port when we last looked (days)."
    )
    first_seen: AwareDatetime = Field(description="When this org first saw the port open.")
    last_seen: AwareDatetime = Field(
        description="When the port was last seen open (for closed: before it closed)."
    )
    shodan_last_scanned: AwareDatetime | None = Field(
        description="Shodan's own scan time for this port."
    )
    last_queried: AwareDatetime = Field(description="When recon-stream last looked the IP up.")
    hostnames: tuple[str, ...]
    candidate_agents: tuple[Identifier, ...] = Field(
        description="Agents of the organization that reported from this IP."
    )
    site_ids: tuple[Identifier, ...]
    accepted: bool = Field(description="The organization accepted this exposure as intended.")
    acceptance: AcceptanceInfo | None = Field(
        description="The acceptance in force (reason, who, when, until); null when not accepted."
    )
    sample: bool = Field(description="Built from bundled sample data, not real Shodan results.")
    provider: ProviderName
    scan: ScanRecord | None = Field(
        description=(
            "The on-demand Shodan scan the last lookup waited for (a rescan's): its id, "
            "when it was submitted and its status then; null when none was made."
        )
    )
    verification: VerificationInfo | None = Field(
        description=(
            "The last TCP check of the port from recon-stream's own network (state open, "
            "closed or no_answer; when; method tcp_connect); null when never checked "
            "(verification off for the organization, or UDP)."
        )
    )

    @model_validator(mode="before")
    @classmethod
    def _keyed_in_older_outboxes(cls, value: object) -> object:
        # Rows and events written to an outbox before these fields existed still relay.
        if isinstance(value, dict):
            value.setdefault("scan", None)
            value.setdefault("verification", None)
        if isinstance(value, dict) and "exposure_id" not in value:
            with contextlib.suppress(KeyError):
                value["exposure_id"] = state_key(
                    value["organization_id"], value["ip"], value["transport"], value["port"]
                )
        return value


class ExposureData(ExposureState):
    """The `data` of an exposure event: the exposure, and what changed."""

    model_config = ConfigDict(
        frozen=True, extra="ignore", title="ExposureData", json_schema_extra=None
    )

    change: ChangeKind
    previous: ServiceInfo | None = Field(description="The service before, for `changed`.")
    changed_fields: tuple[ChangedField, ...] = Field(
        description=(
            "For `changed`: which of name, product, version, cpe, vulns, accepted, severity, "
            "verification differ."
        )
    )
    previous_vulns: tuple[str, ...] | None = Field(description="For `changed`.")
    previous_severity: Severity | None = Field(
        description="The severity before, when `severity` is in `changed_fields`; else null."
    )
    previous_acceptance: AcceptanceInfo | None = Field(
        description=(
            "The acceptance in force before, when `accepted` is in `changed_fields` "
            "(who accepted and why, for an acceptance taken back, expired or lapsed)."
        )
    )

    @model_validator(mode="before")
    @classmethod
    def _from_older_outboxes(cls, value: object) -> object:
        # Events written to an outbox before these fields existed still relay.
        if isinstance(value, dict) and "change" in value:
            value.setdefault("previous_severity", None)
            value.setdefault("previous_acceptance", None)
        return value


def state_key(organization_id: str, ip: str, transport: str, port: int) -> str:
    """The state topic's key of one exposure."""
    return f"{organization_id}/{ip}/{transport}/{port}"


@dataclass(frozen=True, slots=True)
class Sighting:
    """What the organization's snapshot holds about one open port."""

    service: Service
    first_seen: datetime
    last_seen: datetime
    acceptance: AcceptanceInfo | None = None
    verification: VerificationInfo | None = None


def build_state(
    organization_id: str,
    ip: str,
    sightings: Mapping[ExposureKey, Sighting],
    scan: HostScan,
    *,
    candidate_agents: Iterable[str],
    site_ids: Iterable[str],
    assessor: Assessor,
) -> dict[ExposureKey, ExposureState]:
    """The state row of every open exposure of one (organization, IP)."""
    agents = tuple(sorted(set(candidate_agents)))
    sites = tuple(sorted(set(site_ids)))
    judge = assessor
    return {
        key: ExposureState(
            **_row(organization_id, ip, scan, sighting, agents, sites, judge), reason=None
        )
        for key, sighting in sorted(sightings.items(), key=lambda item: _order(item[0]))
    }


def _row(
    organization_id: str,
    ip: str,
    scan: HostScan,
    sighting: Sighting,
    agents: tuple[str, ...],
    sites: tuple[str, ...],
    judge: Assessor,
) -> dict[str, object]:
    service = sighting.service
    severity, reasons = assess(service, judge.policy, organization_id, judge.context)
    last_seen = _utc(sighting.last_seen)
    observed = _utc(service.shodan_timestamp) if service.shodan_timestamp else None
    age = (_utc(scan.queried_at) - observed) if observed is not None else None
    scores = dict(service.cvss)
    vulnerabilities = tuple(
        VulnerabilityInfo(
            id=cve,
            cvss=scores.get(cve),
            epss=known.epss.epss if (known := judge.context.get(cve)) and known.epss else None,
            kev=bool(known and known.kev),
        )
        for cve in sorted(set(service.vulns))
    )
    return {
        "exposure_id": state_key(organization_id, ip, service.transport, service.port),
        "organization_id": organization_id,
        "ip": ip,
        "port": service.port,
        "transport": service.transport,
        "service": ServiceInfo.of(service),
        "vulns": tuple(sorted(set(service.vulns))),
        "max_cvss": service.max_cvss,
        "vulnerabilities": vulnerabilities,
        "severity": severity,
        "risk_reasons": reasons,
        "stale": age is not None and age > judge.stale_after,
        "observation_age_days": round(age.total_seconds() / 86400, 2) if age is not None else None,
        "first_seen": min(_utc(sighting.first_seen), last_seen),
        "last_seen": last_seen,
        "shodan_last_scanned": _utc(service.shodan_timestamp) if service.shodan_timestamp else None,
        "last_queried": _utc(scan.queried_at),
        "hostnames": scan.hostnames,
        "candidate_agents": agents,
        "site_ids": sites,
        "accepted": sighting.acceptance is not None,
        "acceptance": sighting.acceptance,
        "sample": scan.sample,
        "provider": scan.provider,
        "scan": scan.scan,
        "verification": sighting.verification,
    }


EventType = Literal[
    "com.recon-stream.exposure.opened",
    "com.recon-stream.exposure.closed",
    "com.recon-stream.exposure.changed",
]


class ExposureEvent(BaseModel):
    """A change in an organization's internet-facing exposure, as a CloudEvents 1.0
    structured-mode JSON message (content type `application/cloudevents+json`).

    Published on `recon.exposures.v1` with Kafka key = `data.organization_id`. The
    same change always carries the same `id`, so consumers can drop redeliveries.
    """

    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        title="ExposureEvent",
        json_schema_extra={"$id": SCHEMA_ID},
    )

    # No defaults: a default would make these optional in the published schema.
    specversion: Literal["1.0"]
    id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    source: Annotated[
        str, StringConstraints(min_length=1), Field(json_schema_extra={"format": "uri-reference"})
    ]
    type: EventType
    subject: Annotated[str, StringConstraints(min_length=1)] = Field(
        description="ip/transport/port"
    )
    time: AwareDatetime
    datacontenttype: Literal["application/json"]
    data: ExposureData

    def kafka_key(self) -> bytes:
        return self.data.organization_id.encode()


_EVENT_TYPES: dict[ChangeKind, EventType] = {
    ChangeKind.OPENED: "com.recon-stream.exposure.opened",
    ChangeKind.CLOSED: "com.recon-stream.exposure.closed",
    ChangeKind.CHANGED: "com.recon-stream.exposure.changed",
}


def _utc(moment: datetime) -> datetime:
    # Shodan's timestamps carry no zone but are UTC; never let a naive one through.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def build_events(
    organization_id: str,
    ip: str,
    changes: Sequence[Change],
    scan: HostScan,
    *,
    version: int,
    candidate_agents: Iterable[str],
    site_ids: Iterable[str],
    acceptance_by_key: Mapping[ExposureKey, AcceptanceInfo | None],
    first_seen_by_key: Mapping[ExposureKey, datetime],
    last_seen_by_key: Mapping[ExposureKey, datetime] | None = None,
    verification_by_key: Mapping[ExposureKey, VerificationInfo | None] | None = None,
    occurred_at: datetime | None = None,
    source: str = "recon-stream",
    assessor: Assessor,
) -> list[ExposureEvent]:
    """One event per change, in the order of `changes`.

    `version` is the organization's snapshot version the changes were computed
    against; it makes each event id deterministic. `acceptance_by_key` holds the
    acceptance in force on each exposure (for a closed one: when it closed).
    `first_seen_by_key` defaults to the lookup time (a port opening now).
    `last_seen_by_key` holds when each port was last seen open; closed events
    report it (falling back to Shodan's own timestamp for the port, then the
    lookup time), acceptance-only changes keep it, the others report the lookup
    time. `verification_by_key` holds each exposure's last TCP check, if any.
    `occurred_at` (the event `time`) defaults to the lookup time; pass the
    retirement or decision time for changes that are not a lookup's.
    """
    queried_at = _utc(scan.queried_at)
    time = _utc(occurred_at) if occurred_at is not None else queried_at
    last_seen_by_key = last_seen_by_key or {}
    verification_by_key = verification_by_key or {}
    judge = assessor
    agents = tuple(sorted(set(candidate_agents)))
    sites = tuple(sorted(set(site_ids)))
    events: list[ExposureEvent] = []
    for change in changes:
        service = change.service
        transport, port = change.key
        shodan_seen = _utc(service.shodan_timestamp) if service.shodan_timestamp else None
        if change.kind is ChangeKind.CLOSED:
            last_seen = _utc(last_seen_by_key.get(change.key) or shodan_seen or queried_at)
        elif (
            change.acceptance_changed or change.severity_changed or change.verification_changed
        ) and change.previous == service:
            last_seen = _utc(last_seen_by_key.get(change.key, queried_at))
        else:
            last_seen = queried_at
        sighting = Sighting(
            service,
            first_seen_by_key.get(change.key, queried_at),
            last_seen,
            acceptance_by_key.get(change.key),
            verification_by_key.get(change.key),
        )
        previous = change.previous
        fields: tuple[ChangedField, ...] = ()
        if previous is not None:
            fields = changed_fields(previous, service)
        if change.acceptance_changed:
            fields = (*fields, "accepted")
        if change.severity_changed:
            fields = (*fields, "severity")
        if change.verification_changed:
            fields = (*fields, "verification")
        data = ExposureData(
            **_row(organization_id, ip, scan, sighting, agents, sites, judge),
            change=change.kind,
            reason=change.reason,
            previous=ServiceInfo.of(previous) if previous is not None else None,
            changed_fields=fields,
            previous_vulns=tuple(sorted(set(previous.vulns))) if previous is not None else None,
            previous_severity=change.previous_severity if change.severity_changed else None,
            previous_acceptance=change.previous_acceptance if change.acceptance_changed else None,
        )
        events.append(
            ExposureEvent(
                specversion="1.0",
                id=event_id(organization_id, ip, change.kind, change.key, str(version)),
                source=source,
                type=_EVENT_TYPES[change.kind],
                subject=f"{ip}/{transport}/{port}",
                time=time,
                datacontenttype="application/json",
                data=data,
            )
        )
    return events
