"""The store cases (`tests/store_cases.py`) on the fakes the stage tests use."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.fakes import FakeAcceptances, FakeSnapshots
from tests.store_cases import ACCEPTANCE_CASES, SNAPSHOT_CASES

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("case", SNAPSHOT_CASES, ids=lambda case: case.__name__)
async def test_snapshot_store(case: Callable[[Any], Awaitable[None]]) -> None:
    await case(FakeSnapshots())


@pytest.mark.parametrize("case", ACCEPTANCE_CASES, ids=lambda case: case.__name__)
async def test_acceptance_store(case: Callable[[Any], Awaitable[None]]) -> None:
    await case(FakeAcceptances())
