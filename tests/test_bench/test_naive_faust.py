"""bench.naive_faust: the naive two-hop Faust reference (pure parts, and one real run)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from app.broker import free_port
from bench.generate import generate_events, normalize_email
from bench.naive_faust import (
    TABLE_NAME,
    NaiveSettings,
    NaiveStatus,
    build_parser,
    count_keys,
    faust_settings,
    naive_argv,
    naive_key,
    parse,
    read_status,
    repartition_topic,
    table_value,
    write_status,
)
from bench.pipeline import ROOT, _create_topic, produce, read_topic


def _settings(tmp_path: Path, **kw: Any) -> NaiveSettings:
    base = NaiveSettings(
        bootstrap="127.0.0.1:9092",
        topic="bench.events",
        app_id="emarsys-bench-naive",
        partitions=4,
        expected=20_000,
        store="rocksdb://",
        data_dir=str(tmp_path / "naive"),
        web_port=8125,
        status_file=str(tmp_path / "status.json"),
    )
    return replace(base, **kw)


def test_key_is_the_normalised_email_else_user_id_else_anonymous_id() -> None:
    identify = {
        "type": "identify",
        "userId": "u-1",
        "anonymousId": "a-1",
        "traits": {"email": " Ada.Lovelace@Example.COM "},
    }
    assert naive_key(identify) == b"ada.lovelace@example.com"
    in_context = {"type": "track", "userId": "u-1", "context": {"traits": {"email": "B@x.io"}}}
    assert naive_key(in_context) == b"b@x.io"
    # tracks / pages of identified people carry only the userId
    assert naive_key({"type": "track", "userId": "u-1", "anonymousId": "a-1"}) == b"u-1"
    # anonymous-first people and visitors: only the anonymousId
    assert naive_key({"type": "page", "anonymousId": "a-9"}) == b"a-9"
    # blank ids do not count; the messageId is the last resort, then b""
    assert naive_key({"type": "track", "userId": "  ", "messageId": "m-1"}) == b"m-1"
    assert naive_key({"type": "track", "traits": {"email": ""}, "anonymousId": "a"}) == b"a"
    assert naive_key({}) == b""
    assert naive_key(["not", "an", "object"]) == b""


def test_parse_gives_an_empty_event_for_anything_but_a_json_object() -> None:
    assert parse(b'{"type": "track"}') == {"type": "track"}
    assert parse(b"not json") == {}
    assert parse(b"[1, 2]") == {}
    assert parse(None) == {}


def test_table_value_is_a_small_running_record_per_key() -> None:
    events = [
        {"type": "page", "anonymousId": "a-1", "timestamp": "t1", "messageId": "m1"},
        {
            "type": "identify",
            "userId": "u-1",
            "anonymousId": "a-1",
            "traits": {"email": " Ada@Example.com"},
            "timestamp": "t2",
            "messageId": "m2",
        },
        {"type": "track", "userId": "u-1", "timestamp": "t3", "messageId": "m3"},
    ]
    value: Any = None
    for event in events:
        value = table_value(value, event)
        assert orjson.loads(orjson.dumps(value)) == value  # what the json changelog holds
    assert value == {
        "events": 3,
        "last_type": "track",
        "last_ts": "t3",
        "last_message_id": "m3",
        "email": "ada@example.com",  # kept from the identify
        "user_id": "u-1",
        "anonymous_id": "a-1",  # kept from the earlier events
    }
    assert len(orjson.dumps(value)) < 200


def test_every_generated_event_gets_a_real_id_as_key() -> None:
    gen = generate_events(3000, 400, seed=11)
    parsed = [orjson.loads(raw) for raw in gen.events]
    emails = {normalize_email(e["traits"]["email"]) for e in parsed if e["type"] == "identify"}
    user_ids = {e["userId"] for e in parsed if e["type"] != "identify" and "userId" in e}
    anonymous = {e["anonymousId"] for e in parsed if "userId" not in e}
    assert emails == gen.expected_emails
    keys = Counter(naive_key(e).decode() for e in parsed)
    assert set(keys) == emails | user_ids | anonymous
    assert count_keys(gen.events) == len(emails | user_ids | anonymous)
    assert sum(keys.values()) == 3000  # every event is forwarded, none dropped


def test_faust_settings_are_the_tuned_ones() -> None:
    s = _settings(Path("/tmp"), bootstrap="h1:9092, h2:9093", store="memory://")
    conf = faust_settings(s)
    assert conf["broker"] == ["kafka://h1:9092", "kafka://h2:9093"]
    assert conf["id"] == "emarsys-bench-naive"
    assert conf["store"] == "memory://"
    assert conf["stream_wait_empty"] is False
    assert conf["broker_max_poll_records"] == 10_000
    assert conf["stream_buffer_maxsize"] == 65_536
    assert conf["consumer_auto_offset_reset"] == "earliest"
    assert conf["topic_partitions"] == 4
    assert (s.take_max, s.take_within) == (2000, 0.05)
    assert repartition_topic(s.app_id) == "emarsys-bench-naive-by-key"


def test_argv_round_trips_through_the_parser(tmp_path: Path) -> None:
    s = _settings(tmp_path, session_timeout=6.0, take_max=500, producer_max_batch_size=1)
    argv = naive_argv(s)
    assert argv[:2] == ["-m", "bench.naive_faust"]
    args = vars(build_parser().parse_args(argv[2:]))
    assert args.pop("loglevel") == "info"
    assert NaiveSettings(**args) == s
    with pytest.raises(SystemExit):  # --expected and the others are required
        build_parser().parse_args(["--topic", "t"])


def test_status_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    assert read_status(path) is None
    status = NaiveStatus(pid=42, rekeyed=10, processed=7, new_keys=3, done_at=None)
    write_status(path, status)
    assert read_status(path) == status
    assert status.written_at > 0
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no .tmp left
    path.write_bytes(b"{broken")
    assert read_status(path) is None


def _spawn(s: NaiveSettings, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, *naive_argv(s)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def _wait_health(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the naive app exited"
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with session.get(
                    f"http://127.0.0.1:{port}/health", timeout=aiohttp.ClientTimeout(total=1)
                ) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise AssertionError("the naive app never answered /health with 200")


async def test_naive_app_rekeys_and_writes_every_event(kafka_broker: Any, tmp_path: Path) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    topic = "bench-test.naive-ingest"
    app_id = "bench-test-naive"
    gen = generate_events(400, 60, seed=5)
    await _create_topic(bootstrap, topic, 2)
    await produce(bootstrap, topic, gen.events)
    s = _settings(
        tmp_path,
        bootstrap=bootstrap,
        topic=topic,
        app_id=app_id,
        partitions=2,
        expected=len(gen.events),
        store="memory://",
        web_port=free_port(),
        session_timeout=6.0,
        heartbeat_interval=0.5,
    )
    log = tmp_path / "naive.log"
    proc = _spawn(s, log)
    try:
        await _wait_health(s.web_port, proc, 90)
        deadline = time.monotonic() + 90
        status = read_status(Path(s.status_file))
        while (status is None or status.done_at is None) and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            await asyncio.sleep(0.1)
            status = read_status(Path(s.status_file))
        assert status is not None and status.done_at is not None, log.read_text()[-3000:]
        assert status.rekeyed == status.processed == 400
        assert status.new_keys == count_keys(gen.events)
        assert status.first_event_at is not None and status.first_event_at <= status.done_at

        # The repartition topic holds every event once, keyed like naive_key.
        records = await read_topic(bootstrap, repartition_topic(app_id), quiet=1.0, limit=30)
        assert sorted(k or b"" for k, _ in records) == sorted(
            naive_key(parse(raw)) for raw in gen.events
        )
        # One changelog message per table write; the latest per key counts its events.
        changelog = f"{app_id}-{TABLE_NAME}-changelog"
        entries: list[tuple[bytes | None, bytes | None]] = []
        until = time.monotonic() + 20
        while len(entries) < 400 and time.monotonic() < until:
            entries = await read_topic(bootstrap, changelog, quiet=1.0, limit=30)
        assert len(entries) == 400
        latest = {key: orjson.loads(value) for key, value in entries if value is not None}
        per_key = Counter(naive_key(parse(raw)) for raw in gen.events)
        assert {key: v["events"] for key, v in latest.items()} == per_key
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
