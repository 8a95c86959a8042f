"""Vulnerability context: CISA's Known Exploited Vulnerabilities and FIRST's EPSS.

Both are open data. `parse_kev` reads CISA's KEV JSON (`{"vulnerabilities":
[{"cveID", "dateAdded", "knownRansomwareCampaignUse", ...}]}`), `parse_epss`
FIRST's EPSS CSV (a `#model_version:...,score_date:...` comment line, then
`cve,epss,percentile`; gzip accepted). Both are lenient about what they do not
need and strict about what they do: a file without a single usable row is an
error, so a broken download never replaces a good copy.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import re
from dataclasses import dataclass
from datetime import date, datetime
from typing import Literal

Feed = Literal["kev", "epss"]
FEEDS: tuple[Feed, ...] = ("kev", "epss")


@dataclass(frozen=True, slots=True)
class FeedStatus:
    """How a feed's copy stands: when its last good copy loaded, and its last failure."""

    feed: str
    loaded_at: datetime | None
    count: int
    attempted_at: datetime | None
    error: str | None


CVE_ID = re.compile(r"^CVE-\d{4}-\d{4,}$")


class FeedError(ValueError):
    """A feed's content is not what it should be."""


@dataclass(frozen=True, slots=True)
class KevEntry:
    cve: str
    added: date | None
    ransomware: bool
    """CISA: known to be used in ransomware campaigns."""


@dataclass(frozen=True, slots=True)
class EpssEntry:
    cve: str
    epss: float
    """Probability of exploitation activity in the next 30 days (0-1)."""
    percentile: float


@dataclass(frozen=True, slots=True)
class VulnContext:
    """What the feeds say about one CVE."""

    kev: KevEntry | None = None
    epss: EpssEntry | None = None


def parse_kev(raw: bytes) -> list[KevEntry]:
    try:
        document = json.loads(_gunzipped(raw))
    except ValueError as error:
        raise FeedError(f"KEV catalog is not JSON: {error}") from None
    rows = document.get("vulnerabilities") if isinstance(document, dict) else None
    if not isinstance(rows, list):
        raise FeedError("KEV catalog has no 'vulnerabilities' list")
    entries = []
    for row in rows:
        if not isinstance(row, dict):
            continue
        cve = str(row.get("cveID", "")).strip().upper()
        if not CVE_ID.match(cve):
            continue
        added = None
        with contextlib.suppress(ValueError):
            added = date.fromisoformat(str(row.get("dateAdded", ""))[:10])
        ransomware = str(row.get("knownRansomwareCampaignUse", "")).strip().lower() == "known"
        entries.append(KevEntry(cve, added, ransomware))
    if not entries:
        raise FeedError("KEV catalog lists no CVE")
    return entries


def parse_epss(raw: bytes) -> list[EpssEntry]:
    try:
        text = _gunzipped(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise FeedError("EPSS file is not UTF-8 text") from None
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    if reader.fieldnames is None or not {"cve", "epss"} <= set(reader.fieldnames):
        raise FeedError("EPSS file has no 'cve,epss' header")
    entries = []
    for row in reader:
        cve = (row.get("cve") or "").strip().upper()
        try:
            epss = float(row.get("epss") or "")
            percentile = float(row.get("percentile") or "nan")
        except ValueError:
            continue
        if CVE_ID.match(cve) and 0.0 <= epss <= 1.0:
            entries.append(EpssEntry(cve, epss, percentile if percentile == percentile else 0.0))
    if not entries:
        raise FeedError("EPSS file lists no CVE")
    return entries


def _gunzipped(raw: bytes) -> bytes:
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
