"""Pure batching for Emarsys calls (no I/O): merge contact changes, split into calls.

Limits (API sheet): contact upsert at most 1000 contacts and 8 MB a call; batch event trigger at
most 1000 contacts and 1 MB; list add/delete at most 10,000 ids.

Sizes are measured exactly: a batch is accepted only if ``orjson.dumps`` of the whole request
body -- the envelope included, the same bytes :class:`app.emarsys.client.EmarsysClient` sends
-- is **strictly smaller** than ``max_bytes``. Packing is greedy in input order, so ``n``
contacts take ``ceil(n / max_contacts)`` calls whenever the byte limit permits.

Oversize items (one contact / trigger whose request alone would reach ``max_bytes``) can never
be sent. ``plan()`` returns them separately in ``.oversize`` (so the caller can dead-letter them
and still send everything else); ``batches()`` is the strict form: it raises
:class:`OversizeError` (which carries the full plan) if there is any, so nothing is dropped
silently.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import orjson

__all__ = [
    "ContactChange",
    "ContactUpsertBatcher",
    "ListAction",
    "ListBatch",
    "ListMembershipBatcher",
    "ListMembershipChange",
    "OversizeError",
    "Plan",
    "TriggerBatch",
    "TriggerBatcher",
    "TriggerRequest",
    "merge_contact_changes",
    "request_size",
]

T = TypeVar("T")
B = TypeVar("B")

ListAction = Literal["add", "delete"]


def request_size(body: Any) -> int:
    """Bytes of ``body`` as the client sends it (``orjson.dumps``)."""
    return len(orjson.dumps(body))


@dataclass
class Plan(Generic[B, T]):
    """``batches`` to send, and ``oversize`` items that fit in no call on their own."""

    batches: list[B] = field(default_factory=list)
    oversize: list[T] = field(default_factory=list)


class OversizeError(ValueError):
    """Raised by ``batches()`` when some items fit in no call; ``plan`` has everything."""

    def __init__(self, plan: Plan[Any, Any], max_bytes: int) -> None:
        super().__init__(
            f"{len(plan.oversize)} item(s) too large for one request (limit {max_bytes} bytes)"
        )
        self.plan = plan
        self.oversize = plan.oversize


def _check_limits(max_items: int, max_bytes: int) -> None:
    if max_items < 1:
        raise ValueError("max item count must be >= 1")
    if max_bytes < 1:
        raise ValueError("max_bytes must be >= 1")


def _pack(
    items: list[T],
    sizes: list[int],
    envelope_size: int,
    max_items: int,
    max_bytes: int,
) -> tuple[list[list[T]], list[T]]:
    """Greedy, order-preserving packing: a batch of k items costs
    ``envelope_size + sum(sizes) + (k - 1)`` bytes (the commas of a compact JSON array)."""
    batches: list[list[T]] = []
    oversize: list[T] = []
    current: list[T] = []
    current_size = envelope_size
    for item, size in zip(items, sizes, strict=True):
        if envelope_size + size >= max_bytes:
            oversize.append(item)
            continue
        added = size + (1 if current else 0)
        if current and (len(current) >= max_items or current_size + added >= max_bytes):
            batches.append(current)
            current, current_size = [], envelope_size
            added = size
        current.append(item)
        current_size += added
    if current:
        batches.append(current)
    return batches, oversize


# -------------------------------------------------------------------------------- contacts


@dataclass(frozen=True)
class ContactChange:
    """New values of some fields of one contact, as of ``event_time_ms``.

    ``fields`` maps Emarsys field ids (as strings, e.g. ``"1"``) to values.
    """

    primary_key: str
    fields: dict[str, Any]
    event_time_ms: int


def merge_contact_changes(changes: Iterable[ContactChange]) -> dict[str, dict[str, Any]]:
    """Per contact, the newest value of each field: the later ``event_time_ms`` wins; on equal
    times the change later in the input wins. Contacts (and fields) keep first-seen order.
    Field ids are normalised to ``str``."""
    merged: dict[str, dict[str, Any]] = {}
    times: dict[str, dict[str, int]] = {}
    for change in changes:
        values = merged.setdefault(change.primary_key, {})
        seen = times.setdefault(change.primary_key, {})
        for field_id, value in change.fields.items():
            key = str(field_id)
            previous = seen.get(key)
            if previous is None or change.event_time_ms >= previous:
                values[key] = value
                seen[key] = change.event_time_ms
    return merged


class ContactUpsertBatcher:
    """Contact changes -> bodies' ``contacts`` lists for ``PUT contact/?create_if_not_exists=1``.

    Each contact is ``{key_id: primary_key, field_id: value, ...}``; the primary key always wins
    over a value for ``key_id`` inside ``fields``.
    """

    def __init__(self, key_id: str | int, max_contacts: int = 1000, max_bytes: int = 8_000_000):
        _check_limits(max_contacts, max_bytes)
        self.key_id = str(key_id)
        self.max_contacts = max_contacts
        self.max_bytes = max_bytes
        self._envelope = request_size({"key_id": self.key_id, "contacts": []})

    def body(self, contacts: list[dict[str, Any]]) -> dict[str, Any]:
        return {"key_id": self.key_id, "contacts": contacts}

    def contacts(self, changes: Iterable[ContactChange]) -> list[dict[str, Any]]:
        """Merged contacts, one per primary key, in first-seen order."""
        out: list[dict[str, Any]] = []
        for pk, fields in merge_contact_changes(changes).items():
            contact: dict[str, Any] = {self.key_id: pk}
            for field_id, value in fields.items():
                if field_id != self.key_id:
                    contact[field_id] = value
            out.append(contact)
        return out

    def plan(self, changes: Iterable[ContactChange]) -> Plan[list[dict[str, Any]], dict[str, Any]]:
        contacts = self.contacts(changes)
        sizes = [request_size(c) for c in contacts]
        batches, oversize = _pack(
            contacts, sizes, self._envelope, self.max_contacts, self.max_bytes
        )
        return Plan(batches=batches, oversize=oversize)

    def batches(self, changes: Iterable[ContactChange]) -> list[list[dict[str, Any]]]:
        """Like :meth:`plan` but raises :class:`OversizeError` if any contact is oversize."""
        plan = self.plan(changes)
        if plan.oversize:
            raise OversizeError(plan, self.max_bytes)
        return plan.batches


# -------------------------------------------------------------------------------- triggers


@dataclass(frozen=True)
class TriggerRequest:
    """One external-event trigger for one contact."""

    event_id: int
    key_id: str
    external_id: str
    data: dict[str, Any] | None = None
    trigger_id: str | None = None
    event_time: str | None = None  # ISO-8601, e.g. "2026-11-28T09:00:00Z"

    def contact(self) -> dict[str, Any]:
        """The entry of the batch body's ``contacts`` list (absent keys left out)."""
        out: dict[str, Any] = {"external_id": self.external_id}
        if self.data is not None:
            out["data"] = self.data
        if self.trigger_id is not None:
            out["trigger_id"] = self.trigger_id
        if self.event_time is not None:
            out["event_time"] = self.event_time
        return out


