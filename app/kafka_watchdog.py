"""Notice a Kafka request the broker never answers, and say where it is stuck.

aiokafka keeps one queue of outstanding requests per broker connection and matches
responses in order. If the broker never answers the request at the head of a queue,
everything behind it waits too: for the producer that means Faust's producer buffer
stops draining and every agent that writes a table or sends to a topic stalls, with
nothing in the log. The watchdog samples the head of every queue on a timer; a head
that has not moved for ``stall_after`` seconds is logged once (with its API, broker
and queue depth) and counted in ``emarsys_stream_kafka_stalled_requests``.

The sampling is pure (:class:`RequestQueueWatch`); reading aiokafka's connections
(private attributes) is isolated in :func:`request_queue_heads` and never raises.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "QueueHead",
    "RequestQueueWatch",
    "Stall",
    "producer_buffer_head",
    "request_queue_heads",
]

log = logging.getLogger("emarsys_stream.kafka")


@dataclass(frozen=True)
class QueueHead:
    """The oldest unanswered request on one broker connection."""

    connection: str  # e.g. "producer node 0"
    correlation_id: int
    api: str  # request class name, e.g. "ProduceRequest_v7"
    depth: int  # requests queued on the connection, head included


@dataclass(frozen=True)
class Stall:
    head: QueueHead
    waited: float  # seconds since the head was first seen


class RequestQueueWatch:
    """Tracks queue heads between samples; reports each stuck head once."""

    def __init__(self, stall_after: float) -> None:
        self.stall_after = stall_after
        self._first_seen: dict[tuple[str, int], float] = {}
        self._reported: set[tuple[str, int]] = set()

    def observe(self, heads: Iterable[QueueHead], now: float) -> list[Stall]:
        current = {(h.connection, h.correlation_id): h for h in heads}
        # A head that moved (answered) or whose connection went away is forgotten.
        self._first_seen = {k: t for k, t in self._first_seen.items() if k in current}
        self._reported &= current.keys()
        stalls = []
        for key, head in current.items():
            first = self._first_seen.setdefault(key, now)
            if now - first >= self.stall_after and key not in self._reported:
                self._reported.add(key)
                stalls.append(Stall(head, now - first))
        return stalls


def request_queue_heads(clients: Mapping[str, Any]) -> list[QueueHead]:
    """Heads of every connection of the given aiokafka clients (by role name)."""
    heads: list[QueueHead] = []
    for role, client in clients.items():
        try:
            conns = dict(getattr(client, "_conns", {}) or {})
        except Exception:  # noqa: BLE001 - diagnostics must never break the worker
            continue
        for key, conn in conns.items():
            try:
                requests = conn._requests
                if not requests:
                    continue
                correlation_id, request, _fut = requests[0]
            except Exception:  # noqa: BLE001
                continue
            if correlation_id is None:  # SASL handshake frame
                continue
            node = key[0] if isinstance(key, tuple) else key
            heads.append(
                QueueHead(
                    connection=f"{role} node {node}",
                    correlation_id=int(correlation_id),
                    api=type(request).__name__,
                    depth=len(requests),
                )
            )
    return heads


def producer_buffer_head(buffer: Any) -> QueueHead | None:
    """The oldest message in Faust's producer buffer (not yet handed to aiokafka).

    A head that stays put while requests are answered means the producer is waiting
    on something else (metadata for a topic, a full accumulator), not on the broker.
    """
    try:
        queue = buffer.pending._queue  # asyncio.Queue's deque
        if not queue:
            return None
        fut = queue[0]
        topic = fut.message.channel.get_topic_name()
    except Exception:  # noqa: BLE001
        return None
    return QueueHead(connection="producer buffer", correlation_id=id(fut),
                     api=f"send to {topic}", depth=len(queue))


def accumulator_summary(producer: Any) -> str:
    """aiokafka's view: nodes with a request in flight and partitions with batches waiting."""
    try:
        in_flight = sorted(producer._sender._in_flight)
        waiting = {f"{tp.topic}[{tp.partition}]": len(b)
                   for tp, b in producer._message_accumulator._batches.items() if b}
    except Exception:  # noqa: BLE001
        return "unavailable"
    top = sorted(waiting.items(), key=lambda kv: -kv[1])[:5]
    return (f"in flight to nodes {in_flight}; batches waiting {dict(top)} "
            f"({len(waiting)} partitions)")


def register_kafka_watchdog(rt: Any) -> None:
    """Sample the worker's producer and consumer connections every few seconds."""
    stall_after = float(rt.settings.worker.kafka_stall_warning)
    watch = RequestQueueWatch(stall_after)
    interval = max(1.0, min(5.0, stall_after / 4))

    def clients() -> dict[str, Any]:
        found: dict[str, Any] = {}
        try:
            found["producer"] = rt.app.producer._ensure_producer().client
        except Exception:  # noqa: BLE001 - not started yet
            pass
        try:
            thread = rt.app.consumer._thread
            found["consumer"] = thread._ensure_consumer()._client
        except Exception:  # noqa: BLE001
            pass
        return found

    announced: set[str] = set()

    @rt.app.timer(interval=interval)
    async def watch_kafka_requests() -> None:
        import time

        found = clients()
        for role in found.keys() - announced:
            announced.add(role)
            conns = len(getattr(found[role], "_conns", {}) or {})
            log.info("kafka watchdog watching the %s's connections (%d now)", role, conns)
        heads = request_queue_heads(found)
        buffered = producer_buffer_head(getattr(rt.app.producer, "buffer", None))
        if buffered is not None:
            heads.append(buffered)
        for stall in watch.observe(heads, time.monotonic()):
            role = stall.head.connection.split(" ", 1)[0]
            rt.metrics.kafka_stalled_requests.labels(client=role).inc()
            log.warning(
                "kafka stalled for %.0f s: %s on %s has not moved, %d queued behind it; "
                "producer buffer %d message(s); aiokafka: %s",
                stall.waited, stall.head.api, stall.head.connection, stall.head.depth - 1,
                _producer_buffer_size(rt), _aiokafka_state(rt),
                extra={"event": "kafka_request_stalled", "api": stall.head.api,
                       "connection": stall.head.connection, "waited_s": round(stall.waited, 1)},
            )


def _aiokafka_state(rt: Any) -> str:
    try:
        return accumulator_summary(rt.app.producer._ensure_producer())
    except Exception:  # noqa: BLE001
        return "producer not started"


def _producer_buffer_size(rt: Any) -> int:
    try:
        return int(rt.app.producer.buffer.size)
    except Exception:  # noqa: BLE001
        return -1
