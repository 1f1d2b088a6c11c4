"""Unit tests for app/contacts.py: ContactUpdater (dedupe, users record, data map, merging)."""

from __future__ import annotations

from typing import Any

import orjson

from app.audiences import AudienceMap, AudienceRule
from app.contacts import ContactBatch, ContactUpdater, upsert_operation
from app.data_map import DataMap, FieldMapping
from app.identity import UserRecord

PK = "ann@example.com"
PK2 = "bob@example.com"
SRC = {"topic": "segment.events", "partition": 0, "offset": 1, "timestamp": 0}
KEY_ID = 3
HOUR_MS = 3_600_000
NOW = 10 * HOUR_MS

DATA_MAP = DataMap(
    [
        FieldMapping(("traits.firstName",), 1),
        FieldMapping(("traits.lastName",), 2),
        FieldMapping(("traits.email",), 3, "lowercase"),
        FieldMapping(("traits.optin", "properties.optin"), 31, "optin"),
        FieldMapping(("properties.revenue",), 100, "number"),
    ]
)


class Store:
    """The users table as a plain dict, written back like the users agent does."""

    def __init__(self, updater: ContactUpdater) -> None:
        self.updater = updater
        self.users: dict[str, dict[str, Any]] = {}

    def load_user(self, pk: str) -> UserRecord | None:
        raw = self.users.get(pk)
        return None if raw is None else UserRecord.from_dict(raw)

    @property
    def seen(self) -> dict[str, int]:
        """The dedupe memory of the default contact, as stored."""
        return dict(self.users[PK].get("seen", {})) if PK in self.users else {}

    def batch(
        self, items: list[tuple[str, dict[str, Any]]], now_ms: int = NOW
    ) -> tuple[ContactBatch, list[dict[str, Any]]]:
        # JSON round trip, as through Kafka.
        items = [(pk, orjson.loads(orjson.dumps(m))) for pk, m in items]
        b = self.updater.process(items, self.load_user, now_ms)
        for pk, rec in b.users.items():
            self.users[pk] = orjson.loads(orjson.dumps(rec.to_dict()))
        ops = self.updater.finish(b)
        for op in ops:
            orjson.dumps(op)  # an emarsys-operations record must serialise
        return b, ops

    def record(self, pk: str = PK) -> UserRecord:
        rec = self.load_user(pk)
        assert rec is not None
        return rec


def make(max_ids: int = 50, window_ms: int = 24 * HOUR_MS, **kw: Any) -> Store:
    return Store(
        ContactUpdater(
            DATA_MAP, key_field_id=KEY_ID, max_ids=max_ids, dedupe_window_ms=window_ms, **kw
        )
    )


def ev(
    mid: str,
    ts: int = 1_000,
    ev_type: str = "identify",
    *,
    pk: str = PK,
    user_id: str | None = "u1",
    anonymous_id: str | None = "a1",
    **extra: Any,
) -> tuple[str, dict[str, Any]]:
    event: dict[str, Any] = {"type": ev_type, "messageId": mid}
    if user_id is not None:
        event["userId"] = user_id
    if anonymous_id is not None:
        event["anonymousId"] = anonymous_id
    if ev_type == "track":
        event["event"] = "Clicked"
    event.update(extra)
    return pk, {"kind": "event", "event": event, "ts": ts, "source": SRC, "primary_key": pk}


def failed(
    fields: dict[str, Any], contact_missing: bool = False, pk: str = PK
) -> tuple[str, dict[str, Any]]:
    return pk, {
        "kind": "send_failed",
        "primary_key": pk,
        "fields": fields,
        "contact_missing": contact_missing,
    }


# -- upsert_operation -------------------------------------------------------------------------


def test_upsert_operation_shape() -> None:
    assert upsert_operation(PK, 3, {"1": "Ann"}, 5, ["m"]) == {
        "op": "contact_upsert",
        "primary_key": PK,
        "key_id": "3",
        "fields": {"1": "Ann"},
        "event_time_ms": 5,
        "message_ids": ["m"],
    }


# -- new contacts and fields ------------------------------------------------------------------


