"""Event-time sequence matching per contact (pure, no I/O). Semantics: see :mod:`app.rules`.

One :class:`RuleEngine` serves every contact; all per-contact data lives in a JSON-serialisable
``state`` dict that the caller stores (orjson, Faust table) and passes back in. The state passed
in is updated in place and also returned as ``EngineResult.state``; ``None`` means a new
contact.

State layout (``v`` = 1)::

    {"v": 1,
     "last_ts": int | None,     # the contact's event-time clock: events older are LATE
     "seq": int,                # number of events applied (gives contiguity/order)
     "buffer": [[ts, message_id, view], ...],   # pending events, sorted by (ts, message_id)
     "recent_ids": {message_id: ts},            # dedupe window (applied + buffered)
     "partials": {rule_name: {"h": fingerprint, "p": [partial, ...]}},  # oldest first
     "last_fired": {rule_name: event_time_ms}}  # for once_per

``view`` is the event reduced to the paths the rule set reads (``RuleSet.view_paths``), keyed
by path text. A partial match is::

    {"fs": seq of first event, "f": ts of first event,
     "i": current step, "c": events matched by the current step,
     "l": ts of the last matched event, "ls": its seq,
     "a": anchor of the current step (previous step's end, for per-step within),
     "e": [[message_id, ts], ...] matched events in order,
     "k": {"<step>": {path: value}}  fields of each step's last event needed by eq_step/data}
"""

from __future__ import annotations

import bisect
import hashlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from app.paths import MISSING, read_path
from app.rules.model import EventSpec, Rule, RuleSet

__all__ = [
    "MAX_EVENTS_PER_MATCH",
    "MAX_RECENT_IDS",
    "STATE_VERSION",
    "STAT_KEYS",
    "EngineResult",
    "RuleEngine",
    "RuleMatch",
    "trigger_id",
]

STATE_VERSION: Final = 1
#: Hard cap on remembered message ids per contact (newest kept).
MAX_RECENT_IDS: Final = 1000
#: A partial match keeps at most this many ``[message_id, ts]`` pairs: the first and the
#: latest ones (only a long ``at_least`` run can exceed it).
MAX_EVENTS_PER_MATCH: Final = 100
#: Keys always present in ``EngineResult.stats``.
STAT_KEYS: Final = (
    "matches",
    "duplicates",
    "late",
    "dropped_partials",
    "expired_partials",
    "suppressed",
)

#: Distinct (type, event, name) keys RuleEngine.relevant remembers before starting over.
_MAX_CANDIDATE_KEYS: Final = 4096

# Outcomes of feeding one event to one partial match.
_KEEP: Final = 0
_DROP: Final = 1
_EXPIRED: Final = 2
_COMPLETE: Final = 3


@dataclass(frozen=True, slots=True)
class RuleMatch:
    """A completed (and not suppressed) match of ``rule``.

    ``event_time_ms`` is the ts of the last matched *positive* event (for a trailing absent
    step that is the event the absence was measured from, not the deadline); ``fired_at_ms`` is
    the event time at which the match completed (that event's ts, or the absence deadline).
    """

    rule: str
    emarsys_event_id: int
    events: list[tuple[str, int]]
    data: dict[str, Any]
    event_time_ms: int
    first_message_id: str
    fired_at_ms: int


@dataclass(slots=True)
class EngineResult:
    state: dict[str, Any]
    matches: list[RuleMatch] = field(default_factory=list)
    #: The event was older than the contact's clock and was NOT applied (send it to late_topic).
    late: bool = False
    #: Earliest watermark at which :meth:`RuleEngine.advance_time` can do something.
    next_deadline_ms: int | None = None
    stats: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(STAT_KEYS, 0)))
    #: The event's message_id was already applied or buffered; it was ignored.
    duplicate: bool = False


def trigger_id(rule_name: str, primary_key: str, first_message_id: str) -> str:
    """Deterministic id of one trigger (32 hex chars), e.g. for idempotent delivery."""
    raw = "\x1f".join((rule_name, primary_key, first_message_id)).encode()
    return hashlib.sha256(raw).hexdigest()[:32]


