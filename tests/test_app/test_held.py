"""app.held: held events as an index per id plus one entry per event."""

from __future__ import annotations

from typing import Any

from app.held import HeldEntry, HeldEvents, id_of_item_key, item_key
from app.resolution import IdentityResolver, IdentityState


class RecordingDict(dict[str, Any]):
    """A dict that counts writes per key (what a table view would send to the changelog)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: dict[str, int] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.writes[key] = self.writes.get(key, 0) + 1
        super().__setitem__(key, value)


def msg(mid: str, ts: int) -> dict[str, Any]:
    return {"kind": "event", "event": {"messageId": mid}, "ts": ts, "stage": "anonymous"}


def test_item_keys_give_back_any_id() -> None:
    for ident in ("a1", "a\x001", "\x00", "x\x0012\x00", ""):
        for seq in (0, 7, 12):
            assert id_of_item_key(item_key(ident, seq)) == ident


def test_add_writes_each_event_once_and_a_small_index() -> None:
    index: dict[str, Any] = {}
    items = RecordingDict()
    held = HeldEvents(index, items)
    for i in range(50):
        held.add("a1", msg(f"m{i}", 1000 + i), 1000 + i, 5)
    # Every event written once under its own key; the list is never rewritten.
    assert items.writes == {item_key("a1", i): 1 for i in range(50)}
    assert index["a1"]["next"] == 50
    assert held.entries("a1") == [HeldEntry(i, 1000 + i, 5) for i in range(50)]
    assert [m["event"]["messageId"] for m in held["a1"]] == [f"m{i}" for i in range(50)]
    assert list(held) == ["a1"] and len(held) == 1


def test_take_removes_events_and_the_index_when_empty() -> None:
    index: dict[str, Any] = {}
    items: dict[str, Any] = {}
    held = HeldEvents(index, items)
    for i in range(3):
        held.add("a1", msg(f"m{i}", i), i, 0)
    assert [m["event"]["messageId"] for m in held.take("a1", {0, 2})] == ["m0", "m2"]
    assert set(items) == {item_key("a1", 1)}
    held.add("a1", msg("m3", 3), 3, 0)  # sequence numbers are not reused while held
    assert [e.seq for e in held.entries("a1")] == [1, 3]
    assert [m["event"]["messageId"] for m in held.take_all("a1")] == ["m1", "m3"]
    assert index == {} and items == {}
    assert held.take_all("a1") == [] and "a1" not in held


def test_missing_item_is_skipped() -> None:
    """A worker stopped between writing the items and the index of a release: the
    events had been sent; reading the link again must not fail on them."""
    index: dict[str, Any] = {}
    items: dict[str, Any] = {}
    held = HeldEvents(index, items)
    held.add("a1", msg("m0", 0), 0, 0)
    held.add("a1", msg("m1", 1), 1, 0)
    del items[item_key("a1", 0)]
    assert [m["event"]["messageId"] for m in held["a1"]] == ["m1"]
    assert [m["event"]["messageId"] for m in held.take_all("a1")] == ["m1"]
    assert index == {} and items == {}


def test_earlier_format_is_moved_to_items_on_first_read() -> None:
    old = [dict(msg("m0", 20), held_at=7), dict(msg("m1", 10), held_at=8)]
    index: dict[str, Any] = {"a1": old}
    items: dict[str, Any] = {}
    held = HeldEvents(index, items)
    assert held.entries("a1") == [HeldEntry(0, 20, 7), HeldEntry(1, 10, 8)]
    assert items == {item_key("a1", 0): old[0], item_key("a1", 1): old[1]}
    assert index["a1"] == {"next": 2, "held": [[0, 20, 7], [1, 10, 8]]}
    # ... and released like any other, in event-time order.
    state = IdentityState({}, {}, index, items)
    resolver = IdentityResolver(state, hold_max_per_id=10, hold_expiry_ms=10**9,
                                now_ms=lambda: 100)
    out = resolver.handle("a1", {"kind": "link", "id_type": "anonymous", "id": "a1",
                                 "primary_key": "p@x", "ts": 30})
    assert [e.value["event"]["messageId"] for e in out] == ["m1", "m0"]
    assert index == {} and items == {}


def test_resolver_overflow_and_expiry_read_only_what_they_drop() -> None:
    """Bounding and expiring work from the index; only dropped events are read."""
    now = {"ms": 0}
    index: dict[str, Any] = {}
    items = RecordingDict()
    state = IdentityState({}, {}, index, items)
    resolver = IdentityResolver(state, hold_max_per_id=3, hold_expiry_ms=1000,
                                now_ms=lambda: now["ms"])
    for i, ts in enumerate((50, 10, 40, 30)):
        out = resolver.handle("a1", msg(f"m{i}", ts))
    # The fourth event pushed out the oldest in event time (ts 10).
    assert [e.value["reason"] for e in out] == ["identity_hold_overflow"]
    assert sorted(m["ts"] for m in state.held["a1"]) == [30, 40, 50]
    now["ms"] = 5000  # everything held so far expires with the next hold
    out = resolver.handle("a1", msg("m9", 60))
    assert [e.value["reason"] for e in out] == ["identity_unresolved_expired"] * 3
    assert [m["ts"] for m in state.held["a1"]] == [60]
    # With nothing left held the index went, so numbering starts again at 0.
    assert set(items) == {item_key("a1", 0)}
    assert items.writes == {item_key("a1", 0): 2, item_key("a1", 1): 1,
                            item_key("a1", 2): 1, item_key("a1", 3): 1}


def test_held_before_names_the_events_held_strictly_before_the_cutoff() -> None:
    held = HeldEvents({}, {})
    for seq, held_at in enumerate((100, 200, 200, 300)):
        held.add("a1", msg(f"m{seq}", 10), 10, held_at)
    assert held.held_before("a1", 100) == set()
    assert held.held_before("a1", 201) == {0, 1, 2}
    assert held.held_before("a1", 10_000) == {0, 1, 2, 3}
    assert held.held_before("nobody", 10_000) == set()
    held.take("a1", {1})
    assert held.held_before("a1", 201) == {0, 2}
