"""When the worker looks for sandboxes whose container died: one owner for the schedule.

Two ways to find a death:
* a full look, listing every container of the node: it also finds containers nobody
  holds. Its cost to dockerd grows with the containers listed (at 450 idle sandboxes,
  a listing every 5 s tripled exec p99 on a 2-core node: `bench node --phase density`),
  so its interval grows with the sandboxes running;
* a look at one sandbox, at once, when its guest channel ends without the worker
  having closed it: a container that dies takes its attach (or pipes) with it. One
  inspect, whatever the node holds.
"""

from __future__ import annotations

import anyio

# Containers a full look may list per second of its interval: 50 sandboxes keep the
# configured interval (5 s by default), 450 look every 45 s.
LISTED_PER_S = 10.0


def full_check_interval(reconcile_s: float, running: int) -> float:
    """Seconds between full looks at a node running ``running`` sandboxes."""
    return max(reconcile_s, running / LISTED_PER_S)


class HealthSchedule:
    """The sandboxes suspected dead since the last look, and when the next full look is
    due. :meth:`wait` returns what to look at next."""

    def __init__(self) -> None:
        self._suspects: set[str] = set()
        self._woken = anyio.Event()
        self._full_at = 0.0

    def suspect(self, sandbox_id: str) -> None:
        """A sandbox's channel ended unasked: look at it before the next full look."""
        self._suspects.add(sandbox_id)
        self._woken.set()

    def full_done(self, interval: float) -> None:
        """A full look finished: the next one is ``interval`` seconds from now."""
        self._full_at = anyio.current_time() + interval

    async def wait(self) -> set[str] | None:
        """Wait for the next look: None for a full one (it covers every suspect), else
        the suspects to look at one by one."""
        if not self._suspects:
            with anyio.move_on_after(max(0.0, self._full_at - anyio.current_time())):
                await self._woken.wait()
        self._woken = anyio.Event()
        suspects, self._suspects = self._suspects, set()
        if anyio.current_time() >= self._full_at:
            return None
        return suspects
