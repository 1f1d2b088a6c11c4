"""Rules agent: per-contact event sequences -> Emarsys external-event triggers.

Reads ``contact-events`` (keyed by primary key, so the ``rule_state`` table is
co-partitioned with the users table). Pure matching lives in :mod:`app.rules`.

Event time: the worker's clock is the highest event ``timestamp`` it has seen; the
watermark is that minus ``rule_engine.allowed_lateness``. When no event arrives for
``rule_engine.idle_timeout`` the clock moves on with wall time, so a trailing "did not
happen" step fires even if nobody sends anything (FLINK-15160). During a replay
events keep flowing, so history is judged by its own timestamps, never by wall time.

Timers are messages: when a contact's next deadline passes, the timer loop sends
``{kind: "timer"}`` for it to ``contact-events``; the agent handles it like an event
(inside stream iteration, so the table write is changelogged). The deadline index is
rebuilt from the table after a restart; firing is recorded in state, so a deadline
fires once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from agents.emit import send_json
from app.durations import parse_duration
from app.rules import RuleEngine, RuleMatch, parse_rules, trigger_id
from tables.codec import loads
from tables.view import TableView

if TYPE_CHECKING:
    from app.faust_app import Runtime

__all__ = ["register", "EventClock"]

log = logging.getLogger("emarsys_stream.rules")


class EventClock:
    """The worker's event-time clock (see module docstring).

    Like Flink's per-source watermarks: the highest event time is tracked per ingest
    partition and path (events carry their ``source`` and ``path``), and the clock is
    the lowest of those
    among partitions that delivered something within ``idle_timeout``. Partitions of
    an unkeyed Segment topic advance at different speeds; taking the minimum keeps
    one fast partition from making the others' events late. When every partition is
    idle the clock follows wall time from the newest event.
    """

    def __init__(self, lateness_ms: int, idle_timeout_s: float) -> None:
        self.lateness_ms = lateness_ms
        self.idle_timeout_s = idle_timeout_s
        self.max_ts: dict[Any, int] = {}
        self.last_arrival: dict[Any, float] = {}
        self._restored: int | None = None
        self._last_watermark: int | None = None

    def observe(self, ts_ms: int, source: Any = None) -> None:
        if ts_ms > self.max_ts.get(source, -(2**62)):
            self.max_ts[source] = ts_ms
        self.last_arrival[source] = time.monotonic()

    def restore(self, ts_ms: int) -> None:
        """Event time known from state after a restart (before any event arrives)."""
        if self._restored is None or ts_ms > self._restored:
            self._restored = ts_ms

    def watermark(self) -> int | None:
        now = time.monotonic()
        if self.max_ts:
            active = [
                ts for src, ts in self.max_ts.items()
                if now - self.last_arrival[src] < self.idle_timeout_s
            ]
            if active:
                base = min(active)
            else:
                newest = max(self.last_arrival.values())
                base = max(self.max_ts.values()) + int((now - newest) * 1000)
        elif self._restored is not None:
            # Restarted with pending state and no traffic yet: follow wall time.
            base = self._restored + int((now - self._started) * 1000)
        else:
            return None
        wm = base - self.lateness_ms
        if self._last_watermark is not None and wm < self._last_watermark:
            return self._last_watermark  # never goes back
        self._last_watermark = wm
        return wm

    _started = time.monotonic()


def _iso(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def register(rt: Runtime) -> None:
    s = rt.settings
    if not s.rules:
        return
    ruleset = parse_rules(s.rules, engine_settings(s.rule_engine))
    engine = RuleEngine(ruleset)
    clock = EventClock(ruleset.allowed_lateness_ms, idle_timeout(s.rule_engine))
    deadlines: dict[str, int] = {}  # primary key -> next deadline (event time, ms)
    key_id = str(s.identity.primary_key.field_id)
    table = rt.tables.rule_state
    m = rt.metrics
    topics = rt.topics

    async def emit_match(pk: str, match: RuleMatch) -> None:
        tid = trigger_id(match.rule, pk, match.first_message_id)
        m.rule_matches.labels(match.rule).inc()
        await send_json(
            topics.rule_matches,
            pk,
            {
                "rule": match.rule,
                "primary_key": pk,
                "emarsys_event_id": match.emarsys_event_id,
                "trigger_id": tid,
                "events": [{"message_id": mid, "ts": ts} for mid, ts in match.events],
                "data": match.data,
                "event_time_ms": match.event_time_ms,
                "matched_at_ms": int(time.time() * 1000),
            },
        )
        await send_json(
            topics.operations,
            pk,
            {
                "op": "event_trigger",
                "primary_key": pk,
                "key_id": key_id,
                "event_id": match.emarsys_event_id,
                "trigger_id": tid,
                "event_time": _iso(match.event_time_ms),
                "data": match.data,
                "rule": match.rule,
            },
        )

    @rt.app.agent(topics.contact_events, name="rules")
    async def rules(stream):  # type: ignore[no-untyped-def]
        async for events in stream.take_events(s.worker.batch_max, s.worker.batch_within):
            by_pk: dict[str, Any] = {}
            items: list[tuple[str, dict[str, Any]]] = []
            for ev in events:
                pk = ev.key.decode() if isinstance(ev.key, bytes) else str(ev.key)
                by_pk[pk] = ev
                msg = orjson.loads(ev.value)
                if msg.get("kind") == "event" and msg.get("path") != "held":
                    # One clock source per ingest partition AND path: events that took
                    # the identity hop arrive later than direct ones from the same
                    # partition, so the slowest path holds the watermark back. Released
                    # held events are old by nature and must not move the clock.
                    src = msg.get("source") or {}
                    clock.observe(
                        int(msg["ts"]), (src.get("topic"), src.get("partition"), msg.get("path"))
                    )
                items.append((pk, msg))
            view = TableView(table, by_pk)
            matches: list[tuple[str, RuleMatch]] = []
            late: list[tuple[str, dict[str, Any]]] = []
            for pk, msg in items:
                kind = msg.get("kind")
                wm = clock.watermark()
                if wm is None:
                    continue
                state = view.get(pk)
                if kind == "event":
                    event = msg["event"]
                    res = engine.on_event(
                        state, event, int(msg["ts"]), str(event.get("messageId")), watermark_ms=wm
                    )
                    if res.late:
                        late.append((pk, msg))
                elif kind == "timer":
                    if state is None:
                        continue
                    res = engine.advance_time(state, max(wm, int(msg.get("watermark_ms", wm))))
                else:
                    continue
                view[pk] = res.state
                _count(m, res.stats)
                matches.extend((pk, mt) for mt in res.matches)
                if res.next_deadline_ms is None:
                    deadlines.pop(pk, None)
                else:
                    deadlines[pk] = res.next_deadline_ms
            view.flush()
            for pk, match in matches:
                await emit_match(pk, match)
            if matches:
                by_rule: dict[str, int] = {}
                for _pk, match in matches:
                    by_rule[match.rule] = by_rule.get(match.rule, 0) + 1
                log.info("rule matches: %d", len(matches),
                         extra={"matches": len(matches), "by_rule": by_rule})
            for pk, msg in late:
                m.late_events.inc()
                await send_json(topics.late_events, pk, msg)

    @rt.app.task
    async def rule_timers() -> None:
        """Send a timer message for every contact whose deadline the watermark passed."""
        rebuilt_for: frozenset[Any] | None = None
        was_recovered = False
        while not rt.app.should_stop:
            await asyncio.sleep(0.5)
            # Rebuild the deadline index after every rebalance once tables are recovered:
            # partitions (and their pending deadlines) may arrive in a later assignment.
            assigned = _assignment(rt)
            recovered = _recovered(rt)
            changed = assigned != rebuilt_for or (recovered and not was_recovered)
            was_recovered = recovered
            if assigned and recovered and changed:
                _rebuild(table, engine, clock, deadlines)
                rebuilt_for = assigned
            wm = clock.watermark()
            if wm is None:
                continue
            due = [pk for pk, d in deadlines.items() if d <= wm]
            for pk in due:
                deadlines.pop(pk, None)
                await send_json(
                    topics.contact_events,
                    pk,
                    {"kind": "timer", "primary_key": pk, "watermark_ms": wm},
                )


def engine_settings(rule_engine: dict[str, Any]) -> dict[str, Any]:
    """``rule_engine`` minus the keys the worker (not the pure engine) uses."""
    return {k: v for k, v in rule_engine.items() if k != "idle_timeout"}


def idle_timeout(rule_engine: dict[str, Any]) -> float:
    """Seconds without events after which the event clock follows wall time."""
    return parse_duration(rule_engine.get("idle_timeout", "30s"))


def _assignment(rt: Runtime) -> frozenset[Any]:
    try:
        return frozenset(rt.app.consumer.assignment())
    except Exception:  # consumer not started yet
        return frozenset()


def _recovered(rt: Runtime) -> bool:
    recovery = getattr(rt.app.tables, "recovery", None)
    return bool(recovery is not None and recovery.completed.is_set())


def _rebuild(table: Any, engine: RuleEngine, clock: EventClock, deadlines: dict[str, int]) -> None:
    """After a (re)start: pending deadlines and the event clock come back from the table."""
    n = 0
    for key, raw in list(table.items()):
        state = loads(raw)
        pk = key.decode() if isinstance(key, bytes) else str(key)
        last = state.get("last_ts") if isinstance(state, dict) else None
        if isinstance(last, int):
            clock.restore(last)
        d = engine.next_deadline(state)
        if d is not None:
            deadlines[pk] = d
            n += 1
    if n:
        log.info("restored %d pending rule deadlines", n)


def _count(m: Any, stats: Any) -> None:
    for name, value in (stats or {}).items():
        if value:
            m.rule_engine.labels(name).inc(value)
