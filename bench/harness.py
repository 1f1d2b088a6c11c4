"""Small shared pieces of the ``latency`` and ``state`` benchmarks.

They start processes the same way :mod:`bench.pipeline` does (and reuse its process
bookkeeping, so everything started is stopped on exit, errors, Ctrl-C and SIGTERM):
the Emarsys simulator in its own process and worker processes with a generated config.
Also: nearest-rank percentiles and a summary of a list of durations.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from app.broker import free_port, wait_for_port
from bench.pipeline import (
    SECRET_ENV,
    SIM_SECRET,
    BenchError,
    PipelineOptions,
    _Proc,
    _Processes,
    _Worker,
    worker_config,
)

__all__ = [
    "CpuWatch",
    "cpu_line",
    "machine_cpu_seconds",
    "percentile",
    "read_records",
    "spawn_simulator",
    "spawn_worker",
    "summarize",
]


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of already sorted values; None if empty.

    The smallest value such that at least ``q`` percent of the values are <= it (so the
    p99 of 100 values is the 99th smallest, of 1000 values the 990th, and p100 the max).
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    n = len(sorted_values)
    if n == 0:
        return None
    # round first: 99.9 / 100 * 1000 is 999.0000000000001 in floating point
    rank = max(1, math.ceil(round(q / 100 * n, 9)))
    return sorted_values[rank - 1]


def summarize(values: Sequence[float], digits: int = 4) -> dict[str, Any]:
    """count, mean, min, p50, p90, p99, p99.9 and max of ``values`` (any order)."""
    data = sorted(values)
    out: dict[str, Any] = {"count": len(data)}
    if not data:
        return out | dict.fromkeys(("mean", "min", "p50", "p90", "p99", "p99_9", "max"))
    out["mean"] = round(sum(data) / len(data), digits)
    out["min"] = round(data[0], digits)
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p99_9", 99.9)):
        value = percentile(data, q)
        out[name] = None if value is None else round(value, digits)
    out["max"] = round(data[-1], digits)
    return out


async def spawn_simulator(procs: _Processes, tmp: Path) -> tuple[_Proc, str]:
    """The Emarsys simulator in its own process without a rate limit; (process, base URL)."""
    port = free_port()
    sim = procs.spawn(
        "simulator",
        [sys.executable, "-m", "app.cli", "simulator", "--port", str(port), "--rate-limit", "0"],
        tmp / "simulator.log",
    )
    if not await asyncio.to_thread(wait_for_port, "127.0.0.1", port, 30.0):
        raise BenchError(f"the simulator did not listen within 30s:\n{sim.log_tail()}")
    return sim, f"http://127.0.0.1:{port}"


def spawn_worker(
    procs: _Processes,
    tmp: Path,
    opts: PipelineOptions,
    *,
    bootstrap: str,
    api_url: str,
    app_id: str,
    topic_prefix: str,
    name: str = "worker0",
    log_format: str | None = None,
    fetch_max_wait_ms: int | None = None,
) -> _Worker:
    """One worker process (``python -m app.cli worker --config``) with a fresh data dir
    ``tmp/<name>`` and the config of :func:`bench.pipeline.worker_config`.

    ``fetch_max_wait_ms``: run it through :mod:`bench.fetch_wait_worker` instead (its Kafka
    consumers wait at most that long per fetch; a diagnostic, not the shipped worker)."""
    port = free_port()
    data_dir = tmp / name
    cfg = worker_config(
        opts, bootstrap, api_url, port, data_dir, app_id=app_id, topic_prefix=topic_prefix
    )
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, SECRET_ENV: SIM_SECRET, "PYTHONUNBUFFERED": "1"}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    argv = [sys.executable, "-m", "app.cli", "worker", "--config", str(path)]
    if fetch_max_wait_ms is not None:
        argv[1:3] = ["-m", "bench.fetch_wait_worker", str(int(fetch_max_wait_ms))]
    if log_format:
        argv += ["--log-format", log_format]
    proc = procs.spawn(name, argv, tmp / f"{name}.log", env)
    return _Worker(0, proc, port, path)


async def read_records(
    bootstrap: str, topic: str, quiet: float = 2.0, limit: float = 300.0
) -> list[tuple[int, bytes | None, bytes | None]]:
    """(timestamp ms, key, value) of every record of ``topic`` from the beginning.

    Like :func:`bench.pipeline.read_topic` (which returns no timestamps): each partition is
    read up to the high watermark of its first Fetch response, or until nothing arrived
    for ``quiet`` seconds; at most ``limit`` seconds in all. Empty if there is no topic.
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
        out: list[tuple[int, bytes | None, bytes | None]] = []
        started = time.monotonic()
        last = dict.fromkeys(tps, started)
        position = dict.fromkeys(tps, 0)
        target: dict[Any, int] = {}
        pending = set(tps)
        while pending and time.monotonic() - started < limit:
            batch = await consumer.getmany(*pending, timeout_ms=250, max_records=10_000)
            now = time.monotonic()
            for tp, records in batch.items():
                out.extend((rec.timestamp, rec.key, rec.value) for rec in records)
                if records:
                    last[tp] = now
                    position[tp] = records[-1].offset + 1
            for tp in list(pending):
                if tp not in target:
                    hw = consumer.highwater(tp)
                    if hw is not None:
                        target[tp] = hw
                if (tp in target and position[tp] >= target[tp]) or now - last[tp] >= quiet:
                    pending.discard(tp)
        return out
    finally:
        await consumer.stop()


def machine_cpu_seconds() -> float | None:
    """Busy CPU seconds of the whole machine since boot (all cores; /proc/stat), i.e.
    everything but idle and iowait."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
        ticks = [int(x) for x in fields[1:]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class CpuWatch:
    """CPU used over an interval by the whole machine and by the processes of the run, in
    cores (CPU seconds / wall seconds): ``others`` is what the rest of the machine (other
    work sharing the cores) used meanwhile, to tell a slow run from a crowded machine."""

    def __init__(self, pids: dict[str, int]) -> None:
        from bench.pipeline import _cpu_seconds

        self._cpu = _cpu_seconds
        self.pids = dict(pids)
        self.wall = time.time()
        self.machine = machine_cpu_seconds()
        self.start = {name: _cpu_seconds(pid) for name, pid in self.pids.items()}

    def result(self) -> dict[str, Any]:
        wall = time.time() - self.wall
        machine = machine_cpu_seconds()
        out: dict[str, Any] = {"seconds": round(wall, 2), "cores": os.cpu_count()}
        ours: dict[str, float | None] = {}
        for name, pid in self.pids.items():
            now, then = self._cpu(pid), self.start.get(name)
            ours[name] = None if now is None or then is None else round((now - then) / wall, 3)
        out["processes_cores"] = ours
        if machine is None or self.machine is None or wall <= 0:
            out["machine_busy_cores"] = out["others_cores"] = None
            return out
        busy = (machine - self.machine) / wall
        out["machine_busy_cores"] = round(busy, 3)
        out["others_cores"] = round(max(0.0, busy - sum(v or 0.0 for v in ours.values())), 3)
        return out


def cpu_line(cpu: dict[str, Any]) -> str:
    """``worker 0.52, broker 0.10, ...; rest of the machine 1.10 of 2`` from CpuWatch."""
    parts = [
        f"{name} {'n/a' if v is None else f'{v:.2f}'}"
        for name, v in (cpu.get("processes_cores") or {}).items()
    ]
    others = cpu.get("others_cores")
    rest = "n/a" if others is None else f"{others:.2f}"
    return f"{', '.join(parts)}; rest of the machine {rest} of {cpu.get('cores')}"
