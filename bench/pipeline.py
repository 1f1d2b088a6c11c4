"""End-to-end pipeline benchmark: Segment events on Kafka -> worker -> Emarsys simulator.

One run (see bench/README.md):

1. start the embedded broker (Tansu, loopback) and the Emarsys simulator in its own
   process (``python -m app.cli simulator --rate-limit 0``);
2. generate the events (:mod:`bench.generate`) and produce them to the ingest topic
   *before* any worker runs, so the worker works off a backlog;
3. baseline: read the same topic with a plain aiokafka consumer (``group_id=None``,
   every partition, to the end) and ``orjson.loads`` every value;
   second reference (unless ``naive=False``): the naive two-hop Faust app of
   :mod:`bench.naive_faust` on the same topic (own group, repartition topic and table),
   timed from its ``/health`` = 200 until its table agent has written every event;
4. start the worker(s) (``python -m app.cli worker --config ...``), wait for
   ``GET /health`` = 200 ("ready"), then measure until the simulator holds every expected
   contact, until the ingest topic is fully committed by the app's consumer group and
   until every agent topic is drained (committed offsets = end offsets);
5. print a table and write the figures to ``bench/results/<timestamp>.json``.

``rules=N`` (``--rules N``): the events use the shop vocabulary (``generate_events(...,
shop=True)``) and the worker gets ``N`` rules (:func:`bench.generate.build_rules`); after the
measurement the run counts the records on ``<prefix>.rule-matches``, the distinct trigger ids
the simulator received and the size of every contact's rule state (the latest value per key
of ``<app_id>-rule_state-changelog``). ``compare_rules``: two workers one after the other on
the same ingest topic, without and with the rules, each with its own app id (consumer group,
changelogs) and topic prefix; the simulator is reset in between. ``compare_workers``: the
same with 1 worker, then ``max(2, workers)`` workers.

Every process this module starts runs in its own session and is stopped (SIGTERM, then
SIGKILL) on exit, on errors and on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import orjson
import yaml

from app.broker import EMBEDDED_FETCH_MAX_WAIT_MS, EmbeddedBroker, free_port, wait_for_port
from bench.generate import GeneratedEvents, build_rules, generate_events, rule_time_unit
from bench.naive_faust import (
    NaiveSettings,
    NaiveStatus,
    count_keys,
    naive_argv,
    read_status,
    repartition_topic,
)

__all__ = ["BenchError", "PipelineOptions", "run_pipeline"]

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SIM_USER, SIM_SECRET = "sim-user", "sim-secret"
SECRET_ENV = "BENCH_EMARSYS_SECRET"
APP_ID = "emarsys-bench"
TOPIC_PREFIX = "bench"
INGEST_TOPIC = "bench.events"
#: The naive two-hop Faust reference (:mod:`bench.naive_faust`): its consumer group / app id.
NAIVE_APP_ID = f"{APP_ID}-naive"
#: Issue 5 targets, printed next to the measured ratios.
TARGET_NAIVE_RATIO = 3.5
TARGET_TWO_WORKERS_RATIO = 1.6
#: Topics the agents consume (besides the ingest topic), as ``settings.topic(name)`` names.
AGENT_TOPICS = ("identity", "contact-events", "emarsys-operations")
#: With rules: a topic is drained when its committed offsets reach its end (as without
#: rules) or, failing that, the end it had this many seconds earlier (> worker.commit_interval,
#: 2.8 s). Once the idle event clock follows wall time (rule_engine.idle_timeout after the
#: backlog), the rules agent's timers keep adding to contact-events (and triggers to
#: emarsys-operations), so those topics may never be at their very end when polled. The
#: ends are read only once the ingest topic is committed, so the second test cannot pass
#: before that plus this lag: it is an upper bound, the first test the measurement.
RULES_DRAIN_LAG = 4.0


class BenchError(RuntimeError):
    """The benchmark could not complete (the message says why)."""


@dataclass
class PipelineOptions:
    events: int = 200_000
    contacts: int = 50_000
    partitions: int = 4
    workers: int = 1
    store: str = "rocksdb://"
    seed: int = 1
    flush_interval: float = 1.0
    batch_size: int = 1000
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted config keys -> values for the worker YAML (``--set worker.batch_max=5000``)."""
    timeout: float = 1800.0
    """Give up this many seconds after the worker is ready."""
    stall_timeout: float = 120.0
    """Give up when nothing progressed for this many seconds."""
    baseline_runs: int = 2
    keep: bool = False
    """Keep the temporary directory (logs, configs, RocksDB data) after a successful run."""
    profile: Path | None = None
    """Record the worker with py-spy (if installed) into this SVG file."""
    quick: bool = False
    results_dir: Path = RESULTS_DIR
    rules: int = 0
    """Rules in the worker config (``bench.generate.build_rules``); > 0: shop events."""
    compare_rules: bool = False
    """Run the same input twice: without rules, then with ``rules`` rules."""
    rule_engine: dict[str, Any] = field(
        default_factory=lambda: {"allowed_lateness": "5m", "idle_timeout": "5s"}
    )
    """The worker's ``rule_engine`` section when it has rules."""
    rules_settle: float = 5.0
    """Seconds the worker keeps running after the measurement before the rule figures are
    read (trailing absences keep firing as the idle event clock follows wall time)."""
    naive: bool = True
    """Also measure the naive two-hop Faust pipeline (:mod:`bench.naive_faust`) on the
    same ingest topic, before the worker(s)."""
    compare_workers: bool = False
    """Run the same input with 1 worker, then with ``workers`` (at least 2) workers."""

    @property
    def compare_worker_counts(self) -> tuple[int, int]:
        """``compare_workers``: the worker counts of the two runs."""
        return 1, max(2, self.workers)


# ------------------------------------------------------------------------------ processes


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        if not self.alive():
            return
        # Started with start_new_session=True: its process group id is its pid.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(10)


class _Processes:
    """Everything started by a run; ``stop_all`` is safe to call more than once."""

    def __init__(self) -> None:
        self.procs: list[_Proc] = []
        self.broker: EmbeddedBroker | None = None

    def spawn(
        self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> _Proc:
        log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
        try:
            popen = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C goes to us; we stop the children
            )
        finally:
            log.close()
        proc = _Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        if self.broker is not None:
            with contextlib.suppress(Exception):
                self.broker.stop()
            self.broker = None


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Outside the event loop SIGTERM/SIGHUP raise KeyboardInterrupt (like Ctrl-C), so
    the cleanup in ``finally`` runs. Inside it, :func:`_cancel_on_signals` takes over."""
    previous = {}
    for sig in _STOP_SIGNALS:
        with contextlib.suppress(ValueError, OSError):  # not in the main thread
            previous[sig] = signal.signal(sig, _raise_interrupt)
    try:
        yield
    finally:
        for sig, old in previous.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, old)


async def _cancel_on_signals(coro: Any) -> Any:
    """Run ``coro``; SIGTERM/SIGHUP cancel it, so its ``finally`` blocks (closing
    sessions and consumers) run. asyncio.run already does the same for Ctrl-C."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    installed = []
    for sig in _STOP_SIGNALS:
        with contextlib.suppress(ValueError, OSError, RuntimeError, NotImplementedError):
            if task is not None:
                loop.add_signal_handler(sig, task.cancel)
                installed.append(sig)
    try:
        return await coro
    finally:
        for sig in installed:
            with contextlib.suppress(ValueError, OSError, RuntimeError):
                loop.remove_signal_handler(sig)  # resets to SIG_DFL...
                signal.signal(sig, _raise_interrupt)  # ...so put ours back


