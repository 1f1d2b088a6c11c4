"""app.rules.deadlines: due deadlines found in order, updates and removals honoured."""

from __future__ import annotations

import random

from app.rules.deadlines import DeadlineIndex


def test_due_keys_come_out_earliest_first_and_only_once() -> None:
    idx = DeadlineIndex()
    idx.set("c", 300)
    idx.set("a", 100)
    idx.set("b", 200)
    assert idx.pop_due(99) == []
    assert idx.pop_due(200) == ["a", "b"]
    assert idx.pop_due(200) == []
    assert len(idx) == 1 and idx.get("c") == 300
    assert idx.pop_due(10_000) == ["c"] and len(idx) == 0


def test_a_moved_or_removed_deadline_is_not_due_at_its_old_time() -> None:
    idx = DeadlineIndex()
    idx.set("moved", 100)
    idx.set("gone", 100)
    idx.set("moved", 500)
    idx.set("gone", None)
    idx.set("same", 50)
    idx.set("same", 50)
    assert idx.pop_due(400) == ["same"]
    assert idx.get("moved") == 500 and idx.get("gone") is None
    # Moved earlier: due at the new time.
    idx.set("moved", 150)
    assert idx.pop_due(200) == ["moved"]
    assert idx.pop_due(1_000) == []


def test_matches_a_scan_of_a_plain_dict_and_stays_bounded() -> None:
    rnd = random.Random(7)
    idx = DeadlineIndex()
    plain: dict[str, int] = {}
    now = 0
    for step in range(20_000):
        key = f"k{rnd.randrange(500)}"
        if rnd.random() < 0.1:
            idx.set(key, None)
            plain.pop(key, None)
        else:
            d = now + rnd.randrange(1, 1_000)
            idx.set(key, d)
            plain[key] = d
        if step % 50 == 0:
            now += rnd.randrange(0, 200)
            want = sorted((d, k) for k, d in plain.items() if d <= now)
            for _d, k in want:
                del plain[k]
            assert idx.pop_due(now) == [k for _d, k in want]
            assert len(idx) == len(plain)
    # Stale heap entries are compacted away: never more than about twice the live ones.
    assert idx.heap_size <= 2 * len(idx) + 1024
