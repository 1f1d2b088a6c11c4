"""HTTP views on the worker's web port: /metrics, /health, /users/{primary_key}."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from faust.exceptions import SameNode

from app.faust_app import tables_recovered
from tables.codec import loads
from tables.writer import table_writer

if TYPE_CHECKING:
    from app.faust_app import Runtime

__all__ = ["register_views", "update_consumer_lag"]

log = logging.getLogger("emarsys_stream.worker")


def health_state(rt: Runtime) -> dict[str, Any]:
    app = rt.app
    try:
        assigned = len(app.consumer.assignment())
    except Exception:
        assigned = 0
    recovered = tables_recovered(app)
    # The ingest consumer (its own group, agents.ingest) must have joined too.
    ingest = rt.state.get("ingest")
    ingest_joined = ingest is None or bool(getattr(ingest, "joined", False))
    ready = assigned > 0 and recovered and not app.rebalancing and ingest_joined
    return {
        "ready": ready,
        "assigned_partitions": assigned,
        "tables_recovered": recovered,
        "rebalancing": bool(app.rebalancing),
        "ingest_joined": ingest_joined,
    }


def register_views(rt: Runtime) -> None:
    app = rt.app
    register_ready_log(rt)

    @app.page("/metrics")
    async def metrics(web: Any, request: Any) -> Any:
        try:
            rt.metrics.users_table_keys.set(await table_writer(rt.tables.users).count_keys())
        except Exception:  # table not ready during a rebalance
            pass
        await update_consumer_lag(rt)
        return web.bytes(rt.metrics.render(), content_type="text/plain; version=0.0.4")

    @app.page("/health")
    async def health(web: Any, request: Any) -> Any:
        state = health_state(rt)
        return web.json(state, status=200 if state["ready"] else 503)

    @app.page("/users/{primary_key}")
    async def user(web: Any, request: Any, primary_key: str) -> Any:
        """The users-table record, served by whichever worker owns the key."""
        table = rt.tables.users
        key = primary_key.encode()  # table keys are bytes; route on the same bytes
        await _ensure_metadata(rt, table.changelog_topic.get_topic_name())
        try:
            return await app.router.route_req(table.name, key, web, request)
        except SameNode:
            pass
        except Exception as exc:  # no assignment yet (rebalancing)
            return web.json({"error": f"not routable right now: {exc}"}, status=503)
        raw = table.get(key)
        if raw is None:
            return web.json({"error": "unknown primary key"}, status=404)
        return web.json(loads(raw))


async def update_consumer_lag(rt: Runtime) -> None:
    """Set ``emarsys_stream_consumer_lag{topic,partition}`` for this worker's assigned
    partitions: highwater - (last committed offset + 1), else highwater - position."""
    gauge = rt.metrics.consumer_lag
    try:
        consumer = rt.app.consumer
        assigned = consumer.assignment()
    except Exception:  # not started / rebalancing
        return
    gauge.clear()  # partitions revoked since the last scrape disappear
    committed: dict[Any, int | None] = getattr(consumer, "_committed_offset", {})
    for tp in sorted(assigned):
        try:
            high = consumer.highwater(tp)
        except Exception:
            high = None
        if high is None:
            continue
        done = committed.get(tp)
        if done is not None:
            next_offset: int | None = done + 1
        else:
            try:
                next_offset = await asyncio.wait_for(consumer.position(tp), 2.0)
            except Exception:
                next_offset = None
        if next_offset is None:
            continue
        # The embedded broker's end offsets can lag behind what was read: never < 0.
        gauge.labels(tp.topic, str(tp.partition)).set(max(0, int(high) - int(next_offset)))
    await _ingest_lag(rt)


async def _ingest_lag(rt: Runtime) -> None:
    """The ingest consumer's partitions (its own group, see agents.ingest)."""
    ingest = rt.state.get("ingest")
    consumer = getattr(ingest, "consumer", None)
    if consumer is None:
        return
    gauge = rt.metrics.consumer_lag
    try:
        assigned = sorted(consumer.assignment())
    except Exception:  # not subscribed yet
        return
    for tp in assigned:
        try:
            high = consumer.highwater(tp)
            position = await asyncio.wait_for(consumer.position(tp), 2.0)
        except Exception:
            continue
        if high is None or position is None:
            continue
        gauge.labels(tp.topic, str(tp.partition)).set(max(0, int(high) - int(position)))


def register_ready_log(rt: Runtime) -> None:
    """Log one line each time the worker becomes ready (startup, after a rebalance)."""

    @rt.app.task
    async def log_when_ready() -> None:
        was_ready = False
        while True:
            await asyncio.sleep(0.5)
            state = health_state(rt)
            if state["ready"] and not was_ready:
                log.info(
                    "worker ready with %d assigned partitions", state["assigned_partitions"],
                    extra={"assigned_partitions": state["assigned_partitions"],
                           "web_port": rt.settings.web.port},
                )
            was_ready = bool(state["ready"])


async def _ensure_metadata(rt: Runtime, topic: str) -> None:
    # Faust's router hashes the key with the producer's partitioner, which needs the
    # topic's partition count in the producer's metadata.
    try:
        producer = rt.app.producer._ensure_producer()  # type: ignore[attr-defined]
        await producer.client._wait_on_metadata(topic)
    except Exception:  # best effort; routing reports 503 if it still cannot route
        pass
