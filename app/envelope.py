"""Record envelopes: many keyed records in one Kafka message on the internal hops.

The ``identity`` and ``contact-events`` topics carry envelopes instead of one message
per record, because each Kafka message read or written through Faust costs far more
than handling the record itself (broker-and-baselines.md: a Faust agent doing nothing
reads about 7,000 messages/s). One envelope holds the records of one batch that go to
one partition, in the order they were produced:

    {"records": [{"key": "<key>", "value": {...}}, ...]}

The partition of an envelope is the one Kafka's default partitioner (murmur2) gives
each record's key, so a record lands in exactly the partition it would have had as a
keyed message of its own: tables stay co-partitioned with their topics, and several
workers split the keys as before. The envelope itself has no Kafka key.

:func:`unpack` also accepts a plain single-record message (the shape these topics had
before envelopes), so records written by an older worker are still read after an
upgrade.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka.partitioner import murmur2

__all__ = [
    "ENVELOPE_MAX_BYTES",
    "ENVELOPE_MAX_RECORDS",
    "Envelope",
    "MalformedRecord",
    "pack",
    "partition_for_key",
    "unpack",
]

# Well under Kafka's default message.max.bytes (1 MiB) and the producer's
# max_request_size (1 MiB), so no broker or client setting needs to change.
ENVELOPE_MAX_BYTES = 256 * 1024
# Bounds the work one message carries (a batch is cut into chunks of records anyway).
ENVELOPE_MAX_RECORDS = 1000


def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition the producer's default partitioner (murmur2) gives ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


@functools.lru_cache(maxsize=200_000)
def _partition_of(key: str, partitions: int) -> int:
    # aiokafka's murmur2 is pure Python (about 6 us a key); the same keys come back.
    return partition_for_key(key.encode(), partitions)


@dataclass(slots=True)
class Envelope:
    partition: int
    value: bytes
    records: int


@dataclass(slots=True)
class MalformedRecord:
    """Something on an envelope topic that is not a record (kept for a dead letter)."""

    error: str
    raw: bytes


_OPEN = b'{"records":['
_CLOSE = b"]}"


def pack(
    records: Iterable[tuple[str, Any]],
    partitions: int,
    *,
    max_bytes: int = ENVELOPE_MAX_BYTES,
    max_records: int = ENVELOPE_MAX_RECORDS,
) -> list[Envelope]:
    """Group ``(key, value)`` records into envelopes by the partition of their key.

    Order is kept per partition. A record larger than ``max_bytes`` on its own still
    gets an envelope (of one record): the broker, not this function, says no to it.
    """
    open_items: dict[int, list[bytes]] = {}
    open_size: dict[int, int] = {}
    out: list[Envelope] = []

    def close(p: int) -> None:
        items = open_items.pop(p)
        del open_size[p]
        out.append(Envelope(p, _OPEN + b",".join(items) + _CLOSE, len(items)))

    for key, value in records:
        item = b'{"key":' + orjson.dumps(key) + b',"value":' + orjson.dumps(value) + b"}"
        p = _partition_of(key, partitions)
        items = open_items.get(p)
        if items is not None and (
            open_size[p] + len(item) + 1 > max_bytes or len(items) >= max_records
        ):
            close(p)
            items = None
        if items is None:
            open_items[p] = [item]
            open_size[p] = len(_OPEN) + len(_CLOSE) + len(item)
        else:
            items.append(item)
            open_size[p] += len(item) + 1
    for p in list(open_items):
        close(p)
    return out


def unpack(
    key: bytes | str | None, value: bytes | None
) -> tuple[list[tuple[str, dict[str, Any]]], list[MalformedRecord]]:
    """The records of one message: an envelope, or a plain keyed single record."""
    raw = b"" if value is None else bytes(value)
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return [], [MalformedRecord(f"not JSON: {exc}", raw)]
    if not isinstance(msg, dict):
        return [], [MalformedRecord("not a JSON object", raw)]
    batch = msg.get("records")
    if "kind" not in msg and isinstance(batch, list):
        records: list[tuple[str, dict[str, Any]]] = []
        bad: list[MalformedRecord] = []
        for item in batch:
            if (
                isinstance(item, dict)
                and isinstance(item.get("key"), str)
                and isinstance(item.get("value"), dict)
            ):
                records.append((item["key"], item["value"]))
            else:
                bad.append(MalformedRecord(
                    "envelope record without a string key and an object value",
                    orjson.dumps(item),
                ))
        return records, bad
    if key is None:
        return [], [MalformedRecord("single record without a Kafka key", raw)]
    k = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
    return [(k, msg)], []
