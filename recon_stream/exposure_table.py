"""`recon-stream exposures`: an organization's exposure table, as the dashboard shows it."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

from recon_stream.adapters import mongo
from recon_stream.adapters.acceptances import Acceptances
from recon_stream.adapters.exposures import MongoSnapshots
from recon_stream.adapters.history import History
from recon_stream.domain.risk import assess
from recon_stream.domain.scans import Service
from recon_stream.policy import effective_policy
from recon_stream.settings import Settings

COLUMNS = (
    "ip",
    "transport",
    "port",
    "service",
    "product",
    "version",
    "severity",
    "vulns",
    "last_queried",
    "shodan_last_scanned",
    "first_seen",
    "candidate_agents",
    "accepted",
    "accepted_reason",
    "accepted_until",
    "stale",
    "verified",
    "verified_at",
)


def _time(value: Any) -> str:
    if not isinstance(value, datetime):
        return ""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return str(value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))


async def load_rows(
    settings: Settings,
    organization_id: str,
    *,
    severities: Collection[str] = (),
    accepted: bool | None = None,
) -> list[dict[str, Any]]:
    """The org's open exposures; only `severities` (when given), only accepted or
    unaccepted ones (when `accepted` is not None)."""
    client = mongo.connect(settings)
    try:
        docs = await MongoSnapshots(client[settings.mongodb_database]).table(organization_id)
    finally:
        await client.close()
    return _rows(settings, docs, severities, accepted)


async def load_all_rows(
    settings: Settings, *, severities: Collection[str] = (), accepted: bool | None = None
) -> list[dict[str, Any]]:
    """Every organization's open exposures (`exposures --all-orgs`), by organization,
    with the same filters as `load_rows`."""
    client = mongo.connect(settings)
    try:
        docs = await MongoSnapshots(client[settings.mongodb_database]).table_of_all()
    finally:
        await client.close()
    rows = _rows(settings, docs, severities, accepted)
    rows.sort(key=lambda r: r["organization_id"])  # stable: by IP, port within each
    return rows


def _rows(
    settings: Settings,
    docs: list[dict[str, Any]],
    severities: Collection[str],
    accepted: bool | None,
) -> list[dict[str, Any]]:
    policy = effective_policy(settings)
    rows = []
    for doc in docs:
        organization_id = doc["organization_id"]
        for entry in doc.get("services", []):
            service = Service.model_validate(entry["service"])
            # The severity stored with the exposure (snapshots older than that: assessed
            # under the policy in force).
            severity = entry.get("severity") or assess(service, policy, organization_id)[0].value
            acceptance = entry.get("acceptance")
            if severities and severity not in severities:
                continue
            if accepted is not None and (acceptance is not None) != accepted:
                continue
            rows.append(
                {
                    "organization_id": organization_id,
                    "ip": doc["ip"],
                    "transport": service.transport,
                    "port": service.port,
                    "service": service.module or "",
                    "product": service.product or "",
                    "version": service.version or "",
                    "severity": severity,
                    "vulns": list(service.vulns),
                    "last_queried": _time(doc.get("last_queried")),
                    "shodan_last_scanned": _time(service.shodan_timestamp),
                    "first_seen": _time(entry.get("first_seen")),
                    "candidate_agents": list(doc.get("candidate_agents", [])),
                    "stale": bool(entry.get("stale", False)),
                    "accepted": acceptance is not None,
                    "accepted_reason": (acceptance or {}).get("reason") or "",
                    "accepted_until": _time((acceptance or {}).get("expires_at")),
                    "verified": (entry.get("verification") or {}).get("state") or "",
                    "verified_at": _time((entry.get("verification") or {}).get("checked_at")),
                    "sample": bool(doc.get("sample", False)),
                }
            )
    rows.sort(key=lambda r: (r["ip"], r["port"], r["transport"]))
    return rows


def _accepted_cell(row: dict[str, Any]) -> str:
    if not row["accepted"]:
        return "no"
    until = f" until {row['accepted_until']}" if row["accepted_until"] else ""
    reason = row["accepted_reason"]
    reason = reason if len(reason) <= 40 else reason[:39] + "…"
    return f"yes{until}: {reason}"


def render(rows: list[dict[str, Any]], output: str, *, organizations: bool = False) -> str:
    """The table (`organizations`: with an ORGANIZATION column first, `--all-orgs`)."""
    if not organizations:
        rows = [{k: v for k, v in r.items() if k != "organization_id"} for r in rows]
    if output == "json":
        return json.dumps(rows, indent=2) + "\n"
    if output == "csv":
        buffer = io.StringIO()
        first = ["organization_id"] if organizations else []
        writer = csv.DictWriter(
            buffer, fieldnames=[*first, *COLUMNS, "sample"], lineterminator="\n"
        )
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    **row,
                    "vulns": " ".join(row["vulns"]),
                    "candidate_agents": " ".join(row["candidate_agents"]),
                }
            )
        return buffer.getvalue()
    if not rows:
        return "no exposures\n"
    table = [
        [
            *([r["organization_id"]] if organizations else []),
            r["ip"],
            r["transport"],
            str(r["port"]),
            r["service"],
            " ".join(x for x in (r["product"], r["version"]) if x),
            r["severity"],
            str(len(r["vulns"])),
            r["last_queried"],
            r["shodan_last_scanned"],
            ", ".join(r["candidate_agents"][:3]) + ("…" if len(r["candidate_agents"]) > 3 else ""),
            _accepted_cell(r),
            "stale" if r["stale"] else "",
            f"{r['verified']} {r['verified_at']}" if r["verified"] else "",
        ]
        for r in rows
    ]
    header = [
        *(["ORGANIZATION"] if organizations else []),
        "IP",
        "TRANSPORT",
        "PORT",
        "SERVICE",
        "PRODUCT",
        "SEVERITY",
        "CVES",
        "LAST QUERIED",
        "LAST SHODAN SCAN",
        "CANDIDATE AGENTS",
        "ACCEPTED",
        "STALE",
        "VERIFIED",
    ]
    out = _aligned(header, table)
    if any(r["sample"] for r in rows):
        out += "(SAMPLE DATA: bundled demo results, not real Shodan answers)\n"
    return out


HISTORY_COLUMNS = (
    "time",
    "ip",
    "transport",
    "port",
    "change",
    "reason",
    "changed_fields",
    "severity",
    "accepted",
    "requested_by",
    "acceptance_reason",
    "service",
    "scan",
    "verification",
    "event_id",
)


async def load_history(
    settings: Settings,
    organization_id: str,
    *,
    ip: str | None = None,
    port: int | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """The org's history entries (newest first), for `recon-stream history`."""
    client = mongo.connect(settings)
    try:
        history = History(client[settings.mongodb_database])
        docs = await history.entries(organization_id, ip=ip, port=port, limit=limit)
    finally:
        await client.close()
    return [
        {
            "time": _time(doc.get("time")),
            "ip": doc["ip"],
            "transport": doc["transport"],
            "port": doc["port"],
            "change": doc["change"],
            "reason": doc.get("reason") or "",
            "changed_fields": list(doc.get("changed_fields", [])),
            "severity": doc.get("severity", ""),
            "accepted": bool(doc.get("accepted", False)),
            "requested_by": doc.get("requested_by") or "",
            "acceptance_reason": doc.get("acceptance_reason") or "",
            "service": (doc.get("service") or {}).get("name") or "",
            "scan": _scan_cell(doc.get("scan")),
            "verification": _verification_cell(doc.get("verification")),
            "event_id": doc["event_id"],
        }
        for doc in docs
    ]


