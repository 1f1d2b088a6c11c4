"""``python -m bench.rules_state``: rule-engine state size and throughput (pure, no Kafka).

50 realistic rules (10 templates x 5 product categories) on 10,000 contacts plus one heavy
contact that sends thousands of events matching many first steps. Every event goes through
:meth:`app.rules.RuleEngine.on_event` with the worker's watermark (highest event time seen minus
``allowed_lateness``); each contact's state is kept as orjson bytes in a dict, the way the
``rule_state`` Faust table keeps it. At the end every contact gets
:meth:`~app.rules.RuleEngine.advance_time` far in the future. Prints state bytes per contact
(mean / p99 / max) at the end of the stream and after that final advance, and events/s.

The workload (:func:`build_rules`, :func:`generate_events`, :func:`run`) is shared with
``tests/test_app/test_rules_memory.py``.

``--relaxed``: the one strict rule template (3 blog pages in a row) becomes relaxed, so that
:meth:`~app.rules.RuleEngine.relevant` can reject events (with a strict step every event is
relevant). ``--skip-irrelevant``: like the rules agent, such events are not loaded, applied or
stored; the report counts them and the state writes either way.
"""

from __future__ import annotations

import argparse
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from app.rules import RuleEngine, RuleSet, parse_rules

__all__ = [
    "CATEGORIES",
    "HEAVY_PK",
    "RunResult",
    "Workload",
    "build_rules",
    "generate_events",
    "percentile",
    "run",
]

T0: Final = 1_700_000_000_000
S: Final = 1000
M: Final = 60 * S
H: Final = 60 * M
D: Final = 24 * H

CATEGORIES: Final = ("shoes", "boots", "shirts", "jackets", "bags")
_STEMS: Final = {
    "shoes": "shoe",
    "boots": "boot",
    "shirts": "shirt",
    "jackets": "jacket",
    "bags": "bag",
}
_SKUS_PER_CATEGORY: Final = 40
_PRICES: Final = (19.99, 39.0, 59.5, 89.0, 120.0, 149.99, 220.0)

HEAVY_PK: Final = "contact-heavy"
#: Normal contacts start their session within this span of event time.
SESSION_SPAN_MS: Final = 4 * H
#: Events are delivered in timestamp order shuffled by up to this much (out-of-order arrival,
#: always less than allowed_lateness, so nothing is late).
DELIVERY_JITTER_MS: Final = 60 * S
#: Watermark for the final advance_time: beyond every `within` (max 4 d) and absence deadline.
FAR_FUTURE_MS: Final = 30 * D


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


