"""RocksDB options of the table stores, as Faust opens them (no Kafka needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import rocksdict
from faust.stores.rocksdb import RocksDBOptions

from tables.store_options import WAL_OPTION, StoreOptions


def log_bytes(db_dir: Path) -> int:
    """Bytes in the store's write-ahead log files."""
    return sum(f.stat().st_size for f in db_dir.glob("*.log"))


def open_like_faust(options: StoreOptions, path: Path) -> rocksdict.Rdict:
    # What faust.stores.rocksdb.Store does with a table's options.
    return RocksDBOptions(**options.rocksdb_options(), use_rocksdict=True).open(path)


def write_rows(db: rocksdict.Rdict, n: int) -> None:
    batch = rocksdict.WriteBatch(raw_mode=True)
    for i in range(n):
        batch.put(f"k{i}".encode(), b"v" * 500)
    db.write(batch)
    db.put(b"offset", b"41")  # a plain put, as Faust records its changelog offset


@pytest.mark.parametrize("wal", [False, True])
def test_store_writes_skip_the_log_unless_asked_and_a_clean_close_keeps_them(
    tmp_path: Path, wal: bool
) -> None:
    path = tmp_path / "users-0.db"
    db = open_like_faust(StoreOptions(write_ahead_log=wal), path)
    write_rows(db, 1000)
    if wal:
        assert log_bytes(path) > 500_000
    else:
        assert log_bytes(path) == 0
    db.close()
    # Closed cleanly, the write buffers went to disk either way.
    reopened = rocksdict.Rdict(str(path), rocksdict.Options(raw_mode=True),
                               access_type=rocksdict.AccessType.read_only())
    try:
        assert reopened.get(b"k999") == b"v" * 500
        assert reopened.get(b"offset") == b"41"
    finally:
        reopened.close()


def test_wal_key_never_reaches_faust_or_rocksdb_options() -> None:
    options = StoreOptions(block_cache_mb=2, write_buffer_mb=4, write_buffers=3)
    faust_options = RocksDBOptions(**options.rocksdb_options(), use_rocksdict=True)
    assert WAL_OPTION not in faust_options.extra_options
    assert faust_options.write_buffer_size == 4 * 1024 * 1024
    assert faust_options.max_write_buffer_number == 3
    assert faust_options.block_cache_size == 2 * 1024 * 1024
    # Options built without our key (another Faust app in the process) keep the log.
    assert RocksDBOptions(use_rocksdict=True).emarsys_write_ahead_log is True
