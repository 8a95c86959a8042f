"""Operators act on exposures: accept, unaccept, rescan, verification consent, history and
the state topic, end to end on Tansu, MongoDB and the Shodan emulator through the real
`shodan` client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from recon_stream.adapters.command_log import CommandLog
from recon_stream.adapters.consents import MongoConsents
from recon_stream.app import snapshot_updater
from recon_stream.domain.commands import CommandOutcome
from recon_stream.domain.scans import HostScan, Service
from recon_stream.domain.snapshot import OrgContext
from recon_stream.exposure_table import load_history, load_rows, render_history
from recon_stream.settings import Settings
from tests.emulators.shodan import ShodanEmulator
from tests.store_cases import CONSENT_CASES

from .support import (
    NOW,
    banner,
    command,
    events_on,
    eventually,
    heartbeat,
    host,
    produce,
    read_all,
    run_cli,
    running,
    sample,
    send,
)


def host_requests(emulator: ShodanEmulator, ip: str) -> int:
    path = f"/shodan/host/{ip}"
    return sum(1 for r in emulator.requests if r.path.split("?", 1)[0] == path)


async def test_accepting_an_open_port_and_taking_it_back(
    scan_settings: Settings, shodan_emulator: ShodanEmulator
) -> None:
    ip = "45.33.40.1"
    shodan_emulator.set_host(ip, host(ip, banner(3389, "rdp")))
    await produce(
        scan_settings.kafka_bootstrap_servers,
        scan_settings.topic_heartbeats,
        [heartbeat("acme", ip, "a1", NOW)],
    )
    async with running(scan_settings, ("ingest", "scanner")) as worker:
        await events_on(scan_settings, 1)
        until = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
        await send(
            scan_settings,
            command("accept", ip=ip, port=3389, reason="jump host", expires_at=until.isoformat()),
        )
        events = await events_on(scan_settings, 2)
        rows = await load_rows(scan_settings, "acme")
        accepted_only = await load_rows(scan_settings, "acme", accepted=True)
        unaccepted_only = await load_rows(scan_settings, "acme", accepted=False)
        await send(scan_settings, command("unaccept", ip=ip, port=3389))
        events = await events_on(scan_settings, 3)
        assert sample(worker, "recon_commands_total", command="accept", outcome="applied") == 1
    opened, accepted, unaccepted = (e["data"] for e in events)
    assert opened["change"] == "opened"
    assert opened["accepted"] is False
    assert opened["acceptance"] is None
    assert accepted["change"] == "changed"
    assert accepted["changed_fields"] == ["accepted"]
    assert accepted["reason"] == "accepted"
    assert accepted["acceptance"]["reason"] == "jump host"
    assert accepted["acceptance"]["requested_by"] == "tech@msp.example"
    assert datetime.fromisoformat(accepted["acceptance"]["expires_at"]) == until
    assert accepted["severity"] == opened["severity"] == "critical"  # acceptance hides nothing
    assert unaccepted["reason"] == "unaccepted"
    assert unaccepted["accepted"] is False
    assert [r["accepted"] for r in rows] == [True]
    assert rows[0]["accepted_reason"] == "jump host"
    assert len(accepted_only) == 1
    assert unaccepted_only == []


async def test_an_acceptance_for_every_ip_applies_now_and_to_ports_that_open_later(
    scan_settings: Settings, shodan_emulator: ShodanEmulator
) -> None:
    first, second, later = "45.33.40.2", "45.33.40.3", "45.33.40.4"
    for ip in (first, second, later):
        shodan_emulator.set_host(ip, host(ip, banner(22, "ssh", product="OpenSSH")))
    async with running(scan_settings, ("ingest", "scanner")) as worker:
        # Accepted before any port is known to be open.
        await send(scan_settings, command("accept", port=22, reason="managed SSH bastions"))
        await eventually(
            lambda: _async(
                sample(worker, "recon_commands_total", command="accept", outcome="applied") == 1
            )
        )
        await produce(
            scan_settings.kafka_bootstrap_servers,
            scan_settings.topic_heartbeats,
            [heartbeat("acme", first, "a1", NOW), heartbeat("acme", second, "a2", NOW)],
        )
        events = await events_on(scan_settings, 2)
        assert all(e["data"]["change"] == "opened" for e in events)
        assert all(e["data"]["accepted"] for e in events)
        assert {e["data"]["acceptance"]["reason"] for e in events} == {"managed SSH bastions"}
        await produce(
            scan_settings.kafka_bootstrap_servers,
            scan_settings.topic_heartbeats,
            [heartbeat("acme", later, "a3", NOW)],
        )
        events = await events_on(scan_settings, 3)
        assert events[-1]["data"]["ip"] == later
        assert events[-1]["data"]["accepted"] is True
        # Taking back the org-wide acceptance changes all three.
        await send(scan_settings, command("unaccept", port=22))
        events = await events_on(scan_settings, 6)
    changed = [e["data"] for e in events[3:]]
    assert sorted(d["ip"] for d in changed) == sorted([first, second, later])
    assert all(d["reason"] == "unaccepted" for d in changed)


async def test_an_acceptance_expires_without_waiting_for_a_lookup(
    scan_settings: Settings, shodan_emulator: ShodanEmulator
) -> None:
    ip = "45.33.40.5"
    shodan_emulator.set_host(ip, host(ip, banner(5900, "vnc")))
    await produce(
        scan_settings.kafka_bootstrap_servers,
        scan_settings.topic_heartbeats,
        [heartbeat("acme", ip, "a1", NOW)],
    )
    async with running(scan_settings, ("ingest", "scanner")):
        await events_on(scan_settings, 1)
        # Far enough ahead that the acceptance is surely applied before it ends.
        expires = datetime.now(UTC) + timedelta(seconds=8)
        await send(
            scan_settings,
            command(
                "accept",
                ip=ip,
                port=5900,
                reason="vendor support window",
                expires_at=expires.isoformat(),
            ),
        )
        await events_on(scan_settings, 2)
    lookups = host_requests(shodan_emulator, ip)
    async with running(scan_settings, ("scheduler",)):
        events = await events_on(scan_settings, 3)
    expired = events[2]["data"]
    assert expired["reason"] == "acceptance_expired"
    assert expired["changed_fields"] == ["accepted"]
    assert expired["accepted"] is False
    assert host_requests(shodan_emulator, ip) == lookups  # no lookup was needed
    assert (
        len(
            await read_all(
                scan_settings.kafka_bootstrap_servers, scan_settings.topic_exposures, expect=3
            )
        )
        == 3
    )


async def test_a_redelivered_command_has_one_effect_and_a_bad_one_goes_to_the_dlq(
    scan_settings: Settings, shodan_emulator: ShodanEmulator
) -> None:
    ip = "45.33.40.6"
    shodan_emulator.set_host(ip, host(ip, banner(445, "smb")))
    await produce(
        scan_settings.kafka_bootstrap_servers,
        scan_settings.topic_heartbeats,
        [heartbeat("acme", ip, "a1", NOW)],
    )
    accept = command("accept", ip=ip, port=445, reason="file server")
    bad = (b"acme", b'{"command": "accept", "organization_id": "acme"}', [])
    async with running(scan_settings, ("ingest", "scanner")) as worker:
        await events_on(scan_settings, 1)
        await send(scan_settings, accept, bad, command("unaccept", ip=ip, port=445), accept)
        await eventually(
            lambda: _async(
                sample(worker, "recon_commands_total", command="accept", outcome="duplicate") == 1
            )
        )
        events = await events_on(scan_settings, 3)
        dead = await read_all(
            scan_settings.kafka_bootstrap_servers, scan_settings.topic_dlq, expect=1
        )
    assert [e["data"]["reason"] for e in events[1:]] == ["accepted", "unaccepted"]
    assert (await load_rows(scan_settings, "acme"))[0]["accepted"] is False
    assert len(dead) == 1
    headers = {k: v.decode() for k, v in dead[0].headers}
    assert headers["x-recon-dlq-reason"] == "schema_violation"
    assert "accept.requested_by: Field required" in headers["x-recon-dlq-detail"]
    assert dead[0].value == bad[1]


async def _async(value: Any) -> Any:
    return value


async def test_rescan_makes_one_fresh_lookup_even_when_sent_twice_and_covers_every_ip(
    scan_settings: Settings, shodan_emulator: ShodanEmulator
) -> None:
    ips = ["45.33.40.7", "45.33.40.8"]
    for ip in ips:
        shodan_emulator.set_host(ip, host(ip, banner(80, "http")))
    await produce(
        scan_settings.kafka_bootstrap_servers,
        scan_settings.topic_heartbeats,
        [heartbeat("acme", ip, "a1", NOW) for ip in ips],
    )
    async with running(scan_settings, ("ingest", "scanner")) as worker:
        await events_on(scan_settings, 2)
        assert all(host_requests(shodan_emulator, ip) == 1 for ip in ips)
        # The port closed; the stored lookup (well inside the reuse window) does not know.
        shodan_emulator.set_host(ips[0], host(ips[0], banner(443, "https")))
        await send(scan_settings, command("rescan", ip=ips[0]), command("rescan", ip=ips[0]))
        events = await events_on(scan_settings, 4)
        assert {(e["data"]["change"], e["data"]["port"]) for e in events[2:]} == {
            ("closed", 80),
            ("opened", 443),
        }

        # The second is `no_effect` when the first is still waiting in the queue.
        def outcomes() -> tuple[float, float]:
            return (
                sample(worker, "recon_commands_total", command="rescan", outcome="applied"),
                sample(worker, "recon_commands_total", command="rescan", outcome="no_effect"),
            )

        await eventually(lambda: _async(sum(outcomes()) == 2))
        assert outcomes()[0] >= 1
        assert host_requests(shodan_emulator, ips[0]) == 2
        # Every active IP of the organization.
        await send(scan_settings, command("rescan"))
        await eventually(lambda: _async(all(host_requests(shodan_emulator, ip) >= 2 for ip in ips)))
        # Not an IP of this organization: nothing spent, a clear DLQ entry.
        await send(scan_settings, command("rescan", ip="8.8.8.8"))
        dead = await read_all(
            scan_settings.kafka_bootstrap_servers, scan_settings.topic_dlq, expect=1
        )
    assert {k: v.decode() for k, v in dead[0].headers}["x-recon-dlq-reason"] == "unknown_target"
    assert host_requests(shodan_emulator, "8.8.8.8") == 0
    assert host_requests(shodan_emulator, ips[0]) <= 3


async def test_history_and_the_state_topic_match_events_and_the_table(
    scan_settings: Settings, shodan_emulator: ShodanEmulator, db: Any
) -> None:
    stay, retire = "45.33.40.9", "45.33.40.10"
    shodan_emulator.set_host(stay, host(stay, banner(3389, "rdp"), banner(80, "http")))
    shodan_emulator.set_host(retire, host(retire, banner(1433, "mssql")))
    # A crash between a snapshot update and its publish: the relay finishes the job.
    store = snapshot_updater(db)
    crashed = await store.apply(
        OrgContext("acme", ("a0",), ()),
        HostScan(
            ip="45.33.40.11",
            provider="api",
            queried_at=NOW - timedelta(minutes=5),
            services=(Service(port=6379, module="redis", product="Redis"),),
        ),
    )
    an_hour_ago = NOW - timedelta(hours=1)
    await produce(
        scan_settings.kafka_bootstrap_servers,
        scan_settings.topic_heartbeats,
        [heartbeat("acme", stay, "a1", NOW), heartbeat("acme", retire, "a2", an_hour_ago)],
    )
    async with running(scan_settings, ("ingest", "scanner")):
        await events_on(scan_settings, 4)
        await send(scan_settings, command("accept", ip=stay, port=80, reason="web site"))
        await events_on(scan_settings, 5)
        shodan_emulator.set_host(stay, host(stay, banner(3389, "rdp")))
        await send(scan_settings, command("rescan", ip=stay))
        await events_on(scan_settings, 6)
    settings = scan_settings.model_copy(update={"ip_retention_seconds": 600.0})
    async with running(settings, ("scheduler",)):
        events = await events_on(settings, 7)
    changes = sorted((e["data"]["ip"], e["data"]["port"], e["data"]["change"]) for e in events)
    assert (retire, 1433, "closed") in changes
    assert (stay, 80, "closed") in changes
    assert crashed.events[0].id in {e["id"] for e in events}

    # History: one entry per event (a redelivered event repeats its id), newest first.
    history = await load_history(scan_settings, "acme")
    assert sorted(h["event_id"] for h in history) == sorted({e["id"] for e in events})
    assert [h["time"] for h in history] == sorted((h["time"] for h in history), reverse=True)
    only_port = await load_history(scan_settings, "acme", ip=stay, port=80)
    assert [h["change"] for h in only_port] == ["closed", "changed", "opened"]
    assert only_port[1]["reason"] == "accepted"

    # The state topic from offset 0, compacted by hand: exactly the table.
    records = await read_all(
        settings.kafka_bootstrap_servers, settings.topic_exposure_state, expect=1
    )
    state: dict[str, Any] = {}
    for record in records:
        key = record.key.decode()
        if record.value is None:
            state.pop(key, None)
        else:
            state[key] = json.loads(record.value)
    table = await load_rows(settings, "acme")
    assert sorted(state) == sorted(f"acme/{r['ip']}/{r['transport']}/{r['port']}" for r in table)
    for row in table:
        value = state[f"acme/{row['ip']}/{row['transport']}/{row['port']}"]
        assert value["severity"] == row["severity"]
        assert value["accepted"] == row["accepted"]
        assert value["service"]["name"] == row["service"]
        assert value["last_queried"].replace("+00:00", "Z")[:19] == row["last_queried"][:19]
        assert "change" not in value
        assert "changed_fields" not in value


async def test_the_cli_waits_for_each_commands_outcome_and_history_keeps_who_and_why(
    scan_settings: Settings, shodan_emulator: ShodanEmulator
) -> None:
    ip = "45.33.40.21"
    shodan_emulator.set_host(ip, host(ip, banner(5900, "vnc")))
    await produce(
        scan_settings.kafka_bootstrap_servers,
        scan_settings.topic_heartbeats,
        [heartbeat("acme", ip, "a1", NOW)],
    )

    async def cli(*args: str) -> Any:
        # In a thread: the workers run on this test's event loop.
        return await asyncio.to_thread(run_cli, scan_settings, *args)

    async with running(scan_settings, ("ingest", "scanner")):
        await events_on(scan_settings, 1)
        accepted = await cli(
            *("accept", "--org", "acme", "--ip", ip, "--port", "5900"),
            *("--reason", "vendor support window", "--by", "tech@msp", "--wait"),
        )
        assert accepted.returncode == 0, accepted.stderr
        assert accepted.stdout.splitlines()[-1] == "applied"
        foreign = await cli(
            *("accept", "--org", "acme", "--ip", "45.33.40.99", "--port", "22"),
            *("--reason", "not ours", "--by", "tech@msp", "--wait", "60"),
        )
        assert foreign.returncode == 1
        assert foreign.stdout.splitlines()[-1].startswith("rejected (unknown_target:")
        nothing = await cli("unaccept", "--org", "acme", "--port", "22", "--by", "t", "--wait")
        assert nothing.returncode == 0, nothing.stderr
        assert nothing.stdout.splitlines()[-1] == "no_effect"
        listed = await cli("acceptances", "--org", "acme", "--format", "json")
        assert listed.returncode == 0, listed.stderr
        (kept,) = json.loads(listed.stdout)
        assert (kept["ip"], kept["port"], kept["requested_by"]) == (ip, 5900, "tech@msp")
        taken_back = await cli(
            *("unaccept", "--org", "acme", "--ip", ip, "--port", "5900", "--by", "ciso"),
            "--wait",
        )
        assert taken_back.stdout.splitlines()[-1] == "applied"
        events = await events_on(scan_settings, 3)
        gone = await cli("acceptances", "--org", "acme")
        assert gone.stdout == "no acceptances in force\n"
    dead = await read_all(scan_settings.kafka_bootstrap_servers, scan_settings.topic_dlq, expect=1)
    assert {k: v.decode() for k, v in dead[0].headers}["x-recon-dlq-reason"] == "unknown_target"
    assert events[2]["data"]["reason"] == "unaccepted"
    assert events[2]["data"]["previous_acceptance"]["reason"] == "vendor support window"
    # The acceptance is gone; the decision is still on record, with who and why.
    history = await load_history(scan_settings, "acme", ip=ip)
    assert [(h["reason"], h["requested_by"], h["acceptance_reason"]) for h in history] == [
        ("unaccepted", "tech@msp", "vendor support window"),
        ("accepted", "tech@msp", "vendor support window"),
        ("", "", ""),
    ]


@pytest.mark.parametrize("case", CONSENT_CASES, ids=lambda case: case.__name__)
async def test_consent_store(case: Callable[[Any], Awaitable[None]], db: Any) -> None:
    await case(MongoConsents(db))


async def test_verification_consent_is_given_and_taken_back_through_the_commands_topic(
    scan_settings: Settings, db: Any
) -> None:
    log, consents = CommandLog(db), MongoConsents(db)

    async def outcome_of(command_id: str) -> Any:
        return await eventually(lambda: log.outcome(command_id))

    enable = command("verification", org="globex", enabled=True, reason="pen-test 2026-17")
    enabled_id = json.loads(enable[1])["command_id"]
    async with running(scan_settings, ("scanner",)) as worker:
        # No heartbeat from globex yet: consent may come first.
        await send(scan_settings, enable)
        assert (await outcome_of(enabled_id)).outcome is CommandOutcome.APPLIED
        assert await consents.enabled_orgs(["globex", "acme"]) == {"globex"}
        again = command("verification", org="globex", enabled=True, reason="asked twice")
        disable = command("verification", org="globex", enabled=False, reason="contract ended")
        bad = command("verification", org="globex", enabled=True, reason="   ")
        await send(scan_settings, again, disable, enable, bad)
        again_id, disabled_id, bad_id = (
            json.loads(c[1])["command_id"] for c in (again, disable, bad)
        )
        assert (await outcome_of(again_id)).outcome is CommandOutcome.NO_EFFECT
        assert (await outcome_of(disabled_id)).outcome is CommandOutcome.APPLIED
        rejected = await outcome_of(bad_id)
        await eventually(
            lambda: _async(
                sample(worker, "recon_commands_total", command="verification", outcome="duplicate")
                == 1
            )
        )
        dead = await read_all(
            scan_settings.kafka_bootstrap_servers, scan_settings.topic_dlq, expect=1
        )
    assert (rejected.outcome, rejected.reason) == (CommandOutcome.REJECTED, "schema_violation")
    assert "reason" in (rejected.detail or "")
    assert {k: v.decode() for k, v in dead[0].headers}["x-recon-dlq-reason"] == "schema_violation"
    consent = await consents.get("globex")
    assert consent is not None
    assert (consent.enabled, consent.requested_by, consent.reason, consent.command_id) == (
        False,
        "tech@msp.example",
        "contract ended",
        disabled_id,
    )
    assert await consents.enabled_orgs(["globex"]) == set()
    # History: who, when and why of each change, newest first; the no-effect one is not there.
    history = await load_history(scan_settings, "globex")
    assert [(h["change"], h["reason"], h["acceptance_reason"]) for h in history] == [
        ("verification", "disabled", "contract ended"),
        ("verification", "enabled", "pen-test 2026-17"),
    ]
    assert all(h["requested_by"] == "tech@msp.example" for h in history)
    table = render_history(history, "table").splitlines()
    assert table[2].split()[1:5] == ["*", "tcp/*", "verification", "disabled"]