def _rules_for(cat: str, event_id: int, *, strict: bool = True) -> list[dict[str, Any]]:
    stem = _STEMS[cat]
    return [
        {
            "name": f"cart_abandonment_{cat}",
            "emarsys_event_id": event_id,
            "within": "2h",
            "once_per": "24h",
            "steps": [
                {
                    "event": "Product Viewed",
                    "where": {"properties.category": {"in": [cat]}, "properties.price": {"gt": 0}},
                },
                {"event": "Product Added", "where": {"properties.sku": {"eq_step": 0}}},
                {"absent": "Order Completed", "for": "1h"},
            ],
            "data": {
                "sku": "steps[1].properties.sku",
                "price": "steps[1].properties.price",
                "source": {"value": "rules"},
            },
        },
        {
            "name": f"browse_abandonment_{cat}",
            "emarsys_event_id": event_id + 1,
            "within": "1h",
            "once_per": "12h",
            "steps": [
                {"type": "page", "name": "Category", "where": {"properties.category": cat}},
                {
                    "type": "page",
                    "name": "Product",
                    "at_least": 2,
                    "within": "30m",
                    "where": {"properties.category": {"eq_step": 0}},
                },
                {
                    "absent": {"event": "Product Added", "where": {"properties.category": cat}},
                    "for": "20m",
                },
            ],
            "data": {"last_sku": "steps[1].properties.sku"},
        },
        {
            "name": f"checkout_abandonment_{cat}",
            "emarsys_event_id": event_id + 2,
            "within": "3h",
            "steps": [
                {
                    "event": "Product Added",
                    "where": {"properties.category": cat, "properties.quantity": {"gte": 1}},
                },
                {
                    # a guard: the item must not be removed before the checkout starts
                    "absent": {
                        "event": "Product Removed",
                        "where": {"properties.sku": {"eq_step": 0}},
                    }
                },
                {"event": "Checkout Started", "within": "1h"},
                {"absent": "Order Completed", "for": "30m"},
            ],
            "data": {"sku": "steps[0].properties.sku", "value": "steps[2].properties.value"},
        },
        {
            "name": f"repeat_viewer_{cat}",
            "emarsys_event_id": event_id + 3,
            "within": "1d",
            "once_per": "7d",
            "steps": [
                {"event": "Product Viewed", "where": {"properties.category": cat}},
                {
                    "event": "Product Viewed",
                    "times": 2,
                    "where": {"properties.sku": {"eq_step": 0}},
                },
                {
                    "absent": {
                        "event": "Product Added",
                        "where": {"properties.sku": {"eq_step": 0}},
                    },
                    "for": "2h",
                },
            ],
            "data": {"sku": "steps[0].properties.sku"},
        },
        {
            "name": f"search_no_click_{cat}",
            "emarsys_event_id": event_id + 4,
            "within": "30m",
            "steps": [
                {
                    "event": "Products Searched",
                    "where": {"properties.query": {"regex": rf"(?i)\b{stem}"}},
                },
                {"name": "Search Results", "where": {"properties.query": {"eq_step": 0}}},
                {"absent": "Product Clicked", "for": "10m"},
            ],
            "data": {"query": "steps[0].properties.query"},
        },
        {
            "name": f"wishlist_reminder_{cat}",
            "emarsys_event_id": event_id + 5,
            "within": "2d",
            "once_per": "7d",
            "steps": [
                {"event": "Product Added to Wishlist", "where": {"properties.category": cat}},
                {
                    "event": "Product Viewed",
                    "within": "1d",
                    "where": {"properties.sku": {"eq_step": 0}},
                },
                {
                    "absent": {
                        "event": "Product Added",
                        "where": {"properties.sku": {"eq_step": 0}},
                    },
                    "for": "6h",
                },
            ],
            "data": {"sku": "steps[0].properties.sku"},
        },
        {
            "name": f"coupon_hesitation_{cat}",
            "emarsys_event_id": event_id + 6,
            "within": "2h",
            "steps": [
                {
                    "event": "Product Viewed",
                    "at_least": 2,
                    "where": {"properties.category": cat, "properties.price": {"gte": 100}},
                },
                {"event": "Coupon Entered", "where": {"properties.coupon": {"exists": True}}},
                {"absent": "Order Completed", "for": "30m"},
            ],
            "data": {"coupon": "steps[1].properties.coupon", "sku": "steps[0].properties.sku"},
        },
        {
            # a middle absence with `for`: bought, kept it for 2 days, came back to browse
            "name": f"post_purchase_browse_{cat}",
            "emarsys_event_id": event_id + 7,
            "within": "4d",
            "once_per": "30d",
            "steps": [
                {"event": "Order Completed", "where": {"properties.categories": {"contains": cat}}},
                {"absent": "Product Returned", "for": "2d"},
                {"type": "page", "name": "Product", "where": {"properties.category": {"ne": cat}}},
            ],
            "data": {"order_id": "steps[0].properties.order_id"},
        },
        {
            # no `within`: a partial waiting for the sign-up lives until it is matched or
            # pushed out by max_partial_matches
            "name": f"blog_signup_unverified_{cat}",
            "emarsys_event_id": event_id + 8,
            "steps": [
                {
                    "type": "page",
                    "name": "Blog",
                    "at_least": 3,
                    "contiguity": "strict" if strict else "relaxed",
                    "where": {"properties.category": cat},
                },
                {"event": "Signed Up", "where": {"properties.method": {"not_in": ["sso"]}}},
                {"absent": "Email Verified", "for": "1d"},
            ],
        },
        {
            "name": f"removed_then_bought_{cat}",
            "emarsys_event_id": event_id + 9,
            "within": "1d",
            "steps": [
                {"event": "Product Removed", "where": {"properties.category": cat}},
                {
                    "absent": {
                        "event": "Product Added",
                        "where": {"properties.sku": {"eq_step": 0}},
                    }
                },
                {"type": "page", "name": "Cart", "within": "2h"},
                {"event": "Order Completed", "where": {"properties.total": {"lt": 500}}},
            ],
            "data": {"sku": "steps[0].properties.sku", "total": "steps[3].properties.total"},
        },
    ]


