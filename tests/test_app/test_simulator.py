"""Tests for app/simulator.py against a real server on 127.0.0.1 (free port)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
import pytest

from app.simulator import (
    SIMULATOR_STATE,
    RunningSimulator,
    SimulatorOptions,
    create_simulator_app,
    start_simulator,
)

USER, SECRET = "sim-user", "sim-secret"
CLIENT, CLIENT_SECRET = "sim-client", "sim-client-secret"


# ----------------------------------------------------------------- helpers (from the sheet)


def wsse_header(
    user: str = USER,
    secret: str = SECRET,
    *,
    created: str | None = None,
    nonce: str | None = None,
    digest: str | None = None,
) -> dict[str, str]:
    """X-WSSE built from the sheet: digest = base64(hex(sha1(nonce + created + secret)))."""
    nonce = nonce or secrets.token_hex(16)
    created = created or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if digest is None:
        hex_digest = hashlib.sha1((nonce + created + secret).encode()).hexdigest()
        digest = base64.b64encode(hex_digest.encode()).decode()
    return {
        "X-WSSE": (
            f'UsernameToken Username="{user}", PasswordDigest="{digest}", '
            f'Nonce="{nonce}", Created="{created}"'
        )
    }


def basic(client_id: str, secret: str) -> dict[str, str]:
    """Authorization: Basic base64(client_id:client_secret), as in the sheet."""
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


Sim = Callable[..., Awaitable[RunningSimulator]]


@pytest.fixture
async def make_sim() -> AsyncIterator[Sim]:
    started: list[RunningSimulator] = []

    async def factory(**options: Any) -> RunningSimulator:
        sim = await start_simulator("127.0.0.1", 0, SimulatorOptions(**options))
        started.append(sim)
        return sim

    yield factory
    for sim in started:
        await sim.stop()


@pytest.fixture
async def sim(make_sim: Sim) -> RunningSimulator:
    return await make_sim()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    http: aiohttp.ClientSession,
    sim: RunningSimulator,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any], Any]:
    """One WSSE call to /api/v2/<path>; returns (status, headers, parsed body)."""
    hdrs = wsse_header() if headers is None else headers
    data: bytes | io.BytesIO | None = raw
    if data is None and body is not None:
        data = orjson.dumps(body)
    if isinstance(data, bytes) and len(data) > 1_000_000:
        data = io.BytesIO(data)  # aiohttp warns about large raw bytes bodies
    if data is not None:
        hdrs = {**hdrs, "Content-Type": "application/json"}
    async with http.request(method, sim.url + path, data=data, headers=hdrs) as resp:
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


async def upsert(
    http: aiohttp.ClientSession, sim: RunningSimulator, contacts: list[dict[str, Any]]
) -> tuple[int, dict[str, Any], Any]:
    return await call(
        http, sim, "PUT", "contact/?create_if_not_exists=1", {"key_id": "3", "contacts": contacts}
    )


async def sim_get(http: aiohttp.ClientSession, sim: RunningSimulator, path: str) -> Any:
    async with http.get(sim.base_url + path) as resp:
        return resp.status, await resp.json()


async def get_token(http: aiohttp.ClientSession, sim: RunningSimulator) -> str:
    async with http.post(
        sim.token_url,
        data={"grant_type": "client_credentials"},
        headers=basic(CLIENT, CLIENT_SECRET),
    ) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["token_type"] == "bearer"
    return str(body["access_token"])


# ------------------------------------------------------------------------------ basics


async def test_urls_and_settings(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    assert sim.port > 0
    assert sim.url == f"http://127.0.0.1:{sim.port}/api/v2/"
    assert sim.base_url == f"http://127.0.0.1:{sim.port}/"
    status, headers, body = await call(http, sim, "GET", "settings")
    assert status == 200
    assert body["replyCode"] == 0 and body["replyText"] == "OK"
    assert body["data"]["id"] > 0
    status, _, body = await call(http, sim, "GET", "field")
    assert status == 200
    ids = {f["id"] for f in body["data"]}
    assert {1, 2, 3, 4, 5, 11, 12, 13, 14, 15, 31, 35, 37, 46} <= ids
    assert all({"id", "name", "application_type", "string_id"} <= set(f) for f in body["data"])


async def test_app_state_key() -> None:
    app = create_simulator_app(SimulatorOptions(users={"u": "s"}))
    assert app[SIMULATOR_STATE].options.users == {"u": "s"}


async def test_unknown_endpoint_has_envelope(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    status, _, body = await call(http, sim, "GET", "nope/nothing")
    assert status == 404
    assert set(body) == {"replyCode", "replyText", "data"}
    assert body["replyCode"] != 0


# --------------------------------------------------------------------------- contacts


async def test_upsert_creates_and_updates_only_sent_fields(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    status, _, body = await upsert(http, sim, [{"3": "ann@example.com", "1": "Ann", "2": "Lee"}])
    assert status == 200 and body["replyCode"] == 0
    assert len(body["data"]["ids"]) == 1 and body["data"]["errors"] == {}
    first_id = body["data"]["ids"][0]

    status, _, body = await upsert(http, sim, [{"3": "ann@example.com", "2": "Smith", "31": 1}])
    assert status == 200 and body["data"]["ids"] == [first_id]

    contact = sim.state.contact_by_key("ann@example.com")
    assert contact is not None
    assert contact.fields == {"3": "ann@example.com", "1": "Ann", "2": "Smith", "31": 1}
    assert len(sim.state.contacts) == 1
    assert sim.state.counters["contacts_created"] == 1
    assert sim.state.counters["contacts_updated"] == 1

    status, data = await sim_get(http, sim, "_sim/contacts/ann@example.com")
    assert status == 200
    assert data["fields"]["1"] == "Ann" and data["fields"]["2"] == "Smith"
    status, data = await sim_get(http, sim, "_sim/contacts/nobody@example.com")
    assert status == 404


async def test_upsert_without_create_flag_gives_2008(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    await upsert(http, sim, [{"3": "known@example.com"}])
    status, _, body = await call(
        http,
        sim,
        "PUT",
        "contact/",
        {"key_id": "3", "contacts": [{"3": "known@example.com", "1": "K"}, {"3": "new@x.com"}]},
    )
    assert status == 200 and body["replyCode"] == 0
    assert len(body["data"]["ids"]) == 1
    assert "2008" in body["data"]["errors"]["new@x.com"]
    assert sim.state.contact_by_key("new@x.com") is None


async def test_upsert_batch_over_1000_is_rejected(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    contacts = [{"3": f"u{i}@example.com"} for i in range(1001)]
    status, _, body = await upsert(http, sim, contacts)
    assert status == 400 and body["replyCode"] == 1000
    assert sim.state.contacts == {}
    status, _, body = await upsert(http, sim, contacts[:1000])
    assert status == 200 and len(body["data"]["ids"]) == 1000


async def test_upsert_bad_key_id_and_missing_key(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    status, _, body = await call(
        http, sim, "PUT", "contact/?create_if_not_exists=1", {"key_id": "999", "contacts": []}
    )
    assert status == 400 and body["replyCode"] == 2004
    assert "2004" in body["data"]["errors"]["<NO_KEY_ID>"]

    status, _, body = await upsert(http, sim, [{"1": "No Email"}, {"3": "ok@example.com"}])
    assert status == 200 and len(body["data"]["ids"]) == 1
    assert body["data"]["errors"]  # the contact without a key value
    assert "<NO_KEY_VALUE>" in body["data"]["errors"]


async def test_body_size_limit(make_sim: Sim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(contact_max_bytes=2000)
    contacts = [{"3": f"user{i}@example.com", "1": "x" * 50} for i in range(40)]
    status, _, body = await upsert(http, sim, contacts)
    assert status == 400 and body["replyCode"] == 1003
    # the trigger limit is 1 MiB by default
    big = {"key_id": "3", "contacts": [{"external_id": "a@b.com", "data": {"x": "y" * 1_100_000}}]}
    status, _, body = await call(http, sim, "POST", "event/1/trigger", big)
    assert status == 400 and body["replyCode"] == 1003


async def test_invalid_json_body(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    status, _, body = await call(http, sim, "PUT", "contact/", raw=b"{not json")
    assert status == 400 and body["replyCode"] == 1001


async def test_contact_delete(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    await upsert(http, sim, [{"3": "a@x.com"}, {"3": "b@x.com"}])
    status, _, body = await call(
        http, sim, "POST", "contact/delete", {"key_id": "3", "3": ["a@x.com", "zz@x.com"]}
    )
    assert status == 200 and body["replyCode"] == 0
    assert body["data"]["deleted_contacts"] == 1
    assert "2008" in body["data"]["errors"]["zz@x.com"]
    assert sim.state.contact_by_key("a@x.com") is None
    assert sim.state.contact_by_key("b@x.com") is not None


# --------------------------------------------------------------------------- triggers


async def test_trigger_unknown_contact_gives_2008(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    await upsert(http, sim, [{"3": "known@x.com"}])
    batch = {
        "key_id": "3",
        "contacts": [
            {"external_id": "known@x.com", "data": {"a": 1}, "trigger_id": "t1"},
            {"external_id": "ghost@x.com", "trigger_id": "t2"},
        ],
    }
    status, _, body = await call(http, sim, "POST", "event/42/trigger", batch)
    assert status == 200 and body["replyCode"] == 0
    assert len(body["data"]["ids"]) == 1
    assert "2008" in body["data"]["errors"]["ghost@x.com"]
    assert [t.external_id for t in sim.state.triggers] == ["known@x.com"]
    assert sim.state.triggers[0].data == {"a": 1}

    single = {"key_id": "3", "external_id": "ghost@x.com"}
    status, _, body = await call(http, sim, "POST", "event/42/trigger", single)
    assert status == 400 and body["replyCode"] == 2008


async def test_trigger_id_idempotent(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    await upsert(http, sim, [{"3": "ann@x.com"}])
    one = {
        "key_id": "3",
        "external_id": "ann@x.com",
        "trigger_id": "order-1",
        "data": {"order": 1},
        "event_time": "2026-11-28T09:00:00Z",
    }
    for _ in range(3):
        status, _, body = await call(http, sim, "POST", "event/7/trigger", one)
        assert status == 200 and body["replyCode"] == 0
    # the same trigger_id for another event is a different triggered event
    status, _, _ = await call(http, sim, "POST", "event/8/trigger", one)
    assert status == 200
    # no trigger_id: every call triggers
    plain = {"key_id": "3", "external_id": "ann@x.com"}
    await call(http, sim, "POST", "event/7/trigger", plain)
    await call(http, sim, "POST", "event/7/trigger", plain)

    assert len(sim.state.calls_to("/event/7/trigger")) == 5
    events = sim.state.triggers_for(7)
    assert len(events) == 3
    assert events[0].trigger_id == "order-1" and events[0].deliveries == 3
    assert events[0].event_time == "2026-11-28T09:00:00Z"
    assert len(sim.state.triggers_for(8)) == 1
    status, data = await sim_get(http, sim, "_sim/triggers")
    assert status == 200 and len(data) == 4


async def test_trigger_bad_event_time_and_strict_events(
    make_sim: Sim, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(strict_events=True, events={5: "known"})
    await upsert(http, sim, [{"3": "ann@x.com"}])
    body = {"key_id": "3", "external_id": "ann@x.com"}
    status, _, reply = await call(http, sim, "POST", "event/6/trigger", body)
    assert status == 400 and reply["replyCode"] == 5005
    status, _, reply = await call(http, sim, "POST", "event/5/trigger", body)
    assert status == 200 and reply["replyCode"] == 0

    status, _, reply = await call(http, sim, "POST", "event", {"name": "signup"})
    assert status == 200 and reply["replyCode"] == 0
    new_id = reply["data"]["id"]
    status, _, reply = await call(http, sim, "POST", f"event/{new_id}/trigger", body)
    assert status == 200 and reply["replyCode"] == 0
    status, _, reply = await call(http, sim, "GET", "event")
    assert {"id": new_id, "name": "signup"} in reply["data"]

    batch = {"key_id": "3", "contacts": [{"external_id": "ann@x.com", "event_time": "yesterday"}]}
    status, _, reply = await call(http, sim, "POST", "event/5/trigger", batch)
    assert status == 200 and reply["data"]["ids"] == []
    assert reply["data"]["errors"]["ann@x.com"]


async def test_trigger_batch_over_1000(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    batch = {"key_id": "3", "contacts": [{"external_id": f"{i}@x.com"} for i in range(1001)]}
    status, _, body = await call(http, sim, "POST", "event/1/trigger", batch)
    assert status == 400 and body["replyCode"] == 1000


# ------------------------------------------------------------------------------ lists


async def test_contact_lists(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    await upsert(http, sim, [{"3": f"m{i}@x.com"} for i in range(3)])
    status, _, body = await call(
        http,
        sim,
        "POST",
        "contactlist",
        {"key_id": "3", "name": "vip", "description": "d", "external_ids": ["m0@x.com"]},
    )
    assert status == 200 and body["replyCode"] == 0
    list_id = body["data"]["id"]
    status, _, body = await call(http, sim, "GET", "contactlist")
    assert [entry["name"] for entry in body["data"]] == ["vip"]

    add = {"key_id": "3", "external_ids": ["m0@x.com", "m1@x.com", "m2@x.com", "nope@x.com"]}
    status, _, body = await call(http, sim, "POST", f"contactlist/{list_id}/add", add)
    assert status == 200 and body["replyCode"] == 0
    assert body["data"]["inserted_contacts"] == 2
    assert "2008" in body["data"]["errors"]["nope@x.com"]
    assert len(sim.state.lists[list_id].members) == 3

    remove = {"key_id": "3", "external_ids": ["m1@x.com"]}
    status, _, body = await call(http, sim, "POST", f"contactlist/{list_id}/delete", remove)
    assert status == 200 and body["data"]["deleted_contacts"] == 1

    status, lists = await sim_get(http, sim, "_sim/lists")
    assert status == 200
    assert sorted(lists[0]["external_ids"]) == ["m0@x.com", "m2@x.com"]

    too_many = {"key_id": "3", "external_ids": [f"{i}@x.com" for i in range(10_001)]}
    for op in ("add", "delete"):
        status, _, body = await call(http, sim, "POST", f"contactlist/{list_id}/{op}", too_many)
        assert status == 400 and body["replyCode"] == 3002
    exactly = {"key_id": "3", "external_ids": [f"{i}@x.com" for i in range(10_000)]}
    status, _, body = await call(http, sim, "POST", f"contactlist/{list_id}/add", exactly)
    assert status == 200 and body["replyCode"] == 0

    status, _, body = await call(http, sim, "POST", "contactlist/999999/add", add)
    assert status == 400 and body["replyCode"] != 0


# ------------------------------------------------------------------------------- WSSE


async def test_wsse_rejections(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    status, _, body = await call(http, sim, "GET", "settings", headers=wsse_header(digest="bad"))
    assert status == 401 and body["replyCode"] != 0

    # base64 of the raw sha1 bytes (not of the hex string) is wrong
    nonce = secrets.token_hex(16)
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    raw = base64.b64encode(hashlib.sha1((nonce + created + SECRET).encode()).digest()).decode()
    headers = wsse_header(nonce=nonce, created=created, digest=raw)
    status, _, _ = await call(http, sim, "GET", "settings", headers=headers)
    assert status == 401

    status, _, _ = await call(http, sim, "GET", "settings", headers=wsse_header(user="who"))
    assert status == 401
    status, _, _ = await call(http, sim, "GET", "settings", headers={})
    assert status == 401
    status, _, _ = await call(http, sim, "GET", "settings", headers=wsse_header(secret="wrong"))
    assert status == 401

    old = (datetime.now(UTC) - timedelta(minutes=6)).strftime("%Y-%m-%dT%H:%M:%SZ")
    status, _, body = await call(http, sim, "GET", "settings", headers=wsse_header(created=old))
    assert status == 401 and body["replyText"] == "Time frame is invalid"
    future = (datetime.now(UTC) + timedelta(minutes=6)).strftime("%Y-%m-%dT%H:%M:%SZ")
    status, _, _ = await call(http, sim, "GET", "settings", headers=wsse_header(created=future))
    assert status == 401
    near = (datetime.now(UTC) - timedelta(minutes=4)).strftime("%Y-%m-%dT%H:%M:%SZ")
    status, _, _ = await call(http, sim, "GET", "settings", headers=wsse_header(created=near))
    assert status == 200

    headers = wsse_header()
    status, _, _ = await call(http, sim, "GET", "settings", headers=headers)
    assert status == 200
    status, _, body = await call(http, sim, "GET", "settings", headers=headers)
    assert status == 401 and body["replyText"] == "Time frame is invalid"

    failures = [c for c in sim.state.calls if c.status == 401]
    assert len(failures) == 8
    assert all(c.auth_user is None and c.note for c in failures)


async def test_v2_does_not_accept_bearer(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    token = await get_token(http, sim)
    status, _, _ = await call(
        http, sim, "GET", "settings", headers={"Authorization": f"Bearer {token}"}
    )
    assert status == 401


# --------------------------------------------------------------------------- rate limit


async def test_rate_limit(make_sim: Sim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(rate_limit_per_minute=3)
    remaining = []
    for _ in range(3):
        status, headers, _ = await call(http, sim, "GET", "settings")
        assert status == 200
        assert headers["X-RateLimit-Limit"] == "3"
        remaining.append(int(headers["X-RateLimit-Remaining"]))
    assert remaining == [2, 1, 0]
    status, headers, body = await call(http, sim, "GET", "settings")
    assert status == 429 and body["replyCode"] != 0
    assert headers["X-RateLimit-Remaining"] == "0"
    reset = int(headers["X-RateLimit-Reset"])
    now = datetime.now(UTC).timestamp()
    assert now < reset <= now + 61
    assert "Retry-After" not in headers
    assert sim.state.calls[-1].rate_limited and not sim.state.calls[-1].injected

    # per API user: another user has its own window
    sim.state.options.users["other"] = "other-secret"
    status, _, _ = await call(
        http, sim, "GET", "settings", headers=wsse_header("other", "other-secret")
    )
    assert status == 200

    # sliding window: a short window lets calls through again
    sim.state.set_faults(rate_limit_window=0.3)
    await asyncio.sleep(0.35)
    status, _, _ = await call(http, sim, "GET", "settings")
    assert status == 200


# ------------------------------------------------------------------------------ faults


async def test_error_rate_fault(make_sim: Sim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(error_rate=1.0, seed=1)
    statuses = set()
    for _ in range(10):
        status, _, body = await call(http, sim, "GET", "settings")
        statuses.add(status)
        assert set(body) == {"replyCode", "replyText", "data"} and body["replyCode"] != 0
    assert statuses <= {500, 502, 503}
    assert all(c.injected and c.fault == "error" for c in sim.state.calls)

    async with http.post(sim.base_url + "_sim/faults", json={"error_rate": 0}) as resp:
        assert resp.status == 200
        assert (await resp.json())["error_rate"] == 0
    status, _, _ = await call(http, sim, "GET", "settings")
    assert status == 200


async def test_burst_429_and_runtime_faults(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    async with http.post(sim.base_url + "_sim/faults", json={"burst_429": 2}) as resp:
        assert resp.status == 200
    results = [(await call(http, sim, "GET", "settings"))[0] for _ in range(3)]
    assert results == [429, 429, 200]
    assert [c.injected for c in sim.state.calls] == [True, True, False]
    assert sim.state.calls[0].fault == "burst_429"

    status, calls = await sim_get(http, sim, "_sim/calls")
    assert status == 200
    assert [c["status"] for c in calls] == [429, 429, 200]
    assert calls[0]["injected"] is True and calls[2]["injected"] is False

    for bad in ({"error_rate": 2}, {"nope": 1}, {"burst_429": "x"}):
        async with http.post(sim.base_url + "_sim/faults", json=bad) as resp:
            assert resp.status == 400


async def test_latency_and_timeout_faults(make_sim: Sim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(latency=0.2)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    status, _, _ = await call(http, sim, "GET", "settings")
    assert status == 200 and loop.time() - t0 >= 0.19

    sim.state.set_faults(latency=0, timeout_rate=1.0, timeout_seconds=0.2)
    status, _, body = await call(http, sim, "GET", "settings")
    assert status == 504 and body["replyCode"] != 0
    assert sim.state.calls[-1].fault == "timeout"

    sim.state.set_faults(timeout_rate=0, stall_rate=1.0, stall_seconds=0.2)
    t0 = loop.time()
    status, _, _ = await call(http, sim, "GET", "settings")
    assert status == 200 and loop.time() - t0 >= 0.19


async def test_timeout_close_mode(make_sim: Sim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(timeout_rate=1.0, timeout_seconds=0.1, timeout_mode="close")
    with pytest.raises(aiohttp.ClientError):
        await call(http, sim, "POST", "event/1/trigger", {"key_id": "3", "external_id": "a@b.c"})
    assert sim.state.calls[0].status == 0 and sim.state.calls[0].injected


async def test_stop_does_not_wait_for_stalls(make_sim: Sim) -> None:
    sim = await make_sim(stall_rate=1.0, stall_seconds=100)
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(session.get(sim.url + "settings", headers=wsse_header()))
        await sim.state.wait_for(lambda s: s.counters["faults_stall"] == 1, within=5)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await sim.stop()
        assert loop.time() - t0 < 5
        try:
            resp = await task
            resp.release()
        except aiohttp.ClientError:
            pass


# ------------------------------------------------------------------------------- OAuth


async def test_oauth_token_and_v3(make_sim: Sim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(token_lifetime=0.5)
    async with http.post(
        sim.token_url,
        data={"grant_type": "client_credentials"},
        headers=basic(CLIENT, CLIENT_SECRET),
    ) as resp:
        assert resp.status == 200
        token_body = await resp.json()
    assert token_body["token_type"] == "bearer"
    assert token_body["expires_in"] == 0.5
    bearer = {"Authorization": f"Bearer {token_body['access_token']}"}

    async with http.get(sim.url_v3 + "settings", headers=bearer) as resp:
        assert resp.status == 200
        assert (await resp.json())["data"]["id"] > 0
        assert "X-RateLimit-Limit" in resp.headers
    async with http.get(sim.url_v3 + "settings", headers=wsse_header()) as resp:
        assert resp.status == 401

    await asyncio.sleep(0.6)
    async with http.get(sim.url_v3 + "settings", headers=bearer) as resp:
        assert resp.status == 401
        assert (await resp.json())["replyCode"] != 0
    assert sim.state.calls[-1].note == "access token expired"

    for auth in (basic(CLIENT, "wrong"), basic("nobody", CLIENT_SECRET), {}):
        form = {"grant_type": "client_credentials"}
        async with http.post(sim.token_url, data=form, headers=auth) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "invalid_client"
    async with http.post(
        sim.token_url, data={"grant_type": "password"}, headers=basic(CLIENT, CLIENT_SECRET)
    ) as resp:
        assert resp.status == 400


async def test_oauth_revocation(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    token = await get_token(http, sim)
    bearer = {"Authorization": f"Bearer {token}"}
    await upsert(http, sim, [{"3": "ann@x.com"}])
    body = orjson.dumps({"key_id": "3", "external_id": "ann@x.com", "trigger_id": "x"})
    async with http.post(sim.url_v3 + "event/3/trigger", data=body, headers=bearer) as resp:
        assert resp.status == 200
    assert sim.state.triggers[0].auth_user == CLIENT

    async with http.post(sim.base_url + "_sim/revoke-tokens") as resp:
        assert (await resp.json())["revoked"] == 1
    async with http.get(sim.url_v3 + "settings", headers=bearer) as resp:
        assert resp.status == 401
    token2 = await get_token(http, sim)
    async with http.get(
        sim.url_v3 + "settings", headers={"Authorization": f"Bearer {token2}"}
    ) as r:
        assert r.status == 200


# --------------------------------------------------------------------------- /_sim


async def test_sim_endpoints_and_reset(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    await upsert(http, sim, [{"3": "ann@x.com", "1": "Ann"}])
    await call(http, sim, "POST", "event/9/trigger", {"key_id": "3", "external_id": "ann@x.com"})

    status, calls = await sim_get(http, sim, "_sim/calls")
    assert status == 200 and len(calls) == 2
    first = calls[0]
    assert first["method"] == "PUT" and first["path"] == "/api/v2/contact/"
    assert first["status"] == 200 and first["replyCode"] == 0
    assert first["auth_user"] == USER
    assert first["body"] == {"key_id": "3", "contacts": [{"3": "ann@x.com", "1": "Ann"}]}
    assert first["received_at"] > 0

    status, contacts = await sim_get(http, sim, "_sim/contacts")
    assert status == 200 and contacts[0]["fields"] == {"3": "ann@x.com", "1": "Ann"}
    status, triggers = await sim_get(http, sim, "_sim/triggers")
    assert status == 200 and triggers[0]["event_id"] == 9
    status, stats = await sim_get(http, sim, "_sim/stats")
    assert stats["counters"]["triggers"] == 1

    async with http.post(sim.base_url + "_sim/reset") as resp:
        assert resp.status == 200
    assert sim.state.calls == [] and sim.state.contacts == {} and sim.state.triggers == []
    status, contacts = await sim_get(http, sim, "_sim/contacts")
    assert contacts == []


async def test_secrets_never_logged_or_recorded(
    sim: RunningSimulator, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await call(http, sim, "GET", "settings")
    await call(http, sim, "GET", "settings", headers=wsse_header(secret="wrong-secret"))
    token = await get_token(http, sim)
    async with http.get(sim.url_v3 + "settings", headers={"Authorization": f"Bearer {token}"}):
        pass
    async with http.post(sim.base_url + "_sim/faults", json={"latency": 0}):
        pass
    status, calls = await sim_get(http, sim, "_sim/calls")
    dumped = orjson.dumps(calls).decode() + caplog.text
    for secret in (SECRET, CLIENT_SECRET, token, "wrong-secret"):
        assert secret not in dumped
