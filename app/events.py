"""Validation and normalisation of raw Segment events read from Kafka (pure, no I/O).

``validate_event(raw, fallback_ts_ms=kafka_message_timestamp)`` returns either a
:class:`ValidEvent` (the parsed object, normalised in place) or an
:class:`InvalidEvent` whose ``reason`` is one of :data:`REASONS` (a dead-letter reason).

Rules, checked in this order (the first failure wins):

==========================  ==================================================================
reason                      when
==========================  ==================================================================
``too_large``               more than ``max_bytes`` bytes (Segment's limit is 32 KB a call)
``not_utf8``                bytes are not valid UTF-8
``invalid_json``            not a single JSON document
``not_an_object``           the JSON value is not an object
``invalid_type``            ``type`` is not one of identify/track/page/screen/group/alias
                            (exact, lower case, as Segment sends it)
``missing_identity``        neither ``anonymousId`` nor ``userId`` is usable
``track_missing_event``     a track without a non-blank ``event`` string
``group_missing_group_id``  a group without ``groupId``
``alias_missing_previous_id`` an alias without ``previousId``
``invalid_message_id``      ``messageId`` longer than 100 characters or not a string/integer
``invalid_timestamp``       ``timestamp``/``originalTimestamp``/``sentAt``/``receivedAt`` is
                            present but not an ISO-8601 string, or the result is out of range
==========================  ==================================================================

Normalisation (written back into the parsed object, which is not copied):

* Ids (``anonymousId``, ``userId``, ``groupId``, ``previousId``): Segment specifies strings.
  A non-blank string is used as is (not stripped); an integer (not a bool) is accepted and
  converted with ``str()`` *and written back*, so downstream code sees strings only. Blank
  strings, ``null`` and other types count as absent (:func:`coerce_id`).
* ``messageId``: absent, ``null`` or blank -> a deterministic
  ``"synthetic-" + sha1(raw bytes).hexdigest()`` is written back, so a re-delivered copy of
  the same bytes de-duplicates. An integer is converted to ``str``.
* ``timestamp``: per Segment, if ``receivedAt``, ``sentAt`` and ``originalTimestamp`` are all
  present, ``receivedAt - (sentAt - originalTimestamp)`` (client clock-skew correction); else
  ``timestamp``; else ``receivedAt``; else ``originalTimestamp``; else ``fallback_ts_ms`` (the
  Kafka message timestamp; if that is ``None`` or negative, the wall clock). The result is
  written back as ``event["timestamp"] = "YYYY-MM-DDTHH:MM:SS.mmmZ"`` and returned as
  ``ts_ms`` (epoch milliseconds). Naive datetimes are taken as UTC; ``null`` or ``""`` counts
  as absent.

``ValidEvent.as_received`` says that normalisation changed nothing: the raw bytes then
decode to the very object validated, and the ingest stage passes them on instead of
encoding the object again.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson

__all__ = [
    "DEFAULT_MAX_BYTES",
    "EVENT_TYPES",
    "MAX_MESSAGE_ID_LENGTH",
    "REASONS",
    "InvalidEvent",
    "ValidEvent",
    "coerce_id",
    "event_ids",
    "format_ts_ms",
    "parse_iso8601_ms",
    "validate_event",
]

DEFAULT_MAX_BYTES: Final = 32 * 1024
MAX_MESSAGE_ID_LENGTH: Final = 100
EVENT_TYPES: Final = frozenset({"identify", "track", "page", "screen", "group", "alias"})

TOO_LARGE: Final = "too_large"
NOT_UTF8: Final = "not_utf8"
INVALID_JSON: Final = "invalid_json"
NOT_AN_OBJECT: Final = "not_an_object"
INVALID_TYPE: Final = "invalid_type"
MISSING_IDENTITY: Final = "missing_identity"
TRACK_MISSING_EVENT: Final = "track_missing_event"
GROUP_MISSING_GROUP_ID: Final = "group_missing_group_id"
ALIAS_MISSING_PREVIOUS_ID: Final = "alias_missing_previous_id"
INVALID_TIMESTAMP: Final = "invalid_timestamp"
INVALID_MESSAGE_ID: Final = "invalid_message_id"

#: Every reason :func:`validate_event` can return, in check order.
REASONS: Final = (
    TOO_LARGE,
    NOT_UTF8,
    INVALID_JSON,
    NOT_AN_OBJECT,
    INVALID_TYPE,
    MISSING_IDENTITY,
    TRACK_MISSING_EVENT,
    GROUP_MISSING_GROUP_ID,
    ALIAS_MISSING_PREVIOUS_ID,
    INVALID_MESSAGE_ID,
    INVALID_TIMESTAMP,
)

_EPOCH_NAIVE: Final = datetime(1970, 1, 1)
_EPOCH_AWARE: Final = datetime(1970, 1, 1, tzinfo=UTC)
_TS_FIELDS: Final = ("timestamp", "originalTimestamp", "sentAt", "receivedAt")
#: What :func:`format_ts_ms` writes. A ``timestamp`` of this form that parsed is given
#: back unchanged by formatting its own time (every field is digits of a fixed width,
#: in range since it parsed), so it is kept without formatting it again.
_CANONICAL_TS: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@dataclass(slots=True)
class ValidEvent:
    """A valid event. ``event`` is the parsed object itself (normalised in place, not copied)."""

    event: dict[str, Any]
    type: str
    message_id: str
    anonymous_id: str | None
    user_id: str | None
    ts_ms: int
    #: Normalisation wrote nothing back: ``raw`` decodes to ``event`` as it is now.
    as_received: bool = False

    def to_payload(self, source: dict[str, Any]) -> dict[str, Any]:
        """The normalised-event value for internal topics: ``{"event", "ts", "source"}``."""
        return {"event": self.event, "ts": self.ts_ms, "source": source}


@dataclass(frozen=True, slots=True)
class InvalidEvent:
    """An event to dead-letter: ``reason`` is one of :data:`REASONS`, ``error`` is for humans."""

    reason: str
    error: str


def parse_iso8601_ms(value: str) -> int:
    """Epoch milliseconds (floor) of an ISO-8601 date/datetime; naive means UTC.

    Accepts what ``datetime.fromisoformat`` accepts in Python 3.11 (``Z``, ``+hh:mm``,
    ``+hhmm``, any number of fraction digits, a date alone). Raises ``ValueError``.
    """
    dt = datetime.fromisoformat(value)
    td = dt - (_EPOCH_NAIVE if dt.tzinfo is None else _EPOCH_AWARE)
    return (td.days * 86_400 + td.seconds) * 1000 + td.microseconds // 1000


def format_ts_ms(ts_ms: int) -> str:
    """``'YYYY-MM-DDTHH:MM:SS.mmmZ'`` (UTC). Raises ``OverflowError`` outside years 1..9999."""
    return (_EPOCH_NAIVE + timedelta(milliseconds=ts_ms)).isoformat(timespec="milliseconds") + "Z"


def coerce_id(value: Any) -> str | None:
    """An id as Segment means it: non-blank ``str`` as is, ``int`` (not bool) -> ``str``."""
    if type(value) is str:
        return None if not value or value.isspace() else value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def event_ids(event: dict[str, Any]) -> tuple[str | None, str | None]:
    """``(anonymous_id, user_id)`` of a (normalised) event, using the rules of :func:`coerce_id`."""
    return coerce_id(event.get("anonymousId")), coerce_id(event.get("userId"))


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _coerce_id_in_place(event: dict[str, Any], key: str) -> str | None:
    """The id under ``key`` (see :func:`coerce_id`); an integer is written back as ``str``
    (``event[key] is not`` the value read before tells the caller)."""
    value = event.get(key)
    if type(value) is str:
        return None if not value or value.isspace() else value
    result = coerce_id(value)
    if result is not None:
        event[key] = result
    return result


def _event_time_ms(
    event: dict[str, Any], fallback_ts_ms: int | None, parsed: dict[str, int]
) -> int | InvalidEvent:
    """The event time; ``parsed`` receives each timestamp field's own time."""
    for field in _TS_FIELDS:
        value = event.get(field)
        if value is None or value == "":
            continue
        if type(value) is not str:
            return InvalidEvent(
                INVALID_TIMESTAMP, f"{field} must be an ISO-8601 string, got {_short(value)}"
            )
        try:
            parsed[field] = parse_iso8601_ms(value)
        except ValueError:
            return InvalidEvent(
                INVALID_TIMESTAMP, f"{field} is not an ISO-8601 timestamp: {_short(value)}"
            )
    received = parsed.get("receivedAt")
    sent = parsed.get("sentAt")
    original = parsed.get("originalTimestamp")
    if received is not None and sent is not None and original is not None:
        return received - (sent - original)
    for field in ("timestamp", "receivedAt", "originalTimestamp"):
        ts = parsed.get(field)
        if ts is not None:
            return ts
    if fallback_ts_ms is not None and fallback_ts_ms >= 0:
        return fallback_ts_ms
    return time.time_ns() // 1_000_000


