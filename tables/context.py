"""Writing Faust tables from batched (``take_events``) agents through Faust's own path.

Faust routes a table write to the changelog partition (and RocksDB partition store)
of the *current event*, a context variable that per-event iteration sets. With
``stream.take_events()`` the batch is handed to us after the fact, so we set the
context to the event that caused each write. :class:`tables.view.TableView` uses this
where :mod:`tables.writer` (RocksDB write batches and changelog record batches, the
default) does not apply: the in-memory store, transactions. Either way an agent
coalesces many updates of one key into one write per batch.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

from faust.streams import _current_event
from faust.types import EventT

__all__ = ["event_context", "PartitionEvent"]


@contextlib.contextmanager
def event_context(event: EventT | PartitionEvent) -> Iterator[None]:
    """Make ``event`` Faust's current event for table reads/writes in this block."""
    token = _current_event.set(weakref.ref(event))  # type: ignore[arg-type]
    try:
        yield
    finally:
        _current_event.reset(token)


class _Message:
    __slots__ = ("topic", "partition", "__weakref__")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition


class PartitionEvent:
    """Stand-in event naming only a source topic partition.

    Used by periodic maintenance (expiry sweeps) that writes a table outside stream
    iteration: the write must still go to the changelog partition that owns the key.
    """

    __slots__ = ("message", "__weakref__")

    def __init__(self, topic: str, partition: int) -> None:
        self.message: Any = _Message(topic, partition)
