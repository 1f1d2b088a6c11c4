"""app.shared_decode: a message is decoded once for all the agents reading its topic,
and the agents sharing the records leave them as they were."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import pytest

import bench.stages
from app.envelope import MalformedRecord, pack, unpack
from app.shared_decode import Decoded, SharedDecodes
from bench.generate import build_rules, generate_events, rule_time_unit
from bench.stages import check_contacts, run_stages, stage_settings


@dataclass(eq=False)
class Message:  # what the cache reads of a Faust message
    key: bytes | None
    value: bytes
    offset: int
    partition: int = 0


_offsets = iter(range(1_000_000))


def envelope(*keys: str) -> Message:
    [env] = pack([(k, {"kind": "event", "n": i}) for i, k in enumerate(keys)], 1)
    return Message(None, env.value, next(_offsets))


class CountingDecode:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, key: Any, value: Any) -> Decoded:
        self.calls += 1
        return unpack(key, value)


def test_two_readers_decode_each_message_once_and_get_the_same_records() -> None:
    decode = CountingDecode()
    shared = SharedDecodes(100, decode)
    users, rules = shared.join(), shared.join()
    a, b = envelope("x@e.com", "y@e.com"), envelope("z@e.com")
    first_a, _ = users.decode(a)
    first_b, _ = users.decode(b)
    assert shared.held_records == 3
    second_a, _ = rules.decode(a)
    second_b, _ = rules.decode(b)
    assert decode.calls == 2
    assert second_a is first_a and second_b is first_b
    assert [k for k, _v in first_a] == ["x@e.com", "y@e.com"]
    # Every reader took them: nothing is kept.
    assert shared.held_records == 0
    assert (shared.decoded, shared.shared, shared.dropped) == (2, 2, 0)
    # Read again (a redelivery after the readers moved on): decoded, not kept.
    again, _ = users.decode(a)
    assert decode.calls == 3 and again == first_a and shared.held_records == 0


def test_a_reader_positioned_past_a_message_does_not_wait_for_it() -> None:
    shared = SharedDecodes(100)
    users, rules = shared.join(), shared.join()
    first, later = envelope("a@e.com"), envelope("b@e.com")
    rules.decode(later)  # rules is already past `first` in partition 0
    assert shared.held_records == 1
    users.decode(first)
    assert shared.held_records == 1  # nobody left to take `first`
    users.decode(later)
    assert shared.held_records == 0 and shared.shared == 1
    # Another partition is positioned on its own.
    other = Message(None, envelope("c@e.com").value, offset=0, partition=1)
    users.decode(other)
    assert shared.held_records == 1


def test_malformed_records_go_only_to_the_reader_that_decoded() -> None:
    shared = SharedDecodes(100)
    users, rules = shared.join(), shared.join()
    msg = Message(None, orjson.dumps({"records": [{"key": "k@e.com", "value": {}}, 7]}), 0)
    records, bad = rules.decode(msg)
    assert [k for k, _v in records] == ["k@e.com"]
    assert [type(b) for b in bad] == [MalformedRecord]
    records2, bad2 = users.decode(msg)
    assert records2 is records and bad2 == []
    # Not a record at all: one dead letter, by the first reader.
    garbage = Message(None, b"not json", 1)
    assert len(users.decode(garbage)[1]) == 1
    assert rules.decode(garbage) == ([], [])


def test_one_reader_keeps_nothing() -> None:
    decode = CountingDecode()
    shared = SharedDecodes(100, decode)
    users = shared.join()
    msg = envelope("x@e.com")
    users.decode(msg)
    users.decode(msg)
    assert decode.calls == 2 and shared.held_records == 0 and shared.shared == 0


def test_decodes_past_the_bound_are_dropped_oldest_first() -> None:
    decode = CountingDecode()
    shared = SharedDecodes(4, decode)
    users, rules = shared.join(), shared.join()
    msgs = [envelope(f"a{i}@e.com", f"b{i}@e.com") for i in range(3)]
    for m in msgs:
        rules.decode(m)  # one reader runs ahead
    # 6 records waiting, 4 allowed: the oldest message went.
    assert shared.held_records == 4 and shared.dropped == 1
    for m in msgs:
        users.decode(m)  # the other reader catches up
    assert decode.calls == 4  # the dropped one decoded again (not kept), the others shared
    assert shared.shared == 2 and shared.held_records == 0


def test_max_records_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_records"):
        SharedDecodes(0)


def test_users_and_rules_leave_the_records_they_share_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stage benchmark hands the users stage's records to the rules stage, as the
    worker does: after both ran, every record must equal a fresh decode of its bytes."""
    gen = generate_events(20_000, 4_000, seed=3, shop=True)
    decoded: list[tuple[list[tuple[str, dict[str, Any]]], bytes]] = []

    def recording_unpack(key: Any, value: Any) -> Decoded:
        out = unpack(key, value)
        decoded.append((out[0], bytes(value)))
        return out

    monkeypatch.setattr(bench.stages, "unpack", recording_unpack)
    run = run_stages(gen.events, stage_settings(build_rules(20, rule_time_unit(gen))))
    assert run.counts["rule_matches"] > 0 and run.counts["operations"] > 0
    assert check_contacts(run, gen) == {"missing": 0, "unexpected": 0, "wrong_fields": 0}
    assert sum(len(records) for records, _raw in decoded) >= run.counts["contact_events"]
    for records, raw in decoded:
        assert records == unpack(None, raw)[0]
