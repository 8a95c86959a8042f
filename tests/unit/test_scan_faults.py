"""Shodan's scan endpoints when they fail, without a server: each answer (400, 401, 403,
404, 429, 5xx, "recently crawled", a timeout) is the typed outcome `providers.py` draws
(a `ScanRefused` naming it, or `Transient`), first from the classifier alone, then
through the official client (canned HTTP answers under it, so the messages are the
ones `shodan.Shodan._request` really raises), then in the scanner: never a crash,
never a lost rescan, never a second submit for one request."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
import requests
import requests.adapters
from pydantic import SecretStr
from requests.structures import CaseInsensitiveDict

from recon_stream.adapters.shodan import ApiProvider, _Outcome
from recon_stream.domain.scan_requests import ScanReason
from recon_stream.domain.scans import HostScan, ScanStatus, Service
from recon_stream.providers import (
    Permanent,
    RateLimited,
    ScanRefused,
    ScanTicket,
    SendGate,
    ShodanError,
    Transient,
    Unauthorized,
)
from recon_stream.scanner import KeyGate, OnDemandScans, ScannerService
from tests.fakes import FakeBudget, FakeProvider, Parts, request
from tests.unit.test_verifier import Credits, ScanQueue

pytestmark = pytest.mark.unit

KEY = "sEcReT0123456789abcdefGHIJKLmnop"
BASE = "http://shodan.test"
IP = "81.2.69.142"
INSUFFICIENT = (
    "Insufficient scan credits, please upgrade your API plan or wait for the monthly limit to reset"
)
RATE_LIMIT = (
    "Request rate limit reached (1 request/ second). Please wait a second before trying "
    "again and slow down your API calls."
)
RECENTLY = "This host has been recently crawled and cant get scanned again so soon."
HTML = "<html><head><title>{0}</title></head><body><h1>{0}</h1></body></html>"


@dataclass(frozen=True)
class Case:
    status: int
    body: dict[str, Any] | str
    said: str
    """The message of the `shodan.APIError` the client raises for this answer."""
    kind: type[ShodanError]
    outcome: str | None = None


CASES = {
    "400": Case(400, {"error": "Invalid IP"}, "Invalid IP", ScanRefused, "refused"),
    "400 without error": Case(400, {}, "no error message", ScanRefused, "refused"),
    "401 no credits": Case(401, {"error": INSUFFICIENT}, INSUFFICIENT, ScanRefused, "no_credits"),
    "401 bad key": Case(
        401, {"error": "Invalid API key"}, "Invalid API key", ScanRefused, "unauthorized"
    ),
    "401 html": Case(401, HTML.format(401), "Invalid API key", ScanRefused, "unauthorized"),
    "403": Case(
        403, HTML.format(403), "Access denied (403 Forbidden)", ScanRefused, "unauthorized"
    ),
    "404": Case(404, {"error": "Scan not found"}, "Scan not found", ScanRefused, "unknown_scan"),
    "404 html": Case(
        404, HTML.format(404), "Unable to parse JSON response", ScanRefused, "unknown_scan"
    ),
    "422": Case(422, {"error": "ips: required"}, "ips: required", ScanRefused, "refused"),
    "429": Case(429, {"error": RATE_LIMIT}, RATE_LIMIT, ScanRefused, "rate_limited"),
    "429 html": Case(
        429, HTML.format(429), "Unable to parse JSON response", ScanRefused, "rate_limited"
    ),
    "recently crawled 200": Case(
        200, {"error": RECENTLY}, RECENTLY, ScanRefused, "recently_crawled"
    ),
    "recently crawled 400": Case(
        400, {"error": RECENTLY}, RECENTLY, ScanRefused, "recently_crawled"
    ),
    "500": Case(500, {"error": "Internal error"}, "Internal error", Transient),
    "500 without error": Case(500, {"total": 0}, "no error message", Transient),
    "502": Case(502, HTML.format(502), "Bad Gateway (502)", Transient),
    "503": Case(503, HTML.format(503), "Unable to parse JSON response", Transient),
    "504": Case(504, {"error": "Gateway timeout"}, "Gateway timeout", Transient),
    "200 unknown error": Case(
        200, {"error": "Scanning is paused"}, "Scanning is paused", Transient
    ),
}


class Canned(requests.adapters.BaseAdapter):
    """A transport answering each request with the next canned answer (status, body) or
    raising it (a `requests` exception); records what was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: list[tuple[int, dict[str, Any] | str] | Exception] = []
        self.sent: list[requests.PreparedRequest] = []

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        self.sent.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        status, body = answer
        text = body if isinstance(body, str) else json.dumps(body)
        response = requests.Response()
        response.status_code = status
        response._content = text.encode()
        response.encoding = "utf-8"
        kind = "text/html" if isinstance(body, str) else "application/json"
        response.headers = CaseInsensitiveDict({"Content-Type": kind})
        response.url = request.url or ""
        response.request = request
        return response

    def close(self) -> None:
        return None


