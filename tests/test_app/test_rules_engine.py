from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import orjson
import pytest
import yaml

from app.rules import EngineResult, RuleEngine, RuleMatch, parse_rules, trigger_id

T0 = 1_700_000_000_000
S = 1000
M = 60 * S
H = 60 * M


def track(event: str, **properties: Any) -> dict[str, Any]:
    return {"type": "track", "event": event, "properties": properties}


def page(name: str, **properties: Any) -> dict[str, Any]:
    return {"type": "page", "name": name, "properties": properties}


def identify(**traits: Any) -> dict[str, Any]:
    return {"type": "identify", "traits": traits}


def rule(name: str, steps: list[Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "emarsys_event_id": 100, "steps": steps, **extra}


class Harness:
    """Feeds one contact's events; the state goes through orjson between every call."""

    def __init__(self, rules: list[dict[str, Any]], engine_cfg: dict[str, Any] | None = None):
        self.engine = RuleEngine(parse_rules(rules, engine_cfg))
        self.state: dict[str, Any] | None = None
        self.matches: list[RuleMatch] = []
        self.stats: Counter[str] = Counter()
        self._ids = itertools.count(1)

    def _take(self, res: EngineResult) -> EngineResult:
        raw = orjson.dumps(res.state)
        self.state = orjson.loads(raw)
        assert self.state == res.state  # nothing lost or changed by serialisation
        assert res.next_deadline_ms == self.engine.next_deadline(self.state)
        self.matches.extend(res.matches)
        self.stats.update(res.stats)
        return res

    def send(
        self,
        ts: int,
        event: dict[str, Any],
        mid: str | None = None,
        *,
        wm: int | None = None,
    ) -> EngineResult:
        """Deliver at absolute time T0 + ts; the watermark defaults to the event's own ts."""
        mid = mid if mid is not None else f"m{next(self._ids)}"
        watermark = T0 + (ts if wm is None else wm)
        return self._take(
            self.engine.on_event(self.state, event, T0 + ts, mid, watermark_ms=watermark)
        )

    def advance(self, wm: int) -> EngineResult:
        return self._take(self.engine.advance_time(self.state, T0 + wm))

    def names(self) -> list[str]:
        return [m.rule for m in self.matches]

    def event_ids(self) -> list[list[str]]:
        return [[mid for mid, _ in m.events] for m in self.matches]


# --------------------------------------------------------------------------------------------
# Step matching and operators
# --------------------------------------------------------------------------------------------

OPERATOR_EVENT = {
    "price": 10,
    "zero": 0,
    "flag": True,
    "none": None,
    "category": "shoes",
    "date": "2024-05-01",
    "tags": ["a", "b", 3],
    "title": "Red Running Shoe",
    "items": [{"sku": "S1"}, {"sku": "S2"}],
    "a.b": "dotted",
}


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ({"properties.category": {"eq": "shoes"}}, True),
        ({"properties.category": "shoes"}, True),  # shorthand for eq
        ({"properties.category": {"eq": "boots"}}, False),
        ({"properties.price": {"eq": 10.0}}, True),
        ({"properties.flag": {"eq": 1}}, False),  # booleans only equal booleans
        ({"properties.flag": {"eq": True}}, True),
        ({"properties.none": {"eq": None}}, True),
        ({"properties.missing": {"eq": None}}, False),
        ({"properties.category": {"ne": "boots"}}, True),
        ({"properties.category": {"ne": "shoes"}}, False),
        ({"properties.missing": {"ne": "shoes"}}, True),
        ({"properties.price": {"gt": 9}}, True),
        ({"properties.price": {"gt": 10}}, False),
        ({"properties.price": {"gte": 10}}, True),
        ({"properties.price": {"lt": 10}}, False),
        ({"properties.price": {"lte": 10}}, True),
        ({"properties.price": {"gt": "1"}}, False),  # type mismatch fails
        ({"properties.flag": {"gt": 0}}, False),  # a boolean is not a number
        ({"properties.missing": {"lt": 100}}, False),
        ({"properties.date": {"gte": "2024-01-01"}}, True),  # lexicographic for strings
        ({"properties.date": {"lt": "2024-01-01"}}, False),
        ({"properties.category": {"in": ["shoes", "boots"]}}, True),
        ({"properties.category": {"in": ["hats"]}}, False),
        ({"properties.price": {"in": [1, 10]}}, True),
        ({"properties.flag": {"in": [1, "x"]}}, False),
        ({"properties.category": {"not_in": ["hats"]}}, True),
        ({"properties.category": {"not_in": ["shoes"]}}, False),
        ({"properties.missing": {"not_in": ["shoes"]}}, True),
        ({"properties.title": {"contains": "Running"}}, True),
        ({"properties.title": {"contains": "running"}}, False),
        ({"properties.tags": {"contains": "b"}}, True),
        ({"properties.tags": {"contains": 3}}, True),
        ({"properties.tags": {"contains": "c"}}, False),
        ({"properties.price": {"contains": 1}}, False),
        ({"properties.none": {"exists": True}}, False),
        ({"properties.zero": {"exists": True}}, True),
        ({"properties.missing": {"exists": False}}, True),
        ({"properties.none": {"exists": False}}, True),
        ({"properties.title": {"regex": "^Red .*Shoe$"}}, True),
        ({"properties.title": {"regex": "(?i)running"}}, True),
        ({"properties.title": {"regex": "^Running"}}, False),
        ({"properties.price": {"regex": "10"}}, False),  # only strings
        ({"properties.items[-1].sku": {"eq": "S2"}}, True),  # app.paths syntax
        ({'properties."a.b"': {"eq": "dotted"}}, True),
        ({"properties.price": {"gt": 0, "lt": 100}}, True),  # operators are ANDed
        ({"properties.price": {"gt": 0, "lt": 5}}, False),
        ({"properties.price": {"gt": 0}, "properties.category": {"eq": "hats"}}, False),
    ],
)
def test_where_operators(where: dict[str, Any], expected: bool) -> None:
    h = Harness([rule("r", [{"event": "Viewed", "where": where}])])
    h.send(0, track("Viewed", **OPERATOR_EVENT))
    assert bool(h.matches) is expected


