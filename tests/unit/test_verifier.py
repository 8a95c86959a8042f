"""The verifier on fakes: who gets a round of TCP checks (consent AND agents that reported
the IP in the last 24 h), when a rescan's `agrees` spares the scan credit, and what is
never checked (UDP ports, a non-public IP). The same on real servers and a namespace:
tests/integration/test_verification.py."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio

from recon_stream.adapters.probe import ProbeError, TcpProber
from recon_stream.adapters.scan_queue import QueueItem
from recon_stream.domain.scan_requests import ScanReason
from recon_stream.domain.scans import HostScan, ScanRecord, ScanStatus, Service
from recon_stream.domain.snapshot import OrgContext
from recon_stream.domain.verification import Check, CheckReason, CheckState
from recon_stream.domain.verification_consent import Consent
from recon_stream.providers import ScanTicket, SendGate
from recon_stream.scanner import KeyGate, OnDemandScans, ScannerService
from recon_stream.verifier import Verifier
from tests.fakes import FakeBudget, FakeOrgIps, FakeProvider, FakeQueue, Parts, request

pytestmark = pytest.mark.unit

IP = "81.2.69.142"
PRIVATE = "10.20.30.40"
RDP = Service(port=3389, module="rdp")
WEB = Service(port=443, module="https", product="nginx")
DNS = Service(port=53, transport="udp", module="dns-udp")
CONFIRM = 3600.0  # the confirming round sleeps this long: cancelled by `stop`, never awaited


def now() -> datetime:
    return datetime.now(UTC)


def host(ip: str, *services: Service, at: datetime | None = None) -> HostScan:
    return HostScan(ip=ip, provider="api", queried_at=at or now(), services=services)


class Reporters(FakeOrgIps):
    """`FakeOrgIps` that is also `RecentReporters`, as the adapter's query: the orgs of
    the IP's active pairs last seen at `since` or later."""

    async def reported_since(self, ip: str, since: datetime) -> list[str]:
        return sorted(
            org
            for (org, at), pair in self.pairs.items()
            if at == ip and pair["status"] == "active" and pair["last_seen"] >= since
        )


class Prober:
    """`ports.Prober`: answers each port as `reasons` says (accepted when not listed), or
    raises what `raises` holds for it; records every check asked for."""

    def __init__(
        self,
        reasons: Mapping[int, CheckReason] | None = None,
        raises: Mapping[int, Exception] | None = None,
    ) -> None:
        self.reasons = dict(reasons or {})
        self.raises = dict(raises or {})
        self.asked: list[tuple[str, int]] = []

    async def check(self, ip: str, port: int) -> Check:
        self.asked.append((ip, port))
        if port in self.raises:
            raise self.raises[port]
        reason = self.reasons.get(port, CheckReason.CONN_ACCEPT)
        return Check(ip, port, reason, now(), rtt_ms=1.0)


class ScanQueue(FakeQueue):
    """`FakeQueue` with the on-demand scan's two steps (`scan_tried`, `poll_later`)."""

    def __init__(self) -> None:
        super().__init__()
        self.polls: list[tuple[str, ScanRecord, float]] = []

    def _keep(self, item: QueueItem, scan: ScanRecord | None) -> QueueItem:
        kept = self.items.get(item.ip, item)
        self.items[item.ip] = dataclasses.replace(kept, scan=scan, scan_tried=True)
        return dataclasses.replace(item, scan=scan, scan_tried=True)

    async def scan_tried(self, item: QueueItem, scan: ScanRecord | None) -> QueueItem:
        return self._keep(item, scan)

    async def poll_later(
        self, item: QueueItem, scan: ScanRecord, delay: float, now: datetime | None = None
    ) -> None:
        self.polls.append((item.ip, scan, delay))
        self._keep(item, scan)
        self.claimed.discard(item.ip)