def build_rules(
    max_partial_matches: int = 20, allowed_lateness: str = "5m", *, strict: bool = True
) -> RuleSet:
    """The 50 rules (10 templates x 5 categories), compiled by :func:`parse_rules`.

    ``strict=False``: the blog template's ``contiguity: strict`` becomes relaxed.
    """
    raw: list[dict[str, Any]] = []
    for n, cat in enumerate(CATEGORIES):
        raw.extend(_rules_for(cat, 5000 + 10 * n, strict=strict))
    return parse_rules(
        raw,
        {"allowed_lateness": allowed_lateness, "max_partial_matches": max_partial_matches},
    )


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------

_CONTEXT: Final = {
    "library": {"name": "analytics.js", "version": "4.1.0"},
    "ip": "203.0.113.7",
    "locale": "de-DE",
    "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36",
}

#: (kind, weight) of a normal contact's next event.
_KINDS: Final = (
    ("page_home", 6),
    ("page_category", 10),
    ("page_product", 16),
    ("viewed", 20),
    ("search", 5),
    ("search_results", 4),
    ("clicked", 4),
    ("added", 9),
    ("removed", 3),
    ("wishlist", 3),
    ("page_cart", 4),
    ("checkout", 4),
    ("coupon", 2),
    ("order", 3),
    ("returned", 1),
    ("blog", 4),
    ("signup", 1),
    ("verified", 1),
)
_KIND_NAMES: Final = tuple(k for k, _ in _KINDS)
_KIND_CUM: Final = tuple(sum(w for _, w in _KINDS[: i + 1]) for i in range(len(_KINDS)))


def _sku(cat: str, n: int) -> str:
    return f"{cat[:3].upper()}-{n:04d}"


def _mid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _track(pk: str, mid: str, event: str, props: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "track",
        "event": event,
        "messageId": mid,
        "userId": pk,
        "properties": props,
        "context": _CONTEXT,
    }


def _page(pk: str, mid: str, name: str, props: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "page",
        "name": name,
        "messageId": mid,
        "userId": pk,
        "properties": props,
        "context": _CONTEXT,
    }


@dataclass(slots=True)
class Workload:
    """Events of one run in delivery order: ``(ts_ms, primary_key, message_id, event)``."""

    events: list[tuple[int, str, str, dict[str, Any]]]
    contacts: int
    heavy_events: int
    heavy_spacing_ms: int
    max_message_id_len: int


