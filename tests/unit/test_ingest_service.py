"""IngestService on in-memory fakes: what reaches the store and the topics, and when."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo.errors import AutoReconnect, OperationFailure

from recon_stream import ingest
from recon_stream.dead_letters import Rejected
from recon_stream.domain.heartbeats import (
    MAX_HEARTBEAT_BYTES,
    Heartbeat,
    parse_heartbeat,
)
from recon_stream.domain.messages import RejectReason
from recon_stream.domain.scan_requests import ScanReason, ScanRequest
from recon_stream.domain.sightings import PairKey, PairSighting
from recon_stream.ingest import TRIAGE_SLICE, WRITE_CHUNK, BatchReport, IngestService
from recon_stream.metrics import Metrics
from recon_stream.ports import Created
from recon_stream.retry import Backoff
from recon_stream.seen import SeenPairs

NOW = datetime(2024, 5, 1, 12, tzinfo=UTC)
LEASE = timedelta(seconds=60)
REFRESH = 300.0


# --- fakes -------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    value: bytes | None
    topic: str = "agent.heartbeats.v1"
    partition: int = 0
    offset: int = 0
    timestamp: int = 1_714_564_800_000
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes]] = ()


class Failures:
    """Exceptions to raise, in order, before the next calls of one operation do anything."""

    def __init__(self) -> None:
        self.pending: list[BaseException] = []
        self.raised = 0

    def check(self) -> None:
        if self.pending:
            self.raised += 1
            raise self.pending.pop(0)


@dataclass
class Pair:
    first_seen: datetime
    last_seen: datetime
    agents: dict[str, datetime]
    site_ids: set[str]
    state: str
    claim_until: datetime
    sent_at: datetime | None = None


class FakeOrgIps:
    """`OrgIpStore` on dicts, with MongoOrgIps' merge and outbox semantics."""

    def __init__(self) -> None:
        self.pairs: dict[PairKey, Pair] = {}
        self.recorded: list[list[PairKey]] = []
        self.marked: list[PairKey] = []
        self.record_failures = Failures()
        self.mark_failures = Failures()
        self.claim_failures = Failures()
        self.lose_reply_once = False

    async def record(self, sightings: Sequence[PairSighting], now: datetime) -> Created:
        # A pair's key serves as its document id.
        self.record_failures.check()
        self.recorded.append([s.key for s in sightings])
        created: Created = {}
        for s in sightings:
            agents = {a.agent_id: a.last_seen for a in s.agents.values()}
            pair = self.pairs.get(s.key)
            if pair is None:
                created[s.key] = s.key
                self.pairs[s.key] = Pair(
                    s.first_seen, s.last_seen, agents, set(s.site_ids), "pending", now + LEASE
                )
                continue
            pair.first_seen = min(pair.first_seen, s.first_seen)
            pair.last_seen = max(pair.last_seen, s.last_seen)
            pair.site_ids |= s.site_ids
            for agent, seen in agents.items():
                pair.agents[agent] = max(seen, pair.agents.get(agent, seen))
        if self.lose_reply_once:
            # The write happened but the reply never arrived.
            self.lose_reply_once = False
            raise AutoReconnect("connection closed")
        return created

    async def mark_requested(self, ids: Collection[Any], now: datetime) -> None:
        self.mark_failures.check()
        for key in ids:
            self.marked.append(key)
            pair = self.pairs[key]
            if pair.state == "pending":
                pair.state, pair.sent_at = "sent", now

    async def claim_unsent(self, now: datetime, limit: int) -> Created:
        self.claim_failures.check()
        claimed = [
            key
            for key, pair in self.pairs.items()
            if pair.state == "pending" and pair.claim_until < now
        ][:limit]
        for key in claimed:
            self.pairs[key].claim_until = now + LEASE
        return {key: key for key in claimed}

    def pending(self) -> set[PairKey]:
        return {key for key, pair in self.pairs.items() if pair.state == "pending"}


