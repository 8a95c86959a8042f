"""The scope file in IngestService, on fakes: a pair new to the worker that the scope
excludes is counted `excluded`, stored with the reason and never announced."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from recon_stream.domain.scope import parse_scope
from recon_stream.domain.sightings import PairKey, PairSighting
from recon_stream.ingest import IngestService
from recon_stream.metrics import Metrics
from recon_stream.ports import Created
from recon_stream.retry import Backoff
from recon_stream.seen import SeenPairs
from tests.unit.test_ingest_service import (
    FakeDeadLetters,
    FakeOrgIps,
    FakeScanRequests,
    heartbeat,
    records,
)

SCOPE = parse_scope(
    "version: 1\norganizations:\n  org-1:\n    exclude: [{cidr: 8.8.8.0/24, reason: guest}]\n"
)


class ScopedOrgIps(FakeOrgIps):
    def __init__(self) -> None:
        super().__init__()
        self.excluded: dict[PairKey, str] = {}

    async def record(
        self,
        sightings: Sequence[PairSighting],
        now: datetime,
        excluded: Mapping[PairKey, str] | None = None,
    ) -> Created:
        created = await super().record(sightings, now)
        for key in created:
            if excluded and key in excluded:
                self.excluded[key] = excluded[key]
        return created


def service(store: ScopedOrgIps, requests: FakeScanRequests, metrics: Metrics) -> IngestService:
    return IngestService(
        store,
        requests,
        FakeDeadLetters(),
        SeenPairs(1000, 300.0),
        metrics,
        Backoff(0.0001, 0.001),
        scope=SCOPE,
    )


def count(metrics: Metrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("recon_heartbeats_total", {"outcome": outcome}) or 0


async def test_excluded_new_pairs_are_counted_stored_and_not_announced() -> None:
    store, requests, metrics = ScopedOrgIps(), FakeScanRequests(), Metrics()
    ingest = service(store, requests, metrics)
    batch: list[Any] = [
        heartbeat("org-1", "8.8.8.8", "a1"),
        heartbeat("org-1", "8.8.8.8", "a2"),
        heartbeat("org-2", "8.8.8.8", "a3"),
    ]
    report = await ingest.handle_batch(records(*batch))
    await ingest.flush()
    assert report.excluded == 2
    assert report.accepted == 1
    assert store.excluded == {("org-1", "8.8.8.8"): "guest"}
    assert requests.pairs() == [("org-2", "8.8.8.8")]
    assert count(metrics, "excluded") == 2
    # Known now: the next heartbeats are cache hits, the scope is not asked again.
    again = await ingest.handle_batch(records(heartbeat("org-1", "8.8.8.8", "a1")))
    assert again.duplicate == 1
    assert requests.pairs() == [("org-2", "8.8.8.8")]


async def test_an_excluded_pairs_later_heartbeats_from_new_agents_stay_excluded() -> None:
    """A heartbeat of a known excluded pair that still needs a write (a new agent, in a
    later batch) is counted `excluded` as the first was, and never announced."""
    store, requests, metrics = ScopedOrgIps(), FakeScanRequests(), Metrics()
    ingest = service(store, requests, metrics)
    await ingest.handle_batch(records(heartbeat("org-1", "8.8.8.8", "a1")))
    later = await ingest.handle_batch(records(heartbeat("org-1", "8.8.8.8", "a2")))
    await ingest.flush()
    assert (later.excluded, later.accepted) == (1, 0)
    assert count(metrics, "excluded") == 2
    assert count(metrics, "accepted") == 0
    assert requests.pairs() == []
