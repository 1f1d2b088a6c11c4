from __future__ import annotations

from typing import Any

import orjson
import pytest

from app.identity import (
    SCHEMA_VERSION,
    UserRecord,
    apply_event,
    changed_fields,
    forget_failed_fields,
    mark_fields_queued,
)

PK = "ann@example.com"


def new(max_ids: int = 5, **kwargs: Any) -> UserRecord:
    args: dict[str, Any] = {
        "ev_type": "identify",
        "user_id": "u1",
        "anonymous_id": "a1",
        "ts_ms": 1000,
    }
    args.update(kwargs)
    return apply_event(None, PK, max_ids=max_ids, **args)


# -- apply_event ----------------------------------------------------------------------------


def test_create() -> None:
    rec = new()
    assert rec == UserRecord(
        primary_key=PK,
        user_ids=["u1"],
        anonymous_ids=["a1"],
        first_seen_ms=1000,
        last_seen_ms=1000,
        fields_sent={},
        event_count=1,
        counts_by_type={"identify": 1},
        created_in_emarsys=False,
        version=SCHEMA_VERSION,
    )


def test_create_without_ids() -> None:
    rec = new(user_id=None, anonymous_id=None)
    assert rec.user_ids == [] and rec.anonymous_ids == []
    rec = new(user_id="", anonymous_id="")
    assert rec.user_ids == [] and rec.anonymous_ids == []


def test_update_mutates_and_returns_same_record() -> None:
    rec = new()
    again = apply_event(rec, PK, "track", None, "a2", 2000, max_ids=5)
    assert again is rec
    assert rec.user_ids == ["u1"]
    assert rec.anonymous_ids == ["a1", "a2"]
    assert rec.event_count == 2
    assert rec.counts_by_type == {"identify": 1, "track": 1}


def test_seen_times_are_min_and_max_with_out_of_order_events() -> None:
    rec = new(ts_ms=5000)
    apply_event(rec, PK, "track", None, None, 3000, max_ids=5)
    apply_event(rec, PK, "track", None, None, 9000, max_ids=5)
    apply_event(rec, PK, "page", None, None, 4000, max_ids=5)
    assert (rec.first_seen_ms, rec.last_seen_ms) == (3000, 9000)
    assert rec.event_count == 4
    assert rec.counts_by_type == {"identify": 1, "track": 2, "page": 1}


def test_ids_deduplicated_most_recent_last() -> None:
    rec = new(user_id="u1", anonymous_id="a1")
    for uid in ["u2", "u3", "u1", "u1", "u2"]:
        apply_event(rec, PK, "track", uid, None, 2000, max_ids=5)
    assert rec.user_ids == ["u3", "u1", "u2"]
    assert len(rec.user_ids) == len(set(rec.user_ids))


def test_ids_bounded_by_dropping_oldest() -> None:
    rec = new(max_ids=3, user_id=None, anonymous_id="a0")
    for i in range(1, 6):
        apply_event(rec, PK, "track", None, f"a{i}", 1000 + i, max_ids=3)
    assert rec.anonymous_ids == ["a3", "a4", "a5"]
    # Re-seeing an id that is still kept moves it to the end without dropping anything.
    apply_event(rec, PK, "track", None, "a3", 2000, max_ids=3)
    assert rec.anonymous_ids == ["a4", "a5", "a3"]
    # A dropped id comes back as new and pushes out the oldest.
    apply_event(rec, PK, "track", None, "a0", 2001, max_ids=3)
    assert rec.anonymous_ids == ["a5", "a3", "a0"]


def test_lowered_max_ids_trims_existing_lists() -> None:
    rec = new(max_ids=5)
    for i in range(2, 6):
        apply_event(rec, PK, "track", f"u{i}", f"a{i}", 1000, max_ids=5)
    apply_event(rec, PK, "track", "u9", None, 1000, max_ids=2)
    assert rec.user_ids == ["u5", "u9"]
    assert rec.anonymous_ids == ["a4", "a5"]


def test_apply_event_errors() -> None:
    with pytest.raises(ValueError, match="max_ids"):
        new(max_ids=0)
    rec = new()
    with pytest.raises(ValueError, match="another primary key"):
        apply_event(rec, "other@example.com", "track", None, None, 1, max_ids=5)


