"""Attribution on fakes: the scope file and the sharing count decide each pair's status,
and a pair leaving `active` closes its open exposures with the status's reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from recon_stream.attribution import Attribution
from recon_stream.domain.pairs import PairStatus
from recon_stream.domain.scan_requests import ScanReason
from recon_stream.domain.scans import HostScan, Service
from recon_stream.domain.scope import EMPTY_SCOPE, Scope, parse_scope
from recon_stream.domain.snapshot import OrgContext
from tests.fakes import FakeIpScans, FakeProvider, Parts, request
from tests.unit.test_stages import scanner

pytestmark = pytest.mark.unit

NOW = datetime(2026, 12, 1, tzinfo=UTC)
RDP = Service(port=3389, module="rdp")


class Pairs:
    """Pair statuses in memory, as `org_ips` keeps them."""

    def __init__(self, *pairs: tuple[str, str]) -> None:
        self.status = {pair: PairStatus.ACTIVE for pair in pairs}
        self.reasons: dict[tuple[str, str], str | None] = {}

    async def set_status(
        self,
        organization_id: str,
        ip: str,
        status: PairStatus,
        reason: str | None = None,
        now: datetime | None = None,
    ) -> PairStatus | None:
        before = self.status.get((organization_id, ip))
        if before is not None:
            self.status[(organization_id, ip)] = status
            self.reasons[(organization_id, ip)] = reason
        return before

    async def pairs_with_status(self, status: PairStatus) -> list[tuple[str, str]]:
        return sorted(pair for pair, s in self.status.items() if s is status)

    async def crowded_ips(self, min_orgs: int) -> dict[str, list[str]]:
        by_ip: dict[str, list[str]] = {}
        for (org, ip), s in self.status.items():
            if s in (PairStatus.ACTIVE, PairStatus.SHARED_EGRESS):
                by_ip.setdefault(ip, []).append(org)
        return {ip: sorted(orgs) for ip, orgs in by_ip.items() if len(orgs) >= min_orgs}

    async def reason_of(self, organization_id: str, ip: str) -> str | None:
        return self.reasons.get((organization_id, ip))

    async def sharing(self, ip: str) -> list[str]:
        shared = (PairStatus.ACTIVE, PairStatus.SHARED_EGRESS)
        return sorted(org for (org, at), s in self.status.items() if at == ip and s in shared)


async def opened(parts: Parts, org: str, ip: str, asn: str | None = None) -> HostScan:
    scan = HostScan(ip=ip, provider="api", queried_at=NOW, services=(RDP,), asn=asn)
    await parts.outbox.publish(await parts.updater.apply(OrgContext(org, ("a",), ()), scan))
    return scan


def closed_reasons(parts: Parts) -> list[tuple[str, str, str | None]]:
    return [
        (e.data.organization_id, e.data.ip, e.data.reason.value if e.data.reason else None)
        for e in parts.events.published
        if e.data.change.value == "closed"
    ]


def scope(text: str) -> Scope:
    return parse_scope(text, "scope.yaml")


async def test_a_shared_ip_reports_to_none_but_the_organization_that_owns_it() -> None:
    parts = Parts()
    orgs = ["a", "b", "c"]
    pairs = Pairs(*((org, "81.2.69.10") for org in orgs), ("a", "81.2.69.20"))
    for org in orgs:
        await opened(parts, org, "81.2.69.10")
    own = scope(
        "version: 1\nshared_egress_organizations: 3\n"
        "organizations:\n  c:\n    own: [{cidr: 81.2.69.0/24}]\n"
    )
    keeper = Attribution(pairs, own, parts.outbox, parts.metrics)
    assert await keeper.reconcile() == 2
    assert pairs.status[("a", "81.2.69.10")] is PairStatus.SHARED_EGRESS
    assert pairs.status[("c", "81.2.69.10")] is PairStatus.ACTIVE
    assert pairs.status[("a", "81.2.69.20")] is PairStatus.ACTIVE
    assert sorted(closed_reasons(parts)) == [
        ("a", "81.2.69.10", "shared_egress"),
        ("b", "81.2.69.10", "shared_egress"),
    ]
    assert parts.metrics.registry.get_sample_value("recon_shared_egress_ips") == 1
    # Idempotent: nothing more to do, nothing emitted again.
    assert await keeper.reconcile() == 0
    # One organization leaves: below the threshold, the others are told again.
    del pairs.status[("b", "81.2.69.10")]
    assert await keeper.reconcile() == 1
    assert pairs.status[("a", "81.2.69.10")] is PairStatus.ACTIVE


async def test_an_exclusion_closes_and_a_file_without_it_reactivates() -> None:
    parts, pairs = Parts(), Pairs(("a", "81.2.69.30"), ("b", "81.2.69.30"))
    await opened(parts, "a", "81.2.69.30")
    await opened(parts, "b", "81.2.69.30")
    guest = scope(
        "version: 1\norganizations:\n  a:\n"
        "    exclude: [{cidr: 81.2.69.0/27, reason: guest Wi-Fi}]\n"
    )
    assert await Attribution(pairs, guest, parts.outbox, parts.metrics).reconcile() == 1
    assert closed_reasons(parts) == [("a", "81.2.69.30", "excluded")]
    assert pairs.reasons[("a", "81.2.69.30")] == "guest Wi-Fi"
    # The exclusion removed from the file (and the workers restarted).
    assert await Attribution(pairs, EMPTY_SCOPE, parts.outbox, parts.metrics).reconcile() == 1
    assert pairs.status[("a", "81.2.69.30")] is PairStatus.ACTIVE


async def test_a_lookup_naming_an_excluded_asn_is_not_applied() -> None:
    parts, pairs = Parts(), Pairs(("a", "81.2.69.40"))
    sase = scope("version: 1\nexclude: [{asn: AS62044, reason: SASE provider}]\n")
    keeper = Attribution(pairs, sase, parts.outbox, parts.metrics)
    scan = await opened(parts, "a", "81.2.69.40", asn="AS62044")
    assert not await keeper.judge_lookup("a", scan)
    assert closed_reasons(parts) == [("a", "81.2.69.40", "excluded")]
    assert pairs.reasons[("a", "81.2.69.40")] == "AS62044: SASE provider"
    # The reconcile pass keeps an ASN exclusion while the file still names the ASN.
    assert await keeper.reconcile() == 0
    other = scan.model_copy(update={"asn": "AS64500"})
    assert await keeper.judge_lookup("a", other)
    # Without the ASN in the file, the pair is active again.
    assert await Attribution(pairs, EMPTY_SCOPE, parts.outbox, parts.metrics).reconcile() == 1


async def test_a_newcomer_on_a_shared_ip_is_never_told_about_it() -> None:
    parts = Parts()
    pairs = Pairs(*((org, "81.2.69.50") for org in ("a", "b", "c")))
    keeper = Attribution(
        pairs, scope("version: 1\nshared_egress_organizations: 3\n"), parts.outbox, parts.metrics
    )
    await keeper.reconcile()
    pairs.status[("d", "81.2.69.50")] = PairStatus.ACTIVE  # its first heartbeat
    scan = HostScan(ip="81.2.69.50", provider="api", queried_at=NOW, services=(RDP,))
    assert not await keeper.judge_lookup("d", scan)
    assert pairs.status[("d", "81.2.69.50")] is PairStatus.SHARED_EGRESS
    assert parts.events.published == []


async def test_a_shared_ip_is_looked_up_at_most_once_per_rescan_interval() -> None:
    """A stored lookup too old to serve a new organization (past the reuse age) still
    serves a request for a shared IP while it is younger than the rescan interval."""
    ip, old = "81.2.69.60", datetime.now(UTC) - timedelta(hours=2)
    parts = Parts(ip_scans=FakeIpScans(rescan_interval=3 * 3600.0))
    pairs = Pairs(*((org, ip) for org in ("a", "b", "c", "d")))
    shared = scope("version: 1\nshared_egress_organizations: 3\n")
    for threshold, expected in ((shared, []), (EMPTY_SCOPE, [ip])):
        provider = FakeProvider()
        await parts.ip_scans.put(HostScan(ip=ip, provider="api", queried_at=old, services=(RDP,)))
        service = scanner(parts, provider, reuse_age=3600.0)
        service.attribution = Attribution(pairs, threshold, parts.outbox, parts.metrics)
        await parts.queue.enqueue([request("d", ip, ScanReason.NEW)])
        item = await parts.queue.claim(timedelta(minutes=1))
        assert item is not None
        await service.process(item)
        assert provider.lookups == expected
