"""The webhook notifier end to end: exposure events on Tansu, delivered over real HTTP to
a real local server (tests/emulators/webhooks.py), positions kept in Kafka."""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka import AIOKafkaConsumer, TopicPartition

from recon_stream.domain.exposures import ExposureEvent, build_events, diff
from recon_stream.domain.scans import HostScan, Service
from recon_stream.settings import Settings
from tests.emulators.webhooks import Received, WebhookReceiver
from tests.fakes import BUILT_IN
from tests.ocsf_check import assert_valid

from .support import (
    eventually,
    prepare,
    produce,
    read_all,
    running,
    sample,
    start_worker,
    worker_env,
)

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
        assessor=BUILT_IN,
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
        assessor=BUILT_IN,
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
    """A notify file of `destinations` (`start_at: earliest` unless they say otherwise: the
    tests publish first), and a notify DLQ of this test's own."""
    path = tmp_path / "notify.yaml"
    given = [{"start_at": "earliest", **d} for d in destinations]
    path.write_text(yaml.safe_dump({"destinations": given}))
    dlq = settings.topic_exposures.replace("ex_", "ndlq_", 1)
    return settings.model_copy(
        update={
            "notify_file": path,
            "gauge_sample_seconds": 0.2,
            "topic_notify_dlq": dlq,
            **more,
        }
    )


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
            {"name": "teams", "url": receiver.url("/teams"), "secret": SECRET, "format": "teams"},
        ],
    )
    bodies = await publish(notify, events)
    async with running(notify, ("notifier",)) as worker:
        teams = await arrived(receiver, "/teams", 4)
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
    # teams: a message with one Adaptive Card, as Teams Workflows' webhook trigger takes it.
    for r in teams:
        (attachment,) = json.loads(r.body)["attachments"]
        assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
        assert attachment["content"]["type"] == "AdaptiveCard"
    assert all(verified(r) for r in teams)


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
        # Counted once the answer is read, which the receiver may not have sent yet.
        await until(
            lambda: sample(worker, "recon_notifier_delivered_total", destination="down") == 40
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


def flagged(event: ExposureEvent, **data: Any) -> ExposureEvent:
    return event.model_copy(update={"data": event.data.model_copy(update=data)})


async def test_permanent_refusals_are_parked_and_delivery_goes_on(
    settings: Settings,
    receiver: WebhookReceiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = "Splunk 0f1e2d3c-hec-token"
    monkeypatch.setenv("TEST_HEC_TOKEN", token)
    events = [opened("acme", "45.33.54.1", 200 + i, "http", i) for i in range(12)]
    accepted = flagged(opened("acme", "45.33.54.1", 300, "rdp", 50), accepted=True)
    sampled = flagged(opened("acme", "45.33.54.1", 301, "smb", 51), sample=True)
    statuses = {events[2].id: 422, events[5].id: 400, events[6].id: 410, events[9].id: 413}
    statuses[events[10].id] = 404
    receiver.refuse["/hec"] = dict(statuses)
    # A receiver that echoes the request back must not carry its secret into the DLQ.
    receiver.answer_body["/hec"] = f'{{"text": "Invalid data format", "auth": "{token}"}}'.encode()
    notify = notify_settings(
        settings,
        tmp_path,
        [
            {
                "name": "hec",
                "url": receiver.url("/hec"),
                "secret": SECRET,
                "headers": {"Authorization": {"env": "TEST_HEC_TOKEN"}, "X-Tenant": "msp-1"},
            },
            {
                "name": "psa",
                "url": receiver.url("/psa"),
                "secret": SECRET,
                "accepted": False,
                "sample": False,
            },
        ],
    )
    await prepare(notify)
    bodies = await publish(notify, [*events, accepted, sampled])
    async with running(notify, ("notifier",)) as worker:
        hec = await arrived(receiver, "/hec", len(events) + 2 - len(statuses))
        psa = await arrived(receiver, "/psa", len(events))
        await until(
            lambda: (
                sum(
                    sample(worker, "recon_notifier_parked_total", destination="hec", status=str(s))
                    for s in (400, 404, 410, 413, 422)
                )
                == len(statuses)
            )
        )
        assert sample(worker, "recon_notifier_parked_total", destination="hec", status="422") == 1
        assert sample(worker, "recon_notifier_filtered_total", destination="psa", reason="filter")
        assert (
            sample(
                worker, "recon_notifier_failed_attempts_total", destination="hec", reason="http_4xx"
            )
            == 0
        )
        # Nothing waits behind the parked ones: the stuck-destination gauge is back to 0.
        await until(
            lambda: (
                sample(worker, "recon_notifier_oldest_undelivered_age_seconds", destination="hec")
                == 0
            )
        )
    # Each refused event was asked once, then parked; the rest arrived, in order.
    refused = receiver.at("/hec", delivered=False)
    assert sorted(r.event_id for r in refused if r.status >= 400) == sorted(statuses)
    expected = [e.id for e in [*events, accepted, sampled] if e.id not in statuses]
    assert [r.event_id for r in hec] == expected
    assert all(r.headers["authorization"] == token for r in receiver.at("/hec", delivered=False))
    assert all(r.headers["x-tenant"] == "msp-1" for r in hec)
    assert all(verified(r) for r in hec)
    # accepted: false and sample: false leave those two out.
    assert [r.event_id for r in psa] == [e.id for e in events]
    # The DLQ: the events byte for byte, with destination, status and reason.
    parked = await read_all(notify.kafka_bootstrap_servers, notify.topic_notify_dlq, expect=5)
    assert len(parked) == len(statuses)
    by_id = {e.id: body for e, body in zip([*events, accepted, sampled], bodies, strict=True)}
    for record in parked:
        headers = {k: v.decode() for k, v in record.headers}
        event_id = headers["event_id"]
        assert record.value == by_id[event_id]
        assert record.key == b"acme"
        assert headers["destination"] == "hec"
        assert headers["status"] == str(statuses[event_id])
        assert headers["reason"].startswith(f"HTTP {statuses[event_id]} ")
        assert "Invalid data format" in headers["reason"]
        assert token not in headers["reason"]
        assert "0f1e2d3c" not in headers["reason"]


@pytest.mark.parametrize(
    "trouble",
    ["408", "425", "429", "503", "redirect", "connection_closed", "2xx_too_late"],
)
async def test_what_is_not_a_final_answer_is_retried_never_parked(
    settings: Settings,
    receiver: WebhookReceiver,
    tmp_path: Path,
    trouble: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = f"/{trouble}"
    # A receiver that echoes the request's headers back: the logs never show them.
    receiver.answer_body[path] = b"you sent: Authorization: Bearer sekrit-9c1f"
    reason = {"redirect": "http_other", "connection_closed": "connection"}.get(trouble)
    if trouble.isdigit():
        receiver.answer[path] = int(trouble)
        reason = "http_5xx" if trouble.startswith("5") else "http_4xx"
    elif trouble == "redirect":
        receiver.answer[path] = 302
    elif trouble == "connection_closed":
        receiver.drop.add(path)
    else:
        # A 2xx later than the destination's timeout (60 s at most) is a timeout.
        receiver.delay[path] = 0.6
        reason = "timeout"
    notify = notify_settings(
        settings,
        tmp_path,
        [
            {
                "name": "d",
                "url": receiver.url(path),
                "secret": SECRET,
                "timeout_seconds": 0.3,
                "headers": {"Authorization": "Bearer sekrit-9c1f"},
            }
        ],
    )
    await prepare(notify)
    events = [opened("acme", "45.33.55.1", 400 + i, "http", i) for i in range(2)]
    await publish(notify, events)
    async with running(notify, ("notifier",)) as worker:
        await until(
            lambda: (
                sample(
                    worker, "recon_notifier_failed_attempts_total", destination="d", reason=reason
                )
                >= 2
            )
        )
        receiver.answer.pop(path, None)
        receiver.drop.discard(path)
        receiver.delay.pop(path, None)
        await until(lambda: sample(worker, "recon_notifier_delivered_total", destination="d") == 2)
        assert sample(worker, "recon_notifier_parked_total", destination="d", status=trouble) == 0
    got = {r.event_id for r in receiver.at(path) if r.status == 200}
    assert got >= {e.id for e in events}
    assert await read_all(notify.kafka_bootstrap_servers, notify.topic_notify_dlq, idle=1) == []
    assert all(r.headers["authorization"] == "Bearer sekrit-9c1f" for r in receiver.at(path))
    assert "not delivered" in caplog.text
    assert "sekrit" not in caplog.text


async def _committed(settings: Settings, group: str) -> dict[int, int | None]:
    """The group's committed offset per partition of the exposures topic (None: none)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, group_id=group)
    await consumer.start()
    try:
        return {
            p: await consumer.committed(TopicPartition(settings.topic_exposures, p))
            for p in range(settings.kafka_topic_partitions)
        }
    finally:
        await consumer.stop()


async def test_a_new_destination_starts_at_the_end_and_keeps_its_place(
    settings: Settings, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    notify = notify_settings(
        settings,
        tmp_path,
        [
            {"name": "new", "url": receiver.url("/new"), "secret": SECRET, "start_at": "latest"},
            {"name": "all", "url": receiver.url("/all"), "secret": SECRET},
        ],
    )
    old = [opened(f"org-{i % 4}", "45.33.56.1", 500 + i, "http", i) for i in range(8)]
    await publish(notify, old)
    group = f"{notify.notifier_group_id}.new"
    new = [opened(f"org-{i % 4}", "45.33.56.2", 600 + i, "http", i) for i in range(8)]
    later = [opened(f"org-{i % 4}", "45.33.56.3", 700 + i, "http", i) for i in range(8)]
    async with running(notify, ("notifier",)):
        await arrived(receiver, "/all", len(old))

        async def placed() -> bool:
            committed = await _committed(notify, group)
            return len(committed) == notify.kafka_topic_partitions and all(
                offset is not None for offset in committed.values()
            )

        # Its place is committed at the end before it sends anything.
        await eventually(placed, timeout=30, interval=0.2)
        await publish(notify, new)
        got = await arrived(receiver, "/new", len(new))
        await arrived(receiver, "/all", len(old) + len(new))
    assert sorted(r.event_id for r in got) == sorted(e.id for e in new)
    # Stopped, then events published, then started again: it resumes, it does not jump
    # to the end again.
    await publish(notify, later)
    async with running(notify, ("notifier",)):
        got = await arrived(receiver, "/new", len(new) + len(later))
    assert sorted(r.event_id for r in got) == sorted(e.id for e in [*new, *later])


@pytest.mark.parametrize(
    ("destination", "env", "named"),
    [
        ({"headers": {"Authorization": {"env": "TEST_UNSET_TOKEN"}}}, {}, "headers.Authorization"),
        ({"accepted_only": True}, {}, "accepted_only"),
        ({"start_at": "beginning"}, {}, "start_at"),
    ],
)
def test_a_bad_notify_file_is_refused_at_start_with_the_field_named(
    settings: Settings,
    tmp_path: Path,
    destination: dict[str, Any],
    env: dict[str, str],
    named: str,
) -> None:
    notify = notify_settings(
        settings,
        tmp_path,
        [{"name": "psa", "url": "https://psa.example/hook", "secret": SECRET, **destination}],
    )
    run_env = {**worker_env(notify), **env}
    run_env.pop("TEST_UNSET_TOKEN", None)
    done = subprocess.run(
        [sys.executable, "-m", "recon_stream", "run", "notifier"],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert named in done.stderr
    assert SECRET not in done.stderr