def _scan_cell(scan: Any) -> str:
    """An on-demand scan as the history shows it: its status and Shodan's id."""
    if not isinstance(scan, dict):
        return ""
    return f"{scan.get('status', '')} {scan.get('id', '')}".strip()


def _verification_cell(verification: Any) -> str:
    if not isinstance(verification, dict):
        return ""
    return f"{verification.get('state', '')} {_time(verification.get('checked_at'))}".strip()


def render_history(entries: list[dict[str, Any]], output: str) -> str:
    if output == "json":
        return json.dumps(entries, indent=2) + "\n"
    if output == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for entry in entries:
            writer.writerow({**entry, "changed_fields": " ".join(entry["changed_fields"])})
        return buffer.getvalue()
    if not entries:
        return "no history\n"
    header = [
        "TIME",
        "IP",
        "PORT",
        "CHANGE",
        "REASON",
        "FIELDS",
        "SEVERITY",
        "ACCEPTED",
        "BY",
        "WHY",
        "SCAN",
        "VERIFIED",
        "EVENT",
    ]
    table = [
        [
            e["time"],
            e["ip"],
            f"{e['transport']}/{e['port']}",
            e["change"],
            e["reason"],
            ",".join(e["changed_fields"]),
            e["severity"],
            "yes" if e["accepted"] else "no",
            e["requested_by"],
            e["acceptance_reason"],
            e["scan"],
            e["verification"],
            e["event_id"],
        ]
        for e in entries
    ]
    return _aligned(header, table)


ACCEPTANCE_COLUMNS = (
    "ip",
    "transport",
    "port",
    "reason",
    "requested_by",
    "accepted_at",
    "expires_at",
)


