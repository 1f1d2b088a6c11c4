from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from app.data_map import (
    TRANSFORMS,
    DataMap,
    FieldMapping,
    normalize_primary_key,
    resolve_primary_key,
)
from app.paths import MISSING, compile_path

IDENTIFY: dict[str, Any] = {
    "type": "identify",
    "userId": "u1",
    "traits": {
        "email": "  Ann@Example.COM ",
        "firstName": "Ann",
        "lastName": "",
        "phone": None,
        "city": "   ",
        "age": "42",
        "birthday": "1990-05-01T00:00:00+02:00",
        "optin": "yes",
        "address": {"city": "Berlin", "zip": "10115"},
        "tags": ["a", "b"],
    },
    "context": {"traits": {"email": "ctx@example.com", "lastName": "Smith"}},
}


def fields(mappings: list[FieldMapping], event: dict[str, Any]) -> dict[str, Any]:
    return DataMap(mappings).fields_for(event)


# -- basic mapping and fallbacks ------------------------------------------------------------


def test_simple_mapping_uses_field_id_string() -> None:
    assert fields([FieldMapping(("traits.firstName",), 1)], IDENTIFY) == {"1": "Ann"}


def test_fallback_paths_in_order() -> None:
    m = FieldMapping(("traits.lastName", "context.traits.lastName"), 2)
    # traits.lastName is "" -> falls back to context.traits.lastName
    assert fields([m], IDENTIFY) == {"2": "Smith"}
    m = FieldMapping(("context.traits.email", "traits.email"), 3)
    assert fields([m], IDENTIFY) == {"3": "ctx@example.com"}


def test_missing_paths_are_skipped() -> None:
    mappings = [
        FieldMapping(("traits.nope", "properties.nope"), 11),
        FieldMapping(("traits.firstName",), 1),
    ]
    assert fields(mappings, IDENTIFY) == {"1": "Ann"}
    assert fields(mappings, {}) == {}


@pytest.mark.parametrize("path", ["traits.lastName", "traits.phone", "traits.city", "traits.nope"])
def test_empty_values_never_overwrite(path: str) -> None:
    assert fields([FieldMapping((path,), 2)], IDENTIFY) == {}
    assert fields([FieldMapping((path,), 2, "string")], IDENTIFY) == {}
    assert fields([FieldMapping((path,), 2, "trim")], IDENTIFY) == {}


@pytest.mark.parametrize("path", ["traits.lastName", "traits.phone", "traits.city"])
def test_allow_empty_sends_empty_string(path: str) -> None:
    assert fields([FieldMapping((path,), 2, allow_empty=True)], IDENTIFY) == {"2": ""}
    # Even through a transform that could not convert "" (optin: empty = unknown).
    assert fields([FieldMapping((path,), 31, "optin", allow_empty=True)], IDENTIFY) == {"31": ""}


def test_allow_empty_still_skips_absent_and_prefers_real_values() -> None:
    assert fields([FieldMapping(("traits.nope",), 2, allow_empty=True)], IDENTIFY) == {}
    m = FieldMapping(("traits.lastName", "context.traits.lastName"), 2, allow_empty=True)
    assert fields([m], IDENTIFY) == {"2": "Smith"}
    m = FieldMapping(("traits.nope", "traits.lastName"), 2, allow_empty=True)
    assert fields([m], IDENTIFY) == {"2": ""}


def test_no_transform_passes_scalars_and_rejects_containers() -> None:
    event = {"p": {"s": "x", "i": 3, "f": 1.5, "b": False, "zero": 0, "o": {"a": 1}, "l": [1]}}
    dm = DataMap(
        [
            FieldMapping(("p.s",), 1),
            FieldMapping(("p.i",), 2),
            FieldMapping(("p.f",), 3),
            FieldMapping(("p.b",), 4),
            FieldMapping(("p.zero",), 5),
            FieldMapping(("p.o",), 6),
            FieldMapping(("p.l",), 7),
        ]
    )
    out, problems = dm.fields_and_problems(event)
    assert out == {"1": "x", "2": 3, "3": 1.5, "4": False, "5": 0}
    assert len(problems) == 2
    assert "field 6 from p.o" in problems[0] and "transform 'string'" in problems[0]
    assert "field 7 from p.l" in problems[1]
    assert dm.fields_for(event) == out


