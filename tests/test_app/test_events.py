from __future__ import annotations

import hashlib
from typing import Any

import orjson
import pytest

from app.dead_letter import MAX_ERROR_CHARS, dead_letter_envelope, raw_bytes_from_envelope
from app.events import (
    EVENT_TYPES,
    REASONS,
    InvalidEvent,
    ValidEvent,
    coerce_id,
    event_ids,
    format_ts_ms,
    parse_iso8601_ms,
    validate_event,
)

T0 = 1_700_000_000_000  # 2023-11-14T22:13:20.000Z
KAFKA_TS = 1_600_000_000_000  # 2020-09-13T12:26:40.000Z
_DROP: Any = object()  # make(field=_DROP) removes the field


def make(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "track",
        "event": "Order Completed",
        "userId": "u1",
        "anonymousId": "a1",
        "messageId": "m-1",
        "timestamp": "2024-05-01T12:00:00.123Z",
        "properties": {"total": 10},
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not _DROP}


def ok(payload: dict[str, Any] | bytes, **kwargs: Any) -> ValidEvent:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    result = validate_event(raw, **kwargs)
    assert isinstance(result, ValidEvent), result
    return result


def bad(payload: dict[str, Any] | bytes | str, **kwargs: Any) -> InvalidEvent:
    if isinstance(payload, dict):
        raw = orjson.dumps(payload)
    elif isinstance(payload, str):
        raw = payload.encode()
    else:
        raw = payload
    result = validate_event(raw, **kwargs)
    assert isinstance(result, InvalidEvent), result
    assert result.reason in REASONS
    assert result.error
    return result


# -- happy path -----------------------------------------------------------------------------


def test_valid_track() -> None:
    ev = ok(make())
    assert ev.type == "track"
    assert ev.message_id == "m-1"
    assert ev.user_id == "u1"
    assert ev.anonymous_id == "a1"
    assert ev.ts_ms == parse_iso8601_ms("2024-05-01T12:00:00.123Z")
    assert ev.event["timestamp"] == "2024-05-01T12:00:00.123Z"
    assert ev.event["properties"] == {"total": 10}


@pytest.mark.parametrize("ev_type", sorted(EVENT_TYPES))
def test_every_type_valid(ev_type: str) -> None:
    ev = ok(make(type=ev_type, groupId="g1", previousId="p1"))
    assert ev.type == ev_type


def test_valid_event_to_payload() -> None:
    ev = ok(make())
    source = {"topic": "t", "partition": 1, "offset": 2, "timestamp": 3}
    assert ev.to_payload(source) == {"event": ev.event, "ts": ev.ts_ms, "source": source}


def test_only_anonymous_or_only_user_id() -> None:
    ev = ok(make(userId=_DROP))
    assert (ev.anonymous_id, ev.user_id) == ("a1", None)
    ev = ok(make(anonymousId=_DROP))
    assert (ev.anonymous_id, ev.user_id) == (None, "u1")
    ev = ok(make(anonymousId=None, userId="u2"))
    assert (ev.anonymous_id, ev.user_id) == (None, "u2")
    # A blank userId does not count, the anonymousId does.
    ev = ok(make(userId="  "))
    assert (ev.anonymous_id, ev.user_id) == ("a1", None)


def test_integer_ids_are_converted_and_written_back() -> None:
    ev = ok(make(userId=42, anonymousId=_DROP))
    assert ev.user_id == "42"
    assert ev.event["userId"] == "42"
    ev = ok(make(type="group", groupId=7))
    assert ev.event["groupId"] == "7"
    ev = ok(make(type="alias", previousId=9))
    assert ev.event["previousId"] == "9"


def test_as_received_when_normalisation_changes_nothing() -> None:
    raw = orjson.dumps(make())
    ev = ok(raw)
    assert ev.as_received
    assert orjson.loads(raw) == ev.event
    for ev_type, extra in (("group", {"groupId": "g1"}), ("alias", {"previousId": "p1"})):
        assert ok(make(type=ev_type, **extra)).as_received


