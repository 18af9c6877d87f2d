"""How many operations of each sandbox are under way: one owner for the per-id counts
the worker keeps (starts, long-lived requests, ends)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class InFlight:
    """A multiset of ids: ``with inflight.holding(sid):`` counts one operation of
    ``sid`` for the block; an id is in it while any of its operations runs."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    @contextmanager
    def holding(self, key: str) -> Iterator[None]:
        self._counts[key] = self._counts.get(key, 0) + 1
        try:
            yield
        finally:
            left = self._counts.pop(key) - 1
            if left:
                self._counts[key] = left

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)

    def total(self) -> int:
        return sum(self._counts.values())

    def ids(self) -> set[str]:
        return set(self._counts)

    def __contains__(self, key: object) -> bool:
        return key in self._counts

    def __bool__(self) -> bool:
        return bool(self._counts)
