"""``RuleEngine.relevant``: events matching no step of any rule can be skipped.

The rules agent does not read, apply or write rule state for an event ``relevant`` rejects.
Unit tests of ``relevant`` itself, then a property test: random streams fed to an engine that
applies every event and to engines that skip the irrelevant ones emit identical matches.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from app.rules import RuleEngine, RuleMatch, parse_rules
from tests.test_app.test_rules_engine import T0, H, M, S, identify, page, rule, track


def screen(name: str, **properties: Any) -> dict[str, Any]:
    return {"type": "screen", "name": name, "properties": properties}




def engine(*rules: dict[str, Any], cfg: dict[str, Any] | None = None) -> RuleEngine:
    return RuleEngine(parse_rules(list(rules), cfg))


# --------------------------------------------------------------------------------------------
# relevant()
# --------------------------------------------------------------------------------------------

CART = rule(
    "cart",
    [
        {"event": "Product Viewed", "where": {"properties.price": {"gt": 0}}},
        {"event": "Product Added", "where": {"properties.sku": {"eq_step": 0}}},
        {"absent": {"event": "Order Completed", "where": {"properties.total": {"gte": 10}}},
         "for": "1h"},
    ],
)


def test_an_event_matching_no_step_is_irrelevant() -> None:
    e = engine(CART)
    assert e.relevant(track("Product Viewed", price=5))
    assert not e.relevant(track("Product Viewed", price=0))  # fails the where
    assert not e.relevant(track("Product Viewed"))
    assert not e.relevant(track("Signed Up"))
    assert not e.relevant(identify(email="a@b.c"))
    assert not e.relevant(page("Product Viewed"))
    assert not e.relevant({"type": "screen", "event": "Product Viewed", "properties": {"price": 5}})
    assert not e.relevant({})
    assert not engine().relevant(track("Product Viewed", price=5))  # no rules at all


def test_an_event_matching_only_an_absent_step_is_relevant() -> None:
    e = engine(CART)
    assert e.relevant(track("Order Completed", total=20))  # cancels a waiting partial match
    assert not e.relevant(track("Order Completed", total=5))  # the absent step's where fails
    guard = engine(
        rule("guard", [{"event": "A"}, {"absent": "Removed"}, {"event": "B"}])
    )
    assert guard.relevant(track("Removed"))
    assert not guard.relevant(track("Kept"))


def test_eq_step_and_ne_step_are_not_evaluated_so_they_count_as_matching() -> None:
    # Whether the reference holds depends on a partial match: relevant() must not guess.
    e = engine(CART)
    assert e.relevant(track("Product Added", sku="anything"))
    assert e.relevant(track("Product Added"))  # even without the referenced field


def test_a_strict_step_makes_every_event_relevant() -> None:
    strict = rule("strict", [{"event": "A"}, {"event": "B", "contiguity": "strict"}])
    for rules in ([strict], [CART, strict]):
        e = engine(*rules)
        assert e.relevant(identify(email="a@b.c"))
        assert e.relevant(track("Unrelated"))
        assert e.relevant({})
    in_a_row = rule("in_a_row", [{"type": "page", "times": 3, "contiguity": "strict"}])
    assert engine(CART, in_a_row).relevant(track("Unrelated"))


def test_why_strict_contiguity_needs_every_event() -> None:
    e = engine(rule("r", [{"event": "A"}, {"event": "B", "contiguity": "strict"}]))
    st = e.on_event(None, track("A"), T0, "a1", watermark_ms=T0).state
    noise = e.on_event(st, track("Noise"), T0 + S, "n1", watermark_ms=T0 + S).state
    assert e.on_event(noise, track("B"), T0 + 2 * S, "b1", watermark_ms=T0 + 2 * S).matches == []
    # Skipping the noise event would have made A, B consecutive: a match.
    st = e.on_event(None, track("A"), T0, "a1", watermark_ms=T0).state
    assert e.on_event(st, track("B"), T0 + 2 * S, "b1", watermark_ms=T0 + 2 * S).matches
    assert e.relevant(track("Noise"))


def test_name_only_steps_match_page_and_screen() -> None:
    e = engine(
        rule("any_pricing", [{"name": "Pricing"}]),
        rule("page_docs", [{"type": "page", "name": "Docs",
                            "where": {"properties.section": {"in": ["api", "sdk"]}}}]),
        rule("screens", [{"type": "screen", "where": {"properties.app": "ios"}}]),
    )
    assert e.relevant(page("Pricing"))
    assert e.relevant(screen("Pricing"))
    assert not e.relevant(page("Home"))
    assert e.relevant(page("Docs", section="api"))
    assert not e.relevant(page("Docs", section="blog"))
    assert not e.relevant(page("Docs"))
    assert not e.relevant(screen("Docs", section="api"))  # page_docs wants type page...
    assert e.relevant(screen("Docs", app="ios"))  # ...but `screens` takes any ios screen
    assert e.relevant(screen("Home", app="ios"))
    assert not e.relevant(screen("Home", app="android"))
    assert not e.relevant(track("Pricing"))  # a track event has no name
    assert not e.relevant({"type": "page", "name": ["Pricing"]})  # not a string
    assert not e.relevant({"type": 1, "name": "Docs", "properties": {"section": "api"}})


def test_type_only_and_event_steps() -> None:
    e = engine(
        rule("ident", [{"type": "identify", "where": {"traits.plan": "pro"}}]),
        rule("odd", [{"type": "screen", "event": "Odd"}]),
    )
    assert e.relevant(identify(plan="pro"))
    assert not e.relevant(identify(plan="free"))
    assert e.relevant({"type": "screen", "event": "Odd"})
    assert not e.relevant(track("Odd"))  # `event` with a type compares that type


def test_skipping_does_not_move_the_contacts_clock() -> None:
    """The documented side effect: a skipped event is never late and makes nothing late."""
    e = engine(rule("r", [{"event": "A"}, {"event": "B"}]))
    noise = track("Noise")
    assert not e.relevant(noise)
    # Applied, the noise event (ts 10 s) moves the clock: B at 5 s is then late.
    st = e.on_event(None, noise, T0 + 10 * S, "n1", watermark_ms=T0 + 10 * S).state
    st = e.on_event(st, track("A"), T0 + 11 * S, "a1", watermark_ms=T0 + 11 * S).state
    assert st["last_ts"] == T0 + 11 * S and "n1" in st["recent_ids"]
    # Skipped, it leaves no state at all.
    st = e.on_event(None, track("A"), T0 + 1 * S, "a1", watermark_ms=T0 + 10 * S).state
    assert st["last_ts"] == T0 + 1 * S
    res = e.on_event(st, track("B"), T0 + 5 * S, "b1", watermark_ms=T0 + 10 * S)
    assert not res.late and [m.rule for m in res.matches] == ["r"]


# --------------------------------------------------------------------------------------------
# Property: skipping irrelevant events emits the same matches
# --------------------------------------------------------------------------------------------

#: Rule sets without strict steps that together use rule and step `within`, `times`,
#: `at_least` (first, middle and last step), `once_per`, trailing and middle absences with
#: `for`, absence guards without `for`, eq_step / ne_step (also in absent steps), `data`.
RULE_SETS: dict[str, list[dict[str, Any]]] = {
    "cart": [
        rule(
            "cart",
            [
                {"event": "Viewed", "where": {"properties.price": {"gt": 10}}},
                {"event": "Added", "where": {"properties.sku": {"eq_step": 0}}},
                {"absent": "Order", "for": "10m"},
            ],
            within="40m",
            once_per="90m",
            data={
                "sku": "steps[1].properties.sku",
                "price": "steps[0].properties.price",
                "src": {"value": "rules"},
            },
        ),
        rule(
            "checkout_guard",
            [
                {"event": "Added", "where": {"properties.cat": "x"}},
                {"absent": {"event": "Removed", "where": {"properties.sku": {"eq_step": 0}}}},
                {"event": "Checkout", "within": "15m"},
                {"absent": "Order", "for": "5m"},
            ],
            within="1h",
            data={"sku": "steps[0].properties.sku"},
        ),
    ],
    "counts": [
        rule(
            "two_pages_two_adds",
            [
                {"type": "page", "name": "P", "times": 2},
                {
                    "event": "Added",
                    "times": 2,
                    "within": "30m",
                    "where": {"properties.sku": {"ne_step": 0, "path": "properties.pid"}},
                },
            ],
            data={"sku": "steps[1].properties.sku"},
        ),
        rule(
            "hesitation",
            [
                {"event": "Viewed", "at_least": 2, "where": {"properties.cat": "x"}},
                {"event": "Coupon", "where": {"properties.code": {"exists": True}}},
                {"absent": "Order", "for": "10m"},
            ],
            within="45m",
            data={"code": "steps[1].properties.code", "sku": "steps[0].properties.sku"},
        ),
        rule(
            "binge",
            [
                {"type": "page", "name": "Q"},
                {"event": "Viewed", "at_least": 2, "within": "15m"},
            ],
            once_per="1h",
            data={"last": "steps[1].properties.sku"},
        ),
    ],
    "absences": [
        rule(
            "kept_then_browsed",
            [
                {"event": "Order", "where": {"properties.cat": {"in": ["x", "y"]}}},
                {"absent": "Returned", "for": "20m"},
                {"type": "page", "name": "P", "within": "15m",
                 "where": {"properties.cat": {"ne_step": 0}}},
            ],
            within="1h",
        ),
        rule(
            "viewer_no_within",
            [
                {"event": "Viewed", "at_least": 2},
                {"absent": {"event": "Added", "where": {"properties.sku": {"eq_step": 0}}}},
                {"event": "Checkout"},
            ],
            data={"sku": "steps[0].properties.sku"},
        ),
        rule(
            "screen_then_page",
            [
                {"name": "Q", "where": {"properties.cat": "y"}},
                {"type": "screen", "name": "P", "within": "8m"},
                {"absent": {"name": "Q"}, "for": "6m"},
            ],
            within="30m",
            once_per="45m",
        ),
    ],
}
RULE_SETS["everything"] = [r for rs in RULE_SETS.values() for r in rs]

LATENESS_MS = 2 * M
TRACK_NAMES = (
    ("Viewed",) * 4 + ("Added",) * 3 + ("Coupon",) * 2 + ("Noise",) * 2
    + ("Removed", "Checkout", "Order", "Returned", "Signed Up")
)
#: Upper bounds of the gap to the next event (chosen uniformly, then the gap uniformly).
GAPS_MS = (0, 1 * M, 3 * M, 3 * M, 6 * M, 6 * M, 10 * M, 90 * M)
STREAMS_PER_RULE_SET = 300


def random_event(rng: random.Random) -> dict[str, Any]:
    props: dict[str, Any] = {
        "sku": rng.choice(("s1", "s2", "s3")),
        "pid": rng.choice(("s1", "s2", "s3")),
        "price": rng.choice((5, 50, 150)),
        "cat": rng.choice(("x", "y", "z")),
    }
    if rng.random() < 0.7:
        props["code"] = rng.choice(("SAVE", "SAVE", "SAVE", None))
    if rng.random() < 0.1:
        del props[rng.choice(("sku", "price", "cat"))]
    r = rng.random()
    if r < 0.55:
        return track(rng.choice(TRACK_NAMES), **props)
    if r < 0.75:
        return page(rng.choice(("P", "Q", "R")), **props)
    if r < 0.87:
        return screen(rng.choice(("P", "Q", "R")), **props)
    return identify(email=f"{rng.randrange(5)}@example.com")


@dataclass
class Stream:
    """Deliveries in arrival order: ("event", ts, message_id, event) or ("tick", watermark)."""

    actions: list[tuple[Any, ...]]
    #: Indexes (into ``actions``) of redeliveries of an earlier event.
    redelivered: set[int] = field(default_factory=set)


def random_stream(rng: random.Random, *, late: bool = False) -> Stream:
    """One contact's events, delivered out of order by less than the allowed lateness.

    Gaps of 0 to 10 minutes (equal timestamps too), sometimes up to 90 minutes of silence.
    Timer ticks between deliveries jump the watermark ahead (the idle clock) but never past
    an event still to come, so without ``late`` nothing is ever late. Now and then an event is
    delivered again (a redelivery: same message id and ts). ``late``: a few events arrive
    far behind the watermark.
    """
    n = rng.randint(15, 70)
    t = T0
    timed: list[tuple[int, int, str, dict[str, Any]]] = []  # (arrival, ts, mid, event)
    for i in range(n):
        gap = rng.choice(GAPS_MS)
        t += rng.randrange(gap) if gap else 0
        arrival = t + rng.randrange(LATENESS_MS)
        if late and rng.random() < 0.06:
            arrival += rng.randrange(LATENESS_MS, 30 * M)
        timed.append((arrival, t, f"m{i:03d}", random_event(rng)))
    timed.sort(key=lambda x: (x[0], x[2]))
    actions: list[tuple[Any, ...]] = []
    suffix_min = [0] * (len(timed) + 1)
    suffix_min[-1] = 2**62
    for k in range(len(timed) - 1, -1, -1):
        suffix_min[k] = min(timed[k][1], suffix_min[k + 1])
    seen: list[tuple[int, str, dict[str, Any]]] = []
    redelivered: set[int] = set()
    for k, (_arrival, ts, mid, ev) in enumerate(timed):
        actions.append(("event", ts, mid, ev))
        seen.append((ts, mid, ev))
        if rng.random() < 0.04:
            old_ts, old_mid, old_ev = rng.choice(seen)
            redelivered.add(len(actions))
            actions.append(("event", old_ts, old_mid, old_ev))
        if rng.random() < 0.3:
            # Up to the oldest event still to come (3 h on after the last one).
            low = ts - LATENESS_MS
            high = suffix_min[k + 1] if k + 1 < len(timed) else ts + 3 * H
            actions.append(("tick", low + rng.randrange(max(1, high - low))))
    return Stream(actions, redelivered)


def match_key(m: RuleMatch) -> tuple[Any, ...]:
    return (
        m.rule,
        m.emarsys_event_id,
        m.event_time_ms,
        m.fired_at_ms,
        orjson.dumps(m.data, option=orjson.OPT_SORT_KEYS),
        tuple(m.events),
        m.first_message_id,
    )


@dataclass
class Runner:
    """The rules agent for one contact: ``mode`` "all" applies every event; "skip" skips
    irrelevant ones (timers still fire); "skip+advance" calls advance_time for them."""

    engine: RuleEngine
    mode: str
    state: dict[str, Any] | None = None
    wm: int | None = None
    max_ts: int | None = None
    matches: list[tuple[Any, ...]] = field(default_factory=list)
    #: delivery index -> "late" / "duplicate" for relevant events not applied
    rejected: dict[int, str] = field(default_factory=dict)
    #: delivery indexes of events older than the watermark when they arrived
    behind: set[int] = field(default_factory=set)
    skipped: int = 0
    #: "all" only: what on_event of an irrelevant event did (the work skipping must redo)
    irrelevant_effects: Counter[str] = field(default_factory=Counter)

    def _take(self, res: Any) -> Any:
        # The state goes through orjson as in the rule_state table.
        self.state = orjson.loads(orjson.dumps(res.state))
        self.matches.extend(match_key(m) for m in res.matches)
        return res

    def event(self, index: int, ts: int, mid: str, event: dict[str, Any]) -> None:
        # The agent's clock: highest event time seen minus the allowed lateness.
        self.max_ts = ts if self.max_ts is None else max(self.max_ts, ts)
        wm = self.max_ts - LATENESS_MS
        self.wm = wm if self.wm is None else max(self.wm, wm)
        if ts < self.wm:
            self.behind.add(index)
        relevant = self.engine.relevant(event)
        if not relevant and self.mode != "all":
            self.skipped += 1
            if self.mode == "skip+advance" and self.state is not None:
                self._take(self.engine.advance_time(self.state, self.wm))
            return
        res = self._take(self.engine.on_event(self.state, event, ts, mid, watermark_ms=self.wm))
        if not relevant:
            self.irrelevant_effects["events"] += 1
            self.irrelevant_effects["expired_partials"] += res.stats["expired_partials"]
            self.irrelevant_effects["matches"] += len(res.matches)
        elif res.late or res.duplicate:
            self.rejected[index] = "late" if res.late else "duplicate"

    def tick(self, watermark: int) -> None:
        """The timer loop: advance_time once the contact's next deadline is due."""
        self.wm = watermark if self.wm is None else max(self.wm, watermark)
        d = self.engine.next_deadline(self.state)
        if d is not None and d <= self.wm:
            self._take(self.engine.advance_time(self.state, self.wm))

    def finish(self) -> None:
        if self.state is not None:
            far = (self.wm or T0) + 10 * 24 * H
            self._take(self.engine.advance_time(self.state, far))


