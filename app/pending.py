"""Operations waiting to be sent to Emarsys, flushed by size or by age (pure).

Contact upserts are merged per contact while they wait (later event time wins per
field); external-event triggers wait as they are (one per trigger_id). A flush is due
when ``batch_size`` operations wait of one kind (then only whole batches are taken and
the rest keeps waiting) or when the oldest waiting operation is ``flush_interval`` old
(then everything goes). This keeps calls close to the minimum ceil(n / batch_size)
under load and bounds the wait when traffic is thin. A trigger always leaves together
with any upsert still waiting for its contact, and the caller sends upserts first, so
a new contact exists in Emarsys before its first trigger.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from app.emarsys.batching import ContactChange, TriggerRequest

__all__ = ["PendingOperations", "Drained"]

T = TypeVar("T")  # the token to release once sent (a Kafka event to ack)


@dataclass
class _Upsert(Generic[T]):
    key_id: str
    first_at: float
    changes: list[ContactChange] = field(default_factory=list)
    tokens: list[T] = field(default_factory=list)


@dataclass
class _Trigger(Generic[T]):
    first_at: float
    request: TriggerRequest
    tokens: list[T] = field(default_factory=list)


@dataclass
class Drained(Generic[T]):
    upserts_by_key_id: dict[str, list[ContactChange]]
    triggers: list[TriggerRequest]
    tokens: list[T]

    @property
    def empty(self) -> bool:
        return not self.upserts_by_key_id and not self.triggers


class PendingOperations(Generic[T]):
    def __init__(self, batch_size: int, flush_interval: float, clock: Callable[[], float]) -> None:
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.clock = clock
        self._upserts: dict[tuple[str, str], _Upsert[T]] = {}  # insertion order = age order
        self._triggers: dict[tuple[int, str], _Trigger[T]] = {}

    def __len__(self) -> int:
        return len(self._upserts) + len(self._triggers)

    def add_upsert(self, key_id: str, change: ContactChange, token: T) -> None:
        slot = (key_id, change.primary_key)
        w = self._upserts.get(slot)
        if w is None:
            w = self._upserts[slot] = _Upsert(key_id, self.clock())
        w.changes.append(change)
        w.tokens.append(token)

    def add_trigger(self, request: TriggerRequest, token: T) -> None:
        slot = (request.event_id, request.trigger_id or f"{id(request)}")
        w = self._triggers.get(slot)
        if w is None:  # the same trigger_id twice waits once (Emarsys dedupes it anyway)
            w = self._triggers[slot] = _Trigger(self.clock(), request)
        w.tokens.append(token)

    def oldest_age(self) -> float:
        firsts: list[float] = []
        if self._upserts:
            firsts.append(next(iter(self._upserts.values())).first_at)
        if self._triggers:
            firsts.append(next(iter(self._triggers.values())).first_at)
        return self.clock() - min(firsts) if firsts else 0.0

    def due(self) -> bool:
        if not self:
            return False
        return (
            len(self._upserts) >= self.batch_size
            or len(self._triggers) >= self.batch_size
            or self.oldest_age() >= self.flush_interval
        )

    def drain(self) -> Drained[T]:
        """Take what is due: everything when the oldest is old enough, else whole batches."""
        everything = self.oldest_age() >= self.flush_interval
        bs = self.batch_size
        n_up = len(self._upserts) if everything else (len(self._upserts) // bs) * bs
        n_tr = len(self._triggers) if everything else (len(self._triggers) // bs) * bs
        upserts: dict[str, list[ContactChange]] = {}
        tokens: list[T] = []

        def take_upsert(slot: tuple[str, str]) -> None:
            w = self._upserts.pop(slot)
            upserts.setdefault(w.key_id, []).extend(w.changes)
            tokens.extend(w.tokens)

        for slot in list(self._upserts)[:n_up]:
            take_upsert(slot)
        triggers: list[TriggerRequest] = []
        for tslot in list(self._triggers)[:n_tr]:
            t = self._triggers.pop(tslot)
            triggers.append(t.request)
            tokens.extend(t.tokens)
            contact_slot = (t.request.key_id, t.request.external_id)
            if contact_slot in self._upserts:
                take_upsert(contact_slot)
        return Drained(upserts, triggers, tokens)
