"""Dotted paths into parsed Segment events (pure, no I/O).

Syntax (one path per string)::

    traits.email
    context.traits.email
    properties.items[0].sku
    properties.items[-1].sku          # negative index counts from the end
    properties."a.b"                  # quoted key: may contain . [ ] and spaces
    properties."say \\"hi\\"".x          # inside quotes, \\" and \\\\ are escapes

A path is one or more keys separated by ``.``; every key may be followed by any
number of ``[N]`` list indexes. A bare key is any run of characters other than
``.``, ``[``, ``]`` and ``"``, without leading or trailing whitespace (quote such
keys). Keys only match ``dict`` entries and indexes only match ``list`` items;
anything else (a key on a list, an index on a dict, out of range, absent) reads
as :data:`MISSING`.

``compile_path`` is cached, so passing strings to :func:`read_path` is cheap, but
hot loops should compile once and keep the :class:`CompiledPath`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

__all__ = ["MISSING", "CompiledPath", "compile_path", "first_present", "is_present", "read_path"]


class _Missing(enum.Enum):
    MISSING = "MISSING"

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


#: Sentinel for "no value at this path" (distinct from a JSON ``null``). Test with ``is``.
MISSING: Final = _Missing.MISSING

Step = str | int


@dataclass(frozen=True, slots=True)
class CompiledPath:
    """A parsed path: ``steps`` are dict keys (``str``) and list indexes (``int``)."""

    text: str
    steps: tuple[Step, ...]

    def __str__(self) -> str:
        return self.text


def _error(path: str, pos: int, message: str) -> ValueError:
    return ValueError(f"invalid path {path!r}: {message} at position {pos}")


@lru_cache(maxsize=4096)
def compile_path(path: str) -> CompiledPath:
    """Parse ``path``; raises ``ValueError`` naming the path and position on bad syntax."""
    if not isinstance(path, str):
        raise ValueError(f"invalid path {path!r}: expected a string")
    if not path:
        raise ValueError("invalid path '': empty path")
    steps: list[Step] = []
    n = len(path)
    i = 0
    while True:
        # -- one key ---------------------------------------------------------------
        if i >= n:
            raise _error(path, i, "expected a key")
        c = path[i]
        if c == '"':
            i += 1
            buf: list[str] = []
            while True:
                if i >= n:
                    raise _error(path, i, "unterminated quoted key")
                c = path[i]
                if c == "\\":
                    if i + 1 >= n or path[i + 1] not in ('"', "\\"):
                        raise _error(path, i, 'bad escape in quoted key (only \\" and \\\\)')
                    buf.append(path[i + 1])
                    i += 2
                elif c == '"':
                    i += 1
                    break
                else:
                    buf.append(c)
                    i += 1
            steps.append("".join(buf))
        else:
            start = i
            while i < n and path[i] not in '.[]"':
                i += 1
            key = path[start:i]
            if not key:
                what = "empty key" if i >= n or path[i] == "." else f"unexpected {path[i]!r}"
                raise _error(path, start, what)
            if key != key.strip():
                raise _error(path, start, "key has leading/trailing whitespace (quote it)")
            steps.append(key)
        # -- any number of [N] -----------------------------------------------------
        while i < n and path[i] == "[":
            close = path.find("]", i + 1)
            if close < 0:
                raise _error(path, i, "unterminated '['")
            inner = path[i + 1 : close]
            digits = inner[1:] if inner.startswith("-") else inner
            if not digits or not digits.isascii() or not digits.isdigit():
                raise _error(path, i + 1, f"list index must be an integer, got {inner!r}")
            steps.append(int(inner))
            i = close + 1
        # -- separator or end ------------------------------------------------------
        if i >= n:
            break
        if path[i] != ".":
            raise _error(path, i, f"unexpected {path[i]!r} (expected '.' or '[')")
        i += 1
    return CompiledPath(path, tuple(steps))


def read_path(obj: Any, path: CompiledPath | str) -> Any:
    """Value at ``path`` in ``obj``, or :data:`MISSING`. A JSON ``null`` reads as ``None``."""
    steps = (path if isinstance(path, CompiledPath) else compile_path(path)).steps
    cur = obj
    for step in steps:
        if isinstance(step, str):
            if not isinstance(cur, dict):
                return MISSING
            cur = cur.get(step, MISSING)
            if cur is MISSING:
                return MISSING
        else:
            if not isinstance(cur, list):
                return MISSING
            try:
                cur = cur[step]
            except IndexError:
                return MISSING
    return cur


def is_present(value: Any, *, allow_empty: bool = False) -> bool:
    """Not MISSING, not None and (unless ``allow_empty``) not an empty/whitespace-only string."""
    if value is MISSING or value is None:
        return False
    if not allow_empty and isinstance(value, str) and (not value or value.isspace()):
        return False
    return True


def first_present(
    obj: Any, paths: Sequence[CompiledPath | str], *, allow_empty: bool = False
) -> Any:
    """First value along ``paths`` that :func:`is_present`, else :data:`MISSING`."""
    for path in paths:
        value = read_path(obj, path)
        if value is MISSING or value is None:
            continue
        if not allow_empty and isinstance(value, str) and (not value or value.isspace()):
            continue
        return value
    return MISSING
