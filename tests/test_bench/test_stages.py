"""bench.stages: the stage benchmark runs the worker's pure code over the pipeline
benchmark's input and gets the same contacts, holds and rule matches (no broker)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

import bench.__main__ as cli
from bench.generate import GeneratedEvents, build_rules, generate_events, rule_time_unit
from bench.stages import STAGES, StageRun, check_contacts, report, run_stages, stage_settings


@pytest.fixture(scope="module")
def shop() -> GeneratedEvents:
    # More people than identifies: anonymous visitors whose events stay held.
    return generate_events(20_000, 4_000, seed=3, shop=True)


@pytest.fixture(scope="module")
def shop_run(shop: GeneratedEvents) -> StageRun:
    return run_stages(shop.events, stage_settings(build_rules(20, rule_time_unit(shop))))


def test_every_identified_person_becomes_a_contact_with_the_last_identify(
    shop: GeneratedEvents, shop_run: StageRun
) -> None:
    assert shop.expected_emails and shop.anonymous_only > 0
    assert set(shop_run.users) == shop.expected_emails
    assert check_contacts(shop_run, shop) == {"missing": 0, "unexpected": 0, "wrong_fields": 0}
    one = sorted(shop.expected_emails)[0]
    record = orjson.loads(shop_run.users[one])
    assert {k: record["fields_sent"][k] for k in ("1", "2", "31")} == shop.expected_fields[one]


def test_the_stages_hold_release_and_match(shop: GeneratedEvents, shop_run: StageRun) -> None:
    c = shop_run.counts
    # Visitors who never identify keep their events held; anonymous-first people's are
    # released by their identify.
    assert c["held"] > c["released"] > 0
    # Every event reaches contact-events except those still held.
    assert c["contact_events"] == len(shop.events) - (c["held"] - c["released"])
    assert c["operations"] >= len(shop.expected_emails)
    assert c["rule_matches"] > 0 and c["rules_irrelevant"] > 0
    assert all(shop_run.cpu_s[s] > 0 for s in STAGES)


def test_without_rules_the_rules_stage_costs_nothing() -> None:
    gen = generate_events(2_000, 300, seed=2)
    run = run_stages(gen.events, stage_settings([]))
    assert run.cpu_s["rules"] == 0.0 and "rule_matches" not in run.counts
    assert check_contacts(run, gen) == {"missing": 0, "unexpected": 0, "wrong_fields": 0}


def test_a_lost_contact_or_field_is_reported(shop: GeneratedEvents, shop_run: StageRun) -> None:
    broken = StageRun(users=dict(shop_run.users))
    first, second = sorted(shop.expected_emails)[:2]
    del broken.users[first]
    record = orjson.loads(broken.users[second])
    record["fields_sent"]["1"] = "someone else"
    broken.users[second] = orjson.dumps(record)
    broken.users["stranger@example.com"] = orjson.dumps({"fields_sent": {}})
    assert check_contacts(broken, shop) == {"missing": 1, "unexpected": 1, "wrong_fields": 1}


def test_report_takes_the_best_run_of_each_stage() -> None:
    runs = [
        StageRun(cpu_s={"ingest": 2.0, "identity": 1.0, "users": 3.0, "rules": 1.0}),
        StageRun(cpu_s={"ingest": 1.0, "identity": 2.0, "users": 3.0, "rules": 0.5}),
    ]
    meta = {"contacts": 10, "rules": 20, "seed": 1, "code": "abc"}
    ok = {"missing": 0, "unexpected": 0, "wrong_fields": 0}
    text, result = report(runs, 1_000_000, meta, ok)
    assert result["best_cpu_s"] == {"ingest": 1.0, "identity": 1.0, "users": 3.0, "rules": 0.5}
    assert result["best_us_per_event"]["ingest"] == pytest.approx(1.0)
    assert result["all_stages_us_per_event"] == pytest.approx(5.5)
    lines = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  ")}
    assert lines["ingest"][1:] == ["1.00", "1.000"]
    assert lines["all"][2:] == ["5.50", "5.500"]
    assert "7.00, 6.50" in text  # every run's total, as measured


def test_cli_prints_figures_and_writes_json(tmp_path: Path, capsys: Any) -> None:
    rc = cli.main(["stages", "--events", "3000", "--contacts", "400", "--repeat", "2",
                   "--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "run 2/2" in out and "all stages" in out
    assert "contacts missing / unexpected / bad fields" in out
    (path,) = tmp_path.glob("stages-*.json")
    result = json.loads(path.read_text())
    assert result["events"] == 3000 and result["rules"] == 20 and len(result["runs"]) == 2
    assert set(result["best_us_per_event"]) == set(STAGES)
    assert result["contacts_check"] == {"missing": 0, "unexpected": 0, "wrong_fields": 0}


def test_cli_refuses_bad_numbers(tmp_path: Path, capsys: Any) -> None:
    rc = cli.main(["stages", "--repeat", "0", "--results-dir", str(tmp_path)])
    assert rc == 2
    assert "--repeat" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())
