"""End-to-end pipeline benchmark: Segment events on Kafka -> worker -> Emarsys simulator.

One run (see bench/README.md):

1. start the embedded broker (Tansu, loopback) and the Emarsys simulator in its own
   process (``python -m app.cli simulator --rate-limit 0``);
2. generate the events (:mod:`bench.generate`) and produce them to the ingest topic
   *before* any worker runs, so the worker works off a backlog;
3. baseline: read the same topic with a plain aiokafka consumer (``group_id=None``,
   every partition, to the end) and ``orjson.loads`` every value;
4. start the worker(s) (``python -m app.cli worker --config ...``), wait for
   ``GET /health`` = 200 ("ready"), then measure until the simulator holds every expected
   contact, until the ingest topic is fully committed by the app's consumer group and
   until every agent topic is drained (committed offsets = end offsets);
5. print a table and write the figures to ``bench/results/<timestamp>.json``.

Every process this module starts runs in its own session and is stopped (SIGTERM, then
SIGKILL) on exit, on errors and on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from app.broker import EmbeddedBroker, free_port, wait_for_port
from bench.generate import GeneratedEvents, generate_events

__all__ = ["BenchError", "PipelineOptions", "run_pipeline"]

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SIM_USER, SIM_SECRET = "sim-user", "sim-secret"
SECRET_ENV = "BENCH_EMARSYS_SECRET"
APP_ID = "emarsys-bench"
TOPIC_PREFIX = "bench"
INGEST_TOPIC = "bench.events"
#: Topics the agents consume (besides the ingest topic), as ``settings.topic(name)`` names.
AGENT_TOPICS = ("identity", "contact-events", "emarsys-operations")


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
    opts: PipelineOptions, bootstrap: str, api_url: str, web_port: int, data_dir: Path
) -> dict[str, Any]:
    """The worker's YAML config (as data) for this run."""
    cfg: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "ingest_topic": INGEST_TOPIC,
            "dead_letter_topic": f"{INGEST_TOPIC}.dlq",
            "partitions": opts.partitions,
            "topic_prefix": TOPIC_PREFIX,
            "app_id": APP_ID,
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
    }
    for dotted, value in opts.overrides.items():
        _set_dotted(cfg, dotted, value)
    return cfg


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


class GroupLag:
    """Committed offsets of a consumer group, read without joining the group.

    (``AIOKafkaAdminClient.list_consumer_group_offsets`` does not work on the embedded
    broker; a consumer with the group's id answers ``committed()`` without subscribing.)
    """

    def __init__(self, bootstrap: str, group_id: str) -> None:
        self.bootstrap = bootstrap
        self.group_id = group_id
        self._consumer: Any = None
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

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

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
        out: dict[int, int] = {}
        for p in parts:
            out[p] = await self.consumer.committed(TopicPartition(topic, p)) or 0
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
            f"worker {worker.index} (pid {worker.proc.pid}) exited with code "
            f"{worker.proc.popen.returncode}"
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


