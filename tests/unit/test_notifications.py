"""Webhook destinations: the file, the filters, the signature, the bodies; secrets never shown."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from recon_stream.domain.exposures import build_events, diff
from recon_stream.domain.notifications import (
    Destination,
    NotifyFile,
    body_of,
    signature,
    signed_headers,
    summary,
    wants,
)
from recon_stream.domain.scans import HostScan, Service
from recon_stream.notifier import NotifyFileError, load_destinations

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SECRET = "whsec-very-secret"
SCAN = HostScan(
    ip="203.0.114.9",
    provider="api",
    queried_at=T0,
    services=(
        Service(port=3389, module="rdp", product="Remote Desktop", vulns=("CVE-2019-0708",)),
        Service(port=8080, module="http", product="nginx"),
    ),
)
RDP, HTTP = build_events(
    "acme",
    "203.0.114.9",
    diff({}, SCAN),
    SCAN,
    version=1,
    candidate_agents=[],
    site_ids=[],
    acceptance_by_key={},
    first_seen_by_key={},
)


def destination(**fields: object) -> Destination:
    return Destination.model_validate(
        {"name": "psa", "url": "https://hooks.example/T0K3N", "secret": SECRET, **fields}
    )


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"a":1}'
    expected = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signature(SECRET.encode(), 1700000000, body) == f"sha256={expected}"
    headers = signed_headers(SECRET.encode(), "id-1", body, "application/json", 1700000000)
    assert headers["X-Recon-Timestamp"] == "1700000000"
    assert headers["X-Recon-Signature"] == f"sha256={expected}"
    assert headers["X-Recon-Event-Id"] == "id-1"


def test_filters() -> None:
    assert RDP.data.severity.value == "critical"
    assert wants(destination(), HTTP)
    assert not wants(destination(min_severity="critical"), HTTP)
    assert wants(destination(min_severity="high"), RDP)
    assert not wants(destination(changes=["closed"]), RDP)
    assert wants(destination(changes=["opened", "closed"]), RDP)
    assert not wants(destination(organizations=["globex"]), RDP)
    assert wants(destination(organizations=["globex", "acme"]), RDP)


def test_bodies_per_format() -> None:
    raw = b'{"as": "on kafka"}'
    assert body_of("cloudevents", RDP, raw, product_version="1") == (
        raw,
        "application/cloudevents+json",
    )
    ocsf, kind = body_of("ocsf", RDP, raw, product_version="1")
    assert (json.loads(ocsf)["metadata"]["uid"], kind) == (RDP.id, "application/json")
    text, _ = body_of("text", RDP, raw, product_version="1")
    assert json.loads(text) == {"text": summary(RDP)}
    assert summary(RDP) == (
        "[CRITICAL] acme: rdp opened on 203.0.114.9:3389/tcp (Remote Desktop; CVE-2019-0708)"
    )


def test_the_file_is_strict_and_names_are_unique() -> None:
    with pytest.raises(ValidationError, match="exactly one of secret"):
        destination(secret=None)
    with pytest.raises(ValidationError, match="exactly one of secret"):
        destination(secret_env="X")
    with pytest.raises(ValidationError, match="unique"):
        NotifyFile.model_validate({"destinations": [destination(), destination()]})
    with pytest.raises(ValidationError):
        destination(format="xml")
    with pytest.raises(ValidationError):
        destination(unknown_field=1)


def test_secrets_and_urls_never_show(tmp_path: Path) -> None:
    d = destination()
    assert SECRET not in repr(d)
    assert "T0K3N" not in repr(d)
    path = tmp_path / "notify.yaml"
    path.write_text(f"destinations:\n  - name: a\n    url: nope\n    secret: {SECRET}\n")
    with pytest.raises(NotifyFileError) as raised:
        load_destinations(path)
    assert SECRET not in str(raised.value)


def test_secret_env_is_read_when_the_file_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "notify.yaml"
    path.write_text(
        "destinations:\n"
        "  - {name: chat, url: 'https://chat.example/x', secret_env: CHAT_KEY, format: text}\n"
    )
    (chat,) = load_destinations(path, {"CHAT_KEY": "from-env"})
    assert chat.secret is not None
    assert chat.secret.get_secret_value() == "from-env"
    with pytest.raises(NotifyFileError, match="CHAT_KEY is not set"):
        load_destinations(path, {})
