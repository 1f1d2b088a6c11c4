"""Rule configuration (YAML ``rules:`` and ``rule_engine:``) -> compiled, immutable rules.

Pure: no I/O. :func:`parse_rules` validates everything up front and raises
:class:`RuleConfigError` with *all* problems, each naming the rule and the key, e.g.::

    rules[0] (cart_abandonment).steps[2]: absent step needs 'for'
    rules[1] (x).steps[0].where.properties.price: unknown operator 'gtx' (expected one of ...)
    rules[0] (cart_abandonment).data.sku: unknown step reference steps[5] (rule has 3 steps)
    rule_engine.max_partial_matches: expected an integer >= 1

The semantics of the compiled rules are documented in :mod:`app.rules` and implemented by
:class:`app.rules.engine.RuleEngine`. Everything that can be decided at compile time is:
regexes are compiled once, operand types pick a specialised predicate, the paths that the
engine must read from an event (``RuleSet.view_paths``) and the fields it must keep per matched
step (``Step.capture_paths``) are computed here.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from app.durations import DurationError, parse_duration
from app.events import EVENT_TYPES
from app.paths import MISSING, CompiledPath, compile_path

__all__ = [
    "DEFAULT_ALLOWED_LATENESS_MS",
    "DEFAULT_MAX_PARTIAL_MATCHES",
    "OPERATORS",
    "Condition",
    "DataItem",
    "EventSpec",
    "Rule",
    "RuleConfigError",
    "RuleSet",
    "Step",
    "StepRef",
    "json_equal",
    "parse_rules",
]

DEFAULT_ALLOWED_LATENESS_MS: Final = 5 * 60 * 1000
DEFAULT_MAX_PARTIAL_MATCHES: Final = 100

#: ``where`` operators; ``path`` is a modifier of ``eq_step`` / ``ne_step`` only.
OPERATORS: Final = (
    "eq",
    "ne",
    "gt",
    "gte",
    "lt",
    "lte",
    "in",
    "not_in",
    "contains",
    "exists",
    "regex",
    "eq_step",
    "ne_step",
)
_EXPECTED_OPS: Final = ", ".join(OPERATORS) + " (and 'path' with eq_step/ne_step)"

_RULE_KEYS: Final = frozenset({"name", "emarsys_event_id", "within", "steps", "data", "once_per"})
_POSITIVE_STEP_KEYS: Final = frozenset(
    {"event", "type", "name", "where", "contiguity", "times", "at_least", "within"}
)
_ABSENT_STEP_KEYS: Final = frozenset({"absent", "for"})
_SPEC_KEYS: Final = frozenset({"event", "type", "name", "where"})
_ENGINE_KEYS: Final = frozenset({"allowed_lateness", "max_partial_matches", "late_topic"})
_NOT_JSON: Final = (
    "expected a JSON value (string, number, boolean, null, list, mapping; quote dates), got"
)
_DATA_REF: Final = re.compile(r"steps\[(-?[0-9]+)\]\.(.+)", re.DOTALL)


class RuleConfigError(ValueError):
    """Invalid ``rules`` / ``rule_engine`` configuration; ``errors`` lists every problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__(
            "invalid rules configuration:\n" + "\n".join(f"  {e}" for e in self.errors)
        )


