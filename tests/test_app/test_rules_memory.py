"""Rule-engine memory: 50 rules on 10,000 contacts keep the per-contact state bounded.

Pure engine, no Kafka. The workload (rules, events, the run loop that stores every state as
orjson bytes in a dict like the ``rule_state`` Faust table) is ``bench/rules_state.py``;
``python -m bench.rules_state`` prints the same figures. ``pytest -s`` prints them here too;
every assertion message carries them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from app.rules import RuleEngine, RuleSet
from app.rules.engine import MAX_EVENTS_PER_MATCH, MAX_RECENT_IDS
from app.rules.model import Rule
from bench.rules_state import (
    HEAVY_PK,
    RunResult,
    Workload,
    build_rules,
    generate_events,
    run,
    summary,
)

MAX_PARTIALS = 20
CONTACTS = 10_000
HALF = 5_000
HEAVY_EVENTS = 4000
HEAVY_SPACING_MS = 1500
#: Serialised length of the largest int the engine stores (ms timestamps have 13 digits, seq
#: counters fewer); 10**19 takes 20 characters, more than any of them.
BIG = 10**19


def _jlen(value: Any) -> int:
    return len(orjson.dumps(value))


@dataclass
class HeavyWatch:
    """Largest components seen in any state of the heavy contact (checked after every call)."""

    buffer: int = 0
    recent_ids: int = 0
    rules: set[str] = field(default_factory=set)

    def __call__(self, pk: str, state: dict[str, Any]) -> None:
        if pk != HEAVY_PK:
            return
        self.buffer = max(self.buffer, len(state["buffer"]))
        self.recent_ids = max(self.recent_ids, len(state["recent_ids"]))
        self.rules.update(name for name, e in state["partials"].items() if e["p"])


@dataclass
class Run:
    workload: Workload
    result: RunResult
    heavy: HeavyWatch
    seconds: float
    report: str

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.result.store.values())


def _run(ruleset: RuleSet, contacts: int) -> Run:
    start = time.perf_counter()
    workload = generate_events(
        contacts, heavy_events=HEAVY_EVENTS, heavy_spacing_ms=HEAVY_SPACING_MS, seed=1
    )
    watch = HeavyWatch()
    result = run(workload, ruleset, on_state=watch)
    seconds = time.perf_counter() - start
    report = "\n".join(summary(result, contacts=contacts, rules=len(ruleset.rules)))
    print(f"\n--- {contacts:,} contacts ({seconds:.1f} s) ---\n{report}")
    return Run(workload, result, watch, seconds, report)


@pytest.fixture(scope="module")
def ruleset() -> RuleSet:
    rs = build_rules(MAX_PARTIALS)
    assert len(rs.rules) == 50
    return rs


@pytest.fixture(scope="module")
def full(ruleset: RuleSet) -> Run:
    return _run(ruleset, CONTACTS)


@pytest.fixture(scope="module")
def half(ruleset: RuleSet) -> Run:
    return _run(ruleset, HALF)


# --------------------------------------------------------------------------------------------
# The rule set really is what the issue asks for
# --------------------------------------------------------------------------------------------


def test_rule_set_mixes_every_feature(ruleset: RuleSet) -> None:
    rules = ruleset.rules
    steps = [s for r in rules for s in r.steps]
    assert all(3 <= len(r.steps) <= 4 for r in rules)
    assert any(ref for s in steps for ref in s.spec.step_refs)  # eq_step
    assert any(s.spec.type == "page" for s in steps)
    assert any(s.spec.type is None and s.spec.name for s in steps)  # page or screen
    assert any(s.max_count is not None and s.max_count > 1 for s in steps)  # times
    assert any(s.max_count is None and not s.absent for s in steps)  # at_least
    assert any(s.strict for s in steps)
    assert any(s.within_ms for s in steps)
    last = [r.steps[-1] for r in rules]
    middle = [s for r in rules for s in r.steps[1:-1]]
    assert any(s.absent and s.for_ms for s in last)  # trailing absence
    assert any(s.absent and s.for_ms for s in middle)  # middle absence with `for`
    assert any(s.absent and s.for_ms is None for s in middle)  # guard
    assert sum(r.within_ms is not None for r in rules) >= 40
    assert any(r.once_per_ms for r in rules)
    ops = {c.op for s in steps for c in s.spec.conditions}
    assert {"eq", "ne", "gt", "gte", "lt", "in", "not_in", "contains", "exists", "regex"} <= ops


# --------------------------------------------------------------------------------------------
# Bounds
# --------------------------------------------------------------------------------------------


def test_partials_per_contact_and_rule_never_exceed_the_cap(full: Run) -> None:
    r = full.result
    # `run` looks at every state the engine returns (each on_event and the final advance).
    assert r.max_partials <= MAX_PARTIALS, full.report
    # ... and the cap is really hit, by the heavy contact, so the bound was exercised.
    assert r.max_partials == MAX_PARTIALS, full.report
    assert any(pk == HEAVY_PK for pk, _ in r.at_cap), full.report
    assert r.stats["dropped_partials"] > 0, full.report
    assert r.stats["late"] == 0 and r.stats["duplicates"] == 0, full.report


def _events_per_partial(rule: Rule) -> int:
    """Upper bound of ``len(partial["e"])`` for a partial of ``rule``."""
    n = 0
    for s in rule.steps:
        if not s.absent:
            n += s.max_count if s.max_count is not None else MAX_EVENTS_PER_MATCH
    return min(n, MAX_EVENTS_PER_MATCH)


def heavy_state_bound(
    engine: RuleEngine, workload: Workload, max_partials: int
) -> tuple[int, dict[str, int]]:
    """An upper bound of the heavy contact's serialised state, independent of its event count.

    The state is ``{"v", "last_ts", "seq", "buffer", "recent_ids", "partials", "last_fired"}``.
    Every term is bounded by configuration, never by how many events the contact sent:

    * partials: a partial starts only on an event matching a rule's first step, so only the
      rules whose first step matches one of the contact's events ("live" rules) can hold any,
      and each holds at most ``max_partial_matches`` (the engine drops the oldest). One partial
      is 7 ints + its matched events ``e`` (at most the steps' counts - ``times``, or
      ``MAX_EVENTS_PER_MATCH`` for ``at_least`` - capped at ``MAX_EVENTS_PER_MATCH``, each a
      ``[message_id, ts]`` pair) + the captures ``k`` (per capturing step a subset of one
      projected event view, so no longer than the largest view);
    * buffer: an event stays buffered while ts > watermark = max ts seen - allowed_lateness,
      and it was delivered, so ts <= max ts seen: at most ``allowed_lateness / spacing + 1``
      of the contact's events (``[ts, message_id, view]`` each);
    * recent_ids: hard cap ``MAX_RECENT_IDS`` ``message_id: ts`` pairs (dedupe window);
    * last_fired: one ``rule: ts`` entry per live rule with ``once_per``.

    Ints are counted as 20 characters (``BIG``), message ids at the longest generated length.
    """
    ruleset = engine.ruleset
    mid = "x" * workload.max_message_id_len
    views = [engine.project(ev) for _, pk, _, ev in workload.events if pk == HEAVY_PK]
    view_len = max(_jlen(v) for v in views)
    live = [r for r in ruleset.rules if any(r.steps[0].spec.match_static(v) for v in views)]

    header = _jlen({**engine.new_state(), "last_ts": BIG, "seq": BIG})
    max_buffered = ruleset.allowed_lateness_ms // workload.heavy_spacing_ms + 1
    buffer = max_buffered * (max(_jlen([BIG, mid, v]) for v in views) + 1)
    recent_ids = MAX_RECENT_IDS * (_jlen({mid: BIG}) - 2 + 1)
    pair = _jlen([mid, BIG]) + 1
    skeleton = _jlen(dict.fromkeys(("fs", "f", "i", "c", "l", "ls", "a"), BIG) | {"e": [], "k": {}})
    partials = 0
    for rule in live:
        captures = sum(_jlen(s.key) + 1 + view_len + 1 for s in rule.steps if s.capture_paths)
        one = skeleton + _events_per_partial(rule) * pair + captures
        entry = _jlen({"h": rule.fingerprint, "p": []}) + max_partials * (one + 1)
        partials += _jlen(rule.name) + 1 + entry + 1
    last_fired = sum(_jlen(r.name) + 1 + 20 + 1 for r in live if r.once_per_ms is not None)
    parts = {
        "header": header,
        "buffer": buffer,
        "recent_ids": recent_ids,
        "partials": partials,
        "last_fired": last_fired,
        "live_rules": len(live),
        "max_buffered": max_buffered,
    }
    return header + buffer + recent_ids + partials + last_fired, parts


def test_heavy_contact_state_stays_under_a_bound_from_max_partial_matches(full: Run) -> None:
    r = full.result
    bound, parts = heavy_state_bound(r.engine, full.workload, MAX_PARTIALS)
    sizes = r.heavy_sizes
    figures = (
        f"heavy contact: {len(sizes):,} events, state peak {r.peak[HEAVY_PK]:,} B, "
        f"after 1/4 of its events {max(sizes[: len(sizes) // 4]):,} B (max so far), "
        f"last 1/4 max {max(sizes[-len(sizes) // 4 :]):,} B; bound {bound:,} B {parts}; "
        f"largest buffer {full.heavy.buffer}, recent_ids {full.heavy.recent_ids}, "
        f"rules with partials {sorted(full.heavy.rules)}"
    )
    print(figures)
    msg = f"{figures}\n{full.report}"
    assert len(sizes) == HEAVY_EVENTS
    # Each term of the bound holds on its own, in every state the engine returned.
    assert full.heavy.buffer <= parts["max_buffered"], msg
    assert full.heavy.recent_ids <= MAX_RECENT_IDS, msg
    assert len(full.heavy.rules) <= parts["live_rules"], msg
    # The whole state, at its peak.
    assert r.peak[HEAVY_PK] <= bound, msg
    # The bound has teeth: without the cap the same contact outgrows it after a quarter of its
    # events (the partials of `at_least` rules collect up to 100 events each, and every
    # Product Viewed starts one in three rules).
    uncapped = _uncapped_heavy_state(HEAVY_EVENTS // 4)
    print(f"heavy contact without the cap after {HEAVY_EVENTS // 4:,} events: {uncapped:,} B")
    assert uncapped > bound, f"uncapped {uncapped:,} B\n{msg}"


def _uncapped_heavy_state(events: int) -> int:
    """The heavy contact's first ``events`` events with max_partial_matches = 10**9."""
    ruleset = build_rules(10**9)
    engine = RuleEngine(ruleset)
    workload = generate_events(0, heavy_events=events, heavy_spacing_ms=HEAVY_SPACING_MS, seed=1)
    state: dict[str, Any] | None = None
    max_ts = 0
    for ts, _, mid, event in workload.events:
        max_ts = max(max_ts, ts)
        wm = max_ts - ruleset.allowed_lateness_ms
        state = engine.on_event(state, event, ts, mid, watermark_ms=wm).state
    return _jlen(state)


