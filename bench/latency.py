"""``python -m bench latency``: end-to-end latency at a fixed input rate (issue 5, target 4).

Target: at half the sustained rate, the p99 from an event's append to the ingest topic
until the Emarsys simulator receives the call carrying its effect is <= 2 s with
``emarsys.flush_interval: 1.0``. One run (see bench/README.md):

1. start the embedded broker, the Emarsys simulator (own process, no rate limit) and one
   worker (``bench.pipeline.worker_config``: flush_interval 1.0, batch_size 1000, every
   other setting at its default), as ``python -m bench pipeline`` does; wait for ready;
2. produce Segment events to the ingest topic **open loop**: event ``n`` is due at
   ``start + n / rate`` and is sent then, whatever the acknowledgements do (aiokafka
   ``send()`` only enqueues; acks are recorded by callbacks). Each record's timestamp is
   the wall time (``time.time()``) of its send, and so is the event's ``timestamp``;
3. the mix is the pipeline benchmark's (60% track, 25% page, 15% identify) from
   ``--contacts`` people. Tracks and pages carry only a ``userId`` and change nothing in
   Emarsys, so they cost no call: they are load. **Every identify costs a call**: its
   ``lastName`` carries the event's sequence number (``Weber-12345``), a changed value
   each time, and a person's identifies are at least ``--cooldown`` seconds apart, so no
   two of them meet in one flush (where the later would supersede the earlier);
4. the latency of an identify is the simulator's ``received_at`` (``time.time()`` when
   the request reached its handler) of the first ``PUT contact`` call whose body holds
   that contact with that ``lastName``, minus the record's timestamp. All processes run on
   this machine and use the same clock. The first ``--warmup`` seconds of events are sent
   but not counted;
5. print count, p50, p90, p99, max and the achieved produce rate (and warn if the
   producer fell behind its schedule); write ``bench/results/<timestamp>-latency.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from app.broker import EmbeddedBroker
from app.envelope import unpack
from bench.generate import _CATEGORIES, _DOMAINS, _FIRST, _LAST, _PAGES, _TRACKS, Person, _context
from bench.harness import (
    CpuWatch,
    cpu_line,
    percentile,
    read_records,
    spawn_simulator,
    spawn_worker,
    summarize,
)
from bench.pipeline import (
    INGEST_TOPIC,
    RESULTS_DIR,
    BenchError,
    PipelineOptions,
    _cancel_on_signals,
    _code_version,
    _cpu_seconds,
    _create_topic,
    _log,
    _machine_facts,
    _proc_status,
    _Processes,
    _sigterm_as_interrupt,
    _wait_ready,
    write_result,
)

__all__ = [
    "LatencyEvents",
    "LatencyOptions",
    "hop_times",
    "match_calls",
    "message_number",
    "run_latency",
    "sustained_from_results",
]

APP_ID = "emarsys-bench-latency"
TOPIC_PREFIX = "bench-latency"
#: Emarsys field ids of the worker config (bench.pipeline.worker_config).
KEY_FIELD, LAST_NAME_FIELD = "3", "2"
TARGET_P99_S = 2.0
QUICK_DURATION, QUICK_WARMUP = 20.0, 3.0


@dataclass
class LatencyOptions:
    rate: float = 1000.0
    """Events per second sent to the ingest topic."""
    duration: float = 60.0
    """Seconds of counted events."""
    warmup: float = 5.0
    """Seconds of events before them, sent but not counted."""
    contacts: int = 5000
    cooldown: float = 10.0
    """Minimum scheduled time between two identifies of one person."""
    identify_share: float = 0.15
    page_share: float = 0.25
    partitions: int = 4
    store: str = "rocksdb://"
    seed: int = 1
    flush_interval: float = 1.0
    batch_size: int = 1000
    overrides: dict[str, Any] = field(default_factory=dict)
    drain_timeout: float = 30.0
    """After the last send, wait at most this long for the last calls."""
    fetch_max_wait_ms: int | None = None
    """Diagnostic: the worker's consumers wait at most this long per fetch instead of
    Faust's fixed 1500 ms (:mod:`bench.fetch_wait_worker`)."""
    sustained: float | None = None
    """The sustained rate ``rate`` was derived from (for the report)."""
    sustained_source: str | None = None
    keep: bool = False
    quick: bool = False
    results_dir: Path = RESULTS_DIR


# ------------------------------------------------------------------------------ input