# --------------------------------------------------------------------------------------------
# Value comparison
# --------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return type(value) is int or type(value) is float


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values: MISSING equals nothing, booleans only equal booleans."""
    if a is MISSING or b is MISSING:
        return False
    if type(a) is bool or type(b) is bool:
        return a is b
    return bool(a == b)


def _eq_test(operand: Any) -> Callable[[Any], bool]:
    if type(operand) is str:
        return lambda v: type(v) is str and v == operand
    if _is_number(operand):
        return lambda v: (type(v) is int or type(v) is float) and v == operand
    if operand is None or type(operand) is bool:
        return lambda v: v is operand
    return lambda v: json_equal(v, operand)


def _order_test(op: str, operand: Any) -> Callable[[Any], bool]:
    if type(operand) is str:

        def same_kind(v: Any) -> bool:
            return type(v) is str

    else:

        def same_kind(v: Any) -> bool:
            return type(v) is int or type(v) is float

    if op == "gt":
        return lambda v: same_kind(v) and v > operand
    if op == "gte":
        return lambda v: same_kind(v) and v >= operand
    if op == "lt":
        return lambda v: same_kind(v) and v < operand
    return lambda v: same_kind(v) and v <= operand


def _in_test(items: list[Any]) -> Callable[[Any], bool]:
    if items and all(type(x) is str for x in items):
        strs = frozenset(items)
        return lambda v: type(v) is str and v in strs
    if items and all(_is_number(x) for x in items):
        nums = frozenset(items)
        return lambda v: (type(v) is int or type(v) is float) and v in nums
    frozen = tuple(items)
    return lambda v: any(json_equal(v, x) for x in frozen)


def _contains_test(operand: Any) -> Callable[[Any], bool]:
    def test(v: Any) -> bool:
        if type(v) is str:
            return type(operand) is str and operand in v
        if type(v) is list:
            return any(json_equal(item, operand) for item in v)
        return False

    return test


def _exists_test(flag: bool) -> Callable[[Any], bool]:
    if flag:
        return lambda v: v is not MISSING and v is not None
    return lambda v: v is MISSING or v is None


def _regex_test(pattern: re.Pattern[str]) -> Callable[[Any], bool]:
    search = pattern.search
    return lambda v: type(v) is str and search(v) is not None


def _is_json(value: Any) -> bool:
    if value is None or type(value) in (str, int, float, bool):
        return True
    if type(value) is list:
        return all(_is_json(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _is_json(v) for k, v in value.items())
    return False


def _negate(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: not test(v)


# --------------------------------------------------------------------------------------------
# Compiled model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Condition:
    """One static ``where`` test: ``test(view.get(path, MISSING))``."""

    path: str
    op: str
    operand: Any
    test: Callable[[Any], bool]


@dataclass(frozen=True, slots=True)
class StepRef:
    """``eq_step`` / ``ne_step``: compare ``path`` with ``ref_path`` of step ``ref_step``."""

    path: str
    ref_step: int
    ref_key: str  # str(ref_step): key of the capture in partial-match state
    ref_path: str
    negate: bool


@dataclass(frozen=True, slots=True)
class EventSpec:
    """Which events a step matches: ``type``/``event``/``name`` equality, then ``where``."""

    type: str | None
    event: str | None
    name: str | None
    conditions: tuple[Condition, ...] = ()
    step_refs: tuple[StepRef, ...] = ()

    def match_static(self, view: Mapping[str, Any]) -> bool:
        """Everything except ``eq_step``/``ne_step`` (the same for every partial match)."""
        if self.type is not None and view.get("type") != self.type:
            return False
        if self.event is not None and view.get("event") != self.event:
            return False
        if self.name is not None and view.get("name") != self.name:
            return False
        for cond in self.conditions:
            if not cond.test(view.get(cond.path, MISSING)):
                return False
        return True

    def match_refs(self, view: Mapping[str, Any], captures: Mapping[str, Any]) -> bool:
        """``eq_step``/``ne_step`` against the captured fields of earlier steps."""
        for ref in self.step_refs:
            cap = captures.get(ref.ref_key)
            other = MISSING if cap is None else cap.get(ref.ref_path, MISSING)
            if json_equal(view.get(ref.path, MISSING), other) is ref.negate:
                return False
        return True


@dataclass(frozen=True, slots=True)
class Step:
    """A compiled step. ``absent`` steps use ``spec`` and ``for_ms`` only."""

    index: int
    key: str  # str(index)
    absent: bool
    spec: EventSpec
    strict: bool = False
    min_count: int = 1
    max_count: int | None = 1  # None: unbounded (at_least)
    within_ms: int | None = None
    for_ms: int | None = None
    #: Paths (view keys) of this step's last matched event kept for eq_step / data.
    capture_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DataItem:
    """One ``data`` entry: a literal (``step is None``) or ``steps[step].<path>``."""

    key: str
    step: int | None
    step_key: str | None
    path: str | None
    value: Any = None


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    emarsys_event_id: int
    steps: tuple[Step, ...]
    within_ms: int | None = None
    once_per_ms: int | None = None
    data: tuple[DataItem, ...] = ()
    #: Hash of ``steps`` + ``within``: partial matches stored under another fingerprint
    #: (the rule was edited) are discarded.
    fingerprint: str = ""

    @property
    def has_absent(self) -> bool:
        return any(s.absent for s in self.steps)


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Compiled rules plus ``rule_engine`` settings."""

    rules: tuple[Rule, ...] = ()
    allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS
    max_partial_matches: int = DEFAULT_MAX_PARTIAL_MATCHES
    late_topic: str | None = None
    #: Every path the engine reads from an event: ``(view key, compiled path)``.
    view_paths: tuple[tuple[str, CompiledPath], ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        texts: dict[str, None] = {"type": None, "event": None, "name": None}
        for rule in self.rules:
            for step in rule.steps:
                for cond in step.spec.conditions:
                    texts[cond.path] = None
                for ref in step.spec.step_refs:
                    texts[ref.path] = None
                for path in step.capture_paths:
                    texts[path] = None
        object.__setattr__(self, "view_paths", tuple((t, compile_path(t)) for t in texts))

    def rule(self, name: str) -> Rule:
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(name)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def _duration_ms(value: Any, where: str, errors: list[str], *, positive: bool) -> int | None:
    if value is None:
        errors.append(f"{where}: expected a duration, e.g. '30s', '5m', '2h'")
        return None
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        errors.append(f"{where}: expected a duration, e.g. '30s', '5m', '2h'")
        return None
    try:
        seconds = parse_duration(value)
    except DurationError as exc:
        errors.append(f"{where}: {exc}")
        return None
    ms = round(seconds * 1000)
    if positive and ms <= 0:
        errors.append(f"{where}: duration must be greater than zero (got {value!r})")
        return None
    return int(ms)


def _positive_int(value: Any, where: str, errors: list[str], *, minimum: int = 1) -> int | None:
    if type(value) is not int or value < minimum:
        errors.append(f"{where}: expected an integer >= {minimum}, got {value!r}")
        return None
    return value


@dataclass(slots=True)
class _RawSpec:
    type: str | None
    event: str | None
    name: str | None
    where: Any
    where_key: str  # error prefix for ``where``


class _RuleParser:
    def __init__(self, index: int, raw: Mapping[str, Any], errors: list[str]) -> None:
        self.index = index
        self.raw = raw
        self.errors = errors
        self.prefix = f"rules[{index}]"

    def err(self, message: str) -> None:
        self.errors.append(message)

    # -- entry point -------------------------------------------------------------------------

    def parse(self) -> Rule | None:
        raw = self.raw
        start = len(self.errors)
        name = raw.get("name")
        if "name" not in raw:
            self.err(f"{self.prefix}: missing 'name'")
            name = None
        elif not isinstance(name, str) or not name.strip():
            self.err(f"{self.prefix}.name: expected a non-empty string, got {name!r}")
            name = None
        else:
            self.prefix = f"rules[{self.index}] ({name})"
        p = self.prefix
        for key in raw:
            if key not in _RULE_KEYS:
                expected = ", ".join(sorted(_RULE_KEYS))
                self.err(f"{p}.{key}: unknown key (expected one of {expected})")

        event_id: int | None = None
        if "emarsys_event_id" not in raw:
            self.err(f"{p}: missing 'emarsys_event_id'")
        else:
            event_id = _positive_int(raw["emarsys_event_id"], f"{p}.emarsys_event_id", self.errors)

        within = None
        if raw.get("within") is not None:
            within = _duration_ms(raw["within"], f"{p}.within", self.errors, positive=True)
        once_per = None
        if raw.get("once_per") is not None:
            once_per = _duration_ms(raw["once_per"], f"{p}.once_per", self.errors, positive=True)

        steps: tuple[Step, ...] = ()
        raw_steps = raw.get("steps")
        if "steps" not in raw:
            self.err(f"{p}: missing 'steps'")
        elif not isinstance(raw_steps, list) or not raw_steps:
            self.err(f"{p}.steps: expected a non-empty list of steps")
        else:
            steps = self._steps(raw_steps)

        data: tuple[DataItem, ...] = ()
        raw_data = raw.get("data")
        if raw_data is not None:
            if not isinstance(raw_data, dict):
                self.err(
                    f"{p}.data: expected a mapping of name -> 'steps[N].<path>' or {{value: ...}}"
                )
            elif isinstance(raw_steps, list):
                data = self._data(raw_data, raw_steps)

        if len(self.errors) > start or name is None or event_id is None:
            return None
        steps = self._with_captures(steps, data)
        fingerprint = hashlib.sha256(
            orjson.dumps(
                {"steps": raw_steps, "within": raw.get("within")},
                option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS,
                default=str,
            )
        ).hexdigest()[:16]
        return Rule(
            name=name,
            emarsys_event_id=event_id,
            steps=steps,
            within_ms=within,
            once_per_ms=once_per,
            data=data,
            fingerprint=fingerprint,
        )

    # -- steps -------------------------------------------------------------------------------

    def _steps(self, raw_steps: list[Any]) -> tuple[Step, ...]:
        n = len(raw_steps)
        absent = [isinstance(s, dict) and "absent" in s for s in raw_steps]
        steps: list[Step] = []
        for i, raw in enumerate(raw_steps):
            where = f"{self.prefix}.steps[{i}]"
            if not isinstance(raw, dict):
                self.err(f"{where}: expected a mapping")
                continue
            if absent[i]:
                step = self._absent_step(i, n, raw, where, absent)
            else:
                step = self._positive_step(i, raw, where, absent)
            if step is not None:
                steps.append(step)
        return tuple(steps)

    def _absent_step(
        self, i: int, n: int, raw: Mapping[str, Any], where: str, absent: list[bool]
    ) -> Step | None:
        start = len(self.errors)
        for key in raw:
            if key not in _ABSENT_STEP_KEYS:
                self.err(
                    f"{where}.{key}: unknown key for an absent step (expected 'absent', 'for')"
                )
        if i == 0:
            self.err(f"{where}: a rule cannot start with an absent step")
        elif absent[i - 1]:
            self.err(f"{where}: two absent steps in a row are not supported")
        for_ms = None
        if raw.get("for") is not None:
            for_ms = _duration_ms(raw["for"], f"{where}.for", self.errors, positive=True)
        elif i == n - 1:
            self.err(f"{where}: absent step needs 'for'")
        spec_raw = raw["absent"]
        spec_where = f"{where}.absent"
        raw_spec: _RawSpec | None
        if isinstance(spec_raw, str):
            raw_spec = (
                _RawSpec("track", spec_raw, None, None, f"{spec_where}.where")
                if spec_raw.strip()
                else None
            )
            if raw_spec is None:
                self.err(f"{spec_where}: expected a track event name or a mapping")
        elif isinstance(spec_raw, dict):
            for key in spec_raw:
                if key not in _SPEC_KEYS:
                    self.err(
                        f"{spec_where}.{key}: unknown key (expected one of "
                        f"{', '.join(sorted(_SPEC_KEYS))})"
                    )
            raw_spec = self._raw_spec(spec_raw, spec_where)
        else:
            self.err(f"{spec_where}: expected a track event name or a mapping")
            raw_spec = None
        spec = self._spec(raw_spec, i, absent) if raw_spec is not None else None
        if spec is None or len(self.errors) > start:
            return None
        return Step(
            index=i, key=str(i), absent=True, spec=spec, min_count=0, max_count=0, for_ms=for_ms
        )

    def _positive_step(
        self, i: int, raw: Mapping[str, Any], where: str, absent: list[bool]
    ) -> Step | None:
        start = len(self.errors)
        for key in raw:
            if key not in _POSITIVE_STEP_KEYS:
                self.err(
                    f"{where}.{key}: unknown key (expected one of "
                    f"{', '.join(sorted(_POSITIVE_STEP_KEYS | {'absent'}))})"
                )
        raw_spec = self._raw_spec(raw, where)
        min_count: int = 1
        max_count: int | None = 1
        has_times = raw.get("times") is not None
        has_at_least = raw.get("at_least") is not None
        if has_times and has_at_least:
            self.err(f"{where}: 'times' and 'at_least' are mutually exclusive")
        elif has_times:
            times = _positive_int(raw["times"], f"{where}.times", self.errors)
            if times is not None:
                min_count = max_count = times
        elif has_at_least:
            at_least = _positive_int(raw["at_least"], f"{where}.at_least", self.errors)
            if at_least is not None:
                min_count, max_count = at_least, None
        strict = False
        contiguity = raw.get("contiguity", "relaxed")
        if contiguity not in ("relaxed", "strict"):
            self.err(f"{where}.contiguity: expected 'relaxed' or 'strict', got {contiguity!r}")
        elif contiguity == "strict":
            strict = True
            if i == 0 and max_count == 1:
                self.err(
                    f"{where}.contiguity: 'strict' on the first step needs 'times' or "
                    "'at_least' > 1 (it only applies between the step's own repetitions)"
                )
            elif i > 0 and absent[i - 1]:
                self.err(f"{where}.contiguity: 'strict' cannot follow an absent step")
        within_ms = None
        if raw.get("within") is not None:
            if i == 0:
                self.err(
                    f"{where}.within: the first step has no previous step (use the rule's 'within')"
                )
            else:
                within_ms = _duration_ms(
                    raw["within"], f"{where}.within", self.errors, positive=True
                )
        spec = self._spec(raw_spec, i, absent) if raw_spec is not None else None
        if spec is None or len(self.errors) > start:
            return None
        return Step(
            index=i,
            key=str(i),
            absent=False,
            spec=spec,
            strict=strict,
            min_count=min_count,
            max_count=max_count,
            within_ms=within_ms,
        )

    def _raw_spec(self, raw: Mapping[str, Any], where: str) -> _RawSpec | None:
        ok = True
        ev_type = raw.get("type")
        if ev_type is not None and (not isinstance(ev_type, str) or ev_type not in EVENT_TYPES):
            self.err(
                f"{where}.type: expected one of {', '.join(sorted(EVENT_TYPES))}, got {ev_type!r}"
            )
            ok = False
        event = raw.get("event")
        if event is not None and (not isinstance(event, str) or not event.strip()):
            self.err(f"{where}.event: expected a non-empty string, got {event!r}")
            ok = False
        name = raw.get("name")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            self.err(f"{where}.name: expected a non-empty string, got {name!r}")
            ok = False
        if ok and ev_type is None and event is None and name is None:
            self.err(f"{where}: step needs 'event', 'type' or 'name'")
            ok = False
        if event is not None and ev_type is None:
            ev_type = "track"
        if not ok:
            return None
        return _RawSpec(ev_type, event, name, raw.get("where"), f"{where}.where")

    def _spec(self, raw: _RawSpec, i: int, absent: list[bool]) -> EventSpec | None:
        conditions: list[Condition] = []
        refs: list[StepRef] = []
        ok = True
        if raw.where is not None:
            if not isinstance(raw.where, dict):
                self.err(f"{raw.where_key}: expected a mapping of path -> condition")
                return None
            for key, cond in raw.where.items():
                if not self._condition(
                    key, cond, f"{raw.where_key}.{key}", i, absent, conditions, refs
                ):
                    ok = False
        if not ok:
            return None
        return EventSpec(raw.type, raw.event, raw.name, tuple(conditions), tuple(refs))

    def _condition(
        self,
        key: Any,
        cond: Any,
        where: str,
        i: int,
        absent: list[bool],
        conditions: list[Condition],
        refs: list[StepRef],
    ) -> bool:
        if not isinstance(key, str):
            self.err(f"{where}: a where key must be a path string")
            return False
        try:
            path = compile_path(key).text
        except ValueError as exc:
            self.err(f"{where}: {exc}")
            return False
        if not isinstance(cond, dict):
            if not _is_json(cond):
                self.err(f"{where}: {_NOT_JSON} {cond!r}")
                return False
            conditions.append(Condition(path, "eq", cond, _eq_test(cond)))
            return True
        if not cond:
            self.err(f"{where}: empty condition (expected one of {_EXPECTED_OPS})")
            return False
        ok = True
        for op in cond:
            if op != "path" and op not in OPERATORS:
                self.err(f"{where}: unknown operator {op!r} (expected one of {_EXPECTED_OPS})")
                ok = False
        if not ok:
            return False
        step_ops = [op for op in ("eq_step", "ne_step") if op in cond]
        if len(step_ops) > 1:
            self.err(f"{where}: 'eq_step' and 'ne_step' cannot be combined in one condition")
            return False
        if "path" in cond and not step_ops:
            self.err(f"{where}.path: only valid together with 'eq_step' or 'ne_step'")
            return False
        for op, operand in cond.items():
            if op == "path":
                continue
            if op in ("eq_step", "ne_step"):
                ref = self._step_ref(op, operand, cond.get("path", key), path, where, i, absent)
                if ref is None:
                    ok = False
                else:
                    refs.append(ref)
                continue
            test = self._operator(op, operand, f"{where}.{op}")
            if test is None:
                ok = False
            else:
                conditions.append(Condition(path, op, operand, test))
        return ok

    def _operator(self, op: str, operand: Any, where: str) -> Callable[[Any], bool] | None:
        if not _is_json(operand):
            self.err(f"{where}: {_NOT_JSON} {operand!r}")
            return None
        if op == "eq":
            return _eq_test(operand)
        if op == "ne":
            return _negate(_eq_test(operand))
        if op in ("gt", "gte", "lt", "lte"):
            if not (_is_number(operand) or type(operand) is str):
                self.err(f"{where}: expected a number or a string, got {operand!r}")
                return None
            return _order_test(op, operand)
        if op in ("in", "not_in"):
            if not isinstance(operand, list):
                self.err(f"{where}: expected a list, got {operand!r}")
                return None
            test = _in_test(operand)
            return test if op == "in" else _negate(test)
        if op == "contains":
            if isinstance(operand, dict | list):
                self.err(f"{where}: expected a scalar (string, number, boolean or null)")
                return None
            return _contains_test(operand)
        if op == "exists":
            if type(operand) is not bool:
                self.err(f"{where}: expected true or false, got {operand!r}")
                return None
            return _exists_test(operand)
        # regex
        if not isinstance(operand, str):
            self.err(f"{where}: expected a regular expression string, got {operand!r}")
            return None
        try:
            pattern = re.compile(operand)
        except re.error as exc:
            self.err(f"{where}: invalid regular expression {operand!r}: {exc}")
            return None
        return _regex_test(pattern)

    def _step_ref(
        self,
        op: str,
        operand: Any,
        ref_path_raw: Any,
        path: str,
        where: str,
        i: int,
        absent: list[bool],
    ) -> StepRef | None:
        if type(operand) is not int or operand < 0:
            self.err(f"{where}.{op}: expected a step index (integer >= 0), got {operand!r}")
            return None
        if operand >= i:
            self.err(
                f"{where}.{op}: must refer to an earlier step (this is steps[{i}], "
                f"got steps[{operand}])"
            )
            return None
        if absent[operand]:
            self.err(f"{where}.{op}: steps[{operand}] is an absent step and matches no event")
            return None
        if not isinstance(ref_path_raw, str):
            self.err(f"{where}.path: expected a path string, got {ref_path_raw!r}")
            return None
        try:
            ref_path = compile_path(ref_path_raw).text
        except ValueError as exc:
            self.err(f"{where}.path: {exc}")
            return None
        return StepRef(path, operand, str(operand), ref_path, negate=(op == "ne_step"))

    # -- data --------------------------------------------------------------------------------

    def _data(self, raw_data: Mapping[Any, Any], raw_steps: list[Any]) -> tuple[DataItem, ...]:
        n = len(raw_steps)
        items: list[DataItem] = []
        expected = "expected 'steps[N].<path>' or {value: ...}"
        for key, value in raw_data.items():
            where = f"{self.prefix}.data.{key}"
            if not isinstance(key, str) or not key:
                self.err(f"{where}: data keys must be non-empty strings")
                continue
            if isinstance(value, dict):
                if set(value) != {"value"}:
                    self.err(f"{where}: {expected}")
                    continue
                if not _is_json(value["value"]):
                    self.err(f"{where}.value: {_NOT_JSON} {value['value']!r}")
                    continue
                items.append(DataItem(key, None, None, None, value["value"]))
                continue
            m = _DATA_REF.fullmatch(value) if isinstance(value, str) else None
            if m is None:
                self.err(f"{where}: {expected}, got {value!r}")
                continue
            step = int(m.group(1))
            if step < 0 or step >= n:
                self.err(f"{where}: unknown step reference steps[{step}] (rule has {n} steps)")
                continue
            if isinstance(raw_steps[step], dict) and "absent" in raw_steps[step]:
                self.err(f"{where}: steps[{step}] is an absent step and has no event")
                continue
            try:
                path = compile_path(m.group(2)).text
            except ValueError as exc:
                self.err(f"{where}: {exc}")
                continue
            items.append(DataItem(key, step, str(step), path))
        return tuple(items)

    @staticmethod
    def _with_captures(steps: tuple[Step, ...], data: tuple[DataItem, ...]) -> tuple[Step, ...]:
        needed: dict[int, dict[str, None]] = {}
        for step in steps:
            for ref in step.spec.step_refs:
                needed.setdefault(ref.ref_step, {})[ref.ref_path] = None
        for item in data:
            if item.step is not None and item.path is not None:
                needed.setdefault(item.step, {})[item.path] = None
        out = []
        for step in steps:
            paths = needed.get(step.index)
            if paths:
                step = Step(
                    index=step.index,
                    key=step.key,
                    absent=step.absent,
                    spec=step.spec,
                    strict=step.strict,
                    min_count=step.min_count,
                    max_count=step.max_count,
                    within_ms=step.within_ms,
                    for_ms=step.for_ms,
                    capture_paths=tuple(paths),
                )
            out.append(step)
        return tuple(out)


def _engine_settings(cfg: Any, errors: list[str]) -> tuple[int, int, str | None]:
    lateness = DEFAULT_ALLOWED_LATENESS_MS
    max_partials = DEFAULT_MAX_PARTIAL_MATCHES
    late_topic: str | None = None
    if cfg is None:
        return lateness, max_partials, late_topic
    if not isinstance(cfg, dict):
        errors.append("rule_engine: expected a mapping")
        return lateness, max_partials, late_topic
    for key in cfg:
        if key not in _ENGINE_KEYS:
            expected = ", ".join(sorted(_ENGINE_KEYS))
            errors.append(f"rule_engine.{key}: unknown key (expected one of {expected})")
    if cfg.get("allowed_lateness") is not None:
        ms = _duration_ms(
            cfg["allowed_lateness"], "rule_engine.allowed_lateness", errors, positive=False
        )
        if ms is not None:
            lateness = ms
    if cfg.get("max_partial_matches") is not None:
        value = _positive_int(cfg["max_partial_matches"], "rule_engine.max_partial_matches", errors)
        if value is not None:
            max_partials = value
    topic = cfg.get("late_topic")
    if topic is not None:
        if not isinstance(topic, str) or not topic.strip():
            errors.append(f"rule_engine.late_topic: expected a non-empty string, got {topic!r}")
        else:
            late_topic = topic
    return lateness, max_partials, late_topic


def parse_rules(rules: list[dict[str, Any]] | None, engine_cfg: dict[str, Any] | None) -> RuleSet:
    """Validate and compile ``rules:`` and ``rule_engine:``; raises :class:`RuleConfigError`."""
    errors: list[str] = []
    compiled: list[Rule] = []
    if rules is None:
        rules = []
    if not isinstance(rules, list):
        errors.append("rules: expected a list of rules")
        rules = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(rules):
        if not isinstance(raw, dict):
            errors.append(f"rules[{index}]: expected a mapping")
            continue
        name = raw.get("name")
        if isinstance(name, str) and name.strip():
            if name in seen:
                errors.append(
                    f"rules[{index}] ({name}).name: duplicate rule name {name!r} "
                    f"(also rules[{seen[name]}])"
                )
            else:
                seen[name] = index
        rule = _RuleParser(index, raw, errors).parse()
        if rule is not None:
            compiled.append(rule)
    lateness, max_partials, late_topic = _engine_settings(engine_cfg, errors)
    if errors:
        raise RuleConfigError(errors)
    return RuleSet(
        rules=tuple(compiled),
        allowed_lateness_ms=lateness,
        max_partial_matches=max_partials,
        late_topic=late_topic,
    )
