"""Pure parts of `emarsys-stream replay` (app.replay): --to, the plan, the broker's answers."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from app.replay import (
    GroupDescription,
    GroupMember,
    PartitionPlan,
    ReplayError,
    ReplayTarget,
    TimeLookupError,
    compute_plan,
    format_members,
    format_plan,
    format_time_ms,
    kafka_client_options,
    parse_group_description,
    parse_partitions,
    parse_target,
    validate_time_answer,
    verify_time_offset,
)
from app.settings import settings_from_mapping

T = 1_795_000_000_000  # a request time (ms)


# ----------------------------------------------------------------------------- --to


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("earliest", ReplayTarget("earliest")),
        ("LATEST", ReplayTarget("latest")),
        (" latest ", ReplayTarget("latest")),
        ("0", ReplayTarget("offset", offset=0)),
        ("1200", ReplayTarget("offset", offset=1200)),
        ("2026-11-28T09:00:00Z", ReplayTarget("time", time_ms=1795856400000)),
        ("2026-11-28T10:00:00+01:00", ReplayTarget("time", time_ms=1795856400000)),
        ("2026-11-28T09:00:00.250Z", ReplayTarget("time", time_ms=1795856400250)),
        ("2026-11-28 09:00:00+00:00", ReplayTarget("time", time_ms=1795856400000)),
    ],
)
def test_parse_target_accepts(text: str, expected: ReplayTarget) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-5", "must be >= 0"),
        ("yesterday", "expected earliest, latest, an offset"),
        ("", "expected earliest, latest, an offset"),
        ("12abc", "expected earliest, latest, an offset"),
        ("2026-11-28T09:00:00", "has no zone"),
        ("2026-11-28", "has no zone"),
    ],
)
def test_parse_target_refuses_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_target(text)


def test_target_description_and_time_format() -> None:
    assert ReplayTarget("earliest").describe() == "earliest"
    assert ReplayTarget("offset", offset=7).describe() == "offset 7"
    assert parse_target("2026-11-28T09:00:00.005Z").describe() == "time 2026-11-28T09:00:00.005Z"
    assert format_time_ms(1795856400250) == "2026-11-28T09:00:00.250Z"


@pytest.mark.parametrize(
    ("text", "expected"),
    [(None, None), ("", None), ("  ", None), ("0,2,5", [0, 2, 5]), (" 5, 0,5 ", [0, 5])],
)
def test_parse_partitions(text: str | None, expected: list[int] | None) -> None:
    assert parse_partitions(text) == expected


@pytest.mark.parametrize("text", ["a", "0,,1", "-1", "1;2", "0,x"])
def test_parse_partitions_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="comma-separated partition numbers"):
        parse_partitions(text)


# ----------------------------------------------------------------------------- the plan

BEGIN = {0: 0, 1: 10, 2: 0}
END = {0: 100, 1: 50, 2: 0}
COMMITTED: dict[int, int | None] = {0: 80, 1: 50, 2: None}


def targets(rows: list[PartitionPlan]) -> dict[int, int]:
    return {r.partition: r.target for r in rows}


def test_plan_to_earliest_rereads_what_was_processed() -> None:
    rows = compute_plan([2, 0, 1], COMMITTED, BEGIN, END, parse_target("earliest"))
    assert [r.partition for r in rows] == [0, 1, 2]
    assert targets(rows) == {0: 0, 1: 10, 2: 0}
    assert [(r.rereads, r.skipped) for r in rows] == [(80, 0), (40, 0), (0, 0)]
    assert [r.changes for r in rows] == [True, True, True]  # None -> 0 is a commit too


def test_plan_to_latest_skips_the_lag() -> None:
    rows = compute_plan([0, 1, 2], COMMITTED, BEGIN, END, parse_target("latest"))
    assert targets(rows) == {0: 100, 1: 50, 2: 0}
    assert [(r.rereads, r.skipped) for r in rows] == [(0, 20), (0, 0), (0, 0)]
    assert [r.changes for r in rows] == [True, False, True]


def test_plan_to_an_offset_is_clamped_to_each_partition() -> None:
    rows = compute_plan([0, 1, 2], COMMITTED, BEGIN, END, parse_target("60"))
    assert targets(rows) == {0: 60, 1: 50, 2: 0}
    assert [r.clamped for r in rows] == [False, True, True]
    assert rows[0].rereads == 20
    rows = compute_plan([1], COMMITTED, BEGIN, END, parse_target("3"))
    assert targets(rows) == {1: 10} and rows[0].clamped and rows[0].rereads == 40


def test_plan_to_a_time_uses_the_checked_answer() -> None:
    target = ReplayTarget("time", time_ms=T)
    rows = compute_plan([0, 1], COMMITTED, BEGIN, END, target, {0: 30, 1: None})
    assert targets(rows) == {0: 30, 1: 50}  # None: no record that recent -> the end
    assert rows[0].rereads == 50 and rows[1].rereads == 0
    with pytest.raises(ValueError, match="partition 1"):
        compute_plan([0, 1], COMMITTED, BEGIN, END, target, {0: 30})


def test_position_of_a_partition_without_commit_or_behind_retention() -> None:
    no_commit = PartitionPlan(0, None, beginning=5, end=9, target=9)
    assert no_commit.position == 5 and no_commit.rereads == 0 and no_commit.skipped == 4
    expired = PartitionPlan(0, 2, beginning=5, end=9, target=5)
    assert expired.position == 5 and expired.rereads == 0 and expired.skipped == 0


def test_format_plan_is_a_table_with_totals() -> None:
    rows = compute_plan([0, 1, 2], COMMITTED, BEGIN, END, parse_target("60"))
    text = format_plan(rows, topic="segment.events", group="emarsys-stream",
                       target=parse_target("60"))
    lines = text.splitlines()
    assert lines[0] == (
        "Replay of topic 'segment.events' for consumer group 'emarsys-stream' to offset 60:"
    )
    assert lines[1].split() == ["partition", "committed", "target", "end", "re-read", "skipped"]
    assert lines[2].split() == ["0", "80", "60", "100", "20", "0"]
    assert lines[3].split() == ["1", "50", "50*", "50", "0", "0"]
    assert lines[4].split() == ["2", "-", "0*", "0", "0", "0"]
    assert lines[5].split() == ["total", "20", "0"]
    assert "clamped" in text
    # Columns line up.
    assert len({len(line) for line in lines[1:6]}) == 1


# ----------------------------------------------------------------------------- --to TIME


def test_time_answer_of_a_correct_broker_is_accepted() -> None:
    answer = validate_time_answer(T, {0: (12, T), 1: (40, T + 5_000), 2: None})
    assert answer == {0: 12, 1: 40, 2: None}


@pytest.mark.parametrize(
    "answer",
    [
        (0, -1),  # what the embedded broker answers for a time after its last record
        (3, T - 1),  # a record older than the requested time
        (-1, T),
    ],
)
def test_time_answer_a_correct_broker_never_gives_is_refused(answer: tuple[int, int]) -> None:
    with pytest.raises(TimeLookupError) as info:
        validate_time_answer(T, {0: (5, T), 1: answer})
    message = str(info.value)
    assert f"partition 1: offset {answer[0]} with timestamp {answer[1]}" in message
    assert "partition 0" not in message
    assert "embedded broker" in message and "Nothing was changed" in message
    assert format_time_ms(T) in message


def test_time_answer_checked_against_the_records() -> None:
    verify_time_offset(T, 0, 5, [(4, T - 1), (5, T), (6, T - 10)])
    verify_time_offset(T, 0, 0, [(0, T + 1), (1, T + 2)])  # the first record: no previous


@pytest.mark.parametrize(
    ("records", "reason"),
    [
        ([(4, T - 1), (5, T - 1)], "the record at offset 5 is older"),
        ([(4, T), (5, T + 1)], "the record before it, at offset 4"),
        ([(4, T - 1)], "no record at offset 5"),
        ([], "no record at offset 5"),
    ],
)
def test_time_answer_contradicting_the_records_is_refused(
    records: list[tuple[int, int]], reason: str
) -> None:
    with pytest.raises(TimeLookupError, match=reason):
        verify_time_offset(T, 3, 5, records)


# ----------------------------------------------------------------------------- the group


def describe_response(*groups: tuple[Any, ...]) -> Any:
    return SimpleNamespace(throttle_time_ms=0, groups=list(groups))


def test_group_description_with_members_is_active() -> None:
    members = [("faust-1", "faust-0.15.3", "/10.0.0.7", b"", b""), ("faust-2", "", "", b"", b"")]
    desc = parse_group_description(
        "g", describe_response((0, "other", "Empty", "", "", []),
                               (0, "g", "Stable", "consumer", "faust", members))
    )
    assert desc.active and desc.state == "Stable"
    assert desc.members[0] == GroupMember("faust-1", "faust-0.15.3", "/10.0.0.7")
    text = format_members(desc, 30.0)
    assert text.startswith("refused: consumer group 'g' has 2 active member(s) (state Stable)")
    assert "  - faust-1 (faust-0.15.3 /10.0.0.7)" in text and "  - faust-2\n" in text
    assert "worker.session_timeout, 30s" in text and "Nothing was changed" in text


def test_empty_group_is_not_active() -> None:
    desc = parse_group_description("g", describe_response((0, "g", "Empty", "", "", [])))
    assert desc == GroupDescription("g", "Empty", 0, [])
    assert not desc.active


def test_answer_without_the_group_is_an_error() -> None:
    with pytest.raises(ReplayError, match="does not mention the group"):
        parse_group_description("g", describe_response((-1, None, "", "g", "Empty", [])))


# ----------------------------------------------------------------------------- Kafka options


def settings(**kafka: Any) -> Any:
    return settings_from_mapping(
        {
            "kafka": kafka,
            "emarsys": {"auth": {"type": "wsse", "username": "u", "secret": "s"}},
            "identity": {"primary_key": {"paths": ["traits.email"]}},
        }
    )


def test_client_options_from_the_kafka_section() -> None:
    assert kafka_client_options(settings(bootstrap_servers="a:9092, b:9092")) == {
        "bootstrap_servers": ["a:9092", "b:9092"],
        "security_protocol": "PLAINTEXT",
    }
    opts = kafka_client_options(
        settings(bootstrap_servers="a:9093", security_protocol="SASL_SSL",
                 sasl_mechanism="SCRAM-SHA-512", sasl_username="svc", sasl_password="pw")
    )
    assert opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (opts["sasl_plain_username"], opts["sasl_plain_password"]) == ("svc", "pw")
    assert opts["ssl_context"] is not None


def test_client_options_need_servers() -> None:
    with pytest.raises(ReplayError, match="bootstrap_servers"):
        kafka_client_options(settings())