# ------------------------------------------------------------------------------ helpers


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (kB) of a process from /proc (empty if gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _helper_cpu(procs: _Processes) -> dict[str, float | None]:
    """CPU seconds so far of the broker, the simulator and this benchmark process (the
    producer, the lag poller): what shares the machine with the worker(s)."""
    out: dict[str, float | None] = {}
    if procs.broker is not None and procs.broker.pid is not None:
        out["broker"] = _cpu_seconds(procs.broker.pid)
    for proc in procs.procs:
        if proc.name == "simulator":
            out["simulator"] = _cpu_seconds(proc.pid)
    t = os.times()
    out["bench"] = t.user + t.system
    return out


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (from /proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks
    except (OSError, ValueError, IndexError):
        return None


def _machine_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError):
        facts["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                facts["mem_total_mb"] = int(line.split()[1]) // 1024
                break
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("faust-streaming", "aiokafka", "orjson", "rocksdict", "aiohttp"):
        try:
            facts[dist] = version(dist)
        except PackageNotFoundError:
            facts[dist] = None
    return facts


def _code_version() -> dict[str, Any]:
    """Git commit and uncommitted files of the checkout the workers run."""
    out: dict[str, Any] = {}
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return out
    if head.returncode == 0:
        out["commit"] = head.stdout.strip()
    if status.returncode == 0:
        out["uncommitted"] = [line[3:] for line in status.stdout.splitlines() if line[3:]]
    return out


def _set_dotted(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    node = cfg
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise BenchError(f"--set {dotted}: {part} is not a mapping")
        node = child
    node[parts[-1]] = value


def worker_config(
    opts: PipelineOptions,
    bootstrap: str,
    api_url: str,
    web_port: int,
    data_dir: Path,
    *,
    app_id: str = APP_ID,
    topic_prefix: str = TOPIC_PREFIX,
    rules: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The worker's YAML config (as data) for this run (``rules``: plus ``opts.rule_engine``)."""
    cfg: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "ingest_topic": INGEST_TOPIC,
            "dead_letter_topic": f"{INGEST_TOPIC}.dlq",
            "partitions": opts.partitions,
            "topic_prefix": topic_prefix,
            "app_id": app_id,
        },
        "emarsys": {
            "api_url": api_url,
            "auth": {"type": "wsse", "username": SIM_USER, "secret": f"${{{SECRET_ENV}}}"},
            "batch_size": opts.batch_size,
            "flush_interval": opts.flush_interval,
        },
        "identity": {
            "primary_key": {
                "paths": ["traits.email", "context.traits.email", "properties.email"],
                "field_id": 3,
                "normalize": ["trim", "lowercase"],
            }
        },
        "data_map": [
            {"from": "traits.firstName", "field_id": 1},
            {"from": "traits.lastName", "field_id": 2},
            {
                "from": ["traits.optIn", "context.traits.optIn"],
                "field_id": 31,
                "transform": "optin",
            },
            {"from": "traits.birthday", "field_id": 4, "transform": "date"},
        ],
        "web": {"host": "127.0.0.1", "port": web_port},
        "store": opts.store,
        "data_dir": str(data_dir),
        # What `run` sets for the embedded broker, which holds a fetch for much of its
        # wait even when records arrive; Apache Kafka answers as soon as there are
        # records, so this stands in for it (see worker.fetch_max_wait_ms).
        "worker": {"fetch_max_wait_ms": EMBEDDED_FETCH_MAX_WAIT_MS},
    }
    if rules:
        cfg["rules"] = rules
        cfg["rule_engine"] = dict(opts.rule_engine)
    for dotted, value in opts.overrides.items():
        _set_dotted(cfg, dotted, value)
    return cfg


def naive_settings(
    opts: PipelineOptions,
    bootstrap: str,
    web_port: int,
    work_dir: Path,
    expected: int,
) -> NaiveSettings:
    """The naive Faust app's settings for this run: the tuned settings of
    broker-and-baselines.md, which are the worker's defaults (``take(2000, within=0.05)``,
    ``max_poll_records`` 10,000, ``stream_buffer_maxsize`` 65,536), and every other
    Faust/aiokafka setting as the worker has it, ``--set worker.*`` included; also the
    worker's CPython GC thresholds (``worker.gc_thresholds``)."""
    from app.settings import WorkerSettings

    cfg = worker_config(opts, bootstrap, "http://127.0.0.1:1/", web_port, work_dir)
    w = WorkerSettings.model_validate(cfg.get("worker") or {})
    return NaiveSettings(
        bootstrap=bootstrap,
        topic=INGEST_TOPIC,
        app_id=NAIVE_APP_ID,
        partitions=opts.partitions,
        expected=expected,
        store=opts.store,
        data_dir=str(work_dir / "naive"),
        web_port=web_port,
        status_file=str(work_dir / "naive-status.json"),
        take_max=w.batch_max,
        take_within=w.batch_within,
        max_poll_records=w.max_poll_records,
        stream_buffer_maxsize=w.stream_buffer_maxsize,
        session_timeout=w.session_timeout,
        heartbeat_interval=w.heartbeat_interval,
        commit_interval=w.commit_interval,
        producer_linger_ms=w.producer_linger_ms,
        gc_thresholds=",".join(str(x) for x in w.gc_thresholds) if w.gc_thresholds else "",
        producer_max_batch_size=w.producer_max_batch_size,
        fetch_max_wait_ms=w.fetch_max_wait_ms or 0,
    )


def _parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value} (plus per-name sums under "name")."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        out[name_labels] = v
        base = name_labels.split("{", 1)[0]
        if "{" in name_labels:
            out[base] = out.get(base, 0.0) + v
    return out


# ------------------------------------------------------------------------------ kafka


async def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, events: list[bytes]) -> tuple[float, dict[int, int]]:
    """Produce ``events`` (no key, like ``emarsys-stream send``).

    Returns (seconds, end offset per partition). The end offsets come from the produce
    acknowledgements: the embedded broker's ``ListOffsets`` (``end_offsets()``) answers
    with an offset below the real end, so nothing here relies on it.
    """
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    ends: dict[int, int] = {}

    def note(metas: list[Any]) -> None:
        for meta in metas:
            if meta.offset + 1 > ends.get(meta.partition, 0):
                ends[meta.partition] = meta.offset + 1

    try:
        started = time.perf_counter()
        futures: list[Any] = []
        for raw in events:
            futures.append(await producer.send(topic, raw))
            if len(futures) >= 5000:
                note(await asyncio.gather(*futures))
                futures.clear()
        note(await asyncio.gather(*futures))
        return time.perf_counter() - started, ends
    finally:
        await producer.stop()


async def raw_consume(bootstrap: str, topic: str, ends: dict[int, int]) -> tuple[float, int]:
    """Read every partition of ``topic`` up to ``ends`` with ``getmany`` + ``orjson.loads``.

    Returns (seconds, records). The clock starts after the consumer is connected and
    positioned, i.e. it measures fetching and parsing only.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(ends)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        for tp in tps:  # resolve the positions before the clock starts
            await consumer.position(tp)
        remaining = {tp for tp in tps if ends[tp.partition] > 0}
        expect = sum(ends.values())
        count = 0
        loads = orjson.loads
        started = time.perf_counter()
        deadline = started + 300
        while remaining and time.perf_counter() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for tp, records in batch.items():
                for rec in records:
                    loads(rec.value)
                count += len(records)
                if records and records[-1].offset + 1 >= ends[tp.partition]:
                    remaining.discard(tp)
        seconds = time.perf_counter() - started
        if count != expect:
            raise BenchError(f"baseline read {count} records of {topic}, expected {expect}")
        return seconds, count
    finally:
        await consumer.stop()


async def high_watermarks(bootstrap: str, positions: dict[Any, int]) -> dict[Any, int]:
    """End offsets (high watermarks) of the given partitions, from Fetch responses.

    ``positions`` maps TopicPartition -> an offset at or below the end (e.g. the group's
    committed offset); a fresh consumer fetches from there once per partition.
    """
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign(list(positions))
        for tp, offset in positions.items():
            consumer.seek(tp, offset)
        found: dict[Any, int] = {}
        deadline = time.monotonic() + 10
        while len(found) < len(positions) and time.monotonic() < deadline:
            await consumer.getmany(timeout_ms=100, max_records=1)
            for tp in positions:
                hw = consumer.highwater(tp)
                if hw is not None:
                    found[tp] = hw
        return found
    finally:
        await consumer.stop()


async def read_topic(
    bootstrap: str, topic: str, quiet: float = 2.0, limit: float = 300.0
) -> list[tuple[bytes | None, bytes | None]]:
    """The records (key, value) of ``topic`` from the beginning, in partition order.

    A partition is read up to the high watermark its first Fetch response reports (a
    snapshot: the worker may still be writing), or until no record of it arrived for
    ``quiet`` seconds; at most ``limit`` seconds in all. (``end_offsets()`` is not used:
    the embedded broker answers it with an offset below the real end, see
    :func:`produce`.) Empty if the topic does not exist.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()
        parts = sorted(cluster.partitions_for_topic(topic) or ())
        if not parts:
            return []
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[tuple[bytes | None, bytes | None]] = []
        started = time.monotonic()
        last = dict.fromkeys(tps, started)
        position = dict.fromkeys(tps, 0)
        target: dict[Any, int] = {}
        pending = set(tps)
        while pending and time.monotonic() - started < limit:
            batch = await consumer.getmany(*pending, timeout_ms=250, max_records=10_000)
            now = time.monotonic()
            for tp, records in batch.items():
                out.extend((rec.key, rec.value) for rec in records)
                if records:
                    last[tp] = now
                    position[tp] = records[-1].offset + 1
            for tp in list(pending):
                if tp not in target:
                    hw = consumer.highwater(tp)
                    if hw is not None:
                        target[tp] = hw
                reached = tp in target and position[tp] >= target[tp]
                if reached or now - last[tp] >= quiet:
                    pending.discard(tp)
        return out
    finally:
        await consumer.stop()


class GroupLag:
    """Committed offsets of a consumer group, read without joining the group.

    (``AIOKafkaAdminClient.list_consumer_group_offsets`` does not work on the embedded
    broker; a consumer with the group's id answers ``committed()`` without subscribing.)
    """

    def __init__(
        self, bootstrap: str, group_id: str, topic_groups: dict[str, str] | None = None
    ) -> None:
        self.bootstrap = bootstrap
        self.group_id = group_id
        #: topic -> the group that reads it, where that is not ``group_id`` (the worker's
        #: ingest topic is read by ``<app_id>-ingest``, see agents/ingest.py).
        self.topic_groups = dict(topic_groups or {})
        self._consumer: Any = None
        self._others: dict[str, Any] = {}
        self._partitions: dict[str, list[int]] = {}

    @property
    def consumer(self) -> Any:
        if self._consumer is None:
            raise BenchError("GroupLag is not started")
        return self._consumer

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group_id, enable_auto_commit=False
        )
        await consumer.start()  # no subscribe(): it never joins the group
        self._consumer = consumer
        for group in sorted(set(self.topic_groups.values())):
            other = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap, group_id=group, enable_auto_commit=False
            )
            await other.start()
            self._others[group] = other

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        others, self._others = self._others, {}
        for c in [consumer, *others.values()]:
            if c is not None:
                await c.stop()

    async def partitions(self, topic: str) -> list[int]:
        """Partitions of ``topic`` (empty until the worker has created it)."""
        if topic not in self._partitions:
            cluster = await self.consumer._client.fetch_all_metadata()
            found = cluster.partitions_for_topic(topic)
            if not found:
                return []
            self._partitions[topic] = sorted(found)
        return self._partitions[topic]

    async def committed(self, topic: str) -> dict[int, int] | None:
        """Committed offset per partition of ``topic`` (0 if none); None if no topic yet."""
        from aiokafka import TopicPartition

        parts = await self.partitions(topic)
        if not parts:
            return None
        group = self.topic_groups.get(topic)
        consumer = self.consumer if group is None else self._others[group]
        out: dict[int, int] = {}
        for p in parts:
            out[p] = await consumer.committed(TopicPartition(topic, p)) or 0
        return out

    async def ends(self, committed: dict[str, dict[int, int]]) -> dict[str, dict[int, int]]:
        """High watermarks of the same partitions (fetched from the committed offsets)."""
        from aiokafka import TopicPartition

        positions = {
            TopicPartition(t, p): off for t, parts in committed.items() for p, off in parts.items()
        }
        if not positions:
            return {}
        hws = await high_watermarks(self.bootstrap, positions)
        out: dict[str, dict[int, int]] = {}
        for tp, hw in hws.items():
            out.setdefault(tp.topic, {})[tp.partition] = hw
        return out


# ------------------------------------------------------------------------------ the run


