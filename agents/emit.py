"""Sending agent output to topics (one place, so batching/tuning happens here)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import orjson

from app.resolution import Emit

if TYPE_CHECKING:
    import faust

    from app.faust_app import Runtime

__all__ = ["send_emits", "send_json", "source_of"]


def _topic_for(rt: Runtime, target: str) -> faust.TopicT:
    t = rt.topics
    return {
        "identity": t.identity,
        "contact_events": t.contact_events,
        "dead_letters": t.dead_letters,
    }[target]


async def send_json(topic: faust.TopicT, key: str | None, value: object) -> None:
    # Faust's producer buffers; the consumer flushes it before committing offsets,
    # so nothing acknowledged upstream can be lost (at-least-once).
    await topic.send(key=None if key is None else key.encode(), value=orjson.dumps(value))


async def send_emits(rt: Runtime, emits: Iterable[Emit]) -> None:
    for e in emits:
        await send_json(_topic_for(rt, e.target), e.key, e.value)


def source_of(event: faust.EventT) -> dict[str, object]:
    m = event.message
    return {
        "topic": m.topic,
        "partition": m.partition,
        "offset": m.offset,
        "timestamp": int(m.timestamp * 1000) if m.timestamp else None,
    }
