"""Re-rating when the feeds change (in batches, against the per-snapshot path), the scan
queue's order and the freshness figure, on the fakes of `tests/fakes.py` (the same on real
servers: tests/integration/test_risk_context.py and test_freshness.py)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from recon_stream.domain.acceptance import Acceptance
from recon_stream.domain.freshness import observation_ages
from recon_stream.domain.scan_requests import ScanReason
from recon_stream.domain.scans import HostScan, Service
from recon_stream.domain.snapshot import OrgContext
from recon_stream.domain.vulns import EpssEntry, KevEntry, VulnContext
from recon_stream.feeds import FeedRefresher
from recon_stream.rerating import BatchReassessor, acceptance_batches
from tests.fakes import FakeFeedCopies, FakeQueue, Parts, request

pytestmark = pytest.mark.unit

IP, OTHER, THIRD = "203.0.113.9", "198.51.100.20", "192.0.2.77"
CVE, LIKELY = "CVE-2023-4966", "CVE-2024-6387"
CITRIX = Service(port=443, module="https", product="Citrix Gateway", vulns=(CVE,))
SSH = Service(port=22, module="ssh", product="OpenSSH", vulns=(LIKELY,))
RDP = Service(port=3389, module="rdp")
KEV = VulnContext(kev=KevEntry(CVE, date(2023, 10, 18), True))


def now() -> datetime:
    return datetime.now(UTC)


def host(ip: str, *services: Service) -> HostScan:
    return HostScan(ip=ip, provider="api", queried_at=now(), services=services)


def refresher(parts: Parts, copies: FakeFeedCopies, parallel: int = 4) -> FeedRefresher:
    return FeedRefresher(
        copies,
        {"kev": "kev.json", "epss": "epss.csv"},
        parts.metrics,
        every=3600.0,
        retry=60.0,
        snapshots=parts.snapshots,
        outbox=parts.outbox,
        parallel=parallel,
    )


async def opened(parts: Parts, org: str, ip: str, *services: Service) -> None:
    parts.org_ips.add(org, ip)
    outbox = await parts.updater.apply(OrgContext(org, ("a",), ()), host(ip, *services))
    await parts.outbox.publish(outbox)


def severity_changes(parts: Parts) -> list[tuple[str, str, str, str | None]]:
    return [
        (e.data.organization_id, e.data.ip, e.data.severity.value, e.data.previous_severity)
        for e in parts.events.published
        if e.data.change.value == "changed" and "severity" in e.data.changed_fields
    ]


async def test_a_cve_added_to_kev_re_rates_every_open_exposure_carrying_it_without_a_lookup() -> (
    None
):
    parts = Parts()
    copies = FakeFeedCopies(parts.feeds)
    copies.served = {"kev.json": {"CVE-1999-0001": VulnContext()}, "epss.csv": {}}
    for org in ("acme", "globex"):
        await opened(parts, org, IP, CITRIX)
    await opened(parts, "acme", OTHER, RDP)  # carries no CVE: untouched
    feeds = refresher(parts, copies)
    await feeds.refresh_due()
    await feeds.rerate()
    assert severity_changes(parts) == []
    opened_ids = {e.id for e in parts.events.published}

    copies.served["kev.json"] = {CVE: KEV}
    copies.statuses.clear()  # due again
    assert await feeds.refresh_due() == ["kev", "epss"]
    assert await feeds.rerate() == 2
    changes = severity_changes(parts)
    assert sorted(c[:3] for c in changes) == [("acme", IP, "critical"), ("globex", IP, "critical")]
    assert {c[3] for c in changes} != {"critical"}
    assert copies.rerate == set()
    # Idempotent: the same marks again (a crash before `unmark`) emit nothing new.
    copies.rerate.add(CVE)
    before = len(parts.events.published)
    assert await feeds.rerate() == 2
    assert len(parts.events.published) == before
    assert opened_ids <= {e.id for e in parts.events.published}


async def test_a_cve_removed_from_kev_lowers_the_severity_again() -> None:
    parts = Parts()
    parts.feeds.known[CVE] = KEV
    await opened(parts, "acme", IP, CITRIX)
    assert parts.events.published[0].data.severity.value == "critical"
    copies = FakeFeedCopies(parts.feeds)
    copies.served = {"kev.json": {CVE: VulnContext()}, "epss.csv": {}}
    feeds = refresher(parts, copies)
    await feeds.refresh_due()
    await feeds.rerate()
    ((org, ip, severity, previous),) = severity_changes(parts)
    assert (org, ip, previous) == ("acme", IP, "critical")
    assert severity != "critical"


async def test_lookups_assessed_before_the_first_load_are_corrected_when_it_loads() -> None:
    parts = Parts()
    await opened(parts, "acme", IP, SSH)  # before any feed: EPSS unknown
    assert parts.events.published[0].data.severity.value == "medium"
    copies = FakeFeedCopies(parts.feeds)
    copies.served = {
        "kev.json": {"CVE-1999-0001": KEV},
        "epss.csv": {LIKELY: VulnContext(epss=EpssEntry(LIKELY, 0.61, 0.98))},
    }
    feeds = refresher(parts, copies)
    await feeds.refresh_due()
    assert await feeds.rerate() == 1
    assert severity_changes(parts) == [("acme", IP, "high", "medium")]
    # A new EPSS score that still rates the same emits nothing.
    copies.served["epss.csv"] = {LIKELY: VulnContext(epss=EpssEntry(LIKELY, 0.62, 0.98))}
    copies.statuses.clear()
    await feeds.refresh_due()
    assert await feeds.rerate() == 1
    assert len(severity_changes(parts)) == 1


async def test_a_failing_re_assessment_leaves_the_cves_marked_for_the_next_leader() -> None:
    parts = Parts()
    await opened(parts, "acme", IP, CITRIX)
    copies = FakeFeedCopies(parts.feeds)
    copies.served = {"kev.json": {CVE: KEV}, "epss.csv": {}}
    feeds = refresher(parts, copies)
    await feeds.refresh_due()

    async def crash(update: object) -> bool:
        raise RuntimeError("the leader died")

    parts.snapshots.swap = crash  # type: ignore[method-assign]
    with pytest.raises(ExceptionGroup):
        await feeds.rerate()
    assert copies.rerate == {CVE}
    assert severity_changes(parts) == []
    del parts.snapshots.swap
    # The next leader (a new refresher on the same store) finishes it.
    assert await refresher(parts, copies).rerate() == 1
    assert [c[2] for c in severity_changes(parts)] == ["critical"]
    assert copies.rerate == set()


async def test_many_exposures_are_re_rated_a_few_at_a_time() -> None:
    parts = Parts()
    for n in range(40):
        await opened(parts, f"org-{n}", IP, CITRIX)
    copies = FakeFeedCopies(parts.feeds)
    copies.served = {"kev.json": {CVE: KEV}, "epss.csv": {}}
    feeds = refresher(parts, copies, parallel=3)
    await feeds.refresh_due()
    assert await feeds.rerate() == 40
    assert len(severity_changes(parts)) == 40


# -- in batches ----------------------------------------------------------------------

T0 = datetime(2026, 11, 2, 9, tzinfo=UTC)


async def estate(parts: Parts) -> list[tuple[str, str]]:
    """Snapshots opened at T0: most carry CVE, some with an acceptance taken since (org-wide
    or for the IP), one carries none; returns the pairs."""
    pairs = [(f"org-{n % 4}", f"203.0.113.{n}") for n in range(1, 12)]
    for n, (org, ip) in enumerate(pairs):
        services = (CITRIX, RDP) if n % 3 else (CITRIX,)
        scan = HostScan(ip=ip, provider="api", queried_at=T0, services=services)
        outbox = await parts.updater.apply(OrgContext(org, ("a",), ()), scan)
        await parts.outbox.publish(outbox)
    ssh = HostScan(ip=OTHER, provider="api", queried_at=T0, services=(SSH,))
    await parts.outbox.publish(await parts.updater.apply(OrgContext("org-1", ("a",), ()), ssh))
    await parts.acceptances.accept(
        Acceptance("org-2", None, "tcp", 443, "vendor portal", "ciso", T0, None), "c1"
    )
    await parts.acceptances.accept(
        Acceptance("org-1", pairs[0][1], "tcp", 3389, "jump host", "tech", T0, None), "c2"
    )
    parts.events.published.clear()
    parts.state.published.clear()
    parts.ocsf.published.clear()
    parts.feeds.known[CVE] = KEV
    return pairs


def batches(parts: Parts) -> BatchReassessor:
    return BatchReassessor(parts.snapshots, parts.acceptances, parts.outbox)


async def test_a_batch_emits_and_stores_what_the_per_snapshot_path_does() -> None:
    one, many = Parts(), Parts()
    pairs = await estate(one)
    assert await estate(many) == pairs
    at = T0 + timedelta(days=1)
    for org, ip in [*pairs, ("org-1", OTHER)]:
        await one.outbox.reassess(org, ip, at)
    carrying = [s async for s in many.snapshots.carrying_snapshots([CVE, LIKELY])]
    assert await batches(many).reassess(carrying, at) == len(pairs) + 1

    def dumped(items: list[Any]) -> list[Any]:
        return sorted(
            (i.model_dump(mode="json") if hasattr(i, "model_dump") else repr(i) for i in items),
            key=repr,
        )

    assert len(one.events.published) >= len(pairs)
    assert {e.data.change.value for e in one.events.published} == {"changed"}
    assert any("accepted" in e.data.changed_fields for e in one.events.published)
    assert dumped(many.events.published) == dumped(one.events.published)
    assert dumped(many.ocsf.published) == dumped(one.ocsf.published)
    assert dumped(many.state.published) == dumped(one.state.published)
    assert many.history.entries == one.history.entries
    assert many.snapshots.snapshots == one.snapshots.snapshots
    assert await many.snapshots.unpublished(100) == await one.snapshots.unpublished(100) == []


async def test_a_snapshot_written_meanwhile_is_re_assessed_alone_against_the_new_version() -> None:
    parts = Parts()
    pairs = await estate(parts)
    carrying = [s async for s in parts.snapshots.carrying_snapshots([CVE])]
    parts.snapshots.conflicts = 2  # two swaps of the batch lose to another writer
    assert await batches(parts).reassess(carrying, T0 + timedelta(days=1)) == len(pairs)
    changed = severity_changes(parts)
    assert sorted((org, ip) for org, ip, _, _ in changed) == sorted(pairs)
    assert {severity for _, _, severity, _ in changed} == {"critical"}
    # The two were decided again on the other writer's version (2), and stored over it.
    versions = sorted(parts.snapshots.snapshots[pair].version for pair in pairs)
    assert versions == [2] * (len(pairs) - 2) + [3, 3]
    assert len({e.id for e in parts.events.published}) == len(parts.events.published)
    assert await parts.snapshots.unpublished(100) == []


async def test_a_batch_whose_severities_stay_emits_and_writes_nothing() -> None:
    parts = Parts()
    await estate(parts)
    parts.feeds.known.clear()  # as when the snapshots were assessed
    await parts.acceptances.unaccept("org-2", None, "tcp", 443)
    await parts.acceptances.unaccept("org-1", "203.0.113.1", "tcp", 3389)
    stored = dict(parts.snapshots.snapshots)
    carrying = [s async for s in parts.snapshots.carrying_snapshots([CVE])]
    assert await batches(parts).reassess(carrying, T0 + timedelta(days=1)) == len(carrying)
    assert parts.events.published == parts.state.published == []
    assert parts.snapshots.snapshots == stored


async def test_the_refresher_re_rates_in_batches_of_its_size_and_publishes_each_once() -> None:
    parts = Parts()
    for n in range(23):
        await opened(parts, f"org-{n}", IP, CITRIX)
    sizes: list[int] = []
    swap_many = parts.snapshots.swap_many

    async def counted(updates: Any) -> list[bool]:
        sizes.append(len(updates))
        return await swap_many(updates)

    parts.snapshots.swap_many = counted  # type: ignore[method-assign]
    copies = FakeFeedCopies(parts.feeds)
    copies.served = {"kev.json": {CVE: KEV}, "epss.csv": {}}
    feeds = FeedRefresher(
        copies,
        {"kev": "kev.json"},
        parts.metrics,
        every=3600.0,
        retry=60.0,
        snapshots=parts.snapshots,
        outbox=parts.outbox,
        parallel=2,
        batch=5,
    )
    await feeds.refresh_due()
    assert await feeds.rerate() == 23
    assert sorted(sizes) == [3, 5, 5, 5, 5]
    assert len(severity_changes(parts)) == 23
    assert len({e.id for e in parts.events.published}) == len(parts.events.published) == 46


async def test_a_crash_after_the_swaps_leaves_the_events_to_the_relay_and_the_marks() -> None:
    parts = Parts()
    await opened(parts, "acme", IP, CITRIX)
    await opened(parts, "globex", IP, CITRIX)
    copies = FakeFeedCopies(parts.feeds)
    copies.served = {"kev.json": {CVE: KEV}, "epss.csv": {}}
    feeds = refresher(parts, copies)
    await feeds.refresh_due()

    async def crash(events: object) -> None:
        raise RuntimeError("the leader died")

    parts.history.record = crash  # type: ignore[method-assign]
    with pytest.raises(ExceptionGroup):
        await feeds.rerate()
    assert copies.rerate == {CVE}
    assert severity_changes(parts) == []
    del parts.history.record
    assert await parts.outbox.relay_once() > 0  # stored with the snapshots: not lost
    relayed = severity_changes(parts)
    assert sorted(org for org, *_ in relayed) == ["acme", "globex"]
    # The next leader finds nothing left to change, and unmarks.
    assert await refresher(parts, copies).rerate() == 2
    assert severity_changes(parts) == relayed
    assert copies.rerate == set()


async def test_acceptances_of_a_store_that_reads_one_org_at_a_time_are_the_same() -> None:
    parts = Parts()
    pairs = await estate(parts)
    store = parts.acceptances

    class OneByOne:
        acceptances = store.acceptances

    reader = acceptance_batches(OneByOne())  # type: ignore[arg-type]
    assert not isinstance(reader, type(store))
    assert await reader.acceptances_of(pairs) == await store.acceptances_of(pairs)
    assert acceptance_batches(store) is store


# -- the queue's order ---------------------------------------------------------------


async def test_new_ips_go_before_manual_rescans_which_go_before_routine_ones() -> None:
    queue, at = FakeQueue(), now()
    await queue.enqueue([request("acme", f"198.51.100.{n}", ScanReason.RESCAN, at) for n in (1, 2)])
    # An organization-wide rescan of 20 IPs, asked for before another org's new IP.
    await queue.enqueue(
        [request("acme", f"203.0.113.{n}", ScanReason.MANUAL, at) for n in range(1, 21)]
    )
    await queue.enqueue([request("globex", THIRD, ScanReason.NEW, at + timedelta(seconds=5))])
    order = []
    while (item := await queue.claim(timedelta(seconds=60))) is not None:
        order.append(item.ip)
    assert order[0] == THIRD
    assert order[1:21] == [f"203.0.113.{n}" for n in range(1, 21)]
    assert order[21:] == ["198.51.100.1", "198.51.100.2"]


# -- the freshness figure ------------------------------------------------------------


def test_observation_ages_are_nearest_rank_quantiles() -> None:
    at = now()
    observed = [at - timedelta(days=d) for d in (1, 2, 3, 4, 40)]
    ages = observation_ages(observed, at)
    assert ages == {"0.5": 3 * 86400.0, "0.9": 40 * 86400.0, "1": 40 * 86400.0}
    assert observation_ages([], at) == {"0.5": 0.0, "0.9": 0.0, "1": 0.0}
    assert observation_ages([at + timedelta(hours=1)], at)["1"] == 0.0
