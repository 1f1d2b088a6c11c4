"""Table writes go to RocksDB and the changelog the way Faust's own path writes them.

The worker writes its tables with :class:`tables.writer.TableWriter` (one RocksDB write
batch and one changelog record batch per partition). These tests read what a real
worker left behind: the changelog topic on the broker and the RocksDB files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from rocksdict import AccessType, Options, Rdict

from app.envelope import partition_for_key
from tests.fixtures import Deployment, wait_for
from tests.test_e2e.test_pipeline import identify, user_record

#: Where Faust's RocksDB store keeps the offset of the last changelog record it has.
FAUST_OFFSET_KEY = b"__faust\0offset__"


async def read_changelog(dep: Deployment, table: str, expect: int) -> list[ConsumerRecord]:
    topic = f"{dep.name}-{table}-changelog"
    consumer = AIOKafkaConsumer(bootstrap_servers=dep.bootstrap, enable_auto_commit=False,
                                group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(dep.config["kafka"]["partitions"])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[ConsumerRecord] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(out) < expect:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                out.extend(records)
        return out
    finally:
        await consumer.stop()


def persisted_offsets(data_dir: Path, table: str) -> dict[int, int]:
    """partition -> the changelog offset Faust's store says it holds (read-only open)."""
    out: dict[int, int] = {}
    for db_path in sorted(data_dir.rglob(f"{table}-*.db")):
        partition = int(db_path.name.rsplit("-", 1)[1].removesuffix(".db"))
        db = Rdict(str(db_path), Options(raw_mode=True), access_type=AccessType.read_only())
        try:
            raw = db.get(FAUST_OFFSET_KEY)
        finally:
            db.close()
        if raw is not None:
            out[partition] = int(raw)
    return out


def rocksdb_options_text(db_dir: Path) -> str:
    """What RocksDB wrote about the options of the database in ``db_dir``: its newest
    OPTIONS file (write buffers) and its LOG (the block cache's capacity)."""
    newest = max(db_dir.glob("OPTIONS-*"), key=lambda p: int(p.name.split("-")[1]))
    return newest.read_text() + (db_dir / "LOG").read_text(errors="replace")


async def users_table_keys_metric(dep: Deployment) -> float:
    port = dep.workers[0].web_port
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith("emarsys_stream_users_table_keys "):
            return float(line.split()[1])
    raise AssertionError("emarsys_stream_users_table_keys not in /metrics")


@pytest.mark.parametrize(
    ("batch_bytes", "memory", "expected_options"),
    [
        (1, {}, ("write_buffer_size=16777216", "max_write_buffer_number=2",
                 "capacity : 8388608")),
        (16384, {"worker.rocksdb_write_buffer_mb": 4, "worker.rocksdb_write_buffers": 3,
                 "worker.rocksdb_block_cache_mb": 2, "worker.rocksdb_wal": True},
         ("write_buffer_size=4194304", "max_write_buffer_number=3", "capacity : 2097152")),
    ],
)
async def test_table_writes_reach_changelog_and_store_like_faust(
    deployment_factory: Any,
    simulator: Any,
    batch_bytes: int,
    memory: dict[str, int],
    expected_options: tuple[str, ...],
) -> None:
    """1 byte: every changelog record in its own batch (what the embedded broker needs);
    16 KiB: many records per batch (Apache Kafka's default). Also: the stores get the
    configured RocksDB memory and write-ahead log (off by default; a clean stop still
    leaves every write and the persisted offsets on disk), and /metrics counts the users
    table's keys."""
    dep = deployment_factory(
        simulator.url, **{"worker.producer_max_batch_size": batch_bytes, **memory}
    )
    w = await dep.start_worker()
    n = 30
    # Anonymous first: held under their anonymousId, released (deleted) by the identify.
    await dep.produce([{"type": "track", "event": "Viewed", "anonymousId": f"anon{i}",
                        "messageId": f"t{i}"} for i in range(n)])
    assert len(await read_changelog(dep, "held_events", expect=n)) == n  # all held
    assert len(await read_changelog(dep, "held_event_items", expect=n)) == n
    await dep.produce([identify(f"p{i}@example.com", mid=f"i{i}", uid=f"u{i}", aid=f"anon{i}",
                                firstName=f"F{i}") for i in range(n)])
    await wait_for(lambda: len(simulator.state.contacts) >= n)

    users = await read_changelog(dep, "users", expect=n)
    emails = {f"p{i}@example.com".encode() for i in range(n)}
    assert {r.key for r in users} == emails
    for r in users:  # the partition Faust itself would pick: the contact-events message's
        assert r.partition == partition_for_key(r.key, 2)
    last = {r.key: r for r in users}
    rec = await user_record(dep, "p7@example.com")
    assert rec is not None and rec["anonymous_ids"] == ["anon7"]
    assert orjson.loads(last[b"p7@example.com"].value) == rec

    # Held events: written when the track came, a tombstone once the identify released it.
    held = await read_changelog(dep, "held_events", expect=2 * n)
    by_key: dict[bytes, list[bytes | None]] = {}
    for r in held:
        by_key.setdefault(r.key, []).append(r.value)
    assert set(by_key) == {f"anon{i}".encode() for i in range(n)}
    for values in by_key.values():
        assert values[0] is not None and values[-1] is None
        first = orjson.loads(values[0])  # the index: one entry, sequence number 0
        assert first["next"] == 1 and [e[0] for e in first["held"]] == [0]
    # The events themselves, one key each, in the partition of their id (where the index is).
    items = await read_changelog(dep, "held_event_items", expect=2 * n)
    item_values: dict[bytes, list[bytes | None]] = {}
    for r in items:
        ident = r.key.rpartition(b"\x00")[0]
        assert r.key == ident + b"\x000"
        assert r.partition == partition_for_key(ident, 2)
        item_values.setdefault(ident, []).append(r.value)
    assert set(item_values) == set(by_key)
    for ident, values in item_values.items():
        assert len(values) == 2 and values[-1] is None
        assert values[0] is not None
        assert orjson.loads(values[0])["event"]["anonymousId"] == ident.decode()

    assert await users_table_keys_metric(dep) == n

    users_stores = list((dep.tmp / "worker0").rglob("users-*.db"))
    assert users_stores
    wal_bytes = sum(f.stat().st_size for d in users_stores for f in d.glob("*.log"))
    if memory.get("worker.rocksdb_wal"):
        assert wal_bytes > 0
    else:
        assert wal_bytes == 0

    w.stop()
    for db_dir in (dep.tmp / "worker0").rglob("users-*.db"):
        options = rocksdb_options_text(db_dir)
        for expected in expected_options:
            assert expected in options, (db_dir, expected)
    # Recovery resumes after the persisted offset: it must be the last record written.
    for table, records in (("users", users), ("held_events", held),
                           ("held_event_items", items)):
        newest: dict[int, int] = {}
        for r in records:
            newest[r.partition] = max(newest.get(r.partition, -1), r.offset)
        assert persisted_offsets(dep.tmp / "worker0", table) == newest, table