@pytest_asyncio.fixture
async def api() -> AsyncIterator[tuple[ApiProvider, Canned]]:
    provider = ApiProvider(SecretStr(KEY), BASE, timeout=5.0, threads=1)
    canned = Canned()
    # Under the client, on the session it was given: the longest mounted prefix wins.
    provider._session.mount(BASE, canned)
    yield provider, canned
    await provider.close()


def expect(error: ShodanError, case: Case) -> None:
    assert type(error) is case.kind, error
    if case.outcome is not None:
        assert isinstance(error, ScanRefused)
        assert error.outcome == case.outcome
    assert case.said in str(error)
    assert KEY not in str(error)


# -- the classifier alone ---------------------------------------------------------------


@pytest.fixture
def classify() -> Iterator[Any]:
    provider = ApiProvider(SecretStr(KEY), BASE)
    yield provider._classify_scan
    provider._sender.close()


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_the_classifier_maps_each_answer_to_its_outcome(classify: Any, case: Case) -> None:
    expect(classify(case.said, _Outcome(status=case.status)), case)


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (requests.ReadTimeout("read timed out"), "did not answer within 5.0s"),
        (requests.ConnectTimeout("connect timed out"), "did not answer within 5.0s"),
        (requests.ConnectionError("refused"), "Unable to connect to Shodan (ConnectionError)"),
    ],
)
def test_a_timeout_or_a_dead_connection_is_transient(
    error: requests.RequestException, said: str
) -> None:
    provider = ApiProvider(SecretStr(KEY), BASE, timeout=5.0)
    try:
        # The client folds every transport failure into one message; the session kept why.
        classified = provider._classify_scan(
            "Unable to connect to Shodan", _Outcome(status=None, error=error)
        )
    finally:
        provider._sender.close()
    assert type(classified) is Transient
    assert said in str(classified)


def test_the_key_never_shows_in_a_classified_error(classify: Any) -> None:
    said = f"Invalid IP in {BASE}/shodan/scan?key={KEY}&ips=x"
    error = classify(said, _Outcome(status=400))
    assert KEY not in str(error)
    assert "key=***" in str(error)


# -- through the official client ----------------------------------------------------------


async def test_a_submit_answers_the_scan_id_and_the_credits_left(
    api: tuple[ApiProvider, Canned],
) -> None:
    provider, canned = api
    canned.answers.append((200, {"id": "R2XRT5HH6X67PFAB", "count": 1, "credits_left": 41}))
    assert await provider.submit_scan(IP) == ScanTicket("R2XRT5HH6X67PFAB", 41)
    (sent,) = canned.sent
    assert (sent.method, (sent.url or "").split("?")[0]) == ("POST", f"{BASE}/shodan/scan")
    assert f"ips={IP}" in (sent.url or "") + str(sent.body)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_a_submit_refused_or_failed_raises_its_typed_outcome(
    api: tuple[ApiProvider, Canned], case: Case
) -> None:
    provider, canned = api
    canned.answers.append((case.status, case.body))
    with pytest.raises(ShodanError) as raised:
        await provider.submit_scan(IP)
    expect(raised.value, case)
    assert raised.value.__cause__ is None  # no chained client error (its URL holds the key)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_a_poll_refused_or_failed_raises_its_typed_outcome(
    api: tuple[ApiProvider, Canned], case: Case
) -> None:
    provider, canned = api
    canned.answers.append((case.status, case.body))
    with pytest.raises(ShodanError) as raised:
        await provider.scan_status("R2XRT5HH6X67PFAB")
    expect(raised.value, case)
    (sent,) = canned.sent
    assert (sent.method, (sent.url or "").split("?")[0]) == (
        "GET",
        f"{BASE}/shodan/scan/R2XRT5HH6X67PFAB",
    )


