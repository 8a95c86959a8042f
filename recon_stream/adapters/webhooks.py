"""HTTP POSTs to one webhook destination (httpx), each bounded by a timeout, and the
notify DLQ where events a destination refuses for good are parked (Kafka)."""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus

import httpx
from faststream.kafka import KafkaBroker

from recon_stream.domain.notifications import Failure

# httpx logs every request's URL at INFO, and a chat webhook's URL is its credential.
logging.getLogger("httpx").setLevel(logging.WARNING)

DETAIL_BODY_CHARS = 200


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

    async def post(self, body: bytes, headers: dict[str, str]) -> Failure | None:
        """None when the receiver answered 2xx; otherwise why not. A redirect is not
        followed (the signature covers one URL) and counts as a failure (`http_other`)."""
        try:
            # httpx's timeout bounds each phase (connect, each read); this bounds the whole
            # request, so a receiver trickling bytes (or a 2xx that comes too late) cannot
            # hold the delivery either.
            async with asyncio.timeout(self._timeout):
                response = await self._client.post(self._url, content=body, headers=headers)
        except (TimeoutError, httpx.TimeoutException):
            return Failure("timeout")
        except httpx.HTTPError:
            return Failure("connection")
        status = response.status_code
        if 200 <= status < 300:
            return None
        reason = f"http_{status // 100}xx" if status >= 400 else "http_other"
        return Failure(reason, status, _detail(status, response.text))

    async def close(self) -> None:
        await self._client.aclose()


def _detail(status: int, text: str) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    line = " ".join(text[:DETAIL_BODY_CHARS].split())
    head = f"HTTP {status} {phrase}".rstrip()
    return f"{head}: {line}" if line else head


class KafkaParking:
    """Writes an event a destination refused for good to the notify DLQ, byte for byte,
    with the refusal in headers; returns once Kafka has it."""

    def __init__(self, broker: KafkaBroker, topic: str) -> None:
        self._broker = broker
        self._topic = topic

    async def park(self, value: bytes, key: bytes | None, headers: dict[str, str]) -> None:
        await self._broker.publish(value, self._topic, key=key, headers=headers)