@pytest.mark.parametrize(
    ("step", "event", "expected"),
    [
        ({"event": "Signed Up"}, track("Signed Up"), True),
        ({"event": "Signed Up"}, {"type": "screen", "event": "Signed Up"}, False),
        ({"type": "screen", "event": "Odd"}, {"type": "screen", "event": "Odd"}, True),
        ({"type": "page", "name": "Pricing"}, page("Pricing"), True),
        ({"type": "page", "name": "Pricing"}, page("Home"), False),
        ({"type": "page", "name": "Pricing"}, {"type": "screen", "name": "Pricing"}, False),
        ({"name": "Pricing"}, {"type": "screen", "name": "Pricing"}, True),
        ({"type": "identify"}, identify(email="a@b.c"), True),
        ({"type": "identify"}, track("identify"), False),
        ({"type": "page"}, page("Anything"), True),
        (
            {"type": "identify", "where": {"traits.plan": {"eq": "pro"}}},
            identify(plan="pro"),
            True,
        ),
    ],
)
def test_step_type_event_name(step: dict[str, Any], event: dict[str, Any], expected: bool) -> None:
    h = Harness([rule("r", [step])])
    h.send(0, event)
    assert bool(h.matches) is expected


def test_eq_step_and_ne_step_compare_with_earlier_steps() -> None:
    h = Harness(
        [
            rule(
                "same_sku",
                [
                    {"event": "Viewed"},
                    {"event": "Added", "where": {"properties.sku": {"eq_step": 0}}},
                ],
            ),
            rule(
                "other_list",
                [
                    {"event": "Viewed"},
                    {
                        "event": "Added",
                        "where": {"properties.list_sku": {"ne_step": 0, "path": "properties.sku"}},
                    },
                ],
            ),
        ]
    )
    h.send(0, track("Viewed", sku="S1"), "v1")
    h.send(1 * S, track("Added", sku="S2", list_sku="S1"), "a1")  # same_sku no, other_list no
    assert h.matches == []
    h.send(2 * S, track("Added", sku="S1", list_sku="S9"), "a2")
    assert sorted(h.names()) == ["other_list", "same_sku"]
    assert {tuple(ids) for ids in h.event_ids()} == {("v1", "a2")}


def test_eq_step_uses_the_last_event_of_a_repeated_step() -> None:
    h = Harness(
        [
            rule(
                "r",
                [
                    {"event": "Viewed", "times": 2},
                    {"event": "Added", "where": {"properties.sku": {"eq_step": 0}}},
                ],
            )
        ]
    )
    h.send(0, track("Viewed", sku="S1"))
    h.send(1 * S, track("Viewed", sku="S2"))
    h.send(2 * S, track("Added", sku="S1"))
    assert h.matches == []
    h.send(3 * S, track("Added", sku="S2"))
    assert len(h.matches) == 1


# --------------------------------------------------------------------------------------------
# Contiguity and quantifiers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("contiguity", "expected"), [("relaxed", 1), ("strict", 0)])
def test_contiguity_relaxed_vs_strict(contiguity: str, expected: int) -> None:
    h = Harness([rule("r", [{"event": "A"}, {"event": "B", "contiguity": contiguity}])])
    h.send(0, track("A"))
    h.send(1 * S, page("Unrelated"))  # any event of the contact breaks strict contiguity
    h.send(2 * S, track("B"))
    assert len(h.matches) == expected


