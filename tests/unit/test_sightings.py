"""Coalescing merges, never picks."""

from __future__ import annotations

import random as random_module
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from recon_stream.domain.heartbeats import Heartbeat, observed_time
from recon_stream.domain.sightings import PairKey, PairSighting, fold

T0 = datetime(2024, 5, 1, 12, tzinfo=UTC)
IST = timezone(timedelta(hours=5, minutes=30))


def hb(
    agent: str,
    minutes: int,
    *,
    org: str = "org-1",
    ip: str = "8.8.8.8",
    site: str | None = None,
    hostname: str | None = None,
    tz: timezone = UTC,
) -> Heartbeat:
    return Heartbeat(
        organization_id=org,
        agent_id=agent,
        public_ip=ip,
        observed_at=(T0 + timedelta(minutes=minutes)).astimezone(tz).isoformat(),
        site_id=site,
        hostname=hostname,
    )


def summary(pairs: dict[PairKey, PairSighting]) -> dict[PairKey, tuple[Any, ...]]:
    """Everything a fold decides except agents' hostnames."""
    return {
        key: (
            s.organization_id,
            s.ip,
            s.first_seen,
            s.last_seen,
            s.heartbeats,
            {a.agent_id: a.last_seen for a in s.agents.values()},
            frozenset(s.site_ids),
        )
        for key, s in pairs.items()
    }


def test_fold_keeps_every_agent_and_site_and_the_extreme_times() -> None:
    pairs = fold(
        [
            hb("a1", 5, site="s1", hostname="old-name"),
            hb("a2", 1, site="s2"),
            hb("a1", 9, hostname="new-name"),
            hb("a1", 3, site="s1"),
            hb("a2", 7, tz=IST),
        ]
    )
    assert list(pairs) == [("org-1", "8.8.8.8")]
    s = pairs["org-1", "8.8.8.8"]
    assert s.key == ("org-1", "8.8.8.8")
    assert s.heartbeats == 5
    assert s.first_seen == T0 + timedelta(minutes=1)
    assert s.last_seen == T0 + timedelta(minutes=9)
    assert s.site_ids == {"s1", "s2"}
    assert {a: x.last_seen for a, x in s.agents.items()} == {
        "a1": T0 + timedelta(minutes=9),
        "a2": T0 + timedelta(minutes=7),
    }
    assert s.agents["a1"].hostname == "new-name"
    assert [a.agent_id for a in s.agents_most_recent_first()] == ["a1", "a2"]


def test_fold_groups_by_organization_and_ip() -> None:
    pairs = fold(
        [
            hb("a1", 0, org="org-1", ip="8.8.8.8"),
            hb("a1", 1, org="org-2", ip="8.8.8.8"),
            hb("a2", 2, org="org-1", ip="1.1.1.1"),
            hb("a3", 3, org="org-1", ip="8.8.8.8"),
        ]
    )
    assert {k: s.heartbeats for k, s in pairs.items()} == {
        ("org-1", "8.8.8.8"): 2,
        ("org-2", "8.8.8.8"): 1,
        ("org-1", "1.1.1.1"): 1,
    }
    assert set(pairs["org-1", "8.8.8.8"].agents) == {"a1", "a3"}
    assert set(pairs["org-2", "8.8.8.8"].agents) == {"a1"}


def test_older_heartbeat_does_not_move_an_agent_back_in_time() -> None:
    s = fold([hb("a1", 10, hostname="h"), hb("a1", 2)])["org-1", "8.8.8.8"]
    assert s.agents["a1"].last_seen == T0 + timedelta(minutes=10)
    assert s.agents["a1"].hostname == "h"
    assert (s.first_seen, s.last_seen) == (T0 + timedelta(minutes=2), T0 + timedelta(minutes=10))