def sustained_from_results(directory: Path) -> tuple[float, Path] | None:
    """The sustained rate of the last ``python -m bench pipeline`` result in ``directory``.

    Eligible: plain pipeline runs (no rules, one worker, RocksDB, no contact missing) with
    ``pipeline.events_per_s``. The newest full-size run wins; without one, the newest
    ``--quick`` run. None when there is none."""
    best: tuple[bool, str, str] | None = None
    found: tuple[float, Path] | None = None
    if not directory.is_dir():
        return None
    for path in directory.glob("*.json"):
        try:
            data = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if not isinstance(data, dict) or data.get("mode", "pipeline") != "pipeline":
            continue
        opts = data.get("options") or {}
        if opts.get("rules") or opts.get("compare_rules") or opts.get("workers", 1) != 1:
            continue
        if opts.get("store", "rocksdb://") != "rocksdb://":
            continue
        if (data.get("emarsys") or {}).get("missing_contacts"):
            continue
        rate = (data.get("pipeline") or {}).get("events_per_s")
        if not isinstance(rate, int | float) or rate <= 0:
            continue
        rank = (not opts.get("quick"), str(data.get("started_at") or ""), path.name)
        if best is None or rank > best:
            best, found = rank, (float(rate), path)
    return found


@dataclass
class Identify:
    """One identify sent: what its call must carry."""

    n: int
    pk: str
    last_name: str
    new_contact: bool


