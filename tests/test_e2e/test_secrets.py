"""Secrets never reach logs or topics."""

from __future__ import annotations

from typing import Any

from app.simulator import SimulatorOptions, start_simulator
from tests.fixtures import wait_for
from tests.test_e2e.test_pipeline import contact, identify

SECRET = "Zq9-very-secret-wsse-value-41"


async def test_secret_absent_from_worker_logs_and_every_topic(deployment_factory: Any) -> None:
    sim = await start_simulator(
        options=SimulatorOptions(users={"sim-user": SECRET}, rate_limit_per_minute=0,
                                 burst_429=1)
    )
    try:
        dep = deployment_factory(sim.url, **{"emarsys.max_retry_backoff": 0.5})
        w = dep.worker(0)
        w.env["TEST_EMARSYS_SECRET"] = SECRET
        await dep.start_worker()
        await dep.produce([identify("s@example.com", mid="1", uid="u"), b"not json"])
        await wait_for(lambda: contact(sim, "s@example.com"))
        topics = [dep.ingest_topic, dep.dlq_topic] + [
            dep.topic(n) for n in ("identity", "contact-events", "emarsys-operations",
                                   "emarsys-results", "emarsys-dlq")
        ]
        seen = 0
        for t in topics:
            for record in await dep.read_topic(t, expect=10**6, timeout=2, decode=False):
                seen += 1
                assert SECRET.encode() not in record, t
        assert seen >= 5
        w.stop()
        log = w.log()
        assert "sim-user" in log or "Ready" in log  # the log is real and has content
        assert SECRET not in log
    finally:
        await sim.stop()
