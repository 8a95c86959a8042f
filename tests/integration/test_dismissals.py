"""Dismissals and offboarding on real servers: the MongoDB adapters on genuine mongod,
and `recon-stream dismiss|undismiss|purge` end to end (Tansu, mongod, the Shodan
emulator through the real `shodan` client, the CLI as users run it)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from recon_stream.adapters.acceptances import Acceptances
from recon_stream.adapters.consents import MongoConsents
from recon_stream.adapters.history import History
from recon_stream.adapters.org_ips import MongoOrgIps
from recon_stream.domain.acceptance import Acceptance
from recon_stream.domain.pairs import Dismissal, DismissalEntry, PairStatus
from recon_stream.domain.sightings import PairSighting
from recon_stream.domain.verification_consent import Consent
from recon_stream.exposure_table import load_history
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
)

T0 = datetime(2026, 12, 1, 12, tzinfo=UTC)


def seen(org: str, ip: str, at: datetime = T0) -> PairSighting:
    return PairSighting(organization_id=org, ip=ip, first_seen=at, last_seen=at)


def dismissal(org: str, ip: str, command_id: str, expires: datetime | None = None) -> Dismissal:
    return Dismissal(org, ip, "home office", "tech@msp", T0, expires, command_id)


async def test_dismissals_and_forgetting_an_organization_on_mongod(db: Any) -> None:
    pairs = MongoOrgIps(db)
    ip, other = "81.2.69.20", "81.2.69.21"
    await pairs.record([seen("a", ip), seen("a", other), seen("b", ip)], T0)
    assert await pairs.dismiss(dismissal("z", ip, "d-0")) is None  # never reported
    assert await pairs.dismiss(dismissal("a", ip, "d-1", T0 + timedelta(hours=1))) is (
        PairStatus.ACTIVE
    )
    assert await pairs.dismiss(dismissal("a", other, "d-2")) is PairStatus.ACTIVE
    assert await pairs.status_of("a", ip) is PairStatus.DISMISSED
    assert await pairs.status_of("z", ip) is None
    # A heartbeat keeps it; attribution's passes never overwrite it.
    await pairs.record([seen("a", ip, T0 + timedelta(minutes=5))], T0 + timedelta(minutes=5))
    assert await pairs.set_status("a", ip, PairStatus.SHARED_EGRESS, "shared") is (
        PairStatus.SHARED_EGRESS  # nothing written
    )
    assert await pairs.status_of("a", ip) is PairStatus.DISMISSED
    assert [o.organization_id for o in await pairs.orgs_behind(ip)] == ["b"]
    expired = await pairs.expired_dismissals(T0 + timedelta(hours=1), 10)
    assert [(d.ip, d.command_id, d.requested_by, d.expires_at) for d in expired] == [
        (ip, "d-1", "tech@msp", T0 + timedelta(hours=1))
    ]
    # Only the dismissal it read: a newer one (another command) is left alone.
    assert await pairs.undismiss("a", ip, PairStatus.ACTIVE, "x", T0, only="d-9") is None
    ended = await pairs.undismiss("a", ip, PairStatus.ACTIVE, "dismissal_expired", T0, "d-1")
    assert ended is not None
    assert ended.reason == "home office"
    assert await pairs.undismiss("a", ip, PairStatus.ACTIVE, "again", T0) is None
    assert await pairs.status_of("a", ip) is PairStatus.ACTIVE
    assert (await db.org_ips.find_one({"organization_id": "a", "ip": ip})).get("dismissal") is None
    assert await pairs.undismiss("a", other, PairStatus.EXCLUDED, "guests", T0) is not None
    assert await pairs.reason_of("a", other) == "guests"

    history = History(db)
    entry = DismissalEntry.started(dismissal("a", ip, "d-1"))
    await history.record_dismissal(entry)
    await history.record_dismissal(entry)  # idempotent by its id
    (kept,) = await history.entries("a", ip=ip)
    assert (kept["change"], kept["reason"], kept["requested_by"], kept["port"]) == (
        "dismissal",
        "dismissed",
        "tech@msp",
        "*",
    )
    acceptances, consents = Acceptances(db), MongoConsents(db)
    await acceptances.accept(Acceptance("a", None, "tcp", 22, "bastion", "tech", T0, None), "c-1")
    await consents.set(Consent("a", True, "ciso", "contract", T0, "v-1"))
    assert await pairs.forget_organization("a") == 2
    assert await history.forget_organization("a") == 1
    assert await acceptances.forget_organization("a") == 1
    assert await consents.forget_organization("a") == 1
    assert await pairs.forget_organization("a") == 0
    assert [o.organization_id for o in await pairs.orgs_behind(ip)] == ["b"]


async def test_dismiss_and_undismiss_from_the_cli_on_real_servers(
    scan_settings: Settings, shodan_emulator: ShodanEmulator
) -> None:
    ip = "45.33.92.1"
    shodan_emulator.set_host(ip, host(ip, banner(3389, "rdp")))
    settings = scan_settings

    async def cli(*args: str) -> Any:
        return await asyncio.to_thread(run_cli, settings, *args)

    async def events() -> list[dict[str, Any]]:
        records = await read_all(
            settings.kafka_bootstrap_servers, settings.topic_exposures, idle=0.3
        )
        return [json.loads(r.value)["data"] for r in records]

    def of(found: list[dict[str, Any]], org: str) -> list[tuple[str, str | None]]:
        return [(e["change"], e["reason"]) for e in found if e["organization_id"] == org]

    async with running(settings, ("ingest", "scanner", "scheduler")):
        await produce(
            settings.kafka_bootstrap_servers,
            settings.topic_heartbeats,
            [heartbeat("acme", ip, "a1", NOW), heartbeat("globex", ip, "g1", NOW)],
        )

        async def both_opened() -> bool:
            found = await events()
            return bool(of(found, "acme")) and bool(of(found, "globex"))

        await eventually(both_opened, timeout=60)
        done = await cli(
            *("dismiss", "--org", "acme", "--ip", ip, "--reason", "a technician's home"),
            *("--by", "tech@msp", "--wait"),
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1] == "applied"
        foreign = await cli(
            *("dismiss", "--org", "acme", "--ip", "45.33.92.99", "--reason", "r"),
            *("--by", "tech@msp", "--wait"),
        )
        assert foreign.returncode == 1
        assert foreign.stdout.splitlines()[-1].startswith("rejected (unknown_target:")

        async def acme_closed() -> list[dict[str, Any]] | None:
            found = await events()
            return found if ("closed", "dismissed") in of(found, "acme") else None

        found = await eventually(acme_closed, timeout=30)
        assert of(found, "globex") == [("opened", None)]
        listed = await cli("ips", "--org", "acme", "--format", "json")
        (row,) = json.loads(listed.stdout)
        assert (row["state"], row["reason"], row["next_lookup"]) == (
            "dismissed",
            "a technician's home",
            "",
        )
        # Its agents keep reporting from it: still dismissed, nothing more reported.
        await produce(
            settings.kafka_bootstrap_servers,
            settings.topic_heartbeats,
            [heartbeat("acme", ip, "a2", datetime.now(UTC))],
        )
        back = await cli(
            *("undismiss", "--org", "acme", "--ip", ip, "--by", "ciso@acme"),
            *("--reason", "the office moved there", "--wait"),
        )
        assert back.stdout.splitlines()[-1] == "applied", back.stderr

        async def acme_reopened() -> list[dict[str, Any]] | None:
            found = await events()
            return found if of(found, "acme")[-1:] == [("opened", None)] else None

        found = await eventually(acme_reopened, timeout=60)
        again = await cli("undismiss", "--org", "acme", "--ip", ip, "--by", "ciso", "--wait")
        assert again.stdout.splitlines()[-1] == "no_effect"
    assert of(found, "acme") == [("opened", None), ("closed", "dismissed"), ("opened", None)]
    history = await load_history(settings, "acme", ip=ip)
    decisions = [(h["reason"], h["requested_by"]) for h in history if h["change"] == "dismissal"]
    assert decisions == [("undismissed", "ciso@acme"), ("dismissed", "tech@msp")]


async def test_a_dismissal_expires_on_its_own(
    scan_settings: Settings, shodan_emulator: ShodanEmulator, db: Any
) -> None:
    ip = "45.33.93.1"
    shodan_emulator.set_host(ip, host(ip, banner(445, "smb")))
    settings = scan_settings
    async with running(settings, ("ingest", "scanner", "scheduler")):
        await produce(
            settings.kafka_bootstrap_servers,
            settings.topic_heartbeats,
            [heartbeat("acme", ip, "a1", NOW)],
        )

        async def pair() -> dict[str, Any] | None:
            return await db.org_ips.find_one({"organization_id": "acme", "ip": ip})

        await eventually(pair, timeout=30)
        until = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
        done = await asyncio.to_thread(
            run_cli,
            settings,
            *("dismiss", "--org", "acme", "--ip", ip, "--reason", "hotel"),
            *("--by", "tech", "--until", until, "--wait"),
        )
        assert done.stdout.splitlines()[-1] == "applied", done.stderr

        async def active_again() -> bool:
            doc = await pair()
            return doc is not None and doc["status"] == "active" and "dismissal" not in doc

        await eventually(active_again, timeout=60)
    history = await load_history(settings, "acme", ip=ip)
    assert [h["reason"] for h in history if h["change"] == "dismissal"] == [
        "dismissal_expired",
        "dismissed",
    ]


async def test_purge_closes_tombstones_and_deletes_then_late_heartbeats_start_afresh(
    scan_settings: Settings, shodan_emulator: ShodanEmulator, db: Any
) -> None:
    first, second = "45.33.94.1", "45.33.94.2"
    shodan_emulator.set_host(first, host(first, banner(3389, "rdp"), banner(445, "smb")))
    shodan_emulator.set_host(second, host(second, banner(5900, "vnc")))
    settings = scan_settings

    async def cli(*args: str) -> Any:
        return await asyncio.to_thread(run_cli, settings, *args)

    async def events() -> list[dict[str, Any]]:
        records = await read_all(
            settings.kafka_bootstrap_servers, settings.topic_exposures, idle=0.3
        )
        return [json.loads(r.value)["data"] for r in records]

    async def opened(org: str, n: int) -> bool:
        found = await events()
        return sum(e["organization_id"] == org and e["change"] == "opened" for e in found) >= n

    async with running(settings, ("ingest", "scanner", "scheduler")):
        await produce(
            settings.kafka_bootstrap_servers,
            settings.topic_heartbeats,
            [
                heartbeat("acme", first, "a1", NOW),
                heartbeat("acme", second, "a2", NOW),
                heartbeat("globex", first, "g1", NOW),
            ],
        )
        await eventually(lambda: opened("acme", 3), timeout=60)
        await eventually(lambda: opened("globex", 2), timeout=60)
        accepted = await cli(
            *("accept", "--org", "acme", "--port", "5900", "--reason", "vendor"),
            *("--by", "tech", "--wait"),
        )
        assert accepted.stdout.splitlines()[-1] == "applied", accepted.stderr
        unconfirmed = await cli("purge", "--org", "acme", "--by", "ops@msp")
        assert unconfirmed.returncode == 2
        purged = await cli("purge", "--org", "acme", "--by", "ops@msp", "--yes", "--wait")
        assert purged.returncode == 0, purged.stderr
        assert purged.stdout.splitlines()[-1] == "applied"
        again = await cli("purge", "--org", "acme", "--by", "ops@msp", "--yes", "--wait")
        assert again.stdout.splitlines()[-1] == "no_effect"
        found = await events()
        gone = {(e["ip"], e["port"]) for e in found if e["reason"] == "organization_purged"}
        assert gone == {(first, 3389), (first, 445), (second, 5900)}
        assert all(
            e["organization_id"] == "acme" for e in found if e["reason"] == "organization_purged"
        )
        for name in ("org_ips", "exposures", "acceptances", "exposure_history"):
            assert await db[name].count_documents({"organization_id": "acme"}) == 0, name
        assert await db.org_ips.count_documents({"organization_id": "globex"}) == 1
        state = await read_all(
            settings.kafka_bootstrap_servers, settings.topic_exposure_state, idle=0.3
        )
        latest = {r.key.decode(): r.value for r in state}
        assert {k for k, v in latest.items() if k.startswith("acme/") and v is None} == {
            f"acme/{first}/tcp/3389",
            f"acme/{first}/tcp/445",
            f"acme/{second}/tcp/5900",
        }
        assert latest[f"globex/{first}/tcp/3389"] is not None
    # A late heartbeat (a new ingest worker, as after the next deploy, or once the
    # running one's cache of seen pairs refreshes): the organization starts afresh.
    async with running(settings, ("ingest", "scanner")):
        await produce(
            settings.kafka_bootstrap_servers,
            settings.topic_heartbeats,
            [heartbeat("acme", second, "a2", datetime.now(UTC))],
        )
        await eventually(lambda: opened("acme", 4), timeout=60)
