"""``python -m bench state``: users table on RocksDB for N contacts, restored from its changelog.

Issue 5, targets 5 and 6: bytes on disk per contact and worker RSS (< 1 GiB) for a users
table of 1,000,000 contacts, and the time a fresh worker takes to restore that table from
its changelog. One run (see bench/README.md):

1. start the embedded broker (Tansu, loopback, memory only);
2. write N users-table records straight to ``<app_id>-users-changelog`` (the changelog
   topic Faust reads the users table back from), exactly as the worker writes them:
   key = the primary key as UTF-8 bytes (``tables.codec.key``), value =
   ``tables.codec.dumps(UserRecord.to_dict())``, partition = murmur2 of the key (the
   default partitioner: the worker's ``contact-events`` partition of that key, which is
   the changelog and RocksDB partition the worker writes it to). The records are built
   with the real :class:`app.identity.UserRecord` functions (``apply_event``,
   ``mark_fields_queued``, ``set_audience_membership``);
3. **one record per record batch**: the embedded broker reports a partition's end offset
   as "base offset of its last batch + 1", and Faust restores a changelog up to that end
   offset, so a multi-record batch at the end of a partition would be cut short (the
   README's ``worker.producer_max_batch_size: 1``). To write fast anyway, every produce
   request carries many single-record batches per partition, built with aiokafka's own
   record batch builder and sent on the producer's connection; the produce answers' base
   offsets and the broker's end offsets are checked against the records written;
4. reference: read the whole changelog with a plain aiokafka consumer (``getmany``, no
   parsing: Faust's recovery does not parse values either);
5. start a worker with an empty data dir and the same app id; time from process start
   until ``GET /health`` = 200 (every table recovered), with the worker's RSS sampled the
   whole time; read the recovery phases from its log; ``GET /users/{pk}`` for a sample of
   keys (compared with the records written) and ``emarsys_stream_users_table_keys`` on
   ``/metrics`` (every key in the table) to make sure the whole changelog was restored;
6. RocksDB bytes on disk of the users table (``users-<partition>.db`` directories) while
   the worker runs and after it stopped; per contact;
7. print a table, write ``bench/results/<timestamp>-state.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from app.broker import EmbeddedBroker
from app.identity import apply_event, mark_fields_queued, set_audience_membership
from bench.generate import _DOMAINS, _FIRST, _LAST
from bench.harness import CpuWatch, cpu_line, spawn_worker
from bench.pipeline import (
    RESULTS_DIR,
    BenchError,
    PipelineOptions,
    _cancel_on_signals,
    _code_version,
    _cpu_seconds,
    _log,
    _machine_facts,
    _parse_metrics,
    _proc_status,
    _Processes,
    _sigterm_as_interrupt,
    _Worker,
    write_result,
)
from tables.codec import dumps, loads
from tables.codec import key as table_key

__all__ = [
    "StateOptions",
    "build_user_record",
    "key_partition",
    "rocksdb_disk_usage",
    "run_state",
    "single_record_batch",
]

APP_ID = "emarsys-bench-state"
TOPIC_PREFIX = "bench-state"
QUICK_CONTACTS = 50_000
DEFAULT_CONTACTS = 1_000_000
#: ``identity.max_ids_per_user`` default (the record builder respects it).
MAX_IDS = 50
DAY_MS = 86_400_000
#: Fixed "now" of the generated records (so the bytes do not depend on the clock).
BASE_MS = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp() * 1000)
AUDIENCES = ("vip_customers", "cart_abandoners", "newsletter_engaged", "high_ltv")
#: Faust's ``consumer_max_fetch_size`` default: bytes per partition per fetch, which the
#: worker's recovery reads with (its ``fetch_max_wait_ms`` is a fixed 1500).
FAUST_FETCH_BYTES = 1024**2


def changelog_topic(app_id: str = APP_ID) -> str:
    """Faust's changelog topic of the users table: ``<app_id>-users-changelog``."""
    return f"{app_id}-users-changelog"


@dataclass
class StateOptions:
    contacts: int = DEFAULT_CONTACTS
    partitions: int = 4
    seed: int = 1
    records_per_request: int = 4000
    """Records per produce request (over all partitions), each in its own record batch."""
    in_flight: int = 2
    """Produce requests outstanding at a time."""
    samples: int = 200
    """Keys read back through ``GET /users/{pk}`` after the recovery."""
    overrides: dict[str, Any] = field(default_factory=dict)
    ready_timeout: float = 1800.0
    """Give up when the worker is not ready this many seconds after its start."""
    raw_read: bool = True
    raw_fetch_bytes: int = FAUST_FETCH_BYTES
    """Bytes per partition per fetch of the reference read (Faust's default: 1 MiB)."""
    keep: bool = False
    quick: bool = False
    results_dir: Path = RESULTS_DIR


# ------------------------------------------------------------------------------ records


