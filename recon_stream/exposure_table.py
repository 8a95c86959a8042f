"""`recon-stream exposures`: an organization's exposure table, as the dashboard shows it."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from typing import Any

from recon_stream.adapters import exposure_store, mongo
from recon_stream.domain.risk import assess
from recon_stream.domain.scans import Service
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
)


def _time(value: Any) -> str:
    if not isinstance(value, datetime):
        return ""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return str(value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))


async def load_rows(settings: Settings, organization_id: str) -> list[dict[str, Any]]:
    client = mongo.connect(settings)
    try:
        store = exposure_store.ExposureStore(client[settings.mongodb_database])
        docs = await store.table(organization_id)
    finally:
        await client.close()
    rows = []
    for doc in docs:
        accepted = set(doc.get("accepted", []))
        for entry in doc.get("services", []):
            service = Service.model_validate(entry["service"])
            severity, _ = assess(service)
            rows.append(
                {
                    "ip": doc["ip"],
                    "transport": service.transport,
                    "port": service.port,
                    "service": service.module or "",
                    "product": service.product or "",
                    "version": service.version or "",
                    "severity": severity.value,
                    "vulns": list(service.vulns),
                    "last_queried": _time(doc.get("last_queried")),
                    "shodan_last_scanned": _time(service.shodan_timestamp),
                    "first_seen": _time(entry.get("first_seen")),
                    "candidate_agents": list(doc.get("candidate_agents", [])),
                    "accepted": f"{service.transport}/{service.port}" in accepted,
                    "sample": bool(doc.get("sample", False)),
                }
            )
    rows.sort(key=lambda r: (r["ip"], r["port"], r["transport"]))
    return rows


def render(rows: list[dict[str, Any]], output: str) -> str:
    if output == "json":
        return json.dumps(rows, indent=2) + "\n"
    if output == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS, "sample"], lineterminator="\n")
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
            "yes" if r["accepted"] else "no",
        ]
        for r in rows
    ]
    header = [
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
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *table, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*header), line.format(*("-" * w for w in widths))]
    out += [line.format(*row) for row in table]
    if any(r["sample"] for r in rows):
        out.append("(SAMPLE DATA: bundled demo results, not real Shodan answers)")
    return "\n".join(out) + "\n"