def test_first_mapping_for_a_field_wins() -> None:
    dm = DataMap(
        [
            FieldMapping(("traits.nope",), 1),
            FieldMapping(("traits.firstName",), 1),
            FieldMapping(("context.traits.lastName",), 1),
        ]
    )
    assert dm.fields_for(IDENTIFY) == {"1": "Ann"}


def test_problem_does_not_block_a_later_mapping_for_same_field() -> None:
    dm = DataMap(
        [
            FieldMapping(("traits.firstName",), 31, "optin"),
            FieldMapping(("traits.optin",), 31, "optin"),
        ]
    )
    out, problems = dm.fields_and_problems(IDENTIFY)
    assert out == {"31": 1}
    assert len(problems) == 1
    assert "data_map[0] field 31 from traits.firstName" in problems[0]
    assert "'optin'" in problems[0] and "'Ann'" in problems[0]


def test_quoted_and_indexed_paths() -> None:
    event = {"properties": {"a.b": "dotted", "items": [{"sku": "S1"}]}}
    dm = DataMap(
        [FieldMapping(('properties."a.b"',), 100), FieldMapping(("properties.items[0].sku",), 101)]
    )
    assert dm.fields_for(event) == {"100": "dotted", "101": "S1"}


# -- transforms -----------------------------------------------------------------------------


def one(transform: str, value: Any) -> tuple[dict[str, Any], list[str]]:
    return DataMap([FieldMapping(("v",), 9, transform)]).fields_and_problems({"v": value})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("x", "x"),
        (" x ", " x "),
        (3, "3"),
        (1.5, "1.5"),
        (42.0, "42"),
        (-0.0, "0"),
        (True, "true"),
        (False, "false"),
        ({"a": 1, "b": [1, "x"]}, '{"a":1,"b":[1,"x"]}'),
        (["a", "b"], '["a","b"]'),
        ("Ünïcödé", "Ünïcödé"),
    ],
)
def test_transform_string(value: Any, expected: str) -> None:
    assert one("string", value) == ({"9": expected}, [])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (3, 3),
        (-2, -2),
        (1.25, 1.25),
        ("12", 12),
        (" 12 ", 12),
        ("-7", -7),
        ("1.5", 1.5),
        ("1e3", 1000.0),
        ("0", 0),
        (0, 0),
    ],
)
def test_transform_number(value: Any, expected: Any) -> None:
    out, problems = one("number", value)
    assert out == {"9": expected} and problems == []
    assert type(out["9"]) is type(expected)


@pytest.mark.parametrize(
    "value", ["abc", "1_000", "nan", "inf", "-Infinity", "١٢", True, False, [1], {"a": 1}, "1,5"]
)
def test_transform_number_problems(value: Any) -> None:
    out, problems = one("number", value)
    assert out == {}
    assert len(problems) == 1 and "'number'" in problems[0]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("Ann@Example.COM", "ann@example.com"), (" MiXed ", " mixed "), (5, "5"), (True, "true")],
)
def test_transform_lowercase(value: Any, expected: str) -> None:
    assert one("lowercase", value) == ({"9": expected}, [])


@pytest.mark.parametrize(
    ("value", "expected"),
    [("  Ann  ", "Ann"), ("\tx\n", "x"), ("x", "x"), (7, "7"), (2.5, "2.5")],
)
def test_transform_trim(value: Any, expected: str) -> None:
    assert one("trim", value) == ({"9": expected}, [])


