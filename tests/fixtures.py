"""Shared fixtures: a real broker process, the Emarsys simulator, worker processes.

Nothing here mocks Kafka or Faust: the broker is the Tansu binary on a free loopback
port, workers are real `emarsys-stream worker` processes, the simulator is a real
aiohttp server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from app.broker import EmbeddedBroker, free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    broker = EmbeddedBroker(log_path=log).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest_asyncio.fixture
async def simulator() -> AsyncIterator[Any]:
    from app.simulator import SimulatorOptions, start_simulator

    sim = await start_simulator(options=SimulatorOptions(rate_limit_per_minute=0))
    try:
        yield sim
    finally:
        await sim.stop()


def base_config(bootstrap: str, api_url: str, name: str, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "ingest_topic": f"{name}.events",
            "dead_letter_topic": f"{name}.events.dlq",
            "partitions": 2,
            "topic_prefix": name,
            "app_id": name,
        },
        "emarsys": {
            "api_url": api_url,
            "auth": {"type": "wsse", "username": "sim-user", "secret": "${TEST_EMARSYS_SECRET}"},
            "requests_per_minute": 1000,
            "batch_size": 1000,
            "flush_interval": 0.3,
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
        # One record per produce batch: the embedded broker's end offsets are only
        # right then, and Faust's changelog recovery depends on them (see settings).
        "worker": {"session_timeout": 6.0, "heartbeat_interval": 0.5,
                   "producer_max_batch_size": 1},
        "store": "rocksdb://",
    }
    for dotted, value in overrides.items():
        node = cfg
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg


@dataclass
class WorkerProcess:
    config_path: Path
    web_port: int
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "--config", str(self.config_path)],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    async def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.web_port}/health"
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.log()}")
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.25)
        raise AssertionError(f"worker not ready within {timeout}s:\n{self.log()[-5000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@dataclass
class Deployment:
    """One isolated app (own topics, app id, data dir) on the shared broker."""

    name: str
    config: dict[str, Any]
    config_path: Path
    tmp: Path
    bootstrap: str
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def ingest_topic(self) -> str:
        return str(self.config["kafka"]["ingest_topic"])

    @property
    def dlq_topic(self) -> str:
        return str(self.config["kafka"]["dead_letter_topic"])

    def topic(self, name: str) -> str:
        return f"{self.name}.{name}"

    def worker(self, index: int = 0) -> WorkerProcess:
        while len(self.workers) <= index:
            i = len(self.workers)
            port = free_port()
            cfg = dict(self.config)
            cfg["web"] = {"host": "127.0.0.1", "port": port}
            cfg["data_dir"] = str(self.tmp / f"worker{i}")
            path = self.tmp / f"worker{i}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            env = {**os.environ, "TEST_EMARSYS_SECRET": "sim-secret", "PYTHONUNBUFFERED": "1"}
            self.workers.append(WorkerProcess(path, port, self.tmp / f"worker{i}.log", env))
        return self.workers[index]

    async def start_worker(self, index: int = 0) -> WorkerProcess:
        w = self.worker(index).start()
        await w.wait_ready()
        return w

    def stop_all(self) -> None:
        for w in self.workers:
            w.stop()

    def log_digest(self, lines: int = 30) -> str:
        """The last warnings/errors of every worker log, for a failing test's message."""
        out = []
        for i, w in enumerate(self.workers):
            notable = [
                ln for ln in w.log().splitlines()
                if ("WARN" in ln.upper() or "ERROR" in ln.upper()) and "producer buffer" not in ln
            ]
            out.append(f"--- worker{i} ({w.log_path}): last {lines} warnings/errors")
            out.extend(ln[:300] for ln in notable[-lines:])
        return "\n".join(out)

    async def produce(self, events: list[Any], topic: str | None = None) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=2)
        await producer.start()
        try:
            futs = []
            for e in events:
                value = e if isinstance(e, bytes | bytearray) else orjson.dumps(e)
                futs.append(await producer.send(topic or self.ingest_topic, bytes(value)))
            await asyncio.gather(*futs)
        finally:
            await producer.stop()

    async def read_topic(
        self, topic: str, *, expect: int, timeout: float = 60.0, decode: bool = True
    ) -> list[Any]:
        """Read ``topic`` from the beginning until ``expect`` records (or timeout)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            group_id=None,
        )
        await consumer.start()
        out: list[Any] = []
        try:
            deadline = time.monotonic() + timeout
            partitions: set[int] | None = None
            while time.monotonic() < deadline and partitions is None:
                partitions = consumer.partitions_for_topic(topic)
                if partitions is None:
                    await consumer._client.force_metadata_update()
                    await asyncio.sleep(0.2)
            if not partitions:
                return out
            tps = [TopicPartition(topic, p) for p in partitions]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            while time.monotonic() < deadline and len(out) < expect:
                batch = await consumer.getmany(timeout_ms=300)
                for records in batch.values():
                    out.extend(orjson.loads(r.value) if decode else r.value for r in records)
            return out
        finally:
            await consumer.stop()


@pytest.fixture
def deployment_factory(
    kafka_broker: EmbeddedBroker, tmp_path: Path
) -> Iterator[Callable[..., Deployment]]:
    created: list[Deployment] = []

    def make(api_url: str, **overrides: Any) -> Deployment:
        name = f"t{uuid.uuid4().hex[:10]}"
        cfg = base_config(kafka_broker.bootstrap_servers, api_url, name, **overrides)
        d = tmp_path / name
        d.mkdir()
        path = d / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        dep = Deployment(name, cfg, path, d, kafka_broker.bootstrap_servers)
        created.append(dep)
        return dep

    yield make
    for dep in created:
        for w in dep.workers:
            w.kill()


async def wait_for(
    predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
