"""Ingest agent: raw Segment bytes -> validated, normalised events routed by identity."""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

from agents.emit import send_emits, send_json, source_of
from app.data_map import resolve_primary_key
from app.dead_letter import dead_letter_envelope
from app.events import InvalidEvent, validate_event
from app.resolution import Emit, route_ingested

if TYPE_CHECKING:
    from app.faust_app import Runtime

__all__ = ["register"]

log = logging.getLogger("emarsys_stream.ingest")


class _LinkCache(OrderedDict[tuple[str, str], str]):
    """Bounded LRU of links already emitted by this worker (saves duplicate messages)."""

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize

    def __setitem__(self, key: tuple[str, str], value: str) -> None:
        super().__setitem__(key, value)
        if len(self) > self.maxsize:
            self.popitem(last=False)


def register(rt: Runtime) -> None:
    s = rt.settings
    pk_paths = s.identity.primary_key.paths
    pk_steps = s.identity.primary_key.normalize
    links = _LinkCache(100_000)
    m = rt.metrics

    @rt.app.agent(rt.topics.ingest, name="ingest")
    async def ingest(stream):  # type: ignore[no-untyped-def]
        async for events in stream.take_events(s.worker.batch_max, s.worker.batch_within):
            emits: list[Emit] = []
            invalid: dict[str, int] = {}
            for event in events:
                raw = event.value
                src = source_of(event)
                if not isinstance(raw, bytes | bytearray):
                    raw = b"" if raw is None else bytes(raw)
                fallback = src["timestamp"] if isinstance(src["timestamp"], int) else None
                result = validate_event(bytes(raw), fallback_ts_ms=fallback)
                if isinstance(result, InvalidEvent):
                    m.events_invalid.labels(result.reason).inc()
                    invalid[result.reason] = invalid.get(result.reason, 0) + 1
                    await send_json(
                        rt.topics.dead_letters,
                        None,
                        dead_letter_envelope(result.reason, result.error, bytes(raw), src),
                    )
                    continue
                m.events_in.labels(result.type).inc()
                pk = resolve_primary_key(result.event, pk_paths, pk_steps)
                emits.extend(
                    route_ingested(
                        result.event,
                        result.type,
                        result.ts_ms,
                        result.user_id,
                        result.anonymous_id,
                        pk,
                        src,
                        known_links=links,
                    )
                )
            await send_emits(rt, emits)
            if invalid:
                log.warning(
                    "dead letters written: %d invalid event(s)",
                    sum(invalid.values()),
                    extra={"dead_letters": sum(invalid.values()), "by_reason": invalid,
                           "topic": rt.topics.dead_letters.get_topic_name()},
                )