class LatencyEvents:
    """The event source: event ``n`` on demand, stamped with the wall time of its send.

    Everything but the timestamps is deterministic for a seed. Tracks and pages go to
    people identified before (``userId`` only: an identity lookup, no Emarsys call); every
    identify changes the person's ``lastName`` (so it costs an upsert) and a person's
    identifies are at least ``cooldown`` seconds of schedule apart (``n / rate``).
    """

    def __init__(
        self,
        contacts: int,
        rate: float,
        *,
        seed: int = 1,
        identify_share: float = 0.15,
        page_share: float = 0.25,
        cooldown: float = 10.0,
    ) -> None:
        if contacts < 1 or rate <= 0:
            raise ValueError("contacts must be >= 1 and rate > 0")
        if not (0 < identify_share and 0 <= page_share and identify_share + page_share <= 1):
            raise ValueError("identify_share must be > 0 and the shares sum to <= 1")
        self.rate = rate
        self.seed = seed
        self.identify_share = identify_share
        self.page_share = page_share
        self.cooldown = cooldown
        self.rng = random.Random(seed)
        rng = self.rng
        self.people: list[Person] = []
        for i in range(contacts):
            first = _FIRST[rng.randrange(len(_FIRST))]
            last = _LAST[rng.randrange(len(_LAST))]
            domain = _DOMAINS[rng.randrange(len(_DOMAINS))]
            self.people.append(
                Person(
                    index=i,
                    user_id=f"usr_{i:07d}{rng.getrandbits(24):06x}",
                    anonymous_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                    email=f"{first.lower()}.{last.lower()}.{i}@{domain}",
                    first_name=first,
                    last_name=last,
                    identified=False,
                    anonymous_first=False,
                )
            )
        self.identified: list[int] = []
        self.last_identify: dict[int, float] = {}
        self.opt_in: dict[int, bool] = {}
        self.identifies: dict[int, Identify] = {}
        self.counts: dict[str, int] = {"track": 0, "page": 0, "identify": 0}
        self.total_bytes = 0
        self.cooldown_misses = 0

    def _pick_for_identify(self, due: float) -> int:
        rng = self.rng
        n_people = len(self.people)
        for _ in range(50):
            i = rng.randrange(n_people)
            last = self.last_identify.get(i)
            if last is None or due - last >= self.cooldown:
                return i
        self.cooldown_misses += 1
        return i

    def event(self, n: int, now: float) -> tuple[str, bytes]:
        """Event ``n`` (type, serialised JSON) with ``timestamp`` = ``now`` (epoch s)."""
        rng = self.rng
        due = n / self.rate
        r = rng.random()
        if r < self.identify_share or not self.identified:
            kind = "identify"
        elif r < self.identify_share + self.page_share:
            kind = "page"
        else:
            kind = "track"
        stamp = (
            datetime.fromtimestamp(now, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )
        event: dict[str, Any] = {
            "type": kind,
            "messageId": f"lat-{self.seed}-{n:09d}-{rng.getrandbits(32):08x}",
            "timestamp": stamp,
        }
        if kind == "identify":
            i = self._pick_for_identify(due)
            p = self.people[i]
            new = i not in self.opt_in
            if new:
                self.identified.append(i)
                opted = rng.random() < 0.7
            else:
                opted = (not self.opt_in[i]) if rng.random() < 0.2 else self.opt_in[i]
            self.opt_in[i] = opted
            self.last_identify[i] = due
            last_name = f"{p.last_name}-{n}"
            event["userId"] = p.user_id
            event["traits"] = {
                "email": p.email,
                "firstName": p.first_name,
                "lastName": last_name,
                "optIn": opted,
                "plan": ("basic", "plus", "pro")[rng.randrange(3)],
            }
            event["context"] = _context(rng, p)
            self.identifies[n] = Identify(n, p.email.lower(), last_name, new)
        else:
            p = self.people[self.identified[rng.randrange(len(self.identified))]]
            event["userId"] = p.user_id
            if kind == "track":
                name, _area = _TRACKS[rng.randrange(len(_TRACKS))]
                event["event"] = name
                event["properties"] = {
                    "sku": f"SKU-{rng.randrange(100000):05d}",
                    "category": _CATEGORIES[rng.randrange(len(_CATEGORIES))],
                    "price": round(rng.uniform(5, 400), 2),
                    "currency": "EUR",
                }
            else:
                title, path = _PAGES[rng.randrange(len(_PAGES))]
                event["name"] = title
                event["properties"] = {"path": path, "url": f"https://shop.example.com{path}"}
            event["context"] = _context(rng, p)
        raw = orjson.dumps(event)
        self.counts[kind] += 1
        self.total_bytes += len(raw)
        return kind, raw


def match_calls(
    calls: list[dict[str, Any]], identifies: dict[int, Identify]
) -> dict[int, tuple[float, int]]:
    """Identify number -> (``received_at``, seq) of the first successful ``PUT contact``
    call carrying that contact (key field 3) with that identify's ``lastName`` (field 2).

    Calls are ``/_sim/calls`` entries; other endpoints, failed calls and contacts whose
    lastName is not one of ``identifies`` are ignored."""
    found: dict[int, tuple[float, int]] = {}
    for call in calls:
        if call.get("method") != "PUT" or not str(call.get("path", "")).rstrip("/").endswith(
            "/contact"
        ):
            continue
        if call.get("status") != 200 or call.get("replyCode") != 0:
            continue
        body = call.get("body")
        if not isinstance(body, dict):
            continue
        at = float(call["received_at"])
        for contact in body.get("contacts") or ():
            if not isinstance(contact, dict):
                continue
            name = contact.get(LAST_NAME_FIELD)
            if not isinstance(name, str) or "-" not in name:
                continue
            try:
                n = int(name.rsplit("-", 1)[1])
            except ValueError:
                continue
            ident = identifies.get(n)
            if ident is None or ident.last_name != name or contact.get(KEY_FIELD) != ident.pk:
                continue
            if n not in found or at < found[n][0]:
                found[n] = (at, int(call.get("seq", 0)))
    return found


def message_number(message_id: Any, seed: int) -> int | None:
    """``n`` of a messageId ``lat-<seed>-<n>-<hex>`` made by :class:`LatencyEvents`."""
    if not isinstance(message_id, str):
        return None
    parts = message_id.split("-")
    if len(parts) != 4 or parts[0] != "lat" or parts[1] != str(seed):
        return None
    try:
        return int(parts[2])
    except ValueError:
        return None


def hop_times(
    contact_events: list[tuple[int, bytes | None, bytes | None]],
    operations: list[tuple[int, bytes | None, bytes | None]],
    identifies: dict[int, Identify],
    seed: int,
) -> dict[int, dict[str, float]]:
    """Identify number -> record times (epoch s) of its first ``contact-events`` record
    (written by the ingest agent) and of the first ``contact_upsert`` operation listing
    its messageId (written by the users agent): where the time between the append and the
    Emarsys call goes."""
    out: dict[int, dict[str, float]] = {}

    def note(n: int | None, what: str, ts_ms: int) -> None:
        if n is None or n not in identifies:
            return
        hops = out.setdefault(n, {})
        at = ts_ms / 1000
        if what not in hops or at < hops[what]:
            hops[what] = at

    for ts_ms, key, value in contact_events:
        records, _bad = unpack(key, value)
        for _pk, msg in records:
            if msg.get("kind") == "event":
                event = msg.get("event") or {}
                note(message_number(event.get("messageId"), seed), "contact_event", ts_ms)
    for ts_ms, _key, value in operations:
        with contextlib.suppress(orjson.JSONDecodeError, TypeError):
            op = orjson.loads(value or b"null")
            if isinstance(op, dict) and op.get("op") == "contact_upsert":
                for mid in op.get("message_ids") or ():
                    note(message_number(mid, seed), "operation", ts_ms)
    return out


# ------------------------------------------------------------------------------ the run


@dataclass
class _Sent:
    send_at: list[float] = field(default_factory=list)
    due_at: list[float] = field(default_factory=list)
    ack_at: list[float | None] = field(default_factory=list)
    errors: int = 0


async def _produce_open_loop(
    bootstrap: str, gen: LatencyEvents, total: int, rate: float, sent: _Sent
) -> tuple[float, float]:
    """Send ``total`` events on schedule; returns (start, end) wall times of the sends."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)  # like `send`
    await producer.start()
    sent.ack_at = [None] * total

    def on_ack(n: int) -> Any:
        def done(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                sent.errors += 1
            else:
                sent.ack_at[n] = time.time()

        return done

    futures: list[asyncio.Future[Any]] = []
    try:
        start = time.time() + 0.05
        next_print = start + 5.0
        n = 0
        while n < total:
            due = start + n / rate
            now = time.time()
            if due > now:
                await asyncio.sleep(due - now)
                continue
            # everything due by now goes out at once (a late loop catches up)
            while n < total and start + n / rate <= now:
                ts = time.time()
                _kind, raw = gen.event(n, ts)
                fut = await producer.send(INGEST_TOPIC, raw, timestamp_ms=int(ts * 1000))
                fut.add_done_callback(on_ack(n))
                futures.append(fut)
                sent.send_at.append(ts)
                sent.due_at.append(start + n / rate)
                n += 1
            if now >= next_print:
                next_print = now + 5.0
                lag = now - (start + n / rate)
                _log(
                    f"sent {n:,}/{total:,} ({n / max(1e-9, now - start):,.0f}/s; "
                    f"identifies {gen.counts['identify']:,}; schedule lag {max(0.0, lag):.3f}s)"
                )
        end = sent.send_at[-1] if sent.send_at else start
        await asyncio.gather(*futures, return_exceptions=True)
        return start, end
    finally:
        await producer.stop()


async def _poll_calls(
    session: aiohttp.ClientSession, sim_base: str, since: int, seen: dict[int, dict[str, Any]]
) -> int:
    """New ``PUT contact`` calls into ``seen`` (by seq); returns the highest seq seen."""
    url = f"{sim_base}/_sim/calls?method=PUT&path=/contact&since={max(0, since)}"
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=60)) as resp:
        resp.raise_for_status()
        calls = orjson.loads(await resp.read())
    top = since
    for call in calls:
        seq = int(call.get("seq", 0))
        seen[seq] = call
        top = max(top, seq)
    return top


async def _run(opts: LatencyOptions, procs: _Processes, tmp: Path) -> dict[str, Any]:
    rate = opts.rate
    warm_n = int(round(opts.warmup * rate))
    total = warm_n + int(round(opts.duration * rate))
    result: dict[str, Any] = {
        "mode": "latency",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "options": {
            "rate": rate,
            "sustained": opts.sustained,
            "sustained_source": opts.sustained_source,
            "duration": opts.duration,
            "warmup": opts.warmup,
            "contacts": opts.contacts,
            "cooldown": opts.cooldown,
            "identify_share": opts.identify_share,
            "page_share": opts.page_share,
            "partitions": opts.partitions,
            "store": opts.store,
            "seed": opts.seed,
            "flush_interval": opts.flush_interval,
            "batch_size": opts.batch_size,
            "overrides": opts.overrides,
            "quick": opts.quick,
            "fetch_max_wait_ms": opts.fetch_max_wait_ms,
        },
        "machine": _machine_facts(),
        "code": _code_version(),
    }

    procs.broker = EmbeddedBroker(log_path=tmp / "broker.log").start()
    bootstrap = procs.broker.bootstrap_servers
    sim, sim_base = await spawn_simulator(procs, tmp)
    _log(f"broker {bootstrap}, simulator {sim_base} (pid {sim.pid}), work dir {tmp}")
    await _create_topic(bootstrap, INGEST_TOPIC, opts.partitions)
    wopts = PipelineOptions(
        partitions=opts.partitions,
        store=opts.store,
        flush_interval=opts.flush_interval,
        batch_size=opts.batch_size,
        overrides=dict(opts.overrides),
    )
    spawned = time.monotonic()
    worker = spawn_worker(
        procs,
        tmp,
        wopts,
        bootstrap=bootstrap,
        api_url=f"{sim_base}/api/v2/",
        app_id=APP_ID,
        topic_prefix=TOPIC_PREFIX,
        fetch_max_wait_ms=opts.fetch_max_wait_ms,
    )
    if opts.fetch_max_wait_ms is not None:
        _log(
            f"DIAGNOSTIC worker: its consumers use fetch_max_wait_ms={opts.fetch_max_wait_ms} "
            "instead of Faust's fixed 1500"
        )
    _log(f"started the worker (pid {worker.proc.pid}); waiting for ready")
    gen = LatencyEvents(
        opts.contacts,
        rate,
        seed=opts.seed,
        identify_share=opts.identify_share,
        page_share=opts.page_share,
        cooldown=opts.cooldown,
    )
    sent = _Sent()
    seen: dict[int, dict[str, Any]] = {}
    series: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:
        await _wait_ready(session, [worker])
        startup_s = (worker.ready_at or time.monotonic()) - spawned
        _log(
            f"worker ready {startup_s:.2f}s after start; sending {total:,} events at "
            f"{rate:,.0f}/s ({opts.warmup:.0f}s warm-up + {opts.duration:.0f}s counted)"
        )
        cpu0 = _cpu_seconds(worker.proc.pid)
        pids = {"worker": worker.proc.pid, "simulator": sim.pid, "bench": os.getpid()}
        if procs.broker is not None and procs.broker._proc is not None:
            pids["broker"] = procs.broker._proc.pid
        watch = CpuWatch(pids)
        stop_poll = asyncio.Event()
        top = 0

        async def poller() -> None:
            nonlocal top
            while not stop_poll.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop_poll.wait(), 1.0)
                top = await _poll_calls(session, sim_base, top - 200, seen)
                st = _proc_status(worker.proc.pid)
                series.append(
                    {
                        "t": round(time.time(), 3),
                        "sent": len(sent.send_at),
                        "upsert_calls": len(seen),
                        "rss_mb": round(st.get("VmRSS", 0) / 1024, 1),
                        "cpu_s": _cpu_seconds(worker.proc.pid),
                    }
                )
                if not worker.proc.alive():
                    return

        poll_task = asyncio.create_task(poller())
        try:
            start, end = await _produce_open_loop(bootstrap, gen, total, rate, sent)
            _log(f"all {total:,} events sent in {end - start:.2f}s; waiting for the last calls")
            # drain: until every identify is matched, or drain_timeout after the last send
            deadline = time.time() + opts.drain_timeout
            matched: dict[int, tuple[float, int]] = {}
            while time.time() < deadline:
                if not worker.proc.alive():
                    raise BenchError(f"the worker died:\n{worker.proc.log_tail(40)}")
                matched = match_calls(list(seen.values()), gen.identifies)
                if len(matched) >= len(gen.identifies):
                    break
                await asyncio.sleep(0.5)
        finally:
            stop_poll.set()
            with contextlib.suppress(Exception):
                await poll_task
        # one full read: every call, not only the ones after the last poll
        seen_all: dict[int, dict[str, Any]] = {}
        await _poll_calls(session, sim_base, 0, seen_all)
        matched = match_calls(list(seen_all.values()), gen.identifies)
        cpu1 = _cpu_seconds(worker.proc.pid)
        cpu_use = watch.result()
        st = _proc_status(worker.proc.pid)
        async with session.get(f"{sim_base}/_sim/stats") as resp:
            sim_stats = orjson.loads(await resp.read())
    hops = hop_times(
        await read_records(bootstrap, f"{TOPIC_PREFIX}.contact-events"),
        await read_records(bootstrap, f"{TOPIC_PREFIX}.emarsys-operations"),
        gen.identifies,
        opts.seed,
    )

    # -- figures ----------------------------------------------------------------------
    send_at, due_at = sent.send_at, sent.due_at
    lag = [s - d for s, d in zip(send_at, due_at, strict=True)]
    achieved = (len(send_at) - 1) / (end - start) if len(send_at) > 1 and end > start else None
    counted = [i for i in gen.identifies.values() if i.n >= warm_n]
    latencies = [matched[i.n][0] - send_at[i.n] for i in counted if i.n in matched]
    ack_lat = [a - send_at[n] for n, a in enumerate(sent.ack_at) if a is not None]
    new_lat = [matched[i.n][0] - send_at[i.n] for i in counted if i.n in matched and i.new_contact]
    upd_lat = [
        matched[i.n][0] - send_at[i.n] for i in counted if i.n in matched and not i.new_contact
    ]
    from_ack = [
        matched[i.n][0] - a
        for i in counted
        if i.n in matched and (a := sent.ack_at[i.n]) is not None
    ]
    unmatched = [i.n for i in counted if i.n not in matched]
    to_ce: list[float] = []
    ce_to_op: list[float] = []
    op_to_call: list[float] = []
    for i in counted:
        h = hops.get(i.n, {})
        if i.n not in matched or "contact_event" not in h or "operation" not in h:
            continue
        to_ce.append(h["contact_event"] - send_at[i.n])
        ce_to_op.append(h["operation"] - h["contact_event"])
        op_to_call.append(matched[i.n][0] - h["operation"])
    upserts = [
        c
        for c in seen_all.values()
        if str(c.get("path", "")).rstrip("/").endswith("/contact") and c.get("method") == "PUT"
    ]
    contacts_sent = sum(len((c.get("body") or {}).get("contacts") or ()) for c in upserts)
    window = [c for c in upserts if start <= float(c["received_at"]) <= end + opts.drain_timeout]
    lat = summarize(latencies)
    p99 = lat.get("p99")
    lag_stats = summarize(lag)
    behind = {
        "lag_s": lag_stats,
        "achieved_vs_target": None if achieved is None else round(achieved / rate, 4),
    }
    fell_behind = bool(
        (achieved is not None and achieved < 0.98 * rate)
        or (lag_stats.get("p99") or 0) > 0.05
        or (lag_stats.get("max") or 0) > 0.5
    )
    result["produce"] = {
        "events": len(send_at),
        "by_type": dict(gen.counts),
        "mean_event_bytes": round(gen.total_bytes / max(1, len(send_at)), 1),
        "target_rate": rate,
        "achieved_rate": None if achieved is None else round(achieved, 1),
        "seconds": round(end - start, 3),
        "schedule_lag": behind,
        "fell_behind": fell_behind,
        "errors": sent.errors,
        "ack_latency_s": summarize(ack_lat),
        "cooldown_misses": gen.cooldown_misses,
    }
    result["latency"] = {
        "measured": "identify events (each carries a changed lastName, so each costs a PUT "
        "contact call); tracks and pages cost no call",
        "append_to_call_s": lat,
        "ack_to_call_s": summarize(from_ack),
        "new_contacts_s": summarize(new_lat),
        "updates_s": summarize(upd_lat),
        "hops_s": {
            "note": "record timestamps of the internal topics (ms resolution); identifies "
            "with all three hops found",
            "append_to_contact_event": summarize(to_ce),
            "contact_event_to_operation": summarize(ce_to_op),
            "operation_to_call": summarize(op_to_call),
        },
        "identifies_counted": len(counted),
        "identifies_warmup": len(gen.identifies) - len(counted),
        "matched": len(latencies),
        "unmatched": len(unmatched),
        "unmatched_sample": unmatched[:20],
        "target_p99_s": TARGET_P99_S,
        "meets_target": p99 is not None and p99 <= TARGET_P99_S and not unmatched,
        "histogram_100ms": _histogram(latencies, 0.1),
        "p99_by_10s": _p99_by_window(
            [
                (send_at[i.n] - start, matched[i.n][0] - send_at[i.n])
                for i in counted
                if i.n in matched
            ],
            10.0,
        ),
        "by_second": _by_second(
            [
                (send_at[i.n] - start, matched[i.n][0] - send_at[i.n])
                for i in counted
                if i.n in matched
            ]
        ),
    }
    result["emarsys"] = {
        "upsert_calls": len(upserts),
        "upsert_calls_during_run": len(window),
        "contacts_sent": contacts_sent,
        "contacts_per_call": round(contacts_sent / len(upserts), 1) if upserts else None,
        "simulator_stats": sim_stats,
    }
    result["worker"] = {
        "startup_seconds": round(startup_s, 2),
        "peak_rss_mb": round(st.get("VmHWM", 0) / 1024, 1),
        "rss_mb_end": round(st.get("VmRSS", 0) / 1024, 1),
        "cpu_seconds_run": None if cpu0 is None or cpu1 is None else round(cpu1 - cpu0, 2),
    }
    result["cpu"] = {
        "note": "cores used from the first send until the last call was matched (or the "
        "drain timed out); others = the rest of the machine",
        **cpu_use,
    }
    result["series"] = series
    with contextlib.suppress(OSError):
        result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def _by_second(points: list[tuple[float, float]]) -> list[dict[str, Any]]:
    """(seconds after the first send, latency) -> per whole second of sending: count, p50,
    max (the latency over the run, to see whether it drifts or jumps)."""
    buckets: dict[int, list[float]] = {}
    for t, value in points:
        buckets.setdefault(int(t), []).append(value)
    out = []
    for second in sorted(buckets):
        values = sorted(buckets[second])
        out.append(
            {
                "t": second,
                "n": len(values),
                "p50": round(percentile(values, 50) or 0.0, 3),
                "max": round(values[-1], 3),
            }
        )
    return out


def _p99_by_window(points: list[tuple[float, float]], width: float) -> list[float]:
    """p99 latency per ``width`` seconds of sending (windows without points left out)."""
    buckets: dict[int, list[float]] = {}
    for t, value in points:
        buckets.setdefault(int(t // width), []).append(value)
    return [round(percentile(sorted(buckets[k]), 99) or 0.0, 2) for k in sorted(buckets)]


def _histogram(values: list[float], width: float) -> dict[str, int]:
    """Counts per bucket of ``width`` seconds, keyed by the bucket's lower bound."""
    out: dict[str, int] = {}
    for v in sorted(values):
        lower = math.floor(v / width) * width
        label = f"{lower:.1f}"
        out[label] = out.get(label, 0) + 1
    return out


# ------------------------------------------------------------------------------ output


def format_table(result: dict[str, Any]) -> str:
    o, p, lat, e, w, m = (
        result["options"],
        result["produce"],
        result["latency"],
        result["emarsys"],
        result["worker"],
        result["machine"],
    )

    def ms(stats: dict[str, Any], key: str) -> str:
        v = stats.get(key)
        return "n/a" if v is None else f"{v * 1000:,.0f} ms"

    def line(stats: dict[str, Any]) -> str:
        return (
            f"n={stats['count']:,}  p50 {ms(stats, 'p50')}  p90 {ms(stats, 'p90')}  "
            f"p99 {ms(stats, 'p99')}  max {ms(stats, 'max')}"
        )

    a = lat["append_to_call_s"]
    rate_src = (
        f" (half of {o['sustained']:,.0f}/s from {o['sustained_source']})"
        if o.get("sustained")
        else ""
    )
    lag = p["schedule_lag"]["lag_s"]
    diagnostic: list[tuple[str, str]] = []
    if o.get("fetch_max_wait_ms") is not None:
        diagnostic = [
            (
                "DIAGNOSTIC worker",
                f"consumers with fetch_max_wait_ms={o['fetch_max_wait_ms']} (Faust's fixed "
                "1500 replaced; not the shipped worker)",
            )
        ]
    rows: list[tuple[str, str]] = [
        *diagnostic,
        ("target rate", f"{o['rate']:,.0f} events/s{rate_src}"),
        (
            "achieved produce rate",
            "n/a" if p["achieved_rate"] is None else f"{p['achieved_rate']:,.1f} events/s",
        ),
        (
            "events sent (track / page / identify)",
            f"{p['events']:,} ({p['by_type']['track']:,} / {p['by_type']['page']:,} / "
            f"{p['by_type']['identify']:,}) in {p['seconds']:.1f} s, "
            f"mean {p['mean_event_bytes']:.0f} B",
        ),
        ("  warm-up / counted", f"{o['warmup']:.0f} s / {o['duration']:.0f} s"),
        (
            "  send lag behind schedule",
            f"p99 {ms(lag, 'p99')}, max {ms(lag, 'max')}"
            + ("  ** PRODUCER FELL BEHIND **" if p["fell_behind"] else ""),
        ),
        ("  send -> broker ack", line(p["ack_latency_s"])),
        ("", ""),
        ("measured events", "identifies (each costs a PUT contact call)"),
        (
            "  counted / matched to a call / unmatched",
            f"{lat['identifies_counted']:,} / {lat['matched']:,} / {lat['unmatched']:,}",
        ),
        ("latency append -> simulator call", line(a)),
        ("  mean / p99.9", f"{ms(a, 'mean')} / {ms(a, 'p99_9')}"),
        (
            "  p99 per 10 s of sending, s",
            " ".join(f"{v:.1f}" for v in lat.get("p99_by_10s") or []) or "n/a",
        ),
        ("  new contacts", line(lat["new_contacts_s"])),
        ("  updates of known contacts", line(lat["updates_s"])),
        ("  from broker ack", line(lat["ack_to_call_s"])),
        ("  hop: append -> contact-events", line(lat["hops_s"]["append_to_contact_event"])),
        ("  hop: -> emarsys-operations", line(lat["hops_s"]["contact_event_to_operation"])),
        ("  hop: -> simulator call", line(lat["hops_s"]["operation_to_call"])),
        (
            f"p99 <= {lat['target_p99_s']:.0f} s (flush_interval {o['flush_interval']})",
            "yes" if lat["meets_target"] else "NO",
        ),
        ("", ""),
        (
            "upsert calls / contacts per call",
            f"{e['upsert_calls']:,} / {e['contacts_per_call']}",
        ),
        ("CPU during the run, cores", cpu_line(result["cpu"])),
        (
            "worker peak RSS (VmHWM) / at end",
            f"{w['peak_rss_mb']:,.0f} / {w['rss_mb_end']:,.0f} MB",
        ),
        ("worker start -> ready", f"{w['startup_seconds']:.2f} s"),
        ("", ""),
        ("machine: nproc / python", f"{m['nproc']} / {m['implementation']} {m['python']}"),
        (
            "  load average start / end (1 min)",
            f"{(m.get('loadavg_at_start') or ['?'])[0]} / {(m.get('loadavg_at_end') or ['?'])[0]}",
        ),
        ("code", str(result.get("code", {}).get("commit", "?"))[:10]),
    ]
    width = max(len(k) for k, _ in rows) + 2
    out = ["", "emarsys-stream latency benchmark", "=" * (width + 60)]
    out += [f"{k:<{width}}{v}" if k else "" for k, v in rows]
    out.append("=" * (width + 60))
    return "\n".join(out)


def run_latency(opts: LatencyOptions) -> int:
    """Run the benchmark; returns a process exit code (0 ok, 1 failed, 130 interrupted)."""
    if opts.rate <= 0 or opts.duration <= 0 or opts.warmup < 0:
        raise BenchError("--rate and --duration must be > 0, --warmup >= 0")
    tmp = Path(tempfile.mkdtemp(prefix="emarsys-bench-latency-"))
    procs = _Processes()
    ok = False
    try:
        with _sigterm_as_interrupt():
            try:
                result = asyncio.run(_cancel_on_signals(_run(opts, procs, tmp)))
            finally:
                procs.stop_all()
        print(format_table(result), flush=True)
        path = write_result(result, opts.results_dir, suffix="-latency")
        print(f"results: {path}", flush=True)
        if result["produce"]["fell_behind"]:
            _log(
                "WARNING: the producer fell behind its schedule (achieved "
                f"{result['produce']['achieved_rate']}/s of {opts.rate:,.0f}/s): the rate "
                "was not held; the latencies are of a lower load"
            )
        ok = result["latency"]["unmatched"] == 0
        if not ok:
            _log(f"{result['latency']['unmatched']} counted identifies never reached the simulator")
        return 0 if ok else 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        _log("interrupted; processes stopped")
        return 130
    except BenchError as exc:
        _log(f"FAILED: {exc}")
        return 1
    finally:
        procs.stop_all()
        if ok and not opts.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _log(f"work dir kept (logs, configs, data): {tmp}")


# ------------------------------------------------------------------------------ CLI


def add_parser(sub: Any, override: Any) -> None:
    p = sub.add_parser(
        "latency",
        help="end-to-end latency at a fixed rate: ingest append -> Emarsys simulator call",
        description="Start broker, simulator and one worker; produce events open loop at a "
        "fixed rate; report the latency from each identify's append to the ingest topic "
        "until the simulator received the upsert carrying it.",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="events/s (default: half of --sustained, else half of the last pipeline result "
        "in --results-dir)",
    )
    p.add_argument(
        "--sustained",
        type=float,
        default=None,
        help="sustained events/s of the pipeline (e.g. from `python -m bench pipeline`); "
        "the default --rate is half of it",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help=f"seconds of counted events (60; --quick {QUICK_DURATION:.0f})",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help=f"seconds of events before, not counted (5; --quick {QUICK_WARMUP:.0f})",
    )
    p.add_argument(
        "--contacts",
        type=int,
        default=None,
        help="people (default: max(5000, 4 x identifies per cooldown))",
    )
    p.add_argument(
        "--cooldown",
        type=float,
        default=10.0,
        help="minimum seconds between two identifies of one person (10)",
    )
    p.add_argument("--quick", action="store_true", help="20 s counted after 3 s warm-up (< 1 min)")
    p.add_argument("--partitions", type=int, default=4, help="partitions of every topic (4)")
    p.add_argument(
        "--store",
        choices=("rocksdb://", "memory://"),
        default="rocksdb://",
        help="table store of the worker (rocksdb://)",
    )
    p.add_argument("--seed", type=int, default=1, help="generator seed (1)")
    p.add_argument(
        "--flush-interval", type=float, default=1.0, help="emarsys.flush_interval in s (1.0)"
    )
    p.add_argument("--batch-size", type=int, default=1000, help="emarsys.batch_size (1000)")
    p.add_argument(
        "--set",
        dest="overrides",
        type=override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a worker config key (repeatable; YAML value)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="after the last send, wait at most this long for the last calls (30)",
    )
    p.add_argument(
        "--fetch-max-wait-ms",
        type=int,
        default=None,
        metavar="MS",
        help="DIAGNOSTIC: run the worker with its Kafka consumers' fetch_max_wait_ms set to MS "
        "instead of Faust's fixed 1500 (bench.fetch_wait_worker): shows how much latency the "
        "embedded broker's fetch wait adds",
    )
    p.add_argument("--keep", action="store_true", help="keep the work dir after a good run")
    p.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where to write <timestamp>-latency.json and look for pipeline results "
        "(bench/results)",
    )