def run_stream(eng: RuleEngine, stream: Stream) -> dict[str, Runner]:
    runners = {mode: Runner(eng, mode) for mode in ("all", "skip", "skip+advance")}
    for index, action in enumerate(stream.actions):
        for r in runners.values():
            if action[0] == "event":
                r.event(index, *action[1:])
            else:
                r.tick(action[1])
    for r in runners.values():
        r.finish()
    return runners


@pytest.mark.parametrize("name", sorted(RULE_SETS))
def test_skipping_irrelevant_events_emits_the_same_matches(name: str) -> None:
    eng = engine(*RULE_SETS[name], cfg={"allowed_lateness": "2m"})
    rng = random.Random(f"relevance-{name}")
    matched: Counter[str] = Counter()
    effects: Counter[str] = Counter()
    skipped = events = 0
    for n in range(STREAMS_PER_RULE_SET):
        stream = random_stream(rng)
        runners = run_stream(eng, stream)
        base = runners["all"]
        # Only a redelivery arrives behind the watermark and can be late (its message id
        # forgotten behind the clock).
        assert base.behind <= stream.redelivered, base.behind
        assert set(base.rejected) <= stream.redelivered, base.rejected
        for mode in ("skip", "skip+advance"):
            other = runners[mode]
            assert other.matches == base.matches, f"stream {n}, {mode}: {stream.actions}"
            assert set(other.rejected) == set(base.rejected), f"stream {n}, {mode}"
        matched.update(m[0] for m in base.matches)
        effects.update(base.irrelevant_effects)
        skipped += runners["skip"].skipped
        events += sum(1 for a in stream.actions if a[0] == "event")
    # Not vacuous: every rule matched, a good share of events was skipped, and applying
    # irrelevant events did work that skipping leaves to later events and timers.
    rules = [r["name"] for r in RULE_SETS[name]]
    assert all(matched[r] >= 10 for r in rules), matched
    assert sum(matched.values()) >= 100, matched
    assert 0.2 < skipped / events < 0.8, (skipped, events)
    assert effects["expired_partials"] > 0, effects
    assert effects["matches"] > 0, effects


