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
    Failure,
    NotifyFile,
    body_of,
    signature,
    signed_headers,
    summary,
    wants,
)
from recon_stream.domain.scans import HostScan, Service
from recon_stream.notifier import NotifyFileError, load_destinations
from tests.fakes import BUILT_IN

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
    assessor=BUILT_IN,
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


def test_accepted_and_sample_filters() -> None:
    accepted = RDP.model_copy(update={"data": RDP.data.model_copy(update={"accepted": True})})
    sampled = RDP.model_copy(update={"data": RDP.data.model_copy(update={"sample": True})})
    assert wants(destination(), accepted)
    assert wants(destination(), sampled)
    assert not wants(destination(accepted=False), accepted)
    assert wants(destination(accepted=False), RDP)
    assert not wants(destination(sample=False), sampled)
    assert wants(destination(sample=False), RDP)


def test_start_at_defaults_to_latest_and_is_strict() -> None:
    assert destination().start_at == "latest"
    assert destination(start_at="earliest").start_at == "earliest"
    with pytest.raises(ValidationError, match="start_at"):
        destination(start_at="beginning")


def test_headers_go_with_every_attempt_and_never_show(tmp_path: Path) -> None:
    path = tmp_path / "notify.yaml"
    path.write_text(
        "destinations:\n"
        "  - name: hec\n"
        "    url: https://splunk.example:8088/services/collector/raw\n"
        "    secret: k\n"
        "    headers:\n"
        "      Authorization: {env: HEC_TOKEN}\n"
        "      X-Tenant: literal-tenant-value\n"
    )
    (hec,) = load_destinations(path, {"HEC_TOKEN": "Splunk 1234-abcd"})
    assert hec.header_values() == {
        "Authorization": "Splunk 1234-abcd",
        "X-Tenant": "literal-tenant-value",
    }
    assert "1234-abcd" not in repr(hec)
    assert "literal-tenant-value" not in repr(hec)
    headers = signed_headers(b"k", "id-1", b"{}", "application/json", 1, hec.header_values())
    assert headers["Authorization"] == "Splunk 1234-abcd"
    assert headers["X-Recon-Event-Id"] == "id-1"
    # An unset variable is refused at start, the field named, no secret shown.
    with pytest.raises(NotifyFileError, match=r"hec: headers.Authorization: HEC_TOKEN is not set"):
        load_destinations(path, {})


def test_headers_cannot_replace_the_signature_or_the_framing() -> None:
    for name in ("X-Recon-Signature", "content-type", "Host"):
        with pytest.raises(ValidationError, match="set by the notifier"):
            destination(headers={name: "x"})
    with pytest.raises(ValidationError):
        destination(headers={"Bad Name": "x"})
    with pytest.raises(ValidationError):
        destination(headers={"Authorization": {"env": "X", "default": "y"}})


def test_an_unknown_filter_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "notify.yaml"
    path.write_text(
        "destinations:\n  - {name: a, url: 'https://a.example/', secret: k, accepted_only: true}\n"
    )
    with pytest.raises(NotifyFileError, match="accepted_only"):
        load_destinations(path)


def test_which_answers_are_permanent() -> None:
    assert all(Failure("http_4xx", s).permanent for s in (400, 404, 410, 413, 422))
    assert not any(Failure("http_4xx", s).permanent for s in (401, 403, 408, 425, 429))
    assert not any(Failure("http_5xx", s).permanent for s in (500, 502, 503))
    assert not Failure("http_other", 302).permanent
    assert not Failure("timeout").permanent
    assert not Failure("connection").permanent


def test_the_teams_body_is_an_adaptive_card_message() -> None:
    body, kind = body_of("teams", RDP, b"", product_version="1")
    message = json.loads(body)
    assert kind == "application/json"
    assert message["type"] == "message"
    (attachment,) = message["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    assert (card["type"], card["version"]) == ("AdaptiveCard", "1.4")
    assert card["body"][0]["text"] == summary(RDP)
    facts = {f["title"]: f["value"] for f in card["body"][1]["facts"]}
    assert facts["Exposure"] == "203.0.114.9:3389/tcp"
    assert facts["CVEs"] == "CVE-2019-0708"


def test_timeouts_stop_at_a_minute() -> None:
    assert destination(timeout_seconds=60).timeout_seconds == 60
    with pytest.raises(ValidationError):
        destination(timeout_seconds=61)
