"""Risk that fits each customer, end to end: KEV and EPSS feeds loaded by the scheduler's
leader, a feed outage, re-rating when a feed changes or first loads (no lookup), a new
policy on the next lookup, a worker refusing a bad policy."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from recon_stream.adapters.vuln_feeds import VulnFeeds
from recon_stream.settings import Settings
from tests.emulators.shodan import ShodanEmulator

from .support import (
    NOW,
    banner,
    events_on,
    eventually,
    heartbeat,
    host,
    produce,
    running,
    sample,
    worker_env,
)

KEV = {
    "vulnerabilities": [
        {
            "cveID": "CVE-2023-4966",
            "dateAdded": "2023-10-18",
            "knownRansomwareCampaignUse": "Known",
        }
    ]
}
EPSS = "#model_version:test,score_date:2026-11-01\ncve,epss,percentile\nCVE-2024-6387,0.61,0.98\n"


class FeedServer:
    """A real HTTP server for the KEV catalog that can start failing."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.status = 200
        self.requests = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                self.send_response(owner.status)
                self.send_header("Content-Length", str(len(owner.body)))
                self.end_headers()
                self.wfile.write(owner.body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/kev.json"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def kev_server() -> Iterator[FeedServer]:
    server = FeedServer(json.dumps(KEV).encode())
    yield server
    server.close()


async def test_known_and_likely_exploited_cves_raise_severity_and_reach_the_event(
    scan_settings: Settings, shodan_emulator: ShodanEmulator, kev_server: FeedServer, tmp_path: Path
) -> None:
    epss = tmp_path / "epss.csv.gz"
    epss.write_bytes(gzip.compress(EPSS.encode()))
    settings = scan_settings.model_copy(
        update={"kev_source": kev_server.url, "epss_source": str(epss)}
    )
    portal, ssh = "45.33.50.1", "45.33.50.2"
    vulns = {"CVE-2023-4966": {"cvss": 7.5, "verified": False}}
    shodan_emulator.set_host(
        portal, host(portal, banner(443, "https", product="Citrix Gateway", vulns=vulns))
    )
    shodan_emulator.set_host(
        ssh,
        host(
            ssh,
            banner(22, "ssh", product="OpenSSH", vulns={"CVE-2024-6387": {"cvss": 8.1}}),
        ),
    )
    async with running(settings, ("scheduler",)) as scheduler:
        feeds = VulnFeeds(scheduler.mongo_client[settings.mongodb_database])

        async def loaded() -> bool:
            return all([(await feeds.status(f)).loaded_at is not None for f in ("kev", "epss")])

        await eventually(loaded)
        states = scheduler.status.states()
        assert states["kev_feed"].startswith("ok: 1 CVEs")
    await produce(
        settings.kafka_bootstrap_servers,
        settings.topic_heartbeats,
        [heartbeat("acme", portal, "a1", NOW), heartbeat("acme", ssh, "a2", NOW)],
    )
    async with running(settings, ("ingest", "scanner")):
        events = await events_on(settings, 2)
    by_ip = {e["data"]["ip"]: e["data"] for e in events}
    citrix = by_ip[portal]
    assert citrix["severity"] == "critical"
    assert any("CVE-2023-4966 is known to be exploited" in r for r in citrix["risk_reasons"])
    assert citrix["vulnerabilities"] == [
        {"id": "CVE-2023-4966", "cvss": 7.5, "epss": None, "kev": True}
    ]
    assert citrix["vulns"] == ["CVE-2023-4966"]
    openssh = by_ip[ssh]
    assert openssh["severity"] == "high"  # EPSS 0.61 >= 0.5
    assert openssh["vulnerabilities"][0]["epss"] == 0.61


async def test_a_feed_that_fails_keeps_its_last_copy_and_says_so(
    scan_settings: Settings, kev_server: FeedServer
) -> None:
    settings = scan_settings.model_copy(
        update={
            "kev_source": kev_server.url,
            "vuln_feed_refresh_seconds": 0.5,  # every tick, to reach the outage quickly
            "vuln_feed_retry_seconds": 0.5,
        }
    )
    async with running(settings, ("scheduler",)) as scheduler:
        feeds = VulnFeeds(scheduler.mongo_client[settings.mongodb_database])
        await eventually(lambda: _loaded(feeds))
        kev_server.status = 503
        before = kev_server.requests

        async def failing() -> bool:
            status = await feeds.status("kev")
            return status.error == "HTTP 503" and kev_server.requests > before + 1

        await eventually(failing)
        assert sample(scheduler, "recon_vuln_feed_failures_total", feed="kev") >= 1
        states = scheduler.status.states()
        assert states["kev_feed"].startswith("failing: kev feed: HTTP 503")
        assert "CVE-2023-4966" in await feeds.lookup(["CVE-2023-4966"])  # the last copy
        kev_server.status = 200
        await eventually(lambda: _recovered(feeds))


PAN_CVE = "CVE-2024-3400"


def _kev_with(*cves: str) -> bytes:
    rows = [{"cveID": cve, "dateAdded": "2024-04-12"} for cve in cves]
    return json.dumps({"vulnerabilities": KEV["vulnerabilities"] + rows}).encode()


def _severity_changes(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        e["data"]
        for e in events
        if e["data"]["change"] == "changed" and "severity" in e["data"]["changed_fields"]
    ]


async def test_a_cve_added_to_kev_re_rates_open_exposures_without_a_lookup(
    scan_settings: Settings, shodan_emulator: ShodanEmulator, kev_server: FeedServer
) -> None:
    settings = scan_settings.model_copy(
        update={"kev_source": kev_server.url, "vuln_feed_refresh_seconds": 0.5}
    )
    firewall, other = "45.33.50.11", "45.33.50.12"
    vulns = {PAN_CVE: {"cvss": 5.0}}
    for ip in (firewall, other):
        shodan_emulator.set_host(
            ip, host(ip, banner(443, "https", product="PAN-OS GlobalProtect", vulns=vulns))
        )
    await produce(
        settings.kafka_bootstrap_servers,
        settings.topic_heartbeats,
        [
            heartbeat("acme", firewall, "a1", NOW),
            heartbeat("globex", firewall, "g1", NOW),
            heartbeat("acme", other, "a2", NOW),
        ],
    )
    async with running(settings, ("ingest", "scanner", "scheduler")) as worker:
        opened = await events_on(settings, 3)
        assert {e["data"]["severity"] for e in opened} != {"critical"}
        feeds = VulnFeeds(worker.mongo_client[settings.mongodb_database])
        await eventually(lambda: _loaded(feeds))
        lookups = len(shodan_emulator.requests)

        kev_server.body = _kev_with(PAN_CVE)  # CISA lists it: exploited in the wild
        events = await events_on(settings, 6)
        changes = _severity_changes(events[3:])
        assert sorted((c["organization_id"], c["ip"]) for c in changes) == [
            ("acme", firewall),
            ("acme", other),
            ("globex", firewall),
        ]
        assert {c["severity"] for c in changes} == {"critical"}
        assert all(c["vulnerabilities"][0]["kev"] is True for c in changes)
        assert len(shodan_emulator.requests) == lookups  # no Shodan request for it
        await eventually(lambda: _rerated(feeds))
        assert sample(worker, "recon_vuln_reassessments_total") >= 3


async def _rerated(feeds: VulnFeeds) -> bool:
    return await feeds.marked(10) == []


async def test_a_lookup_made_before_the_feeds_first_load_is_corrected_when_it_loads(
    scan_settings: Settings, shodan_emulator: ShodanEmulator, kev_server: FeedServer
) -> None:
    ip = "45.33.50.13"
    vulns = {"CVE-2023-4966": {"cvss": 7.5}}
    shodan_emulator.set_host(
        ip, host(ip, banner(443, "https", product="Citrix Gateway", vulns=vulns))
    )
    await produce(
        scan_settings.kafka_bootstrap_servers,
        scan_settings.topic_heartbeats,
        [heartbeat("acme", ip, "a1", NOW)],
    )
    async with running(scan_settings, ("ingest", "scanner")):  # no feed configured yet
        (opened,) = await events_on(scan_settings, 1)
    assert opened["data"]["severity"] != "critical"
    lookups = len(shodan_emulator.requests)
    settings = scan_settings.model_copy(update={"kev_source": kev_server.url})
    async with running(settings, ("scheduler",)):
        events = await events_on(settings, 2)
    (changed,) = _severity_changes(events)
    assert (changed["ip"], changed["severity"]) == (ip, "critical")
    assert changed["previous_severity"] == opened["data"]["severity"]
    assert any("CVE-2023-4966 is known to be exploited" in r for r in changed["risk_reasons"])
    assert len(shodan_emulator.requests) == lookups


async def _loaded(feeds: VulnFeeds) -> bool:
    return (await feeds.status("kev")).loaded_at is not None


async def _recovered(feeds: VulnFeeds) -> bool:
    return (await feeds.status("kev")).error is None


async def test_a_new_policy_changes_severity_on_the_next_lookup(
    scan_settings: Settings, shodan_emulator: ShodanEmulator, tmp_path: Path
) -> None:
    ip = "45.33.50.3"
    shodan_emulator.set_host(ip, host(ip, banner(22, "ssh", product="OpenSSH")))
    await produce(
        scan_settings.kafka_bootstrap_servers,
        scan_settings.topic_heartbeats,
        [heartbeat("acme", ip, "a1", NOW)],
    )
    async with running(scan_settings, ("ingest", "scanner")):
        (opened,) = await events_on(scan_settings, 1)
    assert opened["data"]["severity"] == "medium"
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "organizations:\n  acme:\n    - service: SSH\n      severity: critical\n"
        "      why: no SSH on our IPs\n",
        encoding="utf-8",
    )
    strict = scan_settings.model_copy(update={"risk_policy_file": policy})
    async with running(strict, ("scanner",)):
        command = {
            "command": "rescan",
            "organization_id": "acme",
            "ip": ip,
            "requested_by": "test",
            "requested_at": NOW.isoformat(),
        }
        await produce(
            strict.kafka_bootstrap_servers,
            strict.topic_commands,
            [(b"acme", json.dumps(command).encode(), [])],
        )
        events = await events_on(strict, 2)
    changed = events[1]["data"]
    assert changed["change"] == "changed"
    assert changed["changed_fields"] == ["severity"]
    assert changed["severity"] == "critical"
    assert "critical for this organization by policy: no SSH on our IPs" in changed["risk_reasons"]


def test_a_worker_refuses_to_start_on_a_bad_policy_and_says_where(
    settings: Settings, tmp_path: Path
) -> None:
    policy = tmp_path / "bad.yaml"
    policy.write_text("services:\n  - name: RDP\n    severity: sever\n", encoding="utf-8")
    env = worker_env(settings.model_copy(update={"risk_policy_file": policy}))
    done = subprocess.run(
        [sys.executable, "-m", "recon_stream", "run", "scanner"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "not starting" in done.stderr
    assert f"{policy}, line 3: services.0.severity" in done.stderr
