"""Shodan lookups behind one small interface, `ShodanProvider`.

Three providers answer `lookup(ip) -> HostScan`:

- `ApiProvider`: the official `shodan` client (`/shodan/host/{ip}`), with a key.
- `InternetDbProvider`: the free, keyless InternetDB (ports, vulns, no banners).
- `SampleProvider`: bundled offline sample data (`sample=True`), never real results.

"Nothing known about this IP" (Shodan's 404 "No information available for that
IP.") is not an error: `lookup` returns a `HostScan` without services.

The errors each can raise, and what the scanner does with each, are in
`recon_stream.providers`.

Requests run on the provider's own threads (not the event loop's default pool,
which DNS lookups share), each behind its `SendGate`: the rate limiter's last
word, given in the sending thread right before the request leaves.

Error messages never contain the API key (the client puts it in every URL).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import re
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, TypeVar

import requests
import requests.adapters
import shodan
import urllib3
import urllib3.connection
from pydantic import SecretStr

from recon_stream.domain.scans import HostScan, ScanStatus
from recon_stream.domain.shodan_parsing import parse_host, parse_internetdb
from recon_stream.providers import (
    NotSent,
    Permanent,
    RateLimited,
    ScanRefused,
    ScanTicket,
    SendGate,
    ShodanError,
    ShodanProvider,
    Transient,
    Unauthorized,
)
from recon_stream.settings import Settings

INTERNETDB_URL = "https://internetdb.shodan.io"
_KEY_IN_URL = re.compile(r"(key=)[^&\s'\"]+", re.IGNORECASE)
# A trickling answer resets requests' read timeout with every byte; this bounds the whole call.
_DEADLINE_FACTOR = 3.0


def build_provider(settings: Settings, timeout: float = 10.0) -> ShodanProvider:
    """The provider `settings.effective_shodan_provider` names.

    `RECON_SHODAN_API_URL`, when set, replaces the base URL of the API or InternetDB.
    """
    kind = settings.effective_shodan_provider
    # One thread per lookup loop, and one for the key check.
    threads = settings.scanner_concurrency + 1
    if kind == "api":
        if settings.shodan_api_key is None:
            raise ValueError("RECON_SHODAN_PROVIDER=api needs RECON_SHODAN_API_KEY")
        return ApiProvider(settings.shodan_api_key, settings.shodan_api_url, timeout, threads)
    if kind == "internetdb":
        return InternetDbProvider(settings.shodan_api_url or INTERNETDB_URL, timeout, threads)
    return SampleProvider()


T = TypeVar("T")


class _GateClosed(Exception):
    """Raised below the HTTP client when the request's slot had passed: nothing was sent."""


_gates = threading.local()


class _GatedSend:
    """An HTTP connection that enters its thread's send gate right before the request's
    first bytes go to the socket (after connecting, which is not the request)."""

    def send(self, data: Any) -> None:
        gate: SendGate | None = getattr(_gates, "gate", None)
        if gate is not None:
            _gates.gate = None  # once per request: the head goes first
            if getattr(self, "sock", None) is None:
                self.connect()  # type: ignore[attr-defined]
            if not gate.enter():
                _gates.refused = True
                raise _GateClosed
        super().send(data)  # type: ignore[misc]


class _GatedHTTPConnection(_GatedSend, urllib3.connection.HTTPConnection):
    pass


class _GatedHTTPSConnection(_GatedSend, urllib3.connection.HTTPSConnection):
    pass


class _GatedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _GatedHTTPConnection


class _GatedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _GatedHTTPSConnection


class _GatedAdapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _GatedHTTPPool, "https": _GatedHTTPSPool}


def _gated(session: requests.Session, base_url: str) -> bool:
    """Mount the gated transport on `session`; False when requests to `base_url` would go
    through a proxy (another transport), where the gate is entered before the call."""
    session.mount("http://", _GatedAdapter())
    session.mount("https://", _GatedAdapter())
    proxies = dict(session.proxies)
    if session.trust_env:
        proxies.update(requests.utils.get_environ_proxies(base_url))
    return not proxies