# -- to_dict / from_dict --------------------------------------------------------------------


def full_record() -> UserRecord:
    rec = new()
    apply_event(rec, PK, "track", "u2", "a2", 3000, max_ids=5)
    mark_fields_queued(rec, {"1": "Ann", "31": 1, "4": "1990-05-01"})
    rec.created_in_emarsys = True
    return rec


def test_to_dict_shape_is_stable() -> None:
    d = full_record().to_dict()
    assert list(d) == [
        "primary_key",
        "user_ids",
        "anonymous_ids",
        "first_seen_ms",
        "last_seen_ms",
        "fields_sent",
        "event_count",
        "counts_by_type",
        "created_in_emarsys",
        "version",
    ]
    assert d == {
        "primary_key": PK,
        "user_ids": ["u1", "u2"],
        "anonymous_ids": ["a1", "a2"],
        "first_seen_ms": 1000,
        "last_seen_ms": 3000,
        "fields_sent": {"1": "Ann", "31": 1, "4": "1990-05-01"},
        "event_count": 2,
        "counts_by_type": {"identify": 1, "track": 1},
        "created_in_emarsys": True,
        "version": 1,
    }


def test_round_trip_through_json() -> None:
    rec = full_record()
    back = UserRecord.from_dict(orjson.loads(orjson.dumps(rec.to_dict())))
    assert back == rec


def test_seen_is_written_once_there_is_one_and_keeps_its_order() -> None:
    rec = full_record()
    rec.seen.update({"m9": 5, "m1": 7})
    d = orjson.loads(orjson.dumps(rec.to_dict()))
    assert list(d["seen"].items()) == [("m9", 5), ("m1", 7)]
    back = UserRecord.from_dict(d)
    assert list(back.seen) == ["m9", "m1"] and back == rec
    assert UserRecord.from_dict({"primary_key": PK, "seen": [1]}).seen == {}


def test_to_dict_and_from_dict_copy() -> None:
    rec = full_record()
    d = rec.to_dict()
    apply_event(rec, PK, "track", "u3", None, 4000, max_ids=5)
    mark_fields_queued(rec, {"2": "Smith"})
    assert d["user_ids"] == ["u1", "u2"]
    assert "2" not in d["fields_sent"]
    back = UserRecord.from_dict(d)
    apply_event(back, PK, "track", "u9", None, 4000, max_ids=5)
    mark_fields_queued(back, {"9": "x"})
    assert d["user_ids"] == ["u1", "u2"]
    assert "9" not in d["fields_sent"]


def test_from_dict_tolerates_missing_and_unknown_keys() -> None:
    rec = UserRecord.from_dict({"primary_key": PK, "added_in_v2": {"x": 1}})
    assert rec == UserRecord(PK, [], [], 0, 0, {})
    assert rec.version == SCHEMA_VERSION
    rec = UserRecord.from_dict({"primary_key": PK, "first_seen_ms": 50})
    assert (rec.first_seen_ms, rec.last_seen_ms) == (50, 50)


def test_from_dict_tolerates_wrong_types() -> None:
    rec = UserRecord.from_dict(
        {
            "primary_key": PK,
            "user_ids": ["u1", 5, None, "", "u2"],
            "anonymous_ids": "not-a-list",
            "first_seen_ms": 10.0,
            "last_seen_ms": "x",
            "fields_sent": [1, 2],
            "event_count": True,
            "counts_by_type": {"track": 2, "page": "x"},
            "created_in_emarsys": 1,
            "version": 2,
        }
    )
    assert rec.user_ids == ["u1", "u2"]
    assert rec.anonymous_ids == []
    assert (rec.first_seen_ms, rec.last_seen_ms) == (10, 10)
    assert rec.fields_sent == {}
    assert rec.event_count == 0
    assert rec.counts_by_type == {"track": 2, "page": 0}
    assert rec.created_in_emarsys is True
    assert rec.version == 2


