"""Pair statuses on genuine MongoDB (`org_ips`), and attribution end to end: the scope
file's exclusions and shared egress close exposures on Tansu + mongod + the emulator."""

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

from .support import NOW, banner, eventually, heartbeat, host, produce, read_all, running, sample

T0 = datetime(2026, 12, 1, 12, tzinfo=UTC)


def seen(org: str, ip: str, at: datetime = T0) -> PairSighting:
    return PairSighting(organization_id=org, ip=ip, first_seen=at, last_seen=at)


async def test_statuses_hold_through_heartbeats_and_active_again_asks_for_a_lookup(db: Any) -> None:
    pairs = MongoOrgIps(db)
    await pairs.record([seen(org, "81.2.69.10") for org in "abc"] + [seen("a", "81.2.69.11")], T0)
    assert await pairs.set_status("a", "81.2.69.10", PairStatus.DISMISSED, "home office") == (
        PairStatus.ACTIVE
    )
    assert await pairs.set_status("a", "81.2.69.10", PairStatus.DISMISSED, "again") == (
        PairStatus.DISMISSED
    )
    assert await pairs.set_status("z", "81.2.69.10", PairStatus.DISMISSED) is None
    assert await pairs.reason_of("a", "81.2.69.10") == "home office"
    # A heartbeat keeps a decision's status; the org no longer "uses" the IP.
    await pairs.record([seen("a", "81.2.69.10", T0 + timedelta(hours=1))], T0 + timedelta(hours=1))
    assert await pairs.pairs_with_status(PairStatus.DISMISSED) == [("a", "81.2.69.10")]
    assert [o.organization_id for o in await pairs.orgs_behind("81.2.69.10")] == ["b", "c"]
    assert await pairs.crowded_ips(2) == {"81.2.69.10": ["b", "c"]}
    assert await pairs.crowded_ips(3) == {}
    await pairs.set_status("b", "81.2.69.10", PairStatus.SHARED_EGRESS, "shared")
    assert await pairs.sharing("81.2.69.10") == ["b", "c"]
    # Active again: its request is due, so the relay sends it.
    now = datetime.now(UTC)
    await pairs.mark_requested(
        [doc["_id"] for doc in await pairs.all_pairs()], now - timedelta(minutes=1)
    )
    # Attribution's passes never overwrite a dismissal; only undismiss ends it.
    await pairs.set_status("a", "81.2.69.10", PairStatus.ACTIVE, "no longer shared", now)
    assert await pairs.status_of("a", "81.2.69.10") is PairStatus.DISMISSED
    assert await pairs.claim_unsent(now + timedelta(seconds=1), 10) == {}
    await pairs.undismiss("a", "81.2.69.10", PairStatus.ACTIVE, "undismissed", now)
    due = await pairs.claim_unsent(now + timedelta(seconds=1), 10)
    assert list(due) == [("a", "81.2.69.10")]


async def test_a_scope_file_excludes_and_shared_egress_closes_on_real_servers(
    scan_settings: Settings, shodan_emulator: ShodanEmulator, tmp_path: Path, db: Any
) -> None:
    shared, guest = "45.33.90.1", "45.33.91.1"
    scope = tmp_path / "scope.yaml"
    scope.write_text(
        "version: 1\nshared_egress_organizations: 3\n"
        "organizations:\n"
        "  acme:\n    exclude: [{cidr: 45.33.91.0/24, reason: guest Wi-Fi}]\n"
        "  initech:\n    own: [{cidr: 45.33.90.0/24, reason: our office}]\n"
    )
    for ip in (shared, guest):
        shodan_emulator.set_host(ip, host(ip, banner(3389, "rdp")))
    settings = scan_settings.model_copy(update={"scope_file": scope})
    async with running(settings, ("ingest", "scanner", "scheduler")) as worker:
        await produce(
            settings.kafka_bootstrap_servers,
            settings.topic_heartbeats,
            [heartbeat("acme", guest, "a1", NOW), heartbeat("acme", shared, "a2", NOW)],
        )

        async def events() -> list[dict[str, Any]]:
            records = await read_all(
                settings.kafka_bootstrap_servers, settings.topic_exposures, idle=0.3
            )
            return [json.loads(r.value)["data"] for r in records]

        async def guest_excluded() -> bool:
            pair = await db.org_ips.find_one({"organization_id": "acme", "ip": guest})
            return bool(pair) and pair.get("status") == "excluded"

        await eventually(guest_excluded, timeout=60)
        # Two more organizations behind the same exit: initech (which owns it), then
        # globex, the third: now it is shared egress.
        await produce(
            settings.kafka_bootstrap_servers,
            settings.topic_heartbeats,
            [heartbeat("initech", shared, "i1", NOW)],
        )

        async def initech_told() -> bool:
            return any(
                e["organization_id"] == "initech" and e["change"] == "opened"
                for e in await events()
            )

        await eventually(initech_told, timeout=60)
        await produce(
            settings.kafka_bootstrap_servers,
            settings.topic_heartbeats,
            [heartbeat("globex", shared, "g1", NOW)],
        )

        async def shared_closed() -> bool:
            return {
                e["organization_id"]
                for e in await events()
                if e["ip"] == shared and e["reason"] == "shared_egress"
            } >= {"acme"}

        await eventually(shared_closed, timeout=60)
        seen_events = await events()
        assert sample(worker, "recon_shared_egress_ips") == 1
    # globex never heard of the shared exit's ports; initech, which owns it, did.
    opened = {(e["organization_id"], e["ip"]) for e in seen_events if e["change"] == "opened"}
    assert ("globex", shared) not in opened
    assert ("initech", shared) in opened
    # The guest network never reached acme's table (excluded by ingest), or, had its
    # lookup come first, closed as excluded.
    assert ("acme", guest) not in opened or any(
        e["ip"] == guest and e["reason"] == "excluded" for e in seen_events
    )