async def _run_with(
    opts: PipelineOptions, procs: _Processes, tmp: Path, session: aiohttp.ClientSession
) -> dict[str, Any]:
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
    gen: GeneratedEvents = generate_events(opts.events, opts.contacts, seed=opts.seed)
    gen_seconds = time.perf_counter() - t0
    expected = len(gen.expected_emails)
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
    }
    _log(
        f"generated {len(gen.events):,} events ({dict(gen.counts)}), mean "
        f"{gen.mean_bytes:.0f} B, {gen.contacts:,} people, {expected:,} with an email "
        f"({gen.anonymous_first:,} anonymous-first) in {gen_seconds:.1f}s"
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

    # 4. worker(s) ------------------------------------------------------------------
    workers: list[_Worker] = []
    env = {**os.environ, SECRET_ENV: SIM_SECRET, "PYTHONUNBUFFERED": "1"}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    for i in range(opts.workers):
        port = free_port()
        cfg = worker_config(opts, bootstrap, f"{sim_base}/api/v2/", port, tmp / f"worker{i}")
        path = tmp / f"worker{i}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        proc = procs.spawn(
            f"worker{i}",
            [sys.executable, "-m", "app.cli", "worker", "--config", str(path)],
            tmp / f"worker{i}.log",
            env,
        )
        workers.append(_Worker(i, proc, port, path))
    spawned_at = time.monotonic()
    _log(f"started {opts.workers} worker(s): pid {', '.join(str(w.proc.pid) for w in workers)}")

    profiler: subprocess.Popen[bytes] | None = None
    lag = GroupLag(bootstrap, APP_ID)
    try:
        await _wait_ready(session, workers)
        await lag.start()  # after ready: nothing of ours touches the group during the join
        ready_at = max(w.ready_at or 0.0 for w in workers)
        _log(f"worker(s) ready {ready_at - spawned_at:.2f}s after start; measuring")
        if opts.profile is not None:
            exe = _py_spy()
            if exe is None:
                _log("--profile: py-spy is not installed (pip install py-spy); not profiling")
            else:
                opts.profile.parent.mkdir(parents=True, exist_ok=True)
                profiler = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                    [
                        exe,
                        "record",
                        "--pid",
                        str(workers[0].proc.pid),
                        "--rate",
                        "50",
                        "--nonblocking",
                        "--format",
                        _PROFILE_FORMATS.get(opts.profile.suffix.lower(), "flamegraph"),
                        "--output",
                        str(opts.profile),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
        timeline = await _measure(
            opts, session, sim_base, lag, workers, ready_at, n_events, expected
        )
    except _WorkerDied as died:
        w = died.worker
        _log(f"{died}; last lines of its log ({w.proc.log_path}):")
        print(w.proc.log_tail(80), flush=True)
        raise
    finally:
        if profiler is not None and profiler.poll() is None:
            profiler.send_signal(signal.SIGINT)  # py-spy writes the file on SIGINT
            with contextlib.suppress(subprocess.TimeoutExpired):
                profiler.wait(60)
        await lag.stop()

    # 5. figures --------------------------------------------------------------------
    with contextlib.suppress(OSError):
        result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    for w in workers:
        w.peak_rss_kb = max(w.peak_rss_kb, _proc_status(w.proc.pid).get("VmHWM", 0))
    cpu = [_cpu_seconds(w.proc.pid) for w in workers]
    calls = await _get_json(session, f"{sim_base}/_sim/calls?method=PUT&path=/contact")
    upserts = [c for c in calls if c["path"].rstrip("/").endswith("/contact")]
    ok_upserts = [c for c in upserts if c["status"] == 200]
    sent_contacts = sum(len((c.get("body") or {}).get("contacts") or []) for c in ok_upserts)
    stats = await _get_json(session, f"{sim_base}/_sim/stats")
    contacts = await _get_json(session, f"{sim_base}/_sim/contacts", timeout=120)
    metrics: dict[str, float] = {}  # summed over the workers
    for w in workers:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            async with session.get(
                f"http://127.0.0.1:{w.web_port}/metrics",
                timeout=aiohttp.ClientTimeout(total=30),
            ) as resp:
                for key, value in _parse_metrics(await resp.text()).items():
                    metrics[key] = metrics.get(key, 0.0) + value

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
    result["worker"] = {
        "startup_seconds": round(ready_at - spawned_at, 2),
        "peak_rss_mb": [round(w.peak_rss_kb / 1024, 1) for w in workers],
        "cpu_seconds_total": [None if c is None else round(c, 1) for c in cpu],
        "cpu_seconds_after_ready": [
            None if c is None or w.cpu_at_ready is None else round(c - w.cpu_at_ready, 1)
            for c, w in zip(cpu, workers, strict=True)
        ],
        "metrics": {
            k: v
            for k, v in metrics.items()
            if k.startswith("emarsys_stream_") and "{" not in k and not k.endswith("_created")
        },
    }

    def since_ready(key: str) -> float | None:
        at = timeline.get(key)
        return None if at is None else round(at - ready_at, 3)

    result["pipeline"] = {
        "seconds_to_all_contacts": None if secs is None else round(secs, 3),
        "events_per_s": None if not secs else round(n_events / secs),
        "events_per_s_from_spawn": None
        if not timeline.get("contacts_at")
        else round(n_events / (timeline["contacts_at"] - spawned_at)),
        "seconds_to_ingest_committed": since_ready("ingest_at"),
        "seconds_to_users_caught_up": since_ready("users_at"),
        "seconds_to_all_topics_drained": since_ready("drained_at"),
        "seconds_to_first_upsert": since_ready("first_upsert_at"),
        "ratio_to_baseline": None if not secs else round(n_events / secs / raw_rate, 4),
        "progress": timeline["progress"],
        "agent_topic_offsets": timeline.get("offsets", {}),
    }
    min_calls = math.ceil(expected / opts.batch_size) if expected else 0
    result["emarsys"] = {
        "expected_contacts": expected,
        "contacts_in_simulator": len(contacts),
        "missing_contacts": len(missing),
        "unexpected_contacts": len(extra),
        "contacts_with_wrong_fields": wrong_fields,
        "wrong_field_examples": wrong_examples,
        "upsert_calls": len(upserts),
        "upsert_calls_ok": len(ok_upserts),
        "upsert_calls_minimum": min_calls,
        "contacts_sent": sent_contacts,
        "contacts_per_call": round(sent_contacts / len(ok_upserts), 1) if ok_upserts else 0,
        "api_calls_total": len(calls),
        "simulator_counters": stats.get("counters", {}),
    }
    return result


async def _measure(
    opts: PipelineOptions,
    session: aiohttp.ClientSession,
    sim_base: str,
    lag: GroupLag,
    workers: list[_Worker],
    ready_at: float,
    n_events: int,
    expected: int,
) -> dict[str, Any]:
    """Poll until the simulator has every contact and every agent topic is drained."""
    timeline: dict[str, Any] = {"progress": []}
    topics = [INGEST_TOPIC, *(f"{TOPIC_PREFIX}.{name}" for name in AGENT_TOPICS)]
    users_topic = f"{TOPIC_PREFIX}.contact-events"
    last_change = time.monotonic()
    last_snapshot: tuple[Any, ...] = ()
    next_lag = 0.0
    next_print = time.monotonic() + 5.0
    committed: dict[str, dict[int, int]] = {}
    ends: dict[str, dict[int, int]] = {}
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
        if sim_calls and "first_upsert_at" not in timeline:
            timeline["first_upsert_at"] = now
        if sim_contacts >= expected and "contacts_at" not in timeline:
            timeline["contacts_at"] = now
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
            if ingest_done and "ingest_at" not in timeline:
                timeline["ingest_at"] = now
                _log(f"ingest topic fully committed after {now - ready_at:.2f}s")

            if (
                ingest_done
                and "users_at" not in timeline
                and _caught_up(committed.get(users_topic), ends.get(users_topic))
            ):
                timeline["users_at"] = now
                _log(
                    f"users agent caught up (contact-events committed = end) after "
                    f"{now - ready_at:.2f}s"
                )
            agent_topics = topics[1:]
            if (
                ingest_done
                and "drained_at" not in timeline
                and all(_caught_up(committed.get(t), ends.get(t)) for t in agent_topics)
            ):
                timeline["drained_at"] = now
                _log(f"every agent topic drained (committed = end) after {now - ready_at:.2f}s")
            timeline["progress"].append(
                {
                    "t": round(now - ready_at, 2),
                    "sim_contacts": sim_contacts,
                    "sim_calls": sim_calls,
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
                short = topic.removeprefix(f"{TOPIC_PREFIX}.")
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
                f"API calls {sim_calls}; committed: {'; '.join(parts)}"
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


def _caught_up(committed: dict[int, int] | None, ends: dict[int, int] | None) -> bool:
    """Every partition's committed offset has reached its end offset."""
    if not committed or not ends:
        return False
    return all(off >= ends.get(p, 0) for p, off in committed.items())


def _stuck(workers: list[_Worker], why: str) -> None:
    _log(f"STUCK: {why}")
    for w in workers:
        _log(f"worker {w.index} (pid {w.proc.pid}) stacks:")
        print(_py_spy_dump(w.proc.pid), flush=True)
        _log(f"worker {w.index} log tail ({w.proc.log_path}):")
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
        ("partitions / workers / store", f"{o['partitions']} / {o['workers']} / {o['store']}"),
        ("", ""),
        ("produce (aiokafka), events/s", num(result["produce"]["events_per_s"])),
        ("raw consume + orjson.loads, events/s", num(b["events_per_s"])),
        ("worker start -> ready", num(w["startup_seconds"], " s")),
        ("ready -> all contacts in simulator", num(p["seconds_to_all_contacts"], " s")),
        ("pipeline, events/s (end to end)", num(p["events_per_s"])),
        ("ratio pipeline / raw", "n/a" if ratio is None else f"{ratio:.4f} ({ratio:.2%})"),
        ("pipeline, events/s incl. startup", num(p["events_per_s_from_spawn"])),
        ("ready -> first Emarsys call", num(p["seconds_to_first_upsert"], " s")),
        ("ready -> ingest topic committed", num(p["seconds_to_ingest_committed"], " s")),
        ("ready -> users agent caught up", num(p["seconds_to_users_caught_up"], " s")),
        ("ready -> every agent topic drained", num(p["seconds_to_all_topics_drained"], " s")),
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
            "upsert calls (ok) / minimum",
            f"{e['upsert_calls']} ({e['upsert_calls_ok']}) / {e['upsert_calls_minimum']}",
        ),
        ("contacts sent / per call", f"{num(e['contacts_sent'])} / {e['contacts_per_call']}"),
        ("worker peak RSS (VmHWM)", ", ".join(f"{x:,.0f} MB" for x in w["peak_rss_mb"])),
        ("worker CPU s (after ready)", ", ".join(num(x) for x in w["cpu_seconds_after_ready"])),
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
    width = max(len(k) for k, _ in rows) + 2
    lines = ["", "emarsys-stream pipeline benchmark", "=" * (width + 30)]
    for key, value in rows:
        lines.append(f"{key:<{width}}{value}" if key else "")
    lines.append("=" * (width + 30))
    return "\n".join(lines)


def write_result(result: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
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
        e = result["emarsys"]
        ok = e["missing_contacts"] == 0
        if not ok:
            _log(f"{e['missing_contacts']} expected contacts never reached the simulator")
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
