"""Keys and values of every table are bytes: orjson in, orjson out.

Faust's ``raw`` serializer is used for tables so that keys read back after a
changelog recovery are the same type (bytes) as the keys written, for both the
RocksDB and the memory store.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["dumps", "loads", "key"]

dumps = orjson.dumps


def loads(data: bytes | None) -> Any:
    return None if data is None else orjson.loads(data)


def key(value: str) -> bytes:
    return value.encode("utf-8")
