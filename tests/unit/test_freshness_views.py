"""What users see of a rescan's scan and a verification, without a server: the sample
provider's simulated on-demand scan (DONE after its delay, on an injected clock, then a
lookup that finds one port closed), the OCSF finding's `unmapped.verification` and
`unmapped.scan`, and the VERIFIED and SCAN columns of `recon-stream exposures` and
`recon-stream history` (table, json, csv)."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from recon_stream import exposure_table
from recon_stream.adapters.exposures import _fields_of
from recon_stream.adapters.history import _history_doc
from recon_stream.adapters.shodan import SAMPLE_SCAN_SECONDS, SampleProvider
from recon_stream.domain.exposures import ChangeReason, ExposureEvent
from recon_stream.domain.ocsf import ms, to_finding
from recon_stream.domain.scans import HostScan, ScanRecord, ScanStatus, Service
from recon_stream.domain.snapshot import OrgContext
from recon_stream.domain.verification import Check, CheckReason
from recon_stream.providers import ScanRefused
from recon_stream.settings import Settings
from tests.fakes import Parts
from tests.ocsf_check import assert_valid

pytestmark = pytest.mark.unit

T0 = datetime(2026, 5, 4, 10, 17, 3, tzinfo=UTC)
IP = "81.2.69.142"
RDP = Service(port=3389, module="rdp", shodan_timestamp=T0 - timedelta(days=2))
WEB = Service(port=443, module="https", product="nginx", shodan_timestamp=T0 - timedelta(days=1))
DNS = Service(port=53, transport="udp", module="dns-udp", shodan_timestamp=T0)
SCAN = ScanRecord(id="R2XRT5HH6X67PFAB", submitted_at=T0 - timedelta(minutes=3), status="done")
CONFIRM = timedelta(minutes=5)


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


# -- the sample provider's simulated on-demand scan ------------------------------------------


@pytest.mark.parametrize(
    ("ip", "closed"),
    [
        ("8.8.8.8", 3389),  # RDP, of 53/udp, 443 and 3389
        ("1.1.1.1", 445),  # SMB, of 53/udp, 80 and 445
        ("9.9.9.9", 1433),  # SQL Server, of 22, 1433 and 53/udp
        ("208.67.222.222", 3389),  # RDP before Redis
        ("149.112.112.112", 3389),  # RDP (two banners) before SMB and SQL Server
        ("203.0.113.94", 5900),  # invented: VNC before Redis and SQL Server
        ("203.0.113.13", 6379),  # invented: Redis before SQL Server
        ("2606:4700:4700::1111", 443),  # none of those: its first port
        ("203.0.113.40", 80),  # invented, none of those: its first port
    ],
)
async def test_a_simulated_scan_is_done_after_its_delay_and_finds_one_port_closed(
    ip: str, closed: int
) -> None:
    clock = Clock(T0)
    provider = SampleProvider(clock=clock)
    before = await provider.lookup(ip)
    ticket = await provider.submit_scan(ip)
    assert ticket.credits_left is None
    assert await provider.scan_status(ticket.id) is ScanStatus.PROCESSING
    clock.at = T0 + timedelta(seconds=SAMPLE_SCAN_SECONDS) - timedelta(microseconds=1)
    assert await provider.scan_status(ticket.id) is ScanStatus.PROCESSING
    # Not done yet: a lookup still shows the old crawl.
    assert (await provider.lookup(ip)).services == before.services

    clock.at = T0 + timedelta(seconds=SAMPLE_SCAN_SECONDS)
    assert await provider.scan_status(ticket.id) is ScanStatus.DONE
    clock.at += timedelta(minutes=1)
    after = await provider.lookup(ip)

    assert {s.key for s in before.services} - {s.key for s in after.services} == {("tcp", closed)}
    assert {s.key for s in after.services} < {s.key for s in before.services}
    done_at = T0 + timedelta(seconds=SAMPLE_SCAN_SECONDS)
    # Every port it still found was seen by that crawl.
    assert {s.shodan_timestamp for s in after.services} == {done_at}
    assert after.sample
    # The scan stays DONE once its lookup read it, and later lookups keep the fix.
    assert await provider.scan_status(ticket.id) is ScanStatus.DONE
    assert (await provider.lookup(ip)).services == after.services


async def test_the_delay_is_the_configured_one() -> None:
    clock = Clock(T0)
    provider = SampleProvider(clock=clock, scan_seconds=120.0)
    ticket = await provider.submit_scan("8.8.8.8")
    clock.at = T0 + timedelta(seconds=119)
    assert await provider.scan_status(ticket.id) is ScanStatus.PROCESSING
    assert 3389 in {s.port for s in (await provider.lookup("8.8.8.8")).services}
    clock.at = T0 + timedelta(seconds=120)
    assert await provider.scan_status(ticket.id) is ScanStatus.DONE
    assert 3389 not in {s.port for s in (await provider.lookup("8.8.8.8")).services}


async def test_an_unknown_scan_id_is_a_refusal_and_a_host_known_empty_stays_empty() -> None:
    clock = Clock(T0)
    provider = SampleProvider(clock=clock)
    with pytest.raises(ScanRefused) as refused:
        await provider.scan_status("R2XRT5HH6X67PFAB")
    assert refused.value.outcome == "unknown_scan"
    ticket = await provider.submit_scan("1.0.0.1")  # bundled as "nothing known"
    clock.at += timedelta(seconds=SAMPLE_SCAN_SECONDS)
    assert await provider.scan_status(ticket.id) is ScanStatus.DONE
    assert (await provider.lookup("1.0.0.1")).services == ()


async def test_the_scans_lookup_closes_that_exposure_and_no_other() -> None:
    clock = Clock(T0)
    provider, parts = SampleProvider(clock=clock), Parts()
    acme = OrgContext("acme", ("a",), ())
    await parts.outbox.publish(await parts.updater.apply(acme, await provider.lookup("8.8.8.8")))
    await provider.submit_scan("8.8.8.8")
    clock.at += timedelta(seconds=SAMPLE_SCAN_SECONDS)
    await parts.outbox.publish(await parts.updater.apply(acme, await provider.lookup("8.8.8.8")))
    changes = [(e.data.change.value, e.data.port) for e in parts.events.published]
    assert sorted(changes[:3]) == [("opened", 53), ("opened", 443), ("opened", 3389)]
    assert changes[3:] == [("closed", 3389)]
    assert parts.events.published[3].data.reason is ChangeReason.PORT_CLOSED


# -- a verified exposure, through the snapshot updater ----------------------------------------


def check(port: int, reason: CheckReason, at: datetime) -> Check:
    return Check(IP, port, reason, at, rtt_ms=12.5)


async def verified(parts: Parts) -> list[ExposureEvent]:
    """acme's rescan lookup (with its on-demand scan) opens RDP, HTTPS and DNS/udp; a
    round finds HTTPS open and RDP refused, the next (CONFIRM later) refused again."""
    lookup = HostScan(ip=IP, provider="api", queried_at=T0, services=(RDP, WEB, DNS), scan=SCAN)
    await parts.outbox.publish(await parts.updater.apply(OrgContext("acme", ("a",), ()), lookup))
    first = T0 + timedelta(minutes=1)
    await parts.outbox.publish(
        await parts.updater.verify(
            "acme",
            IP,
            [
                check(443, CheckReason.CONN_ACCEPT, first),
                check(3389, CheckReason.CONN_REFUSED, first),
            ],
            CONFIRM,
        )
    )
    return list(parts.events.published)


async def test_ocsf_maps_data_verification_and_data_scan_into_unmapped() -> None:
    parts = Parts()
    events = await verified(parts)
    await parts.outbox.publish(
        await parts.updater.verify(
            "acme", IP, [check(3389, CheckReason.CONN_REFUSED, T0 + CONFIRM * 2)], CONFIRM
        )
    )
    events = list(parts.events.published)
    findings = [to_finding(e, product_version="1.2.3") for e in events]
    assert assert_valid(findings) == len(events) == 6
    scan = {"uid": SCAN.id, "submitted_time": ms(SCAN.submitted_at), "status": "done"}
    first = ms(T0 + timedelta(minutes=1))
    seen = [
        (
            f["unmapped"]["change"],
            f["device"]["network_interfaces"][0]["open_ports"][0]["port"],
            f["unmapped"]["changed_fields"],
            f["unmapped"]["verification"],
            f["unmapped"]["scan"],
        )
        for f in findings
    ]
    assert sorted(seen[:3], key=lambda s: s[1]) == [
        ("opened", 53, [], None, scan),
        ("opened", 443, [], None, scan),
        ("opened", 3389, [], None, scan),
    ]
    assert seen[3:5] == [
        (
            "changed",
            443,
            ["verification"],
            {"state": "open", "checked_time": first, "method": "tcp_connect"},
            scan,
        ),
        (
            "changed",
            3389,
            ["verification"],
            {"state": "closed", "checked_time": first, "method": "tcp_connect"},
            scan,
        ),
    ]
    closed = findings[5]
    assert (closed["unmapped"]["change"], closed["status_detail"]) == ("closed", "verified_closed")
    assert closed["unmapped"]["scan"] == scan
    assert closed["unmapped"]["verification"] is not None
    assert closed["unmapped"]["verification"]["state"] == "closed"
    # Kept out of OCSF's own attributes: no evidences (see domain/ocsf.py).
    assert all("evidences" not in f for f in findings)
    # And as the CloudEvent says it.
    assert events[4].data.verification is not None
    assert events[4].data.verification.checked_at == T0 + timedelta(minutes=1)


# -- recon-stream exposures and history -------------------------------------------------------


class Client:
    def __getitem__(self, name: str) -> None:
        return None

    async def close(self) -> None:
        return None


class Stored:
    """`MongoSnapshots` and `History` of `exposure_table`: answers the documents given."""

    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.docs = docs

    async def table(self, organization_id: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["organization_id"] == organization_id]

    async def entries(self, organization_id: str, **query: Any) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["organization_id"] == organization_id]


@pytest.fixture
def stored(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The documents `exposure_table` reads, as the adapters store them."""
    docs: list[dict[str, Any]] = []
    monkeypatch.setattr(exposure_table.mongo, "connect", lambda settings: Client())
    monkeypatch.setattr(exposure_table, "MongoSnapshots", lambda db: Stored(docs))
    monkeypatch.setattr(exposure_table, "History", lambda db: Stored(docs))
    return docs


