"""Segment Engage audiences -> Emarsys contact lists (pure, no I/O).

Engage tells a destination about audience membership in one of two forms
(``/work/shared/reference/segment-spec.md``, "Engage"):

* **identify** (user-property destinations): the trait named after the audience
  (snake_cased) is ``true`` on entry and ``false`` on exit, and ``context.personas``
  carries ``computation_class: audience`` and ``computation_key`` (the audience key);
* **track** (event destinations): ``Audience Entered`` / ``Audience Exited`` with
  ``properties.audience_key``.

:func:`audience_signals` reads either form into :class:`AudienceSignal` values. An
:class:`AudienceMap` (built from the ``audiences:`` config) says what a signal for an
audience does: add the contact to / delete it from an Emarsys contact list (by id, or by
name, optionally creating the list) and optionally write a contact field.
:class:`ListOperation` is the ``list_membership`` record of the ``emarsys-operations``
topic (shape documented in README "Topics").

Audience keys are compared in snake_case (:func:`snake_case`, idempotent), so a config key
``VIP Customers`` matches the Engage key ``vip_customers``.

Computed traits (``computation_class: trait`` identifies, ``Trait Computed`` tracks) are
not audiences: they reach Emarsys through the data map like any other trait.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = [
    "AUDIENCE_ENTERED",
    "AUDIENCE_EXITED",
    "DEFAULT_FIELD_VALUES",
    "KEY_PLACEHOLDER",
    "LIST_OP",
    "TRAIT_COMPUTED",
    "WILDCARD",
    "AudienceMap",
    "AudienceRule",
    "AudienceSignal",
    "AudienceTarget",
    "ListAction",
    "ListOperation",
    "audience_signals",
    "snake_case",
]

AUDIENCE_ENTERED: Final = "Audience Entered"
AUDIENCE_EXITED: Final = "Audience Exited"
TRAIT_COMPUTED: Final = "Trait Computed"
#: ``key: "*"``: the mapping for every audience without a mapping of its own.
WILDCARD: Final = "*"
#: Replaced by the audience key in ``contact_list_name``.
KEY_PLACEHOLDER: Final = "{key}"
#: ``op`` of a list membership record on ``emarsys-operations``.
LIST_OP: Final = "list_membership"
#: Emarsys single-choice convention (as field 31, opt-in): 1 = true, 2 = false.
DEFAULT_FIELD_VALUES: Final[Mapping[bool, Any]] = {True: 1, False: 2}

ListAction = Literal["add", "delete"]

# Word boundaries inside a run of letters/digits: "vipCustomers", "VIPCustomers".
_CAMEL_RE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SEPARATORS_RE = re.compile(r"[^0-9A-Za-z]+")


def snake_case(text: str) -> str:
    """``"VIP Customers"`` -> ``"vip_customers"``; ``"vipCustomers"`` -> ``"vip_customers"``.

    Words are runs of ASCII letters and digits, split at every other character and at
    lower/upper-case boundaries; digits stay attached (``"segment_v2"`` is unchanged).
    Idempotent: a snake_cased key maps to itself. ``""`` when there is no word at all.
    """
    words = _SEPARATORS_RE.split(_CAMEL_RE.sub("_", text))
    return "_".join(word.lower() for word in words if word)


# ------------------------------------------------------------------------------ detection


@dataclass(frozen=True, slots=True)
class AudienceSignal:
    """The contact is (``member``) or is no longer a member of ``audience`` (snake_cased)."""

    audience: str
    member: bool
    form: Literal["identify", "track"]


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _key(value: Any) -> str | None:
    if isinstance(value, str):
        key = snake_case(value)
        return key or None
    return None


def audience_signals(event: Mapping[str, Any]) -> list[AudienceSignal]:
    """Audience entries/exits carried by one Segment event (usually none, at most one).

    * track ``Audience Entered`` / ``Audience Exited``: the audience is
      ``properties.audience_key`` (else ``context.personas.computation_key``); entered means
      member, exited means not.
    * identify with ``context.personas.computation_class == "audience"``: the boolean trait
      named ``computation_key`` (or whose snake_case equals it); without a
      ``computation_key``, the identify's only boolean trait. A non-boolean value is no
      signal.

    Anything else (including computed traits) yields ``[]``.
    """
    ev_type = event.get("type")
    personas = _dict(_dict(event.get("context")).get("personas"))
    if ev_type == "track":
        name = event.get("event")
        if name != AUDIENCE_ENTERED and name != AUDIENCE_EXITED:
            return []
        props = _dict(event.get("properties"))
        key = _key(props.get("audience_key")) or _key(personas.get("computation_key"))
        if key is None:
            return []
        return [AudienceSignal(key, name == AUDIENCE_ENTERED, "track")]
    if ev_type != "identify" or personas.get("computation_class") != "audience":
        return []
    traits = _dict(event.get("traits"))
    computation_key = personas.get("computation_key")
    if isinstance(computation_key, str) and computation_key.strip():
        value = traits.get(computation_key)
        if isinstance(value, bool):
            key = _key(computation_key)
            return [] if key is None else [AudienceSignal(key, value, "identify")]
        wanted = snake_case(computation_key)
        for name, value in traits.items():
            if isinstance(value, bool) and snake_case(name) == wanted and wanted:
                return [AudienceSignal(wanted, value, "identify")]
        return []
    booleans = [(name, value) for name, value in traits.items() if isinstance(value, bool)]
    if len(booleans) != 1:
        return []
    key = _key(booleans[0][0])
    return [] if key is None else [AudienceSignal(key, booleans[0][1], "identify")]


# ------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class AudienceRule:
    """One ``audiences`` config entry (validated by :class:`app.settings.AudienceMapping`)."""

    key: str
    contact_list_id: int | None = None
    contact_list_name: str | None = None
    create_missing: bool = False
    field_id: int | None = None
    field_values: Mapping[bool, Any] | None = None

    @classmethod
    def from_config(cls, item: Any) -> AudienceRule:
        """From a settings ``AudienceMapping``-like object or a plain dict."""
        get = item.get if isinstance(item, Mapping) else (lambda k, d=None: getattr(item, k, d))
        values = get("field_values")
        return cls(
            key=str(get("key")),
            contact_list_id=get("contact_list_id"),
            contact_list_name=get("contact_list_name"),
            create_missing=bool(get("create_missing", False)),
            field_id=get("field_id"),
            field_values=None if values is None else dict(values),
        )


@dataclass(frozen=True, slots=True)
class AudienceTarget:
    """What a signal for ``audience`` does. ``list_name`` has ``{key}`` already replaced."""

    audience: str
    list_id: int | None
    list_name: str | None
    create_missing: bool
    field_id: str | None
    field_values: Mapping[bool, Any]

    @property
    def has_list(self) -> bool:
        return self.list_id is not None or self.list_name is not None


class AudienceMap:
    """Audience key -> :class:`AudienceTarget`; an explicit key wins over ``"*"``."""

    def __init__(self, rules: Iterable[AudienceRule]) -> None:
        self._rules: dict[str, AudienceRule] = {}
        self._wildcard: AudienceRule | None = None
        self._cache: dict[str, AudienceTarget | None] = {}
        for rule in rules:
            if rule.key == WILDCARD:
                self._wildcard = rule
            else:
                self._rules.setdefault(snake_case(rule.key), rule)

    @classmethod
    def from_config(cls, items: Iterable[Any]) -> AudienceMap:
        return cls(AudienceRule.from_config(item) for item in items)

    def __bool__(self) -> bool:
        return bool(self._rules) or self._wildcard is not None

    def target(self, audience: str) -> AudienceTarget | None:
        """The target for ``audience`` (any spelling; compared in snake_case), or None."""
        key = snake_case(audience)
        try:
            return self._cache[key]
        except KeyError:
            pass
        rule = self._rules.get(key, self._wildcard)
        target = None if rule is None or not key else _target(key, rule)
        if len(self._cache) < 10_000:
            self._cache[key] = target
        return target


def _target(key: str, rule: AudienceRule) -> AudienceTarget:
    name = rule.contact_list_name
    return AudienceTarget(
        audience=key,
        list_id=rule.contact_list_id,
        list_name=None if name is None else name.replace(KEY_PLACEHOLDER, key),
        create_missing=rule.create_missing,
        field_id=None if rule.field_id is None else str(rule.field_id),
        field_values=dict(rule.field_values or DEFAULT_FIELD_VALUES),
    )


# ------------------------------------------------------------------------------ operations


@dataclass(frozen=True, slots=True)
class ListOperation:
    """Add ``primary_key`` to / delete it from a contact list (by id, or by name)."""

    primary_key: str
    key_id: str
    list_id: int | None
    list_name: str | None
    create_missing: bool
    action: ListAction
    audience: str
    event_time_ms: int

    @property
    def list_ref(self) -> tuple[str, int | str]:
        """``("id", 77)`` or ``("name", "VIP customers")``."""
        if self.list_id is not None:
            return ("id", self.list_id)
        assert self.list_name is not None
        return ("name", self.list_name)

    def to_op(self) -> dict[str, Any]:
        """The ``emarsys-operations`` record (README "Topics"): ``list_id`` or ``list_name``."""
        op: dict[str, Any] = {
            "op": LIST_OP,
            "primary_key": self.primary_key,
            "key_id": self.key_id,
        }
        if self.list_id is not None:
            op["list_id"] = self.list_id
        else:
            op["list_name"] = self.list_name
        op["create_missing"] = self.create_missing
        op["action"] = self.action
        op["audience"] = self.audience
        op["event_time_ms"] = self.event_time_ms
        return op

    @classmethod
    def from_op(cls, op: Mapping[str, Any]) -> ListOperation:
        """Inverse of :meth:`to_op`; ``ValueError`` / ``KeyError`` / ``TypeError`` if bad."""
        action = op["action"]
        if action != "add" and action != "delete":
            raise ValueError(f"unknown list action {action!r} (expected add|delete)")
        list_id = op.get("list_id")
        list_name = op.get("list_name")
        if list_id is not None:
            if isinstance(list_id, bool) or int(list_id) <= 0:
                raise ValueError(f"invalid list_id {list_id!r}")
            list_id = int(list_id)
            list_name = None
        elif not isinstance(list_name, str) or not list_name:
            raise ValueError("list_membership needs list_id or list_name")
        pk = op["primary_key"]
        if not isinstance(pk, str) or not pk:
            raise ValueError("list_membership without a primary_key")
        return cls(
            primary_key=pk,
            key_id=str(op["key_id"]),
            list_id=list_id,
            list_name=list_name,
            create_missing=bool(op.get("create_missing", False)),
            action=action,
            audience=str(op.get("audience") or ""),
            event_time_ms=int(op["event_time_ms"]),
        )
