"""A batch-scoped, write-coalescing view of one Faust table.

Agents read and write tables through a :class:`TableView` while handling a batch
from ``stream.take_events()``; :meth:`TableView.flush` then writes every changed key
once (one changelog record per key per batch, not per event) to the changelog and
store partition of the message that carried the key: with RocksDB in one write
batch and one changelog record batch per partition (:mod:`tables.writer`), otherwise
through Faust's own ``table[key] = value`` inside that message's event context.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import faust

from tables.codec import dumps, loads
from tables.context import event_context
from tables.writer import Change, table_writer

__all__ = ["DELETED", "CoalescingView", "TableView"]

_DELETED = object()
#: What :meth:`CoalescingView.changes` gives for a deleted key.
DELETED = _DELETED


class CoalescingView(MutableMapping[str, Any]):
    """The batch-scoped part of a table view: each key read and decoded once (through
    :meth:`_read`), changes kept in memory until the owner writes them."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}
        self._dirty: set[str] = set()
        # Keys read with a stored value: a deleted key not in here was only set within
        # the batch, so there is nothing to remove (known without reading it again).
        self._stored: set[str] = set()

    def _read(self, key: str) -> bytes | None:  # pragma: no cover - subclasses read
        raise NotImplementedError

    def _load(self, key: str) -> Any:
        """The batch's value of ``key``, read from the store once; ``_DELETED`` if none."""
        try:
            return self._cache[key]
        except KeyError:
            pass
        raw = self._read(key)
        if raw is None:
            value = _DELETED
        else:
            value = loads(raw)
            self._stored.add(key)
        self._cache[key] = value
        return value

    def __getitem__(self, key: str) -> Any:
        value = self._load(key)
        if value is _DELETED:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        # Not Mapping.get: that goes through __getitem__ and a KeyError for every
        # key not stored yet (each new contact).
        value = self._load(key)
        return default if value is _DELETED else value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._load(key) is not _DELETED

    def __setitem__(self, key: str, value: Any) -> None:
        self._cache[key] = value
        self._dirty.add(key)

    def __delitem__(self, key: str) -> None:
        self[key]  # KeyError if absent  # noqa: B018
        self._cache[key] = _DELETED
        self._dirty.add(key)

    def __iter__(self) -> Iterator[str]:  # pragma: no cover - not needed by agents
        raise TypeError("a batch view does not iterate the whole table")

    def __len__(self) -> int:  # pragma: no cover
        raise TypeError("a batch view has no length")

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)

    def changes(self) -> Iterator[tuple[str, Any]]:
        """Every changed key once with its value (``DELETED``: remove it), leaving out keys
        set and deleted within the batch (nothing stored to remove); then forgets the
        batch."""
        try:
            for key in self._dirty:
                value = self._cache[key]
                if value is _DELETED and key not in self._stored:
                    continue
                yield key, value
        finally:
            self._clear()

    def _clear(self) -> None:
        self._dirty.clear()
        self._cache.clear()
        self._stored.clear()


class TableView(CoalescingView):
    def __init__(self, table: faust.Table, events_by_key: Mapping[str, Any]) -> None:
        super().__init__()
        self.table = table
        self.events_by_key = events_by_key
        self._writer = table_writer(table)
        self._direct = self._writer.direct()

    def _read(self, key: str) -> bytes | None:
        ev = self.events_by_key.get(key)
        kb = key.encode()
        if ev is not None and self._direct:
            return self._writer.get(kb, ev.message.partition)
        raw: bytes | None
        if ev is not None:
            with event_context(ev):
                raw = self.table.get(kb)
        else:
            raw = self.table.get(kb)
        return raw

    async def flush(self) -> int:
        """Write every changed key once; returns how many keys were written."""
        if self._direct:
            return await self._flush_direct()
        n = 0
        for key, value in self.changes():
            ev = self.events_by_key[key]
            kb = key.encode()
            with event_context(ev):
                if value is _DELETED:
                    del self.table[kb]
                else:
                    self.table[kb] = dumps(value)
            n += 1
        return n

    async def _flush_direct(self) -> int:
        changes: dict[int, list[Change]] = {}
        for key, value in self.changes():
            partition = self.events_by_key[key].message.partition
            items = changes.get(partition)
            if items is None:
                changes[partition] = items = []
            items.append((key.encode(), None if value is _DELETED else dumps(value)))
        return await self._writer.write(changes)