@dataclass
class _Worker:
    index: int
    proc: _Proc
    web_port: int
    config_path: Path
    ready_at: float | None = None
    peak_rss_kb: int = 0
    cpu_at_ready: float | None = None
    label: str = ""
    """How logs name it ("worker <index>" if empty)."""

    @property
    def name(self) -> str:
        return self.label or f"worker {self.index}"


async def _get_json(session: aiohttp.ClientSession, url: str, timeout: float = 30.0) -> Any:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        resp.raise_for_status()
        return orjson.loads(await resp.read())


async def _wait_ready(
    session: aiohttp.ClientSession, workers: list[_Worker], timeout: float = 180.0
) -> None:
    deadline = time.monotonic() + timeout
    pending = list(workers)
    while pending:
        if time.monotonic() > deadline:
            raise BenchError(f"worker(s) not ready within {timeout:.0f}s")
        for w in list(pending):
            if not w.proc.alive():
                raise _WorkerDied(w)
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                url = f"http://127.0.0.1:{w.web_port}/health"
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        w.ready_at = time.monotonic()
                        w.cpu_at_ready = _cpu_seconds(w.proc.pid)
                        pending.remove(w)
        await asyncio.sleep(0.05)


class _WorkerDied(BenchError):
    def __init__(self, worker: _Worker) -> None:
        self.worker = worker
        super().__init__(
            f"{worker.name} (pid {worker.proc.pid}) exited with code {worker.proc.popen.returncode}"
        )


#: py-spy output format by file suffix (anything else: flamegraph SVG).
_PROFILE_FORMATS = {".txt": "raw", ".json": "speedscope", ".svg": "flamegraph"}


def _py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else None


