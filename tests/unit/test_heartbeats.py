"""`parse_heartbeat`: every valid heartbeat parses, every single corruption is rejected."""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from recon_stream.domain.heartbeats import (
    MAX_HEARTBEAT_BYTES,
    Heartbeat,
    InvalidHeartbeat,
    observed_time,
    parse_heartbeat,
)
from recon_stream.domain.messages import RejectReason

ID_ALPHABET = string.ascii_letters + string.digits + "._:@-"
REQUIRED = ("organization_id", "agent_id", "public_ip", "observed_at")
IDENTIFIERS = ("organization_id", "agent_id", "site_id")
KNOWN = (*REQUIRED, "event_id", "site_id", "hostname", "agent_version", "schema_version")

identifiers = st.text(alphabet=ID_ALPHABET, min_size=1, max_size=128)
ips = st.sampled_from(["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.4.4", "10.0.0.1"])

offsets = st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(lambda m: timedelta(minutes=m))


def _offset_text(offset: timedelta, zulu: bool) -> str:
    if offset == timedelta(0) and zulu:
        return "Z"
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


@st.composite
def rfc3339(draw: st.DrawFn) -> tuple[str, datetime]:
    """RFC 3339 text with an offset, and the instant it should parse to."""
    offset = draw(
        st.one_of(st.just(timedelta(0)), st.just(timedelta(hours=5, minutes=30)), offsets)
    )
    local = draw(st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9998, 12, 30)))
    digits = draw(st.integers(0, 9))
    fraction = draw(st.text(alphabet=string.digits, min_size=digits, max_size=digits))
    zulu = draw(st.booleans())
    text = (
        f"{local.year:04d}-{local.month:02d}-{local.day:02d}T"
        f"{local.hour:02d}:{local.minute:02d}:{local.second:02d}"
        + (f".{fraction}" if fraction else "")
        + _offset_text(offset, zulu)
    )
    # Sub-microsecond digits are truncated (a datetime holds microseconds).
    micro = int((fraction + "000000")[:6]) if fraction else 0
    expected = local.replace(microsecond=micro, tzinfo=timezone(offset))
    return text, expected


def _optional(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(_ABSENT), st.none(), value)


_ABSENT = object()


@st.composite
def heartbeats(draw: st.DrawFn) -> tuple[dict[str, Any], datetime]:
    """A valid heartbeat as a JSON-ready dict, and its observed_at instant."""
    observed_text, observed = draw(rfc3339())
    message: dict[str, Any] = {
        "organization_id": draw(identifiers),
        "agent_id": draw(identifiers),
        "public_ip": draw(ips),
        "observed_at": observed_text,
    }
    optional = {
        "event_id": _optional(st.text(min_size=1, max_size=128)),
        "site_id": _optional(identifiers),
        "hostname": _optional(st.text(max_size=255)),
        "agent_version": _optional(st.text(max_size=64)),
        "schema_version": st.one_of(st.just(_ABSENT), st.just(1)),
    }
    for name, strategy in optional.items():
        value = draw(strategy)
        if value is not _ABSENT:
            message[name] = value
    return message, observed


def encode(message: object) -> bytes:
    return json.dumps(message).encode()


def valid() -> dict[str, Any]:
    return {
        "organization_id": "org-1",
        "agent_id": "agent-1",
        "public_ip": "8.8.8.8",
        "observed_at": "2024-05-01T12:00:00+05:30",
    }


@given(heartbeats())
def test_valid_heartbeat_parses_and_keeps_its_fields(case: tuple[dict[str, Any], datetime]) -> None:
    message, observed = case
    hb = parse_heartbeat(encode(message))
    assert hb.organization_id == message["organization_id"]
    assert hb.agent_id == message["agent_id"]
    assert hb.public_ip == message["public_ip"]
    assert observed_time(hb) == observed
    assert observed_time(hb).utcoffset() == observed.utcoffset()
    for name in ("event_id", "site_id", "hostname", "agent_version"):
        assert getattr(hb, name) == message.get(name)
    assert hb.schema_version == 1
    # And what we parsed serializes back to a heartbeat that parses the same.
    assert parse_heartbeat(hb.model_dump_json().encode()) == hb


@given(
    heartbeats(),
    st.dictionaries(
        st.text(max_size=20).filter(lambda k: k not in KNOWN),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
            max_leaves=8,
        ),
        max_size=5,
    ),
)
def test_unknown_fields_are_ignored(
    case: tuple[dict[str, Any], datetime], extra: dict[str, Any]
) -> None:
    message, _ = case
    assert parse_heartbeat(encode({**extra, **message})) == parse_heartbeat(encode(message))


