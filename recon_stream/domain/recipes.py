"""Example payloads and SIEM recipes generated from the code (docs/integrations.md).

`example_events` builds one exposure event of each kind of change with the same
functions the scanner uses (opened; changed by service; changed by severity; changed
by acceptance; closed), so the examples in docs/examples/ are what the topics carry.
`sentinel_dcr` turns the exposure event schema into a Microsoft Sentinel data
collection rule (a stream of CloudEvents, a transformation to a flat custom table) and
`sentinel_table` into that table's columns; `elastic_index_template` maps the OCSF
findings' fields for Elasticsearch. `render` gives every file by name; a test holds
docs/examples/ to it.

    python -m recon_stream.domain.recipes docs/examples   # regenerate
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from recon_stream.domain.acceptance import AcceptanceInfo
from recon_stream.domain.exposures import (
    Assessor,
    ExposureEvent,
    ExposureKey,
    acceptance_changes,
    build_events,
    diff,
    severity_changes,
)
from recon_stream.domain.ocsf import to_finding
from recon_stream.domain.policy_file import DEFAULT_POLICY
from recon_stream.domain.risk import Severity
from recon_stream.domain.scans import HostScan, Service

T0 = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
ORG = "acme"
IP = "203.0.113.10"
AGENTS = ("agent-7f3a", "agent-91c2")
SITES = ("site-hq",)
SENTINEL_TABLE = "ReconExposures_CL"
SENTINEL_STREAM = "Custom-ReconExposures"
CHANGES = (
    "opened",
    "changed-service",
    "changed-severity",
    "changed-acceptance",
    "closed",
)

_RDP = Service(
    port=3389,
    module="rdp",
    product="Remote Desktop Protocol",
    version="10.0.17763",
    cpe=("cpe:2.3:o:microsoft:windows_server_2019:-:*:*:*:*:*:*:*",),
    vulns=("CVE-2019-0708",),
    max_cvss=9.8,
    cvss=(("CVE-2019-0708", 9.8),),
    shodan_timestamp=datetime(2026, 11, 1, 22, 14, 3),
)
_RDP_UPDATED = _RDP.model_copy(update={"version": "10.0.20348", "vulns": (), "cvss": ()})
_ACCEPTANCE = AcceptanceInfo(
    reason="jump host behind MFA gateway",
    requested_by="tech@msp.example",
    accepted_at=T0 + timedelta(days=2),
    expires_at=T0 + timedelta(days=92),
)


def _scan(*services: Service, at: datetime) -> HostScan:
    return HostScan(
        ip=IP, provider="api", queried_at=at, services=services, hostnames=("rdp.acme.example",)
    )


def _events(
    changes: Any,
    scan: HostScan,
    version: int,
    acceptance: AcceptanceInfo | None = None,
    occurred_at: datetime | None = None,
) -> ExposureEvent:
    (event,) = build_events(
        ORG,
        IP,
        changes,
        scan,
        version=version,
        candidate_agents=AGENTS,
        site_ids=SITES,
        acceptance_by_key={_RDP.key: acceptance},
        first_seen_by_key={_RDP.key: T0},
        occurred_at=occurred_at,
        assessor=Assessor(policy=DEFAULT_POLICY),
    )
    return event


def example_events() -> dict[str, ExposureEvent]:
    """One event of each kind of change to an RDP exposure, in the order of its life."""
    first = _scan(_RDP, at=T0)
    updated = _scan(_RDP_UPDATED, at=T0 + timedelta(days=1))
    first_seen: dict[ExposureKey, Service] = {_RDP.key: _RDP}
    before: dict[ExposureKey, Service] = {_RDP.key: _RDP_UPDATED}
    at = T0 + timedelta(days=2)
    accepted_changes = acceptance_changes([], before, {_RDP.key: None}, {_RDP.key: _ACCEPTANCE}, at)
    rated = severity_changes([], before, {_RDP.key: Severity.HIGH}, {_RDP.key: Severity.CRITICAL})
    gone = _scan(at=T0 + timedelta(days=5))
    return {
        "opened": _events(diff({}, first), first, 1),
        "changed-service": _events(diff(first_seen, updated), updated, 2),
        "changed-severity": _events(rated, _scan(_RDP_UPDATED, at=at - timedelta(hours=1)), 3),
        "changed-acceptance": _events(
            accepted_changes, _scan(_RDP_UPDATED, at=at), 4, _ACCEPTANCE, occurred_at=at
        ),
        "closed": _events(diff(before, gone), gone, 5, _ACCEPTANCE),
    }


# --- Microsoft Sentinel (Logs Ingestion API) ---------------------------------------

_KQL_CASTS = {
    "string": "tostring",
    "int": "toint",
    "long": "tolong",
    "real": "toreal",
    "boolean": "tobool",
    "datetime": "todatetime",
    "dynamic": "todynamic",
}


def _resolve(schema: Mapping[str, Any], node: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return _resolve(schema, schema["$defs"][ref.removeprefix("#/$defs/")])
    return node


def _log_analytics_type(schema: Mapping[str, Any], node: Mapping[str, Any]) -> str:
    """The Log Analytics column type of a JSON Schema property (nullable unions unwrapped)."""
    node = _resolve(schema, node)
    if node.get("type") == "string":  # e.g. an IP: anyOf formats under one type
        return "datetime" if node.get("format") == "date-time" else "string"
    options = [_resolve(schema, o) for o in node.get("anyOf", [node])]
    options = [o for o in options if o.get("type") != "null"]
    if len(options) > 1 and all(o.get("type") == "string" for o in options):
        options = [{"type": "string"}]  # e.g. an IPv4 or IPv6 address
    if len(options) != 1:
        return "dynamic"
    option = options[0]
    kind = option.get("type")
    if kind == "string" and option.get("format") == "date-time":
        return "datetime"
    if kind == "string" or "enum" in option or "const" in option:
        return "string"
    return {"integer": "long", "number": "real", "boolean": "boolean"}.get(str(kind), "dynamic")


def _data_properties(event_schema: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    data = _resolve(event_schema, event_schema["properties"]["data"])
    return dict(data["properties"])


def sentinel_table(event_schema: Mapping[str, Any]) -> list[dict[str, str]]:
    """The custom table's columns: TimeGenerated, the envelope, every `data` field."""
    columns = [
        {"name": "TimeGenerated", "type": "datetime"},
        {"name": "EventId", "type": "string"},
        {"name": "EventType", "type": "string"},
        {"name": "EventSource", "type": "string"},
        {"name": "Subject", "type": "string"},
    ]
    for name, node in _data_properties(event_schema).items():
        columns.append({"name": name, "type": _log_analytics_type(event_schema, node)})
    return columns


