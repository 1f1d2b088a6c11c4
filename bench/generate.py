"""Deterministic, realistic Segment events for the pipeline benchmark (pure, no I/O).

``generate_events(n_events, n_contacts, seed=...)`` returns serialised events (orjson
bytes, about 400 bytes each) plus what the pipeline is expected to produce from them.

The mix:

* 60% ``track``, 25% ``page``, 15% ``identify`` (rounded; the shares are parameters).
* ``n_contacts`` people. Every identify carries ``userId`` and ``traits.email`` (plus
  ``firstName``, ``lastName``, ``optIn``), so as many people as there are identifies (at
  most ``n_contacts``) become *identified contacts*; the rest are anonymous visitors whose
  events carry only an ``anonymousId`` and who never reach Emarsys.
* 10% of all people (taken from the identified ones) are *anonymous-first*: their first
  events carry only ``anonymousId``; their first identify carries ``anonymousId`` +
  ``userId`` + ``traits.email`` and links the two; later events carry ``userId`` and
  ``anonymousId``.
* The other identified people start with an identify; their tracks and pages carry
  ``userId`` only (never the email), so each of them needs the identity lookup.
  Surplus identifies are repeats (same email, sometimes a changed ``optIn``).
* Every event has a unique ``messageId`` and the ``timestamp`` strictly increases with
  the position in the returned list; each person's events are in their own order, the
  people are interleaved at random.

``shop=True`` (the rules profile of ``python -m bench pipeline --rules N``) keeps all of the
above (mix, people, identities, timestamps) but gives every person a favourite category and
a current product they keep returning to, and draws tracks and pages from a full shop
vocabulary (product added/removed/clicked/wishlisted, searches and search-result pages,
checkout, coupons, orders with ``categories``, returns, sign-ups, blog pages with a
category): :func:`build_rules` writes rules against exactly these names and properties, so
they match and fire now and then. ``shop=False`` (the default) is byte-for-byte the
original stream.

Same arguments, same bytes.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

__all__ = [
    "BASE_TIME",
    "RULE_CATEGORIES",
    "RULE_TEMPLATES",
    "GeneratedEvents",
    "Person",
    "build_rules",
    "generate_events",
    "normalize_email",
    "rule_time_unit",
]

#: Timestamp of the first event (fixed, so the output does not depend on the clock).
BASE_TIME = datetime(2025, 3, 1, 8, 0, 0, tzinfo=UTC)

_FIRST = (
    "Anna",
    "Ben",
    "Clara",
    "David",
    "Elena",
    "Felix",
    "Greta",
    "Hugo",
    "Ida",
    "Jonas",
    "Katrin",
    "Lukas",
    "Mia",
    "Noah",
    "Olivia",
    "Paul",
    "Quinn",
    "Rosa",
    "Simon",
    "Tara",
    "Uwe",
    "Vera",
    "Wim",
    "Xenia",
    "Yusuf",
    "Zoe",
)
_LAST = (
    "Acker",
    "Berger",
    "Costa",
    "Dietrich",
    "Evans",
    "Fischer",
    "Garcia",
    "Hoffmann",
    "Ivanova",
    "Jensen",
    "Keller",
    "Lang",
    "Moreau",
    "Nowak",
    "Olsen",
    "Peters",
    "Rossi",
    "Schmidt",
    "Tanaka",
    "Urban",
    "Vogel",
    "Weber",
    "Young",
    "Zimmermann",
)
_DOMAINS = ("example.com", "example.org", "mail.example.net", "shop.example.de")
_TRACKS = (
    ("Product Viewed", "product"),
    ("Product Added", "product"),
    ("Cart Viewed", "cart"),
    ("Checkout Started", "cart"),
    ("Order Completed", "order"),
    ("Products Searched", "search"),
    ("Newsletter Opened", "mail"),
    ("Coupon Applied", "cart"),
)
_CATEGORIES = ("Shoes", "Jackets", "Bags", "Watches", "Shirts", "Outdoor", "Kids", "Sale")
_PAGES = (
    ("Home", "/"),
    ("Category", "/c/shoes"),
    ("Product", "/p/sku"),
    ("Cart", "/cart"),
    ("Checkout", "/checkout"),
    ("Account", "/account"),
    ("Pricing", "/pricing"),
    ("Blog", "/blog/spring-collection"),
)
#: ``shop=True``: track names and weights.
_SHOP_TRACKS = (
    ("Product Viewed", 22),
    ("Product Added", 10),
    ("Product Removed", 3),
    ("Product Clicked", 6),
    ("Product Added to Wishlist", 3),
    ("Products Searched", 7),
    ("Cart Viewed", 5),
    ("Checkout Started", 5),
    ("Coupon Applied", 3),
    ("Order Completed", 4),
    ("Product Returned", 1),
    ("Newsletter Opened", 4),
    ("Signed Up", 1),
    ("Email Verified", 1),
)
_SHOP_TRACK_NAMES = tuple(n for n, _ in _SHOP_TRACKS)
_SHOP_TRACK_CUM = tuple(sum(w for _, w in _SHOP_TRACKS[: i + 1]) for i in range(len(_SHOP_TRACKS)))
#: ``shop=True``: page names, fixed paths (None: built from the category/product) and weights.
_SHOP_PAGES = (
    ("Home", "/", 3),
    ("Category", None, 4),
    ("Product", None, 6),
    ("Search Results", "/search", 2),
    ("Cart", "/cart", 2),
    ("Checkout", "/checkout", 1),
    ("Account", "/account", 1),
    ("Blog", None, 2),
)
_SHOP_PAGE_CUM = tuple(sum(w for *_, w in _SHOP_PAGES[: i + 1]) for i in range(len(_SHOP_PAGES)))
#: Events about "the current product" (they carry sku / category / price).
_PRODUCT_TRACKS = frozenset(
    {
        "Product Viewed",
        "Product Added",
        "Product Removed",
        "Product Clicked",
        "Product Added to Wishlist",
    }
)
_SKUS_PER_CATEGORY = 25
_SHOP_PRICES = (9.99, 24.9, 39.0, 59.5, 89.0, 120.0, 149.99, 220.0, 349.0)
_QUERY_WORDS = ("red", "leather", "cheap", "winter", "new", "sale")
_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4) Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) Version/17.4 Safari/605",
)


def normalize_email(email: str) -> str:
    """The primary key the service derives from an email (trim + lowercase)."""
    return email.strip().lower()


@dataclass
class Person:
    """One generated person (a contact once identified)."""

    index: int
    user_id: str
    anonymous_id: str
    email: str
    first_name: str
    last_name: str
    identified: bool
    anonymous_first: bool
    events: int = 0


@dataclass
class GeneratedEvents:
    """The events (serialised, in produce order) and what they should lead to."""

    events: list[bytes]
    people: list[Person]
    counts: Counter[str] = field(default_factory=Counter)
    """Events by type (``track``/``page``/``identify``)."""
    expected_emails: set[str] = field(default_factory=set)
    """Normalised emails of every identified person: the contacts Emarsys should get."""
    expected_fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Normalised email -> Emarsys fields after the last identify (1, 2, 31)."""
    total_bytes: int = 0
    first_ts_ms: int = 0
    """Event time (epoch ms) of the first event."""
    last_ts_ms: int = 0
    """Event time (epoch ms) of the last event."""

    @property
    def contacts(self) -> int:
        return len(self.people)

    @property
    def identified(self) -> int:
        return sum(1 for p in self.people if p.identified)

    @property
    def anonymous_first(self) -> int:
        return sum(1 for p in self.people if p.anonymous_first)

    @property
    def anonymous_only(self) -> int:
        return sum(1 for p in self.people if not p.identified)

    @property
    def mean_bytes(self) -> float:
        return self.total_bytes / len(self.events) if self.events else 0.0


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _context(rng: random.Random, person: Person, with_traits: bool = False) -> dict[str, Any]:
    ctx: dict[str, Any] = {
        "library": {"name": "analytics.js", "version": "1.70.0"},
        "ip": f"10.{person.index % 250}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
        "userAgent": _AGENTS[person.index % len(_AGENTS)],
    }
    if with_traits:
        ctx["traits"] = {"plan": "basic"}
    return ctx


