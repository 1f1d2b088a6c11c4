"""Ingest: raw Segment bytes -> validated, normalised events routed by identity.

This stage reads the ingest topic with its own aiokafka consumer instead of a Faust
agent. It keeps no table, so it needs none of Faust's per-message machinery (events,
acks, the conductor), which costs more than validating and routing an event does: a
Faust agent doing nothing reads about 7,000 messages/s on this machine kind, a plain
consumer about 150,000 (broker-and-baselines.md).

At-least-once, like the agents: a batch's messages (envelopes to ``identity`` and
``contact-events``, dead letters) are sent and acknowledged by the broker before the
batch's offsets are committed. The consumer group is ``<kafka.app_id>-ingest``
(:func:`app.settings.Settings.ingest_group`); ``emarsys-stream replay`` moves its
offsets. On a rebalance the batch in hand is finished and committed before the
partitions are given up; if that commit is refused anyway (the group moved on), the
new owner reads those events again and the messageId dedupe downstream absorbs them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import mode
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from agents.emit import delivered, handled_offsets, send_emits, send_json
from app.data_map import resolve_primary_key
from app.dead_letter import dead_letter_envelope
from app.envelope import partition_of
from app.events import InvalidEvent, validate_event
from app.faust_app import tables_recovered
from app.resolution import Emit, route_ingested, send_event_as_received
from tables.codec import loads
from tables.writer import table_writer

if TYPE_CHECKING:
    from aiokafka.structs import ConsumerRecord

    from app.faust_app import Runtime

__all__ = [
    "IdentityLead",
    "IngestConsumer",
    "LocalIdentityLookup",
    "PendingLinks",
    "register",
    "source_of_record",
]

log = logging.getLogger("emarsys_stream.ingest")

#: Pause before reconnecting after the ingest consumer failed (the batch is re-read),
#: doubling while it keeps failing, up to RESTART_DELAY_MAX_S.
RESTART_DELAY_S = 1.0
RESTART_DELAY_MAX_S = 30.0


class _LinkCache(OrderedDict[tuple[str, str], str]):
    """Bounded LRU of links already emitted by this worker (saves duplicate messages)."""

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize

    def __setitem__(self, key: tuple[str, str], value: str) -> None:
        super().__setitem__(key, value)
        if len(self) > self.maxsize:
            self.popitem(last=False)


def source_of_record(record: ConsumerRecord[Any, Any]) -> dict[str, object]:
    """Where an ingest record came from (the ``source`` of events and dead letters)."""
    return {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp if record.timestamp and record.timestamp > 0 else None,
    }


class IdentityLead:
    """How far the ingest stage is ahead of this worker's identity agent, in envelopes.

    Counts, per ``identity`` partition assigned to this worker, the envelopes this stage
    wrote there that the identity agent has not handled. A partition that arrives with
    a rebalance starts from nothing: what was written there before was handled by its
    previous owner or is read again from the committed offset, and an old mark there
    must not make the stage wait for offsets this worker will never handle.
    """

    def __init__(self) -> None:
        self.written: dict[tuple[str, int], int] = {}
        self._assigned: set[tuple[str, int]] = set()

    def wrote(self, tp: tuple[str, int], offset: int) -> None:
        if offset > self.written.get(tp, -1):
            self.written[tp] = offset

    def of(self, assigned: set[tuple[str, int]], handled: dict[tuple[str, int], int]) -> int:
        for tp in assigned - self._assigned:
            self.written.pop(tp, None)
        self._assigned = set(assigned)
        return sum(
            max(0, last - handled.get(tp, -1))
            for tp, last in self.written.items()
            if tp in assigned
        )


class PendingLinks:
    """Links this stage sent to ``identity`` that this worker's identity agent has not
    applied yet, by (id type, id).

    While an id's link is pending, its table entry may still hold the previous primary
    key (or none): its events take the identity hop, where they queue behind the link
    in the id's partition, as they always did.
    """

    def __init__(self, *, sweep_at: int = 10_000) -> None:
        self._unsent: set[tuple[str, str]] = set()
        #: (id type, id) -> (identity topic-partition, offset of the last envelope this
        #: stage wrote there in the batch that carried the link).
        self._sent: dict[tuple[str, str], tuple[tuple[str, int], int]] = {}
        self._sweep_min = self._sweep_at = sweep_at

    def __len__(self) -> int:
        return len(self._unsent) + len(self._sent)

    def add(self, id_type: str, ident: str) -> None:
        """A link for ``ident`` is in the batch being routed (not sent yet)."""
        self._unsent.add((id_type, ident))

    def sent(
        self,
        last_offsets: dict[tuple[str, int], int],
        partition_of_id: Callable[[str], tuple[str, int]],
        handled: dict[tuple[str, int], int],
    ) -> None:
        """The batch is acknowledged: ``last_offsets`` holds the newest offset written on
        each identity partition (for the partitions the batch wrote, its own last one),
        ``partition_of_id`` the partition of an id."""
        for key in self._unsent:
            tp = partition_of_id(key[1])
            offset = last_offsets.get(tp)
            if offset is not None:
                self._sent[key] = (tp, offset)
        self._unsent.clear()
        if len(self._sent) > self._sweep_at:  # amortised: ids that never come back
            self._sent = {
                k: (tp, off) for k, (tp, off) in self._sent.items()
                if handled.get(tp, -1) < off
            }
            self._sweep_at = max(self._sweep_min, 2 * len(self._sent))

    def pending(self, key: tuple[str, str], handled: dict[tuple[str, int], int]) -> bool:
        if key in self._unsent:
            return True
        entry = self._sent.get(key)
        if entry is None:
            return False
        tp, offset = entry
        if handled.get(tp, -1) >= offset:
            del self._sent[key]
            return False
        return True


class LocalIdentityLookup:
    """The ``lookup`` of :func:`app.resolution.route_ingested` for one ingest batch.

    Answers only where this worker's identity agent would answer the same: the id's
    ``identity`` partition is assigned to this worker, no rebalance is going on or
    happened since the batch began, the tables are recovered, and no link for the id
    sent by this stage is still on its way there (:class:`PendingLinks`).
    Anything else is None: the event takes the identity hop. A link another worker's
    ingest sent for the id and the agent has not applied yet is a race between two
    ingest partitions, which have no order between them either way.
    """

    def __init__(self, rt: Runtime, pending: PendingLinks) -> None:
        self.app = app = rt.app
        self.pending = pending
        self.partitions = rt.settings.kafka.partitions
        self.topic = rt.topics.identity.get_topic_name()
        self.handled = handled_offsets(rt, "identity")
        self.assigned: set[int] = set()
        self.rebalances = app.rebalancing_count
        if self._settled():
            try:
                self.assigned = {
                    tp.partition for tp in app.consumer.assignment()
                    if tp.topic == self.topic
                }
            except Exception:  # noqa: BLE001 - not started / rebalancing: no lookups
                self.assigned = set()
        # id type -> (table, its writer when the store can be read directly, else None)
        self.tables: dict[str, tuple[Any, Any]] = {}
        for id_type, table in (("user", rt.tables.user_ids),
                               ("anonymous", rt.tables.anonymous_ids)):
            writer = table_writer(table)
            self.tables[id_type] = (table, writer if writer.direct() else None)
        self.resolved: dict[str, int] = {}

    def _settled(self) -> bool:
        """No rebalance since this batch began, none going on, and the tables of the
        last one recovered. Faust's streams wait for the same (its flow control is
        suspended from a revocation until the recovery that follows is done); its
        ``recovery.completed`` alone is only set once, after the first recovery."""
        app = self.app
        return (
            app.rebalancing_count == self.rebalances
            and not app.rebalancing
            and not app.in_recovery
            and app.flow_control.is_active()
            and tables_recovered(app)
        )

    def partition_of_id(self, ident: str) -> tuple[str, int]:
        return self.topic, partition_of(ident, self.partitions)

    def __call__(self, id_type: str, ident: str) -> str | None:
        p = partition_of(ident, self.partitions)
        if p not in self.assigned or not self._settled():
            return None
        if self.pending.pending((id_type, ident), self.handled):
            return None
        table, writer = self.tables[id_type]
        kb = ident.encode()
        raw = writer.get(kb, p) if writer is not None else table.get(kb)
        pk = loads(raw)
        if not isinstance(pk, str):
            return None
        self.resolved[id_type] = self.resolved.get(id_type, 0) + 1
        return pk


class IngestConsumer(ConsumerRebalanceListener):  # type: ignore[misc]
    """The ingest loop: poll a batch, route it, send, wait for the broker, commit."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        s = rt.settings
        self.topic = rt.topics.ingest.get_topic_name()
        self.group_id = s.ingest_group
        self.pk_paths = s.identity.primary_key.paths
        self.pk_steps = s.identity.primary_key.normalize
        self.links = _LinkCache(100_000)
        self.resolve_at_ingest = s.identity.resolve_at_ingest
        self.pending_links = PendingLinks()
        self.consumer: AIOKafkaConsumer | None = None
        # Held while a batch is handled; a revocation waits for it (see on_partitions_revoked).
        self._lock = asyncio.Lock()
        #: Offsets read by this worker: partition -> last offset handed to the pipeline.
        self.read_offsets: dict[TopicPartition, int] = {}
        #: What this stage wrote on ``identity`` and the identity agent has not handled.
        self.lead = IdentityLead()
        #: True once the consumer joined its group (``/health`` waits for it).
        self.joined = False

    # -- the consumer ---------------------------------------------------------------
    def _new_consumer(self) -> AIOKafkaConsumer:
        from app.replay import kafka_client_options

        s = self.rt.settings
        w = s.worker
        return AIOKafkaConsumer(
            group_id=self.group_id,
            client_id=f"{s.kafka.app_id}-ingest",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=w.batch_max,
            # None: aiokafka's 500 ms. Apache Kafka answers as soon as records are there.
            fetch_max_wait_ms=w.fetch_max_wait_ms or 500,
            session_timeout_ms=int(w.session_timeout * 1000),
            heartbeat_interval_ms=int(w.heartbeat_interval * 1000),
            **kafka_client_options(s),
        )

    async def run(self) -> None:
        """Consume until the app stops; a failure restarts the consumer (re-reads)."""
        delay = RESTART_DELAY_S
        while not self.rt.app.should_stop:
            failed = False
            consumer = self._new_consumer()
            consumer.subscribe([self.topic], listener=self)
            self.consumer = consumer
            try:
                await consumer.start()
                log.info("ingest consumer started", extra={"group": self.group_id,
                                                           "topic": self.topic})
                # The group join goes on in the background meanwhile. Events are read
                # only once the worker's tables are recovered (as before, when ingest
                # was an agent): nothing floods the internal topics during a recovery,
                # and the producer is running by then.
                await self._wait_recovered()
                while not self.rt.app.should_stop:
                    await self._wait_for_identity_agent()
                    batch = await consumer.getmany(
                        timeout_ms=1000, max_records=self.rt.settings.worker.batch_max
                    )
                    if batch:
                        async with self._lock:
                            await self.handle(batch)
                            await self._commit(batch)
                        delay = RESTART_DELAY_S
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - restart, never die silently
                log.error("ingest consumer failed (%s); restarting in %.0f s; uncommitted "
                          "events are read again", exc, delay,
                          extra={"error": repr(exc), "retry_in_s": delay})
                failed = True
            finally:
                self.consumer = None
                self.joined = False
                self.read_offsets.clear()
                try:
                    await consumer.stop()
                except Exception:  # noqa: BLE001 - stopping a broken consumer
                    log.debug("stopping the ingest consumer failed", exc_info=True)
            if failed:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_DELAY_MAX_S)  # a long outage: fewer retries

    def identity_lead(self) -> int:
        """Envelopes this stage wrote on this worker's ``identity`` partitions that the
        identity agent has not handled yet."""
        try:
            assigned = {(tp.topic, tp.partition) for tp in self.rt.app.consumer.assignment()}
        except Exception:  # not started / rebalancing
            return 0
        return self.lead.of(assigned, handled_offsets(self.rt, "identity"))

    async def _wait_for_identity_agent(self) -> None:
        """Stay at most ``worker.ingest_max_lead`` envelopes per partition ahead.

        Events with a primary key go straight to ``contact-events``, the others take
        the identity hop. Read far ahead of the identity agent (this stage is much
        faster), the direct events of a backlog would reach the rules agent minutes of
        event time before the identity-hop events of the same moment, and those would
        be judged late. Kept close, both paths move together, as when ingest was a
        Faust agent sharing the identity agent's pace. Without rules nothing depends on
        that mix, and ingest reads ahead freely.
        """
        if not self.rt.settings.rules:
            return  # only the rules engine's per-contact clock cares how the paths mix
        limit = self.rt.settings.worker.ingest_max_lead
        app = self.rt.app
        parts = max(1, self.rt.settings.kafka.partitions)
        while not app.should_stop and self.identity_lead() > limit * parts:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # polled: progress is a dict the agents update

    async def _wait_recovered(self) -> None:
        app = self.rt.app
        while not app.should_stop:
            if tables_recovered(app) and app.producer.state == "running":
                return
            await asyncio.sleep(0.1)

    async def _commit(self, batch: dict[TopicPartition, list[Any]]) -> None:
        assert self.consumer is not None
        offsets = {tp: records[-1].offset + 1 for tp, records in batch.items() if records}
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # The group rebalanced under us: the new owner re-reads these events (dedupe
            # by messageId downstream); nothing is lost.
            log.info("ingest commit refused (%s); the events will be read again", exc,
                     extra={"partitions": len(offsets)})

    # -- rebalance listener --------------------------------------------------------
    async def on_partitions_revoked(self, revoked: Any) -> None:
        # Finish (and commit) the batch in hand before the partitions go to another worker.
        async with self._lock:
            for tp in revoked:
                self.read_offsets.pop(tp, None)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.joined = True
        log.info("ingest partitions assigned: %s",
                 ",".join(str(tp.partition) for tp in sorted(assigned)),
                 extra={"group": self.group_id, "partitions": len(assigned)})

    # -- one batch ---------------------------------------------------------------
    async def handle(self, batch: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> None:
        rt = self.rt
        m = rt.metrics
        emits: list[Emit] = []
        sent: list[Any] = []
        invalid: dict[str, int] = {}
        by_type: dict[str, int] = {}  # counted once per batch (a labels() call costs ~1 us)
        lookup = (
            LocalIdentityLookup(rt, self.pending_links) if self.resolve_at_ingest else None
        )
        for tp, records in batch.items():
            for record in records:
                raw = record.value
                raw = b"" if raw is None else bytes(raw)
                src = source_of_record(record)
                fallback = src["timestamp"] if isinstance(src["timestamp"], int) else None
                result = validate_event(raw, fallback_ts_ms=fallback)
                if isinstance(result, InvalidEvent):
                    m.events_invalid.labels(result.reason).inc()
                    invalid[result.reason] = invalid.get(result.reason, 0) + 1
                    sent.append(await send_json(
                        rt.topics.dead_letters,
                        None,
                        dead_letter_envelope(result.reason, result.error, raw, src),
                    ))
                    continue
                by_type[result.type] = by_type.get(result.type, 0) + 1
                pk = resolve_primary_key(result.event, self.pk_paths, self.pk_steps)
                routed = route_ingested(
                    result.event,
                    result.type,
                    result.ts_ms,
                    result.user_id,
                    result.anonymous_id,
                    pk,
                    src,
                    known_links=self.links,
                    lookup=lookup,
                )
                if result.as_received:
                    send_event_as_received(routed, result.event, raw)
                if lookup is not None:
                    for e in routed:
                        if e.target == "identity" and e.value.get("kind") == "link":
                            self.pending_links.add(e.value["id_type"], e.value["id"])
                emits.extend(routed)
            if records:
                self.read_offsets[tp] = records[-1].offset
        for ev_type, n in by_type.items():
            m.events_in.labels(ev_type).inc(n)
        sent.extend(await send_emits(rt, emits))
        await delivered(sent)
        identity_topic = rt.topics.identity.get_topic_name()
        for fut in sent:
            meta = fut.result()
            if getattr(meta, "topic", None) == identity_topic:
                self.lead.wrote((meta.topic, meta.partition), meta.offset)
        if lookup is not None:
            # Every link of the batch went to a partition this batch wrote, whose newest
            # offset the lead now holds.
            self.pending_links.sent(self.lead.written, lookup.partition_of_id,
                                    lookup.handled)
            for id_type, n in lookup.resolved.items():
                m.resolved_at_ingest.labels(id_type).inc(n)
        if invalid:
            log.warning(
                "dead letters written: %d invalid event(s)",
                sum(invalid.values()),
                extra={"dead_letters": sum(invalid.values()), "by_reason": invalid,
                       "topic": rt.topics.dead_letters.get_topic_name()},
            )


class IngestService(mode.Service):
    """Runs :class:`IngestConsumer` as a child of the Faust app.

    A child starts with the app, not after table recovery like an ``@app.task``: the
    ingest group's join (on Apache Kafka ``group.initial.rebalance.delay.ms``, on the
    embedded broker half the session timeout) overlaps Faust's own join and recovery
    instead of following them. Reading starts once the tables are recovered.
    """

    def __init__(self, ingest: IngestConsumer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ingest = ingest

    async def on_start(self) -> None:
        self.add_future(self.ingest.run())


def register(rt: Runtime) -> None:
    ingest = IngestConsumer(rt)
    rt.state["ingest"] = ingest
    rt.app.add_dependency(IngestService(ingest))
