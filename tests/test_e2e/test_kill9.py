"""A worker killed with SIGKILL mid-stream and restarted loses nothing (at-least-once)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.fixtures import wait_for
from tests.test_e2e.test_pipeline import identify, upsert_calls

# 4,000 contacts x (4 identifies + 1 signup) = 20,000 events (about a minute here);
# KILL9_CONTACTS=1000 for a quicker local run.
CONTACTS = int(os.environ.get("KILL9_CONTACTS", "4000"))
ROUNDS = 4  # identifies per contact
EVENT_ID = 6060
SIGNUP_RULE = {
    "name": "signup",
    "emarsys_event_id": EVENT_ID,
    "steps": [{"event": "Signed Up"}],
    "data": {"n": "steps[0].properties.n"},
}


def final_name(i: int) -> str:
    return f"Name{i}-r{ROUNDS - 1}"


async def produce_keyed(bootstrap: str, topic: str, events: list[dict[str, Any]]) -> None:
    # Keyed by userId so one contact's events keep their order (a Segment Kafka source
    # configured with a key does this); the final value per contact is then well defined.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        futs = [await producer.send(topic, orjson.dumps(e), key=e["userId"].encode())
                for e in events]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


@pytest.mark.timeout(480)
async def test_kill_9_mid_stream_then_restart_delivers_every_contact(
    deployment_factory: Any, simulator: Any
) -> None:
    dep = deployment_factory(
        simulator.url,
        rules=[SIGNUP_RULE],
        rule_engine={"allowed_lateness": "1s", "idle_timeout": "2s"},
        **{"emarsys.flush_interval": 0.5},
    )
    w = await dep.start_worker()
    events = [
        identify(f"k{i}@example.com", mid=f"k{i}-r{r}", uid=f"uk{i}", firstName=f"Name{i}-r{r}",
                 ts=f"2026-11-28T09:{r:02d}:00.000Z")
        for r in range(ROUNDS) for i in range(CONTACTS)
    ] + [
        {"type": "track", "event": "Signed Up", "userId": f"uk{i}", "messageId": f"k{i}-s",
         "timestamp": f"2026-11-28T09:{ROUNDS:02d}:00.000Z", "properties": {"n": i}}
        for i in range(CONTACTS)
    ]
    await produce_keyed(dep.bootstrap, dep.ingest_topic, events)
    await wait_for(lambda: len(upsert_calls(simulator)) >= 1, timeout=240)
    w.kill()  # SIGKILL: no flush, no commit, no goodbye
    killed_at_contacts = len(simulator.state.contacts)
    await dep.start_worker()

    def all_final() -> bool:
        if len(simulator.state.triggers_for(EVENT_ID)) < CONTACTS:
            return False
        for i in range(CONTACTS):
            c = simulator.state.contact_by_key(f"k{i}@example.com", "3")
            if c is None or c.fields.get("1") != final_name(i):
                return False
        return True

    try:
        # Within the test's own timeout, so that a failure says what is missing. Up to
        # two pause limits of the rules clock (60 s each, app/rules/clock.py) when the
        # restarted worker's commits stall, plus the work itself.
        await wait_for(all_final, timeout=330, interval=1.0)
    except AssertionError as exc:
        unfired = CONTACTS - len({t.external_id for t in simulator.state.triggers_for(EVENT_ID)})
        stale = sum(
            1 for i in range(CONTACTS)
            if (c := simulator.state.contact_by_key(f"k{i}@example.com", "3")) is None
            or c.fields.get("1") != final_name(i)
        )
        raise AssertionError(
            f"{exc}: {stale} contact(s) without their last fields, {unfired} without a "
            f"trigger, {len(upsert_calls(simulator))} upsert calls\n{dep.log_digest()}"
        ) from None
    triggers = simulator.state.triggers_for(EVENT_ID)
    per_contact = Counter(t.external_id for t in triggers)
    assert len(per_contact) == CONTACTS and set(per_contact.values()) == {1}
    assert all(t.data == {"n": int(t.external_id[1:].split("@")[0])} for t in triggers)
    trigger_deliveries = sum(t.deliveries for t in triggers)
    assert len(simulator.state.contacts) == CONTACTS
    sent = [
        (c["3"], orjson.dumps(c, option=orjson.OPT_SORT_KEYS))
        for call in upsert_calls(simulator) if call.status == 200
        for c in call.body["contacts"]
    ]
    assert {pk for pk, _ in sent} == {f"k{i}@example.com" for i in range(CONTACTS)}
    # Redelivery after the kill may repeat an upsert that Emarsys already had (the
    # at-least-once price); a repeat is harmless (same fields) and is reported here.
    repeats = sum(n - 1 for n in Counter(sent).values() if n > 1)
    print(f"\nkill -9 after {killed_at_contacts} contacts in Emarsys; "
          f"{len(upsert_calls(simulator))} upsert calls, {len(sent)} contact upserts, "
          f"{repeats} identical repeats; {len(triggers)} distinct triggers, "
          f"{trigger_deliveries} deliveries")
