"""A worker restart recovers the users table from its changelog and loses nothing."""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Any

import pytest

from tests.fixtures import wait_for
from tests.test_e2e.test_pipeline import contact, identify, upsert_calls, user_record
from tests.test_e2e.test_replay import wait_for_metric


@pytest.mark.parametrize("local_state", ["wiped", "kept"])
async def test_restart_recovers_users_table_from_changelog(
    deployment_factory: Any, simulator: Any, local_state: str
) -> None:
    dep = deployment_factory(simulator.url)
    w = await dep.start_worker()
    await dep.produce([identify(f"p{i}@example.com", mid=f"a{i}", uid=f"u{i}", aid=f"anon{i}",
                                firstName=f"F{i}") for i in range(50)])
    await wait_for(lambda: len(simulator.state.contacts) >= 50)
    before = await user_record(dep, "p7@example.com")
    assert before is not None
    w.stop()
    if local_state == "wiped":
        # No local RocksDB state: everything must come back from the changelog topics.
        shutil.rmtree(dep.tmp / "worker0", ignore_errors=True)
    calls_before = len(upsert_calls(simulator))
    # Events produced while the worker is down wait in Kafka.
    await dep.produce([
        identify("p7@example.com", mid="b7", uid="u7", firstName="F7"),          # unchanged
        identify("p8@example.com", mid="b8", uid="u8", firstName="Changed"),     # changed
        {"type": "track", "event": "Viewed", "anonymousId": "anon9", "messageId": "t9"},
        identify("new@example.com", mid="b-new", uid="u-new"),
    ])
    await dep.start_worker()
    await wait_for(lambda: contact(simulator, "new@example.com"))
    await wait_for(lambda: contact(simulator, "p8@example.com")["1"] == "Changed")
    after = await user_record(dep, "p7@example.com")
    assert after is not None
    assert after["anonymous_ids"] == before["anonymous_ids"] == ["anon7"]
    assert after["event_count"] == 2 and after["fields_sent"] == {"1": "F7"}
    rec9 = await user_record(dep, "p9@example.com")
    assert rec9 is not None and rec9["counts_by_type"].get("track") == 1  # via recovered lookup
    sent_after = [c["3"] for call in upsert_calls(simulator)[calls_before:]
                  for c in call.body["contacts"]]
    assert "p7@example.com" not in sent_after  # unchanged: the recovered table knew
    assert sorted(set(sent_after)) == ["new@example.com", "p8@example.com"]


async def test_held_events_come_back_from_the_changelog_and_are_released(
    deployment_factory: Any, simulator: Any
) -> None:
    """Events held for an unknown id (``held_events`` index + ``held_event_items``) survive
    a restart without local state and are released by a later identify."""
    dep = deployment_factory(simulator.url)
    w = await dep.start_worker()
    await dep.produce([{"type": "track", "event": "Viewed", "anonymousId": "anon-h",
                        "messageId": f"h{i}"} for i in range(3)])
    await wait_for_metric(w, "emarsys_stream_unidentified_held_total", 3)
    w.stop()
    shutil.rmtree(dep.tmp / "worker0", ignore_errors=True)
    w2 = await dep.start_worker()
    await dep.produce([identify("held@example.com", mid="i-h", uid="u-h", aid="anon-h")])
    await wait_for(lambda: contact(simulator, "held@example.com"))
    await wait_for_metric(w2, "emarsys_stream_unidentified_released_total", 3)
    # The three held tracks reached the contact's record, once each.
    deadline = time.monotonic() + 60
    rec = await user_record(dep, "held@example.com")
    while time.monotonic() < deadline and not (rec and rec["counts_by_type"].get("track", 0) >= 3):
        await asyncio.sleep(0.5)
        rec = await user_record(dep, "held@example.com")
    assert rec is not None
    assert rec["anonymous_ids"] == ["anon-h"]
    assert rec["counts_by_type"] == {"identify": 1, "track": 3}
