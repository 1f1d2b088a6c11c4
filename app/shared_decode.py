"""One decode of an envelope message for every agent that reads its topic (pure).

Faust hands each ``contact-events`` message to both agents that read the topic (users
and, with rules configured, rules), as the same ``Message`` object. Each agent decoded
it on its own: ``orjson.loads`` of up to 256 KiB, the Python objects of up to 1,000
records, and freeing them again, twice per message. Now the first reader decodes and
the others take the same records.

The records are shared, so readers must not change them: neither
:class:`app.contacts.ContactUpdater` nor :class:`app.rules.RuleEngine` writes to a
record it is handed (``tests/test_app/test_shared_decode.py`` checks both).

Only the reader that decoded a message gets its malformed records (to dead-letter
them once, not once per reader).

Bounded: decodes waiting for a reader that is behind are kept up to ``max_records``
records in all; past that the oldest is dropped and that reader decodes the message
again itself. Its bytes have not changed, so neither have its records; a malformed
record in it is then dead-lettered a second time (at-least-once, as everywhere).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.envelope import MalformedRecord, unpack

__all__ = ["Decoded", "SharedDecodeReader", "SharedDecodes"]

#: The records of one message and its malformed records (see :func:`app.envelope.unpack`).
Decoded = tuple[list[tuple[str, dict[str, Any]]], list[MalformedRecord]]


@dataclass
class _Entry:
    message: Any  # held, so that its id cannot be reused while the entry exists
    records: list[tuple[str, dict[str, Any]]]
    waiting: set[int]  # readers that have not taken it yet
    size: int


class SharedDecodes:
    """Decodes of one topic's messages, shared by the readers that :meth:`join`\\ ed.

    Messages are read by their ``key``, ``value``, ``partition`` and ``offset``. A reader
    reads a partition in offset order (from wherever it was positioned), so a reader
    whose last message of the partition is at or past a message's offset has taken it
    already: only readers still before it wait for a decode.
    """

    def __init__(
        self,
        max_records: int,
        decode: Callable[[Any, Any], Decoded] = unpack,
    ) -> None:
        if max_records < 1:
            raise ValueError("max_records must be >= 1")
        self.max_records = max_records
        self._decode = decode
        # By id(message): Faust hands every reader the same Message object.
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._held = 0
        # reader -> partition -> offset of the last message it decoded or took.
        self._positions: list[dict[int, int]] = []
        #: Messages decoded / taken from another reader's decode / dropped unshared.
        self.decoded = 0
        self.shared = 0
        self.dropped = 0

    def join(self) -> SharedDecodeReader:
        """Register one more reader of the topic (at agent registration)."""
        self._positions.append({})
        return SharedDecodeReader(self, len(self._positions) - 1)

    @property
    def held_records(self) -> int:
        return self._held

    def decode(self, message: Any, reader: int) -> Decoded:
        """The records of ``message`` for ``reader``, decoded once for all readers;
        malformed records only for the reader that decoded it."""
        partition, offset = message.partition, message.offset
        self._positions[reader][partition] = offset
        key = id(message)
        entry = self._entries.get(key)
        if entry is not None and reader in entry.waiting:
            # (The same message: the entry holds it, so its id is its own.)
            self.shared += 1
            entry.waiting.discard(reader)
            if not entry.waiting:
                del self._entries[key]
                self._held -= entry.size
            return entry.records, []
        records, bad = self._decode(message.key, message.value)
        self.decoded += 1
        waiting = {
            other for other, positions in enumerate(self._positions)
            if other != reader and positions.get(partition, -1) < offset
        }
        if waiting:
            if entry is not None:  # read again by the same reader (a redelivery)
                del self._entries[key]
                self._held -= entry.size
            size = max(1, len(records))
            self._entries[key] = _Entry(message, records, waiting, size)
            self._held += size
            while self._held > self.max_records and self._entries:
                # The oldest first: an entry whose reader never comes (its partition
                # was revoked meanwhile) must not stay for good. A reader further behind
                # than max_records decodes for itself, as without sharing.
                _key, old = self._entries.popitem(last=False)
                self._held -= old.size
                self.dropped += 1
        return records, bad


@dataclass(frozen=True)
class SharedDecodeReader:
    """One reader's handle on a topic's :class:`SharedDecodes`."""

    decodes: SharedDecodes
    reader: int

    def decode(self, message: Any) -> Decoded:
        return self.decodes.decode(message, self.reader)
