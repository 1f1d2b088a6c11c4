"""Rules agent: per-contact event sequences -> Emarsys external-event triggers.

Reads ``contact-events`` (keyed by primary key, so the ``rule_state`` table is
co-partitioned with the users table). Pure matching lives in :mod:`app.rules`.

Event time: see :mod:`app.rules.clock` (per-source watermarks minus
``rule_engine.allowed_lateness``). When no event arrives for ``rule_engine.idle_timeout``
and the consumer group has nothing left to read on the topics feeding the rules (checked
with the brokers every second, :mod:`app.group_backlog`), the clock moves on with wall
time, so a trailing "did not happen" step fires even if nobody sends anything
(FLINK-15160). Silence during a rebalance, a restart or a backlog is not idleness: the
clock holds. During a replay events keep flowing, so history is judged by its own
timestamps, never by wall time.

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

from agents.emit import (
    Record,
    consume_envelopes,
    delivered,
    handled_offsets,
    send_keyed_json,
    send_records,
    shared_decodes,
)
from app.durations import parse_duration
from app.faust_app import tables_recovered
from app.rules import RuleEngine, RuleMatch, parse_rules, trigger_id
from app.rules.clock import EventClock
from app.rules.deadlines import DeadlineIndex
from tables.codec import loads
from tables.view import TableView

if TYPE_CHECKING:
    from app.faust_app import Runtime

__all__ = ["register"]

log = logging.getLogger("emarsys_stream.rules")


def _iso(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def register(rt: Runtime) -> None:
    s = rt.settings
    if not s.rules:
        return
    ruleset = parse_rules(s.rules, engine_settings(s.rule_engine))
    engine = RuleEngine(ruleset)
    clock = EventClock(
        ruleset.allowed_lateness_ms, idle_timeout(s.rule_engine), wait_for_partitions=True
    )
    deadlines = DeadlineIndex()  # primary key -> next deadline (event time, ms)
    key_id = str(s.identity.primary_key.field_id)
    table = rt.tables.rule_state
    # Latest answer of the backlog probe; until it answers, silence is not idleness.
    group = {"caught_up": False}
    m = rt.metrics
    topics = rt.topics

    def match_messages(pk: str, match: RuleMatch) -> tuple[dict[str, Any], dict[str, Any]]:
        """The ``rule-matches`` record and the ``event_trigger`` operation of a match."""
        tid = trigger_id(match.rule, pk, match.first_message_id)
        m.rule_matches.labels(match.rule).inc()
        found = {
            "rule": match.rule,
            "primary_key": pk,
            "emarsys_event_id": match.emarsys_event_id,
            "trigger_id": tid,
            "events": [{"message_id": mid, "ts": ts} for mid, ts in match.events],
            "data": match.data,
            "event_time_ms": match.event_time_ms,
            "matched_at_ms": int(time.time() * 1000),
        }
        operation = {
            "op": "event_trigger",
            "primary_key": pk,
            "key_id": key_id,
            "event_id": match.emarsys_event_id,
            "trigger_id": tid,
            "event_time": _iso(match.event_time_ms),
            "data": match.data,
            "rule": match.rule,
        }
        return found, operation

    decodes = shared_decodes(rt, topics.contact_events)  # with the users agent

    @rt.app.agent(topics.contact_events, name="rules")
    async def rules(stream):  # type: ignore[no-untyped-def]
        await consume_envelopes(rt, stream, handle, "rules", decodes)

    async def handle(records: list[Record]) -> None:
        by_pk: dict[str, Any] = {}
        items: list[tuple[str, dict[str, Any]]] = []
        for pk, msg, ev in records:
            by_pk[pk] = ev
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
        engine_stats: dict[str, int] = {}  # counted once per batch, not per event
        irrelevant = 0
        # Once per batch: the clock has seen the whole batch above and nothing below
        # moves it.
        batch_wm = clock.watermark(caught_up=group["caught_up"])
        for pk, msg in items:
            kind = msg.get("kind")
            if kind == "event" and not engine.relevant(msg["event"]):
                # Matches no step of any rule: cannot change a match (see
                # RuleEngine.relevant), so no state read, no write, no deadline change.
                irrelevant += 1
                continue
            wm = batch_wm
            if wm is None:
                if kind != "event":
                    continue  # a timer before this worker saw any event: nothing due
                # Only released held events so far (they never move the clock):
                # judge this one by its own time rather than skip it.
                wm = int(msg["ts"]) - ruleset.allowed_lateness_ms
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
            for name, value in (res.stats or {}).items():
                if value:
                    engine_stats[name] = engine_stats.get(name, 0) + value
            matches.extend((pk, mt) for mt in res.matches)
            deadlines.set(pk, res.next_deadline_ms)
        _count(m, engine_stats)
        if irrelevant:
            m.rule_engine.labels("irrelevant").inc(irrelevant)
        # Triggers and late events first; the state recording them as fired only
        # once the broker has them (see agents.emit.delivered).
        found: list[tuple[str, Any]] = []
        operations: list[tuple[str, Any]] = []
        for pk, match in matches:
            record, operation = match_messages(pk, match)
            found.append((pk, record))
            operations.append((pk, operation))
        if late:
            m.late_events.inc(len(late))
        sent: list[Any] = []
        outgoing: tuple[tuple[Any, list[tuple[str, Any]]], ...] = (
            (topics.rule_matches, found), (topics.operations, operations),
            (topics.late_events, list(late)),
        )
        for topic, batch in outgoing:
            if batch:
                sent.extend(await send_keyed_json(rt, topic, batch))
        await delivered(sent)
        await view.flush()
        if matches:
            by_rule: dict[str, int] = {}
            for _pk, match in matches:
                by_rule[match.rule] = by_rule.get(match.rule, 0) + 1
            log.info("rule matches: %d", len(matches),
                     extra={"matches": len(matches), "by_rule": by_rule})

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
            recovered = tables_recovered(rt.app)
            changed = assigned != rebuilt_for or (recovered and not was_recovered)
            was_recovered = recovered
            if assigned and recovered and changed:
                _rebuild(table, engine, clock, deadlines)
                rebuilt_for = assigned
            wm = clock.watermark(caught_up=group["caught_up"])
            if wm is None:
                continue
            due = deadlines.pop_due(wm)
            if due:
                await send_records(
                    topics.contact_events,
                    [(pk, {"kind": "timer", "primary_key": pk, "watermark_ms": wm})
                     for pk in due],
                    s.kafka.partitions,
                )


    @rt.app.task
    async def probe_group_backlog() -> None:
        """Keep ``group["caught_up"]`` current (see :mod:`app.group_backlog`)."""
        from app.group_backlog import GroupBacklog, nothing_left_to_read
        from app.replay import kafka_client_options

        ingest_topic = topics.ingest.get_topic_name()
        # The ingest topic is read by the ingest group, the internal hops by Faust's.
        probes = [
            GroupBacklog(s.ingest_group, [ingest_topic],
                         kafka_client_options(s)),
            GroupBacklog(s.kafka.app_id, [topics.identity.get_topic_name(),
                                          topics.contact_events.get_topic_name()],
                         kafka_client_options(s)),
        ]
        try:
            for probe in probes:
                await probe.start()
        except Exception as exc:  # noqa: BLE001
            log.warning("group backlog probe unavailable (%s); idle clock uses local "
                        "silence only", exc)
            group["caught_up"] = True
            for probe in probes:
                await probe.stop()
            return
        failing = False
        try:
            while not rt.app.should_stop:
                try:
                    progress = {}
                    for probe in probes:
                        progress.update(await probe.progress())
                    group["caught_up"] = nothing_left_to_read(progress, _read_by_me(rt))
                    # Ingest partitions that have records: each feeds the clock.
                    clock.expect({
                        (tp.topic, tp.partition) for tp, p in progress.items()
                        if tp.topic == ingest_topic and p.end > 0
                    })
                    failing = False
                except Exception as exc:  # noqa: BLE001
                    if not failing:
                        # Without the probe, fall back to local idleness (the clock may
                        # then run ahead during a rebalance); say so once.
                        log.warning("group backlog probe failed (%s); idle clock uses "
                                    "local silence only until it recovers", exc)
                    failing = True
                    group["caught_up"] = True
                await asyncio.sleep(1.0)
        finally:
            for probe in probes:
                await probe.stop()


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


def _read_by_me(rt: Runtime) -> dict[Any, int | None]:
    """This worker's assigned partitions -> last offset it has handled there (None:
    nothing yet): on ``identity`` by the identity agent, on ``contact-events`` by both
    the users and the rules agent (the lower), on the ingest topic by the ingest
    consumer. Not Faust's read offsets: those count envelopes still waiting in a stream
    buffer, a whole backlog of them at times."""
    out: dict[Any, int | None] = {}
    agents_of = {
        rt.topics.identity.get_topic_name(): ("identity",),
        rt.topics.contact_events.get_topic_name(): ("users", "rules"),
    }
    try:
        assigned = list(rt.app.consumer.assignment())
    except Exception:  # not started / rebalancing: nothing is "mine"
        assigned = []
    for tp in assigned:
        agents = agents_of.get(tp.topic)
        if agents is None:
            continue
        done = [handled_offsets(rt, a).get((tp.topic, tp.partition), -1) for a in agents]
        out[tp] = None if min(done) < 0 else min(done)
    ingest = rt.state.get("ingest")
    ingest_consumer = getattr(ingest, "consumer", None)
    if ingest is not None and ingest_consumer is not None:
        try:
            out.update({tp: ingest.read_offsets.get(tp) for tp in ingest_consumer.assignment()})
        except Exception:  # not subscribed yet
            pass
    return out


def _rebuild(table: Any, engine: RuleEngine, clock: EventClock, deadlines: DeadlineIndex) -> None:
    """After a (re)start: pending deadlines and the event clock come back from the table."""
    n = 0
    for key, raw in list(table.items()):
        state = loads(raw)
        pk = key.decode() if isinstance(key, bytes) else str(key)
        last = restored_event_time(state)
        if last is not None:
            clock.restore(last)
        d = engine.next_deadline(state)
        if d is not None:
            deadlines.set(pk, d)
            n += 1
    if n:
        log.info("restored %d pending rule deadlines", n)


def restored_event_time(state: Any) -> int | None:
    """The newest event time a contact's stored rule state has seen: its clock, or a
    newer event still waiting in its buffer (the clock may have held while the events
    arrived, e.g. before all ingest partitions were heard, and the worker died then)."""
    if not isinstance(state, dict):
        return None
    times = [state["last_ts"]] if isinstance(state.get("last_ts"), int) else []
    buffer = state.get("buffer")
    if isinstance(buffer, list):
        times.extend(e[0] for e in buffer if isinstance(e, list) and e and isinstance(e[0], int))
    return max(times) if times else None


def _count(m: Any, stats: Any) -> None:
    for name, value in (stats or {}).items():
        if value:
            m.rule_engine.labels(name).inc(value)
