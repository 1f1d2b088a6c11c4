"""From ``contact-events`` to Emarsys contact operations (pure; the users agent runs it).

Per batch of messages keyed by primary key:
* drop duplicate messageIds seen within the dedupe window (remembered in the contact's
  record: ``UserRecord.seen``, pruned to the window and ``max_seen_ids`` on every write);
* update the contact's :class:`~app.identity.UserRecord` (ids, times, counters);
* apply the data map; keep only fields whose value differs from what was last
  queued for Emarsys (so an unchanged identify costs no API call);
* merge everything one contact needs into one upsert operation per batch
  (later event time wins per field);
* Engage audience signals (:mod:`app.audiences`) change the contact's audience
  membership in the record; only a real change (entry of a non-member, exit of a member)
  becomes a ``list_membership`` operation, and per batch only the net change per
  (contact, audience) is kept. An audience's ``field_id`` goes into the contact's upsert
  like a data-map field (changed-fields logic applies);
* ``send_failed`` feedback from the output agent forgets refused values (and refused list
  memberships) so that the next event carrying them sends them again.

Operations come out upserts first, then list operations, so a new contact's upsert is
ahead of its first list add on the (primary-key keyed) operations topic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.audiences import AudienceMap, AudienceSignal, AudienceTarget, ListOperation
from app.audiences import audience_signals as _audience_signals
from app.data_map import DataMap
from app.identity import (
    UserRecord,
    apply_event,
    changed_fields,
    forget_failed_audience,
    forget_failed_fields,
    mark_fields_queued,
    set_audience_membership,
)

__all__ = ["ContactBatch", "ContactUpdater", "upsert_operation"]


def upsert_operation(
    pk: str, key_id: int, fields: dict[str, Any], event_time_ms: int, message_ids: list[str]
) -> dict[str, Any]:
    """Payload of one ``emarsys-operations`` record (documented in README)."""
    return {
        "op": "contact_upsert",
        "primary_key": pk,
        "key_id": str(key_id),
        "fields": fields,
        "event_time_ms": event_time_ms,
        "message_ids": message_ids,
    }


@dataclass
class ContactBatch:
    """What one batch changed: records to write, operations to send."""

    users: dict[str, UserRecord] = field(default_factory=dict)
    new_users: set[str] = field(default_factory=set)
    #: messageIds forgotten: past the dedupe window / over ``max_seen_ids`` of a contact.
    seen_expired: int = 0
    seen_evicted: int = 0
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    duplicates: int = 0
    unchanged: int = 0
    events: int = 0
    #: Per primary key: field id -> event time of the value that currently wins in this
    #: batch (also for values equal to what was last queued, so an older event processed
    #: after a newer one never overrides it).
    field_ts: dict[str, dict[str, int]] = field(default_factory=dict)
    #: (primary key, audience) -> the ``list_membership`` operation of the net change.
    list_operations: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    #: (primary key, audience) -> membership when this batch first touched it.
    audience_start: dict[tuple[str, str], bool] = field(default_factory=dict)
    #: Audience signals: changes queued, no-ops (repeat / exit of a non-member), stale
    #: (older than the deciding signal), unmapped (no ``audiences`` entry).
    audience_changes: int = 0
    audience_noops: int = 0
    audience_stale: int = 0
    audience_unmapped: int = 0


class ContactUpdater:
    def __init__(
        self,
        data_map: DataMap,
        *,
        key_field_id: int,
        max_ids: int,
        dedupe_window_ms: int,
        max_seen_ids: int = 1000,
        max_message_ids: int = 20,
        audiences: AudienceMap | None = None,
    ) -> None:
        self.data_map = data_map
        self.audiences = audiences if audiences else None
        self.key_field_id = key_field_id
        self.max_ids = max_ids
        self.dedupe_window_ms = dedupe_window_ms
        self.max_seen_ids = max_seen_ids
        self.max_message_ids = max_message_ids

    def process(
        self,
        items: list[tuple[str, dict[str, Any]]],
        load_user: Callable[[str], UserRecord | None],
        now_ms: int,
    ) -> ContactBatch:
        batch = ContactBatch()
        for pk, msg in items:
            kind = msg.get("kind")
            if kind == "send_failed":
                self._forget(batch, pk, msg, load_user)
            elif kind == "event":
                self._event(batch, pk, msg, load_user, now_ms)
        for rec in batch.users.values():
            self._prune_seen(batch, rec, now_ms)
        return batch

    def _prune_seen(self, batch: ContactBatch, rec: UserRecord, now_ms: int) -> None:
        """Forget messageIds past the window, then the oldest beyond ``max_seen_ids``.

        ``seen`` is ordered oldest first (an id is re-inserted when seen again after
        its window), so both cuts take from the front.
        """
        seen = rec.seen
        expired: list[str] = []
        for mid, at in seen.items():
            if now_ms - at < self.dedupe_window_ms:
                break  # the rest is younger: no scan of a long list on every write
            expired.append(mid)
        for mid in expired:
            del seen[mid]
        batch.seen_expired += len(expired)
        over = len(seen) - self.max_seen_ids
        if over > 0:
            for mid in list(seen)[:over]:
                del seen[mid]
            batch.seen_evicted += over

    def _record(
        self, batch: ContactBatch, pk: str, load_user: Callable[[str], UserRecord | None]
    ) -> UserRecord | None:
        rec = batch.users.get(pk)
        if rec is None:
            rec = load_user(pk)
        return rec

    def _event(
        self,
        batch: ContactBatch,
        pk: str,
        msg: dict[str, Any],
        load_user: Callable[[str], UserRecord | None],
        now_ms: int,
    ) -> None:
        event = msg["event"]
        mid = event.get("messageId")
        before = self._record(batch, pk, load_user)
        if isinstance(mid, str) and before is not None:
            seen_at = before.seen.get(mid)
            if seen_at is not None:
                if now_ms - seen_at < self.dedupe_window_ms:
                    batch.duplicates += 1
                    return
                del before.seen[mid]  # past its window: a new event, remembered anew
                batch.seen_expired += 1
        batch.events += 1
        ts = int(msg["ts"])
        ev_type = str(event.get("type"))
        user_id = event.get("userId")
        anon_id = event.get("anonymousId")
        if ev_type == "alias" and isinstance(event.get("previousId"), str):
            # previousId is the identity the user had before (usually an anonymousId).
            rec = apply_event(
                before, pk, ev_type, None, event["previousId"], ts, max_ids=self.max_ids
            )
            rec = apply_event(rec, pk, ev_type, _sid(user_id), None, ts, max_ids=self.max_ids)
            rec.event_count -= 1  # one event, two id updates
            rec.counts_by_type[ev_type] = rec.counts_by_type.get(ev_type, 1) - 1
        else:
            rec = apply_event(
                before, pk, ev_type, _sid(user_id), _sid(anon_id), ts, max_ids=self.max_ids
            )
        if before is None:
            batch.new_users.add(pk)
        if isinstance(mid, str):
            rec.seen[mid] = now_ms
        batch.users[pk] = rec
        # Later event time wins per field within the batch: a value from an event older
        # than one already applied for that field is ignored (neither sent nor remembered
        # as queued, which would make the newer value look unsent / the older one current).
        # Across batches the record's fields_at carries the same rule.
        field_ts = batch.field_ts.setdefault(pk, {})
        winning: dict[str, Any] = {}
        for fid, value in self.data_map.fields_for(event).items():
            prev_ts = field_ts.get(fid, rec.fields_at.get(fid))
            if prev_ts is None or ts >= prev_ts:
                winning[fid] = value
                field_ts[fid] = ts
        lists_changed = False
        if self.audiences is not None:
            for signal in _audience_signals(event):
                lists_changed |= self._audience(batch, pk, rec, signal, ts, winning, field_ts)
        for fid in winning:
            rec.fields_at[fid] = field_ts[fid]
        changed = changed_fields(rec, winning)
        new_contact = not rec.created_in_emarsys
        if not changed and not new_contact:
            if not lists_changed:
                batch.unchanged += 1
            return
        mark_fields_queued(rec, changed)
        rec.created_in_emarsys = True
        op = batch.operations.get(pk)
        if op is None:
            op = upsert_operation(pk, self.key_field_id, {}, ts, [])
            batch.operations[pk] = op
        op["fields"].update(changed)
        op["event_time_ms"] = max(op["event_time_ms"], ts)
        if isinstance(mid, str) and len(op["message_ids"]) < self.max_message_ids:
            op["message_ids"].append(mid)

    def _audience(
        self,
        batch: ContactBatch,
        pk: str,
        rec: UserRecord,
        signal: AudienceSignal,
        ts: int,
        winning: dict[str, Any],
        field_ts: dict[str, int],
    ) -> bool:
        """Apply one audience signal; True if the batch's list operations changed."""
        assert self.audiences is not None
        target = self.audiences.target(signal.audience)
        if target is None:
            batch.audience_unmapped += 1
            return False
        key = target.audience
        field_sent_before = target.field_id is not None and target.field_id in rec.fields_sent
        slot = (pk, key)
        start = batch.audience_start.get(slot)
        outcome = set_audience_membership(rec, key, signal.member, ts)
        if outcome is None:
            batch.audience_stale += 1
            return False
        before, now = outcome
        if start is None:
            start = batch.audience_start[slot] = before is True
        # The field follows membership; an exit writes it only if the contact was a member
        # or the field was written before (an exit of a never-member costs nothing).
        fid = target.field_id
        if fid is not None and (now or before is True or field_sent_before):
            prev_ts = field_ts.get(fid, rec.fields_at.get(fid))
            if prev_ts is None or ts >= prev_ts:
                winning[fid] = target.field_values[now]
                field_ts[fid] = ts
        if not target.has_list:
            return False
        if now == start:
            # Back where this batch started (or never moved): no call at all.
            had = batch.list_operations.pop(slot, None) is not None
            if not had:
                batch.audience_noops += 1
            return had
        batch.list_operations[slot] = self._list_op(pk, target, now, ts)
        batch.audience_changes += 1
        return True

    def _list_op(self, pk: str, target: AudienceTarget, member: bool, ts: int) -> dict[str, Any]:
        return ListOperation(
            primary_key=pk,
            key_id=str(self.key_field_id),
            list_id=target.list_id,
            list_name=target.list_name,
            create_missing=target.create_missing,
            action="add" if member else "delete",
            audience=target.audience,
            event_time_ms=ts,
        ).to_op()

    def _forget(
        self,
        batch: ContactBatch,
        pk: str,
        msg: dict[str, Any],
        load_user: Callable[[str], UserRecord | None],
    ) -> None:
        rec = self._record(batch, pk, load_user)
        if rec is None:
            return
        forget_failed_fields(rec, msg.get("fields") or {})
        audiences = msg.get("audiences")
        if isinstance(audiences, dict):
            for audience, action in audiences.items():
                forget_failed_audience(rec, str(audience), str(action))
        if msg.get("contact_missing"):
            rec.created_in_emarsys = False
        batch.users[pk] = rec

    @staticmethod
    def finish(batch: ContactBatch) -> list[dict[str, Any]]:
        """Upserts first, then list operations (a list add needs the contact to exist)."""
        ops = []
        for op in batch.operations.values():
            op.pop("_field_ts", None)
            ops.append(op)
        ops.extend(batch.list_operations.values())
        return ops


def _sid(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None
