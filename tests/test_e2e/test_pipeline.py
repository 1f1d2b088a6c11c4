"""The whole pipeline on a real broker and the Emarsys simulator (no mocks)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

from app.dead_letter import raw_bytes_from_envelope
from tests.fixtures import Deployment, wait_for


def identify(email: str, *, mid: str, uid: str | None = None, aid: str | None = None,
             ts: str = "2026-11-28T09:00:00.000Z", **traits: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {"type": "identify", "messageId": mid, "timestamp": ts,
                          "traits": {"email": email, **traits}}
    if uid:
        ev["userId"] = uid
    if aid:
        ev["anonymousId"] = aid
    return ev


def upsert_calls(sim: Any) -> list[Any]:
    return [c for c in sim.state.calls if c.method == "PUT" and "/contact" in c.path]


def contact(sim: Any, email: str) -> dict[str, Any] | None:
    c = sim.state.contact_by_key(email, "3")
    return None if c is None else dict(c.fields)


async def user_record(dep: Deployment, pk: str) -> dict[str, Any] | None:
    port = dep.workers[0].web_port
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/users/{pk}") as r:
        return None if r.status == 404 else await r.json()


async def test_identify_upserts_mapped_fields_with_normalised_email(
    deployment_factory: Any, simulator: Any
) -> None:
    dep = deployment_factory(simulator.url)
    await dep.start_worker()
    await dep.produce([identify(" Ann@Example.COM ", mid="m1", uid="u1", firstName="Ann",
                                lastName="Lee", optIn=True, birthday="1990-04-01T10:00:00Z")])
    fields = await wait_for(lambda: contact(simulator, "ann@example.com"))
    assert fields == {"3": "ann@example.com", "1": "Ann", "2": "Lee", "31": 1, "4": "1990-04-01"}
    calls = upsert_calls(simulator)
    assert len(calls) == 1
    assert calls[0].body["key_id"] == "3"
    assert calls[0].query.get("create_if_not_exists") == "1"


async def test_anonymous_events_are_held_until_identify_links_them(
    deployment_factory: Any, simulator: Any
) -> None:
    dep = deployment_factory(simulator.url)
    await dep.start_worker()
    await dep.produce([
        {"type": "track", "event": "Product Viewed", "anonymousId": "anon-1", "messageId": "t1",
         "timestamp": "2026-11-28T08:59:00.000Z", "properties": {"sku": "A"}},
        {"type": "page", "name": "Home", "anonymousId": "anon-1", "messageId": "p1",
         "timestamp": "2026-11-28T08:59:30.000Z"},
    ])
    await dep.produce([identify("ann@example.com", mid="i1", uid="user-1", aid="anon-1",
                                firstName="Ann")])

    async def record_complete() -> dict[str, Any] | None:
        rec = await user_record(dep, "ann@example.com")
        return rec if rec and rec["event_count"] == 3 else None

    rec = None
    for _ in range(200):
        rec = await record_complete()
        if rec:
            break
        await __import__("asyncio").sleep(0.2)
    assert rec is not None, "held events were not released into the users table"
    assert rec["anonymous_ids"] == ["anon-1"]
    assert rec["user_ids"] == ["user-1"]
    assert rec["counts_by_type"] == {"identify": 1, "page": 1, "track": 1}
    assert rec["first_seen_ms"] < rec["last_seen_ms"]  # event time of the held track kept
    assert (await wait_for(lambda: contact(simulator, "ann@example.com")))["1"] == "Ann"


async def test_alias_links_previous_id_to_the_contact(
    deployment_factory: Any, simulator: Any
) -> None:
    dep = deployment_factory(simulator.url)
    await dep.start_worker()
    await dep.produce([identify("bob@example.com", mid="i1", uid="user-2", firstName="Bob")])
    await wait_for(lambda: contact(simulator, "bob@example.com"))
    await dep.produce([
        {"type": "alias", "previousId": "anon-9", "userId": "user-2", "messageId": "a1"},
        {"type": "track", "event": "Signed Up", "anonymousId": "anon-9", "messageId": "t9",
         "timestamp": "2026-11-28T09:06:00.000Z"},
    ])
    rec: dict[str, Any] | None = None
    for _ in range(200):
        rec = await user_record(dep, "bob@example.com")
        if rec and rec["counts_by_type"].get("track") == 1:
            break
        await __import__("asyncio").sleep(0.2)
    assert rec is not None and rec["counts_by_type"].get("track") == 1
    assert "anon-9" in rec["anonymous_ids"]
    assert rec["user_ids"] == ["user-2"]
    assert rec["counts_by_type"]["alias"] == 1


async def test_invalid_input_is_dead_lettered_with_exact_original_bytes(
    deployment_factory: Any, simulator: Any
) -> None:
    dep = deployment_factory(simulator.url)
    await dep.start_worker()
    big = orjson.dumps({"type": "track", "event": "x", "anonymousId": "a",
                        "properties": {"blob": "x" * 40_000}})
    bad: dict[str, bytes] = {
        "not_utf8": b'{"type": "identify", "userId": "\xff\xfe"}',
        "invalid_json": b"this is not json",
        "not_an_object": b"[1, 2, 3]",
        "invalid_type": b'{"type": "purchase", "userId": "u"}',
        "missing_identity": b'{"type": "identify", "traits": {"email": "a@b.c"}}',
        "track_missing_event": b'{"type": "track", "userId": "u"}',
        "group_missing_group_id": b'{"type": "group", "userId": "u"}',
        "alias_missing_previous_id": b'{"type": "alias", "userId": "u"}',
        "too_large": big,
    }
    await dep.produce(list(bad.values()))
    dead = await dep.read_topic(dep.dlq_topic, expect=len(bad))
    assert len(dead) == len(bad)
    by_reason = {d["reason"]: d for d in dead}
    assert set(by_reason) == set(bad)
    for reason, raw in bad.items():
        env = by_reason[reason]
        assert raw_bytes_from_envelope(env) == raw, reason
        assert env["error"]
        assert env["source"]["topic"] == dep.ingest_topic
        assert isinstance(env["source"]["offset"], int)
    assert by_reason["not_utf8"]["raw_base64"] is True
    assert by_reason["invalid_json"]["raw_base64"] is False
    # The worker survived all of it and still processes good input.
    await dep.produce([identify("ok@example.com", mid="ok1", uid="u-ok")])
    await wait_for(lambda: contact(simulator, "ok@example.com"))


async def test_duplicate_message_id_has_one_effect(
    deployment_factory: Any, simulator: Any
) -> None:
    dep = deployment_factory(simulator.url)
    await dep.start_worker()
    # A redelivered event is byte-identical: same messageId, same content. (The ingest
    # topic is unkeyed, so which copy comes first is not defined; either has one effect.)
    dup = identify("dup@example.com", mid="same", uid="u", firstName="First")
    await dep.produce([dup, dup, dup])
    await wait_for(lambda: contact(simulator, "dup@example.com"))
    await dep.produce([identify("after@example.com", mid="x2", uid="u2")])
    await wait_for(lambda: contact(simulator, "after@example.com"))
    rec = await user_record(dep, "dup@example.com")
    assert rec is not None and rec["event_count"] == 1
    assert rec["counts_by_type"] == {"identify": 1}
    metrics = await worker_metrics(dep)
    assert metrics["emarsys_stream_duplicates_total"] == 2.0


async def worker_metrics(dep: Deployment) -> dict[str, float]:
    port = dep.workers[0].web_port
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def test_2500_contacts_take_3_upsert_calls_and_unchanged_identify_none(
    deployment_factory: Any, simulator: Any
) -> None:
    dep = deployment_factory(simulator.url, **{"emarsys.flush_interval": 5.0})
    await dep.start_worker()
    events = [identify(f"c{i}@example.com", mid=f"m{i}", uid=f"u{i}", firstName=f"N{i}")
              for i in range(2500)]
    await dep.produce(events)
    await wait_for(lambda: len(simulator.state.contacts) >= 2500, timeout=120)
    calls = upsert_calls(simulator)
    assert [len(c.body["contacts"]) for c in calls] == [1000, 1000, 500]
    # Same traits again, new messageIds: nothing changed, so no call at all.
    again = [identify(f"c{i}@example.com", mid=f"again{i}", uid=f"u{i}", firstName=f"N{i}")
             for i in range(100)]
    await dep.produce(again)
    await dep.produce([identify("marker@example.com", mid="marker", uid="um")])
    await wait_for(lambda: contact(simulator, "marker@example.com"), timeout=60)
    later = upsert_calls(simulator)[3:]
    sent = [c["3"] for call in later for c in call.body["contacts"]]
    assert sent == ["marker@example.com"]


async def test_held_event_of_an_id_never_linked_expires_to_the_dead_letter_topic(
    deployment_factory: Any, simulator: Any
) -> None:
    dep = deployment_factory(simulator.url, **{"identity.hold_expiry": "2s"})
    await dep.start_worker()
    lonely = {"type": "track", "event": "Viewed", "anonymousId": "never-linked",
              "messageId": "lonely-1", "timestamp": "2026-11-28T09:00:00.000Z"}
    await dep.produce([lonely])
    # No further event for this id: the periodic sweep must dead-letter it on its own.
    dead = await dep.read_topic(dep.dlq_topic, expect=1, timeout=60)
    assert len(dead) == 1
    env = dead[0]
    assert env["reason"] == "identity_unresolved_expired"
    assert env["held_id"] == "never-linked"
    assert orjson.loads(env["raw"])["messageId"] == "lonely-1"
    assert env["source"]["topic"] == dep.ingest_topic
    metrics = await worker_metrics(dep)
    assert metrics['emarsys_stream_unidentified_expired_total{why="expired"}'] == 1.0


async def test_dedupe_entries_expire_after_the_window(
    deployment_factory: Any, simulator: Any
) -> None:
    dep = deployment_factory(simulator.url, **{"dedupe.window": "2s"})
    await dep.start_worker()
    await dep.produce([identify("win@example.com", mid="w1", uid="uw", firstName="A")])
    await wait_for(lambda: contact(simulator, "win@example.com"))
    rec = await user_record(dep, "win@example.com")
    assert rec is not None and list(rec["seen"]) == ["w1"]  # remembered in the record
    # Within the window the same messageId is a duplicate ...
    await dep.produce([identify("win@example.com", mid="w1", uid="uw", firstName="X")])
    await dep.produce([identify("win@example.com", mid="w2", uid="uw", firstName="A")])
    for _ in range(100):
        rec = await user_record(dep, "win@example.com")
        dups = (await worker_metrics(dep)).get("emarsys_stream_duplicates_total")
        if rec is not None and "w2" in rec["seen"] and dups == 1:
            break
        await asyncio.sleep(0.2)
    assert rec is not None and rec["event_count"] == 2 and dups == 1
    await asyncio.sleep(2.5)
    # ... past it, the same messageId is a new event, and the record forgets what expired.
    await dep.produce([identify("win@example.com", mid="w1", uid="uw", firstName="B")])
    await wait_for(lambda: (contact(simulator, "win@example.com") or {}).get("1") == "B")
    rec = await user_record(dep, "win@example.com")
    assert rec is not None and rec["event_count"] == 3
    assert list(rec["seen"]) == ["w1"]
    assert (await worker_metrics(dep)).get("emarsys_stream_dedupe_expired_total") == 2


async def test_internal_hops_carry_envelopes_and_read_older_records_and_garbage(
    deployment_factory: Any, simulator: Any
) -> None:
    from aiokafka import AIOKafkaProducer

    from app.envelope import partition_for_key, unpack

    # The identity hop itself is what this test reads: no resolving at ingest.
    dep = deployment_factory(simulator.url, **{"identity.resolve_at_ingest": False})
    await dep.start_worker()
    await dep.produce([
        identify("env@example.com", mid="e1", uid="u-env", firstName="Env"),
        {"type": "track", "event": "Viewed", "userId": "u-env", "messageId": "e2",
         "timestamp": "2026-11-28T09:00:01.000Z"},
    ])
    await wait_for(lambda: contact(simulator, "env@example.com"))
    # The documented shape: {"records": [{"key", "value"}]}, no Kafka key, in the
    # partition Kafka's default partitioner gives the record's key.
    topic = dep.topic("contact-events")
    raw = await dep.read_topic(topic, expect=2, decode=False)
    records = [r for value in raw for r in unpack(None, value)[0]]
    assert {v["event"]["messageId"] for _k, v in records} == {"e1", "e2"}
    assert all(k == "env@example.com" and v["kind"] == "event" for k, v in records)
    assert all(set(orjson.loads(value)) == {"records"} for value in raw)
    # The track carries only a userId: it took the identity hop, as an envelope record
    # keyed by that userId next to the link the identify wrote.
    ident = await dep.read_topic(dep.topic("identity"), expect=2, decode=False)
    kinds = sorted(
        (k, v["kind"]) for value in ident for k, v in unpack(None, value)[0]
    )
    assert kinds == [("u-env", "event"), ("u-env", "link")]
    # A plain keyed record (the shape before envelopes, e.g. written by an older worker)
    # is still applied; garbage goes to the dead-letter topic and the worker carries on.
    legacy = {"kind": "event", "primary_key": "old@example.com", "ts": 1764320400000,
              "path": "direct", "source": {},
              "event": {"type": "identify", "messageId": "legacy1",
                        "timestamp": "2026-11-28T09:00:00.000Z", "userId": "u-old",
                        "traits": {"email": "old@example.com", "firstName": "Old"}}}
    producer = AIOKafkaProducer(bootstrap_servers=dep.bootstrap)
    await producer.start()
    try:
        p = partition_for_key(b"old@example.com", 2)
        await producer.send_and_wait(topic, orjson.dumps(legacy), key=b"old@example.com",
                                     partition=p)
        await producer.send_and_wait(topic, b"not json at all", partition=0)
    finally:
        await producer.stop()
    assert (await wait_for(lambda: contact(simulator, "old@example.com")))["1"] == "Old"
    dead = await dep.read_topic(dep.dlq_topic, expect=1)
    assert [d["reason"] for d in dead] == ["malformed_internal_message"]
    assert raw_bytes_from_envelope(dead[0]) == b"not json at all"
    assert dead[0]["source"]["topic"] == topic


async def test_known_ids_skip_the_identity_hop_and_a_new_link_applies_at_once(
    deployment_factory: Any, simulator: Any
) -> None:
    from aiokafka import AIOKafkaProducer

    from app.envelope import unpack

    dep = deployment_factory(simulator.url)
    await dep.start_worker()

    def track(mid: str, second: int, **ids: str) -> dict[str, Any]:
        return {"type": "track", "event": "Viewed", "messageId": mid,
                "timestamp": f"2026-11-28T09:00:{second:02d}.000Z", **ids}

    async def event_count(pk: str, n: int) -> None:
        for _ in range(300):
            rec = await user_record(dep, pk)
            if rec and rec["event_count"] == n:
                return
            await asyncio.sleep(0.2)
        others = {k: await user_record(dep, k) for k in ("ann@example.com", "bob@example.com")}
        raise AssertionError(f"{pk}: event_count never reached {n}: {others}\n"
                             f"{dep.log_digest()}")

    await dep.produce([identify("ann@example.com", mid="i1", uid="u1", aid="a1")])
    await dep.produce([track("t1", 1, userId="u1")])
    await event_count("ann@example.com", 2)  # the link is applied by now
    await dep.produce([track("t2", 2, userId="u1"), track("t3", 3, anonymousId="a1")])
    await event_count("ann@example.com", 4)
    # The email changes, and the user's next event follows in the same ingest partition
    # (only there is "next" defined). The new link is still on its way to the identity
    # agent, so that event must not be resolved from the table at ingest (that would
    # give the old contact): it follows the link.
    producer = AIOKafkaProducer(bootstrap_servers=dep.bootstrap, linger_ms=2)
    await producer.start()
    try:
        sent = [await producer.send(dep.ingest_topic, orjson.dumps(e), partition=0)
                for e in (identify("bob@example.com", mid="i2", uid="u1"),
                          track("t4", 4, userId="u1"))]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    await event_count("bob@example.com", 2)
    await asyncio.sleep(1.0)
    assert (await user_record(dep, "ann@example.com"))["event_count"] == 4  # type: ignore[index]

    # Everything is on the topics by now (the users agent counted it): read for 3 s.
    everything = 10**9
    raw = await dep.read_topic(dep.topic("contact-events"), expect=everything, timeout=3.0,
                               decode=False)
    paths = {
        v["event"]["messageId"]: (k, v["path"])
        for value in raw for k, v in unpack(None, value)[0] if v.get("kind") == "event"
    }
    assert paths["t2"] == ("ann@example.com", "lookup:user")
    assert paths["t3"] == ("ann@example.com", "lookup:anonymous")
    assert paths["t4"] == ("bob@example.com", "identity:user")
    # Neither t2 nor t3 went through the identity topic.
    ident = await dep.read_topic(dep.topic("identity"), expect=everything, timeout=3.0,
                                 decode=False)
    hop = {v["event"]["messageId"] for value in ident for _k, v in unpack(None, value)[0]
           if v.get("kind") == "event"}
    assert "t2" not in hop and "t3" not in hop and "t4" in hop
    port = dep.workers[0].web_port
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        metrics = await r.text()
    assert 'emarsys_stream_resolved_at_ingest_total{id_type="user"} 1.0' in metrics
    assert 'emarsys_stream_resolved_at_ingest_total{id_type="anonymous"} 1.0' in metrics
