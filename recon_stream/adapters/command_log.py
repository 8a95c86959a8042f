"""`applied_commands`: the outcome of each command by id, so a redelivery does nothing and
`--wait` can tell the operator what happened.

One document per command (`_id` = its id, or the digest of its content): `outcome`
(`applied`, `no_effect`, `rejected`), the DLQ `reason` and `detail` of a rejected one,
written after its effect is stored; kept 30 days (a TTL index), far beyond how long Kafka
could redeliver it.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from recon_stream.adapters.collections import APPLIED_COMMANDS
from recon_stream.domain.commands import CommandOutcome, RecordedOutcome

KEEP_SECONDS = 30 * 24 * 3600
MAX_DETAIL = 500


async def ensure_indexes(db: AsyncDatabase[dict[str, Any]]) -> list[str]:
    return [
        await db[APPLIED_COMMANDS].create_index(
            "applied_at", name="forget_after", expireAfterSeconds=KEEP_SECONDS
        )
    ]


class CommandLog:
    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self._collection: AsyncCollection[dict[str, Any]] = db[APPLIED_COMMANDS]

    async def applied(self, command_id: str) -> bool:
        """True once the command has an outcome (applied, no effect or rejected)."""
        return await self._collection.find_one({"_id": command_id}, {"_id": 1}) is not None

    async def mark(
        self,
        command_id: str,
        organization_id: str,
        command: str,
        outcome: CommandOutcome = CommandOutcome.APPLIED,
        reason: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Record the command's outcome (the first one recorded stays)."""
        # Applied twice after a crash: the same effect, already on record.
        with contextlib.suppress(DuplicateKeyError):
            await self._collection.insert_one(
                {
                    "_id": command_id,
                    "organization_id": organization_id,
                    "command": command,
                    "outcome": outcome.value,
                    "reason": reason,
                    "detail": detail[:MAX_DETAIL] if detail else None,
                    "applied_at": datetime.now(UTC),
                }
            )

    async def outcome(self, command_id: str) -> RecordedOutcome | None:
        """The command's outcome, once it has one (`recon-stream ... --wait`)."""
        doc = await self._collection.find_one({"_id": command_id})
        if doc is None:
            return None
        return RecordedOutcome(
            CommandOutcome(doc.get("outcome", CommandOutcome.APPLIED.value)),
            doc.get("reason"),
            doc.get("detail"),
        )