def build_user_record(i: int, seed: int = 1) -> tuple[bytes, bytes]:
    """The users-table record of contact ``i`` as (key, value) bytes, as the worker stores it.

    Deterministic for ``(i, seed)``. Built like the users agent builds records: an identify
    with ``userId`` + ``anonymousId`` creates it, 15% of the contacts have a second
    ``userId`` (a later login), 2-60 events of all types, the mapped fields queued to
    Emarsys (first/last name, opt-in, for 40% a birthday), created in Emarsys, and for 30%
    membership in one or two Engage audiences, and 1-4 messageIds in its dedupe memory
    (``seen``). About 530 bytes of JSON.
    """
    rng = random.Random((seed << 32) ^ i)
    first = _FIRST[rng.randrange(len(_FIRST))]
    last = _LAST[rng.randrange(len(_LAST))]
    domain = _DOMAINS[rng.randrange(len(_DOMAINS))]
    pk = f"{first.lower()}.{last.lower()}.{i}@{domain}"
    user_id = f"usr_{i:07d}{rng.getrandbits(24):06x}"
    anonymous_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    first_seen = BASE_MS - rng.randrange(1, 540) * DAY_MS - rng.randrange(DAY_MS)
    rec = apply_event(None, pk, "identify", user_id, anonymous_id, first_seen, max_ids=MAX_IDS)
    last_seen = min(BASE_MS, first_seen + rng.randrange(0, 400) * DAY_MS + rng.randrange(DAY_MS))
    if rng.random() < 0.15:
        second = f"usr_{i:07d}{rng.getrandbits(24):06x}"
        rec = apply_event(rec, pk, "identify", second, None, last_seen, max_ids=MAX_IDS)
    else:
        rec = apply_event(rec, pk, "track", user_id, None, last_seen, max_ids=MAX_IDS)
    # The other events of this contact: counters only (they carried no new id).
    more = rng.randrange(0, 59)
    tracks = round(more * 0.6)
    pages = round(more * 0.25)
    rec.event_count += more
    counts = rec.counts_by_type
    counts["track"] = counts.get("track", 0) + tracks
    counts["page"] = counts.get("page", 0) + pages
    counts["identify"] = counts.get("identify", 0) + more - tracks - pages
    fields: dict[str, Any] = {"1": first, "2": last, "31": 1 if rng.random() < 0.7 else 2}
    if rng.random() < 0.4:
        fields["4"] = f"{rng.randrange(1950, 2006)}-{rng.randrange(1, 13):02d}-" + (
            f"{rng.randrange(1, 29):02d}"
        )
    mark_fields_queued(rec, fields)
    rec.created_in_emarsys = True
    r = rng.random()
    if r < 0.3:
        for audience in rng.sample(AUDIENCES, 1 if r < 0.2 else 2):
            at = rng.randrange(first_seen, last_seen + 1)
            set_audience_membership(rec, audience, rng.random() < 0.85, at)
    # The dedupe memory: the messageIds of the last write's events (and of any others
    # still inside the window then) stay in the record until its next write.
    for _ in range(1 + rng.randrange(4)):
        rec.seen[str(uuid.UUID(int=rng.getrandbits(128), version=4))] = last_seen
    return table_key(pk), dumps(rec.to_dict())


def key_partition(key: bytes, partitions: int) -> int:
    """The partition the worker's producer (aiokafka's default partitioner) picks for
    ``key``: the ``contact-events`` partition of a primary key, hence the changelog and
    RocksDB partition its users record lives in."""
    from aiokafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


def single_record_batch(key: bytes, value: bytes, timestamp_ms: int) -> bytes:
    """One Kafka record batch (magic 2, uncompressed) holding exactly one record."""
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, len(key) + len(value) + 1024)
    if builder.append(0, timestamp_ms, key, value, []) is None:  # pragma: no cover
        raise BenchError("record does not fit into its batch")
    return bytes(builder.build())


# ------------------------------------------------------------------------------ writing


@dataclass
class WriteStats:
    records: int = 0
    value_bytes: int = 0
    key_bytes: int = 0
    requests: int = 0
    seconds: float = 0.0
    per_partition: dict[int, int] = field(default_factory=dict)


