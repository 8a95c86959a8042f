"""The limiter's arithmetic: slots, clock bounds and the send gate, with arbitrary lateness.

A simulated MongoDB hands out slots exactly as the real update does
(`start = max(now, next)`, `next = start + interval`, `$$NOW` in whole milliseconds,
read at some instant of the round trip). Replicas have clocks of their own, and
reach the gate as late as hypothesis likes. Whatever they do, the requests that
pass the gate never put more than the budget into one sliding window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recon_stream.adapters.ratelimit import (
    DRIFT,
    Pacer,
    ServerClock,
    Slot,
    send_window,
    tolerance_of,
    window_of,
)


@dataclass
class FakeClock:
    now: float = 0.0
    oversleep: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds + (self.oversleep.pop(0) if self.oversleep else 0.0)


def most_in_any_window(times: list[float], window: float) -> int:
    """The emulator's count: requests `>= window` apart fall in different windows."""
    times = sorted(times)
    best = start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


rates = st.sampled_from([0.2, 0.5, 1.0, 2.0, 4.0, 10.0, 20.0])
margins = st.sampled_from([0.01, 0.03, 0.1])


@st.composite
def reservations(draw: st.DrawFn) -> list[tuple[int, float, float, float, float, float]]:
    """Per reservation: replica, gap before it (s), round trip (s), where in it `$$NOW`
    is read (0-1), then arrival at the gate after the answer and oversleep at the gate,
    both in tolerances (15 ms at 1/s and 3%): often near the edge of the window, now and
    then a stalled loop or a busy core of up to 40 tolerances."""
    n = draw(st.integers(2, 30))
    lateness = st.one_of(st.just(0.0), st.floats(0.8, 1.2), st.floats(0.0, 40.0))
    return [
        (
            draw(st.integers(0, 2)),
            draw(st.floats(0.0, 0.3)),
            draw(st.one_of(st.floats(0.0005, 0.005), st.floats(0.0, 0.4))),
            draw(st.floats(0.0, 1.0)),
            draw(lateness),
            draw(lateness),
        )
        for _ in range(n)
    ]


def simulate(
    rate: float,
    margin: float,
    plan: list[tuple[int, float, float, float, float, float]],
    offsets: tuple[float, float, float],
    jitter: float = 0.0,
) -> tuple[list[float], int]:
    """Server times at which requests leave (plus `jitter` after the gate); slots missed."""
    clocks = [FakeClock() for _ in offsets]
    pacers = [Pacer(rate, margin, clock=c, sleep=c.sleep) for c in clocks]
    tolerance = tolerance_of(rate, margin)
    true_time = 1000.0  # server seconds; replica r's local clock reads true - offsets[r]
    next_ms = 0.0
    sends: list[float] = []
    missed = 0
    for replica, gap, rtt, where, arrival, oversleep in plan:
        true_time += gap
        clock, pacer, offset = clocks[replica], pacers[replica], offsets[replica]
        sent = true_time - offset
        now_ms = math.floor((true_time + where * rtt) * 1000.0)
        start_ms = max(now_ms, next_ms)
        next_ms = start_ms + pacer.interval_ms
        true_time += rtt
        received = true_time - offset
        slot = pacer.slot(sent, received, now_ms, start_ms)
        clock.now = received + arrival * tolerance
        clock.oversleep = [oversleep * tolerance]
        if slot.enter():
            sends.append(clock.now + offset + jitter)
        else:
            missed += 1
    return sends, missed


offsets = st.tuples(*(st.floats(-1e6, 1e6) for _ in range(3)))


@settings(max_examples=400, deadline=None)
@given(rates, margins, reservations(), offsets, st.floats(0.0, 1.0))
def test_no_window_ever_holds_more_than_the_budget(
    rate: float,
    margin: float,
    plan: list[tuple[int, float, float, float, float, float]],
    offs: tuple[float, float, float],
    jitter_share: float,
) -> None:
    window, capacity = window_of(rate)
    tolerance = tolerance_of(rate, margin)
    # Lateness after the gate up to the tolerance (the slack's other half) is absorbed too.
    sends, _ = simulate(rate, margin, plan, offs, jitter=0.0)
    assert most_in_any_window(sends, window) <= capacity
    late = [t + jitter_share * tolerance * (i % 2) for i, t in enumerate(sends)]
    assert most_in_any_window(late, window - 1e-9) <= capacity


