"""The webhook notifier end to end: exposure events on Tansu, delivered over real HTTP to
a real local server (tests/emulators/webhooks.py), positions kept in Kafka."""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from recon_stream.domain.exposures import ExposureEvent, build_events, diff
from recon_stream.domain.scans import HostScan, Service
from recon_stream.settings import Settings
from tests.emulators.webhooks import Received, WebhookReceiver
from tests.ocsf_check import assert_valid

from .support import eventually, produce, running, sample, start_worker

SECRET = "s3cret-webhook-key"
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as r:
        yield r


def opened(org: str, ip: str, port: int, module: str, n: int = 0) -> ExposureEvent:
    scan = HostScan(
        ip=ip,
        provider="api",
        queried_at=T0 + timedelta(seconds=n),
        services=(Service(port=port, module=module, product="Example", version=str(n)),),
    )
    (event,) = build_events(
        org,
        ip,
        diff({}, scan),
        scan,
        version=n,
        candidate_agents=["a1"],
        site_ids=[],
        acceptance_by_key={},
        first_seen_by_key={},
    )
    return event


def closed(event: ExposureEvent) -> ExposureEvent:
    d = event.data
    service = Service(port=d.port, module=d.service.name)
    scan = HostScan(ip=d.ip, provider="api", queried_at=T0 + timedelta(days=1))
    (gone,) = build_events(
        d.organization_id,
        d.ip,
        diff({service.key: service}, scan),
        scan,
        version=10_000,
        candidate_agents=["a1"],
        site_ids=[],
        acceptance_by_key={},
        first_seen_by_key={},
    )
    return gone


async def publish(settings: Settings, events: list[ExposureEvent]) -> list[bytes]:
    """Publish `events` as the scanner does (key = organization); returns the bodies."""
    bodies = [e.model_dump_json().encode() for e in events]
    await produce(
        settings.kafka_bootstrap_servers,
        settings.topic_exposures,
        [(e.kafka_key(), body, []) for e, body in zip(events, bodies, strict=True)],
    )
    return bodies


def notify_settings(
    settings: Settings, tmp_path: Path, destinations: list[dict[str, Any]], **more: Any
) -> Settings:
    path = tmp_path / "notify.yaml"
    path.write_text(yaml.safe_dump({"destinations": destinations}))
    return settings.model_copy(update={"notify_file": path, "gauge_sample_seconds": 0.2, **more})


def verified(r: Received, secret: str = SECRET) -> bool:
    """What a receiver does: recompute the signature over timestamp + "." + body."""
    timestamp = r.headers["x-recon-timestamp"]
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + r.body, hashlib.sha256)
    return hmac.compare_digest(r.headers["x-recon-signature"], "sha256=" + expected.hexdigest())


async def until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    async def probe() -> bool:
        return check()

    await eventually(probe, timeout=timeout, interval=0.05)


async def arrived(receiver: WebhookReceiver, path: str, n: int, timeout: float = 30.0) -> Any:
    async def enough() -> list[Received] | None:
        got = receiver.at(path)
        return got if len(got) >= n else None

    return await eventually(enough, timeout=timeout, interval=0.05)


