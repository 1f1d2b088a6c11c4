"""The naive two-hop Faust pipeline: the benchmark's second reference (issue 5, target 1).

``python -m bench.naive_faust --bootstrap HOST:PORT --topic T --app-id ID --expected N
--data-dir DIR --web-port P --status-file F [tuning]`` runs one Faust worker with two
agents chained through a repartition topic, the way a first Faust version of the service
would be written:

1. ``naive-rekey`` reads the ingest topic in batches (``stream.take(batch_max,
   within=batch_within)``), parses every event with ``orjson`` and re-keys it by its
   normalised email, else its ``userId``, else its ``anonymousId`` (tracks and pages carry
   no email), with one ``await topic.send()`` per event to ``<app id>-by-key``;
2. ``naive-table`` reads that topic event by event (a Faust table may only be written
   inside stream iteration, so no ``take()`` here), parses the event again and writes a
   small dict per event to the table ``naive_contacts`` (read-modify-write; one changelog
   message per write), in the store of the run (RocksDB or memory).

Settings: "tuned" as in /work/shared/reference/broker-and-baselines.md
(``broker_max_poll_records``, ``stream_buffer_maxsize``, ``stream_wait_empty=False``,
``take(2000, within=0.05)``), plus the worker's session / heartbeat / commit intervals and
producer linger / batch size, so both run with the same Faust/aiokafka settings.

``GET /health`` answers 200 once partitions are assigned, table recovery is done and no
rebalance is in progress (the worker's definition). The process writes its progress to
``--status-file`` (JSON, atomically replaced) every ``--status-interval`` seconds and at
once when the table agent has processed ``--expected`` events; ``done_at`` is
``time.monotonic()`` of that moment (CLOCK_MONOTONIC: the same clock in every process of
the machine, so the benchmark can compare it with its own).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

__all__ = [
    "NaiveSettings",
    "NaiveStatus",
    "TABLE_NAME",
    "build_parser",
    "count_keys",
    "faust_settings",
    "naive_argv",
    "naive_key",
    "parse",
    "read_status",
    "repartition_topic",
    "table_value",
    "write_status",
]

TABLE_NAME = "naive_contacts"


def repartition_topic(app_id: str) -> str:
    """The topic between the two agents (keyed by email / userId / anonymousId)."""
    return f"{app_id}-by-key"


# ------------------------------------------------------------------------------ pure parts


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def naive_key(event: Any) -> bytes:
    """The key of the second hop: normalised (trim + lowercase) email, else userId, else
    anonymousId, else messageId, else b"" (every event is forwarded and counted)."""
    if not isinstance(event, dict):
        return b""
    traits = event.get("traits")
    email = _text(traits.get("email")) if isinstance(traits, dict) else None
    if email is None:
        context = event.get("context")
        ctraits = context.get("traits") if isinstance(context, dict) else None
        email = _text(ctraits.get("email")) if isinstance(ctraits, dict) else None
    if email is not None:
        return email.strip().lower().encode()
    for field in ("userId", "anonymousId", "messageId"):
        value = _text(event.get(field))
        if value is not None:
            return value.encode()
    return b""


def parse(raw: Any) -> dict[str, Any]:
    """``orjson.loads`` of a record value; {} for anything that is not a JSON object."""
    try:
        event = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError):
        return {}
    return event if isinstance(event, dict) else {}


def table_value(previous: Any, event: dict[str, Any]) -> dict[str, Any]:
    """The small per-key record the table agent writes for every event: event count,
    last type / timestamp / messageId, and the ids and email seen (the latest wins)."""
    prev = previous if isinstance(previous, dict) else {}
    traits = event.get("traits")
    email = _text(traits.get("email")) if isinstance(traits, dict) else None
    return {
        "events": int(prev.get("events", 0)) + 1,
        "last_type": event.get("type"),
        "last_ts": event.get("timestamp"),
        "last_message_id": event.get("messageId"),
        "email": email.strip().lower() if email else prev.get("email"),
        "user_id": _text(event.get("userId")) or prev.get("user_id"),
        "anonymous_id": _text(event.get("anonymousId")) or prev.get("anonymous_id"),
    }


def count_keys(events: Iterable[bytes]) -> int:
    """Distinct keys the table ends with for these events (the run checks it)."""
    return len({naive_key(parse(raw)) for raw in events})


@dataclass(frozen=True)
class NaiveSettings:
    """What the naive app runs with (the benchmark builds it from the worker's settings)."""

    bootstrap: str
    topic: str
    app_id: str
    partitions: int
    expected: int
    store: str
    data_dir: str
    web_port: int
    status_file: str
    status_interval: float = 0.2
    take_max: int = 2000
    take_within: float = 0.05
    max_poll_records: int = 10_000
    stream_buffer_maxsize: int = 65_536
    session_timeout: float = 30.0
    heartbeat_interval: float = 3.0
    commit_interval: float = 2.8
    producer_linger_ms: int = 5
    producer_max_batch_size: int = 16_384
    #: CPython GC thresholds "gen0,gen1,gen2" as the worker sets them ("" = CPython's).
    gc_thresholds: str = ""
    #: The consumer's fetch_max_wait_ms as the worker sets it (0 = Faust's fixed 1500).
    fetch_max_wait_ms: int = 0


def faust_settings(s: NaiveSettings) -> dict[str, Any]:
    """``faust.App`` keyword arguments: tuned, and otherwise the worker's settings."""
    return {
        "id": s.app_id,
        "broker": [f"kafka://{host.strip()}" for host in s.bootstrap.split(",") if host.strip()],
        "store": s.store,
        "datadir": s.data_dir,
        "topic_partitions": s.partitions,
        "topic_replication_factor": 1,
        "consumer_auto_offset_reset": "earliest",
        "broker_session_timeout": s.session_timeout,
        "broker_heartbeat_interval": s.heartbeat_interval,
        "broker_commit_interval": s.commit_interval,
        # tuned (broker-and-baselines.md)
        "broker_max_poll_records": s.max_poll_records,
        "stream_buffer_maxsize": s.stream_buffer_maxsize,
        "stream_wait_empty": False,
        "producer_linger_ms": s.producer_linger_ms,
        "producer_max_batch_size": s.producer_max_batch_size,
        "table_standby_replicas": 0,
        "web_enabled": True,
        "web_host": "127.0.0.1",
        "web_bind": "127.0.0.1",
        "web_port": s.web_port,
        "key_serializer": "raw",
        "value_serializer": "json",
    }


_ARG_FIELDS = tuple(NaiveSettings.__dataclass_fields__)


def naive_argv(s: NaiveSettings) -> list[str]:
    """The command line of ``python -m bench.naive_faust`` (without the interpreter)."""
    argv = ["-m", "bench.naive_faust"]
    for name in _ARG_FIELDS:
        argv += [f"--{name.replace('_', '-')}", str(getattr(s, name))]
    return argv


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_faust", description=__doc__)
    types = {"int": int, "float": float, "str": str}
    for name, f in NaiveSettings.__dataclass_fields__.items():
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
        kwargs: dict[str, Any] = {"type": types[kind], "dest": name}
        if f.default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        parser.add_argument(f"--{name.replace('_', '-')}", **kwargs)
    parser.add_argument("--loglevel", default="info")
    return parser


@dataclass
class NaiveStatus:
    """Progress of the naive app (the status file)."""

    pid: int
    rekeyed: int = 0
    """Events the first agent has sent to the repartition topic."""
    processed: int = 0
    """Events the table agent has written to the table."""
    new_keys: int = 0
    """Table writes that found no previous value (= distinct keys on a fresh run)."""
    first_event_at: float | None = None
    """time.monotonic() when the first agent got its first batch."""
    last_event_at: float | None = None
    """time.monotonic() of the table agent's latest write."""
    done_at: float | None = None
    """time.monotonic() when ``processed`` reached the expected count."""
    written_at: float = 0.0


def write_status(path: Path, status: NaiveStatus) -> None:
    """Replace ``path`` atomically with the status as JSON."""
    status.written_at = time.monotonic()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(asdict(status)))
    os.replace(tmp, path)


