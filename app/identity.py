"""Identity merging for the users table (pure, no I/O).

A :class:`UserRecord` is the value stored per primary key (e.g. the normalised email):
the Segment ``userId``/``anonymousId`` values seen for that person, first/last event time,
event counts, and ``fields_sent`` (the last value queued to Emarsys per field id, so an
unchanged field is not sent again), and ``audiences`` (Engage audience membership as last
queued to Emarsys, so a repeated entry or an exit of a non-member costs no call) with
``audiences_at`` (event time of the signal that decided it, so an older signal processed
later never overrides a newer one).

The functions here *mutate and return* the record they are given (no copies in the hot
path). ``to_dict()`` / ``from_dict()`` copy, so a stored dict never aliases a live record.

Id lists are ordered by recency of processing (the most recently seen id is last); an id
already present moves to the end; the list keeps at most ``max_ids`` ids, dropping the
oldest. Field values compare strictly (same type and equal), so ``1``, ``1.0``, ``True`` and
``"1"`` are all different values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "SCHEMA_VERSION",
    "UserRecord",
    "apply_event",
    "changed_fields",
    "forget_failed_audience",
    "forget_failed_fields",
    "mark_fields_queued",
    "set_audience_membership",
]

#: Version of the ``to_dict()`` shape written by this code.
SCHEMA_VERSION: Final = 1

_ABSENT: Final = object()


@dataclass(slots=True)
class UserRecord:
    primary_key: str
    user_ids: list[str]
    anonymous_ids: list[str]
    first_seen_ms: int
    last_seen_ms: int
    fields_sent: dict[str, Any]
    event_count: int = 0
    counts_by_type: dict[str, int] = field(default_factory=dict)
    created_in_emarsys: bool = False
    version: int = SCHEMA_VERSION
    #: Audience key -> member (True) or not (False), as last queued to Emarsys.
    audiences: dict[str, bool] = field(default_factory=dict)
    #: Audience key -> event time (epoch ms) of the signal that decided ``audiences``.
    audiences_at: dict[str, int] = field(default_factory=dict)
    #: Field id -> event time (epoch ms) of the newest event that set it, so an older
    #: event processed later (Segment topics are unkeyed: a person's events arrive through
    #: different partitions, in any order) cannot overwrite a newer value.
    fields_at: dict[str, int] = field(default_factory=dict)
    #: messageId -> wall time (epoch ms) it was first processed, oldest first: the
    #: contact's dedupe memory (``dedupe.window``, at most ``dedupe.max_ids_per_contact``).
    #: Kept in the record, not a table of its own, so a duplicate check costs no extra
    #: store read and remembering an event no extra changelog message.
    seen: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Stable JSON-ready shape (lists and dicts copied). Every key is always present
        except ``fields_at`` (once a mapped field was set), ``seen`` (messageIds within
        the dedupe window) and ``audiences`` /
        ``audiences_at``, which are written only once the contact
        has an audience signal (most contacts never do; older records stay byte-identical).
        """
        out = {
            "primary_key": self.primary_key,
            "user_ids": list(self.user_ids),
            "anonymous_ids": list(self.anonymous_ids),
            "first_seen_ms": self.first_seen_ms,
            "last_seen_ms": self.last_seen_ms,
            "fields_sent": dict(self.fields_sent),
            "event_count": self.event_count,
            "counts_by_type": dict(self.counts_by_type),
            "created_in_emarsys": self.created_in_emarsys,
            "version": self.version,
        }
        if self.audiences or self.audiences_at:
            out["audiences"] = dict(self.audiences)
            out["audiences_at"] = dict(self.audiences_at)
        if self.fields_at:
            out["fields_at"] = dict(self.fields_at)
        if self.seen:
            out["seen"] = dict(self.seen)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UserRecord:
        """Inverse of :meth:`to_dict`; tolerant to missing/unknown keys and wrong-typed entries.

        Only ``primary_key`` is required (``ValueError`` otherwise). Unknown keys are ignored
        (written by a newer version); ids that are not strings are dropped.
        """
        # Read for every event of a known contact: exact types (what orjson gives for a
        # stored record) are taken with one check each, anything else converted.
        get = data.get
        pk = get("primary_key")
        if not isinstance(pk, str) or not pk:
            raise ValueError("user record without a primary_key")
        first = _as_int(get("first_seen_ms"), 0)
        last = _as_int(get("last_seen_ms"), first)
        audiences = get("audiences")
        return cls(
            primary_key=pk,
            user_ids=_str_list(get("user_ids")),
            anonymous_ids=_str_list(get("anonymous_ids")),
            first_seen_ms=first,
            last_seen_ms=last,
            fields_sent=_str_key_map(get("fields_sent")),
            event_count=_as_int(get("event_count"), 0),
            counts_by_type=_int_map(get("counts_by_type")),
            created_in_emarsys=bool(get("created_in_emarsys", False)),
            version=_as_int(get("version"), SCHEMA_VERSION),
            audiences=(
                {str(k): v for k, v in audiences.items() if isinstance(v, bool)}
                if audiences is not None and isinstance(audiences, Mapping)
                else {}
            ),
            audiences_at=_int_map(get("audiences_at")),
            fields_at=_int_map(get("fields_at")),
            seen=_int_map(get("seen")),
        )


