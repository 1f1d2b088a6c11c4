"""Identity agent: anonymousId/userId -> primary key lookups, holding and releasing events."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from agents.emit import Record, consume_envelopes, delivered, send_emits
from app.envelope import partition_for_key
from app.held import id_of_item_key
from app.resolution import Emit, IdentityResolver, IdentityState
from tables.context import PartitionEvent
from tables.view import TableView

if TYPE_CHECKING:
    from app.faust_app import Runtime

__all__ = ["register"]

log = logging.getLogger("emarsys_stream.identity")


def _now_ms() -> int:
    return int(time.time() * 1000)


class ByHeldItemId(Mapping[str, Any]):
    """Held-event item keys -> the event carrying their id: an id's held events are
    stored in the partition of the id (where its index is), not of the item key."""

    def __init__(self, by_id: Mapping[str, Any]) -> None:
        self.by_id = by_id

    def __getitem__(self, key: str) -> Any:
        return self.by_id[id_of_item_key(key)]

    def __iter__(self) -> Iterator[str]:  # pragma: no cover - TableView does not iterate
        raise TypeError("ByHeldItemId does not iterate")

    def __len__(self) -> int:  # pragma: no cover
        raise TypeError("ByHeldItemId has no length")


def batch_resolver(
    rt: Runtime, events_by_key: dict[str, Any]
) -> tuple[IdentityState, IdentityResolver]:
    """Identity state as views over the tables for one batch, and its resolver."""
    t = rt.tables
    s = rt.settings
    state = IdentityState(
        anonymous_ids=TableView(t.anonymous_ids, events_by_key),
        user_ids=TableView(t.user_ids, events_by_key),
        held=TableView(t.held_events, events_by_key),
        held_items=TableView(t.held_event_items, ByHeldItemId(events_by_key)),
    )
    resolver = IdentityResolver(
        state,
        hold_max_per_id=s.identity.hold_max_per_id,
        hold_expiry_ms=int(s.identity.hold_expiry * 1000),
        now_ms=_now_ms,
    )
    return state, resolver


async def flush_views(state: IdentityState) -> None:
    """Write the batch's table changes; held events before their index (see app.held)."""
    held = state.held
    for view in (state.anonymous_ids, state.user_ids, held.items_by_key, held.index):
        assert isinstance(view, TableView)
        await view.flush()


def register(rt: Runtime) -> None:
    m = rt.metrics

    register_held_sweep(rt)

    @rt.app.agent(rt.topics.identity, name="identity")
    async def identity(stream):  # type: ignore[no-untyped-def]
        await consume_envelopes(rt, stream, handle, "identity")

    async def handle(records: list[Record]) -> None:
        by_key: dict[str, Any] = {key: ev for key, _value, ev in records}
        state, resolver = batch_resolver(rt, by_key)
        emits: list[Emit] = []
        for key, value, _ev in records:
            emits.extend(resolver.handle(key, value))
        # Messages first, state after the broker has them (see agents.emit.delivered).
        await delivered(await send_emits(rt, emits))
        await flush_views(state)
        st = resolver.stats
        if st.held:
            m.held.inc(st.held)
        if st.released:
            m.released.inc(st.released)
        if st.expired:
            m.expired.labels("expired").inc(st.expired)
        if st.overflow:
            m.expired.labels("overflow").inc(st.overflow)
        if st.expired or st.overflow:
            log.warning("dead letters written: %d held event(s) expired or over the bound",
                        st.expired + st.overflow,
                        extra={"expired": st.expired, "overflow": st.overflow})


def register_held_sweep(rt: Runtime) -> None:
    """Expire held events of ids that are never seen again (dead-lettered, counted)."""
    s = rt.settings
    expiry = s.identity.hold_expiry
    interval = max(1.0, min(expiry / 10, 3600.0))
    topic_name = rt.topics.identity.get_topic_name()
    n = s.kafka.partitions
    t = rt.tables
    m = rt.metrics

    @rt.app.timer(interval=interval)
    async def sweep_held_events() -> None:
        events: dict[str, Any] = {}
        expired_ids: list[str] = []
        for key in list(t.held_events.keys()):
            kb = key if isinstance(key, bytes) else str(key).encode()
            ident = kb.decode()
            events[ident] = PartitionEvent(topic_name, partition_for_key(kb, n))
            expired_ids.append(ident)
        if not expired_ids:
            return
        state, resolver = batch_resolver(rt, events)
        emits: list[Emit] = []
        for ident in expired_ids:
            emits.extend(resolver.expire(ident))
        await delivered(await send_emits(rt, emits))  # dead letters before the deletions
        await flush_views(state)
        if resolver.stats.expired:
            m.expired.labels("expired").inc(resolver.stats.expired)
            log.warning("dead letters written: %d held event(s) expired",
                        resolver.stats.expired, extra={"expired": resolver.stats.expired})
