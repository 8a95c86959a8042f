"""Schema drift: the published JSON Schemas are exactly what the models render."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from recon_stream.contracts import SCHEMAS, render, write_schemas
from recon_stream.domain.heartbeats import parse_heartbeat
from recon_stream.domain.scan_requests import ScanReason, ScanRequest

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
PUBLISHED = ("heartbeat.v1.json", "scan-request.v1.json")
FIX = "run `recon-stream schemas` and commit the result"

SAMPLE_HEARTBEAT: dict[str, Any] = {
    "organization_id": "org-42",
    "agent_id": "agent.7:host@site-1",
    "public_ip": "203.0.114.7",
    "observed_at": "2024-05-01T17:30:00.123+05:30",
    "event_id": "8c2e2a4e-6c55-4d0b-9f0e-1a1f5b0c9d11",
    "site_id": "hq",
    "hostname": "WS-0042",
    "agent_version": "7.3.1",
    "schema_version": 1,
    "some_future_field": {"ignored": True},
}


def test_every_published_schema_is_generated() -> None:
    on_disk = {p.name for p in SCHEMA_DIR.glob("*.json")}
    assert set(PUBLISHED) <= on_disk
    assert set(PUBLISHED) <= set(SCHEMAS)
    assert on_disk == set(SCHEMAS), f"schemas/ and contracts.SCHEMAS differ; {FIX}"


@pytest.mark.parametrize("name", sorted(set(SCHEMAS) | set(PUBLISHED)))
def test_schema_file_matches_the_model_byte_for_byte(name: str) -> None:
    path = SCHEMA_DIR / name
    assert path.exists(), f"{path} is missing; {FIX}"
    expected = render(SCHEMAS[name]).encode()
    assert path.read_bytes() == expected, f"{path} is out of date with its model; {FIX}"


def test_write_schemas_writes_what_render_renders(tmp_path: Path) -> None:
    written = write_schemas(tmp_path / "out")
    assert sorted(p.name for p in written) == sorted(SCHEMAS)
    for path in written:
        assert path.read_bytes() == render(SCHEMAS[path.name]).encode()


def test_heartbeat_schema_states_the_contract() -> None:
    schema = json.loads((SCHEMA_DIR / "heartbeat.v1.json").read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object"
    assert schema["required"] == ["organization_id", "agent_id", "public_ip", "observed_at"]
    # Unknown fields are ignored, so the schema must not forbid them.
    assert schema.get("additionalProperties", True) is not False
    props = schema["properties"]
    for name in ("organization_id", "agent_id"):
        assert props[name]["pattern"] == "^[A-Za-z0-9._:@-]+$"
        assert (props[name]["minLength"], props[name]["maxLength"]) == (1, 128)
    assert props["observed_at"]["format"] == "date-time"
    assert props["schema_version"]["const"] == 1


def test_sample_heartbeat_is_valid_for_the_parser() -> None:
    hb = parse_heartbeat(json.dumps(SAMPLE_HEARTBEAT).encode())
    assert hb.agent_id == SAMPLE_HEARTBEAT["agent_id"]


def test_sample_heartbeat_validates_against_the_published_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((SCHEMA_DIR / "heartbeat.v1.json").read_text())
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    validator.validate(SAMPLE_HEARTBEAT)
    bad = {**SAMPLE_HEARTBEAT, "agent_id": "has space"}
    assert not validator.is_valid(bad)
    missing = {k: v for k, v in SAMPLE_HEARTBEAT.items() if k != "observed_at"}
    assert not validator.is_valid(missing)


def test_sample_scan_request_validates_against_the_published_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((SCHEMA_DIR / "scan-request.v1.json").read_text())
    request = ScanRequest(
        organization_id="org-42",
        ip="2606:4700::1111",
        reason=ScanReason.NEW,
        requested_at=datetime(2024, 5, 1, 12, tzinfo=UTC),
    )
    jsonschema.Draft202012Validator(schema).validate(json.loads(request.model_dump_json()))
