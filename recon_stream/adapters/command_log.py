"""`applied_commands`: the ids of commands already applied, so a redelivery does nothing.

One document per command (`_id` = its id, or the digest of its content), written
after its effect is stored; kept 30 days (a TTL index), far beyond how long Kafka
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

KEEP_SECONDS = 30 * 24 * 3600


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
        return await self._collection.find_one({"_id": command_id}, {"_id": 1}) is not None

    async def mark(self, command_id: str, organization_id: str, command: str) -> None:
        # Applied twice after a crash: the same effect, already on record.
        with contextlib.suppress(DuplicateKeyError):
            await self._collection.insert_one(
                {
                    "_id": command_id,
                    "organization_id": organization_id,
                    "command": command,
                    "applied_at": datetime.now(UTC),
                }
            )