class _Sender:
    """Blocking requests on threads of their own, each sent when its gate opens.

    With `at_send` the gate is entered by the connection itself, between connecting
    and writing the request (`_GatedSend`): nothing that runs after it can make the
    request late. Otherwise it is entered just before the HTTP client is called.
    """

    def __init__(self, what: str, timeout: float, threads: int, *, at_send: bool) -> None:
        self._what = what
        self._timeout = timeout
        self._at_send = at_send
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=f"recon-{what}")

    async def run(self, request: Callable[[], T], gate: SendGate | None) -> T:
        """`request()` on a thread once `gate` opens; `NotSent` or `Transient` on timeout."""

        def blocking() -> tuple[bool, T | None]:
            if gate is None:
                return True, request()
            if not self._at_send:
                if not gate.enter():
                    return False, None
                return True, request()
            _gates.gate, _gates.refused = gate, False
            try:
                result = request()
            except _GateClosed:
                return False, None
            finally:
                refused, _gates.gate = _gates.refused, None
            return (False, None) if refused else (True, result)

        # The gate's wait is not the server's slowness: only the request has a deadline.
        deadline = self._timeout * _DEADLINE_FACTOR
        context = contextvars.copy_context()
        future = asyncio.get_running_loop().run_in_executor(self._executor, context.run, blocking)
        try:
            sent, result = await asyncio.wait_for(future, deadline + (gate.wait if gate else 0.0))
        except TimeoutError:
            sent = None
        except BaseException:
            if gate is not None:
                gate.abandon()
            raise
        if sent is None:
            if gate is not None:
                gate.abandon()
            raise Transient(f"{self._what} did not answer within {deadline}s")
        if not sent:
            raise NotSent(f"the send slot for a {self._what} request had passed; nothing was sent")
        return result  # type: ignore[return-value]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Outcome:
    """What the last request of this thread did, as seen below the shodan client."""

    status: int | None = None
    retry_after: float | None = None
    error: requests.RequestException | None = None


class _TimeoutSession(requests.Session):
    """A session that gives every request a timeout and remembers how it ended.

    The shodan client calls `self._session.get(url, params=...)` without a timeout
    and folds every failure into a bare "Unable to connect to Shodan"; the status
    and the transport error recorded here (per thread) let us classify properly.
    """

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout
        self._local = threading.local()

    @property
    def outcome(self) -> _Outcome:
        outcome: _Outcome | None = getattr(self._local, "outcome", None)
        if outcome is None:
            outcome = self._local.outcome = _Outcome()
        return outcome

    def reset(self) -> None:
        self._local.outcome = _Outcome()

    def request(self, method: str, url: Any, *args: Any, **kwargs: Any) -> requests.Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        outcome = self.outcome
        try:
            response = super().request(method, url, *args, **kwargs)
        except requests.RequestException as error:
            outcome.error = error
            raise
        outcome.status = response.status_code
        outcome.retry_after = _retry_after(response.headers.get("Retry-After"))
        return response