class FakeScanRequests:
    def __init__(self) -> None:
        self.published: list[ScanRequest] = []
        self.contexts: list[Any] = []
        self.failures = Failures()

    async def publish(self, requests: Sequence[ScanRequest], contexts: Sequence[Any] = ()) -> None:
        self.failures.check()
        self.published.extend(requests)
        self.contexts.extend(contexts)

    def pairs(self) -> list[PairKey]:
        return [(r.organization_id, r.ip) for r in self.published]

    async def published_count(self, n: int) -> None:
        """Return once `n` requests have been published."""
        while len(self.published) < n:
            await asyncio.sleep(0)


class FakeDeadLetters:
    def __init__(self) -> None:
        self.published: list[Rejected] = []
        self.failures = Failures()

    async def publish(self, rejected: Sequence[Rejected]) -> None:
        self.failures.check()
        self.published.extend(rejected)


class Clock:
    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class MonotonicClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    store: FakeOrgIps = field(default_factory=FakeOrgIps)
    scan_requests: FakeScanRequests = field(default_factory=FakeScanRequests)
    dead_letters: FakeDeadLetters = field(default_factory=FakeDeadLetters)
    metrics: Metrics = field(default_factory=Metrics)
    clock: Clock = field(default_factory=Clock)
    monotonic: MonotonicClock = field(default_factory=MonotonicClock)
    cache_size: int = 1000
    outages: list[str] = field(default_factory=list)
    recoveries: int = 0
    service: IngestService = field(init=False)

    def __post_init__(self) -> None:
        self.service = IngestService(
            self.store,
            self.scan_requests,
            self.dead_letters,
            SeenPairs(self.cache_size, REFRESH, clock=self.monotonic),
            self.metrics,
            Backoff(0.0001, 0.001),
            clock=self.clock,
            on_outage=lambda dependency, _error: self.outages.append(dependency),
            on_recovery=self._recovered,
        )

    def _recovered(self) -> None:
        self.recoveries += 1

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@pytest.fixture
def h() -> Harness:
    return Harness()


def heartbeat(
    org: str = "org-1",
    ip: str = "8.8.8.8",
    agent: str = "agent-1",
    minute: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "organization_id": org,
        "agent_id": agent,
        "public_ip": ip,
        "observed_at": (NOW + timedelta(minutes=minute)).isoformat(),
        **extra,
    }


def records(*values: object) -> list[Record]:
    out = []
    for offset, value in enumerate(values):
        raw = value if isinstance(value, bytes | None) else json.dumps(value).encode()
        out.append(Record(raw, offset=offset))
    return out


def assert_adds_up(report: BatchReport) -> None:
    assert report.accepted + report.duplicate + report.non_public + report.invalid == report.records


# --- coalescing and the cache ------------------------------------------------


async def test_batch_with_repeats_writes_each_pair_once_and_requests_each_new_pair(
    h: Harness,
) -> None:
    batch = records(
        heartbeat("org-1", "8.8.8.8", "a1", 0),
        heartbeat("org-1", "8.8.8.8", "a1", 1),
        heartbeat("org-1", "8.8.8.8", "a2", 2, site_id="s1"),
        heartbeat("org-2", "8.8.8.8", "b1", 0),
        heartbeat("org-1", "1.1.1.1", "a1", 3),
        heartbeat("org-1", "1.1.1.1", "a1", 4),
        heartbeat("org-2", "8.8.8.8", "b1", 5),
    )
    report = await h.service.handle_batch(batch)

    expected = [("org-1", "1.1.1.1"), ("org-1", "8.8.8.8"), ("org-2", "8.8.8.8")]
    assert len(h.store.recorded) == 1
    assert sorted(h.store.recorded[0]) == expected
    assert sorted(h.scan_requests.pairs()) == expected
    for request in h.scan_requests.published:
        assert request.reason is ScanReason.NEW
        assert request.requested_at == NOW
        assert request.kafka_key() == request.ip.encode()
    await h.service.flush()  # the outbox is marked while the next batch runs
    assert h.store.pending() == set()
    assert sorted(h.store.marked) == expected
    pair = h.store.pairs["org-1", "8.8.8.8"]
    assert pair.agents == {"a1": NOW + timedelta(minutes=1), "a2": NOW + timedelta(minutes=2)}
    assert pair.site_ids == {"s1"}
    assert (pair.first_seen, pair.last_seen) == (NOW, NOW + timedelta(minutes=2))
    assert h.dead_letters.published == []

    assert report == BatchReport(
        records=7, accepted=3, duplicate=4, non_public=0, invalid=0, written=3, created=expected
    )
    assert h.sample("recon_pairs_discovered_total") == 3
    assert h.sample("recon_scan_requests_published_total", reason="new", path="ingest") == 3
    assert h.sample("recon_heartbeats_total", outcome="accepted") == 3
    assert h.sample("recon_heartbeats_total", outcome="duplicate") == 4


