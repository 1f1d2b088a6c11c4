"""bench.state: the users records written to the changelog, their partitions and record
batches, the RocksDB size count and the worker log parser (no broker, no worker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

import bench.__main__ as cli
from app.contacts import ContactUpdater
from app.data_map import DataMap
from app.identity import UserRecord
from bench import state
from bench.pipeline import PipelineOptions, worker_config
from bench.state import (
    _cpu_between,
    build_user_record,
    changelog_topic,
    key_partition,
    parse_worker_log,
    rocksdb_disk_usage,
    single_record_batch,
)
from tables import codec


@pytest.fixture(scope="module")
def records() -> list[tuple[bytes, bytes]]:
    return [build_user_record(i, seed=1) for i in range(2000)]


def test_records_round_trip_through_the_table_codec(records: list[tuple[bytes, bytes]]) -> None:
    for key, value in records:
        stored = codec.loads(value)
        rec = UserRecord.from_dict(stored)
        # the key is the table key of the record's primary key
        assert key == codec.key(rec.primary_key)
        # decoding and encoding again gives the same bytes the users agent would write
        assert rec.to_dict() == stored
        assert codec.dumps(rec.to_dict()) == value


def test_records_look_like_real_ones(records: list[tuple[bytes, bytes]]) -> None:
    recs = [UserRecord.from_dict(codec.loads(v)) for _, v in records]
    assert len({r.primary_key for r in recs}) == len(recs)
    assert all(r.primary_key == r.primary_key.strip().lower() for r in recs)
    assert all(1 <= len(r.user_ids) <= 2 and len(r.anonymous_ids) == 1 for r in recs)
    assert all({"1", "2", "31"} <= set(r.fields_sent) for r in recs)
    assert all(r.created_in_emarsys and r.first_seen_ms <= r.last_seen_ms for r in recs)
    assert all(r.event_count == sum(r.counts_by_type.values()) for r in recs)
    two_ids = sum(len(r.user_ids) == 2 for r in recs) / len(recs)
    with_audience = sum(bool(r.audiences) for r in recs) / len(recs)
    birthday = sum("4" in r.fields_sent for r in recs) / len(recs)
    assert 0.10 < two_ids < 0.20
    assert 0.25 < with_audience < 0.35
    assert 0.35 < birthday < 0.45
    assert all(set(r.audiences) == set(r.audiences_at) for r in recs)
    mean = sum(len(v) for _, v in records) / len(records)
    assert 470 < mean < 600
    assert all(1 <= len(r.seen) <= 4 for r in recs)


def test_records_are_deterministic(records: list[tuple[bytes, bytes]]) -> None:
    assert build_user_record(123, seed=1) == records[123]
    assert build_user_record(123, seed=2) != records[123]
    assert build_user_record(124, seed=1) != records[123]


def test_an_unchanged_identify_of_a_written_contact_costs_no_call(
    records: list[tuple[bytes, bytes]], tmp_path: Path
) -> None:
    """The users agent's logic reads a written record as an existing, created contact: an
    identify with the same values queues nothing; a changed value queues just that."""
    key, value = records[7]
    stored = UserRecord.from_dict(codec.loads(value))
    cfg = worker_config(PipelineOptions(), "127.0.0.1:1", "http://x/", 1, tmp_path)
    updater = ContactUpdater(
        DataMap.from_config(cfg["data_map"]), key_field_id=3, max_ids=50, dedupe_window_ms=1
    )
    fs = stored.fields_sent
    traits: dict[str, Any] = {"email": key.decode(), "firstName": fs["1"], "lastName": fs["2"]}
    traits["optIn"] = fs["31"] == 1
    if "4" in fs:
        traits["birthday"] = fs["4"]

    def run(t: dict[str, Any]) -> dict[str, Any]:
        event = {"type": "identify", "messageId": "m", "userId": stored.user_ids[-1], "traits": t}
        msg = {"kind": "event", "event": event, "ts": stored.last_seen_ms + 1}
        batch = updater.process(
            [(key.decode(), msg)],
            lambda _pk: UserRecord.from_dict(codec.loads(value)),
            stored.last_seen_ms + 10,
        )
        return batch.operations

    assert run(traits) == {}
    ops = run({**traits, "lastName": "Changed"})
    assert ops[key.decode()]["fields"] == {"2": "Changed"}


def test_key_partition_is_the_default_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    parts = list(range(4))
    seen = set()
    for i in range(500):
        key, _ = build_user_record(i)
        p = key_partition(key, 4)
        assert p == DefaultPartitioner()(key, parts, parts)
        seen.add(p)
    assert seen == set(parts)


def test_single_record_batches_concatenate_into_one_record_each() -> None:
    from aiokafka.record.memory_records import MemoryRecords

    pairs = [build_user_record(i) for i in range(5)]
    blob = b"".join(
        single_record_batch(k, v, 1_790_000_000_000 + i) for i, (k, v) in enumerate(pairs)
    )
    reader = MemoryRecords(blob)
    batches = []
    while reader.has_next():
        batch = reader.next_batch()
        assert batch is not None
        batches.append(list(batch))
    assert [len(b) for b in batches] == [1] * 5
    for i, (batch, (k, v)) in enumerate(zip(batches, pairs, strict=True)):
        assert batch[0].key == k and batch[0].value == v
        assert batch[0].timestamp == 1_790_000_000_000 + i


def test_rocksdb_disk_usage_counts_only_the_table_stores(tmp_path: Path) -> None:
    from rocksdict import Options, Rdict

    tables = tmp_path / "app-data" / "v1" / "tables"
    tables.mkdir(parents=True)
    db = Rdict(str(tables / "users-0.db"), options=Options(raw_mode=True))
    for i in range(2000):
        key, value = build_user_record(i)
        db[key] = value
    db.close()
    other = Rdict(str(tables / "dedupe-0.db"), options=Options(raw_mode=True))
    other[b"k"] = b"v" * 100_000
    other.close()
    fake = tables / "users-1.db"
    fake.mkdir()
    (fake / "000009.log").write_bytes(b"w" * 1000)
    (fake / "000010.sst").write_bytes(b"s" * 3000)
    (fake / "LOG").write_bytes(b"i" * 500)
    (tables / "users-1.db.bak").write_bytes(b"x" * 10_000)  # not a store directory

    usage = rocksdb_disk_usage(tmp_path)
    assert usage["dirs"] == ["app-data/v1/tables/users-0.db", "app-data/v1/tables/users-1.db"]
    apparent = usage["apparent"]
    assert apparent["total"] == apparent["sst"] + apparent["wal"] + apparent["other"]
    real_files = sum(p.stat().st_size for p in (tables / "users-0.db").rglob("*") if p.is_file())
    assert apparent["total"] == real_files + 4500
    assert apparent["sst"] >= 3000 and apparent["wal"] >= 1000 and apparent["other"] >= 500
    assert usage["allocated"]["total"] >= apparent["total"] - 4096 * usage["files"]
    assert rocksdb_disk_usage(tmp_path / "missing")["apparent"]["total"] == 0


def _line(ts: str, msg: str, level: str = "info") -> str:
    return orjson.dumps({"ts": ts, "level": level, "logger": "faust", "msg": msg}).decode()


def test_parse_worker_log_phases_highwaters_and_progress() -> None:
    topic = changelog_topic("app")
    assert topic == "app-users-changelog"
    table = (
        "[^---Recovery]: Highwater for active changelog partitions:\n"
        "+Highwater - Active------+-----------+-----------+\n"
        "| topic                  | partition | highwater |\n"
        "+------------------------+-----------+-----------+\n"
        "| app-dedupe-changelog   | 0         | -1        |\n"
        "| 〃                     | 1         | 5         |\n"
        "| app-users-changelog    | 0         | 249999    |\n"
        "| 〃                     | 1         | 250123    |\n"
        "| 〃                     | 2         | 249876    |\n"
        "| app-user_ids-changelog | 0         | 77        |\n"
        "+------------------------+-----------+-----------+"
    )
    lines = [
        "not json at all",
        _line("2026-11-28T10:00:00.000+00:00", "[^Worker]: Starting..."),
        _line("2026-11-28T10:00:15.000+00:00", "Executing _on_partitions_assigned"),
        _line("2026-11-28T10:00:16.000+00:00", table),
        _line(
            "2026-11-28T10:00:17.500+00:00",
            "[^---Recovery]: Restoring state from changelog topics...",
        ),
        _line(
            "2026-11-28T10:00:27.000+00:00",
            "Still fetching changelog topics for recovery, "
            "estimated time remaining 9 seconds (total remaining=400000):\n| x | 0 | 1 |",
        ),
        _line("2026-11-28T10:00:40.000+00:00", "Error in recovery boom", level="warning"),
        _line(
            "2026-11-28T10:01:00.250+00:00", "[^---Recovery]: Done reading from changelog topics"
        ),
        _line("2026-11-28T10:01:00.300+00:00", "[^---Recovery]: Worker ready"),
    ]
    out = parse_worker_log(lines, topic)
    assert out["highwaters"] == {0: 249999, 1: 250123, 2: 249876}
    base = out["phases"]["first_log_line"]
    rel = {k: round(v - base, 3) for k, v in out["phases"].items()}
    assert rel == {
        "first_log_line": 0.0,
        "partitions_assigned": 15.0,
        "highwaters_read": 16.0,
        "restore_started": 17.5,
        "restore_read_done": 60.25,
        "faust_worker_ready": 60.3,
    }
    assert [p["remaining"] for p in out["progress"]] == [400000]
    assert out["problems"] == ["Error in recovery boom"]


def test_cpu_between_interpolates() -> None:
    series = [{"t": 0.0, "cpu_s": 0.0}, {"t": 2.0, "cpu_s": 1.0}, {"t": 4.0, "cpu_s": 3.0}]
    assert _cpu_between(series, 1.0, 3.0) == 1.5
    assert _cpu_between(series, 0.0, 4.0) == 3.0
    assert _cpu_between(series, 1.0, 5.0) is None


def test_cli_quick_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[state.StateOptions] = []
    monkeypatch.setattr(state, "run_state", lambda opts: seen.append(opts) or 0)
    assert cli.main(["state", "--quick"]) == 0
    assert seen[-1].contacts == state.QUICK_CONTACTS and seen[-1].quick
    assert cli.main(["state", "--set", "worker.session_timeout=6"]) == 0
    assert seen[-1].contacts == 1_000_000
    assert seen[-1].overrides == {"worker.session_timeout": 6}
