"""The vulnerability feeds in MongoDB: CISA KEV and FIRST EPSS, per CVE (`vuln_context`).

`vuln_context`: `{_id: "CVE-…", kev: {added, ransomware} | null, epss: {epss,
percentile} | null, rerate: true?}`. `vuln_feeds`: one status document per feed: when
its last good copy was loaded, how many CVEs it had, and the last failure.

`refresh` fetches a feed (an http(s) URL or a file path), parses it (a file without
a usable row is refused), compares it with the copy stored, and writes only the CVEs
that differ. A CVE whose KEV listing or EPSS score changed (a first load changes
every CVE it lists) is marked `rerate: true` in the same write as its new value, so
the mark cannot be lost between the two: the feed refresher re-assesses the open
exposures carrying marked CVEs, then `unmark`s them. A crash in between leaves them
marked, and the next leader does it again (a re-assessment is idempotent).

A feed that cannot be fetched or parsed keeps its last good copy; the failure is
recorded and the caller tries again later. Nothing here blocks scanning: lookups
read whatever copy there is, or none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
from pymongo import ASCENDING, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase

from recon_stream.adapters.collections import VULN_CONTEXT, VULN_FEEDS
from recon_stream.domain.vulns import (
    EpssEntry,
    Feed,
    FeedError,
    FeedStatus,
    KevEntry,
    VulnContext,
    parse_epss,
    parse_kev,
)

_CHUNK = 5000


async def ensure_indexes(db: AsyncDatabase[dict[str, Any]]) -> list[str]:
    return [
        await db[VULN_CONTEXT].create_index([("kev", ASCENDING)], name="kev", sparse=True),
        await db[VULN_CONTEXT].create_index([("rerate", ASCENDING)], name="rerate", sparse=True),
    ]


class VulnFeeds:
    def __init__(self, db: AsyncDatabase[dict[str, Any]], timeout: float = 60.0) -> None:
        self._context = db[VULN_CONTEXT]
        self._status = db[VULN_FEEDS]
        self._timeout = timeout

    async def lookup(self, cves: Iterable[str]) -> dict[str, VulnContext]:
        """What the feeds say about `cves` (absent: nothing known)."""
        wanted = sorted(set(cves))
        if not wanted:
            return {}
        found = {}
        async for doc in self._context.find({"_id": {"$in": wanted}}):
            kev, epss = doc.get("kev"), doc.get("epss")
            found[doc["_id"]] = VulnContext(
                kev=KevEntry(doc["_id"], _date(kev.get("added")), bool(kev.get("ransomware")))
                if kev
                else None,
                epss=EpssEntry(doc["_id"], float(epss["epss"]), float(epss["percentile"]))
                if epss
                else None,
            )
        return found

    async def status(self, feed: Feed) -> FeedStatus:
        doc = await self._status.find_one({"_id": feed}) or {}
        return FeedStatus(
            feed,
            _aware(doc.get("loaded_at")),
            int(doc.get("count", 0)),
            _aware(doc.get("attempted_at")),
            doc.get("error"),
        )

    async def refresh(self, feed: Feed, source: str) -> int:
        """Fetch, parse and store `feed` from `source`; returns how many CVEs it lists.

        On failure the last good copy stays, the error is recorded, and it is raised
        as `FeedError`.
        """
        now = datetime.now(UTC)
        try:
            raw = await self._fetch(source)
            entries = parse_kev(raw) if feed == "kev" else parse_epss(raw)
        except (FeedError, OSError, httpx.HTTPError) as error:
            message = _describe(error)
            await self._status.update_one(
                {"_id": feed},
                {"$set": {"attempted_at": now, "error": message}},
                upsert=True,
            )
            raise FeedError(f"{feed} feed: {message}") from None
        if feed == "kev":
            await self._store_kev([e for e in entries if isinstance(e, KevEntry)])
        else:
            await self._store_epss([e for e in entries if isinstance(e, EpssEntry)])
        await self._status.update_one(
            {"_id": feed},
            {
                "$set": {
                    "loaded_at": now,
                    "attempted_at": now,
                    "count": len(entries),
                    "error": None,
                    "source": _source_label(source),
                }
            },
            upsert=True,
        )
        return len(entries)

    async def _fetch(self, source: str) -> bytes:
        if source.startswith(("http://", "https://")):
            async with httpx.AsyncClient(timeout=self._timeout, follow_redirects=True) as client:
                response = await client.get(source)
                response.raise_for_status()
                return response.content
        return await asyncio.to_thread(_read_file, source)

    async def marked(self, limit: int) -> list[str]:
        """Up to `limit` CVEs whose change is not re-assessed yet, sorted (no sort in the
        query: after a first EPSS load every CVE is marked, and the `rerate` index alone
        serves the query)."""
        cursor = self._context.find({"rerate": True}, {"_id": 1}, limit=limit)
        return sorted([doc["_id"] async for doc in cursor])

    async def unmark(self, cves: Iterable[str]) -> None:
        """The exposures carrying `cves` were re-assessed."""
        done = sorted(set(cves))
        for start in range(0, len(done), _CHUNK):
            await self._context.update_many(
                {"_id": {"$in": done[start : start + _CHUNK]}}, {"$unset": {"rerate": ""}}
            )

    async def _stored(self, part: str) -> dict[str, Any]:
        """The stored copy of one feed's part of `vuln_context`, by CVE."""
        cursor = self._context.find({part: {"$ne": None}}, {part: 1})
        return {doc["_id"]: doc[part] async for doc in cursor}

    async def _store_kev(self, entries: list[KevEntry]) -> None:
        stored = await self._stored("kev")
        ops = []
        for e in entries:
            value = {"added": e.added.isoformat() if e.added else None, "ransomware": e.ransomware}
            old = stored.pop(e.cve, None)
            if old == value:
                continue
            fields: dict[str, Any] = {"kev": value}
            if old is None:  # newly known exploited: severities may rise
                fields["rerate"] = True
            ops.append(UpdateOne({"_id": e.cve}, {"$set": fields}, upsert=True))
        # Left in `stored`: removed from the catalog (rare, but CISA has done it), no
        # longer known exploited.
        ops.extend(
            UpdateOne({"_id": cve}, {"$set": {"kev": None, "rerate": True}}) for cve in stored
        )
        await self._write(ops)

    async def _store_epss(self, entries: list[EpssEntry]) -> None:
        stored = await self._stored("epss")
        ops = []
        for e in entries:
            value = {"epss": e.epss, "percentile": e.percentile}
            old = stored.get(e.cve)
            if old == value:
                continue
            fields: dict[str, Any] = {"epss": value}
            # Only the score enters the assessment; a new percentile alone changes no severity.
            if old is None or old.get("epss") != e.epss:
                fields["rerate"] = True
            ops.append(UpdateOne({"_id": e.cve}, {"$set": fields}, upsert=True))
        await self._write(ops)

    async def _write(self, ops: list[UpdateOne]) -> None:
        for start in range(0, len(ops), _CHUNK):
            await self._context.bulk_write(ops[start : start + _CHUNK], ordered=False)


def _read_file(source: str) -> bytes:
    return Path(source).expanduser().read_bytes()


def _describe(error: BaseException) -> str:
    if isinstance(error, httpx.HTTPStatusError):
        return f"HTTP {error.response.status_code}"
    if isinstance(error, httpx.HTTPError):
        return f"unreachable ({type(error).__name__})"
    if isinstance(error, OSError):
        return f"cannot read the file ({error.strerror or type(error).__name__})"
    return str(error)


def _source_label(source: str) -> str:
    # A URL may carry a token in its query; keep only where it points.
    return httpx.URL(source).copy_with(query=None).__str__() if "://" in source else source


def _date(value: Any) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except (TypeError, ValueError):
        return None


def _aware(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
