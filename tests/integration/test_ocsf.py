"""The OCSF topic end to end: one valid OCSF 1.8.0 finding per exposure event, with the
event's id, over an exposure's whole life (opened, changed, accepted, closed, retired)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from recon_stream.adapters.kafka import create_topics
from recon_stream.settings import Settings
from tests.emulators.shodan import ShodanEmulator
from tests.ocsf_check import assert_valid

from .support import NOW, banner, events_on, heartbeat, host, produce, read_all, running
from .test_commands import command, send


async def test_every_event_has_its_valid_ocsf_finding_from_opened_to_retired(
    scan_settings: Settings, shodan_emulator: ShodanEmulator
) -> None:
    ip = "45.33.41.1"
    shodan_emulator.set_host(
        ip,
        host(
            ip,
            banner(3389, "rdp", product="Remote Desktop", version="10.0"),
            banner(22, "ssh", product="OpenSSH"),
        ),
    )
    settings = scan_settings.model_copy(update={"rescan_interval_seconds": 2.0})
    await produce(
        settings.kafka_bootstrap_servers,
        settings.topic_heartbeats,
        [heartbeat("acme", ip, "a1", NOW - timedelta(hours=1))],
    )
    async with running(settings, ("ingest", "scanner", "scheduler")):
        await events_on(settings, 2)
        bluekeep = banner(
            3389,
            "rdp",
            product="Remote Desktop",
            version="10.1",
            vulns={"CVE-2019-0708": {"cvss": 9.8, "summary": "BlueKeep"}},
        )
        shodan_emulator.set_host(ip, host(ip, bluekeep))
        await events_on(settings, 4)  # 3389 changed, 22 closed
        await send(settings, command("accept", ip=ip, port=3389, reason="jump host"))
        await events_on(settings, 5)
    retiring = settings.model_copy(update={"ip_retention_seconds": 600.0})
    async with running(retiring, ("scheduler",)):
        events = await events_on(retiring, 6)
    records = await read_all(settings.kafka_bootstrap_servers, settings.topic_exposures_ocsf)
    findings: dict[str, dict[str, Any]] = {}
    for record in records:
        finding = json.loads(record.value)
        assert record.key == b"acme"
        findings[finding["metadata"]["uid"]] = finding
    assert len(records) == len(findings) == len(events) == 6
    assert set(findings) == {e["id"] for e in events}
    ordered = [findings[e["id"]] for e in events]
    assert_valid(ordered)
    rdp = [f for f, e in zip(ordered, events, strict=True) if e["data"]["port"] == 3389]
    assert [(f["activity_id"], f["status_id"]) for f in rdp] == [(1, 1), (2, 1), (2, 3), (3, 4)]
    assert {f["finding_info"]["uid"] for f in rdp} == {f"acme/{ip}/tcp/3389"}
    assert rdp[-1]["status_detail"] == "ip_retired"
    assert [v["cve"]["uid"] for v in rdp[1]["vulnerabilities"]] == ["CVE-2019-0708"]
    assert [r["uid"] for r in rdp[0]["resources"][1:]] == ["a1"]


async def test_init_creates_the_ocsf_topic_unless_it_is_switched_off(settings: Settings) -> None:
    again = await create_topics(settings)
    assert again[settings.topic_exposures_ocsf] == "exists"
    off = settings.model_copy(update={"topic_exposures_ocsf": ""})
    assert "" not in await create_topics(off)