async def write_changelog(
    bootstrap: str,
    topic: str,
    contacts: int,
    partitions: int,
    *,
    seed: int,
    records_per_request: int,
    in_flight: int,
) -> WriteStats:
    """Write ``contacts`` users records to ``topic``, one record per record batch.

    Every produce request holds up to ``records_per_request`` records; a partition's
    records in one request are consecutive single-record batches. Up to ``in_flight``
    requests are outstanding. Each answer's base offset must be the partition's count of
    records so far (offsets without gaps, one per record), else BenchError.
    """
    from aiokafka import AIOKafkaProducer, TopicPartition
    from aiokafka.protocol.produce import ProduceRequest

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    stats = WriteStats(per_partition=dict.fromkeys(range(partitions), 0))
    try:
        client = producer.client
        await client._wait_on_metadata(topic)
        leaders = {
            client.cluster.leader_for_partition(TopicPartition(topic, p)) for p in range(partitions)
        }
        if len(leaders) != 1 or None in leaders:
            raise BenchError(f"expected one leader for every partition of {topic}: {leaders}")
        node = leaders.pop()
        expected_base = dict.fromkeys(range(partitions), 0)
        pending: set[asyncio.Task[None]] = set()

        async def send(parts: dict[int, list[bytes]], bases: dict[int, int]) -> None:
            request = ProduceRequest(
                transactional_id=None,
                required_acks=-1,
                timeout=60_000,
                topics=[(topic, [(p, b"".join(batches)) for p, batches in parts.items()])],
            )
            response = await client.send(node, request)
            for _topic, answers in response.topics:
                for answer in answers:
                    p, error, offset = answer[0], answer[1], answer[2]
                    if error:
                        raise BenchError(f"produce to {topic}[{p}] failed: error code {error}")
                    if offset != bases[p]:
                        raise BenchError(
                            f"{topic}[{p}]: base offset {offset}, expected {bases[p]} "
                            "(records missing or duplicated)"
                        )

        started = time.perf_counter()
        next_print = started + 5.0
        now_ms = int(time.time() * 1000)
        i = 0
        while i < contacts:
            parts: dict[int, list[bytes]] = {}
            end = min(contacts, i + records_per_request)
            for n in range(i, end):
                k, v = build_user_record(n, seed)
                p = key_partition(k, partitions)
                parts.setdefault(p, []).append(single_record_batch(k, v, now_ms))
                stats.key_bytes += len(k)
                stats.value_bytes += len(v)
            bases = {p: expected_base[p] for p in parts}
            for p, batches in parts.items():
                expected_base[p] += len(batches)
            i = end
            while len(pending) >= in_flight:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            pending.add(asyncio.create_task(send(parts, bases)))
            stats.requests += 1
            now = time.perf_counter()
            if now >= next_print:
                next_print = now + 5.0
                _log(
                    f"written {i:,}/{contacts:,} records ({i / (now - started):,.0f}/s, "
                    f"{(stats.key_bytes + stats.value_bytes) / 2**20:,.0f} MiB)"
                )
        if pending:
            for outcome in await asyncio.gather(*pending, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    raise outcome
        stats.seconds = time.perf_counter() - started
        stats.records = contacts
        stats.per_partition = dict(expected_base)
        return stats
    finally:
        await producer.stop()


async def broker_end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[str, Any]:
    """``ListOffsets`` end offsets (what Faust's recovery reads up to) and the high
    watermarks of a Fetch response, per partition."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from bench.pipeline import high_watermarks

    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    hws = await high_watermarks(bootstrap, dict.fromkeys(tps, 0))
    return {
        "list_offsets": {tp.partition: ends[tp] for tp in tps},
        "fetch_high_watermark": {tp.partition: hws.get(tp) for tp in tps},
    }


async def raw_read(
    bootstrap: str, topic: str, ends: dict[int, int], fetch_bytes: int = FAUST_FETCH_BYTES
) -> tuple[float, int, int]:
    """Read ``topic`` from the beginning to ``ends`` with a plain consumer (no parsing),
    fetching at most ``fetch_bytes`` per partition at a time like the worker's recovery.

    Returns (seconds, records, bytes of keys + values); the clock starts once the
    consumer is positioned."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=fetch_bytes,
        fetch_max_bytes=64 * 1024 * 1024,
        fetch_max_wait_ms=1500,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(ends)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        for tp in tps:
            await consumer.position(tp)
        remaining = {tp for tp in tps if ends[tp.partition] > 0}
        count = size = 0
        started = time.perf_counter()
        deadline = started + 1800
        next_print = started + 10
        while remaining and time.perf_counter() < deadline:
            if time.perf_counter() >= next_print:
                next_print += 10
                elapsed = time.perf_counter() - started
                _log(f"raw read: {count:,} records after {elapsed:.0f}s ({count / elapsed:,.0f}/s)")
            batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for tp, records in batch.items():
                count += len(records)
                for rec in records:
                    size += len(rec.key or b"") + len(rec.value or b"")
                if records and records[-1].offset + 1 >= ends[tp.partition]:
                    remaining.discard(tp)
        seconds = time.perf_counter() - started
        if count != sum(ends.values()):
            raise BenchError(f"raw read got {count:,} records of {topic}, expected {ends}")
        return seconds, count, size
    finally:
        await consumer.stop()


# ------------------------------------------------------------------------------ disk


def rocksdb_disk_usage(data_dir: Path, table: str = "users") -> dict[str, Any]:
    """Bytes of the RocksDB partition stores ``<table>-<n>.db`` under ``data_dir``.

    ``allocated`` counts disk blocks (what ``du`` shows), ``apparent`` file sizes; both
    split into ``sst`` (table files), ``wal`` (``*.log``: write-ahead log of what is still
    only in the memtable) and ``other`` (manifest, options, ...)."""
    pattern = re.compile(rf"^{re.escape(table)}-\d+\.db$")
    out: dict[str, Any] = {"dirs": [], "files": 0}
    for kind in ("apparent", "allocated"):
        out[kind] = {"sst": 0, "wal": 0, "other": 0, "total": 0}
    if not data_dir.exists():
        return out
    for root, _dirs, files in os.walk(data_dir):
        here = Path(root)
        inside = next((p for p in (here, *here.parents) if pattern.match(p.name)), None)
        if inside is None:
            continue
        if here == inside:
            out["dirs"].append(str(here.relative_to(data_dir)))
        for name in files:
            try:
                st = (here / name).stat()
            except OSError:
                continue
            kind = "sst" if name.endswith(".sst") else "wal" if name.endswith(".log") else "other"
            if name == "LOG" or name.startswith("LOG.old"):
                kind = "other"  # RocksDB's info log, not the write-ahead log
            out["files"] += 1
            for what, size in (("apparent", st.st_size), ("allocated", st.st_blocks * 512)):
                out[what][kind] += size
                out[what]["total"] += size
    out["dirs"].sort()
    return out


# ------------------------------------------------------------------------------ worker log


#: Faust / worker log lines that mark recovery phases (substring -> phase name).
RECOVERY_MARKS = (
    ("Starting...", "first_log_line"),
    ("Executing _on_partitions_assigned", "partitions_assigned"),
    ("Highwater for active changelog partitions", "highwaters_read"),
    ("Restoring state from changelog topics", "restore_started"),
    ("Done reading from changelog topics", "restore_read_done"),
    ("Recovery complete", "recovery_complete"),
    ("Restore complete", "restore_complete"),
    ("Worker ready", "faust_worker_ready"),
    ("worker ready with", "worker_ready_logged"),
)


def parse_worker_log(lines: Iterator[str] | list[str], topic: str) -> dict[str, Any]:
    """Recovery facts from a worker's JSON log: the first time (``ts``) of each
    :data:`RECOVERY_MARKS` phase, the active highwaters Faust logged for ``topic``
    (partition -> highwater, i.e. end offset - 1), "Still fetching" progress lines and
    warnings/errors mentioning recovery."""
    phases: dict[str, float] = {}
    highwaters: dict[int, int] = {}
    progress: list[dict[str, Any]] = []
    problems: list[str] = []
    remaining = re.compile(r"total remaining=(\d+)")
    for line in lines:
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(entry, dict):
            continue
        msg = str(entry.get("msg", ""))
        ts = _log_ts(entry.get("ts"))
        for mark, phase in RECOVERY_MARKS:
            if mark in msg and phase not in phases and ts is not None:
                phases[phase] = ts
        if "Highwater for active changelog partitions" in msg and not highwaters:
            highwaters = _table_rows(msg, topic)
        found = remaining.search(msg)
        if found and ts is not None:
            progress.append({"ts": ts, "remaining": int(found.group(1))})
        level = str(entry.get("level", "")).upper()
        if level in ("WARNING", "ERROR", "CRITICAL") and (
            "recover" in msg.lower() or "changelog" in msg.lower()
        ):
            problems.append(msg[:300])
    return {
        "phases": phases,
        "highwaters": highwaters,
        "progress": progress,
        "problems": problems,
    }


_ROW = re.compile(r"^\|\s*(\S+)\s*\|\s*(\d+)\s*\|\s*(-?\d+)\s*\|$")


def _table_rows(msg: str, topic: str) -> dict[int, int]:
    """partition -> number of the rows of ``topic`` in one of Faust's log tables
    (``| topic | partition | value |``; a repeated topic is written as a ditto mark)."""
    out: dict[int, int] = {}
    current = ""
    for line in msg.splitlines():
        found = _ROW.match(line.strip())
        if found is None:
            continue
        name, part, value = found.groups()
        if name != "\u3003":  # 〃: same topic as the row above
            current = name
        if current == topic:
            out[int(part)] = int(value)
    return out


def _log_ts(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


# ------------------------------------------------------------------------------ the run


async def _get(session: aiohttp.ClientSession, url: str, timeout: float = 30.0) -> Any:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        return resp.status, await resp.read()


async def _wait_recovered(
    session: aiohttp.ClientSession,
    worker: _Worker,
    spawned_wall: float,
    timeout: float,
    rss_series: list[dict[str, Any]],
) -> float:
    """Poll ``/health`` until 200; sample the worker's RSS meanwhile. Returns the wall
    time (time.time()) of the first 200."""
    url = f"http://127.0.0.1:{worker.web_port}/health"
    next_sample = 0.0
    next_print = time.time() + 10
    while True:
        now = time.time()
        if not worker.proc.alive():
            raise BenchError(
                f"worker exited with code {worker.proc.popen.returncode} during recovery:\n"
                + worker.proc.log_tail(40)
            )
        if now - spawned_wall > timeout:
            raise BenchError(f"worker not ready {timeout:.0f}s after its start")
        if now >= next_sample:
            next_sample = now + 0.25
            st = _proc_status(worker.proc.pid)
            rss_series.append(
                {
                    "t": round(now - spawned_wall, 2),
                    "rss_mb": round(st.get("VmRSS", 0) / 1024, 1),
                    "cpu_s": _cpu_seconds(worker.proc.pid),
                }
            )
        if now >= next_print:
            next_print = now + 10
            last = rss_series[-1] if rss_series else {}
            _log(f"t={now - spawned_wall:6.1f}s waiting for recovery; RSS {last.get('rss_mb')} MiB")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status == 200:
                    ready = time.time()
                    rss_series.append(
                        {
                            "t": round(ready - spawned_wall, 2),
                            "rss_mb": round(
                                _proc_status(worker.proc.pid).get("VmRSS", 0) / 1024, 1
                            ),
                            "cpu_s": _cpu_seconds(worker.proc.pid),
                        }
                    )
                    return ready
        await asyncio.sleep(0.2)


async def _check_samples(
    session: aiohttp.ClientSession, worker: _Worker, contacts: int, seed: int, samples: int
) -> dict[str, Any]:
    """GET /users/{pk} for ``samples`` random contacts (plus the first and the last one)
    and compare with the record written; one key that was never written must be 404."""
    rng = random.Random(seed + 99)
    picks = sorted({0, contacts - 1, *(rng.randrange(contacts) for _ in range(samples))})
    base = f"http://127.0.0.1:{worker.web_port}/users/"
    ok = 0
    wrong: list[str] = []
    started = time.perf_counter()
    for i in picks:
        k, v = build_user_record(i, seed)
        status, body = await _get(session, base + k.decode())
        if status == 200 and orjson.loads(body) == loads(v):
            ok += 1
        else:
            wrong.append(f"{k.decode()}: HTTP {status} {body[:120]!r}")
    missing_status, _ = await _get(session, base + "never.written@example.com")
    return {
        "checked": len(picks),
        "identical": ok,
        "wrong": wrong[:20],
        "unknown_key_status": missing_status,
        "seconds": round(time.perf_counter() - started, 3),
    }


async def _run(opts: StateOptions, procs: _Processes, tmp: Path) -> dict[str, Any]:
    result: dict[str, Any] = {
        "mode": "state",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "options": {
            "contacts": opts.contacts,
            "partitions": opts.partitions,
            "seed": opts.seed,
            "records_per_request": opts.records_per_request,
            "in_flight": opts.in_flight,
            "samples": opts.samples,
            "overrides": opts.overrides,
            "quick": opts.quick,
            "store": "rocksdb://",
            "app_id": APP_ID,
        },
        "machine": _machine_facts(),
        "code": _code_version(),
    }
    topic = changelog_topic()

    # 1. broker ----------------------------------------------------------------------
    procs.broker = EmbeddedBroker(log_path=tmp / "broker.log").start()
    bootstrap = procs.broker.bootstrap_servers
    _log(
        f"broker {bootstrap} (pid {procs.broker._proc.pid if procs.broker._proc else '?'}), "
        f"work dir {tmp}"
    )

    # 2./3. the changelog ------------------------------------------------------------
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, opts.partitions, 1, topic_configs={"cleanup.policy": "compact"})]
        )
    finally:
        await admin.close()
    sample_key, sample_value = build_user_record(0, opts.seed)
    _log(
        f"writing {opts.contacts:,} users records to {topic} ({opts.partitions} partitions, "
        f"one record per batch, {opts.records_per_request} records per request); e.g. "
        f"{sample_key.decode()} = {len(sample_value)} B"
    )
    broker_pid = procs.broker._proc.pid if procs.broker._proc is not None else None
    base_pids = {"bench": os.getpid(), **({"broker": broker_pid} if broker_pid else {})}
    watch = CpuWatch(base_pids)
    stats = await write_changelog(
        bootstrap,
        topic,
        opts.contacts,
        opts.partitions,
        seed=opts.seed,
        records_per_request=opts.records_per_request,
        in_flight=opts.in_flight,
    )
    write_cpu = watch.result()
    rate = stats.records / stats.seconds
    _log(
        f"wrote {stats.records:,} records in {stats.seconds:.1f}s ({rate:,.0f}/s, "
        f"{stats.requests:,} requests); per partition {stats.per_partition}"
    )
    offsets = await broker_end_offsets(bootstrap, topic, opts.partitions)
    written = {int(p): n for p, n in stats.per_partition.items()}
    ends_ok = offsets["list_offsets"] == written
    _log(
        f"broker end offsets (ListOffsets) {offsets['list_offsets']}, fetch high watermarks "
        f"{offsets['fetch_high_watermark']}: "
        + ("= records written" if ends_ok else "DIFFER from the records written")
    )
    if not ends_ok:
        raise BenchError(
            f"end offsets {offsets['list_offsets']} != records written {written}: Faust "
            "would not restore every record"
        )
    result["write"] = {
        "records": stats.records,
        "seconds": round(stats.seconds, 3),
        "records_per_s": round(rate),
        "requests": stats.requests,
        "mean_value_bytes": round(stats.value_bytes / stats.records, 1),
        "mean_key_bytes": round(stats.key_bytes / stats.records, 1),
        "payload_mb": round((stats.key_bytes + stats.value_bytes) / 1e6, 1),
        "per_partition": written,
        "end_offsets": offsets,
        "sample": {"key": sample_key.decode(), "value": loads(sample_value)},
        "cpu": write_cpu,
    }

    # 4. reference read ----------------------------------------------------------------
    if opts.raw_read:
        watch = CpuWatch(base_pids)
        seconds, count, size = await raw_read(bootstrap, topic, written, opts.raw_fetch_bytes)
        result["raw_read"] = {
            "fetch_bytes_per_partition": opts.raw_fetch_bytes,
            "seconds": round(seconds, 3),
            "records": count,
            "records_per_s": round(count / seconds),
            "mb": round(size / 1e6, 1),
            "cpu": watch.result(),
        }
        _log(
            f"raw aiokafka read of the changelog: {count:,} records in {seconds:.2f}s "
            f"({count / seconds:,.0f}/s)"
        )

    # 5. a fresh worker restores the table -------------------------------------------
    wopts = PipelineOptions(
        partitions=opts.partitions,
        store="rocksdb://",
        # Faust's own fetch wait (1500 ms), not the pipeline benchmark's 50 ms: reading a
        # changelog of 250,000 records per partition from the start, the embedded broker
        # answered no fetch with a record in 8.5 minutes with 50 ms (2026-11-28).
        overrides={"worker.fetch_max_wait_ms": None, **opts.overrides},
    )
    with contextlib.suppress(OSError):
        result["machine"]["loadavg_before_worker"] = [round(x, 2) for x in os.getloadavg()]
    spawned_wall = time.time()
    worker = spawn_worker(
        procs,
        tmp,
        wopts,
        bootstrap=bootstrap,
        # no Emarsys calls happen (no events); nothing listens there
        api_url="http://127.0.0.1:9/api/v2/",
        app_id=APP_ID,
        topic_prefix=TOPIC_PREFIX,
    )
    watch = CpuWatch({"worker": worker.proc.pid, **base_pids})
    data_dir = tmp / "worker0"
    _log(f"started a worker with an empty data dir (pid {worker.proc.pid}); waiting for /health")
    rss_series: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:
        ready_wall = await _wait_recovered(
            session, worker, spawned_wall, opts.ready_timeout, rss_series
        )
        restore_s = ready_wall - spawned_wall
        recovery_cpu = watch.result()
        at_ready = _proc_status(worker.proc.pid)
        cpu_at_ready = _cpu_seconds(worker.proc.pid)
        disk_live = rocksdb_disk_usage(data_dir)
        _log(
            f"worker ready {restore_s:.2f}s after its start; RSS "
            f"{at_ready.get('VmRSS', 0) / 1024:.0f} MiB, "
            f"peak {at_ready.get('VmHWM', 0) / 1024:.0f} MiB"
        )
        await asyncio.sleep(2.0)  # the worker settles (first commit, timers)
        settled = _proc_status(worker.proc.pid)
        samples = await _check_samples(session, worker, opts.contacts, opts.seed, opts.samples)
        after_samples = _proc_status(worker.proc.pid)
        _log(
            f"GET /users/{{pk}}: {samples['identical']}/{samples['checked']} identical to the "
            f"records written; unknown key -> HTTP {samples['unknown_key_status']}"
        )
        status, body = await _get(
            session, f"http://127.0.0.1:{worker.web_port}/metrics", timeout=600
        )
        metrics = _parse_metrics(body.decode()) if status == 200 else {}
        table_keys = metrics.get("emarsys_stream_users_table_keys")
        _log(f"users table keys (/metrics): {table_keys}")
        after_checks = _proc_status(worker.proc.pid)

    log_lines = worker.proc.log_path.read_text(errors="replace").splitlines()
    recovery = parse_worker_log(log_lines, topic)
    hw = recovery["highwaters"]
    hw_total = sum(v + 1 for v in hw.values()) if hw else None
    phases = {k: round(v - spawned_wall, 3) for k, v in recovery["phases"].items()}
    read_s = None
    if "restore_started" in phases and "restore_read_done" in phases:
        read_s = round(phases["restore_read_done"] - phases["restore_started"], 3)

    restore_cpu = None
    if read_s:
        restore_cpu = _cpu_between(
            rss_series, phases["restore_started"], phases["restore_read_done"]
        )

    # 6. disk after the worker stopped -----------------------------------------------
    stop_started = time.monotonic()
    worker.proc.stop(timeout=60)
    stop_s = time.monotonic() - stop_started
    disk_stopped = rocksdb_disk_usage(data_dir)

    n = opts.contacts
    restored_ok = (
        table_keys is not None
        and int(table_keys) == n
        and samples["identical"] == samples["checked"]
        and samples["unknown_key_status"] == 404
    )
    result["recovery"] = {
        "seconds_start_to_ready": round(restore_s, 3),
        "phases_s_after_start": phases,
        "seconds_restore_read": read_s,
        "contacts_per_s_start_to_ready": round(n / restore_s),
        "contacts_per_s_restore_read": round(n / read_s) if read_s else None,
        "faust_highwaters": hw,
        "faust_highwaters_total_records": hw_total,
        "progress": [
            {"t": round(p["ts"] - spawned_wall, 2), "remaining": p["remaining"]}
            for p in recovery["progress"]
        ],
        "problems": recovery["problems"],
        "users_table_keys": table_keys,
        "samples": samples,
        "restored_every_record": restored_ok,
        "worker_cpu_s_to_ready": cpu_at_ready,
        "worker_cpu_s_restore_read": restore_cpu,
        "worker_stop_seconds": round(stop_s, 2),
        "cpu": recovery_cpu,
    }
    result["worker"] = {
        "rss_mb_at_ready": round(at_ready.get("VmRSS", 0) / 1024, 1),
        "rss_mb_settled": round(settled.get("VmRSS", 0) / 1024, 1),
        "rss_mb_after_samples": round(after_samples.get("VmRSS", 0) / 1024, 1),
        "rss_mb_after_metrics": round(after_checks.get("VmRSS", 0) / 1024, 1),
        "peak_rss_mb": round(after_checks.get("VmHWM", at_ready.get("VmHWM", 0)) / 1024, 1),
        "peak_rss_mb_at_ready": round(at_ready.get("VmHWM", 0) / 1024, 1),
        "rss_series": rss_series,
    }
    result["disk"] = {
        "live": disk_live,
        "stopped": disk_stopped,
        "bytes_per_contact_live": round(disk_live["allocated"]["total"] / n, 1),
        "bytes_per_contact_stopped": round(disk_stopped["allocated"]["total"] / n, 1),
        "sst_bytes_per_contact_stopped": round(disk_stopped["allocated"]["sst"] / n, 1),
    }
    with contextlib.suppress(OSError):
        result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if not restored_ok:
        raise _Incomplete(result)
    return result


