"""Envelopes on the internal hops: partition per key, order, bounds, legacy records."""

from __future__ import annotations

import random

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from app import envelope
from app.envelope import Envelope, murmur2, pack, partition_for_key, unpack


def _records(envs: list[Envelope]) -> dict[int, list[tuple[str, dict[str, object]]]]:
    out: dict[int, list[tuple[str, dict[str, object]]]] = {}
    for env in envs:
        records, bad = unpack(None, env.value)
        assert bad == []
        assert len(records) == env.records
        out.setdefault(env.partition, []).extend(records)
    return out


def test_partition_is_the_one_kafkas_default_partitioner_gives_the_key() -> None:
    partitioner = DefaultPartitioner()
    for i in range(200):
        key = f"user-{i}@example.com".encode()
        assert partition_for_key(key, 4) == partitioner(key, [0, 1, 2, 3], [0, 1, 2, 3])


def test_murmur2_equals_aiokafkas_for_every_length_and_byte() -> None:
    rnd = random.Random(5)
    keys = [bytes(rnd.getrandbits(8) for _ in range(n)) for n in range(70) for _ in range(30)]
    keys += [b"\xff" * n for n in range(12)] + ["ünïcødé-ключ".encode()]
    for key in keys:
        assert murmur2(key) == aiokafka_murmur2(key), key


def test_pack_groups_by_partition_and_keeps_order_per_partition() -> None:
    records = [(f"k{i % 7}", {"n": i}) for i in range(100)]
    by_partition = _records(pack(records, 4))
    for p, recs in by_partition.items():
        assert all(partition_for_key(k.encode(), 4) == p for k, _ in recs)
        ns = [v["n"] for _, v in recs]
        assert ns == sorted(ns)
    assert sorted(v["n"] for recs in by_partition.values() for _, v in recs) == list(range(100))


def test_pack_one_envelope_per_partition_when_small() -> None:
    envs = pack([(f"k{i}", {"n": i}) for i in range(50)], 3)
    assert len(envs) == len({e.partition for e in envs}) <= 3
    assert sum(e.records for e in envs) == 50


@pytest.mark.parametrize(("max_bytes", "max_records"), [(2_000, 1000), (1_000_000, 10)])
def test_pack_cuts_envelopes_at_the_bounds(max_bytes: int, max_records: int) -> None:
    records = [("same-key", {"text": "x" * 100, "n": i}) for i in range(95)]
    envs = pack(records, 4, max_bytes=max_bytes, max_records=max_records)
    assert len(envs) > 1
    for env in envs:
        assert env.records <= max_records
        assert len(env.value) <= max_bytes
    assert [v["n"] for _, v in _records(envs)[envs[0].partition]] == list(range(95))


def test_a_record_larger_than_the_bound_still_gets_its_own_envelope() -> None:
    envs = pack([("a", {"text": "x" * 5000}), ("a", {"n": 1})], 1, max_bytes=1000)
    assert [e.records for e in envs] == [1, 1]


def test_records_of_one_size_are_chunked_to_the_byte_bound_without_cutting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 1,000 records of about 600 bytes are more than 256 KiB: the chunks are sized from
    # a sample up front, so no envelope has to be encoded whole and then cut.
    def cut(*args: object) -> list[Envelope]:
        raise AssertionError("an envelope was encoded whole and then cut by size")

    monkeypatch.setattr(envelope, "_pack_by_size", cut)
    records = [("one-key", {"text": "x" * 560, "n": i}) for i in range(1000)]
    envs = pack(records, 4)
    assert len(envs) == 3
    assert all(len(env.value) <= envelope.ENVELOPE_MAX_BYTES for env in envs)
    assert all(len(env.value) > 0.7 * envelope.ENVELOPE_MAX_BYTES for env in envs[:-1])
    assert [v["n"] for _, v in _records(envs)[envs[0].partition]] == list(range(1000))


def test_records_larger_than_the_sample_still_stay_within_the_byte_bound() -> None:
    small = [("one-key", {"n": i}) for i in range(20)]
    large = [("one-key", {"text": "x" * 400, "n": 20 + i}) for i in range(80)]
    envs = pack(small + large, 1, max_bytes=4_000)
    for env in envs:
        assert len(env.value) <= 4_000
    assert [v["n"] for _, v in _records(envs)[0]] == list(range(100))


def test_unpack_reads_a_plain_keyed_record_from_before_envelopes() -> None:
    value = orjson.dumps({"kind": "event", "primary_key": "a@b.c", "ts": 1})
    records, bad = unpack(b"a@b.c", value)
    assert records == [("a@b.c", {"kind": "event", "primary_key": "a@b.c", "ts": 1})]
    assert bad == []


def test_unpack_keeps_a_record_with_a_records_field_as_a_record() -> None:
    # A record of its own that happens to have a "records" field is not an envelope.
    value = orjson.dumps({"kind": "event", "records": []})
    records, bad = unpack(b"k", value)
    assert records == [("k", {"kind": "event", "records": []})] and bad == []


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        (b"k", b"{not json", "not JSON"),
        (b"k", b"[1, 2]", "not a JSON object"),
        (None, b'{"kind": "event"}', "without a Kafka key"),
        (None, None, "not JSON"),
    ],
)
def test_unpack_reports_what_is_not_a_record(
    key: bytes | None, value: bytes | None, error: str
) -> None:
    records, bad = unpack(key, value)
    assert records == []
    assert len(bad) == 1 and error in bad[0].error
    assert bad[0].raw == (value or b"")


def test_unpack_keeps_good_records_next_to_bad_ones() -> None:
    value = orjson.dumps(
        {"records": [{"key": "a", "value": {"n": 1}}, {"key": 5, "value": {}}, "x",
                     {"key": "c", "value": [1]}, {"key": "d"},
                     {"key": "b", "value": {"n": 2}}]}
    )
    records, bad = unpack(None, value)
    assert records == [("a", {"n": 1}), ("b", {"n": 2})]
    assert [orjson.loads(b.raw) for b in bad] == [
        {"key": 5, "value": {}}, "x", {"key": "c", "value": [1]}, {"key": "d"}
    ]