def test_new_contact_without_mapped_fields_gets_one_op() -> None:
    s = make()
    b, ops = s.batch([ev("m1", 1_000, "track")])
    assert ops == [
        {
            "op": "contact_upsert",
            "primary_key": PK,
            "key_id": str(KEY_ID),
            "fields": {},
            "event_time_ms": 1_000,
            "message_ids": ["m1"],
        }
    ]
    assert b.new_users == {PK}
    assert b.events == 1 and b.duplicates == 0 and b.unchanged == 0
    rec = s.record()
    assert rec.created_in_emarsys is True
    assert rec.user_ids == ["u1"] and rec.anonymous_ids == ["a1"]
    assert rec.first_seen_ms == rec.last_seen_ms == 1_000
    assert rec.event_count == 1 and rec.counts_by_type == {"track": 1}
    assert rec.fields_sent == {}
    # A second field-less event for a created contact: nothing to send.
    b, ops = s.batch([ev("m2", 2_000, "track")])
    assert ops == [] and b.unchanged == 1 and b.new_users == set()


def test_mapped_fields_keyed_by_field_id_string() -> None:
    s = make()
    _, ops = s.batch(
        [
            ev(
                "m1",
                traits={"firstName": "Ann", "email": "ANN@Example.com", "optin": "yes"},
                properties={"revenue": "12.5"},
            )
        ]
    )
    assert len(ops) == 1
    assert ops[0]["fields"] == {"1": "Ann", "3": "ann@example.com", "31": 1, "100": 12.5}
    assert s.record().fields_sent == ops[0]["fields"]


def test_unchanged_identify_second_time_sends_nothing() -> None:
    s = make()
    traits = {"firstName": "Ann", "lastName": "Lee"}
    _, ops = s.batch([ev("m1", 1_000, traits=traits)])
    assert len(ops) == 1
    b, ops = s.batch([ev("m2", 2_000, traits=traits)])
    assert ops == []
    assert b.unchanged == 1 and b.events == 1
    rec = s.record()
    assert rec.event_count == 2 and rec.last_seen_ms == 2_000


def test_changed_field_sends_only_that_field() -> None:
    s = make()
    s.batch([ev("m1", 1_000, traits={"firstName": "Ann", "lastName": "Lee"})])
    b, ops = s.batch([ev("m2", 2_000, traits={"firstName": "Ann", "lastName": "Smith"})])
    assert len(ops) == 1
    assert ops[0]["fields"] == {"2": "Smith"}
    assert ops[0]["message_ids"] == ["m2"]
    assert ops[0]["event_time_ms"] == 2_000
    assert b.unchanged == 0
    assert s.record().fields_sent == {"1": "Ann", "2": "Smith"}


def test_value_type_change_counts_as_change() -> None:
    s = make()
    s.batch([ev("m1", properties={"revenue": 1})])
    _, ops = s.batch([ev("m2", properties={"revenue": 1.5})])
    assert ops[0]["fields"] == {"100": 1.5}


def test_absent_field_does_not_clear_sent_value() -> None:
    s = make()
    s.batch([ev("m1", traits={"firstName": "Ann"})])
    b, ops = s.batch([ev("m2", traits={"lastName": None})])
    assert ops == [] and b.unchanged == 1
    assert s.record().fields_sent == {"1": "Ann"}


# -- merging per batch ------------------------------------------------------------------------


def test_several_events_one_pk_one_batch_merge_into_one_op() -> None:
    s = make()
    b, ops = s.batch(
        [
            ev("m1", 1_000, traits={"firstName": "Ann"}),
            ev("m2", 2_000, "track", properties={"revenue": 5}),
            ev("m3", 3_000, traits={"firstName": "Anne", "lastName": "Lee"}),
            ev("x1", 1_500, pk=PK2, user_id="u2", anonymous_id=None, traits={"firstName": "Bob"}),
        ]
    )
    assert b.events == 4
    assert b.new_users == {PK, PK2}
    by_pk = {op["primary_key"]: op for op in ops}
    assert [op["primary_key"] for op in ops] == [PK, PK2]
    assert by_pk[PK]["fields"] == {"1": "Anne", "100": 5, "2": "Lee"}
    assert by_pk[PK]["event_time_ms"] == 3_000
    assert by_pk[PK]["message_ids"] == ["m1", "m2", "m3"]
    assert by_pk[PK2]["fields"] == {"1": "Bob"}
    rec = s.record()
    assert rec.event_count == 3
    assert rec.counts_by_type == {"identify": 2, "track": 1}
    assert rec.fields_sent == {"1": "Anne", "100": 5, "2": "Lee"}
    assert "_field_ts" not in by_pk[PK]


