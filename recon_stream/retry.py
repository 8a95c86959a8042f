"""Retrying through outages: exponential backoff with full jitter, never giving up.

The error taxonomy of the workers, in one place:

- Message over 64 KiB, not JSON, schema violation, not an IP: sent to the DLQ
  unchanged with the reason in headers; the batch is committed.
- Address not public: counted, dropped on purpose; committed.
- MongoDB unreachable, not primary, retryable write error: retried here with
  backoff; nothing is committed meanwhile, readiness reports the outage.
- Kafka publish failed (broker down, timeout, leader moved): retried here the
  same way.
- Anything else (a bug, a rejected write): logged; after a pause the batch is
  nacked (offsets rewound) and redelivered.
- Shutdown during a retry: the retry is cancelled; the batch is not committed
  and is redelivered to whoever owns the partition next.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiokafka.errors import KafkaError
from pymongo.errors import ConnectionFailure, PyMongoError

from recon_stream.metrics import Metrics

T = TypeVar("T")
log = logging.getLogger(__name__)


def transient_dependency(error: BaseException) -> str | None:
    """The dependency whose outage caused `error`, or None if retrying cannot help."""
    if isinstance(error, ConnectionFailure):
        return "mongodb"
    if isinstance(error, PyMongoError) and error.has_error_label("RetryableWriteError"):
        return "mongodb"
    if isinstance(error, KafkaError | asyncio.TimeoutError):
        return "kafka"
    return None


class Backoff:
    """Exponential backoff with full jitter between `initial` and `maximum` seconds."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.maximum, self.initial * 2**attempt))  # noqa: S311


async def until_done(
    operation: Callable[[], Awaitable[T]],
    what: str,
    backoff: Backoff,
    metrics: Metrics | None = None,
    on_failure: Callable[[str, BaseException], None] | None = None,
    on_success: Callable[[], None] | None = None,
) -> T:
    """Run `operation` until it succeeds, waiting out transient outages.

    Errors that are not outages propagate at once.
    """
    attempt = 0
    while True:
        try:
            result = await operation()
        except Exception as error:
            dependency = transient_dependency(error)
            if dependency is None:
                raise
            if metrics is not None:
                metrics.retries.labels(dependency).inc()
            if on_failure is not None:
                on_failure(dependency, error)
            wait = backoff.delay(attempt)
            log.warning(
                "%s failed (%s unavailable: %s); retry %d in %.1fs",
                what,
                dependency,
                type(error).__name__,
                attempt + 1,
                wait,
            )
            attempt += 1
            await asyncio.sleep(wait)
        else:
            if on_success is not None:
                on_success()
            return result


class Retrier:
    """`until_done` bound to one worker's backoff, metrics and outage callbacks."""

    def __init__(
        self,
        backoff: Backoff,
        metrics: Metrics | None = None,
        on_failure: Callable[[str, BaseException], None] | None = None,
        on_success: Callable[[], None] | None = None,
    ) -> None:
        self.backoff = backoff
        self._metrics = metrics
        self._on_failure = on_failure
        self._on_success = on_success

    async def __call__(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        return await until_done(
            operation,
            what,
            self.backoff,
            self._metrics,
            on_failure=self._on_failure,
            on_success=self._on_success,
        )


async def drain_every(interval: float, drain: Callable[[], Awaitable[int]], what: str) -> None:
    """Call `drain` until it finds nothing to do, wait `interval`, and again, until
    cancelled. A failure is logged and the next round tries again (the relays)."""
    while True:
        try:
            while await drain() > 0:
                pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed; will try again", what)
        await asyncio.sleep(interval)
