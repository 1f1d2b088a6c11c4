"""Fault proofs with figures: a flaky Emarsys, Emarsys down, and 10,000 malformed inputs.

Run with ``pytest -s tests/test_e2e/test_fault_proof.py`` to see the figures. The tests
use the shared embedded broker with ``worker.producer_max_batch_size=1`` (see
``tests/fixtures.py``), which caps the pipeline at roughly 1,000 events/s; the input
sizes below are chosen for that.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import time
from collections import Counter
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from app.broker import free_port
from app.dead_letter import raw_bytes_from_envelope
from app.simulator import SimulatorOptions, start_simulator
from tests.fixtures import Deployment, WorkerProcess, wait_for
from tests.test_e2e.test_pipeline import contact, identify, upsert_calls

_CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- helpers


async def worker_metrics(w: WorkerProcess) -> str:
    async with aiohttp.ClientSession() as s, s.get(
        f"http://127.0.0.1:{w.web_port}/metrics"
    ) as r:
        assert r.status == 200
        return await r.text()


def metric_by_label(text: str, name: str, label: str) -> dict[str, float]:
    """``{label value: sample}`` of the counter ``name`` (``_total`` samples only)."""
    out: dict[str, float] = {}
    pattern = re.compile(rf'^{re.escape(name)}\{{(.*?)\}} (\S+)$', re.M)
    for labels, value in pattern.findall(text):
        m = re.search(rf'{label}="([^"]*)"', labels)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(value)
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime/stime are fields 14/15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def health(w: WorkerProcess) -> int:
    async with aiohttp.ClientSession() as s, s.get(
        f"http://127.0.0.1:{w.web_port}/health"
    ) as r:
        return r.status


def max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    best = j = 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


# --------------------------------------------------------- 1. a flaky Emarsys, whole run

FLAKY_CONTACTS = 1_000
FLAKY_RPM = 30


async def test_flaky_emarsys_whole_run_loses_nothing_and_keeps_the_rate_limit(
    deployment_factory: Any,
) -> None:
    # The simulator's real limiter is on (FLAKY_RPM per 58 s: stricter than the client's
    # 61 s window even when a 2 s stall delays when a call is counted), so a client that
    # exceeded its requests_per_minute would get a non-injected 429.
    sim = await start_simulator(options=SimulatorOptions(
        rate_limit_per_minute=FLAKY_RPM, rate_limit_window=58.0,
        error_rate=0.2, stall_rate=0.1, stall_seconds=2.0, seed=11,
    ))
    try:
        dep = deployment_factory(sim.url, **{
            "emarsys.batch_size": 25, "emarsys.flush_interval": 0.3,
            "emarsys.requests_per_minute": FLAKY_RPM, "emarsys.max_retry_backoff": 2.0,
        })
        w = await dep.start_worker()
        started = time.monotonic()
        await dep.produce([
            identify(f"f{i}@example.com", mid=f"f{i}", uid=f"uf{i}", firstName=f"F{i}",
                     lastName=f"L{i}")
            for i in range(FLAKY_CONTACTS)
        ])
        # 429 bursts during the run. An injected 429 carries the real X-RateLimit-Reset
        # (oldest call in the window + window), which the worker honours: a burst on an
        # empty window costs a whole window per call, so the bursts come once calls flow.
        await wait_for(lambda: len(upsert_calls(sim)) >= 10, timeout=120)
        sim.state.set_faults(burst_429=2)
        await wait_for(lambda: len(upsert_calls(sim)) >= 35, timeout=150)
        sim.state.set_faults(burst_429=1)

        def all_there() -> bool:
            return all(contact(sim, f"f{i}@example.com") is not None
                       for i in range(FLAKY_CONTACTS))

        await wait_for(all_there, timeout=240, interval=0.5)
        duration = time.monotonic() - started
        for i in range(FLAKY_CONTACTS):
            assert contact(sim, f"f{i}@example.com") == {
                "3": f"f{i}@example.com", "1": f"F{i}", "2": f"L{i}"}
        assert len(sim.state.contacts) == FLAKY_CONTACTS

        calls = [c for c in sim.state.calls if "/api/" in c.path]
        faults = Counter(c.fault for c in calls if c.fault)
        statuses = Counter(c.status for c in calls)
        real_429 = [c for c in calls if c.rate_limited]
        await asyncio.sleep(1.0)  # let the last result settle
        retries = metric_by_label(await worker_metrics(w),
                                  "emarsys_stream_emarsys_retries_total", "reason")
        busiest = max_in_window([c.received_at for c in calls], 60.0)
        print(f"\n[flaky] {FLAKY_CONTACTS} contacts in {duration:.1f}s; {len(calls)} API calls "
              f"({len(upsert_calls(sim))} upserts); statuses {dict(statuses)}; "
              f"injected faults by kind {dict(faults)}; worker retries by reason "
              f"{retries}; real (non-injected) 429s {len(real_429)}; busiest 60 s window "
              f"{busiest} calls (limit {FLAKY_RPM}/min)")
        assert real_429 == [], "client-side limiter let the real rate limit trip"
        assert busiest <= FLAKY_RPM
        assert faults["error"] > 0 and faults["stall"] > 0 and faults["burst_429"] == 3
        assert retries.get("429", 0) >= 3 and retries.get("5xx", 0) >= faults["error"]
        dlq = await dep.read_topic(dep.topic("emarsys-dlq"), expect=1, timeout=3)
        assert dlq == []
    finally:
        await sim.stop()


# ------------------------------------------------------------------- 2. Emarsys down

OUTAGE_SECONDS = float(os.environ.get("FAULT_PROOF_OUTAGE_SECONDS", "120"))
BEFORE, DURING = 100, 500


async def test_emarsys_down_backlog_waits_in_kafka_without_busy_looping(
    deployment_factory: Any,
) -> None:
    port = free_port()
    sim = await start_simulator(port=port, options=SimulatorOptions(rate_limit_per_minute=0))
    sim2 = None
    try:
        dep = deployment_factory(sim.url, **{"emarsys.batch_size": 100,
                                             "emarsys.flush_interval": 0.3,
                                             "emarsys.max_retry_backoff": 10.0})
        w = await dep.start_worker()
        assert w.proc is not None
        await dep.produce([identify(f"b{i}@example.com", mid=f"b{i}", uid=f"ub{i}",
                                    firstName=f"B{i}") for i in range(BEFORE)])
        await wait_for(lambda: len(sim.state.contacts) >= BEFORE, timeout=60)
        await asyncio.sleep(1.0)  # let the last result/commit settle
        before = metric_by_label(await worker_metrics(w),
                                 "emarsys_stream_emarsys_retries_total", "reason")

        await sim.stop()  # Emarsys is down: connection refused on its port
        # Hold the port (bound, not listening: connections are still refused) so that no
        # other process picks it up as a "free" port while Emarsys is away.
        hold = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hold.bind(("127.0.0.1", port))
        down_at = time.monotonic()
        cpu0 = cpu_seconds(w.proc.pid)
        await dep.produce([identify(f"d{i}@example.com", mid=f"d{i}", uid=f"ud{i}",
                                    firstName=f"D{i}") for i in range(DURING)])
        await asyncio.sleep(OUTAGE_SECONDS - (time.monotonic() - down_at))
        cpu1 = cpu_seconds(w.proc.pid)
        outage = time.monotonic() - down_at
        # Retries are counted as they happen: the metric moves while Emarsys is still down.
        during = metric_by_label(await worker_metrics(w),
                                 "emarsys_stream_emarsys_retries_total", "reason")
        assert await health(w) == 200
        assert w.proc.poll() is None

        hold.close()
        sim2 = await start_simulator(port=port,
                                     options=SimulatorOptions(rate_limit_per_minute=0))
        back_at = time.monotonic()

        def drained() -> bool:
            return all(contact(sim2, f"d{i}@example.com") == {"3": f"d{i}@example.com",
                                                              "1": f"D{i}"}
                       for i in range(DURING))

        await wait_for(drained, timeout=150, interval=0.5)
        drain = time.monotonic() - back_at
        await asyncio.sleep(1.0)
        after = metric_by_label(await worker_metrics(w),
                                "emarsys_stream_emarsys_retries_total", "reason")
        conn = during.get("connection", 0) - before.get("connection", 0)
        cpu_share = (cpu1 - cpu0) / outage
        print(f"\n[down] outage {outage:.1f}s, {DURING} events produced during it; "
              f"connection retries {conn:.0f} ({conn / outage:.2f}/s); worker CPU during "
              f"outage {cpu1 - cpu0:.2f}s ({cpu_share:.1%} of one core, includes ingesting "
              f"the {DURING} events); drained {DURING} contacts {drain:.1f}s after Emarsys "
              f"came back; retries by reason {after}")
        assert len(sim2.state.contacts) == DURING  # only the backlog, each once
        assert conn >= 1, "no connection retry counted during the outage"
        assert conn / outage < 2.0, "retry loop is too hot"
        assert cpu_share < 0.20, "worker busy-loops while Emarsys is down"
        dlq = await dep.read_topic(dep.topic("emarsys-dlq"), expect=1, timeout=3)
        assert dlq == []
    finally:
        if sim2 is not None:
            await sim2.stop()


# ------------------------------------------------------------- 3. 10,000 malformed inputs

MALFORMED = 10_000


def _ident(**extra: Any) -> dict[str, Any]:
    return {"type": "identify", "messageId": "m", "userId": "u",
            "traits": {"email": "x@example.com"}, **extra}


def malformed_inputs(rng: random.Random) -> list[tuple[str, str, bytes]]:
    """(input class, expected reason, bytes) for MALFORMED inputs."""
    valid = orjson.dumps(_ident(timestamp="2026-11-28T09:00:00.000Z",
                                traits={"email": "ascii@example.com", "firstName": "A"}))

    def j(v: Any) -> bytes:
        return orjson.dumps(v)

    gens: list[tuple[str, str, Any]] = [
        ("random_bytes", "not_utf8",
         lambda: b"\xff" + rng.randbytes(rng.randint(0, 2000))),
        ("truncated_json", "invalid_json", lambda: valid[: rng.randint(0, len(valid) - 1)]),
        ("not_an_object", "not_an_object",
         lambda: rng.choice([b"[1,2]", b'"identify"', b"42", b"null", b"true", b"[]"])),
        ("wrong_type_type", "invalid_type",
         lambda: j(_ident(type=rng.choice([1, None, [], {}, True, "IDENTIFY", "Identify"])))),
        ("wrong_type_ids", "missing_identity",
         lambda: j({"type": "identify", "userId": rng.choice([[], {}, True, 1.5, None, ""]),
                    "anonymousId": rng.choice([[], {}, False, 2.5, None, "   "])})),
        ("wrong_type_event", "track_missing_event",
         lambda: j({"type": "track", "userId": "u",
                    "event": rng.choice([5, None, [], {}, "", "  ", True])})),
        ("wrong_type_group", "group_missing_group_id",
         lambda: j({"type": "group", "userId": "u",
                    "groupId": rng.choice([None, [], {}, "", True, 1.5])})),
        ("wrong_type_alias", "alias_missing_previous_id",
         lambda: j({"type": "alias", "userId": "u",
                    "previousId": rng.choice([None, [], {}, "", False])})),
        ("wrong_type_message_id", "invalid_message_id",
         lambda: j(_ident(messageId=rng.choice([{"x": 1}, [1], 1.5, "m" * 101])))),
        ("wrong_type_timestamp", "invalid_timestamp",
         lambda: j(_ident(**{rng.choice(["timestamp", "originalTimestamp", "sentAt",
                                         "receivedAt"]): rng.choice([12345, [], {}, True])}))),
        ("bad_timestamp", "invalid_timestamp",
         lambda: j(_ident(timestamp=rng.choice(["yesterday", "2026-02-30T00:00:00Z",
                                                "2026-13-01", "+275760-09-13",
                                                "28/11/2026", "2026-11-28T25:00:00Z"])))),
        ("missing_ids", "missing_identity",
         lambda: j(rng.choice([{"type": "identify", "traits": {"email": "n@example.com"}},
                               {"type": "track", "event": "E"},
                               {"type": "page", "userId": None, "anonymousId": ""}]))),
        ("too_large_40k", "too_large",
         lambda: j(_ident(traits={"email": "big@example.com", "blob": "x" * 40_000}))),
        ("deep_nesting", "invalid_json",
         lambda: rng.choice([b"[" * 10_000 + b"]" * 10_000,
                             b'{"a":' * 2000 + b"1" + b"}" * 2000])),
        ("unicode_lone_surrogate", "invalid_json",
         lambda: rb'{"type":"identify","userId":"\ud800","traits":{"firstName":"\udfff"}}'),
        ("unicode_raw_nul", "invalid_json",
         lambda: b'{"type":"identify","userId":"a\x00b"}'),
        ("unicode_bom", "invalid_json", lambda: b"\xef\xbb\xbf" + valid),
        ("unicode_rtl_emoji_type", "invalid_type",
         lambda: j(_ident(type=rng.choice(["identify\u200f", "\u202eyfitnedi", "identify\U0001F600",
                                           "\uff49dentify", "identify\u0000"])))),
        ("unicode_encoded_surrogate", "not_utf8",
         lambda: b'{"type":"identify","userId":"\xed\xa0\x80"}'),
        ("unicode_overlong", "not_utf8", lambda: b'{"type":"identify","userId":"\xc0\xaf"}'),
    ]
    out: list[tuple[str, str, bytes]] = []
    # Three 1 MB inputs (each is 1 MB on the broker and in the dead-letter topic).
    for _ in range(3):
        blob = "\U0001F600" * 262_144  # 1 MiB of 4-byte characters
        out.append(("too_large_1mb", "too_large",
                    j(_ident(traits={"email": "huge@example.com", "blob": blob}))))
    while len(out) < MALFORMED:
        cls, reason, gen = gens[len(out) % len(gens)]
        out.append((cls, reason, gen()))
    rng.shuffle(out)
    return out


async def produce_raw(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5,
                                max_request_size=4 * 1024 * 1024)
    await producer.start()
    try:
        futs = [await producer.send(topic, v) for v in values]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


async def read_all(dep: Deployment, topic: str, expect: int, timeout: float) -> list[Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=dep.bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", group_id=None,
                                max_partition_fetch_bytes=8 * 1024 * 1024,
                                fetch_max_bytes=16 * 1024 * 1024)
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        parts = None
        while parts is None and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic)
            if parts is None:
                await consumer._client.force_metadata_update()
                await asyncio.sleep(0.2)
        assert parts, f"topic {topic} not found"
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while time.monotonic() < deadline and len(out) < expect:
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                out.extend(orjson.loads(r.value) for r in records)
        return out
    finally:
        await consumer.stop()


async def test_ten_thousand_malformed_inputs_are_dead_lettered_exactly(
    deployment_factory: Any, simulator: Any
) -> None:
    dep = deployment_factory(simulator.url)
    w = await dep.start_worker()
    assert w.proc is not None
    inputs = malformed_inputs(random.Random(2026))
    expected = Counter(reason for _, reason, _ in inputs)
    by_raw: dict[bytes, Counter[str]] = {}
    for _, reason, raw in inputs:
        by_raw.setdefault(raw, Counter())[reason] += 1
    # Warm the worker up with one valid event so the RSS baseline is not start-up noise.
    await dep.produce([identify("warm@example.com", mid="warm", uid="uwarm", firstName="W")])
    await wait_for(lambda: contact(simulator, "warm@example.com"), timeout=60)
    rss0 = rss_mb(w.proc.pid)

    started = time.monotonic()
    await produce_raw(dep.bootstrap, dep.ingest_topic, [raw for _, _, raw in inputs])
    produced = time.monotonic() - started
    dead = await read_all(dep, dep.dlq_topic, MALFORMED, timeout=240)
    dead_lettered = time.monotonic() - started
    rss1 = rss_mb(w.proc.pid)
    got = Counter(d["reason"] for d in dead)
    print(f"\n[malformed] {MALFORMED} inputs ({sum(len(r) for _, _, r in inputs) / 1e6:.1f} MB)"
          f" produced in {produced:.1f}s, all dead-lettered after {dead_lettered:.1f}s "
          f"({MALFORMED / dead_lettered:.0f}/s); worker RSS {rss0:.0f} -> {rss1:.0f} MB; "
          f"by reason {dict(sorted(got.items()))}")
    assert len(dead) == MALFORMED
    assert got == expected
    # Raw bytes preserved exactly, and each one carries the reason expected for it.
    seen: dict[bytes, Counter[str]] = {}
    for d in dead:
        seen.setdefault(raw_bytes_from_envelope(d), Counter())[d["reason"]] += 1
    assert seen == by_raw
    assert w.proc.poll() is None and await health(w) == 200
    assert rss1 - rss0 < 200, f"worker RSS grew {rss1 - rss0:.0f} MB"
    invalid = metric_by_label(await worker_metrics(w),
                              "emarsys_stream_events_invalid_total", "reason")
    assert Counter({k: int(v) for k, v in invalid.items()}) == expected
    # The stream is still alive: a valid event after all that is processed.
    await dep.produce([identify("after@example.com", mid="after", uid="uafter",
                                firstName="After")])
    await wait_for(lambda: contact(simulator, "after@example.com"), timeout=60)
    assert contact(simulator, "after@example.com") == {"3": "after@example.com",
                                                       "1": "After"}
