"""What every consuming stage shares: the raw Kafka record it reads, a message it
rejects, and the dead-letter topic it sends that message to.

A rejected message goes to `RECON_TOPIC_DLQ` unchanged (key, value and headers), with
`x-recon-dlq-reason` (a `RejectReason`), `x-recon-dlq-detail` and where it came from
in headers; its offset is then committed like any other. See `domain.messages` for
the reasons.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from recon_stream.domain.messages import InvalidMessage, RejectReason


class RawRecord(Protocol):
    """The parts of a Kafka record we read (aiokafka's `ConsumerRecord` has them)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


@dataclass(frozen=True, slots=True)
class Rejected:
    """A consumed message that goes to the dead-letter topic, and why."""

    record: RawRecord
    reason: RejectReason
    detail: str

    @classmethod
    def of(cls, record: RawRecord, error: InvalidMessage) -> Rejected:
        return cls(record, error.reason, error.detail)


class DeadLetterSink(Protocol):
    async def publish(self, rejected: Sequence[Rejected]) -> None: ...
