"""Verification's closing rules on real servers, in a network namespace of each test's own.

As in test_verification.py, each test runs its whole scene inside a fresh namespace whose
only interface is `lo`, holding 81.2.69.142 (tests/netns.py): Tansu, genuine MongoDB,
the Shodan emulator (through the real `shodan` client), the listeners and the workers
(ingest and scanner, in one process). Nothing leaves the machine. Each scene returns
what it saw as JSON; the assertions run here.

The port states are made by the namespace's own kernel, as tests/integration/test_probe.py
measured them:

- answers (open): a listener that accepts every connection;
- refused (closed): nothing listening (a listener stopped), a reset;
- silent (no_answer) on one port: a listener with `listen(0)` whose one-connection
  accept queue is full and which never accepts: Linux drops the SYN, the connect times
  out (RECON_VERIFY_TIMEOUT_SECONDS);
- the whole IP silent: an `unreachable` route for a second public address (host-unreach,
  at once).

The rules (DESIGN.md, "Freshness"): two unanswered checks at least
RECON_VERIFY_CONFIRM_SECONDS apart close a port (`verified_unreachable`) only when
another port of the IP answered in the same round; when every port of the IP stops
answering, nothing closes; a rescan whose checks all answer open spends no scan credit,
one whose checks disagree with Shodan's record submits a scan.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from recon_stream.adapters.collections import SCAN_CREDITS, SCAN_QUEUE
from recon_stream.adapters.scan_credits import MongoScanCredits
from recon_stream.app import Worker
from recon_stream.settings import Settings
from tests import netns
from tests.emulators.shodan import ShodanEmulator

from .support import (
    NOW,
    banner,
    command,
    eventually,
    heartbeat,
    host,
    produce,
    read_all,
    running,
    sample,
    send,
    verification_world,
)

IP = netns.PUBLIC_ADDRESS
SILENT_IP = "81.2.69.144"
"""Routed `unreachable` inside the namespace: every port of it gives no answer."""
CONFIRM = 1.0
TIMEOUT = 1.0
RESULTS = ("open", "closed", "no_answer", "error", "not_checkable")


# -- run inside the namespace (Namespace.call) ---------------------------------------------


async def _consent_and_report(settings: Settings, worker: Worker, ip: str) -> None:
    """acme consents to verification, then its agent reports `ip`."""
    await send(settings, command("verification", "acme", enabled=True, reason="contract"))

    async def consented() -> bool:
        applied = sample(worker, "recon_commands_total", command="verification", outcome="applied")
        return applied == 1

    await eventually(consented)
    await produce(
        settings.kafka_bootstrap_servers,
        settings.topic_heartbeats,
        [heartbeat("acme", ip, "a1", NOW)],
    )


async def _events(settings: Settings, idle: float = 0.3) -> list[dict[str, Any]]:
    records = await read_all(settings.kafka_bootstrap_servers, settings.topic_exposures, idle=idle)
    events = []
    for record in records:
        data = json.loads(record.value)["data"]
        verification = data["verification"] or {}
        events.append(
            {
                "change": data["change"],
                "port": data["port"],
                "reason": data["reason"],
                "fields": data["changed_fields"],
                "verification": verification.get("state"),
                "checked_at": verification.get("checked_at"),
            }
        )
    return events


def _checks(worker: Worker) -> dict[str, float]:
    return {r: sample(worker, "recon_verification_checks_total", result=r) for r in RESULTS}


def _rounds(worker: Worker, trigger: str) -> float:
    return sample(worker, "recon_verification_rounds_total", trigger=trigger)


async def _until(
    condition: Callable[[], Awaitable[bool]], worker: Worker, settings: Settings
) -> None:
    """`eventually(condition)`; when it never holds, fail saying what was seen."""
    try:
        await eventually(condition, timeout=40)
    except AssertionError as error:
        rounds = {t: _rounds(worker, t) for t in ("lookup", "confirm", "rescan")}
        seen = {"checks": _checks(worker), "rounds": rounds, "events": await _events(settings)}
        raise AssertionError(f"{error}; seen: {json.dumps(seen)}") from None


async def _idle(worker: Worker) -> None:
    assert worker.scanner is not None
    assert worker.scanner.verifier is not None
    await worker.scanner.verifier.idle()


def _submits(shodan: ShodanEmulator) -> int:
    """Scan submits (`POST /shodan/scan`) the emulator received."""
    return sum(1 for r in shodan.requests if r.path == "/shodan/scan")


def _lookups(shodan: ShodanEmulator) -> int:
    return sum(1 for r in shodan.requests if r.path == f"/shodan/host/{IP}")


async def _answering(port: int) -> asyncio.Server:
    """A service answering on IP:`port`: every connection accepted, then dropped."""

    async def drop(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    return await asyncio.start_server(drop, IP, port, reuse_address=True)


def _queue(listening: socket.socket) -> tuple[int, int]:
    """(connections waiting in the accept queue, backlog): Linux's TCP_INFO gives them
    as tcpi_unacked and tcpi_sacked for a listening socket."""
    info = listening.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    unacked, sacked = struct.unpack_from("II", info, 24)
    return unacked, sacked


async def _silent(port: int) -> tuple[socket.socket, socket.socket]:
    """IP:`port` made silent: a listener whose one-connection accept queue is full (a
    filler connection) and which never accepts; Linux drops every further SYN."""
    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.bind((IP, port))
    listening.listen(0)
    filler = socket.create_connection((IP, port), timeout=10)
    deadline = time.monotonic() + 10
    while _queue(listening)[0] <= _queue(listening)[1]:
        assert time.monotonic() < deadline, "the accept queue never filled"
        await asyncio.sleep(0.01)
    return listening, filler


async def one_port_silent(workdir: str) -> dict[str, Any]:
    """RDP (3389) answers, VNC (5900) is silent: VNC closes as verified_unreachable."""
    rdp = await _answering(3389)
    listening, filler = await _silent(5900)
    try:
        async with verification_world(
            workdir, "scanner-rules", verify_confirm_seconds=CONFIRM, verify_timeout_seconds=TIMEOUT
        ) as (settings, shodan):
            shodan.set_host(IP, host(IP, banner(3389, "rdp"), banner(5900, "vnc")))
            async with running(settings, ("ingest", "scanner")) as worker:
                await _consent_and_report(settings, worker, IP)
                started = time.monotonic()

                async def vnc_closed() -> bool:
                    return any(
                        e["reason"] == "verified_unreachable" for e in await _events(settings)
                    )

                await _until(vnc_closed, worker, settings)
                closed_after = time.monotonic() - started
                await _idle(worker)
                events = await _events(settings, idle=1.0)
                checks = _checks(worker)
                rounds = {t: _rounds(worker, t) for t in ("lookup", "confirm", "rescan")}
    finally:
        filler.close()
        listening.close()
        rdp.close()
    return {"events": events, "checks": checks, "rounds": rounds, "closed_after": closed_after}


async def whole_ip_silent(workdir: str) -> dict[str, Any]:
    """Every reported port of SILENT_IP unreachable: four rounds, nothing closes."""
    async with verification_world(
        workdir, "scanner-rules", verify_confirm_seconds=CONFIRM, verify_timeout_seconds=TIMEOUT
    ) as (settings, shodan):
        shodan.set_host(SILENT_IP, host(SILENT_IP, banner(3389, "rdp"), banner(445, "smb")))
        async with running(settings, ("ingest", "scanner")) as worker:
            await _consent_and_report(settings, worker, SILENT_IP)

            async def silent_twice() -> bool:
                # Both ports unanswered in the lookup's round and in its confirming one.
                return _rounds(worker, "confirm") >= 1 and _checks(worker)["no_answer"] >= 4

            await _until(silent_twice, worker, settings)
            await _idle(worker)
            # A rescan: one more round (and its confirming one), seconds later.
            await send(settings, command("rescan", "acme", ip=SILENT_IP))

            async def silent_four_times() -> bool:
                rounds = _rounds(worker, "rescan") >= 1 and _rounds(worker, "confirm") >= 2
                return rounds and _checks(worker)["no_answer"] >= 8

            await _until(silent_four_times, worker, settings)
            await _idle(worker)
            events = await _events(settings, idle=1.0)
            checks = _checks(worker)
            rounds = {t: _rounds(worker, t) for t in ("lookup", "confirm", "rescan")}
    return {"events": events, "checks": checks, "rounds": rounds}


async def rescans_with_credits(workdir: str) -> dict[str, Any]:
    """On-demand scans configured: a rescan whose checks all answer open submits no scan;
    once a reported port refuses, the next rescan submits one."""
    rdp, https = await _answering(3389), await _answering(443)
    seen: dict[str, Any] = {}
    try:
        async with verification_world(
            workdir,
            "scanner-rules",
            verify_confirm_seconds=CONFIRM,
            verify_timeout_seconds=TIMEOUT,
            shodan_scan_credits_per_day=3,
            shodan_scan_poll_seconds=0.2,
            shodan_scan_timeout_seconds=30.0,
        ) as (settings, shodan):
            shodan.set_host(IP, host(IP, banner(3389, "rdp"), banner(443, "https")))
            client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
                settings.mongodb_uri.get_secret_value(), tz_aware=True
            )
            db = client[settings.mongodb_database]
            credits = MongoScanCredits(db, 3)

            async def queued() -> int:
                return await db[SCAN_QUEUE].count_documents({"_id": IP})

            async with running(settings, ("ingest", "scanner")) as worker:
                await _consent_and_report(settings, worker, IP)

                async def checked_open() -> bool:
                    return _rounds(worker, "lookup") >= 1 and _checks(worker)["open"] >= 2

                await _until(checked_open, worker, settings)
                await _idle(worker)
                # 1. Every reported port answers: Shodan's record stands, no credit spent.
                before = _lookups(shodan)
                started = time.monotonic()
                await send(settings, command("rescan", "acme", ip=IP))

                async def rescanned() -> bool:
                    return (
                        _rounds(worker, "rescan") >= 1
                        and _lookups(shodan) > before
                        and await queued() == 0
                    )

                await _until(rescanned, worker, settings)
                await _idle(worker)
                seen["agreeing"] = {
                    "seconds": time.monotonic() - started,
                    "submits": _submits(shodan),
                    "verified_open": sample(
                        worker, "recon_shodan_scans_total", outcome="verified_open"
                    ),
                    "submitted": sample(worker, "recon_shodan_scans_total", outcome="submitted"),
                    "credits_used": await credits.used(),
                    "credit_documents": await db[SCAN_CREDITS].count_documents({}),
                    "emulator_credits": shodan.scan_credits,
                    "checks": _checks(worker),
                }
                # 2. HTTPS is stopped: a connect is refused, verification disagrees.
                https.close()
                await https.wait_closed()
                try:
                    socket.create_connection((IP, 443), timeout=5).close()
                    refused = False
                except ConnectionRefusedError:
                    refused = True
                started = time.monotonic()
                await send(settings, command("rescan", "acme", ip=IP))

                async def scanned() -> bool:
                    return (
                        _submits(shodan) >= 1
                        and sample(worker, "recon_shodan_scans_total", outcome="done") >= 1
                        and await queued() == 0
                    )

                await _until(scanned, worker, settings)
                await _idle(worker)
                seen["disagreeing"] = {
                    "seconds": time.monotonic() - started,
                    "refused_locally": refused,
                    "submits": _submits(shodan),
                    "scans": [s["ip"] for s in shodan.scans],
                    "verified_open": sample(
                        worker, "recon_shodan_scans_total", outcome="verified_open"
                    ),
                    "submitted": sample(worker, "recon_shodan_scans_total", outcome="submitted"),
                    "credits_used": await credits.used(),
                    "checks": _checks(worker),
                }
            await client.close()
    finally:
        rdp.close()
        https.close()
    return seen


# -- the tests -------------------------------------------------------------------------------


def test_a_silent_port_closes_as_unreachable_while_another_port_answers(tmp_path: Path) -> None:
    with netns.namespace_or_skip() as ns:
        seen = ns.call(one_port_silent, str(tmp_path), timeout=180)
    events = seen["events"]
    by = [(e["change"], e["port"], e["reason"]) for e in events]
    assert ("opened", 3389, None) in by
    assert ("opened", 5900, None) in by
    assert [e for e in by if e[0] == "closed"] == [("closed", 5900, "verified_unreachable")]
    changed = {(e["port"], e["verification"]) for e in events if e["change"] == "changed"}
    assert changed == {(3389, "open"), (5900, "no_answer")}
    # The closing check came at least the confirm interval after the first silent one.
    first = next(e for e in events if e["change"] == "changed" and e["port"] == 5900)
    closing = next(e for e in events if e["change"] == "closed")
    assert closing["verification"] == "no_answer"
    elapsed = datetime.fromisoformat(closing["checked_at"]) - datetime.fromisoformat(
        first["checked_at"]
    )
    assert elapsed.total_seconds() >= CONFIRM
    checks = seen["checks"]
    assert checks["no_answer"] >= 2
    assert checks["open"] >= 1
    assert checks["closed"] == checks["error"] == checks["not_checkable"] == 0
    assert seen["rounds"]["lookup"] == 1
    assert seen["rounds"]["confirm"] >= 1


def test_nothing_closes_when_every_port_of_the_ip_is_silent(tmp_path: Path) -> None:
    with netns.namespace_or_skip() as ns:
        ns.route("unreachable", f"{SILENT_IP}/32")
        seen = ns.call(whole_ip_silent, str(tmp_path), timeout=180)
    events = seen["events"]
    assert not [e for e in events if e["change"] == "closed"], events
    assert sorted((e["change"], e["port"]) for e in events) == [
        ("changed", 445),
        ("changed", 3389),
        ("opened", 445),
        ("opened", 3389),
    ]
    assert all(e["verification"] == "no_answer" for e in events if e["change"] == "changed")
    checks = seen["checks"]
    # Four rounds of two ports, spanning well over the confirm interval, none answered.
    assert checks["no_answer"] >= 8
    assert checks["open"] == checks["closed"] == checks["error"] == 0
    assert seen["rounds"] == {"lookup": 1, "confirm": 2, "rescan": 1}


def test_a_rescan_spends_a_scan_credit_only_when_verification_disagrees(tmp_path: Path) -> None:
    with netns.namespace_or_skip() as ns:
        seen = ns.call(rescans_with_credits, str(tmp_path), timeout=180)
    agreeing = seen["agreeing"]
    assert agreeing["submits"] == 0
    assert agreeing["verified_open"] == 1
    assert agreeing["submitted"] == 0
    assert agreeing["credits_used"] == 0
    assert agreeing["credit_documents"] == 0
    assert agreeing["emulator_credits"] == 100
    assert agreeing["checks"]["open"] >= 4
    assert agreeing["checks"]["closed"] == 0
    disagreeing = seen["disagreeing"]
    assert disagreeing["refused_locally"]
    assert disagreeing["submits"] == 1
    assert disagreeing["scans"] == [IP]
    assert disagreeing["verified_open"] == 1
    assert disagreeing["submitted"] == 1
    assert disagreeing["credits_used"] == 1
    assert disagreeing["checks"]["closed"] >= 1
