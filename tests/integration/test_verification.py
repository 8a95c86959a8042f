"""TCP verification end to end, in a network namespace of the test's own.

Verification connects only to public addresses, so the whole scene runs inside a
namespace whose `lo` holds 81.2.69.142 (tests/netns.py): Tansu, genuine MongoDB, the
Shodan emulator, a listener on the "customer's" RDP port and the scanner worker. The
namespace has no route out: nothing leaves the machine. The scene returns what it saw
as JSON; the assertions run here.

The story: Shodan reports RDP (3389) and SMB (445) on one IP used by two organizations.
Only acme consented to verification. RDP answers, SMB refuses (the technician closed
it; Shodan's record is days old). acme's SMB closes as `verified_closed` after two
refusals a confirm interval apart; globex's never changes (no consent). A rescan then
re-reads Shodan's stale record: SMB does not reopen.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from tests import netns

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
    verification_world,
)

IP = netns.PUBLIC_ADDRESS


def _listen(port: int) -> socket.socket:
    """A listener that accepts and drops every connection (a service answering)."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((IP, port))
    server.listen(64)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return server


async def scene(workdir: str) -> dict[str, Any]:
    """Runs inside the namespace."""
    rdp = _listen(3389)
    async with verification_world(workdir, "scanner-verify") as (settings, shodan):
        shodan.set_host(IP, host(IP, banner(3389, "rdp"), banner(445, "smb")))
        consent = command("verification", "acme", enabled=True, reason="contract §4 allows it")
        await produce(settings.kafka_bootstrap_servers, settings.topic_commands, [consent])
        async with running(settings, ("ingest", "scanner")) as worker:

            async def consented() -> bool:
                return (
                    sample(
                        worker, "recon_commands_total", command="verification", outcome="applied"
                    )
                    == 1
                )

            await eventually(consented)
            await produce(
                settings.kafka_bootstrap_servers,
                settings.topic_heartbeats,
                [heartbeat("acme", IP, "a1", NOW), heartbeat("globex", IP, "g1", NOW)],
            )

            async def smb_closed() -> bool:
                records = await read_all(
                    settings.kafka_bootstrap_servers, settings.topic_exposures, idle=0.3
                )
                return any(
                    json.loads(r.value)["data"]["reason"] == "verified_closed" for r in records
                )

            await eventually(smb_closed, timeout=60)
            # A rescan re-reads Shodan's record, which still lists SMB as crawled a day ago.
            lookups = sum(1 for r in shodan.requests if r.path == f"/shodan/host/{IP}")
            await produce(
                settings.kafka_bootstrap_servers,
                settings.topic_commands,
                [command("rescan", "acme", ip=IP)],
            )

            async def rescanned() -> bool:
                seen = sum(1 for r in shodan.requests if r.path == f"/shodan/host/{IP}")
                return seen > lookups and (
                    sample(worker, "recon_verification_rounds_total", trigger="rescan") >= 1
                )

            await eventually(rescanned, timeout=60)
            assert worker.scanner is not None
            assert worker.scanner.verifier is not None
            await worker.scanner.verifier.idle()
            records = await read_all(
                settings.kafka_bootstrap_servers, settings.topic_exposures, idle=1.0
            )
            metrics = {
                result: sample(worker, "recon_verification_checks_total", result=result)
                for result in ("open", "closed", "no_answer", "error", "not_checkable")
            }
    rdp.close()
    events = [json.loads(r.value)["data"] for r in records]
    return {
        "events": [
            {
                "org": e["organization_id"],
                "change": e["change"],
                "port": e["port"],
                "reason": e["reason"],
                "fields": e["changed_fields"],
                "verification": (e["verification"] or {}).get("state"),
            }
            for e in events
        ],
        "checks": metrics,
    }


def test_a_refused_port_closes_for_the_consenting_organization_only(tmp_path: Path) -> None:
    with netns.namespace_or_skip() as ns:
        seen = ns.call(scene, str(tmp_path), timeout=240)
    events = seen["events"]
    acme = [e for e in events if e["org"] == "acme"]
    globex = [e for e in events if e["org"] == "globex"]
    # globex never consented: Shodan's view only, no check on its exposures.
    assert sorted((e["change"], e["port"]) for e in globex) == [("opened", 445), ("opened", 3389)]
    assert all(e["verification"] is None for e in globex)
    by = {(e["change"], e["port"], e["reason"]) for e in acme}
    assert ("opened", 3389, None) in by
    assert ("opened", 445, None) in by
    assert ("closed", 445, "verified_closed") in by
    verified = [e for e in acme if e["change"] == "changed"]
    assert {(e["port"], e["verification"]) for e in verified} >= {(3389, "open"), (445, "closed")}
    assert all(e["fields"] == ["verification"] for e in verified)
    # The rescan's lookup still listed SMB (an old crawl): it never reopened.
    assert sum(1 for e in acme if e["port"] == 445 and e["change"] == "opened") == 1
    checks = seen["checks"]
    assert checks["open"] >= 2
    assert checks["closed"] >= 2
    assert checks["error"] == 0
    assert checks["not_checkable"] == 0


@pytest.mark.parametrize("target", ["10.0.0.5", "127.0.0.1", "169.254.1.1", "192.0.2.10"])
async def test_a_non_public_target_is_never_connected_to(target: str) -> None:
    from recon_stream.adapters.probe import TcpProber
    from recon_stream.domain.verification import NotCheckable

    class Budget:
        async def reserve(self) -> Any:
            raise AssertionError("a slot was taken for a non-public target")

    with pytest.raises(NotCheckable):
        await TcpProber(1.0, Budget()).check(target, 3389)  # type: ignore[arg-type]
    await asyncio.sleep(0)