def validate_event(
    raw: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    fallback_ts_ms: int | None = None,
) -> ValidEvent | InvalidEvent:
    """Validate one raw Segment event; see the module docstring for every rule."""
    size = len(raw)
    if size > max_bytes:
        return InvalidEvent(TOO_LARGE, f"payload is {size} bytes (max {max_bytes})")
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            bytes(raw).decode("utf-8")
        except UnicodeDecodeError as uexc:
            return InvalidEvent(NOT_UTF8, f"not valid UTF-8: {uexc.reason} at byte {uexc.start}")
        return InvalidEvent(INVALID_JSON, f"not valid JSON: {exc}")
    if type(event) is not dict:
        return InvalidEvent(NOT_AN_OBJECT, f"JSON value is a {type(event).__name__}, not an object")

    ev_type = event.get("type")
    if type(ev_type) is not str or ev_type not in EVENT_TYPES:
        return InvalidEvent(
            INVALID_TYPE,
            f"type must be one of {', '.join(sorted(EVENT_TYPES))}; got {_short(ev_type)}",
        )

    ids_before = (event.get("anonymousId"), event.get("userId"))
    anonymous_id = _coerce_id_in_place(event, "anonymousId")
    user_id = _coerce_id_in_place(event, "userId")
    as_received = event.get("anonymousId") is ids_before[0] and event.get("userId") is ids_before[1]
    if anonymous_id is None and user_id is None:
        return InvalidEvent(
            MISSING_IDENTITY, "neither anonymousId nor userId is a non-empty string"
        )

    if ev_type == "track":
        name = event.get("event")
        if type(name) is not str or not name or name.isspace():
            return InvalidEvent(TRACK_MISSING_EVENT, "track without a non-empty event name")
    elif ev_type == "group":
        before = event.get("groupId")
        if _coerce_id_in_place(event, "groupId") is None:
            return InvalidEvent(GROUP_MISSING_GROUP_ID, "group without groupId")
        as_received = as_received and event["groupId"] is before
    elif ev_type == "alias":
        before = event.get("previousId")
        if _coerce_id_in_place(event, "previousId") is None:
            return InvalidEvent(ALIAS_MISSING_PREVIOUS_ID, "alias without previousId")
        as_received = as_received and event["previousId"] is before

    message_id = event.get("messageId")
    if type(message_id) is str and message_id and not message_id.isspace():
        if len(message_id) > MAX_MESSAGE_ID_LENGTH:
            return InvalidEvent(
                INVALID_MESSAGE_ID,
                f"messageId is {len(message_id)} characters (max {MAX_MESSAGE_ID_LENGTH})",
            )
    elif message_id is None or type(message_id) is str:
        message_id = "synthetic-" + hashlib.sha1(raw, usedforsecurity=False).hexdigest()
        event["messageId"] = message_id
        as_received = False
    elif isinstance(message_id, int) and not isinstance(message_id, bool):
        message_id = str(message_id)
        if len(message_id) > MAX_MESSAGE_ID_LENGTH:
            return InvalidEvent(
                INVALID_MESSAGE_ID,
                f"messageId is {len(message_id)} characters (max {MAX_MESSAGE_ID_LENGTH})",
            )
        event["messageId"] = message_id
        as_received = False
    else:
        return InvalidEvent(
            INVALID_MESSAGE_ID, f"messageId must be a string, got {type(message_id).__name__}"
        )

    parsed: dict[str, int] = {}
    ts = _event_time_ms(event, fallback_ts_ms, parsed)
    if isinstance(ts, InvalidEvent):
        return ts
    stamp = event.get("timestamp")
    if (
        parsed.get("timestamp") != ts
        or type(stamp) is not str
        or not _CANONICAL_TS.fullmatch(stamp)
    ):
        try:
            timestamp = format_ts_ms(ts)
        except OverflowError:
            return InvalidEvent(INVALID_TIMESTAMP, f"event time {ts} ms is out of range")
        if stamp != timestamp:
            event["timestamp"] = timestamp
            as_received = False

    return ValidEvent(event, ev_type, message_id, anonymous_id, user_id, ts, as_received)
