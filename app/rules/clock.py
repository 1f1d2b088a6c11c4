"""The rules worker's event-time clock (watermark).

Like Flink's per-source watermarks: the highest event time is tracked per source (the
rules agent uses ingest partition + path), and the clock is the lowest of those among
sources that delivered something within ``idle_timeout``. Partitions of an unkeyed
Segment topic advance at different speeds; taking the minimum keeps one fast partition
from making the others' events late.

A source quiet for ``idle_timeout`` stops holding the clock back, and when every source
is quiet the clock follows wall time from the newest event, so a trailing "did not
happen" step fires even if nobody sends anything (FLINK-15160) — but both only when the
consumer group has nothing left to read (``caught_up``). A source that is silent
because the group is rebalancing, a worker restarting, a backlog still waiting upstream
or a slower hop is paused, not idle: dropping it or following wall time would push the
watermark past events that are on their way and make them late. While not caught up
the clock is the lowest of all sources — for at most ``max(10 x idle_timeout, 60 s)``
of complete silence, after which silence wins (a stalled progress report must not keep
a trailing step from ever firing). While not caught up it also holds until every input
partition that has records (``expect``) delivered an event: the ingest consumer may read
one partition's backlog before another's, and the first partition must not make the
other's events late.

Pure apart from the injectable monotonic clock; never goes back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

__all__ = ["EventClock", "HOLD_MS", "RESTORED_SOURCE"]

#: Source under which event time restored from state after a restart is recorded.
RESTORED_SOURCE = ("restored",)
#: The watermark while the clock holds before it ever had one: nothing is due yet.
HOLD_MS = -(2**62)


class EventClock:
    def __init__(
        self,
        lateness_ms: int,
        idle_timeout_s: float,
        monotonic: Callable[[], float] = time.monotonic,
        *,
        wait_for_partitions: bool = False,
    ) -> None:
        self.lateness_ms = lateness_ms
        self.idle_timeout_s = idle_timeout_s
        self._now = monotonic
        self.max_ts: dict[Hashable, int] = {}
        self.last_arrival: dict[Hashable, float] = {}
        self._last_watermark: int | None = None
        #: Longest silence treated as a pause while the group reports records left.
        self.pause_limit_s = max(10 * idle_timeout_s, 60.0)
        #: (topic, partition) of every input partition that has records (see expect());
        #: None: not known yet, which holds the clock while not caught up
        #: (``wait_for_partitions``: the rules agent learns them from its backlog probe).
        self.expected: frozenset[Hashable] | None = None if wait_for_partitions else frozenset()

    def expect(self, partitions: set[tuple[str, int]] | frozenset[tuple[str, int]]) -> None:
        """Input partitions that have records and so will deliver events.

        While the group is not caught up, the clock holds until each of them delivered
        something: a partition not heard from yet (its backlog not reached, or read
        later than the others) must not be overtaken by the rest.
        """
        self.expected = frozenset(partitions)

    def _unheard(self) -> bool:
        if self.expected is None:
            return True
        heard = {src[:2] for src in self.max_ts if isinstance(src, tuple) and len(src) >= 2}
        return not self.expected <= heard

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
        quiet_for = now - max(self.last_arrival.values())
        if not caught_up and quiet_for >= self.pause_limit_s:
            # Everything silent far longer than any rebalance or restart: trust silence
            # over a progress report that may be stale (commits can stall for minutes).
            caught_up = True
        if not caught_up and self._unheard():
            # Hold: some input partition has not spoken yet. Before any watermark, one
            # below every event time: events wait in the engine's buffer (judging them
            # by their own time instead would make a contact's slower path late).
            return self._last_watermark if self._last_watermark is not None else HOLD_MS
        if caught_up:
            active = [
                ts for src, ts in self.max_ts.items()
                if now - self.last_arrival[src] < self.idle_timeout_s
            ]
        else:
            # A quiet source may just be behind (its partition's backlog, a slower
            # identity hop, a rebalance): it still holds the clock.
            active = list(self.max_ts.values())
        if active:
            base = min(active)
        else:
            newest = max(self.last_arrival.values())
            base = max(self.max_ts.values()) + int((now - newest) * 1000)
        wm = base - self.lateness_ms
        if self._last_watermark is not None and wm < self._last_watermark:
            return self._last_watermark
        self._last_watermark = wm
        return wm