@pytest.mark.parametrize(
    "fields",
    [
        {"userId": 42},  # written back as "42"
        {"anonymousId": 7, "userId": _DROP},
        {"messageId": _DROP},  # a synthetic one is written
        {"messageId": 123},
        {"timestamp": "2024-05-01T12:00:00.123+00:00"},  # same instant, other spelling
        {"timestamp": _DROP, "receivedAt": "2024-05-01T12:00:00.123Z"},
        {"type": "group", "groupId": 5},
        {"type": "alias", "previousId": 9},
    ],
)
def test_not_as_received_when_normalisation_wrote_something(fields: dict[str, Any]) -> None:
    raw = orjson.dumps(make(**fields))
    ev = ok(raw)
    assert not ev.as_received
    assert orjson.loads(raw) != ev.event


def test_ids_not_stripped() -> None:
    ev = ok(make(userId=" u1 "))
    assert ev.user_id == " u1 "


# -- each invalid reason --------------------------------------------------------------------


def test_too_large() -> None:
    event = make(properties={"blob": "x" * (32 * 1024)})
    assert bad(event).reason == "too_large"


def test_size_limit_is_inclusive() -> None:
    base = orjson.dumps(make(properties={"blob": ""}))
    pad = 32 * 1024 - len(base)
    raw = orjson.dumps(make(properties={"blob": "x" * pad}))
    assert len(raw) == 32 * 1024
    ok(raw)
    raw = orjson.dumps(make(properties={"blob": "x" * (pad + 1)}))
    assert bad(raw).reason == "too_large"
    assert bad(raw, max_bytes=10).reason == "too_large"
    assert isinstance(validate_event(raw, max_bytes=64 * 1024), ValidEvent)


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe{}",
        b'{"type": "track", "name": "caf\xe9"}',  # latin-1
        b'{"a": "\xed\xa0\x80"}',  # encoded surrogate
        b'{"a": "\xc3"}',  # truncated sequence
    ],
)
def test_not_utf8(raw: bytes) -> None:
    assert bad(raw).reason == "not_utf8"


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"not json", b'{"a": 1} {"b": 2}', b"{'a': 1}", b'{"a": NaN}', b'"\\ud800"'],
)
def test_invalid_json(raw: bytes) -> None:
    assert bad(raw).reason == "invalid_json"


@pytest.mark.parametrize("raw", [b"[]", b'[{"type": "track"}]', b'"str"', b"42", b"null", b"true"])
def test_not_an_object(raw: bytes) -> None:
    assert bad(raw).reason == "not_an_object"


@pytest.mark.parametrize(
    "ev_type", [_DROP, None, "", "Track", "TRACK", "batch", "foo", 1, ["track"]]
)
def test_invalid_type(ev_type: Any) -> None:
    result = bad(make(type=ev_type))
    assert result.reason == "invalid_type"


@pytest.mark.parametrize(
    ("anon", "user"),
    [
        (_DROP, _DROP),
        (None, None),
        ("", ""),
        ("  ", "\t"),
        (True, False),
        (1.5, {"id": 1}),
        ([], _DROP),
    ],
)
def test_missing_identity(anon: Any, user: Any) -> None:
    assert bad(make(anonymousId=anon, userId=user)).reason == "missing_identity"


@pytest.mark.parametrize("name", [_DROP, None, "", "   ", 5, {"x": 1}])
def test_track_missing_event(name: Any) -> None:
    assert bad(make(event=name)).reason == "track_missing_event"


def test_event_name_only_required_for_track() -> None:
    ok(make(type="page", event=_DROP))
    ok(make(type="identify", event=_DROP))


@pytest.mark.parametrize("group_id", [_DROP, None, "", " ", [1]])
def test_group_missing_group_id(group_id: Any) -> None:
    assert bad(make(type="group", groupId=group_id)).reason == "group_missing_group_id"


@pytest.mark.parametrize("previous_id", [_DROP, None, "", " ", {"a": 1}])
def test_alias_missing_previous_id(previous_id: Any) -> None:
    assert bad(make(type="alias", previousId=previous_id)).reason == "alias_missing_previous_id"


@pytest.mark.parametrize("field", ["timestamp", "originalTimestamp", "sentAt", "receivedAt"])
@pytest.mark.parametrize(
    "value", ["yesterday", "2024-13-01T00:00:00Z", "2024-01-01T25:00:00Z", 5, {}]
)
def test_invalid_timestamp(field: str, value: Any) -> None:
    result = bad(make(**{field: value}))
    assert result.reason == "invalid_timestamp"
    assert field in result.error


