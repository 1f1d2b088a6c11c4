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
  ``userId`` only (never the email), so each of them goes through the identity lookup.
  Surplus identifies are repeats (same email, sometimes a changed ``optIn``).
* Every event has a unique ``messageId`` and the ``timestamp`` strictly increases with
  the position in the returned list; each person's events are in their own order, the
  people are interleaved at random.

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

__all__ = ["BASE_TIME", "GeneratedEvents", "Person", "generate_events", "normalize_email"]

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


def generate_events(
    n_events: int,
    n_contacts: int,
    seed: int = 1,
    *,
    track_share: float = 0.60,
    page_share: float = 0.25,
    anonymous_first_share: float = 0.10,
) -> GeneratedEvents:
    """``n_events`` Segment events from ``n_contacts`` people (see the module docstring)."""
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
        if kind == "track":
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
    return out
