"""Users agent: the intermediate users table (with dedupe) and data maps -> Emarsys operations."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from agents.emit import Record, consume_envelopes, delivered, send_keyed_json, shared_decodes
from app.audiences import AudienceMap
from app.contacts import ContactUpdater
from app.data_map import DataMap, FieldMapping
from app.identity import UserRecord
from tables.view import TableView

if TYPE_CHECKING:
    from app.faust_app import Runtime
    from app.settings import Settings

__all__ = ["contact_updater", "data_map_from_settings", "register"]


def data_map_from_settings(settings: Settings) -> DataMap:
    return DataMap(
        [
            FieldMapping(
                paths=tuple(m.from_),
                field_id=m.field_id,
                transform=m.transform,
                allow_empty=m.allow_empty,
            )
            for m in settings.data_map
        ]
    )


def contact_updater(settings: Settings) -> ContactUpdater:
    """The users stage's pure part as configured (shared with ``bench.stages``)."""
    s = settings
    return ContactUpdater(
        data_map_from_settings(s),
        key_field_id=s.identity.primary_key.field_id,
        max_ids=s.identity.max_ids_per_user,
        dedupe_window_ms=int(s.dedupe.window * 1000),
        max_seen_ids=s.dedupe.max_ids_per_contact,
        audiences=AudienceMap.from_config(s.audiences),
    )


def register(rt: Runtime) -> None:
    t = rt.tables
    m = rt.metrics
    updater = contact_updater(rt.settings)
    # Engage audience signals by outcome (registered here, next to its only user).
    audience_signals = Counter(
        "emarsys_stream_audience_signals",
        "Engage audience entries/exits: list_change (queued), no_change (repeat or exit of "
        "a non-member), stale (older than the deciding signal), unmapped (no audiences entry)",
        ["outcome"],
        registry=m.registry,
    )

    decodes = shared_decodes(rt, rt.topics.contact_events)  # with the rules agent

    @rt.app.agent(rt.topics.contact_events, name="users")
    async def users(stream):  # type: ignore[no-untyped-def]
        await consume_envelopes(rt, stream, handle, "users", decodes)

    async def handle(records: list[Record]) -> None:
        by_pk: dict[str, Any] = {}
        items: list[tuple[str, dict[str, Any]]] = []
        for pk, msg, ev in records:
            by_pk[pk] = ev
            items.append((pk, msg))
        users_view = TableView(t.users, by_pk)

        def load_user(pk: str) -> UserRecord | None:
            raw = users_view.get(pk)
            return None if raw is None else UserRecord.from_dict(raw)

        batch = updater.process(items, load_user, int(time.time() * 1000))
        for pk, rec in batch.users.items():
            users_view[pk] = rec.to_dict()
        if batch.seen_expired:
            m.dedupe_expired.inc(batch.seen_expired)
        if batch.seen_evicted:
            m.dedupe_evicted.inc(batch.seen_evicted)
        if batch.new_users:
            m.users_created.inc(len(batch.new_users))
        if batch.duplicates:
            m.duplicates.inc(batch.duplicates)
        if batch.unchanged:
            m.unchanged.inc(batch.unchanged)
        ops = updater.finish(batch)
        lists = len(batch.list_operations)
        m.contact_changes.inc(len(ops) - lists)
        for outcome, n in (
            ("list_change", batch.audience_changes),
            ("no_change", batch.audience_noops),
            ("stale", batch.audience_stale),
            ("unmapped", batch.audience_unmapped),
        ):
            if n:
                audience_signals.labels(outcome).inc(n)
        # Operations first; the records saying "queued" and "seen" only once the broker
        # has them (see agents.emit.delivered).
        await delivered(await send_keyed_json(
            rt, rt.topics.operations, [(op["primary_key"], op) for op in ops]
        ))
        await users_view.flush()