def test_only_events_arriving_behind_the_watermark_can_differ() -> None:
    """With events arriving later than allowed: skipping changes the contact's clock, so an
    event that arrives behind the watermark may be applied by one engine and reported late
    by the other (both ways: a skipped event no longer moves the clock; a partial match it
    would have expired at its own ts is expired by the watermark instead, which moves the
    clock to the end of the rule's `within`). Only such events are treated differently, and
    when all are treated alike the matches are the same."""
    eng = engine(*RULE_SETS["everything"], cfg={"allowed_lateness": "2m"})
    rng = random.Random("relevance-late")
    compared = differing = 0
    ways: Counter[str] = Counter()
    for n in range(STREAMS_PER_RULE_SET):
        stream = random_stream(rng, late=True)
        runners = run_stream(eng, stream)
        base = runners["all"]
        if not base.behind:
            continue
        for mode in ("skip", "skip+advance"):
            other = runners[mode]
            assert other.behind == base.behind
            differ = set(other.rejected) ^ set(base.rejected)
            assert differ <= base.behind, f"stream {n}, {mode}: {sorted(differ - base.behind)}"
            if differ:
                differing += 1
                ways["applied only when skipping"] += len(differ & set(base.rejected))
                ways["applied only when not skipping"] += len(differ & set(other.rejected))
            else:
                compared += 1
                assert other.matches == base.matches, f"stream {n}, {mode}: {stream.actions}"
    assert compared >= 50, (compared, differing)
    assert differing > 0, (compared, differing)
    assert all(ways[w] > 0 for w in ways) and len(ways) == 2, ways