@pytest.mark.parametrize("transform", ["lowercase", "trim"])
@pytest.mark.parametrize("value", [{"a": 1}, [1]])
def test_transform_text_rejects_containers(transform: str, value: Any) -> None:
    out, problems = one(transform, value)
    assert out == {} and len(problems) == 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1990-05-01", "1990-05-01"),
        (" 1990-05-01 ", "1990-05-01"),
        ("1990-05-01T13:45:00Z", "1990-05-01"),
        ("1990-05-01T00:00:00+02:00", "1990-05-01"),  # calendar date as written
        ("1990-05-01T23:30:00-05:00", "1990-05-01"),
        ("1990-05-01 10:00:00", "1990-05-01"),
        ("2024-02-29T00:00:00.123456Z", "2024-02-29"),
    ],
)
def test_transform_date(value: str, expected: str) -> None:
    assert one("date", value) == ({"9": expected}, [])


@pytest.mark.parametrize(
    "value", ["01/05/1990", "1990-02-30", "yesterday", 19900501, 1.5, True, {}]
)
def test_transform_date_problems(value: Any) -> None:
    out, problems = one("date", value)
    assert out == {} and len(problems) == 1 and "'date'" in problems[0]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, 1),
        ("true", 1),
        ("TRUE", 1),
        (" Yes ", 1),
        ("yes", 1),
        (1, 1),
        (1.0, 1),
        ("1", 1),
        (False, 2),
        ("false", 2),
        ("False", 2),
        ("no", 2),
        ("NO", 2),
        (0, 2),
        ("0", 2),
    ],
)
def test_transform_optin(value: Any, expected: int) -> None:
    out, problems = one("optin", value)
    assert out == {"9": expected} and problems == []
    assert type(out["9"]) is int


@pytest.mark.parametrize("value", ["maybe", "y", 2, -1, 0.5, [True], {"a": 1}])
def test_transform_optin_unknown_is_problem(value: Any) -> None:
    out, problems = one("optin", value)
    assert out == {} and len(problems) == 1


def test_transform_functions_return_missing_for_unconvertible() -> None:
    assert TRANSFORMS["optin"]("maybe") is MISSING
    assert TRANSFORMS["number"]("x") is MISSING
    assert TRANSFORMS["date"]("x") is MISSING
    assert set(TRANSFORMS) == {"string", "number", "lowercase", "trim", "date", "optin"}


def test_realistic_identify_map() -> None:
    dm = DataMap(
        [
            FieldMapping(("traits.email", "context.traits.email"), 3, "lowercase"),
            FieldMapping(("traits.firstName",), 1),
            FieldMapping(("traits.lastName", "context.traits.lastName"), 2, "trim"),
            FieldMapping(("traits.phone",), 15),
            FieldMapping(("traits.age",), 200, "number"),
            FieldMapping(("traits.birthday",), 4, "date"),
            FieldMapping(("traits.optin",), 31, "optin"),
            FieldMapping(("traits.address.city", "traits.city"), 11),
            FieldMapping(("traits.tags",), 201, "string"),
        ]
    )
    out, problems = dm.fields_and_problems(IDENTIFY)
    assert problems == []
    assert out == {
        "3": "  ann@example.com ",
        "1": "Ann",
        "2": "Smith",
        "200": 42,
        "4": "1990-05-01",
        "31": 1,
        "11": "Berlin",
        "201": '["a","b"]',
    }


def test_event_is_not_modified() -> None:
    import copy

    before = copy.deepcopy(IDENTIFY)
    DataMap([FieldMapping(("traits.email",), 3, "lowercase")]).fields_for(IDENTIFY)
    assert before == IDENTIFY


# -- configuration errors -------------------------------------------------------------------


def test_unknown_transform() -> None:
    with pytest.raises(ValueError, match=r"data_map\[1\]\.transform: unknown transform 'foo'"):
        DataMap([FieldMapping(("a",), 1), FieldMapping(("b",), 2, "foo")])