def _py_spy_dump(pid: int) -> str:
    exe = _py_spy()
    if exe is None:
        return "(py-spy not installed: pip install py-spy for a stack dump)"
    try:
        done = subprocess.run(
            [exe, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(py-spy dump failed: {exc})"
    return (done.stdout + done.stderr).strip()


async def _run(opts: PipelineOptions, procs: _Processes, tmp: Path) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        return await _run_with(opts, procs, tmp, session)


@dataclass
class _Variant:
    """One worker run on the shared ingest topic."""

    label: str
    """"" for a single run; "without rules" / "with rules" with ``compare_rules``,
    "1 worker" / "2 workers" with ``compare_workers``."""
    app_id: str
    topic_prefix: str
    rules: list[dict[str, Any]]
    workers: int = 1

    @property
    def slug(self) -> str:
        """File-name prefix in the work dir."""
        return "" if not self.label else self.label.replace(" ", "-") + "-"


async def _run_with(
    opts: PipelineOptions, procs: _Processes, tmp: Path, session: aiohttp.ClientSession
) -> dict[str, Any]:
    if opts.compare_rules and opts.rules < 1:
        raise BenchError("--compare-rules needs --rules N with N >= 1")
    shop = opts.rules > 0
    result: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "options": {
            "events": opts.events,
            "contacts": opts.contacts,
            "partitions": opts.partitions,
            "workers": opts.workers,
            "store": opts.store,
            "seed": opts.seed,
            "flush_interval": opts.flush_interval,
            "batch_size": opts.batch_size,
            "overrides": opts.overrides,
            "quick": opts.quick,
            "rules": opts.rules,
            "compare_rules": opts.compare_rules,
            "rule_engine": opts.rule_engine if shop else None,
            "rules_settle": opts.rules_settle if shop else None,
            "naive": opts.naive,
            "compare_workers": opts.compare_workers,
            "compare_worker_counts": list(opts.compare_worker_counts)
            if opts.compare_workers
            else None,
        },
        "machine": _machine_facts(),
        "code": _code_version(),
    }

    # 1. broker + simulator ---------------------------------------------------------
    procs.broker = EmbeddedBroker(log_path=tmp / "broker.log").start()
    bootstrap = procs.broker.bootstrap_servers
    sim_port = free_port()
    sim = procs.spawn(
        "simulator",
        [
            sys.executable,
            "-m",
            "app.cli",
            "simulator",
            "--port",
            str(sim_port),
            "--rate-limit",
            "0",
        ],
        tmp / "simulator.log",
    )
    if not await asyncio.to_thread(wait_for_port, "127.0.0.1", sim_port, 30.0):
        raise BenchError(f"the simulator did not listen within 30s:\n{sim.log_tail()}")
    sim_base = f"http://127.0.0.1:{sim_port}"
    _log(f"broker {bootstrap}, simulator {sim_base} (pid {sim.pid}), work dir {tmp}")

    # 2. events ---------------------------------------------------------------------
    t0 = time.perf_counter()
    gen: GeneratedEvents = generate_events(opts.events, opts.contacts, seed=opts.seed, shop=shop)
    gen_seconds = time.perf_counter() - t0
    expected = len(gen.expected_emails)
    unit_s = rule_time_unit(gen)
    rules = build_rules(opts.rules, unit_s) if shop else []
    result["generated"] = {
        "events": len(gen.events),
        "by_type": dict(gen.counts),
        "people": gen.contacts,
        "identified_contacts": gen.identified,
        "anonymous_first": gen.anonymous_first,
        "anonymous_only_visitors": gen.anonymous_only,
        "expected_contacts": expected,
        "mean_event_bytes": round(gen.mean_bytes, 1),
        "seconds": round(gen_seconds, 2),
        "shop": shop,
        "event_time_span_s": round((gen.last_ts_ms - gen.first_ts_ms) / 1000, 1),
        "rule_time_unit_s": unit_s,
    }
    if shop:
        result["rules_config"] = rules
    _log(
        f"generated {len(gen.events):,} events ({dict(gen.counts)}), mean "
        f"{gen.mean_bytes:.0f} B, {gen.contacts:,} people, {expected:,} with an email "
        f"({gen.anonymous_first:,} anonymous-first) in {gen_seconds:.1f}s"
        + (
            f"; shop events, {len(rules)} rules, time unit {unit_s}s of "
            f"{result['generated']['event_time_span_s']:,.0f}s event time"
            if shop
            else ""
        )
    )

    # 3. produce + baseline ---------------------------------------------------------
    await _create_topic(bootstrap, INGEST_TOPIC, opts.partitions)
    produce_s, ingest_ends = await produce(bootstrap, INGEST_TOPIC, gen.events)
    n_events = len(gen.events)
    if sum(ingest_ends.values()) != n_events:
        raise BenchError(
            f"produced {n_events} events but the offsets say {sum(ingest_ends.values())}"
        )
    result["produce"] = {
        "seconds": round(produce_s, 3),
        "events_per_s": round(n_events / produce_s),
    }
    _log(f"produced {n_events:,} events in {produce_s:.2f}s ({n_events / produce_s:,.0f}/s)")
    expected_fields = gen.expected_fields
    expected_emails = gen.expected_emails
    naive_keys = count_keys(gen.events) if opts.naive else 0
    del gen  # the raw events are on the topic now; free the memory

    runs: list[float] = []
    for _ in range(max(1, opts.baseline_runs)):
        seconds, _count = await raw_consume(bootstrap, INGEST_TOPIC, ingest_ends)
        runs.append(seconds)
    raw_rate = n_events / min(runs)
    result["baseline"] = {
        "runs_seconds": [round(s, 3) for s in runs],
        "events_per_s": round(raw_rate),
    }
    _log(
        f"baseline aiokafka getmany + orjson.loads: {raw_rate:,.0f} events/s "
        f"(best of {len(runs)}: {', '.join(f'{s:.2f}s' for s in runs)})"
    )

    # 4. the naive two-hop Faust reference ---------------------------------------------
    naive_rate: float | None = None
    if opts.naive:
        try:
            result["naive"] = await _naive_run(
                opts,
                procs,
                tmp,
                session,
                bootstrap=bootstrap,
                n_events=n_events,
                expected_keys=naive_keys,
                raw_rate=raw_rate,
            )
            naive_rate = result["naive"]["events_per_s"]
        except BenchError as exc:  # the worker run(s) still count; the exit code is 1
            _log(f"naive Faust reference FAILED: {exc}")
            result["naive"] = {"app_id": NAIVE_APP_ID, "error": str(exc)}

    # 5. worker run(s) --------------------------------------------------------------
    variants = _variants(opts, rules)
    done: list[dict[str, Any]] = []
    for k, variant in enumerate(variants):
        if k:
            async with session.post(f"{sim_base}/_sim/reset") as resp:
                resp.raise_for_status()
            _log(f"simulator reset; next run: {variant.label}")
        try:
            done.append(
                await _worker_run(
                    opts,
                    procs,
                    tmp,
                    session,
                    variant,
                    bootstrap=bootstrap,
                    sim_base=sim_base,
                    n_events=n_events,
                    expected_emails=expected_emails,
                    expected_fields=expected_fields,
                    raw_rate=raw_rate,
                    profile=k == len(variants) - 1,
                )
            )
        except BenchError as exc:
            if len(variants) == 1:
                raise
            # A comparison keeps the other run's figures (the exit code is 1).
            _log(f"run {variant.label!r} FAILED: {exc}")
            done.append(
                {
                    "label": variant.label,
                    "app_id": variant.app_id,
                    "topic_prefix": variant.topic_prefix,
                    "workers": variant.workers,
                    "error": str(exc),
                }
            )
    good = [run for run in done if "error" not in run]
    if not good:
        raise BenchError("; ".join(f"{run['label']}: {run['error']}" for run in done))
    for run in good:
        run["pipeline"]["ratio_to_naive"] = _ratio(run["pipeline"]["events_per_s"], naive_rate)
        run["pipeline"].update(_secondary_ratios_to_naive(run, result.get("naive")))

    with contextlib.suppress(OSError):
        result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    last = good[-1]
    for key in ("worker", "pipeline", "emarsys", "rules"):
        if key in last:
            result[key] = last[key]
    if len(variants) > 1:
        result["runs"] = done
        result["comparison"] = _comparison(
            done[0], done[1], kind="workers" if opts.compare_workers else "rules"
        )
    return result


def _ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference, rounded; None if either is missing or zero."""
    return None if not value or not reference else round(value / reference, 4)


def _secondary_ratios_to_naive(
    run: dict[str, Any], naive: dict[str, Any] | None
) -> dict[str, float | None]:
    """Two more ways to compare a worker run with the naive app (None where a figure is
    missing); > 1 means the worker is faster. Both count all the work of every event:

    - ``drained_ratio_to_naive``: naive ready -> repartition topic committed / worker ready
      -> every agent topic drained (both from committed offsets, polled the same way). The
      headline clock stops when the simulator has every contact, which can be before the
      worker has processed every event (events of people without an email never reach
      Emarsys);
    - ``cpu_ratio_to_naive``: events per CPU second: naive CPU s / worker CPU s (summed over
      workers), both from ready to the end of their measurement (= drained / committed);
      less sensitive than wall time to other load on the machine.
    """
    out: dict[str, float | None] = {"drained_ratio_to_naive": None, "cpu_ratio_to_naive": None}
    if not naive or "error" in naive:
        return out
    out["drained_ratio_to_naive"] = _ratio(
        naive.get("seconds_to_repartition_committed"),
        run["pipeline"].get("seconds_to_all_topics_drained"),
    )
    ours = run["worker"].get("cpu_seconds_after_ready") or []
    if ours and all(v is not None for v in ours):
        out["cpu_ratio_to_naive"] = _ratio(naive.get("cpu_seconds_after_ready"), sum(ours))
    return out


def _variants(opts: PipelineOptions, rules: list[dict[str, Any]]) -> list[_Variant]:
    """The worker runs of one benchmark, in order (each with its own app id / topics)."""
    if opts.compare_rules and opts.compare_workers:
        raise BenchError("--compare-rules and --compare-workers do not combine")
    if opts.compare_rules:
        return [
            _Variant(
                "without rules", f"{APP_ID}-norules", f"{TOPIC_PREFIX}-norules", [], opts.workers
            ),
            _Variant("with rules", f"{APP_ID}-rules", f"{TOPIC_PREFIX}-rules", rules, opts.workers),
        ]
    if opts.compare_workers:
        return [
            _Variant(
                f"{n} worker{'s' if n > 1 else ''}",
                f"{APP_ID}-{n}w",
                f"{TOPIC_PREFIX}-{n}w",
                rules,
                n,
            )
            for n in opts.compare_worker_counts
        ]
    return [_Variant("", APP_ID, TOPIC_PREFIX, rules, opts.workers)]


async def _worker_run(
    opts: PipelineOptions,
    procs: _Processes,
    tmp: Path,
    session: aiohttp.ClientSession,
    variant: _Variant,
    *,
    bootstrap: str,
    sim_base: str,
    n_events: int,
    expected_emails: set[str],
    expected_fields: dict[str, dict[str, Any]],
    raw_rate: float,
    profile: bool,
) -> dict[str, Any]:
    """Start the worker(s) of one variant, measure, read the figures, stop the worker(s)."""
    expected = len(expected_emails)
    run: dict[str, Any] = {
        "label": variant.label,
        "app_id": variant.app_id,
        "topic_prefix": variant.topic_prefix,
        "rules_count": len(variant.rules),
        "workers": variant.workers,
    }
    workers: list[_Worker] = []
    env = {**os.environ, SECRET_ENV: SIM_SECRET, "PYTHONUNBUFFERED": "1"}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    for i in range(variant.workers):
        port = free_port()
        name = f"{variant.slug}worker{i}"
        cfg = worker_config(
            opts,
            bootstrap,
            f"{sim_base}/api/v2/",
            port,
            tmp / name,
            app_id=variant.app_id,
            topic_prefix=variant.topic_prefix,
            rules=variant.rules,
        )
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        proc = procs.spawn(
            name,
            [sys.executable, "-m", "app.cli", "worker", "--config", str(path)],
            tmp / f"{name}.log",
            env,
        )
        workers.append(_Worker(i, proc, port, path))
    spawned_at = time.monotonic()
    what = f" ({variant.label}, app id {variant.app_id})" if variant.label else ""
    _log(
        f"started {variant.workers} worker(s){what}: "
        f"pid {', '.join(str(w.proc.pid) for w in workers)}"
    )

    profiler: subprocess.Popen[bytes] | None = None
    lag = GroupLag(bootstrap, variant.app_id, {INGEST_TOPIC: f"{variant.app_id}-ingest"})
    try:
        try:
            await _wait_ready(session, workers)
            await lag.start()  # after ready: nothing of ours touches the group during the join
            ready_at = max(w.ready_at or 0.0 for w in workers)
            helpers_at_ready = _helper_cpu(procs)
            _log(f"worker(s) ready {ready_at - spawned_at:.2f}s after start; measuring")
            if opts.profile is not None and profile:
                profiler = _start_profiler(opts.profile, workers[0].proc.pid)
            timeline = await _measure(
                opts,
                session,
                sim_base,
                lag,
                workers,
                ready_at,
                n_events,
                expected,
                variant.topic_prefix,
                drain_lag=RULES_DRAIN_LAG if variant.rules else 0.0,
            )
        finally:
            if profiler is not None and profiler.poll() is None:
                profiler.send_signal(signal.SIGINT)  # py-spy writes the file on SIGINT
                with contextlib.suppress(subprocess.TimeoutExpired):
                    profiler.wait(60)
            await lag.stop()
        helpers_at_end = _helper_cpu(procs)
        run.update(
            await _figures(
                opts,
                session,
                sim_base,
                workers,
                timeline,
                ready_at=ready_at,
                spawned_at=spawned_at,
                n_events=n_events,
                expected_emails=expected_emails,
                expected_fields=expected_fields,
                raw_rate=raw_rate,
            )
        )
        # What else shared the 2 cores from ready to the end of the measurement.
        helper_cpu: dict[str, float] = {}
        for name, at in helpers_at_ready.items():
            end = helpers_at_end.get(name)
            if at is not None and end is not None:
                helper_cpu[name] = round(end - at, 1)
        run["worker"]["helper_cpu_seconds_after_ready"] = helper_cpu
        if variant.rules:
            run["rules"] = await _rule_figures(
                opts, session, sim_base, bootstrap, variant, workers, timeline
            )
    except _WorkerDied as died:
        w = died.worker
        _log(f"{died}; last lines of its log ({w.proc.log_path}):")
        print(w.proc.log_tail(80), flush=True)
        raise
    finally:  # also after a failure: a next run must not share the CPU with these
        for w in workers:
            w.proc.stop()
    return run


async def _naive_run(
    opts: PipelineOptions,
    procs: _Processes,
    tmp: Path,
    session: aiohttp.ClientSession,
    *,
    bootstrap: str,
    n_events: int,
    expected_keys: int,
    raw_rate: float,
) -> dict[str, Any]:
    """Run the naive two-hop Faust app (:mod:`bench.naive_faust`, one process, own group)
    on the ingest topic and time it from ready (``/health`` = 200, like the worker) until
    its table agent has written the last event (``done_at`` of its status file)."""
    port = free_port()
    ns = naive_settings(opts, bootstrap, port, tmp, n_events)
    settings_path = tmp / "naive.json"
    settings_path.write_bytes(orjson.dumps(dataclasses.asdict(ns), option=orjson.OPT_INDENT_2))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = procs.spawn("naive", [sys.executable, *naive_argv(ns)], tmp / "naive.log", env)
    app = _Worker(0, proc, port, settings_path, label="naive Faust app")
    spawned_at = time.monotonic()
    _log(
        f"started the naive two-hop Faust app (app id {ns.app_id}, pid {proc.pid}): "
        f"ingest -> {repartition_topic(ns.app_id)} -> table, store {ns.store}"
    )
    lag = GroupLag(bootstrap, ns.app_id)
    try:
        await _wait_ready(session, [app])
        ready_at = app.ready_at or time.monotonic()
        _log(f"naive app ready {ready_at - spawned_at:.2f}s after start; measuring")
        await lag.start()
        try:
            timeline = await _naive_measure(
                opts, lag, app, Path(ns.status_file), ready_at, n_events, ns.app_id
            )
        finally:
            await lag.stop()
    except _WorkerDied as died:
        _log(f"{died}; last lines of its log ({proc.log_path}):")
        print(proc.log_tail(80), flush=True)
        raise
    finally:
        proc.stop()
    status: NaiveStatus = timeline["status"]
    done_at = timeline["done_at"]
    secs = done_at - ready_at
    cpu_done = timeline.get("cpu_at_done")
    cpu_end = timeline.get("cpu_at_end")

    def since_ready(at: float | None) -> float | None:
        return None if at is None else round(at - ready_at, 3)

    def cpu_since_ready(cpu: float | None) -> float | None:
        return None if cpu is None or app.cpu_at_ready is None else round(cpu - app.cpu_at_ready, 1)

    naive_rate = n_events / secs if secs > 0 else None
    out: dict[str, Any] = {
        "app_id": ns.app_id,
        "repartition_topic": repartition_topic(ns.app_id),
        "settings": dataclasses.asdict(ns),
        "startup_seconds": round(ready_at - spawned_at, 2),
        "seconds_to_all_processed": round(secs, 3),
        "events_per_s": None if naive_rate is None else round(naive_rate),
        "events_per_s_from_spawn": round(n_events / (done_at - spawned_at)),
        "ratio_to_baseline": _ratio(naive_rate, raw_rate),
        "seconds_to_first_event": since_ready(status.first_event_at),
        "seconds_to_ingest_committed": since_ready(timeline.get("ingest_at")),
        "seconds_to_repartition_committed": since_ready(timeline.get("repartition_at")),
        "rekeyed": status.rekeyed,
        "processed": status.processed,
        "table_keys": status.new_keys,
        "expected_table_keys": expected_keys,
        "peak_rss_mb": round(app.peak_rss_kb / 1024, 1),
        "cpu_seconds_ready_to_all_processed": cpu_since_ready(cpu_done),
        "cpu_seconds_after_ready": cpu_since_ready(cpu_end),
        "progress": timeline["progress"],
    }
    _log(
        f"naive app processed all {n_events:,} events {secs:.2f}s after ready "
        f"({out['events_per_s']:,} events/s); table keys {status.new_keys:,} "
        f"(expected {expected_keys:,})"
    )
    return out


async def _naive_measure(
    opts: PipelineOptions,
    lag: GroupLag,
    app: _Worker,
    status_path: Path,
    ready_at: float,
    n_events: int,
    app_id: str,
) -> dict[str, Any]:
    """Poll the naive app's status file (every 0.1 s) and its group's committed offsets
    (every 1 s) until it has processed every event and committed the repartition topic."""
    topics = (INGEST_TOPIC, repartition_topic(app_id))
    timeline: dict[str, Any] = {"progress": []}
    committed: dict[str, int] = {}
    last_change = time.monotonic()
    last_snapshot: tuple[Any, ...] = ()
    next_lag = 0.0
    next_print = time.monotonic() + 5.0
    commit_grace = 30.0
    status = NaiveStatus(pid=app.proc.pid)
    while True:
        if not app.proc.alive():
            raise _WorkerDied(app)
        app.peak_rss_kb = max(app.peak_rss_kb, _proc_status(app.proc.pid).get("VmHWM", 0))
        status = read_status(status_path) or status
        now = time.monotonic()
        if status.done_at is not None and "done_at" not in timeline:
            timeline["done_at"] = status.done_at
            timeline["cpu_at_done"] = _cpu_seconds(app.proc.pid)
        if now >= next_lag:
            next_lag = now + 1.0
            for topic in topics:
                got = await lag.committed(topic)
                if got is not None:
                    committed[topic] = sum(got.values())
            now = time.monotonic()
            for topic, key in zip(topics, ("ingest_at", "repartition_at"), strict=True):
                if committed.get(topic, 0) >= n_events and key not in timeline:
                    timeline[key] = now
            timeline["progress"].append(
                {
                    "t": round(now - ready_at, 2),
                    "rekeyed": status.rekeyed,
                    "processed": status.processed,
                    "committed": dict(committed),
                    "rss_mb": round(_proc_status(app.proc.pid).get("VmRSS", 0) / 1024),
                    "cpu_s": _cpu_seconds(app.proc.pid),
                }
            )
        snapshot = (status.rekeyed, status.processed, tuple(committed.values()))
        if snapshot != last_snapshot:
            last_snapshot = snapshot
            last_change = now
        if now >= next_print:
            next_print = now + 5.0
            _log(
                f"naive t={now - ready_at:6.1f}s  re-keyed {status.rekeyed:,}/{n_events:,}, "
                f"in table {status.processed:,}/{n_events:,}; committed: "
                + "; ".join(f"{t} {committed.get(t, 0):,}" for t in topics)
            )
        if "done_at" in timeline and "repartition_at" in timeline:
            break
        if "done_at" in timeline and now - timeline["done_at"] > commit_grace:
            _log(f"naive app: repartition topic not committed {commit_grace:.0f}s after done")
            break
        if now - ready_at > opts.timeout:
            _stuck([app], f"naive app not finished {opts.timeout:.0f}s after it was ready")
        if now - last_change > opts.stall_timeout:
            _stuck([app], f"naive app: no progress for {opts.stall_timeout:.0f}s")
        await asyncio.sleep(0.1)
    timeline["cpu_at_end"] = _cpu_seconds(app.proc.pid)
    timeline["status"] = status
    return timeline


def _start_profiler(output: Path, pid: int) -> subprocess.Popen[bytes] | None:
    exe = _py_spy()
    if exe is None:
        _log("--profile: py-spy is not installed (pip install py-spy); not profiling")
        return None
    output.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "50",
            "--nonblocking",
            "--format",
            _PROFILE_FORMATS.get(output.suffix.lower(), "flamegraph"),
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


async def _figures(
    opts: PipelineOptions,
    session: aiohttp.ClientSession,
    sim_base: str,
    workers: list[_Worker],
    timeline: dict[str, Any],
    *,
    ready_at: float,
    spawned_at: float,
    n_events: int,
    expected_emails: set[str],
    expected_fields: dict[str, dict[str, Any]],
    raw_rate: float,
) -> dict[str, Any]:
    """The worker / pipeline / emarsys figures of one run, right after the measurement."""
    expected = len(expected_emails)
    for w in workers:
        w.peak_rss_kb = max(w.peak_rss_kb, _proc_status(w.proc.pid).get("VmHWM", 0))
    cpu = [_cpu_seconds(w.proc.pid) for w in workers]
    calls = await _get_json(session, f"{sim_base}/_sim/calls?method=PUT&path=/contact")
    upserts = [c for c in calls if c["path"].rstrip("/").endswith("/contact")]
    ok_upserts = [c for c in upserts if c["status"] == 200]
    sent_contacts = sum(len((c.get("body") or {}).get("contacts") or []) for c in ok_upserts)
    stats = await _get_json(session, f"{sim_base}/_sim/stats")
    contacts = await _get_json(session, f"{sim_base}/_sim/contacts", timeout=120)
    metrics = await _worker_metrics(session, workers)

    got_emails: dict[str, dict[str, Any]] = {}
    for c in contacts:
        email = (c.get("fields") or {}).get("3")
        if isinstance(email, str):
            got_emails[email] = c["fields"]
    missing = expected_emails - got_emails.keys()
    extra = got_emails.keys() - expected_emails
    wrong_fields = 0
    wrong_examples: list[dict[str, Any]] = []
    for email, want in expected_fields.items():
        have = got_emails.get(email)
        if have is None:
            continue
        if any(str(have.get(k)) != str(v) for k, v in want.items()):
            wrong_fields += 1
            if len(wrong_examples) < 5:
                wrong_examples.append(
                    {"email": email, "expected": want, "got": {k: have.get(k) for k in want}}
                )

    secs = timeline["contacts_at"] - ready_at if timeline.get("contacts_at") else None
    out: dict[str, Any] = {}
    out["worker"] = {
        "count": len(workers),
        "startup_seconds": round(ready_at - spawned_at, 2),
        "peak_rss_mb": [round(w.peak_rss_kb / 1024, 1) for w in workers],
        "cpu_seconds_total": [None if c is None else round(c, 1) for c in cpu],
        "cpu_seconds_after_ready": [
            None if c is None or w.cpu_at_ready is None else round(c - w.cpu_at_ready, 1)
            for c, w in zip(cpu, workers, strict=True)
        ],
        "cpu_seconds_ready_to_all_contacts": [
            None if c is None or w.cpu_at_ready is None else round(c - w.cpu_at_ready, 1)
            for c, w in zip(
                timeline.get("cpu_at_contacts") or [None] * len(workers), workers, strict=True
            )
        ],
        # The cyclic GC's share of cpu_seconds_total (start-up included), all workers.
        "gc_seconds": round(
            sum(v for k, v in metrics.items() if k.startswith("emarsys_stream_gc_seconds_total{")),
            2,
        ),
        "metrics": {
            k: v
            for k, v in metrics.items()
            if k.startswith("emarsys_stream_") and "{" not in k and not k.endswith("_created")
        },
    }

    def since_ready(key: str) -> float | None:
        at = timeline.get(key)
        return None if at is None else round(at - ready_at, 3)

    out["pipeline"] = {
        "seconds_to_all_contacts": None if secs is None else round(secs, 3),
        "events_per_s": None if not secs else round(n_events / secs),
        "events_per_s_from_spawn": None
        if not timeline.get("contacts_at")
        else round(n_events / (timeline["contacts_at"] - spawned_at)),
        "seconds_to_ingest_committed": since_ready("ingest_at"),
        "seconds_to_users_caught_up": since_ready("users_at"),
        "seconds_to_all_topics_drained": since_ready("drained_at"),
        # "end", or with rules "end 4s earlier" (RULES_DRAIN_LAG)
        "drained_how": timeline.get("drained_how"),
        "seconds_to_first_upsert": since_ready("first_upsert_at"),
        "ratio_to_baseline": None if not secs else round(n_events / secs / raw_rate, 4),
        "progress": timeline["progress"],
        "agent_topic_offsets": timeline.get("offsets", {}),
    }
    min_calls = math.ceil(expected / opts.batch_size) if expected else 0
    out["emarsys"] = {
        "expected_contacts": expected,
        "contacts_in_simulator": len(contacts),
        "missing_contacts": len(missing),
        "unexpected_contacts": len(extra),
        "contacts_with_wrong_fields": wrong_fields,
        "wrong_field_examples": wrong_examples,
        "upsert_calls": len(upserts),
        "upsert_calls_ok": len(ok_upserts),
        "upsert_calls_minimum": min_calls,
        # The minimum: ceil(distinct contacts changed per flush / batch_size),
        # summed over the worker's flushes (counted by the output agent).
        "upsert_calls_minimum_per_flush": int(
            metrics.get('emarsys_stream_emarsys_minimum_calls_total{endpoint="contact.upsert"}', 0)
        ),
        "contacts_sent": sent_contacts,
        "contacts_per_call": round(sent_contacts / len(ok_upserts), 1) if ok_upserts else 0,
        "api_calls_total": len(calls),
        "simulator_counters": stats.get("counters", {}),
    }
    return out


async def _worker_metrics(
    session: aiohttp.ClientSession, workers: list[_Worker]
) -> dict[str, float]:
    """``/metrics`` of every worker, summed."""
    metrics: dict[str, float] = {}
    for w in workers:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            async with session.get(
                f"http://127.0.0.1:{w.web_port}/metrics",
                timeout=aiohttp.ClientTimeout(total=30),
            ) as resp:
                for key, value in _parse_metrics(await resp.text()).items():
                    metrics[key] = metrics.get(key, 0.0) + value
    return metrics


def _size_stats(sizes: list[int]) -> dict[str, Any]:
    """count / total / mean / p50 / p99 / max of byte sizes (nearest-rank percentiles)."""
    if not sizes:
        return {"count": 0, "total": 0, "mean": None, "p50": None, "p99": None, "max": None}
    ordered = sorted(sizes)

    def pct(q: float) -> int:
        return ordered[max(1, math.ceil(len(ordered) * q / 100)) - 1]

    return {
        "count": len(ordered),
        "total": sum(ordered),
        "mean": round(sum(ordered) / len(ordered), 1),
        "p50": pct(50),
        "p99": pct(99),
        "max": ordered[-1],
    }


async def _rule_figures(
    opts: PipelineOptions,
    session: aiohttp.ClientSession,
    sim_base: str,
    bootstrap: str,
    variant: _Variant,
    workers: list[_Worker],
    timeline: dict[str, Any],
) -> dict[str, Any]:
    """Rule matches (topic), triggers (simulator), rule state size (changelog)."""
    if opts.rules_settle > 0:
        _log(f"rules: worker keeps running {opts.rules_settle:.0f}s before counting")
        deadline = time.monotonic() + opts.rules_settle
        while time.monotonic() < deadline:
            for w in workers:
                if not w.proc.alive():
                    raise _WorkerDied(w)
            await asyncio.sleep(0.2)
    read_at = time.monotonic()
    matches_topic = f"{variant.topic_prefix}.rule-matches"
    records = await read_topic(bootstrap, matches_topic)
    matches = [orjson.loads(value) for _key, value in records if value is not None]
    match_ids = {m.get("trigger_id") for m in matches if m.get("trigger_id")}
    by_rule: dict[str, int] = {}
    for m in matches:
        by_rule[str(m.get("rule"))] = by_rule.get(str(m.get("rule")), 0) + 1

    # Triggers trail their match by the output agent's flush: wait for the ones read above.
    wait_until = time.monotonic() + max(15.0, 5 * opts.flush_interval)
    while True:
        triggers = await _get_json(session, f"{sim_base}/_sim/triggers", timeout=60)
        sim_ids = {t["trigger_id"] for t in triggers if t.get("trigger_id")}
        if match_ids <= sim_ids or time.monotonic() > wait_until:
            break
        await asyncio.sleep(0.5)
    trigger_calls = await _get_json(session, f"{sim_base}/_sim/calls?method=POST&path=/event/")
    trigger_calls = [c for c in trigger_calls if "/trigger" in c["path"]]

    changelog_topic = f"{variant.app_id}-rule_state-changelog"
    changelog = await read_topic(bootstrap, changelog_topic)
    latest: dict[bytes | None, int] = {}
    for key, value in changelog:
        if value is None:
            latest.pop(key, None)  # tombstone
        else:
            latest[key] = len(value)
    metrics = await _worker_metrics(session, workers)
    engine_stats = {
        k.split('what="', 1)[1].rstrip('"}'): int(v)
        for k, v in metrics.items()
        if k.startswith("emarsys_stream_rule_engine_total{") and 'what="' in k
    }
    stats_at_contacts = timeline.get("triggers_at_contacts")
    out = {
        "rules": len(variant.rules),
        # as the worker got it (``--set rule_engine.*`` included)
        "rule_engine": yaml.safe_load(workers[0].config_path.read_text()).get("rule_engine"),
        "settle_seconds": opts.rules_settle,
        "read_seconds_after_ready": round(read_at - timeline["ready_at"], 1),
        "matches": len(matches),
        "matches_distinct_trigger_ids": len(match_ids),
        "matches_by_rule": dict(sorted(by_rule.items())),
        "triggers_in_simulator": len(sim_ids),
        "trigger_deliveries": sum(int(t.get("deliveries") or 1) for t in triggers),
        "triggers_of_read_matches_missing": len(match_ids - sim_ids),
        "triggers_not_in_read_matches": len(sim_ids - match_ids),
        "triggers_when_all_contacts_arrived": stats_at_contacts,
        "trigger_calls": len(trigger_calls),
        "trigger_calls_ok": sum(1 for c in trigger_calls if c["status"] == 200),
        "state_changelog_records": len(changelog),
        "state_bytes_per_contact": _size_stats(list(latest.values())),
        "engine_stats": engine_stats,
        "late_events": int(metrics.get("emarsys_stream_late_events_total", 0)),
        # contact-events messages decoded by users or rules, or taken from the other's
        # decode (app.shared_decode)
        "contact_events_decodes": {
            k.split('outcome="', 1)[1].split('"', 1)[0]: int(v)
            for k, v in metrics.items()
            if k.startswith("emarsys_stream_envelope_decodes_total{")
            and "contact-events" in k and 'outcome="' in k
        },
    }
    s = out["state_bytes_per_contact"]
    _log(
        f"rules: {len(matches):,} matches on {matches_topic}, {len(sim_ids):,} distinct "
        f"triggers in the simulator, state of {s['count']:,} contacts "
        f"(mean {s['mean'] or 0:,.0f} B, p99 {s['p99'] or 0:,} B, max {s['max'] or 0:,} B) "
        f"from {len(changelog):,} changelog records"
    )
    return out


def _comparison(
    first: dict[str, Any], second: dict[str, Any], kind: str = "rules"
) -> dict[str, Any]:
    """The headline figures of two runs side by side ([first, second]).

    ``kind`` "rules" (first without, second with rules): ``events_per_s_ratio_with_to_without``;
    "workers" (first 1 worker, second N): ``workers`` and ``events_per_s_ratio_workers``
    (N workers / 1 worker). A failed run (``error``) gives None for its figures.
    """

    def pick(run: dict[str, Any], get: Any) -> Any:
        return None if "error" in run else get(run)

    def both(get: Any) -> list[Any]:
        return [pick(first, get), pick(second, get)]

    def cpu(key: str) -> Any:
        return lambda r: round(sum(x or 0 for x in r["worker"][key]), 1)

    eps = both(lambda r: r["pipeline"]["events_per_s"])
    out: dict[str, Any] = {
        "kind": kind,
        "labels": [first["label"], second["label"]],
        "failed": [r["label"] for r in (first, second) if "error" in r],
        "events_per_s": eps,
        "seconds_to_all_contacts": both(lambda r: r["pipeline"]["seconds_to_all_contacts"]),
        "seconds_to_all_topics_drained": both(
            lambda r: r["pipeline"]["seconds_to_all_topics_drained"]
        ),
        "worker_cpu_seconds_after_ready": both(cpu("cpu_seconds_after_ready")),
        "worker_cpu_seconds_ready_to_all_contacts": both(cpu("cpu_seconds_ready_to_all_contacts")),
        "worker_peak_rss_mb": both(lambda r: max(r["worker"]["peak_rss_mb"])),
        "helper_cpu_seconds_after_ready": both(
            lambda r: r["worker"].get("helper_cpu_seconds_after_ready")
        ),
    }
    if kind == "workers":
        out["workers"] = [first.get("workers"), second.get("workers")]
        out["events_per_s_ratio_workers"] = _ratio(eps[1], eps[0])
        out["target_ratio_workers"] = TARGET_TWO_WORKERS_RATIO if out["workers"][1] == 2 else None
    else:
        out["events_per_s_ratio_with_to_without"] = _ratio(eps[1], eps[0])
    return out


async def _measure(
    opts: PipelineOptions,
    session: aiohttp.ClientSession,
    sim_base: str,
    lag: GroupLag,
    workers: list[_Worker],
    ready_at: float,
    n_events: int,
    expected: int,
    topic_prefix: str = TOPIC_PREFIX,
    drain_lag: float = 0.0,
) -> dict[str, Any]:
    """Poll until the simulator has every contact and every agent topic is drained.

    ``drain_lag`` > 0 (runs with rules): "drained" / "caught up" compare the committed
    offsets with the ends read at least that many seconds earlier (see RULES_DRAIN_LAG).
    """
    timeline: dict[str, Any] = {"progress": [], "ready_at": ready_at}
    topics = [INGEST_TOPIC, *(f"{topic_prefix}.{name}" for name in AGENT_TOPICS)]
    users_topic = f"{topic_prefix}.contact-events"
    last_change = time.monotonic()
    last_snapshot: tuple[Any, ...] = ()
    next_lag = 0.0
    next_print = time.monotonic() + 5.0
    committed: dict[str, dict[int, int]] = {}
    ends: dict[str, dict[int, int]] = {}
    ends_history: list[tuple[float, dict[str, dict[int, int]]]] = []
    drain_grace = 120.0

    def total(d: dict[int, int] | None) -> int:
        return sum(d.values()) if d else 0

    while True:
        for w in workers:
            if not w.proc.alive():
                raise _WorkerDied(w)
            w.peak_rss_kb = max(w.peak_rss_kb, _proc_status(w.proc.pid).get("VmHWM", 0))
        try:
            stats = await _get_json(session, f"{sim_base}/_sim/stats", timeout=10)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise BenchError(f"the simulator does not answer: {exc!r}") from exc
        now = time.monotonic()
        sim_contacts = int(stats.get("contacts", 0))
        sim_calls = int((stats.get("counters") or {}).get("api_calls", 0))
        sim_triggers = int(stats.get("triggers", 0))
        if sim_calls and "first_upsert_at" not in timeline:
            timeline["first_upsert_at"] = now
        if sim_contacts >= expected and "contacts_at" not in timeline:
            timeline["contacts_at"] = now
            timeline["triggers_at_contacts"] = sim_triggers
            timeline["cpu_at_contacts"] = [_cpu_seconds(w.proc.pid) for w in workers]
            _log(
                f"simulator has all {expected:,} contacts after {now - ready_at:.2f}s "
                f"({n_events / (now - ready_at):,.0f} events/s)"
            )
        if now >= next_lag:
            next_lag = now + (1.0 if "contacts_at" not in timeline else 0.5)
            for topic in topics:
                got = await lag.committed(topic)
                if got is not None:
                    committed[topic] = got
            ingest_done = total(committed.get(INGEST_TOPIC)) >= n_events
            if ingest_done:
                # Ends are read after the committed offsets: equality means "caught up".
                ends = await lag.ends({t: c for t, c in committed.items() if t != INGEST_TOPIC})
            now = time.monotonic()
            target = ends
            if drain_lag > 0:
                ends_history.append((now, ends))
                older = [e for at, e in ends_history if now - at >= drain_lag]
                target = older[-1] if older else {}
            if ingest_done and "ingest_at" not in timeline:
                timeline["ingest_at"] = now
                _log(f"ingest topic fully committed after {now - ready_at:.2f}s")

            users_how = _drained(committed, ends, target, [users_topic], drain_lag)
            if ingest_done and "users_at" not in timeline and users_how:
                timeline["users_at"] = now
                _log(
                    f"users agent caught up (contact-events committed = {users_how}) after "
                    f"{now - ready_at:.2f}s"
                )
            drained_how = _drained(committed, ends, target, topics[1:], drain_lag)
            if ingest_done and "drained_at" not in timeline and drained_how:
                timeline["drained_at"] = now
                timeline["drained_how"] = drained_how
                _log(f"every agent topic drained (committed = {drained_how}) after "
                     f"{now - ready_at:.2f}s")
            timeline["progress"].append(
                {
                    "t": round(now - ready_at, 2),
                    "sim_contacts": sim_contacts,
                    "sim_calls": sim_calls,
                    "sim_triggers": sim_triggers,
                    "committed": {t: total(c) for t, c in committed.items()},
                    "ends": {t: total(e) for t, e in ends.items()},
                    "rss_mb": [
                        round(_proc_status(w.proc.pid).get("VmRSS", 0) / 1024) for w in workers
                    ],
                    "cpu_s": [_cpu_seconds(w.proc.pid) for w in workers],
                }
            )
        snapshot = (sim_contacts, sim_calls, tuple(total(c) for c in committed.values()))
        if snapshot != last_snapshot:
            last_snapshot = snapshot
            last_change = now
        if now >= next_print:
            next_print = now + 5.0
            parts = []
            for topic in topics:
                short = topic.removeprefix(f"{topic_prefix}.")
                c = committed.get(topic)
                e = (
                    n_events
                    if topic == INGEST_TOPIC
                    else (total(ends[topic]) if topic in ends else None)
                )
                text = "-" if c is None else f"{total(c):,}"
                if e is not None:
                    text += f"/{e:,}"
                parts.append(f"{short} {text}")
            _log(
                f"t={now - ready_at:6.1f}s  sim contacts {sim_contacts:,}/{expected:,}, "
                f"API calls {sim_calls}"
                + (f", triggers {sim_triggers:,}" if sim_triggers else "")
                + f"; committed: {'; '.join(parts)}"
            )
        if "contacts_at" in timeline and "drained_at" in timeline:
            break
        if "contacts_at" in timeline and now - timeline["contacts_at"] > drain_grace:
            _log(f"topics not drained {drain_grace:.0f}s after the last contact; stopping")
            break
        if now - ready_at > opts.timeout:
            _stuck(workers, f"not finished {opts.timeout:.0f}s after the worker was ready")
        if now - last_change > opts.stall_timeout:
            _stuck(workers, f"no progress for {opts.stall_timeout:.0f}s")
        await asyncio.sleep(0.1)
    timeline["offsets"] = {t: {"committed": committed.get(t), "end": ends.get(t)} for t in topics}
    return timeline


def _drained(
    committed: dict[str, dict[int, int]],
    ends: dict[str, dict[int, int]],
    lagged_ends: dict[str, dict[int, int]],
    topics: list[str],
    drain_lag: float,
) -> str | None:
    """How ``topics`` count as drained now, or None: ``"end"`` when every committed
    offset has reached the end read just after it; with ``drain_lag`` (rules) else
    ``"end <lag>s earlier"`` when they reached the ends read that long ago."""
    if all(_caught_up(committed.get(t), ends.get(t)) for t in topics):
        return "end"
    if drain_lag > 0 and all(_caught_up(committed.get(t), lagged_ends.get(t)) for t in topics):
        return f"end {drain_lag:.0f}s earlier"
    return None


def _caught_up(committed: dict[int, int] | None, ends: dict[int, int] | None) -> bool:
    """Every partition's committed offset has reached its end offset."""
    if not committed or not ends:
        return False
    return all(off >= ends.get(p, 0) for p, off in committed.items())


def _stuck(workers: list[_Worker], why: str) -> None:
    _log(f"STUCK: {why}")
    for w in workers:
        _log(f"{w.name} (pid {w.proc.pid}) stacks:")
        print(_py_spy_dump(w.proc.pid), flush=True)
        _log(f"{w.name} log tail ({w.proc.log_path}):")
        print(w.proc.log_tail(60), flush=True)
    raise BenchError(why)


# ------------------------------------------------------------------------------ output


def format_table(result: dict[str, Any]) -> str:
    """The human-readable summary of a result dict."""
    g, p, e = result["generated"], result["pipeline"], result["emarsys"]
    b, w, m, o = result["baseline"], result["worker"], result["machine"], result["options"]

    def num(value: Any, suffix: str = "") -> str:
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:,.2f}{suffix}"
        return f"{value:,}{suffix}"

    ratio = p.get("ratio_to_baseline")
    rows: list[tuple[str, str]] = [
        ("events", num(g["events"])),
        (
            "  track / page / identify",
            " / ".join(num(g["by_type"].get(k, 0)) for k in ("track", "page", "identify")),
        ),
        ("  mean event size", f"{g['mean_event_bytes']:.0f} B"),
        ("people (contacts option)", num(g["people"])),
        ("  with an email (expected in Emarsys)", num(g["identified_contacts"])),
        ("  anonymous-first", num(g["anonymous_first"])),
        ("  anonymous-only visitors", num(g["anonymous_only_visitors"])),
        (
            "partitions / workers / store",
            f"{o['partitions']} / {_workers_text(result)} / {o['store']}",
        ),
        *_rule_rows(result),
        ("", ""),
        ("produce (aiokafka), events/s", num(result["produce"]["events_per_s"])),
        ("raw consume + orjson.loads, events/s", num(b["events_per_s"])),
        ("worker start -> ready", num(w["startup_seconds"], " s")),
        ("ready -> all contacts in simulator", num(p["seconds_to_all_contacts"], " s")),
        ("pipeline, events/s (end to end)", num(p["events_per_s"])),
        ("ratio pipeline / raw", "n/a" if ratio is None else f"{ratio:.4f} ({ratio:.2%})"),
        *_naive_headline_rows(result),
        ("pipeline, events/s incl. startup", num(p["events_per_s_from_spawn"])),
        ("ready -> first Emarsys call", num(p["seconds_to_first_upsert"], " s")),
        ("ready -> ingest topic committed", num(p["seconds_to_ingest_committed"], " s")),
        ("ready -> users agent caught up", num(p["seconds_to_users_caught_up"], " s")),
        (
            "ready -> every agent topic drained",
            num(p["seconds_to_all_topics_drained"], " s")
            + (f" (committed = {p['drained_how']})" if p.get("drained_how") else ""),
        ),
        *_naive_rows(result),
        ("", ""),
        (
            "contacts in simulator / expected",
            f"{num(e['contacts_in_simulator'])} / {num(e['expected_contacts'])}",
        ),
        (
            "  missing / unexpected / fields != last identify",
            f"{e['missing_contacts']} / "
            f"{e['unexpected_contacts']} / {e['contacts_with_wrong_fields']}",
        ),
        (
            "upsert calls (ok) / minimum (all at once; per flush)",
            f"{e['upsert_calls']} ({e['upsert_calls_ok']}) / {e['upsert_calls_minimum']}; "
            f"{e.get('upsert_calls_minimum_per_flush', '-')}",
        ),
        ("contacts sent / per call", f"{num(e['contacts_sent'])} / {e['contacts_per_call']}"),
        ("worker peak RSS (VmHWM)", ", ".join(f"{x:,.0f} MB" for x in w["peak_rss_mb"])),
        ("worker CPU s (after ready)", ", ".join(num(x) for x in w["cpu_seconds_after_ready"])),
        (
            "  of which ready -> all contacts",
            ", ".join(num(x) for x in w.get("cpu_seconds_ready_to_all_contacts") or []),
        ),
        ("  of which cyclic GC (whole run, start-up included)", num(w.get("gc_seconds"))),
        (
            "broker / simulator / bench CPU s (after ready)",
            " / ".join(
                num((w.get("helper_cpu_seconds_after_ready") or {}).get(k))
                for k in ("broker", "simulator", "bench")
            ),
        ),
        ("", ""),
        ("machine: nproc / python", f"{m['nproc']} / {m['implementation']} {m['python']}"),
        ("  cpu", str(m.get("cpu_model", "?"))),
        (
            "  load average start / end (1 min)",
            f"{(m.get('loadavg_at_start') or ['?'])[0]} / {(m.get('loadavg_at_end') or ['?'])[0]}",
        ),
        ("  faust / aiokafka", f"{m.get('faust-streaming')} / {m.get('aiokafka')}"),
        (
            "code",
            f"{str(result.get('code', {}).get('commit', '?'))[:10]} "
            f"(+{len(result.get('code', {}).get('uncommitted') or [])} uncommitted files)",
        ),
    ]
    rows += _comparison_rows(result)
    width = max(len(k) for k, _ in rows) + 2
    title = "emarsys-stream pipeline benchmark"
    runs = result.get("runs")
    if runs:
        which = next((r["label"] for r in reversed(runs) if "error" not in r), "?")
        title += f" (figures of the run {which}; both runs side by side at the end)"
    lines = ["", title, "=" * (width + 30)]
    for key, value in rows:
        lines.append(f"{key:<{width}}{value}" if key else "")
    lines.append("=" * (width + 30))
    return "\n".join(lines)


