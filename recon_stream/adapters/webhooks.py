"""HTTP POSTs to one webhook destination (httpx), each bounded by a timeout."""

from __future__ import annotations

import asyncio
import logging

import httpx

# httpx logs every request's URL at INFO, and a chat webhook's URL is its credential.
logging.getLogger("httpx").setLevel(logging.WARNING)


class WebhookClient:
    """Posts to one URL over a connection pool of its own, so a receiver that hangs
    holds only its own connections, never another destination's."""

    def __init__(self, url: str, timeout: float) -> None:
        self._url = url
        self._timeout = timeout
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=32),
        )

    async def post(self, body: bytes, headers: dict[str, str]) -> str | None:
        """None when the receiver answered 2xx; otherwise why not, as a metric label:
        `http_4xx`, `http_5xx` (any other status: `http_other`), `timeout` or `connection`."""
        try:
            # httpx's timeout bounds each phase (connect, each read); this bounds the whole
            # request, so a receiver trickling bytes cannot hold the delivery either.
            async with asyncio.timeout(self._timeout):
                response = await self._client.post(self._url, content=body, headers=headers)
        except (TimeoutError, httpx.TimeoutException):
            return "timeout"
        except httpx.HTTPError:
            return "connection"
        status = response.status_code
        if 200 <= status < 300:
            return None
        return f"http_{status // 100}xx" if status >= 400 else "http_other"

    async def close(self) -> None:
        await self._client.aclose()
