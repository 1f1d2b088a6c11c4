"""bench.pipeline / bench.__main__: config, rules profile figures and output (no worker runs)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import bench.__main__ as cli
from app.broker import EMBEDDED_FETCH_MAX_WAIT_MS
from app.settings import load_settings
from bench.generate import build_rules
from bench.pipeline import (
    APP_ID,
    INGEST_TOPIC,
    NAIVE_APP_ID,
    RESULTS_DIR,
    SECRET_ENV,
    TOPIC_PREFIX,
    BenchError,
    PipelineOptions,
    _comparison,
    _drained,
    _helper_cpu,
    _Processes,
    _ratio,
    _secondary_ratios_to_naive,
    _size_stats,
    _variants,
    format_table,
    naive_settings,
    read_topic,
    worker_config,
)


def _config(tmp_path: Path, **kwargs: Any) -> dict[str, Any]:
    return worker_config(
        PipelineOptions(**kwargs.pop("opts", {})),
        "127.0.0.1:9092",
        "http://127.0.0.1:1/api/v2/",
        8123,
        tmp_path / "data",
        **kwargs,
    )


def _validate(tmp_path: Path, cfg: dict[str, Any]) -> Any:
    path = tmp_path / "worker.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return load_settings(path, env={SECRET_ENV: "x"})


def test_worker_config_without_rules_is_unchanged(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    assert "rules" not in cfg and "rule_engine" not in cfg
    assert cfg["kafka"]["app_id"] == APP_ID
    assert cfg["kafka"]["topic_prefix"] == TOPIC_PREFIX
    _validate(tmp_path, cfg)


def test_worker_config_with_rules_is_a_valid_config(tmp_path: Path) -> None:
    rules = build_rules(20, 121)
    cfg = _config(
        tmp_path,
        app_id="emarsys-bench-rules",
        topic_prefix="bench-rules",
        rules=rules,
        opts={"overrides": {"rule_engine.max_partial_matches": 50}},
    )
    assert cfg["rules"] == rules
    assert cfg["rule_engine"] == {
        "allowed_lateness": "5m",
        "idle_timeout": "5s",
        "max_partial_matches": 50,
    }
    assert cfg["kafka"]["app_id"] == "emarsys-bench-rules"
    settings = _validate(tmp_path, cfg)
    assert len(settings.rules) == 20
    assert settings.topic("rule-matches") == "bench-rules.rule-matches"


def test_size_stats() -> None:
    assert _size_stats([])["count"] == 0
    stats = _size_stats(list(range(1, 201)))
    assert stats == {
        "count": 200,
        "total": 20100,
        "mean": 100.5,
        "p50": 100,
        "p99": 198,
        "max": 200,
    }


def _run(label: str, app_id: str, *, rules: bool, eps: int) -> dict[str, Any]:
    run: dict[str, Any] = {
        "label": label,
        "app_id": app_id,
        "topic_prefix": app_id,
        "rules_count": 20 if rules else 0,
        "worker": {
            "startup_seconds": 17.0,
            "peak_rss_mb": [150.0],
            "cpu_seconds_total": [30.0],
            "cpu_seconds_after_ready": [14.9],
            "cpu_seconds_ready_to_all_contacts": [12.1],
            "helper_cpu_seconds_after_ready": {"broker": 6.4, "simulator": 0.8, "bench": 2.5},
            "gc_seconds": 0.42,
            "metrics": {},
        },
        "pipeline": {
            "seconds_to_all_contacts": 20_000 / eps,
            "events_per_s": eps,
            "events_per_s_from_spawn": eps // 2,
            "seconds_to_ingest_committed": 8.0,
            "seconds_to_users_caught_up": 20.0,
            "seconds_to_all_topics_drained": 20.3,
            "seconds_to_first_upsert": 4.0,
            "ratio_to_baseline": round(eps / 300_000, 4),
            "progress": [],
            "agent_topic_offsets": {},
        },
        "emarsys": {
            "expected_contacts": 2000,
            "contacts_in_simulator": 2000,
            "missing_contacts": 0,
            "unexpected_contacts": 0,
            "contacts_with_wrong_fields": 3,
            "wrong_field_examples": [],
            "upsert_calls": 6,
            "upsert_calls_ok": 6,
            "upsert_calls_minimum": 2,
            "contacts_sent": 2100,
            "contacts_per_call": 350.0,
            "api_calls_total": 6,
            "simulator_counters": {},
        },
    }
    if rules:
        run["rules"] = {
            "rules": 20,
            "rule_engine": {"allowed_lateness": "5m", "idle_timeout": "5s"},
            "settle_seconds": 5.0,
            "read_seconds_after_ready": 25.3,
            "matches": 39,
            "matches_distinct_trigger_ids": 39,
            "matches_by_rule": {"cart_abandonment_shoes": 30, "repeat_viewer_shoes": 9},
            "triggers_in_simulator": 38,
            "trigger_deliveries": 38,
            "triggers_of_read_matches_missing": 1,
            "triggers_not_in_read_matches": 0,
            "triggers_when_all_contacts_arrived": 11,
            "trigger_calls": 18,
            "trigger_calls_ok": 18,
            "state_changelog_records": 19_363,
            "state_bytes_per_contact": _size_stats([400, 800, 7021]),
            "engine_stats": {"expired_partials": 400, "late": 4468},
            "late_events": 4468,
            "contact_events_decodes": {"decoded": 120, "shared": 110, "dropped": 2},
        }
        run["pipeline"]["drained_how"] = "end"
    return run


def _result(*runs: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {
        "options": {"partitions": 4, "workers": 1, "store": "rocksdb://"},
        "generated": {
            "events": 20_000,
            "by_type": {"track": 12_000, "page": 5_000, "identify": 3_000},
            "mean_event_bytes": 404.0,
            "people": 2000,
            "identified_contacts": 2000,
            "anonymous_first": 200,
            "anonymous_only_visitors": 0,
            "event_time_span_s": 1210.0,
            "rule_time_unit_s": 121,
        },
        "produce": {"events_per_s": 80_000},
        "baseline": {"events_per_s": 300_000},
        "machine": {"nproc": 2, "implementation": "CPython", "python": "3.11"},
        "code": {"commit": "0123456789abcdef", "uncommitted": []},
    }
    last = runs[-1]
    for key in ("worker", "pipeline", "emarsys", "rules"):
        if key in last:
            result[key] = last[key]
    if len(runs) == 2:
        result["runs"] = list(runs)
        result["comparison"] = _comparison(runs[0], runs[1])
    return result


def test_table_without_rules_has_no_rule_rows() -> None:
    text = format_table(_result(_run("", APP_ID, rules=False, eps=1500)))
    assert "pipeline, events/s (end to end)" in text
    assert "rule matches" not in text
    assert "same input" not in text


def test_table_shows_what_else_used_the_cpu() -> None:
    text = format_table(_result(_run("", APP_ID, rules=False, eps=1500)))
    row = next(line for line in text.splitlines() if line.startswith("broker / simulator"))
    assert row.endswith("6.40 / 0.80 / 2.50")
    gc_row = next(line for line in text.splitlines() if "of which cyclic GC" in line)
    assert gc_row.endswith("0.42")


def test_helper_cpu_counts_the_broker_simulator_and_this_process() -> None:
    procs = _Processes()
    procs.spawn(
        "simulator",
        [sys.executable, "-c", "import time\nt = time.process_time()\n"
         "while time.process_time() - t < 0.3: pass\ntime.sleep(30)"],
        Path(os.devnull),
    )
    try:
        deadline = time.monotonic() + 20
        cpu = _helper_cpu(procs)
        while (cpu.get("simulator") or 0.0) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
            cpu = _helper_cpu(procs)
    finally:
        procs.stop_all()
    assert "broker" not in cpu  # none started
    assert (cpu["simulator"] or 0.0) >= 0.3
    assert cpu["bench"] is not None and cpu["bench"] > 0


def test_table_with_rules_shows_matches_triggers_and_state() -> None:
    text = format_table(_result(_run("", APP_ID, rules=True, eps=1300)))

    def row(start: str) -> str:
        return next(line for line in text.splitlines() if line.startswith(start))

    assert "20 / 121 s of 1,210 s event time / allowed_lateness 5m" in row("rules / time unit")
    assert row("rule matches").endswith("39 (39 distinct trigger ids, 2 rules)")
    assert row("triggers in simulator").endswith("38 (deliveries 38; 11 when all contacts were in)")
    assert row("  trigger calls").endswith("18 (18) / 1")
    assert row("rule state: contacts").endswith("3 / 19,363")
    assert row("rule state B/contact").endswith("2,740 / 7,021 / 7,021")
    assert row("rule engine:").endswith("400 / 0 / 0 / 4,468")
    assert row("contact-events messages").endswith("120 / 110 / 2")
    assert row("ready -> every agent topic drained").endswith("20.30 s (committed = end)")


def test_drained_at_the_end_or_with_rules_at_the_end_some_seconds_earlier() -> None:
    topics = ["a", "b"]
    committed = {"a": {0: 10, 1: 5}, "b": {0: 7}}
    at_end = {"a": {0: 10, 1: 5}, "b": {0: 7}}
    moved_on = {"a": {0: 12, 1: 5}, "b": {0: 7}}  # timers kept writing to a
    assert _drained(committed, at_end, {}, topics, 0.0) == "end"
    assert _drained(committed, at_end, moved_on, topics, 4.0) == "end"
    assert _drained(committed, moved_on, at_end, topics, 0.0) is None
    assert _drained(committed, moved_on, at_end, topics, 4.0) == "end 4s earlier"
    # Not even the older ends reached, or nothing read yet: not drained.
    assert _drained(committed, moved_on, moved_on, topics, 4.0) is None
    assert _drained(committed, {}, {}, topics, 4.0) is None
    assert _drained({"a": {0: 10, 1: 5}}, at_end, at_end, topics, 4.0) is None


def test_table_compare_rules_puts_both_runs_side_by_side() -> None:
    a = _run("without rules", "emarsys-bench-norules", rules=False, eps=1500)
    b = _run("with rules", "emarsys-bench-rules", rules=True, eps=1200)
    result = _result(a, b)
    assert result["comparison"]["events_per_s_ratio_with_to_without"] == 0.8
    text = format_table(result)
    row = next(
        line for line in text.splitlines() if "events/s (end to end)" in line and "  " in line[:3]
    )
    assert "1,500" in row and "1,200" in row
    assert "0.800 (-20.0%)" in text
    assert "emarsys-bench-norules" in text and "emarsys-bench-rules" in text
    assert "39 / 38" in text


def _parse(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> PipelineOptions | int:
    seen: list[PipelineOptions] = []

    def fake_run(opts: PipelineOptions) -> int:
        seen.append(opts)
        return 0

    monkeypatch.setattr(cli, "run_pipeline", fake_run)
    code = cli.main(argv)
    return seen[0] if seen else code


def test_cli_rules_options(monkeypatch: pytest.MonkeyPatch) -> None:
    opts = _parse(["pipeline", "--quick"], monkeypatch)
    assert isinstance(opts, PipelineOptions)
    assert (opts.rules, opts.compare_rules, opts.results_dir) == (0, False, RESULTS_DIR)
    opts = _parse(["pipeline", "--quick", "--rules", "20", "--rules-settle", "2"], monkeypatch)
    assert isinstance(opts, PipelineOptions)
    assert (opts.rules, opts.compare_rules, opts.rules_settle) == (20, False, 2.0)
    opts = _parse(["pipeline", "--quick", "--compare-rules"], monkeypatch)
    assert isinstance(opts, PipelineOptions)
    assert (opts.rules, opts.compare_rules) == (20, True)
    opts = _parse(["pipeline", "--compare-rules", "--rules", "5"], monkeypatch)
    assert isinstance(opts, PipelineOptions)
    assert opts.rules == 5
    assert _parse(["pipeline", "--rules", "81"], monkeypatch) == 2


async def test_read_topic_reads_everything_and_tolerates_missing_topics(
    kafka_broker: Any,
) -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    bootstrap = kafka_broker.bootstrap_servers
    topic = "bench-test.read-topic"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 3, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for i in range(30):
            await producer.send_and_wait(topic, f"v{i}".encode(), key=f"k{i % 7}".encode())
        await producer.send_and_wait(topic, None, key=b"k0")
    finally:
        await producer.stop()
    records = await read_topic(bootstrap, topic, quiet=1.0, limit=30)
    assert len(records) == 31
    assert (b"k0", None) in records
    assert await read_topic(bootstrap, "bench-test.no-such-topic", quiet=0.5, limit=5) == []


# ------------------------------------------------------------------ naive Faust reference


def test_naive_settings_are_tuned_and_follow_the_worker_settings(tmp_path: Path) -> None:
    s = naive_settings(PipelineOptions(partitions=3), "127.0.0.1:9092", 8124, tmp_path, 20_000)
    assert (s.app_id, s.topic, s.partitions, s.expected) == (NAIVE_APP_ID, INGEST_TOPIC, 3, 20_000)
    assert s.app_id != APP_ID  # its own consumer group
    assert s.store == "rocksdb://"
    # tuned as in broker-and-baselines.md
    assert (s.take_max, s.take_within) == (2000, 0.05)
    assert (s.max_poll_records, s.stream_buffer_maxsize) == (10_000, 65_536)
    # every other setting as the worker has it
    assert (s.session_timeout, s.commit_interval, s.producer_linger_ms) == (30.0, 2.8, 5)
    assert Path(s.data_dir).parent == tmp_path
    opts = PipelineOptions(
        store="memory://",
        overrides={"worker.session_timeout": "6s", "worker.batch_max": 500},
    )
    s = naive_settings(opts, "127.0.0.1:9092", 8124, tmp_path, 10)
    assert (s.store, s.session_timeout, s.take_max) == ("memory://", 6.0, 500)


def test_worker_and_naive_app_wait_for_fetches_as_run_does_on_the_embedded_broker(
    tmp_path: Path,
) -> None:
    assert _config(tmp_path)["worker"]["fetch_max_wait_ms"] == EMBEDDED_FETCH_MAX_WAIT_MS == 50
    assert naive_settings(PipelineOptions(), "h:1", 1, tmp_path, 1).fetch_max_wait_ms == 50
    opts = PipelineOptions(overrides={"worker.fetch_max_wait_ms": 500})
    assert _config(tmp_path, opts={"overrides": opts.overrides})["worker"] == {
        "fetch_max_wait_ms": 500
    }
    assert naive_settings(opts, "h:1", 1, tmp_path, 1).fetch_max_wait_ms == 500


def test_variants_of_a_run() -> None:
    single = _variants(PipelineOptions(workers=2), [])
    assert [(v.label, v.app_id, v.workers) for v in single] == [("", APP_ID, 2)]
    pair = _variants(PipelineOptions(compare_workers=True), [])
    assert [(v.label, v.workers) for v in pair] == [("1 worker", 1), ("2 workers", 2)]
    assert len({v.app_id for v in pair}) == 2 and len({v.topic_prefix for v in pair}) == 2
    assert APP_ID not in {v.app_id for v in pair} and NAIVE_APP_ID not in {v.app_id for v in pair}
    assert [v.workers for v in _variants(PipelineOptions(compare_workers=True, workers=3), [])] == [
        1,
        3,
    ]
    rules = build_rules(2, 121)
    by_rules = _variants(PipelineOptions(compare_rules=True, rules=2), rules)
    assert [(v.label, len(v.rules)) for v in by_rules] == [("without rules", 0), ("with rules", 2)]
    with pytest.raises(BenchError):
        _variants(PipelineOptions(compare_rules=True, compare_workers=True, rules=2), rules)


def _naive(eps: int = 3000) -> dict[str, Any]:
    return {
        "app_id": NAIVE_APP_ID,
        "repartition_topic": f"{NAIVE_APP_ID}-by-key",
        "settings": {
            "store": "rocksdb://",
            "take_max": 2000,
            "take_within": 0.05,
            "max_poll_records": 10_000,
            "stream_buffer_maxsize": 65_536,
        },
        "startup_seconds": 17.5,
        "seconds_to_all_processed": 20_000 / eps,
        "events_per_s": eps,
        "events_per_s_from_spawn": 800,
        "ratio_to_baseline": round(eps / 300_000, 4),
        "seconds_to_first_event": 0.02,
        "seconds_to_ingest_committed": 4.1,
        "seconds_to_repartition_committed": 8.2,
        "rekeyed": 20_000,
        "processed": 20_000,
        "table_keys": 4191,
        "expected_table_keys": 4191,
        "peak_rss_mb": 95.0,
        "cpu_seconds_ready_to_all_processed": 6.5,
        "cpu_seconds_after_ready": 6.6,
        "progress": [],
    }


def _row(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def test_table_shows_the_naive_reference_and_the_ratio_to_it() -> None:
    run = _run("", APP_ID, rules=False, eps=10_500)
    run["pipeline"]["ratio_to_naive"] = _ratio(10_500, 3000)
    result = _result(run)
    result["options"]["naive"] = True
    result["naive"] = _naive(3000)
    text = format_table(result)
    assert _row(text, "naive two-hop Faust, events/s").endswith(" 3,000")
    assert _row(text, "ratio pipeline / naive Faust").endswith("3.50x (target >= 3.5x: met)")
    assert _row(text, "  table keys / expected").endswith("4,191 / 4,191")
    assert _row(text, "  ready -> ingest / repartition committed").endswith("4.10 s / 8.20 s")
    assert _row(text, "  take / max_poll").endswith("2000 within 0.05 s / 10,000 / 65,536")

    run["pipeline"]["ratio_to_naive"] = _ratio(1500, 3000)
    assert _row(format_table(result), "ratio pipeline / naive").endswith(
        "0.50x (target >= 3.5x: not met)"
    )


def test_secondary_ratios_to_naive_count_all_the_work_of_every_event() -> None:
    run = _run("", APP_ID, rules=False, eps=1500)
    naive = _naive(3000)  # repartition committed 8.2 s after ready; 6.6 CPU s to its end
    run["pipeline"]["seconds_to_all_topics_drained"] = 16.4
    run["worker"]["cpu_seconds_ready_to_all_contacts"] = [1.0]  # not this one: not all work
    run["worker"]["cpu_seconds_after_ready"] = [13.2]
    assert _secondary_ratios_to_naive(run, naive) == {
        "drained_ratio_to_naive": 0.5,
        "cpu_ratio_to_naive": 0.5,
    }
    run["worker"]["cpu_seconds_after_ready"] = [2.0, 1.3]  # two workers: the sum
    assert _secondary_ratios_to_naive(run, naive)["cpu_ratio_to_naive"] == 2.0
    run["worker"]["cpu_seconds_after_ready"] = [2.0, None]
    run["pipeline"]["seconds_to_all_topics_drained"] = None  # never drained
    assert _secondary_ratios_to_naive(run, naive) == {
        "drained_ratio_to_naive": None,
        "cpu_ratio_to_naive": None,
    }
    none = {"drained_ratio_to_naive": None, "cpu_ratio_to_naive": None}
    assert _secondary_ratios_to_naive(run, None) == none
    assert _secondary_ratios_to_naive(run, {"error": "x"}) == none
    run["worker"]["cpu_seconds_after_ready"] = [3.3]
    run["pipeline"]["seconds_to_all_topics_drained"] = 4.1
    run["pipeline"].update(_secondary_ratios_to_naive(run, naive))
    result = _result(run)
    result["naive"] = naive
    text = format_table(result)
    assert _row(text, "  by time until all work is committed").endswith("2.00x")
    assert _row(text, "  by events per CPU second").endswith("2.00x")


def test_table_without_or_with_a_failed_naive_reference() -> None:
    result = _result(_run("", APP_ID, rules=False, eps=1500))
    result["options"]["naive"] = False
    text = format_table(result)
    assert _row(text, "naive two-hop Faust").endswith("skipped (--no-naive)")
    assert "ratio pipeline / naive" not in text
    result["options"]["naive"] = True
    result["naive"] = {"app_id": NAIVE_APP_ID, "error": "naive app: no progress for 120s"}
    text = format_table(result)
    assert _row(text, "naive two-hop Faust").endswith("FAILED: naive app: no progress for 120s")
    assert "  table keys" not in text


def test_two_workers_against_the_naive_app_show_no_target() -> None:
    run = _run("", APP_ID, rules=False, eps=4000)
    run["worker"]["count"] = 2
    run["pipeline"]["ratio_to_naive"] = _ratio(4000, 1000)
    result = _result(run)
    result["naive"] = _naive(1000)
    row = _row(format_table(result), "ratio pipeline / naive Faust")
    assert "(2 workers : 1)" in row and row.endswith("4.00x")


def test_compare_workers_prints_both_rates_and_their_ratio() -> None:
    a = _run("1 worker", "emarsys-bench-1w", rules=False, eps=1500)
    b = _run("2 workers", "emarsys-bench-2w", rules=False, eps=2550)
    a["workers"], b["workers"] = 1, 2
    a["pipeline"]["ratio_to_naive"] = _ratio(1500, 3000)
    b["pipeline"]["ratio_to_naive"] = _ratio(2550, 3000)
    result = _result(a, b)
    result["comparison"] = _comparison(a, b, kind="workers")
    result["options"]["compare_workers"] = True
    assert result["comparison"]["events_per_s"] == [1500, 2550]
    assert result["comparison"]["events_per_s_ratio_workers"] == 1.7
    assert result["comparison"]["target_ratio_workers"] == 1.6
    text = format_table(result)
    assert "figures of the run 2 workers" in text
    assert _row(text, "partitions / workers / store").endswith("4 / 1, then 2 / rocksdb://")
    assert _row(text, "  events/s 2 workers / 1 worker").endswith("1.70x (target >= 1.6x: met)")
    naive_row = _row(text, "  ratio pipeline / naive Faust")
    assert naive_row.split()[-2:] == ["0.50x", "0.85x"]
    assert "rule matches" not in text and "with rules / without" not in text


def test_compare_workers_with_a_failed_second_run_keeps_the_first() -> None:
    a = _run("1 worker", "emarsys-bench-1w", rules=False, eps=1500)
    a["workers"] = 1
    b = {"label": "2 workers", "app_id": "emarsys-bench-2w", "workers": 2, "error": "STUCK"}
    comparison = _comparison(a, b, kind="workers")
    assert comparison["failed"] == ["2 workers"]
    assert comparison["events_per_s"] == [1500, None]
    assert comparison["events_per_s_ratio_workers"] is None
    result = _result(a)
    result["runs"], result["comparison"] = [a, b], comparison
    result["options"]["compare_workers"] = True
    text = format_table(result)
    assert "figures of the run 1 worker" in text
    assert "1,500" in _row(text, "  pipeline, events/s") and "failed" in _row(
        text, "  pipeline, events/s"
    )
    assert _row(text, "  events/s 2 workers / 1 worker").endswith("n/a")
    assert _row(text, "  2 workers: FAILED").endswith("STUCK")


def test_cli_naive_and_compare_workers_options(monkeypatch: pytest.MonkeyPatch) -> None:
    opts = _parse(["pipeline", "--quick"], monkeypatch)
    assert isinstance(opts, PipelineOptions)
    assert (opts.naive, opts.compare_workers) == (True, False)  # on by default, --quick too
    opts = _parse(["pipeline", "--quick", "--no-naive", "--compare-workers"], monkeypatch)
    assert isinstance(opts, PipelineOptions)
    assert (opts.naive, opts.compare_workers, opts.compare_worker_counts) == (False, True, (1, 2))
    opts = _parse(["pipeline", "--compare-workers", "--workers", "4"], monkeypatch)
    assert isinstance(opts, PipelineOptions)
    assert opts.compare_worker_counts == (1, 4)
    assert _parse(["pipeline", "--compare-workers", "--compare-rules"], monkeypatch) == 2