async def test_second_identical_batch_writes_and_publishes_nothing(h: Harness) -> None:
    batch = records(*(heartbeat(agent=f"a{i % 2}", minute=i) for i in range(6)))
    await h.service.handle_batch(batch)
    report = await h.service.handle_batch(batch)

    assert len(h.store.recorded) == 1
    assert len(h.scan_requests.published) == 1
    assert report == BatchReport(records=6, duplicate=6)
    assert h.sample("recon_ingest_cache_hits_total") == 6


async def test_a_pair_spread_over_triage_slices_is_written_once(h: Harness) -> None:
    count = 2 * TRIAGE_SLICE + 1
    batch = records(*(heartbeat(agent=f"a{i % 3}", minute=i) for i in range(count)))
    report = await h.service.handle_batch(batch)

    assert h.store.recorded == [[("org-1", "8.8.8.8")]]
    pair = h.store.pairs["org-1", "8.8.8.8"]
    assert (pair.first_seen, pair.last_seen) == (NOW, NOW + timedelta(minutes=count - 1))
    assert set(pair.agents) == {"a0", "a1", "a2"}
    assert report == BatchReport(
        records=count, accepted=1, duplicate=count - 1, written=1, created=[("org-1", "8.8.8.8")]
    )


async def test_a_large_batch_of_cache_hits_lets_the_event_loop_run(h: Harness) -> None:
    """Triage is CPU work; the consumer's fetches must progress during it."""
    await h.service.handle_batch(records(heartbeat()))
    turns = 0

    async def other_task() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    task = asyncio.create_task(other_task())
    await asyncio.sleep(0)
    before = turns
    report = await h.service.handle_batch(
        records(*(heartbeat(minute=i) for i in range(4 * TRIAGE_SLICE)))
    )
    during = turns - before
    task.cancel()
    assert report.duplicate == 4 * TRIAGE_SLICE
    assert during >= 3


async def test_new_agent_on_a_cached_pair_triggers_a_write(h: Harness) -> None:
    await h.service.handle_batch(records(heartbeat(agent="a1")))
    report = await h.service.handle_batch(records(heartbeat(agent="a1"), heartbeat(agent="a2")))

    assert h.store.recorded == [[("org-1", "8.8.8.8")], [("org-1", "8.8.8.8")]]
    assert set(h.store.pairs["org-1", "8.8.8.8"].agents) == {"a1", "a2"}
    assert report.accepted == 1
    assert report.duplicate == 1
    assert report.written == 1
    assert report.created == []
    assert len(h.scan_requests.published) == 1  # the pair is not new


async def test_new_site_on_a_cached_pair_triggers_a_write(h: Harness) -> None:
    await h.service.handle_batch(records(heartbeat(site_id="s1")))
    await h.service.handle_batch(records(heartbeat(site_id="s1")))
    assert len(h.store.recorded) == 1
    await h.service.handle_batch(records(heartbeat(site_id="s2")))
    assert len(h.store.recorded) == 2
    assert h.store.pairs["org-1", "8.8.8.8"].site_ids == {"s1", "s2"}


async def test_cached_pair_is_written_again_after_the_refresh_interval(h: Harness) -> None:
    await h.service.handle_batch(records(heartbeat(minute=0)))
    h.monotonic.now += REFRESH - 1
    await h.service.handle_batch(records(heartbeat(minute=4)))
    assert len(h.store.recorded) == 1
    h.monotonic.now += 1
    await h.service.handle_batch(records(heartbeat(minute=5)))
    assert len(h.store.recorded) == 2
    assert h.store.pairs["org-1", "8.8.8.8"].last_seen == NOW + timedelta(minutes=5)
    assert len(h.scan_requests.published) == 1