class ScanningProvider(FakeProvider):
    """`FakeProvider` that also takes on-demand scans (never DONE: polled later)."""

    def __init__(self) -> None:
        super().__init__()
        self.submitted: list[str] = []

    async def submit_scan(self, ip: str, gate: SendGate | None = None) -> ScanTicket:
        if gate is not None:
            gate.enter()
        self.submitted.append(ip)
        return ScanTicket(f"scan-{len(self.submitted)}", credits_left=99)

    async def scan_status(self, scan_id: str, gate: SendGate | None = None) -> ScanStatus:
        if gate is not None:
            gate.enter()
        return ScanStatus.QUEUE


class Credits:
    """`ScanCredits`: `per_day` credits, counted as they are taken."""

    def __init__(self, per_day: int = 10) -> None:
        self.per_day = per_day
        self.taken = 0

    async def take(self, now: datetime | None = None) -> bool:
        if self.taken >= self.per_day:
            return False
        self.taken += 1
        return True

    async def used(self, now: datetime | None = None) -> int:
        return self.taken


@dataclasses.dataclass
class Rig:
    parts: Parts
    reporters: Reporters
    verifiers: list[Verifier] = dataclasses.field(default_factory=list)

    def verifier(self, prober: object) -> Verifier:
        made = Verifier(
            prober,  # type: ignore[arg-type]
            self.parts.consents,
            self.reporters,
            self.parts.outbox,
            self.parts.metrics,
            confirm=CONFIRM,
        )
        self.verifiers.append(made)
        return made

    async def org(
        self, org: str, ip: str, *services: Service, consent: bool | None, seen_ago: timedelta
    ) -> None:
        """`org`'s agents reported `ip` `seen_ago`, its lookup opened `services`, and it
        gave (True), refused (False) or never set (None) its consent to verification."""
        self.reporters.add(org, ip, last_seen=now() - seen_ago)
        outbox = await self.parts.updater.apply(OrgContext(org, ("a",), ()), host(ip, *services))
        await self.parts.outbox.publish(outbox)
        if consent is not None:
            decided = Consent(org, consent, "tech@msp", "contract 7", now(), f"c-{org}")
            await self.parts.consents.set(decided)

    def verification(self, org: str, ip: str, port: int, transport: str = "tcp") -> str | None:
        entry = self.parts.snapshots.snapshots[(org, ip)].services[(transport, port)]  # type: ignore[index]
        return None if entry.verification is None else entry.verification.state.value

    def events_of(self, org: str) -> list[tuple[str, int, tuple[str, ...]]]:
        return [
            (e.data.change.value, e.data.port, e.data.changed_fields)
            for e in self.parts.events.published
            if e.data.organization_id == org
        ]

    def sample(self, name: str, **labels: str) -> float:
        value = self.parts.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@pytest_asyncio.fixture
async def rig() -> AsyncIterator[Rig]:
    reporters = Reporters()
    made = Rig(Parts(org_ips=reporters), reporters)
    yield made
    for verifier in made.verifiers:
        await verifier.stop()  # a confirming round waits CONFIRM seconds: cancelled


# -- (a) who gets a round -----------------------------------------------------------------


async def test_only_a_consenting_org_that_reported_the_ip_in_the_last_24_h_gets_a_round(
    rig: Rig,
) -> None:
    await rig.org("acme", IP, RDP, WEB, consent=True, seen_ago=timedelta(hours=23))
    await rig.org("globex", IP, RDP, WEB, consent=True, seen_ago=timedelta(hours=25))
    await rig.org("initech", IP, RDP, WEB, consent=False, seen_ago=timedelta(minutes=5))
    await rig.org("umbrella", IP, RDP, WEB, consent=None, seen_ago=timedelta(minutes=5))
    prober = Prober({3389: CheckReason.CONN_REFUSED})
    verifier = rig.verifier(prober)
    assert await verifier.consenting(IP) == ["acme"]

    checks = await verifier.round(IP, [443, 3389], "lookup")

    assert sorted((c.port, c.state.value) for c in checks) == [(443, "open"), (3389, "closed")]
    assert prober.asked == [(IP, 443), (IP, 3389)]  # once per port, not once per org
    assert (rig.verification("acme", IP, 443), rig.verification("acme", IP, 3389)) == (
        "open",
        "closed",
    )
    for org in ("globex", "initech", "umbrella"):
        assert rig.verification(org, IP, 443) is None
        assert rig.verification(org, IP, 3389) is None
        assert [change for change, _, _ in rig.events_of(org)] == ["opened", "opened"]
    assert rig.events_of("acme")[2:] == [
        ("changed", 443, ("verification",)),
        ("changed", 3389, ("verification",)),
    ]
    assert rig.sample("recon_verification_rounds_total", trigger="lookup") == 1


