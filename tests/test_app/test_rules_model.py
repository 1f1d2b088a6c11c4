from __future__ import annotations

import copy
import datetime
from typing import Any

import pytest
import yaml

from app.rules import RuleConfigError, RuleSet, parse_rules
from app.rules.model import DEFAULT_ALLOWED_LATENESS_MS, DEFAULT_MAX_PARTIAL_MATCHES

CART_YAML = """
rules:
  - name: cart_abandonment
    emarsys_event_id: 4711
    within: 2h
    steps:
      - event: Product Viewed
        where:
          properties.category: {in: [shoes, boots]}
          properties.price: {gt: 0}
      - event: Product Added
        where: {properties.sku: {eq_step: 0, path: properties.sku}}
      - absent: Order Completed
        for: 1h
    data:
      sku: steps[1].properties.sku
      cart_value: steps[1].properties.value
    once_per: 24h
rule_engine:
  allowed_lateness: 5m
  max_partial_matches: 100
  late_topic: segment.events.late
"""


def cart_config() -> dict[str, Any]:
    cfg = yaml.safe_load(CART_YAML)
    assert isinstance(cfg, dict)
    return cfg


def errors_of(rules: Any, engine: Any = None) -> list[str]:
    with pytest.raises(RuleConfigError) as exc_info:
        parse_rules(rules, engine)
    return exc_info.value.errors


def one_rule(**overrides: Any) -> list[dict[str, Any]]:
    rule: dict[str, Any] = {
        "name": "x",
        "emarsys_event_id": 1,
        "steps": [{"event": "A"}, {"event": "B"}],
    }
    rule.update(overrides)
    return [rule]


def test_parse_cart_abandonment_example() -> None:
    cfg = cart_config()
    ruleset = parse_rules(cfg["rules"], cfg["rule_engine"])
    assert isinstance(ruleset, RuleSet)
    assert ruleset.allowed_lateness_ms == 5 * 60_000
    assert ruleset.max_partial_matches == 100
    assert ruleset.late_topic == "segment.events.late"
    rule = ruleset.rule("cart_abandonment")
    assert rule.emarsys_event_id == 4711
    assert rule.within_ms == 2 * 3_600_000
    assert rule.once_per_ms == 24 * 3_600_000
    viewed, added, absent = rule.steps
    assert (viewed.spec.type, viewed.spec.event) == ("track", "Product Viewed")
    assert [c.op for c in viewed.spec.conditions] == ["in", "gt"]
    assert added.spec.step_refs[0].ref_step == 0
    assert absent.absent and absent.for_ms == 3_600_000
    # Only what eq_step / data need is captured per step.
    assert viewed.capture_paths == ("properties.sku",)
    assert set(added.capture_paths) == {"properties.sku", "properties.value"}
    assert absent.capture_paths == ()
    assert [d.key for d in rule.data] == ["sku", "cart_value"]
    view_keys = [text for text, _ in ruleset.view_paths]
    assert view_keys[:3] == ["type", "event", "name"]
    assert set(view_keys) == {
        "type",
        "event",
        "name",
        "properties.category",
        "properties.price",
        "properties.sku",
        "properties.value",
    }


def test_engine_defaults_and_empty_rules() -> None:
    ruleset = parse_rules([], None)
    assert ruleset.rules == ()
    assert ruleset.allowed_lateness_ms == DEFAULT_ALLOWED_LATENESS_MS == 300_000
    assert ruleset.max_partial_matches == DEFAULT_MAX_PARTIAL_MATCHES == 100
    assert ruleset.late_topic is None
    assert parse_rules(None, {}).rules == ()