async def test_without_a_cache_every_batch_writes_but_requests_only_once() -> None:
    h = Harness(cache_size=0)
    for _ in range(3):
        report = await h.service.handle_batch(records(heartbeat(), heartbeat()))
        assert (report.accepted, report.duplicate) == (1, 1)
    assert len(h.store.recorded) == 3
    assert len(h.scan_requests.published) == 1


async def test_spellings_of_one_address_are_one_pair(h: Harness) -> None:
    report = await h.service.handle_batch(
        records(
            heartbeat(ip="8.8.8.8", agent="a1"),
            heartbeat(ip="::ffff:8.8.8.8", agent="a2"),
            heartbeat(ip="2606:4700:4700::1111", agent="a1"),
            heartbeat(ip="2606:4700:4700:0:0:0:0:1111", agent="a2"),
            heartbeat(ip="2606:4700:4700::1111".upper(), agent="a3"),
        )
    )
    assert sorted(h.store.pairs) == [("org-1", "2606:4700:4700::1111"), ("org-1", "8.8.8.8")]
    assert set(h.store.pairs["org-1", "8.8.8.8"].agents) == {"a1", "a2"}
    assert set(h.store.pairs["org-1", "2606:4700:4700::1111"].agents) == {"a1", "a2", "a3"}
    assert sorted(h.scan_requests.pairs()) == sorted(h.store.pairs)
    assert (report.accepted, report.duplicate) == (2, 3)

    # Every spelling is now cached.
    again = await h.service.handle_batch(records(heartbeat(ip="::FFFF:8.8.8.8", agent="a2")))
    assert len(h.store.recorded) == 2  # a new spelling is a cache miss, written once more
    assert again.created == []
    assert len(h.scan_requests.published) == 2


# --- non-public and invalid records ------------------------------------------

NON_PUBLIC = {
    "10.1.2.3": "private",
    "192.168.0.10": "private",
    "127.0.0.1": "loopback",
    "169.254.10.10": "link_local",
    "100.64.3.4": "cgnat",
    "224.0.0.251": "multicast",
    "240.0.0.1": "reserved",
    "203.0.113.9": "documentation",
    "2001:db8::1": "documentation",
    "fd00::1": "private",
    "fe80::1": "link_local",
    "::1": "loopback",
    "::ffff:10.0.0.1": "private",
}


async def test_non_public_addresses_never_reach_the_store_or_the_scanner(h: Harness) -> None:
    batch = records(*(heartbeat(ip=ip) for ip in NON_PUBLIC), heartbeat(ip="9.9.9.9"))
    for _ in range(2):  # the second time from the cache
        report = await h.service.handle_batch(batch)
        assert report.non_public == len(NON_PUBLIC)
        assert_adds_up(report)
    assert list(h.store.pairs) == [("org-1", "9.9.9.9")]
    assert h.scan_requests.pairs() == [("org-1", "9.9.9.9")]
    assert h.dead_letters.published == []
    for cls in set(NON_PUBLIC.values()):
        expected = 2 * sum(1 for c in NON_PUBLIC.values() if c == cls)
        assert h.sample("recon_heartbeats_non_public_total", address_class=cls) == expected
    assert h.sample("recon_heartbeats_total", outcome="non_public") == 2 * len(NON_PUBLIC)


