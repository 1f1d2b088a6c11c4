"""Unit tests for app/pending.py: PendingOperations (upserts, triggers, contact lists)."""

from __future__ import annotations

import pytest

from app.audiences import ListOperation
from app.emarsys.batching import (
    ContactChange,
    ListMembershipBatcher,
    ListMembershipChange,
    TriggerRequest,
)
from app.pending import DEFAULT_LIST_BATCH_SIZE, PendingOperations


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pending(batch_size: int = 3, list_batch_size: int = 4, interval: float = 1.0
            ) -> tuple[PendingOperations[str], Clock]:
    clock = Clock()
    return PendingOperations(batch_size, interval, clock, list_batch_size=list_batch_size), clock


def lop(pk: str, action: str = "add", ts: int = 1, list_id: int | None = 77,
        name: str | None = None, audience: str = "vip") -> ListOperation:
    return ListOperation(pk, "3", list_id, name if list_id is None else None, name is not None,
                         action, audience, ts)  # type: ignore[arg-type]


def test_default_list_batch_size_is_the_api_limit() -> None:
    p: PendingOperations[str] = PendingOperations(1000, 1.0, Clock())
    assert p.list_batch_size == DEFAULT_LIST_BATCH_SIZE == 10_000
    with pytest.raises(ValueError):
        PendingOperations(1000, 1.0, Clock(), list_batch_size=0)


def test_list_changes_flush_by_their_own_size_whole_batches_only() -> None:
    p, _ = pending(batch_size=3, list_batch_size=4)
    for i in range(9):
        p.add_list_change(lop(f"c{i}"), f"t{i}")
    assert p.due()  # 9 >= 4 although upserts' batch_size is 3: lists count on their own
    d = p.drain()
    assert [c.primary_key for c in d.list_changes] == [f"c{i}" for i in range(8)]
    assert d.tokens == [f"t{i}" for i in range(8)]
    assert not d.upserts_by_key_id and not d.triggers
    assert p.list_count == 1 and not p.due()


def test_three_list_changes_are_not_due_before_the_interval() -> None:
    p, clock = pending(batch_size=2, list_batch_size=4)
    for i in range(3):
        p.add_list_change(lop(f"c{i}"), f"t{i}")
    assert not p.due()
    clock.now += 1.0
    assert p.due()
    d = p.drain()
    assert len(d.list_changes) == 3 and len(p) == 0 and not p.due()


def test_size_counts_per_list_and_action() -> None:
    p, _ = pending(list_batch_size=4)
    for i in range(3):
        p.add_list_change(lop(f"a{i}", list_id=1), "x")
        p.add_list_change(lop(f"b{i}", list_id=2), "x")
        p.add_list_change(lop(f"d{i}", "delete", list_id=1), "x")
    assert p.list_count == 9 and not p.due()
    p.add_list_change(lop("b3", list_id=2), "x")
    assert p.due()
    d = p.drain()
    assert [c.primary_key for c in d.list_changes] == ["b0", "b1", "b2", "b3"]


def test_final_state_per_list_and_contact_later_event_wins() -> None:
    p, clock = pending(list_batch_size=100)
    p.add_list_change(lop("a", "add", ts=10), "t1")
    p.add_list_change(lop("a", "delete", ts=20), "t2")
    p.add_list_change(lop("a", "add", ts=15), "t3")  # older than the delete: ignored
    p.add_list_change(lop("b", "delete", ts=5), "t4")
    p.add_list_change(lop("b", "add", ts=5), "t5")  # equal time: the later one wins
    p.add_list_change(lop("a", "add", ts=30, list_id=78), "t6")  # another list
    assert p.list_count == 3
    clock.now += 5
    d = p.drain()
    assert [(c.primary_key, c.list_id, c.action, c.event_time_ms) for c in d.list_changes] == [
        ("a", 77, "delete", 20), ("b", 77, "add", 5), ("a", 78, "add", 30)]
    assert sorted(d.tokens) == ["t1", "t2", "t3", "t4", "t5", "t6"]  # every event is acked