def test_invalid_timestamp_out_of_range_after_skew_correction() -> None:
    event = make(
        originalTimestamp="9999-12-31T23:59:59Z",
        sentAt="0001-01-01T00:00:00Z",
        receivedAt="9999-12-31T00:00:00Z",
    )
    assert bad(event).reason == "invalid_timestamp"


def test_invalid_message_id() -> None:
    assert bad(make(messageId="m" * 101)).reason == "invalid_message_id"
    assert bad(make(messageId=["m"])).reason == "invalid_message_id"
    assert bad(make(messageId=1.5)).reason == "invalid_message_id"
    assert bad(make(messageId=True)).reason == "invalid_message_id"
    assert ok(make(messageId="m" * 100)).message_id == "m" * 100


def test_reason_check_order() -> None:
    # not an object beats everything else; type beats identity; identity beats track event.
    assert bad(make(type="nope", userId=_DROP, anonymousId=_DROP)).reason == "invalid_type"
    assert bad(make(userId=_DROP, anonymousId=_DROP, event=_DROP)).reason == "missing_identity"
    assert bad(make(event=_DROP, messageId="m" * 200)).reason == "track_missing_event"
    assert bad(make(messageId="m" * 200, timestamp="bad")).reason == "invalid_message_id"


def test_reasons_constant_lists_every_reason() -> None:
    assert set(REASONS) == {
        "too_large",
        "not_utf8",
        "invalid_json",
        "not_an_object",
        "invalid_type",
        "missing_identity",
        "track_missing_event",
        "group_missing_group_id",
        "alias_missing_previous_id",
        "invalid_timestamp",
        "invalid_message_id",
    }


# -- messageId ------------------------------------------------------------------------------


@pytest.mark.parametrize("mid", [_DROP, None, "", "   "])
def test_synthetic_message_id_is_deterministic(mid: Any) -> None:
    raw = orjson.dumps(make(messageId=mid))
    first = ok(raw)
    second = ok(raw)
    expected = "synthetic-" + hashlib.sha1(raw).hexdigest()
    assert first.message_id == second.message_id == expected
    assert first.event["messageId"] == expected
    other = ok(make(messageId=mid, event="Other"))
    assert other.message_id != expected


def test_integer_message_id() -> None:
    ev = ok(make(messageId=12345))
    assert ev.message_id == "12345"
    assert ev.event["messageId"] == "12345"


# -- timestamps -----------------------------------------------------------------------------


def test_skew_correction_like_segment() -> None:
    # Device clock one hour behind: the call was made 5 s before the device sent it and
    # reached Segment 0.5 s later. timestamp = receivedAt - (sentAt - originalTimestamp).
    event = make(
        timestamp=_DROP,
        originalTimestamp="2024-05-01T09:00:00.000Z",
        sentAt="2024-05-01T09:00:05.000Z",
        receivedAt="2024-05-01T10:00:05.500Z",
    )
    ev = ok(event)
    assert ev.event["timestamp"] == "2024-05-01T10:00:00.500Z"
    assert ev.ts_ms == parse_iso8601_ms("2024-05-01T10:00:00.500Z")


# The second timestamp is already in the written form: skew correction still decides.
@pytest.mark.parametrize("timestamp", ["2000-01-01T00:00:00Z", "2024-05-01T09:00:00.000Z"])
def test_skew_correction_wins_over_timestamp(timestamp: str) -> None:
    event = make(
        timestamp=timestamp,
        originalTimestamp="2024-05-01T09:00:00.000Z",
        sentAt="2024-05-01T09:00:01.000Z",
        receivedAt="2024-05-01T09:00:02.250Z",
    )
    ev = ok(event)
    assert ev.event["timestamp"] == "2024-05-01T09:00:01.250Z"
    assert not ev.as_received