@dataclass
class _Shopper:
    """``shop=True``: what one person is currently looking at."""

    favourite: str
    sku: str = ""
    category: str = ""
    price: float = 0.0
    query: str = ""
    cart_value: float = 0.0
    cart_items: int = 0
    cart_categories: list[str] = field(default_factory=list)
    last_order: str = ""

    def pick_product(self, rng: random.Random, category: str) -> None:
        n = _CATEGORIES.index(category) * 1000 + rng.randrange(_SKUS_PER_CATEGORY)
        self.sku = f"SKU-{n:05d}"
        self.category = category
        self.price = _SHOP_PRICES[n % len(_SHOP_PRICES)]

    def product(self) -> dict[str, Any]:
        return {"sku": self.sku, "category": self.category, "price": self.price, "currency": "EUR"}


def _shop_category(rng: random.Random, shopper: _Shopper) -> str:
    """The favourite category 80% of the time, any category otherwise."""
    if rng.random() < 0.8:
        return shopper.favourite
    return _CATEGORIES[rng.randrange(len(_CATEGORIES))]


def _shop_track(
    rng: random.Random, shopper: _Shopper, person: Person, n: int
) -> tuple[str, dict[str, Any]]:
    r = rng.randrange(_SHOP_TRACK_CUM[-1])
    name = next(k for k, cum in zip(_SHOP_TRACK_NAMES, _SHOP_TRACK_CUM, strict=True) if r < cum)
    cat = _shop_category(rng, shopper)
    if name in _PRODUCT_TRACKS:
        new_product = name in ("Product Viewed", "Product Clicked") and rng.random() < 0.35
        if not shopper.sku or new_product:
            shopper.pick_product(rng, cat)
        props = shopper.product()
        if name == "Product Added":
            qty = rng.randint(1, 2)
            props["quantity"] = qty
            shopper.cart_value = round(shopper.cart_value + qty * shopper.price, 2)
            shopper.cart_items += qty
            if shopper.category not in shopper.cart_categories:
                shopper.cart_categories.append(shopper.category)
        elif name == "Product Removed":
            props["quantity"] = 1
        return name, props
    if name == "Products Searched":
        shopper.query = f"{_QUERY_WORDS[rng.randrange(len(_QUERY_WORDS))]} {cat.lower()}"
        return name, {"query": shopper.query, "results": rng.randrange(49)}
    if name in ("Cart Viewed", "Checkout Started"):
        value = shopper.cart_value or shopper.price or 19.99
        return name, {"value": value, "items": max(1, shopper.cart_items), "currency": "EUR"}
    if name == "Coupon Applied":
        code = f"SAVE{(5, 10, 15, 20)[rng.randrange(4)]}"
        return name, {"coupon": code, "value": shopper.cart_value or shopper.price or 19.99}
    if name == "Order Completed":
        shopper.last_order = f"ord-{person.index}-{n}"
        props = {
            "order_id": shopper.last_order,
            "total": shopper.cart_value or shopper.price or 19.99,
            "currency": "EUR",
            "categories": shopper.cart_categories or [shopper.category or cat],
        }
        shopper.cart_value, shopper.cart_items, shopper.cart_categories = 0.0, 0, []
        return name, props
    if name == "Product Returned":
        if not shopper.sku:
            shopper.pick_product(rng, cat)
        return name, {"sku": shopper.sku, "order_id": shopper.last_order or f"ord-{person.index}"}
    if name == "Newsletter Opened":
        return name, {"campaign": f"spring-{cat.lower()}", "category": cat}
    if name == "Signed Up":
        return name, {"method": ("email", "email", "sso")[rng.randrange(3)]}
    return name, {"method": "link"}  # Email Verified


