"""The command line, run as users run it: a subprocess with RECON_* variables."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

from recon_stream.settings import Settings

from .support import eventually, heartbeat, produce, read_all, running
from .support import run_cli as _cli


async def test_init_is_idempotent(settings: Settings, db: Any) -> None:
    first = _cli(settings, "init")
    assert first.returncode == 0, first.stderr
    assert f"topic {settings.topic_dlq}-cli: created" in first.stdout
    assert f"topic {settings.topic_heartbeats}: exists" in first.stdout
    second = _cli(settings, "init")
    assert second.returncode == 0, second.stderr
    assert f"topic {settings.topic_dlq}-cli: exists" in second.stdout
    indexes = {ix["name"] async for ix in await db.org_ips.list_indexes()}
    assert {"org_ip_unique", "scan_request_outbox"} <= indexes
    unique = [ix async for ix in await db.org_ips.list_indexes() if ix["name"] == "org_ip_unique"]
    assert unique[0]["unique"] is True


async def test_publish_heartbeat_validates_and_publishes(settings: Settings) -> None:
    ok = _cli(
        settings,
        "publish-heartbeat",
        "--org",
        "acme",
        "--agent",
        "a-1",
        "--ip",
        "8.8.8.8",
        "--site",
        "hq",
        "--hostname",
        "web-1",
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"published to {settings.topic_heartbeats}[")
    bad = _cli(
        settings, "publish-heartbeat", "--org", "acme corp", "--agent", "a", "--ip", "1.1.1.1"
    )
    assert bad.returncode == 2
    assert "organization_id" in bad.stderr
    raw = _cli(settings, "publish-heartbeat", "--raw", "{not json")
    assert raw.returncode == 0, raw.stderr
    records = await read_all(settings.kafka_bootstrap_servers, settings.topic_heartbeats, expect=2)
    assert b"{not json" in [r.value for r in records]
    # Records of different partitions come back in no particular order.
    published = next(r for r in records if r.value.startswith(b'{"'))
    body = json.loads(published.value)
    assert body["organization_id"] == "acme"
    assert body["hostname"] == "web-1"
    assert published.key == b"a-1"  # keyed by agent by default


async def test_accept_unaccept_and_rescan_publish_commands_and_print_their_ids(
    settings: Settings,
) -> None:
    until = "2027-01-31T00:00:00+00:00"
    accept = _cli(
        settings,
        *("accept", "--org", "acme", "--ip", "8.8.8.8", "--port", "3389"),
        *("--reason", "jump host", "--by", "tech@msp", "--until", until),
    )
    assert accept.returncode == 0, accept.stderr
    unaccept = _cli(
        settings, "unaccept", "--org", "acme", "--port", "3389", "--by", "tech@msp", "--id", "u-1"
    )
    assert unaccept.returncode == 0, unaccept.stderr
    rescan = _cli(settings, "rescan", "--org", "acme")
    assert rescan.returncode == 0, rescan.stderr
    bad = _cli(settings, "accept", "--org", "acme", "--port", "99999", "--reason", "x", "--by", "y")
    assert bad.returncode == 2
    assert "port" in bad.stderr
    records = await read_all(settings.kafka_bootstrap_servers, settings.topic_commands, expect=3)
    bodies = {json.loads(r.value)["command_id"]: (r.key, json.loads(r.value)) for r in records}
    assert set(bodies) == {accept.stdout.strip(), "u-1", rescan.stdout.strip()}
    key, body = bodies[accept.stdout.strip()]
    assert key == b"acme"
    assert body["expires_at"] == until
    assert body["reason"] == "jump host"
    assert bodies["u-1"][1]["command"] == "unaccept"
    assert "ip" not in bodies["u-1"][1]  # the organization-wide acceptance
    assert bodies[rescan.stdout.strip()][1]["command"] == "rescan"
    history = _cli(settings, "history", "--org", "acme")
    assert history.returncode == 0, history.stderr
    assert history.stdout == "no history\n"


def test_a_bad_setting_is_reported_without_echoing_secrets(settings: Settings) -> None:
    result = _cli(
        settings,
        "init",
        env={
            "RECON_MONGODB_URI": "mongodb://admin:hunter2-secret@db:27017",
            "RECON_SHODAN_API_KEY": "SHODANKEY-very-secret",
            "RECON_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "RECON_KAFKA_SASL_PASSWORD": "sasl-password-secret",
            "RECON_HTTP_PORT": "not-a-port",
        },
    )
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "http_port" in output
    for secret in ("hunter2-secret", "SHODANKEY-very-secret", "sasl-password-secret"):
        assert secret not in output


def _get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


async def test_status_endpoint_serves_health_readiness_and_metrics(settings: Settings) -> None:
    await produce(
        settings.kafka_bootstrap_servers,
        settings.topic_heartbeats,
        [heartbeat("acme", "8.8.8.8"), heartbeat("acme", "10.0.0.1"), b"nope"],
    )
    async with running(settings) as worker:
        port = worker.status.port

        async def metrics_show_all_three() -> str | None:
            _, _, text = await asyncio.to_thread(_get, port, "/metrics")
            return text if 'recon_heartbeats_total{outcome="invalid"} 1.0' in text else None

        text = await eventually(metrics_show_all_three)
        assert 'recon_heartbeats_total{outcome="accepted"} 1.0' in text
        assert 'recon_heartbeats_total{outcome="non_public"} 1.0' in text
        assert 'recon_heartbeats_non_public_total{address_class="private"} 1.0' in text
        assert 'recon_dlq_messages_total{reason="invalid_json"} 1.0' in text
        assert "recon_ingest_batch_duration_seconds_bucket" in text
        assert "recon_faststream_" in text  # FastStream's own Kafka metrics, same registry
        # No organization ids or IPs as labels.
        assert "acme" not in text
        assert "8.8.8.8" not in text
        status, _, body = await asyncio.to_thread(_get, port, "/healthz")
        assert status == 200
        status, content_type, body = await asyncio.to_thread(_get, port, "/readyz")
        assert status == 200, body
        assert content_type == "application/json"
        assert json.loads(body)["checks"] == {"kafka": "ok", "mongodb": "ok", "pipeline": "ok"}
        status, _, _ = await asyncio.to_thread(_get, port, "/nope")
        assert status == 404


async def test_verification_consent_is_given_shown_and_taken_back_from_the_cli(
    scan_settings: Settings,
) -> None:
    async def cli(*args: str) -> Any:
        # In a thread: the workers run on this test's event loop.
        return await asyncio.to_thread(_cli, scan_settings, *args)

    never = await cli("verification", "--org", "acme", "--show")
    assert never.returncode == 0, never.stderr
    assert never.stdout == "verification for acme: never set (not enabled)\n"
    for wrong in (
        ("verification", "--org", "acme", "--enable", "--by", "ciso"),  # no reason
        ("verification", "--org", "acme", "--by", "ciso", "--reason", "r"),  # neither
        ("verification", "--org", "acme", "--enable", "--by", "ciso", "--reason", " "),
        ("verification", "--org", "acme", "--show", "--disable"),
    ):
        refused = await cli(*wrong)
        assert refused.returncode == 2, (wrong, refused.stdout)
    help_text = (await cli("verification", "--help")).stdout
    assert "RECON_VERIFY_TCP=true" in help_text
    assert "24 h" in help_text
    enable = ("verification", "--org", "acme", "--enable", "--by", "ciso@acme")
    async with running(scan_settings, ("scanner",)):
        given = await cli(*enable, "--reason", "pen-test contract 2026-17", "--wait")
        assert given.returncode == 0, given.stderr
        assert given.stdout.splitlines()[-1] == "applied"
        again = await cli(*enable, "--reason", "asked twice", "--wait", "30")
        assert again.returncode == 0, again.stderr
        assert again.stdout.splitlines()[-1] == "no_effect"
        shown = await cli("verification", "--org", "acme", "--show", "--format", "json")
        assert shown.returncode == 0, shown.stderr
        on_record = json.loads(shown.stdout)
        taken_back = await cli(
            *("verification", "--org", "acme", "--disable", "--by", "ops@msp"),
            *("--reason", "contract ended", "--id", "v-off", "--wait"),
        )
        assert taken_back.returncode == 0, taken_back.stderr
        assert taken_back.stdout.splitlines() == ["v-off", "applied"]
    assert on_record["state"] == "enabled"
    assert on_record["enabled"] is True
    assert (on_record["requested_by"], on_record["reason"]) == (
        "ciso@acme",
        "pen-test contract 2026-17",
    )
    assert on_record["command_id"] == given.stdout.splitlines()[0]
    assert on_record["at"] is not None
    table = await cli("verification", "--org", "acme", "--show")
    lines = dict(line.split(None, 1) for line in table.stdout.splitlines())
    assert lines["verification"] == "disabled"
    assert (lines["by"], lines["reason"], lines["command"]) == (
        "ops@msp",
        "contract ended",
        "v-off",
    )
    history = await cli("history", "--org", "acme")
    assert history.returncode == 0, history.stderr
    rows = history.stdout.splitlines()[2:]
    assert [row.split()[3:5] for row in rows] == [
        ["verification", "disabled"],
        ["verification", "enabled"],
    ]
    assert "contract ended" in rows[0]
    assert "ciso@acme" in rows[1]
