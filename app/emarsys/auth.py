"""Authentication for the Emarsys Core API: WSSE (v2) and OAuth 2.0 client credentials (v3).

Secrets are taken as plain ``str`` (or anything with ``get_secret_value()``, e.g. a pydantic
``SecretStr``) and are never put into log records, exception messages or reprs.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import logging
import secrets as _secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

import aiohttp
import orjson

__all__ = [
    "AuthError",
    "Authenticator",
    "OAuth2Authenticator",
    "WsseAuthenticator",
    "wsse_digest",
    "wsse_header",
]

logger = logging.getLogger("emarsys_stream.emarsys")

DEFAULT_TOKEN_URL = "https://auth.emarsys.net/oauth2/token"
DEFAULT_EXPIRES_IN = 3600.0


class _SecretLike(Protocol):
    def get_secret_value(self) -> str: ...


def _reveal(secret: str | _SecretLike) -> str:
    if isinstance(secret, str):
        return secret
    return secret.get_secret_value()


class AuthError(Exception):
    """Getting credentials failed. ``transient`` says whether retrying later may help.

    The message never contains a secret or a token.
    """

    def __init__(self, message: str, *, transient: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status


@runtime_checkable
class Authenticator(Protocol):
    """What :class:`app.emarsys.client.EmarsysClient` needs from an authentication scheme."""

    async def headers(self) -> dict[str, str]:
        """Headers to add to the next request (fresh per request)."""
        ...

    async def on_unauthorized(self) -> None:
        """The request made with the last headers got HTTP 401: drop cached credentials."""
        ...


# --------------------------------------------------------------------------------------------
# WSSE


def _format_created(now: datetime | None) -> str:
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=UTC)  # naive datetimes are taken as UTC
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def wsse_digest(nonce: str, created: str, secret: str) -> str:
    """``base64(hex(sha1(nonce + created + secret)))`` -- base64 of the *hex string*."""
    hex_digest = hashlib.sha1((nonce + created + secret).encode("utf-8")).hexdigest()
    return base64.b64encode(hex_digest.encode("ascii")).decode("ascii")


def wsse_header(
    username: str,
    secret: str,
    *,
    now: datetime | None = None,
    nonce: str | None = None,
) -> str:
    """The value of the ``X-WSSE`` header.

    ``nonce`` defaults to 16 fresh random bytes as 32 hex characters; ``Created`` is ISO-8601
    UTC (``YYYY-MM-DDTHH:MM:SSZ``) of ``now`` (default: the current time).
    """
    if nonce is None:
        nonce = _secrets.token_hex(16)
    created = _format_created(now)
    digest = wsse_digest(nonce, created, _reveal(secret))
    return (
        f'UsernameToken Username="{username}", PasswordDigest="{digest}", '
        f'Nonce="{nonce}", Created="{created}"'
    )


class WsseAuthenticator:
    """WSSE: a new nonce and ``Created`` for every request (no caching, nothing to refresh)."""

    def __init__(self, username: str, secret: str | _SecretLike) -> None:
        self.username = username
        self.__secret = _reveal(secret)

    async def headers(self) -> dict[str, str]:
        return {"X-WSSE": wsse_header(self.username, self.__secret)}

    async def on_unauthorized(self) -> None:
        # Nothing cached: the retry builds a new header (new nonce, current time). A second 401
        # usually means wrong credentials or a clock more than 5 minutes off.
        logger.warning(
            "emarsys WSSE request unauthorized (bad credentials or clock skew > 5 min?)",
            extra={"auth": "wsse", "username": self.username},
        )

    def __repr__(self) -> str:
        return f"WsseAuthenticator(username={self.username!r}, secret='**********')"

    __str__ = __repr__


# --------------------------------------------------------------------------------------------
# OAuth 2.0 client credentials


class OAuth2Authenticator:
    """OAuth 2.0 client credentials with a cached bearer token.

    * The token is requested with ``Authorization: Basic base64(client_id:client_secret)`` and
      the form body ``grant_type=client_credentials``.
    * It is refreshed ``refresh_margin`` seconds before ``expires_in`` runs out (never later than
      half its lifetime, for short-lived tokens); 3600 s is assumed when ``expires_in`` is missing.
    * Concurrent callers that need a token share ONE in-flight token request (a shared future),
      also when it fails: every waiter gets the same :class:`AuthError`.
    * :meth:`on_unauthorized` drops the token -- but only if it is still the token the calling
      task used (tracked in a context variable), so N requests that fail together with the same
      stale token cause one refresh, not N.

    ``session``: an aiohttp session to use (not closed here); ``None`` creates an own session
    on first use, closed by :meth:`close`.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession | None,
        token_url: str,
        client_id: str,
        client_secret: str | _SecretLike,
        refresh_margin: float = 60.0,
        *,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._own_session: aiohttp.ClientSession | None = None
        self.token_url = token_url
        self.client_id = client_id
        credentials = f"{client_id}:{_reveal(client_secret)}".encode()
        self.__basic = "Basic " + base64.b64encode(credentials).decode("ascii")
        self.refresh_margin = float(refresh_margin)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self.__token: str | None = None
        self._refresh_at = 0.0
        self._generation = 0
        self._inflight: asyncio.Future[tuple[str, int]] | None = None
        self._used: contextvars.ContextVar[int | None] = contextvars.ContextVar(
            f"emarsys_oauth_generation_{id(self)}", default=None
        )
        self.token_requests = 0  # how many token requests were sent (for tests/metrics)

    def __repr__(self) -> str:
        return (
            f"OAuth2Authenticator(token_url={self.token_url!r}, client_id={self.client_id!r}, "
            "client_secret='**********')"
        )

    __str__ = __repr__

    async def headers(self) -> dict[str, str]:
        token, generation = await self._get_token()
        self._used.set(generation)
        return {"Authorization": f"Bearer {token}"}

    async def on_unauthorized(self) -> None:
        used = self._used.get()
        if used is None or used == self._generation:
            if self.__token is not None:
                logger.info(
                    "emarsys OAuth token rejected; it will be refreshed",
                    extra={"auth": "oauth2", "client_id": self.client_id},
                )
            self.__token = None
            self._refresh_at = 0.0

    async def close(self) -> None:
        if self._own_session is not None:
            await self._own_session.close()
            self._own_session = None

    async def _get_token(self) -> tuple[str, int]:
        token = self.__token
        if token is not None and self._clock() < self._refresh_at:
            return token, self._generation
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch())
            self._inflight.add_done_callback(_consume_exception)
        # shield: a cancelled waiter must not cancel the request the others are waiting for
        return await asyncio.shield(self._inflight)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is not None:
            return self._session
        if self._own_session is None or self._own_session.closed:
            self._own_session = aiohttp.ClientSession(timeout=self._timeout)
        return self._own_session

    async def _fetch(self) -> tuple[str, int]:
        try:
            self.token_requests += 1
            started = self._clock()
            try:
                async with self._http().post(
                    self.token_url,
                    data={"grant_type": "client_credentials"},
                    headers={"Authorization": self.__basic, "Accept": "application/json"},
                    timeout=self._timeout,
                ) as resp:
                    status = resp.status
                    raw = await resp.read()
            except TimeoutError:
                raise AuthError("OAuth token request timed out", transient=True) from None
            except aiohttp.ClientError as exc:
                raise AuthError(
                    f"OAuth token request failed: {type(exc).__name__}", transient=True
                ) from None
            payload = _loads(raw)
            if status != 200:
                code = payload.get("error") if isinstance(payload, dict) else None
                detail = f" ({str(code)[:100]})" if code else ""
                transient = status == 429 or status >= 500
                raise AuthError(
                    f"OAuth token request rejected: HTTP {status}{detail}",
                    transient=transient,
                    status=status,
                )
            token = payload.get("access_token") if isinstance(payload, dict) else None
            if not isinstance(token, str) or not token:
                raise AuthError(
                    "OAuth token response has no access_token", transient=True, status=status
                )
            expires_in = DEFAULT_EXPIRES_IN
            raw_exp = payload.get("expires_in")
            if isinstance(raw_exp, int | float | str):
                try:
                    expires_in = max(float(raw_exp), 0.0)
                except ValueError:
                    pass
            lifetime = max(expires_in - self.refresh_margin, expires_in / 2)
            self.__token = token
            self._generation += 1
            self._refresh_at = started + lifetime
            logger.info(
                "emarsys OAuth token obtained",
                extra={"auth": "oauth2", "client_id": self.client_id, "expires_in": expires_in},
            )
            return token, self._generation
        finally:
            self._inflight = None


def _consume_exception(fut: asyncio.Future[Any]) -> None:
    # The waiters get the exception; this only stops "exception never retrieved" noise when
    # every waiter was cancelled.
    if not fut.cancelled():
        fut.exception()


def _loads(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
