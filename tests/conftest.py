"""Shared fixtures: real Kafka-protocol and MongoDB servers for the session.

The embedded servers are Tansu and genuine ``mongod`` (a one-node replica set),
or SecantusDB where the mongod wheel cannot install (said in the report header).
Set ``RECON_TEST_KAFKA_BOOTSTRAP_SERVERS`` / ``RECON_TEST_MONGODB_URI`` to run the
suite against an external Apache Kafka / MongoDB instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from recon_stream.embedded import EmbeddedKafka, EmbeddedMongo, default_mongo_engine

_UNIT_DIR = Path(__file__).parent / "unit"


def pytest_report_header(config: pytest.Config) -> str:
    if os.environ.get("RECON_TEST_MONGODB_URI"):
        return "MongoDB: external (RECON_TEST_MONGODB_URI)"
    engine = default_mongo_engine()
    if engine == "mongod":
        return "MongoDB: embedded genuine mongod (one-node replica set)"
    return "MongoDB: embedded SecantusDB (the mongod wheel is not installed on this platform)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Session-wide hook: it sees every item, so filter on location.
    for item in items:
        if item.path.is_relative_to(_UNIT_DIR):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of a Kafka-protocol broker shared by the whole session."""
    external = os.environ.get("RECON_TEST_KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    with EmbeddedKafka(log_dir=tmp_path_factory.mktemp("kafka")) as kafka:
        yield kafka.bootstrap_servers


@pytest.fixture(scope="session")
def mongodb_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URI of a MongoDB server shared by the whole session."""
    external = os.environ.get("RECON_TEST_MONGODB_URI")
    if external:
        yield external
        return
    base = tmp_path_factory.mktemp("mongo")
    with EmbeddedMongo(data_dir=base / "data", log_dir=base) as mongo:
        yield mongo.uri


@pytest.fixture
def unique_name() -> str:
    """A short unique suffix for topics, group ids and database names."""
    return uuid.uuid4().hex[:10]
