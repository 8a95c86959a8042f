"""Changes to stored data that `recon-stream init` makes once, safe to run again.

- The history retention: `exposure_history` keeps entries for
  RECON_HISTORY_RETENTION_SECONDS through a TTL index on `time`; when the setting
  changes, the index is changed in place (`collMod`, which MongoDB's `readWrite` role
  does not grant: the init Job's user needs `dbAdmin` or a role with `collMod`).
- Hand-edited `accepted: ["tcp/3389", ...]` lists on snapshots (before acceptances
  had reasons) become acceptances.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from recon_stream.adapters.acceptances import Acceptances
from recon_stream.adapters.collections import HISTORY
from recon_stream.adapters.exposures import MongoSnapshots
from recon_stream.domain.acceptance import Acceptance

Document = dict[str, Any]
MIGRATED_REASON = "accepted before acceptances had reasons (migrated from the accepted list)"


async def migrate(db: AsyncDatabase[Document], history_retention: float) -> list[str]:
    """Every migration; returns the index names it made or changed."""
    names = [await set_history_retention(db, history_retention)]
    await migrate_accepted_lists(db)
    return names


async def set_history_retention(db: AsyncDatabase[Document], seconds: float) -> str:
    ttl = max(1, int(seconds))
    try:
        return await db[HISTORY].create_index("time", name="retention", expireAfterSeconds=ttl)
    except OperationFailure:
        # The retention changed since the index was made: change it in place.
        await db.command(
            {"collMod": HISTORY, "index": {"name": "retention", "expireAfterSeconds": ttl}}
        )
        return "retention"


async def migrate_accepted_lists(db: AsyncDatabase[Document]) -> int:
    """Turn the hand-edited `accepted: ["tcp/3389", ...]` lists into acceptances.

    Each becomes an acceptance of that port on that IP, without expiry, and the
    snapshot's services carry it, so no event announces a change that is none.
    Idempotent: a migrated document has no `accepted` field any more.
    """
    snapshots, acceptances = MongoSnapshots(db), Acceptances(db)
    migrated = 0
    for doc in await snapshots.with_accepted_lists():
        at = datetime.now(UTC)
        keys = {k for k in doc.get("accepted") or [] if isinstance(k, str) and "/" in k}
        services = doc.get("services", [])
        for text in sorted(keys):
            transport, _, port = text.partition("/")
            acceptance = Acceptance(
                doc["organization_id"],
                doc["ip"],
                transport,
                int(port),
                MIGRATED_REASON,
                "migration",
                at,
                None,
            )
            await acceptances.keep(acceptance)
            for entry in services:
                if f"{entry['transport']}/{entry['port']}" == text:
                    entry["acceptance"] = acceptance.info.model_dump(mode="python")
        await snapshots.drop_accepted_list(doc, services)
        migrated += 1
    return migrated
