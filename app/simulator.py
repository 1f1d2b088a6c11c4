"""Emarsys Core API simulator: an aiohttp app standing in for ``api.emarsys.net``.

Built from ``/work/shared/reference/emarsys-api.md`` (the API sheet), not from our
client. Used by ``emarsys-stream run`` and by the tests.

Endpoints (each under ``/api/v2/`` with WSSE auth and under ``/api/v3/`` with an
OAuth 2.0 Bearer token; a trailing slash is optional):

=================================  ==========================================
``PUT contact/?create_if_not_exists=1``  upsert contacts (without the flag,
                                   unknown contacts get per-contact 2008)
``POST contact/delete``            delete contacts
``POST event/{event_id}/trigger``  trigger an external event (single / batch)
``GET event`` / ``POST event``     list / create external events
``POST contactlist``               create a contact list
``GET contactlist``                list contact lists
``POST contactlist/{id}/add``      add contacts to a list
``POST contactlist/{id}/delete``   remove contacts from a list
``GET field``                      field definitions
``GET settings``                   credentials check (``data.id > 0``)
``POST /oauth2/token``             OAuth 2.0 client credentials token
=================================  ==========================================

Every ``/api/...`` answer is the sheet's envelope
``{"replyCode": int, "replyText": str, "data": ...}``. The token endpoint answers
like an OAuth 2.0 server (``{"access_token", "token_type", "expires_in"}`` or
``{"error", "error_description"}``) because in production it is another host.

Reply codes (HTTP status in brackets). Codes marked *sim* are not in the sheet;
the simulator picked them:

* ``0`` [200] OK. Batch calls answer 200/0 even if some contacts failed; per
  contact errors are in ``data.errors`` as ``{"<key value>": {"<code>": "msg"}}``.
* ``1`` [401/404/429/5xx] *sim*: authentication failed (replyText
  ``"Unauthorized"``, or ``"Time frame is invalid"`` for a WSSE ``Created`` more
  than 5 minutes off or a reused nonce), unknown endpoint [404], rate limit
  exceeded [429], injected server error [500/502/503], injected timeout [504].
  WSSE is checked as the sheet says: all four of Username, PasswordDigest, Nonce
  (32 hex characters) and Created (ISO 8601) present, the user known, the digest
  ``base64(hex(sha1(nonce + created + secret)))``, Created within 5 minutes of
  now, the nonce not used before by that user. The reason of a 401 is in the
  recorded call's ``note``.
* ``1000`` [400] more than 1000 contacts in one call (upsert, trigger, delete).
* ``1001`` [400] *sim*: the body is not JSON or has the wrong shape. Also used as
  a per-contact code for a contact that is not a JSON object, a field key that is
  not a numeric field id, a trigger ``data`` that is not an object or an
  ``event_time`` that is not ISO 8601.
* ``1003`` [400] *sim*: request body too large (contact upsert > 8 MiB, event
  trigger > 1 MiB, anything else > 16 MiB; see :class:`SimulatorOptions`).
* ``2004`` [400] invalid or missing ``key_id`` (not a known field id: the standard
  ids of the sheet plus ``SimulatorOptions.fields``; ``key_id`` is required on
  upsert, delete, trigger and list add/delete). The call is rejected as a whole;
  ``data.errors`` is ``{"<NO_KEY_ID>": {"2004": "..."}}``.
* ``2005`` per contact, *sim*: no value for the key field. The error is keyed
  ``"<NO_KEY_VALUE>"`` because there is no key value to key it by.
* ``2008`` per contact (single trigger: [400] as the replyCode): no contact found.
* ``2010`` per contact: more than one contact matches the key.
* ``3002`` [400] more than 10,000 ids for a contact list call.
* ``3003`` [400] *sim*: a contact list with that name already exists.
* ``3004`` [400] *sim*: no contact list with that id.
* ``5001`` [400] *sim*: an external event with that name already exists.
* ``5005`` [400] no program is triggered by that external event (only with
  ``strict_events``; by default any integer event id is accepted).

Rate limit: per API user (WSSE username / OAuth client id), sliding window of
``rate_limit_window`` (60) seconds. Every authenticated answer carries
``X-RateLimit-Limit``, ``X-RateLimit-Remaining`` and ``X-RateLimit-Reset`` (unix
seconds); over the limit the answer is HTTP 429. No ``Retry-After``.

Order of checks for an API call: body read (size) -> authentication -> injected
faults (latency, stall, timeout, burst_429, error_rate) -> rate limit -> body
parse -> the call itself. Injected faults do not use up the rate limit.

Test and operator endpoints (plain JSON, no envelope, no auth, never recorded):
``GET /_sim/calls``, ``GET /_sim/contacts``, ``GET /_sim/contacts/{key_value}``
(``?key_id=3``), ``GET /_sim/triggers``, ``GET /_sim/lists``, ``GET /_sim/events``,
``GET /_sim/stats``, ``GET|POST /_sim/faults``, ``POST /_sim/revoke-tokens``,
``POST /_sim/reset``. The same data is on :class:`SimulatorState`
(``app[SIMULATOR_STATE]`` / ``RunningSimulator.state``).

Secrets (WSSE secrets, client secrets, access tokens, auth headers) are never
logged, printed or recorded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import hmac
import logging
import math
import random
import re
import secrets
import signal
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

__all__ = [
    "SIMULATOR_STATE",
    "STANDARD_FIELDS",
    "Contact",
    "ContactList",
    "RecordedCall",
    "RunningSimulator",
    "SimulatorOptions",
    "SimulatorState",
    "TriggeredEvent",
    "create_simulator_app",
    "run_simulator_forever",
    "start_simulator",
]

log = logging.getLogger(__name__)

MIB = 1024 * 1024

# Standard field ids from the sheet: id -> (name, application_type, string_id).
STANDARD_FIELDS: dict[int, tuple[str, str, str]] = {
    1: ("First Name", "shorttext", "first_name"),
    2: ("Last Name", "shorttext", "last_name"),
    3: ("Email", "longtext", "email"),
    4: ("Date of Birth", "birthdate", "birth_date"),
    5: ("Gender", "singlechoice", "gender"),
    11: ("City", "shorttext", "city"),
    12: ("State", "shorttext", "state"),
    13: ("ZIP Code", "shorttext", "zip"),
    14: ("Country", "singlechoice", "country"),
    15: ("Phone", "shorttext", "phone"),
    31: ("Opt-In", "singlechoice", "optin"),
    35: ("Language", "singlechoice", "language"),
    37: ("Mobile", "shorttext", "mobile"),
    46: ("Salutation", "singlechoice", "salutation"),
}

NO_KEY_ID = "<NO_KEY_ID>"
NO_KEY_VALUE = "<NO_KEY_VALUE>"

# Option names that POST /_sim/faults (and SimulatorState.set_faults) may change.
RUNTIME_FIELDS: frozenset[str] = frozenset(
    {
        "error_rate",
        "error_statuses",
        "latency",
        "stall_rate",
        "stall_seconds",
        "burst_429",
        "timeout_rate",
        "timeout_seconds",
        "timeout_mode",
        "seed",
        "rate_limit_per_minute",
        "rate_limit_window",
        "token_lifetime",
        "strict_events",
    }
)


def _default_users() -> dict[str, str]:
    return {"sim-user": "sim-secret"}


def _default_clients() -> dict[str, str]:
    return {"sim-client": "sim-client-secret"}


@dataclass
class SimulatorOptions:
    """Behaviour of the simulator. Fault fields can be changed at runtime."""

    # Credentials.
    users: dict[str, str] = field(default_factory=_default_users)
    """WSSE username -> secret (``/api/v2/``)."""
    oauth_clients: dict[str, str] = field(default_factory=_default_clients)
    """OAuth client_id -> client_secret (``/oauth2/token``, ``/api/v3/``)."""
    token_lifetime: float = 3600.0
    """Seconds an access token is valid (``expires_in``)."""
    wsse_max_skew: float = 300.0
    """WSSE ``Created`` may be at most this many seconds off now."""

    # Rate limit (per API user, sliding window).
    rate_limit_per_minute: int = 1000
    """Calls allowed per user in ``rate_limit_window`` seconds; 0 switches it off."""
    rate_limit_window: float = 60.0

    # Faults.
    error_rate: float = 0.0
    """Fraction of API calls answered with one of ``error_statuses``."""
    error_statuses: tuple[int, ...] = (500, 502, 503)
    latency: float = 0.0
    """Seconds added to every API call."""
    stall_rate: float = 0.0
    """Fraction of API calls that stall ``stall_seconds`` before being served."""
    stall_seconds: float = 30.0
    burst_429: int = 0
    """The next N API calls are answered 429 (counts down)."""
    timeout_rate: float = 0.0
    """Fraction of API calls held ``timeout_seconds`` and then failed."""
    timeout_seconds: float = 60.0
    timeout_mode: str = "504"
    """``"504"``: answer 504 after the hold; ``"close"``: drop the connection."""
    seed: int | None = None
    """Seed for the fault randomness (reproducible runs)."""

    # Data model.
    events: dict[int, str] = field(default_factory=dict)
    """Preconfigured external events: id -> name."""
    strict_events: bool = False
    """Trigger of an event id not in ``events`` / not created -> 400/5005."""
    fields: dict[int, str] = field(default_factory=dict)
    """Custom fields (id -> name) in addition to the standard ones; usable as key_id."""
    account_id: int = 1
    """``GET settings`` -> ``data.id``."""

    # Limits.
    max_batch: int = 1000
    max_list_ids: int = 10_000
    contact_max_bytes: int = 8 * MIB
    trigger_max_bytes: int = 1 * MIB
    max_body_bytes: int = 16 * MIB
    """Body limit of the other calls (and the hard limit of the server)."""

    # Introspection.
    record_bodies: bool = True
    """Keep parsed request bodies in the call log."""
    max_recorded_calls: int = 100_000
    """Keep about this many calls (oldest dropped in chunks of 10%); 0 = unlimited."""


# --------------------------------------------------------------------------- data


@dataclass
class RecordedCall:
    """One API call (``/api/...`` or ``/oauth2/token``) as the simulator saw it."""

    seq: int
    method: str
    path: str
    query: dict[str, str]
    status: int
    """HTTP status sent; 0 when the connection was dropped (timeout_mode close)."""
    reply_code: int | None
    reply_text: str | None
    auth_user: str | None
    """Authenticated WSSE user / OAuth client (None when auth failed)."""
    auth_scheme: str | None
    """"wsse", "bearer", "basic" (token endpoint) or None."""
    body: Any
    """Parsed JSON body (None if empty, unparsable, too large or not recorded)."""
    body_bytes: int
    received_at: float
    """Unix seconds."""
    duration: float
    injected: bool = False
    """True when the answer was an injected fault (burst_429, error, timeout)."""
    fault: str | None = None
    """"burst_429", "error", "timeout", "stall" (served after a stall) or None."""
    rate_limited: bool = False
    """True for a 429 from the real rate limiter."""
    note: str | None = None
    """Free-text detail, e.g. why auth failed."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "status": self.status,
            "replyCode": self.reply_code,
            "replyText": self.reply_text,
            "auth_user": self.auth_user,
            "auth_scheme": self.auth_scheme,
            "body": self.body,
            "body_bytes": self.body_bytes,
            "received_at": self.received_at,
            "duration": self.duration,
            "injected": self.injected,
            "fault": self.fault,
            "rate_limited": self.rate_limited,
            "note": self.note,
        }