async def test_no_org_to_check_for_means_no_connect_at_all(rig: Rig) -> None:
    await rig.org("globex", IP, RDP, consent=True, seen_ago=timedelta(hours=25))
    await rig.org("initech", IP, RDP, consent=False, seen_ago=timedelta(minutes=1))
    prober = Prober()
    verifier = rig.verifier(prober)
    assert await verifier.round(IP, [3389], "lookup") == []
    assert not await verifier.agrees(host(IP, RDP))
    verifier.after_lookup(host(IP, RDP))
    await verifier.idle()
    assert prober.asked == []
    assert rig.sample("recon_verification_rounds_total", trigger="lookup") == 0


# -- (b) agrees, and the scan credit it spares --------------------------------------------


@pytest.mark.parametrize(
    ("reasons", "raises", "agrees"),
    [
        ({}, {}, True),
        ({3389: CheckReason.CONN_REFUSED}, {}, False),
        ({443: CheckReason.NO_RESPONSE}, {}, False),
        ({3389: CheckReason.HOST_UNREACH}, {}, False),
        ({443: CheckReason.ADMIN_PROHIBITED}, {}, False),
        # A check that failed on our side says nothing: the port did not answer open.
        ({}, {3389: ProbeError("no local address", 99)}, False),
    ],
)
async def test_agrees_only_when_every_reported_tcp_port_answered_open(
    rig: Rig,
    reasons: dict[int, CheckReason],
    raises: dict[int, Exception],
    agrees: bool,
) -> None:
    await rig.org("acme", IP, RDP, WEB, consent=True, seen_ago=timedelta(hours=1))
    prober = Prober(reasons, raises)
    assert await rig.verifier(prober).agrees(host(IP, RDP, WEB)) is agrees
    assert sorted(prober.asked) == [(IP, 443), (IP, 3389)]
    assert rig.sample("recon_verification_rounds_total", trigger="rescan") == 1


async def test_agrees_is_false_without_a_stored_lookup_or_without_tcp_ports(rig: Rig) -> None:
    await rig.org("acme", IP, RDP, DNS, consent=True, seen_ago=timedelta(hours=1))
    prober = Prober()
    verifier = rig.verifier(prober)
    assert not await verifier.agrees(None)
    assert not await verifier.agrees(host(IP))
    assert not await verifier.agrees(host(IP, DNS))
    assert prober.asked == []


def scanner(
    parts: Parts, provider: ScanningProvider, credits: Credits, verifier: Verifier
) -> ScannerService:
    return ScannerService(
        parts.queue,
        provider,
        FakeBudget(),
        parts.ip_scans,
        parts.org_ips,
        parts.outbox,
        parts.dead_letters,
        parts.metrics,
        parts.retrying,
        KeyGate(),
        reuse_age=3600.0,
        scans=OnDemandScans(provider, credits, poll=60.0, timeout=3600.0),
        verifier=verifier,
    )


async def rescan(rig: Rig, prober: Prober) -> tuple[ScanningProvider, Credits]:
    """acme (consenting) asks to rescan IP, whose stored lookup (a day old) has RDP and
    HTTPS open; the scanner processes it once."""
    await rig.org("acme", IP, RDP, WEB, consent=True, seen_ago=timedelta(hours=1))
    await rig.parts.ip_scans.put(host(IP, RDP, WEB, at=now() - timedelta(days=1)))
    provider, credits = ScanningProvider(), Credits()
    provider.hosts[IP] = host(IP, RDP, WEB)
    service = scanner(rig.parts, provider, credits, rig.verifier(prober))
    await rig.parts.queue.enqueue([request("acme", IP, ScanReason.MANUAL, now())])
    item = await rig.parts.queue.claim(timedelta(minutes=1))
    assert item is not None
    await service.process(item)
    return provider, credits