def _cpu_between(series: list[dict[str, Any]], t0: float, t1: float) -> float | None:
    """CPU seconds between ``t0`` and ``t1`` (seconds after the start) from samples
    ``{"t", "cpu_s"}``, interpolated linearly between the samples around each time."""

    def at(t: float) -> float | None:
        points = [(p["t"], p["cpu_s"]) for p in series if p.get("cpu_s") is not None]
        if not points or t < points[0][0] or t > points[-1][0]:
            return None
        for (ta, ca), (tb, cb) in zip(points, points[1:], strict=False):
            if ta <= t <= tb:
                return ca if tb == ta else ca + (cb - ca) * (t - ta) / (tb - ta)
        return points[-1][1]

    a, b = at(t0), at(t1)
    return None if a is None or b is None else round(b - a, 2)


class _Incomplete(BenchError):
    """The worker did not serve every record: the figures are written anyway."""

    def __init__(self, result: dict[str, Any]) -> None:
        self.result = result
        super().__init__("the worker did not restore every record (see the table)")


# ------------------------------------------------------------------------------ output


def _mb(value: float) -> str:
    return f"{value / 1e6:,.1f} MB"


def format_table(result: dict[str, Any]) -> str:
    w, rec, wk, d = result["write"], result["recovery"], result["worker"], result["disk"]
    m, o = result["machine"], result["options"]
    n = o["contacts"]
    raw = result.get("raw_read")
    phases = rec["phases_s_after_start"]

    def at(phase: str) -> str:
        return "n/a" if phase not in phases else f"{phases[phase]:.2f} s"

    samples = rec["samples"]
    rows: list[tuple[str, str]] = [
        ("contacts (users records)", f"{n:,}"),
        ("partitions / store", f"{o['partitions']} / rocksdb://"),
        (
            "mean record: key / value",
            f"{w['mean_key_bytes']:.0f} B / {w['mean_value_bytes']:.0f} B",
        ),
        ("", ""),
        (
            "changelog write (1 record per batch)",
            f"{w['seconds']:.1f} s, {w['records_per_s']:,} records/s ({w['requests']:,} requests)",
        ),
        (
            "  broker end offsets (ListOffsets)",
            ", ".join(f"{v:,}" for _, v in sorted(w["end_offsets"]["list_offsets"].items()))
            + " (= records written)",
        ),
        ("  CPU meanwhile, cores", cpu_line(w["cpu"])),
        (
            "raw aiokafka read of the changelog",
            "n/a"
            if not raw
            else f"{raw['seconds']:.2f} s, {raw['records_per_s']:,} records/s "
            f"({raw.get('fetch_bytes_per_partition', 0) / 2**20:g} MiB per partition and fetch)",
        ),
        ("", ""),
        ("worker start -> ready (restored)", f"{rec['seconds_start_to_ready']:.2f} s"),
        ("  CPU meanwhile, cores", cpu_line(rec["cpu"])),
        ("  start -> first log line (imports)", at("first_log_line")),
        ("  start -> partitions assigned (join)", at("partitions_assigned")),
        ("  start -> restore started", at("restore_started")),
        ("  start -> changelogs read", at("restore_read_done")),
        (
            "  restore read (Faust), records/s",
            "n/a"
            if rec["seconds_restore_read"] is None
            else f"{rec['seconds_restore_read']:.2f} s, {rec['contacts_per_s_restore_read']:,}/s",
        ),
        (
            "  worker CPU during the restore read",
            "n/a"
            if rec["worker_cpu_s_restore_read"] is None
            else f"{rec['worker_cpu_s_restore_read']:.2f} s "
            f"({rec['worker_cpu_s_restore_read'] / rec['seconds_restore_read']:.0%} of one core)",
        ),
        (
            "  worker CPU per restored record",
            "n/a"
            if rec["worker_cpu_s_restore_read"] is None
            else f"{rec['worker_cpu_s_restore_read'] / n * 1e6:,.0f} us "
            f"(CPU-bound: {n / max(rec['worker_cpu_s_restore_read'], 1e-9):,.0f} records/s)",
        ),
        (
            "  restore read / raw read of the same",
            "n/a"
            if rec["seconds_restore_read"] is None or not raw
            else f"{rec['seconds_restore_read'] / raw['seconds']:.1f} x",
        ),
        (
            "  Faust highwaters: records to restore",
            "n/a"
            if rec["faust_highwaters_total_records"] is None
            else f"{rec['faust_highwaters_total_records']:,}",
        ),
        ("users table keys (/metrics)", str(rec["users_table_keys"])),
        (
            "GET /users/{pk} identical / checked",
            f"{samples['identical']} / {samples['checked']} (unknown key: HTTP "
            f"{samples['unknown_key_status']})",
        ),
        ("restored every record", "yes" if rec["restored_every_record"] else "NO"),
        ("", ""),
        ("worker peak RSS (VmHWM)", f"{wk['peak_rss_mb']:,.0f} MiB"),
        ("  peak until ready (the restore)", f"{wk['peak_rss_mb_at_ready']:,.0f} MiB"),
        (
            "worker RSS: ready / +2 s / after GETs",
            f"{wk['rss_mb_at_ready']:,.0f} / {wk['rss_mb_settled']:,.0f} / "
            f"{wk['rss_mb_after_samples']:,.0f} MiB",
        ),
        (
            "  after one /metrics (reads every key)",
            f"{wk['rss_mb_after_metrics']:,.0f} MiB",
        ),
        ("peak RSS < 1 GiB (target 5)", "yes" if wk["peak_rss_mb"] < 1024 else "NO"),
        (
            "users RocksDB on disk, running",
            f"{_mb(d['live']['allocated']['total'])} = {d['bytes_per_contact_live']:,.0f} "
            f"B/contact (sst {_mb(d['live']['allocated']['sst'])}, wal "
            f"{_mb(d['live']['allocated']['wal'])})",
        ),
        (
            "users RocksDB on disk, worker stopped",
            f"{_mb(d['stopped']['allocated']['total'])} = {d['bytes_per_contact_stopped']:,.0f} "
            f"B/contact (sst {_mb(d['stopped']['allocated']['sst'])}, wal "
            f"{_mb(d['stopped']['allocated']['wal'])})",
        ),
        ("", ""),
        ("machine: nproc / python", f"{m['nproc']} / {m['implementation']} {m['python']}"),
        (
            "  load average before worker / end",
            f"{(m.get('loadavg_before_worker') or ['?'])[0]} / "
            f"{(m.get('loadavg_at_end') or ['?'])[0]}",
        ),
        (
            "  faust / aiokafka / rocksdict",
            f"{m.get('faust-streaming')} / {m.get('aiokafka')} / {m.get('rocksdict')}",
        ),
        ("code", str(result.get("code", {}).get("commit", "?"))[:10]),
    ]
    width = max(len(k) for k, _ in rows) + 2
    lines = ["", "emarsys-stream users table state benchmark", "=" * (width + 40)]
    lines += [f"{k:<{width}}{v}" if k else "" for k, v in rows]
    lines.append("=" * (width + 40))
    return "\n".join(lines)