def _workers_text(result: dict[str, Any]) -> str:
    runs = result.get("runs")
    if result["options"].get("compare_workers") and runs:
        return ", then ".join(str(r.get("workers")) for r in runs)
    return str(result["options"]["workers"])


def _times(value: float | None, target: float | None = None) -> str:
    """A ratio as "0.46x", plus the issue's target when given."""
    if value is None:
        return "n/a"
    text = f"{value:.2f}x"
    if target is not None:
        text += f" (target >= {target:g}x: {'met' if value >= target else 'not met'})"
    return text


def _naive_headline_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The naive Faust reference's rate and our rate as a multiple of it."""
    n = result.get("naive")
    if not result["options"].get("naive", True) or n is None:
        return [("naive two-hop Faust, events/s", "skipped (--no-naive)")]
    if "error" in n:
        return [("naive two-hop Faust, events/s", f"FAILED: {n['error']}")]
    p = result["pipeline"]
    workers = result["worker"].get("count") or len(result["worker"]["peak_rss_mb"])
    label = "ratio pipeline / naive Faust"
    if workers > 1:
        label += f" ({workers} workers : 1)"
    return [
        ("naive two-hop Faust, events/s (1 process)", _num(n["events_per_s"])),
        # The target is one worker against the naive app (one process each).
        (label, _times(p.get("ratio_to_naive"), TARGET_NAIVE_RATIO if workers == 1 else None)),
        ("  by time until all work is committed", _times(p.get("drained_ratio_to_naive"))),
        ("  by events per CPU second", _times(p.get("cpu_ratio_to_naive"))),
    ]


