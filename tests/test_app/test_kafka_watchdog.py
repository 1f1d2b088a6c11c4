"""The Kafka request watchdog: pure sampling, and reading real aiokafka connections."""

from __future__ import annotations

import asyncio
import struct
from types import SimpleNamespace

from aiokafka.conn import create_conn
from aiokafka.protocol.admin import ApiVersionResponse_v0
from aiokafka.protocol.metadata import MetadataRequest

from app.kafka_watchdog import QueueHead, RequestQueueWatch, request_queue_heads


def head(cid: int, conn: str = "producer node 0") -> QueueHead:
    return QueueHead(connection=conn, correlation_id=cid, api="ProduceRequest_v7", depth=3)


def test_a_head_that_does_not_move_is_reported_once_after_stall_after() -> None:
    watch = RequestQueueWatch(stall_after=20)
    assert watch.observe([head(7)], now=100.0) == []
    assert watch.observe([head(7)], now=119.0) == []
    stalls = watch.observe([head(7)], now=120.5)
    assert [(s.head.correlation_id, s.waited) for s in stalls] == [(7, 20.5)]
    assert watch.observe([head(7)], now=200.0) == []  # already reported


def test_a_head_that_moves_restarts_the_clock() -> None:
    watch = RequestQueueWatch(stall_after=20)
    watch.observe([head(7)], now=100.0)
    watch.observe([head(8)], now=115.0)  # 7 was answered, 8 is new
    assert watch.observe([head(8)], now=130.0) == []
    assert [s.head.correlation_id for s in watch.observe([head(8)], now=135.0)] == [8]


def test_connections_are_tracked_separately_and_an_empty_queue_forgets() -> None:
    watch = RequestQueueWatch(stall_after=10)
    watch.observe([head(1, "producer node 0"), head(1, "consumer node 0")], now=0.0)
    watch.observe([head(1, "producer node 0")], now=5.0)  # consumer queue emptied
    stalls = watch.observe([head(1, "producer node 0"), head(1, "consumer node 0")], now=10.0)
    assert [s.head.connection for s in stalls] == ["producer node 0"]


async def test_reads_the_head_of_a_real_connection_to_a_broker_that_never_answers() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answer the client's ApiVersions handshake, then never answer anything again.
        accepted.append(writer)
        size = struct.unpack(">i", await reader.readexactly(4))[0]
        frame = await reader.readexactly(size)
        correlation_id = struct.unpack(">i", frame[4:8])[0]
        body = ApiVersionResponse_v0(error_code=0, api_versions=[(3, 0, 0)]).encode()
        payload = struct.pack(">i", correlation_id) + body
        writer.write(struct.pack(">i", len(payload)) + payload)
        await writer.drain()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = await create_conn("127.0.0.1", port, request_timeout_ms=30_000)
    try:
        pending = asyncio.ensure_future(conn.send(MetadataRequest([])))
        await asyncio.sleep(0.05)
        heads = request_queue_heads({"producer": SimpleNamespace(_conns={(0, 0): conn})})
        assert len(heads) == 1
        assert heads[0].connection == "producer node 0"
        assert heads[0].api.startswith("MetadataRequest")
        assert heads[0].depth == 1
        pending.cancel()
    finally:
        conn.close()
        server.close()
        for w in accepted:
            w.close()
        await server.wait_closed()


def test_unreadable_clients_are_skipped() -> None:
    assert request_queue_heads({"producer": object(), "consumer": None}) == []


async def test_reads_the_oldest_message_of_a_real_faust_producer_buffer() -> None:
    import faust
    from faust.transport.producer import ProducerBuffer

    from app.kafka_watchdog import producer_buffer_head

    app = faust.App("watchdog-test", broker="kafka://127.0.0.1:1")
    buffer = ProducerBuffer()
    buffer.app = app
    assert producer_buffer_head(buffer) is None
    first = app.topic("orders").as_future_message(key=b"k", value=b"v")
    buffer.put(first)
    buffer.put(app.topic("refunds").as_future_message(key=b"k", value=b"v"))
    found = producer_buffer_head(buffer)
    assert found is not None
    assert (found.connection, found.api, found.depth) == ("producer buffer", "send to orders", 2)
    assert found.correlation_id == id(first)