def _shop_page(rng: random.Random, shopper: _Shopper) -> tuple[str, dict[str, Any]]:
    r = rng.randrange(_SHOP_PAGE_CUM[-1])
    title, path, _w = next(
        pg for pg, cum in zip(_SHOP_PAGES, _SHOP_PAGE_CUM, strict=True) if r < cum
    )
    cat = _shop_category(rng, shopper)
    extra: dict[str, Any] = {}
    if title == "Category":
        path = f"/c/{cat.lower()}"
        extra = {"category": cat}
    elif title == "Product":
        if not shopper.sku or rng.random() < 0.35:
            shopper.pick_product(rng, cat)
        path = f"/p/{shopper.sku.lower()}"
        extra = {"sku": shopper.sku, "category": shopper.category, "price": shopper.price}
    elif title == "Search Results":
        if not shopper.query:
            shopper.query = f"{_QUERY_WORDS[rng.randrange(len(_QUERY_WORDS))]} {cat.lower()}"
        extra = {"query": shopper.query}
    elif title == "Blog":
        path = f"/blog/{cat.lower()}-{rng.randrange(40)}"
        extra = {"category": cat}
    assert path is not None
    return title, {"path": path, "url": f"https://shop.example.com{path}", **extra}


def generate_events(
    n_events: int,
    n_contacts: int,
    seed: int = 1,
    *,
    track_share: float = 0.60,
    page_share: float = 0.25,
    anonymous_first_share: float = 0.10,
    shop: bool = False,
) -> GeneratedEvents:
    """``n_events`` Segment events from ``n_contacts`` people (see the module docstring).

    ``shop=True``: the shop vocabulary of the rules profile (see the module docstring).
    """
    if n_events < 1:
        raise ValueError("n_events must be >= 1")
    if n_contacts < 1:
        raise ValueError("n_contacts must be >= 1")
    if not (0 <= track_share and 0 <= page_share and track_share + page_share <= 1):
        raise ValueError("track_share and page_share must be >= 0 and sum to <= 1")
    rng = random.Random(seed)

    n_track = round(n_events * track_share)
    n_page = round(n_events * page_share)
    n_identify = n_events - n_track - n_page
    if n_identify < 1:
        # No identify, no contact: keep at least one so the benchmark has an end.
        n_identify = 1
        n_track = max(0, n_track - 1) if n_track else n_track
        n_page = n_events - n_track - n_identify

    # -- people ------------------------------------------------------------------------
    order = list(range(n_contacts))
    rng.shuffle(order)
    n_identified = min(n_contacts, n_identify)
    identified = set(order[:n_identified])
    n_anon_first = min(n_identified, round(n_contacts * anonymous_first_share))
    anon_first = set(order[:n_anon_first])
    people: list[Person] = []
    for i in range(n_contacts):
        first = _FIRST[rng.randrange(len(_FIRST))]
        last = _LAST[rng.randrange(len(_LAST))]
        domain = _DOMAINS[rng.randrange(len(_DOMAINS))]
        people.append(
            Person(
                index=i,
                user_id=f"usr_{i:07d}{rng.getrandbits(24):06x}",
                anonymous_id=_uuid(rng),
                email=f"{first.lower()}.{last.lower()}.{i}@{domain}",
                first_name=first,
                last_name=last,
                identified=i in identified,
                anonymous_first=i in anon_first,
            )
        )

    # -- who does what -----------------------------------------------------------------
    identifies = Counter({i: 1 for i in identified})
    ident_list = sorted(identified)
    for _ in range(n_identify - n_identified):
        identifies[ident_list[rng.randrange(len(ident_list))]] += 1

    activity_types = ["track"] * n_track + ["page"] * n_page
    rng.shuffle(activity_types)
    activities: dict[int, list[str]] = {i: [] for i in range(n_contacts)}
    pos = 0
    # Everyone who needs an activity to make sense gets one first: anonymous visitors
    # (else they would not exist) and anonymous-first people (their anonymous phase).
    needy = [i for i in order if i not in identified] + sorted(anon_first)
    for i in needy:
        if pos >= len(activity_types):
            break
        activities[i].append(activity_types[pos])
        pos += 1
    # The rest with a mild skew: some people are much more active than others.
    weights = [rng.paretovariate(2.0) for _ in range(n_contacts)]
    rest = len(activity_types) - pos
    if rest:
        for i in rng.choices(range(n_contacts), weights=weights, k=rest):
            activities[i].append(activity_types[pos])
            pos += 1

    # Each person's own sequence of (type, phase). Phases: "anon" (anonymousId only),
    # "link" (first identify of an anonymous-first person), "user" (userId), "visitor".
    sequences: dict[int, list[tuple[str, str]]] = {}
    for p in people:
        acts = activities[p.index]
        n_ident = identifies.get(p.index, 0)
        seq: list[tuple[str, str]]
        if not p.identified:
            seq = [(t, "visitor") for t in acts]
        elif p.anonymous_first:
            k = max(1, len(acts) // 2) if acts else 0
            seq = [(t, "anon") for t in acts[:k]] + [("identify", "link")]
            tail: list[tuple[str, str]] = [(t, "user") for t in acts[k:]]
            for _ in range(n_ident - 1):
                tail.insert(rng.randrange(len(tail) + 1), ("identify", "user"))
            seq += tail
        else:
            tail = [(t, "user") for t in acts]
            for _ in range(n_ident - 1):
                tail.insert(rng.randrange(len(tail) + 1), ("identify", "user"))
            seq = [("identify", "user"), *tail]
        sequences[p.index] = seq

    slots = [i for i, seq in sequences.items() for _ in seq]
    rng.shuffle(slots)

    # -- events ------------------------------------------------------------------------
    out = GeneratedEvents(events=[], people=people)
    cursor: Counter[int] = Counter()
    opt_in: dict[int, bool] = {}
    shoppers: dict[int, _Shopper] = {}
    base_ms = int(BASE_TIME.timestamp() * 1000)
    ts_ms = base_ms
    for n, i in enumerate(slots):
        p = people[i]
        kind, phase = sequences[i][cursor[i]]
        cursor[i] += 1
        p.events += 1
        ts_ms += rng.randint(1, 120)
        stamp = (
            (BASE_TIME + timedelta(milliseconds=ts_ms - base_ms))
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )
        event: dict[str, Any] = {
            "type": kind,
            "messageId": f"bench-{seed}-{n:09d}-{rng.getrandbits(32):08x}",
            "timestamp": stamp,
        }
        if phase in ("anon", "visitor"):
            event["anonymousId"] = p.anonymous_id
        elif phase == "link":
            event["anonymousId"] = p.anonymous_id
            event["userId"] = p.user_id
        else:
            event["userId"] = p.user_id
            if p.anonymous_first:
                event["anonymousId"] = p.anonymous_id
        if n == 0:
            out.first_ts_ms = ts_ms
        shopper: _Shopper | None = None
        if shop and kind != "identify":
            shopper = shoppers.get(i)
            if shopper is None:
                fav = _CATEGORIES[rng.randrange(len(_CATEGORIES))]
                shopper = shoppers[i] = _Shopper(fav)
        if shopper is not None and kind == "track":
            event["event"], event["properties"] = _shop_track(rng, shopper, p, n)
            event["context"] = _context(rng, p)
        elif shopper is not None:
            event["name"], event["properties"] = _shop_page(rng, shopper)
            event["context"] = _context(rng, p)
        elif kind == "track":
            name, _area = _TRACKS[rng.randrange(len(_TRACKS))]
            event["event"] = name
            event["properties"] = {
                "sku": f"SKU-{rng.randrange(100000):05d}",
                "category": _CATEGORIES[rng.randrange(len(_CATEGORIES))],
                "price": round(rng.uniform(5, 400), 2),
                "currency": "EUR",
            }
            event["context"] = _context(rng, p)
        elif kind == "page":
            title, path = _PAGES[rng.randrange(len(_PAGES))]
            event["name"] = title
            event["properties"] = {
                "path": path,
                "url": f"https://shop.example.com{path}",
            }
            event["context"] = _context(rng, p)
        else:
            first_time = i not in opt_in
            opted = (
                rng.random() < 0.7
                if first_time
                else ((not opt_in[i]) if rng.random() < 0.2 else opt_in[i])
            )
            opt_in[i] = opted
            email = p.email
            if rng.random() < 0.05:  # some sources send mixed case / padded emails
                email = f" {email.capitalize()} "
            event["traits"] = {
                "email": email,
                "firstName": p.first_name,
                "lastName": p.last_name,
                "optIn": opted,
                "plan": ("basic", "plus", "pro")[rng.randrange(3)],
            }
            event["context"] = _context(rng, p)
            key = normalize_email(p.email)
            out.expected_emails.add(key)
            out.expected_fields[key] = {
                "1": p.first_name,
                "2": p.last_name,
                "31": 1 if opted else 2,
            }
        raw = orjson.dumps(event)
        out.total_bytes += len(raw)
        out.events.append(raw)
        out.counts[kind] += 1
    out.last_ts_ms = ts_ms
    return out


# ------------------------------------------------------------------------------ rules

#: Categories the rules of :func:`build_rules` are written for, in order (10 rules each).
RULE_CATEGORIES = _CATEGORIES
#: The rule templates of :func:`build_rules`, in order.
RULE_TEMPLATES = (
    "cart_abandonment",
    "browse_abandonment",
    "checkout_abandonment",
    "repeat_viewer",
    "search_no_click",
    "wishlist_reminder",
    "coupon_hesitation",
    "post_purchase_browse",
    "blog_signup_unverified",
    "removed_then_bought",
)


def _rule(template: str, cat: str, event_id: int, unit_s: int) -> dict[str, Any]:
    """One rule (adapted from ``bench/rules_state.py``) for the ``shop=True`` vocabulary."""

    def u(k: float) -> str:
        return f"{max(1, round(k * unit_s))}s"

    name = f"{template}_{cat.lower()}"
    if template == "cart_abandonment":
        return {
            "name": name,
            "emarsys_event_id": event_id,
            "within": u(4),
            "once_per": u(10),
            "steps": [
                {
                    "event": "Product Viewed",
                    "where": {"properties.category": {"in": [cat]}, "properties.price": {"gt": 0}},
                },
                {"event": "Product Added", "where": {"properties.sku": {"eq_step": 0}}},
                {"absent": "Order Completed", "for": u(1)},
            ],
            "data": {
                "sku": "steps[1].properties.sku",
                "price": "steps[1].properties.price",
                "source": {"value": "rules"},
            },
        }
    if template == "browse_abandonment":
        return {
            "name": name,
            "emarsys_event_id": event_id,
            "within": u(6),
            "once_per": u(10),
            "steps": [
                {"type": "page", "name": "Category", "where": {"properties.category": cat}},
                {
                    "type": "page",
                    "name": "Product",
                    "at_least": 2,
                    "within": u(3),
                    "where": {"properties.category": {"eq_step": 0}},
                },
                {
                    "absent": {"event": "Product Added", "where": {"properties.category": cat}},
                    "for": u(1),
                },
            ],
            "data": {"last_sku": "steps[1].properties.sku"},
        }
    if template == "checkout_abandonment":
        return {
            "name": name,
            "emarsys_event_id": event_id,
            "within": u(6),
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
                {"event": "Checkout Started", "within": u(3)},
                {"absent": "Order Completed", "for": u(1)},
            ],
            "data": {"sku": "steps[0].properties.sku", "value": "steps[2].properties.value"},
        }
    if template == "repeat_viewer":
        return {
            "name": name,
            "emarsys_event_id": event_id,
            "within": u(8),
            "once_per": u(20),
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
                    "for": u(1),
                },
            ],
            "data": {"sku": "steps[0].properties.sku"},
        }
    if template == "search_no_click":
        return {
            "name": name,
            "emarsys_event_id": event_id,
            "within": u(3),
            "steps": [
                {
                    "event": "Products Searched",
                    "where": {"properties.query": {"regex": rf"(?i)\b{cat.lower()}"}},
                },
                {
                    "type": "page",
                    "name": "Search Results",
                    "within": u(2),
                    "where": {"properties.query": {"eq_step": 0}},
                },
                {"absent": "Product Clicked", "for": u(1)},
            ],
            "data": {"query": "steps[0].properties.query"},
        }
    if template == "wishlist_reminder":
        return {
            "name": name,
            "emarsys_event_id": event_id,
            "within": u(8),
            "once_per": u(20),
            "steps": [
                {"event": "Product Added to Wishlist", "where": {"properties.category": cat}},
                {
                    "event": "Product Viewed",
                    "within": u(4),
                    "where": {"properties.sku": {"eq_step": 0}},
                },
                {
                    "absent": {
                        "event": "Product Added",
                        "where": {"properties.sku": {"eq_step": 0}},
                    },
                    "for": u(1),
                },
            ],
            "data": {"sku": "steps[0].properties.sku"},
        }
    if template == "coupon_hesitation":
        return {
            "name": name,
            "emarsys_event_id": event_id,
            "within": u(4),
            "steps": [
                {
                    "event": "Product Viewed",
                    "at_least": 2,
                    "where": {"properties.category": cat, "properties.price": {"gte": 100}},
                },
                {"event": "Coupon Applied", "where": {"properties.coupon": {"exists": True}}},
                {"absent": "Order Completed", "for": u(1)},
            ],
            "data": {"coupon": "steps[1].properties.coupon", "sku": "steps[0].properties.sku"},
        }
    if template == "post_purchase_browse":
        return {
            # a middle absence with `for`: bought, kept it, came back to browse elsewhere
            "name": name,
            "emarsys_event_id": event_id,
            "within": u(10),
            "once_per": u(30),
            "steps": [
                {"event": "Order Completed", "where": {"properties.categories": {"contains": cat}}},
                {"absent": "Product Returned", "for": u(2)},
                {"type": "page", "name": "Product", "where": {"properties.category": {"ne": cat}}},
            ],
            "data": {"order_id": "steps[0].properties.order_id"},
        }
    if template == "blog_signup_unverified":
        return {
            # no `within`: a partial waiting for the sign-up lives until it is matched or
            # pushed out by max_partial_matches
            "name": name,
            "emarsys_event_id": event_id,
            "steps": [
                {
                    "type": "page",
                    "name": "Blog",
                    "at_least": 2,
                    "where": {"properties.category": cat},
                },
                {"event": "Signed Up", "where": {"properties.method": {"not_in": ["sso"]}}},
                {"absent": "Email Verified", "for": u(2)},
            ],
        }
    if template == "removed_then_bought":
        return {
            "name": name,
            "emarsys_event_id": event_id,
            "within": u(8),
            "steps": [
                {"event": "Product Removed", "where": {"properties.category": cat}},
                {
                    "absent": {
                        "event": "Product Added",
                        "where": {"properties.sku": {"eq_step": 0}},
                    }
                },
                {"type": "page", "name": "Cart", "within": u(3)},
                {"event": "Order Completed", "where": {"properties.total": {"lt": 500}}},
            ],
            "data": {"sku": "steps[0].properties.sku", "total": "steps[3].properties.total"},
        }
    raise ValueError(f"unknown rule template {template!r}")