def test_strict_contiguity_matches_the_very_next_event() -> None:
    h = Harness([rule("r", [{"event": "A"}, {"event": "B", "contiguity": "strict"}])])
    h.send(0, track("A"), "a1")
    h.send(1 * S, track("B"), "b1")
    assert h.event_ids() == [["a1", "b1"]]
    assert h.state is not None and h.state["partials"] == {}


def test_times_three_page_views_then_signup() -> None:
    rules = [rule("r", [{"type": "page", "times": 3}, {"event": "Signed Up"}])]
    h = Harness(rules)
    h.send(0, page("A"), "p1")
    h.send(1 * S, page("B"), "p2")
    h.send(2 * S, track("Signed Up"), "s1")
    assert h.matches == []  # only 2 page views before the signup

    h = Harness(rules)
    for i in range(4):
        h.send(i * S, page(f"P{i}"), f"p{i}")
    h.send(10 * S, track("Signed Up"), "s1")
    assert h.event_ids() == [["p0", "p1", "p2", "s1"]]  # exactly 3, oldest first


def test_strict_times_on_first_step_means_in_a_row() -> None:
    rules = [
        rule("r", [{"type": "page", "times": 3, "contiguity": "strict"}, {"event": "Signed Up"}])
    ]
    h = Harness(rules)
    for i, event in enumerate([page("A"), page("B"), track("Other"), page("C"), page("D")]):
        h.send(i * S, event)
    h.send(10 * S, track("Signed Up"))
    assert h.matches == []  # 4 page views, but never 3 in a row

    h = Harness(rules)
    h.send(0, page("A"), "p1")
    h.send(1 * S, page("B"), "p2")
    h.send(2 * S, track("Other"), "o1")  # breaks the run
    h.send(3 * S, page("C"), "p3")
    h.send(4 * S, page("D"), "p4")
    h.send(5 * S, page("E"), "p5")
    h.send(6 * S, track("Signed Up"), "s1")
    assert h.event_ids() == [["p3", "p4", "p5", "s1"]]


def test_at_least_is_greedy_with_proceed() -> None:
    h = Harness(
        [
            rule(
                "r",
                [{"type": "page", "at_least": 2}, {"event": "Signed Up"}],
                data={"last_page": "steps[0].name"},
            )
        ]
    )
    h.send(0, page("A"), "p1")
    h.send(1 * S, track("Signed Up"), "s0")  # 1 < 2: cannot proceed yet
    assert h.matches == []
    h.send(2 * S, page("B"), "p2")
    h.send(3 * S, page("C"), "p3")  # keeps counting after 2
    h.send(4 * S, track("Signed Up"), "s1")  # ... and proceeds
    assert h.event_ids() == [["p1", "p2", "p3", "s1"]]
    assert h.matches[0].data == {"last_page": "C"}


def test_at_least_as_last_step_completes_when_reached() -> None:
    h = Harness([rule("r", [{"event": "Login"}, {"type": "page", "at_least": 2}])])
    h.send(0, track("Login"), "l1")
    h.send(1 * S, page("A"), "p1")
    h.send(2 * S, page("B"), "p2")
    h.send(3 * S, page("C"), "p3")
    assert h.event_ids() == [["l1", "p1", "p2"]]


def test_at_least_event_matching_both_steps_proceeds() -> None:
    h = Harness(
        [
            rule(
                "r",
                [
                    {"type": "page", "at_least": 2},
                    {"type": "page", "name": "Checkout"},
                ],
            )
        ]
    )
    h.send(0, page("A"), "p1")
    h.send(1 * S, page("Checkout"), "c1")  # only 1 counted: it is the 2nd page view
    h.send(2 * S, page("Checkout"), "c2")  # reached 2 -> may proceed: proceeds
    assert h.event_ids() == [["p1", "c1", "c2"]]


def test_strict_step_after_at_least_needs_the_next_event() -> None:
    rules = [
        rule(
            "r",
            [{"type": "page", "at_least": 2}, {"event": "Signed Up", "contiguity": "strict"}],
        )
    ]
    h = Harness(rules)
    h.send(0, page("A"))
    h.send(1 * S, page("B"))
    h.send(2 * S, track("Other"))
    h.send(3 * S, track("Signed Up"))
    assert h.matches == []

    h = Harness(rules)
    h.send(0, page("A"), "p1")
    h.send(1 * S, page("B"), "p2")
    h.send(2 * S, track("Other"), "o1")
    h.send(3 * S, page("C"), "p3")  # a further count makes the next event contiguous again
    h.send(4 * S, track("Signed Up"), "s1")
    assert h.event_ids() == [["p1", "p2", "p3", "s1"]]


