"""WSSE header/digest and the OAuth 2.0 client-credentials authenticator."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from app.emarsys.auth import (
    Authenticator,
    AuthError,
    OAuth2Authenticator,
    WsseAuthenticator,
    wsse_digest,
    wsse_header,
)

SECRET = "s3cr3t-WSSE-value-0123456789"
CLIENT_SECRET = "cl1ent-S3CRET-abcdef987654"

HEADER_RE = re.compile(
    r'^UsernameToken Username="(?P<user>[^"]+)", PasswordDigest="(?P<digest>[^"]+)", '
    r'Nonce="(?P<nonce>[0-9a-f]{32})", Created="(?P<created>[^"]+)"$'
)


# ------------------------------------------------------------------------------------ WSSE


def test_wsse_digest_known_vector() -> None:
    nonce = "d36e316282959a9ed4c89851497a717f"
    created = "2014-03-20T12:51:45Z"
    secret = "e8e1fb1e2d09c9b5b8d9c3c1b2f5f1bf"
    # By hand from the sheet: base64 of the HEX string of sha1(nonce + created + secret).
    hex_string = hashlib.sha1(f"{nonce}{created}{secret}".encode()).hexdigest()
    assert hex_string == "03d230a89ae6d4c4c15fc082dc7309fb860c6741"
    expected = base64.b64encode(hex_string.encode("ascii")).decode("ascii")
    assert expected == "MDNkMjMwYTg5YWU2ZDRjNGMxNWZjMDgyZGM3MzA5ZmI4NjBjNjc0MQ=="
    assert wsse_digest(nonce, created, secret) == expected
    # NOT base64 of the raw 20 hash bytes
    raw = base64.b64encode(hashlib.sha1(f"{nonce}{created}{secret}".encode()).digest()).decode()
    assert wsse_digest(nonce, created, secret) != raw


def test_wsse_header_format_with_fixed_inputs() -> None:
    now = datetime(2014, 3, 20, 12, 51, 45, 123456, tzinfo=UTC)
    nonce = "d36e316282959a9ed4c89851497a717f"
    header = wsse_header("acme001", "e8e1fb1e2d09c9b5b8d9c3c1b2f5f1bf", now=now, nonce=nonce)
    assert header == (
        'UsernameToken Username="acme001", '
        'PasswordDigest="MDNkMjMwYTg5YWU2ZDRjNGMxNWZjMDgyZGM3MzA5ZmI4NjBjNjc0MQ==", '
        'Nonce="d36e316282959a9ed4c89851497a717f", Created="2014-03-20T12:51:45Z"'
    )


def test_wsse_created_is_utc() -> None:
    cet = timezone(timedelta(hours=1))
    header = wsse_header(
        "u", SECRET, now=datetime(2026, 11, 28, 10, 0, 0, tzinfo=cet), nonce="0" * 32
    )
    m = HEADER_RE.match(header)
    assert m and m["created"] == "2026-11-28T09:00:00Z"
    naive = wsse_header("u", SECRET, now=datetime(2026, 11, 28, 9, 0, 0), nonce="0" * 32)
    assert 'Created="2026-11-28T09:00:00Z"' in naive


def test_wsse_header_fresh_nonce_and_current_time() -> None:
    headers = [wsse_header("user", SECRET) for _ in range(50)]
    nonces = set()
    for h in headers:
        m = HEADER_RE.match(h)
        assert m, h
        nonces.add(m["nonce"])
        created = datetime.strptime(m["created"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert abs((datetime.now(UTC) - created).total_seconds()) < 60
        assert m["digest"] == wsse_digest(m["nonce"], m["created"], SECRET)
        assert SECRET not in h
    assert len(nonces) == 50


async def test_wsse_authenticator_headers_and_repr() -> None:
    auth = WsseAuthenticator("user", SECRET)
    assert isinstance(auth, Authenticator)
    h1 = await auth.headers()
    h2 = await auth.headers()
    assert set(h1) == {"X-WSSE"}
    assert HEADER_RE.match(h1["X-WSSE"])
    assert h1 != h2  # new nonce per request
    await auth.on_unauthorized()
    assert SECRET not in repr(auth) and SECRET not in str(auth)
    assert "user" in repr(auth)


async def test_wsse_accepts_secret_like() -> None:
    class Secret:
        def get_secret_value(self) -> str:
            return SECRET

    auth = WsseAuthenticator("user", Secret())
    m = HEADER_RE.match((await auth.headers())["X-WSSE"])
    assert m and m["digest"] == wsse_digest(m["nonce"], m["created"], SECRET)


# ------------------------------------------------------------------------------------ OAuth


@dataclass
class TokenServer:
    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    delay: float = 0.05
    expires_in: Any = 3600
    status: int = 200
    counter: int = 0


@pytest.fixture
async def token_server() -> AsyncIterator[TokenServer]:
    state = TokenServer()

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        state.requests.append(
            {"authorization": request.headers.get("Authorization"), "form": dict(form)}
        )
        await asyncio.sleep(state.delay)
        if state.status != 200:
            return web.json_response({"error": "invalid_client"}, status=state.status)
        state.counter += 1
        body: dict[str, Any] = {"access_token": f"tok-{state.counter}", "token_type": "Bearer"}
        if state.expires_in is not None:
            body["expires_in"] = state.expires_in
        return web.json_response(body)

    app = web.Application()
    app.router.add_post("/oauth2/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"http://127.0.0.1:{port}/oauth2/token"
    yield state
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_oauth_token_request_shape(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    auth = OAuth2Authenticator(session, token_server.url, "client-1", CLIENT_SECRET)
    assert isinstance(auth, Authenticator)
    assert await auth.headers() == {"Authorization": "Bearer tok-1"}
    assert len(token_server.requests) == 1
    req = token_server.requests[0]
    expected = base64.b64encode(f"client-1:{CLIENT_SECRET}".encode()).decode()
    assert req["authorization"] == f"Basic {expected}"
    assert req["form"] == {"grant_type": "client_credentials"}
    # cached
    assert await auth.headers() == {"Authorization": "Bearer tok-1"}
    assert len(token_server.requests) == 1


async def test_oauth_concurrent_refresh_coalesces(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    token_server.delay = 0.2
    auth = OAuth2Authenticator(session, token_server.url, "c", CLIENT_SECRET)
    results = await asyncio.gather(*(auth.headers() for _ in range(10)))
    assert len(token_server.requests) == 1
    assert all(r == {"Authorization": "Bearer tok-1"} for r in results)


async def test_oauth_refresh_before_expiry(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    now = [1000.0]
    auth = OAuth2Authenticator(
        session, token_server.url, "c", CLIENT_SECRET, refresh_margin=60.0, clock=lambda: now[0]
    )
    token_server.expires_in = 3600
    assert (await auth.headers())["Authorization"] == "Bearer tok-1"
    now[0] += 3600 - 60 - 1  # still inside the lifetime minus margin
    assert (await auth.headers())["Authorization"] == "Bearer tok-1"
    now[0] += 2  # margin reached: refresh before expires_in runs out
    assert (await auth.headers())["Authorization"] == "Bearer tok-2"
    assert len(token_server.requests) == 2


async def test_oauth_short_lifetime_and_missing_expires_in(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    now = [0.0]
    auth = OAuth2Authenticator(
        session, token_server.url, "c", CLIENT_SECRET, refresh_margin=60.0, clock=lambda: now[0]
    )
    token_server.expires_in = 30  # shorter than the margin: refresh at half the lifetime
    assert (await auth.headers())["Authorization"] == "Bearer tok-1"
    now[0] = 10
    assert (await auth.headers())["Authorization"] == "Bearer tok-1"
    token_server.expires_in = None  # -> 3600 s assumed
    now[0] = 16
    assert (await auth.headers())["Authorization"] == "Bearer tok-2"
    now[0] = 16 + 3500
    assert (await auth.headers())["Authorization"] == "Bearer tok-2"
    now[0] = 16 + 3541
    assert (await auth.headers())["Authorization"] == "Bearer tok-3"


async def test_oauth_on_unauthorized_refreshes_once_for_many_failures(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    auth = OAuth2Authenticator(session, token_server.url, "c", CLIENT_SECRET)
    await auth.headers()
    assert len(token_server.requests) == 1

    async def request_rejected_then_retry(i: int) -> dict[str, str]:
        await auth.headers()  # the header this task sent (tok-1)
        # the 401s arrive spread out: some before, some after the refresh finished
        await asyncio.sleep(0.03 * i)
        await auth.on_unauthorized()  # the server said 401 (for tok-1)
        return await auth.headers()

    results = await asyncio.gather(*(request_rejected_then_retry(i) for i in range(10)))
    assert all(r == {"Authorization": "Bearer tok-2"} for r in results)
    assert len(token_server.requests) == 2


async def test_oauth_errors_are_classified_and_secret_free(
    token_server: TokenServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    auth = OAuth2Authenticator(session, token_server.url, "c", CLIENT_SECRET)
    token_server.status = 401
    with pytest.raises(AuthError) as rejected:
        await asyncio.gather(*(auth.headers() for _ in range(5)))
    assert rejected.value.transient is False and rejected.value.status == 401
    assert len(token_server.requests) == 1  # the failure was shared too
    token_server.status = 503
    with pytest.raises(AuthError) as unavailable:
        await auth.headers()
    assert unavailable.value.transient is True
    token_server.status = 200
    assert (await auth.headers())["Authorization"] == "Bearer tok-1"

    dead = OAuth2Authenticator(session, "http://127.0.0.1:1/oauth2/token", "c", CLIENT_SECRET)
    with pytest.raises(AuthError) as conn:
        await dead.headers()
    assert conn.value.transient is True

    basic = base64.b64encode(f"c:{CLIENT_SECRET}".encode()).decode()
    for text in (
        str(rejected.value),
        str(unavailable.value),
        str(conn.value),
        repr(auth),
        str(auth),
        caplog.text,
    ):
        assert CLIENT_SECRET not in text
        assert basic not in text
        assert "tok-1" not in text


async def test_oauth_own_session(token_server: TokenServer) -> None:
    auth = OAuth2Authenticator(None, token_server.url, "c", CLIENT_SECRET)
    try:
        assert (await auth.headers())["Authorization"] == "Bearer tok-1"
    finally:
        await auth.close()
