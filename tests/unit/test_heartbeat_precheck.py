"""`prevalidate`, the ingest pre-check, against `parse_heartbeat`.

Sound: whenever it answers and the four identity values are ones the schema
accepts (the ingest cache holds only such values), `parse_heartbeat` accepts
the message and reads the same identity. Useful: it answers for every valid
heartbeat with flat fields, so the hot path is really taken.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from recon_stream.domain.heartbeats import (
    MAX_HEARTBEAT_BYTES,
    Heartbeat,
    Identifier,
    InvalidHeartbeat,
    IpText,
    Prevalidated,
    parse_heartbeat,
    prevalidate,
)
from tests.unit.test_heartbeats import (
    CORRUPTIONS,
    KNOWN,
    Corruption,
    encode,
    heartbeats,
    json_values,
    valid,
)

_DEEPEST = 199  # arrays inside the heartbeat object: 200 levels in all
_identifier = TypeAdapter(Identifier)
_ip = TypeAdapter(IpText)


def identity(heartbeat: Heartbeat | Prevalidated) -> tuple[str, str, str, str | None]:
    return (
        heartbeat.organization_id,
        heartbeat.public_ip,
        heartbeat.agent_id,
        heartbeat.site_id,
    )


def _schema_accepts(quick: Prevalidated) -> bool:
    organization, ip, agent, site = identity(quick)
    try:
        _identifier.validate_python(organization, strict=True)
        _ip.validate_python(ip, strict=True)
        _identifier.validate_python(agent, strict=True)
        if site is not None:
            _identifier.validate_python(site, strict=True)
    except ValidationError:
        return False
    return True


def assert_sound(raw: bytes) -> None:
    """What the ingest relies on: an answer with cacheable identity values means valid."""
    parse_heartbeat(valid_for_the_calendar(raw))
    quick = prevalidate(raw)
    if quick is None or not _schema_accepts(quick):
        return
    heartbeat = parse_heartbeat(raw)  # raises InvalidHeartbeat if the pre-check was wrong
    assert identity(quick) == identity(heartbeat)


def valid_for_the_calendar(raw: bytes) -> bytes:
    """A valid heartbeat observed on `raw`'s day, if it names a real one.

    The pre-check trusts only days `parse_heartbeat` already checked; parsing
    this first makes the pre-check answer as often as it ever would."""
    try:
        observed = json.loads(raw).get("observed_at")
        datetime.fromisoformat(observed[:10])
    except (ValueError, TypeError, AttributeError, RecursionError):
        return encode(valid())
    return encode({**valid(), "observed_at": observed[:10] + "T00:00:00Z"})


@given(heartbeats())
def test_every_valid_flat_heartbeat_gets_its_identity(
    case: tuple[dict[str, Any], datetime],
) -> None:
    message, _ = case
    raw = encode(message)
    parse_heartbeat(raw)  # the day is now known
    quick = prevalidate(raw)
    assert quick is not None
    assert identity(quick) == identity(parse_heartbeat(raw))


@given(
    heartbeats(),
    st.dictionaries(
        st.text(max_size=8).filter(lambda k: k not in KNOWN),
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(),
        max_size=4,
    ),
)
def test_flat_unknown_fields_keep_the_fast_path(
    case: tuple[dict[str, Any], datetime], extra: dict[str, Any]
) -> None:
    message, _ = case
    raw = encode({**extra, **message})
    parse_heartbeat(raw)
    assert prevalidate(raw) is not None


@pytest.mark.parametrize(
    ("corrupt", "reason"), CORRUPTIONS, ids=[c.__name__ for c, _ in CORRUPTIONS]
)
@given(case=heartbeats(), data=st.data())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_no_single_corruption_gets_through(
    corrupt: Corruption, reason: object, case: tuple[dict[str, Any], datetime], data: st.DataObject
) -> None:
    message, _ = case
    assert_sound(corrupt(dict(message), data))


@given(
    st.fixed_dictionaries(
        {},
        optional={name: json_values | st.text(max_size=20) for name in KNOWN},
    ),
    st.dictionaries(st.text(max_size=8), json_values, max_size=3),
)
def test_arbitrary_json_objects(message: dict[str, Any], extra: dict[str, Any]) -> None:
    assert_sound(encode({**extra, **message}))


@given(st.binary(max_size=512))
def test_arbitrary_bytes(raw: bytes) -> None:
    assert_sound(raw)


def _raw(**fields: object) -> bytes:
    return json.dumps({**valid(), **fields}).encode()


def _with(member: bytes) -> bytes:
    """A valid heartbeat with one more member, as raw JSON."""
    return json.dumps(valid())[:-1].encode() + b", " + member + b"}"


def _nested(depth: int) -> bytes:
    return _with(b'"extra": ' + b"[" * depth + b"]" * depth)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(_nested(201), id="nesting msgspec skips and pydantic refuses"),
        pytest.param(_raw(observed_at="2024-05-01T12:00:00+05:30\n"), id="trailing newline"),
        pytest.param(_raw(observed_at="2024-05-01T12:00:00"), id="no offset"),
        pytest.param(_raw(observed_at="٢٠٢٤-05-01T12:00:00Z"), id="non-ASCII digits"),
        pytest.param(_raw(observed_at="2024-02-30T12:00:00Z"), id="February 30"),
        pytest.param(_raw(schema_version=True), id="true as version"),
        pytest.param(_raw(schema_version=1.0), id="float version"),
        pytest.param(_raw(schema_version=2), id="version 2"),
        pytest.param(_raw(event_id=""), id="empty event id"),
        pytest.param(_raw(event_id="e" * 129), id="long event id"),
        pytest.param(_raw(hostname="h" * 256), id="long hostname"),
        pytest.param(_raw(agent_version="v" * 65), id="long agent version"),
        pytest.param(_raw(hostname=5), id="numeric hostname"),
        pytest.param(_raw(extra=float("nan")), id="NaN elsewhere"),
        pytest.param(_with(b'"extra": "\xff"'), id="invalid UTF-8 elsewhere"),
        pytest.param(_with(b'"extra": "\xc0\xaf"'), id="overlong UTF-8 elsewhere"),
        pytest.param(_with(b'"extra": "\xed\xa0\x80"'), id="UTF-8 surrogate elsewhere"),
        pytest.param(_with(b'"\xff": 1'), id="invalid UTF-8 key"),
        pytest.param(b'{"organization_id": "o", "organization_id": ["o"]}', id="duplicate key"),
        pytest.param(
            json.dumps(valid())[:-1].encode() + b', "pad": "' + b"x" * MAX_HEARTBEAT_BYTES + b'"}',
            id="too large",
        ),
        pytest.param(b"[1]", id="array"),
        pytest.param(b"", id="empty"),
    ],
)
def test_the_pre_check_leaves_edge_cases_to_the_full_parse(raw: bytes) -> None:
    parse_heartbeat(_raw(observed_at="2024-05-01T00:00:00Z"))
    parse_heartbeat(_raw(observed_at="2024-02-01T00:00:00Z"))
    assert prevalidate(raw) is None
    assert_sound(raw)


@pytest.mark.parametrize("depth", [1, 150, _DEEPEST])
def test_nesting_pydantic_takes_keeps_the_fast_path(depth: int) -> None:
    parse_heartbeat(_raw())
    raw = _nested(depth)
    assert isinstance(parse_heartbeat(raw), Heartbeat)
    assert prevalidate(raw) is not None


def test_a_valid_message_with_an_unknown_day_goes_the_long_way_once() -> None:
    raw = _raw(observed_at="2031-07-04T01:02:03Z")
    assert prevalidate(raw) is None
    assert isinstance(parse_heartbeat(raw), Heartbeat)
    quick = prevalidate(raw)
    assert quick is not None
    assert identity(quick) == ("org-1", "8.8.8.8", "agent-1", None)


def test_an_invalid_identity_is_returned_for_the_cache_to_refuse() -> None:
    raw = _raw(agent_id="not an identifier")
    parse_heartbeat(_raw())
    quick = prevalidate(raw)
    assert quick is not None
    assert identity(quick) == ("org-1", "8.8.8.8", "not an identifier", None)
    with pytest.raises(InvalidHeartbeat):
        parse_heartbeat(raw)
