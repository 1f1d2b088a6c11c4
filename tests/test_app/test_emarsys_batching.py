"""Pure batching: merge semantics, count/byte splits, oversize handling, list final state."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import orjson
import pytest

from app.emarsys.batching import (
    ContactChange,
    ContactUpsertBatcher,
    ListMembershipBatcher,
    ListMembershipChange,
    OversizeError,
    TriggerBatcher,
    TriggerRequest,
    merge_contact_changes,
    request_size,
)


def body_size(key_id: str, contacts: Sequence[Mapping[str, object]]) -> int:
    return len(orjson.dumps({"key_id": key_id, "contacts": contacts}))


# ------------------------------------------------------------------------------- merge


def test_merge_later_event_time_wins_per_field() -> None:
    changes = [
        ContactChange("a@x.com", {"1": "Ann", "2": "Old"}, 2000),
        ContactChange("a@x.com", {"1": "Stale"}, 1000),  # older: loses for field 1
        ContactChange("a@x.com", {"2": "New", "31": 1}, 3000),
        ContactChange("b@x.com", {"1": "Bob"}, 500),
    ]
    assert merge_contact_changes(changes) == {
        "a@x.com": {"1": "Ann", "2": "New", "31": 1},
        "b@x.com": {"1": "Bob"},
    }


def test_merge_ties_later_input_wins_and_order_kept() -> None:
    changes = [
        ContactChange("b", {"1": "first"}, 100),
        ContactChange("a", {"1": "x"}, 100),
        ContactChange("b", {"1": "second"}, 100),
    ]
    merged = merge_contact_changes(changes)
    assert merged == {"b": {"1": "second"}, "a": {"1": "x"}}
    assert list(merged) == ["b", "a"]


def test_merge_normalises_field_ids_and_keeps_none() -> None:
    merged = merge_contact_changes(
        [ContactChange("a", {1: "x"}, 1), ContactChange("a", {"1": None}, 2)]  # type: ignore[dict-item]
    )
    assert merged == {"a": {"1": None}}


def test_merge_empty() -> None:
    assert merge_contact_changes([]) == {}


# ------------------------------------------------------------------------------- upsert


def test_upsert_2500_contacts_three_batches() -> None:
    changes = [ContactChange(f"u{i}@x.com", {"1": f"N{i}"}, i) for i in range(2500)]
    batcher = ContactUpsertBatcher("3")
    batches = batcher.batches(changes)
    assert [len(b) for b in batches] == [1000, 1000, 500]
    assert len(batches) == math.ceil(2500 / 1000)
    flat = [c for b in batches for c in b]
    assert flat[0] == {"3": "u0@x.com", "1": "N0"}
    assert [c["3"] for c in flat] == [f"u{i}@x.com" for i in range(2500)]
    for b in batches:
        assert body_size("3", b) < 8_000_000


def test_upsert_exact_multiple_and_duplicates_merged() -> None:
    changes = [ContactChange(f"u{i % 1000}", {"1": str(i)}, i) for i in range(3000)]
    batches = ContactUpsertBatcher(3).batches(changes)
    assert [len(b) for b in batches] == [1000]
    assert batches[0][5] == {"3": "u5", "1": "2005"}


def test_upsert_primary_key_wins_over_key_field() -> None:
    batches = ContactUpsertBatcher("3").batches(
        [ContactChange("a@x.com", {"3": "other@x.com", "1": "Ann"}, 1)]
    )
    assert batches == [[{"3": "a@x.com", "1": "Ann"}]]


def test_upsert_byte_limit_split() -> None:
    big = "x" * 1000
    changes = [ContactChange(f"u{i}", {"1": big}, i) for i in range(100)]
    one = request_size({"3": "u10", "1": big})
    max_bytes = 10_000
    batcher = ContactUpsertBatcher("3", max_bytes=max_bytes)
    batches = batcher.batches(changes)
    assert sum(len(b) for b in batches) == 100
    for b in batches:
        assert body_size("3", b) < max_bytes
    # greedy packing fills every batch but the last as far as the limit allows
    per_batch = len(batches[0])
    assert per_batch == (max_bytes - 1 - body_size("3", []) + 1) // (one + 1)
    assert len(batches) == math.ceil(100 / per_batch)
    for a, b in zip(batches, batches[1:], strict=False):
        assert body_size("3", [*a, b[0]]) >= max_bytes  # could not have taken one more


def test_upsert_size_is_exact_boundary() -> None:
    contact = {"3": "a", "1": "v"}
    exact = body_size("3", [contact, {"3": "b", "1": "v"}])
    # a batch equal to max_bytes is refused (< max_bytes), one byte more is fine
    at_limit = ContactUpsertBatcher("3", max_bytes=exact).batches(
        [ContactChange("a", {"1": "v"}, 1), ContactChange("b", {"1": "v"}, 1)]
    )
    assert [len(b) for b in at_limit] == [1, 1]
    above = ContactUpsertBatcher("3", max_bytes=exact + 1).batches(
        [ContactChange("a", {"1": "v"}, 1), ContactChange("b", {"1": "v"}, 1)]
    )
    assert [len(b) for b in above] == [2]


def test_upsert_oversize_contact_separated() -> None:
    changes = [
        ContactChange("small1", {"1": "a"}, 1),
        ContactChange("huge", {"1": "x" * 5000}, 1),
        ContactChange("small2", {"1": "b"}, 1),
    ]
    batcher = ContactUpsertBatcher("3", max_bytes=1000)
    plan = batcher.plan(changes)
    assert plan.batches == [[{"3": "small1", "1": "a"}, {"3": "small2", "1": "b"}]]
    assert [c["3"] for c in plan.oversize] == ["huge"]
    with pytest.raises(OversizeError) as err:
        batcher.batches(changes)
    assert err.value.plan.batches == plan.batches
    assert [c["3"] for c in err.value.oversize] == ["huge"]
    assert "x" * 50 not in str(err.value)  # the message does not dump the contact


def test_upsert_max_contacts_param_and_validation() -> None:
    changes = [ContactChange(str(i), {"1": "v"}, 1) for i in range(10)]
    assert [len(b) for b in ContactUpsertBatcher("3", max_contacts=4).batches(changes)] == [4, 4, 2]
    assert ContactUpsertBatcher("3").batches([]) == []
    with pytest.raises(ValueError):
        ContactUpsertBatcher("3", max_contacts=0)


# ------------------------------------------------------------------------------- triggers


def test_trigger_grouping_and_split() -> None:
    reqs = [
        TriggerRequest(7, "3", f"u{i}", data={"n": i}, trigger_id=f"t{i}") for i in range(1500)
    ] + [
        TriggerRequest(9, "3", "z", event_time="2026-11-28T09:00:00Z"),
        TriggerRequest(7, "3", "late"),
    ]
    batches = TriggerBatcher().batches(reqs)
    assert [(b.event_id, len(b.contacts)) for b in batches] == [(7, 1000), (7, 501), (9, 1)]
    assert batches[0].contacts[0] == {"external_id": "u0", "data": {"n": 0}, "trigger_id": "t0"}
    assert batches[1].contacts[-1] == {"external_id": "late"}
    assert batches[2].body() == {
        "key_id": "3",
        "contacts": [{"external_id": "z", "event_time": "2026-11-28T09:00:00Z"}],
    }
    for b in batches:
        assert request_size(b.body()) < 1_000_000
        assert [r.contact() for r in b.requests] == b.contacts


def test_trigger_byte_limit_and_oversize() -> None:
    payload = {"blob": "y" * 300_000}
    reqs = [TriggerRequest(1, "3", f"u{i}", data=payload) for i in range(7)]
    reqs.append(TriggerRequest(1, "3", "huge", data={"blob": "y" * 2_000_000}))
    batcher = TriggerBatcher()
    plan = batcher.plan(reqs)
    assert [len(b.contacts) for b in plan.batches] == [3, 3, 1]
    assert all(request_size(b.body()) < 1_000_000 for b in plan.batches)
    assert [r.external_id for r in plan.oversize] == ["huge"]
    with pytest.raises(OversizeError):
        batcher.batches(reqs)


def test_trigger_groups_by_key_id_too() -> None:
    batches = TriggerBatcher().batches(
        [
            TriggerRequest(1, "3", "a@x"),
            TriggerRequest(1, "15", "+361"),
            TriggerRequest(1, "3", "b"),
        ]
    )
    assert [(b.event_id, b.key_id, [c["external_id"] for c in b.contacts]) for b in batches] == [
        (1, "3", ["a@x", "b"]),
        (1, "15", ["+361"]),
    ]


# ------------------------------------------------------------------------------- lists


def test_list_final_state_add_then_delete() -> None:
    changes = [
        ListMembershipChange(10, "3", "a", "add"),
        ListMembershipChange(10, "3", "b", "add"),
        ListMembershipChange(10, "3", "a", "delete"),  # final: a deleted
        ListMembershipChange(10, "3", "c", "delete"),
        ListMembershipChange(10, "3", "c", "add"),  # final: c added
        ListMembershipChange(20, "3", "a", "add"),  # another list: independent
        ListMembershipChange(10, "3", "b", "add"),  # repeat collapses
    ]
    batcher = ListMembershipBatcher()
    assert batcher.final_state(changes) == {
        (10, "3"): {"a": "delete", "c": "add", "b": "add"},
        (20, "3"): {"a": "add"},
    }
    batches = batcher.batches(changes)
    got = {(b.list_id, b.action): b.external_ids for b in batches}
    assert got == {(10, "delete"): ["a"], (10, "add"): ["c", "b"], (20, "add"): ["a"]}
    # every id appears once per list: the calls can run in any order
    for list_id in (10, 20):
        ids = [i for b in batches if b.list_id == list_id for i in b.external_ids]
        assert len(ids) == len(set(ids))


def test_list_split_at_max_ids() -> None:
    changes = [ListMembershipChange(1, "3", f"u{i}", "add") for i in range(25_001)]
    batches = ListMembershipBatcher().batches(changes)
    assert [len(b.external_ids) for b in batches] == [10_000, 10_000, 5_001]
    assert batches[0].external_ids[0] == "u0" and batches[-1].external_ids[-1] == "u25000"
    assert batches[0].body() == {"key_id": "3", "external_ids": batches[0].external_ids}
    small = ListMembershipBatcher(max_ids=2).batches(changes[:5])
    assert [b.external_ids for b in small] == [["u0", "u1"], ["u2", "u3"], ["u4"]]


def test_list_rejects_unknown_action() -> None:
    with pytest.raises(ValueError):
        ListMembershipBatcher().batches(
            [ListMembershipChange(1, "3", "a", "remove")]  # type: ignore[arg-type]
        )