INVALID: list[tuple[bytes | None, RejectReason]] = [
    (None, RejectReason.EMPTY),
    (b"", RejectReason.EMPTY),
    (b"{not json", RejectReason.INVALID_JSON),
    (b"\xff\xfe", RejectReason.INVALID_JSON),
    (json.dumps(heartbeat(agent="has space")).encode(), RejectReason.SCHEMA),
    (json.dumps({"organization_id": "org-1"}).encode(), RejectReason.SCHEMA),
    (json.dumps(heartbeat(observed_at="2024-05-01T12:00:00")).encode(), RejectReason.SCHEMA),
    (json.dumps([heartbeat()]).encode(), RejectReason.SCHEMA),
    (json.dumps(heartbeat(ip="not-an-ip")).encode(), RejectReason.INVALID_IP),
    (json.dumps(heartbeat(ip="8.8.8.8/32")).encode(), RejectReason.INVALID_IP),
    (json.dumps(heartbeat(ip="fe80::1%eth0")).encode(), RejectReason.INVALID_IP),
    (
        json.dumps(heartbeat(padding="x" * MAX_HEARTBEAT_BYTES)).encode(),
        RejectReason.TOO_LARGE,
    ),
]


async def test_invalid_records_go_to_the_dead_letter_sink_and_the_rest_proceeds(
    h: Harness,
) -> None:
    values: list[object] = [heartbeat(ip="8.8.8.8")]
    for value, _ in INVALID:
        values += [value, heartbeat(ip="1.1.1.1", agent="a2")]
    batch = records(*values)
    report = await h.service.handle_batch(batch)

    rejected = h.dead_letters.published
    assert [r.reason for r in rejected] == [reason for _, reason in INVALID]
    # The record goes to the DLQ unchanged.
    assert [r.record for r in rejected] == [rec for rec in batch if rec.offset % 2 == 1]
    assert all(r.record.value == value for r, (value, _) in zip(rejected, INVALID, strict=True))
    assert all(r.detail for r in rejected)
    assert sorted(h.store.pairs) == [("org-1", "1.1.1.1"), ("org-1", "8.8.8.8")]
    assert sorted(h.scan_requests.pairs()) == sorted(h.store.pairs)
    assert report.invalid == len(INVALID)
    assert_adds_up(report)
    for _, reason in INVALID:
        expected = sum(1 for _, r in INVALID if r is reason)
        assert h.sample("recon_dlq_messages_total", reason=reason.value) == expected


def _raw_heartbeat(member: bytes) -> bytes:
    return json.dumps(heartbeat())[:-1].encode() + b", " + member + b"}"


@pytest.mark.parametrize(
    "bad",
    [
        heartbeat(hostname="h" * 300),
        heartbeat(event_id=""),
        heartbeat(schema_version=2),
        {**heartbeat(), "observed_at": "2024-02-30T12:00:00Z"},
        {**heartbeat(), "observed_at": "2024-05-01T12:00:00"},
        _raw_heartbeat(b'"extra": "\xff"'),
        _raw_heartbeat(b'"extra": ' + b"[" * 250 + b"]" * 250),
    ],
    ids=[
        "long hostname",
        "empty event id",
        "version 2",
        "February 30",
        "no offset",
        "invalid UTF-8",
        "too deep",
    ],
)
async def test_a_bad_record_on_a_cached_pair_still_goes_to_the_dlq(h: Harness, bad: object) -> None:
    await h.service.handle_batch(records(heartbeat()))
    report = await h.service.handle_batch(records(heartbeat(), bad))
    assert len(h.dead_letters.published) == 1
    assert h.dead_letters.published[0].reason in {RejectReason.SCHEMA, RejectReason.INVALID_JSON}
    assert (report.duplicate, report.invalid) == (1, 1)