def test_skew_with_mixed_offsets() -> None:
    event = make(
        timestamp=_DROP,
        originalTimestamp="2024-05-01T11:00:00.000+02:00",  # 09:00Z
        sentAt="2024-05-01T09:00:01Z",
        receivedAt="2024-05-01T05:00:03-04:00",  # 09:00:03Z
    )
    assert ok(event).event["timestamp"] == "2024-05-01T09:00:02.000Z"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {
                "timestamp": "2024-01-01T00:00:01Z",
                "receivedAt": "2024-01-01T00:00:02Z",
                "originalTimestamp": "2024-01-01T00:00:03Z",
            },
            "2024-01-01T00:00:01.000Z",
        ),
        (
            {
                "receivedAt": "2024-01-01T00:00:02Z",
                "originalTimestamp": "2024-01-01T00:00:03Z",
                "sentAt": None,
            },
            "2024-01-01T00:00:02.000Z",
        ),
        (
            {"receivedAt": "2024-01-01T00:00:02Z", "sentAt": "2024-01-01T00:00:05Z"},
            "2024-01-01T00:00:02.000Z",
        ),
        ({"originalTimestamp": "2024-01-01T00:00:03Z"}, "2024-01-01T00:00:03.000Z"),
        (
            {"originalTimestamp": "2024-01-01T00:00:03Z", "timestamp": ""},
            "2024-01-01T00:00:03.000Z",
        ),
        ({"sentAt": "2024-01-01T00:00:04Z"}, "2020-09-13T12:26:40.000Z"),  # sentAt alone unused
        ({}, "2020-09-13T12:26:40.000Z"),
    ],
)
def test_timestamp_precedence(fields: dict[str, Any], expected: str) -> None:
    event = make(timestamp=_DROP)
    event.update(fields)
    ev = ok(event, fallback_ts_ms=KAFKA_TS)
    assert ev.event["timestamp"] == expected
    assert ev.ts_ms == parse_iso8601_ms(expected)


def test_fallback_to_wall_clock_without_kafka_timestamp() -> None:
    import time

    before = time.time_ns() // 1_000_000
    ev = ok(make(timestamp=_DROP))
    after = time.time_ns() // 1_000_000
    assert before <= ev.ts_ms <= after
    ev = ok(make(timestamp=_DROP), fallback_ts_ms=-1)
    assert ev.ts_ms >= before


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("2024-05-01T12:00:00Z", "2024-05-01T12:00:00.000Z"),
        ("2024-05-01T12:00:00.1Z", "2024-05-01T12:00:00.100Z"),
        ("2024-05-01T12:00:00.123456789Z", "2024-05-01T12:00:00.123Z"),
        ("2024-05-01T12:00:00.999999Z", "2024-05-01T12:00:00.999Z"),
        ("2024-05-01T14:30:00+02:30", "2024-05-01T12:00:00.000Z"),
        ("2024-05-01T07:00:00.000-0500", "2024-05-01T12:00:00.000Z"),
        ("2024-05-01T12:00:00", "2024-05-01T12:00:00.000Z"),  # naive -> UTC
        ("2024-05-01 12:00:00", "2024-05-01T12:00:00.000Z"),
        ("2024-05-01", "2024-05-01T00:00:00.000Z"),
        ("2024-05-01T00:30:00+01:00", "2024-04-30T23:30:00.000Z"),
        ("1969-12-31T23:59:59.999Z", "1969-12-31T23:59:59.999Z"),
        # The canonical length and punctuation, another spelling (ISO week date).
        ("2024-W18-3T12:00:00.123Z", "2024-05-01T12:00:00.123Z"),
    ],
)
def test_timestamp_formats(text: str, normalised: str) -> None:
    ev = ok(make(timestamp=text))
    assert ev.event["timestamp"] == normalised
    assert format_ts_ms(ev.ts_ms) == normalised


def test_canonical_timestamp_kept_exactly_as_formatting_would_write_it() -> None:
    """A timestamp already in the written form is not formatted again: what it keeps
    must be what formatting its time gives, across the whole range of years."""
    import random

    rng = random.Random(5)
    lo, hi = parse_iso8601_ms("0001-01-01T00:00:00Z"), parse_iso8601_ms("9999-12-31T23:59:59.999Z")
    for ms in [lo, hi, -1, 0, 1, *(rng.randrange(lo, hi + 1) for _ in range(2000))]:
        text = format_ts_ms(ms)
        ev = ok(make(timestamp=text))
        assert (ev.event["timestamp"], ev.ts_ms, ev.as_received) == (text, ms, True)