def test_later_event_time_wins_per_field_when_out_of_order() -> None:
    s = make()
    _, ops = s.batch(
        [
            ev("new", 3_000, traits={"firstName": "New", "lastName": "Lee"}),
            ev("old", 1_000, traits={"firstName": "Old", "optin": True}),
        ]
    )
    (op,) = ops
    assert op["fields"] == {"1": "New", "2": "Lee", "31": 1}
    assert op["event_time_ms"] == 3_000
    assert sorted(op["message_ids"]) == ["new", "old"]
    rec = s.record()
    # The record remembers what was actually queued (the winning value).
    assert rec.fields_sent == {"1": "New", "2": "Lee", "31": 1}
    assert rec.first_seen_ms == 1_000 and rec.last_seen_ms == 3_000
    # So a later event with the older value is a real change and is sent.
    _, ops = s.batch([ev("later", 4_000, traits={"firstName": "Old"})])
    assert ops[0]["fields"] == {"1": "Old"}


def test_older_event_does_not_override_newer_unchanged_value() -> None:
    s = make()
    s.batch([ev("m1", 1_000, traits={"firstName": "Ann"})])
    # In the next batch the newest event repeats the sent value (unchanged) and an older
    # event, processed after it, carries another value: Emarsys must keep "Ann".
    b, ops = s.batch(
        [
            ev("m3", 3_000, traits={"firstName": "Ann"}),
            ev("m2", 2_000, traits={"firstName": "Stale"}),
        ]
    )
    assert ops == []
    assert b.unchanged == 2
    assert s.record().fields_sent == {"1": "Ann"}


def test_older_event_in_a_later_batch_does_not_override_a_newer_value() -> None:
    # Segment topics are unkeyed: a person's newer identify can be processed in an
    # earlier batch than an older one. The older value must not reach Emarsys.
    s = make()
    _, ops = s.batch([ev("new", 3_000, traits={"firstName": "New", "optin": False})])
    assert ops[0]["fields"] == {"1": "New", "31": 2}
    b, ops = s.batch([ev("old", 1_000, traits={"firstName": "Old", "optin": True})])
    assert ops == [] and b.unchanged == 1
    rec = s.record()
    assert rec.fields_sent == {"1": "New", "31": 2}
    assert rec.fields_at == {"1": 3_000, "31": 3_000}
    assert UserRecord.from_dict(orjson.loads(orjson.dumps(rec.to_dict()))) == rec
    # A newer event still changes it.
    _, ops = s.batch([ev("newer", 4_000, traits={"firstName": "Newer"})])
    assert ops[0]["fields"] == {"1": "Newer"}


def test_equal_event_time_later_processed_wins() -> None:
    s = make()
    _, ops = s.batch(
        [
            ev("m1", 1_000, traits={"firstName": "A"}),
            ev("m2", 1_000, traits={"firstName": "B"}),
        ]
    )
    assert ops[0]["fields"] == {"1": "B"}
    assert s.record().fields_sent == {"1": "B"}


def test_in_order_change_back_to_previous_value_in_one_batch() -> None:
    s = make()
    s.batch([ev("m1", 1_000, traits={"firstName": "Ann"})])
    _, ops = s.batch(
        [
            ev("m2", 2_000, traits={"firstName": "Bob"}),
            ev("m3", 3_000, traits={"firstName": "Ann"}),
        ]
    )
    assert ops[0]["fields"] == {"1": "Ann"}
    assert s.record().fields_sent == {"1": "Ann"}


def test_message_ids_bounded() -> None:
    s = make(max_message_ids=2)
    _, ops = s.batch([ev(f"m{i}", 1_000 + i, traits={"firstName": f"N{i}"}) for i in range(5)])
    assert ops[0]["message_ids"] == ["m0", "m1"]
    assert ops[0]["fields"] == {"1": "N4"}
    assert ops[0]["event_time_ms"] == 1_004


# -- dedupe -----------------------------------------------------------------------------------


