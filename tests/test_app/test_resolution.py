"""Unit tests for app/resolution.py: ingest routing and the identity resolver (plain dicts)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

import orjson
import pytest

from app.data_map import resolve_primary_key
from app.envelope import pack, unpack
from app.events import ValidEvent, validate_event
from app.resolution import (
    Emit,
    IdentityResolver,
    IdentityState,
    route_ingested,
    send_event_as_received,
)

PK = "ann@example.com"
PK2 = "bob@example.com"
SRC = {"topic": "segment.events", "partition": 0, "offset": 7, "timestamp": 1_000}
PK_PATHS = ["traits.email", "context.traits.email", "properties.email"]
HOUR_MS = 3_600_000


# -- helpers ----------------------------------------------------------------------------------


def event(ev_type: str = "track", mid: str = "m1", **fields: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {"type": ev_type, "messageId": mid}
    if ev_type == "track":
        ev["event"] = "Clicked"
    ev.update(fields)
    return ev


def route(
    ev: dict[str, Any],
    ts: int = 1_000,
    pk: str | None = None,
    known_links: dict[tuple[str, str], str] | None = None,
    lookup: Any = None,
) -> list[Emit]:
    uid, aid = ev.get("userId"), ev.get("anonymousId")
    return route_ingested(
        ev, ev["type"], ts, uid, aid, pk, dict(SRC), known_links=known_links, lookup=lookup
    )


def link(id_type: str, ident: str, pk: str, ts: int = 1_000) -> dict[str, Any]:
    return {"kind": "link", "id_type": id_type, "id": ident, "primary_key": pk, "ts": ts}


def msg(
    ev: dict[str, Any], ts: int, stage: str | None = None, kind: str = "event"
) -> dict[str, Any]:
    m: dict[str, Any] = {"kind": kind, "event": ev, "ts": ts, "source": dict(SRC)}
    if stage is not None:
        m["stage"] = stage
    return m


class Clock:
    def __init__(self, now: int = 1_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def make(
    hold_max: int = 10, expiry_ms: int = HOUR_MS, clock: Clock | None = None
) -> tuple[IdentityResolver, IdentityState, Clock]:
    clock = clock or Clock()
    state = IdentityState(anonymous_ids={}, user_ids={}, held={})
    resolver = IdentityResolver(
        state, hold_max_per_id=hold_max, hold_expiry_ms=expiry_ms, now_ms=clock
    )
    return resolver, state, clock


def targets(emits: Iterable[Emit]) -> list[tuple[str, str]]:
    return [(e.target, e.key) for e in emits]


def only(emits: list[Emit], target: str) -> list[Emit]:
    return [e for e in emits if e.target == target]


def mids(emits: Iterable[Emit]) -> list[str]:
    return [e.value["event"]["messageId"] for e in emits]


def run(resolver: IdentityResolver, emits: Iterable[Emit]) -> list[Emit]:
    """Feed ``identity`` emits back into the resolver until quiet (values JSON round-tripped,
    as through Kafka). Returns everything that left the identity stage, in order."""
    queue: deque[Emit] = deque(emits)
    out: list[Emit] = []
    steps = 0
    while queue:
        steps += 1
        assert steps < 10_000, "identity messages loop forever"
        e = queue.popleft()
        value = orjson.loads(orjson.dumps(e.value))
        if e.target == "identity":
            queue.extend(resolver.handle(e.key, value))
        else:
            out.append(Emit(e.target, e.key, value))
    return out


def assert_delivered(e: Emit, pk: str) -> None:
    assert e.target == "contact_events"
    assert e.key == pk
    assert e.value["kind"] == "event"
    assert e.value["primary_key"] == pk
    assert "stage" not in e.value
    assert "held_at" not in e.value
    assert e.value["source"] == SRC


def assert_dead_letter(e: Emit, reason: str, ev: dict[str, Any]) -> None:
    assert e.target == "dead_letters"
    env = e.value
    assert env["reason"] == reason
    assert isinstance(env["error"], str) and env["error"]
    assert env["source"] == SRC
    assert env["raw_base64"] is False
    assert isinstance(env["raw"], str)
    assert orjson.loads(env["raw"]) == ev
    orjson.dumps(env)  # serialisable


# -- route_ingested ---------------------------------------------------------------------------


def test_route_with_primary_key_goes_to_contact_events_and_links_both_ids() -> None:
    ev = event("identify", userId="u1", anonymousId="a1", traits={"email": PK})
    out = route(ev, ts=5_000, pk=PK)
    assert targets(out) == [("identity", "u1"), ("identity", "a1"), ("contact_events", PK)]
    assert out[0].value == link("user", "u1", PK, 5_000)
    assert out[1].value == link("anonymous", "a1", PK, 5_000)
    assert out[2].value == {
        "kind": "event",
        "event": ev,
        "ts": 5_000,
        "source": SRC,
        "primary_key": PK,
        "path": "direct",
    }


def test_an_event_as_received_is_sent_as_its_raw_bytes_with_the_same_records() -> None:
    event = {"type": "identify", "userId": "u1", "anonymousId": "a1", "messageId": "m1",
             "timestamp": "2024-05-01T12:00:00.000Z", "traits": {"email": "x@e.com"}}
    raw = b'{ "type":"identify", "userId":"u1","anonymousId":"a1","messageId":"m1",' \
          b'"timestamp":"2024-05-01T12:00:00.000Z","traits":{"email":"x@e.com"} }'
    ev = validate_event(raw)
    assert isinstance(ev, ValidEvent) and ev.as_received and ev.event == event
    plain = route_ingested(ev.event, "identify", 1, "u1", "a1", "x@e.com", {})
    routed = route_ingested(ev.event, "identify", 1, "u1", "a1", "x@e.com", {})
    send_event_as_received(routed, ev.event, raw)
    # Only the event record carries the raw bytes; the links are untouched.
    assert [type(e.value.get("event")).__name__ for e in routed] == [
        "NoneType", "NoneType", "Fragment"]
    as_sent = [env.value for env in pack([(e.key, e.value) for e in routed], 2)]
    assert raw in b"".join(as_sent)  # passed on byte for byte
    def records(envelopes: list[bytes]) -> list[bytes]:
        return sorted(
            orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
            for value in envelopes
            for record in unpack(None, value)[0]
        )

    assert records(as_sent) == records(
        [env.value for env in pack([(e.key, e.value) for e in plain], 2)]
    )


def test_route_with_primary_key_links_only_present_ids() -> None:
    out = route(event(userId="u1"), pk=PK)
    assert targets(out) == [("identity", "u1"), ("contact_events", PK)]
    out = route(event(anonymousId="a1"), pk=PK)
    assert targets(out) == [("identity", "a1"), ("contact_events", PK)]
    assert out[0].value["id_type"] == "anonymous"


def test_route_known_links_suppress_repeats_and_reemit_on_new_pk() -> None:
    cache: dict[tuple[str, str], str] = {}
    ev = event(userId="u1", anonymousId="a1")
    first = route(ev, pk=PK, known_links=cache)
    assert len(only(first, "identity")) == 2
    assert cache == {("user", "u1"): PK, ("anonymous", "a1"): PK}
    again = route(ev, pk=PK, known_links=cache)
    assert targets(again) == [("contact_events", PK)]
    # A new anonymousId for the same user: only that link is new.
    third = route(event(userId="u1", anonymousId="a2"), pk=PK, known_links=cache)
    assert targets(third) == [("identity", "a2"), ("contact_events", PK)]
    # The primary key changed (shared device / new email): links are sent again.
    fourth = route(ev, pk=PK2, known_links=cache)
    assert targets(fourth) == [("identity", "u1"), ("identity", "a1"), ("contact_events", PK2)]
    assert [e.value["primary_key"] for e in fourth] == [PK2, PK2, PK2]
    assert cache[("user", "u1")] == PK2


def test_route_without_known_links_always_links() -> None:
    ev = event(userId="u1")
    assert route(ev, pk=PK) == route(ev, pk=PK)
    assert len(only(route(ev, pk=PK), "identity")) == 1


def test_route_without_pk_user_stage() -> None:
    ev = event(userId="u1", anonymousId="a1")
    out = route(ev, ts=42)
    assert targets(out) == [("identity", "u1")]
    assert out[0].value == {
        "kind": "event",
        "event": ev,
        "ts": 42,
        "source": SRC,
        "stage": "user",
    }


class Lookup:
    """A ``lookup`` that knows some ids and records what it was asked."""

    def __init__(self, known: dict[tuple[str, str], str]) -> None:
        self.known = known
        self.asked: list[tuple[str, str]] = []

    def __call__(self, id_type: str, ident: str) -> str | None:
        self.asked.append((id_type, ident))
        return self.known.get((id_type, ident))


def test_route_resolved_at_ingest_goes_to_contact_events_as_the_identity_agent_would() -> None:
    lookup = Lookup({("user", "u1"): PK, ("anonymous", "a9"): PK2})
    ev = event(userId="u1", anonymousId="a1")
    out = route(ev, ts=42, lookup=lookup)
    assert targets(out) == [("contact_events", PK)]
    assert out[0].value == {
        "kind": "event", "event": ev, "ts": 42, "source": SRC,
        "primary_key": PK, "path": "lookup:user",
    }
    # The identity agent's delivery of the same event differs only in its path.
    r, state, _ = make()
    state.user_ids["u1"] = PK
    hop = r.handle("u1", route(ev, ts=42)[0].value)
    assert [(e.target, e.key) for e in hop] == [("contact_events", PK)]
    assert {**hop[0].value, "path": "lookup:user"} == out[0].value
    # anonymousId only: looked up by it.
    page = event("page", anonymousId="a9")
    out = route(page, lookup=lookup)
    assert targets(out) == [("contact_events", PK2)]
    assert out[0].value["path"] == "lookup:anonymous"
    assert lookup.asked == [("user", "u1"), ("anonymous", "a9")]


def test_route_takes_the_identity_hop_when_the_lookup_cannot_tell() -> None:
    lookup = Lookup({("anonymous", "a1"): PK})
    # userId not known here: the identity agent decides (userId first, then anonymousId),
    # even though the anonymousId would resolve.
    ev = event(userId="u1", anonymousId="a1")
    assert route(ev, ts=42, lookup=lookup) == route(ev, ts=42)
    assert lookup.asked == [("user", "u1")]
    # Events with a primary key and aliases never ask.
    lookup.asked.clear()
    route(event(userId="u1", traits={"email": PK}), pk=PK, lookup=lookup)
    route(event("alias", userId="u1", previousId="a1"), lookup=lookup)
    assert lookup.asked == []


def test_route_without_pk_anonymous_stage() -> None:
    ev = event("page", anonymousId="a1")
    out = route(ev, ts=42)
    assert targets(out) == [("identity", "a1")]
    assert out[0].value["stage"] == "anonymous"
    assert out[0].value["kind"] == "event"
    assert "primary_key" not in out[0].value


def test_route_alias_without_pk() -> None:
    ev = event("alias", userId="u2", previousId="a1")
    out = route(ev, ts=42)
    assert targets(out) == [("identity", "u2")]
    assert out[0].value["kind"] == "alias"
    assert out[0].value["stage"] == "user"
    assert out[0].value["event"] == ev


def test_route_alias_without_pk_and_without_user_id_goes_to_previous_id() -> None:
    # Validation accepts an alias with anonymousId only; this used to hit an assert.
    ev = event("alias", anonymousId="a9", previousId="a1")
    out = route(ev, ts=42)
    assert targets(out) == [("identity", "a1")]
    assert out[0].value["kind"] == "alias"
    assert out[0].value["stage"] == "previous"


def test_route_alias_with_pk_links_previous_id() -> None:
    ev = event("alias", userId="u2", previousId="a1", traits={"email": PK})
    out = route(ev, ts=9, pk=PK)
    assert out[-1].target == "contact_events" and out[-1].key == PK
    links = [e for e in out if e.target == "identity"]
    assert ("identity", "u2") in targets(links)
    assert {(e.key, e.value["id_type"]) for e in links if e.key == "a1"} == {
        ("a1", "anonymous"),
        ("a1", "user"),
    }
    assert all(e.value["primary_key"] == PK and e.value["ts"] == 9 for e in links)


def test_route_alias_with_pk_links_previous_id_even_when_cached() -> None:
    cache: dict[tuple[str, str], str] = {}
    ev = event("alias", userId="u2", previousId="a1")
    route(ev, pk=PK, known_links=cache)
    out = route(ev, pk=PK, known_links=cache)
    assert ("identity", "a1") in targets(out)
    assert ("identity", "u2") not in targets(out)


def test_route_output_is_json_serialisable() -> None:
    for e in route(event(userId="u1", anonymousId="a1"), pk=PK) + route(event(userId="u")):
        assert orjson.loads(orjson.dumps(e.value)) == e.value


# -- IdentityResolver: links and releasing ----------------------------------------------------


def test_link_records_id_and_releases_nothing_when_nothing_held() -> None:
    r, state, _ = make()
    assert r.handle("u1", link("user", "u1", PK)) == []
    assert r.handle("a1", link("anonymous", "a1", PK)) == []
    assert state.user_ids == {"u1": PK}
    assert state.anonymous_ids == {"a1": PK}
    assert state.lookup("user", "u1") == PK
    assert state.lookup("anonymous", "a1") == PK
    assert state.lookup("user", "a1") is None


def test_link_releases_held_events_in_event_time_order() -> None:
    r, state, _ = make()
    evs = {ts: event("page", mid=f"m{ts}", anonymousId="a1") for ts in (300, 100, 200)}
    for ts, ev in evs.items():
        assert r.handle("a1", msg(ev, ts, "anonymous")) == []
    assert [m["ts"] for m in state.held["a1"]] == [300, 100, 200]
    assert r.stats.held == 3
    out = r.handle("a1", link("anonymous", "a1", PK))
    assert mids(out) == ["m100", "m200", "m300"]
    for e in out:
        assert_delivered(e, PK)
    assert [e.value["ts"] for e in out] == [100, 200, 300]
    assert out[0].value["event"] == evs[100]
    assert "a1" not in state.held
    assert r.stats.released == 3
    # Released once only.
    assert r.handle("a1", link("anonymous", "a1", PK)) == []


def test_event_user_stage_found_is_delivered() -> None:
    r, state, _ = make()
    r.handle("u1", link("user", "u1", PK))
    ev = event(userId="u1", anonymousId="a1")
    out = r.handle("u1", msg(ev, 10, "user"))
    assert len(out) == 1
    assert_delivered(out[0], PK)
    assert out[0].value["event"] == ev and out[0].value["ts"] == 10
    assert state.held == {}


def test_event_user_stage_unknown_is_forwarded_to_anonymous_id() -> None:
    r, state, _ = make()
    ev = event(userId="u1", anonymousId="a1")
    out = r.handle("u1", msg(ev, 10, "user"))
    assert targets(out) == [("identity", "a1")]
    assert out[0].value["stage"] == "anonymous"
    assert out[0].value["event"] == ev
    assert state.held == {}
    # At the anonymousId's partition it is delivered when that id is known ...
    r.handle("a1", link("anonymous", "a1", PK))
    delivered = r.handle("a1", out[0].value)
    assert len(delivered) == 1
    assert_delivered(delivered[0], PK)


def test_event_user_stage_unknown_without_anonymous_id_is_held_under_user_id() -> None:
    r, state, _ = make()
    ev = event(userId="u1")
    assert r.handle("u1", msg(ev, 10, "user")) == []
    assert list(state.held) == ["u1"]
    (item,) = state.held["u1"]
    assert item["held_at"] == 1_000_000
    assert item["event"] == ev
    out = r.handle("u1", link("user", "u1", PK))
    assert len(out) == 1
    assert_delivered(out[0], PK)


def test_event_anonymous_stage_unknown_is_held_then_found() -> None:
    r, state, _ = make()
    ev = event("page", anonymousId="a1")
    assert r.handle("a1", msg(ev, 10, "anonymous")) == []
    assert len(state.held["a1"]) == 1
    r2, _, _ = make()
    r2.handle("a1", link("anonymous", "a1", PK))
    out = r2.handle("a1", msg(ev, 10, "anonymous"))
    assert len(out) == 1
    assert_delivered(out[0], PK)


def test_later_link_with_other_pk_replaces_old_shared_device() -> None:
    r, state, _ = make()
    r.handle("a1", link("anonymous", "a1", PK))
    out = r.handle("a1", msg(event("page", mid="m1", anonymousId="a1"), 10, "anonymous"))
    assert [e.key for e in out] == [PK]
    # Someone else logs in on the same device.
    assert r.handle("a1", link("anonymous", "a1", PK2, ts=20)) == []
    assert state.anonymous_ids == {"a1": PK2}
    out = r.handle("a1", msg(event("page", mid="m2", anonymousId="a1"), 30, "anonymous"))
    assert len(out) == 1
    assert_delivered(out[0], PK2)


def test_link_with_other_pk_releases_held_to_newest_pk() -> None:
    r, state, _ = make()
    r.handle("u1", link("user", "u1", PK))
    r.handle("u1", link("user", "u1", PK2))
    assert state.user_ids["u1"] == PK2
    out = r.handle("u1", msg(event(userId="u1"), 5, "user"))
    assert [e.key for e in out] == [PK2]


# -- holding: bound and expiry ----------------------------------------------------------------


def test_hold_overflow_dead_letters_oldest_by_event_time() -> None:
    r, state, _ = make(hold_max=2)
    e300 = event("page", mid="m300", anonymousId="a1")
    e100 = event("page", mid="m100", anonymousId="a1")
    e200 = event("page", mid="m200", anonymousId="a1")
    assert r.handle("a1", msg(e300, 300, "anonymous")) == []
    assert r.handle("a1", msg(e100, 100, "anonymous")) == []
    out = r.handle("a1", msg(e200, 200, "anonymous"))
    assert len(out) == 1
    assert_dead_letter(out[0], "identity_hold_overflow", e100)
    assert out[0].key == "a1"
    assert sorted(m["ts"] for m in state.held["a1"]) == [200, 300]
    assert r.stats.overflow == 1
    # The newest arrival can itself be the oldest by event time.
    e50 = event("page", mid="m50", anonymousId="a1")
    out = r.handle("a1", msg(e50, 50, "anonymous"))
    assert len(out) == 1
    assert_dead_letter(out[0], "identity_hold_overflow", e50)
    released = r.handle("a1", link("anonymous", "a1", PK))
    assert mids(released) == ["m200", "m300"]


def test_hold_bound_is_per_id() -> None:
    r, state, _ = make(hold_max=1)
    assert r.handle("a1", msg(event("page", mid="x", anonymousId="a1"), 1, "anonymous")) == []
    assert r.handle("a2", msg(event("page", mid="y", anonymousId="a2"), 2, "anonymous")) == []
    assert set(state.held) == {"a1", "a2"}


def test_expired_held_events_dead_lettered_on_next_hold() -> None:
    clock = Clock(1_000_000)
    r, state, _ = make(expiry_ms=HOUR_MS, clock=clock)
    old = event("page", mid="old", anonymousId="a1")
    r.handle("a1", msg(old, 10, "anonymous"))
    clock.now += HOUR_MS  # exactly at the expiry: still kept
    fresh = event("page", mid="fresh", anonymousId="a1")
    assert r.handle("a1", msg(fresh, 20, "anonymous")) == []
    clock.now += 1
    newest = event("page", mid="newest", anonymousId="a1")
    out = r.handle("a1", msg(newest, 30, "anonymous"))
    assert len(out) == 1
    assert_dead_letter(out[0], "identity_unresolved_expired", old)
    assert [m["event"]["messageId"] for m in state.held["a1"]] == ["fresh", "newest"]
    assert r.stats.expired == 1


def test_expire_sweeps_held_events() -> None:
    clock = Clock(0)
    r, state, _ = make(expiry_ms=1_000, clock=clock)
    e1 = event("page", mid="e1", anonymousId="a1")
    e2 = event("page", mid="e2", anonymousId="a1")
    r.handle("a1", msg(e1, 1, "anonymous"))
    clock.now = 500
    r.handle("a1", msg(e2, 2, "anonymous"))
    assert r.expire("a1") == []
    assert r.expire("nobody") == []
    clock.now = 1_200
    out = r.expire("a1")
    assert len(out) == 1
    assert_dead_letter(out[0], "identity_unresolved_expired", e1)
    assert [m["event"]["messageId"] for m in state.held["a1"]] == ["e2"]
    clock.now = 10_000
    out = r.expire("a1")
    assert len(out) == 1
    assert_dead_letter(out[0], "identity_unresolved_expired", e2)
    assert "a1" not in state.held
    assert r.stats.expired == 2


def test_dead_letter_envelope_shape() -> None:
    r, _, clock = make(expiry_ms=0)
    ev = event("page", mid="x", anonymousId="a1", properties={"ü": [1, 2.5, None]})
    r.handle("a1", msg(ev, 1, "anonymous"))
    clock.now += 1
    (e,) = r.expire("a1")
    assert set(e.value) >= {"reason", "error", "source", "raw", "raw_base64"}
    assert_dead_letter(e, "identity_unresolved_expired", ev)
    assert "a1" in e.value["error"]


def test_unknown_message_kind_is_dead_lettered_with_standard_envelope() -> None:
    r, _, _ = make()
    (e,) = r.handle("k", {"kind": "bogus", "source": SRC, "x": 1})
    assert e.target == "dead_letters" and e.key == "k"
    assert e.value["reason"] == "unknown_internal_message"
    assert e.value["source"] == SRC
    assert e.value["raw_base64"] is False
    assert orjson.loads(e.value["raw"]) == {"kind": "bogus", "source": SRC, "x": 1}
    assert "bogus" in e.value["error"]


# -- alias ------------------------------------------------------------------------------------


def test_alias_user_known_links_previous_id_and_delivers() -> None:
    r, _, _ = make()
    r.handle("u2", link("user", "u2", PK))
    ev = event("alias", userId="u2", previousId="a1")
    out = r.handle("u2", msg(ev, 50, "user", kind="alias"))
    delivered = only(out, "contact_events")
    assert len(delivered) == 1
    assert_delivered(delivered[0], PK)
    assert delivered[0].value["event"] == ev
    links = only(out, "identity")
    assert all(e.value["kind"] == "link" and e.value["primary_key"] == PK for e in links)
    assert {(e.key, e.value["id_type"]) for e in links if e.key == "a1"} == {
        ("a1", "anonymous"),
        ("a1", "user"),
    }
    assert all(e.key == e.value["id"] for e in links)
    assert out[-1].target == "contact_events"


def test_alias_user_unknown_previous_known_links_user_id_and_delivers() -> None:
    r, state, _ = make()
    r.handle("a1", link("anonymous", "a1", PK))
    ev = event("alias", userId="u2", previousId="a1")
    out = r.handle("u2", msg(ev, 50, "user", kind="alias"))
    assert targets(out) == [("identity", "a1")]
    assert out[0].value["stage"] == "previous"
    out = r.handle("a1", out[0].value)
    user_links = [e for e in only(out, "identity") if e.key == "u2"]
    assert [e.value for e in user_links] == [link("user", "u2", PK, 50)]
    delivered = only(out, "contact_events")
    assert len(delivered) == 1
    assert_delivered(delivered[0], PK)
    # Applying the emitted link makes userId known.
    r.handle("u2", user_links[0].value)
    assert state.user_ids["u2"] == PK


def test_alias_previous_id_may_be_an_earlier_user_id() -> None:
    r, _, _ = make()
    r.handle("u1", link("user", "u1", PK))
    ev = event("alias", userId="u2", previousId="u1")
    delivered = only(
        run(r, [Emit("identity", "u2", msg(ev, 50, "user", kind="alias"))]), "contact_events"
    )
    assert len(delivered) == 1
    assert_delivered(delivered[0], PK)


def test_alias_both_unknown_is_held_under_previous_id_and_released_by_its_link() -> None:
    r, state, _ = make()
    ev = event("alias", userId="u2", previousId="a1")
    out = run(r, [Emit("identity", "u2", msg(ev, 50, "user", kind="alias"))])
    assert out == []
    assert list(state.held) == ["a1"]
    assert state.held["a1"][0]["kind"] == "alias"
    out = r.handle("a1", link("anonymous", "a1", PK))
    delivered = only(out, "contact_events")
    assert len(delivered) == 1
    assert_delivered(delivered[0], PK)
    assert delivered[0].value["event"] == ev
    assert [e.value for e in only(out, "identity") if e.key == "u2"] == [link("user", "u2", PK, 50)]
    # Feeding the emitted links back makes u2 resolvable.
    run(r, only(out, "identity"))
    assert state.user_ids["u2"] == PK
    later = r.handle("u2", msg(event(userId="u2"), 60, "user"))
    assert [e.key for e in only(later, "contact_events")] == [PK]


def test_alias_user_unknown_without_previous_id_is_held_under_key() -> None:
    r, state, _ = make()
    ev = event("alias", userId="u2")
    assert r.handle("u2", msg(ev, 50, "user", kind="alias")) == []
    assert list(state.held) == ["u2"]


def test_alias_without_user_id_routed_and_resolved() -> None:
    r, _, _ = make()
    r.handle("a1", link("anonymous", "a1", PK))
    ev = event("alias", anonymousId="a9", previousId="a1")
    out = run(r, route(ev, ts=5))
    assert len(out) == 1
    assert_delivered(out[0], PK)


# -- full scenarios through route_ingested + resolver loop ------------------------------------


def ingest(raw: dict[str, Any], cache: dict[tuple[str, str], str]) -> list[Emit]:
    result = validate_event(orjson.dumps(raw), fallback_ts_ms=0)
    assert isinstance(result, ValidEvent), result
    pk = resolve_primary_key(result.event, PK_PATHS, ["trim", "lowercase"])
    return route_ingested(
        result.event,
        result.type,
        result.ts_ms,
        result.user_id,
        result.anonymous_id,
        pk,
        dict(SRC),
        known_links=cache,
    )


def ts(second: int) -> str:
    return f"2024-05-01T10:00:{second:02d}.000Z"


def test_full_scenario_anonymous_then_identify_then_alias() -> None:
    r, state, _ = make()
    cache: dict[tuple[str, str], str] = {}
    out: list[Emit] = []

    def feed(raw: dict[str, Any]) -> None:
        out.extend(run(r, ingest(raw, cache)))

    # Anonymous browsing, and a server-side track with a userId (not yet known).
    feed({"type": "page", "messageId": "p2", "anonymousId": "a1", "timestamp": ts(2)})
    feed({"type": "page", "messageId": "p1", "anonymousId": "a1", "timestamp": ts(1)})
    feed(
        {
            "type": "track",
            "event": "Added",
            "messageId": "t3",
            "userId": "u1",
            "anonymousId": "a1",
            "timestamp": ts(3),
        }
    )
    assert out == []
    assert len(state.held["a1"]) == 3
    # Sign-up: identify with an email (primary key) releases everything held for a1.
    feed(
        {
            "type": "identify",
            "messageId": "i4",
            "userId": "u1",
            "anonymousId": "a1",
            "traits": {"email": "  Ann@Example.com "},
            "timestamp": ts(4),
        }
    )
    assert state.held == {}
    assert state.user_ids == {"u1": PK} and state.anonymous_ids == {"a1": PK}
    # Later events by userId only, then an alias to a new userId, then events by that id.
    feed(
        {"type": "track", "event": "Bought", "messageId": "t5", "userId": "u1", "timestamp": ts(5)}
    )
    feed(
        {
            "type": "alias",
            "messageId": "al6",
            "userId": "u9",
            "previousId": "u1",
            "timestamp": ts(6),
        }
    )
    feed({"type": "track", "event": "Left", "messageId": "t7", "userId": "u9", "timestamp": ts(7)})
    # An unrelated anonymous visitor stays held.
    feed({"type": "page", "messageId": "x8", "anonymousId": "zz", "timestamp": ts(8)})

    assert all(e.target == "contact_events" for e in out)
    assert [e.key for e in out] == [PK] * 7
    # Identify goes straight to contact_events, then the released ones in event-time order.
    assert mids(out) == ["i4", "p1", "p2", "t3", "t5", "al6", "t7"]
    for e in out:
        assert_delivered(e, PK)
    assert state.user_ids["u9"] == PK
    assert list(state.held) == ["zz"]


def test_full_scenario_shared_device() -> None:
    r, state, _ = make()
    cache: dict[tuple[str, str], str] = {}
    out: list[Emit] = []

    def feed(raw: dict[str, Any]) -> None:
        out.extend(run(r, ingest(raw, cache)))

    feed(
        {
            "type": "identify",
            "messageId": "i1",
            "anonymousId": "dev",
            "timestamp": ts(1),
            "traits": {"email": PK},
        }
    )
    feed({"type": "page", "messageId": "p2", "anonymousId": "dev", "timestamp": ts(2)})
    feed(
        {
            "type": "identify",
            "messageId": "i3",
            "anonymousId": "dev",
            "timestamp": ts(3),
            "traits": {"email": PK2},
        }
    )
    feed({"type": "page", "messageId": "p4", "anonymousId": "dev", "timestamp": ts(4)})
    assert [(e.key, e.value["event"]["messageId"]) for e in out] == [
        (PK, "i1"),
        (PK, "p2"),
        (PK2, "i3"),
        (PK2, "p4"),
    ]
    assert state.anonymous_ids == {"dev": PK2}


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 1, 0], [1, 2, 0]])
def test_release_order_is_event_time_regardless_of_arrival(order: list[int]) -> None:
    r, _, _ = make()
    cache: dict[tuple[str, str], str] = {}
    raws = [
        {"type": "page", "messageId": f"p{i}", "anonymousId": "a1", "timestamp": ts(i)}
        for i in range(3)
    ]
    for i in order:
        assert run(r, ingest(raws[i], cache)) == []
    out = r.handle("a1", link("anonymous", "a1", PK))
    assert mids(out) == ["p0", "p1", "p2"]


def test_alias_with_pk_makes_previous_user_id_resolvable() -> None:
    # previousId is an earlier userId: later events carrying only that userId must resolve
    # (the ingest path links previousId as a userId too, like the resolver does).
    r, state, _ = make()
    cache: dict[tuple[str, str], str] = {}
    alias = {
        "type": "alias",
        "messageId": "al1",
        "userId": "u-new",
        "previousId": "u-old",
        "context": {"traits": {"email": PK}},
        "timestamp": ts(1),
    }
    out = run(r, ingest(alias, cache))
    assert [(e.key, e.value["event"]["messageId"]) for e in out] == [(PK, "al1")]
    assert state.user_ids == {"u-new": PK, "u-old": PK}
    track = {
        "type": "track",
        "event": "X",
        "messageId": "t2",
        "userId": "u-old",
        "timestamp": ts(2),
    }
    out = run(r, ingest(track, cache))
    assert [(e.key, e.value["event"]["messageId"]) for e in out] == [(PK, "t2")]
    assert state.held == {}