def read_status(path: Path) -> NaiveStatus | None:
    """The last status written (None if there is none yet)."""
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    fields = NaiveStatus.__dataclass_fields__
    return NaiveStatus(**{k: v for k, v in data.items() if k in fields})


# ------------------------------------------------------------------------------ the app


def build_app(s: NaiveSettings) -> Any:
    """The Faust app with both agents, the table, /health and the status timer."""
    import faust

    app = faust.App(**faust_settings(s))
    if s.fetch_max_wait_ms:
        from app.faust_app import set_fetch_max_wait

        set_fetch_max_wait(app, s.fetch_max_wait_ms)
    ingest = app.topic(s.topic, key_serializer="raw", value_serializer="raw")
    by_key = app.topic(
        repartition_topic(s.app_id),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=s.partitions,
        internal=True,
    )
    table = app.Table(
        TABLE_NAME,
        default=None,
        partitions=s.partitions,
        key_type=bytes,  # serializers: the app's defaults, raw keys and json values
    )
    status = NaiveStatus(pid=os.getpid())
    status_path = Path(s.status_file)
    expected = s.expected

    @app.agent(ingest, name="naive-rekey")
    async def rekey(stream: Any) -> None:
        async for values in stream.take(s.take_max, within=s.take_within):
            if status.first_event_at is None:
                status.first_event_at = time.monotonic()
            for raw in values:
                await by_key.send(key=naive_key(parse(raw)), value=raw)
                status.rekeyed += 1

    @app.agent(by_key, name="naive-table")
    async def write(stream: Any) -> None:
        async for key, raw in stream.items():
            previous = table.get(key)
            if previous is None:
                status.new_keys += 1
            table[key] = table_value(previous, parse(raw))
            status.processed += 1
            status.last_event_at = time.monotonic()
            if status.done_at is None and status.processed >= expected:
                status.done_at = status.last_event_at
                write_status(status_path, status)

    @app.timer(s.status_interval)
    async def report() -> None:
        write_status(status_path, status)

    @app.page("/health")
    async def health(web: Any, request: Any) -> Any:
        try:
            assigned = len(app.consumer.assignment())
        except Exception:
            assigned = 0
        recovery = getattr(app.tables, "recovery", None)
        recovered = bool(recovery is not None and recovery.completed.is_set())
        ready = assigned > 0 and recovered and not app.rebalancing
        return web.json(
            {"ready": ready, "assigned_partitions": assigned, "tables_recovered": recovered},
            status=200 if ready else 503,
        )

    return app


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    loglevel = args.loglevel
    s = NaiveSettings(**{k: v for k, v in vars(args).items() if k in _ARG_FIELDS})
    Path(s.data_dir).mkdir(parents=True, exist_ok=True)
    write_status(Path(s.status_file), NaiveStatus(pid=os.getpid()))
    app = build_app(s)
    import faust

    from app.cli import tune_gc

    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    if s.gc_thresholds:
        a, b, c = (int(x) for x in s.gc_thresholds.split(","))
        tune_gc((a, b, c))
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
