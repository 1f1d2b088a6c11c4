"""Two workers in one group; one is killed and later restarted (two rebalances)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest

from tests.fixtures import wait_for
from tests.test_e2e.test_kill9 import produce_keyed
from tests.test_e2e.test_pipeline import identify, upsert_calls

CONTACTS = 1500
EVENT_ID = 5150
SIGNUP_RULE = {
    "name": "signup",
    "emarsys_event_id": EVENT_ID,
    "steps": [{"event": "Signed Up"}],
    "data": {"plan": "steps[0].properties.plan"},
}


def iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


@pytest.mark.timeout(480)
async def test_kill_one_of_two_workers_and_restart_it_loses_nothing(
    deployment_factory: Any, simulator: Any
) -> None:
    dep = deployment_factory(
        simulator.url,
        rules=[SIGNUP_RULE],
        rule_engine={"allowed_lateness": "1s", "idle_timeout": "2s"},
        **{"kafka.partitions": 4, "emarsys.flush_interval": 0.5},
    )
    await dep.start_worker(0)
    w1 = await dep.start_worker(1)
    t0 = int(time.time() * 1000)
    events: list[dict[str, Any]] = []
    for r in range(2):
        for i in range(CONTACTS):
            events.append(identify(f"rb{i}@example.com", mid=f"rb{i}-{r}", uid=f"urb{i}",
                                   firstName=f"F{i}-{r}", ts=iso(t0 + r * 1000)))
    for i in range(CONTACTS):
        events.append({"type": "track", "event": "Signed Up", "userId": f"urb{i}",
                       "messageId": f"rb{i}-s", "timestamp": iso(t0 + 2000 + i),
                       "properties": {"plan": f"p{i % 3}"}})
    await produce_keyed(dep.bootstrap, dep.ingest_topic, events)
    await wait_for(lambda: len(upsert_calls(simulator)) >= 1, timeout=120)
    at_kill = len(simulator.state.contacts), len(simulator.state.triggers_for(EVENT_ID))
    w1.kill()  # rebalance 1: worker 0 takes over worker 1's partitions and tables
    await asyncio.sleep(8)
    await dep.start_worker(1)  # rebalance 2: partitions move back

    def done() -> bool:
        for i in range(CONTACTS):
            c = simulator.state.contact_by_key(f"rb{i}@example.com", "3")
            if c is None or c.fields.get("1") != f"F{i}-1":
                return False
        return len({t.external_id for t in simulator.state.triggers_for(EVENT_ID)}) >= CONTACTS

    try:
        # Up to two pause limits of the rules clock (60 s each, see app/rules/clock.py)
        # when a worker's commits stall after the rebalances, plus the work itself.
        await wait_for(done, timeout=330, interval=1.0)
    except AssertionError as exc:
        wrong = [i for i in range(CONTACTS)
                 if (c := simulator.state.contact_by_key(f"rb{i}@example.com", "3")) is None
                 or c.fields.get("1") != f"F{i}-1"]
        fired = {t.external_id for t in simulator.state.triggers_for(EVENT_ID)}
        unfired = [i for i in range(CONTACTS) if f"rb{i}@example.com" not in fired]
        late = await dep.read_topic(dep.topic("late-events"), expect=1, timeout=3)
        dlq = await dep.read_topic(dep.topic("emarsys-dlq"), expect=1, timeout=3)
        raise AssertionError(
            f"{exc}: {len(wrong)} contact(s) without their last fields (e.g. {wrong[:5]}), "
            f"{len(unfired)} without a trigger (e.g. {unfired[:5]}), {len(late)} late "
            f"event(s), {len(dlq)} Emarsys dead letter(s), "
            f"{len(upsert_calls(simulator))} upsert calls\n{dep.log_digest()}"
        ) from None
    triggers = simulator.state.triggers_for(EVENT_ID)
    per_contact = Counter(t.external_id for t in triggers)
    assert len(per_contact) == CONTACTS and set(per_contact.values()) == {1}
    for t in triggers:
        i = int(t.external_id[2:].split("@")[0])
        assert t.data == {"plan": f"p{i % 3}"}
    # Every event was in order within allowed_lateness: none may be judged late, even
    # though workers went away and came back (silence during a rebalance is no idleness).
    late = await dep.read_topic(dep.topic("late-events"), expect=1, timeout=3)
    assert late == [], f"{len(late)} event(s) judged late"
    deliveries = sum(t.deliveries for t in triggers)
    print(f"\ntwo workers, kill -9 at {at_kill[0]} contacts / {at_kill[1]} triggers, restart: "
          f"{len(upsert_calls(simulator))} upsert calls, "
          f"{len(triggers)} distinct triggers, {deliveries} trigger deliveries "
          f"({deliveries - len(triggers)} repeats absorbed by trigger_id)")
