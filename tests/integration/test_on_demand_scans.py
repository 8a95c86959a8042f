"""On-demand Shodan scans for rescans, end to end: Tansu, genuine MongoDB and the Shodan
emulator's scan endpoints through the real `shodan` client.

A rescan spends one of the day's credits on `POST /shodan/scan`, waits for DONE, then
looks the IP up: the fix the technician made shows, with the scan in `data.scan`.
Every refusal falls back to the plain lookup, counted, never submitted twice.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from recon_stream.adapters.scan_credits import MongoScanCredits
from recon_stream.settings import Settings
from tests.emulators.shodan import ShodanEmulator

from .support import NOW, banner, events_on, eventually, heartbeat, host, produce, running, sample
from .test_commands import command, host_requests, send


def fresh(port: int, module: str) -> dict[str, Any]:
    """A banner as a crawl made just now saw it."""
    seen = banner(port, module)
    seen["timestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return seen


def submits(emulator: ShodanEmulator) -> int:
    return sum(1 for r in emulator.requests if r.path == "/shodan/scan")


def scans(worker: Any, outcome: str) -> float:
    return sample(worker, "recon_shodan_scans_total", outcome=outcome)


@pytest.fixture
def scanning(scan_settings: Settings) -> Settings:
    return scan_settings.model_copy(
        update={
            "shodan_scan_credits_per_day": 3,
            "shodan_scan_poll_seconds": 0.2,
            "shodan_scan_timeout_seconds": 60.0,
        }
    )


async def opened(settings: Settings, emulator: ShodanEmulator, ip: str) -> None:
    """The IP's agent reports in; RDP and SSH open, as Shodan crawled them a day ago."""
    emulator.set_host(ip, host(ip, banner(3389, "rdp"), banner(22, "ssh")))
    await produce(
        settings.kafka_bootstrap_servers,
        settings.topic_heartbeats,
        [heartbeat("acme", ip, "a1", NOW)],
    )
    await events_on(settings, 2)


async def test_a_rescan_scans_first_and_its_lookup_confirms_the_fix(
    scanning: Settings, shodan_emulator: ShodanEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    ip = "45.33.70.1"
    shodan_emulator.scan_seconds = 1.0
    caplog.set_level(logging.DEBUG, logger="recon_stream")
    async with running(scanning, ("ingest", "scanner")) as worker:
        await opened(scanning, shodan_emulator, ip)
        # RDP was closed: Shodan's database does not know until its scan is done.
        shodan_emulator.after_scan(ip, host(ip, fresh(22, "ssh")))
        await send(scanning, command("rescan", ip=ip))
        events = await events_on(scanning, 3)
        closed = events[2]["data"]
        assert (closed["change"], closed["port"], closed["reason"]) == (
            "closed",
            3389,
            "port_closed",
        )
        [submitted] = shodan_emulator.scans
        assert closed["scan"]["id"] == submitted["id"]
        assert closed["scan"]["status"] == "done"
        assert submitted["polls"] >= 1
        # One submit, one lookup after DONE (besides the first), the credit counted.
        assert submits(shodan_emulator) == 1
        assert host_requests(shodan_emulator, ip) == 2
        assert (scans(worker, "submitted"), scans(worker, "done")) == (1, 1)
        assert scans(worker, "stale_after_done") == 0
        assert sample(worker, "recon_shodan_scan_credits_left") == shodan_emulator.scan_credits

        async def budget_sampled() -> bool:
            return sample(worker, "recon_shodan_scan_credits_used_today") == 1

        await eventually(budget_sampled)
        states = await worker.status.readiness()  # readiness still ready
        assert all(v == "ok" for v in states.values()), states
        assert "1 of 3 credits used" in worker.status.states()["shodan_scans"]
    # The scan listing carries the key; nothing we log does.
    assert shodan_emulator.api_key not in caplog.text


async def test_refusals_fall_back_to_the_plain_lookup_once_each(
    scanning: Settings, shodan_emulator: ShodanEmulator
) -> None:
    ip = "45.33.70.2"
    async with running(
        scanning.model_copy(update={"shodan_scan_credits_per_day": 2}), ("ingest", "scanner")
    ) as worker:
        await opened(scanning, shodan_emulator, ip)
        lookups = host_requests(shodan_emulator, ip)
        # 1. Shodan has no credits left: 401, which says nothing about the key.
        shodan_emulator.scan_credits = 0
        shodan_emulator.set_host(ip, host(ip, banner(22, "ssh")))
        await send(scanning, command("rescan", ip=ip))
        await events_on(scanning, 3)
        assert scans(worker, "no_credits") == 1
        assert host_requests(shodan_emulator, ip) == lookups + 1
        assert worker.status.states()  # nothing paused:
        assert (await worker.status.readiness())["shodan"] == "ok"
        # 2. A scan Shodan loses (404 on its status): the lookup is made anyway.
        shodan_emulator.scan_credits = 10
        shodan_emulator.fail_next(None, 404, body={"error": "Scan not found"}, path="/shodan/scan/")
        shodan_emulator.set_host(ip, host(ip, banner(22, "ssh"), banner(443, "https")))
        await send(scanning, command("rescan", ip=ip))
        await events_on(scanning, 4)
        assert scans(worker, "unknown_scan") == 1
        # 3. Our own daily budget (2) is spent: no submit at all, the lookup still made.
        before = submits(shodan_emulator)
        shodan_emulator.set_host(ip, host(ip, banner(443, "https")))
        await send(scanning, command("rescan", ip=ip))
        await events_on(scanning, 5)
        assert scans(worker, "budget_spent") == 1
        assert submits(shodan_emulator) == before
        # Every refusal was tried once: two submits in all, however long we watch.
        assert submits(shodan_emulator) == 2


async def test_a_scan_that_never_finishes_times_out_to_the_plain_lookup(
    scanning: Settings, shodan_emulator: ShodanEmulator
) -> None:
    ip = "45.33.70.3"
    shodan_emulator.scan_seconds = 3600.0
    settings = scanning.model_copy(update={"shodan_scan_timeout_seconds": 1.0})
    async with running(settings, ("ingest", "scanner")) as worker:
        await opened(settings, shodan_emulator, ip)
        shodan_emulator.set_host(ip, host(ip, banner(22, "ssh")))
        await send(settings, command("rescan", ip=ip))
        events = await events_on(settings, 3)
        assert events[2]["data"]["scan"]["status"] == "timed_out"
        assert scans(worker, "timed_out") == 1
        # A 5xx on a submit: counted as an error, the plain lookup made.
        shodan_emulator.fail_next(None, 502, path="/shodan/scan")
        shodan_emulator.set_host(ip, host(ip, banner(22, "ssh"), banner(80, "http")))
        await send(settings, command("rescan", ip=ip))
        events = await events_on(settings, 4)
        assert events[3]["data"]["scan"] is None
        assert scans(worker, "error") == 1


async def test_the_daily_credits_hold_across_racing_replicas(db: Any) -> None:
    # Four clients' worth of racing takes on one day: never more than the figure.
    replicas = [MongoScanCredits(db, 3) for _ in range(4)]
    day = datetime(2026, 12, 2, 10, tzinfo=UTC)
    taken = await asyncio.gather(*(r.take(day) for r in replicas for _ in range(5)))
    assert sum(taken) == 3
    assert await replicas[0].used(day) == 3
    # The next UTC day has its own credits; a figure of 0 never spends.
    assert await replicas[1].take(day + timedelta(days=1))
    assert not await MongoScanCredits(db, 0).take(day)