def test_strict_times_on_a_later_step_needs_consecutive_repetitions() -> None:
    rules = [rule("r", [{"event": "Start"}, {"type": "page", "times": 2, "contiguity": "strict"}])]
    h = Harness(rules)
    h.send(0, track("Start"))
    h.send(1 * S, page("A"))
    h.send(2 * S, track("Other"))
    h.send(3 * S, page("B"))
    assert h.matches == []

    h = Harness(rules)
    h.send(0, track("Start"), "s")
    h.send(1 * S, page("A"), "a")
    h.send(2 * S, page("B"), "b")
    assert h.event_ids() == [["s", "a", "b"]]


def test_long_at_least_run_stays_compact() -> None:
    h = Harness([rule("r", [{"type": "page", "at_least": 3}, {"event": "Signed Up"}])])
    for i in range(250):
        h.send(i * S, page(f"P{i}"), f"p{i}")
    assert h.state is not None
    (partial,) = h.state["partials"]["r"]["p"]  # newer starts are dominated: not kept
    assert len(partial["e"]) == 100 and partial["c"] == 250
    h.send(300 * S, track("Signed Up"), "s")
    (match,) = h.matches
    assert match.first_message_id == "p0"
    assert [mid for mid, _ in match.events][:2] == ["p0", "p152"]
    assert match.events[-2:] == [("p249", T0 + 249 * S), ("s", T0 + 300 * S)]


# --------------------------------------------------------------------------------------------
# within
# --------------------------------------------------------------------------------------------


def test_rule_within_bounds_the_whole_sequence() -> None:
    rules = [rule("r", [{"event": "A"}, {"event": "B"}, {"event": "C"}], within="10m")]
    h = Harness(rules)
    h.send(0, track("A"))
    h.send(5 * M, track("B"))
    h.send(10 * M, track("C"))  # inclusive
    assert len(h.matches) == 1

    h = Harness(rules)
    h.send(0, track("A"))
    h.send(5 * M, track("B"))
    h.send(10 * M + 1, track("C"))
    assert h.matches == []
    assert h.stats["expired_partials"] == 1


def test_step_within_measures_the_gap_since_the_previous_step() -> None:
    rules = [rule("r", [{"event": "A"}, {"event": "B"}, {"event": "C", "within": "1m"}])]
    h = Harness(rules)
    h.send(0, track("A"))
    h.send(30 * M, track("B"))  # no limit between A and B
    h.send(31 * M, track("C"))
    assert len(h.matches) == 1

    h = Harness(rules)
    h.send(0, track("A"))
    h.send(30 * M, track("B"))
    h.send(31 * M + 1, track("C"))
    assert h.matches == []
    assert h.stats["expired_partials"] == 1


def test_rule_within_discards_an_absence_whose_deadline_exceeds_it() -> None:
    h = Harness(
        [rule("r", [{"event": "A"}, {"event": "B"}, {"absent": "C", "for": "1h"}], within="2h")]
    )
    h.send(0, track("A"))
    h.send(90 * M, track("B"))  # deadline would be 2h30 after A: cannot complete
    assert h.state is not None and h.state["partials"] == {}
    assert h.stats["expired_partials"] == 1
    h.advance(5 * H)
    assert h.matches == []


def test_partials_expire_on_the_watermark_and_later_events_are_late() -> None:
    h = Harness([rule("r", [{"event": "A"}, {"event": "B"}], within="10m")])
    h.send(0, track("A"))
    res = h.advance(11 * M)
    assert res.stats["expired_partials"] == 1
    assert h.state is not None and h.state["partials"] == {}
    res = h.send(9 * M, track("B"))  # would have matched: reported late instead
    assert res.late and h.matches == []


# --------------------------------------------------------------------------------------------
# absent
# --------------------------------------------------------------------------------------------


def test_trailing_absent_fires_via_advance_time_without_further_events() -> None:
    # FLINK-15160: the "did not happen" match must fire on time, not on the next event.
    h = Harness([rule("r", [{"event": "Added"}, {"absent": "Order Completed", "for": "1h"}])])
    res = h.send(0, track("Added"), "a1")
    assert res.next_deadline_ms == T0 + H
    assert h.advance(H - 1).matches == []
    res = h.advance(H)
    assert [m.rule for m in res.matches] == ["r"]
    match = res.matches[0]
    assert match.events == [("a1", T0)]
    assert match.event_time_ms == T0 and match.fired_at_ms == T0 + H
    assert res.next_deadline_ms is None
    assert h.advance(3 * H).matches == []  # fires once


