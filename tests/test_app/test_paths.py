from __future__ import annotations

import pytest

from app.paths import MISSING, CompiledPath, compile_path, first_present, is_present, read_path

EVENT = {
    "traits": {"email": "a@b.com", "blank": "  ", "empty": "", "none": None, "zero": 0},
    "context": {"traits": {"email": "ctx@b.com"}},
    "properties": {
        "items": [{"sku": "S1"}, {"sku": "S2", "tags": ["x", "y"]}],
        "a.b": "dotted",
        'say "hi"': {"x": 1},
        "with space": 5,
        "false": False,
    },
}


@pytest.mark.parametrize(
    ("path", "steps"),
    [
        ("traits.email", ("traits", "email")),
        ("context.traits.email", ("context", "traits", "email")),
        ("properties.items[0].sku", ("properties", "items", 0, "sku")),
        ("properties.items[1].tags[-1]", ("properties", "items", 1, "tags", -1)),
        ("a[0][1]", ("a", 0, 1)),
        ('properties."a.b"', ("properties", "a.b")),
        ('"a.b"', ("a.b",)),
        ('properties."say \\"hi\\"".x', ("properties", 'say "hi"', "x")),
        ('p."back\\\\slash"', ("p", "back\\slash")),
        ('p."[0]"', ("p", "[0]")),
        ('p.""', ("p", "")),
        ('p."x"[2]', ("p", "x", 2)),
        ("properties.with space", ("properties", "with space")),
        ("userId", ("userId",)),
    ],
)
def test_compile_valid(path: str, steps: tuple[object, ...]) -> None:
    compiled = compile_path(path)
    assert isinstance(compiled, CompiledPath)
    assert compiled.steps == steps
    assert compiled.text == path
    assert str(compiled) == path


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("", "empty path"),
        ("traits.", "expected a key"),
        (".traits", "empty key"),
        ("traits..email", "empty key"),
        ("items[", "unterminated '['"),
        ("items[x]", "list index must be an integer"),
        ("items[]", "list index must be an integer"),
        ("items[1.5]", "list index must be an integer"),
        ("items[-]", "list index must be an integer"),
        ("items[0]x", "unexpected 'x'"),
        ("[0]", "unexpected '['"),
        ("a]", "unexpected ']'"),
        ('a."unterminated', "unterminated quoted key"),
        ('a."bad\\escape"', "bad escape"),
        ('a."x"y', "unexpected 'y'"),
        ('ab"c"', "unexpected '\"'"),
        (" traits.email", "whitespace"),
        ("traits.email ", "whitespace"),
    ],
)
def test_compile_invalid(path: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        compile_path(path)
    message = str(info.value)
    assert fragment in message
    assert repr(path) in message


def test_compile_non_string() -> None:
    with pytest.raises(ValueError, match="expected a string"):
        compile_path(123)  # type: ignore[arg-type]


def test_compile_is_cached() -> None:
    assert compile_path("traits.email") is compile_path("traits.email")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("traits.email", "a@b.com"),
        ("context.traits.email", "ctx@b.com"),
        ("properties.items[0].sku", "S1"),
        ("properties.items[1].sku", "S2"),
        ("properties.items[-1].sku", "S2"),
        ("properties.items[1].tags[1]", "y"),
        ('properties."a.b"', "dotted"),
        ('properties."say \\"hi\\"".x', 1),
        ("properties.with space", 5),
        ("properties.false", False),
        ("traits.none", None),
        ("traits.zero", 0),
        ("traits", EVENT["traits"]),
    ],
)
def test_read_path_found(path: str, expected: object) -> None:
    assert read_path(EVENT, path) == expected
    assert read_path(EVENT, compile_path(path)) == expected


@pytest.mark.parametrize(
    "path",
    [
        "nope",
        "traits.nope",
        "traits.email.deeper",  # key on a string
        "properties.items[5].sku",  # out of range
        "properties.items[-3].sku",
        "properties.items.sku",  # key on a list
        "traits[0]",  # index on a dict
        "properties.a.b",  # unquoted: two keys
        "traits.none.x",  # through null
    ],
)
def test_read_path_missing(path: str) -> None:
    assert read_path(EVENT, path) is MISSING


def test_read_path_non_container_root() -> None:
    assert read_path("string", "a") is MISSING
    assert read_path(None, "a") is MISSING
    assert read_path([1, 2], "a") is MISSING


def test_missing_sentinel() -> None:
    assert repr(MISSING) == "MISSING"
    assert not MISSING
    assert MISSING is not None


def test_first_present_fallback_order() -> None:
    paths = [compile_path("traits.email"), compile_path("context.traits.email")]
    assert first_present(EVENT, paths) == "a@b.com"
    ev = {"context": {"traits": {"email": "ctx@b.com"}}}
    assert first_present(ev, paths) == "ctx@b.com"
    assert first_present({}, paths) is MISSING
    assert first_present(EVENT, []) is MISSING


def test_first_present_accepts_strings() -> None:
    assert first_present(EVENT, ["nope", "traits.email"]) == "a@b.com"


@pytest.mark.parametrize("blank", ["traits.none", "traits.empty", "traits.blank", "nope"])
def test_first_present_skips_absent_null_and_blank(blank: str) -> None:
    assert first_present(EVENT, [blank, "context.traits.email"]) == "ctx@b.com"
    assert first_present(EVENT, [blank]) is MISSING


def test_first_present_allow_empty() -> None:
    assert first_present(EVENT, ["traits.empty", "traits.email"], allow_empty=True) == ""
    assert first_present(EVENT, ["traits.blank"], allow_empty=True) == "  "
    # None is never present, even with allow_empty.
    assert first_present(EVENT, ["traits.none", "traits.email"], allow_empty=True) == "a@b.com"
    assert first_present(EVENT, ["traits.none"], allow_empty=True) is MISSING


def test_first_present_falsy_non_strings_are_present() -> None:
    assert first_present(EVENT, ["traits.zero"]) == 0
    assert first_present(EVENT, ["properties.false"]) is False
    assert first_present({"a": []}, ["a"]) == []


def test_is_present() -> None:
    assert is_present("x")
    assert is_present(0)
    assert is_present(False)
    assert not is_present(None)
    assert not is_present(MISSING)
    assert not is_present("")
    assert not is_present(" \t\n")
    assert is_present("", allow_empty=True)
    assert not is_present(None, allow_empty=True)
