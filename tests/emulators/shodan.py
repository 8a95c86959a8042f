"""A local emulator of the Shodan REST endpoints we use, as a real HTTP server.

Endpoints (one server, one loopback port):

- ``GET /shodan/host/{ip}?key=K``   host payloads set with ``set_host``; 404
  ``{"error": "No information available for that IP."}`` otherwise. Comma-joined
  IPs answer a list of the known hosts.
- ``GET /api-info?key=K``           a plan description for valid keys.
- ``GET /internetdb/{ip}``          InternetDB, derived from the host payload
  (or set with ``set_internetdb``); 404 ``{"detail": "No information available"}``.
- ``POST /shodan/scan?key=K``       an on-demand scan (form field ``ips``): answers
  ``{id, count, credits_left}`` and spends one of ``scan_credits`` (none left: 401
  ``{"error": "Insufficient scan credits..."}``). Status goes SUBMITTING, QUEUE,
  PROCESSING, then DONE ``scan_seconds`` after the submit; when DONE, the host
  payload set with ``after_scan`` (if any) replaces the IP's (what the crawl found).
- ``GET /shodan/scan/{id}?key=K``   ``{id, count, status, created}``; 404 for an
  unknown id. ``GET /shodan/scans`` lists scans with the ``api_key`` in each entry,
  as Shodan does (which is why the scanner never logs such listings).

Keys not in ``keys`` get 401 ``{"error": "Invalid API key"}``. Like Shodan, the
emulator enforces a request rate per key (InternetDB: per anonymous client):
more than ``rate`` requests in a sliding window get 429 and count as a
violation. Every request is recorded, so tests can prove a budget held.
``fail_next`` injects statuses and delays.

A request's time is when its first bytes reached this machine's network stack (the
kernel's receive timestamp, `SO_TIMESTAMPNS`), as a server's edge sees it, not when
a thread of this process got round to it: on a busy machine the emulator's own
threads wait for a core and the GIL, and that delay is not the client's.
"""

from __future__ import annotations

import bisect
import json
import math
import secrets
import socket
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

RATE_LIMIT_MESSAGE = (
    "Request rate limit reached (1 request/ second). Please wait a second and try again "
    "and upgrade your plan if you need more"
)
NOT_FOUND_MESSAGE = "No information available for that IP."
INVALID_KEY_MESSAGE = "Invalid API key"
INSUFFICIENT_SCAN_CREDITS = (
    "Insufficient scan credits, please upgrade your API plan or wait for the monthly limit to reset"
)
_HTML_ERROR = "<html><head><title>{status}</title></head><body><h1>{status}</h1></body></html>"
_ANONYMOUS = ""
# Linux's value; Python's socket module does not always name it.
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


@dataclass(frozen=True)
class RecordedRequest:
    at: float
    """`time.monotonic()` when the request arrived."""
    key: str | None
    path: str
    status: int


@dataclass
class _Fault:
    ip: str | None
    status: int
    remaining: int
    body: Any
    delay: float
    headers: Mapping[str, str]
    path: str = ""