def settings() -> Settings:
    return Settings(risk_policy_file=None)


def cell(table: str, column: str, row_containing: str) -> str:
    header, _, *rows = table.splitlines()
    start = header.index(column)
    ends = [header.index(c, start + 1) for c in header[start + len(column) :].split() if c]
    end = ends[0] if ends else None
    (row,) = [r for r in rows if row_containing in r]
    return row[start:end].strip()


STAMP = "2026-05-04T10:18:03Z"  # T0 + 1 min, as the table writes times


async def test_the_verified_column_shows_each_rows_last_check(
    stored: list[dict[str, Any]],
) -> None:
    parts = Parts()
    await verified(parts)
    snapshot = parts.snapshots.snapshots[("acme", IP)]
    stored.append({"organization_id": "acme", "ip": IP, **_fields_of(snapshot)})
    rows = await exposure_table.load_rows(settings(), "acme")
    assert [(r["port"], r["verified"], r["verified_at"]) for r in rows] == [
        (53, "", ""),
        (443, "open", STAMP),
        (3389, "closed", STAMP),
    ]

    table = exposure_table.render(rows, "table")
    assert table.splitlines()[0].split()[-1] == "VERIFIED"
    assert cell(table, "VERIFIED", " 3389 ") == f"closed {STAMP}"
    assert cell(table, "VERIFIED", " 443 ") == f"open {STAMP}"
    assert cell(table, "VERIFIED", " 53 ") == ""

    as_json = json.loads(exposure_table.render(rows, "json"))
    assert [(r["port"], r["verified"], r["verified_at"]) for r in as_json] == [
        (53, "", ""),
        (443, "open", STAMP),
        (3389, "closed", STAMP),
    ]
    as_csv = list(csv.DictReader(io.StringIO(exposure_table.render(rows, "csv"))))
    assert [(r["port"], r["verified"], r["verified_at"]) for r in as_csv] == [
        ("53", "", ""),
        ("443", "open", STAMP),
        ("3389", "closed", STAMP),
    ]