@pytest.mark.parametrize(
    "observed_at",
    [
        "2024-05-01T12:00:00Z",
        "2024-05-01T12:00:00+00:00",
        "2024-05-01T12:00:00-00:00",
        "2024-05-01T17:30:00+05:30",
        "2024-05-01T02:00:00-10:00",
        "2024-05-01T12:00:00.000000Z",
        "2024-05-01T17:30:00.000000001+05:30",
    ],
)
def test_offsets_denote_the_same_instant(observed_at: str) -> None:
    hb = parse_heartbeat(encode({**valid(), "observed_at": observed_at}))
    assert observed_time(hb) == datetime(2024, 5, 1, 12, tzinfo=UTC)


# --- single corruptions -----------------------------------------------------

Corruption = Callable[[dict[str, Any], st.DataObject], bytes]


def _identifier_field(message: dict[str, Any], data: st.DataObject) -> str:
    field = data.draw(st.sampled_from(IDENTIFIERS))
    if message.get(field) is None:
        message[field] = "site-1"
    return field


def with_space(message: dict[str, Any], data: st.DataObject) -> bytes:
    field = _identifier_field(message, data)
    value = message[field][:127]
    at = data.draw(st.integers(0, len(value)))
    message[field] = value[:at] + " " + value[at:]
    return encode(message)


def too_long(message: dict[str, Any], data: st.DataObject) -> bytes:
    field = _identifier_field(message, data)
    message[field] = data.draw(st.text(alphabet=ID_ALPHABET, min_size=129, max_size=300))
    return encode(message)


def bad_character(message: dict[str, Any], data: st.DataObject) -> bytes:
    field = _identifier_field(message, data)
    bad = data.draw(st.characters(exclude_characters=ID_ALPHABET))
    message[field] = message[field][:127] + bad
    return encode(message)


def empty_identifier(message: dict[str, Any], data: st.DataObject) -> bytes:
    message[_identifier_field(message, data)] = ""
    return encode(message)


def missing_required(message: dict[str, Any], data: st.DataObject) -> bytes:
    del message[data.draw(st.sampled_from(REQUIRED))]
    return encode(message)


def null_required(message: dict[str, Any], data: st.DataObject) -> bytes:
    message[data.draw(st.sampled_from(REQUIRED))] = None
    return encode(message)


def naive_timestamp(message: dict[str, Any], data: st.DataObject) -> bytes:
    naive = data.draw(st.datetimes(min_value=datetime(1970, 1, 2)))
    message["observed_at"] = naive.isoformat(
        timespec=data.draw(st.sampled_from(["seconds", "microseconds"]))
    )
    return encode(message)


def numeric_timestamp(message: dict[str, Any], data: st.DataObject) -> bytes:
    message["observed_at"] = data.draw(
        st.one_of(st.integers(0, 2**40), st.floats(0, 2**40, allow_nan=False))
    )
    return encode(message)


def wrong_type(message: dict[str, Any], data: st.DataObject) -> bytes:
    field = data.draw(
        st.sampled_from((*REQUIRED, "event_id", "site_id", "hostname", "agent_version"))
    )
    message[field] = data.draw(
        st.one_of(st.integers(), st.booleans(), st.lists(st.integers(), max_size=2), st.just({}))
    )
    return encode(message)


def schema_version_2(message: dict[str, Any], data: st.DataObject) -> bytes:
    message["schema_version"] = data.draw(st.sampled_from([2, 0, -1, "1", "v1", None]))
    return encode(message)


def not_an_object(message: dict[str, Any], data: st.DataObject) -> bytes:
    return encode(data.draw(st.sampled_from([[message], "heartbeat", 1, 1.5, None, True, []])))


def not_json(message: dict[str, Any], data: st.DataObject) -> bytes:
    raw = encode(message)
    how = data.draw(st.sampled_from(["truncate", "trail", "single quotes", "latin-1"]))
    if how == "truncate":
        return raw[: data.draw(st.integers(1, len(raw) - 1))]
    if how == "trail":
        return raw + b"}"
    if how == "single quotes":
        return raw.replace(b'"', b"'")
    return b'{"organization_id": "caf\xe9"}'


def empty(message: dict[str, Any], data: st.DataObject) -> bytes:
    return b""


def too_large(message: dict[str, Any], data: st.DataObject) -> bytes:
    raw = encode(message)
    extra = data.draw(st.integers(1, 4096))
    return raw[:-1] + b', "padding": "' + b"x" * (MAX_HEARTBEAT_BYTES + extra) + b'"}'


CORRUPTIONS: list[tuple[Corruption, RejectReason]] = [
    (with_space, RejectReason.SCHEMA),
    (too_long, RejectReason.SCHEMA),
    (bad_character, RejectReason.SCHEMA),
    (empty_identifier, RejectReason.SCHEMA),
    (missing_required, RejectReason.SCHEMA),
    (null_required, RejectReason.SCHEMA),
    (naive_timestamp, RejectReason.SCHEMA),
    (numeric_timestamp, RejectReason.SCHEMA),
    (wrong_type, RejectReason.SCHEMA),
    (schema_version_2, RejectReason.SCHEMA),
    (not_an_object, RejectReason.SCHEMA),
    (not_json, RejectReason.INVALID_JSON),
    (empty, RejectReason.EMPTY),
    (too_large, RejectReason.TOO_LARGE),
]