@pytest.mark.parametrize(
    "failure",
    [requests.ReadTimeout("read timed out"), requests.ConnectTimeout("connect timed out")],
)
async def test_a_submit_or_poll_that_times_out_is_transient(
    api: tuple[ApiProvider, Canned], failure: requests.RequestException
) -> None:
    provider, canned = api
    canned.answers += [failure, failure]
    with pytest.raises(Transient, match=r"did not answer within 5\.0s"):
        await provider.submit_scan(IP)
    with pytest.raises(Transient, match=r"did not answer within 5\.0s"):
        await provider.scan_status("R2XRT5HH6X67PFAB")


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"id": "X", "status": "DONE"}, ScanStatus.DONE),
        ({"id": "X", "status": "QUEUE"}, ScanStatus.QUEUE),
        ({"id": "X", "status": "PROCESSING"}, ScanStatus.PROCESSING),
        ({"id": "X", "status": "SUBMITTING"}, ScanStatus.SUBMITTING),
        ({"id": "X", "status": "SOMETHING NEW"}, ScanStatus.PROCESSING),
    ],
)
async def test_a_poll_answers_the_scans_status(
    api: tuple[ApiProvider, Canned], body: dict[str, str], status: ScanStatus
) -> None:
    provider, canned = api
    canned.answers.append((200, body))
    assert await provider.scan_status("X") is status


@pytest.mark.parametrize(
    ("submit", "body"), [(True, {"count": 1, "credits_left": 3}), (False, {"id": "X"})]
)
async def test_an_answer_missing_its_id_or_status_is_transient(
    api: tuple[ApiProvider, Canned], submit: bool, body: dict[str, Any]
) -> None:
    provider, canned = api
    canned.answers.append((200, body))
    call = provider.submit_scan(IP) if submit else provider.scan_status("X")
    with pytest.raises(Transient):
        await call


# -- in the scanner -------------------------------------------------------------------------

RDP = Service(port=3389, module="rdp")


class FailingScans(FakeProvider):
    """`FakeProvider` with scan endpoints: a submit raises `submit_error` when set, a poll
    answers (or raises) the next of `statuses`."""

    def __init__(self) -> None:
        super().__init__()
        self.submit_error: ShodanError | None = None
        self.statuses: list[ScanStatus | ShodanError] = []
        self.submits = 0
        self.polls = 0

    async def submit_scan(self, ip: str, gate: SendGate | None = None) -> ScanTicket:
        self.submits += 1
        if self.submit_error is not None:
            raise self.submit_error
        return ScanTicket(f"scan-{self.submits}", credits_left=7)

    async def scan_status(self, scan_id: str, gate: SendGate | None = None) -> ScanStatus:
        self.polls += 1
        answer = self.statuses.pop(0)
        if isinstance(answer, ShodanError):
            raise answer
        return answer


@dataclass
class Rescan:
    parts: Parts
    queue: ScanQueue
    provider: FailingScans
    credits: Credits
    service: ScannerService

    async def process(self) -> None:
        item = await self.queue.claim(timedelta(minutes=1))
        assert item is not None
        await self.service.process(item)

    def scans(self, outcome: str) -> float:
        value = self.parts.metrics.registry.get_sample_value(
            "recon_shodan_scans_total", {"outcome": outcome}
        )
        return 0.0 if value is None else value


async def rescan_of_rdp(timeout: float = 3600.0) -> Rescan:
    """acme's RDP open on IP; acme asks for a rescan (queued, not processed yet); the
    next lookup finds RDP closed."""
    queue = ScanQueue()
    parts = Parts(queue=queue)
    provider, credits = FailingScans(), Credits()
    parts.org_ips.add("acme", IP)
    provider.hosts[IP] = HostScan(
        ip=IP, provider="api", queried_at=datetime.now(UTC) - timedelta(days=1), services=(RDP,)
    )
    service = ScannerService(
        queue,
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
        scans=OnDemandScans(provider, credits, poll=30.0, timeout=timeout),
    )
    await parts.queue.enqueue([request("acme", IP)])
    rig = Rescan(parts, queue, provider, credits, service)
    await rig.process()  # opened
    provider.hosts[IP] = HostScan(ip=IP, provider="api", queried_at=datetime.now(UTC))
    await queue.enqueue([request("acme", IP, ScanReason.MANUAL, datetime.now(UTC))])
    return rig