@dataclass
class TriggerBatch:
    """One ``POST event/{event_id}/trigger`` call: body ``{"key_id", "contacts"}``."""

    event_id: int
    key_id: str
    contacts: list[dict[str, Any]]
    requests: list[TriggerRequest] = field(default_factory=list, repr=False)

    def body(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "contacts": self.contacts}


class TriggerBatcher:
    """Groups triggers by ``(event_id, key_id)`` (groups in first-seen order, requests in input
    order) and splits each group at ``max_contacts`` / ``max_bytes``. Nothing is deduplicated
    (``trigger_id`` makes a repeated trigger idempotent on the Emarsys side)."""

    def __init__(self, max_contacts: int = 1000, max_bytes: int = 1_000_000):
        _check_limits(max_contacts, max_bytes)
        self.max_contacts = max_contacts
        self.max_bytes = max_bytes

    def plan(self, requests: Iterable[TriggerRequest]) -> Plan[TriggerBatch, TriggerRequest]:
        groups: dict[tuple[int, str], list[TriggerRequest]] = {}
        for req in requests:
            groups.setdefault((int(req.event_id), str(req.key_id)), []).append(req)
        plan: Plan[TriggerBatch, TriggerRequest] = Plan()
        for (event_id, key_id), reqs in groups.items():
            envelope = request_size({"key_id": key_id, "contacts": []})
            sizes = [request_size(r.contact()) for r in reqs]
            batches, oversize = _pack(reqs, sizes, envelope, self.max_contacts, self.max_bytes)
            plan.oversize.extend(oversize)
            for batch in batches:
                plan.batches.append(
                    TriggerBatch(
                        event_id=event_id,
                        key_id=key_id,
                        contacts=[r.contact() for r in batch],
                        requests=batch,
                    )
                )
        return plan

    def batches(self, requests: Iterable[TriggerRequest]) -> list[TriggerBatch]:
        """Like :meth:`plan` but raises :class:`OversizeError` if any trigger is oversize."""
        plan = self.plan(requests)
        if plan.oversize:
            raise OversizeError(plan, self.max_bytes)
        return plan.batches


# -------------------------------------------------------------------------------- lists


@dataclass(frozen=True)
class ListMembershipChange:
    """Add the contact ``external_id`` (under ``key_id``) to list ``list_id``, or delete it."""

    list_id: int
    key_id: str
    external_id: str
    action: ListAction


@dataclass
class ListBatch:
    """One ``POST contactlist/{list_id}/{action}`` call."""

    list_id: int
    key_id: str
    action: ListAction
    external_ids: list[str]

    def body(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "external_ids": self.external_ids}


class ListMembershipBatcher:
    """Final membership per (list, key, contact) -> add/delete calls of at most ``max_ids``.

    Only the **last** change per ``(list_id, key_id, external_id)`` in the input counts (an add
    followed by a delete is a delete; repeats collapse to one id), so each id is in at most one
    call per list and the calls can run in any order. Batches are grouped by
    ``(list_id, key_id, action)`` in first-seen order; ids are ordered by their deciding change.
    """

    def __init__(self, max_ids: int = 10_000):
        _check_limits(max_ids, 1)
        self.max_ids = max_ids

    @staticmethod
    def final_state(
        changes: Iterable[ListMembershipChange],
    ) -> dict[tuple[int, str], dict[str, ListAction]]:
        """``{(list_id, key_id): {external_id: final action}}``."""
        state: dict[tuple[int, str], dict[str, ListAction]] = {}
        for change in changes:
            if change.action not in ("add", "delete"):
                raise ValueError(f"unknown list action {change.action!r} (expected add|delete)")
            members = state.setdefault((int(change.list_id), str(change.key_id)), {})
            members.pop(change.external_id, None)  # re-insert: order by the deciding change
            members[change.external_id] = change.action
        return state

    def batches(self, changes: Iterable[ListMembershipChange]) -> list[ListBatch]:
        groups: dict[tuple[int, str, ListAction], list[str]] = {}
        for (list_id, key_id), members in self.final_state(changes).items():
            for external_id, action in members.items():
                groups.setdefault((list_id, key_id, action), []).append(external_id)
        out: list[ListBatch] = []
        for (list_id, key_id, action), ids in groups.items():
            for start in range(0, len(ids), self.max_ids):
                out.append(ListBatch(list_id, key_id, action, ids[start : start + self.max_ids]))
        return out
