"""How much the worker's consumer group still has to read on some topics.

The rules clock may only treat silence as idleness when nothing is waiting upstream
(see :mod:`app.rules.clock`). This asks the brokers — end offsets and the group's
committed offsets for every partition of the given topics — so it sees the backlog of
partitions other workers own too. It uses its own consumer that never subscribes, so it
never joins the group (like ``kafka-consumer-groups --describe``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["GroupBacklog", "PartitionProgress", "backlog_of", "nothing_left_to_read"]

log = logging.getLogger("emarsys_stream.rules")


def backlog_of(end: Mapping[Any, int], committed: Mapping[Any, int | None]) -> int:
    """Records not yet committed by the group: sum of end - committed (>= 0) per partition.

    A partition the group never committed counts from 0 when it has records (the
    group reads it from the earliest offset).
    """
    total = 0
    for tp, high in end.items():
        done = committed.get(tp)
        total += max(0, int(high) - int(done or 0))
    return total


@dataclass(frozen=True)
class PartitionProgress:
    end: int  # the broker's end offset
    committed: int | None  # the group's committed offset (next to read)


def nothing_left_to_read(
    progress: Mapping[Any, PartitionProgress], read_by_me: Mapping[Any, int | None]
) -> bool:
    """True when no partition has records the group has not got to.

    ``read_by_me``: this worker's assigned partitions -> offset of the last record its
    streams received (None: none since assignment). For those the worker's own reading
    counts (commits trail reading by the commit interval and by Faust's ack
    bookkeeping); for every other partition, the group's committed offset.
    """
    for tp, p in progress.items():
        if tp in read_by_me:
            last = read_by_me[tp]
            position = (p.committed or 0) if last is None else max(last + 1, p.committed or 0)
        else:
            position = p.committed or 0
        if p.end > position:
            return False
    return True


class GroupBacklog:
    def __init__(self, group_id: str, topics: Sequence[str], client_options: dict[str, Any]):
        self.group_id = group_id
        self.topics = list(topics)
        self._options = client_options
        self._consumer: Any = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        self._consumer = AIOKafkaConsumer(
            group_id=self.group_id, enable_auto_commit=False, **self._options
        )
        await self._consumer.start()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def measure(self) -> int:
        """Current backlog in records, by the group's commits (raises on broker errors)."""
        progress = await self.progress()
        return backlog_of(
            {tp: p.end for tp, p in progress.items()},
            {tp: p.committed for tp, p in progress.items()},
        )

    async def progress(self) -> dict[Any, PartitionProgress]:
        """End and committed offset of every partition of the topics."""
        from aiokafka import TopicPartition

        consumer = self._consumer
        assert consumer is not None, "start() first"
        await consumer.topics()  # refresh metadata
        tps = [
            TopicPartition(topic, p)
            for topic in self.topics
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        if not tps:
            return {}
        end = await consumer.end_offsets(tps)
        # One OffsetFetch for all partitions (what committed() does for one).
        fetched = await consumer._coordinator.fetch_committed_offsets(tps)
        out: dict[Any, PartitionProgress] = {}
        for tp in tps:
            meta = fetched.get(tp)
            committed = None if meta is None or meta.offset < 0 else int(meta.offset)
            out[tp] = PartitionProgress(int(end[tp]), committed)
        return out