async def test_cache_hits_skip_the_full_validation(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = records(*(heartbeat(agent=f"a{i % 3}", minute=i, site_id="s1") for i in range(9)))
    await h.service.handle_batch(batch)
    full_parses: list[object] = []

    def counting_parse(raw: bytes | None) -> Heartbeat:
        full_parses.append(raw)
        return parse_heartbeat(raw)

    monkeypatch.setattr(ingest, "parse_heartbeat", counting_parse)
    report = await h.service.handle_batch(
        records(*(heartbeat(agent=f"a{i % 3}", minute=60 + i, site_id="s1") for i in range(9)))
    )
    assert report == BatchReport(records=9, duplicate=9)
    assert full_parses == []
    await h.service.handle_batch(records(heartbeat(agent="a4", site_id="s1")))
    assert len(full_parses) == 1


async def test_an_all_invalid_batch_touches_no_store(h: Harness) -> None:
    report = await h.service.handle_batch(records(b"", b"nope"))
    assert h.store.recorded == []
    assert h.scan_requests.published == []
    assert len(h.dead_letters.published) == 2
    assert report == BatchReport(records=2, invalid=2)


async def test_empty_batch(h: Harness) -> None:
    assert await h.service.handle_batch([]) == BatchReport()
    assert h.store.recorded == []


# --- outages and errors --------------------------------------------------------


async def test_transient_store_outage_is_retried_and_nothing_is_lost(h: Harness) -> None:
    h.store.record_failures.pending = [AutoReconnect("primary stepped down")] * 3
    h.store.mark_failures.pending = [AutoReconnect("connection reset")]
    batch = records(heartbeat(agent="a1"), heartbeat(agent="a2"), heartbeat(ip="1.1.1.1"))
    report = await h.service.handle_batch(batch)
    await h.service.flush()

    assert h.store.record_failures.raised == 3
    assert h.store.mark_failures.raised == 1
    assert sorted(h.store.pairs) == [("org-1", "1.1.1.1"), ("org-1", "8.8.8.8")]
    assert set(h.store.pairs["org-1", "8.8.8.8"].agents) == {"a1", "a2"}
    assert sorted(h.scan_requests.pairs()) == sorted(h.store.pairs)
    assert h.store.pending() == set()
    assert report.written == 2
    assert h.outages == ["mongodb"] * 4
    assert h.sample("recon_dependency_retries_total", dependency="mongodb") == 4
    assert h.recoveries >= 1


async def test_transient_kafka_outage_is_retried_and_nothing_is_lost(h: Harness) -> None:
    h.scan_requests.failures.pending = [KafkaConnectionError("broker down")] * 2
    h.dead_letters.failures.pending = [KafkaConnectionError("broker down")]
    await h.service.handle_batch(records(heartbeat(), b"garbage"))
    await h.service.flush()

    assert h.scan_requests.pairs() == [("org-1", "8.8.8.8")]
    assert [r.reason for r in h.dead_letters.published] == [RejectReason.INVALID_JSON]
    assert h.store.pending() == set()
    assert h.outages == ["kafka"] * 3
    assert h.sample("recon_dependency_retries_total", dependency="kafka") == 3


async def test_write_whose_reply_was_lost_is_still_requested_via_the_relay(h: Harness) -> None:
    h.store.lose_reply_once = True
    await h.service.handle_batch(records(heartbeat()))
    # The retry found the pair already there, so the ingest path did not announce it...
    assert h.scan_requests.published == []
    assert h.store.pending() == {("org-1", "8.8.8.8")}
    # ...and the outbox relay does, once the lease has run out.
    assert await h.service.relay_unsent() == 0
    h.clock.now = NOW + LEASE + timedelta(seconds=1)
    assert await h.service.relay_unsent() == 1
    assert h.scan_requests.pairs() == [("org-1", "8.8.8.8")]
    assert h.store.pending() == set()


@pytest.mark.parametrize(
    "error",
    [
        ValueError("a bug"),
        OperationFailure("document failed validation", code=121),
    ],
)
async def test_non_transient_store_error_propagates_and_the_batch_can_be_redelivered(
    h: Harness, error: Exception
) -> None:
    h.store.record_failures.pending = [error]
    batch = records(heartbeat())
    with pytest.raises(type(error)):
        await h.service.handle_batch(batch)
    assert h.store.record_failures.raised == 1
    assert h.scan_requests.published == []
    assert h.outages == []

    # Redelivery: the cache did not pretend the failed write happened.
    await h.service.handle_batch(batch)
    assert h.scan_requests.pairs() == [("org-1", "8.8.8.8")]


async def test_crash_between_upsert_and_publish_still_sends_the_request(h: Harness) -> None:
    h.scan_requests.failures.pending = [RuntimeError("serializer bug")]
    batch = records(heartbeat())
    with pytest.raises(RuntimeError):
        await h.service.handle_batch(batch)
    assert h.store.pending() == {("org-1", "8.8.8.8")}

    await h.service.handle_batch(batch)  # redelivered: the pair is no longer new
    assert h.scan_requests.published == []
    h.clock.now = NOW + LEASE + timedelta(seconds=1)
    assert await h.service.relay_unsent() == 1
    assert h.scan_requests.pairs() == [("org-1", "8.8.8.8")]
    assert h.store.pending() == set()


async def test_the_batch_returns_before_its_outbox_is_marked_and_marks_run_one_at_a_time(
    h: Harness,
) -> None:
    release = asyncio.Event()
    marking = h.store.mark_requested

    async def slow_mark(ids: Collection[Any], now: datetime) -> None:
        await release.wait()
        await marking(ids, now)

    h.store.mark_requested = slow_mark  # type: ignore[method-assign]
    await h.service.handle_batch(records(heartbeat(ip="8.8.8.8")))
    # Published and returned (so the batch can be committed), not yet marked.
    assert h.scan_requests.pairs() == [("org-1", "8.8.8.8")]
    assert h.store.pending() == {("org-1", "8.8.8.8")}

    second = asyncio.create_task(h.service.handle_batch(records(heartbeat(ip="1.1.1.1"))))
    await asyncio.wait_for(h.scan_requests.published_count(2), timeout=5)
    assert not second.done(), "a second marking started while the first was in progress"
    release.set()
    await second
    await h.service.flush()
    assert h.store.pending() == set()


async def test_a_failed_marking_leaves_the_pairs_to_the_relay(h: Harness) -> None:
    h.store.mark_failures.pending = [ValueError("a bug")]
    await h.service.handle_batch(records(heartbeat()))
    await h.service.flush()  # logged, not raised: the outbox still says pending
    assert h.store.pending() == {("org-1", "8.8.8.8")}
    h.clock.now = NOW + LEASE + timedelta(seconds=1)
    assert await h.service.relay_unsent() == 1
    assert h.store.pending() == set()


async def test_a_large_batch_is_written_in_chunks_each_pair_once(h: Harness) -> None:
    n = WRITE_CHUNK * 2 + 7
    batch = records(*(heartbeat(ip=f"8.8.{i // 250}.{i % 250 + 1}") for i in range(n)))
    report = await h.service.handle_batch(batch)
    await h.service.flush()
    assert [len(chunk) for chunk in h.store.recorded] == [WRITE_CHUNK, WRITE_CHUNK, 7]
    assert len(report.created) == n == len(set(h.scan_requests.pairs()))
    assert h.store.pending() == set()


async def test_a_failing_chunk_cancels_the_others_and_raises_its_own_error(h: Harness) -> None:
    h.store.record_failures.pending = [ValueError("a bug")]
    batch = records(
        *(heartbeat(ip=f"8.8.{i // 250}.{i % 250 + 1}") for i in range(WRITE_CHUNK * 2))
    )
    with pytest.raises(ValueError, match="a bug"):
        await h.service.handle_batch(batch)
    # Redelivery writes everything; pairs the other chunk created go out via the relay.
    await h.service.handle_batch(batch)
    h.clock.now = NOW + LEASE + timedelta(seconds=1)
    await h.service.relay_unsent(limit=10_000)
    await h.service.flush()
    assert len(set(h.scan_requests.pairs())) == WRITE_CHUNK * 2
    assert h.store.pending() == set()


async def test_retry_is_cancelled_cleanly(h: Harness) -> None:
    h.store.record_failures.pending = [AutoReconnect("down")] * 10_000
    task = asyncio.create_task(h.service.handle_batch(records(heartbeat())))
    while h.store.record_failures.raised < 3:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.scan_requests.published == []


# --- the relay -----------------------------------------------------------------


def _pending_pair(store: FakeOrgIps, key: PairKey, claim_until: datetime) -> None:
    store.pairs[key] = Pair(NOW, NOW, {"a1": NOW}, set(), "pending", claim_until)


async def test_relay_republishes_what_the_store_hands_out_and_marks_it_requested(
    h: Harness,
) -> None:
    expired = [("org-1", "8.8.8.8"), ("org-2", "1.1.1.1")]
    for key in expired:
        _pending_pair(h.store, key, NOW - timedelta(seconds=1))
    _pending_pair(h.store, ("org-3", "9.9.9.9"), NOW + timedelta(seconds=30))  # lease running

    assert await h.service.relay_unsent() == 2
    assert sorted(h.scan_requests.pairs()) == sorted(expired)
    assert all(r.reason is ScanReason.NEW for r in h.scan_requests.published)
    assert all(r.requested_at == NOW for r in h.scan_requests.published)
    assert sorted(h.store.marked) == sorted(expired)
    assert h.store.pending() == {("org-3", "9.9.9.9")}
    assert h.sample("recon_scan_requests_published_total", reason="new", path="relay") == 2
    assert await h.service.relay_unsent() == 0


async def test_relay_respects_the_limit(h: Harness) -> None:
    for i in range(5):
        _pending_pair(h.store, ("org-1", f"8.8.8.{i}"), NOW - timedelta(seconds=1))
    assert await h.service.relay_unsent(limit=2) == 2
    assert len(h.scan_requests.published) == 2
    assert await h.service.relay_unsent(limit=10) == 3
    assert len(set(h.scan_requests.pairs())) == 5


async def test_relay_retries_outages(h: Harness) -> None:
    _pending_pair(h.store, ("org-1", "8.8.8.8"), NOW - timedelta(seconds=1))
    h.store.claim_failures.pending = [AutoReconnect("down")]
    h.scan_requests.failures.pending = [KafkaConnectionError("down")]
    assert await h.service.relay_unsent() == 1
    assert h.scan_requests.pairs() == [("org-1", "8.8.8.8")]
    assert h.outages == ["mongodb", "kafka"]


async def test_run_relay_survives_errors_until_cancelled(h: Harness) -> None:
    _pending_pair(h.store, ("org-1", "8.8.8.8"), NOW - timedelta(seconds=1))
    h.store.claim_failures.pending = [RuntimeError("a bug")]
    task = asyncio.create_task(h.service.run_relay(interval=0.001))
    for _ in range(1000):
        if h.scan_requests.published:
            break
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.store.claim_failures.raised == 1
    assert h.scan_requests.pairs() == [("org-1", "8.8.8.8")]


# --- the report adds up, whatever the batch ------------------------------------

record_values = st.one_of(
    st.builds(
        lambda org, ip, agent, minute, site: json.dumps(
            heartbeat(org, ip, agent, minute, **({"site_id": site} if site else {}))
        ).encode(),
        st.sampled_from(["org-1", "org-2"]),
        st.sampled_from(["8.8.8.8", "::ffff:8.8.8.8", "1.1.1.1", "2606:4700::1", "10.0.0.1"]),
        st.sampled_from(["a1", "a2", "a3"]),
        st.integers(0, 10),
        st.none() | st.sampled_from(["s1", "s2"]),
    ),
    st.sampled_from([value for value, _ in INVALID]),
)


@given(st.lists(st.lists(record_values, max_size=25), min_size=1, max_size=4))
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_batch_report_counts_add_up(batches: list[list[bytes | None]]) -> None:
    h = Harness()

    async def run() -> list[BatchReport]:
        return [await h.service.handle_batch(records(*batch)) for batch in batches]

    async def run_and_flush() -> list[BatchReport]:
        reports = await run()
        await h.service.flush()
        return reports

    reports = asyncio.run(run_and_flush())
    for report, batch in zip(reports, batches, strict=True):
        assert report.records == len(batch)
        assert_adds_up(report)
        assert report.written == report.accepted
    assert sum(r.invalid for r in reports) == len(h.dead_letters.published)
    assert sum(r.written for r in reports) == sum(len(w) for w in h.store.recorded)
    # Every public pair is stored and requested exactly once; nothing is left pending.
    created = [key for r in reports for key in r.created]
    assert sorted(created) == sorted(h.store.pairs)
    assert sorted(h.scan_requests.pairs()) == sorted(h.store.pairs)
    assert h.store.pending() == set()
    assert all(ip != "10.0.0.1" for _, ip in h.store.pairs)
