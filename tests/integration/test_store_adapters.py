"""The store cases (`tests/store_cases.py`) on the MongoDB adapters, on a real server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from recon_stream.adapters.acceptances import Acceptances
from recon_stream.adapters.exposures import MongoSnapshots
from tests.store_cases import ACCEPTANCE_CASES, SNAPSHOT_CASES


@pytest.mark.parametrize("case", SNAPSHOT_CASES, ids=lambda case: case.__name__)
async def test_snapshot_store(case: Callable[[Any], Awaitable[None]], db: Any) -> None:
    await case(MongoSnapshots(db))


@pytest.mark.parametrize("case", ACCEPTANCE_CASES, ids=lambda case: case.__name__)
async def test_acceptance_store(case: Callable[[Any], Awaitable[None]], db: Any) -> None:
    await case(Acceptances(db))