def test_total_state_grows_linearly_with_contacts(full: Run, half: Run) -> None:
    # Both runs include the same heavy contact; contact i gets the same events in both.
    ratio = full.total / half.total
    normal_full = full.total - len(full.result.store[HEAVY_PK])
    normal_half = half.total - len(half.result.store[HEAVY_PK])
    figures = (
        f"total state bytes: {HALF:,} contacts {half.total:,} B, {CONTACTS:,} contacts "
        f"{full.total:,} B, ratio {ratio:.3f} (without the heavy contact "
        f"{normal_full / normal_half:.3f}); mean per contact {normal_half / HALF:,.0f} B vs "
        f"{normal_full / CONTACTS:,.0f} B; run time {half.seconds:.1f} s / {full.seconds:.1f} s"
    )
    print(figures)
    assert ratio < 2.3, f"{figures}\n{full.report}"
    assert normal_full / normal_half < 2.3, f"{figures}\n{full.report}"


def test_advance_time_past_every_deadline_shrinks_the_states(full: Run) -> None:
    r = full.result
    engine = r.engine
    by_name = {rule.name: rule for rule in engine.ruleset.rules}
    before = full.total
    after = sum(len(v) for v in r.after.values())
    sizes = [len(v) for v in r.after.values()]
    figures = (
        f"after advance_time to max ts + 30 d: total {after:,} B (end of stream {before:,} B), "
        f"mean {after / len(sizes):,.0f} B, max {max(sizes):,} B; heavy contact "
        f"{len(r.store[HEAVY_PK]):,} -> {len(r.after[HEAVY_PK]):,} B"
    )
    print(figures)
    msg = f"{figures}\n{full.report}"
    assert set(r.after) == set(r.store)
    left = 0
    for pk, raw in r.after.items():
        state = orjson.loads(raw)
        assert state["buffer"] == [], (pk, msg)
        assert engine.next_deadline(state) is None, (pk, msg)  # no absence left to fire
        for name, entry in state["partials"].items():
            # Every rule with `within` expired its partials: only rules without a time limit
            # (waiting for a positive step, no deadline) may keep theirs, still capped.
            assert by_name[name].within_ms is None, (pk, name, msg)
            assert len(entry["p"]) <= MAX_PARTIALS, (pk, name, msg)
            left += len(entry["p"])
    assert after < before / 4, msg
    assert len(r.after[HEAVY_PK]) < len(r.store[HEAVY_PK]) / 10, msg
    print(f"partials left (rules without `within`): {left:,}")
