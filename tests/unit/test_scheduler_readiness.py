"""The scheduler's readiness: leading and standing by are ready; a stuck lease loop is not."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from recon_stream.metrics import Metrics
from recon_stream.retry import Backoff
from recon_stream.scheduler import Scheduler

pytestmark = pytest.mark.unit


class FakeLease:
    """A lease whose store answers `leading`, or never answers at all (`hang`)."""

    def __init__(self, leading: bool, hang: asyncio.Event | None = None) -> None:
        self.leading = leading
        self.hang = hang
        self.ttl = timedelta(seconds=0.2)
        self.holder = "test"

    async def try_acquire(self) -> bool:
        if self.hang is not None:
            await self.hang.wait()
        return self.leading

    async def release(self) -> None:
        return None


def scheduler(lease: FakeLease) -> Scheduler:
    nothing: Any = None
    scheduler = Scheduler(
        {"org_ips": nothing},  # type: ignore[arg-type]
        lease,  # type: ignore[arg-type]
        nothing,
        nothing,
        nothing,
        nothing,
        Metrics(),
        Backoff(0.01, 0.1),
        rescan_interval=3600,
        retention=7200,
    )

    async def no_work(now: Any = None) -> tuple[int, int]:
        return 0, 0

    scheduler.tick = no_work  # type: ignore[method-assign]
    return scheduler


@pytest.mark.parametrize(("leading", "state"), [(True, "leading"), (False, "standing by")])
async def test_leading_and_standing_by_are_both_ready(leading: bool, state: str) -> None:
    s = scheduler(FakeLease(leading))
    assert await s.ready() == "scheduler has not reached the lease yet"
    task = asyncio.create_task(s.run(tick=0.05))
    await asyncio.sleep(0.2)
    assert s.state == state
    assert await s.ready() is None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_lease_loop_that_stops_answering_is_not_ready() -> None:
    hang = asyncio.Event()
    lease = FakeLease(True)
    s = scheduler(lease)
    task = asyncio.create_task(s.run(tick=0.05))
    await asyncio.sleep(0.1)
    assert await s.ready() is None
    lease.hang = hang  # the store stops answering: no more rounds
    await asyncio.sleep(3 * 0.05 + 0.2 + 0.3)
    reason = await s.ready()
    assert reason is not None
    assert reason.startswith("scheduler stalled: no lease round for")
    hang.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
