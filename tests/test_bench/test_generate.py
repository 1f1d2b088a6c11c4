"""bench.generate: the benchmark's Segment event generator (pure; no broker, no timing)."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from datetime import datetime
from typing import Any

import orjson
import pytest

from app.data_map import resolve_primary_key
from app.events import InvalidEvent, validate_event
from app.rules import RuleEngine, parse_rules
from bench.generate import (
    RULE_CATEGORIES,
    RULE_TEMPLATES,
    build_rules,
    generate_events,
    normalize_email,
    rule_time_unit,
)

N_EVENTS, N_CONTACTS = 4000, 300


@pytest.fixture(scope="module")
def generated() -> Any:
    return generate_events(N_EVENTS, N_CONTACTS, seed=7)


@pytest.fixture(scope="module")
def parsed(generated: Any) -> list[dict[str, Any]]:
    return [orjson.loads(raw) for raw in generated.events]


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    a = generate_events(500, 50, seed=3)
    b = generate_events(500, 50, seed=3)
    c = generate_events(500, 50, seed=4)
    assert a.events == b.events
    assert a.expected_emails == b.expected_emails
    assert a.events != c.events


def test_count_and_type_mix(generated: Any, parsed: list[dict[str, Any]]) -> None:
    assert len(generated.events) == N_EVENTS
    counts = Counter(e["type"] for e in parsed)
    assert counts == generated.counts
    assert counts["track"] == round(N_EVENTS * 0.60)
    assert counts["page"] == round(N_EVENTS * 0.25)
    assert counts["identify"] == N_EVENTS - counts["track"] - counts["page"]


def test_every_event_is_valid_for_the_service(generated: Any) -> None:
    for raw in generated.events:
        assert not isinstance(validate_event(raw), InvalidEvent), raw


def test_unique_message_ids_and_increasing_timestamps(parsed: list[dict[str, Any]]) -> None:
    ids = [e["messageId"] for e in parsed]
    assert len(set(ids)) == len(ids)
    stamps = [e["timestamp"] for e in parsed]
    assert all(s.endswith("Z") and len(s) == 24 for s in stamps)
    assert all(a < b for a, b in zip(stamps, stamps[1:], strict=False))


def test_about_400_bytes(generated: Any) -> None:
    assert 350 <= generated.mean_bytes <= 450
    assert generated.total_bytes == sum(len(raw) for raw in generated.events)
    assert max(len(raw) for raw in generated.events) < 1024


def test_only_identifies_carry_the_email(parsed: list[dict[str, Any]]) -> None:
    paths = ["traits.email", "context.traits.email", "properties.email"]
    steps = ["trim", "lowercase"]
    for e in parsed:
        pk = resolve_primary_key(e, paths, steps)
        if e["type"] == "identify":
            assert pk is not None
            assert e.get("userId")
            assert {"firstName", "lastName", "optIn"} <= e["traits"].keys()
        else:
            assert pk is None, e
            assert e.get("userId") or e.get("anonymousId")


def test_people_and_expected_contacts(generated: Any, parsed: list[dict[str, Any]]) -> None:
    assert generated.contacts == N_CONTACTS
    emails = {normalize_email(e["traits"]["email"]) for e in parsed if e["type"] == "identify"}
    assert emails == generated.expected_emails
    # 600 identifies for 300 people: everyone is identified, some more than once.
    assert len(emails) == generated.identified == N_CONTACTS
    assert generated.anonymous_first == round(N_CONTACTS * 0.10)
    assert set(generated.expected_fields) == emails
    assert sum(p.events for p in generated.people) == N_EVENTS


def test_more_people_than_identifies_leaves_anonymous_visitors() -> None:
    g = generate_events(1000, 400, seed=2)
    assert g.counts["identify"] == 150
    assert g.identified == 150
    assert g.anonymous_only == 250
    assert len(g.expected_emails) == 150
    visitors = {p.anonymous_id for p in g.people if not p.identified}
    for raw in g.events:
        e = orjson.loads(raw)
        if e.get("anonymousId") in visitors:
            assert "userId" not in e and e["type"] != "identify"


def test_anonymous_first_people_identify_after_anonymous_events(
    generated: Any, parsed: list[dict[str, Any]]
) -> None:
    by_anon: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in parsed:
        if "anonymousId" in e:
            by_anon[e["anonymousId"]].append(e)
    anon_first = [p for p in generated.people if p.anonymous_first]
    assert anon_first
    for p in anon_first:
        events = by_anon[p.anonymous_id]
        first_identify = next(i for i, e in enumerate(events) if e["type"] == "identify")
        assert first_identify >= 1  # at least one anonymous event before
        for e in events[:first_identify]:
            assert "userId" not in e
        link = events[first_identify]
        assert link["userId"] == p.user_id
        assert normalize_email(link["traits"]["email"]) == normalize_email(p.email)
        for e in events[first_identify + 1 :]:
            assert e["userId"] == p.user_id


def test_other_people_start_with_an_identify_then_use_user_id_only(
    generated: Any, parsed: list[dict[str, Any]]
) -> None:
    by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in parsed:
        if "userId" in e:
            by_user[e["userId"]].append(e)
    known = [p for p in generated.people if p.identified and not p.anonymous_first]
    assert known
    for p in known:
        events = by_user[p.user_id]
        assert events[0]["type"] == "identify"
        assert all("anonymousId" not in e for e in events)
        assert len(events) == p.events


def test_expected_fields_follow_the_last_identify(
    generated: Any, parsed: list[dict[str, Any]]
) -> None:
    last: dict[str, dict[str, Any]] = {}
    for e in parsed:
        if e["type"] == "identify":
            last[normalize_email(e["traits"]["email"])] = e["traits"]
    for email, traits in last.items():
        assert generated.expected_fields[email] == {
            "1": traits["firstName"],
            "2": traits["lastName"],
            "31": 1 if traits["optIn"] else 2,
        }


@pytest.mark.parametrize(("events", "contacts"), [(0, 10), (10, 0)])
def test_rejects_empty_sizes(events: int, contacts: int) -> None:
    with pytest.raises(ValueError):
        generate_events(events, contacts)


def test_tiny_run_still_has_a_contact() -> None:
    g = generate_events(3, 1, seed=1)
    assert len(g.events) == 3
    assert g.counts["identify"] >= 1
    assert len(g.expected_emails) == 1


# ------------------------------------------------------------------------------ shop / rules

#: sha256 of the joined events of generate_events(500, 50, seed=3) before ``shop`` existed.
PLAIN_500_50_3 = "68bb77604e88d476976421dd39454dd76b2ed6831da95848e5c3b52978c78dab"


def test_shop_false_is_the_original_stream() -> None:
    g = generate_events(500, 50, seed=3)
    assert hashlib.sha256(b"\n".join(g.events)).hexdigest() == PLAIN_500_50_3
    assert g.first_ts_ms < g.last_ts_ms


@pytest.fixture(scope="module")
def shop() -> Any:
    return generate_events(N_EVENTS, N_CONTACTS, seed=7, shop=True)


def test_shop_keeps_mix_people_ids_and_size(shop: Any, generated: Any) -> None:
    assert shop.counts == generated.counts
    assert shop.expected_emails == generated.expected_emails
    assert [p.user_id for p in shop.people] == [p.user_id for p in generated.people]
    assert 350 <= shop.mean_bytes <= 450
    assert max(len(raw) for raw in shop.events) < 1024
    for raw in shop.events:
        assert not isinstance(validate_event(raw), InvalidEvent), raw
    stamps = [orjson.loads(raw)["timestamp"] for raw in shop.events]
    assert all(a < b for a, b in zip(stamps, stamps[1:], strict=False))


def test_shop_vocabulary_and_product_affinity(shop: Any) -> None:
    parsed = [orjson.loads(raw) for raw in shop.events]
    names = Counter(e.get("event") or e.get("name") for e in parsed if e["type"] != "identify")
    for name in (
        "Product Viewed",
        "Product Added",
        "Product Removed",
        "Product Clicked",
        "Product Added to Wishlist",
        "Products Searched",
        "Checkout Started",
        "Coupon Applied",
        "Order Completed",
        "Product Returned",
        "Signed Up",
        "Email Verified",
        "Category",
        "Product",
        "Search Results",
        "Blog",
    ):
        assert names[name] > 0, name
    # People return to their product: an add usually follows a view of the same sku.
    last_viewed: dict[str, str] = {}
    same = added = 0
    for e in parsed:
        who = e.get("userId") or e.get("anonymousId")
        if e.get("event") == "Product Viewed":
            last_viewed[who] = e["properties"]["sku"]
        elif e.get("event") == "Product Added" and who in last_viewed:
            added += 1
            same += e["properties"]["sku"] == last_viewed[who]
    assert added and same / added > 0.5
    orders = [e for e in parsed if e.get("event") == "Order Completed"]
    assert orders and all(e["properties"]["categories"] for e in orders)


def test_build_rules_shape_and_validity() -> None:
    rules = build_rules(20, 60)
    assert len(rules) == 20
    assert len({r["name"] for r in rules}) == 20
    assert [r["emarsys_event_id"] for r in rules] == list(range(6000, 6020))
    assert {r["name"].rsplit("_", 1)[1] for r in rules} == {"shoes", "jackets"}
    for r in rules:
        steps = r["steps"]
        assert 3 <= len(steps) <= 4, r["name"]
        assert any("absent" in s for s in steps), r["name"]
        assert "where" in steps[0], r["name"]
    text = orjson.dumps(rules).decode()
    assert '"eq_step"' in text and '"for"' in text and '"within"' in text
    # every template for every category compiles
    ruleset = parse_rules(build_rules(len(RULE_TEMPLATES) * len(RULE_CATEGORIES), 60), {})
    assert len(ruleset.rules) == 80
    with pytest.raises(ValueError):
        build_rules(81, 60)
    with pytest.raises(ValueError):
        build_rules(1, 0)


def test_rule_time_unit_is_the_mean_gap_of_one_person(shop: Any) -> None:
    span_s = (shop.last_ts_ms - shop.first_ts_ms) / 1000
    assert rule_time_unit(shop) == round(span_s / (N_EVENTS / N_CONTACTS))


def test_the_rules_match_the_shop_stream() -> None:
    """The pure engine on the shop events (keyed by person, in time order) fires rules."""
    g = generate_events(N_EVENTS, N_CONTACTS, seed=7, shop=True)
    rules = build_rules(20, rule_time_unit(g))
    engine = RuleEngine(parse_rules(rules, {"allowed_lateness": "0s"}))
    person = {p.user_id: p.index for p in g.people} | {p.anonymous_id: p.index for p in g.people}
    states: dict[int, Any] = {}
    matched: Counter[str] = Counter()
    ts = 0
    for raw in g.events:
        e = orjson.loads(raw)
        pk = person[e.get("userId") or e["anonymousId"]]
        ts = int(datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp() * 1000)
        res = engine.on_event(states.get(pk), e, ts, e["messageId"], watermark_ms=ts)
        states[pk] = res.state
        matched.update(m.rule for m in res.matches)
    for state in states.values():
        matched.update(m.rule for m in engine.advance_time(state, ts + 10**9).matches)
    assert sum(matched.values()) >= 20
    templates = {name.rsplit("_", 1)[0] for name in matched}
    assert len(templates) >= 6, matched
