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
connection, a redirect) is tried again with backoff and jitter until it is taken.
An answer of 400, 404, 410, 413 or 422 is the receiver's final word on that event:
it is parked on the notify DLQ (`RECON_TOPIC_NOTIFY_DLQ`, byte for byte, headers
`destination`, `status`, `reason`, `event_id`) and delivery goes on with the next;
the offset moves past it only once Kafka has it. Nothing else is skipped but what
the destination's filters leave out. While it waits, the consumer's partitions are
paused and still polled, so the group keeps it.

`start_at: latest` (the default): a partition whose group has no committed offset
(a destination never delivered to) starts at the end of the log, and that position
is committed at once, so a restart before the first event still starts there.
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
    Failure,
    HeaderFromEnv,
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
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


class NotifyFileError(ValueError):
    """The destinations file cannot be used (the message never holds a secret)."""


def load_destinations(
    path: Path, environ: Mapping[str, str] = os.environ
) -> tuple[Destination, ...]:
    """The destinations of a notify file, each `secret_env` read into `secret` and each
    `headers` value given as `{env: ...}` read from the environment."""
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
        headers: dict[str, SecretStr | HeaderFromEnv] = {}
        for header, given in destination.headers.items():
            if isinstance(given, HeaderFromEnv):
                value = environ.get(given.env, "")
                if not value:
                    raise NotifyFileError(
                        f"destination {destination.name}: headers.{header}: {given.env} is not set"
                    )
                given = SecretStr(value)
            headers[header] = given
        destination = destination.model_copy(update={"headers": headers})
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
    async def seek_to_end(self, *partitions: TopicPartition) -> None: ...
    async def position(self, partition: TopicPartition) -> int: ...
    async def committed(self, partition: TopicPartition) -> int | None: ...
    async def commit(self, offsets: dict[TopicPartition, int]) -> None: ...


class Poster(Protocol):
    async def post(self, body: bytes, headers: dict[str, str]) -> Failure | None: ...


class Parking(Protocol):
    """The notify DLQ: where an event a destination refuses for good is kept."""

    async def park(self, value: bytes, key: bytes | None, headers: dict[str, str]) -> None: ...


