"""app.record_batches against the real broker: keyed records sent a batch at a time land
where producer.send() puts them, with the same key and value, in order per partition."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.record_batches import direct_producer, send_keyed


async def _topic(bootstrap: str, partitions: int) -> str:
    topic = f"rb-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    return topic


async def _read(bootstrap: str, topic: str, expect: int) -> list[Any]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    out: list[Any] = []
    try:
        async with asyncio.timeout(30):
            while len(out) < expect:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    out.extend(records)
    finally:
        await consumer.stop()
    return out


async def test_records_land_where_send_puts_them_in_order(kafka_broker: Any) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    keyed_topic, sent_topic = await _topic(bootstrap, 4), await _topic(bootstrap, 4)
    records = [(f"person-{i % 37}@example.com".encode(), b'{"n":%d}' % i) for i in range(300)]
    # Small batches: the 300 records need several per partition.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_batch_size=2048, linger_ms=0)
    await producer.start()
    try:
        futures = await send_keyed(producer, keyed_topic, records)
        assert len(futures) > 4  # more than one batch per partition
        await asyncio.gather(*futures)
        for key, value in records:
            await producer.send(sent_topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()

    keyed = await _read(bootstrap, keyed_topic, len(records))
    sent = await _read(bootstrap, sent_topic, len(records))
    assert len(keyed) == len(sent) == len(records)
    partition_of = {(r.key, r.value): r.partition for r in sent}
    assert {(r.key, r.value): r.partition for r in keyed} == partition_of
    assert len(set(partition_of.values())) == 4
    for p in range(4):
        in_partition = sorted((r for r in keyed if r.partition == p), key=lambda r: r.offset)
        expected = [kv for kv in records if partition_of[kv] == p]
        assert [(r.key, r.value) for r in in_partition] == expected
    assert all(r.timestamp > 0 and not r.headers for r in keyed)


async def test_an_empty_call_sends_nothing(kafka_broker: Any) -> None:
    topic = await _topic(kafka_broker.bootstrap_servers, 2)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers)
    await producer.start()
    try:
        assert await send_keyed(producer, topic, []) == []
    finally:
        await producer.stop()


def test_no_direct_producer_before_start_or_in_a_transaction() -> None:
    class App:
        in_transaction = False
        producer: Any = None

    class FaustProducer:
        _producer = object()

    app = App()
    assert direct_producer(app) is None  # no producer yet
    app.producer = FaustProducer()
    assert direct_producer(app) is FaustProducer._producer
    app.in_transaction = True
    assert direct_producer(app) is None