def build_rules(n_rules: int, unit_s: int, first_event_id: int = 6000) -> list[dict[str, Any]]:
    """``n_rules`` rules (YAML-ready dicts) for ``generate_events(..., shop=True)``.

    Rule ``i`` is template ``i % 10`` of :data:`RULE_TEMPLATES` for category ``i // 10`` of
    :data:`RULE_CATEGORIES` (so ``--rules 20``: all ten templates for Shoes and Jackets),
    Emarsys event id ``first_event_id + i``. Every rule has 3-4 steps with ``where``
    clauses and an absent step; durations (``for``, ``within``, ``once_per``) are multiples
    of ``unit_s`` seconds, which the pipeline sets to the mean event-time gap between one
    person's events, so the rules fit the generated stream at any size.
    """
    limit = len(RULE_TEMPLATES) * len(RULE_CATEGORIES)
    if not 0 <= n_rules <= limit:
        raise ValueError(f"n_rules must be 0..{limit}")
    if unit_s < 1:
        raise ValueError("unit_s must be >= 1")
    return [
        _rule(
            RULE_TEMPLATES[i % len(RULE_TEMPLATES)],
            RULE_CATEGORIES[i // len(RULE_TEMPLATES)],
            first_event_id + i,
            unit_s,
        )
        for i in range(n_rules)
    ]


def rule_time_unit(generated: GeneratedEvents) -> int:
    """Whole seconds of event time between two events of one person, on average."""
    span_s = (generated.last_ts_ms - generated.first_ts_ms) / 1000
    per_person = len(generated.events) / max(1, generated.contacts)
    return max(1, round(span_s / max(1.0, per_person)))