def main(args: argparse.Namespace) -> int:
    sustained = args.sustained
    source: str | None = "--sustained" if sustained else None
    if args.rate is not None:
        rate = args.rate
    else:
        if sustained is None:
            found = sustained_from_results(args.results_dir)
            if found is None:
                raise BenchError(
                    f"no --rate, no --sustained and no pipeline result in {args.results_dir}: "
                    "run `python -m bench pipeline` first or give --rate / --sustained"
                )
            sustained, path = found
            source = path.name
        rate = sustained / 2
    duration = args.duration or (QUICK_DURATION if args.quick else 60.0)
    warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else 5.0)
    identify_share = 0.15
    contacts = args.contacts or max(5000, math.ceil(4 * rate * identify_share * args.cooldown))
    opts = LatencyOptions(
        rate=rate,
        duration=duration,
        warmup=warmup,
        contacts=contacts,
        cooldown=args.cooldown,
        identify_share=identify_share,
        partitions=args.partitions,
        store=args.store,
        seed=args.seed,
        flush_interval=args.flush_interval,
        batch_size=args.batch_size,
        overrides=dict(args.overrides),
        drain_timeout=args.drain_timeout,
        fetch_max_wait_ms=args.fetch_max_wait_ms,
        sustained=sustained if args.rate is None else args.sustained,
        sustained_source=source if args.rate is None else None,
        keep=args.keep,
        quick=args.quick,
        results_dir=args.results_dir,
    )
    return run_latency(opts)
