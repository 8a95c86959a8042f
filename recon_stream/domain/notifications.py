"""Webhook destinations and what each one is sent: the notifier's pure half.

The destinations file (`RECON_NOTIFY_FILE`, YAML; schemas/notify.v1.json is
generated from `NotifyFile`) lists where exposure events go and in which format:

- `cloudevents`: the event exactly as on Kafka (`application/cloudevents+json`),
- `ocsf`: the OCSF 1.8.0 Detection Finding of the event (`application/json`),
- `text`: `{"text": "..."}`, one readable line, for chat incoming webhooks.

Every POST is signed: `X-Recon-Signature: sha256=HEX`, the HMAC-SHA256 of
`timestamp + "." + body` under the destination's secret, with the timestamp (epoch
seconds) in `X-Recon-Timestamp` and the event id in `X-Recon-Event-Id`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    field_validator,
    model_validator,
)

from recon_stream.domain.exposures import CONTENT_TYPE, ChangeKind, ExposureEvent
from recon_stream.domain.heartbeats import Identifier
from recon_stream.domain.ocsf import finding_json
from recon_stream.domain.risk import Severity

Format = Literal["cloudevents", "ocsf", "text"]
DestinationName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]

TIMESTAMP_HEADER = "X-Recon-Timestamp"
SIGNATURE_HEADER = "X-Recon-Signature"
EVENT_ID_HEADER = "X-Recon-Event-Id"


class Destination(BaseModel):
    """One webhook receiver."""

    # A validation error must not echo a secret back into a log.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    name: DestinationName = Field(
        description="Unique; names the destination in metrics, logs and its consumer group."
    )
    # Chat webhook URLs carry their token in the path: never in a repr or a log.
    url: Annotated[str, StringConstraints(pattern=r"^https?://\S+$")] = Field(repr=False)
    secret: SecretStr | None = Field(
        None, description="The HMAC-SHA256 key. Give this or `secret_env`, not both."
    )
    secret_env: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = (
        Field(None, description="The environment variable holding the HMAC key.")
    )
    format: Format = "cloudevents"
    min_severity: Severity | None = Field(
        None, description="Only events of this severity or above."
    )
    changes: tuple[ChangeKind, ...] | None = Field(
        None, min_length=1, description="Only these kinds of change (all when absent)."
    )
    organizations: tuple[Identifier, ...] | None = Field(
        None, min_length=1, description="Only these organizations (all when absent)."
    )
    timeout_seconds: float = Field(10.0, gt=0, le=300, description="Per request, connect to end.")

    @model_validator(mode="after")
    def _one_secret(self) -> Destination:
        if (self.secret is None) == (self.secret_env is None):
            raise ValueError(f"destination {self.name}: give exactly one of secret, secret_env")
        return self


class NotifyFile(BaseModel):
    """The webhook notifier's destinations (`RECON_NOTIFY_FILE`)."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        hide_input_in_errors=True,
        title="NotifyFile",
        json_schema_extra={"$id": "https://recon-stream.dev/schemas/notify.v1.json"},
    )

    destinations: tuple[Destination, ...]

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, destinations: tuple[Destination, ...]) -> tuple[Destination, ...]:
        names = [d.name for d in destinations]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"destination names must be unique: {', '.join(repeated)}")
        return destinations


def wants(destination: Destination, event: ExposureEvent) -> bool:
    """Whether `event` passes the destination's filters."""
    d = event.data
    if destination.min_severity is not None and d.severity.rank < destination.min_severity.rank:
        return False
    if destination.changes is not None and d.change not in destination.changes:
        return False
    return destination.organizations is None or d.organization_id in destination.organizations


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """`sha256=HEX`: HMAC-SHA256 of `timestamp + "." + body`."""
    digest = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def summary(event: ExposureEvent) -> str:
    """One line for a chat channel, e.g.
    "[CRITICAL] acme: rdp opened on 203.0.113.10:3389/tcp (Remote Desktop 10.0; CVE-2019-0708)"."""
    d = event.data
    service = d.service.name or "unidentified service"
    software = " ".join(p for p in (d.service.product, d.service.version) if p)
    details = "; ".join(p for p in (software, ", ".join(d.vulns)) if p)
    what = f"{d.change.value}"
    if d.change is ChangeKind.CHANGED and d.changed_fields:
        what += f" ({', '.join(d.changed_fields)})"
    if d.reason is not None:
        what += f" [{d.reason.value}]"
    line = f"[{d.severity.value.upper()}] {d.organization_id}: {service} {what} on "
    line += f"{d.ip}:{d.port}/{d.transport}"
    if details:
        line += f" ({details})"
    if d.acceptance is not None:
        line += f", accepted: {d.acceptance.reason}"
    return line


def body_of(
    format: Format, event: ExposureEvent, raw: bytes, *, product_version: str
) -> tuple[bytes, str]:
    """The POST body and its content type. `raw` is the event as read from Kafka: the
    `cloudevents` format sends exactly those bytes."""
    if format == "cloudevents":
        return raw, CONTENT_TYPE
    if format == "ocsf":
        return finding_json(event, product_version=product_version), "application/json"
    return json.dumps({"text": summary(event)}).encode(), "application/json"


def signed_headers(
    secret: bytes, event_id: str, body: bytes, content_type: str, timestamp: int
) -> dict[str, str]:
    """The headers of one delivery attempt."""
    return {
        "Content-Type": content_type,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, timestamp, body),
        EVENT_ID_HEADER: event_id,
    }
