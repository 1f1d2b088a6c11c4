"""The Faust app: settings -> app, topics, tables and agents of one worker.

Agents are registered by the modules in :mod:`agents`; this module only wires them.
Topic payloads are documented in README.md ("Topics") and never change shape
without a version bump.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import faust

from app.metrics import Metrics
from tables.definitions import Tables, define_tables
from tables.store_options import StoreOptions

if TYPE_CHECKING:
    from app.settings import Settings

__all__ = ["Runtime", "Topics", "build_runtime", "faust_settings"]


@dataclass(frozen=True)
class Topics:
    ingest: faust.TopicT
    dead_letters: faust.TopicT
    identity: faust.TopicT
    contact_events: faust.TopicT
    operations: faust.TopicT
    results: faust.TopicT
    emarsys_dead_letters: faust.TopicT
    rule_matches: faust.TopicT
    late_events: faust.TopicT


@dataclass
class Runtime:
    """Everything an agent needs: the app, its settings, topics, tables, metrics."""

    settings: Settings
    app: faust.App
    topics: Topics
    tables: Tables
    metrics: Metrics
    state: dict[str, Any] = field(default_factory=dict)


def _credentials(settings: Settings) -> Any:
    k = settings.kafka
    proto = (k.security_protocol or "PLAINTEXT").upper()
    if proto == "PLAINTEXT":
        return None
    context: ssl.SSLContext | None = None
    if proto in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=k.ssl_cafile or None)
        if k.ssl_certfile:
            context.load_cert_chain(k.ssl_certfile, k.ssl_keyfile or None)
    if proto.startswith("SASL"):
        password = k.sasl_password.get_secret_value() if k.sasl_password else ""
        return faust.SASLCredentials(
            username=k.sasl_username,
            password=password,
            mechanism=k.sasl_mechanism,
            ssl_context=context,
        )
    return faust.SSLCredentials(context)


def faust_settings(settings: Settings) -> dict[str, Any]:
    """Faust/aiokafka settings derived from our config (tuned for batched agents)."""
    k = settings.kafka
    servers = [s.strip() for s in (k.bootstrap_servers or "").split(",") if s.strip()]
    tuning = settings.worker
    return {
        "id": k.app_id,
        "broker": [f"kafka://{s}" for s in servers],
        "broker_credentials": _credentials(settings),
        "store": settings.store,
        "datadir": settings.data_dir,
        "topic_partitions": k.partitions,
        "topic_replication_factor": k.replication_factor,
        "consumer_auto_offset_reset": "earliest",
        "broker_session_timeout": tuning.session_timeout,
        "broker_heartbeat_interval": tuning.heartbeat_interval,
        "broker_commit_interval": tuning.commit_interval,
        "broker_max_poll_records": tuning.max_poll_records,
        "stream_buffer_maxsize": tuning.stream_buffer_maxsize,
        "stream_wait_empty": False,
        "producer_linger_ms": tuning.producer_linger_ms,
        "producer_max_batch_size": tuning.producer_max_batch_size,
        "producer_max_request_size": 16 * 1024 * 1024,
        "table_standby_replicas": tuning.standby_replicas,
        "web_enabled": True,
        "web_host": settings.web.host,
        "web_port": settings.web.port,
        "web_bind": settings.web.host,
        "key_serializer": "raw",
        "value_serializer": "raw",
    }


def _topic(app: faust.App, name: str, partitions: int | None, **kw: Any) -> faust.TopicT:
    return app.topic(
        name,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions,
        internal=True,  # created when missing (Apache Kafka and the embedded broker alike)
        **kw,
    )


def late_topic_name(settings: Settings) -> str:
    name = settings.rule_engine.get("late_topic")
    return str(name) if name else settings.topic("late-events")


#: id(app) -> worker.fetch_max_wait_ms, read by the consumer hook below.
_FETCH_MAX_WAIT_MS: dict[int, int] = {}


def _install_fetch_max_wait_hook() -> None:
    """Let ``worker.fetch_max_wait_ms`` reach the worker's aiokafka consumer.

    Faust passes a fixed ``fetch_max_wait_ms=1500`` when it builds the consumer and has
    no setting for it; the value is only read when the consumer starts, so it is set on
    the new consumer right after Faust built it (before start).
    """
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    if getattr(AIOKafkaConsumerThread, "_emarsys_fetch_wait_hook", False):
        return
    original = AIOKafkaConsumerThread._create_worker_consumer

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        wait_ms = _FETCH_MAX_WAIT_MS.get(id(self.app))
        if wait_ms is not None:
            consumer._fetch_max_wait_ms = wait_ms
        return consumer

    AIOKafkaConsumerThread._create_worker_consumer = create  # type: ignore[method-assign]
    AIOKafkaConsumerThread._emarsys_fetch_wait_hook = True  # type: ignore[attr-defined]


def tables_recovered(app: faust.App) -> bool:
    """Whether Faust has finished restoring this worker's tables from their changelogs."""
    recovery = getattr(app.tables, "recovery", None)
    return bool(recovery is not None and recovery.completed.is_set())


def set_fetch_max_wait(app: faust.App, wait_ms: int) -> None:
    """Make ``app``'s Kafka consumer wait at most ``wait_ms`` for data per fetch."""
    _install_fetch_max_wait_hook()
    _FETCH_MAX_WAIT_MS[id(app)] = wait_ms


def build_runtime(settings: Settings, *, agents: bool = True) -> Runtime:
    app = faust.App(**faust_settings(settings))
    if settings.worker.fetch_max_wait_ms is not None:
        set_fetch_max_wait(app, settings.worker.fetch_max_wait_ms)
    n = settings.kafka.partitions
    envelopes = settings.worker.envelope_buffer_maxsize
    topics = Topics(
        ingest=_topic(app, settings.kafka.ingest_topic, n),
        dead_letters=_topic(app, settings.kafka.dead_letter_topic, n),
        identity=_topic(app, settings.topic("identity"), n, maxsize=envelopes),
        contact_events=_topic(app, settings.topic("contact-events"), n, maxsize=envelopes),
        operations=_topic(app, settings.topic("emarsys-operations"), n),
        results=_topic(app, settings.topic("emarsys-results"), n),
        emarsys_dead_letters=_topic(app, settings.topic("emarsys-dlq"), n),
        rule_matches=_topic(app, settings.topic("rule-matches"), n),
        late_events=_topic(app, late_topic_name(settings), n),
    )
    rt = Runtime(
        settings=settings,
        app=app,
        topics=topics,
        tables=define_tables(app, n, StoreOptions(
            block_cache_mb=settings.worker.rocksdb_block_cache_mb,
            write_buffer_mb=settings.worker.rocksdb_write_buffer_mb,
            write_buffers=settings.worker.rocksdb_write_buffers,
            write_ahead_log=settings.worker.rocksdb_wal,
        )),
        metrics=Metrics(),
    )
    if agents:
        from agents import register_all

        register_all(rt)
    from app.web import register_views

    register_views(rt)
    if agents:
        from app.kafka_watchdog import register_kafka_watchdog

        register_kafka_watchdog(rt)
    return rt
