"""Sending agent output to topics (one place, so batching/tuning happens here)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson

from app.dead_letter import dead_letter_envelope
from app.envelope import pack, unpack
from app.metrics import SharedDecodesCollector
from app.record_batches import direct_producer, send_keyed
from app.resolution import Emit
from app.shared_decode import SharedDecodeReader, SharedDecodes

if TYPE_CHECKING:
    import faust

    from app.faust_app import Runtime

#: One record read from an envelope topic: key, value, and the Faust event carrying it.
Record = tuple[str, dict[str, Any], Any]

__all__ = [
    "Record",
    "consume_envelopes",
    "delivered",
    "envelope_records",
    "handled_offsets",
    "send_emits",
    "send_json",
    "send_keyed_json",
    "send_records",
    "shared_decodes",
    "source_of",
]


async def send_json(topic: faust.TopicT, key: str | None, value: object) -> Awaitable[Any]:
    """Hand one message to the producer; the result resolves when the broker has it.

    The consumer flushes the producer before committing offsets, so nothing acknowledged
    upstream can be lost (at-least-once).
    """
    return await topic.send(
        key=None if key is None else key.encode(), value=orjson.dumps(value)
    )


async def send_keyed_json(
    rt: Runtime, topic: faust.TopicT, records: Iterable[tuple[str, object]]
) -> list[Awaitable[Any]]:
    """Many keyed messages, the same as :func:`send_json` each, for a fraction of the
    cost: appended to record batches per partition (:mod:`app.record_batches`).

    One result per record batch (sent whole); where batches cannot be queued directly
    (producer not started, a transaction), one :func:`send_json` per record.
    """
    producer = direct_producer(rt.app)
    if producer is None:
        return [await send_json(topic, key, value) for key, value in records]
    return list(await send_keyed(
        producer,
        topic.get_topic_name(),
        [(key.encode(), orjson.dumps(value)) for key, value in records],
    ))


async def send_records(
    topic: faust.TopicT, records: Iterable[tuple[str, Any]], partitions: int
) -> list[Awaitable[Any]]:
    """Send keyed records to an envelope topic (``identity``, ``contact-events``).

    One message per partition per call (more when large, see :mod:`app.envelope`).
    """
    return [
        await topic.send(key=None, value=env.value, partition=env.partition)
        for env in pack(records, partitions)
    ]


async def send_emits(rt: Runtime, emits: Iterable[Emit]) -> list[Awaitable[Any]]:
    by_target: dict[str, list[tuple[str, Any]]] = {}
    for e in emits:
        by_target.setdefault(e.target, []).append((e.key, e.value))
    n = rt.settings.kafka.partitions
    sent: list[Awaitable[Any]] = []
    for target, records in by_target.items():
        if target == "identity":
            sent.extend(await send_records(rt.topics.identity, records, n))
        elif target == "contact_events":
            sent.extend(await send_records(rt.topics.contact_events, records, n))
        else:
            topic = rt.topics.dead_letters
            sent.extend([await send_json(topic, key, value) for key, value in records])
    return sent


async def envelope_records(
    rt: Runtime, events: Iterable[faust.EventT], decodes: SharedDecodeReader | None = None
) -> list[Record]:
    """Every record in ``events`` with the event that carried it, in order.

    Anything that is not a record goes to the dead-letter topic (reason
    ``malformed_internal_message``) and is counted; it is never silently dropped. With
    ``decodes``, a message another agent already decoded is not decoded again (see
    :mod:`app.shared_decode`).
    """
    out: list[Record] = []
    for ev in events:
        if decodes is None:
            records, bad = unpack(ev.key, ev.value)
        else:
            records, bad = decodes.decode(ev.message)
        out.extend((key, value, ev) for key, value in records)
        for item in bad:
            rt.metrics.events_invalid.labels("malformed_internal_message").inc()
            await send_json(
                rt.topics.dead_letters,
                None,
                dead_letter_envelope(
                    "malformed_internal_message", item.error, item.raw, source_of(ev)
                ),
            )
    return out


def shared_decodes(rt: Runtime, topic: faust.TopicT) -> SharedDecodeReader:
    """Join the agents reading ``topic`` that share one decode per message; call once
    per agent, when registering it."""
    per_topic: dict[str, SharedDecodes] = rt.state.setdefault("shared_decodes", {})
    name = topic.get_topic_name()
    decodes = per_topic.get(name)
    if decodes is None:
        # A reader at most a few batches behind the others still finds its decodes.
        decodes = per_topic[name] = SharedDecodes(4 * rt.settings.worker.batch_max)
        rt.metrics.registry.register(SharedDecodesCollector(name, decodes))
    return decodes.join()


def handled_offsets(rt: Runtime, agent: str) -> dict[tuple[str, int], int]:
    """(topic, partition) -> last offset ``agent`` has handled on this worker.

    Faust's own read offsets count what sits unhandled in a stream buffer too, which
    with envelopes can be a whole backlog; the rules clock's backlog check and the
    ingest stage's pacing need what was actually handled.
    """
    per_agent: dict[str, dict[tuple[str, int], int]] = rt.state.setdefault(
        "handled_offsets", {}
    )
    return per_agent.setdefault(agent, {})


async def consume_envelopes(
    rt: Runtime,
    stream: Any,
    handle: Callable[[list[Record]], Awaitable[None]],
    agent: str,
    decodes: SharedDecodeReader | None = None,
) -> None:
    """The loop of an agent on an envelope topic: batches of messages, their records
    handed to ``handle`` in runs of at most ``worker.batch_max``, inside stream
    iteration: Faust commits a message's offset only after the loop has moved past it,
    by when its table writes are in the producer (see :mod:`tables.writer`). Agents
    reading the same topic pass the same ``decodes`` (:func:`shared_decodes`)."""
    w = rt.settings.worker
    handled = handled_offsets(rt, agent)
    async for events in stream.take_events(w.batch_max, w.batch_within):
        # Decode envelope by envelope and hand over every full run at once: a batch of
        # up to `envelope_buffer_maxsize` envelopes holds up to 1,000 records each, and
        # decoding them all first kept a backlog's worth of events in memory.
        pending: list[Record] = []
        for ev in events:
            pending.extend(await envelope_records(rt, (ev,), decodes))
            while len(pending) >= w.batch_max:
                await handle(pending[: w.batch_max])
                pending = pending[w.batch_max :]
        if pending:
            await handle(pending)
        for ev in events:
            tp = (ev.message.topic, ev.message.partition)
            if ev.message.offset > handled.get(tp, -1):
                handled[tp] = ev.message.offset


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