def _int_map(value: Any) -> dict[str, int]:
    """A str -> int mapping as stored; entries of other types become 0 (see _as_int)."""
    if type(value) is dict:
        # What orjson gives for a stored record: str keys and int values, checked in one
        # pass instead of converting entry by entry (``seen`` grows with every event).
        for k, v in value.items():
            if type(k) is not str or type(v) is not int:
                break
        else:
            return value.copy()
    elif value is None or not isinstance(value, Mapping):
        return {}
    return {str(k): _as_int(v, 0) for k, v in value.items()}


def _str_key_map(value: Any) -> dict[str, Any]:
    """A mapping with its keys as str (a copy); anything else is empty."""
    if type(value) is dict:
        for k in value:
            if type(k) is not str:
                break
        else:
            return value.copy()
    elif value is None or not isinstance(value, Mapping):
        return {}
    return {str(k): v for k, v in value.items()}


def _as_int(value: Any, default: int) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return default


def _str_list(value: Any) -> list[str]:
    """The non-empty str entries of a list or tuple (a copy); anything else is empty."""
    if type(value) is list:
        for v in value:
            if type(v) is not str or not v:
                break
        else:
            return value.copy()
    elif not isinstance(value, list | tuple):
        return []
    return [v for v in value if isinstance(v, str) and v]


def _push_id(ids: list[str], new_id: str, max_ids: int) -> None:
    if ids and ids[-1] == new_id:
        return
    try:
        ids.remove(new_id)
    except ValueError:
        pass
    ids.append(new_id)
    excess = len(ids) - max_ids
    if excess > 0:
        del ids[:excess]


def apply_event(
    record: UserRecord | None,
    pk: str,
    ev_type: str,
    user_id: str | None,
    anonymous_id: str | None,
    ts_ms: int,
    *,
    max_ids: int,
) -> UserRecord:
    """Create (``record is None``) or update the record for one event; returns it.

    ``ValueError`` if ``max_ids < 1`` or ``record.primary_key != pk``.
    """
    if max_ids < 1:
        raise ValueError(f"max_ids must be >= 1, got {max_ids}")
    if record is None:
        record = UserRecord(pk, [], [], ts_ms, ts_ms, {})
    elif record.primary_key != pk:
        raise ValueError("record belongs to another primary key")
    else:
        if ts_ms < record.first_seen_ms:
            record.first_seen_ms = ts_ms
        if ts_ms > record.last_seen_ms:
            record.last_seen_ms = ts_ms
    if user_id:
        _push_id(record.user_ids, user_id, max_ids)
    elif len(record.user_ids) > max_ids:
        del record.user_ids[: len(record.user_ids) - max_ids]
    if anonymous_id:
        _push_id(record.anonymous_ids, anonymous_id, max_ids)
    elif len(record.anonymous_ids) > max_ids:
        del record.anonymous_ids[: len(record.anonymous_ids) - max_ids]
    record.event_count += 1
    counts = record.counts_by_type
    counts[ev_type] = counts.get(ev_type, 0) + 1
    return record


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def changed_fields(record: UserRecord | None, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of ``fields`` whose value differs from what was last queued."""
    if record is None or not record.fields_sent:
        return dict(fields)
    sent = record.fields_sent
    return {k: v for k, v in fields.items() if not _same(sent.get(k, _ABSENT), v)}


def mark_fields_queued(record: UserRecord, fields: Mapping[str, Any]) -> None:
    """Remember ``fields`` as queued to Emarsys (so identical values are not sent again)."""
    record.fields_sent.update(fields)


def forget_failed_fields(record: UserRecord, fields: Mapping[str, Any]) -> None:
    """After a failed send: forget each field whose stored value is still the failed one.

    A field updated since (stored value differs) is kept, so a later event or retry resends
    the failed value only when it is still current.
    """
    sent = record.fields_sent
    for key, value in fields.items():
        if _same(sent.get(key, _ABSENT), value):
            del sent[key]


def set_audience_membership(
    record: UserRecord, audience: str, member: bool, ts_ms: int
) -> tuple[bool | None, bool] | None:
    """Apply an audience entry (``member``) or exit at event time ``ts_ms``.

    Returns ``None`` when the signal is older than the one that decided the current state
    (ignored, nothing changes), else ``(before, now)``: the membership before (``None`` if
    never known) and after. A list call is needed only when ``bool(before) != now``: a
    repeated entry and the exit of a contact that is not a member change nothing in Emarsys.
    Equal event times: the signal processed later wins.
    """
    decided_at = record.audiences_at.get(audience)
    if decided_at is not None and ts_ms < decided_at:
        return None
    before = record.audiences.get(audience)
    record.audiences[audience] = member
    record.audiences_at[audience] = ts_ms
    return before, member


def forget_failed_audience(record: UserRecord, audience: str, action: str) -> None:
    """After Emarsys refused a list call: undo the remembered membership if still current.

    A refused ``add`` forgets the membership (the next entry tries again); a refused
    ``delete`` marks the contact a member again (the next exit tries again). A state changed
    since (by a newer signal) is kept.
    """
    current = record.audiences.get(audience)
    if action == "add" and current is True:
        del record.audiences[audience]
    elif action == "delete" and current is False:
        record.audiences[audience] = True