def closed_by_the_lookup(rig: Rescan) -> list[tuple[str, int, str | None]]:
    return [
        (e.data.change.value, e.data.port, e.data.scan.status.value if e.data.scan else None)
        for e in rig.parts.events.published[1:]
    ]


@pytest.mark.parametrize(
    "outcome", ["no_credits", "unauthorized", "recently_crawled", "rate_limited", "refused"]
)
async def test_a_refused_submit_falls_back_to_the_plain_lookup_at_once(outcome: str) -> None:
    rig = await rescan_of_rdp()
    rig.provider.submit_error = ScanRefused("refused (fake)", outcome)
    await rig.process()
    assert rig.provider.submits == 1
    assert rig.scans(outcome) == 1
    assert rig.scans("submitted") == 0
    assert closed_by_the_lookup(rig) == [("closed", 3389, None)]
    assert rig.provider.lookups == [IP, IP]
    assert rig.service.gate.is_open  # a scan's 401/403 says nothing certain about the key
    assert IP not in rig.queue.items


@pytest.mark.parametrize(
    "error",
    [
        Transient("Shodan error: HTTP 502: Bad Gateway (502)"),
        Transient("Shodan did not answer within 10.0s"),
        RateLimited("Shodan rate limit", retry_after=2.0),
        Permanent("refused", status=400),
        Unauthorized("Shodan rejected the API key"),
    ],
)
async def test_a_failed_submit_is_counted_an_error_and_the_lookup_still_made(
    error: ShodanError,
) -> None:
    rig = await rescan_of_rdp()
    rig.provider.submit_error = error
    await rig.process()
    assert rig.scans("error") == 1
    assert closed_by_the_lookup(rig) == [("closed", 3389, None)]
    assert rig.service.gate.is_open


async def test_a_refused_submit_is_never_repeated_for_the_same_request() -> None:
    rig = await rescan_of_rdp()
    rig.provider.submit_error = ScanRefused("no credits (fake)", "no_credits")
    rig.provider.errors[IP] = Transient("Unable to connect to Shodan")  # the lookup fails
    await rig.process()
    assert IP in rig.queue.items  # given back, not lost
    del rig.provider.errors[IP]
    await rig.process()
    assert rig.provider.submits == 1
    assert rig.credits.taken == 1
    assert closed_by_the_lookup(rig) == [("closed", 3389, None)]


async def test_a_scan_lost_while_polled_falls_back_to_the_lookup() -> None:
    rig = await rescan_of_rdp()
    rig.provider.statuses = [ScanRefused("Scan not found (fake)", "unknown_scan")]
    await rig.process()
    assert (rig.scans("submitted"), rig.scans("unknown_scan")) == (1, 1)
    assert closed_by_the_lookup(rig) == [("closed", 3389, "submitting")]
    assert rig.parts.events.published[-1].data.scan.id == "scan-1"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "error", [Transient("Shodan error: HTTP 503"), RateLimited("429"), Permanent("x", 400)]
)
async def test_a_poll_that_fails_is_polled_again_later_never_lost(error: ShodanError) -> None:
    rig = await rescan_of_rdp()
    rig.provider.statuses = [error, ScanStatus.DONE]
    await rig.process()
    ((ip, scan, delay),) = rig.queue.polls
    assert (ip, scan.id, scan.status, delay) == (IP, "scan-1", ScanStatus.SUBMITTING, 30.0)
    assert rig.provider.lookups == [IP]  # only the first
    assert IP in rig.queue.items
    await rig.process()
    assert rig.provider.submits == 1
    assert rig.scans("done") == 1
    assert closed_by_the_lookup(rig) == [("closed", 3389, "done")]


async def test_a_scan_never_done_times_out_to_the_plain_lookup() -> None:
    rig = await rescan_of_rdp()
    rig.provider.statuses = [ScanStatus.PROCESSING]
    await rig.process()
    assert rig.provider.lookups == [IP]
    # As if the timeout had passed since: the queued scan was submitted that long ago.
    item = rig.queue.items[IP]
    assert item.scan is not None
    long_ago = datetime.now(UTC) - timedelta(seconds=3601)
    rig.queue.items[IP] = dataclasses.replace(
        item, scan=item.scan.model_copy(update={"submitted_at": long_ago})
    )
    await rig.process()
    assert rig.provider.polls == 1  # not asked again
    assert rig.scans("timed_out") == 1
    assert closed_by_the_lookup(rig) == [("closed", 3389, "timed_out")]
