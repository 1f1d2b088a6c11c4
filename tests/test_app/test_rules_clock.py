"""The rules event clock: per-source minimum, idleness only when the group is caught up."""

from __future__ import annotations

from app.rules.clock import EventClock


class FakeMonotonic:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def clock(lateness_ms: int = 1000, idle_s: float = 2.0) -> tuple[EventClock, FakeMonotonic]:
    mono = FakeMonotonic()
    return EventClock(lateness_ms, idle_s, monotonic=mono), mono


def test_nothing_seen_means_no_watermark() -> None:
    c, _ = clock()
    assert c.watermark() is None


def test_active_sources_give_the_lowest_minus_lateness() -> None:
    c, _ = clock()
    c.observe(50_000, "p0")
    c.observe(20_000, "p1")
    c.observe(40_000, "p1")  # per source, the highest time counts
    assert c.watermark() == 40_000 - 1000


def test_idle_and_caught_up_follows_wall_time_from_the_newest_event() -> None:
    c, mono = clock()
    c.observe(50_000, "p0")
    mono.t += 5.0  # idle for 5 s > idle_timeout
    assert c.watermark(caught_up=True) == 50_000 + 5000 - 1000


def test_silence_with_a_backlog_is_not_idleness_the_clock_holds() -> None:
    # A rebalance or restart: no events for longer than idle_timeout, but the group
    # still has records to read. Following wall time would make them late.
    c, mono = clock()
    c.observe(50_000, "p0")
    c.observe(30_000, "p1")
    mono.t += 8.0
    assert c.watermark(caught_up=False) == 30_000 - 1000
    mono.t += 40.0  # still within the pause limit (60 s here)
    assert c.watermark(caught_up=False) == 30_000 - 1000
    # The backlog arrives with its old timestamps: not late.
    c.observe(30_500, "p1")
    c.observe(50_100, "p0")
    assert c.watermark(caught_up=False) == 30_500 - 1000


def test_restored_time_follows_wall_time_only_once_caught_up() -> None:
    c, mono = clock()
    c.restore(70_000)
    assert c.watermark(caught_up=False) == 70_000 - 1000
    mono.t += 10.0
    assert c.watermark(caught_up=False) == 70_000 - 1000  # restarted with a backlog: hold
    assert c.watermark(caught_up=True) == 70_000 + 10_000 - 1000  # nothing to read: move


def test_never_goes_back() -> None:
    c, mono = clock()
    c.observe(50_000, "p0")
    mono.t += 5.0
    high = c.watermark(caught_up=True)
    assert high == 54_000
    c.observe(10_000, "p9")  # a slow new source appears
    assert c.watermark(caught_up=True) == high


def test_a_quiet_source_holds_the_clock_until_the_group_is_caught_up() -> None:
    # p1's events take a slower hop: it has been quiet for longer than idle_timeout while
    # p0 keeps delivering. Dropping p1 from the minimum would make its events late.
    c, mono = clock()
    c.observe(20_000, "p1")
    mono.t += 5.0
    c.observe(60_000, "p0")
    assert c.watermark(caught_up=False) == 20_000 - 1000
    assert c.watermark(caught_up=True) == 60_000 - 1000  # truly idle: p1 no longer counts


def test_a_pause_longer_than_the_limit_counts_as_idleness_after_all() -> None:
    # The group still reports records left (e.g. a commit that stalls), but nothing has
    # arrived for far longer than any rebalance: the clock moves on instead of never.
    c, mono = clock(idle_s=2.0)  # limit: max(10 x 2 s, 60 s) = 60 s
    c.observe(20_000, "p1")
    c.observe(50_000, "p0")
    mono.t += 59.0
    assert c.watermark(caught_up=False) == 20_000 - 1000
    mono.t += 1.0
    assert c.watermark(caught_up=False) == 50_000 + 60_000 - 1000


def test_an_input_partition_not_heard_yet_holds_the_clock_during_a_backlog() -> None:
    from app.rules.clock import HOLD_MS

    mono = FakeMonotonic()
    c = EventClock(1000, 2.0, monotonic=mono, wait_for_partitions=True)
    # Partition 0 read first (the ingest consumer may drain one partition's backlog
    # before another's): before the partitions are known, and while partition 1 is
    # unheard, nothing is due, so partition 1's older events are not late.
    c.observe(90_000, ("in", 0, "direct"))
    assert c.watermark(caught_up=False) == HOLD_MS
    c.expect({("in", 0), ("in", 1)})
    assert c.watermark(caught_up=False) == HOLD_MS
    c.observe(30_000, ("in", 1, "identity:user"))
    assert c.watermark(caught_up=False) == 30_000 - 1000
    # Once held with a watermark, a newly expected partition keeps it where it is.
    c.expect({("in", 0), ("in", 1), ("in", 2)})
    c.observe(60_000, ("in", 1, "identity:user"))
    assert c.watermark(caught_up=False) == 30_000 - 1000
    c.observe(70_000, ("in", 2, "direct"))
    assert c.watermark(caught_up=False) == 60_000 - 1000


def test_expected_partitions_do_not_hold_once_caught_up() -> None:
    mono = FakeMonotonic()
    c = EventClock(1000, 2.0, monotonic=mono, wait_for_partitions=True)
    c.expect({("in", 0), ("in", 1)})
    c.observe(90_000, ("in", 0, "direct"))
    # Nothing left to read: partition 1 has nothing on its way.
    assert c.watermark(caught_up=True) == 90_000 - 1000


def test_without_wait_for_partitions_nothing_is_expected() -> None:
    c, _ = clock()
    c.observe(90_000, ("in", 0, "direct"))
    assert c.watermark(caught_up=False) == 90_000 - 1000