class ApiProvider:
    """Shodan's REST API through the official client, one blocking call per thread."""

    name: str = "api"

    def __init__(
        self,
        api_key: SecretStr,
        base_url: str | None = None,
        timeout: float = 10.0,
        threads: int = 4,
    ) -> None:
        self._key = api_key
        self._timeout = timeout
        self._client: Any = shodan.Shodan(api_key.get_secret_value())
        if base_url:
            self._client.base_url = base_url.rstrip("/")
        # The client sleeps in `_request` until 1/api_rate_limit s have passed since its
        # last call, per instance; only when api_rate_limit > 0. The shared budget is ours.
        self._client.api_rate_limit = 0
        self._session = _TimeoutSession(timeout)
        self._session.trust_env = self._client._session.trust_env
        self._session.proxies.update(self._client._session.proxies)
        self._client._session.close()
        self._client._session = self._session
        self._sender = _Sender(
            "Shodan", timeout, threads, at_send=_gated(self._session, self._client.base_url)
        )

    def __repr__(self) -> str:
        return f"ApiProvider(base_url={self._client.base_url!r}, timeout={self._timeout})"

    async def lookup(self, ip: str, gate: SendGate | None = None) -> HostScan:
        queried_at = datetime.now(UTC)
        payload = await self._call(lambda: self._client.host(ip), gate)
        if payload is None:
            return HostScan(ip=ip, provider="api", queried_at=queried_at)
        if not isinstance(payload, Mapping):
            raise Transient(f"Shodan answered {type(payload).__name__} for {ip}, not an object")
        return parse_host(ip, payload, queried_at, "api")

    async def check_key(self, gate: SendGate | None = None) -> None:
        if await self._call(self._client.info, gate) is None:
            raise Transient("Shodan answered /api-info with 'No information available'")

    async def submit_scan(self, ip: str, gate: SendGate | None = None) -> ScanTicket:
        answer = await self._call(lambda: self._client.scan(ip), gate, self._classify_scan)
        if not isinstance(answer, Mapping) or not answer.get("id"):
            raise Transient("Shodan answered a scan submit without a scan id")
        credits = answer.get("credits_left")
        return ScanTicket(
            str(answer["id"]), int(credits) if isinstance(credits, int | float) else None
        )

    async def scan_status(self, scan_id: str, gate: SendGate | None = None) -> ScanStatus:
        answer = await self._call(
            lambda: self._client.scan_status(scan_id), gate, self._classify_scan
        )
        if not isinstance(answer, Mapping) or "status" not in answer:
            raise Transient("Shodan answered a scan status without a status")
        return ScanStatus.of(answer["status"])

    async def close(self) -> None:
        self._sender.close()
        self._session.close()

    async def _call(
        self,
        operation: Callable[[], object],
        gate: SendGate | None,
        classify: Callable[[str, _Outcome], ShodanError | None] | None = None,
    ) -> object | None:
        """Run `operation` in a thread; None for "no information", typed errors otherwise
        (as `classify` says: by default, a lookup's)."""
        classify = classify or self._classify

        def blocking() -> tuple[object, ShodanError | None, bool]:
            self._session.reset()
            try:
                result = operation()
            except shodan.APIError as error:
                # Returned, not raised: no chained exception (whose text would hold the
                # request URL and its `key=`) may travel with ours.
                classified = classify(str(error), self._session.outcome)
                return None, classified, classified is None
            status = self._session.outcome.status
            if status is not None and status >= 400:
                # The client returns any JSON answer without an "error" field as a result,
                # whatever its status: taken for a host, it would close every port.
                classified = classify("no error message", self._session.outcome)
                return None, classified, classified is None
            return result, None, False

        result, error, not_found = await self._sender.run(blocking, gate)
        if error is not None:
            raise error
        return None if not_found else result

    def _classify(self, message: str, outcome: _Outcome) -> ShodanError | None:
        message = _redact(message, self._key.get_secret_value())
        lowered = message.lower()
        status = outcome.status
        if "no information available" in lowered:
            return None
        if status in (401, 403) or "invalid api key" in lowered or "access denied" in lowered:
            return Unauthorized(f"Shodan rejected the API key: {message}")
        if status == 429 or "rate limit" in lowered:
            return RateLimited(f"Shodan rate limit: {message}", outcome.retry_after)
        if status is not None and 400 <= status < 500 and status != 404:
            return Permanent(f"Shodan refused the request: HTTP {status}: {message}", status)
        if isinstance(outcome.error, requests.Timeout):
            return Transient(f"Shodan did not answer within {self._timeout}s")
        if outcome.error is not None:
            return Transient(f"Unable to connect to Shodan ({type(outcome.error).__name__})")
        where = f"HTTP {status}: " if status is not None else ""
        return Transient(f"Shodan error: {where}{message}")

    def _classify_scan(self, message: str, outcome: _Outcome) -> ShodanError:
        """A scan endpoint's error: a refusal (fall back to the plain lookup) or Transient.

        A 401 or 403 here says nothing certain about the key (Shodan answers 401 when
        credits run out): the key gate is left to the lookups and key checks.
        """
        message = _redact(message, self._key.get_secret_value())
        lowered = message.lower()
        status = outcome.status
        if "recently" in lowered and "crawl" in lowered:
            return ScanRefused(f"Shodan will not scan again so soon: {message}", "recently_crawled")
        if status in (401, 403) or "credit" in lowered:
            what = "no_credits" if "credit" in lowered else "unauthorized"
            return ScanRefused(f"Shodan refused the scan: HTTP {status}: {message}", what)
        if status == 429 or "rate limit" in lowered:
            return ScanRefused(f"Shodan rate limit on a scan: {message}", "rate_limited")
        if status == 404 or "no information available" in lowered:
            return ScanRefused(f"Shodan does not know the scan: {message}", "unknown_scan")
        if status is not None and 400 <= status < 500:
            return ScanRefused(f"Shodan refused the scan: HTTP {status}: {message}", "refused")
        classified = self._classify(message, outcome)
        return classified if isinstance(classified, Transient) else Transient(message)