async def test_a_rescan_whose_checks_all_answer_open_spends_no_scan_credit() -> None:
    reporters = Reporters()
    rig = Rig(Parts(org_ips=reporters, queue=ScanQueue()), reporters)
    try:
        provider, credits = await rescan(rig, Prober())
    finally:
        await rig.verifiers[0].stop()
    assert credits.taken == 0
    assert provider.submitted == []
    assert rig.sample("recon_shodan_scans_total", outcome="verified_open") == 1
    assert rig.sample("recon_shodan_scans_total", outcome="submitted") == 0
    assert rig.sample("recon_verification_rounds_total", trigger="rescan") == 1
    # The plain lookup follows at once, and the item is done: nothing is submitted later.
    assert provider.lookups == [IP]
    assert rig.parts.queue.completed == [IP]
    assert IP not in rig.parts.queue.items
    assert rig.verification("acme", IP, 3389) == "open"


async def test_a_rescan_with_a_refused_port_spends_a_credit_on_a_scan() -> None:
    reporters = Reporters()
    queue = ScanQueue()
    rig = Rig(Parts(org_ips=reporters, queue=queue), reporters)
    try:
        provider, credits = await rescan(rig, Prober({3389: CheckReason.CONN_REFUSED}))
    finally:
        await rig.verifiers[0].stop()
    assert credits.taken == 1
    assert provider.submitted == [IP]
    assert rig.sample("recon_shodan_scans_total", outcome="verified_open") == 0
    assert rig.sample("recon_shodan_scans_total", outcome="submitted") == 1
    # The scan is polled later; the lookup waits for it.
    ((ip, polled, _),) = queue.polls
    assert (ip, polled.id, polled.status) == (IP, "scan-1", ScanStatus.QUEUE)
    assert provider.lookups == []
    assert rig.verification("acme", IP, 3389) == "closed"


# -- (c) UDP is never checked ---------------------------------------------------------------


async def test_udp_ports_are_never_checked(rig: Rig) -> None:
    await rig.org("acme", IP, RDP, DNS, consent=True, seen_ago=timedelta(hours=1))
    prober = Prober()
    verifier = rig.verifier(prober)
    assert await verifier.agrees(host(IP, RDP, DNS))
    verifier.after_lookup(host(IP, RDP, DNS))
    verifier.after_lookup(host(IP, DNS))  # nothing to check at all
    await verifier.idle()
    assert prober.asked == [(IP, 3389), (IP, 3389)]
    assert rig.verification("acme", IP, 3389) == "open"
    assert rig.verification("acme", IP, 53, "udp") is None
    assert [port for _, port, _ in rig.events_of("acme")[2:]] == [3389]
    assert rig.sample("recon_verification_rounds_total", trigger="lookup") == 1


# -- (d) a non-public IP is never connected to ---------------------------------------------


async def test_a_non_public_ip_never_produces_a_check(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the real prober (its guard), for an org that consented and reported the IP."""
    await rig.org("acme", PRIVATE, RDP, WEB, consent=True, seen_ago=timedelta(minutes=1))

    def forbidden(*args: object, **kwargs: object) -> None:
        pytest.fail(f"a socket was made for {PRIVATE}")

    budget = FakeBudget()
    verifier = rig.verifier(TcpProber(0.5, budget))
    with monkeypatch.context() as patch:
        patch.setattr(socket, "socket", forbidden)
        patch.setattr(socket, "create_connection", forbidden)
        assert not await verifier.agrees(host(PRIVATE, RDP, WEB))
        assert await verifier.round(PRIVATE, [443, 3389], "confirm") == []
        verifier.after_lookup(host(PRIVATE, RDP, WEB))
        await verifier.idle()
    assert budget.reserved == 0
    assert rig.verification("acme", PRIVATE, 443) is None
    assert rig.verification("acme", PRIVATE, 3389) is None
    assert [change for change, _, _ in rig.events_of("acme")] == ["opened", "opened"]
    assert rig.sample("recon_verification_checks_total", result="not_checkable") == 6
    for state in CheckState:
        assert rig.sample("recon_verification_checks_total", result=state.value) == 0
