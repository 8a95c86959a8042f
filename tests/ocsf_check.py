"""Checks of OCSF findings: the OCSF 1.8.0 JSON Schema (from the `ocsf-json-schema` wheel,
no network), plus what a JSON Schema cannot say: `type_uid` arithmetic, captions that
match their ids, times in milliseconds, and one `finding_info.uid` per exposure."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from typing import Any

from jsonschema import Draft202012Validator
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema

VERSION = "1.8.0"
# 2001-09-09 in milliseconds; as seconds it is the year 33658.
MIN_MS = 10**12


@functools.cache
def _validator() -> Draft202012Validator:
    schema = OcsfJsonSchemaEmbedded(get_ocsf_schema(VERSION)).get_class_schema(
        "detection_finding", profiles=[]
    )
    return Draft202012Validator(schema)


@functools.cache
def _captions() -> dict[str, dict[int, str]]:
    attributes = get_ocsf_schema(VERSION)["classes"]["detection_finding"]["attributes"]
    return {
        name: {int(key): value["caption"] for key, value in attributes[name]["enum"].items()}
        for name in ("activity_id", "severity_id", "status_id", "risk_level_id", "confidence_id")
    }


def _times(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else key
            if (key == "time" or key.endswith("_time")) and value is not None:
                yield where, value
            yield from _times(value, where)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _times(item, f"{path}[{i}]")


def problems(finding: dict[str, Any]) -> list[str]:
    """Everything wrong with one Detection Finding; empty when it is valid."""
    found = [
        f"schema: {'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in _validator().iter_errors(finding)
    ]
    if finding.get("type_uid") != finding.get("class_uid", 0) * 100 + finding.get("activity_id", 0):
        found.append(f"type_uid {finding.get('type_uid')} is not class_uid*100 + activity_id")
    for name, captions in _captions().items():
        caption_field = {"activity_id": "activity_name"}.get(name, name.removesuffix("_id"))
        if name in finding and finding.get(caption_field) != captions[finding[name]]:
            found.append(f"{caption_field} {finding.get(caption_field)!r} is not {name}'s caption")
    if finding.get("metadata", {}).get("version") != VERSION:
        found.append("metadata.version is not " + VERSION)
    for where, value in _times(finding):
        if not isinstance(value, int) or value < MIN_MS:
            found.append(f"{where} = {value!r} is not epoch milliseconds")
    return found


def assert_valid(findings: Iterable[dict[str, Any]]) -> int:
    """Every finding valid, and each exposure's `finding_info.uid` stable; returns how many."""
    n = 0
    uid_of: dict[tuple[str, str, int, str], str] = {}
    for finding in findings:
        n += 1
        assert problems(finding) == [], (problems(finding), finding)
        port = finding["device"]["network_interfaces"][0]["open_ports"][0]
        key = (
            finding["metadata"]["tenant_uid"],
            finding["device"]["ip"],
            port["port"],
            port["protocol_name"],
        )
        uid = uid_of.setdefault(key, finding["finding_info"]["uid"])
        assert finding["finding_info"]["uid"] == uid, (key, uid, finding["finding_info"]["uid"])
    assert len(set(uid_of.values())) == len(uid_of), "two exposures share a finding uid"
    return n