async def test_signed_deliveries_in_three_formats_and_the_filters_hold(
    settings: Settings,
    receiver: WebhookReceiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_OCSF_SECRET", "env-held-key")
    rdp = opened("acme", "45.33.50.1", 3389, "rdp", 1)
    events = [rdp, opened("acme", "45.33.50.1", 8080, "http", 2), closed(rdp)]
    events.append(opened("globex", "45.33.50.2", 445, "smb", 3))
    notify = notify_settings(
        settings,
        tmp_path,
        [
            {"name": "siem", "url": receiver.url("/ce"), "secret": SECRET},
            {
                "name": "soc",
                "url": receiver.url("/ocsf"),
                "secret_env": "TEST_OCSF_SECRET",
                "format": "ocsf",
                "min_severity": "critical",
                "changes": ["opened"],
            },
            {
                "name": "chat",
                "url": receiver.url("/text"),
                "secret": SECRET,
                "format": "text",
                "organizations": ["acme"],
            },
        ],
    )
    bodies = await publish(notify, events)
    async with running(notify, ("notifier",)) as worker:
        ce = await arrived(receiver, "/ce", 4)
        ocsf = await arrived(receiver, "/ocsf", 2)
        text = await arrived(receiver, "/text", 3)
        await until(
            lambda: (
                sample(worker, "recon_notifier_filtered_total", destination="soc", reason="filter")
                == 2
            )
        )
        assert sample(worker, "recon_notifier_delivered_total", destination="siem") == 4
    # cloudevents: byte for byte what is on Kafka, signed, with the event id.
    assert sorted(r.body for r in ce) == sorted(bodies)
    assert all(verified(r) for r in ce)
    assert all(r.headers["content-type"] == "application/cloudevents+json" for r in ce)
    assert {r.event_id for r in ce} == {e.id for e in events}
    assert all(json.loads(r.body)["id"] == r.event_id for r in ce)
    # ocsf: critical openings only (RDP, SMB), each valid OCSF 1.8.0, signed with the env key.
    findings = [json.loads(r.body) for r in ocsf]
    assert_valid(findings)
    assert sorted(f["metadata"]["uid"] for f in findings) == sorted([rdp.id, events[3].id])
    assert all(verified(r, "env-held-key") for r in ocsf)
    assert not any(verified(r) for r in ocsf)
    # text: acme's three, one line each.
    lines = [json.loads(r.body)["text"] for r in text]
    assert len(lines) == 3
    assert all(line.startswith("[") and "acme" in line and "\n" not in line for line in lines)
    assert any("rdp opened on 45.33.50.1:3389/tcp" in line for line in lines)
    assert all(verified(r) for r in text)


async def test_a_failing_destination_gets_everything_in_order_and_never_delays_another(
    settings: Settings, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    receiver.answer["/down"] = 500
    notify = notify_settings(
        settings,
        tmp_path,
        [
            {"name": "down", "url": receiver.url("/down"), "secret": SECRET},
            {"name": "up", "url": receiver.url("/up"), "secret": SECRET},
        ],
    )
    events = [
        opened(org, f"45.33.51.{i % 7}", 1000 + i, "http", i)
        for i in range(40)
        for org in (("acme",) if i % 2 else ("globex",))
    ]
    bodies = await publish(notify, events)
    async with running(notify, ("notifier",)) as worker:
        up = await arrived(receiver, "/up", 40)
        # All of them reached the healthy one while the other still answered 500.
        assert receiver.at("/down") == []
        assert len(receiver.at("/down", delivered=False)) >= 1
        await until(
            lambda: (
                sample(worker, "recon_notifier_oldest_undelivered_age_seconds", destination="down")
                > 0
            )
        )
        receiver.answer["/down"] = 200
        down = await arrived(receiver, "/down", 40)
        assert (
            sample(
                worker,
                "recon_notifier_failed_attempts_total",
                destination="down",
                reason="http_5xx",
            )
            >= 1
        )
        assert sample(worker, "recon_notifier_delivered_total", destination="down") == 40
    for got in (up, down):
        assert len(got) == 40  # each event once, none lost
        assert sorted(r.body for r in got) == sorted(bodies)  # exactly as sent
        for org in ("acme", "globex"):
            sent = [e.id for e in events if e.data.organization_id == org]
            assert [
                r.event_id for r in got if json.loads(r.body)["data"]["organization_id"] == org
            ] == sent


async def test_a_hanging_destination_times_out_and_is_retried(
    settings: Settings, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    receiver.hang.add("/hang")
    notify = notify_settings(
        settings,
        tmp_path,
        [
            {
                "name": "hang",
                "url": receiver.url("/hang"),
                "secret": SECRET,
                "timeout_seconds": 0.3,
            },
            {"name": "ok", "url": receiver.url("/ok"), "secret": SECRET},
        ],
    )
    events = [opened("acme", "45.33.52.1", 20 + i, "ssh", i) for i in range(3)]
    await publish(notify, events)
    async with running(notify, ("notifier",)) as worker:
        await arrived(receiver, "/ok", 3)

        await until(
            lambda: (
                sample(
                    worker,
                    "recon_notifier_failed_attempts_total",
                    destination="hang",
                    reason="timeout",
                )
                >= 2
            )
        )
        receiver.release()
        got = await arrived(receiver, "/hang", 3)
    assert [r.event_id for r in got] == [e.id for e in events]


async def test_a_killed_notifier_resends_at_most_its_batch_in_flight_and_loses_nothing(
    settings: Settings, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    batch = 5
    notify = notify_settings(
        settings,
        tmp_path,
        [{"name": "psa", "url": receiver.url("/psa"), "secret": SECRET}],
        notifier_batch_size=batch,
    )
    events = [opened("acme", "45.33.53.1", 100 + i, "http", i) for i in range(30)]
    await publish(notify, events)
    log = tmp_path / "notifier.log"
    # 12 accepted, then no answer: the worker is killed with a batch in flight.
    receiver.hang_after["/psa"] = 12
    first = start_worker(notify, "notifier", log)
    try:
        await until(lambda: receiver.hanging > 0, timeout=60)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    before = len(receiver.at("/psa"))
    receiver.release()
    second = start_worker(notify, "notifier", log)
    try:
        got = await _all_ids(receiver, "/psa", {e.id for e in events})
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(20)
    ids = [r.event_id for r in got]
    assert set(ids) == {e.id for e in events}  # nothing lost
    resent = len(ids) - len(set(ids))
    assert resent <= batch, (resent, before)
    # What was sent again is exactly what was sent before: same ids, same bodies.
    assert len({(r.event_id, r.body) for r in got}) == len(set(ids))
    assert [i for i in dict.fromkeys(ids)] == [e.id for e in events]  # in order


async def _all_ids(receiver: WebhookReceiver, path: str, wanted: set[str]) -> list[Received]:
    async def complete() -> list[Received] | None:
        got = receiver.at(path)
        return got if {r.event_id for r in got} >= wanted else None

    return await eventually(complete, timeout=60, interval=0.1)  # type: ignore[no-any-return]
