"""bench.pipeline / bench.__main__: config, rules profile figures and output (no worker runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

import bench.__main__ as cli
from app.settings import load_settings
from bench.generate import build_rules
from bench.pipeline import (
    APP_ID,
    RESULTS_DIR,
    SECRET_ENV,
    TOPIC_PREFIX,
    PipelineOptions,
    _comparison,
    _size_stats,
    format_table,
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
        }
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
