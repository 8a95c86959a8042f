"""Integration tests run against real servers (see ``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from pymongo import AsyncMongoClient

from recon_stream.settings import Settings

from .support import make_settings, prepare

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Session-wide hook: it sees every item, so filter on location.
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.integration)


@pytest_asyncio.fixture
async def settings(kafka_bootstrap: str, mongodb_uri: str, unique_name: str) -> Settings:
    """Settings with this test's own topics, consumer group and database, prepared."""
    s = make_settings(kafka_bootstrap, mongodb_uri, unique_name)
    await prepare(s)
    return s


@pytest_asyncio.fixture
async def db(settings: Settings) -> AsyncIterator[Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        settings.mongodb_uri.get_secret_value(), tz_aware=True
    )
    yield client[settings.mongodb_database]
    await client.close()