def _contact_events(
    i: int, seed: int, out: list[tuple[float, int, str, str, dict[str, Any]]]
) -> None:
    """A normal contact's session: 5-11 events of a shop visit, 5 s - 3 min apart."""
    rng = random.Random(seed * 1_000_003 + i)
    pk = f"contact-{i:06d}"
    cat = rng.choice(CATEGORIES)
    other = rng.choice(CATEGORIES)
    t = T0 + rng.randrange(SESSION_SPAN_MS)
    sku = _sku(cat, rng.randrange(_SKUS_PER_CATEGORY))
    sku_cat = cat
    price = rng.choice(_PRICES)
    cart_total = 0.0
    for _ in range(rng.randint(5, 11)):
        t += rng.randrange(5 * S, 3 * M)
        c = cat if rng.random() < 0.8 else other
        r = rng.randrange(_KIND_CUM[-1])
        kind = next(k for k, cum in zip(_KIND_NAMES, _KIND_CUM, strict=True) if r < cum)
        if kind in ("page_product", "viewed") and rng.random() < 0.5:
            sku, sku_cat, price = _sku(c, rng.randrange(_SKUS_PER_CATEGORY)), c, rng.choice(_PRICES)
        mid = _mid(rng)
        product = {"sku": sku, "category": sku_cat, "price": price, "currency": "EUR"}
        ev: dict[str, Any]
        if kind == "page_home":
            ev = _page(pk, mid, "Home", {"path": "/", "title": "Shop"})
        elif kind == "page_category":
            ev = _page(pk, mid, "Category", {"path": f"/c/{c}", "category": c})
        elif kind == "page_product":
            ev = _page(pk, mid, "Product", {"path": f"/p/{sku}", **product})
        elif kind == "viewed":
            ev = _track(pk, mid, "Product Viewed", product)
        elif kind in ("search", "search_results"):
            query = f"{rng.choice(('red', 'leather', 'cheap', 'winter'))} {_STEMS[c]}"
            if kind == "search":
                ev = _track(pk, mid, "Products Searched", {"query": query})
            else:
                ev = _page(pk, mid, "Search Results", {"query": query, "path": "/search"})
        elif kind == "clicked":
            ev = _track(pk, mid, "Product Clicked", {"sku": sku, "category": sku_cat})
        elif kind == "added":
            cart_total += price
            ev = _track(pk, mid, "Product Added", {**product, "quantity": rng.randint(1, 2)})
        elif kind == "removed":
            ev = _track(pk, mid, "Product Removed", {**product, "quantity": 1})
        elif kind == "wishlist":
            ev = _track(pk, mid, "Product Added to Wishlist", product)
        elif kind == "page_cart":
            ev = _page(pk, mid, "Cart", {"path": "/cart"})
        elif kind == "checkout":
            ev = _track(pk, mid, "Checkout Started", {"value": cart_total or price})
        elif kind == "coupon":
            ev = _track(pk, mid, "Coupon Entered", {"coupon": f"SAVE{rng.randint(5, 20)}"})
        elif kind == "order":
            total = cart_total or price
            ev = _track(
                pk,
                mid,
                "Order Completed",
                {"order_id": f"O-{i}-{t}", "total": total, "categories": [sku_cat, c]},
            )
            cart_total = 0.0
        elif kind == "returned":
            ev = _track(pk, mid, "Product Returned", {"sku": sku})
        elif kind == "blog":
            ev = _page(pk, mid, "Blog", {"path": f"/blog/{c}/{rng.randrange(99)}", "category": c})
        elif kind == "signup":
            method = rng.choice(("email", "email", "sso"))
            ev = _track(pk, mid, "Signed Up", {"method": method})
        else:
            ev = _track(pk, mid, "Email Verified", {})
        out.append((t + rng.randrange(DELIVERY_JITTER_MS), t, pk, mid, ev))


def _heavy_events(
    n: int, spacing_ms: int, seed: int, out: list[tuple[float, int, str, str, dict[str, Any]]]
) -> None:
    """One contact (a bot, a shared login) viewing shoes every ``spacing_ms`` without buying.

    70% ``Product Viewed`` (shoes, 120 EUR: the first step of cart_abandonment_shoes,
    repeat_viewer_shoes and coupon_hesitation_shoes), 20% product pages, 10% category pages
    (the first step of browse_abandonment_shoes). 12 skus in rotation, so repeat_viewer
    partials also advance (and match once, then are suppressed by ``once_per``).
    """
    rng = random.Random(seed * 7919 + 17)
    t = T0 + M
    for j in range(n):
        t += spacing_ms
        mid = _mid(rng)
        product = {"sku": _sku("shoes", j % 12), "category": "shoes", "price": 120.0}
        r = j % 10
        if r == 9:
            ev = _page(HEAVY_PK, mid, "Category", {"path": "/c/shoes", "category": "shoes"})
        elif r in (3, 6):
            ev = _page(HEAVY_PK, mid, "Product", {"path": "/p/x", **product})
        else:
            ev = _track(HEAVY_PK, mid, "Product Viewed", {**product, "currency": "EUR"})
        out.append((t + rng.randrange(DELIVERY_JITTER_MS), t, HEAVY_PK, mid, ev))