def sentinel_dcr(event_schema: Mapping[str, Any]) -> dict[str, Any]:
    """A data collection rule (ARM resource body): the CloudEvents as they are on Kafka
    in, one flat row per event out (`TimeGenerated` = the event's `time`)."""
    envelope = [
        {"name": name, "type": "datetime" if name == "time" else "string"}
        for name in ("specversion", "id", "source", "type", "subject", "time", "datacontenttype")
    ]
    projections = [
        "TimeGenerated = todatetime(['time'])",
        "EventId = tostring(id)",
        "EventType = tostring(type)",
        "EventSource = tostring(source)",
        "Subject = tostring(subject)",
    ]
    for column in sentinel_table(event_schema)[5:]:
        cast = _KQL_CASTS[column["type"]]
        projections.append(f"{column['name']} = {cast}(data.{column['name']})")
    transform = "source | project " + ", ".join(projections)
    return {
        "location": "<region>",
        "kind": "Direct",
        "properties": {
            "dataCollectionEndpointId": "<data collection endpoint resource id>",
            "streamDeclarations": {
                SENTINEL_STREAM: {"columns": [*envelope, {"name": "data", "type": "dynamic"}]}
            },
            "destinations": {
                "logAnalytics": [
                    {"workspaceResourceId": "<workspace resource id>", "name": "workspace"}
                ]
            },
            "dataFlows": [
                {
                    "streams": [SENTINEL_STREAM],
                    "destinations": ["workspace"],
                    "transformKql": transform,
                    "outputStream": f"Custom-{SENTINEL_TABLE}",
                }
            ],
        },
    }