def run_state(opts: StateOptions) -> int:
    """Run the benchmark; returns a process exit code (0 ok, 1 failed, 130 interrupted)."""
    if opts.contacts < 1 or opts.partitions < 1:
        raise BenchError("--contacts and --partitions must be >= 1")
    tmp = Path(tempfile.mkdtemp(prefix="emarsys-bench-state-"))
    procs = _Processes()
    ok = False
    try:
        with _sigterm_as_interrupt():
            try:
                result = asyncio.run(_cancel_on_signals(_run(opts, procs, tmp)))
            except _Incomplete as exc:
                result = exc.result
            finally:
                procs.stop_all()
        print(format_table(result), flush=True)
        path = write_result(result, opts.results_dir, suffix="-state")
        print(f"results: {path}", flush=True)
        ok = bool(result["recovery"]["restored_every_record"])
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
            _log(f"work dir kept (logs, config, RocksDB data): {tmp}")


# ------------------------------------------------------------------------------ CLI


def add_parser(sub: Any, override: Any) -> None:
    p = sub.add_parser(
        "state",
        help="users table on RocksDB: bytes per contact, worker RSS, restore time from the "
        "changelog on a fresh worker",
        description="Write N users-table records straight to the users changelog (one record "
        "per batch), then start a worker with an empty data dir and time until its tables are "
        "recovered; report RocksDB bytes per contact and the worker's RSS.",
    )
    p.add_argument(
        "--contacts",
        type=int,
        default=None,
        help=f"users records (default {DEFAULT_CONTACTS:,}; --quick {QUICK_CONTACTS:,})",
    )
    p.add_argument("--quick", action="store_true", help=f"{QUICK_CONTACTS:,} contacts (< 1 min)")
    p.add_argument("--partitions", type=int, default=4, help="partitions of every topic (4)")
    p.add_argument("--seed", type=int, default=1, help="record generator seed (1)")
    p.add_argument(
        "--samples", type=int, default=200, help="keys read back with GET /users/{pk} (200)"
    )
    p.add_argument(
        "--records-per-request",
        type=int,
        default=4000,
        help="records per produce request, one per record batch (4000)",
    )
    p.add_argument("--in-flight", type=int, default=2, help="produce requests outstanding (2)")
    p.add_argument(
        "--raw-fetch-bytes",
        type=int,
        default=FAUST_FETCH_BYTES,
        help="bytes per partition per fetch of the reference read (1 MiB: Faust's "
        "consumer_max_fetch_size, what the worker's recovery fetches with)",
    )
    p.add_argument(
        "--no-raw-read",
        action="store_true",
        help="skip the reference read of the changelog with a plain consumer",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        type=override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a worker config key, e.g. --set worker.session_timeout=6",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=1800.0,
        help="give up when the worker is not ready this many seconds after start",
    )
    p.add_argument("--keep", action="store_true", help="keep the work dir after a good run")
    p.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where to write <timestamp>-state.json (bench/results)",
    )


def main(args: argparse.Namespace) -> int:
    opts = StateOptions(
        contacts=args.contacts or (QUICK_CONTACTS if args.quick else DEFAULT_CONTACTS),
        partitions=args.partitions,
        seed=args.seed,
        records_per_request=args.records_per_request,
        in_flight=args.in_flight,
        samples=args.samples,
        overrides=dict(args.overrides),
        ready_timeout=args.ready_timeout,
        raw_read=not args.no_raw_read,
        raw_fetch_bytes=args.raw_fetch_bytes,
        keep=args.keep,
        quick=args.quick,
        results_dir=args.results_dir,
    )
    return run_state(opts)
