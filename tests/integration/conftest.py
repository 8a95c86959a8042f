"""Integration tests run against real servers (see ``tests/conftest.py``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from pymongo import AsyncMongoClient

from recon_stream.settings import Settings
from tests.emulators.fixtures import shodan_emulator_fixture  # noqa: F401
from tests.emulators.shodan import ShodanEmulator
from tests.ocsf_check import assert_valid

from .support import make_settings, prepare, read_all

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


@pytest_asyncio.fixture
async def scan_settings(
    settings: Settings, shodan_emulator: ShodanEmulator
) -> AsyncIterator[Settings]:
    """Settings for tests that produce exposure events; afterwards, every OCSF finding
    the test produced is checked against OCSF 1.8.0 (tests/ocsf_check.py)."""
    shodan_emulator.rate = 20.0
    yield settings.model_copy(
        update={
            "shodan_provider": "api",
            "shodan_api_key": __import__("pydantic").SecretStr(shodan_emulator.api_key),
            "shodan_api_url": shodan_emulator.url,
            "shodan_rate": 10.0,
            "shodan_timeout_seconds": 1.0,
            "shodan_key_check_seconds": 0.5,
            "scan_claim_lease_seconds": 10.0,
            "exposure_relay_interval_seconds": 0.5,
            "scheduler_tick_seconds": 0.5,
            "scheduler_lease_seconds": 3.0,
            "gauge_sample_seconds": 0.5,
            "scanner_group_id": settings.ingest_group_id + "-scanner",
        }
    )
    findings = await read_all(
        settings.kafka_bootstrap_servers, settings.topic_exposures_ocsf, idle=0.3
    )
    assert_valid(json.loads(r.value) for r in findings)
