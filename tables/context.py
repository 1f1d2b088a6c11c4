"""Writing Faust tables from batched (``take_events``) agents.

Faust routes a table write to the changelog partition (and RocksDB partition store)
of the *current event*, a context variable that per-event iteration sets. With
``stream.take_events()`` the batch is handed to us after the fact, so we set the
context to the event that caused each write. This keeps Faust's own changelog and
store code in charge (no hand-written changelog messages) while letting an agent
coalesce many updates of one key into one write per batch (one changelog message
instead of one per event: the main Faust cost measured in broker-and-baselines.md).
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
