"""The rules agent's restart helper: event time restored from stored rule state."""

from __future__ import annotations

from agents.rules import restored_event_time


def test_restored_time_is_the_clock_or_a_newer_buffered_event() -> None:
    assert restored_event_time(None) is None
    assert restored_event_time({"last_ts": None, "buffer": []}) is None
    assert restored_event_time({"last_ts": 5_000, "buffer": []}) == 5_000
    # Events still buffered (the clock held while they arrived) count too: without them
    # a worker restarted after a kill had no event time at all and never fired a timer.
    state = {"last_ts": None, "buffer": [[7_000, "m1", {}], [9_000, "m2", {}]]}
    assert restored_event_time(state) == 9_000
    assert restored_event_time({"last_ts": 12_000, "buffer": [[9_000, "m2", {}]]}) == 12_000
    assert restored_event_time({"buffer": [["x"], [], 3]}) is None
