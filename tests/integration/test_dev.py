"""`recon-stream dev` as a platform team uses it: a real subprocess, its own servers,
a non-Python producer pointed at the address it prints, and a clean stop on signals."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from pymongo import AsyncMongoClient

from recon_stream.embedded import free_port

from .support import eventually

STARTUP_SECONDS = 90.0


@dataclass
class DevProcess:
    proc: asyncio.subprocess.Process
    output: list[str] = field(default_factory=list)

    async def line_matching(self, pattern: str, timeout: float = STARTUP_SECONDS) -> re.Match[str]:
        """Read output until a line matches (the lines read are kept in `output`)."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError("dev exited early:\n" + "".join(self.output))
                line = raw.decode()
                self.output.append(line)
                found = re.search(pattern, line)
                if found:
                    return found

    async def rest_of_output(self) -> str:
        assert self.proc.stdout is not None
        rest = await self.proc.stdout.read()
        return "".join(self.output) + rest.decode()


def _children(pid: int) -> set[int]:
    """Processes whose parent is `pid` (the servers dev started)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@asynccontextmanager
async def dev_running(
    tmp_path: Path, *extra: str
) -> AsyncIterator[tuple[DevProcess, dict[str, int]]]:
    ports = {"kafka": free_port(), "mongodb": free_port(), "http": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECON_")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "recon_stream",
        "dev",
        "--no-samples",
        "--keep-running",
        "--data-dir",
        str(tmp_path / "dev"),
        "--kafka-port",
        str(ports["kafka"]),
        "--mongodb-port",
        str(ports["mongodb"]),
        "--http-port",
        str(ports["http"]),
        *extra,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    dev = DevProcess(proc)
    try:
        yield dev, ports
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _stopped_cleanly(dev: DevProcess, ports: dict[str, int], sig: signal.Signals) -> str:
    """Send `sig`; check dev exits 0 and leaves no server or port behind."""
    servers = _children(dev.proc.pid)
    assert len(servers) == 2, f"expected the broker and the database, found {servers}"
    dev.proc.send_signal(sig)
    async with asyncio.timeout(60):
        code = await dev.proc.wait()
    output = await dev.rest_of_output()
    assert code == 0, output
    assert f"{sig.name}: workers, broker and database stopped" in output
    left = [pid for pid in servers if Path(f"/proc/{pid}").exists()]
    assert not left, f"servers still running after {sig.name}: {left}"
    assert not [name for name, port in ports.items() if _accepts(port)], output
    return output


async def test_dev_prints_where_to_publish_and_a_librdkafka_producer_lands_there(
    tmp_path: Path,
) -> None:
    async with dev_running(tmp_path) as (dev, ports):
        bootstrap = (await dev.line_matching(r"^Kafka \(Tansu, in memory\): (\S+)")).group(1)
        uri = (await dev.line_matching(r"^MongoDB: (\S+)")).group(1)
        assert bootstrap == f"127.0.0.1:{ports['kafka']}"
        assert uri.startswith(f"mongodb://127.0.0.1:{ports['mongodb']}")
        await dev.line_matching(r"^publish your own heartbeat")
        await dev.line_matching(r"^running;")
        printed = "".join(dev.output)
        assert (
            f"RECON_KAFKA_BOOTSTRAP_SERVERS={bootstrap} recon-stream publish-heartbeat" in printed
        )
        assert f'"bootstrap.servers": "{bootstrap}"' in printed

        # The printed confluent-kafka example, as a platform team would run it.
        def produce() -> int:
            producer = Producer({"bootstrap.servers": bootstrap})
            producer.produce(
                "agent.heartbeats.v1",
                key="my-agent-1",
                value=json.dumps(
                    {
                        "organization_id": "my-org",
                        "agent_id": "my-agent-1",
                        "public_ip": "8.8.4.4",
                        "observed_at": datetime.datetime.now(datetime.UTC).isoformat(),
                    }
                ),
            )
            left: int = producer.flush(30)
            return left

        assert await asyncio.to_thread(produce) == 0
        # And the printed command.
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECON_")}
        env["RECON_KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
        cli = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "recon_stream",
            "publish-heartbeat",
            "--org",
            "my-org",
            "--agent",
            "my-agent-2",
            "--ip",
            "9.9.9.10",
            "--site",
            "hq",
            env=env,
        )
        assert await cli.wait() == 0

        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
        try:
            pairs = client["recon"]["org_ips"]

            async def landed() -> list[tuple[str, str]]:
                docs = await pairs.find({"organization_id": "my-org"}).to_list()
                found = sorted((d["ip"], d["scan_request"]["state"]) for d in docs)
                return found if found == [("8.8.4.4", "sent"), ("9.9.9.10", "sent")] else []

            await eventually(landed, timeout=60)
        finally:
            await client.close()

        await _stopped_cleanly(dev, ports, signal.SIGTERM)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
async def test_dev_stops_its_workers_and_servers_on(sig: signal.Signals, tmp_path: Path) -> None:
    async with dev_running(tmp_path) as (dev, ports):
        await dev.line_matching(r"^running;")
        await _stopped_cleanly(dev, ports, sig)


async def test_a_signal_during_start_up_still_stops_the_servers(tmp_path: Path) -> None:
    async with dev_running(tmp_path) as (dev, ports):
        await dev.line_matching(r"^recon-stream dev:")

        async def broker_up() -> bool:
            return _accepts(ports["kafka"])

        # The broker is up; the database and the workers may not be yet.
        await eventually(broker_up, timeout=STARTUP_SECONDS, interval=0.05)
        dev.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            code = await dev.proc.wait()
        output = await dev.rest_of_output()
        assert code == 0, output
        assert "SIGTERM: workers, broker and database stopped" in output
        assert not _children(dev.proc.pid), output
        assert not [name for name, port in ports.items() if _accepts(port)], output
