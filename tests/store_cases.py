"""Test cases every snapshot store and acceptance store keeps, run on the fakes
(`tests/unit/test_store_fakes.py`) and on genuine MongoDB
(`tests/integration/test_store_adapters.py`), as FastStream runs one set of broker
cases in memory and against a real broker. A fake that passes here behaves, for the
stages, as the adapter does."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from recon_stream.domain.acceptance import Acceptance
from recon_stream.domain.scans import HostScan, Service
from recon_stream.domain.snapshot import OrgContext, Snapshot, Update, decide, plan_lookup
from recon_stream.domain.verification_consent import Consent, ConsentChange
from tests.fakes import BUILT_IN

T0 = datetime(2026, 11, 2, 9, tzinfo=UTC)
IP = "203.0.113.40"
ORG = OrgContext("acme", ("agent-1",), ("hq",))
RDP = Service(port=3389, module="rdp", shodan_timestamp=datetime(2026, 11, 1, 8, 0))
WEB = Service(port=443, module="https", product="nginx", vulns=("CVE-2023-44487",))


def _aware(service: Service) -> Service:
    seen = service.shodan_timestamp
    if seen is None or seen.tzinfo is not None:
        return service
    return service.model_copy(update={"shodan_timestamp": seen.replace(tzinfo=UTC)})


def _update(before: Snapshot, *services: Service, at: datetime = T0) -> Update:
    scan = HostScan(ip=IP, provider="api", queried_at=at, services=services, hostnames=("h",))
    plan = plan_lookup(before, ORG, scan, at)
    assert plan is not None
    update = decide(plan, [], BUILT_IN)
    assert update is not None
    return update


async def a_stored_snapshot_loads_as_it_was_decided(snapshots: Any) -> None:
    empty = await snapshots.load("acme", IP)
    assert (empty.stored, empty.version, empty.services) == (False, 0, {})
    update = _update(empty, RDP, WEB)
    assert await snapshots.swap(update)
    loaded = await snapshots.load("acme", IP)
    expected = update.after
    assert loaded.stored
    assert (loaded.version, loaded.status) == (1, "active")
    assert loaded.candidate_agents == expected.candidate_agents
    assert loaded.site_ids == expected.site_ids
    assert loaded.hostnames == ("h",)
    assert loaded.last_queried == T0
    assert list(loaded.services) == list(expected.services)
    for key, entry in expected.services.items():
        # MongoDB hands times back zone-aware (UTC): the same instant.
        assert _aware(loaded.services[key].service) == _aware(entry.service)
        assert loaded.services[key].severity == entry.severity
        assert loaded.services[key].first_seen == entry.first_seen
    assert await snapshots.ips_of("acme") == [IP]


async def a_swap_against_an_old_version_is_refused(snapshots: Any) -> None:
    empty = await snapshots.load("acme", IP)
    first = _update(empty, RDP)
    assert await snapshots.swap(first)
    assert not await snapshots.swap(first)  # a second creation of the same snapshot
    stored = await snapshots.load("acme", IP)
    second = _update(stored, RDP, WEB, at=T0 + timedelta(hours=1))
    rival = _update(stored, at=T0 + timedelta(hours=2))
    assert await snapshots.swap(second)
    assert not await snapshots.swap(rival)  # decided against version 1, now 2
    now = await snapshots.load("acme", IP)
    assert (now.version, set(now.services)) == (2, {("tcp", 3389), ("tcp", 443)})


async def outboxes_keep_what_is_not_published_yet(snapshots: Any) -> None:
    empty = await snapshots.load("acme", IP)
    first = _update(empty, RDP)
    assert await snapshots.swap(first)
    second = _update(await snapshots.load("acme", IP), RDP, WEB, at=T0 + timedelta(hours=1))
    assert await snapshots.swap(second)
    (pending,) = await snapshots.unpublished(10)
    assert [e.id for e in pending.events] == [e.id for e in first.events + second.events]
    # A newer row for a key replaces the pending one: the state topic needs the latest.
    assert sorted((r.key, r.version) for r in pending.state) == [
        (f"acme/{IP}/tcp/3389", 2),
        (f"acme/{IP}/tcp/443", 2),
    ]
    await snapshots.published("acme", IP, [e.id for e in first.events], ())
    (left,) = await snapshots.unpublished(10)
    assert [e.id for e in left.events] == [e.id for e in second.events]
    await snapshots.published("acme", IP, [e.id for e in second.events], left.state)
    assert await snapshots.unpublished(10) == []


async def snapshots_carrying_a_cve_are_read_whole_as_loaded(snapshots: Any) -> None:
    for ip, services in (("203.0.113.41", (RDP, WEB)), ("203.0.113.42", (RDP,)), (IP, (WEB,))):
        assert await snapshots.swap(
            _other(_update(await snapshots.load("acme", ip), *services), ip)
        )
    carrying = [s async for s in snapshots.carrying_snapshots(["CVE-2023-44487"])]
    assert sorted(s.ip for s in carrying) == [IP, "203.0.113.41"]
    for snapshot in carrying:
        assert snapshot == await snapshots.load("acme", snapshot.ip)
    assert [s async for s in snapshots.carrying_snapshots([])] == []


async def a_batch_of_swaps_stores_each_against_its_version_and_refuses_the_moved(
    snapshots: Any,
) -> None:
    other = "198.51.100.7"
    first = _update(await snapshots.load("acme", IP), RDP)
    assert await snapshots.swap(first)
    assert await snapshots.swap(_other(_update(await snapshots.load("acme", other), RDP), other))
    mine = _update(await snapshots.load("acme", IP), RDP, WEB, at=T0 + timedelta(hours=1))
    moved = _other(
        _update(await snapshots.load("acme", other), RDP, WEB, at=T0 + timedelta(hours=1)), other
    )
    rival = _other(
        _update(await snapshots.load("acme", other), at=T0 + timedelta(minutes=30)), other
    )
    assert await snapshots.swap(rival)  # `moved` was decided against version 1, now 2
    assert await snapshots.swap_many([mine, moved]) == [True, False]
    assert (await snapshots.load("acme", IP)).version == 2
    assert set((await snapshots.load("acme", IP)).services) == {("tcp", 3389), ("tcp", 443)}
    assert (await snapshots.load("acme", other)).services == {}
    pending = {(o.ip): o for o in await snapshots.unpublished(10)}
    assert [e.id for e in pending[IP].events] == [e.id for e in first.events + mine.events]
    # As `swap`: a newer row for a key replaces the pending one.
    assert sorted((r.key, r.version) for r in pending[IP].state) == [
        (f"acme/{IP}/tcp/3389", 2),
        (f"acme/{IP}/tcp/443", 2),
    ]
    assert {e.id for e in pending[other].events}.isdisjoint(e.id for e in moved.events)
    await snapshots.published_many([pending[IP], pending[other]])
    assert await snapshots.unpublished(10) == []
    assert await snapshots.swap_many([]) == []


def _other(update: Update, ip: str) -> Update:
    """`update` as if decided for `ip` (the cases' lookups are of IP)."""
    before = dataclasses.replace(update.before, ip=ip)
    events = [
        e.model_copy(update={"id": f"{e.id}-{ip}", "data": e.data.model_copy(update={"ip": ip})})
        for e in update.events
    ]
    state = [dataclasses.replace(r, key=r.key.replace(IP, ip)) for r in update.state]
    return dataclasses.replace(
        update,
        before=before,
        after=dataclasses.replace(update.after, ip=ip),
        events=events,
        state=state,
    )


async def acceptances_are_kept_replaced_and_taken_back(acceptances: Any) -> None:
    mine = Acceptance("acme", IP, "tcp", 3389, "jump host", "tech", T0, T0 + timedelta(days=1))
    org_wide = Acceptance("acme", None, "tcp", 443, "web", "tech", T0, None)
    other = Acceptance("globex", IP, "tcp", 3389, "theirs", "ops", T0, None)
    for a in (mine, org_wide, other):
        await acceptances.accept(a, "c")
    kept = await acceptances.acceptances("acme", IP)
    assert sorted(a.port for a in kept) == [443, 3389]
    assert [a.port for a in await acceptances.acceptances("acme", "198.51.100.1")] == [443]
    newer = dataclasses.replace(
        mine, reason="still a jump host", accepted_at=T0 + timedelta(hours=1)
    )
    await acceptances.accept(newer, "c2")
    kept = await acceptances.acceptances("acme", IP)
    assert sorted(a.reason for a in kept) == ["still a jump host", "web"]
    expired = await acceptances.expired_acceptances(T0 + timedelta(days=2))
    assert [a.reason for a in expired] == ["still a jump host"]
    await acceptances.forget_acceptance(mine)  # replaced meanwhile: kept
    assert len(await acceptances.acceptances("acme", IP)) == 2
    await acceptances.forget_acceptance(expired[0])
    assert [a.port for a in await acceptances.acceptances("acme", IP)] == [443]
    assert await acceptances.unaccept("acme", None, "tcp", 443)
    assert not await acceptances.unaccept("acme", None, "tcp", 443)
    assert await acceptances.acceptances("acme") == []


async def acceptances_of_many_pairs_are_read_at_once(acceptances: Any) -> None:
    mine = Acceptance("acme", IP, "tcp", 3389, "jump host", "tech", T0, None)
    org_wide = Acceptance("acme", None, "tcp", 443, "web", "tech", T0, None)
    other = Acceptance("globex", IP, "tcp", 3389, "theirs", "ops", T0, None)
    for a in (mine, org_wide, other):
        await acceptances.accept(a, "c")
    pairs = [("acme", IP), ("acme", "198.51.100.1"), ("globex", IP), ("initech", IP)]
    found = await acceptances.acceptances_of(pairs)
    assert set(found) == set(pairs)
    for org, ip in pairs:
        expected = await acceptances.acceptances(org, ip)
        assert sorted(found[(org, ip)], key=repr) == sorted(expected, key=repr)
    assert [a.port for a in found[("acme", "198.51.100.1")]] == [443]
    assert found[("initech", IP)] == []
    assert await acceptances.acceptances_of([]) == {}


SNAPSHOT_CASES: list[Callable[[Any], Awaitable[None]]] = [
    a_stored_snapshot_loads_as_it_was_decided,
    a_swap_against_an_old_version_is_refused,
    outboxes_keep_what_is_not_published_yet,
    snapshots_carrying_a_cve_are_read_whole_as_loaded,
    a_batch_of_swaps_stores_each_against_its_version_and_refuses_the_moved,
]
ACCEPTANCE_CASES: list[Callable[[Any], Awaitable[None]]] = [
    acceptances_are_kept_replaced_and_taken_back,
    acceptances_of_many_pairs_are_read_at_once,
]


def _consent(enabled: bool, command_id: str, at: datetime, org: str = "acme") -> Consent:
    why = f"{command_id}: pen-test contract"
    return Consent(org, enabled, f"ciso of {org}", why, at, command_id)


async def a_consent_is_kept_and_changed_by_newer_commands_only(consents: Any) -> None:
    assert await consents.get("acme") is None
    enable = _consent(True, "c-1", T0)
    assert await consents.set(enable) is ConsentChange.CHANGED
    assert await consents.get("acme") == enable
    # Redelivered: nothing changes, and it says it is the consent on record.
    assert await consents.set(enable) is ConsentChange.REPEATED
    # Enabling an enabled org changes nothing: who and when stay the first decision's.
    again = _consent(True, "c-2", T0 + timedelta(minutes=1))
    assert await consents.set(again) is ConsentChange.UNCHANGED
    assert await consents.get("acme") == enable
    disable = _consent(False, "c-3", T0 + timedelta(minutes=2))
    assert await consents.set(disable) is ConsentChange.CHANGED
    assert await consents.get("acme") == disable
    # Older commands, delivered late, never override the newer decision.
    assert await consents.set(enable) is ConsentChange.OUTDATED
    assert await consents.set(again) is ConsentChange.OUTDATED
    stale = _consent(True, "c-0", T0 + timedelta(seconds=30))
    assert await consents.set(stale) is ConsentChange.OUTDATED
    assert await consents.get("acme") == disable
    assert await consents.set(disable) is ConsentChange.REPEATED


async def a_no_effect_command_still_orders_the_ones_after_it(consents: Any) -> None:
    assert await consents.set(_consent(True, "c-1", T0)) is ConsentChange.CHANGED
    # c-3 (enable, newest) has no effect; c-2 (disable, older) arrives after it.
    assert await consents.set(_consent(True, "c-3", T0 + timedelta(minutes=2))) is (
        ConsentChange.UNCHANGED
    )
    late = _consent(False, "c-2", T0 + timedelta(minutes=1))
    assert await consents.set(late) is ConsentChange.OUTDATED
    assert (await consents.get("acme")).enabled is True


async def commands_of_the_same_millisecond_take_effect_in_arrival_order(consents: Any) -> None:
    # Microseconds apart when sent, the same instant once MongoDB has stored them; the
    # second's id sorts first (the CLI's ids are random).
    assert await consents.set(_consent(True, "z-1", T0)) is ConsentChange.CHANGED
    again = _consent(True, "m-2", T0 + timedelta(microseconds=300))
    assert await consents.set(again) is ConsentChange.UNCHANGED
    off = _consent(False, "a-3", T0 + timedelta(microseconds=600))
    assert await consents.set(off) is ConsentChange.CHANGED
    assert (await consents.get("acme")).enabled is False


async def enabled_orgs_are_those_whose_consent_is_on_record_as_enabled(consents: Any) -> None:
    assert await consents.enabled_orgs([]) == set()
    assert await consents.set(_consent(True, "a-1", T0, "acme")) is ConsentChange.CHANGED
    assert await consents.set(_consent(True, "g-1", T0, "globex")) is ConsentChange.CHANGED
    later = T0 + timedelta(hours=1)
    assert await consents.set(_consent(False, "g-2", later, "globex")) is ConsentChange.CHANGED
    assert await consents.enabled_orgs(["acme", "globex", "initech"]) == {"acme"}
    assert await consents.enabled_orgs(iter(["globex"])) == set()


# Run on FakeConsents by tests/unit/test_commands.py, on MongoConsents (a real server) by
# tests/integration/test_commands.py.
CONSENT_CASES: list[Callable[[Any], Awaitable[None]]] = [
    a_consent_is_kept_and_changed_by_newer_commands_only,
    a_no_effect_command_still_orders_the_ones_after_it,
    commands_of_the_same_millisecond_take_effect_in_arrival_order,
    enabled_orgs_are_those_whose_consent_is_on_record_as_enabled,
]