def test_trailing_absent_is_cancelled_by_the_event() -> None:
    h = Harness([rule("r", [{"event": "Added"}, {"absent": "Order Completed", "for": "1h"}])])
    h.send(0, track("Added"))
    h.send(59 * M, track("Order Completed"))
    h.advance(2 * H)
    assert h.matches == []
    assert h.state is not None and h.state["partials"] == {}


def test_absence_window_is_half_open() -> None:
    h = Harness([rule("r", [{"event": "Added"}, {"absent": "Order Completed", "for": "1h"}])])
    h.send(0, track("Added"))
    h.send(H, track("Order Completed"))  # at the deadline: too late to cancel
    assert len(h.matches) == 1


def test_trailing_absent_fires_on_a_later_event_too() -> None:
    h = Harness([rule("r", [{"event": "Added"}, {"absent": "Order Completed", "for": "1h"}])])
    h.send(0, track("Added"))
    res = h.send(3 * H, page("Home"))
    assert len(res.matches) == 1 and res.matches[0].fired_at_ms == T0 + H


def test_absent_spec_with_where_and_eq_step() -> None:
    rules = [
        rule(
            "r",
            [
                {"event": "Added"},
                {
                    "absent": {
                        "event": "Order Completed",
                        "where": {"properties.sku": {"eq_step": 0}},
                    },
                    "for": "1h",
                },
            ],
        )
    ]
    h = Harness(rules)
    h.send(0, track("Added", sku="S1"))
    h.send(10 * M, track("Order Completed", sku="OTHER"))  # not the forbidden event
    h.advance(H)
    assert len(h.matches) == 1

    h = Harness(rules)
    h.send(0, track("Added", sku="S1"))
    h.send(10 * M, track("Order Completed", sku="S1"))
    h.advance(H)
    assert h.matches == []


def test_middle_absent_with_for_waits_then_proceeds() -> None:
    rules = [
        rule(
            "r",
            [
                {"event": "Trial Started"},
                {"absent": {"type": "page", "name": "Pricing"}, "for": "1d"},
                {"event": "Login"},
            ],
        )
    ]
    h = Harness(rules)
    h.send(0, track("Trial Started"), "t1")
    h.send(1 * H, track("Login"), "l1")  # before the absence is satisfied: ignored
    assert h.matches == []
    h.send(25 * H, track("Login"), "l2")
    assert h.event_ids() == [["t1", "l2"]]

    h = Harness(rules)
    h.send(0, track("Trial Started"))
    h.send(2 * H, page("Pricing"))  # forbidden within the day
    h.send(25 * H, track("Login"))
    assert h.matches == []


def test_step_within_after_a_waiting_absence_counts_from_its_deadline() -> None:
    rules = [
        rule(
            "r",
            [
                {"event": "Trial Started"},
                {"absent": "Upgraded", "for": "1d"},
                {"event": "Login", "within": "1h"},
            ],
        )
    ]
    h = Harness(rules)
    h.send(0, track("Trial Started"))
    h.send(25 * H, track("Login"))  # 1 h after the absence was satisfied (inclusive)
    assert len(h.matches) == 1

    h = Harness(rules)
    h.send(0, track("Trial Started"))
    h.send(25 * H + 1, track("Login"))
    assert h.matches == [] and h.stats["expired_partials"] == 1


def test_middle_absent_without_for_is_a_guard_between_steps() -> None:
    rules = [rule("r", [{"event": "A"}, {"absent": "X"}, {"event": "B"}])]
    h = Harness(rules)
    h.send(0, track("A"), "a1")
    h.send(1 * S, page("Other"))
    h.send(2 * S, track("B"), "b1")
    assert h.event_ids() == [["a1", "b1"]]

    h = Harness(rules)
    h.send(0, track("A"))
    h.send(1 * S, track("X"))
    h.send(2 * S, track("B"))
    assert h.matches == []


def test_absent_after_at_least_runs_from_the_latest_counted_event() -> None:
    h = Harness(
        [rule("r", [{"type": "page", "at_least": 2}, {"absent": "Signed Up", "for": "1h"}])]
    )
    h.send(0, page("A"), "p1")
    h.send(10 * M, page("B"), "p2")
    h.send(30 * M, page("C"), "p3")  # moves the deadline to 1h30
    assert h.advance(70 * M).matches == []
    res = h.advance(90 * M)
    assert [[mid for mid, _ in m.events] for m in res.matches] == [["p1", "p2", "p3"]]


# --------------------------------------------------------------------------------------------
# Event time, lateness, duplicates
# --------------------------------------------------------------------------------------------


