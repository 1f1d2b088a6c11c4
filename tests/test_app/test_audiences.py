"""Unit tests for app/audiences.py and the ``audiences:`` settings model."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from app.audiences import (
    AudienceMap,
    AudienceRule,
    AudienceSignal,
    ListOperation,
    audience_signals,
    snake_case,
)
from app.settings import AudienceMapping, ConfigError, redacted_dict, settings_from_mapping

# -- snake_case -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("vip_customers", "vip_customers"),
        ("VIP Customers", "vip_customers"),
        ("VIP customers!", "vip_customers"),
        ("vipCustomers", "vip_customers"),
        ("VIPCustomers", "vip_customers"),
        ("Big-Spenders (30 days)", "big_spenders_30_days"),
        ("  cart   abandoners ", "cart_abandoners"),
        ("segment_v2", "segment_v2"),
        ("__x__", "x"),
        ("!!", ""),
        ("", ""),
    ],
)
def test_snake_case(text: str, expected: str) -> None:
    assert snake_case(text) == expected
    assert snake_case(expected) == expected  # idempotent


# -- detection: identify form -----------------------------------------------------------------


def personas(key: str | None = "vip_customers", cls: str = "audience") -> dict[str, Any]:
    p: dict[str, Any] = {"computation_class": cls, "computation_id": "aud_1",
                         "space_id": "spa_1", "namespace": "spa_1"}
    if key is not None:
        p["computation_key"] = key
    return p


def identify(traits: dict[str, Any], p: dict[str, Any] | None) -> dict[str, Any]:
    ev: dict[str, Any] = {"type": "identify", "userId": "u1", "traits": traits,
                          "integrations": {"All": False, "Emarsys": True}}
    if p is not None:
        ev["context"] = {"personas": p}
    return ev


def track(name: str, props: dict[str, Any], p: dict[str, Any] | None = None) -> dict[str, Any]:
    ev: dict[str, Any] = {"type": "track", "event": name, "userId": "u1", "properties": props,
                          "context": {"traits": {"email": "a@b.c"}}}
    if p is not None:
        ev["context"]["personas"] = p
    return ev


def test_identify_entry_and_exit() -> None:
    entry = identify({"email": "a@b.c", "vip_customers": True}, personas())
    exit_ = identify({"email": "a@b.c", "vip_customers": False}, personas())
    assert audience_signals(entry) == [AudienceSignal("vip_customers", True, "identify")]
    assert audience_signals(exit_) == [AudienceSignal("vip_customers", False, "identify")]


def test_identify_trait_matched_by_snake_case_of_computation_key() -> None:
    ev = identify({"email": "a@b.c", "vip_customers": True}, personas("VIP Customers"))
    assert audience_signals(ev) == [AudienceSignal("vip_customers", True, "identify")]


def test_identify_without_computation_key_uses_the_only_boolean_trait() -> None:
    ev = identify({"email": "a@b.c", "Big Spenders": True, "n": 3}, personas(None))
    assert audience_signals(ev) == [AudienceSignal("big_spenders", True, "identify")]
    two = identify({"a": True, "b": False}, personas(None))
    assert audience_signals(two) == []


@pytest.mark.parametrize(
    "ev",
    [
        identify({"vip_customers": True}, None),  # no context.personas: just a trait
        identify({"vip_customers": True}, personas(cls="trait")),  # computed trait
        identify({"vip_customers": "true"}, personas()),  # not a boolean
        identify({"other": True}, personas()),  # computation_key's trait absent
        {"type": "identify", "userId": "u", "context": {"personas": "x"}},
        {"type": "page", "userId": "u", "context": {"personas": personas()}},
    ],
)
def test_identify_without_audience_signal(ev: dict[str, Any]) -> None:
    assert audience_signals(ev) == []


# -- detection: track form --------------------------------------------------------------------


def test_track_entered_and_exited() -> None:
    entered = track("Audience Entered", {"audience_key": "vip_customers", "vip_customers": True})
    exited = track("Audience Exited", {"audience_key": "vip_customers", "vip_customers": False})
    assert audience_signals(entered) == [AudienceSignal("vip_customers", True, "track")]
    assert audience_signals(exited) == [AudienceSignal("vip_customers", False, "track")]


def test_track_key_is_snake_cased_and_falls_back_to_personas() -> None:
    assert audience_signals(track("Audience Entered", {"audience_key": "VIP Customers"})) == [
        AudienceSignal("vip_customers", True, "track")
    ]
    ev = track("Audience Exited", {}, personas("cart_abandoners"))
    assert audience_signals(ev) == [AudienceSignal("cart_abandoners", False, "track")]


@pytest.mark.parametrize(
    "ev",
    [
        track("Audience Entered", {}),  # no key anywhere
        track("Audience Entered", {"audience_key": 7}),
        track("Audience Entered", {"audience_key": "  "}),
        track("Trait Computed", {"trait_key": "ltv", "ltv": 120}, personas("ltv", "trait")),
        track("Order Completed", {"audience_key": "vip_customers"}),
    ],
)
def test_track_without_audience_signal(ev: dict[str, Any]) -> None:
    assert audience_signals(ev) == []


# -- AudienceMap ------------------------------------------------------------------------------


def test_explicit_key_wins_over_wildcard_and_keys_compare_in_snake_case() -> None:
    amap = AudienceMap(
        [
            AudienceRule("VIP Customers", contact_list_id=77, field_id=5001,
                         field_values={True: "yes", False: "no"}),
            AudienceRule("*", contact_list_name="Segment {key}", create_missing=True),
        ]
    )
    vip = amap.target("vip_customers")
    assert vip is not None
    assert (vip.audience, vip.list_id, vip.list_name, vip.field_id) == (
        "vip_customers", 77, None, "5001")
    assert vip.field_values == {True: "yes", False: "no"}
    assert amap.target("vipCustomers") == vip
    other = amap.target("cart_abandoners")
    assert other is not None
    assert (other.list_id, other.list_name, other.create_missing, other.field_id) == (
        None, "Segment cart_abandoners", True, None)
    assert other.field_values == {True: 1, False: 2}


def test_without_wildcard_unmapped_audiences_have_no_target() -> None:
    amap = AudienceMap.from_config([{"key": "vip_customers", "contact_list_id": 77}])
    assert amap
    assert amap.target("vip_customers") is not None
    assert amap.target("cart_abandoners") is None
    assert not AudienceMap([])


def test_map_from_settings_models() -> None:
    settings = settings_from_mapping(config(
        [{"key": "vip_customers", "contact_list_id": 77, "field_id": 5001}]), {})
    amap = AudienceMap.from_config(settings.audiences)
    target = amap.target("vip_customers")
    assert target is not None and target.field_values == {True: 1, False: 2}
    assert target.has_list


# -- ListOperation ----------------------------------------------------------------------------


def test_list_operation_shape_and_round_trip() -> None:
    op = ListOperation("a@b.c", "3", 77, None, False, "add", "vip_customers", 1000)
    assert op.to_op() == {
        "op": "list_membership", "primary_key": "a@b.c", "key_id": "3", "list_id": 77,
        "create_missing": False, "action": "add", "audience": "vip_customers",
        "event_time_ms": 1000,
    }
    assert ListOperation.from_op(op.to_op()) == op
    named = ListOperation("a@b.c", "3", None, "VIP", True, "delete", "vip", 5)
    assert named.to_op()["list_name"] == "VIP" and "list_id" not in named.to_op()
    assert ListOperation.from_op(named.to_op()) == named
    assert named.list_ref == ("name", "VIP") and op.list_ref == ("id", 77)


@pytest.mark.parametrize(
    "patch",
    [{"action": "move"}, {"list_id": None}, {"list_id": 0}, {"primary_key": ""},
     {"event_time_ms": "x"}],
)
def test_list_operation_from_bad_op(patch: dict[str, Any]) -> None:
    op = ListOperation("a@b.c", "3", 77, None, False, "add", "v", 1).to_op()
    op.update(patch)
    with pytest.raises((ValueError, KeyError, TypeError)):
        ListOperation.from_op(op)


# -- settings ---------------------------------------------------------------------------------


def config(audiences: Any, **extra: Any) -> dict[str, Any]:
    return {
        "emarsys": {"auth": {"type": "wsse", "username": "u", "secret": "s"}},
        "identity": {"primary_key": {"paths": ["traits.email"], "field_id": 3}},
        "data_map": [{"from": "traits.firstName", "field_id": 1}],
        "audiences": audiences,
        **extra,
    }


def errors_of(audiences: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(config(audiences), {})
    return info.value.errors


def test_documented_yaml_shape_loads() -> None:
    audiences = yaml.safe_load(
        """
        - key: vip_customers
          contact_list_id: 77
          field_id: 5001
          field_values: {true: 1, false: 2}
        - key: VIP customers (EU)
          contact_list_name: "VIP customers"
          create_missing: true
        - key: "*"
          contact_list_name: "Segment: {key}"
          create_missing: true
        """
    )
    s = settings_from_mapping(config(audiences), {})
    assert s.audiences == [
        AudienceMapping(key="vip_customers", contact_list_id=77, field_id=5001,
                        field_values={True: 1, False: 2}),
        AudienceMapping(key="vip_customers_eu", contact_list_name="VIP customers",
                        create_missing=True),
        AudienceMapping(key="*", contact_list_name="Segment: {key}", create_missing=True),
    ]
    assert redacted_dict(s)["audiences"][0]["field_values"] == {"true": 1, "false": 2}


def test_no_audiences_and_null_mean_empty() -> None:
    assert settings_from_mapping(config(None), {}).audiences == []
    assert settings_from_mapping(config([]), {}).audiences == []


def test_field_values_keep_their_types() -> None:
    s = settings_from_mapping(
        config([{"key": "a", "field_id": 9, "field_values": {True: "yes", False: 0}}]), {})
    assert s.audiences[0].field_values == {True: "yes", False: 0}


def test_entry_errors_name_the_key_path() -> None:
    assert errors_of(
        [
            {"key": "a", "contact_list_id": 1, "contact_list_name": "A"},
            {"key": "b"},
            {"key": "c", "contact_list_id": 2, "create_missing": True},
            {"key": "d", "contact_list_id": 3, "field_values": {True: 1, False: 2}},
            {"key": "e", "field_id": 9, "field_values": {True: 1}},
            {"key": "!!", "contact_list_id": 4},
            {"key": "f", "contact_list_id": 0, "colour": "red"},
            {"contact_list_id": 5},
            "vip",
        ]
    ) == [
        "audiences[0].contact_list_name: give contact_list_id or contact_list_name, not both",
        "audiences[1].contact_list_id: missing required key (an audience needs "
        "contact_list_id, contact_list_name or field_id)",
        "audiences[2].create_missing: only allowed with contact_list_name",
        "audiences[3].field_values: only allowed with field_id",
        "audiences[4].field_values: needs a value for both true and false (missing: false)",
        "audiences[5].key: invalid audience key '!!' (expected the audience key, e.g. "
        "vip_customers, or '*')",
        "audiences[6].contact_list_id: must be > 0 (got 0)",
        "audiences[6].colour: unknown key (allowed keys: key, contact_list_id, "
        "contact_list_name, create_missing, field_id, field_values)",
        "audiences[7].key: missing required key",
        "audiences[8]: expected a mapping, got string 'vip'",
    ]


def test_wildcard_needs_a_list_name_per_audience() -> None:
    assert errors_of(
        [
            {"key": "*", "contact_list_id": 1},
            {"key": "*", "contact_list_name": "All audiences"},
            {"key": "*", "contact_list_name": "Seg {key}", "field_id": 9},
        ]
    ) == [
        "audiences[0].contact_list_id: not allowed with key '*' (every audience would share "
        "one list); use contact_list_name with {key}, e.g. 'Segment {key}'",
        "audiences[1].contact_list_name: with key '*' the name must contain {key} (replaced "
        "by the audience key)",
        "audiences[2].field_id: not allowed with key '*' (every audience would share one field)",
    ]


def test_cross_entry_errors() -> None:
    assert errors_of(
        [
            {"key": "vip_customers", "contact_list_id": 1},
            {"key": "VIP Customers", "contact_list_id": 2},
            {"key": "*", "contact_list_name": "{key}"},
            {"key": "*", "contact_list_name": "x {key}"},
            {"key": "a", "field_id": 3},
            {"key": "b", "field_id": 1},
            {"key": "c", "field_id": 9},
            {"key": "d", "field_id": 9},
        ]
    ) == [
        "audiences[1].key: duplicate audience key 'vip_customers' (already mapped by "
        "audiences[0])",
        "audiences[3].key: duplicate audience key '*' (already mapped by audiences[2])",
        "audiences[4].field_id: field 3 is the contact key (identity.primary_key.field_id)",
        "audiences[5].field_id: field 1 is also mapped by data_map[0]",
        "audiences[7].field_id: duplicate field_id 9 (already used by audiences[6])",
    ]


def test_audiences_must_be_a_list() -> None:
    assert errors_of({"key": "vip"}) == ["audiences: expected a list, got mapping"]