def test_parse_and_format_helpers() -> None:
    assert parse_iso8601_ms("1970-01-01T00:00:00Z") == 0
    assert parse_iso8601_ms("1970-01-01T00:00:00.001Z") == 1
    assert parse_iso8601_ms("1969-12-31T23:59:59.999Z") == -1
    assert parse_iso8601_ms("2023-11-14T22:13:20Z") == T0
    assert format_ts_ms(T0) == "2023-11-14T22:13:20.000Z"
    assert format_ts_ms(0) == "1970-01-01T00:00:00.000Z"
    assert format_ts_ms(-1) == "1969-12-31T23:59:59.999Z"
    for ms in (0, 1, 999, T0 + 7, KAFKA_TS + 123):
        assert parse_iso8601_ms(format_ts_ms(ms)) == ms
    with pytest.raises(ValueError):
        parse_iso8601_ms("nope")
    with pytest.raises(OverflowError):
        format_ts_ms(10**18)


def test_event_object_is_not_copied_only_normalised() -> None:
    event = make(timestamp="2024-05-01T14:00:00+02:00", context={"ip": "1.2.3.4"})
    ev = ok(event)
    expected = dict(event, timestamp="2024-05-01T12:00:00.000Z")
    assert ev.event == expected


# -- id helpers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("abc", "abc"),
        (" abc ", " abc "),
        ("", None),
        ("  ", None),
        (None, None),
        (0, "0"),
        (123, "123"),
        (True, None),
        (1.5, None),
        ({}, None),
    ],
)
def test_coerce_id(value: Any, expected: str | None) -> None:
    assert coerce_id(value) == expected


def test_event_ids() -> None:
    assert event_ids({"anonymousId": "a", "userId": 5}) == ("a", "5")
    assert event_ids({}) == (None, None)


# -- dead-letter envelopes (app/dead_letter.py) ---------------------------------------------

SOURCE = {"topic": "segment.events", "partition": 3, "offset": 42, "timestamp": KAFKA_TS}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b'{"type": "track"}',
        '{"name": "caf\u00e9 \u2603 \U0001f600"}'.encode(),
        b"line1\r\nline2\x00\x1f",
        b"\xff\xfe\x00binary",
        b'{"a": "\xed\xa0\x80"}',
        bytes(range(256)),
        b"\xc3",
    ],
)
def test_dead_letter_round_trip(raw: bytes) -> None:
    env = dead_letter_envelope("invalid_json", "boom", raw, SOURCE)
    assert set(env) == {"reason", "error", "source", "raw", "raw_base64"}
    assert env["reason"] == "invalid_json" and env["error"] == "boom"
    assert env["source"] == SOURCE and env["source"] is not SOURCE
    assert isinstance(env["raw"], str)
    assert raw_bytes_from_envelope(env) == raw
    # Also after serialising the envelope as it travels on the dead-letter topic.
    assert raw_bytes_from_envelope(orjson.loads(orjson.dumps(env))) == raw


def test_dead_letter_text_vs_base64() -> None:
    env = dead_letter_envelope("x", "e", b'{"a": 1}', SOURCE)
    assert env["raw"] == '{"a": 1}' and env["raw_base64"] is False
    env = dead_letter_envelope("x", "e", b"\xff", SOURCE)
    assert env["raw"] == "/w==" and env["raw_base64"] is True


def test_dead_letter_for_every_invalid_reason_from_validate() -> None:
    raw = b'{"type": "track", "anonymousId": "a", "event": "x", "timestamp": "bad"}'
    result = validate_event(raw)
    assert isinstance(result, InvalidEvent)
    env = dead_letter_envelope(result.reason, result.error, raw, SOURCE)
    assert env["reason"] == "invalid_timestamp"
    assert raw_bytes_from_envelope(env) == raw


def test_dead_letter_long_error_is_cut() -> None:
    env = dead_letter_envelope("x", "e" * 10_000, b"", SOURCE)
    assert len(env["error"]) == MAX_ERROR_CHARS and env["error"].endswith("...")


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"raw": 5, "raw_base64": False},
        {"raw": "abc", "raw_base64": "yes"},
        {"raw": "not base64!", "raw_base64": True},
        {"raw": "caf\u00e9", "raw_base64": True},
        {"raw": "\ud800", "raw_base64": False},
    ],
)
def test_raw_bytes_from_malformed_envelope(env: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        raw_bytes_from_envelope(env)


def test_raw_bytes_from_envelope_defaults_to_text() -> None:
    assert raw_bytes_from_envelope({"raw": "hi"}) == b"hi"
