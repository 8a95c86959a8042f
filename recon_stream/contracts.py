"""The published JSON Schemas, generated from the pydantic models (one definition)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from recon_stream.domain.commands import CommandMessage
from recon_stream.domain.exposures import ExposureEvent, ExposureState
from recon_stream.domain.heartbeats import Heartbeat
from recon_stream.domain.notifications import NotifyFile
from recon_stream.domain.policy_file import PolicyFile
from recon_stream.domain.scan_requests import ScanRequest
from recon_stream.domain.scope import ScopeFile

SCHEMAS: dict[str, type[BaseModel]] = {
    "heartbeat.v1.json": Heartbeat,
    "scan-request.v1.json": ScanRequest,
    "exposure-event.v1.json": ExposureEvent,
    "command.v1.json": CommandMessage,
    "exposure-state.v1.json": ExposureState,
    "risk-policy.v1.json": PolicyFile,
    "notify.v1.json": NotifyFile,
    "scope.v1.json": ScopeFile,
}


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def render(model: type[BaseModel]) -> str:
    return json.dumps(schema_of(model), indent=2, sort_keys=False) + "\n"


def write_schemas(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in SCHEMAS.items():
        path = folder / name
        path.write_text(render(model))
        written.append(path)
    return written