class ShodanEmulator:
    """Shodan's REST API and InternetDB on ``http://127.0.0.1:PORT``."""

    def __init__(self, *, rate: float | None = 1.0, keys: set[str] | None = None) -> None:
        self.api_key = secrets.token_hex(16)
        """A valid key (32 characters, like Shodan's), in ``keys`` from the start."""
        self.keys: set[str] = {self.api_key} if keys is None else set(keys)
        self.rate = rate
        """Requests per second allowed per key; None for no limit."""
        self.violations = 0
        self._hosts: dict[str, dict[str, Any]] = {}
        self._internetdb: dict[str, dict[str, Any]] = {}
        self._faults: list[_Fault] = []
        self._requests: list[RecordedRequest] = []
        self._accepted: dict[str, list[float]] = {}
        self.scan_credits = 100
        """On-demand scan credits left; a submit with none left gets 401."""
        self.scan_seconds = 0.0
        """How long after its submit a scan is DONE."""
        self._scans: dict[str, dict[str, Any]] = {}
        self._after_scan: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> ShodanEmulator:
        emulator = self

        class Handler(_Handler):
            owner = emulator

        server = _TimestampingServer(("127.0.0.1", 0), Handler)
        # Handler threads are joined on close; delayed answers wake up on `_stopping`.
        server.daemon_threads = False
        server.block_on_close = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> ShodanEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "emulator not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL of the Shodan API (the client's ``base_url``)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def internetdb_url(self) -> str:
        return f"{self.url}/internetdb"

    # -- data and faults --------------------------------------------------------------------

    def set_host(self, ip: str, payload: Mapping[str, Any]) -> None:
        with self._lock:
            self._hosts[ip] = json.loads(json.dumps(payload))

    def remove_host(self, ip: str) -> None:
        with self._lock:
            self._hosts.pop(ip, None)
            self._internetdb.pop(ip, None)

    def after_scan(self, ip: str, payload: Mapping[str, Any], *, restamp: bool = True) -> None:
        """What the next on-demand scan of `ip` finds: its host payload once DONE, with
        every banner's timestamp the moment of DONE (`restamp`, as a crawl then) or as
        given (a scan that is DONE yet crawled nothing new)."""
        with self._lock:
            self._after_scan[ip] = {**json.loads(json.dumps(payload)), "_restamp": restamp}

    @property
    def scans(self) -> list[dict[str, Any]]:
        """Every scan submitted: {id, ip, submitted (monotonic), polls}."""
        with self._lock:
            return [dict(scan) for scan in self._scans.values()]

    def set_internetdb(self, ip: str, payload: Mapping[str, Any]) -> None:
        """Override the InternetDB answer otherwise derived from the host payload."""
        with self._lock:
            self._internetdb[ip] = json.loads(json.dumps(payload))

    def fail_next(
        self,
        ip: str | None,
        status: int,
        count: int = 1,
        body: Any = None,
        delay: float = 0.0,
        headers: Mapping[str, str] | None = None,
        *,
        path: str = "",
    ) -> None:
        """Answer the next `count` requests for `ip` (any request when None) whose path
        starts with `path` with `status`.

        `body` is JSON-encoded unless it is `str`/`bytes`; None picks Shodan's usual body
        for the status. `delay` seconds pass before the answer. Status 200 with a delay
        serves the normal answer, late. Faults skip the key check and the rate limit.
        """
        with self._lock:
            self._faults.append(_Fault(ip, status, count, body, delay, dict(headers or {}), path))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # -- what happened ----------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    def max_requests_in_any_window(
        self, seconds: float = 1.0, *, key: str | None = None, path_prefix: str = ""
    ) -> int:
        """The most requests (of `key`, under `path_prefix`) that arrived within `seconds`."""
        times = sorted(
            r.at
            for r in self.requests
            if r.path.startswith(path_prefix) and (key is None or r.key == key)
        )
        best = start = 0
        for end, t in enumerate(times):
            while t - times[start] >= seconds:
                start += 1
            best = max(best, end - start + 1)
        return best

    # -- request handling (server threads) --------------------------------------------------

    def _handle(self, handler: _Handler, form: Mapping[str, list[str]] | None = None) -> None:
        arrived = handler.arrived
        parts = urlsplit(handler.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        key = query.get("key", [None])[0]
        internetdb = path.startswith("/internetdb/")
        ips = _ips_of(path)
        if form is not None and key is None:
            key = form.get("key", [None])[0]  # the client posts its key in the form
        if form is not None and path == "/shodan/scan":
            ips = [ip for ip in ",".join(form.get("ips", [])).split(",") if ip]

        status, body, headers, delay = self._decide(path, key, internetdb, ips, arrived)
        with self._lock:
            self._requests.append(RecordedRequest(arrived, key, path, status))
        if delay > 0 and self._stopping.wait(delay):
            return
        handler.answer(status, body, headers)

    def _decide(
        self, path: str, key: str | None, internetdb: bool, ips: list[str], arrived: float
    ) -> tuple[int, Any, Mapping[str, str], float]:
        with self._lock:
            fault = self._take_fault(ips, path)
        if fault is not None and fault.status != 200:
            body = fault.body if fault.body is not None else _default_body(fault.status, internetdb)
            return fault.status, body, fault.headers, fault.delay
        delay = fault.delay if fault is not None else 0.0
        if not internetdb and key not in self.keys:
            return 401, {"error": INVALID_KEY_MESSAGE}, {}, delay
        if not self._admit(_ANONYMOUS if internetdb else str(key), arrived):
            body = (
                {"detail": "Rate limit exceeded"} if internetdb else {"error": RATE_LIMIT_MESSAGE}
            )
            return 429, body, {}, delay
        status, body = self._route(path, internetdb, ips, str(key))
        return status, body, {}, delay

    def _take_fault(self, ips: list[str], path: str) -> _Fault | None:
        for fault in self._faults:
            if not path.startswith(fault.path):
                continue
            if fault.ip is None or fault.ip in ips:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _admit(self, bucket: str, arrived: float) -> bool:
        """Sliding-window limit: at most `rate * window` accepted requests per window.

        Handler threads may get here out of arrival order, so the accepted arrivals
        are kept sorted and every window that would hold this one is checked.
        """
        rate = self.rate
        if rate is None:
            return True
        window = max(1.0, 1.0 / rate)
        capacity = max(1, math.floor(rate * window + 1e-9))
        with self._lock:
            accepted = self._accepted.setdefault(bucket, [])
            while accepted and accepted[-1] - accepted[0] >= 2 * window:
                accepted.pop(0)
            at = bisect.bisect(accepted, arrived)
            times = [*accepted[:at], arrived, *accepted[at:]]
            for first in range(max(0, at - capacity), at + 1):
                last = first + capacity
                if last < len(times) and times[last] - times[first] < window:
                    self.violations += 1
                    return False
            accepted.insert(at, arrived)
            return True

    def _route(self, path: str, internetdb: bool, ips: list[str], key: str) -> tuple[int, Any]:
        with self._lock:
            self._finish_scans()
            if path == "/shodan/scan":
                return self._submit(ips)
            if path == "/shodan/scans":
                listing = [
                    {"id": s["id"], "status": self._status(s), "size": 1, "api_key": key}
                    for s in self._scans.values()
                ]
                return 200, {"matches": listing, "total": len(listing)}
            if path.startswith("/shodan/scan/"):
                scan = self._scans.get(path.removeprefix("/shodan/scan/"))
                if scan is None:
                    return 404, {"error": "Scan not found"}
                scan["polls"] += 1
                return 200, {
                    "id": scan["id"],
                    "count": 1,
                    "status": self._status(scan),
                    "created": scan["created"],
                }
            if internetdb:
                ip = ips[0] if ips else ""
                answer = self._internetdb.get(ip)
                if answer is None and ip in self._hosts:
                    answer = _internetdb_of(ip, self._hosts[ip])
                if answer is None:
                    return 404, {"detail": "No information available"}
                return 200, answer
            if path == "/api-info":
                return 200, _API_INFO
            if path.startswith("/shodan/host/") and ips:
                found = [self._hosts[ip] for ip in ips if ip in self._hosts]
                if not found:
                    return 404, {"error": NOT_FOUND_MESSAGE}
                return 200, found[0] if len(ips) == 1 else found
        return 404, {"error": "Not found"}

    # -- on-demand scans (under the lock) ----------------------------------------------------

    def _submit(self, ips: list[str]) -> tuple[int, Any]:
        if not ips:
            return 400, {"error": "No IPs provided"}
        if self.scan_credits < len(ips):
            return 401, {"error": INSUFFICIENT_SCAN_CREDITS}
        self.scan_credits -= len(ips)
        scan_id = secrets.token_hex(8).upper()
        self._scans[scan_id] = {
            "id": scan_id,
            "ip": ips[0],
            "submitted": time.monotonic(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S.000000", time.gmtime()),
            "polls": 0,
            "applied": False,
        }
        return 200, {"id": scan_id, "count": len(ips), "credits_left": self.scan_credits}

    def _status(self, scan: Mapping[str, Any]) -> str:
        waited = time.monotonic() - scan["submitted"]
        if waited >= self.scan_seconds:
            return "DONE"
        return ("SUBMITTING", "QUEUE", "PROCESSING")[min(2, int(3 * waited / self.scan_seconds))]

    def _finish_scans(self) -> None:
        for scan in self._scans.values():
            if not scan["applied"] and self._status(scan) == "DONE":
                scan["applied"] = True
                found = self._after_scan.pop(scan["ip"], None)
                if found is not None:
                    if found.pop("_restamp"):
                        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
                        found["last_update"] = stamp
                        for banner in found.get("data", []):
                            banner["timestamp"] = stamp
                    self._hosts[scan["ip"]] = found


class _TimestampingServer(ThreadingHTTPServer):
    """Accepted connections inherit `SO_TIMESTAMPNS`: the kernel stamps what arrives."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        super().server_bind()


class _Handler(BaseHTTPRequestHandler):
    owner: ShodanEmulator
    server_version = "nginx"
    sys_version = ""
    arrived: float
    """`time.monotonic()` reading of when the request's first bytes arrived."""

    def setup(self) -> None:
        super().setup()
        # One request per connection (HTTP/1.0), so the first bytes are the request's.
        self.arrived = time.monotonic()
        try:
            _, ancillary, _, _ = self.connection.recvmsg(1, socket.CMSG_SPACE(16), socket.MSG_PEEK)
        except OSError:
            return
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= 16:
                seconds, nanoseconds = struct.unpack("qq", data[:16])
                waited = time.time() - (seconds + nanoseconds / 1e9)
                self.arrived = time.monotonic() - max(0.0, waited)

    def do_GET(self) -> None:
        self.owner._handle(self)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        self.owner._handle(self, parse_qs(body))

    def answer(self, status: int, body: Any, headers: Mapping[str, str]) -> None:
        if isinstance(body, bytes):
            raw, content_type = body, "application/octet-stream"
        elif isinstance(body, str):
            raw = body.encode()
            content_type = "text/html" if body.lstrip().startswith("<") else "text/plain"
        else:
            raw, content_type = json.dumps(body).encode(), "application/json"
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(raw)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout); nothing to answer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean; requests are recorded instead


def _ips_of(path: str) -> list[str]:
    for prefix in ("/shodan/host/", "/internetdb/"):
        if path.startswith(prefix):
            rest = path[len(prefix) :]
            return [ip for ip in rest.split(",") if ip]
    return []


def _default_body(status: int, internetdb: bool) -> Any:
    if internetdb:
        return {404: {"detail": "No information available"}}.get(
            status, {"detail": f"HTTP {status}"}
        )
    if status == 401:
        return {"error": INVALID_KEY_MESSAGE}
    if status == 403:
        return _HTML_ERROR.format(status="403 Forbidden")
    if status == 404:
        return {"error": NOT_FOUND_MESSAGE}
    if status == 429:
        return {"error": RATE_LIMIT_MESSAGE}
    if status >= 500:
        return _HTML_ERROR.format(status=f"{status} Server Error")
    return {"error": f"HTTP {status}"}


def _internetdb_of(ip: str, host: Mapping[str, Any]) -> dict[str, Any]:
    banners = [b for b in host.get("data") or [] if isinstance(b, dict)]
    ports = set(host.get("ports") or []) | {b["port"] for b in banners if "port" in b}
    cpes: list[str] = []
    for banner in banners:
        cpe = banner.get("cpe23") or banner.get("cpe") or []
        for item in [cpe] if isinstance(cpe, str) else cpe:
            if item not in cpes:
                cpes.append(item)
    vulns = set(host.get("vulns") or [])
    for banner in banners:
        vulns.update(banner.get("vulns") or {})
    return {
        "ip": ip,
        "ports": sorted(ports),
        "cpes": cpes,
        "hostnames": list(host.get("hostnames") or []),
        "tags": list(host.get("tags") or []),
        "vulns": sorted(vulns),
    }


_API_INFO = {
    "scan_credits": 100,
    "usage_limits": {"scan_credits": 100, "query_credits": 100, "monitored_ips": 16},
    "plan": "dev",
    "https": False,
    "unlocked": True,
    "query_credits": 100,
    "monitored_ips": 0,
    "unlocked_left": 100,
    "telnet": False,
}