@dataclass
class Contact:
    id: int
    fields: dict[str, Any]
    """Field id (string) -> value, exactly as last sent."""
    created_at: float
    updated_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "fields": dict(self.fields),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass
class TriggeredEvent:
    """A distinct triggered external event (a repeated trigger_id is not a new one)."""

    seq: int
    event_id: int
    key_id: str
    external_id: str
    contact_id: int
    trigger_id: str | None
    data: dict[str, Any] | None
    event_time: str | None
    received_at: float
    auth_user: str | None
    deliveries: int = 1
    """How often it was sent (> 1 when the same trigger_id was repeated)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ContactList:
    id: int
    name: str
    description: str | None
    key_id: str | None
    created_at: float
    members: set[int] = field(default_factory=set)
    """Contact ids."""

    def to_dict(self, state: SimulatorState | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "key_id": self.key_id,
            "created_at": self.created_at,
            "contact_ids": sorted(self.members),
        }
        if state is not None:
            key = self.key_id or "3"
            out["external_ids"] = [
                state.contacts[cid].fields.get(key)
                for cid in sorted(self.members)
                if cid in state.contacts
            ]
        return out


@dataclass
class _Token:
    client_id: str
    expires_at: float


class _Reject(Exception):
    """Raised inside a call to answer with an error envelope."""

    def __init__(self, status: int, code: int, text: str, data: Any = "") -> None:
        super().__init__(text)
        self.status = status
        self.code = code
        self.text = text
        self.data = data


# -------------------------------------------------------------------------- state


class SimulatorState:
    """Everything the simulator knows; shared by the HTTP handlers and in-process tests."""

    def __init__(self, options: SimulatorOptions | None = None) -> None:
        self.initial_options = dataclasses.replace(options or SimulatorOptions())
        self.options = dataclasses.replace(self.initial_options)
        self.clock: Callable[[], float] = time.time
        self.calls: list[RecordedCall] = []
        self.contacts: dict[int, Contact] = {}
        self.triggers: list[TriggeredEvent] = []
        self.lists: dict[int, ContactList] = {}
        self.events: dict[int, str] = {}
        self.counters: Counter[str] = Counter()
        self._index: dict[str, dict[str, set[int]]] = {}
        self._trigger_ids: dict[tuple[int, str], TriggeredEvent] = {}
        self._nonces: dict[tuple[str, str], float] = {}
        self._nonce_order: deque[tuple[float, tuple[str, str]]] = deque()
        self._tokens: dict[str, _Token] = {}
        self._windows: dict[str, deque[float]] = {}
        self._stopping = asyncio.Event()
        self._reset_data()

    # ----------------------------------------------------------------- lifecycle

    def _reset_data(self) -> None:
        self.calls.clear()
        self.contacts.clear()
        self.triggers.clear()
        self.lists.clear()
        self.events = dict(self.options.events)
        self.counters.clear()
        self._index.clear()
        self._trigger_ids.clear()
        self._nonces.clear()
        self._nonce_order.clear()
        self._tokens.clear()
        self._windows.clear()
        self._seq = 0
        self._next_contact_id = 100_000_001
        self._next_list_id = 700_001
        self._next_event_id = max([1000, *self.events]) + 1
        self.rng = random.Random(self.options.seed)

    def reset(self) -> None:
        """Forget all data, calls, tokens and nonces; options back to the initial ones."""
        self.options = dataclasses.replace(self.initial_options)
        self._reset_data()

    # -------------------------------------------------------------------- faults

    def faults(self) -> dict[str, Any]:
        """The runtime-changeable options and their current values."""
        return {name: getattr(self.options, name) for name in sorted(RUNTIME_FIELDS)}

    def set_faults(self, **changes: Any) -> dict[str, Any]:
        """Change fault / runtime options (names as in SimulatorOptions). ValueError if bad."""
        unknown = sorted(set(changes) - RUNTIME_FIELDS)
        if unknown:
            raise ValueError(f"unknown option(s): {', '.join(unknown)}")
        validated: dict[str, Any] = {}
        for name, value in changes.items():
            validated[name] = _validate_runtime(name, value)
        for name, value in validated.items():
            setattr(self.options, name, value)
        if "seed" in validated:
            self.rng = random.Random(validated["seed"])
        log.info("simulator options changed: %s", validated)
        return self.faults()

    def _chance(self, rate: float) -> bool:
        return rate > 0 and (rate >= 1 or self.rng.random() < rate)

    async def _sleep(self, seconds: float) -> None:
        """Sleep that ends early when the simulator stops."""
        if seconds <= 0:
            return
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass

    # ------------------------------------------------------------------- lookups

    def known_field_ids(self) -> set[int]:
        return set(STANDARD_FIELDS) | set(self.options.fields)

    def find_contacts(self, key_id: str | int, value: Any) -> list[Contact]:
        """All contacts whose field ``key_id`` equals ``value`` (compared as strings)."""
        ids = self._index.get(str(key_id), {}).get(_key_str(value), set())
        return [self.contacts[cid] for cid in sorted(ids)]

    def contact_by_key(self, value: Any, key_id: str | int = "3") -> Contact | None:
        found = self.find_contacts(key_id, value)
        return found[0] if found else None

    def triggers_for(self, event_id: int | None = None) -> list[TriggeredEvent]:
        if event_id is None:
            return list(self.triggers)
        return [t for t in self.triggers if t.event_id == event_id]

    def calls_to(self, path_part: str, method: str | None = None) -> list[RecordedCall]:
        """Recorded calls whose path contains ``path_part`` (and method, if given)."""
        return [
            c
            for c in self.calls
            if path_part in c.path and (method is None or c.method == method.upper())
        ]

    async def wait_for(
        self,
        predicate: Callable[[SimulatorState], bool],
        within: float = 10.0,
        interval: float = 0.01,
    ) -> None:
        """Poll until ``predicate(state)`` is true; TimeoutError after ``within`` seconds."""
        deadline = time.monotonic() + within
        while not predicate(self):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"simulator condition not met within {within}s")
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ mutation

    def add_contact(self, fields: dict[str | int, Any]) -> Contact:
        """Create a contact directly (test seeding); not recorded as a call."""
        now = self.clock()
        contact = Contact(self._next_contact_id, {}, now, now)
        self._next_contact_id += 1
        self.contacts[contact.id] = contact
        for fid, value in fields.items():
            self._set_field(contact, str(fid), value)
        self.counters["contacts_created"] += 1
        return contact

    def _set_field(self, contact: Contact, fid: str, value: Any) -> None:
        old = contact.fields.get(fid)
        if fid in contact.fields and _indexable(old):
            bucket = self._index.get(fid, {}).get(_key_str(old))
            if bucket is not None:
                bucket.discard(contact.id)
                if not bucket:
                    del self._index[fid][_key_str(old)]
        contact.fields[fid] = value
        if _indexable(value):
            self._index.setdefault(fid, {}).setdefault(_key_str(value), set()).add(contact.id)

    def _delete_contact(self, contact: Contact) -> None:
        for fid, value in contact.fields.items():
            if _indexable(value):
                bucket = self._index.get(fid, {}).get(_key_str(value))
                if bucket is not None:
                    bucket.discard(contact.id)
                    if not bucket:
                        del self._index[fid][_key_str(value)]
        for lst in self.lists.values():
            lst.members.discard(contact.id)
        del self.contacts[contact.id]

    def _record(self, call: RecordedCall) -> None:
        self.calls.append(call)
        limit = self.options.max_recorded_calls
        if limit > 0 and len(self.calls) > limit + max(1, limit // 10):
            del self.calls[: len(self.calls) - limit]

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # ------------------------------------------------------------------------ auth

    def _check_wsse(self, header: str | None) -> tuple[str | None, str | None, str]:
        """Validate an X-WSSE header. Returns (user, error replyText, note)."""
        if not header:
            return None, "Unauthorized", "missing X-WSSE header"
        parsed = _parse_wsse(header)
        if parsed is None:
            return None, "Unauthorized", "malformed X-WSSE header"
        user = parsed["Username"]
        digest = parsed["PasswordDigest"]
        nonce = parsed["Nonce"]
        created = parsed["Created"]
        secret = self.options.users.get(user)
        if secret is None:
            return None, "Unauthorized", "unknown WSSE user"
        if not re.fullmatch(r"[0-9a-fA-F]{32}", nonce):
            return None, "Unauthorized", "nonce is not 32 hex characters"
        if not hmac.compare_digest(digest.encode(), _wsse_digest(nonce, created, secret).encode()):
            return None, "Unauthorized", "bad password digest"
        created_ts = _parse_iso(created)
        now = self.clock()
        if created_ts is None:
            return None, "Time frame is invalid", "Created is not ISO 8601"
        if abs(now - created_ts) > self.options.wsse_max_skew:
            return None, "Time frame is invalid", "Created is more than 5 minutes off"
        self._purge_nonces(now)
        key = (user, nonce)
        if key in self._nonces:
            return None, "Time frame is invalid", "nonce reused"
        expiry = now + 2 * self.options.wsse_max_skew + 60
        self._nonces[key] = expiry
        self._nonce_order.append((expiry, key))
        return user, None, ""

    def _purge_nonces(self, now: float) -> None:
        while self._nonce_order and self._nonce_order[0][0] < now:
            _, key = self._nonce_order.popleft()
            self._nonces.pop(key, None)

    def _check_bearer(self, header: str | None) -> tuple[str | None, str | None, str]:
        if not header:
            return None, "Unauthorized", "missing Authorization header"
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None, "Unauthorized", "Authorization is not a Bearer token"
        entry = self._tokens.get(token.strip())
        if entry is None:
            return None, "Unauthorized", "unknown or revoked access token"
        if self.clock() >= entry.expires_at:
            return None, "Unauthorized", "access token expired"
        return entry.client_id, None, ""

    def issue_token(self, client_id: str) -> tuple[str, float]:
        token = secrets.token_urlsafe(32)
        lifetime = float(self.options.token_lifetime)
        self._tokens[token] = _Token(client_id, self.clock() + lifetime)
        now = self.clock()
        for tok, entry in list(self._tokens.items()):
            if entry.expires_at <= now:
                del self._tokens[tok]
        self.counters["tokens_issued"] += 1
        return token, lifetime

    def revoke_tokens(self) -> int:
        """Revoke every access token; returns how many there were."""
        n = len(self._tokens)
        self._tokens.clear()
        self.counters["tokens_revoked"] += n
        return n

    # ------------------------------------------------------------------ rate limit

    def _rate_headers(self, user: str, consume: bool) -> tuple[bool, dict[str, str]]:
        """Check (and with consume, count) a call. Returns (allowed, headers)."""
        limit = self.options.rate_limit_per_minute
        if limit <= 0:
            return True, {}
        window_len = self.options.rate_limit_window
        now = self.clock()
        window = self._windows.setdefault(user, deque())
        while window and window[0] <= now - window_len:
            window.popleft()
        allowed = len(window) < limit
        if allowed and consume:
            window.append(now)
        oldest = window[0] if window else now
        headers = {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(max(0, limit - len(window))),
            "X-RateLimit-Reset": str(math.ceil(oldest + window_len)),
        }
        return allowed, headers


# ------------------------------------------------------------------------- helpers


def _validate_runtime(name: str, value: Any) -> Any:
    def number(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"{name}: expected a number, got {v!r}")
        if v < 0 or math.isnan(v):
            raise ValueError(f"{name}: must be >= 0")
        return float(v)

    if name in {"error_rate", "stall_rate", "timeout_rate"}:
        rate = number(value)
        if rate > 1:
            raise ValueError(f"{name}: must be between 0 and 1")
        return rate
    if name in {"latency", "stall_seconds", "timeout_seconds", "token_lifetime"}:
        return number(value)
    if name == "rate_limit_window":
        window = number(value)
        if window <= 0:
            raise ValueError(f"{name}: must be > 0")
        return window
    if name in {"burst_429", "rate_limit_per_minute"}:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
        return value
    if name == "seed":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name}: expected an integer or null")
        return value
    if name == "strict_events":
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true or false")
        return value
    if name == "timeout_mode":
        if value not in ("504", "close"):
            raise ValueError(f"{name}: expected '504' or 'close'")
        return value
    if name == "error_statuses":
        if (
            not isinstance(value, list | tuple)
            or not value
            or not all(isinstance(s, int) and 500 <= s <= 599 for s in value)
        ):
            raise ValueError(f"{name}: expected a non-empty list of 5xx statuses")
        return tuple(value)
    raise ValueError(f"unknown option: {name}")  # pragma: no cover


def _wsse_digest(nonce: str, created: str, secret: str) -> str:
    """The sheet: base64( hex( sha1(nonce + created + secret) ) ), base64 of the hex string."""
    hex_digest = hashlib.sha1((nonce + created + secret).encode("utf-8")).hexdigest()
    return base64.b64encode(hex_digest.encode("ascii")).decode("ascii")


_WSSE_PREFIX = re.compile(r"^\s*UsernameToken\s+(?P<rest>.*)$", re.DOTALL)
_WSSE_PAIR = re.compile(r'\s*(?P<name>[A-Za-z]+)\s*=\s*"(?P<value>[^"]*)"\s*(?:,|$)')


def _parse_wsse(header: str) -> dict[str, str] | None:
    match = _WSSE_PREFIX.match(header)
    if match is None:
        return None
    rest = match.group("rest").strip()
    values: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        pair = _WSSE_PAIR.match(rest, pos)
        if pair is None or pair.end() == pos:
            return None
        values[pair.group("name")] = pair.group("value")
        pos = pair.end()
    needed = ("Username", "PasswordDigest", "Nonce", "Created")
    if not all(values.get(k) for k in needed):
        return None
    return values


def _parse_iso(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _key_str(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _indexable(value: Any) -> bool:
    return value is not None and value != "" and isinstance(value, str | int | float)


def _json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS),
        status=status,
        content_type="application/json",
    )


def _envelope(
    status: int, code: int, text: str, data: Any, headers: dict[str, str] | None = None
) -> web.Response:
    resp = _json_response({"replyCode": code, "replyText": text, "data": data}, status)
    if headers:
        resp.headers.update(headers)
    return resp


# ----------------------------------------------------------------- API call logic


@dataclass
class _Ctx:
    request: web.Request
    state: SimulatorState
    body: Any
    user: str


@dataclass
class _Reply:
    data: Any
    code: int = 0
    text: str = "OK"
    status: int = 200


_Handler = Callable[[_Ctx], Awaitable[_Reply]]


def _key_id(state: SimulatorState, body: dict[str, Any], *, required: bool = True) -> str:
    """Validate body["key_id"]; raise a batch-wide 2004 if it is missing or unknown."""
    raw = body.get("key_id")
    if raw is None and not required:
        return "3"
    text = _key_str(raw) if isinstance(raw, str | int) and not isinstance(raw, bool) else ""
    if text.isdigit() and int(text) in state.known_field_ids():
        return str(int(text))
    msg = f"Invalid key field id: {raw!r}" if raw is not None else "Missing key field id"
    raise _Reject(400, 2004, msg, {"ids": [], "errors": {NO_KEY_ID: {"2004": msg}}})


def _body_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _Reject(400, 1001, "Request body must be a JSON object")
    return body


def _not_found_msg(key_id: str, value: Any) -> str:
    return f"No contact found with the external id: {key_id} - {value}"


def _resolve(state: SimulatorState, key_id: str, value: Any) -> tuple[Contact | None, str, str]:
    """Find exactly one contact. Returns (contact, error code, error message)."""
    found = state.find_contacts(key_id, value)
    if not found:
        return None, "2008", _not_found_msg(key_id, value)
    if len(found) > 1:
        return None, "2010", f"More than one contact found with the external id: {key_id}"
    return found[0], "", ""


def _error_key(value: Any) -> str:
    return _key_str(value) if _indexable(value) else NO_KEY_VALUE


async def _upsert_contacts(ctx: _Ctx) -> _Reply:
    state, opts = ctx.state, ctx.state.options
    body = _body_object(ctx.body)
    contacts = body.get("contacts")
    if not isinstance(contacts, list):
        raise _Reject(400, 1001, "'contacts' must be a list")
    if len(contacts) > opts.max_batch:
        raise _Reject(400, 1000, f"Too many contacts in one call (max {opts.max_batch})")
    key_id = _key_id(state, body)
    create = ctx.request.query.get("create_if_not_exists", "0").lower() in ("1", "true")
    ids: list[int] = []
    errors: dict[str, dict[str, str]] = {}
    now = state.clock()
    for item in contacts:
        if not isinstance(item, dict):
            errors[NO_KEY_VALUE] = {"1001": "Contact must be a JSON object"}
            continue
        value = item.get(key_id)
        if not _indexable(value):
            errors[NO_KEY_VALUE] = {"2005": f"No value provided for key field: {key_id}"}
            continue
        bad = [k for k in item if not str(k).isdigit()]
        if bad:
            errors[_key_str(value)] = {"1001": f"Invalid field id(s): {', '.join(map(str, bad))}"}
            continue
        found = state.find_contacts(key_id, value)
        if len(found) > 1:
            errors[_key_str(value)] = {
                "2010": f"More than one contact found with the external id: {key_id}"
            }
            continue
        if found:
            contact = found[0]
            state.counters["contacts_updated"] += 1
        elif create:
            contact = Contact(state._next_contact_id, {}, now, now)
            state._next_contact_id += 1
            state.contacts[contact.id] = contact
            state.counters["contacts_created"] += 1
        else:
            errors[_key_str(value)] = {"2008": _not_found_msg(key_id, value)}
            continue
        for fid, fval in item.items():
            state._set_field(contact, str(int(fid)), fval)
        contact.updated_at = now
        ids.append(contact.id)
    return _Reply({"ids": ids, "errors": errors})


async def _delete_contacts(ctx: _Ctx) -> _Reply:
    state, opts = ctx.state, ctx.state.options
    body = _body_object(ctx.body)
    key_id = _key_id(state, body)
    values = body.get(key_id)
    if not isinstance(values, list):
        raise _Reject(400, 1001, f"'{key_id}' must be a list of key values")
    if len(values) > opts.max_batch:
        raise _Reject(400, 1000, f"Too many contacts in one call (max {opts.max_batch})")
    deleted = 0
    errors: dict[str, dict[str, str]] = {}
    for value in values:
        contact, code, msg = _resolve(state, key_id, value)
        if contact is None:
            errors[_error_key(value)] = {code: msg}
            continue
        state._delete_contact(contact)
        deleted += 1
    state.counters["contacts_deleted"] += deleted
    return _Reply({"deleted_contacts": deleted, "errors": errors})


def _event_id(ctx: _Ctx) -> int:
    raw = ctx.request.match_info["event_id"]
    if not raw.isdigit():
        raise _Reject(400, 5005, f"Invalid external event id: {raw}")
    event_id = int(raw)
    if ctx.state.options.strict_events and event_id not in ctx.state.events:
        raise _Reject(400, 5005, "No program or campaign is triggered by this external event")
    return event_id


def _trigger_one(
    ctx: _Ctx, event_id: int, key_id: str, item: dict[str, Any]
) -> tuple[int | None, str, str]:
    """Trigger for one contact. Returns (contact id, error code, error message)."""
    state = ctx.state
    value = item.get("external_id")
    if not _indexable(value):
        return None, "2005", f"No value provided for key field: {key_id}"
    data = item.get("data")
    if data is not None and not isinstance(data, dict):
        return None, "1001", "'data' must be a JSON object"
    event_time = item.get("event_time")
    if event_time is not None and _parse_iso(event_time) is None:
        return None, "1001", f"Invalid event_time: {event_time!r}"
    trigger_id = item.get("trigger_id")
    if trigger_id is not None and not isinstance(trigger_id, str | int):
        return None, "1001", "'trigger_id' must be a string"
    contact, code, msg = _resolve(state, key_id, value)
    if contact is None:
        return None, code, msg
    state.counters["trigger_calls"] += 1
    tid = None if trigger_id is None else str(trigger_id)
    if tid is not None:
        existing = state._trigger_ids.get((event_id, tid))
        if existing is not None:
            existing.deliveries += 1
            state.counters["triggers_duplicate"] += 1
            return contact.id, "", ""
    triggered = TriggeredEvent(
        seq=len(state.triggers) + 1,
        event_id=event_id,
        key_id=key_id,
        external_id=_key_str(value),
        contact_id=contact.id,
        trigger_id=tid,
        data=data,
        event_time=event_time,
        received_at=state.clock(),
        auth_user=ctx.user,
    )
    state.triggers.append(triggered)
    if tid is not None:
        state._trigger_ids[(event_id, tid)] = triggered
    state.counters["triggers"] += 1
    return contact.id, "", ""


async def _trigger_event(ctx: _Ctx) -> _Reply:
    state, opts = ctx.state, ctx.state.options
    event_id = _event_id(ctx)
    body = _body_object(ctx.body)
    key_id = _key_id(state, body)
    if "contacts" in body:
        contacts = body["contacts"]
        if not isinstance(contacts, list):
            raise _Reject(400, 1001, "'contacts' must be a list")
        if len(contacts) > opts.max_batch:
            raise _Reject(400, 1000, f"Too many contacts in one call (max {opts.max_batch})")
        ids: list[int] = []
        errors: dict[str, dict[str, str]] = {}
        for item in contacts:
            if not isinstance(item, dict):
                errors[NO_KEY_VALUE] = {"1001": "Contact must be a JSON object"}
                continue
            cid, code, msg = _trigger_one(ctx, event_id, key_id, item)
            if cid is None:
                errors[_error_key(item.get("external_id"))] = {code: msg}
            else:
                ids.append(cid)
        return _Reply({"ids": ids, "errors": errors})
    if "external_id" not in body:
        raise _Reject(400, 1001, "Either 'external_id' or 'contacts' is required")
    cid, code, msg = _trigger_one(ctx, event_id, key_id, body)
    if cid is None:
        raise _Reject(400, int(code), msg)
    return _Reply({"ids": [cid], "errors": {}})


async def _list_events(ctx: _Ctx) -> _Reply:
    return _Reply([{"id": eid, "name": name} for eid, name in sorted(ctx.state.events.items())])


async def _create_event(ctx: _Ctx) -> _Reply:
    state = ctx.state
    body = _body_object(ctx.body)
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _Reject(400, 1001, "'name' is required")
    if name in state.events.values():
        raise _Reject(400, 5001, f"External event already exists: {name}")
    while state._next_event_id in state.events:
        state._next_event_id += 1
    event_id = state._next_event_id
    state._next_event_id += 1
    state.events[event_id] = name
    return _Reply({"id": event_id, "name": name})


def _external_ids(ctx: _Ctx, body: dict[str, Any], *, required: bool) -> list[Any]:
    values = body.get("external_ids")
    if values is None and not required:
        return []
    if not isinstance(values, list):
        raise _Reject(400, 1001, "'external_ids' must be a list")
    limit = ctx.state.options.max_list_ids
    if len(values) > limit:
        raise _Reject(400, 3002, f"Too many external ids in one call (max {limit})")
    return values


def _get_list(ctx: _Ctx) -> ContactList:
    raw = ctx.request.match_info["list_id"]
    lst = ctx.state.lists.get(int(raw)) if raw.isdigit() else None
    if lst is None:
        raise _Reject(400, 3004, f"Contact list not found: {raw}")
    return lst


def _add_members(
    state: SimulatorState, lst: ContactList, key_id: str, values: Iterable[Any]
) -> tuple[int, dict[str, dict[str, str]]]:
    inserted = 0
    errors: dict[str, dict[str, str]] = {}
    for value in values:
        contact, code, msg = _resolve(state, key_id, value)
        if contact is None:
            errors[_error_key(value)] = {code: msg}
        elif contact.id not in lst.members:
            lst.members.add(contact.id)
            inserted += 1
    return inserted, errors


async def _create_list(ctx: _Ctx) -> _Reply:
    state = ctx.state
    body = _body_object(ctx.body)
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _Reject(400, 1001, "'name' is required")
    if any(lst.name == name for lst in state.lists.values()):
        raise _Reject(400, 3003, f"A contact list with this name already exists: {name}")
    values = _external_ids(ctx, body, required=False)
    key_id = _key_id(state, body) if values or "key_id" in body else None
    description = body.get("description")
    lst = ContactList(
        id=state._next_list_id,
        name=name,
        description=description if isinstance(description, str) else None,
        key_id=key_id,
        created_at=state.clock(),
    )
    state._next_list_id += 1
    state.lists[lst.id] = lst
    _, errors = _add_members(state, lst, key_id or "3", values)
    return _Reply({"id": lst.id, "errors": errors})


async def _get_lists(ctx: _Ctx) -> _Reply:
    return _Reply(
        [
            {
                "id": lst.id,
                "name": lst.name,
                "created": datetime.fromtimestamp(lst.created_at, UTC).strftime(
                    "%Y-%m-%d %H:%M:%S"
                ),
            }
            for lst in ctx.state.lists.values()
        ]
    )


async def _list_add(ctx: _Ctx) -> _Reply:
    body = _body_object(ctx.body)
    lst = _get_list(ctx)
    values = _external_ids(ctx, body, required=True)
    key_id = _key_id(ctx.state, body)
    inserted, errors = _add_members(ctx.state, lst, key_id, values)
    return _Reply({"inserted_contacts": inserted, "errors": errors})


async def _list_delete(ctx: _Ctx) -> _Reply:
    body = _body_object(ctx.body)
    lst = _get_list(ctx)
    values = _external_ids(ctx, body, required=True)
    key_id = _key_id(ctx.state, body)
    deleted = 0
    errors: dict[str, dict[str, str]] = {}
    for value in values:
        contact, code, msg = _resolve(ctx.state, key_id, value)
        if contact is None:
            errors[_error_key(value)] = {code: msg}
        elif contact.id in lst.members:
            lst.members.discard(contact.id)
            deleted += 1
    return _Reply({"deleted_contacts": deleted, "errors": errors})


async def _get_fields(ctx: _Ctx) -> _Reply:
    out = [
        {"id": fid, "name": name, "application_type": app_type, "string_id": string_id}
        for fid, (name, app_type, string_id) in STANDARD_FIELDS.items()
    ]
    for fid, name in sorted(ctx.state.options.fields.items()):
        slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or f"field_{fid}"
        out.append({"id": fid, "name": name, "application_type": "shorttext", "string_id": slug})
    return _Reply(out)


async def _get_settings(ctx: _Ctx) -> _Reply:
    return _Reply(
        {
            "id": ctx.state.options.account_id,
            "environment": "simulator",
            "timezone": "UTC",
            "name": "Emarsys Simulator",
            "language": "en",
            "api_user": ctx.user,
        }
    )


async def _unknown_endpoint(ctx: _Ctx) -> _Reply:
    raise _Reject(404, 1, f"Unknown endpoint: {ctx.request.method} {ctx.request.path}")


# ------------------------------------------------------------------ the wrapper


async def _read_body(request: web.Request, limit: int) -> tuple[bytes, int, bool]:
    """Read at most limit bytes. Returns (body, bytes seen, too_large)."""
    if request.content_length is not None and request.content_length > 4 * limit:
        return b"", request.content_length, True
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            # Drain (bounded) so the client can finish sending and read our answer.
            while size <= 4 * limit:
                chunk = await request.content.readany()
                if not chunk:
                    break
                size += len(chunk)
            return b"", size, True
        chunks.append(chunk)
    return b"".join(chunks), size, False


def _api_handler(
    state: SimulatorState, version: str, fn: _Handler, max_bytes: int | None
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        opts = state.options
        started = time.monotonic()
        call = RecordedCall(
            seq=state._next_seq(),
            method=request.method,
            path=request.path,
            query=dict(request.query),
            status=0,
            reply_code=None,
            reply_text=None,
            auth_user=None,
            auth_scheme="wsse" if version == "v2" else "bearer",
            body=None,
            body_bytes=0,
            received_at=state.clock(),
            duration=0.0,
        )
        state.counters["api_calls"] += 1
        headers: dict[str, str] = {}

        def finish(resp: web.StreamResponse, code: int | None, text: str | None) -> None:
            call.status = resp.status
            call.reply_code = code
            call.reply_text = text
            call.duration = time.monotonic() - started
            state.counters[f"status_{resp.status}"] += 1
            state._record(call)
            log.debug(
                "%s %s -> %s replyCode=%s user=%s",
                call.method,
                call.path,
                call.status,
                code,
                call.auth_user,
            )

        def reply(status: int, code: int, text: str, data: Any = "") -> web.Response:
            resp = _envelope(status, code, text, data, headers)
            finish(resp, code, text)
            return resp

        limit = min(max_bytes or opts.max_body_bytes, opts.max_body_bytes)
        raw, size, too_large = await _read_body(request, limit)
        call.body_bytes = size

        # Authentication.
        if version == "v2":
            user, error, note = state._check_wsse(request.headers.get("X-WSSE"))
        else:
            user, error, note = state._check_bearer(request.headers.get("Authorization"))
        if user is None:
            state.counters["auth_failures"] += 1
            call.note = note
            if version == "v3":
                headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
            return reply(401, 1, error or "Unauthorized")
        call.auth_user = user
        rate_key = f"{version}:{user}"

        # Injected faults.
        if opts.latency > 0:
            await state._sleep(opts.latency)
        if state._chance(opts.stall_rate):
            call.fault = "stall"
            state.counters["faults_stall"] += 1
            await state._sleep(opts.stall_seconds)
        if state._chance(opts.timeout_rate):
            call.fault = "timeout"
            call.injected = True
            state.counters["faults_timeout"] += 1
            await state._sleep(opts.timeout_seconds)
            if opts.timeout_mode == "close" and request.transport is not None:
                request.transport.close()
                call.status = 0
                call.duration = time.monotonic() - started
                call.note = "connection closed"
                state._record(call)
                raise asyncio.CancelledError()
            _, headers = state._rate_headers(rate_key, consume=False)
            return reply(504, 1, "Gateway Timeout")
        if opts.burst_429 > 0:
            opts.burst_429 -= 1
            call.fault = "burst_429"
            call.injected = True
            state.counters["faults_429"] += 1
            _, headers = state._rate_headers(rate_key, consume=False)
            headers["X-RateLimit-Remaining"] = "0"
            return reply(429, 1, "Too Many Requests")
        if state._chance(opts.error_rate):
            status = state.rng.choice(list(opts.error_statuses))
            call.fault = "error"
            call.injected = True
            state.counters["faults_error"] += 1
            _, headers = state._rate_headers(rate_key, consume=False)
            return reply(status, 1, "Internal Server Error" if status == 500 else "Server Error")

        # Rate limit.
        allowed, headers = state._rate_headers(rate_key, consume=True)
        if not allowed:
            call.rate_limited = True
            state.counters["rate_limited"] += 1
            return reply(429, 1, "Too Many Requests")

        # Body.
        if too_large:
            call.note = f"body too large ({size} bytes, limit {limit})"
            return reply(400, 1003, f"Request body too large (limit {limit} bytes)")
        body: Any = None
        if raw.strip():
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                call.note = "body is not JSON"
                return reply(400, 1001, "Request body is not valid JSON")
        if opts.record_bodies:
            call.body = body

        try:
            result = await fn(_Ctx(request, state, body, user))
        except _Reject as rej:
            return reply(rej.status, rej.code, rej.text, rej.data)
        return reply(result.status, result.code, result.text, result.data)

    return handler


async def _token_endpoint(request: web.Request) -> web.Response:
    state = request.app[SIMULATOR_STATE]
    started = time.monotonic()
    form = await request.post()
    call = RecordedCall(
        seq=state._next_seq(),
        method=request.method,
        path=request.path,
        query=dict(request.query),
        status=0,
        reply_code=None,
        reply_text=None,
        auth_user=None,
        auth_scheme="basic",
        body={"grant_type": str(form.get("grant_type"))} if "grant_type" in form else None,
        body_bytes=request.content_length or 0,
        received_at=state.clock(),
        duration=0.0,
    )
    state.counters["token_calls"] += 1

    def answer(payload: dict[str, Any], status: int, note: str | None = None) -> web.Response:
        call.status = status
        call.note = note
        call.duration = time.monotonic() - started
        state._record(call)
        resp = _json_response(payload, status)
        resp.headers["Cache-Control"] = "no-store"
        if status == 401:
            resp.headers["WWW-Authenticate"] = 'Basic realm="emarsys-simulator"'
        return resp

    client_id, client_secret = _parse_basic(request.headers.get("Authorization"))
    expected = state.options.oauth_clients.get(client_id or "")
    if (
        client_id is None
        or client_secret is None
        or expected is None
        or not hmac.compare_digest(expected.encode(), client_secret.encode())
    ):
        state.counters["auth_failures"] += 1
        return answer(
            {"error": "invalid_client", "error_description": "Client authentication failed"},
            401,
            "bad client credentials",
        )
    call.auth_user = client_id
    if form.get("grant_type") != "client_credentials":
        return answer(
            {
                "error": "unsupported_grant_type",
                "error_description": "grant_type must be client_credentials",
            },
            400,
        )
    token, lifetime = state.issue_token(client_id)
    expires_in: int | float = int(lifetime) if float(lifetime).is_integer() else lifetime
    return answer({"access_token": token, "token_type": "bearer", "expires_in": expires_in}, 200)


def _parse_basic(header: str | None) -> tuple[str | None, str | None]:
    if not header:
        return None, None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        return None, None
    return client_id, secret


# ------------------------------------------------------------------ /_sim routes


async def _sim_calls(request: web.Request) -> web.Response:
    state = request.app[SIMULATOR_STATE]
    calls: Iterable[RecordedCall] = state.calls
    path = request.query.get("path")
    method = request.query.get("method")
    since = request.query.get("since")
    if path:
        calls = [c for c in calls if path in c.path]
    if method:
        calls = [c for c in calls if c.method == method.upper()]
    if since and since.isdigit():
        calls = [c for c in calls if c.seq > int(since)]
    return _json_response([c.to_dict() for c in calls])


async def _sim_contacts(request: web.Request) -> web.Response:
    state = request.app[SIMULATOR_STATE]
    return _json_response([c.to_dict() for c in state.contacts.values()])


async def _sim_contact(request: web.Request) -> web.Response:
    state = request.app[SIMULATOR_STATE]
    key_id = request.query.get("key_id", "3")
    value = request.match_info["key_value"]
    found = state.find_contacts(key_id, value)
    if not found:
        return _json_response({"error": f"no contact with field {key_id} = {value!r}"}, 404)
    contact = found[0]
    out = contact.to_dict()
    out["lists"] = sorted(lid for lid, lst in state.lists.items() if contact.id in lst.members)
    return _json_response(out)


async def _sim_triggers(request: web.Request) -> web.Response:
    state = request.app[SIMULATOR_STATE]
    raw = request.query.get("event_id")
    event_id = int(raw) if raw and raw.isdigit() else None
    return _json_response([t.to_dict() for t in state.triggers_for(event_id)])


async def _sim_lists(request: web.Request) -> web.Response:
    state = request.app[SIMULATOR_STATE]
    return _json_response([lst.to_dict(state) for lst in state.lists.values()])


async def _sim_events(request: web.Request) -> web.Response:
    state = request.app[SIMULATOR_STATE]
    return _json_response([{"id": k, "name": v} for k, v in sorted(state.events.items())])


async def _sim_stats(request: web.Request) -> web.Response:
    state = request.app[SIMULATOR_STATE]
    return _json_response(
        {
            "counters": dict(state.counters),
            "calls": len(state.calls),
            "contacts": len(state.contacts),
            "triggers": len(state.triggers),
            "lists": len(state.lists),
            "active_tokens": len(state._tokens),
        }
    )


async def _sim_get_faults(request: web.Request) -> web.Response:
    return _json_response(request.app[SIMULATOR_STATE].faults())


async def _sim_set_faults(request: web.Request) -> web.Response:
    state = request.app[SIMULATOR_STATE]
    try:
        changes = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError:
        return _json_response({"error": "body is not valid JSON"}, 400)
    if not isinstance(changes, dict):
        return _json_response({"error": "body must be a JSON object"}, 400)
    try:
        return _json_response(state.set_faults(**changes))
    except ValueError as exc:
        return _json_response({"error": str(exc)}, 400)


async def _sim_revoke(request: web.Request) -> web.Response:
    return _json_response({"revoked": request.app[SIMULATOR_STATE].revoke_tokens()})


async def _sim_reset(request: web.Request) -> web.Response:
    request.app[SIMULATOR_STATE].reset()
    return _json_response({"reset": True})


# -------------------------------------------------------------------------- app

SIMULATOR_STATE: web.AppKey[SimulatorState] = web.AppKey("simulator_state", SimulatorState)


def create_simulator_app(options: SimulatorOptions | None = None) -> web.Application:
    """The simulator as an aiohttp Application; its state is ``app[SIMULATOR_STATE]``."""
    state = SimulatorState(options)
    opts = state.options
    app = web.Application(client_max_size=opts.max_body_bytes + 1)
    app[SIMULATOR_STATE] = state

    routes: list[tuple[str, str, _Handler, int | None]] = [
        ("PUT", "contact", _upsert_contacts, opts.contact_max_bytes),
        ("POST", "contact/delete", _delete_contacts, None),
        ("POST", "event/{event_id}/trigger", _trigger_event, opts.trigger_max_bytes),
        ("GET", "event", _list_events, None),
        ("POST", "event", _create_event, None),
        ("POST", "contactlist", _create_list, None),
        ("GET", "contactlist", _get_lists, None),
        ("POST", "contactlist/{list_id}/add", _list_add, None),
        ("POST", "contactlist/{list_id}/delete", _list_delete, None),
        ("GET", "field", _get_fields, None),
        ("GET", "settings", _get_settings, None),
    ]
    for version in ("v2", "v3"):
        for method, sub, fn, max_bytes in routes:
            handler = _api_handler(state, version, fn, max_bytes)
            app.router.add_route(method, f"/api/{version}/{sub}", handler)
            app.router.add_route(method, f"/api/{version}/{sub}/", handler)
        fallback = _api_handler(state, version, _unknown_endpoint, None)
        app.router.add_route("*", f"/api/{version}/{{tail:.*}}", fallback)

    app.router.add_post("/oauth2/token", _token_endpoint)
    app.router.add_get("/_sim/calls", _sim_calls)
    app.router.add_get("/_sim/contacts", _sim_contacts)
    app.router.add_get("/_sim/contacts/{key_value}", _sim_contact)
    app.router.add_get("/_sim/triggers", _sim_triggers)
    app.router.add_get("/_sim/lists", _sim_lists)
    app.router.add_get("/_sim/events", _sim_events)
    app.router.add_get("/_sim/stats", _sim_stats)
    app.router.add_get("/_sim/faults", _sim_get_faults)
    app.router.add_post("/_sim/faults", _sim_set_faults)
    app.router.add_post("/_sim/revoke-tokens", _sim_revoke)
    app.router.add_post("/_sim/reset", _sim_reset)

    async def _on_shutdown(_app: web.Application) -> None:
        state._stopping.set()

    app.on_shutdown.append(_on_shutdown)
    return app


@dataclass
class RunningSimulator:
    """A simulator serving on a TCP port (from :func:`start_simulator`)."""

    host: str
    port: int
    app: web.Application
    runner: web.AppRunner

    @property
    def state(self) -> SimulatorState:
        return self.app[SIMULATOR_STATE]

    @property
    def base_url(self) -> str:
        """``http://host:port/``"""
        return f"http://{self.host}:{self.port}/"

    @property
    def url(self) -> str:
        """WSSE API base, ``http://host:port/api/v2/``."""
        return f"{self.base_url}api/v2/"

    @property
    def url_v3(self) -> str:
        """OAuth API base, ``http://host:port/api/v3/``."""
        return f"{self.base_url}api/v3/"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}oauth2/token"

    async def stop(self) -> None:
        self.state._stopping.set()
        await self.runner.cleanup()

    async def __aenter__(self) -> RunningSimulator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def start_simulator(
    host: str = "127.0.0.1", port: int = 0, options: SimulatorOptions | None = None
) -> RunningSimulator:
    """Start the simulator on host:port (0 = a free port) in the running event loop."""
    app = create_simulator_app(options)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    actual_port = port
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        actual_port = server.sockets[0].getsockname()[1]
    log.info("Emarsys simulator listening on http://%s:%s/", host, actual_port)
    return RunningSimulator(host=host, port=actual_port, app=app, runner=runner)


def run_simulator_forever(
    host: str = "127.0.0.1",
    port: int = 8089,
    options: SimulatorOptions | None = None,
    *,
    print_fn: Callable[[str], None] | None = None,
) -> None:
    """Run the simulator until interrupted (Ctrl-C / SIGTERM); prints where it listens."""
    if print_fn is None:

        def print_fn(message: str) -> None:
            print(message, flush=True)

    async def main() -> None:
        sim = await start_simulator(host, port, options)
        opts = sim.state.options
        print_fn(f"Emarsys simulator listening on {sim.base_url}")
        print_fn(f"  WSSE API:    {sim.url}  (users: {', '.join(sorted(opts.users))})")
        print_fn(f"  OAuth API:   {sim.url_v3}  (clients: {', '.join(sorted(opts.oauth_clients))})")
        print_fn(f"  token URL:   {sim.token_url}")
        print_fn(f"  inspect:     {sim.base_url}_sim/calls")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
                pass
        try:
            await stop.wait()
        finally:
            await sim.stop()
            print_fn("Emarsys simulator stopped")

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
