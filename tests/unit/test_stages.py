"""The scanner, commands, scheduler and outbox stages on the fakes of `tests/fakes.py`:
what each asks of its ports and what it publishes. The same behaviour on real servers
is in `tests/integration/`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from recon_stream.domain.messages import RejectReason
from recon_stream.domain.scan_requests import ScanReason
from recon_stream.domain.scans import HostScan, Service
from recon_stream.domain.snapshot import OrgContext
from recon_stream.providers import Permanent, RateLimited, Transient, Unauthorized
from recon_stream.scanner import KeyGate, ScannerService
from recon_stream.scheduler import Scheduler
from tests.fakes import FakeBudget, FakeLease, FakeProvider, FakeRecord, Parts, request

pytestmark = pytest.mark.unit

IP, OTHER = "203.0.113.9", "198.51.100.20"
RDP = Service(port=3389, module="rdp")
WEB = Service(port=443, module="https", product="nginx")


def now() -> datetime:
    return datetime.now(UTC)


def scanner(parts: Parts, provider: FakeProvider, reuse_age: float = 3600.0) -> ScannerService:
    return ScannerService(
        parts.queue,
        provider,
        FakeBudget(),
        parts.ip_scans,
        parts.org_ips,
        parts.outbox,
        parts.dead_letters,
        parts.metrics,
        parts.retrying,
        KeyGate(),
        reuse_age=reuse_age,
    )


def host(ip: str, *services: Service) -> HostScan:
    return HostScan(ip=ip, provider="api", queried_at=now(), services=services)


# -- scanner ------------------------------------------------------------------------


async def test_one_lookup_serves_every_organization_behind_the_ip() -> None:
    parts, provider = Parts(), FakeProvider()
    parts.org_ips.add("acme", IP)
    parts.org_ips.add("globex", IP)
    provider.hosts[IP] = host(IP, RDP)
    service = scanner(parts, provider)
    await service.accept([FakeRecord(request("acme", IP).model_dump_json().encode())])
    item = await parts.queue.claim(timedelta(minutes=1))
    assert item is not None
    await service.process(item)
    assert provider.lookups == [IP]
    events = parts.events.published
    assert sorted((e.data.organization_id, e.data.change.value) for e in events) == [
        ("acme", "opened"),
        ("globex", "opened"),
    ]
    assert set(parts.history.entries) == {e.id for e in events}  # history before events
    assert parts.ocsf.published == events
    assert [row.key for row in parts.state.published] == [
        f"acme/{IP}/tcp/3389",
        f"globex/{IP}/tcp/3389",
    ]
    assert parts.queue.completed == [IP]
    assert not any(parts.snapshots.pending.values())  # the outbox was cleared
    assert (await parts.ip_scans.get(IP)) == provider.hosts[IP]


async def test_a_fresh_stored_lookup_serves_a_new_organization_without_asking_again() -> None:
    parts, provider = Parts(), FakeProvider()
    parts.org_ips.add("acme", IP)
    await parts.ip_scans.put(host(IP, WEB))
    service = scanner(parts, provider)
    await parts.queue.enqueue([request("acme", IP)])
    item = await parts.queue.claim(timedelta(minutes=1))
    assert item is not None
    await service.process(item)
    assert provider.lookups == []
    assert [e.data.port for e in parts.events.published] == [443]


async def test_a_rescan_never_reuses_a_lookup_made_before_it_was_asked_for() -> None:
    parts, provider = Parts(), FakeProvider()
    parts.org_ips.add("acme", IP)
    await parts.ip_scans.put(host(IP, WEB).model_copy(update={"queried_at": now() - timedelta(1)}))
    provider.hosts[IP] = host(IP)
    service = scanner(parts, provider)
    await parts.queue.enqueue([request("acme", IP, ScanReason.MANUAL, now())])
    item = await parts.queue.claim(timedelta(minutes=1))
    assert item is not None
    await service.process(item)
    assert provider.lookups == [IP]


@pytest.mark.parametrize(
    ("error", "shortest", "longest"),
    [
        # The first retry of a lookup waits up to 2 s (full jitter).
        (Transient("Unable to connect to Shodan"), 0.0, 2.0),
        (RateLimited("Request rate limit reached", retry_after=30.0), 30.0, 30.0),
        # A permanent refusal waits a rescan interval (the fake's: an hour).
        (Permanent("Invalid IP", status=400), 3600.0, 3600.0),
    ],
)
async def test_a_failed_lookup_is_given_back_for_later_never_dropped(
    error: Exception, shortest: float, longest: float
) -> None:
    parts, provider = Parts(), FakeProvider()
    parts.org_ips.add("acme", IP)
    provider.errors[IP] = error  # type: ignore[assignment]
    service = scanner(parts, provider)
    await parts.queue.enqueue([request("acme", IP)])
    item = await parts.queue.claim(timedelta(minutes=1))
    assert item is not None
    await service.process(item)
    ((ip, waited, recorded),) = parts.queue.retried
    assert ip == IP
    assert shortest <= waited <= longest
    assert (recorded is not None) == isinstance(error, Permanent)
    assert IP in parts.queue.items  # still queued
    assert parts.events.published == []


async def test_a_rejected_key_closes_the_gate_and_gives_the_ip_back() -> None:
    parts, provider = Parts(), FakeProvider()
    provider.errors[IP] = Unauthorized("Invalid API key")
    service = scanner(parts, provider)
    await parts.queue.enqueue([request("acme", IP)])
    item = await parts.queue.claim(timedelta(minutes=1))
    assert item is not None
    await service.process(item)
    assert not service.gate.is_open
    assert service.gate.reason is not None
    assert "rejected the API key" in service.gate.reason
    assert IP in parts.queue.items
    assert IP not in parts.queue.claimed


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", RejectReason.EMPTY),
        (b"not json", RejectReason.INVALID_JSON),
        (b'{"ip": "203.0.113.9"}', RejectReason.SCHEMA),
        (b"x" * (64 * 1024 + 1), RejectReason.TOO_LARGE),
    ],
)
async def test_a_bad_scan_request_goes_to_the_dlq_with_the_reason_a_heartbeat_gets(
    value: bytes, reason: RejectReason
) -> None:
    from recon_stream.domain.heartbeats import InvalidHeartbeat, parse_heartbeat

    parts = Parts()
    service = scanner(parts, FakeProvider())
    good = FakeRecord(request("acme", IP).model_dump_json().encode(), offset=1)
    assert await service.accept([FakeRecord(value), good]) == 1
    ((rejected,),) = [parts.dead_letters.rejected]
    assert rejected.reason is reason
    with pytest.raises(InvalidHeartbeat) as heartbeat:
        parse_heartbeat(value)
    assert heartbeat.value.reason is reason  # the same bytes, the same reason
    assert list(parts.queue.items) == [IP]


# -- commands -------------------------------------------------------------------------


def command(kind: str, **fields: Any) -> FakeRecord:
    body = {
        "command": kind,
        "organization_id": "acme",
        "requested_by": "tech@msp",
        "requested_at": now().isoformat(),
        **fields,
    }
    return FakeRecord(json.dumps(body).encode())


async def open_rdp(parts: Parts) -> None:
    parts.org_ips.add("acme", IP)
    await parts.outbox.publish(
        await parts.updater.apply(OrgContext("acme", ("a",), ()), host(IP, RDP))
    )


async def test_accept_changes_the_open_exposure_once_per_command_id() -> None:
    parts = Parts()
    await open_rdp(parts)
    service = parts.command_service()
    accept = command("accept", ip=IP, port=3389, reason="jump host", command_id="c-1")
    assert await service.handle([accept, accept]) == 2  # the second is a duplicate
    changed = [e for e in parts.events.published if e.data.change.value == "changed"]
    assert [(e.data.reason, e.data.changed_fields) for e in changed] == [
        ("accepted", ("accepted",))
    ]
    assert "c-1" in parts.command_log.marked


async def test_unaccept_takes_the_acceptance_back() -> None:
    parts = Parts()
    await open_rdp(parts)
    service = parts.command_service()
    await service.handle([command("accept", port=3389, reason="everywhere")])
    await service.handle([command("unaccept", port=3389)])
    reasons = [e.data.reason for e in parts.events.published if e.data.change.value == "changed"]
    assert reasons == ["accepted", "unaccepted"]
    assert parts.acceptances.kept == {}


async def test_a_rescan_queues_a_manual_request_for_the_orgs_own_ips_only() -> None:
    parts = Parts()
    parts.org_ips.add("acme", IP)
    service = parts.command_service()
    await service.handle([command("rescan", ip=OTHER), command("rescan")])
    (rejected,) = parts.dead_letters.rejected
    assert rejected.reason is RejectReason.UNKNOWN_TARGET
    assert list(parts.queue.items) == [IP]
    assert parts.queue.items[IP].reasons == ("manual",)


async def test_an_invalid_command_goes_to_the_dlq_and_the_batch_goes_on() -> None:
    parts = Parts()
    parts.org_ips.add("acme", IP)
    service = parts.command_service()
    applied = await service.handle(
        [FakeRecord(b"{"), command("accept", port=70000, reason="x"), command("rescan")]
    )
    assert applied == 1
    assert [r.reason for r in parts.dead_letters.rejected] == [
        RejectReason.INVALID_JSON,
        RejectReason.SCHEMA,
    ]


# -- scheduler ------------------------------------------------------------------------


def scheduler(parts: Parts, retention: float = 3600.0) -> Scheduler:
    return Scheduler(
        FakeLease(),
        parts.ip_scans,
        parts.org_ips,
        parts.acceptances,
        parts.outbox,
        parts.requests,
        parts.metrics,
        parts.retrying,
        rescan_interval=600.0,
        retention=retention,
    )


async def test_a_due_ip_gets_one_rescan_request_per_organization_still_using_it() -> None:
    parts, at = Parts(), now()
    parts.org_ips.add("acme", IP, last_seen=at)
    parts.org_ips.add("globex", IP, last_seen=at)
    await parts.ip_scans.put(host(IP).model_copy(update={"queried_at": at - timedelta(hours=2)}))
    assert await scheduler(parts).request_rescans(at) == 2
    assert sorted((r.organization_id, r.reason.value) for r in parts.requests.published) == [
        ("acme", "rescan"),
        ("globex", "rescan"),
    ]
    assert parts.ip_scans.next_scan[IP] == at + timedelta(seconds=600)  # not due again at once


async def test_a_pair_unused_for_the_retention_closes_its_exposures() -> None:
    parts = Parts()
    await open_rdp(parts)
    parts.org_ips.pairs[("acme", IP)]["last_seen"] = now() - timedelta(hours=2)
    assert await scheduler(parts).retire_unused(now()) == 1
    closed = parts.events.published[-1]
    assert (closed.data.change.value, closed.data.reason) == ("closed", "ip_retired")
    assert await scheduler(parts).retire_unused(now()) == 0  # idempotent


async def test_an_expired_acceptance_is_applied_then_forgotten() -> None:
    parts = Parts()
    await open_rdp(parts)
    service = parts.command_service()
    soon = now() + timedelta(seconds=1)
    await service.handle(
        [command("accept", ip=IP, port=3389, reason="change window", expires_at=soon.isoformat())]
    )
    assert await scheduler(parts).expire_acceptances(soon + timedelta(seconds=1)) == 1
    last = parts.events.published[-1]
    assert (last.data.reason, last.data.accepted) == ("acceptance_expired", False)
    assert parts.acceptances.kept == {}


# -- outbox ---------------------------------------------------------------------------


async def test_an_outage_while_publishing_is_waited_out_and_reported() -> None:
    parts = Parts()
    parts.org_ips.add("acme", IP)
    outbox = await parts.updater.apply(OrgContext("acme", ("a",), ()), host(IP, RDP))
    parts.events.failures = 2
    await parts.outbox.publish(outbox)
    assert parts.outages == ["kafka", "kafka"]
    assert [e.id for e in parts.events.published] == [e.id for e in outbox.events]


async def test_the_relay_publishes_what_a_crash_left_with_the_same_ids() -> None:
    parts = Parts()
    stored = await parts.updater.apply(OrgContext("acme", ("a",), ()), host(IP, RDP))
    assert parts.events.published == []  # a crash right after the snapshot update
    assert await parts.outbox.relay_once() == 2  # one event, one state row
    assert [e.id for e in parts.events.published] == [e.id for e in stored.events]
    assert await parts.outbox.relay_once() == 0


async def test_a_conflicting_writer_makes_the_update_decide_again() -> None:
    parts = Parts()
    parts.snapshots.conflicts = 0
    first = await parts.updater.apply(OrgContext("acme", ("a",), ()), host(IP, RDP))
    parts.snapshots.conflicts = 3
    later = host(IP, RDP, WEB).model_copy(update={"queried_at": now() + timedelta(seconds=5)})
    again = await parts.updater.apply(OrgContext("acme", ("a",), ()), later)
    assert [e.data.port for e in again.events] == [443]
    assert {e.id for e in again.events}.isdisjoint(e.id for e in first.events)
    assert parts.snapshots.snapshots[("acme", IP)].version == 5  # 1 + 3 rival writes + ours


async def test_every_commands_outcome_is_recorded_by_id() -> None:
    parts = Parts()
    await open_rdp(parts)
    await parts.queue.enqueue([request("acme", IP, ScanReason.MANUAL, now())])
    service = parts.command_service()
    await service.handle(
        [
            command("accept", ip=IP, port=3389, reason="jump host", command_id="applied"),
            command("accept", ip=OTHER, port=22, reason="not ours", command_id="foreign"),
            command("unaccept", port=22, command_id="nothing"),
            command("rescan", ip=IP, command_id="pending"),
            FakeRecord(b'{"command": "accept", "command_id": "broken", "organization_id": "acme"}'),
        ]
    )
    outcomes = {
        key: (value[0].value, value[1]) for key, value in parts.command_log.outcomes.items()
    }
    assert outcomes == {
        "applied": ("applied", None),
        "foreign": ("rejected", "unknown_target"),
        "nothing": ("no_effect", None),
        "pending": ("no_effect", None),
        "broken": ("rejected", "schema_violation"),
    }
    assert [r.reason for r in parts.dead_letters.rejected] == [
        RejectReason.UNKNOWN_TARGET,
        RejectReason.SCHEMA,
    ]