def _naive_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The naive Faust reference's details (none when skipped or failed)."""
    n = result.get("naive")
    if not n or "error" in n:
        return []
    st = n["settings"]
    keys = f"{_num(n['table_keys'])} / {_num(n['expected_table_keys'])}"
    return [
        ("", ""),
        (
            "naive Faust: app id / store",
            f"{n['app_id']} ({n['repartition_topic']}, table) / {st['store']}",
        ),
        (
            "  take / max_poll_records / buffer_maxsize",
            f"{st['take_max']} within {st['take_within']} s / {st['max_poll_records']:,} / "
            f"{st['stream_buffer_maxsize']:,}",
        ),
        ("  CPython GC thresholds", st.get("gc_thresholds") or "CPython's (700, 10, 10)"),
        ("  start -> ready", _num(n["startup_seconds"], " s")),
        ("  ready -> every event in the table", _num(n["seconds_to_all_processed"], " s")),
        (
            "  ratio naive / raw",
            "n/a" if n["ratio_to_baseline"] is None else f"{n['ratio_to_baseline']:.4f}",
        ),
        ("  events/s incl. startup", _num(n["events_per_s_from_spawn"])),
        (
            "  ready -> ingest / repartition committed",
            f"{_num(n['seconds_to_ingest_committed'], ' s')} / "
            f"{_num(n['seconds_to_repartition_committed'], ' s')}",
        ),
        (
            "  re-keyed / written to table",
            f"{_num(n['rekeyed'])} / {_num(n['processed'])}",
        ),
        ("  table keys / expected", keys),
        ("  peak RSS (VmHWM)", f"{n['peak_rss_mb']:,.0f} MB"),
        (
            "  CPU s ready -> all in table / end",
            f"{_num(n['cpu_seconds_ready_to_all_processed'])} / "
            f"{_num(n['cpu_seconds_after_ready'])}",
        ),
    ]