def test_out_of_order_events_within_lateness_are_applied_in_event_time_order() -> None:
    h = Harness([rule("r", [{"event": "Viewed"}, {"event": "Added"}])], {"allowed_lateness": "5m"})
    # Arrival order: Added (ts 2s), then Viewed (ts 1s); the watermark lags behind.
    res = h.send(2 * S, track("Added"), "a1", wm=-5 * M)
    assert res.matches == [] and res.next_deadline_ms == T0 + 2 * S
    h.send(1 * S, track("Viewed"), "v1", wm=-5 * M)
    assert h.state is not None and [e[1] for e in h.state["buffer"]] == ["v1", "a1"]
    res = h.advance(2 * S)
    assert [[mid for mid, _ in m.events] for m in res.matches] == [["v1", "a1"]]
    assert h.state is not None and h.state["buffer"] == []


def test_buffered_events_and_deadlines_interleave_in_event_time() -> None:
    h = Harness([rule("r", [{"event": "Added"}, {"absent": "Order Completed", "for": "1h"}])])
    h.send(0, track("Added"), "a1", wm=-1)
    h.send(2 * H, track("Order Completed"), "o1", wm=-1)  # after the deadline (1h)
    res = h.advance(3 * H)
    assert len(res.matches) == 1  # the deadline fired before o1 was applied

    h = Harness([rule("r", [{"event": "Added"}, {"absent": "Order Completed", "for": "1h"}])])
    h.send(30 * M, track("Order Completed"), "o1", wm=-1)
    h.send(0, track("Added"), "a1", wm=-1)
    h.send(10 * M, track("Order Completed"), "o2", wm=-1)
    assert h.advance(3 * H).matches == []


def test_late_event_is_flagged_and_not_applied() -> None:
    h = Harness([rule("r", [{"event": "Viewed"}, {"event": "Added"}])])
    h.send(10 * S, track("Added"), "a1")  # applied at once (watermark = its ts)
    res = h.send(5 * S, track("Viewed"), "v1")
    assert res.late and not res.duplicate
    assert res.stats["late"] == 1
    assert h.state is not None and "v1" not in h.state["recent_ids"]
    assert h.state["last_ts"] == T0 + 10 * S
    h.send(11 * S, track("Added"), "a2")
    assert h.matches == []


def test_duplicates_are_ignored_whether_buffered_or_applied() -> None:
    h = Harness([rule("r", [{"event": "A"}, {"event": "A"}])])
    h.send(0, track("A"), "x", wm=-1)  # buffered
    res = h.send(0, track("A"), "x", wm=-1)
    assert res.duplicate and res.stats["duplicates"] == 1
    h.advance(0)  # applied
    res = h.send(0, track("A"), "x")
    assert res.duplicate and not res.late
    assert h.matches == []
    h.send(1 * S, track("A"), "y")
    assert h.event_ids() == [["x", "y"]]
    assert h.stats["duplicates"] == 2


def test_recent_ids_are_pruned_behind_the_lateness_window() -> None:
    h = Harness([rule("r", [{"event": "A"}])], {"allowed_lateness": "1m"})
    h.send(0, track("B"), "old")
    h.send(2 * M, track("B"), "new")
    assert h.state is not None and set(h.state["recent_ids"]) == {"new"}


# --------------------------------------------------------------------------------------------
# After a match: skip past last event, once_per; several rules; bounds
# --------------------------------------------------------------------------------------------


def test_skip_past_last_event() -> None:
    h = Harness([rule("r", [{"event": "A"}, {"event": "B"}])])
    h.send(0, track("A"), "a1")
    h.send(1 * S, track("A"), "a2")
    h.send(2 * S, track("B"), "b1")
    h.send(3 * S, track("B"), "b2")  # a2's partial contained events before b1: discarded
    assert h.event_ids() == [["a1", "b1"]]
    h.send(4 * S, track("A"), "a3")
    h.send(5 * S, track("B"), "b3")
    assert h.event_ids() == [["a1", "b1"], ["a3", "b3"]]


def test_skip_past_after_a_deadline_match_keeps_later_partials() -> None:
    h = Harness([rule("r", [{"event": "Added"}, {"absent": "Order Completed", "for": "1h"}])])
    h.send(0, track("Added"), "a1")
    h.send(10 * M, track("Added"), "a2")
    res = h.advance(2 * H)
    assert [[mid for mid, _ in m.events] for m in res.matches] == [["a1"], ["a2"]]