class RuleEngine:
    """Evaluates a :class:`RuleSet` on per-contact event streams."""

    def __init__(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        self._rules = ruleset.rules
        self._by_name = {r.name: r for r in ruleset.rules}
        self._absent_rules = tuple(r for r in ruleset.rules if r.has_absent)
        self._within_rules = tuple(r for r in ruleset.rules if r.within_ms is not None)
        self._once_rules = tuple(r for r in ruleset.rules if r.once_per_ms is not None)
        self._paths = ruleset.view_paths
        self._lateness = ruleset.allowed_lateness_ms
        self._max_partials = ruleset.max_partial_matches
        # relevant(): strict contiguity counts every event of the contact (``seq``), so with
        # a strict step anywhere every event matters. Otherwise the specs of all steps
        # (positive and absent), indexed by their (type, event, name) discriminant.
        self._every_event_relevant = any(s.strict for r in ruleset.rules for s in r.steps)
        specs: dict[tuple[str | None, str | None, str | None], list[EventSpec]] = {}
        for rule in ruleset.rules:
            for step in rule.steps:
                sp = step.spec
                specs.setdefault((sp.type, sp.event, sp.name), []).append(sp)
        self._specs_by_key = {k: tuple(v) for k, v in specs.items()}
        #: Which of type/event/name each indexed key sets (a few shapes at most).
        self._key_shapes = tuple(
            dict.fromkeys((t is not None, e is not None, n is not None) for t, e, n in specs)
        )
        #: (type, event, name) of events seen by relevant() -> specs that may match them
        self._candidates: dict[tuple[Any, Any, Any], tuple[EventSpec, ...]] = {}
        #: (event, its projection) made by relevant(): on_event of that same event object
        #: (the caller's next call) uses it instead of projecting again.
        self._projected: tuple[Mapping[str, Any], dict[str, Any]] | None = None

    # -- public API ------------------------------------------------------------------------

    @staticmethod
    def new_state() -> dict[str, Any]:
        return {
            "v": STATE_VERSION,
            "last_ts": None,
            "seq": 0,
            "buffer": [],
            "recent_ids": {},
            "partials": {},
            "last_fired": {},
        }

    def project(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """The event reduced to the paths the rules read (MISSING values left out)."""
        view: dict[str, Any] = {}
        for text, path in self._paths:
            value = read_path(event, path)
            if value is not MISSING:
                view[text] = value
        return view

    def relevant(self, event: Mapping[str, Any]) -> bool:
        """Whether ``event`` can matter to any rule (False: the caller may skip it).

        False when no step of any rule, positive or absent, matches the event statically
        (``EventSpec.match_static``: type/event/name and ``where``; ``eq_step``/``ne_step``
        are not evaluated, so they count as matching). Always True when any rule has a
        ``contiguity: strict`` step: strict contiguity counts every event of the contact
        (``seq``), so an event matching nothing still breaks a strict sequence. Cheap: a
        (memoised) lookup of the steps with the event's type/event/name, and a projection
        only when there are any (:meth:`on_event` of the same event reuses it).

        Why skipping such an event (no :meth:`on_event`, no state write) emits the same
        matches, with the same events, data and event times, when no rule is strict:

        * It matches no step, so it never starts, extends, completes or (absent step)
          cancels a partial match. ``times``/``at_least`` count, ``eq_step`` and ``data``
          read and ``once_per`` compares matched events only.
        * Applied, a non-matching event can only *expire* a partial match: rule ``within``
          exceeded, or every step ``within`` the partial could use next has passed. Relaxed
          steps keep it alive; absences (with or without ``for``) end only on a matching
          event or at a deadline; ``_DROP`` for a non-matching event needs strict. Those
          tests read only the event's ts and fields that matched events set, and events are
          applied in ts order, so the next applied event (ts >= this one's) ends that
          partial too before any step could extend it (expired, or dropped when it is a
          forbidden event), and for rule ``within`` ``_expire`` does at the same watermark
          already. Such a partial has no absence deadline left (a
          partial waiting for one is always kept), so meanwhile it fires nothing, and it
          is gone before a new partial is counted against ``max_partial_matches``; it only
          delays forgetting ``once_per`` history, which is conservative.
        * ``seq`` is read only by strict contiguity (excluded) and to order matched events.

        What skipping does change: the contact's clock (``last_ts``). A skipped event does
        not move it, so the event is never reported late and does not make later events
        late; a partial match it would have expired at its own ts may be expired by the
        watermark instead, which moves the clock to the end of the rule's ``within``,
        past that ts. Only events that arrive behind the watermark can be judged late
        differently by that (and matches then differ accordingly): the clock never passes
        the watermark, so no event at or after it is ever late. The event is not
        remembered in ``recent_ids`` (a redelivery is skipped
        again). Due buffered events and deadlines of the contact are applied by its next
        event or timer (:meth:`advance_time`) instead, with the same event times.
        ``stats["expired_partials"]`` may count a partial later, or not at all when the
        next event cancels it.
        """
        if self._every_event_relevant:
            return True
        key = (event.get("type"), event.get("event"), event.get("name"))
        try:
            candidates = self._candidates[key]
        except KeyError:
            candidates = self._candidates_for(key)
        except TypeError:  # an unhashable type/event/name: equals no spec's str
            candidates = ()
        if not candidates:
            return False
        view = self.project(event)
        self._projected = (event, view)
        for spec in candidates:
            if spec.match_static(view):
                return True
        return False

    def _candidates_for(self, key: tuple[Any, Any, Any]) -> tuple[EventSpec, ...]:
        """Specs whose type/event/name the event's ``key`` has (memoised, bounded)."""
        t, e, n = key
        found: list[EventSpec] = []
        for has_t, has_e, has_n in self._key_shapes:
            # A spec only equals str values: any other value (or none) cannot match it.
            if (
                (has_t and type(t) is not str)
                or (has_e and type(e) is not str)
                or (has_n and type(n) is not str)
            ):
                continue
            specs = self._specs_by_key.get(
                (t if has_t else None, e if has_e else None, n if has_n else None)
            )
            if specs:
                found.extend(specs)
        if len(self._candidates) >= _MAX_CANDIDATE_KEYS:
            self._candidates.clear()  # event names are client data: keep the memo bounded
        result = self._candidates[key] = tuple(found)
        return result

    def on_event(
        self,
        state: dict[str, Any] | None,
        event: Mapping[str, Any],
        ts_ms: int,
        message_id: str,
        *,
        watermark_ms: int,
    ) -> EngineResult:
        """Buffer one event of the contact, then apply everything due at ``watermark_ms``.

        Returns ``duplicate=True`` (ignored) for a message_id already applied or buffered, and
        ``late=True`` (not applied) for ``ts_ms`` older than the contact's clock. Either way the
        watermark is still applied, so the result may carry matches. Right after
        :meth:`relevant` of the same event object (not changed since), the projection made
        there is used.
        """
        st = self._load(state)
        res = EngineResult(st)
        projected, self._projected = self._projected, None
        if message_id in st["recent_ids"]:
            res.duplicate = True
            res.stats["duplicates"] += 1
        elif st["last_ts"] is not None and ts_ms < st["last_ts"]:
            res.late = True
            res.stats["late"] += 1
        else:
            view = (
                projected[1]
                if projected is not None and projected[0] is event
                else self.project(event)
            )
            entry = [ts_ms, message_id, view]
            buf: list[list[Any]] = st["buffer"]
            if not buf or (buf[-1][0], buf[-1][1]) <= (ts_ms, message_id):
                buf.append(entry)
            else:
                bisect.insort(buf, entry, key=lambda e: (e[0], e[1]))
            st["recent_ids"][message_id] = ts_ms
        self._advance(st, watermark_ms, res)
        return res

    def advance_time(self, state: dict[str, Any] | None, watermark_ms: int) -> EngineResult:
        """Apply buffered events and absence deadlines due at ``watermark_ms`` (a timer)."""
        st = self._load(state)
        res = EngineResult(st)
        self._advance(st, watermark_ms, res)
        return res

    def next_deadline(self, state: Mapping[str, Any] | None) -> int | None:
        """Earliest watermark at which a buffered event becomes due or an absence fires."""
        if not state or state.get("v") != STATE_VERSION:
            return None
        buf = state["buffer"]
        best: int | None = buf[0][0] if buf else None
        d = self._earliest_deadline(state)
        if d is not None and (best is None or d < best):
            best = d
        return best

    # -- state handling --------------------------------------------------------------------

    def _load(self, state: dict[str, Any] | None) -> dict[str, Any]:
        if not isinstance(state, dict) or state.get("v") != STATE_VERSION:
            return self.new_state()
        partials = state["partials"]
        if partials:
            for name in [
                n
                for n, entry in partials.items()
                if (rule := self._by_name.get(n)) is None or entry.get("h") != rule.fingerprint
            ]:
                del partials[name]
        last_fired = state["last_fired"]
        if last_fired:
            for name in [n for n in last_fired if n not in self._by_name]:
                del last_fired[name]
        return state

    def _advance(self, st: dict[str, Any], watermark: int, res: EngineResult) -> None:
        buf: list[list[Any]] = st["buffer"]
        has_absent = bool(self._absent_rules)
        d = self._earliest_deadline(st) if has_absent else None
        while True:
            ev_ts: int | None = buf[0][0] if buf and buf[0][0] <= watermark else None
            if d is not None and d <= watermark and (ev_ts is None or d <= ev_ts):
                self._fire(st, d, res)
            elif ev_ts is not None:
                ts, mid, view = buf.pop(0)
                self._apply(st, ts, mid, view, res)
            else:
                break
            if has_absent:
                d = self._earliest_deadline(st)
        if self._expire(st, watermark, res) and has_absent:
            d = self._earliest_deadline(st)
        self._prune(st)
        if buf and (d is None or buf[0][0] < d):
            d = buf[0][0]
        res.next_deadline_ms = d

    def _prune(self, st: dict[str, Any]) -> None:
        clock = st["last_ts"]
        if clock is None:
            return
        ids: dict[str, int] = st["recent_ids"]
        horizon = clock - self._lateness
        stale = [m for m, t in ids.items() if t < horizon]
        for m in stale:
            del ids[m]
        if len(ids) > MAX_RECENT_IDS:
            keep = sorted(ids.items(), key=lambda kv: kv[1])[-MAX_RECENT_IDS:]
            ids.clear()
            ids.update(keep)
        last_fired = st["last_fired"]
        partials = st["partials"]
        if last_fired:
            for rule in self._once_rules:
                lf = last_fired.get(rule.name)
                if lf is None:
                    continue
                # A future match's event time is >= the clock, or >= the last matched event
                # of a partial still waiting (e.g. for a trailing absence deadline).
                earliest = clock
                entry = partials.get(rule.name)
                if entry:
                    for p in entry["p"]:
                        if p["l"] < earliest:
                            earliest = p["l"]
                if earliest - lf >= rule.once_per_ms:  # type: ignore[operator]
                    del last_fired[rule.name]
        if partials:
            for name in [n for n, e in partials.items() if not e["p"]]:
                del partials[name]

    def _expire(self, st: dict[str, Any], watermark: int, res: EngineResult) -> bool:
        """Drop partials that no event at or after the watermark could extend any more.

        The contact's clock moves past the expiry point, so an event that would have extended
        the dropped partial is reported as late instead of being silently mis-matched.
        Returns whether anything was dropped.
        """
        partials = st["partials"]
        if not partials:
            return False
        changed = False
        for rule in self._within_rules:
            entry = partials.get(rule.name)
            if not entry or not entry["p"]:
                continue
            within: int = rule.within_ms  # type: ignore[assignment]
            keep = []
            for p in entry["p"]:
                end = p["f"] + within
                if end < watermark:
                    res.stats["expired_partials"] += 1
                    changed = True
                    if st["last_ts"] is None or end + 1 > st["last_ts"]:
                        st["last_ts"] = end + 1
                else:
                    keep.append(p)
            entry["p"] = keep
        return changed

    # -- deadlines -------------------------------------------------------------------------

    @staticmethod
    def _deadline(rule: Rule, p: Mapping[str, Any]) -> int | None:
        steps = rule.steps
        i = p["i"]
        s = steps[i]
        if s.absent:
            return None if s.for_ms is None else p["l"] + s.for_ms
        if p["c"] >= s.min_count and i + 1 < len(steps):
            nx = steps[i + 1]
            if nx.absent and nx.for_ms is not None:
                return int(p["l"] + nx.for_ms)
        return None

    def _earliest_deadline(self, st: Mapping[str, Any]) -> int | None:
        partials = st["partials"]
        if not partials:
            return None
        best: int | None = None
        for rule in self._absent_rules:
            entry = partials.get(rule.name)
            if not entry:
                continue
            for p in entry["p"]:
                d = self._deadline(rule, p)
                if d is not None and (best is None or d < best):
                    best = d
        return best

    def _fire(self, st: dict[str, Any], now: int, res: EngineResult) -> None:
        """Absence deadlines <= ``now``: satisfy middle absences, complete trailing ones."""
        if st["last_ts"] is None or now > st["last_ts"]:
            st["last_ts"] = now
        partials = st["partials"]
        for rule in self._absent_rules:
            entry = partials.get(rule.name)
            if not entry or not entry["p"]:
                continue
            last = len(rule.steps) - 1
            keep: list[dict[str, Any]] = []
            cut = -1
            for p in entry["p"]:
                if p["fs"] <= cut:
                    continue  # skip past the last event of a match fired just now
                d = self._deadline(rule, p)
                if d is None or d > now:
                    keep.append(p)
                    continue
                i = p["i"]
                ab = i if rule.steps[i].absent else i + 1
                if ab == last:
                    self._complete(st, rule, p, d, res)
                    cut = p["ls"]
                    keep = [q for q in keep if q["fs"] > cut]
                else:
                    p["i"] = ab + 1
                    p["c"] = 0
                    p["a"] = d
                    keep.append(p)
            entry["p"] = keep

    # -- events ----------------------------------------------------------------------------

    def _apply(
        self, st: dict[str, Any], ts: int, mid: str, view: Mapping[str, Any], res: EngineResult
    ) -> None:
        seq = st["seq"] + 1
        st["seq"] = seq
        if st["last_ts"] is None or ts > st["last_ts"]:
            st["last_ts"] = ts
        partials = st["partials"]
        for rule in self._rules:
            entry = partials.get(rule.name)
            cache: dict[int, bool] = {}
            completed = False
            if entry is not None and entry["p"]:
                keep = []
                for p in entry["p"]:
                    outcome = self._on_partial(rule, p, ts, seq, mid, view, cache)
                    if outcome == _KEEP:
                        keep.append(p)
                    elif outcome == _COMPLETE:
                        self._complete(st, rule, p, ts, res)
                        completed = True
                        break
                    elif outcome == _EXPIRED:
                        res.stats["expired_partials"] += 1
                # After a match every other partial started at or before this event: skip past.
                entry["p"] = [] if completed else keep
            if completed:
                continue
            first = rule.steps[0]
            started = cache.get(0)
            if started is None:
                started = first.spec.match_static(view)
            if not started:
                continue
            if (
                first.max_count is None
                and rule.within_ms is None
                and entry is not None
                and any(q["i"] == 0 and q["ls"] == seq for q in entry["p"])
            ):
                # An older partial counted this event on the same `at_least` first step: it
                # can do everything a new one could (no `within` to outlive it), and the
                # oldest partial wins anyway.
                continue
            p = {
                "fs": seq,
                "f": ts,
                "i": 0,
                "c": 1,
                "l": ts,
                "ls": seq,
                "a": ts,
                "e": [[mid, ts]],
                "k": {},
            }
            if first.capture_paths:
                p["k"][first.key] = {c: view[c] for c in first.capture_paths if c in view}
            outcome = self._settle(rule, p)
            if outcome == _COMPLETE:
                self._complete(st, rule, p, ts, res)
                if entry is not None:
                    entry["p"] = []
            elif outcome == _EXPIRED:
                res.stats["expired_partials"] += 1
            else:
                if entry is None:
                    entry = partials[rule.name] = {"h": rule.fingerprint, "p": []}
                plist = entry["p"]
                plist.append(p)
                excess = len(plist) - self._max_partials
                if excess > 0:
                    del plist[0:excess]  # the oldest partial matches
                    res.stats["dropped_partials"] += excess

    @staticmethod
    def _matches(
        rule: Rule, k: int, view: Mapping[str, Any], p: Mapping[str, Any], cache: dict[int, bool]
    ) -> bool:
        spec = rule.steps[k].spec
        ok = cache.get(k)
        if ok is None:
            ok = cache[k] = spec.match_static(view)
        if not ok:
            return False
        return not spec.step_refs or spec.match_refs(view, p["k"])

    @staticmethod
    def _take(
        rule: Rule,
        p: dict[str, Any],
        k: int,
        ts: int,
        seq: int,
        mid: str,
        view: Mapping[str, Any],
    ) -> None:
        if k != p["i"]:
            p["a"] = p["l"]
            p["i"] = k
            p["c"] = 1
        else:
            p["c"] += 1
        p["l"] = ts
        p["ls"] = seq
        events = p["e"]
        events.append([mid, ts])
        if len(events) > MAX_EVENTS_PER_MATCH:
            del events[1]
        step = rule.steps[k]
        if step.capture_paths:
            p["k"][step.key] = {c: view[c] for c in step.capture_paths if c in view}

    @staticmethod
    def _settle(rule: Rule, p: dict[str, Any]) -> int:
        """Normalise after a match: complete, move past a finished ``times`` step, or expire."""
        steps = rule.steps
        last = len(steps) - 1
        within = rule.within_ms
        while True:
            i = p["i"]
            s = steps[i]
            if s.absent:
                if (
                    s.for_ms is not None
                    and within is not None
                    and p["l"] + s.for_ms - p["f"] > within
                ):
                    return _EXPIRED
                return _KEEP
            if p["c"] < s.min_count:
                return _KEEP
            if i == last:
                return _COMPLETE
            if s.max_count is not None:  # `times` reached: the step is done
                p["i"] = i + 1
                p["c"] = 0
                p["a"] = p["l"]
                continue
            nx = steps[i + 1]  # `at_least` reached: may proceed, may keep counting
            if (
                nx.absent
                and nx.for_ms is not None
                and within is not None
                and p["l"] + nx.for_ms - p["f"] > within
            ):
                return _EXPIRED
            return _KEEP

    def _on_partial(
        self,
        rule: Rule,
        p: dict[str, Any],
        ts: int,
        seq: int,
        mid: str,
        view: Mapping[str, Any],
        cache: dict[int, bool],
    ) -> int:
        within = rule.within_ms
        if within is not None and ts - p["f"] > within:
            return _EXPIRED
        steps = rule.steps
        i = p["i"]
        s = steps[i]
        if s.absent:
            if self._matches(rule, i, view, p, cache):
                return _DROP  # the forbidden event happened
            if s.for_ms is not None:
                return _KEEP  # waiting for the deadline (it is later than ts)
            j = i + 1  # absent without `for`: a guard while waiting for the next step
            sj = steps[j]
            if sj.within_ms is not None and ts - p["l"] > sj.within_ms:
                return _EXPIRED
            if self._matches(rule, j, view, p, cache):
                self._take(rule, p, j, ts, seq, mid, view)
                return self._settle(rule, p)
            return _KEEP

        immediate = p["ls"] == seq - 1
        alive = False
        timed_out = False
        waiting_absent_for: int | None = None
        if p["c"] >= s.min_count:  # `at_least` reached: proceeding is possible
            nx = i + 1
            snx = steps[nx]
            j = nx
            if snx.absent:
                if self._matches(rule, nx, view, p, cache):
                    return _DROP
                if snx.for_ms is not None:
                    alive = True  # the deadline can still fire
                    waiting_absent_for = snx.for_ms
                    j = -1
                else:
                    j = nx + 1
            if j >= 0:
                sj = steps[j]
                if sj.within_ms is not None and ts - p["l"] > sj.within_ms:
                    timed_out = True
                elif not sj.strict or immediate:
                    if not sj.strict:
                        alive = True
                    if self._matches(rule, j, view, p, cache):
                        self._take(rule, p, j, ts, seq, mid, view)
                        return self._settle(rule, p)
        # count one more event for the current step
        if s.within_ms is not None and ts - p["a"] > s.within_ms:
            timed_out = True
        elif not s.strict or immediate:
            if not s.strict:
                alive = True
            if self._matches(rule, i, view, p, cache) and (
                waiting_absent_for is None
                or within is None
                or ts + waiting_absent_for - p["f"] <= within
            ):
                self._take(rule, p, i, ts, seq, mid, view)
                return self._settle(rule, p)
        if alive:
            return _KEEP
        return _EXPIRED if timed_out else _DROP

    # -- matches ---------------------------------------------------------------------------

    @staticmethod
    def _complete(
        st: dict[str, Any], rule: Rule, p: Mapping[str, Any], fired_at: int, res: EngineResult
    ) -> None:
        event_time: int = p["l"]
        if rule.once_per_ms is not None:
            last_fired = st["last_fired"]
            lf = last_fired.get(rule.name)
            if lf is not None and event_time - lf < rule.once_per_ms:
                res.stats["suppressed"] += 1
                return
            last_fired[rule.name] = event_time
        captures = p["k"]
        data: dict[str, Any] = {}
        for item in rule.data:
            if item.step_key is None:
                data[item.key] = item.value
                continue
            cap = captures.get(item.step_key)
            if cap is not None and item.path in cap:
                data[item.key] = cap[item.path]
        events = [(m, t) for m, t in p["e"]]
        res.matches.append(
            RuleMatch(
                rule=rule.name,
                emarsys_event_id=rule.emarsys_event_id,
                events=events,
                data=data,
                event_time_ms=event_time,
                first_message_id=events[0][0],
                fired_at_ms=fired_at,
            )
        )
        res.stats["matches"] += 1