async def test_history_rows_show_the_scan_and_the_verification(
    stored: list[dict[str, Any]],
) -> None:
    parts = Parts()
    events = await verified(parts)
    stored.extend(_history_doc(e) for e in reversed(events))  # newest first
    entries = await exposure_table.load_history(settings(), "acme")
    scan = f"done {SCAN.id}"
    changed = [e for e in entries if e["change"] == "changed"]
    assert [(e["port"], e["scan"], e["verification"]) for e in changed] == [
        (3389, scan, f"closed {STAMP}"),
        (443, scan, f"open {STAMP}"),
    ]
    assert {(e["scan"], e["verification"]) for e in entries if e["change"] == "opened"} == {
        (scan, "")
    }

    table = exposure_table.render_history(entries, "table")
    header = table.splitlines()[0].split()
    assert header[-3:] == ["SCAN", "VERIFIED", "EVENT"]
    rdp = next(e for e in changed if e["port"] == 3389)
    assert cell(table, "SCAN", rdp["event_id"]) == scan
    assert cell(table, "VERIFIED", rdp["event_id"]) == f"closed {STAMP}"

    as_json = json.loads(exposure_table.render_history(entries, "json"))
    assert [(e["scan"], e["verification"]) for e in as_json] == [
        (e["scan"], e["verification"]) for e in entries
    ]
    as_csv = list(csv.DictReader(io.StringIO(exposure_table.render_history(entries, "csv"))))
    assert [(r["event_id"], r["scan"], r["verification"]) for r in as_csv] == [
        (e["event_id"], e["scan"], e["verification"]) for e in entries
    ]
    assert any(r["verification"] == f"closed {STAMP}" for r in as_csv)
