"""Group backlog probe against the real broker: end offsets minus the group's commits."""

from __future__ import annotations

import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import OffsetAndMetadata

from app.group_backlog import GroupBacklog, PartitionProgress, backlog_of, nothing_left_to_read


def test_backlog_of_sums_uncommitted_records_and_never_goes_negative() -> None:
    end = {"a": 10, "b": 5, "c": 0, "d": 3}
    committed = {"a": 4, "b": 7, "c": None, "d": None}
    assert backlog_of(end, committed) == 6 + 0 + 0 + 3


def test_own_partitions_count_what_this_worker_read_others_what_the_group_committed() -> None:
    progress = {
        "mine": PartitionProgress(end=100, committed=40),  # commits trail reading
        "theirs": PartitionProgress(end=50, committed=50),
    }
    assert nothing_left_to_read(progress, {"mine": 99})
    assert not nothing_left_to_read(progress, {"mine": 98})  # one record not read yet
    assert not nothing_left_to_read(progress, {"mine": None})  # nothing read since assigned
    assert not nothing_left_to_read(progress, {})  # not mine: the group is at 40 of 100
    behind = {**progress, "theirs": PartitionProgress(end=50, committed=49)}
    assert not nothing_left_to_read(behind, {"mine": 99})  # another worker's backlog


async def test_probe_sees_records_the_group_has_not_committed(kafka_broker: Any) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    topic, group = f"bk-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_batch_size=1, linger_ms=0)
    await producer.start()
    try:
        for i in range(6):
            await producer.send_and_wait(topic, b"x", partition=i % 2)
    finally:
        await producer.stop()

    probe = GroupBacklog(group, [topic], {"bootstrap_servers": bootstrap})
    await probe.start()
    committer = AIOKafkaConsumer(group_id=group, enable_auto_commit=False,
                                 bootstrap_servers=bootstrap)
    await committer.start()
    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    committer.assign(tps)  # assigned, not subscribed: commits without joining the group
    committer.pause(*tps)
    try:
        assert await probe.measure() == 6  # nothing committed yet
        await committer.commit({TopicPartition(topic, 0): OffsetAndMetadata(2, "")})
        assert await probe.measure() == 4
        await committer.commit({TopicPartition(topic, 0): OffsetAndMetadata(3, ""),
                                TopicPartition(topic, 1): OffsetAndMetadata(3, "")})
        assert await probe.measure() == 0
        progress = await probe.progress()
        assert {tp.partition: (p.end, p.committed) for tp, p in progress.items()} == {
            0: (3, 3), 1: (3, 3)}
    finally:
        await committer.stop()
        await probe.stop()
