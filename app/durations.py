"""Durations in configuration: ``"500ms"``, ``"30s"``, ``"5m"``, ``"2h"``, ``"7d"`` or seconds.

`parse_duration` turns such a value into float seconds; `Duration` is the pydantic type for
model fields (it validates and stores float seconds).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError

__all__ = ["Duration", "DurationError", "UNITS", "parse_duration"]

#: Seconds per unit suffix.
UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}

_NUMBER = r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+"
_PART = re.compile(rf"({_NUMBER})\s*(ms|s|m|h|d)", re.ASCII)
_PLAIN = re.compile(rf"(?:{_NUMBER})(?:[eE][+-]?[0-9]+)?", re.ASCII)
_COMPOUND = re.compile(rf"(?:(?:{_NUMBER})\s*(?:ms|s|m|h|d)\s*)+", re.ASCII)

_EXPECTED = (
    "expected a number of seconds or a number with a unit ms, s, m, h or d, e.g. '30s', '5m'"
)


class DurationError(ValueError):
    """An invalid duration; the message never needs the caller to add context."""


def parse_duration(value: str | int | float) -> float:
    """Return ``value`` as float seconds.

    Accepts a non-negative number of seconds (int, float or numeric string) or a string with
    units: ``"500ms"``, ``"30s"``, ``"5m"``, ``"2h"``, ``"7d"``; units may be combined
    (``"1h30m"``) and whitespace is allowed between number and unit. Raises `DurationError`
    (a ``ValueError``) for negative, non-finite or unparsable values.
    """
    if isinstance(value, bool):
        raise DurationError(f"invalid duration {value!r} ({_EXPECTED})")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_text(value)
    else:
        raise DurationError(
            f"invalid duration of type {type(value).__name__} ({_EXPECTED})"
        )
    if math.isnan(seconds) or math.isinf(seconds):
        raise DurationError(f"invalid duration {value!r} (must be a finite number)")
    if seconds < 0:
        raise DurationError(f"duration must not be negative (got {value!r})")
    return seconds


def _parse_text(value: str) -> float:
    text = value.strip().lower()
    if text.startswith("-"):
        raise DurationError(f"duration must not be negative (got {value!r})")
    if _PLAIN.fullmatch(text):
        return float(text)
    if text and _COMPOUND.fullmatch(text):
        return sum(float(num) * UNITS[unit] for num, unit in _PART.findall(text))
    raise DurationError(f"invalid duration {value!r} ({_EXPECTED})")


def _validate_duration(value: Any) -> float:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise PydanticCustomError(
            "duration_type",
            "expected a duration (a number of seconds or e.g. '30s', '5m'), got {type}",
            {"type": type(value).__name__},
        )
    try:
        return parse_duration(value)
    except DurationError as exc:
        raise PydanticCustomError("duration", "{reason}", {"reason": str(exc)}) from None


#: A pydantic field type: accepts what `parse_duration` accepts, stores float seconds.
Duration = Annotated[float, BeforeValidator(_validate_duration)]