def test_hostname_is_filled_from_an_older_heartbeat_when_the_newest_has_none() -> None:
    s = fold([hb("a1", 10), hb("a1", 2, hostname="h")])["org-1", "8.8.8.8"]
    assert s.agents["a1"].hostname == "h"
    assert s.agents["a1"].last_seen == T0 + timedelta(minutes=10)


def test_empty_batch_folds_to_nothing() -> None:
    assert fold([]) == {}


one_heartbeat = st.builds(
    hb,
    agent=st.sampled_from(["a1", "a2", "a3", "a4"]),
    minutes=st.integers(0, 20),  # small range: ties happen
    org=st.sampled_from(["org-1", "org-2"]),
    ip=st.sampled_from(["8.8.8.8", "1.1.1.1", "2606:4700::1111"]),
    site=st.none() | st.sampled_from(["s1", "s2", "s3"]),
    hostname=st.none() | st.sampled_from(["h1", "h2"]),
    tz=st.sampled_from([UTC, IST, timezone(-timedelta(hours=7))]),
)
heartbeat_batches = st.lists(one_heartbeat, max_size=40)


@given(heartbeat_batches, st.randoms(use_true_random=False))
def test_fold_is_order_independent(batch: list[Heartbeat], random: random_module.Random) -> None:
    shuffled = list(batch)
    random.shuffle(shuffled)
    assert summary(fold(shuffled)) == summary(fold(batch))


@given(heartbeat_batches)
def test_fold_merges_never_picks(batch: list[Heartbeat]) -> None:
    pairs = fold(batch)
    assert sum(s.heartbeats for s in pairs.values()) == len(batch)
    for key, s in pairs.items():
        mine = [h for h in batch if (h.organization_id, h.public_ip) == key]
        assert s.heartbeats == len(mine)
        assert s.first_seen == min(observed_time(h) for h in mine)
        assert s.last_seen == max(observed_time(h) for h in mine)
        assert s.site_ids == {h.site_id for h in mine if h.site_id is not None}
        assert set(s.agents) == {h.agent_id for h in mine}
        for agent in s.agents.values():
            assert agent.last_seen == max(
                observed_time(h) for h in mine if h.agent_id == agent.agent_id
            )
        ordered = [a.last_seen for a in s.agents_most_recent_first()]
        assert ordered == sorted(ordered, reverse=True)
    assert set(pairs) == {(h.organization_id, h.public_ip) for h in batch}


@given(heartbeat_batches, st.integers(0, 40))
def test_merging_two_folds_equals_folding_everything(batch: list[Heartbeat], cut: int) -> None:
    whole = fold(batch)
    first, second = fold(batch[:cut]), fold(batch[cut:])
    for key, s in second.items():
        if key in first:
            first[key].merge(s)
        else:
            first[key] = s
    assert summary(first) == summary(whole)


@given(st.lists(one_heartbeat, max_size=20, unique_by=lambda h: observed_time(h)))
def test_hostname_is_order_independent_without_hostname_gaps(batch: list[Heartbeat]) -> None:
    # With every heartbeat carrying a hostname and distinct times, the newest wins.
    batch = [h.model_copy(update={"hostname": h.hostname or "h0"}) for h in batch]
    expected = {
        (h.organization_id, h.public_ip, h.agent_id): h.hostname
        for h in sorted(batch, key=lambda h: observed_time(h))
    }
    for order in (batch, batch[::-1]):
        got = {
            (s.organization_id, s.ip, a.agent_id): a.hostname
            for s in fold(order).values()
            for a in s.agents.values()
        }
        assert got == expected


def test_hostname_does_not_depend_on_arrival_order() -> None:
    batch = [hb("a1", 1, hostname="a"), hb("a1", 3), hb("a1", 2, hostname="b")]
    forward = fold(batch)["org-1", "8.8.8.8"].agents["a1"].hostname
    backward = fold(batch[::-1])["org-1", "8.8.8.8"].agents["a1"].hostname
    assert forward == backward == "b"
