"""EmarsysClient against a real aiohttp fake on 127.0.0.1, and the RateLimiter on a fake clock.

The fake is purpose-built: each request takes the next scripted :class:`Reply` (default: 200
with replyCode 0); it records every request; in bearer mode it checks OAuth tokens.
Timing assertions are lower bounds only (robust on a slow, noisy machine).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from app.emarsys.auth import Authenticator, OAuth2Authenticator, WsseAuthenticator, wsse_digest
from app.emarsys.client import CallResult, EmarsysClient
from app.emarsys.ratelimit import RateLimiter

SECRET = "wsse-SECRET-do-not-log-4242"
CLIENT_SECRET = "oauth-CLIENT-SECRET-do-not-log-1717"
USER = "acme001"

OK_BODY: dict[str, Any] = {"replyCode": 0, "replyText": "OK", "data": {}}

WSSE_RE = re.compile(
    r'^UsernameToken Username="(?P<user>[^"]+)", PasswordDigest="(?P<digest>[^"]+)", '
    r'Nonce="(?P<nonce>[0-9a-f]{32})", Created="(?P<created>[^"]+)"$'
)


# ------------------------------------------------------------------------------ the fake


@dataclass
class Reply:
    status: int = 200
    body: Any = field(default_factory=lambda: dict(OK_BODY))
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    raw: bytes | None = None  # sent instead of body when set


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    at: float  # wall clock (time.time()) on arrival


class FakeEmarsys:
    def __init__(self) -> None:
        self.script: deque[Reply] = deque()
        self.requests: list[Seen] = []
        self.port = 0
        # OAuth
        self.bearer_mode = False
        self.valid_tokens: set[str] = set()
        self.token_requests: list[dict[str, str]] = []
        self.token_delay = 0.0
        self.token_status: deque[int] = deque()
        self._token_counter = 0

    def base_url(self, version: str = "v2") -> str:
        return f"http://127.0.0.1:{self.port}/api/{version}/"

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/oauth2/token"

    def push(self, *replies: Reply) -> None:
        self.script.extend(replies)

    def revoke_tokens(self) -> None:
        self.valid_tokens.clear()

    async def api(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.requests.append(
            Seen(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                headers=dict(request.headers),
                body=orjson.loads(raw) if raw else None,
                at=time.time(),
            )
        )
        if self.bearer_mode:
            auth = request.headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or auth[7:] not in self.valid_tokens:
                return web.json_response(
                    {"replyCode": 1, "replyText": "Unauthorized", "data": ""}, status=401
                )
        reply = self.script.popleft() if self.script else Reply()
        if reply.delay:
            await asyncio.sleep(reply.delay)
        raw_out = reply.raw if reply.raw is not None else orjson.dumps(reply.body)
        return web.Response(
            status=reply.status,
            body=raw_out,
            headers=reply.headers,
            content_type="application/json",
        )

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.token_requests.append(
            {"authorization": request.headers.get("Authorization", "")}
            | {k: str(v) for k, v in form.items()}
        )
        if self.token_delay:
            await asyncio.sleep(self.token_delay)
        status = self.token_status.popleft() if self.token_status else 200
        if status != 200:
            return web.json_response({"error": "invalid_client"}, status=status)
        self._token_counter += 1
        token = f"tok-{self._token_counter}-abcdef"
        self.valid_tokens.add(token)
        return web.json_response(
            {"access_token": token, "token_type": "Bearer", "expires_in": 3600}
        )


@pytest.fixture
async def fake() -> AsyncIterator[FakeEmarsys]:
    state = FakeEmarsys()
    app = web.Application()
    app.router.add_post("/oauth2/token", state.token)
    app.router.add_route("*", "/api/{tail:.*}", state.api)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield state
    await runner.cleanup()


ClientFactory = Callable[..., Awaitable[EmarsysClient]]


@pytest.fixture
async def make_client(fake: FakeEmarsys) -> AsyncIterator[ClientFactory]:
    clients: list[EmarsysClient] = []

    async def factory(**kwargs: Any) -> EmarsysClient:
        base_url = kwargs.pop("base_url", fake.base_url())
        auth = kwargs.pop("authenticator", None) or WsseAuthenticator(USER, SECRET)
        kwargs.setdefault("backoff_base", 0.01)
        kwargs.setdefault("max_backoff", 0.05)
        kwargs.setdefault("request_timeout", 5.0)
        client = EmarsysClient(base_url, auth, **kwargs)
        await client.start()
        clients.append(client)
        return client

    yield factory
    for c in clients:
        await c.close()


class SpyAuth:
    """Wraps an authenticator, counting on_unauthorized calls."""

    def __init__(self, inner: Authenticator) -> None:
        self.inner = inner
        self.unauthorized = 0

    async def headers(self) -> dict[str, str]:
        return await self.inner.headers()

    async def on_unauthorized(self) -> None:
        self.unauthorized += 1
        await self.inner.on_unauthorized()


class SpyLimiter(RateLimiter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pauses: list[float] = []
        self.acquired = 0

    async def acquire(self) -> None:
        await super().acquire()
        self.acquired += 1

    def pause_until(self, unix_ts: float) -> None:
        self.pauses.append(unix_ts)
        super().pause_until(unix_ts)


def free_closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ------------------------------------------------------------------------------ success path


async def test_upsert_success_request_shape(fake: FakeEmarsys, make_client: ClientFactory) -> None:
    fake.push(Reply(body={"replyCode": 0, "replyText": "OK", "data": {"ids": [11, 12]}}))
    client = await make_client()
    contacts = [{"3": "a@x.com", "1": "Ann"}, {"3": "b@x.com"}]
    result = await client.upsert_contacts("3", contacts)

    assert isinstance(result, CallResult)
    assert result.ok and not result.permanent_error
    assert (result.status, result.reply_code, result.reply_text) == (200, 0, "OK")
    assert result.data == {"ids": [11, 12]}
    assert result.contact_errors == {}
    assert result.attempts == 1 and sum(result.retries_by_reason.values()) == 0
    assert result.endpoint == "contact.upsert" and result.method == "PUT"
    assert result.latency_seconds > 0

    (seen,) = fake.requests
    assert seen.method == "PUT"
    assert seen.path == "/api/v2/contact/"
    assert seen.query == {"create_if_not_exists": "1"}
    assert seen.body == {"key_id": "3", "contacts": contacts}
    assert seen.headers["Content-Type"] == "application/json"
    m = WSSE_RE.match(seen.headers["X-WSSE"])
    assert m and m["user"] == USER
    assert m["digest"] == wsse_digest(m["nonce"], m["created"], SECRET)


async def test_helpers_send_the_documented_requests(
    fake: FakeEmarsys, make_client: ClientFactory
) -> None:
    client = await make_client()
    assert (await client.trigger_event(42, "3", [{"external_id": "a", "trigger_id": "t1"}])).ok
    assert (await client.add_to_list(7, "3", ["a", "b"])).ok
    assert (await client.remove_from_list(7, 3, iter(["c"]))).ok
    assert (await client.create_list("VIPs", "3")).ok
    assert (await client.create_list("L2", "3", ["a"], description="d")).ok
    assert (await client.list_lists()).ok
    assert (await client.get_settings()).ok
    got = [(r.method, r.path, r.body) for r in fake.requests]
    assert got == [
        (
            "POST",
            "/api/v2/event/42/trigger",
            {"key_id": "3", "contacts": [{"external_id": "a", "trigger_id": "t1"}]},
        ),
        ("POST", "/api/v2/contactlist/7/add", {"key_id": "3", "external_ids": ["a", "b"]}),
        ("POST", "/api/v2/contactlist/7/delete", {"key_id": "3", "external_ids": ["c"]}),
        ("POST", "/api/v2/contactlist", {"key_id": "3", "name": "VIPs", "external_ids": []}),
        (
            "POST",
            "/api/v2/contactlist",
            {"key_id": "3", "name": "L2", "external_ids": ["a"], "description": "d"},
        ),
        ("GET", "/api/v2/contactlist", None),
        ("GET", "/api/v2/settings", None),
    ]
    with pytest.raises(ValueError):
        await client.upsert_contacts("3", [{"3": str(i)} for i in range(1001)])
    with pytest.raises(ValueError):
        await client.add_to_list(1, "3", [str(i) for i in range(10_001)])
    assert len(fake.requests) == 7


@pytest.mark.parametrize(
    ("suffix", "path"),
    [("/api/v2/", "settings"), ("/api/v2", "settings"), ("/api/v2/", "/settings")],
)
async def test_base_url_joining(
    fake: FakeEmarsys, make_client: ClientFactory, suffix: str, path: str
) -> None:
    client = await make_client(base_url=f"http://127.0.0.1:{fake.port}{suffix}")
    assert (await client.call("GET", path, endpoint="settings")).ok
    assert fake.requests[-1].path == "/api/v2/settings"


async def test_per_contact_errors(fake: FakeEmarsys, make_client: ClientFactory) -> None:
    fake.push(
        Reply(
            body={
                "replyCode": 0,
                "replyText": "OK",
                "data": {
                    "ids": [1],
                    "errors": {
                        "b@x.com": {"2008": "No contact found with the external id: 3"},
                        "<NO_KEY_ID>": {"2004": "Invalid key field id: 99"},
                    },
                },
            }
        ),
        Reply(body={"replyCode": 0, "replyText": "OK", "data": {"ids": [], "errors": []}}),
    )
    client = await make_client()
    result = await client.trigger_event(1, "3", [{"external_id": "a@x.com"}])
    assert result.ok and not result.permanent_error
    assert result.contact_errors == {
        "b@x.com": {"2008": "No contact found with the external id: 3"},
        "<NO_KEY_ID>": {"2004": "Invalid key field id: 99"},
    }
    empty = await client.trigger_event(1, "3", [{"external_id": "a@x.com"}])
    assert empty.ok and empty.contact_errors == {}


# ------------------------------------------------------------------------------ classification


async def test_5xx_retried_then_success_and_hook(
    fake: FakeEmarsys, make_client: ClientFactory
) -> None:
    events: list[tuple[str, str, float]] = []
    fake.push(Reply(status=500), Reply(status=503, raw=b"<html>busy</html>"))
    client = await make_client(on_attempt=lambda e, s, lat: events.append((e, s, lat)))
    result = await client.upsert_contacts("3", [{"3": "a"}])
    assert result.ok and result.attempts == 3
    assert result.retries_by_reason == {"5xx": 2}
    assert [(e, s) for e, s, _ in events] == [
        ("contact.upsert", "500"),
        ("contact.upsert", "503"),
        ("contact.upsert", "200"),
    ]
    assert all(lat >= 0 for _, _, lat in events)
    assert len(fake.requests) == 3


async def test_on_retry_is_called_live_for_each_retry(
    fake: FakeEmarsys, make_client: ClientFactory
) -> None:
    # Each retry is reported when it is decided, i.e. while the call is still going on
    # (requests seen by the server so far), not once at the end.
    seen: list[tuple[str, str, int]] = []
    fake.push(Reply(status=503), Reply(status=429), Reply(status=401))
    client = await make_client(on_retry=lambda e, r: seen.append((e, r, len(fake.requests))))
    result = await client.upsert_contacts("3", [{"3": "a"}])
    assert result.ok and result.attempts == 4
    assert seen == [
        ("contact.upsert", "5xx", 1),
        ("contact.upsert", "429", 2),
        ("contact.upsert", "401", 3),
    ]


async def test_hook_exception_does_not_break_call(
    fake: FakeEmarsys, make_client: ClientFactory
) -> None:
    def bad_hook(endpoint: str, status: str, latency: float) -> None:
        raise RuntimeError("metrics down")

    client = await make_client(on_attempt=bad_hook)
    assert (await client.get_settings()).ok


async def test_5xx_gives_up_after_max_attempts(
    fake: FakeEmarsys, make_client: ClientFactory
) -> None:
    fake.push(*[Reply(status=503) for _ in range(5)])
    client = await make_client(max_attempts=3)
    result = await client.get_settings()
    assert not result.ok and not result.permanent_error
    assert result.status == 503 and result.attempts == 3
    assert result.retries_by_reason == {"5xx": 2}
    assert len(fake.requests) == 3


async def test_429_waits_for_rate_limit_reset(
    fake: FakeEmarsys, make_client: ClientFactory
) -> None:
    reset = int(time.time()) + 1
    fake.push(
        Reply(
            status=429,
            body={"replyCode": 429, "replyText": "Too many requests", "data": ""},
            headers={
                "X-RateLimit-Limit": "1000",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(reset),
            },
        )
    )
    limiter = SpyLimiter(1000)
    client = await make_client(limiter=limiter)
    result = await client.upsert_contacts("3", [{"3": "a"}])
    assert result.ok and result.attempts == 2
    assert result.retries_by_reason == {"429": 1}
    assert len(limiter.pauses) == 1 and abs(limiter.pauses[0] - reset) < 0.01
    assert limiter.acquired == 2  # the limiter is passed before every attempt
    assert fake.requests[1].at >= reset - 0.05  # not retried before the reset time


async def test_429_pause_applies_to_other_callers(
    fake: FakeEmarsys, make_client: ClientFactory
) -> None:
    reset = time.time() + 0.6
    fake.push(Reply(status=429, headers={"X-RateLimit-Reset": f"{reset:.3f}"}))
    client = await make_client()
    first = await client.get_settings()
    assert first.ok and first.retries_by_reason == {"429": 1}
    other = await client.list_lists()  # a different call waits for the same reset
    assert other.ok
    assert all(r.at >= reset - 0.05 for r in fake.requests[1:])


async def test_429_without_reset_backs_off(fake: FakeEmarsys, make_client: ClientFactory) -> None:
    fake.push(Reply(status=429), Reply(status=429, headers={"X-RateLimit-Reset": "garbage"}))
    limiter = SpyLimiter(1000)
    client = await make_client(limiter=limiter)
    result = await client.get_settings()
    assert result.ok and result.retries_by_reason == {"429": 2}
    assert limiter.pauses == []


async def test_reply_code_nonzero_on_200_is_permanent(
    fake: FakeEmarsys, make_client: ClientFactory
) -> None:
    fake.push(Reply(body={"replyCode": 2004, "replyText": "Invalid key field id", "data": ""}))
    client = await make_client()
    result = await client.upsert_contacts("99", [{"99": "a"}])
    assert not result.ok and result.permanent_error
    assert (result.status, result.reply_code) == (200, 2004)
    assert result.reply_text == "Invalid key field id"
    assert result.attempts == 1 and len(fake.requests) == 1
    assert result.error is not None and "2004" in result.error


@pytest.mark.parametrize("status", [400, 403, 404, 422])
async def test_other_4xx_permanent(
    fake: FakeEmarsys, make_client: ClientFactory, status: int
) -> None:
    fake.push(Reply(status=status, body={"replyCode": 1000, "replyText": "Too many", "data": ""}))
    client = await make_client()
    result = await client.upsert_contacts("3", [{"3": "a"}])
    assert not result.ok and result.permanent_error
    assert result.status == status and result.reply_code == 1000 and result.attempts == 1
    assert len(fake.requests) == 1


async def test_2xx_with_non_json_body_retried(
    fake: FakeEmarsys, make_client: ClientFactory
) -> None:
    fake.push(Reply(raw=b"<html>proxy</html>"))
    client = await make_client()
    result = await client.get_settings()
    assert result.ok and result.retries_by_reason == {"bad_response": 1}


async def test_401_once_then_recovered(fake: FakeEmarsys, make_client: ClientFactory) -> None:
    fake.push(Reply(status=401, body={"replyCode": 1, "replyText": "Time frame is invalid"}))
    auth = SpyAuth(WsseAuthenticator(USER, SECRET))
    client = await make_client(authenticator=auth)
    result = await client.get_settings()
    assert result.ok and result.attempts == 2
    assert result.retries_by_reason == {"401": 1}
    assert auth.unauthorized == 1
    nonces = [WSSE_RE.match(r.headers["X-WSSE"])["nonce"] for r in fake.requests]  # type: ignore[index]
    assert len(set(nonces)) == 2  # a fresh header for the retry


async def test_401_twice_is_permanent(fake: FakeEmarsys, make_client: ClientFactory) -> None:
    fake.push(*[Reply(status=401) for _ in range(3)])
    auth = SpyAuth(WsseAuthenticator(USER, SECRET))
    client = await make_client(authenticator=auth)
    result = await client.get_settings()
    assert not result.ok and result.permanent_error
    assert result.status == 401 and result.attempts == 2
    assert auth.unauthorized == 1
    assert len(fake.requests) == 2


async def test_timeout_retried(fake: FakeEmarsys, make_client: ClientFactory) -> None:
    fake.push(Reply(delay=1.0))
    client = await make_client(request_timeout=0.25)
    result = await client.get_settings()
    assert result.ok and result.attempts == 2
    assert result.retries_by_reason == {"timeout": 1}


async def test_timeout_gives_up_after_max_attempts(
    fake: FakeEmarsys, make_client: ClientFactory
) -> None:
    fake.push(Reply(delay=1.0), Reply(delay=1.0))
    events: list[str] = []
    client = await make_client(
        request_timeout=0.2, max_attempts=2, on_attempt=lambda e, s, lat: events.append(s)
    )
    result = await client.get_settings()
    assert not result.ok and not result.permanent_error
    assert result.status is None and result.attempts == 2
    assert result.retries_by_reason == {"timeout": 1}
    assert result.error is not None and "timeout" in result.error
    assert events == ["timeout", "timeout"]


async def test_connection_error_retried(make_client: ClientFactory) -> None:
    port = free_closed_port()
    client = await make_client(base_url=f"http://127.0.0.1:{port}/api/v2/", max_attempts=3)
    result = await client.get_settings()
    assert not result.ok and not result.permanent_error
    assert result.attempts == 3 and result.retries_by_reason == {"connection": 2}
    assert result.status is None


async def test_unlimited_attempts_keep_retrying(
    fake: FakeEmarsys, make_client: ClientFactory
) -> None:
    fake.push(*[Reply(status=502) for _ in range(8)])
    client = await make_client()  # max_attempts=None
    result = await client.get_settings()
    assert result.ok and result.attempts == 9 and result.retries_by_reason == {"5xx": 8}


# ------------------------------------------------------------------------------ lifecycle


async def test_one_session_for_the_lifetime(fake: FakeEmarsys) -> None:
    client = EmarsysClient(fake.base_url(), WsseAuthenticator(USER, SECRET))
    async with client:
        session = client.session
        assert session is not None
        await client.get_settings()
        await client.list_lists()
        assert client.session is session
    assert session.closed
    with pytest.raises(RuntimeError):
        await client.get_settings()


async def test_external_session_not_closed(fake: FakeEmarsys) -> None:
    async with aiohttp.ClientSession() as session:
        async with EmarsysClient(
            fake.base_url(), WsseAuthenticator(USER, SECRET), session=session
        ) as client:
            assert (await client.get_settings()).ok
        assert not session.closed


# ------------------------------------------------------------------------------ OAuth


async def oauth_client(
    fake: FakeEmarsys, make_client: ClientFactory
) -> tuple[EmarsysClient, OAuth2Authenticator]:
    fake.bearer_mode = True
    auth = OAuth2Authenticator(None, fake.token_url, "client-9", CLIENT_SECRET)
    client = await make_client(base_url=fake.base_url("v3"), authenticator=auth)
    return client, auth


async def test_oauth_concurrent_calls_one_token_request(
    fake: FakeEmarsys, make_client: ClientFactory
) -> None:
    fake.token_delay = 0.2
    client, auth = await oauth_client(fake, make_client)
    try:
        results = await asyncio.gather(*(client.get_settings() for _ in range(10)))
        assert all(r.ok and r.attempts == 1 for r in results)
        assert len(fake.token_requests) == 1
        basic = base64.b64encode(f"client-9:{CLIENT_SECRET}".encode()).decode()
        assert fake.token_requests[0] == {
            "authorization": f"Basic {basic}",
            "grant_type": "client_credentials",
        }
        assert {r.headers["Authorization"] for r in fake.requests} == {"Bearer tok-1-abcdef"}
        assert all(r.path == "/api/v3/settings" for r in fake.requests)
    finally:
        await auth.close()


async def test_oauth_401_refreshes_once_and_recovers(
    fake: FakeEmarsys, make_client: ClientFactory
) -> None:
    client, auth = await oauth_client(fake, make_client)
    try:
        assert (await client.get_settings()).ok
        fake.revoke_tokens()  # e.g. the token was revoked / expired early on the server
        fake.token_delay = 0.1
        results = await asyncio.gather(*(client.get_settings() for _ in range(10)))
        assert all(r.ok for r in results)
        assert all(r.retries_by_reason == {"401": 1} and r.attempts == 2 for r in results)
        assert len(fake.token_requests) == 2  # one initial, ONE refresh for ten 401s
    finally:
        await auth.close()


async def test_oauth_token_endpoint_failures(fake: FakeEmarsys, make_client: ClientFactory) -> None:
    client, auth = await oauth_client(fake, make_client)
    try:
        fake.token_status.extend([503])
        transient = await client.get_settings()
        assert transient.ok and transient.retries_by_reason == {"auth": 1}
        fake.revoke_tokens()
        await auth.on_unauthorized()
        fake.token_status.extend([401])
        rejected = await client.get_settings()
        assert not rejected.ok and rejected.permanent_error
        assert rejected.error is not None and rejected.error.startswith("auth:")
    finally:
        await auth.close()


# ------------------------------------------------------------------------------ secrets


async def test_secrets_never_logged(
    fake: FakeEmarsys, make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.push(
        Reply(status=500),
        Reply(status=401),
        Reply(status=401),
        Reply(body={"replyCode": 2004, "replyText": "bad", "data": ""}),
        Reply(status=429, headers={"X-RateLimit-Reset": str(time.time() + 0.1)}),
        Reply(delay=0.6),
    )
    wsse = await make_client(request_timeout=0.2)
    for _ in range(5):
        await wsse.get_settings()
    assert fake.requests and all("X-WSSE" in r.headers for r in fake.requests)

    client, auth = await oauth_client(fake, make_client)
    try:
        await client.get_settings()
        fake.revoke_tokens()
        await client.get_settings()
        fake.token_status.append(401)
        fake.revoke_tokens()
        await client.get_settings()
    finally:
        await auth.close()

    wsse_headers = [r.headers["X-WSSE"] for r in fake.requests if "X-WSSE" in r.headers]
    tokens = [r.headers["Authorization"] for r in fake.requests if "Authorization" in r.headers]
    assert wsse_headers and tokens
    digests = [WSSE_RE.match(h)["digest"] for h in wsse_headers]  # type: ignore[index]
    basic = base64.b64encode(f"client-9:{CLIENT_SECRET}".encode()).decode()
    forbidden = [SECRET, CLIENT_SECRET, basic, "tok-", "PasswordDigest", *digests]
    everything = caplog.text + "\n".join(repr(vars(rec)) for rec in caplog.records)
    assert caplog.records  # something was logged
    for needle in forbidden:
        assert needle not in everything, needle
    for obj in (wsse, client, auth, wsse.authenticator):
        assert SECRET not in repr(obj) and CLIENT_SECRET not in repr(obj)


async def test_logger_name_and_structured_fields(
    fake: FakeEmarsys, make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="emarsys_stream.emarsys")
    fake.push(Reply(status=500))
    client = await make_client()
    await client.get_settings()
    retry = [r for r in caplog.records if r.getMessage().startswith("emarsys call failed")]
    assert retry and retry[0].name == "emarsys_stream.emarsys"
    assert getattr(retry[0], "endpoint") == "settings"  # noqa: B009
    assert getattr(retry[0], "reason") == "5xx"  # noqa: B009


# ------------------------------------------------------------------------------ rate limiter


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds
        await asyncio.sleep(0)


def max_in_window(starts: list[float], window: float) -> int:
    return max(sum(1 for t in starts if s <= t < s + window - 1e-9) for s in starts)


async def test_limiter_sliding_window_sequential() -> None:
    clock = FakeClock()
    limiter = RateLimiter(5, clock, sleep=clock.sleep, wall_clock=lambda: 1e9 + clock.t)
    starts = []
    for _ in range(12):
        await limiter.acquire()
        starts.append(clock.t)
    assert starts == pytest.approx([0.0] * 5 + [60.0] * 5 + [120.0] * 2)
    assert len(clock.sleeps) <= 4  # one sleep per wait, no polling


async def test_limiter_concurrent_callers_never_exceed_limit() -> None:
    clock = FakeClock()
    limiter = RateLimiter(5, clock, sleep=clock.sleep, wall_clock=lambda: 1e9 + clock.t)
    starts: list[float] = []

    async def worker() -> None:
        for _ in range(4):
            await limiter.acquire()
            starts.append(clock.t)
            await asyncio.sleep(0)

    await asyncio.gather(*(worker() for _ in range(6)))  # 24 calls
    assert len(starts) == 24
    assert max_in_window(sorted(starts), 60.0) <= 5
    assert max(starts) == pytest.approx(240.0)  # ceil(24/5)-1 windows: no time wasted
    assert len(clock.sleeps) <= 30


async def test_limiter_pause_until_blocks_everyone() -> None:
    clock = FakeClock(100.0)
    wall = [1_700_000_000.0]
    limiter = RateLimiter(1000, clock, sleep=clock.sleep, wall_clock=lambda: wall[0] + clock.t)
    await limiter.acquire()
    limiter.pause_until(wall[0] + clock.t + 30)
    limiter.pause_until(wall[0] + clock.t + 5)  # never shortens a pause
    assert limiter.paused and limiter.delay() == pytest.approx(30)
    starts: list[float] = []

    async def caller() -> None:
        await limiter.acquire()
        starts.append(clock.t)

    await asyncio.gather(*(caller() for _ in range(3)))
    assert all(s >= 130.0 - 1e-9 for s in starts)
    assert not limiter.paused


async def test_limiter_real_clock_short_window() -> None:
    limiter = RateLimiter(3, window=0.3)
    t0 = time.monotonic()
    for _ in range(7):  # starts at ~0, 0.3, 0.6
        await limiter.acquire()
    assert time.monotonic() - t0 >= 0.6 - 0.02


async def test_client_respects_limiter(fake: FakeEmarsys, make_client: ClientFactory) -> None:
    client = await make_client(limiter=RateLimiter(3, window=0.4))
    t0 = time.monotonic()
    results = await asyncio.gather(*(client.get_settings() for _ in range(6)))
    assert all(r.ok for r in results)
    assert time.monotonic() - t0 >= 0.4 - 0.02
    assert len(fake.requests) == 6


def test_limiter_validation() -> None:
    with pytest.raises(ValueError):
        RateLimiter(0)
    assert "1000" in repr(RateLimiter(1000))
