"""The scope file in ingest on real servers (Tansu + mongod): a heartbeat of a pair new
to the worker from an excluded network is counted, stored `excluded` with the scope's
reason and never requested (not by ingest, not by the relay, no Shodan lookup)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from recon_stream.adapters.org_ips import MongoOrgIps
from recon_stream.domain.pairs import PairStatus
from recon_stream.domain.sightings import PairSighting
from recon_stream.settings import Settings
from tests.emulators.shodan import ShodanEmulator

from .support import (
    NOW,
    banner,
    eventually,
    heartbeat,
    host,
    produce,
    read_all,
    run_cli,
    running,
    sample,
)

T0 = datetime(2026, 12, 1, 12, tzinfo=UTC)
GUEST, OFFICE = "45.33.91.7", "45.33.90.7"


def seen(org: str, ip: str, at: datetime = T0) -> PairSighting:
    return PairSighting(organization_id=org, ip=ip, first_seen=at, last_seen=at)


async def test_an_excluded_pair_is_stored_excluded_without_a_request(db: Any) -> None:
    pairs = MongoOrgIps(db)
    created = await pairs.record(
        [seen("acme", GUEST), seen("acme", OFFICE)], T0, {("acme", GUEST): "guest Wi-Fi"}
    )
    assert set(created) == {("acme", GUEST), ("acme", OFFICE)}
    guest = await db.org_ips.find_one({"organization_id": "acme", "ip": GUEST})
    assert guest["status"] == "excluded"
    assert guest["status_reason"] == "guest Wi-Fi"
    assert guest["scan_request"] == {"state": "none"}
    # Heartbeats keep it so; the relay never claims it; the office pair is due.
    later = T0 + timedelta(hours=1)
    await pairs.record([seen("acme", GUEST, later)], later)
    assert await pairs.pairs_with_status(PairStatus.EXCLUDED) == [("acme", GUEST)]
    assert set(await pairs.claim_unsent(later + timedelta(days=1), 10)) == {("acme", OFFICE)}
    # An exclusion on a pair already stored leaves it as it is (the leader reconciles).
    await pairs.record([seen("acme", OFFICE, later)], later, {("acme", OFFICE): "late"})
    rows = {row["ip"]: row for row in await pairs.inventory("acme")}
    assert rows[OFFICE]["status"] == "active"
    assert rows[GUEST]["status"] == "excluded"
    assert rows[GUEST]["status_reason"] == "guest Wi-Fi"
    assert rows[GUEST]["last_seen"] == later
    # Made active: its request goes at once.
    await pairs.set_status("acme", GUEST, PairStatus.ACTIVE, "in scope", later)
    assert set(await pairs.claim_unsent(later + timedelta(seconds=1), 10)) == {("acme", GUEST)}


async def test_excluded_heartbeats_are_counted_and_never_requested(
    scan_settings: Settings, shodan_emulator: ShodanEmulator, tmp_path: Path, db: Any
) -> None:
    scope = tmp_path / "scope.yaml"
    scope.write_text(
        "version: 1\norganizations:\n"
        "  acme:\n    exclude: [{cidr: 45.33.91.0/24, reason: guest Wi-Fi}]\n"
    )
    for ip in (GUEST, OFFICE):
        shodan_emulator.set_host(ip, host(ip, banner(3389, "rdp")))
    settings = scan_settings.model_copy(update={"scope_file": scope})
    async with running(settings, ("ingest", "scanner")) as worker:
        await produce(
            settings.kafka_bootstrap_servers,
            settings.topic_heartbeats,
            [
                heartbeat("acme", GUEST, "a1", NOW),
                heartbeat("acme", GUEST, "a2", NOW),
                heartbeat("acme", OFFICE, "a3", NOW),
            ],
        )

        async def office_looked_up() -> bool:
            return f"/shodan/host/{OFFICE}" in shodan_emulator.paths()

        await eventually(office_looked_up, timeout=60)

        async def counted() -> bool:
            return sample(worker, "recon_heartbeats_total", outcome="excluded") == 2

        await eventually(counted, timeout=30)
        requests = await read_all(
            settings.kafka_bootstrap_servers, settings.topic_scan_requests, idle=0.5, expect=1
        )
        asked = {
            (r["organization_id"], r["ip"]) for r in map(lambda x: json.loads(x.value), requests)
        }
        assert asked == {("acme", OFFICE)}
        assert all(GUEST not in path for path in shodan_emulator.paths())
        pair = await db.org_ips.find_one({"organization_id": "acme", "ip": GUEST})
        assert pair["status"] == "excluded"
        assert pair["status_reason"] == "guest Wi-Fi"
        assert pair["scan_request"]["state"] == "none"

        async def office_reported() -> bool:
            doc = await db.exposures.find_one({"organization_id": "acme", "ip": OFFICE})
            return bool(doc and doc.get("services"))

        await eventually(office_reported, timeout=60)
    listed = run_cli(settings, "ips", "--org", "acme", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["ip"]: row for row in json.loads(listed.stdout)}
    assert rows[GUEST]["state"] == "excluded"
    assert rows[GUEST]["reason"] == "guest Wi-Fi"
    assert sorted(rows[GUEST]["agents"]) == ["a1", "a2"]
    assert rows[GUEST]["last_lookup"] == ""
    assert rows[GUEST]["next_lookup"] == ""
    assert rows[OFFICE]["state"] == "active"
    assert rows[OFFICE]["last_lookup"] != ""
    assert rows[OFFICE]["next_lookup"] != ""
    table = run_cli(settings, "ips", "--org", "acme")
    assert "excluded" in table.stdout
    assert "guest Wi-Fi" in table.stdout
    everyone = run_cli(settings, "exposures", "--all-orgs", "--format", "json")
    assert everyone.returncode == 0, everyone.stderr
    assert {(r["organization_id"], r["ip"], r["port"]) for r in json.loads(everyone.stdout)} == {
        ("acme", OFFICE, 3389)
    }
    assert run_cli(settings, "exposures", "--all-orgs").stdout.startswith("ORGANIZATION")
    both = run_cli(settings, "exposures", "--all-orgs", "--org", "acme")
    assert both.returncode == 2