def _num(value: Any, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.2f}{suffix}"
    return f"{value:,}{suffix}"


def _rule_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The rules profile's rows (none without rules)."""
    r = result.get("rules")
    if not r:
        return []
    g = result["generated"]
    s = r["state_bytes_per_contact"]
    es = r.get("engine_stats") or {}
    engine = ", ".join(f"{k} {v}" for k, v in r["rule_engine"].items())
    return [
        ("", ""),
        (
            "rules / time unit / rule_engine",
            f"{r['rules']} / {g['rule_time_unit_s']} s of {g['event_time_span_s']:,.0f} s "
            f"event time / {engine}",
        ),
        ("rule figures read (after ready)", _num(r["read_seconds_after_ready"], " s")),
        (
            "rule matches (rule-matches records)",
            f"{_num(r['matches'])} ({_num(r['matches_distinct_trigger_ids'])} distinct "
            f"trigger ids, {len(r['matches_by_rule'])} rules)",
        ),
        (
            "triggers in simulator (distinct ids)",
            f"{_num(r['triggers_in_simulator'])} (deliveries {_num(r['trigger_deliveries'])}; "
            f"{_num(r['triggers_when_all_contacts_arrived'])} when all contacts were in)",
        ),
        (
            "  trigger calls (ok) / matches w/o trigger",
            f"{r['trigger_calls']} ({r['trigger_calls_ok']}) / "
            f"{r['triggers_of_read_matches_missing']}",
        ),
        (
            "rule state: contacts / changelog records",
            f"{_num(s['count'])} / {_num(r['state_changelog_records'])}",
        ),
        (
            "rule state B/contact: mean / p99 / max",
            f"{_num(None if s['mean'] is None else round(s['mean']))} / {_num(s['p99'])} / "
            f"{_num(s['max'])}",
        ),
        (
            "rule engine: expired / dropped / suppressed / late",
            " / ".join(
                _num(es.get(k, 0))
                for k in ("expired_partials", "dropped_partials", "suppressed", "late")
            ),
        ),
        (
            "contact-events messages: decoded / shared / dropped",
            " / ".join(
                _num((r.get("contact_events_decodes") or {}).get(k, 0))
                for k in ("decoded", "shared", "dropped")
            ),
        ),
    ]


