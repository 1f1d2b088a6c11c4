"""Client-side rate limiting for the Emarsys API (1000 requests per minute per API user).

Algorithm: a **sliding-window log**. The start times of the last ``N`` admitted calls are kept
(a deque of at most ``N`` floats); a call may start at time ``t`` only when fewer than ``N``
calls started in ``(t - window, t]``, i.e. when the oldest of the last ``N`` starts is at least
``window`` seconds old. So no ``window``-long interval (60 s by default) ever contains more than
``N`` starts -- a stronger guarantee than a token bucket, which can admit up to ``2N`` calls
across a window boundary.

Waiting is done with one ``sleep`` for exactly the time needed (no polling); waiters are served
in FIFO order through an ``asyncio.Lock``. :meth:`RateLimiter.pause_until` (the server answered
429 with ``X-RateLimit-Reset``) makes every caller wait until that unix time.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable

__all__ = ["RateLimiter"]


class RateLimiter:
    """At most ``requests_per_minute`` call starts in any ``window`` seconds (default 60).

    ``clock`` is monotonic seconds; ``wall_clock`` is unix seconds (only used to convert the
    server's reset time); ``sleep`` is injectable so tests can run on a fake clock.
    """

    def __init__(
        self,
        requests_per_minute: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        window: float = 60.0,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if requests_per_minute < 1:
            raise ValueError("requests_per_minute must be >= 1")
        if window <= 0:
            raise ValueError("window must be > 0")
        self.limit = int(requests_per_minute)
        self.window = float(window)
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._starts: deque[float] = deque(maxlen=self.limit)
        self._paused_until = float("-inf")  # on the monotonic clock
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"RateLimiter(requests_per_minute={self.limit}, window={self.window})"

    def delay(self) -> float:
        """Seconds until the next call could start (0 when it could start now)."""
        now = self._clock()
        wait = self._paused_until - now
        if len(self._starts) >= self.limit:
            wait = max(wait, self._starts[0] + self.window - now)
        return max(wait, 0.0)

    async def acquire(self) -> None:
        """Wait until a call may start, and count it as started."""
        async with self._lock:
            while True:
                wait = self.delay()
                if wait <= 0:
                    break
                # Re-checked after waking: a pause_until() may have arrived meanwhile.
                await self._sleep(wait)
            self._starts.append(self._clock())

    def pause_until(self, unix_ts: float) -> None:
        """No call starts before ``unix_ts`` (unix seconds). Only ever extends a pause."""
        resume = self._clock() + (float(unix_ts) - self._wall_clock())
        if resume > self._paused_until:
            self._paused_until = resume

    @property
    def paused(self) -> bool:
        return self._paused_until > self._clock()
