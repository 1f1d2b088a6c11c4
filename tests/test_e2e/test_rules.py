"""Rule builder end to end: sequences -> Emarsys external-event triggers (real broker)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from tests.fixtures import Deployment, wait_for
from tests.test_e2e.test_fault_proof import metric_by_label, worker_metrics
from tests.test_e2e.test_pipeline import identify

EVENT_ID = 4711

CART_RULE: dict[str, Any] = {
    "name": "cart_abandonment",
    "emarsys_event_id": EVENT_ID,
    "within": "2h",
    "steps": [
        {
            "event": "Product Viewed",
            "where": {
                "properties.category": {"in": ["shoes", "boots"]},
                "properties.price": {"gt": 0},
            },
        },
        {
            "event": "Product Added",
            "where": {"properties.sku": {"eq_step": 0, "path": "properties.sku"}},
        },
        {"absent": "Order Completed", "for": "3s"},
    ],
    "data": {"sku": "steps[1].properties.sku", "cart_value": "steps[1].properties.value"},
    "once_per": "24h",
}

ENGINE = {"allowed_lateness": "500ms", "idle_timeout": "1s", "max_partial_matches": 100}


def iso(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        + f"{ms % 1000:03d}Z"
    )


def track(name: str, uid: str, mid: str, ts_ms: int, **props: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": name,
        "userId": uid,
        "messageId": mid,
        "timestamp": iso(ts_ms),
        "properties": props,
    }


def cart_events(uid: str, email: str, t0: int, prefix: str) -> list[dict[str, Any]]:
    return [
        identify(email, mid=f"{prefix}-id", uid=uid, ts=iso(t0)),
        track(
            "Product Viewed", uid, f"{prefix}-v", t0 + 100, sku="SKU-1", category="shoes", price=59
        ),
        track("Product Added", uid, f"{prefix}-a", t0 + 200, sku="SKU-1", value=59),
    ]


def rules_deployment(factory: Any, sim: Any, rules: list[dict[str, Any]] | None = None) -> Any:
    return factory(sim.url, rules=rules or [CART_RULE], rule_engine=ENGINE)


def triggers(sim: Any) -> list[Any]:
    return list(sim.state.triggers_for(EVENT_ID))


async def test_trailing_absence_fires_without_any_further_event(
    deployment_factory: Any, simulator: Any
) -> None:
    dep: Deployment = rules_deployment(deployment_factory, simulator)
    await dep.start_worker()
    t0 = int(time.time() * 1000)
    await dep.produce(cart_events("u1", "cart@example.com", t0, "c1"))
    # Nothing else is ever sent: the absence must fire on its timer (FLINK-15160).
    await wait_for(lambda: triggers(simulator), timeout=60)
    [trig] = triggers(simulator)
    assert trig.external_id == "cart@example.com"
    assert trig.data == {"sku": "SKU-1", "cart_value": 59}
    assert trig.trigger_id
    matches = await dep.read_topic(dep.topic("rule-matches"), expect=1)
    assert matches[0]["rule"] == "cart_abandonment"
    assert matches[0]["trigger_id"] == trig.trigger_id
    assert [e["message_id"] for e in matches[0]["events"]] == ["c1-v", "c1-a"]
    # An upsert created the contact before the trigger reached Emarsys.
    calls = simulator.state.calls
    first_trigger = next(i for i, c in enumerate(calls) if "/event/" in c.path)
    assert any("/contact" in c.path for c in calls[:first_trigger])


async def test_order_completed_in_time_prevents_the_trigger(
    deployment_factory: Any, simulator: Any
) -> None:
    dep = rules_deployment(deployment_factory, simulator)
    await dep.start_worker()
    t0 = int(time.time() * 1000)
    events = cart_events("u2", "buyer@example.com", t0, "c2")
    events.append(track("Order Completed", "u2", "c2-o", t0 + 300, total=59))
    events += cart_events("u3", "leaver@example.com", t0, "c3")
    await dep.produce(events)
    await wait_for(lambda: triggers(simulator), timeout=60)
    await asyncio.sleep(3)  # both windows closed together: a wrong trigger would be here too
    assert [t.external_id for t in triggers(simulator)] == ["leaver@example.com"]


async def test_restart_with_open_absence_window_fires_exactly_once(
    deployment_factory: Any, simulator: Any
) -> None:
    rule = dict(
        CART_RULE, steps=[*CART_RULE["steps"][:2], {"absent": "Order Completed", "for": "8s"}]
    )
    dep = rules_deployment(deployment_factory, simulator, [rule])
    w = await dep.start_worker()
    t0 = int(time.time() * 1000)
    await dep.produce(cart_events("u4", "restart@example.com", t0, "c4"))
    await wait_for(lambda: simulator.state.contact_by_key("restart@example.com", "3"))
    w.kill()  # kill -9 while the absence window is open
    await dep.start_worker()
    try:
        await wait_for(lambda: triggers(simulator), timeout=90)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; no trigger after the restart\n{dep.log_digest()}") from exc
    await asyncio.sleep(6)  # give a duplicate the chance to appear
    assert len(triggers(simulator)) == 1
    # Exactly one program run in Emarsys: one distinct trigger. If the kill landed after
    # the old worker had sent the trigger but before it committed, the redelivered history
    # fires again with the same trigger_id, which Emarsys counts as a repeat, not a run.
    assert triggers(simulator)[0].deliveries >= 1


async def test_out_of_order_within_lateness_matches_and_later_goes_to_late_topic(
    deployment_factory: Any, simulator: Any
) -> None:
    seq_rule = {
        "name": "view_then_add",
        "emarsys_event_id": EVENT_ID,
        "steps": [{"event": "Product Viewed"}, {"event": "Product Added"}],
        "data": {"sku": "steps[1].properties.sku"},
    }
    dep = deployment_factory(
        simulator.url, rules=[seq_rule], rule_engine={**ENGINE, "allowed_lateness": "10s"}
    )
    await dep.start_worker()
    t0 = int(time.time() * 1000)
    await dep.produce(
        [
            identify("ooo@example.com", mid="o-id", uid="u5", ts=iso(t0)),
            # Arrives first but happened second: placed in event-time order.
            track("Product Added", "u5", "o-a", t0 + 2000, sku="X"),
            track("Product Viewed", "u5", "o-v", t0 + 1000, sku="X"),
        ]
    )
    await wait_for(lambda: triggers(simulator), timeout=60)
    assert triggers(simulator)[0].data == {"sku": "X"}
    # Much later event time, then one from far behind the watermark -> late topic.
    await dep.produce([track("Page Ping", "u5", "o-p", t0 + 120_000)])
    await dep.produce([track("Product Viewed", "u5", "o-late", t0 - 60_000)])
    late = await dep.read_topic(dep.topic("late-events"), expect=1, timeout=60)
    assert [m["event"]["messageId"] for m in late] == ["o-late"]
    # The engine's counts reach /metrics (summed per batch by the agent).
    engine = metric_by_label(
        await worker_metrics(dep.workers[0]), "emarsys_stream_rule_engine_total", "what"
    )
    assert engine.get("late") == 1
    assert engine.get("matches") == 1


async def test_replay_from_the_start_sends_no_new_distinct_triggers(
    deployment_factory: Any, simulator: Any
) -> None:
    # History is judged by its own timestamps; the clock only follows wall time once
    # every partition has been quiet for idle_timeout (after the backlog is read).
    engine = {**ENGINE, "idle_timeout": "4s"}
    dep = deployment_factory(simulator.url, rules=[CART_RULE], rule_engine=engine)
    w = await dep.start_worker()
    t0 = int(time.time() * 1000) - 60_000  # history: the absence window is long over
    events = []
    for i in range(5):
        events += cart_events(f"r{i}", f"replay{i}@example.com", t0 + i, f"r{i}")
    events.append(track("Order Completed", "r0", "r0-o", t0 + 1000))
    await dep.produce(events)
    await wait_for(lambda: len(triggers(simulator)) >= 4, timeout=90)
    first = sorted((t.external_id, t.trigger_id) for t in triggers(simulator))
    w.stop()
    # Replay: a fresh consumer group and fresh state read the same ingest topic from the
    # start (what resetting offsets does), against the same Emarsys.
    replay = deployment_factory(
        simulator.url,
        rules=[CART_RULE],
        rule_engine=engine,
        **{"kafka.ingest_topic": dep.ingest_topic},
    )
    await replay.start_worker()
    calls_before = len(simulator.state.calls_to("/event/"))
    await wait_for(lambda: len(simulator.state.calls_to("/event/")) > calls_before, timeout=90)
    again = sorted((t.external_id, t.trigger_id) for t in triggers(simulator))
    assert again == first
    assert "replay0@example.com" not in {e for e, _ in first}
    assert len(first) == 4


async def test_trigger_for_a_contact_emarsys_does_not_know_creates_it_and_retries(
    deployment_factory: Any, simulator: Any
) -> None:
    seq_rule = {
        "name": "signup",
        "emarsys_event_id": EVENT_ID,
        "steps": [{"event": "Signed Up"}],
        "data": {"plan": "steps[0].properties.plan"},
    }
    dep = deployment_factory(simulator.url, rules=[seq_rule], rule_engine=ENGINE)
    await dep.start_worker()
    t0 = int(time.time() * 1000)
    await dep.produce([identify("gone@example.com", mid="g-id", uid="ug", ts=iso(t0))])
    await wait_for(lambda: simulator.state.contact_by_key("gone@example.com", "3"))
    # The contact disappears from Emarsys (deleted there); our users table still knows it.
    simulator.state.reset()
    await dep.produce([track("Signed Up", "ug", "g-s", t0 + 100, plan="pro")])
    await wait_for(lambda: triggers(simulator), timeout=60)
    paths = [(c.method, c.path, c.reply_code) for c in simulator.state.calls]
    trigger_calls = [p for p in paths if "/event/" in p[1]]
    assert len(trigger_calls) == 2  # refused with 2008, then retried once
    first = simulator.state.calls_to("/event/")[0]
    assert first.body["contacts"][0]["external_id"] == "gone@example.com"
    upserts_between = [p for p in paths if "/contact" in p[1]]
    assert upserts_between, "the contact was not re-created before the retry"
    assert simulator.state.contact_by_key("gone@example.com", "3") is not None
    assert triggers(simulator)[0].data == {"plan": "pro"}
    assert await dep.read_topic(dep.topic("emarsys-dlq"), expect=1, timeout=2) == []


async def test_users_and_rules_decode_each_contact_events_message_once(
    deployment_factory: Any, simulator: Any
) -> None:
    dep = rules_deployment(deployment_factory, simulator)
    w = await dep.start_worker()
    # Garbage on contact-events, which both agents read: one dead letter, not one each.
    await dep.produce([b"not json at all"], topic=dep.topic("contact-events"))
    t0 = int(time.time() * 1000)
    await dep.produce(cart_events("u7", "shared@example.com", t0, "c7"))
    await wait_for(lambda: triggers(simulator), timeout=60)
    assert [t.external_id for t in triggers(simulator)] == ["shared@example.com"]
    assert simulator.state.contact_by_key("shared@example.com", "3") is not None

    def decodes(text: str) -> dict[str, float]:
        lines = "\n".join(line for line in text.splitlines() if "contact-events" in line)
        return metric_by_label(lines, "emarsys_stream_envelope_decodes_total", "outcome")

    # Every message decoded by one agent and taken by the other (timers may still be
    # on their way to the second one: wait until both have them).
    deadline = time.monotonic() + 30
    while True:
        seen = decodes(await worker_metrics(w))
        if seen.get("decoded", 0) >= 3 and seen.get("shared") == seen.get("decoded"):
            break
        assert time.monotonic() < deadline, seen
        await asyncio.sleep(0.5)
    assert seen.get("dropped", 0) == 0
    dead = await dep.read_topic(dep.dlq_topic, expect=2, timeout=5)
    assert [d["reason"] for d in dead] == ["malformed_internal_message"]
