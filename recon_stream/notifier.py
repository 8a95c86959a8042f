"""The webhook notifier: exposure events from Kafka to the destinations of `RECON_NOTIFY_FILE`.

Each destination is read and sent to on its own: a consumer group of its own
(`RECON_NOTIFIER_GROUP_ID` + "." + its name) and a task of its own, so a receiver
that fails or hangs holds back only itself. Its position is the group's committed
offsets, committed after delivery: a restart resumes where it stopped and sends
again at most the batch in flight (`RECON_NOTIFIER_BATCH_SIZE` events per
destination), with the same `X-Recon-Event-Id`.

Within a destination, each partition's events go one after another (an
organization's events stay in order: its events share a partition), partitions
side by side. An event a receiver does not take (no 2xx, a timeout, a refused
connection) is tried again with backoff and jitter until it is taken; nothing is
skipped but what the destination's filters leave out. While it waits, the
consumer's partitions are paused and still polled, so the group keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import yaml
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from pydantic import SecretStr, ValidationError

from recon_stream.domain.exposures import ExposureEvent
from recon_stream.domain.notifications import (
    Destination,
    NotifyFile,
    body_of,
    signed_headers,
    wants,
)
from recon_stream.metrics import Metrics
from recon_stream.retry import Backoff

log = logging.getLogger(__name__)

COMMIT_ON_STOP_SECONDS = 5.0


class Record(Protocol):
    """What the notifier reads of a Kafka record (aiokafka's `ConsumerRecord` has it)."""

    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def value(self) -> bytes | None: ...


class NotifyFileError(ValueError):
    """The destinations file cannot be used (the message never holds a secret)."""


def load_destinations(
    path: Path, environ: Mapping[str, str] = os.environ
) -> tuple[Destination, ...]:
    """The destinations of a notify file, each `secret_env` read into `secret`."""
    try:
        parsed = NotifyFile.model_validate(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError) as error:
        raise NotifyFileError(f"{path}: {type(error).__name__}: {error}") from None
    except ValidationError as error:
        raise NotifyFileError(f"{path}: {error}") from None
    resolved = []
    for destination in parsed.destinations:
        if destination.secret_env is not None:
            value = environ.get(destination.secret_env, "")
            if not value:
                raise NotifyFileError(
                    f"destination {destination.name}: {destination.secret_env} is not set"
                )
            destination = destination.model_copy(update={"secret": SecretStr(value)})
        resolved.append(destination)
    return tuple(resolved)


class Consumer(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Record]]: ...
    def assignment(self) -> set[TopicPartition]: ...
    def pause(self, *partitions: TopicPartition) -> None: ...
    def resume(self, *partitions: TopicPartition) -> None: ...
    def seek(self, partition: TopicPartition, offset: int) -> None: ...
    async def commit(self, offsets: dict[TopicPartition, int]) -> None: ...


class Poster(Protocol):
    async def post(self, body: bytes, headers: dict[str, str]) -> str | None: ...