@settings(max_examples=200, deadline=None)
@given(rates, st.sampled_from([0.03, 0.1]), st.integers(2, 24), offsets)
def test_a_punctual_replica_uses_every_slot(
    rate: float, margin: float, n: int, offs: tuple[float, float, float]
) -> None:
    # Quick round trips, no lateness, up to 24 slots queued ahead (three replicas of
    # eight loops), the production margin or more: nothing is forfeited, the slots are
    # back to back. (A 1% margin leaves 5 ms per second, less than 16 s of drift allows.)
    plan = [(i % 3, 0.0, 0.001, 0.5, 0.0, 0.0) for i in range(n)]
    sends, missed = simulate(rate, margin, plan, offs)
    assert missed == 0
    spacing = (1 + margin) / rate
    # Each waits for its slot to surely have begun: later by the clocks' possible drift.
    assert sends[-1] - sends[0] == pytest.approx((n - 1) * spacing, abs=0.002 + DRIFT * n * spacing)


@given(
    st.floats(-1e6, 1e6),
    st.lists(
        st.tuples(st.floats(0.0, 5.0), st.floats(0.0, 0.5), st.floats(0.0, 1.0)),
        min_size=1,
        max_size=20,
    ),
)
def test_the_clock_bounds_always_hold_the_true_offset(
    offset: float, readings: list[tuple[float, float, float]]
) -> None:
    clock = ServerClock()
    local = 0.0
    for gap, rtt, where in readings:
        sent = local + gap
        received = sent + rtt
        server = math.floor((sent + where * rtt + offset) * 1000.0) / 1000.0
        clock.observe(sent, received, server)
        lo, hi = clock.bounds(received)
        assert lo - 1e-9 <= offset <= hi + 1e-9  # 1e-9: the test's own float rounding
        local = received


@given(
    st.floats(-1e6, 1e6),
    st.floats(0.0, 0.1),
    st.floats(0.0, 0.05),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
)
def test_a_send_inside_the_window_lands_inside_the_slot(
    start: float, tolerance: float, spread: float, where: float, when: float
) -> None:
    lo, hi = -spread / 2, spread / 2
    earliest, latest = send_window(start, tolerance, lo, hi)
    if earliest > latest:
        return
    offset = lo + where * (hi - lo)  # whatever the true offset within the bounds
    sent = earliest + when * (latest - earliest)
    assert start - 1e-9 <= sent + offset <= start + tolerance + 1e-9


def test_a_late_thread_forfeits_its_slot_and_an_early_one_waits() -> None:
    clock = FakeClock(now=10.0)
    slot = Slot(start=0.0, earliest=10.5, latest=10.52, clock=clock, sleep=clock.sleep)
    assert slot.wait == pytest.approx(0.5)
    assert slot.enter()
    assert slot.entered_at == pytest.approx(10.5)
    clock.now, clock.oversleep = 10.0, [0.1]  # woke 100 ms late
    late = Slot(start=0.0, earliest=10.5, latest=10.52, clock=clock, sleep=clock.sleep)
    assert not late.enter()
    assert late.entered_at is None


def test_an_abandoned_slot_lets_nothing_through() -> None:
    clock = FakeClock(now=10.0)
    slot = Slot(start=0.0, earliest=10.0, latest=10.5, clock=clock, sleep=clock.sleep)
    slot.abandon()
    assert not slot.enter()


def test_a_slow_round_trip_borrows_the_precision_of_an_earlier_quick_one() -> None:
    clock = ServerClock()
    clock.observe(sent=0.0, received=0.001, server=100.0)
    quick = clock.bounds(0.001)
    clock.observe(sent=1.0, received=1.3, server=101.0)  # a 300 ms round trip
    lo, hi = clock.bounds(1.3)
    assert hi - lo < 0.003
    assert quick[0] - 0.001 <= lo
    assert hi <= quick[1] + 0.001


def test_a_stepped_server_clock_restarts_the_bounds() -> None:
    clock = ServerClock()
    clock.observe(sent=0.0, received=0.001, server=100.0)
    clock.observe(sent=1.0, received=1.002, server=200.0)  # stepped 99 s ahead
    lo, hi = clock.bounds(1.002)
    assert lo <= 200.0 - 1.002
    assert hi >= 200.0 - 1.0


def test_bounds_wider_than_the_tolerance_leave_no_window() -> None:
    earliest, latest = send_window(start=5.0, tolerance=0.015, offset_lo=-0.02, offset_hi=0.02)
    assert earliest > latest


def test_tolerance_is_half_the_slack_the_margin_buys() -> None:
    assert tolerance_of(1.0, 0.03) == pytest.approx(0.015)
    assert tolerance_of(4.0, 0.03) == pytest.approx(0.015)
    assert tolerance_of(0.5, 0.03) == pytest.approx(0.03)  # window 2 s, one request
    assert window_of(4.0) == (1.0, 4)
    assert window_of(0.5) == (2.0, 1)
    with pytest.raises(ValueError, match="margin"):
        Pacer(1.0, 0.0)