def test_step_forms_and_quantifiers() -> None:
    ruleset = parse_rules(
        [
            {
                "name": "forms",
                "emarsys_event_id": 2,
                "steps": [
                    {"type": "page", "name": "Pricing", "times": 3, "contiguity": "strict"},
                    {"type": "identify"},
                    {"type": "screen", "event": "Odd"},
                    {"name": "Home", "at_least": 2, "within": "10m"},
                    {"absent": {"type": "page", "name": "Checkout"}},
                    {"event": "Z"},
                ],
                "data": {"lit": {"value": {"a": 1}}},
            }
        ],
        None,
    )
    steps = ruleset.rules[0].steps
    assert (steps[0].spec.type, steps[0].spec.name, steps[0].min_count, steps[0].max_count) == (
        "page",
        "Pricing",
        3,
        3,
    )
    assert steps[0].strict
    assert steps[1].spec.type == "identify" and steps[1].spec.event is None
    assert (steps[2].spec.type, steps[2].spec.event) == ("screen", "Odd")
    assert steps[3].spec.type is None and steps[3].spec.name == "Home"
    assert (steps[3].min_count, steps[3].max_count, steps[3].within_ms) == (2, None, 600_000)
    assert steps[4].absent and steps[4].for_ms is None
    assert ruleset.rules[0].data[0].value == {"a": 1}