def test_once_per_suppresses_repeats() -> None:
    h = Harness([rule("r", [{"event": "A"}, {"event": "B"}], once_per="24h")])
    h.send(0, track("A"), "a1")
    h.send(1 * S, track("B"), "b1")
    assert len(h.matches) == 1
    h.send(1 * H, track("A"), "a2")
    res = h.send(2 * H, track("B"), "b2")
    assert res.matches == [] and res.stats["suppressed"] == 1
    h.send(3 * H, track("B"), "b3")  # the suppressed match consumed a2
    assert h.stats["suppressed"] == 1
    h.send(24 * H + 1 * S, track("A"), "a4")
    h.send(24 * H + 2 * S, track("B"), "b4")
    assert h.event_ids() == [["a1", "b1"], ["a4", "b4"]]
    assert h.state is not None and h.state["last_fired"] == {"r": T0 + 24 * H + 2 * S}


def test_once_per_window_survives_while_a_partial_waits_for_its_deadline() -> None:
    h = Harness(
        [
            rule(
                "r",
                [{"event": "Added"}, {"absent": "Order Completed", "for": "2h"}],
                once_per="24h",
            )
        ]
    )
    h.send(0, track("Added"), "a1")
    h.advance(2 * H)
    assert len(h.matches) == 1
    h.send(23 * H, track("Added"), "a2")  # its match would have event time 23 h: suppressed
    h.send(24 * H, page("Home"), "p1")  # the clock passes 24 h before the deadline fires
    res = h.advance(25 * H)
    assert res.matches == [] and res.stats["suppressed"] == 1
    assert h.state is not None and h.state["last_fired"] == {}  # now safe to forget


def test_several_rules_evaluate_independently() -> None:
    h = Harness(
        [
            rule("ab", [{"event": "A"}, {"event": "B"}]),
            rule("a_strict_c", [{"event": "A"}, {"event": "C", "contiguity": "strict"}]),
            rule("b_only", [{"event": "B"}]),
        ]
    )
    h.send(0, track("A"), "a1")
    h.send(1 * S, track("C"), "c1")
    h.send(2 * S, track("B"), "b1")
    assert sorted((m.rule, tuple(mid for mid, _ in m.events)) for m in h.matches) == [
        ("a_strict_c", ("a1", "c1")),
        ("ab", ("a1", "b1")),
        ("b_only", ("b1",)),
    ]


def test_max_partial_matches_drops_the_oldest() -> None:
    h = Harness(
        [rule("r", [{"event": "A"}, {"event": "B"}], data={"n": "steps[0].properties.n"})],
        {"max_partial_matches": 3},
    )
    for i in range(5):
        h.send(i * S, track("A", n=i), f"a{i}")
    assert h.state is not None and len(h.state["partials"]["r"]["p"]) == 3
    assert h.stats["dropped_partials"] == 2
    h.send(10 * S, track("B"), "b")
    assert h.event_ids() == [["a2", "b"]]  # a0 and a1 were dropped
    assert h.matches[0].data == {"n": 2}


# --------------------------------------------------------------------------------------------
# State, API details
# --------------------------------------------------------------------------------------------


def test_state_is_compact_and_json_round_trips() -> None:
    h = Harness(
        [
            rule(
                "r",
                [
                    {"event": "Viewed"},
                    {"event": "Added", "where": {"properties.sku": {"eq_step": 0}}},
                    {"event": "Paid"},
                ],
            )
        ]
    )
    big = "x" * 5000
    h.send(0, track("Viewed", sku="S1", blob=big), "v1", wm=-1)
    assert h.state is not None
    assert big not in orjson.dumps(h.state).decode()  # only needed paths are buffered
    assert h.state["buffer"][0][2] == {"type": "track", "event": "Viewed", "properties.sku": "S1"}
    h.advance(0)
    h.send(1 * S, track("Added", sku="S1", blob=big), "a1")
    (partial,) = h.state["partials"]["r"]["p"]
    assert partial["k"] == {"0": {"properties.sku": "S1"}}  # step 1 needs no capture
    assert partial["e"] == [["v1", T0], ["a1", T0 + S]]
    h.send(2 * S, track("Paid"), "p1")
    assert h.event_ids() == [["v1", "a1", "p1"]]
    assert isinstance(h.matches[0].events[0], tuple)


def test_edited_rule_discards_its_stored_partials() -> None:
    h = Harness([rule("r", [{"event": "A"}, {"event": "B"}])])
    h.send(0, track("A"))
    assert h.state is not None and h.state["partials"]
    edited = Harness([rule("r", [{"event": "A"}, {"event": "C"}]), rule("other", [{"event": "Z"}])])
    edited.state = h.state
    edited.send(1 * S, track("C"))
    assert edited.matches == []  # the old partial (A then B) was discarded, not reinterpreted
    edited.send(2 * S, track("A"))
    edited.send(3 * S, track("C"))
    assert len(edited.matches) == 1


