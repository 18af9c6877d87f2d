"""The line creates wait in when no worker has room: first come, first placed.

A create that finds no capacity joins the line of its *class* (``gpu:<model>`` for a
GPU request, ``cpu`` otherwise, plus its worker tags and whether it may run unisolated) and keeps its place until it is
placed or its deadline passes (then CapacityExhausted). Classes do not block each
other: CPU-only work never waits behind a GPU request.

GPU lines are *strict*: only the head tries to place; when it leaves, the next in line
tries at once, so freed GPUs are handed out in arrival order and a stream of small
requests cannot starve a large one (an ``H100:2`` waiting at the head is not
overtaken by later ``H100`` requests). A new GPU create whose line is not empty joins
its end instead of trying first.

CPU lines are *ordered but not strict*: every waiter retries on each capacity change,
woken in arrival order, and a new create still tries at once. CPU requests vary in
size far more than GPU counts, and one large request that fits only an empty node must
not hold every later small one until its deadline.

Arrival order is the order this scheduler took the requests from the stream
(:meth:`WaitLine.ticket` is drawn when handling starts, before the first attempt), so
a request that failed its first attempt a little later still keeps its place. With
several scheduler replicas the order holds per replica.

The head retries whenever :meth:`WaitLine.capacity_changed` is called (each registry
refresh, a worker lost, ...) instead of polling. When the scheduler stops,
:meth:`WaitLine.close` wakes every waiter and each hands its request back to the
stream (:class:`HandBack`), so a graceful stop neither drops nor strands a waiting
create.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import anyio

from hotbed.protocol import SandboxSpec


class HandBack(Exception):
    """Raised in a waiting create when the scheduler stops: the request goes back to the
    stream for another replica (or the restarted one) instead of waiting out a grace
    period and then the reclaim timeout."""


class Ticket:
    __slots__ = ("cls", "seq", "turn")

    def __init__(self, cls: str, seq: int) -> None:
        self.cls = cls
        self.seq = seq
        # Set when this ticket becomes the head of its line.
        self.turn = anyio.Event()

    def __lt__(self, other: Ticket) -> bool:
        return self.seq < other.seq


class WaitLine:
    def __init__(self) -> None:
        self._seq = itertools.count()
        self._lines: dict[str, list[Ticket]] = {}
        self._changed = anyio.Event()
        self.closed = False

    def close(self) -> None:
        """Stop: wake every waiter; each sees :attr:`closed` and hands its request back."""
        self.closed = True
        for line in self._lines.values():
            for t in line:
                t.turn.set()
        self.capacity_changed()

    def ticket(self, cls: str) -> Ticket:
        return Ticket(cls, next(self._seq))

    @staticmethod
    def strict(cls: str) -> bool:
        return cls.startswith("gpu:")

    def is_waiting(self, cls: str) -> bool:
        """True if a new create of ``cls`` must queue behind others instead of trying."""
        return self.strict(cls) and bool(self._lines.get(cls))

    def may_try(self, ticket: Ticket) -> bool:
        return not self.strict(ticket.cls) or self.is_head(ticket)

    def depth(self, cls: str | None = None) -> int:
        if cls is not None:
            return len(self._lines.get(cls, ()))
        return sum(len(line) for line in self._lines.values())

    def classes(self) -> dict[str, int]:
        return {cls: len(line) for cls, line in self._lines.items() if line}

    def capacity_changed(self) -> None:
        """Wake the heads of all lines: capacity may have been freed."""
        ev, self._changed = self._changed, anyio.Event()
        ev.set()

    def mark(self) -> anyio.Event:
        """Take before an attempt; :meth:`wait_turn` then sees changes made during it."""
        return self._changed

    def is_head(self, ticket: Ticket) -> bool:
        line = self._lines.get(ticket.cls)
        return line is not None and bool(line) and line[0] is ticket

    @contextmanager
    def joined(self, ticket: Ticket) -> Iterator[None]:
        line = self._lines.setdefault(ticket.cls, [])
        bisect.insort(line, ticket)
        if line[0] is ticket:
            if len(line) > 1:
                # An earlier arrival went ahead of the old head: demote it.
                line[1].turn = anyio.Event()
            ticket.turn.set()
        try:
            yield
        finally:
            was_head = bool(line) and line[0] is ticket
            try:
                line.remove(ticket)
            except ValueError:
                pass
            if was_head and line:
                line[0].turn.set()
            if not line and self._lines.get(ticket.cls) is line:
                del self._lines[ticket.cls]

    async def wait_turn(self, ticket: Ticket, mark: anyio.Event, *, within: float) -> None:
        """Return when ``ticket`` may try to place again (or after ``within`` seconds).

        A ticket not at the head waits to become head, and becoming head returns at
        once, so the next in line tries right after the one before it is placed. The
        head waits for a capacity change since ``mark``.
        """
        with anyio.move_on_after(max(within, 0)):
            if not self.may_try(ticket):
                await ticket.turn.wait()
                return
            await mark.wait()


def wait_class(spec: SandboxSpec) -> str:
    """The line a create waits in: its GPU model (or ``cpu``) and its worker tags."""
    gpu = spec.resources.gpu
    cls = "gpu:" + gpu.partition(":")[0].strip().lower() if gpu else "cpu"
    if spec.worker_tags:
        cls += "|" + ",".join(f"{k}={v}" for k, v in sorted(spec.worker_tags.items()))
    if spec.allow_unisolated:
        # It may go where the others may not: never made to wait behind them.
        cls += "|unisolated"
    return cls