def test_fingerprint_tracks_steps_and_within_only() -> None:
    base = parse_rules(one_rule(), None).rules[0].fingerprint
    assert parse_rules(one_rule(once_per="1h"), None).rules[0].fingerprint == base
    assert parse_rules(one_rule(within="1h"), None).rules[0].fingerprint != base
    changed = one_rule(steps=[{"event": "A"}, {"event": "C"}])
    assert parse_rules(changed, None).rules[0].fingerprint != base


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda c: c["rules"][0]["steps"][2].pop("for"),
            "rules[0] (cart_abandonment).steps[2]: absent step needs 'for'",
        ),
        (
            lambda c: c["rules"][0]["data"].update(sku="steps[5].properties.sku"),
            "rules[0] (cart_abandonment).data.sku: unknown step reference steps[5] "
            "(rule has 3 steps)",
        ),
        (
            lambda c: c["rules"][0]["data"].update(sku="steps[2].properties.sku"),
            "rules[0] (cart_abandonment).data.sku: steps[2] is an absent step and has no event",
        ),
        (
            lambda c: c["rules"][0]["data"].update(sku="properties.sku"),
            "rules[0] (cart_abandonment).data.sku: expected 'steps[N].<path>' or {value: ...}, "
            "got 'properties.sku'",
        ),
        (
            lambda c: c["rules"][0]["steps"][0]["where"].update({"properties.price": {"gtx": 0}}),
            "rules[0] (cart_abandonment).steps[0].where.properties.price: unknown operator "
            "'gtx' (expected one of eq, ne, gt, gte, lt, lte, in, not_in, contains, exists, "
            "regex, eq_step, ne_step (and 'path' with eq_step/ne_step))",
        ),
        (
            lambda c: c["rules"][0].update(within="2 hours"),
            "rules[0] (cart_abandonment).within: invalid duration '2 hours'",
        ),
        (
            lambda c: c["rules"][0]["steps"][2].update({"for": "-1h"}),
            "rules[0] (cart_abandonment).steps[2].for: duration must not be negative",
        ),
        (
            lambda c: c["rules"][0].update(once_per=0),
            "rules[0] (cart_abandonment).once_per: duration must be greater than zero (got 0)",
        ),
        (
            lambda c: c["rules"][0].update(trigger="x"),
            "rules[0] (cart_abandonment).trigger: unknown key",
        ),
        (
            lambda c: c["rules"][0]["steps"][1].update(evnt="x"),
            "rules[0] (cart_abandonment).steps[1].evnt: unknown key",
        ),
        (
            lambda c: c["rules"][0]["steps"][2].update(times=2),
            "rules[0] (cart_abandonment).steps[2].times: unknown key for an absent step",
        ),
        (
            lambda c: c["rules"][0].pop("emarsys_event_id"),
            "rules[0] (cart_abandonment): missing 'emarsys_event_id'",
        ),
        (
            lambda c: c["rules"][0].update(emarsys_event_id="4711"),
            "rules[0] (cart_abandonment).emarsys_event_id: expected an integer >= 1",
        ),
        (
            lambda c: c["rules"][0].pop("steps"),
            "rules[0] (cart_abandonment): missing 'steps'",
        ),
        (
            lambda c: c["rules"][0].update(steps=[]),
            "rules[0] (cart_abandonment).steps: expected a non-empty list of steps",
        ),
        (lambda c: c["rules"][0].pop("name"), "rules[0]: missing 'name'"),
        (
            lambda c: c["rules"].append(copy.deepcopy(c["rules"][0])),
            "rules[1] (cart_abandonment).name: duplicate rule name 'cart_abandonment' "
            "(also rules[0])",
        ),
        (
            lambda c: c["rules"][0]["steps"][0]["where"].update(
                {"properties.sku": {"regex": "([a-z"}}
            ),
            "rules[0] (cart_abandonment).steps[0].where.properties.sku.regex: invalid regular "
            "expression '([a-z'",
        ),
        (
            lambda c: c["rules"][0]["steps"][1]["where"]["properties.sku"].update(eq_step=1),
            "rules[0] (cart_abandonment).steps[1].where.properties.sku.eq_step: must refer to an "
            "earlier step (this is steps[1], got steps[1])",
        ),
        (
            lambda c: c["rules"][0]["steps"][1]["where"]["properties.sku"].update(eq_step=2),
            "rules[0] (cart_abandonment).steps[1].where.properties.sku.eq_step: must refer to an "
            "earlier step (this is steps[1], got steps[2])",
        ),
        (
            lambda c: c["rules"][0]["steps"][1].update(times=2, at_least=2),
            "rules[0] (cart_abandonment).steps[1]: 'times' and 'at_least' are mutually exclusive",
        ),
        (
            lambda c: c["rules"][0]["steps"][0].update(contiguity="strict"),
            "rules[0] (cart_abandonment).steps[0].contiguity: 'strict' on the first step needs "
            "'times' or 'at_least' > 1",
        ),
        (
            lambda c: c["rules"][0]["steps"][1].update(contiguity="loose"),
            "rules[0] (cart_abandonment).steps[1].contiguity: expected 'relaxed' or 'strict', "
            "got 'loose'",
        ),
        (
            lambda c: c["rules"][0]["steps"][0].update(within="5m"),
            "rules[0] (cart_abandonment).steps[0].within: the first step has no previous step",
        ),
        (
            lambda c: c["rules"][0]["steps"][1].update(times=0),
            "rules[0] (cart_abandonment).steps[1].times: expected an integer >= 1, got 0",
        ),
        (
            lambda c: c["rules"][0]["steps"][0].update(type="pageview"),
            "rules[0] (cart_abandonment).steps[0].type: expected one of alias, group, identify, "
            "page, screen, track, got 'pageview'",
        ),
        (
            lambda c: c["rules"][0]["steps"].insert(0, {"absent": "X", "for": "1h"}),
            "rules[0] (cart_abandonment).steps[0]: a rule cannot start with an absent step",
        ),
        (
            lambda c: c["rules"][0]["steps"].insert(2, {"absent": "X", "for": "1h"}),
            "rules[0] (cart_abandonment).steps[3]: two absent steps in a row are not supported",
        ),
        (
            lambda c: c["rules"][0]["steps"].append({"event": "Z", "contiguity": "strict"}),
            "rules[0] (cart_abandonment).steps[3].contiguity: 'strict' cannot follow an absent "
            "step",
        ),
        (
            lambda c: (
                c["rules"][0]["steps"][1].update(where={"properties.sku": {"eq_step": 0}})
                or c["rules"][0]["steps"].insert(1, {"absent": "X"})
                or c["rules"][0]["steps"][2]["where"]["properties.sku"].update(eq_step=1)
            ),
            "rules[0] (cart_abandonment).steps[2].where.properties.sku.eq_step: steps[1] is an "
            "absent step and matches no event",
        ),
        (
            lambda c: c["rules"][0]["steps"][0].update(where={"properties.": {"eq": 1}}),
            "rules[0] (cart_abandonment).steps[0].where.properties.: invalid path 'properties.'",
        ),
        (
            lambda c: c["rules"][0]["steps"][0].update(where={"a": {"path": "b"}}),
            "rules[0] (cart_abandonment).steps[0].where.a.path: only valid together with "
            "'eq_step' or 'ne_step'",
        ),
        (
            lambda c: c["rules"][0]["steps"][0].update(where={"a": {"in": "shoes"}}),
            "rules[0] (cart_abandonment).steps[0].where.a.in: expected a list",
        ),
        (
            lambda c: c["rules"][0]["steps"][0].update(where={"a": {"exists": "yes"}}),
            "rules[0] (cart_abandonment).steps[0].where.a.exists: expected true or false",
        ),
        (
            lambda c: c["rules"][0]["steps"][0].update(where={"a": {"gt": [1]}}),
            "rules[0] (cart_abandonment).steps[0].where.a.gt: expected a number or a string",
        ),
        (
            lambda c: c["rules"][0]["steps"][0].update(where={"a": {}}),
            "rules[0] (cart_abandonment).steps[0].where.a: empty condition",
        ),
        (
            lambda c: c["rules"][0]["steps"][1].update(where={"a": {"eq_step": 0, "ne_step": 0}}),
            "rules[0] (cart_abandonment).steps[1].where.a: 'eq_step' and 'ne_step' cannot be "
            "combined",
        ),
        (
            lambda c: c["rules"][0]["steps"][0].pop("event"),
            "rules[0] (cart_abandonment).steps[0]: step needs 'event', 'type' or 'name'",
        ),
        (
            lambda c: c["rules"][0]["steps"][2].update(absent={"event": "X", "for": "1h"}),
            "rules[0] (cart_abandonment).steps[2].absent.for: unknown key",
        ),
        (
            lambda c: c["rules"][0]["steps"][0]["where"].update(
                {"properties.date": {"gte": datetime.date(2024, 1, 1)}}
            ),
            "rules[0] (cart_abandonment).steps[0].where.properties.date.gte: expected a JSON value",
        ),
        (
            lambda c: c["rules"][0]["data"].update(when={"value": {1, 2}}),
            "rules[0] (cart_abandonment).data.when.value: expected a JSON value",
        ),
        (
            lambda c: c["rule_engine"].update(max_partial_matches=0),
            "rule_engine.max_partial_matches: expected an integer >= 1, got 0",
        ),
        (
            lambda c: c["rule_engine"].update(allowed_lateness="soon"),
            "rule_engine.allowed_lateness: invalid duration 'soon'",
        ),
        (
            lambda c: c["rule_engine"].update(late_topics="x"),
            "rule_engine.late_topics: unknown key",
        ),
    ],
)
def test_config_errors_name_rule_and_key(mutate: Any, expected: str) -> None:
    cfg = cart_config()
    mutate(cfg)
    errors = errors_of(cfg["rules"], cfg["rule_engine"])
    assert any(e.startswith(expected) for e in errors), errors