def test_duplicate_message_id_in_one_batch() -> None:
    s = make()
    b, ops = s.batch(
        [
            ev("dup", 1_000, traits={"firstName": "Ann"}),
            ev("dup", 1_000, traits={"firstName": "Ann"}),
        ]
    )
    assert b.duplicates == 1 and b.events == 1
    assert len(ops) == 1 and ops[0]["message_ids"] == ["dup"]
    assert s.record().event_count == 1
    assert s.seen == {"dup": NOW}


def test_duplicate_message_id_across_batches_via_the_stored_record() -> None:
    s = make()
    s.batch([ev("dup", 1_000, traits={"firstName": "Ann"})])
    before = s.record().to_dict()
    # Even with a different payload, a re-delivered messageId has no effect.
    b, ops = s.batch([ev("dup", 2_000, traits={"firstName": "Zed"})], now_ms=NOW + HOUR_MS)
    assert b.duplicates == 1 and b.events == 0
    assert ops == [] and b.users == {}
    assert s.record().to_dict() == before
    assert s.seen == {"dup": NOW}


def test_duplicate_outside_window_is_processed() -> None:
    s = make(window_ms=HOUR_MS)
    s.batch([ev("dup", 1_000, traits={"firstName": "Ann"})])
    b, ops = s.batch([ev("dup", 2_000, traits={"firstName": "Zed"})], now_ms=NOW + HOUR_MS)
    assert b.duplicates == 0 and b.events == 1
    assert ops[0]["fields"] == {"1": "Zed"}
    assert s.record().event_count == 2
    assert s.seen == {"dup": NOW + HOUR_MS}


def test_duplicate_just_inside_window() -> None:
    s = make(window_ms=HOUR_MS)
    s.batch([ev("dup", 1_000)])
    b, _ = s.batch([ev("dup", 2_000)], now_ms=NOW + HOUR_MS - 1)
    assert b.duplicates == 1


def test_seen_ids_past_the_window_are_pruned_when_the_record_is_written() -> None:
    s = make(window_ms=HOUR_MS)
    s.batch([ev("old", 1_000)])
    b, _ = s.batch([ev("new", 2_000)], now_ms=NOW + HOUR_MS)
    assert b.seen_expired == 1 and b.seen_evicted == 0
    assert s.seen == {"new": NOW + HOUR_MS}


