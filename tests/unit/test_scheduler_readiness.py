"""The scheduler's readiness: leading and standing by are ready; a stuck lease loop is not."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

from recon_stream.scheduler import Scheduler
from tests.fakes import Parts

pytestmark = pytest.mark.unit


class HangingLease:
    """A lease whose store answers `leading`, or never answers at all (`hang`)."""

    def __init__(self, leading: bool, hang: asyncio.Event | None = None) -> None:
        self.leading = leading
        self.hang = hang
        self.ttl = timedelta(seconds=0.2)
        self.holder = "test"

    async def try_acquire(self, now: datetime | None = None) -> bool:
        if self.hang is not None:
            await self.hang.wait()
        return self.leading

    async def release(self) -> None:
        return None


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Return once `condition()` holds (the loop under test runs meanwhile)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def until_ready_says(s: Scheduler, timeout: float = 10.0) -> str:
    """Return the first reason `ready()` gives for not being ready."""
    async with asyncio.timeout(timeout):
        while (reason := await s.ready()) is None:
            await asyncio.sleep(0.01)
    return reason


def scheduler(lease: HangingLease) -> Scheduler:
    parts = Parts()
    scheduler = Scheduler(
        lease,
        parts.ip_scans,
        parts.org_ips,
        parts.acceptances,
        parts.outbox,
        parts.requests,
        parts.metrics,
        parts.retrying,
        rescan_interval=3600,
        retention=7200,
    )

    async def no_work(now: Any = None) -> tuple[int, int]:
        return 0, 0

    scheduler.tick = no_work  # type: ignore[method-assign]
    return scheduler


@pytest.mark.parametrize(("leading", "state"), [(True, "leading"), (False, "standing by")])
async def test_leading_and_standing_by_are_both_ready(leading: bool, state: str) -> None:
    s = scheduler(HangingLease(leading))
    assert await s.ready() == "scheduler has not reached the lease yet"
    task = asyncio.create_task(s.run(tick=0.05))
    await until(lambda: s.state == state)
    assert await s.ready() is None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_lease_loop_that_stops_answering_is_not_ready() -> None:
    hang = asyncio.Event()
    lease = HangingLease(True)
    s = scheduler(lease)
    task = asyncio.create_task(s.run(tick=0.05))
    await until(lambda: s.state == "leading")
    assert await s.ready() is None
    lease.hang = hang  # the store stops answering: no more rounds
    reason = await until_ready_says(s)
    assert reason.startswith("scheduler stalled: no lease round for")
    hang.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
