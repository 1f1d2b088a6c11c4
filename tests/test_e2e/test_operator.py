"""What an operator sees: web port 0, /metrics families and lag, JSON logs, OAuth 2.0."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import aiohttp
import yaml

from app.simulator import SimulatorOptions, start_simulator
from tests.fixtures import Deployment, WorkerProcess, wait_for
from tests.test_e2e.test_pipeline import contact, identify, upsert_calls

OAUTH_SECRET = "oauth-Cl1ent-Secret-7f3a"

REQUIRED_FAMILIES = [
    "emarsys_stream_events_in_total",
    "emarsys_stream_events_invalid_total",
    "emarsys_stream_duplicates_total",
    "emarsys_stream_unidentified_held_total",
    "emarsys_stream_unidentified_released_total",
    "emarsys_stream_unidentified_expired_total",
    "emarsys_stream_users_table_keys",
    "emarsys_stream_rule_matches_total",
    "emarsys_stream_late_events_total",
    "emarsys_stream_emarsys_calls_total",
    "emarsys_stream_emarsys_call_seconds_bucket",
    "emarsys_stream_emarsys_retries_total",
    "emarsys_stream_emarsys_429_total",
    "emarsys_stream_emarsys_dead_letters_total",
    "emarsys_stream_consumer_lag",
    "emarsys_stream_emarsys_minimum_calls_total",
]


def _port_zero_worker(dep: Deployment, env: dict[str, str] | None = None) -> WorkerProcess:
    """Worker 0 configured with ``web.port: 0``; its port is read from its log."""
    w = dep.worker(0)
    cfg = yaml.safe_load(w.config_path.read_text())
    cfg["web"] = {"host": "127.0.0.1", "port": 0}
    w.config_path.write_text(yaml.safe_dump(cfg))
    w.web_port = 0
    w.env.update(env or {})
    return w


async def _start_on_port_zero(w: WorkerProcess) -> None:
    w.start()
    pattern = re.compile(r"web listening on http://127\.0\.0\.1:(\d+)")

    def port() -> int | None:
        m = pattern.search(w.log())
        return int(m.group(1)) if m else None

    w.web_port = await wait_for(port, timeout=60)
    assert w.web_port != 0
    await w.wait_ready()


async def _get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}") as r:
        return r.status, await r.text()


def _json_lines(log: str) -> list[dict[str, Any]]:
    out = []
    for line in log.splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)  # every line is one JSON object
        assert isinstance(obj, dict), line
        assert {"ts", "level", "logger", "msg"} <= obj.keys(), line
        out.append(obj)
    return out


async def test_metrics_families_lag_and_json_logs(deployment_factory: Any, simulator: Any) -> None:
    dep = deployment_factory(simulator.url)
    w = _port_zero_worker(dep)
    await _start_on_port_zero(w)
    events = [identify(f"m{i}@example.com", mid=f"m{i}", uid=f"u{i}") for i in range(20)]
    await dep.produce([*events, events[0], b"not json"])
    for i in range(20):
        await wait_for(lambda i=i: contact(simulator, f"m{i}@example.com"))

    async def scrape() -> str:
        status, text = await _get(w.web_port, "/metrics")
        assert status == 200
        return text

    text = await scrape()
    for family in REQUIRED_FAMILIES:
        assert family in text, family
    assert re.search(r'emarsys_stream_events_in_total\{type="identify"\} 2[01]\.0', text), text
    assert "emarsys_stream_duplicates_total 1.0" in text
    assert 'emarsys_stream_events_invalid_total{reason="invalid_json"} 1.0' in text
    # Fewer than batch_size contacts per flush: every flush could do no better than the
    # one call it made, so the minimum equals the upsert calls the simulator received.
    minimum = re.search(
        r'emarsys_stream_emarsys_minimum_calls_total\{endpoint="contact.upsert"\} (\S+)', text
    )
    assert minimum is not None, text
    assert float(minimum.group(1)) == len(upsert_calls(simulator)) >= 1

    lag_re = re.compile(
        r'emarsys_stream_consumer_lag\{partition="(\d+)",topic="' + re.escape(dep.ingest_topic)
        + r'"\} (\S+)'
    )

    async def lag_for_ingest() -> list[tuple[str, str]]:
        return lag_re.findall(await scrape())

    deadline = time.monotonic() + 30
    found: list[tuple[str, str]] = []
    while time.monotonic() < deadline:
        found = await lag_for_ingest()
        if {p for p, _ in found} == {"0", "1"}:
            break
        await asyncio.sleep(0.5)
    assert {p for p, _ in found} == {"0", "1"}, found
    assert all(float(v) >= 0 for _, v in found)

    w.stop()
    records = _json_lines(w.log())
    loggers = {r["logger"] for r in records}
    assert any(name.startswith("emarsys_stream.") for name in loggers), loggers
    assert any(name.split(".")[0] in {"faust", "mode"} for name in loggers), loggers
    msgs = [r["msg"] for r in records]
    assert any(m.startswith("worker ready with") for m in msgs), msgs
    assert any(m.startswith("dead letters written: 1 invalid") for m in msgs), msgs
    assert any(m.startswith("web listening on") for m in msgs)


async def test_oauth2_refresh_revoke_and_no_secret_anywhere(deployment_factory: Any) -> None:
    sim = await start_simulator(
        options=SimulatorOptions(rate_limit_per_minute=0, token_lifetime=5.0,
                                 oauth_clients={"sim-client": OAUTH_SECRET})
    )
    try:
        dep = deployment_factory(
            sim.url_v3,
            **{
                "emarsys.auth": {
                    "type": "oauth2",
                    "client_id": "sim-client",
                    "client_secret": "${TEST_OAUTH_SECRET}",
                    "token_url": sim.token_url,
                },
            },
        )
        w = _port_zero_worker(dep, {"TEST_OAUTH_SECRET": OAUTH_SECRET})
        await _start_on_port_zero(w)
        sent: list[str] = []

        # Traffic for more than one token lifetime (5 s; refreshed at half of it).
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < 7.0:
            email = f"o{i}@example.com"
            await dep.produce([identify(email, mid=f"o{i}", uid=f"ou{i}", firstName=f"F{i}")])
            sent.append(email)
            i += 1
            await asyncio.sleep(0.5)
        for email in sent:
            await wait_for(lambda email=email: contact(sim, email), timeout=60)
        assert sim.state.counters["tokens_issued"] >= 2, sim.state.counters
        assert not [c for c in sim.state.calls if c.status == 401], "refreshed before expiry"

        # Long-lived tokens from now on, so the revoked token is one the worker still trusts.
        sim.state.options.token_lifetime = 3600.0
        await asyncio.sleep(3.0)  # past the refresh time of the current short-lived token
        await dep.produce([identify("long@example.com", mid="long", uid="long")])
        sent.append("long@example.com")
        await wait_for(lambda: contact(sim, "long@example.com"), timeout=60)

        # Revoked tokens: the next call gets 401, one new token, then success.
        assert sim.state.revoke_tokens() >= 1
        issued = sim.state.counters["tokens_issued"]
        seq = max(c.seq for c in sim.state.calls)
        await dep.produce([identify("after@example.com", mid="after", uid="after")])
        sent.append("after@example.com")
        await wait_for(lambda: contact(sim, "after@example.com"), timeout=60)
        later = [c for c in sim.state.calls if c.seq > seq]
        api = [c for c in later if "/api/v3/" in c.path]
        assert any(c.status == 401 for c in api), [(c.path, c.status) for c in later]
        assert api[-1].status == 200
        assert sim.state.counters["tokens_issued"] - issued == 1
        _, metrics = await _get(w.web_port, "/metrics")
        assert 'emarsys_stream_emarsys_retries_total{reason="401"} 1.0' in metrics
        for email in sent:  # nothing lost
            assert contact(sim, email), email

        topics = [dep.ingest_topic, dep.dlq_topic] + [
            dep.topic(n) for n in ("identity", "contact-events", "emarsys-operations",
                                   "emarsys-results", "emarsys-dlq")
        ]
        seen = 0
        for t in topics:
            for record in await dep.read_topic(t, expect=10**6, timeout=2, decode=False):
                seen += 1
                assert OAUTH_SECRET.encode() not in record, t
        assert seen >= len(sent)
        w.stop()
        log = w.log()
        records = _json_lines(log)
        assert any(r["msg"] == "emarsys OAuth token obtained" for r in records)
        assert OAUTH_SECRET not in log
    finally:
        await sim.stop()
