"""bench.harness / bench.latency: percentiles, the event source, call matching, the
sustained-rate lookup and the CLI (no broker, no worker)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson
import pytest

import bench.__main__ as cli
from app.contacts import ContactUpdater
from app.data_map import DataMap, resolve_primary_key
from app.events import ValidEvent, validate_event
from app.identity import UserRecord
from bench import latency
from bench.harness import percentile, summarize
from bench.latency import (
    LatencyEvents,
    hop_times,
    match_calls,
    message_number,
    sustained_from_results,
)
from bench.pipeline import PipelineOptions, worker_config

# ------------------------------------------------------------------------------ percentiles


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50
    assert percentile(values, 90) == 90
    assert percentile(values, 99) == 99
    assert percentile(values, 99.5) == 100
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1
    thousand = [float(v) for v in range(1, 1001)]
    assert percentile(thousand, 99) == 990
    assert percentile(thousand, 99.9) == 999
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_percentile_p99_of_few_values_is_the_max() -> None:
    # with fewer than 100 values the p99 can only be the largest one
    assert percentile([0.1, 0.2, 5.0], 99) == 5.0
    assert percentile(sorted([3.0, 1.0, 2.0, 9.0]), 50) == 2.0


def test_summarize_is_order_independent() -> None:
    values = [0.5, 2.5, 1.0, 1.5, 2.0]
    s = summarize(values)
    assert s == summarize(sorted(values, reverse=True))
    assert s["count"] == 5
    assert s["min"] == 0.5 and s["max"] == 2.5
    assert s["p50"] == 1.5 and s["p99"] == 2.5
    assert s["mean"] == 1.5
    empty = summarize([])
    assert empty["count"] == 0 and empty["p99"] is None


# ------------------------------------------------------------------------------ the events


def _stream(n: int, **kw: Any) -> tuple[LatencyEvents, list[tuple[str, bytes]]]:
    gen = LatencyEvents(kw.pop("contacts", 300), kw.pop("rate", 100.0), **kw)
    base = 1_790_000_000.0
    return gen, [gen.event(i, base + i / gen.rate) for i in range(n)]


def test_events_are_valid_and_identifies_carry_a_primary_key() -> None:
    gen, events = _stream(3000, seed=3)
    kinds = [k for k, _ in events]
    assert kinds.count("identify") == len(gen.identifies)
    assert 0.10 < kinds.count("identify") / len(kinds) < 0.20
    assert 0.20 < kinds.count("page") / len(kinds) < 0.30
    sizes = []
    for n, (kind, raw) in enumerate(events):
        valid = validate_event(raw)
        assert isinstance(valid, ValidEvent), raw
        assert valid.type == kind
        assert valid.user_id
        assert message_number(valid.message_id, 3) == n
        sizes.append(len(raw))
        if kind == "identify":
            pk = resolve_primary_key(valid.event, ["traits.email"], ["trim", "lowercase"])
            assert pk == gen.identifies[n].pk
            assert valid.event["traits"]["lastName"] == gen.identifies[n].last_name
        else:
            assert "traits" not in valid.event  # tracks/pages never carry the email
    assert 300 < sum(sizes) / len(sizes) < 500


def test_tracks_and_pages_only_for_people_identified_before() -> None:
    gen, events = _stream(2000, seed=5)
    user_of_email = {p.email.lower(): p.user_id for p in gen.people}
    known: set[str] = set()
    for n, (kind, raw) in enumerate(events):
        event = orjson.loads(raw)
        if kind == "identify":
            known.add(user_of_email[gen.identifies[n].pk])
        else:
            assert event["userId"] in known


def test_identifies_of_one_person_respect_the_cooldown() -> None:
    rate, cooldown = 200.0, 10.0
    gen, _events = _stream(20_000, contacts=2000, rate=rate, cooldown=cooldown, seed=9)
    assert gen.cooldown_misses == 0
    last: dict[str, int] = {}
    for n in sorted(gen.identifies):
        pk = gen.identifies[n].pk
        if pk in last:
            assert (n - last[pk]) / rate >= cooldown
        last[pk] = n
    firsts = [i for i in gen.identifies.values() if i.new_contact]
    assert len(firsts) == len({i.pk for i in gen.identifies.values()})


def test_same_seed_same_events_apart_from_the_timestamp() -> None:
    def strip(raw: bytes) -> dict[str, Any]:
        event = orjson.loads(raw)
        event.pop("timestamp")
        return event

    a = LatencyEvents(100, 50.0, seed=4)
    b = LatencyEvents(100, 50.0, seed=4)
    c = LatencyEvents(100, 50.0, seed=5)
    ea = [strip(a.event(n, 1.0e9 + n)[1]) for n in range(300)]
    eb = [strip(b.event(n, 2.0e9 + n)[1]) for n in range(300)]
    ec = [strip(c.event(n, 1.0e9 + n)[1]) for n in range(300)]
    assert ea == eb
    assert ea != ec
    raw = LatencyEvents(10, 1.0).event(0, 1_790_000_000.25)[1]
    assert orjson.loads(raw)["timestamp"] == "2026-09-21T14:13:20.250Z"


def test_every_identify_costs_an_upsert_through_the_real_contact_updater(tmp_path: Path) -> None:
    """The users agent's own logic (ContactUpdater with the benchmark worker's data map),
    one event per batch in order: every identify yields an upsert carrying its lastName,
    tracks and pages yield none."""
    cfg = worker_config(PipelineOptions(), "127.0.0.1:1", "http://x/", 1, tmp_path)
    updater = ContactUpdater(
        DataMap.from_config(cfg["data_map"]),
        key_field_id=3,
        max_ids=50,
        dedupe_window_ms=86_400_000,
    )
    gen, events = _stream(1500, contacts=100, rate=50.0, cooldown=2.0, seed=2)
    users: dict[str, dict[str, Any]] = {}
    pk_of_user = {p.user_id: p.email.lower() for p in gen.people}
    for n, (kind, raw) in enumerate(events):
        valid = validate_event(raw)
        assert isinstance(valid, ValidEvent)
        pk = pk_of_user[valid.event["userId"]]  # what the identity lookup resolves
        msg = {"kind": "event", "event": valid.event, "ts": valid.ts_ms}

        def load(key: str) -> UserRecord | None:
            raw_user = users.get(key)
            return None if raw_user is None else UserRecord.from_dict(raw_user)

        batch = updater.process([(pk, msg)], load, 1_790_000_000_000 + n)
        for key, rec in batch.users.items():
            users[key] = rec.to_dict()
        if kind == "identify":
            op = batch.operations[pk]
            assert op["fields"]["2"] == gen.identifies[n].last_name
        else:
            assert batch.operations == {}


# ------------------------------------------------------------------------------ matching


def _call(seq: int, at: float, contacts: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return {
        "seq": seq,
        "method": kw.get("method", "PUT"),
        "path": kw.get("path", "/api/v2/contact/"),
        "status": kw.get("status", 200),
        "replyCode": kw.get("replyCode", 0),
        "received_at": at,
        "body": {"key_id": "3", "contacts": contacts},
    }


def test_match_calls_first_successful_upsert_with_that_contact_and_value() -> None:
    gen, _events = _stream(400, seed=1)
    idents = list(gen.identifies.values())[:4]
    a, b, c, d = idents
    calls = [
        # a: failed first, then accepted twice (a redelivery): the first accepted counts
        _call(1, 10.0, [{"3": a.pk, "2": a.last_name}], status=503, replyCode=1),
        _call(2, 11.0, [{"3": a.pk, "2": a.last_name, "1": "x"}, {"3": b.pk, "2": b.last_name}]),
        _call(3, 12.5, [{"3": a.pk, "2": a.last_name}]),
        # c: its lastName under another contact's key does not count
        _call(4, 13.0, [{"3": b.pk, "2": c.last_name}]),
        # c: a list call and a GET with the right values do not count either
        _call(5, 13.5, [{"3": c.pk, "2": c.last_name}], path="/api/v2/contactlist/7/add"),
        _call(6, 13.6, [{"3": c.pk, "2": c.last_name}], method="POST"),
        # d: the right call
        _call(7, 14.0, [{"3": d.pk, "2": d.last_name}, {"3": "x@y", "2": "Weber-notanumber"}]),
        {
            "seq": 8,
            "method": "PUT",
            "path": "/api/v2/contact",
            "status": 200,
            "replyCode": 0,
            "received_at": 15.0,
            "body": None,
        },
    ]
    found = match_calls(calls, gen.identifies)
    assert found == {a.n: (11.0, 2), b.n: (11.0, 2), d.n: (14.0, 7)}


def test_message_number_and_hop_times() -> None:
    assert message_number("lat-1-000000042-deadbeef", 1) == 42
    assert message_number("lat-2-000000042-deadbeef", 1) is None
    assert message_number("bench-1-000000042-deadbeef", 1) is None
    assert message_number(None, 1) is None
    gen, events = _stream(200, seed=1)
    n = min(gen.identifies)
    mid = orjson.loads(events[n][1])["messageId"]
    ce = [
        (1000, b"k", orjson.dumps({"kind": "event", "event": {"messageId": mid}})),
        (900, b"k", orjson.dumps({"kind": "event", "event": {"messageId": mid}})),
        (950, b"k", b"not json"),
    ]
    ops = [
        (1500, b"k", orjson.dumps({"op": "contact_upsert", "message_ids": ["other", mid]})),
        (1400, b"k", orjson.dumps({"op": "list_membership", "message_ids": [mid]})),
    ]
    assert hop_times(ce, ops, gen.identifies, 1) == {n: {"contact_event": 0.9, "operation": 1.5}}


# ------------------------------------------------------------------------------ sustained rate


def _result(path: Path, rate: float, **options: Any) -> None:
    data = {
        "started_at": options.pop("started_at", "2026-11-28T10:00:00+00:00"),
        "options": {"workers": 1, "store": "rocksdb://", "rules": 0, **options},
        "pipeline": {"events_per_s": rate},
        "emarsys": {"missing_contacts": 0},
    }
    path.write_bytes(orjson.dumps(data))


def test_sustained_from_results_prefers_the_newest_full_run(tmp_path: Path) -> None:
    assert sustained_from_results(tmp_path / "none") is None
    assert sustained_from_results(tmp_path) is None
    _result(tmp_path / "a.json", 1900, quick=True, started_at="2026-11-28T09:00:00+00:00")
    assert sustained_from_results(tmp_path) == (1900.0, tmp_path / "a.json")
    _result(tmp_path / "b.json", 2010, quick=False, started_at="2026-11-28T08:00:00+00:00")
    _result(tmp_path / "c.json", 1700, quick=False, started_at="2026-11-28T07:00:00+00:00")
    _result(tmp_path / "d.json", 3000, quick=True, started_at="2026-11-28T11:00:00+00:00")
    # not eligible: rules, two workers, memory store, missing contacts, other modes
    _result(tmp_path / "e.json", 9000, quick=False, rules=20, started_at="2026-11-28T12:00Z")
    _result(tmp_path / "f.json", 9000, quick=False, workers=2, started_at="2026-11-28T12:00Z")
    _result(tmp_path / "g.json", 9000, quick=False, store="memory://", started_at="2026-11-29")
    (tmp_path / "h.json").write_bytes(orjson.dumps({"mode": "latency", "pipeline": {}}))
    (tmp_path / "i.json").write_bytes(b"{broken")
    bad = orjson.loads((tmp_path / "b.json").read_bytes())
    bad["emarsys"]["missing_contacts"] = 3
    bad["started_at"] = "2026-11-29T00:00:00+00:00"
    (tmp_path / "j.json").write_bytes(orjson.dumps(bad))
    assert sustained_from_results(tmp_path) == (2010.0, tmp_path / "b.json")


def test_cli_rate_defaults_to_half_the_sustained_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[latency.LatencyOptions] = []
    monkeypatch.setattr(latency, "run_latency", lambda opts: seen.append(opts) or 0)
    args = ["latency", "--quick", "--results-dir", str(tmp_path)]
    assert cli.main([*args, "--sustained", "2000"]) == 0
    assert seen[-1].rate == 1000 and seen[-1].sustained == 2000
    assert seen[-1].duration == latency.QUICK_DURATION and seen[-1].warmup == latency.QUICK_WARMUP
    assert seen[-1].flush_interval == 1.0
    assert cli.main([*args, "--rate", "300"]) == 0
    assert seen[-1].rate == 300 and seen[-1].sustained is None
    # nothing to derive the rate from: an error, not a guess
    assert cli.main(args) == 2
    _result(tmp_path / "p.json", 1800, quick=False)
    assert cli.main(args) == 0
    assert seen[-1].rate == 900 and seen[-1].sustained_source == "p.json"
    # enough people for the cooldown at a high rate
    assert cli.main([*args, "--rate", "5000"]) == 0
    assert seen[-1].contacts >= 4 * 5000 * 0.15 * 10


async def test_fetch_wait_worker_replaces_fausts_fetch_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The diagnostic wrapper runs the real CLI with every consumer given a
    fetch_max_wait_ms getting the replacement (here: a check-config run)."""
    import aiokafka

    from bench import fetch_wait_worker

    monkeypatch.setattr(aiokafka.AIOKafkaConsumer, "__init__", aiokafka.AIOKafkaConsumer.__init__)
    cfg = worker_config(PipelineOptions(), "127.0.0.1:1", "http://x/api/v2/", 1, tmp_path / "d")
    path = tmp_path / "w.yaml"
    path.write_bytes(orjson.dumps(cfg))  # JSON is YAML
    monkeypatch.setenv("BENCH_EMARSYS_SECRET", "x")
    handlers, level = logging.root.handlers[:], logging.root.level
    try:
        with pytest.raises(SystemExit) as done:
            fetch_wait_worker.main(["77", "check-config", str(path)])
    finally:  # the CLI configures logging; leave the test session's as it was
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)
    assert done.value.code in (0, None)
    patched = aiokafka.AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", fetch_max_wait_ms=1500)
    untouched = aiokafka.AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1")
    assert patched._fetch_max_wait_ms == 77
    assert untouched._fetch_max_wait_ms == 500  # aiokafka's default: only Faust's is replaced
    await patched.stop()
    await untouched.stop()


def test_latency_over_the_run_windows() -> None:
    points = [(0.2, 1.0), (0.7, 3.0), (1.5, 2.0), (12.0, 0.5), (19.9, 0.7)]
    assert latency._by_second(points) == [
        {"t": 0, "n": 2, "p50": 1.0, "max": 3.0},
        {"t": 1, "n": 1, "p50": 2.0, "max": 2.0},
        {"t": 12, "n": 1, "p50": 0.5, "max": 0.5},
        {"t": 19, "n": 1, "p50": 0.7, "max": 0.7},
    ]
    assert latency._p99_by_window(points, 10.0) == [3.0, 0.7]
    assert latency._p99_by_window([], 10.0) == []
