"""SeenPairs: which pairs need no MongoDB write, on a clock the test controls."""

from __future__ import annotations

import pytest

from recon_stream.domain.addresses import AddressClass
from recon_stream.seen import SeenPairs

PUBLIC = AddressClass.PUBLIC
KEY = ("org-1", "8.8.8.8")


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, max_entries: int = 10, refresh: float = 300.0) -> SeenPairs:
    return SeenPairs(max_entries, refresh, clock=clock)


def test_unknown_pair_has_no_entry(clock: FakeClock) -> None:
    assert make(clock).get(KEY) is None


def test_remembered_but_unwritten_pair_is_not_fresh(clock: FakeClock) -> None:
    seen = make(clock)
    entry = seen.remember(KEY, PUBLIC, "8.8.8.8")
    assert seen.get(KEY) is entry
    assert (entry.address_class, entry.ip) == (PUBLIC, "8.8.8.8")
    assert not seen.is_fresh(entry, [], [])


def test_remember_keeps_the_existing_entry(clock: FakeClock) -> None:
    seen = make(clock)
    entry = seen.remember(KEY, PUBLIC, "8.8.8.8")
    seen.written(KEY, entry, ["a1"], [])
    assert seen.remember(KEY, PUBLIC, "8.8.8.8") is entry
    assert seen.is_fresh(entry, ["a1"], [])


def test_fresh_within_refresh_interval_and_stale_after(clock: FakeClock) -> None:
    seen = make(clock, refresh=300.0)
    entry = seen.remember(KEY, PUBLIC, "8.8.8.8")
    seen.written(KEY, entry, ["a1", "a2"], ["s1"])
    assert seen.is_fresh(entry, ["a1"], ["s1"])
    clock.advance(299.9)
    assert seen.is_fresh(entry, ["a1", "a2"], [])
    clock.advance(0.1)
    assert not seen.is_fresh(entry, ["a1"], ["s1"])
    # Writing again starts a new interval.
    seen.written(KEY, entry, ["a1"], ["s1"])
    assert seen.is_fresh(entry, ["a1", "a2"], ["s1"])


def test_new_agent_or_site_makes_an_entry_not_fresh(clock: FakeClock) -> None:
    seen = make(clock)
    entry = seen.remember(KEY, PUBLIC, "8.8.8.8")
    seen.written(KEY, entry, ["a1"], ["s1"])
    assert not seen.is_fresh(entry, ["a1", "a2"], ["s1"])
    assert not seen.is_fresh(entry, ["a1"], ["s1", "s2"])
    assert not seen.is_fresh(entry, [], ["s2"])
    seen.written(KEY, entry, ["a2"], ["s2"])
    assert seen.is_fresh(entry, ["a1", "a2"], ["s1", "s2"])


def test_zero_refresh_interval_is_never_fresh(clock: FakeClock) -> None:
    seen = make(clock, refresh=0.0)
    entry = seen.remember(KEY, PUBLIC, "8.8.8.8")
    seen.written(KEY, entry, ["a1"], [])
    assert not seen.is_fresh(entry, ["a1"], [])


def test_too_many_members_are_forgotten_so_the_pair_is_written_again(clock: FakeClock) -> None:
    seen = SeenPairs(10, 300.0, max_members=3, clock=clock)
    entry = seen.remember(KEY, PUBLIC, "8.8.8.8")
    seen.written(KEY, entry, ["a1", "a2", "a3"], [])
    assert seen.is_fresh(entry, ["a1", "a2", "a3"], [])
    seen.written(KEY, entry, ["a4"], [])
    assert not seen.is_fresh(entry, ["a1"], [])


def test_least_recently_written_entry_is_evicted_at_max_entries(clock: FakeClock) -> None:
    seen = make(clock, max_entries=3)
    keys = [("org-1", f"8.8.8.{i}") for i in range(4)]
    entries = [seen.remember(key, PUBLIC, key[1]) for key in keys[:3]]
    assert len(seen) == 3
    seen.written(keys[0], entries[0], ["a"], [])  # now the most recently written
    seen.remember(keys[3], PUBLIC, keys[3][1])
    assert len(seen) == 3
    assert seen.get(keys[1]) is None  # the least recently written went
    assert all(seen.get(k) is not None for k in (keys[0], keys[2], keys[3]))


def test_lookups_do_not_change_the_eviction_order(clock: FakeClock) -> None:
    # Hits are the hot path: they cost one dict lookup and reorder nothing.
    seen = make(clock, max_entries=2)
    seen.remember(("o", "1.1.1.1"), PUBLIC, "1.1.1.1")
    seen.remember(("o", "2.2.2.2"), PUBLIC, "2.2.2.2")
    seen.get(("o", "1.1.1.1"))
    seen.remember(("o", "3.3.3.3"), PUBLIC, "3.3.3.3")
    assert seen.get(("o", "1.1.1.1")) is None
    assert seen.get(("o", "2.2.2.2")) is not None
    assert seen.get(("o", "3.3.3.3")) is not None
    assert len(seen) == 2


def test_max_entries_zero_disables_caching(clock: FakeClock) -> None:
    seen = make(clock, max_entries=0)
    entry = seen.remember(KEY, PUBLIC, "8.8.8.8")
    assert (entry.address_class, entry.ip) == (PUBLIC, "8.8.8.8")
    seen.written(KEY, entry, ["a1"], [])
    assert len(seen) == 0
    assert seen.get(KEY) is None
    assert seen.remember(KEY, PUBLIC, "8.8.8.8") is not entry


def test_forget(clock: FakeClock) -> None:
    seen = make(clock)
    seen.remember(KEY, AddressClass.PRIVATE, "10.0.0.1")
    seen.forget(KEY)
    seen.forget(KEY)  # forgetting twice is fine
    assert seen.get(KEY) is None
    assert len(seen) == 0
