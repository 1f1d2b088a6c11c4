"""Events held per id until a primary key becomes known (pure; no Kafka, no Faust).

Stored as two maps so that holding one more event writes that event and a small index,
not the id's whole list again (a list rewritten per hold cost O(n^2) bytes for a visitor
who is never identified, and in the benchmark carried two thirds of every byte the
worker wrote to its tables):

* ``index``: id -> ``{"next": <next seq>, "held": [[seq, ts, held_at], ...]}`` in hold
  order (about 30 bytes per held event; enough to expire and bound without reading
  the events);
* ``items``: :func:`item_key` ``(id, seq)`` -> the held message (``held_at`` included).

The agent writes ``items`` before ``index``. An entry whose item is missing (a worker
stopped between the two writes of a release, whose events had already been sent) is
skipped; an item no entry names (stopped between the two writes of a hold) is
rewritten when the input is read again, under the same sequence number.

An index value that is a list is the earlier format (the messages themselves); it is
moved into ``items`` the first time the id is read.

:class:`HeldEvents` reads as a ``Mapping`` of id -> held messages in hold order, so
tests and tools can look at it like the plain dict of lists it replaced.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, NamedTuple

__all__ = ["HeldEntry", "HeldEvents", "item_key", "id_of_item_key"]

#: Between the id and the sequence number in an item key. The sequence number is
#: digits only, so splitting at the last separator gives back the id, whatever it holds.
_SEP = "\x00"


def item_key(ident: str, seq: int) -> str:
    return f"{ident}{_SEP}{seq}"


def id_of_item_key(key: str) -> str:
    return key.rpartition(_SEP)[0]


class HeldEntry(NamedTuple):
    seq: int
    ts: int
    held_at: int


class HeldEvents(Mapping[str, list[dict[str, Any]]]):
    def __init__(
        self, index: MutableMapping[str, Any], items: MutableMapping[str, Any]
    ) -> None:
        self.index = index
        self.items_by_key = items

    # -- reading ---------------------------------------------------------------------
    def entries(self, ident: str) -> list[HeldEntry]:
        """What is held for ``ident``, in hold order, without reading the events."""
        header = self._header(ident)
        if header is None:
            return []
        return [HeldEntry(int(s), int(t), int(h)) for s, t, h in header["held"]]

    def held_before(self, ident: str, cutoff_ms: int) -> set[int]:
        """Sequence numbers of ``ident``'s events held before ``cutoff_ms`` (read from
        the index alone: this runs for every event held)."""
        header = self._header(ident)
        if header is None:
            return set()
        return {int(e[0]) for e in header["held"] if int(e[2]) < cutoff_ms}

    def count(self, ident: str) -> int:
        header = self._header(ident)
        return 0 if header is None else len(header["held"])

    def __getitem__(self, ident: str) -> list[dict[str, Any]]:
        header = self._header(ident)
        if header is None:
            raise KeyError(ident)
        items = (self.items_by_key.get(item_key(ident, int(e[0]))) for e in header["held"])
        return [item for item in items if item is not None]

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    # -- writing ---------------------------------------------------------------------
    def add(self, ident: str, item: dict[str, Any], ts: int, held_at: int) -> None:
        header = self._header(ident) or {"next": 0, "held": []}
        seq = int(header["next"])
        self.items_by_key[item_key(ident, seq)] = item
        self.index[ident] = {
            "next": seq + 1,
            "held": [*header["held"], [seq, ts, held_at]],
        }

    def take(self, ident: str, seqs: set[int]) -> list[dict[str, Any]]:
        """Remove the events ``seqs`` of ``ident``; returns them in hold order."""
        header = self._header(ident)
        if header is None or not seqs:
            return []
        taken: list[dict[str, Any]] = []
        keep: list[list[int]] = []
        for entry in header["held"]:
            seq = int(entry[0])
            if seq in seqs:
                key = item_key(ident, seq)
                item = self.items_by_key.get(key)
                if item is not None:
                    taken.append(item)
                    del self.items_by_key[key]
            else:
                keep.append(entry)
        if keep:
            self.index[ident] = {"next": header["next"], "held": keep}
        else:
            del self.index[ident]
        return taken

    def take_all(self, ident: str) -> list[dict[str, Any]]:
        return self.take(ident, {e.seq for e in self.entries(ident)})

    def _header(self, ident: str) -> dict[str, Any] | None:
        raw = self.index.get(ident)
        if raw is None or isinstance(raw, dict):
            return raw
        # The earlier format: the list of held messages itself. Move them to `items`.
        header: dict[str, Any] = {"next": len(raw), "held": []}
        for seq, item in enumerate(raw):
            self.items_by_key[item_key(ident, seq)] = item
            ts = int(item["ts"])
            held_at = item.get("held_at")
            header["held"].append([seq, ts, held_at if isinstance(held_at, int) else ts])
        self.index[ident] = header
        return header