def sentinel_table_body(event_schema: Mapping[str, Any]) -> dict[str, Any]:
    """The body of `PUT .../workspaces/<ws>/tables/ReconExposures_CL` (Tables API)."""
    return {
        "properties": {
            "schema": {"name": SENTINEL_TABLE, "columns": sentinel_table(event_schema)},
            "retentionInDays": 90,
        }
    }


# --- Elasticsearch ---------------------------------------------------------------

_TEXT_FIELDS = frozenset({"message", "desc", "title", "risk_details", "status_detail"})
_IP_FIELDS = frozenset({"ip"})


def _mapping_of(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {"properties": {k: _mapping_of(k, v) for k, v in sorted(value.items())}}
    if isinstance(value, list):
        items = [v for v in value if v is not None]
        if items and all(isinstance(v, dict) for v in items):
            merged: dict[str, Any] = {}
            for item in items:
                merged.update(item)
            return _mapping_of(name, merged)
        return _mapping_of(name, items[0]) if items else {"type": "keyword"}
    if name == "time" or name.endswith("_time"):
        return {"type": "date", "format": "epoch_millis"}
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "long"}
    if isinstance(value, float):
        return {"type": "double"}
    if name in _IP_FIELDS:
        return {"type": "ip"}
    if name in _TEXT_FIELDS:
        return {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 1024}}}
    return {"type": "keyword", "ignore_above": 1024}


def elastic_index_template(findings: list[dict[str, Any]]) -> dict[str, Any]:
    """`PUT _index_template/recon-ocsf`: every field the example findings carry, typed
    (times as epoch milliseconds, IPs as `ip`, text as `text` + keyword); fields they
    do not show are mapped as keywords when they first arrive."""
    merged: dict[str, Any] = {}
    for finding in findings:
        _merge(merged, finding)
    mappings = _mapping_of("", merged)
    # Shodan's CVSS list: keep each {cve, score} pair together for queries.
    mappings["properties"]["unmapped"]["properties"]["cvss"]["type"] = "nested"
    # `unmapped.previous` is our ServiceInfo, absent on opened: map it like the service.
    return {
        "index_patterns": ["recon-ocsf-*"],
        "priority": 200,
        "template": {
            "settings": {"index.mapping.total_fields.limit": 2000},
            "mappings": {
                "dynamic_templates": [
                    {
                        "strings_as_keywords": {
                            "match_mapping_type": "string",
                            "mapping": {"type": "keyword", "ignore_above": 1024},
                        }
                    }
                ],
                **mappings,
            },
        },
        "_meta": {"description": "OCSF 1.8.0 Detection Findings from recon-stream"},
    }


def _merge(into: dict[str, Any], value: dict[str, Any]) -> None:
    """Fold `value` into `into`: the union of the fields, a non-null example of each."""
    for key, item in value.items():
        have = into.get(key)
        if isinstance(item, dict):
            if not isinstance(have, dict):
                have = into[key] = {}
            _merge(have, item)
        elif isinstance(item, list) and item and all(isinstance(i, dict) for i in item):
            if not (isinstance(have, list) and have and isinstance(have[0], dict)):
                have = into[key] = [{}]
            for element in item:
                _merge(have[0], element)
        elif have is None or (isinstance(have, list) and not have):
            into[key] = item


# --- all of it ---------------------------------------------------------------------


def render(event_schema: Mapping[str, Any], product_version: str = "0.1.0") -> dict[str, str]:
    """Every generated file by name: each example as a CloudEvent and as OCSF, the
    Sentinel table and DCR, the Elastic index template."""
    files: dict[str, str] = {}
    findings = []
    for name, event in example_events().items():
        finding = to_finding(event, product_version=product_version)
        findings.append(finding)
        files[f"{name}.cloudevent.json"] = _json(event.model_dump(mode="json"))
        files[f"{name}.ocsf.json"] = _json(finding)
    files["sentinel-table.json"] = _json(sentinel_table_body(event_schema))
    files["sentinel-dcr.json"] = _json(sentinel_dcr(event_schema))
    files["elastic-index-template.json"] = _json(elastic_index_template(findings))
    return files


def _json(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "docs" / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    schema = json.loads((root / "schemas" / "exposure-event.v1.json").read_text())
    for file_name, text in render(schema).items():
        (folder / file_name).write_text(text)
