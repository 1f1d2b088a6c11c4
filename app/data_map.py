"""Data maps: event values -> Emarsys contact fields, and the primary key (pure, no I/O).

A :class:`FieldMapping` reads the first *present* value along its ``paths`` (see
:func:`app.paths.first_present`: not absent, not ``null``, not a blank string), applies an
optional transform and yields ``{str(field_id): value}``.

Empty values never overwrite a contact field: a mapping whose paths hold only absent,
``null`` or blank values is skipped. With ``allow_empty=True`` a mapping whose paths exist
but hold only ``null``/blank values sends ``""`` (which clears the field in Emarsys); paths
that are all absent are still skipped, and a non-empty value on any path is preferred.

Transforms (:data:`TRANSFORMS`); a value a transform cannot convert is skipped and reported
as a problem by :meth:`DataMap.fields_and_problems`:

* ``string``: str as is; bool -> ``"true"``/``"false"``; numbers as JavaScript prints them
  (``42.0`` -> ``"42"``); objects/arrays -> compact JSON text.
* ``number``: int/float as is; a numeric string (``" 12 "``, ``"1.5"``, ``"1e3"``) -> int or
  float; bools, non-numeric and non-finite values are problems.
* ``lowercase`` / ``trim``: on strings (other scalars first go through ``string``).
* ``date``: ISO-8601 date or datetime string -> ``"YYYY-MM-DD"``, the calendar date *as
  written* (no time-zone conversion: ``1990-05-01T00:00:00+02:00`` -> ``1990-05-01``).
* ``optin``: ``true``/``"true"``/``"yes"``/``1``/``"1"`` -> ``1``, ``false``/``"false"``/
  ``"no"``/``0``/``"0"`` -> ``2`` (strings case-insensitive, trimmed); anything else is a
  problem (Emarsys field 31: 1 = true, 2 = false, empty = unknown).
* no transform: JSON scalars (str, int, float, bool) as is; objects/arrays are problems.

If several mappings target the same field id, the first one that yields a value wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import orjson

from app.paths import MISSING, CompiledPath, compile_path, read_path

__all__ = [
    "PRIMARY_KEY_STEPS",
    "TRANSFORMS",
    "DataMap",
    "FieldMapping",
    "normalize_primary_key",
    "resolve_primary_key",
]

Transform = Callable[[Any], Any]


def _number_to_string(value: int | float) -> str:
    if type(value) is float and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return str(value)


def _t_string(value: Any) -> Any:
    t = type(value)
    if t is str:
        return value
    if t is bool:
        return "true" if value else "false"
    if t is int or t is float:
        return _number_to_string(value)
    if t is dict or t is list:
        try:
            return orjson.dumps(value).decode("utf-8")
        except orjson.JSONEncodeError:
            return MISSING
    return MISSING


def _scalar_string(value: Any) -> Any:
    t = type(value)
    if t is str:
        return value
    if t is bool:
        return "true" if value else "false"
    if t is int or t is float:
        return _number_to_string(value)
    return MISSING


def _t_number(value: Any) -> Any:
    t = type(value)
    if t is int:
        return value
    if t is float:
        return value if math.isfinite(value) else MISSING
    if t is str:
        text = value.strip()
        if not text or not text.isascii() or "_" in text:
            return MISSING
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            return MISSING
        return number if math.isfinite(number) else MISSING
    return MISSING


def _t_lowercase(value: Any) -> Any:
    text = _scalar_string(value)
    return MISSING if text is MISSING else text.lower()


def _t_trim(value: Any) -> Any:
    text = _scalar_string(value)
    return MISSING if text is MISSING else text.strip()


def _t_date(value: Any) -> Any:
    if type(value) is not str:
        return MISSING
    try:
        return datetime.fromisoformat(value.strip()).date().isoformat()
    except ValueError:
        return MISSING


_OPTIN_STRINGS: Final = {"true": 1, "yes": 1, "1": 1, "false": 2, "no": 2, "0": 2}


def _t_optin(value: Any) -> Any:
    t = type(value)
    if t is bool:
        return 1 if value else 2
    if t is int or t is float:
        return 1 if value == 1 else 2 if value == 0 else MISSING
    if t is str:
        return _OPTIN_STRINGS.get(value.strip().lower(), MISSING)
    return MISSING


#: Transform name -> function (value -> converted value, or ``MISSING`` if not convertible).
TRANSFORMS: Final[Mapping[str, Transform]] = {
    "string": _t_string,
    "number": _t_number,
    "lowercase": _t_lowercase,
    "trim": _t_trim,
    "date": _t_date,
    "optin": _t_optin,
}


@dataclass(frozen=True)
class FieldMapping:
    """One data-map entry. A ``str`` or ``list`` given as ``paths`` is turned into a tuple."""

    paths: tuple[str, ...]
    field_id: int
    transform: str | None = None
    allow_empty: bool = False

    def __post_init__(self) -> None:
        paths: Any = self.paths
        if isinstance(paths, str):
            object.__setattr__(self, "paths", (paths,))
        elif not isinstance(paths, tuple):
            object.__setattr__(self, "paths", tuple(paths))

    @classmethod
    def from_config(cls, item: Any) -> FieldMapping:
        """From a settings ``DataMapping``-like object (``from_``, ``field_id``, ...) or dict."""
        if isinstance(item, Mapping):
            paths = item.get("from_", item.get("from", item.get("paths")))
            return cls(
                paths, item["field_id"], item.get("transform"), item.get("allow_empty", False)
            )
        return cls(
            item.from_,
            item.field_id,
            getattr(item, "transform", None),
            getattr(item, "allow_empty", False),
        )


@dataclass(frozen=True, slots=True)
class _Compiled:
    key: str
    paths: tuple[CompiledPath, ...]
    transform: Transform | None
    transform_name: str | None
    allow_empty: bool
    index: int


def _is_blank(value: Any) -> bool:
    return value is None or (type(value) is str and (not value or value.isspace()))


class DataMap:
    """Compiled data map; raises ``ValueError`` naming ``data_map[i]`` on a bad mapping."""

    __slots__ = ("_entries", "mappings")

    def __init__(self, mappings: Sequence[FieldMapping]) -> None:
        self.mappings: tuple[FieldMapping, ...] = tuple(mappings)
        entries: list[_Compiled] = []
        for i, m in enumerate(self.mappings):
            where = f"data_map[{i}]"
            if not m.paths:
                raise ValueError(f"{where}.from: at least one path is required")
            compiled: list[CompiledPath] = []
            for j, path in enumerate(m.paths):
                try:
                    compiled.append(compile_path(path))
                except ValueError as exc:
                    raise ValueError(f"{where}.from[{j}]: {exc}") from None
            if type(m.field_id) is not int or m.field_id <= 0:
                raise ValueError(
                    f"{where}.field_id: must be a positive integer, got {m.field_id!r}"
                )
            fn: Transform | None = None
            if m.transform is not None:
                fn = TRANSFORMS.get(m.transform)
                if fn is None:
                    raise ValueError(
                        f"{where}.transform: unknown transform {m.transform!r} "
                        f"(expected one of {', '.join(TRANSFORMS)})"
                    )
            entries.append(
                _Compiled(str(m.field_id), tuple(compiled), fn, m.transform, m.allow_empty, i)
            )
        self._entries: tuple[_Compiled, ...] = tuple(entries)

    @classmethod
    def from_config(cls, items: Iterable[Any]) -> DataMap:
        """From settings ``data_map`` entries (see :meth:`FieldMapping.from_config`)."""
        return cls([FieldMapping.from_config(item) for item in items])

    def __len__(self) -> int:
        return len(self._entries)

    def fields_for(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """``{field id string: value}`` for one event; unconvertible values are left out."""
        return self.fields_and_problems(event)[0]

    def fields_and_problems(self, event: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Like :meth:`fields_for`, plus one message per value that could not be converted."""
        out: dict[str, Any] = {}
        problems: list[str] = []
        for entry in self._entries:
            key = entry.key
            if key in out:
                continue
            value: Any = MISSING
            source: CompiledPath | None = None
            seen_blank = False
            for path in entry.paths:
                candidate = read_path(event, path)
                if candidate is MISSING:
                    continue
                if _is_blank(candidate):
                    seen_blank = True
                    continue
                value = candidate
                source = path
                break
            if value is MISSING:
                if seen_blank and entry.allow_empty:
                    out[key] = ""
                continue
            fn = entry.transform
            if fn is not None:
                converted = fn(value)
                if converted is MISSING:
                    problems.append(
                        f"data_map[{entry.index}] field {key} from {source}: transform "
                        f"{entry.transform_name!r} cannot convert {type(value).__name__} "
                        f"{_short(value)}"
                    )
                    continue
                out[key] = converted
            elif type(value) is dict or type(value) is list:
                problems.append(
                    f"data_map[{entry.index}] field {key} from {source}: "
                    f"{type(value).__name__} is not a scalar (use transform 'string')"
                )
            else:
                out[key] = value
        return out, problems


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: Allowed primary-key normalisation steps, applied in the configured order.
PRIMARY_KEY_STEPS: Final = ("trim", "lowercase")


def normalize_primary_key(value: Any, steps: Sequence[str]) -> str | None:
    """Normalised primary key, or ``None`` if ``value`` is not a non-blank string/int.

    ``steps`` are applied in order: ``trim`` (``str.strip``), ``lowercase`` (``str.lower``).
    An unknown step raises ``ValueError``.
    """
    if type(value) is str:
        text = value
    elif type(value) is int:
        text = str(value)
    else:
        return None
    for step in steps:
        if step == "trim":
            text = text.strip()
        elif step == "lowercase":
            text = text.lower()
        else:
            raise ValueError(
                f"unknown primary key normalisation step {step!r} "
                f"(expected one of {', '.join(PRIMARY_KEY_STEPS)})"
            )
    if not text or text.isspace():
        return None
    return text


def resolve_primary_key(
    event: Mapping[str, Any], paths: Sequence[CompiledPath | str], steps: Sequence[str]
) -> str | None:
    """The first value along ``paths`` that normalises to a primary key, else ``None``."""
    for path in paths:
        value = read_path(event, path)
        if value is MISSING or value is None:
            continue
        pk = normalize_primary_key(value, steps)
        if pk is not None:
            return pk
    return None
