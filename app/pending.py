"""Operations waiting to be sent to Emarsys, flushed by size or by age (pure).

A contact's operations are merged (later event time wins per field) while they wait.
A flush is due when ``batch_size`` distinct contacts wait (then only whole batches
are taken, the rest keeps waiting) or when the oldest waiting operation is
``flush_interval`` old (then everything goes). This keeps calls close to the minimum
ceil(contacts / batch_size) under load and bounds the wait when traffic is thin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from app.emarsys.batching import ContactChange

__all__ = ["PendingContacts", "Drained"]

T = TypeVar("T")  # the token to release once sent (a Kafka event to ack)


@dataclass
class _Waiting(Generic[T]):
    key_id: str
    first_at: float
    changes: list[ContactChange] = field(default_factory=list)
    tokens: list[T] = field(default_factory=list)


@dataclass
class Drained(Generic[T]):
    changes_by_key_id: dict[str, list[ContactChange]]
    tokens: list[T]
    contacts: int


class PendingContacts(Generic[T]):
    def __init__(
        self, batch_size: int, flush_interval: float, clock: Callable[[], float]
    ) -> None:
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.clock = clock
        self._waiting: dict[tuple[str, str], _Waiting[T]] = {}  # insertion order = age order

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, key_id: str, change: ContactChange, token: T) -> None:
        slot = (key_id, change.primary_key)
        w = self._waiting.get(slot)
        if w is None:
            w = self._waiting[slot] = _Waiting(key_id, self.clock())
        w.changes.append(change)
        w.tokens.append(token)

    def oldest_age(self) -> float:
        if not self._waiting:
            return 0.0
        first = next(iter(self._waiting.values()))
        return self.clock() - first.first_at

    def due(self) -> bool:
        return len(self._waiting) >= self.batch_size or (
            bool(self._waiting) and self.oldest_age() >= self.flush_interval
        )

    def drain(self) -> Drained[T]:
        """Take what is due: everything when the oldest is old enough, else whole batches."""
        if not self._waiting:
            return Drained({}, [], 0)
        if self.oldest_age() >= self.flush_interval:
            n = len(self._waiting)
        else:
            n = (len(self._waiting) // self.batch_size) * self.batch_size
        out: dict[str, list[ContactChange]] = {}
        tokens: list[T] = []
        for slot in list(self._waiting)[:n]:
            w = self._waiting.pop(slot)
            out.setdefault(w.key_id, []).extend(w.changes)
            tokens.extend(w.tokens)
        return Drained(out, tokens, n)