class DestinationNotifier:
    """Delivers the exposure events to one destination, in order per partition."""

    def __init__(
        self,
        destination: Destination,
        consumer: Callable[[], Consumer],
        client: Poster,
        metrics: Metrics,
        backoff: Backoff,
        *,
        batch: int,
        product_version: str,
    ) -> None:
        assert destination.secret is not None  # load_destinations resolved secret_env
        self.destination = destination
        self._secret = destination.secret.get_secret_value().encode()
        self._new_consumer = consumer
        self._client = client
        self._metrics = metrics
        self._backoff = backoff
        self._batch = batch
        self._version = product_version
        self._waiting_since: dict[TopicPartition, float] = {}
        self._delivered = metrics.notifier_delivered.labels(destination.name)

    def oldest_undelivered_age(self) -> float:
        """Seconds since the oldest event read and not yet delivered reached Kafka."""
        if not self._waiting_since:
            return 0.0
        return max(0.0, time.time() - min(self._waiting_since.values()))

    def sample(self) -> None:
        self._metrics.notifier_oldest_undelivered.labels(self.destination.name).set(
            self.oldest_undelivered_age()
        )

    async def run(self) -> None:
        consumer = await self._started()
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=1000, max_records=self._batch)
                if not batch:
                    continue
                try:
                    await self._deliver(consumer, batch)
                except Exception:
                    # A bug, not a receiver's refusal (those are retried inside): the
                    # undelivered rest of the batch is read again after a pause.
                    log.exception("notifier %s: delivering a batch failed", self.destination.name)
                    await asyncio.sleep(self._backoff.maximum / 10)
        finally:
            await consumer.stop()

    async def _started(self) -> Consumer:
        attempt = 0
        while True:
            consumer = self._new_consumer()
            try:
                await consumer.start()
                return consumer
            except KafkaError as error:
                log.warning(
                    "notifier %s: Kafka unavailable (%s), retrying",
                    self.destination.name,
                    type(error).__name__,
                )
                with contextlib.suppress(Exception):
                    await consumer.stop()
                await asyncio.sleep(self._backoff.delay(attempt))
                attempt += 1

    async def _deliver(self, consumer: Consumer, batch: dict[TopicPartition, list[Record]]) -> None:
        """Deliver `batch`, then commit it; on shutdown, commit what was delivered."""
        done: dict[TopicPartition, int] = {}
        consumer.pause(*batch)
        polling = asyncio.create_task(self._keep_membership(consumer))
        try:
            async with asyncio.TaskGroup() as partitions:
                for tp, records in batch.items():
                    partitions.create_task(self._deliver_partition(tp, records, done))
        except Exception:
            held = consumer.assignment()
            for tp, records in batch.items():
                if tp in held:
                    consumer.seek(tp, done.get(tp, records[0].offset))
            raise
        finally:
            polling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await polling
            self._waiting_since.clear()
            await asyncio.shield(self._commit(consumer, done))
        consumer.resume(*consumer.assignment())

    async def _keep_membership(self, consumer: Consumer) -> None:
        # A poll inside max.poll.interval.ms keeps the group from handing the
        # partitions to another member while a receiver keeps us waiting.
        while True:
            consumer.pause(*consumer.assignment())
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                consumer.seek(tp, records[0].offset)  # a partition assigned meanwhile: later

    async def _deliver_partition(
        self, tp: TopicPartition, records: Sequence[Record], done: dict[TopicPartition, int]
    ) -> None:
        for record in records:
            self._waiting_since[tp] = record.timestamp / 1000
            await self._deliver_one(record)
            done[tp] = record.offset + 1
        self._waiting_since.pop(tp, None)

    async def _deliver_one(self, record: Record) -> None:
        name = self.destination.name
        raw = record.value or b""
        try:
            event = ExposureEvent.model_validate_json(raw)
        except ValidationError:
            log.error("notifier %s: offset %d is not an exposure event", name, record.offset)
            self._metrics.notifier_filtered.labels(name, "invalid").inc()
            return
        if not wants(self.destination, event):
            self._metrics.notifier_filtered.labels(name, "filter").inc()
            return
        body, content_type = body_of(
            self.destination.format, event, raw, product_version=self._version
        )
        attempt = 0
        while True:
            # A fresh timestamp per attempt: receivers may refuse old ones as replays.
            headers = signed_headers(self._secret, event.id, body, content_type, int(time.time()))
            failure = await self._client.post(body, headers)
            if failure is None:
                self._delivered.inc()
                return
            self._metrics.notifier_failed_attempts.labels(name, failure).inc()
            if attempt == 0 or attempt % 10 == 0:
                log.warning(
                    "notifier %s: event %s not delivered (%s, attempt %d), retrying",
                    name,
                    event.id,
                    failure,
                    attempt + 1,
                )
            await asyncio.sleep(self._backoff.delay(attempt))
            attempt += 1

    async def _commit(self, consumer: Consumer, done: dict[TopicPartition, int]) -> None:
        held = consumer.assignment()
        offsets = {tp: offset for tp, offset in done.items() if tp in held}
        if not offsets:
            return
        try:
            async with asyncio.timeout(COMMIT_ON_STOP_SECONDS):
                await consumer.commit(offsets)
        except (KafkaError, TimeoutError) as error:
            # Another member owns them now, or Kafka is away: those events are sent
            # again (same ids), never lost.
            log.warning(
                "notifier %s: committing delivered offsets failed (%s)",
                self.destination.name,
                type(error).__name__,
            )
