"""The HTTP status endpoint: `/healthz`, `/readyz` and `/metrics`.

A deliberately tiny asyncio server (three GET routes) so workers need no web
framework. `/readyz` runs the registered checks with a timeout each and answers
503 with the reasons when any fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[str | None]]
"""A readiness check: returns None when ready, else the reason it is not."""


class StatusServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        check_timeout: float = 2.0,
    ) -> None:
        self._registry = registry
        self._host = host
        self._port = port
        self._checks: dict[str, Check] = {}
        self._states: dict[str, Callable[[], str]] = {}
        self._check_timeout = check_timeout
        self._server: asyncio.Server | None = None

    def add_check(self, name: str, check: Check) -> None:
        self._checks[name] = check

    def add_state(self, name: str, state: Callable[[], str]) -> None:
        """Shown in `/readyz`'s body under "states" (e.g. the scheduler's role);
        never affects readiness."""
        self._states[name] = state

    def states(self) -> dict[str, str]:
        """The states shown in `/readyz` (never affecting readiness)."""
        return {name: state() for name, state in self._states.items()}

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        log.info(
            "status endpoint on http://%s:%d (/healthz /readyz /metrics)", self._host, self.port
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def readiness(self) -> dict[str, str]:
        """Every check's result: 'ok' or the reason it failed."""

        async def run(check: Check) -> str:
            try:
                reason = await asyncio.wait_for(check(), self._check_timeout)
            except TimeoutError:
                return f"no answer within {self._check_timeout:g}s"
            except Exception as error:  # a failing check is a reason, not a crash
                return f"{type(error).__name__}"
            return reason or "ok"

        names = list(self._checks)
        results = await asyncio.gather(*(run(self._checks[n]) for n in names))
        return dict(zip(names, results, strict=True))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, _, rest = request.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            status, content_type, body = await self._route(method, path)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (body if method != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"method not allowed\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/healthz":
            return "200 OK", "application/json", b'{"status":"ok"}\n'
        if path == "/readyz":
            checks = await self.readiness()
            ready = all(v == "ok" for v in checks.values())
            states = self.states()
            body = json.dumps(
                {"status": "ready" if ready else "not ready", "checks": checks, "states": states}
            )
            return (
                "200 OK" if ready else "503 Service Unavailable",
                "application/json",
                body.encode() + b"\n",
            )
        return "404 Not Found", "text/plain", b"not found\n"
