"""Async client for the Emarsys Core API (aiohttp, orjson), with rate limiting and retries.

Classification of an attempt (see :meth:`EmarsysClient.call`):

=====================================  ==========================================================
outcome                                handling
=====================================  ==========================================================
2xx, ``replyCode == 0`` (or absent)    success (``ok``); per-contact errors in ``contact_errors``
2xx, ``replyCode != 0``                **permanent** error, not retried (see below)
2xx with an unparseable body           transient (``bad_response``): retried with backoff
401                                    ``authenticator.on_unauthorized()``, retried once at once;
                                       a second 401 is permanent
429                                    transient: every caller waits until ``X-RateLimit-Reset``
                                       (``RateLimiter.pause_until``); without a usable reset
                                       time, exponential backoff
5xx                                    transient: exponential backoff
timeout / connection error             transient: exponential backoff
other 4xx                              permanent
token request failed (OAuth)           transient (5xx, 429, network) or permanent (rejected)
=====================================  ==========================================================

Why a 200 with a non-zero ``replyCode`` is permanent: Emarsys uses non-zero reply codes for
request-level validation and business errors (1000 batch too large, 2004 invalid key field,
3002 too many ids, 5005 nothing triggered by the event, ...). Sending the same request again
gives the same answer, so retrying only burns rate limit and blocks the stream (the Segment
connector's retry of these caused exactly that). Overload and outages show up as 429/5xx,
which are retried.

Backoff is "full jitter": the n-th consecutive transient failure sleeps
``uniform(0, min(max_backoff, backoff_base * 2**(n-1)))``. ``max_attempts=None`` retries
transient failures forever (the stream waits for Emarsys instead of dropping data).

Logs go to the ``emarsys_stream.emarsys`` logger with structured ``extra`` fields (endpoint,
method, path, status, attempt, ...); they never contain request headers, bodies or secrets.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp
import orjson

from app.emarsys.auth import Authenticator, AuthError
from app.emarsys.ratelimit import RateLimiter

__all__ = [
    "MAX_CONTACTS_PER_CALL",
    "MAX_LIST_IDS_PER_CALL",
    "CallResult",
    "EmarsysClient",
    "OnAttempt",
    "OnRetry",
]

logger = logging.getLogger("emarsys_stream.emarsys")

MAX_CONTACTS_PER_CALL = 1000
MAX_LIST_IDS_PER_CALL = 10_000

#: ``on_attempt(endpoint, status_or_reason, latency_seconds)``; ``status_or_reason`` is the HTTP
#: status as a string ("200", "429", ...) or "timeout" / "connection" / "auth".
OnAttempt = Callable[[str, str, float], None]
#: ``on_retry(endpoint, reason)``, called when a retry is decided (before its back-off), so
#: metrics move during a long outage instead of only when the call finally finishes.
#: ``reason`` is "5xx", "429", "timeout", "connection", "invalid_response" or "401".
OnRetry = Callable[[str, str], None]


@dataclass
class CallResult:
    """Outcome of one logical call (all its attempts)."""

    endpoint: str
    method: str
    path: str
    status: int | None = None  # HTTP status of the last attempt; None if no response
    reply_code: int | None = None
    reply_text: str | None = None
    data: Any = None
    ok: bool = False
    #: True: retrying the same request cannot help (4xx, non-zero replyCode, ...).
    #: False with ok=False: transient failures until max_attempts ran out.
    permanent_error: bool = False
    #: ``data.errors`` of the answer: key value -> {error code: message}
    contact_errors: dict[str, dict[str, str]] = field(default_factory=dict)
    attempts: int = 0
    latency_seconds: float = 0.0  # total, including backoff and rate-limit waits
    retries_by_reason: Counter[str] = field(default_factory=Counter)
    error: str | None = None  # short description of the failure (no secrets)


class EmarsysClient:
    """One aiohttp session for its lifetime: ``async with EmarsysClient(...) as client:`` or
    ``await client.start()`` ... ``await client.close()``.

    ``session``: use this session instead (it is then not closed by :meth:`close`).
    ``limiter``: share one :class:`RateLimiter` between clients of the same API user.
    """

    def __init__(
        self,
        base_url: str,
        authenticator: Authenticator,
        *,
        requests_per_minute: int = 1000,
        request_timeout: float = 30.0,
        max_backoff: float = 60.0,
        max_attempts: int | None = None,
        session: aiohttp.ClientSession | None = None,
        on_attempt: OnAttempt | None = None,
        on_retry: OnRetry | None = None,
        limiter: RateLimiter | None = None,
        backoff_base: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        if max_attempts is not None and max_attempts < 1:
            raise ValueError("max_attempts must be None or >= 1")
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.authenticator = authenticator
        # We count a call when it starts, Emarsys when it arrives: a one-second margin on
        # the window keeps two calls 59.99 s apart from landing in Emarsys' same minute.
        self.limiter = (
            limiter if limiter is not None else RateLimiter(requests_per_minute, window=61.0)
        )
        self.request_timeout = float(request_timeout)
        self.timeout = aiohttp.ClientTimeout(total=self.request_timeout)
        self.max_backoff = float(max_backoff)
        self.max_attempts = max_attempts
        self.backoff_base = float(backoff_base)
        self.on_attempt = on_attempt
        self.on_retry = on_retry
        self._rng = rng or random.Random()
        self._session = session
        self._owns_session = session is None
        self._closed = False

    def __repr__(self) -> str:
        return f"EmarsysClient(base_url={self.base_url!r}, authenticator={self.authenticator!r})"

    # ---------------------------------------------------------------- lifecycle

    @property
    def session(self) -> aiohttp.ClientSession | None:
        return self._session

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("EmarsysClient is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)

    async def close(self) -> None:
        self._closed = True
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None
        closer = getattr(self.authenticator, "close", None)
        if closer is not None:  # OAuth2Authenticator owns a session for the token endpoint
            await closer()

    async def __aenter__(self) -> EmarsysClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def url(self, path: str) -> str:
        return self.base_url + path.lstrip("/")

    # ---------------------------------------------------------------- core

    async def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        endpoint: str,
    ) -> CallResult:
        """Send one request, retrying as described in the module docstring."""
        if self._session is None:
            await self.start()
        session = self._session
        assert session is not None
        method = method.upper()
        url = self.url(path)
        payload = orjson.dumps(body) if body is not None else None
        result = CallResult(endpoint=endpoint, method=method, path=path)
        started = time.monotonic()
        failures = 0  # consecutive transient failures (for the backoff exponent)
        unauthorized_retried = False
        log_ctx = {"endpoint": endpoint, "method": method, "path": path}

        while True:
            await self.limiter.acquire()
            result.attempts += 1
            attempt = result.attempts
            last_attempt = self.max_attempts is not None and attempt >= self.max_attempts
            t0 = time.monotonic()
            reason: str  # retry reason, set on every transient branch below
            reset_at: float | None = None

            try:
                headers = await self.authenticator.headers()
            except AuthError as exc:
                self._report(endpoint, "auth", time.monotonic() - t0)
                result.status = exc.status
                result.error = f"auth: {exc}"
                if not exc.transient:
                    return self._finish(result, started, permanent=True, log_ctx=log_ctx)
                reason = "auth"
            else:
                headers = {
                    "Content-Type": "application/json",
                    "Accept": "application/json",
                    **headers,
                }
                status: int | None = None
                raw = b""
                resp_headers: Mapping[str, str] = {}
                try:
                    async with session.request(
                        method, url, data=payload, headers=headers, timeout=self.timeout
                    ) as resp:
                        status = resp.status
                        resp_headers = resp.headers
                        raw = await resp.read()
                except TimeoutError:
                    reason = "timeout"
                    result.error = f"timeout after {self.request_timeout:g}s"
                except aiohttp.ClientError as exc:
                    reason = "connection"
                    result.error = f"connection error: {type(exc).__name__}: {_short(exc)}"
                latency = time.monotonic() - t0

                if status is None:
                    self._report(endpoint, reason, latency)
                    result.status = None
                    result.reply_code = result.reply_text = result.data = None
                else:
                    self._report(endpoint, str(status), latency)
                    result.status = status
                    parsed = _loads(raw)
                    envelope = parsed if isinstance(parsed, dict) else {}
                    result.reply_code = _int_or_none(envelope.get("replyCode"))
                    reply_text = envelope.get("replyText")
                    result.reply_text = None if reply_text is None else str(reply_text)
                    result.data = envelope.get("data") if envelope else parsed

                    if 200 <= status < 300:
                        if raw and parsed is None:
                            reason = "bad_response"
                            result.error = f"HTTP {status} with a body that is not JSON"
                        else:
                            result.contact_errors = _contact_errors(result.data)
                            if result.reply_code not in (None, 0):
                                result.error = (
                                    f"replyCode {result.reply_code}: {_short(result.reply_text)}"
                                )
                                return self._finish(
                                    result, started, permanent=True, log_ctx=log_ctx
                                )
                            result.ok = True
                            result.error = None
                            return self._finish(result, started, permanent=False, log_ctx=log_ctx)
                    elif status == 401:
                        result.error = f"HTTP 401: {_short(result.reply_text)}"
                        if unauthorized_retried or last_attempt:
                            return self._finish(result, started, permanent=True, log_ctx=log_ctx)
                        unauthorized_retried = True
                        result.retries_by_reason["401"] += 1
                        self._report_retry(endpoint, "401")
                        logger.warning(
                            "emarsys call unauthorized; refreshing credentials and retrying once",
                            extra={**log_ctx, "status": 401, "attempt": attempt},
                        )
                        await self.authenticator.on_unauthorized()
                        continue
                    elif status == 429:
                        reason = "429"
                        result.error = "HTTP 429: rate limit exceeded"
                        reset_at = _float_or_none(resp_headers.get("X-RateLimit-Reset"))
                    elif status >= 500:
                        reason = "5xx"
                        result.error = f"HTTP {status}: {_short(result.reply_text)}"
                    else:
                        result.error = f"HTTP {status}: {_short(result.reply_text)}"
                        return self._finish(result, started, permanent=True, log_ctx=log_ctx)

            # ---- transient failure
            if last_attempt:
                return self._finish(result, started, permanent=False, log_ctx=log_ctx)
            result.retries_by_reason[reason] += 1
            self._report_retry(endpoint, reason)
            failures += 1
            wait_reset = None if reset_at is None else reset_at - time.time()
            if wait_reset is not None and wait_reset > 0:
                # Every caller of this limiter waits, not only this one. Capped so that a
                # bogus header cannot stall the stream for hours.
                cap = max(self.max_backoff, self.limiter.window)
                self.limiter.pause_until(time.time() + min(wait_reset, cap))
                delay = 0.0
            else:
                delay = self._backoff(failures)
            logger.warning(
                "emarsys call failed; retrying",
                extra={
                    **log_ctx,
                    "status": result.status,
                    "reason": reason,
                    "attempt": attempt,
                    "delay": round(delay, 3),
                    "rate_limit_reset": reset_at,
                },
            )
            if delay > 0:
                await asyncio.sleep(delay)

    def _backoff(self, failures: int) -> float:
        ceiling = min(self.max_backoff, self.backoff_base * (2 ** min(failures - 1, 62)))
        return self._rng.uniform(0.0, ceiling)

    def _report_retry(self, endpoint: str, reason: str) -> None:
        if self.on_retry is None:
            return
        try:
            self.on_retry(endpoint, reason)
        except Exception:  # a metrics hook must never break a call
            logger.exception("emarsys on_retry hook failed", extra={"endpoint": endpoint})

    def _report(self, endpoint: str, status_or_reason: str, latency: float) -> None:
        if self.on_attempt is None:
            return
        try:
            self.on_attempt(endpoint, status_or_reason, latency)
        except Exception:  # a metrics hook must never break a call
            logger.exception("emarsys on_attempt hook failed", extra={"endpoint": endpoint})

    def _finish(
        self,
        result: CallResult,
        started: float,
        *,
        permanent: bool,
        log_ctx: Mapping[str, Any],
    ) -> CallResult:
        result.permanent_error = permanent and not result.ok
        result.latency_seconds = time.monotonic() - started
        extra = {
            **log_ctx,
            "status": result.status,
            "reply_code": result.reply_code,
            "attempts": result.attempts,
            "latency": round(result.latency_seconds, 4),
            "contact_errors": len(result.contact_errors),
        }
        if result.ok:
            logger.debug("emarsys call ok", extra=extra)
        else:
            logger.warning(
                "emarsys call failed (%s): %s",
                "permanent" if result.permanent_error else "gave up retrying",
                result.error,
                extra={**extra, "permanent": result.permanent_error},
            )
        return result

    # ---------------------------------------------------------------- helpers

    async def upsert_contacts(
        self, key_id: str | int, contacts: list[dict[str, Any]]
    ) -> CallResult:
        """``PUT contact/?create_if_not_exists=1`` (at most 1000 contacts)."""
        _check_len(contacts, MAX_CONTACTS_PER_CALL, "contacts")
        return await self.call(
            "PUT",
            "contact/?create_if_not_exists=1",
            {"key_id": str(key_id), "contacts": contacts},
            endpoint="contact.upsert",
        )

    async def trigger_event(
        self, event_id: int, key_id: str | int, contacts: list[dict[str, Any]]
    ) -> CallResult:
        """Batch form of ``POST event/{event_id}/trigger``; each contact is
        ``{"external_id", "data"?, "trigger_id"?, "event_time"?}`` (at most 1000)."""
        _check_len(contacts, MAX_CONTACTS_PER_CALL, "contacts")
        return await self.call(
            "POST",
            f"event/{int(event_id)}/trigger",
            {"key_id": str(key_id), "contacts": contacts},
            endpoint="event.trigger",
        )

    async def add_to_list(
        self, list_id: int, key_id: str | int, external_ids: Iterable[str]
    ) -> CallResult:
        ids = list(external_ids)
        _check_len(ids, MAX_LIST_IDS_PER_CALL, "external_ids")
        return await self.call(
            "POST",
            f"contactlist/{int(list_id)}/add",
            {"key_id": str(key_id), "external_ids": ids},
            endpoint="contactlist.add",
        )

    async def remove_from_list(
        self, list_id: int, key_id: str | int, external_ids: Iterable[str]
    ) -> CallResult:
        ids = list(external_ids)
        _check_len(ids, MAX_LIST_IDS_PER_CALL, "external_ids")
        return await self.call(
            "POST",
            f"contactlist/{int(list_id)}/delete",
            {"key_id": str(key_id), "external_ids": ids},
            endpoint="contactlist.delete",
        )

    async def create_list(
        self,
        name: str,
        key_id: str | int,
        external_ids: Iterable[str] = (),
        *,
        description: str | None = None,
    ) -> CallResult:
        """``POST contactlist``; the new list id is in ``result.data`` (``{"id": ...}``)."""
        ids = list(external_ids)
        _check_len(ids, MAX_LIST_IDS_PER_CALL, "external_ids")
        body: dict[str, Any] = {"key_id": str(key_id), "name": name, "external_ids": ids}
        if description is not None:
            body["description"] = description
        return await self.call("POST", "contactlist", body, endpoint="contactlist.create")

    async def list_lists(self) -> CallResult:
        return await self.call("GET", "contactlist", endpoint="contactlist.list")

    async def get_settings(self) -> CallResult:
        """Credentials check: ``data.id > 0`` when authenticated."""
        return await self.call("GET", "settings", endpoint="settings")

    async def list_fields(self) -> CallResult:
        return await self.call("GET", "field", endpoint="field.list")

    async def list_events(self) -> CallResult:
        return await self.call("GET", "event", endpoint="event.list")

    async def create_event(self, name: str) -> CallResult:
        return await self.call("POST", "event", {"name": name}, endpoint="event.create")


# -------------------------------------------------------------------- helpers


def _check_len(items: list[Any], limit: int, what: str) -> None:
    if len(items) > limit:
        raise ValueError(f"at most {limit} {what} per call, got {len(items)}")


def _loads(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _int_or_none(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float_or_none(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value.strip())
    except ValueError:
        return None


def _short(value: object, limit: int = 200) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _contact_errors(data: Any) -> dict[str, dict[str, str]]:
    """``data.errors`` as {key value: {code: message}}; tolerates PHP-style ``[]`` for empty."""
    if not isinstance(data, dict):
        return {}
    errors = data.get("errors")
    if not isinstance(errors, dict):
        return {}
    out: dict[str, dict[str, str]] = {}
    for key, value in errors.items():
        if isinstance(value, dict):
            out[str(key)] = {str(code): str(msg) for code, msg in value.items()}
        elif isinstance(value, list):
            out[str(key)] = {str(i): str(msg) for i, msg in enumerate(value)}
        elif value is not None:
            out[str(key)] = {"": str(value)}
    return out