def test_all_errors_reported_at_once() -> None:
    errors = errors_of(
        [
            {"name": "a", "emarsys_event_id": 1, "steps": [{"event": "A", "bad": 1}]},
            {"name": "b", "steps": [{"event": "A"}, {"absent": "B"}], "data": {"x": "steps[9].y"}},
            "not a rule",
        ],
        {"nope": 1},
    )
    assert errors == [
        "rules[0] (a).steps[0].bad: unknown key (expected one of absent, at_least, contiguity, "
        "event, name, times, type, where, within)",
        "rules[1] (b): missing 'emarsys_event_id'",
        "rules[1] (b).steps[1]: absent step needs 'for'",
        "rules[1] (b).data.x: unknown step reference steps[9] (rule has 2 steps)",
        "rules[2]: expected a mapping",
        "rule_engine.nope: unknown key (expected one of allowed_lateness, late_topic, "
        "max_partial_matches)",
    ]
    message = str(RuleConfigError(errors))
    assert message.startswith("invalid rules configuration:\n  rules[0] (a)")


def test_middle_absent_without_for_is_valid() -> None:
    rules = one_rule(steps=[{"event": "A"}, {"absent": "X"}, {"event": "B"}])
    assert parse_rules(rules, None).rules[0].steps[1].for_ms is None


def test_rules_must_be_a_list() -> None:
    assert errors_of({"name": "x"}) == ["rules: expected a list of rules"]