def test_the_generated_streams_are_deterministic() -> None:
    a = random_stream(random.Random(7))
    b = random_stream(random.Random(7))
    assert a.actions == b.actions
    ticks = [x for x in a.actions if x[0] == "tick"]
    ts = [x[1] for x in a.actions if x[0] == "event"]
    assert ticks and ts != sorted(ts)  # timer ticks and out-of-order delivery both occur



def test_on_event_reuses_the_projection_made_by_relevant() -> None:
    e = engine(CART)
    event = track("Product Viewed", price=5, sku="S1", color="red")
    assert e.relevant(event)
    calls: list[Any] = []
    project = e.project

    def counting_project(event: Mapping[str, Any]) -> dict[str, Any]:
        calls.append(event)
        return project(event)

    e.project = counting_project  # type: ignore[method-assign]
    st = e.on_event(None, event, T0, "v1", watermark_ms=T0 - 1).state
    assert calls == [] and st["buffer"][0][2] == {
        "type": "track", "event": "Product Viewed", "properties.price": 5,
        "properties.sku": "S1",
    }
    # Used once: the next call projects again...
    e.on_event(st, event, T0 + 1, "v2", watermark_ms=T0 - 1)
    assert len(calls) == 1
    # ...and so does another event object, even an equal one.
    assert e.relevant(event)
    assert len(calls) == 2
    e.on_event(st, dict(event), T0 + 2, "v3", watermark_ms=T0 - 1)
    assert len(calls) == 3


def test_the_lookup_memo_stays_bounded() -> None:
    e = engine(CART)
    for i in range(10_000):
        assert not e.relevant(track(f"Client Event {i}"))
    assert 0 < len(e._candidates) <= 4096
    assert e.relevant(track("Product Viewed", price=1))
    assert not e.relevant({"type": "track", "event": {"not": "hashable"}})