def _comparison_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """``compare_rules`` / ``compare_workers``: both runs side by side (none otherwise)."""
    runs = result.get("runs")
    if not runs or len(runs) != 2:
        return []
    a, b = runs
    comparison = result.get("comparison") or {}
    width = max(14, len(a["app_id"]), len(b["app_id"]))

    def cols(x: str, y: str) -> str:
        return f"{x:>{width}}   {y:>{width}}"

    def pair(get: Any, suffix: str = "") -> str:
        def one(run: dict[str, Any]) -> str:
            return "failed" if "error" in run else _num(get(run), suffix)

        return cols(one(a), one(b))

    def cpu(key: str) -> Any:
        def get(run: dict[str, Any]) -> float | None:
            values = run["worker"].get(key) or []
            if not values or any(v is None for v in values):
                return None
            return round(sum(values), 1)

        return get

    def ratio(key: str) -> Any:
        def get(run: dict[str, Any]) -> str:
            value = run["pipeline"].get(key)
            return "n/a" if value is None else f"{value:.4f}"

        return get

    def rules(run: dict[str, Any]) -> str:
        r = run.get("rules")
        return "n/a" if not r else f"{r['matches']:,} / {r['triggers_in_simulator']:,}"

    def emarsys(run: dict[str, Any]) -> str:
        e = run["emarsys"]
        return f"{e['missing_contacts']} / {e['upsert_calls']}"

    def text(get: Any) -> str:
        return cols(*("failed" if "error" in r else get(r) for r in (a, b)))

    rows: list[tuple[str, str]] = [
        ("", ""),
        ("same input, one run after the other", cols(a["label"], b["label"])),
        ("  app id", cols(a["app_id"], b["app_id"])),
        ("  worker start -> ready", pair(lambda r: r["worker"]["startup_seconds"], " s")),
        (
            "  ready -> all contacts in simulator",
            pair(lambda r: r["pipeline"]["seconds_to_all_contacts"], " s"),
        ),
        ("  pipeline, events/s (end to end)", pair(lambda r: r["pipeline"]["events_per_s"])),
        ("  ratio pipeline / raw", text(ratio("ratio_to_baseline"))),
        (
            "  ratio pipeline / naive Faust",
            text(lambda r: _times(r["pipeline"].get("ratio_to_naive"))),
        ),
        (
            "  ready -> ingest topic committed",
            pair(lambda r: r["pipeline"]["seconds_to_ingest_committed"], " s"),
        ),
        (
            "  ready -> every agent topic drained",
            pair(lambda r: r["pipeline"]["seconds_to_all_topics_drained"], " s"),
        ),
        (
            "  worker CPU s, ready -> all contacts",
            pair(cpu("cpu_seconds_ready_to_all_contacts")),
        ),
        ("  worker CPU s, ready -> end", pair(cpu("cpu_seconds_after_ready"))),
        (
            "  broker / simulator / bench CPU s",
            text(
                lambda r: " / ".join(
                    "?" if v is None else f"{v:,.1f}"
                    for v in (
                        (r["worker"].get("helper_cpu_seconds_after_ready") or {}).get(k)
                        for k in ("broker", "simulator", "bench")
                    )
                )
            ),
        ),
        ("  worker peak RSS MB", pair(lambda r: max(r["worker"]["peak_rss_mb"]))),
        ("  contacts missing / upsert calls", text(emarsys)),
    ]
    if comparison.get("kind") == "workers":
        n = (comparison.get("workers") or [1, 2])[1]
        rows.append(
            (
                f"  events/s {n} workers / 1 worker",
                _times(
                    comparison.get("events_per_s_ratio_workers"),
                    comparison.get("target_ratio_workers"),
                ),
            )
        )
    else:
        rate = comparison.get("events_per_s_ratio_with_to_without")
        rows += [
            ("  rule matches / triggers", text(rules)),
            (
                "  events/s with rules / without",
                "n/a" if rate is None else f"{rate:.3f} ({rate - 1:+.1%})",
            ),
        ]
    for run in (a, b):
        if "error" in run:
            rows.append((f"  {run['label']}: FAILED", run["error"]))
    return rows


def write_result(result: dict[str, Any], directory: Path, suffix: str = "") -> Path:
    """``directory/<timestamp><suffix>.json`` (``-2``, ``-3``... if it exists)."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S") + suffix
    path = directory / f"{stamp}.json"
    n = 1
    while path.exists():
        n += 1
        path = directory / f"{stamp}-{n}.json"
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    return path


def run_pipeline(opts: PipelineOptions) -> int:
    """Run the benchmark; returns a process exit code (0 ok, 1 failed, 130 interrupted)."""
    if opts.workers < 1:
        raise BenchError("--workers must be >= 1")
    if opts.partitions < 1:
        raise BenchError("--partitions must be >= 1")
    tmp = Path(tempfile.mkdtemp(prefix="emarsys-bench-"))
    procs = _Processes()
    ok = False
    try:
        with _sigterm_as_interrupt():
            try:
                result = asyncio.run(_cancel_on_signals(_run(opts, procs, tmp)))
            finally:
                procs.stop_all()
        print(format_table(result), flush=True)
        path = write_result(result, opts.results_dir)
        print(f"results: {path}", flush=True)
        ok = True
        naive = result.get("naive") or {}
        if "error" in naive:
            ok = False
        for run in result.get("runs") or [result]:
            if "error" in run:
                ok = False
                continue
            missing = run["emarsys"]["missing_contacts"]
            if missing:
                ok = False
                what = f" ({run['label']})" if run.get("label") else ""
                _log(f"{missing} expected contacts never reached the simulator{what}")
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
