"""Operations waiting to be sent to Emarsys, flushed by size or by age (pure).

Contact upserts are merged per contact while they wait (later event time wins per
field); external-event triggers wait as they are (one per trigger_id); contact-list
membership changes wait as the **final state per (list, contact)** (the later event
time wins; on equal times the one added later). A flush is due when ``batch_size``
upserts or triggers wait, or ``list_batch_size`` list changes wait for one
(list, key field, action) -- then only whole batches are taken and the rest keeps
waiting -- or when the oldest waiting operation is ``flush_interval`` old (then
everything goes). This keeps calls close to the minimum ceil(n / batch size) under
load and bounds the wait when traffic is thin.

A trigger or a list change always leaves together with any upsert still waiting for
its contact, and the caller sends upserts first, then triggers, then list calls, so a
new contact exists in Emarsys before its first trigger or list add.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from app.audiences import ListOperation
from app.emarsys.batching import ContactChange, TriggerRequest

__all__ = ["DEFAULT_LIST_BATCH_SIZE", "PendingOperations", "Drained"]

#: Ids per contact-list call (the API's limit, ``MAX_LIST_IDS_PER_CALL``).
DEFAULT_LIST_BATCH_SIZE = 10_000

T = TypeVar("T")  # the token to release once sent (a Kafka event to ack)

ListRef = tuple[str, int | str]
_ListSlot = tuple[ListRef, str, str]  # (list, key_id, external id)
_ListGroup = tuple[ListRef, str, str]  # (list, key_id, action): one kind of call


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
class _ListChange(Generic[T]):
    first_at: float
    operation: ListOperation
    tokens: list[T] = field(default_factory=list)


@dataclass
class Drained(Generic[T]):
    upserts_by_key_id: dict[str, list[ContactChange]]
    triggers: list[TriggerRequest]
    tokens: list[T]
    #: Final list membership changes, at most one per (list, key field, contact).
    list_changes: list[ListOperation] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.upserts_by_key_id and not self.triggers and not self.list_changes


def _group(op: ListOperation) -> _ListGroup:
    return (op.list_ref, op.key_id, op.action)


class PendingOperations(Generic[T]):
    def __init__(
        self,
        batch_size: int,
        flush_interval: float,
        clock: Callable[[], float],
        list_batch_size: int = DEFAULT_LIST_BATCH_SIZE,
    ) -> None:
        if list_batch_size < 1:
            raise ValueError("list_batch_size must be >= 1")
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.clock = clock
        self.list_batch_size = list_batch_size
        self._upserts: dict[tuple[str, str], _Upsert[T]] = {}  # insertion order = age order
        self._triggers: dict[tuple[int, str], _Trigger[T]] = {}
        self._lists: dict[_ListSlot, _ListChange[T]] = {}
        # Slots per kind of call (insertion order), to take whole batches of one kind.
        self._list_groups: dict[_ListGroup, dict[_ListSlot, None]] = {}

    def __len__(self) -> int:
        return len(self._upserts) + len(self._triggers) + len(self._lists)

    @property
    def list_count(self) -> int:
        return len(self._lists)

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

    def add_list_change(self, operation: ListOperation, token: T) -> None:
        """Wait with the final state per (list, contact): the later event time wins."""
        slot: _ListSlot = (operation.list_ref, operation.key_id, operation.primary_key)
        w = self._lists.get(slot)
        if w is None:
            w = self._lists[slot] = _ListChange(self.clock(), operation)
            self._list_groups.setdefault(_group(operation), {})[slot] = None
        elif operation.event_time_ms >= w.operation.event_time_ms:
            old_group, new_group = _group(w.operation), _group(operation)
            if old_group != new_group:
                self._drop_from_group(old_group, slot)
                self._list_groups.setdefault(new_group, {})[slot] = None
            w.operation = operation
        w.tokens.append(token)

    def _drop_from_group(self, group: _ListGroup, slot: _ListSlot) -> None:
        members = self._list_groups[group]
        del members[slot]
        if not members:
            del self._list_groups[group]

    def oldest_age(self) -> float:
        firsts: list[float] = []
        if self._upserts:
            firsts.append(next(iter(self._upserts.values())).first_at)
        if self._triggers:
            firsts.append(next(iter(self._triggers.values())).first_at)
        if self._lists:
            firsts.append(next(iter(self._lists.values())).first_at)
        return self.clock() - min(firsts) if firsts else 0.0

    def due(self) -> bool:
        if not self:
            return False
        return (
            len(self._upserts) >= self.batch_size
            or len(self._triggers) >= self.batch_size
            or any(len(m) >= self.list_batch_size for m in self._list_groups.values())
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
        list_changes: list[ListOperation] = []
        lbs = self.list_batch_size
        for group, members in list(self._list_groups.items()):
            n = len(members) if everything else (len(members) // lbs) * lbs
            if n == 0:
                continue
            for lslot in list(members)[:n]:
                w = self._lists.pop(lslot)
                self._drop_from_group(group, lslot)
                list_changes.append(w.operation)
                tokens.extend(w.tokens)
                contact_slot = (w.operation.key_id, w.operation.primary_key)
                if contact_slot in self._upserts:
                    take_upsert(contact_slot)
        return Drained(upserts, triggers, tokens, list_changes)