def test_bad_path() -> None:
    with pytest.raises(ValueError, match=r"data_map\[0\]\.from\[1\]: invalid path 'a\.\.b'"):
        DataMap([FieldMapping(("a", "a..b"), 1)])


def test_no_paths() -> None:
    with pytest.raises(ValueError, match=r"data_map\[0\]\.from: at least one path"):
        DataMap([FieldMapping((), 1)])


@pytest.mark.parametrize("field_id", [0, -1, "3", True])
def test_bad_field_id(field_id: Any) -> None:
    with pytest.raises(ValueError, match=r"data_map\[0\]\.field_id"):
        DataMap([FieldMapping(("a",), field_id)])


def test_field_mapping_paths_normalised_to_tuple() -> None:
    assert FieldMapping("traits.email", 3).paths == ("traits.email",)  # type: ignore[arg-type]
    assert FieldMapping(["a", "b"], 3).paths == ("a", "b")  # type: ignore[arg-type]
    hash(FieldMapping(["a"], 3))  # type: ignore[arg-type]


def test_from_config_duck_typed() -> None:
    items = [
        SimpleNamespace(
            from_=["traits.email"], field_id=3, transform="lowercase", allow_empty=False
        ),
        {"from": "traits.firstName", "field_id": 1},
        {"from_": ["traits.lastName"], "field_id": 2, "allow_empty": True},
    ]
    dm = DataMap.from_config(items)
    assert len(dm) == 3
    assert dm.mappings[1] == FieldMapping(("traits.firstName",), 1)
    assert dm.fields_for(IDENTIFY) == {"3": "  ann@example.com ", "1": "Ann", "2": ""}


# -- primary key ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "steps", "expected"),
    [
        ("  Ann@Example.COM ", ["trim", "lowercase"], "ann@example.com"),
        ("  Ann@Example.COM ", ["lowercase"], "  ann@example.com "),
        ("  Ann@Example.COM ", ["trim"], "Ann@Example.COM"),
        ("  Ann@Example.COM ", [], "  Ann@Example.COM "),
        ("ANN", ("lowercase", "trim"), "ann"),
        (12345, ["trim"], "12345"),
        ("", ["trim"], None),
        ("   ", ["trim"], None),
        ("   ", [], None),
        (None, ["trim"], None),
        (True, [], None),
        (1.5, [], None),
        ({"a": 1}, [], None),
        (["a"], [], None),
    ],
)
def test_normalize_primary_key(value: Any, steps: list[str], expected: str | None) -> None:
    assert normalize_primary_key(value, steps) == expected


def test_normalize_primary_key_unknown_step() -> None:
    with pytest.raises(ValueError, match="unknown primary key normalisation step 'upper'"):
        normalize_primary_key("x", ["trim", "upper"])


def test_resolve_primary_key() -> None:
    steps = ["trim", "lowercase"]
    paths = ["traits.email", "context.traits.email"]
    assert resolve_primary_key(IDENTIFY, paths, steps) == "ann@example.com"
    assert (
        resolve_primary_key(IDENTIFY, [compile_path(p) for p in paths], steps) == "ann@example.com"
    )
    track = {"type": "track", "context": {"traits": {"email": "Bob@X.io"}}}
    assert resolve_primary_key(track, paths, steps) == "bob@x.io"
    assert (
        resolve_primary_key(
            {"traits": {"email": "   "}, "context": {"traits": {"email": "C@x"}}}, paths, steps
        )
        == "c@x"
    )
    assert (
        resolve_primary_key(
            {"traits": {"email": {"x": 1}}, "context": {"traits": {"email": "D@x"}}}, paths, steps
        )
        == "d@x"
    )
    assert resolve_primary_key({"traits": {"email": None}}, paths, steps) is None
    assert resolve_primary_key({}, paths, steps) is None
    assert resolve_primary_key(IDENTIFY, [], steps) is None