def test_unknown_state_version_starts_fresh() -> None:
    engine = RuleEngine(parse_rules([rule("r", [{"event": "A"}])], None))
    res = engine.on_event({"v": 999}, track("A"), T0, "m", watermark_ms=T0)
    assert res.state["v"] == 1 and len(res.matches) == 1
    assert engine.next_deadline(None) is None
    empty = engine.advance_time(None, T0)
    assert empty.matches == [] and empty.next_deadline_ms is None
    assert set(empty.stats) >= {
        "duplicates",
        "late",
        "dropped_partials",
        "expired_partials",
        "suppressed",
    }


def test_trigger_id_is_deterministic() -> None:
    a = trigger_id("cart_abandonment", "a@b.com", "m1")
    assert a == trigger_id("cart_abandonment", "a@b.com", "m1")
    assert len(a) == 32 and int(a, 16) >= 0
    assert a != trigger_id("cart_abandonment", "a@b.com", "m2")
    assert trigger_id("a", "bc", "d") != trigger_id("ab", "c", "d")


CART_YAML = """
rules:
  - name: cart_abandonment
    emarsys_event_id: 4711
    within: 2h
    steps:
      - event: Product Viewed
        where:
          properties.category: {in: [shoes, boots]}
          properties.price: {gt: 0}
      - event: Product Added
        where: {properties.sku: {eq_step: 0, path: properties.sku}}
      - absent: Order Completed
        for: 1h
    data:
      sku: steps[1].properties.sku
      cart_value: steps[1].properties.value
    once_per: 24h
rule_engine:
  allowed_lateness: 5m
  max_partial_matches: 100
  late_topic: segment.events.late
"""


def test_cart_abandonment_end_to_end() -> None:
    cfg = yaml.safe_load(CART_YAML)
    h = Harness(cfg["rules"], cfg["rule_engine"])
    lateness = 5 * M

    def send(ts: int, event: dict[str, Any], mid: str) -> EngineResult:
        return h.send(ts, event, mid, wm=ts - lateness)

    send(0, track("Product Viewed", category="hats", price=5, sku="H1"), "v0")  # filtered out
    send(1 * M, track("Product Viewed", category="shoes", price=80, sku="S1"), "v1")
    send(2 * M, track("Product Viewed", category="boots", price=0, sku="B1"), "v2")  # price 0
    send(3 * M, track("Product Added", sku="H1", value=5), "x1")  # never viewed (filtered)
    send(4 * M, track("Product Added", sku="S1", value=80), "a1")
    res = send(10 * M, page("Home"), "p1")
    assert h.matches == []
    assert res.next_deadline_ms == T0 + 10 * M  # p1 is still buffered (watermark 5 min)
    assert h.advance(10 * M).next_deadline_ms == T0 + 4 * M + H  # then the absence deadline
    # No more events from anyone: the caller's idle timer advances the watermark.
    res = h.advance(4 * M + H)
    assert len(res.matches) == 1
    match = res.matches[0]
    assert match.rule == "cart_abandonment" and match.emarsys_event_id == 4711
    assert match.events == [("v1", T0 + 1 * M), ("a1", T0 + 4 * M)]
    assert match.data == {"sku": "S1", "cart_value": 80}
    assert match.first_message_id == "v1"
    assert match.event_time_ms == T0 + 4 * M
    assert match.fired_at_ms == T0 + 4 * M + H

    # Another abandonment 3 h later: within 24 h of the first -> suppressed (once_per).
    send(3 * H, track("Product Viewed", category="shoes", price=80, sku="S2"), "v2b")
    send(3 * H + M, track("Product Added", sku="S2", value=80), "a2b")
    res = h.advance(5 * H)
    assert res.matches == [] and res.stats["suppressed"] == 1

    # The next day the order arrives (slightly out of order) in time: no trigger.
    day = 25 * H
    send(day, track("Product Viewed", category="shoes", price=80, sku="S3"), "v3")
    send(day + 1 * M, track("Product Added", sku="S3", value=80), "a3")
    send(day + 40 * M, track("Order Completed"), "o3")
    send(day + 30 * M, page("Thanks"), "p3")  # older than o3, within lateness: applied
    h.advance(day + 3 * H)
    assert len(h.matches) == 1

    # A later abandonment, more than 24 h after the first trigger, fires again.
    send(day + 4 * H, track("Product Viewed", category="boots", price=80, sku="S4"), "v4")
    send(day + 4 * H + M, track("Product Added", sku="S4", value=120), "a4")
    send(day + 6 * H, page("Home"), "p4")
    h.advance(day + 6 * H)
    assert len(h.matches) == 2 and h.matches[1].data == {"sku": "S4", "cart_value": 120}
    assert h.stats["late"] == 0 and h.stats["suppressed"] == 1
