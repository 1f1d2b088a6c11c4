"""Identity resolution: which primary key does an event belong to?

Pure logic behind the ingest and identity agents; no Kafka, no Faust. The agents
hand in a state object (Faust tables in production, dicts in unit tests) and send
whatever :class:`Emit` records come back.

Flow (see README "Identity"):
* ingest: an event whose primary key is in the event goes straight to
  ``contact-events`` (keyed by primary key) and emits a ``link`` for its
  anonymousId/userId to ``identity`` (keyed by that id). Any other event goes to
  ``identity`` keyed by its userId (else anonymousId).
* identity (partitioned by id): a ``link`` records id -> primary key and releases
  events held under that id in event-time order. An event is looked up by userId,
  then (one hop on) by anonymousId; still unknown, it is held under the last id
  tried, bounded per id and expiring. ``alias`` links previousId and userId.
* A later link for the same id with another primary key (shared device) replaces
  the old one: later events follow the newest link; contacts are never merged.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from app.held import HeldEvents

__all__ = [
    "Emit",
    "IdentityState",
    "Target",
    "route_ingested",
    "send_event_as_received",
    "IdentityResolver",
    "HOLD_KIND",
]

Target = Literal["identity", "contact_events", "dead_letters"]
HOLD_KIND = "held"


@dataclass(slots=True)
class Emit:
    target: Target
    key: str
    value: dict[str, Any]


def _event_payload(
    kind: str, event: dict[str, Any], ts: int, source: dict[str, Any]
) -> dict[str, Any]:
    return {"kind": kind, "event": event, "ts": ts, "source": source}


def route_ingested(
    event: dict[str, Any],
    ev_type: str,
    ts: int,
    user_id: str | None,
    anonymous_id: str | None,
    primary_key: str | None,
    source: dict[str, Any],
    *,
    known_links: MutableMapping[tuple[str, str], str] | None = None,
    lookup: Callable[[str, str], str | None] | None = None,
) -> list[Emit]:
    """Where a valid, normalised event goes next.

    ``known_links`` is an optional per-process cache of links this worker already
    emitted; it only saves duplicate link messages (a stale cache costs at most an
    extra, idempotent message, never a wrong result).

    ``lookup(id_type, id)`` (optional) answers what the identity agent would look up,
    where the caller can tell for sure (see agents.ingest.LocalIdentityLookup): the
    primary key, or None when it cannot say. An event it resolves goes straight to
    ``contact-events`` (path ``lookup:user`` / ``lookup:anonymous``), exactly as the
    identity agent would deliver it, one Kafka hop sooner. Only the identity agent's
    first look-up is taken here (userId when there is one, else anonymousId); anything
    else takes the identity hop as before.
    """
    out: list[Emit] = []
    if primary_key is not None:
        payload = _event_payload("event", event, ts, source)
        payload["primary_key"] = primary_key
        payload["path"] = "direct"
        for id_type, ident in (("user", user_id), ("anonymous", anonymous_id)):
            if ident is None:
                continue
            if known_links is not None:
                if known_links.get((id_type, ident)) == primary_key:
                    continue
                known_links[(id_type, ident)] = primary_key
            out.append(
                Emit(
                    "identity",
                    ident,
                    {
                        "kind": "link",
                        "id_type": id_type,
                        "id": ident,
                        "primary_key": primary_key,
                        "ts": ts,
                    },
                )
            )
        if ev_type == "alias":
            prev = _str_id(event.get("previousId"))
            if prev is not None:
                # previousId may be an anonymousId or an earlier userId: link it as both,
                # like the identity agent does when it resolves an alias.
                out.append(Emit("identity", prev, _link("user", prev, primary_key, ts)))
                out.append(Emit("identity", prev, _link("anonymous", prev, primary_key, ts)))
        out.append(Emit("contact_events", primary_key, payload))
        return out
    if ev_type == "alias":
        payload = _event_payload("alias", event, ts, source)
        prev = _str_id(event.get("previousId"))
        if user_id is None and prev is not None:
            # An alias with only anonymousId + previousId: nothing to look up by userId.
            payload["stage"] = "previous"
            out.append(Emit("identity", prev, payload))
            return out
        # Resolve userId first; its partition forwards to previousId's when unknown.
        ident = user_id if user_id is not None else anonymous_id
        assert ident is not None  # validated: an event has userId or anonymousId
        payload["stage"] = "user"
        out.append(Emit("identity", ident, payload))
        return out
    payload = _event_payload("event", event, ts, source)
    if lookup is not None:
        id_type, ident = ("user", user_id) if user_id is not None else ("anonymous", anonymous_id)
        pk = lookup(id_type, ident) if ident is not None else None
        if pk is not None:
            payload["primary_key"] = pk
            payload["path"] = f"lookup:{id_type}"
            out.append(Emit("contact_events", pk, payload))
            return out
    if user_id is not None:
        payload["stage"] = "user"
        out.append(Emit("identity", user_id, payload))
    else:
        assert anonymous_id is not None
        payload["stage"] = "anonymous"
        out.append(Emit("identity", anonymous_id, payload))
    return out


def send_event_as_received(emits: list[Emit], event: dict[str, Any], raw: bytes) -> None:
    """Make the records of ``emits`` that carry ``event`` carry ``raw`` instead, as an
    ``orjson.Fragment``: encoded as it is, not again. Only for an event that validation
    left as received (``ValidEvent.as_received``), whose ``raw`` decodes to ``event``, so
    every reader of the record gets the same object either way."""
    fragment: Any = None
    for e in emits:
        if e.value.get("event") is event:
            if fragment is None:
                fragment = orjson.Fragment(raw)
            e.value["event"] = fragment


def _link(id_type: str, ident: str, pk: str, ts: int) -> dict[str, Any]:
    return {"kind": "link", "id_type": id_type, "id": ident, "primary_key": pk, "ts": ts}


class IdentityState:
    """What the identity agent keeps: two lookup maps and the held events per id.

    Backed by plain dicts here; the agent passes adapters over Faust tables. ``held`` is
    the index of held events per id and ``held_items`` the events (see :mod:`app.held`);
    ``self.held`` reads as id -> held messages.
    """

    def __init__(
        self,
        anonymous_ids: MutableMapping[str, str],
        user_ids: MutableMapping[str, str],
        held: MutableMapping[str, Any],
        held_items: MutableMapping[str, Any] | None = None,
    ) -> None:
        self.anonymous_ids = anonymous_ids
        self.user_ids = user_ids
        self.held = HeldEvents(held, {} if held_items is None else held_items)

    def lookup(self, id_type: str, ident: str) -> str | None:
        table = self.user_ids if id_type == "user" else self.anonymous_ids
        return table.get(ident)


@dataclass
class ResolverStats:
    held: int = 0
    released: int = 0
    expired: int = 0
    overflow: int = 0


class IdentityResolver:
    """Applies one ``identity`` topic message to :class:`IdentityState`."""

    def __init__(
        self,
        state: IdentityState,
        *,
        hold_max_per_id: int,
        hold_expiry_ms: int,
        now_ms: Callable[[], int],
    ) -> None:
        self.state = state
        self.hold_max = hold_max_per_id
        self.hold_expiry_ms = hold_expiry_ms
        self.now_ms = now_ms
        self.stats = ResolverStats()

    def handle(self, key: str, msg: dict[str, Any]) -> list[Emit]:
        kind = msg.get("kind")
        if kind == "link":
            return self._link(msg["id_type"], msg["id"], msg["primary_key"], int(msg["ts"]))
        if kind == "event":
            return self._event(key, msg)
        if kind == "alias":
            return self._alias(key, msg)
        # Same envelope as every other dead letter; ``raw`` is the message as JSON text.
        source = msg.get("source")
        return [
            Emit(
                "dead_letters",
                key,
                {
                    "reason": "unknown_internal_message",
                    "error": f"unknown identity message kind {kind!r}",
                    "source": source if isinstance(source, dict) else {},
                    "raw": orjson.dumps(msg, option=orjson.OPT_NON_STR_KEYS).decode(),
                    "raw_base64": False,
                },
            )
        ]

    # -- links -------------------------------------------------------------------
    def _link(self, id_type: str, ident: str, pk: str, ts: int) -> list[Emit]:
        table = self.state.user_ids if id_type == "user" else self.state.anonymous_ids
        if table.get(ident) != pk:
            table[ident] = pk
        return self._release(ident, pk)

    def _release(self, ident: str, pk: str) -> list[Emit]:
        held = self.state.held.take_all(ident)
        out: list[Emit] = []
        for item in sorted(held, key=lambda m: m["ts"]):
            self.stats.released += 1
            out.extend(self._deliver(item, pk))
        return out

    def _deliver(self, msg: dict[str, Any], pk: str) -> list[Emit]:
        """An event (or alias) whose primary key is now known."""
        payload = {k: v for k, v in msg.items() if k not in ("stage", "held_at")}
        payload["kind"] = "event"
        payload["primary_key"] = pk
        # Which way it came (the rules agent keeps one event clock per path, see there).
        payload["path"] = "held" if "held_at" in msg else f"identity:{msg.get('stage', '')}"
        out: list[Emit] = []
        if msg.get("kind") == "alias":
            event = msg["event"]
            ts = int(msg["ts"])
            uid, prev = event.get("userId"), event.get("previousId")
            for ident in (uid, prev):
                if isinstance(ident, str) and ident:
                    out.append(Emit("identity", ident, _link("user", ident, pk, ts)))
            if isinstance(prev, str) and prev:
                out.append(Emit("identity", prev, _link("anonymous", prev, pk, ts)))
        out.append(Emit("contact_events", pk, payload))
        return out

    # -- events --------------------------------------------------------------------
    def _event(self, key: str, msg: dict[str, Any]) -> list[Emit]:
        event = msg["event"]
        stage = msg.get("stage", "anonymous")
        if stage == "user":
            uid = _str_id(event.get("userId"))
            pk = self.state.lookup("user", uid) if uid else None
            if pk is not None:
                return self._deliver(msg, pk)
            aid = _str_id(event.get("anonymousId"))
            if aid:
                fwd = dict(msg)
                fwd["stage"] = "anonymous"
                return [Emit("identity", aid, fwd)]
            return self._hold(key, msg)
        aid = _str_id(event.get("anonymousId")) or key
        pk = self.state.lookup("anonymous", aid)
        if pk is not None:
            return self._deliver(msg, pk)
        return self._hold(aid, msg)

    def _alias(self, key: str, msg: dict[str, Any]) -> list[Emit]:
        event = msg["event"]
        uid = _str_id(event.get("userId"))
        prev = _str_id(event.get("previousId"))
        if msg.get("stage") == "user":
            pk = self.state.lookup("user", uid) if uid else None
            if pk is not None:
                return self._deliver(msg, pk)
            if prev:
                fwd = dict(msg)
                fwd["stage"] = "previous"
                return [Emit("identity", prev, fwd)]
            return self._hold(key, msg)
        # stage "previous": previousId may be an anonymousId or an earlier userId.
        assert prev is not None
        pk = self.state.lookup("anonymous", prev) or self.state.lookup("user", prev)
        if pk is not None:
            return self._deliver(msg, pk)
        return self._hold(prev, msg)

    # -- holding -------------------------------------------------------------------
    def _hold(self, ident: str, msg: dict[str, Any]) -> list[Emit]:
        now = self.now_ms()
        out = self._expire(ident, now)
        item = dict(msg)
        item["held_at"] = now
        held = self.state.held
        held.add(ident, item, int(msg["ts"]), now)
        self.stats.held += 1
        if held.count(ident) > self.hold_max:
            # The oldest in event time go (ties: the first held), as dead letters.
            by_time = sorted(held.entries(ident), key=lambda e: e.ts)
            drop = {e.seq for e in by_time[: len(by_time) - self.hold_max]}
            for dropped in sorted(held.take(ident, drop), key=lambda m: int(m["ts"])):
                self.stats.overflow += 1
                out.append(self._dead_letter(ident, dropped, "identity_hold_overflow"))
        return out

    def expire(self, ident: str) -> list[Emit]:
        """Dead-letter held events of ``ident`` older than the hold expiry (sweeps)."""
        return self._expire(ident, self.now_ms())

    def _expire(self, ident: str, now: int) -> list[Emit]:
        # held_at < now - expiry  <=>  now - held_at > expiry
        expired = self.state.held.held_before(ident, now - self.hold_expiry_ms)
        out: list[Emit] = []
        for item in self.state.held.take(ident, expired):
            self.stats.expired += 1
            out.append(self._dead_letter(ident, item, "identity_unresolved_expired"))
        return out

    @staticmethod
    def _dead_letter(ident: str, item: dict[str, Any], reason: str) -> Emit:
        # Same envelope as invalid input; ``raw`` is the normalised event as JSON text.
        return Emit(
            "dead_letters",
            ident,
            {
                "reason": reason,
                "error": f"no primary key became known for id {ident!r} in time",
                "source": item.get("source"),
                "raw": orjson.dumps(item.get("event")).decode(),
                "raw_base64": False,
                "held_id": ident,
                "held_at": item.get("held_at"),
            },
        )


def _str_id(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None