def test_changed_action_moves_to_its_group_for_size_counting() -> None:
    p, _ = pending(list_batch_size=2)
    p.add_list_change(lop("a", "add", ts=1), "t")
    p.add_list_change(lop("b", "delete", ts=1), "t")
    assert not p.due()
    p.add_list_change(lop("a", "delete", ts=2), "t")  # now two deletes wait
    assert p.due()
    d = p.drain()
    # Ordered by the deciding change, as ListMembershipBatcher orders ids.
    assert [(c.primary_key, c.action) for c in d.list_changes] == [("b", "delete"),
                                                                    ("a", "delete")]
    assert len(p) == 0


def test_lists_by_name_and_by_id_wait_apart() -> None:
    p, clock = pending(list_batch_size=2)
    p.add_list_change(lop("a", list_id=None, name="VIP"), "t")
    p.add_list_change(lop("a", list_id=77), "t")
    assert p.list_count == 2 and not p.due()
    p.add_list_change(lop("b", list_id=None, name="VIP"), "t")
    d = p.drain()
    assert [(c.primary_key, c.list_name) for c in d.list_changes] == [("a", "VIP"),
                                                                      ("b", "VIP")]


def test_list_change_takes_its_contacts_waiting_upsert_along() -> None:
    p, _ = pending(batch_size=10, list_batch_size=2)
    p.add_upsert("3", ContactChange("a", {"1": "A"}, 1), "u-a")
    p.add_upsert("3", ContactChange("z", {"1": "Z"}, 1), "u-z")
    p.add_list_change(lop("a"), "l-a")
    p.add_list_change(lop("b"), "l-b")
    d = p.drain()
    assert [c.primary_key for c in d.upserts_by_key_id["3"]] == ["a"]
    assert [c.primary_key for c in d.list_changes] == ["a", "b"]
    assert d.tokens == ["l-a", "u-a", "l-b"]
    assert len(p) == 1  # z's upsert keeps waiting for a full batch or the interval


def test_age_of_the_oldest_list_change_flushes_everything() -> None:
    p, clock = pending(batch_size=10, list_batch_size=10)
    p.add_list_change(lop("a"), "l")
    clock.now += 0.6
    p.add_upsert("3", ContactChange("b", {}, 1), "u")
    p.add_trigger(TriggerRequest(1, "3", "b", trigger_id="x"), "tr")
    clock.now += 0.4
    assert p.oldest_age() == pytest.approx(1.0)
    assert p.due()
    d = p.drain()
    assert not d.empty and len(p) == 0
    assert sorted(d.tokens) == ["l", "tr", "u"]


def test_a_changed_state_keeps_its_age() -> None:
    p, clock = pending(list_batch_size=10)
    p.add_list_change(lop("a", ts=1), "t1")
    clock.now += 0.9
    p.add_list_change(lop("a", "delete", ts=2), "t2")
    clock.now += 0.1
    assert p.due()


def test_burst_of_50000_entries_takes_five_list_calls() -> None:
    p, clock = pending(batch_size=1000, list_batch_size=10_000, interval=1e9)
    sent: list[int] = []
    upserts = 0
    for i in range(50_000):
        pk = f"c{i}@example.com"
        p.add_upsert("3", ContactChange(pk, {}, i), "u")
        p.add_list_change(lop(pk, ts=i), "l")
        while p.due():
            d = p.drain()
            for waiting in d.upserts_by_key_id.values():
                upserts += -(-len(waiting) // 1000)
            changes = [ListMembershipChange(c.list_id or 0, c.key_id, c.primary_key, c.action)
                       for c in d.list_changes]
            sent.extend(len(b.external_ids) for b in ListMembershipBatcher().batches(changes))
    assert sent == [10_000] * 5
    assert upserts == 50
    assert len(p) == 0
