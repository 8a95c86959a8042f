"""The shared Shodan budget on a busy machine: three scanner replicas as processes of
their own, their event loops stalled at random, a core burned by another process, and
the production margin. The emulator counts every request in a sliding window, as Shodan
does; not one window may hold more than the budget."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from recon_stream.adapters.ratelimit import Slot
from recon_stream.adapters.shodan import ApiProvider, NotSent
from recon_stream.settings import Settings
from tests.emulators.shodan import ShodanEmulator
from tests.load.burn import burning

from .support import banner, events_on, heartbeat, host, produce, running, worker_env


def start_stalled_scanner(settings: Settings, log: Path, seed: int) -> subprocess.Popen[bytes]:
    env = worker_env(settings)
    env["RECON_HTTP_PORT"] = "0"
    args = ["scanner", "--min", "0.02", "--max", "0.3", "--every", "0.4", "--seed", str(seed)]
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.load.stalled_worker", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def test_three_stalling_scanners_on_a_busy_machine_never_exceed_the_shared_rate(
    scan_settings: Settings, shodan_emulator: ShodanEmulator, tmp_path: Path
) -> None:
    rate = 4.0
    shodan_emulator.rate = rate
    settings = scan_settings.model_copy(update={"shodan_rate": rate, "scanner_concurrency": 2})
    assert settings.shodan_rate_margin == Settings.model_fields["shodan_rate_margin"].default
    ips = [f"52.0.0.{i}" for i in range(1, 41)]
    for ip in ips:
        shodan_emulator.set_host(ip, host(ip, banner(80, "http")))
    await produce(
        settings.kafka_bootstrap_servers,
        settings.topic_heartbeats,
        [heartbeat("acme", ip, "a1") for ip in ips],
    )
    logs = [tmp_path / f"scanner-{n}.log" for n in range(3)]
    with burning(cores=1):
        replicas = [start_stalled_scanner(settings, log, n) for n, log in enumerate(logs)]
        try:
            async with running(settings, ("ingest",)):
                await events_on(settings, len(ips), timeout=240)
        finally:
            stop(replicas)
    assert shodan_emulator.violations == 0
    assert shodan_emulator.max_requests_in_any_window(1.0) <= rate
    lookups = [r.path.split("?", 1)[0] for r in shodan_emulator.requests]
    assert sorted(p for p in lookups if p.startswith("/shodan/host/")) == sorted(
        f"/shodan/host/{ip}" for ip in ips
    )
    # The stalls happened in every replica, while lookups were being made.
    assert all("stall " in log.read_text() for log in logs)


async def test_the_gate_is_the_last_thing_before_the_request_leaves(
    shodan_emulator: ShodanEmulator,
) -> None:
    shodan_emulator.rate = None
    ip = "52.0.1.1"
    shodan_emulator.set_host(ip, host(ip, banner(80, "http")))
    provider = ApiProvider(SecretStr(shodan_emulator.api_key), shodan_emulator.url, 5.0)
    try:
        now = time.monotonic()
        passed = Slot(start=0.0, earliest=now - 1.0, latest=now - 0.5)
        with pytest.raises(NotSent):
            await provider.lookup(ip, passed)
        assert shodan_emulator.paths() == []  # not a byte of the request was sent
        soon = time.monotonic() + 0.3
        slot = Slot(start=0.0, earliest=soon, latest=soon + 5.0)
        scan = await provider.lookup(ip, slot)
        assert [s.port for s in scan.services] == [80]
        (arrived,) = [r.at for r in shodan_emulator.requests]
        assert slot.entered_at is not None
        assert soon <= slot.entered_at <= arrived  # the gate, then the bytes
    finally:
        await provider.close()