async def load_acceptances(settings: Settings, organization_id: str) -> list[dict[str, Any]]:
    """The org's acceptances in force now (org-wide ones, for ports not open, included)."""
    client = mongo.connect(settings)
    try:
        kept = await Acceptances(client[settings.mongodb_database]).acceptances(organization_id)
    finally:
        await client.close()
    now = datetime.now(UTC)
    rows = [
        {
            "ip": a.ip or "*",
            "transport": a.transport,
            "port": a.port,
            "reason": a.reason,
            "requested_by": a.requested_by,
            "accepted_at": _time(a.accepted_at),
            "expires_at": _time(a.expires_at) if a.expires_at else "",
        }
        for a in kept
        if a.active(now)
    ]
    return sorted(rows, key=lambda r: (r["ip"] != "*", r["ip"], r["port"], r["transport"]))


def render_acceptances(rows: list[dict[str, Any]], output: str) -> str:
    if output == "json":
        return json.dumps(rows, indent=2) + "\n"
    if output == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=ACCEPTANCE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    if not rows:
        return "no acceptances in force\n"
    header = ["IP", "PORT", "REASON", "BY", "ACCEPTED AT", "EXPIRES"]
    table = [
        [
            r["ip"] if r["ip"] != "*" else "* (every IP)",
            f"{r['transport']}/{r['port']}",
            r["reason"],
            r["requested_by"],
            r["accepted_at"],
            r["expires_at"] or "never",
        ]
        for r in rows
    ]
    return _aligned(header, table)


def _aligned(header: list[str], table: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *table, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*header), line.format(*("-" * w for w in widths))]
    out += [line.format(*row) for row in table]
    return "\n".join(out) + "\n"


IP_COLUMNS = (
    "ip",
    "state",
    "reason",
    "agents",
    "sites",
    "first_seen",
    "last_seen",
    "last_lookup",
    "next_lookup",
    "last_error",
)


async def load_ips(settings: Settings, organization_id: str) -> list[dict[str, Any]]:
    """Every IP the organization's agents reported, whatever its state, with its
    lookups: the last one (`ip_scans`), the next one due (a queued request: now or its
    retry time; else the rescan time; none for a pair that is not active) and the last
    error of a lookup still queued (`scan_queue`)."""
    from recon_stream.adapters.ip_scans import IpScans
    from recon_stream.adapters.org_ips import MongoOrgIps
    from recon_stream.adapters.scan_queue import ScanQueue

    client = mongo.connect(settings)
    try:
        db = client[settings.mongodb_database]
        pairs = await MongoOrgIps(db).inventory(organization_id)
        ips = [p["ip"] for p in pairs]
        lookups = await IpScans(db, settings.rescan_interval_seconds).lookups(ips)
        queued = await ScanQueue(db).items_of(ips)
    finally:
        await client.close()
    rows = []
    for pair in pairs:
        ip, state = pair["ip"], pair.get("status") or "active"
        lookup = lookups.get(ip, {})
        item = queued.get(ip)
        if state != "active":
            due: Any = None
        elif item is not None:
            due = item.get("not_before") or item.get("requested_at")
        else:
            due = lookup.get("next_scan_at")
        error = (item or {}).get("last_error") or {}
        rows.append(
            {
                "ip": ip,
                "state": state,
                "reason": pair.get("status_reason") or "",
                "agents": [a["agent_id"] for a in pair.get("agents", [])],
                "sites": list(pair.get("site_ids", [])),
                "first_seen": _time(pair.get("first_seen")),
                "last_seen": _time(pair.get("last_seen")),
                "last_lookup": _time(lookup.get("last_queried")),
                "next_lookup": _time(due) if state == "active" else "",
                "last_error": error.get("message") or "",
            }
        )
    return rows


def render_ips(rows: list[dict[str, Any]], output: str) -> str:
    if output == "json":
        return json.dumps(rows, indent=2) + "\n"
    if output == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(IP_COLUMNS), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {**row, "agents": " ".join(row["agents"]), "sites": " ".join(row["sites"])}
            )
        return buffer.getvalue()
    if not rows:
        return "no IPs reported\n"
    table = [
        [
            r["ip"],
            r["state"],
            r["reason"],
            ", ".join(r["agents"][:3]) + ("…" if len(r["agents"]) > 3 else ""),
            ", ".join(r["sites"][:3]) + ("…" if len(r["sites"]) > 3 else ""),
            r["first_seen"],
            r["last_seen"],
            r["last_lookup"] or "never",
            r["next_lookup"] or "-",
            r["last_error"][:60],
        ]
        for r in rows
    ]
    header = [
        "IP",
        "STATE",
        "REASON",
        "AGENTS",
        "SITES",
        "FIRST SEEN",
        "LAST SEEN",
        "LAST LOOKUP",
        "NEXT LOOKUP",
        "LAST ERROR",
    ]
    return _aligned(header, table)