def test_pruning_takes_the_expired_ids_from_the_front_and_keeps_the_younger() -> None:
    s = make(window_ms=HOUR_MS)
    s.batch([ev("a", 1_000), ev("b", 1_001)])
    s.batch([ev("c", 1_002), ev("d", 1_003)], now_ms=NOW + HOUR_MS // 2)
    b, _ = s.batch([ev("e", 1_004)], now_ms=NOW + HOUR_MS)
    assert b.seen_expired == 2
    assert s.seen == {"c": NOW + HOUR_MS // 2, "d": NOW + HOUR_MS // 2, "e": NOW + HOUR_MS}


def test_seen_keeps_at_most_max_ids_per_contact_dropping_the_oldest() -> None:
    s = make(max_seen_ids=3)
    b, _ = s.batch([ev(f"m{i}", 1_000 + i) for i in range(5)])
    assert b.seen_evicted == 2 and b.duplicates == 0
    assert list(s.seen) == ["m2", "m3", "m4"]
    # An evicted id is new again (its repeat is applied, not dropped) ...
    b, _ = s.batch([ev("m0", 3_000)], now_ms=NOW + 1)
    assert b.duplicates == 0 and b.events == 1
    # ... and a remembered one is still a duplicate.
    b, _ = s.batch([ev("m4", 3_000)], now_ms=NOW + 2)
    assert b.duplicates == 1
    assert list(s.seen) == ["m3", "m4", "m0"]


def test_an_id_seen_again_after_its_window_moves_to_the_newest_end() -> None:
    s = make(window_ms=HOUR_MS, max_seen_ids=2)
    s.batch([ev("a", 1_000)])
    s.batch([ev("b", 2_000)], now_ms=NOW + HOUR_MS // 2)
    s.batch([ev("a", 3_000)], now_ms=NOW + HOUR_MS)  # "a" is past its window: new again
    assert s.seen == {"b": NOW + HOUR_MS // 2, "a": NOW + HOUR_MS}
    b, _ = s.batch([ev("c", 4_000)], now_ms=NOW + HOUR_MS + 1)
    assert b.seen_evicted == 1
    assert list(s.seen) == ["a", "c"]


def test_send_failed_feedback_keeps_the_dedupe_memory() -> None:
    s = make()
    s.batch([ev("m1", 1_000, traits={"firstName": "Ann"})])
    s.batch([failed({"1": "Ann"})])
    b, _ = s.batch([ev("m1", 1_000, traits={"firstName": "Ann"})])
    assert b.duplicates == 1


# -- send_failed feedback ---------------------------------------------------------------------


def test_send_failed_forgets_values_so_they_are_sent_again() -> None:
    s = make()
    s.batch([ev("m1", 1_000, traits={"firstName": "Ann", "lastName": "Lee"})])
    b, ops = s.batch([failed({"1": "Ann"})])
    assert ops == [] and b.events == 0
    rec = s.record()
    assert rec.fields_sent == {"2": "Lee"}
    assert rec.created_in_emarsys is True
    _, ops = s.batch([ev("m2", 2_000, traits={"firstName": "Ann", "lastName": "Lee"})])
    assert ops[0]["fields"] == {"1": "Ann"}
    assert s.record().fields_sent == {"1": "Ann", "2": "Lee"}


def test_send_failed_keeps_field_updated_since() -> None:
    s = make()
    s.batch([ev("m1", 1_000, traits={"firstName": "Ann"})])
    s.batch([ev("m2", 2_000, traits={"firstName": "Anne"})])
    s.batch([failed({"1": "Ann"})])  # feedback for the older value arrives late
    assert s.record().fields_sent == {"1": "Anne"}


def test_send_failed_contact_missing_recreates_on_next_event() -> None:
    s = make()
    s.batch([ev("m1", 1_000, "track")])
    assert s.record().created_in_emarsys is True
    s.batch([failed({}, contact_missing=True)])
    assert s.record().created_in_emarsys is False
    b, ops = s.batch([ev("m2", 2_000, "track")])
    assert len(ops) == 1 and ops[0]["fields"] == {}
    assert b.unchanged == 0 and b.new_users == set()
    assert s.record().created_in_emarsys is True


def test_send_failed_for_unknown_contact_is_ignored() -> None:
    s = make()
    b, ops = s.batch([failed({"1": "x"}, contact_missing=True)])
    assert ops == [] and b.users == {}
    assert s.users == {}


def test_send_failed_in_same_batch_after_event() -> None:
    s = make()
    s.batch([ev("m1", 1_000, traits={"firstName": "Ann"})])
    _, ops = s.batch([ev("m2", 2_000, traits={"firstName": "Bob"}), failed({"1": "Ann"})])
    assert ops[0]["fields"] == {"1": "Bob"}
    assert s.record().fields_sent == {"1": "Bob"}


def test_unknown_kind_is_ignored() -> None:
    s = make()
    b, ops = s.batch([(PK, {"kind": "whatever"})])
    assert ops == [] and b.users == {} and b.events == 0


# -- ids --------------------------------------------------------------------------------------


def test_alias_adds_previous_id_and_user_id() -> None:
    s = make()
    s.batch([ev("m1", 1_000, user_id="u1", anonymous_id="a1")])
    b, _ = s.batch([ev("al", 2_000, "alias", user_id="u2", anonymous_id=None, previousId="a0")])
    rec = s.record()
    assert rec.anonymous_ids == ["a1", "a0"]
    assert rec.user_ids == ["u1", "u2"]
    # One event, even though ids were updated twice.
    assert rec.event_count == 2
    assert rec.counts_by_type == {"identify": 1, "alias": 1}
    assert rec.last_seen_ms == 2_000
    assert b.events == 1


def test_alias_as_first_event_creates_contact() -> None:
    s = make()
    b, ops = s.batch([ev("al", 2_000, "alias", user_id="u2", anonymous_id=None, previousId="u1")])
    assert b.new_users == {PK} and len(ops) == 1
    rec = s.record()
    assert rec.user_ids == ["u2"] and rec.anonymous_ids == ["u1"]
    assert rec.event_count == 1 and rec.counts_by_type == {"alias": 1}


def test_user_ids_bounded_by_max_ids() -> None:
    s = make(max_ids=3)
    s.batch([ev(f"m{i}", 1_000 + i, user_id=f"u{i}", anonymous_id=f"a{i}") for i in range(5)])
    rec = s.record()
    assert rec.user_ids == ["u2", "u3", "u4"]
    assert rec.anonymous_ids == ["a2", "a3", "a4"]
    # A seen id moves to the end instead of growing the list.
    s.batch([ev("again", 9_000, user_id="u2", anonymous_id=None)])
    assert s.record().user_ids == ["u3", "u4", "u2"]


def test_integer_user_id_is_stored_as_string() -> None:
    s = make()
    s.batch(
        [
            (
                PK,
                {
                    "kind": "event",
                    "event": {"type": "track", "event": "x", "messageId": "m", "userId": 42},
                    "ts": 1,
                    "source": SRC,
                },
            )
        ]
    )
    assert s.record().user_ids == ["42"]


def test_records_round_trip_between_batches() -> None:
    s = make()
    s.batch([ev("m1", 5_000, traits={"firstName": "Ann"})])
    s.batch([ev("m2", 1_000, "page")])
    rec = s.record()
    assert rec.first_seen_ms == 1_000 and rec.last_seen_ms == 5_000
    assert rec.counts_by_type == {"identify": 1, "page": 1}
    assert rec.primary_key == PK


# -- Engage audiences -------------------------------------------------------------------------

AUDIENCES = AudienceMap(
    [
        AudienceRule("vip_customers", contact_list_id=77, field_id=5001),
        AudienceRule("newsletter_fans", contact_list_name="Fans", create_missing=True),
        AudienceRule("field_only", field_id=5002, field_values={True: "in", False: "out"}),
    ]
)


def make_aud(**kw: Any) -> Store:
    return make(audiences=AUDIENCES, **kw)


def aud_identify(
    mid: str, member: bool, ts: int = 1_000, key: str = "vip_customers", pk: str = PK
) -> tuple[str, dict[str, Any]]:
    return ev(
        mid, ts, pk=pk, traits={"email": pk, key: member},
        context={"personas": {"computation_class": "audience", "computation_key": key,
                              "computation_id": "aud_1", "space_id": "spa_1"}},
    )


def aud_track(
    mid: str, member: bool, ts: int = 1_000, key: str = "vip_customers", pk: str = PK
) -> tuple[str, dict[str, Any]]:
    pk_, msg = ev(mid, ts, "track", pk=pk, properties={"audience_key": key, key: member},
                  context={"traits": {"email": pk}})
    msg["event"]["event"] = "Audience Entered" if member else "Audience Exited"
    return pk_, msg


def list_ops(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in ops if o["op"] == "list_membership"]


def upserts(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in ops if o["op"] == "contact_upsert"]


def test_identify_entry_queues_upsert_then_list_add() -> None:
    s = make_aud()
    b, ops = s.batch([aud_identify("m1", True, 2_000)])
    assert [o["op"] for o in ops] == ["contact_upsert", "list_membership"]
    assert ops[0]["fields"] == {"3": PK, "5001": 1}
    assert ops[1] == {
        "op": "list_membership", "primary_key": PK, "key_id": "3", "list_id": 77,
        "create_missing": False, "action": "add", "audience": "vip_customers",
        "event_time_ms": 2_000,
    }
    rec = s.record()
    assert rec.audiences == {"vip_customers": True}
    assert rec.audiences_at == {"vip_customers": 2_000}
    assert b.audience_changes == 1 and b.unchanged == 0


def test_track_form_entry_and_exit() -> None:
    s = make_aud()
    _, ops = s.batch([aud_track("m1", True)])
    assert [o["action"] for o in list_ops(ops)] == ["add"]
    _, ops = s.batch([aud_track("m2", False, 2_000)])
    assert list_ops(ops) == [
        {"op": "list_membership", "primary_key": PK, "key_id": "3", "list_id": 77,
         "create_missing": False, "action": "delete", "audience": "vip_customers",
         "event_time_ms": 2_000}
    ]
    assert upserts(ops) == [
        {"op": "contact_upsert", "primary_key": PK, "key_id": "3", "fields": {"5001": 2},
         "event_time_ms": 2_000, "message_ids": ["m2"]}
    ]
    assert s.record().audiences == {"vip_customers": False}


def test_repeated_entry_costs_nothing() -> None:
    s = make_aud()
    s.batch([aud_identify("m1", True)])
    b, ops = s.batch([aud_identify("m2", True, 2_000), aud_track("m3", True, 3_000)])
    assert ops == []
    assert b.unchanged == 2 and b.audience_noops == 2
    assert s.record().audiences_at == {"vip_customers": 3_000}


def test_exit_of_a_non_member_costs_nothing_but_is_remembered() -> None:
    s = make_aud()
    s.batch([ev("m0", 500, traits={"email": PK})])  # known contact, never a member
    b, ops = s.batch([aud_identify("m1", False, 1_000)])
    assert ops == [] and b.unchanged == 1 and b.audience_noops == 1
    assert s.record().audiences == {"vip_customers": False}
    # A second exit still costs nothing (the field was never written either).
    _, ops = s.batch([aud_track("m2", False, 2_000)])
    assert ops == []


def test_exit_of_unknown_new_contact_only_creates_the_contact() -> None:
    s = make_aud()
    _, ops = s.batch([aud_identify("m1", False)])
    assert ops == [upsert_operation(PK, KEY_ID, {"3": PK}, 1_000, ["m1"])]


def test_entry_and_exit_in_one_batch_cancel_out() -> None:
    s = make_aud()
    s.batch([ev("m0", 500, traits={"email": PK})])
    b, ops = s.batch([aud_identify("m1", True, 1_000), aud_identify("m2", False, 2_000)])
    assert list_ops(ops) == []
    # The field was never written before this batch, and ends at "false".
    assert upserts(ops)[0]["fields"] == {"5001": 2}
    assert s.record().audiences == {"vip_customers": False}
    # Member before the batch: exit then entry again -> no list call either. (The field
    # follows the data-map rule for a value changed back within one batch: it is resent.)
    s.batch([aud_identify("m3", True, 3_000)])
    _, ops = s.batch([aud_identify("m4", False, 4_000), aud_identify("m5", True, 5_000)])
    assert list_ops(ops) == []
    assert [o["fields"] for o in upserts(ops)] == [{"5001": 1}]


def test_entries_in_one_batch_merge_into_the_net_change() -> None:
    s = make_aud()
    s.batch([aud_identify("m1", True, 1_000)])
    _, ops = s.batch(
        [aud_identify("m2", False, 2_000), aud_identify("m3", True, 3_000),
         aud_identify("m4", False, 4_000)]
    )
    assert [(o["action"], o["event_time_ms"]) for o in list_ops(ops)] == [("delete", 4_000)]


def test_older_signal_processed_later_is_ignored() -> None:
    s = make_aud()
    s.batch([aud_identify("m1", True, 1_000)])
    s.batch([aud_identify("m2", False, 5_000)])
    b, ops = s.batch([aud_track("m3", True, 3_000)])  # late entry, older than the exit
    assert ops == [] and b.audience_stale == 1
    assert s.record().audiences == {"vip_customers": False}
    # Within one batch too.
    s2 = make_aud()
    _, ops = s2.batch([aud_identify("n1", True, 5_000), aud_identify("n2", False, 3_000)])
    assert [o["action"] for o in list_ops(ops)] == ["add"]
    assert upserts(ops)[0]["fields"]["5001"] == 1


def test_list_by_name_and_field_only_audience() -> None:
    s = make_aud()
    _, ops = s.batch([aud_identify("m1", True, key="newsletter_fans"),
                      aud_track("m2", True, 1_000, key="field_only")])
    assert list_ops(ops) == [
        {"op": "list_membership", "primary_key": PK, "key_id": "3", "list_name": "Fans",
         "create_missing": True, "action": "add", "audience": "newsletter_fans",
         "event_time_ms": 1_000}
    ]
    assert upserts(ops)[0]["fields"] == {"3": PK, "5002": "in"}
    _, ops = s.batch([aud_track("m3", False, 2_000, key="field_only")])
    assert ops == [upsert_operation(PK, KEY_ID, {"5002": "out"}, 2_000, ["m3"])]


def test_unmapped_audience_is_counted_and_ignored() -> None:
    s = make_aud()
    s.batch([ev("m0", 500, traits={"email": PK})])
    b, ops = s.batch([aud_identify("m1", True, key="someone_elses")])
    assert ops == [] and b.audience_unmapped == 1
    assert s.record().audiences == {}


def test_wildcard_maps_every_audience() -> None:
    s = make(audiences=AudienceMap([AudienceRule("*", contact_list_name="Seg {key}")]))
    _, ops = s.batch([aud_identify("m1", True, key="Big Spenders")])
    assert list_ops(ops)[0]["list_name"] == "Seg big_spenders"
    assert s.record().audiences == {"big_spenders": True}


def test_without_audience_config_signals_are_plain_events() -> None:
    s = make()
    _, ops = s.batch([aud_identify("m1", True)])
    assert list_ops(ops) == []
    assert s.record().audiences == {}


def test_refused_add_is_forgotten_so_the_next_entry_tries_again() -> None:
    s = make_aud()
    s.batch([aud_identify("m1", True)])
    s.batch([(PK, {"kind": "send_failed", "primary_key": PK, "fields": {},
                   "contact_missing": False, "audiences": {"vip_customers": "add"}})])
    assert s.record().audiences == {}
    _, ops = s.batch([aud_identify("m2", True, 2_000)])
    assert [o["action"] for o in list_ops(ops)] == ["add"]


def test_refused_delete_makes_the_contact_a_member_again() -> None:
    s = make_aud()
    s.batch([aud_identify("m1", True)])
    s.batch([aud_identify("m2", False, 2_000)])
    s.batch([(PK, {"kind": "send_failed", "primary_key": PK, "fields": {},
                   "contact_missing": True, "audiences": {"vip_customers": "delete"}})])
    rec = s.record()
    assert rec.audiences == {"vip_customers": True} and not rec.created_in_emarsys
    _, ops = s.batch([aud_identify("m3", False, 3_000)])
    assert [o["action"] for o in list_ops(ops)] == ["delete"]


def test_refusal_of_an_outdated_state_keeps_the_newer_one() -> None:
    s = make_aud()
    s.batch([aud_identify("m1", True)])
    s.batch([aud_identify("m2", False, 2_000)])
    # The earlier add was refused, but the contact has exited since: nothing to undo.
    s.batch([(PK, {"kind": "send_failed", "primary_key": PK, "fields": {},
                   "contact_missing": False, "audiences": {"vip_customers": "add"}})])
    assert s.record().audiences == {"vip_customers": False}


def test_trait_computed_track_properties_are_mapped_like_traits() -> None:
    data_map = DataMap([FieldMapping(("traits.lifetime_value", "properties.lifetime_value"),
                                     7001, "number")])
    s = Store(ContactUpdater(data_map, key_field_id=KEY_ID, max_ids=50,
                             dedupe_window_ms=HOUR_MS, audiences=AUDIENCES))
    computed = {"computation_class": "trait", "computation_key": "lifetime_value"}
    _, ops = s.batch([ev("m1", 1_000, "track", properties={
        "trait_key": "lifetime_value", "lifetime_value": 120.5},
        context={"traits": {"email": PK}, "personas": computed})])
    assert ops[0]["fields"] == {"7001": 120.5}
    assert list_ops(ops) == []
    # The identify form of a computed trait goes the same way; unchanged value: no call.
    _, ops = s.batch([ev("m2", 2_000, traits={"email": PK, "lifetime_value": 120.5},
                         context={"personas": computed})])
    assert ops == []
    _, ops = s.batch([ev("m3", 3_000, traits={"email": PK, "lifetime_value": 99},
                         context={"personas": computed})])
    assert ops[0]["fields"] == {"7001": 99}


def test_audience_state_round_trips_through_the_table() -> None:
    s = make_aud()
    s.batch([aud_identify("m1", True, 1_000), aud_track("m2", True, 1_500, key="field_only")])
    raw = s.users[PK]
    assert raw["audiences"] == {"vip_customers": True, "field_only": True}
    assert raw["audiences_at"] == {"vip_customers": 1_000, "field_only": 1_500}
    assert UserRecord.from_dict(raw).to_dict() == raw


def test_records_without_audiences_keep_their_shape() -> None:
    s = make_aud()
    s.batch([ev("m1", 1_000, traits={"firstName": "Ann"})])
    assert "audiences" not in s.users[PK]
    old = dict(s.users[PK])
    rec = UserRecord.from_dict(old)
    assert rec.audiences == {} and rec.audiences_at == {}
    bad = UserRecord.from_dict({**old, "audiences": {"a": "yes", "b": True}, "audiences_at": 3})
    assert bad.audiences == {"b": True} and bad.audiences_at == {}
