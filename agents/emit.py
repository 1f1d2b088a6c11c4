"""Sending agent output to topics (one place, so batching/tuning happens here)."""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any

import orjson

from app.resolution import Emit

if TYPE_CHECKING:
    import faust

    from app.faust_app import Runtime

__all__ = ["delivered", "send_emits", "send_json", "source_of"]


def _topic_for(rt: Runtime, target: str) -> faust.TopicT:
    t = rt.topics
    return {
        "identity": t.identity,
        "contact_events": t.contact_events,
        "dead_letters": t.dead_letters,
    }[target]


async def send_json(topic: faust.TopicT, key: str | None, value: object) -> Awaitable[Any]:
    """Hand one message to the producer; the result resolves when the broker has it.

    The consumer flushes the producer before committing offsets, so nothing acknowledged
    upstream can be lost (at-least-once).
    """
    return await topic.send(
        key=None if key is None else key.encode(), value=orjson.dumps(value)
    )


async def send_emits(rt: Runtime, emits: Iterable[Emit]) -> list[Awaitable[Any]]:
    return [await send_json(_topic_for(rt, e.target), e.key, e.value) for e in emits]


async def delivered(sent: Iterable[Awaitable[Any]]) -> None:
    """Wait until the broker acknowledged every message in ``sent``.

    Agents call this before writing table state that records those messages as done
    (a dedupe entry, "field queued", "rule fired", "held event released"). Written the
    other way round, a worker killed between the changelog write and the message left
    state saying "done" for work whose message never reached Kafka: re-reading the
    uncommitted input then skipped it as a duplicate and the update was lost. In this
    order a crash can only repeat a message (at-least-once), never lose one.
    """
    for fut in sent:
        await fut


def source_of(event: faust.EventT) -> dict[str, object]:
    m = event.message
    return {
        "topic": m.topic,
        "partition": m.partition,
        "offset": m.offset,
        "timestamp": int(m.timestamp * 1000) if m.timestamp else None,
    }