@pytest.mark.parametrize(
    ("corrupt", "reason"), CORRUPTIONS, ids=[c.__name__ for c, _ in CORRUPTIONS]
)
@given(case=heartbeats(), data=st.data())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_each_single_corruption_is_rejected_with_its_reason(
    corrupt: Corruption,
    reason: RejectReason,
    case: tuple[dict[str, Any], datetime],
    data: st.DataObject,
) -> None:
    message, _ = case
    raw = corrupt(dict(message), data)
    with pytest.raises(InvalidHeartbeat) as caught:
        parse_heartbeat(raw)
    assert caught.value.reason is reason, caught.value.detail
    assert isinstance(caught.value, ValueError)
    assert str(caught.value).startswith(reason.value)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, RejectReason.EMPTY),
        (b"", RejectReason.EMPTY),
        (b"   ", RejectReason.INVALID_JSON),
        (b"\xff\xfe\x00", RejectReason.INVALID_JSON),
        (b"[]", RejectReason.SCHEMA),
        (b"null", RejectReason.SCHEMA),
        (b"{}", RejectReason.SCHEMA),
    ],
)
def test_degenerate_messages(raw: bytes | None, reason: RejectReason) -> None:
    with pytest.raises(InvalidHeartbeat) as caught:
        parse_heartbeat(raw)
    assert caught.value.reason is reason


def _padded_to(size: int) -> bytes:
    raw = encode(valid())
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


def test_size_limit_is_inclusive() -> None:
    assert len(_padded_to(MAX_HEARTBEAT_BYTES)) == MAX_HEARTBEAT_BYTES
    assert parse_heartbeat(_padded_to(MAX_HEARTBEAT_BYTES)).agent_id == "agent-1"
    with pytest.raises(InvalidHeartbeat) as caught:
        parse_heartbeat(_padded_to(MAX_HEARTBEAT_BYTES + 1))
    assert caught.value.reason is RejectReason.TOO_LARGE


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("organization_id", "org\n"),  # `$` must not match before a trailing newline
        ("agent_id", "agent 1"),
        ("agent_id", "agent/1"),
        ("organization_id", "\u00e9cole"),
        ("site_id", ""),
        ("organization_id", "o" * 129),
        ("event_id", ""),
        ("event_id", "e" * 129),
        ("hostname", "h" * 256),
        ("agent_version", "v" * 65),
        ("observed_at", "2024-05-01T12:00:00"),
        ("observed_at", "2024-05-01"),
        ("observed_at", "2024-02-30T12:00:00Z"),
        ("observed_at", "2024-05-01T24:00:01Z"),
        ("observed_at", "2024-05-01T12:00:00+24:00"),
        ("observed_at", "yesterday"),
        ("observed_at", 1714564800),
        ("schema_version", 2),
        ("schema_version", "1"),
    ],
)
def test_field_violations_are_schema_errors(field: str, value: object) -> None:
    with pytest.raises(InvalidHeartbeat) as caught:
        parse_heartbeat(encode({**valid(), field: value}))
    assert caught.value.reason is RejectReason.SCHEMA
    assert field in caught.value.detail


def test_unix_time_as_string_is_not_rfc3339() -> None:
    with pytest.raises(InvalidHeartbeat) as caught:
        parse_heartbeat(encode({**valid(), "observed_at": "1714564800"}))
    assert caught.value.reason is RejectReason.SCHEMA


def test_boolean_schema_version_is_rejected() -> None:
    with pytest.raises(InvalidHeartbeat) as caught:
        parse_heartbeat(encode({**valid(), "schema_version": True}))
    assert caught.value.reason is RejectReason.SCHEMA


def _outcome(raw: bytes) -> Heartbeat | InvalidHeartbeat:
    # Any other exception escapes and fails the test.
    try:
        return parse_heartbeat(raw)
    except InvalidHeartbeat as error:
        return error


@given(st.binary(max_size=512))
@example(b"{" * 5000)
@example(b"[" * 5000)
@example(b'{"organization_id": "\\ud800"}')
@example(b'{"a": 1e999999}')
@example(b'{"a": 123456789012345678901234567890123456789}')
@example(b"\x00")
def test_arbitrary_bytes_raise_nothing_but_invalid_heartbeat(raw: bytes) -> None:
    outcome = _outcome(raw)
    assert isinstance(outcome, Heartbeat) or outcome.reason in RejectReason


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(
    st.fixed_dictionaries(
        {},
        optional={name: json_values | st.text(alphabet=ID_ALPHABET, max_size=20) for name in KNOWN},
    )
)
def test_arbitrary_json_objects_raise_nothing_but_invalid_heartbeat(
    message: dict[str, Any],
) -> None:
    outcome = _outcome(encode(message))
    assert isinstance(outcome, Heartbeat) or outcome.reason is RejectReason.SCHEMA
