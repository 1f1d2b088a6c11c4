"""The rules agent's pending deadlines: primary key -> next deadline (pure).

The timer loop asks twice a second which deadlines the watermark has passed. A scan of
every pending contact (24,000 in the pipeline benchmark) each time cost more than the
timers it found; a heap finds the due ones in O(due * log n). An update pushes a new
heap entry and leaves the old one to be skipped when it surfaces (checked against the
current deadline), and the heap is rebuilt when such stale entries outnumber the live.
"""

from __future__ import annotations

import heapq

__all__ = ["DeadlineIndex"]


class DeadlineIndex:
    def __init__(self) -> None:
        self._by_key: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []

    def set(self, key: str, deadline: int | None) -> None:
        """``key``'s next deadline (event time, ms); None: it has none."""
        if deadline is None:
            self._by_key.pop(key, None)
            return
        if self._by_key.get(key) == deadline:
            return
        self._by_key[key] = deadline
        heapq.heappush(self._heap, (deadline, key))
        if len(self._heap) > 2 * len(self._by_key) + 1024:
            self._heap = [(d, k) for k, d in self._by_key.items()]
            heapq.heapify(self._heap)

    def get(self, key: str) -> int | None:
        return self._by_key.get(key)

    def pop_due(self, now: int) -> list[str]:
        """The keys whose deadline is at or before ``now``, earliest first; removed."""
        due: list[str] = []
        heap, by_key = self._heap, self._by_key
        while heap and heap[0][0] <= now:
            deadline, key = heapq.heappop(heap)
            if by_key.get(key) == deadline:
                del by_key[key]
                due.append(key)
        return due

    def __len__(self) -> int:
        return len(self._by_key)

    @property
    def heap_size(self) -> int:
        """Heap entries, stale ones included (bounded by about twice ``len``)."""
        return len(self._heap)
