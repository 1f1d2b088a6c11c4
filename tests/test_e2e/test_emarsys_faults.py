"""Emarsys misbehaving: 5xx, 429 bursts, per-contact errors — nothing lost, nothing hidden."""

from __future__ import annotations

from typing import Any

from app.simulator import SimulatorOptions, start_simulator
from tests.fixtures import wait_for
from tests.test_e2e.test_pipeline import contact, identify, upsert_calls


async def test_5xx_and_429_bursts_are_retried_and_nothing_is_lost(
    deployment_factory: Any,
) -> None:
    sim = await start_simulator(
        options=SimulatorOptions(rate_limit_per_minute=0, error_rate=0.3, burst_429=3, seed=7)
    )
    try:
        dep = deployment_factory(
            sim.url, **{"emarsys.batch_size": 20, "emarsys.flush_interval": 0.2,
                        "emarsys.max_retry_backoff": 1.0}
        )
        await dep.start_worker()
        n = 200
        await dep.produce(
            [identify(f"r{i}@example.com", mid=f"m{i}", uid=f"u{i}", lastName=f"L{i}")
             for i in range(n)]
        )
        await wait_for(lambda: len(sim.state.contacts) >= n, timeout=180)
        for i in range(n):
            assert contact(sim, f"r{i}@example.com") == {"3": f"r{i}@example.com", "2": f"L{i}"}
        calls = upsert_calls(sim)
        injected = [c for c in calls if c.injected]
        assert any(c.status == 429 for c in injected), "no 429 burst was exercised"
        assert any(c.status >= 500 for c in injected), "no 5xx was exercised"
        ok_contacts = sum(len(c.body["contacts"]) for c in calls if c.status == 200)
        assert ok_contacts >= n  # every contact accepted at least once (retries may repeat)
        dlq = await dep.read_topic(dep.topic("emarsys-dlq"), expect=1, timeout=3)
        assert dlq == []  # transient faults never dead-letter
    finally:
        await sim.stop()


async def test_per_contact_error_dead_letters_only_that_contact(
    deployment_factory: Any, simulator: Any
) -> None:
    # Two contacts share one email in Emarsys: an upsert for it is refused with 2010.
    simulator.state.add_contact({3: "twin@example.com", 1: "A"})
    simulator.state.add_contact({3: "twin@example.com", 1: "B"})
    dep = deployment_factory(simulator.url)
    await dep.start_worker()
    await dep.produce([
        identify("one@example.com", mid="1", uid="u1", firstName="One"),
        identify("twin@example.com", mid="2", uid="u2", firstName="Twin"),
        identify("two@example.com", mid="3", uid="u3", firstName="Two"),
    ])
    dead = await dep.read_topic(dep.topic("emarsys-dlq"), expect=1, timeout=60)
    assert len(dead) == 1
    assert dead[0]["primary_keys"] == ["twin@example.com"]
    assert dead[0]["request"]["contacts"] == [{"3": "twin@example.com", "1": "Twin"}]
    assert "2010" in dead[0]["response"]["errors"]["twin@example.com"]
    await wait_for(lambda: contact(simulator, "two@example.com"))
    assert contact(simulator, "one@example.com") == {"3": "one@example.com", "1": "One"}
    assert contact(simulator, "two@example.com") == {"3": "two@example.com", "1": "Two"}
    results = await dep.read_topic(dep.topic("emarsys-results"), expect=1)
    assert results[0]["endpoint"] == "contact.upsert" and results[0]["errors"] == 1
    # The refused values are forgotten, so the same identify is sent again next time.
    await dep.produce([identify("twin@example.com", mid="4", uid="u2", firstName="Twin")])
    await wait_for(lambda: len(upsert_calls(simulator)) >= 2)
    assert upsert_calls(simulator)[1].body["contacts"] == [{"3": "twin@example.com", "1": "Twin"}]