def generate_events(
    contacts: int, *, heavy_events: int = 4000, heavy_spacing_ms: int = 1500, seed: int = 1
) -> Workload:
    """Contact ``i`` gets the same events for any ``contacts`` > i (same ``seed``)."""
    raw: list[tuple[float, int, str, str, dict[str, Any]]] = []
    for i in range(contacts):
        _contact_events(i, seed, raw)
    if heavy_events:
        _heavy_events(heavy_events, heavy_spacing_ms, seed, raw)
    raw.sort(key=lambda e: (e[0], e[2], e[3]))
    return Workload(
        events=[(ts, pk, mid, ev) for _, ts, pk, mid, ev in raw],
        contacts=contacts,
        heavy_events=heavy_events,
        heavy_spacing_ms=heavy_spacing_ms,
        max_message_id_len=max((len(e[3]) for e in raw), default=0),
    )


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class RunResult:
    engine: RuleEngine
    #: contact -> orjson state bytes at the end of the stream (before the final advance)
    store: dict[str, bytes]
    #: contact -> orjson state bytes after advance_time(max ts + FAR_FUTURE_MS)
    after: dict[str, bytes]
    #: contact -> largest state (bytes) ever stored for it
    peak: dict[str, int]
    events: int
    #: largest number of partial matches of one rule in one contact's state after any call
    max_partials: int
    #: (contact, rule) pairs that ever reached max_partial_matches
    at_cap: set[tuple[str, str]]
    stats: Counter[str]
    matches: Counter[str]
    engine_s: float
    loop_s: float
    final_watermark: int
    #: state bytes of the heavy contact after each of its events
    heavy_sizes: list[int] = field(default_factory=list)
    #: events RuleEngine.relevant rejects (skipped with ``skip_irrelevant``)
    irrelevant: int = 0
    #: states stored during the stream (one rule_state put + changelog message each)
    state_writes: int = 0
    skipped_irrelevant: bool = False


