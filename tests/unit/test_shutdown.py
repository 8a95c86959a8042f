"""Stopping a worker's background tasks never hangs on one of them."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from recon_stream.app import stop_tasks

pytestmark = pytest.mark.unit


async def test_a_task_that_shields_its_cleanup_is_cancelled_again_and_shutdown_goes_on() -> None:
    stuck = asyncio.Event()  # never set: a commit that never answers
    finished: list[str] = []

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(stuck.wait())
            finished.append("stubborn")

    async def polite() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            finished.append("polite")

    tasks = [asyncio.create_task(stubborn()), asyncio.create_task(polite())]
    await asyncio.sleep(0)
    await stop_tasks(tasks, patience=0.05)
    assert all(task.done() for task in tasks)
    assert sorted(finished) == ["polite", "stubborn"]


async def test_an_error_while_stopping_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def failing() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            raise RuntimeError("close failed")

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    await stop_tasks([task], patience=1.0)
    assert "ended with RuntimeError" in caplog.text
