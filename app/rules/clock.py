"""The rules worker's event-time clock (watermark).

Like Flink's per-source watermarks: the highest event time is tracked per source (the
rules agent uses ingest partition + path), and the clock is the lowest of those among
sources that delivered something within ``idle_timeout``. Partitions of an unkeyed
Segment topic advance at different speeds; taking the minimum keeps one fast partition
from making the others' events late.

When every source is idle the clock may follow wall time from the newest event, so a
trailing "did not happen" step fires even if nobody sends anything (FLINK-15160) — but
only when the consumer group has nothing left to read (``caught_up``). A source that
is silent because the group is rebalancing, a worker restarting, or a backlog still
waiting upstream is paused, not idle: following wall time then would push the
watermark past events that are on their way and make them late. While not caught up
the clock holds at the lowest source.

Pure apart from the injectable monotonic clock; never goes back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

__all__ = ["EventClock", "RESTORED_SOURCE"]

#: Source under which event time restored from state after a restart is recorded.
RESTORED_SOURCE = ("restored",)


class EventClock:
    def __init__(
        self,
        lateness_ms: int,
        idle_timeout_s: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lateness_ms = lateness_ms
        self.idle_timeout_s = idle_timeout_s
        self._now = monotonic
        self.max_ts: dict[Hashable, int] = {}
        self.last_arrival: dict[Hashable, float] = {}
        self._last_watermark: int | None = None

    def observe(self, ts_ms: int, source: Hashable = None) -> None:
        if ts_ms > self.max_ts.get(source, -(2**62)):
            self.max_ts[source] = ts_ms
        self.last_arrival[source] = self._now()

    def restore(self, ts_ms: int) -> None:
        """Event time known from state after a (re)start, before any event arrives."""
        self.observe(ts_ms, RESTORED_SOURCE)

    def watermark(self, *, caught_up: bool = True) -> int | None:
        """Event time up to which nothing earlier is expected (None: nothing seen yet).

        ``caught_up``: the consumer group has read everything there is to read (no
        backlog on the topics feeding the rules); only then may idleness mean "no more
        events" and the clock follow wall time.
        """
        if not self.max_ts:
            return None
        now = self._now()
        active = [
            ts for src, ts in self.max_ts.items()
            if now - self.last_arrival[src] < self.idle_timeout_s
        ]
        if active:
            base = min(active)
        elif not caught_up:
            base = min(self.max_ts.values())  # paused, not idle: hold
        else:
            newest = max(self.last_arrival.values())
            base = max(self.max_ts.values()) + int((now - newest) * 1000)
        wm = base - self.lateness_ms
        if self._last_watermark is not None and wm < self._last_watermark:
            return self._last_watermark
        self._last_watermark = wm
        return wm