def run(
    workload: Workload,
    ruleset: RuleSet,
    *,
    on_state: Callable[[str, dict[str, Any]], None] | None = None,
    skip_irrelevant: bool = False,
) -> RunResult:
    """Feed every event through the engine (state as orjson bytes), then advance far ahead.

    ``on_state(pk, state)`` (optional) is called with every state the engine returns.
    ``skip_irrelevant``: events :meth:`RuleEngine.relevant` rejects are skipped (no state
    load, engine call or store), as the rules agent does.
    """
    engine = RuleEngine(ruleset)
    cap = ruleset.max_partial_matches
    lateness = ruleset.allowed_lateness_ms
    store: dict[str, bytes] = {}
    peak: dict[str, int] = {}
    stats: Counter[str] = Counter()
    matches: Counter[str] = Counter()
    at_cap: set[tuple[str, str]] = set()
    heavy_sizes: list[int] = []
    max_partials = 0
    max_ts = -(2**62)
    engine_s = 0.0
    dumps, loads, clock = orjson.dumps, orjson.loads, time.perf_counter

    def record(target: dict[str, bytes], pk: str, state: dict[str, Any]) -> int:
        nonlocal max_partials
        for name, entry in state["partials"].items():
            n = len(entry["p"])
            if n > max_partials:
                max_partials = n
            if n >= cap:
                at_cap.add((pk, name))
        raw = dumps(state)
        target[pk] = raw
        size = len(raw)
        if size > peak.get(pk, 0):
            peak[pk] = size
        if on_state is not None:
            on_state(pk, state)
        return size

    irrelevant = writes = 0
    loop_start = clock()
    for ts, pk, mid, event in workload.events:
        if ts > max_ts:
            max_ts = ts
        if skip_irrelevant:
            t = clock()
            relevant = engine.relevant(event)
            engine_s += clock() - t
            if not relevant:
                irrelevant += 1
                continue
        raw = store.get(pk)
        state = None if raw is None else loads(raw)
        t = clock()
        res = engine.on_event(state, event, ts, mid, watermark_ms=max_ts - lateness)
        engine_s += clock() - t
        stats.update(res.stats)
        for m in res.matches:
            matches[m.rule] += 1
        size = record(store, pk, res.state)
        writes += 1
        if pk == HEAVY_PK:
            heavy_sizes.append(size)
    loop_s = clock() - loop_start
    if not skip_irrelevant:
        irrelevant = sum(1 for e in workload.events if not engine.relevant(e[3]))

    # The final timer: far beyond every `within` and absence deadline.
    final_wm = max_ts + FAR_FUTURE_MS
    after: dict[str, bytes] = {}
    for pk, raw in store.items():
        res = engine.advance_time(loads(raw), final_wm)
        stats.update(res.stats)
        for m in res.matches:
            matches[m.rule] += 1
        record(after, pk, res.state)
    return RunResult(
        engine=engine,
        store=store,
        after=after,
        peak=peak,
        events=len(workload.events),
        max_partials=max_partials,
        at_cap=at_cap,
        stats=stats,
        matches=matches,
        engine_s=engine_s,
        loop_s=loop_s,
        final_watermark=final_wm,
        heavy_sizes=heavy_sizes,
        irrelevant=irrelevant,
        state_writes=writes,
        skipped_irrelevant=skip_irrelevant,
    )


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``."""
    if not values:
        return 0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def summary(result: RunResult, *, contacts: int, rules: int) -> list[str]:
    """Figures for the report (also used in the test's assertion messages)."""
    end = [len(v) for v in result.store.values()]
    after = [len(v) for v in result.after.values()]
    normal = [len(v) for k, v in result.store.items() if k != HEAVY_PK]
    heavy = len(result.store.get(HEAVY_PK, b""))
    s = result.stats
    lines = [
        f"rule engine state: {rules} rules x {contacts:,} contacts"
        f" (+1 heavy contact); {result.events:,} events",
        f"throughput: {result.events / result.engine_s:,.0f} events/s in RuleEngine.on_event"
        f" ({result.engine_s:.2f} s); {result.events / result.loop_s:,.0f} events/s for the"
        f" whole loop incl. orjson load/dump of the state ({result.loop_s:.2f} s)",
        f"end of stream: total {sum(end):,} B; per contact mean {sum(end) / len(end):,.0f} B,"
        f" p99 {percentile(end, 99):,} B, max {max(end):,} B",
        f"  without the heavy contact: mean {sum(normal) / max(1, len(normal)):,.0f} B,"
        f" p99 {percentile(normal, 99):,} B, max {max(normal, default=0):,} B",
        f"  heavy contact: {heavy:,} B at the end, peak {result.peak.get(HEAVY_PK, 0):,} B",
        f"after advance_time(+30d): total {sum(after):,} B; per contact mean"
        f" {sum(after) / len(after):,.0f} B, p99 {percentile(after, 99):,} B,"
        f" max {max(after):,} B",
        f"partials: max {result.max_partials} per contact and rule"
        f" (max_partial_matches {result.engine.ruleset.max_partial_matches});"
        f" dropped {s['dropped_partials']:,}, expired {s['expired_partials']:,};"
        f" matches {s['matches']:,}, suppressed {s['suppressed']:,}, late {s['late']:,}",
        f"irrelevant events (match no step of any rule): {result.irrelevant:,}"
        f" ({result.irrelevant / max(1, result.events):.1%}),"
        f" {'skipped' if result.skipped_irrelevant else 'applied'};"
        f" state writes during the stream: {result.state_writes:,}",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rules_state", description=__doc__)
    parser.add_argument("--contacts", type=int, default=10_000, help="contacts (10,000)")
    parser.add_argument(
        "--heavy-events", type=int, default=4000, help="events of the heavy contact (4,000)"
    )
    parser.add_argument(
        "--max-partial-matches",
        type=int,
        default=20,
        help="rule_engine.max_partial_matches (20; the engine default is 100)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--relaxed",
        action="store_true",
        help="make the one strict rule template relaxed (a strict step makes every event"
        " relevant)",
    )
    parser.add_argument(
        "--skip-irrelevant",
        action="store_true",
        help="skip events that match no step of any rule, as the rules agent does",
    )
    args = parser.parse_args(argv)
    ruleset = build_rules(args.max_partial_matches, strict=not args.relaxed)
    t = time.perf_counter()
    workload = generate_events(args.contacts, heavy_events=args.heavy_events, seed=args.seed)
    gen_s = time.perf_counter() - t
    result = run(workload, ruleset, skip_irrelevant=args.skip_irrelevant)
    print(f"generated {len(workload.events):,} events in {gen_s:.2f} s")
    for line in summary(result, contacts=args.contacts, rules=len(ruleset.rules)):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
