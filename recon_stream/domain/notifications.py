"""Webhook destinations and what each one is sent: the notifier's pure half.

The destinations file (`RECON_NOTIFY_FILE`, YAML; schemas/notify.v1.json is
generated from `NotifyFile`) lists where exposure events go and in which format:

- `cloudevents`: the event exactly as on Kafka (`application/cloudevents+json`),
- `ocsf`: the OCSF 1.8.0 Detection Finding of the event (`application/json`),
- `text`: `{"text": "..."}`, one readable line, for chat incoming webhooks (Slack,
  Mattermost, Google Chat),
- `teams`: a message with one Adaptive Card, what a Microsoft Teams Workflows
  "When a Teams webhook request is received" trigger takes (Workflows accept
  Adaptive Cards only).

Every POST is signed: `X-Recon-Signature: sha256=HEX`, the HMAC-SHA256 of
`timestamp + "." + body` under the destination's secret, with the timestamp (epoch
seconds) in `X-Recon-Timestamp` and the event id in `X-Recon-Event-Id`; a
destination's `headers` (e.g. `Authorization` for Splunk HEC or a PSA API) go with
it. A receiver's answer of 400, 404, 410, 413 or 422 is permanent for that event
(`PERMANENT_STATUSES`: the notifier parks it on the notify DLQ and goes on); any
other failure is retried.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

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
from recon_stream.domain.identifiers import Identifier
from recon_stream.domain.ocsf import finding_json
from recon_stream.domain.risk import Severity

Format = Literal["cloudevents", "ocsf", "text", "teams"]
StartAt = Literal["latest", "earliest"]
DestinationName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
# An HTTP field name (RFC 9110 token).
HeaderName = Annotated[str, StringConstraints(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")]

TIMESTAMP_HEADER = "X-Recon-Timestamp"
SIGNATURE_HEADER = "X-Recon-Signature"
EVENT_ID_HEADER = "X-Recon-Event-Id"
# Headers the notifier sets itself, or that the HTTP client must own.
_RESERVED_HEADERS = frozenset(
    h.lower()
    for h in (
        TIMESTAMP_HEADER,
        SIGNATURE_HEADER,
        EVENT_ID_HEADER,
        "Content-Type",
        "Content-Length",
        "Host",
        "Transfer-Encoding",
        "Connection",
    )
)

PERMANENT_STATUSES = frozenset({400, 404, 410, 413, 422})
"""Answers that say this event will never be taken as sent: parked, not retried. 408, 425,
429, 5xx, redirects, timeouts and dropped connections are retried."""


@dataclass(frozen=True)
class Failure:
    """Why one POST was not delivered."""

    reason: str
    """A metric label: `http_4xx`, `http_5xx`, `http_other` (1xx, 3xx), `timeout`, `connection`."""
    status: int | None = None
    detail: str = ""
    """One line for the notify DLQ's `reason` header (status, phrase, the start of the body)."""

    @property
    def permanent(self) -> bool:
        return self.status in PERMANENT_STATUSES


class HeaderFromEnv(BaseModel):
    """A header value read from an environment variable at start."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    env: EnvName


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
    secret_env: EnvName | None = Field(
        None, description="The environment variable holding the HMAC key."
    )
    format: Format = "cloudevents"
    start_at: StartAt = Field(
        "latest",
        description="Where a destination never delivered to before (its consumer group has "
        "no committed offset) starts: `latest`, events from now on; `earliest`, the whole "
        "topic as retained. Once it has a position it keeps it.",
    )
    headers: dict[HeaderName, SecretStr | HeaderFromEnv] = Field(
        default_factory=dict,
        description="Sent with every POST (e.g. Authorization): name -> value, or "
        "name -> {env: VARIABLE}. Values never appear in logs or reprs.",
    )
    min_severity: Severity | None = Field(
        None, description="Only events of this severity or above."
    )
    changes: tuple[ChangeKind, ...] | None = Field(
        None, min_length=1, description="Only these kinds of change (all when absent)."
    )
    organizations: tuple[Identifier, ...] | None = Field(
        None, min_length=1, description="Only these organizations (all when absent)."
    )
    accepted: bool = Field(
        True, description="false: skip events of exposures the organization accepted."
    )
    sample: bool = Field(True, description="false: skip events built from bundled sample data.")
    timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=60,
        description="Per request, connect to end; an answer later than this (even a 2xx) "
        "is a timeout, tried again.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Destination:
        if (self.secret is None) == (self.secret_env is None):
            raise ValueError(f"destination {self.name}: give exactly one of secret, secret_env")
        reserved = sorted(h for h in self.headers if h.lower() in _RESERVED_HEADERS)
        if reserved:
            raise ValueError(
                f"destination {self.name}: headers: {', '.join(reserved)} are set by the notifier"
            )
        return self

    def header_values(self) -> dict[str, str]:
        """The extra headers, each `{env: ...}` resolved (by `load_destinations`)."""
        values = {}
        for name, value in self.headers.items():
            if not isinstance(value, SecretStr):
                raise ValueError(f"destination {self.name}: headers.{name} is not resolved")
            values[name] = value.get_secret_value()
        return values


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
    if (d.accepted and not destination.accepted) or (d.sample and not destination.sample):
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


_CARD_COLOURS = {"critical": "Attention", "high": "Warning", "medium": "Accent"}


def teams_card(event: ExposureEvent) -> dict[str, Any]:
    """A Teams message with one Adaptive Card (1.4): the summary as its title line, the
    exposure's facts below. Teams Workflows' webhook trigger posts it as is."""
    d = event.data
    facts = [
        {"title": "Organization", "value": d.organization_id},
        {"title": "Exposure", "value": f"{d.ip}:{d.port}/{d.transport}"},
        {"title": "Service", "value": d.service.name or "unidentified"},
        {"title": "Severity", "value": d.severity.value},
        {"title": "Change", "value": d.change.value},
    ]
    software = " ".join(p for p in (d.service.product, d.service.version) if p)
    if software:
        facts.append({"title": "Software", "value": software})
    if d.vulns:
        facts.append({"title": "CVEs", "value": ", ".join(d.vulns)})
    if d.acceptance is not None:
        facts.append({"title": "Accepted", "value": d.acceptance.reason})
    card = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": [
            {
                "type": "TextBlock",
                "text": summary(event),
                "wrap": True,
                "weight": "Bolder",
                "color": _CARD_COLOURS.get(d.severity.value, "Default"),
            },
            {"type": "FactSet", "facts": facts},
        ],
    }
    return {
        "type": "message",
        "attachments": [
            {
                "contentType": "application/vnd.microsoft.card.adaptive",
                "contentUrl": None,
                "content": card,
            }
        ],
    }


def body_of(
    format: Format, event: ExposureEvent, raw: bytes, *, product_version: str
) -> tuple[bytes, str]:
    """The POST body and its content type. `raw` is the event as read from Kafka: the
    `cloudevents` format sends exactly those bytes."""
    if format == "cloudevents":
        return raw, CONTENT_TYPE
    if format == "ocsf":
        return finding_json(event, product_version=product_version), "application/json"
    if format == "teams":
        return json.dumps(teams_card(event)).encode(), "application/json"
    return json.dumps({"text": summary(event)}).encode(), "application/json"


def signed_headers(
    secret: bytes,
    event_id: str,
    body: bytes,
    content_type: str,
    timestamp: int,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The headers of one delivery attempt: the destination's `extra` ones, then ours."""
    return {
        **(extra or {}),
        "Content-Type": content_type,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, timestamp, body),
        EVENT_ID_HEADER: event_id,
    }