def test_from_dict_converts_what_orjson_would_never_give() -> None:
    """Python-built input (the fast path takes only exact orjson types) is converted."""
    from types import MappingProxyType

    rec = UserRecord.from_dict(
        {
            "primary_key": PK,
            "user_ids": ("u1", "", 3, "u2"),
            "anonymous_ids": ["a1", ""],
            "fields_sent": {1: "Ann", "2": "Smith"},
            "counts_by_type": MappingProxyType({"track": 3}),
            "seen": {"m1": True, "m2": 2.0, 3: 4},
            "audiences_at": None,
            "event_count": 7.0,
            "version": False,
        }
    )
    assert (rec.user_ids, rec.anonymous_ids) == (["u1", "u2"], ["a1"])
    assert rec.fields_sent == {"1": "Ann", "2": "Smith"}
    assert rec.counts_by_type == {"track": 3}
    assert rec.seen == {"m1": 0, "m2": 2, "3": 4}
    assert rec.audiences_at == {}
    assert (rec.event_count, rec.version) == (7, SCHEMA_VERSION)
    stored = {"primary_key": PK, "user_ids": ["u1"], "seen": {"m1": 1}, "fields_sent": {"1": 2}}
    back = UserRecord.from_dict(stored)
    back.user_ids.append("u9")
    back.seen["m2"] = 2
    back.fields_sent["3"] = 4
    assert stored == {"primary_key": PK, "user_ids": ["u1"], "seen": {"m1": 1},
                      "fields_sent": {"1": 2}}  # copies, never the input's containers


@pytest.mark.parametrize("data", [{}, {"primary_key": ""}, {"primary_key": 5}])
def test_from_dict_requires_primary_key(data: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="primary_key"):
        UserRecord.from_dict(data)


# -- fields_sent bookkeeping ----------------------------------------------------------------


def test_changed_fields_only_differences() -> None:
    rec = new()
    assert changed_fields(rec, {"1": "Ann", "31": 1}) == {"1": "Ann", "31": 1}
    mark_fields_queued(rec, {"1": "Ann", "31": 1})
    assert changed_fields(rec, {"1": "Ann", "31": 1}) == {}
    assert changed_fields(rec, {"1": "Anna", "31": 1, "2": "Smith"}) == {"1": "Anna", "2": "Smith"}
    assert changed_fields(rec, {}) == {}


def test_changed_fields_without_record() -> None:
    fields = {"1": "Ann"}
    out = changed_fields(None, fields)
    assert out == fields and out is not fields


def test_changed_fields_compares_type_strictly() -> None:
    rec = new()
    mark_fields_queued(rec, {"a": 1, "b": "1", "c": True, "d": 1.0, "e": ""})
    assert changed_fields(rec, {"a": True, "b": 1, "c": 1, "d": 1, "e": None}) == {
        "a": True,
        "b": 1,
        "c": 1,
        "d": 1,
        "e": None,
    }
    assert changed_fields(rec, {"a": 1, "b": "1", "c": True, "d": 1.0, "e": ""}) == {}


def test_clearing_a_field_is_a_change() -> None:
    rec = new()
    mark_fields_queued(rec, {"2": "Smith"})
    assert changed_fields(rec, {"2": ""}) == {"2": ""}
    mark_fields_queued(rec, {"2": ""})
    assert changed_fields(rec, {"2": ""}) == {}


def test_mark_fields_queued_overwrites() -> None:
    rec = new()
    mark_fields_queued(rec, {"1": "Ann", "2": "Smith"})
    mark_fields_queued(rec, {"1": "Anna"})
    assert rec.fields_sent == {"1": "Anna", "2": "Smith"}


def test_forget_failed_fields_only_when_still_the_failed_value() -> None:
    rec = new()
    mark_fields_queued(rec, {"1": "Ann", "2": "Smith", "31": 1})
    failed = {"1": "Ann", "2": "Smith", "31": 1}
    # Field 2 was updated after the failed batch was queued: keep the newer value.
    mark_fields_queued(rec, {"2": "Jones"})
    forget_failed_fields(rec, failed)
    assert rec.fields_sent == {"2": "Jones"}
    # The failed values are now sent again on the next event.
    assert changed_fields(rec, {"1": "Ann", "2": "Jones", "31": 1}) == {"1": "Ann", "31": 1}


def test_forget_failed_fields_ignores_unknown_and_type_mismatch() -> None:
    rec = new()
    mark_fields_queued(rec, {"31": 1})
    forget_failed_fields(rec, {"31": True, "99": "x"})
    assert rec.fields_sent == {"31": 1}
