"""Prometheus metrics of one worker (own registry, served at ``/metrics``)."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from app.shared_decode import SharedDecodes

__all__ = ["Metrics", "GcTimer", "SharedDecodesCollector"]


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.events_in = Counter(
            "emarsys_stream_events_in", "Valid Segment events read, by type", ["type"], registry=r
        )
        self.events_invalid = Counter(
            "emarsys_stream_events_invalid",
            "Invalid events sent to the dead-letter topic, by reason",
            ["reason"],
            registry=r,
        )
        self.duplicates = Counter(
            "emarsys_stream_duplicates", "Events dropped as duplicate messageIds", registry=r
        )
        self.dedupe_expired = Counter(
            "emarsys_stream_dedupe_expired",
            "messageIds forgotten after the dedupe window",
            registry=r,
        )
        self.dedupe_evicted = Counter(
            "emarsys_stream_dedupe_evicted",
            "messageIds forgotten within the dedupe window because the contact had more "
            "than dedupe.max_ids_per_contact in it (oldest first)",
            registry=r,
        )
        self.held = Counter(
            "emarsys_stream_unidentified_held",
            "Events held until their identity is known",
            registry=r,
        )
        self.resolved_at_ingest = Counter(
            "emarsys_stream_resolved_at_ingest",
            "Events the ingest stage resolved from this worker's identity tables "
            "(no identity hop), by the id looked up",
            ["id_type"],
            registry=r,
        )
        self.released = Counter(
            "emarsys_stream_unidentified_released", "Held events released by a link", registry=r
        )
        self.expired = Counter(
            "emarsys_stream_unidentified_expired",
            "Held events dead-lettered (expired or over the per-id bound)",
            ["why"],
            registry=r,
        )
        self.users_created = Counter(
            "emarsys_stream_users_created", "New records in the users table", registry=r
        )
        self.contact_changes = Counter(
            "emarsys_stream_contact_changes", "Contact upserts queued for Emarsys", registry=r
        )
        self.unchanged = Counter(
            "emarsys_stream_unchanged_events",
            "Events that changed no Emarsys field (no API call)",
            registry=r,
        )
        self.emarsys_calls = Counter(
            "emarsys_stream_emarsys_calls",
            "Emarsys API calls by endpoint and outcome",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.emarsys_latency = Histogram(
            "emarsys_stream_emarsys_call_seconds",
            "Emarsys call latency including retries",
            ["endpoint"],
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.emarsys_retries = Counter(
            "emarsys_stream_emarsys_retries",
            "Retried Emarsys attempts by reason",
            ["reason"],
            registry=r,
        )
        self.emarsys_429 = Counter(
            "emarsys_stream_emarsys_429",
            "HTTP 429 (rate limited) answers from Emarsys, by endpoint",
            ["endpoint"],
            registry=r,
        )
        self.emarsys_dead_letters = Counter(
            "emarsys_stream_emarsys_dead_letters",
            "Contacts/operations dead-lettered after Emarsys refused them",
            ["endpoint"],
            registry=r,
        )
        self.rule_matches = Counter(
            "emarsys_stream_rule_matches", "Rule matches by rule", ["rule"], registry=r
        )
        self.rule_engine = Counter(
            "emarsys_stream_rule_engine",
            "Rule engine events: duplicates, late, dropped/expired partials, suppressed, "
            "irrelevant (events matching no step of any rule: skipped, no state write)",
            ["what"],
            registry=r,
        )
        self.late_events = Counter(
            "emarsys_stream_late_events", "Events later than allowed_lateness", registry=r
        )
        self.users_table_keys = Gauge(
            "emarsys_stream_users_table_keys", "Users table keys held by this worker", registry=r
        )

        self.consumer_lag = Gauge(
            "emarsys_stream_consumer_lag",
            "Messages not yet processed (highwater - committed) per assigned partition",
            ["topic", "partition"],
            registry=r,
        )
        self.emarsys_minimum_calls = Counter(
            "emarsys_stream_emarsys_minimum_calls",
            "Fewest calls each flush could have made: ceil(distinct contacts / batch_size) "
            "per key (upserts) or per external event (triggers); compare with "
            "emarsys_stream_emarsys_calls",
            ["endpoint"],
            registry=r,
        )
        self.kafka_stalled_requests = Counter(
            "emarsys_stream_kafka_stalled_requests",
            "Kafka requests left unanswered longer than worker.kafka_stall_warning, by client",
            ["client"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SharedDecodesCollector:
    """``emarsys_stream_envelope_decodes_total{topic,outcome}``: messages of an envelope
    topic decoded by an agent (``decoded``), taken from another agent's decode
    (``shared``), or dropped from the shared decodes before every reader took them
    (``dropped``; see :mod:`app.shared_decode`). Read from the counts at scrape time."""

    def __init__(self, topic: str, decodes: SharedDecodes) -> None:
        self.topic = topic
        self.decodes = decodes

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "emarsys_stream_envelope_decodes",
            "Messages of an envelope topic decoded, shared between the agents reading "
            "it, or dropped from the shared decodes before every agent took them",
            labels=["topic", "outcome"],
        )
        d = self.decodes
        for outcome, n in (("decoded", d.decoded), ("shared", d.shared), ("dropped", d.dropped)):
            family.add_metric([self.topic, outcome], n)
        yield family


class GcTimer:
    """``emarsys_stream_gc_seconds_total{generation}``: time in CPython's cyclic GC.

    A ``gc.callbacks`` hook is process-wide: the worker command installs one for its
    runtime (registering the metric) and removes it when done, so the collector's cost,
    which ``worker.gc_thresholds`` trades against memory, is measured, not guessed. The
    callback only adds to plain floats (no lock can be held when a collection starts);
    the metric reads them at scrape time.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._registry = metrics.registry
        self.seconds = [0.0, 0.0, 0.0]
        self._started = 0.0
        self._installed = False

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started:
            self.seconds[info["generation"]] += time.perf_counter() - self._started
            self._started = 0.0

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "emarsys_stream_gc_seconds",
            "Time in CPython's cyclic garbage collector, by generation collected "
            "(the worker process; see worker.gc_thresholds)",
            labels=["generation"],
        )
        for generation, seconds in enumerate(self.seconds):
            family.add_metric([str(generation)], seconds)
        yield family

    def install(self) -> GcTimer:
        if not self._installed:
            gc.callbacks.append(self._on_gc)
            self._registry.register(self)
            self._installed = True
        return self

    def remove(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._on_gc)
            self._registry.unregister(self)
            self._installed = False

    def __enter__(self) -> GcTimer:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()