class DestinationNotifier:
    """Delivers the exposure events to one destination, in order per partition."""

    def __init__(
        self,
        destination: Destination,
        consumer: Callable[[], Consumer],
        client: Poster,
        parking: Parking,
        metrics: Metrics,
        backoff: Backoff,
        *,
        batch: int,
        product_version: str,
    ) -> None:
        assert destination.secret is not None  # load_destinations resolved secret_env
        self.destination = destination
        self._secret = destination.secret.get_secret_value().encode()
        self._headers = destination.header_values()
        # What a receiver's answer must not carry into the DLQ if it echoes a request back.
        self._secrets = [v for v in (*self._headers.values(), self._secret.decode()) if v]
        self._new_consumer = consumer
        self._client = client
        self._parking = parking
        self._metrics = metrics
        self._backoff = backoff
        self._batch = batch
        self._version = product_version
        self._waiting_since: dict[TopicPartition, float] = {}
        self._positioned: set[TopicPartition] = set()
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
                try:
                    if self.destination.start_at == "latest":
                        batch = await self._start_new_partitions_at_end(consumer, batch)
                    if not batch:
                        continue
                    await self._deliver(consumer, batch)
                except Exception:
                    # A bug, not a receiver's refusal (those are retried inside): the
                    # undelivered rest of the batch is read again after a pause.
                    log.exception("notifier %s: delivering a batch failed", self.destination.name)
                    await asyncio.sleep(self._backoff.maximum / 10)
        finally:
            await consumer.stop()

    async def _start_new_partitions_at_end(
        self, consumer: Consumer, batch: dict[TopicPartition, list[Record]]
    ) -> dict[TopicPartition, list[Record]]:
        """`start_at: latest`: each partition newly assigned that its group has never
        committed (read from the earliest offset, as every group starts) moves to the end
        of its log, and that position is committed before anything is sent; what was read
        of it is dropped. Partitions with a committed offset keep it."""
        held = consumer.assignment()
        self._positioned &= held
        new = held - self._positioned
        if not new:
            return batch
        try:
            for tp in sorted(new):
                if await consumer.committed(tp) is None:
                    await consumer.seek_to_end(tp)
                    position = await consumer.position(tp)
                    await consumer.commit({tp: position})
                    batch.pop(tp, None)
                    log.info(
                        "notifier %s: new, starting partition %d at its end (offset %d)",
                        self.destination.name,
                        tp.partition,
                        position,
                    )
                self._positioned.add(tp)
        except BaseException:
            # Read but neither sent nor skipped: read again, from where they were.
            for tp, records in batch.items():
                if tp in consumer.assignment():
                    consumer.seek(tp, records[0].offset)
            raise
        return batch

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
        # Parking goes on in the background while the next events are sent (a Kafka
        # write each); the partition's offset moves past a parked event only once Kafka
        # has it, so a park not finished when this ends holds the commit at that event.
        parks: list[tuple[Record, asyncio.Task[None]]] = []
        try:
            for record in records:
                self._waiting_since[tp] = record.timestamp / 1000
                park = await self._deliver_one(record)
                if park is not None:
                    parks.append((record, park))
                done[tp] = record.offset + 1
            for record, park in parks:
                # Still undelivered (not yet in the DLQ) for the stuck-destination gauge.
                self._waiting_since[tp] = record.timestamp / 1000
                await park
            self._waiting_since.pop(tp, None)
        finally:
            unparked = [
                record.offset
                for record, park in parks
                if not park.done() or park.cancelled() or park.exception() is not None
            ]
            for _, park in parks:
                park.cancel()
            if unparked:
                done[tp] = min(done.get(tp, unparked[0]), min(unparked))

    async def _deliver_one(self, record: Record) -> asyncio.Task[None] | None:
        """Send one event until it is taken (None) or refused for good (its parking)."""
        name = self.destination.name
        raw = record.value or b""
        try:
            event = ExposureEvent.model_validate_json(raw)
        except ValidationError:
            log.error("notifier %s: offset %d is not an exposure event", name, record.offset)
            self._metrics.notifier_filtered.labels(name, "invalid").inc()
            return None
        if not wants(self.destination, event):
            self._metrics.notifier_filtered.labels(name, "filter").inc()
            return None
        body, content_type = body_of(
            self.destination.format, event, raw, product_version=self._version
        )
        attempt = 0
        while True:
            # A fresh timestamp per attempt: receivers may refuse old ones as replays.
            headers = signed_headers(
                self._secret, event.id, body, content_type, int(time.time()), self._headers
            )
            failure = await self._client.post(body, headers)
            if failure is None:
                self._delivered.inc()
                return None
            if failure.permanent:
                return asyncio.create_task(self._park(record, event.id, failure))
            self._metrics.notifier_failed_attempts.labels(name, failure.reason).inc()
            if attempt == 0 or attempt % 10 == 0:
                log.warning(
                    "notifier %s: event %s not delivered (%s, attempt %d), retrying",
                    name,
                    event.id,
                    # Not the answer's body: a receiver may echo the request's headers.
                    f"{failure.reason} {failure.status}" if failure.status else failure.reason,
                    attempt + 1,
                )
            await asyncio.sleep(self._backoff.delay(attempt))
            attempt += 1

    async def _park(self, record: Record, event_id: str, failure: Failure) -> None:
        """Put the event on the notify DLQ, retrying until Kafka has it: the offset only
        moves past it once it is there."""
        name = self.destination.name
        reason = failure.detail
        for secret in self._secrets:
            reason = reason.replace(secret, "***")
        headers = {
            "destination": name,
            "status": str(failure.status),
            "reason": reason[:1024],
            "event_id": event_id,
        }
        attempt = 0
        while True:
            try:
                await self._parking.park(record.value or b"", record.key, headers)
                break
            except Exception as error:
                log.warning(
                    "notifier %s: parking event %s failed (%s), retrying",
                    name,
                    event_id,
                    type(error).__name__,
                )
                await asyncio.sleep(self._backoff.delay(attempt))
                attempt += 1
        self._metrics.notifier_parked.labels(name, str(failure.status)).inc()
        log.warning(
            "notifier %s: event %s refused for good (HTTP %s), parked on the notify DLQ",
            name,
            event_id,
            failure.status,
        )

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
