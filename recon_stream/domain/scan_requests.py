"""The scan-request contract (schemas/scan-request.v1.json is generated from it)."""

from __future__ import annotations

import enum
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from recon_stream.domain.identifiers import Identifier, IpText

MAX_SCAN_REQUEST_BYTES = 64 * 1024
"""Larger scan requests go to the DLQ as `too_large` (ours are ~150 bytes)."""


class ScanReason(enum.StrEnum):
    NEW = "new"
    RESCAN = "rescan"
    MANUAL = "manual"


class ScanRequest(BaseModel):
    """Ask the scanner to (re)look at `ip` on behalf of `organization_id`.

    Published with Kafka key = `ip`, so every request for one IP lands on one
    scanner partition.
    """

    model_config = ConfigDict(
        extra="ignore",
        frozen=True,
        title="ScanRequest",
        json_schema_extra={"$id": "https://recon-stream.dev/schemas/scan-request.v1.json"},
    )

    organization_id: Identifier
    ip: Annotated[IpText, StringConstraints(min_length=2, max_length=45)]
    reason: ScanReason
    requested_at: AwareDatetime = Field(description="RFC 3339 time with offset.")

    def kafka_key(self) -> bytes:
        return self.ip.encode()