class InternetDbProvider:
    """Shodan's free InternetDB: open ports, hostnames, tags and vulns; no key, no banners."""

    name: str = "internetdb"

    def __init__(
        self, base_url: str = INTERNETDB_URL, timeout: float = 10.0, threads: int = 4
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._timeout = timeout
        self._session = requests.Session()
        self._sender = _Sender(
            "InternetDB", timeout, threads, at_send=_gated(self._session, self._base_url)
        )

    def __repr__(self) -> str:
        return f"InternetDbProvider(base_url={self._base_url!r}, timeout={self._timeout})"

    async def lookup(self, ip: str, gate: SendGate | None = None) -> HostScan:
        queried_at = datetime.now(UTC)
        response = await self._sender.run(lambda: self._get(ip), gate)
        if isinstance(response, ShodanError):
            raise response
        status, retry_after, body = response
        if status == 404:
            return HostScan(ip=ip, provider="internetdb", queried_at=queried_at)
        if status == 429:
            raise RateLimited("InternetDB rate limit (HTTP 429)", retry_after)
        # No key to reject: a 401/403 is taken for a temporary ban on bursts, retried.
        if 400 <= status < 500 and status not in (401, 403):
            raise Permanent(f"InternetDB refused the request: HTTP {status}", status)
        if status != 200:
            raise Transient(f"InternetDB error: HTTP {status}")
        try:
            payload = json.loads(body)
        except ValueError:
            raise Transient("InternetDB answered something that is not JSON") from None
        if not isinstance(payload, dict):
            raise Transient(f"InternetDB answered {type(payload).__name__}, not an object")
        return parse_internetdb(ip, payload, queried_at)

    async def check_key(self, gate: SendGate | None = None) -> None:
        return None

    async def close(self) -> None:
        self._sender.close()
        self._session.close()

    def _get(self, ip: str) -> tuple[int, float | None, bytes] | ShodanError:
        try:
            with self._session.get(f"{self._base_url}/{ip}", timeout=self._timeout) as response:
                return (
                    response.status_code,
                    _retry_after(response.headers.get("Retry-After")),
                    response.content,
                )
        except requests.Timeout:
            return Transient(f"InternetDB did not answer within {self._timeout}s")
        except requests.RequestException as error:
            return Transient(f"Unable to connect to InternetDB ({type(error).__name__})")


SAMPLE_RESOURCE = "shodan_hosts.json"
_SAMPLE_EPOCH = datetime(2025, 1, 6, tzinfo=UTC)
"""The moment the bundled sample timestamps are written as of: each lookup moves them
to its own hour, keeping their ages (so a demo's ages are the same whenever it runs)."""
_SAMPLE_STALE_DAYS = (35, 60)
"""Invented answers: one IP in eight has a port last seen this many days ago, or more
(older than RECON_STALE_OBSERVATION_DAYS's default), so demos show a stale row."""
# Ports, Shodan modules and products that make demos of unknown IPs look like real findings.
_SAMPLE_POOL: tuple[tuple[int, str, str, str | None, str | None, dict[str, float]], ...] = (
    (3389, "tcp", "rdp", "Remote Desktop Protocol", None, {}),
    (445, "tcp", "smb", "Samba smbd", "4.6.2", {"CVE-2017-7494": 10.0}),
    (22, "tcp", "ssh", "OpenSSH", "7.4", {"CVE-2018-15473": 5.0}),
    (443, "tcp", "https", "nginx", "1.18.0", {"CVE-2021-23017": 7.5}),
    (1433, "tcp", "mssql", "Microsoft SQL Server 2017", "14.00.1000", {}),
    (6379, "tcp", "redis", "Redis key-value store", "5.0.7", {}),
    (80, "tcp", "http", "Apache httpd", "2.4.29", {}),
    (5900, "tcp", "vnc", "VNC", None, {}),
    (161, "udp", "snmp", None, None, {}),
)


SAMPLE_SCAN_SECONDS = 5.0
"""How long a simulated on-demand scan of the sample provider takes to be DONE."""
SAMPLE_FIXED_PORTS = (3389, 445, 5900, 6379, 1433)
"""What a simulated scan finds closed: the first of these the host has open (an
operator who was asked to close RDP did), else its first port."""


class SampleProvider:
    """Bundled, invented data for demos without a key: every answer has `sample=True`.

    Known sample IPs answer from `recon_stream/samples/shodan_hosts.json`; any other IP
    gets a small service set derived from a hash of the address, the same every time.
    Observation times are relative to the lookup: Shodan's timestamps (per port and
    `last_update`) keep their age as of `_SAMPLE_EPOCH`, counted back from the hour of
    the lookup (`clock`), so the data is the same on every run apart from the clock,
    and only the few deliberately old observations show as stale.

    It simulates on-demand scans too (`submit_scan`): DONE `scan_seconds` after the
    submit, after which lookups of that IP show a fresh crawl that finds one port
    closed (`SAMPLE_FIXED_PORTS`), as when a technician closed it: the demo of a
    rescan confirming a fix.
    """

    name: str = "sample"

    def __init__(
        self,
        clock: Callable[[], datetime] | None = None,
        scan_seconds: float = SAMPLE_SCAN_SECONDS,
    ) -> None:
        text = resources.files("recon_stream.samples").joinpath(SAMPLE_RESOURCE).read_text("utf-8")
        hosts = json.loads(text)["hosts"]
        self._hosts: dict[str, dict[str, Any] | None] = dict(hosts)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._scan_seconds = scan_seconds
        self._scans: dict[str, tuple[str, datetime]] = {}
        """Scan id -> (IP, submitted at)."""
        self._rescanned: dict[str, datetime] = {}
        """IP -> when its simulated scan finished."""

    def __repr__(self) -> str:
        return "SampleProvider()"

    @property
    def ips(self) -> tuple[str, ...]:
        """The IPs with bundled sample answers."""
        return tuple(self._hosts)

    async def lookup(self, ip: str, gate: SendGate | None = None) -> HostScan:
        # No request leaves, but the pace is the same as a real provider's.
        if gate is not None and not await asyncio.to_thread(gate.enter):
            raise NotSent("the send slot for a sample lookup had passed")
        queried_at = self._clock()
        payload = self._hosts[ip] if ip in self._hosts else _invented_host(ip)
        if payload is not None:
            hour = queried_at.replace(minute=0, second=0, microsecond=0)
            payload = _moved(payload, hour - _SAMPLE_EPOCH)
            for scan_id, (scanned, submitted) in list(self._scans.items()):
                if scanned == ip and self._done(submitted, queried_at):
                    self._rescanned[ip] = submitted + timedelta(seconds=self._scan_seconds)
                    del self._scans[scan_id]
            if ip in self._rescanned:
                payload = _rescanned(payload, self._rescanned[ip])
        if payload is None:
            return HostScan(ip=ip, provider="sample", queried_at=queried_at, sample=True)
        scan = parse_host(ip, payload, queried_at, "sample")
        return scan.model_copy(update={"sample": True})

    async def check_key(self, gate: SendGate | None = None) -> None:
        return None

    async def submit_scan(self, ip: str, gate: SendGate | None = None) -> ScanTicket:
        if gate is not None and not await asyncio.to_thread(gate.enter):
            raise NotSent("the send slot for a sample scan had passed")
        scan_id = "sample-" + hashlib.sha256(f"{ip}/{len(self._scans)}".encode()).hexdigest()[:16]
        self._scans[scan_id] = (ip, self._clock())
        return ScanTicket(scan_id, credits_left=None)

    async def scan_status(self, scan_id: str, gate: SendGate | None = None) -> ScanStatus:
        if gate is not None and not await asyncio.to_thread(gate.enter):
            raise NotSent("the send slot for a sample scan status had passed")
        if scan_id not in self._scans:
            done = scan_id.startswith("sample-")
            if done:
                return ScanStatus.DONE  # its lookup already read the result
            raise ScanRefused(f"no sample scan {scan_id[:40]!r}", "unknown_scan")
        _, submitted = self._scans[scan_id]
        return ScanStatus.DONE if self._done(submitted, self._clock()) else ScanStatus.PROCESSING

    def _done(self, submitted: datetime, now: datetime) -> bool:
        return (now - submitted).total_seconds() >= self._scan_seconds

    async def close(self) -> None:
        return None


def _rescanned(payload: dict[str, Any], at: datetime) -> dict[str, Any]:
    """A sample host as a fresh crawl at `at` finds it: one port closed, the rest seen."""
    banners = list(payload.get("data", []))
    ports = [banner.get("port") for banner in banners]
    fixed = next(
        (port for port in SAMPLE_FIXED_PORTS if port in ports), ports[0] if ports else None
    )
    stamp = at.replace(tzinfo=None).isoformat(timespec="microseconds")
    kept = [{**banner, "timestamp": stamp} for banner in banners if banner.get("port") != fixed]
    host = {**payload, "data": kept, "ports": [banner["port"] for banner in kept]}
    host["last_update"] = stamp
    return host


def _invented_host(ip: str) -> dict[str, Any]:
    digest = hashlib.sha256(ip.encode()).digest()
    count = 1 + digest[0] % 3
    chosen: list[int] = []
    for byte in digest[1:]:
        index = byte % len(_SAMPLE_POOL)
        if index not in chosen:
            chosen.append(index)
        if len(chosen) == count:
            break
    banners = []
    for n, index in enumerate(sorted(chosen)):
        port, transport, module, product, version, vulns = _SAMPLE_POOL[index]
        seen = _SAMPLE_EPOCH - timedelta(hours=digest[10 + n] % 72, minutes=digest[20 + n] % 60)
        if n == 0 and digest[9] % 8 == 0:
            low, high = _SAMPLE_STALE_DAYS
            seen -= timedelta(days=low + digest[8] % (high - low))
        banner: dict[str, Any] = {
            "port": port,
            "transport": transport,
            "timestamp": seen.replace(tzinfo=None).isoformat(timespec="microseconds"),
            "_shodan": {"module": module},
            "vulns": {cve: {"cvss": cvss, "verified": False} for cve, cvss in vulns.items()},
        }
        if product is not None:
            banner["product"] = product
        if version is not None:
            banner["version"] = version
        banners.append(banner)
    return {
        "ip_str": ip,
        "ports": [b["port"] for b in banners],
        "hostnames": [],
        "tags": [],
        "org": "Sample Networks (invented)",
        "isp": "Sample Networks (invented)",
        "asn": f"AS{64512 + int.from_bytes(digest[30:32]) % 1024}",
        "last_update": max(b["timestamp"] for b in banners),
        "data": banners,
    }


def _moved(payload: dict[str, Any], by: timedelta) -> dict[str, Any]:
    """A copy of a sample host answer with its Shodan timestamps moved `by`."""

    def move(value: Any) -> Any:
        try:
            moved = datetime.fromisoformat(str(value)) + by
        except ValueError:
            return value
        return moved.isoformat(timespec="microseconds")

    host = dict(payload)
    if "last_update" in host:
        host["last_update"] = move(host["last_update"])
    host["data"] = [
        {**banner, "timestamp": move(banner["timestamp"])} if "timestamp" in banner else banner
        for banner in payload.get("data", [])
    ]
    return host


def _redact(text: str, key: str) -> str:
    if key:
        text = text.replace(key, "***")
    return _KEY_IN_URL.sub(r"\1***", text)


def _retry_after(value: str | None) -> float | None:
    """A positive number of seconds, or None: HTTP dates and `0` carry no usable hint."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds > 0 else None
