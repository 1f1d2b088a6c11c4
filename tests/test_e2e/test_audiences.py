"""Engage audiences -> Emarsys contact lists, end to end (real broker, worker, simulator)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from app.simulator import ContactList, SimulatorOptions, start_simulator
from tests.fixtures import Deployment, wait_for
from tests.test_e2e.test_pipeline import contact, identify, upsert_calls, user_record

VIP_LIST = 77
PERSONAS = {"computation_id": "aud_2Nq1", "space_id": "spa_9x", "namespace": "spa_9x"}


def audience_identify(email: str, key: str, member: bool, *, mid: str, uid: str,
                      ts: str = "2026-11-28T09:00:00.000Z") -> dict[str, Any]:
    """What Engage sends a user-property destination on entry (true) / exit (false)."""
    return {
        "type": "identify", "messageId": mid, "userId": uid, "timestamp": ts,
        "traits": {"email": email, key: member},
        "context": {"personas": {"computation_class": "audience", "computation_key": key,
                                 **PERSONAS}},
        "integrations": {"All": False, "Emarsys": True},
    }


def audience_track(email: str, key: str, member: bool, *, mid: str, uid: str,
                   ts: str = "2026-11-28T09:00:00.000Z") -> dict[str, Any]:
    """What Engage sends an event destination: Audience Entered / Audience Exited."""
    return {
        "type": "track", "event": "Audience Entered" if member else "Audience Exited",
        "messageId": mid, "userId": uid, "timestamp": ts,
        "properties": {"audience_key": key, key: member},
        "context": {"traits": {"email": email},
                    "personas": {"computation_class": "audience", "computation_key": key,
                                 **PERSONAS}},
    }


def add_list(sim: Any, list_id: int, name: str) -> None:
    """A list that already exists in Emarsys (made by hand, or by an earlier run)."""
    sim.state.lists[list_id] = ContactList(list_id, name, None, "3", time.time())


def list_calls(sim: Any, action: str | None = None) -> list[Any]:
    return [c for c in sim.state.calls
            if c.method == "POST" and c.path.rstrip("/").split("/")[-1] in ("add", "delete")
            and "contactlist/" in c.path and (action is None or c.path.endswith(action))]


def members(sim: Any, list_id: int) -> list[str]:
    lst = sim.state.lists.get(list_id)
    return [] if lst is None else sorted(lst.to_dict(sim.state)["external_ids"])


async def processed(dep: Deployment, pk: str, events: int) -> dict[str, Any]:
    """The users record once the users agent has processed ``events`` events of ``pk``."""
    rec: dict[str, Any] | None = None
    for _ in range(300):
        rec = await user_record(dep, pk)
        if rec is not None and rec["event_count"] >= events:
            return rec
        await asyncio.sleep(0.2)
    raise AssertionError(f"{pk}: {events} events not processed: {rec}")


async def test_identify_form_entry_and_exit_become_list_add_then_delete(
    deployment_factory: Any, simulator: Any
) -> None:
    add_list(simulator, VIP_LIST, "VIP customers")
    dep = deployment_factory(simulator.url, audiences=[
        {"key": "vip_customers", "contact_list_id": VIP_LIST, "field_id": 5001},
    ])
    await dep.start_worker()
    await dep.produce([identify("carol@example.com", mid="c0", uid="u-carol", firstName="C")])
    await dep.produce([
        audience_identify("ann@example.com", "vip_customers", True, mid="a1", uid="u-ann"),
        audience_identify("bob@example.com", "vip_customers", True, mid="b1", uid="u-bob"),
    ])
    await wait_for(lambda: members(simulator, VIP_LIST) == ["ann@example.com",
                                                          "bob@example.com"])
    adds = list_calls(simulator)
    assert len(adds) == 1 and adds[0].path.endswith(f"contactlist/{VIP_LIST}/add")
    assert adds[0].body["key_id"] == "3"
    assert sorted(adds[0].body["external_ids"]) == ["ann@example.com", "bob@example.com"]
    # The contacts were upserted (created, with the membership field) before the list add.
    ann_upsert = next(c for c in upsert_calls(simulator)
                      if any(x["3"] == "ann@example.com" for x in c.body["contacts"]))
    assert ann_upsert.seq < adds[0].seq
    assert contact(simulator, "ann@example.com") == {"3": "ann@example.com", "5001": 1}
    rec = await user_record(dep, "ann@example.com")
    assert rec is not None and rec["audiences"] == {"vip_customers": True}

    # A repeated `true` and the exit of a contact that never was a member: no call at all.
    calls_before = len(simulator.state.calls)
    await dep.produce([
        audience_identify("ann@example.com", "vip_customers", True, mid="a2", uid="u-ann",
                          ts="2026-11-28T10:00:00.000Z"),
        audience_identify("carol@example.com", "vip_customers", False, mid="c2",
                          uid="u-carol", ts="2026-11-28T10:00:00.000Z"),
    ])
    await processed(dep, "ann@example.com", 2)
    carol = await processed(dep, "carol@example.com", 2)
    assert carol["audiences"] == {"vip_customers": False}
    await asyncio.sleep(1.5)  # 5 x flush_interval: anything queued would have gone out
    assert simulator.state.calls[calls_before:] == []

    # Exit of a member: list delete with just that id, the field follows via upsert.
    await dep.produce([audience_identify("ann@example.com", "vip_customers", False, mid="a3",
                                         uid="u-ann", ts="2026-11-28T11:00:00.000Z")])
    await wait_for(lambda: members(simulator, VIP_LIST) == ["bob@example.com"])
    deletes = list_calls(simulator, "delete")
    assert len(deletes) == 1 and deletes[0].body["external_ids"] == ["ann@example.com"]
    assert deletes[0].path.endswith(f"contactlist/{VIP_LIST}/delete")
    await wait_for(lambda: contact(simulator, "ann@example.com")["5001"] == 2)
    assert len(list_calls(simulator)) == 2
    results = await dep.read_topic(dep.topic("emarsys-results"), expect=4)
    endpoints = [r["endpoint"] for r in results]
    assert "contactlist.add" in endpoints and "contactlist.delete" in endpoints
    assert all(r["ok"] for r in results)


async def test_track_form_entry_and_trait_computed_mapping(
    deployment_factory: Any, simulator: Any
) -> None:
    add_list(simulator, VIP_LIST, "VIP customers")
    dep = deployment_factory(
        simulator.url,
        audiences=[{"key": "vip_customers", "contact_list_id": VIP_LIST}],
        data_map=[{"from": ["traits.lifetime_value", "properties.lifetime_value"],
                   "field_id": 7001, "transform": "number"}],
    )
    await dep.start_worker()
    await dep.produce([
        audience_track("dave@example.com", "vip_customers", True, mid="d1", uid="u-dave"),
        # A computed trait as an event destination gets it: track "Trait Computed".
        {"type": "track", "event": "Trait Computed", "messageId": "d2", "userId": "u-dave",
         "timestamp": "2026-11-28T09:00:01.000Z",
         "properties": {"trait_key": "lifetime_value", "lifetime_value": 250.5},
         "context": {"traits": {"email": "dave@example.com"},
                     "personas": {"computation_class": "trait",
                                  "computation_key": "lifetime_value", **PERSONAS}}},
    ])
    await wait_for(lambda: members(simulator, VIP_LIST) == ["dave@example.com"])
    await wait_for(lambda: (contact(simulator, "dave@example.com") or {}).get("7001") == 250.5)
    adds = list_calls(simulator, "add")
    assert len(adds) == 1 and adds[0].body["external_ids"] == ["dave@example.com"]
    # Exit through the track form.
    await dep.produce([audience_track("dave@example.com", "vip_customers", False, mid="d3",
                                      uid="u-dave", ts="2026-11-28T12:00:00.000Z")])
    await wait_for(lambda: members(simulator, VIP_LIST) == [])
    assert [c.body["external_ids"] for c in list_calls(simulator, "delete")] == [
        ["dave@example.com"]]


async def test_list_by_name_is_created_once_and_found_by_name_after_restart(
    deployment_factory: Any, simulator: Any
) -> None:
    add_list(simulator, 900, "Big spenders")  # exists already: found, never created
    dep = deployment_factory(simulator.url, audiences=[
        {"key": "vip_customers", "contact_list_name": "VIP customers", "create_missing": True},
        {"key": "big_spenders", "contact_list_name": "Big spenders", "create_missing": True},
        {"key": "churn_risk", "contact_list_name": "Churn risk"},  # missing, not created
    ])
    w = await dep.start_worker()

    def creates() -> list[Any]:
        return [c for c in simulator.state.calls
                if c.method == "POST" and c.path.rstrip("/").endswith("contactlist")]

    def vip_id() -> int | None:
        return next((i for i, lst in simulator.state.lists.items()
                     if lst.name == "VIP customers"), None)

    await dep.produce([
        audience_identify("ann@example.com", key, True, mid=f"a-{key}", uid="u-ann")
        for key in ("vip_customers", "big_spenders", "churn_risk")
    ])
    await wait_for(lambda: vip_id() and members(simulator, vip_id() or 0))
    await wait_for(lambda: members(simulator, 900) == ["ann@example.com"])
    assert len(creates()) == 1 and creates()[0].body["name"] == "VIP customers"
    assert members(simulator, vip_id() or 0) == ["ann@example.com"]
    # An unknown list without create_missing is a permanent error: dead-lettered.
    dead = await dep.read_topic(dep.topic("emarsys-dlq"), expect=1)
    assert len(dead) == 1
    assert dead[0]["endpoint"] == "contactlist.add"
    assert dead[0]["primary_keys"] == ["ann@example.com"]
    assert dead[0]["request"]["list_name"] == "Churn risk"
    assert dead[0]["request"]["external_ids"] == ["ann@example.com"]
    assert "no contact list named 'Churn risk'" in dead[0]["errors"]["list"]
    # ... and forgotten (the output agent tells the users agent), so a later entry tries
    # again.
    for _ in range(100):
        rec = await user_record(dep, "ann@example.com")
        if rec is not None and "churn_risk" not in rec["audiences"]:
            break
        await asyncio.sleep(0.2)
    assert rec is not None
    assert rec["audiences"] == {"vip_customers": True, "big_spenders": True}

    # Second flush: the remembered id, no lookup, no create.
    lookups = len([c for c in simulator.state.calls if c.method == "GET"])
    await dep.produce([audience_identify("bob@example.com", "vip_customers", True, mid="b1",
                                         uid="u-bob")])
    await wait_for(lambda: "bob@example.com" in members(simulator, vip_id() or 0))
    assert len([c for c in simulator.state.calls if c.method == "GET"]) == lookups
    assert len(creates()) == 1

    # A restarted worker looks the list up by name and finds it: still one list.
    w.stop()
    await dep.start_worker()
    await dep.produce([audience_identify("cy@example.com", "vip_customers", True, mid="c1",
                                         uid="u-cy")])
    await wait_for(lambda: "cy@example.com" in members(simulator, vip_id() or 0))
    assert len(creates()) == 1
    assert [lst.name for lst in simulator.state.lists.values()].count("VIP customers") == 1


# -- the first sync of a new audience: a burst ------------------------------------------------

BURST = 50_000
#: Emarsys' (the simulator's) limit, calls per minute; ~56 calls need two windows.
SIM_RATE = 30
#: The worker's limit, one below: the client counts a call when it starts, the server
#: when the request has arrived, so with equal limits a call whose request reached the
#: server a little faster than the one 60 s before it lands inside that one's window
#: (observed: 59.9999 s apart -> one real 429).
WORKER_RATE = SIM_RATE - 1


async def test_first_sync_burst_of_50000_entries_takes_5_list_calls_within_rate_limit(
    deployment_factory: Any,
) -> None:
    sim = await start_simulator(options=SimulatorOptions(rate_limit_per_minute=SIM_RATE))
    try:
        add_list(sim, VIP_LIST, "VIP customers")
        dep = deployment_factory(sim.url, **{
            "audiences": [{"key": "vip_customers", "contact_list_id": VIP_LIST}],
            "emarsys.requests_per_minute": WORKER_RATE,
            # Partial batches may wait longer than a limiter pause (<= 60 s), so what goes
            # out is whole batches: 1000 contacts per upsert, 10,000 ids per list call.
            "emarsys.flush_interval": 90.0,
            # No restart in this test: full produce batches are fine on the embedded broker.
            "worker.producer_max_batch_size": 16384,
        })
        events = [audience_identify(f"m{i}@example.com", "vip_customers", True,
                                    mid=f"burst-{i}", uid=f"u{i}") for i in range(BURST)]
        await dep.produce(events)  # the whole first sync waits in Kafka
        started = time.monotonic()
        await dep.start_worker()
        await wait_for(lambda: len(members(sim, VIP_LIST)) >= BURST, timeout=240, interval=1)
        elapsed = time.monotonic() - started
        lists = list_calls(sim)
        upserts = upsert_calls(sim)
        answered_429 = [c for c in sim.state.calls if c.status == 429]
        print(f"\nburst: {BURST} entries -> {len(lists)} list calls "
              f"{[len(c.body['external_ids']) for c in lists]}, {len(upserts)} upsert calls, "
              f"{len(answered_429)} answered 429 (rate limited: "
              f"{sum(c.rate_limited for c in sim.state.calls)}), {elapsed:.1f} s "
              f"from worker start")
        assert len(lists) <= 6
        assert sum(len(c.body["external_ids"]) for c in lists) == BURST
        assert len(upserts) <= 60
        assert len(sim.state.contacts) == BURST
        assert not any(c.rate_limited for c in sim.state.calls)  # the limiter held
        assert answered_429 == []
        # ... and it had work to do: more calls than one window allows, spread over > 60 s.
        times = sorted(c.received_at for c in sim.state.calls)
        assert len(times) > SIM_RATE and times[-1] - times[0] >= 60
    finally:
        await sim.stop()
