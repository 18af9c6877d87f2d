"""Cross-host "now": Redis's clock, as this process sees it.

Every time that one host writes and another compares (a request's deadline, a
sandbox's ``expires_at``, a record's timestamps) is in Redis ``TIME`` seconds, so a
host whose clock is off by minutes neither refuses valid requests nor keeps dead ones.
Reading Redis's clock on every use would cost a round trip, so a :class:`Clock` keeps
this host's offset to it, measured with one ``TIME`` call (the middle of the round trip
is taken as the moment Redis read its clock), and :meth:`Clock.now` is the local clock
plus that offset: no round trip per request.

Who measures: a client on its first request and again every ``RESYNC_S``
(:meth:`Clock.ensure`); the daemons (whose :data:`PROCESS` clock
``daemon.lifecycle.wall`` reads) from stamps they read anyway: a worker from what its
heartbeat returns (``HEARTBEAT`` answers Redis's time), the scheduler from the ``TIME``
of each registry refresh. On a Redis Cluster ``TIME`` may be answered by any node: its
nodes' clocks are taken to agree (NTP), as Redis's own replication assumes.

Waits and timeouts never use this: they are ``anyio.current_time()`` (monotonic).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# How often a client re-measures (clocks drift slowly; a client lives long).
RESYNC_S = 60.0
# A measurement whose round trip took longer says little (a stalled loop, a slow
# Redis): once there is a good one, such are ignored.
MAX_ROUND_TRIP_S = 0.5


class Clock:
    """This host's offset to Redis's clock. ``local``: the host clock (tests skew it)."""

    def __init__(self, local: Callable[[], float] | None = None) -> None:
        self._local = local
        # Redis's clock minus the local one, seconds.
        self.offset = 0.0
        # monotonic time of the last measurement taken; None: never measured.
        self.measured_at: float | None = None
        self.round_trip = float("inf")

    def local(self) -> float:
        # Looked up each time (not bound once), so a patched time.time is seen.
        return self._local() if self._local is not None else time.time()

    def now(self) -> float:
        """Redis's clock, in seconds since the epoch (the local clock until measured)."""
        return self.local() + self.offset

    def observe(self, redis_s: float, *, before: float, after: float) -> None:
        """Take a reading of Redis's clock, ``redis_s``, made by a call that started at
        local time ``before`` and returned at ``after``."""
        rtt = max(after - before, 0.0)
        if self.measured_at is not None and rtt > MAX_ROUND_TRIP_S:
            return
        self.offset = redis_s - (before + after) / 2
        self.round_trip = rtt
        self.measured_at = time.monotonic()

    def stale(self) -> bool:
        return self.measured_at is None or time.monotonic() - self.measured_at >= RESYNC_S

    async def sync(self, redis: Any) -> None:
        """Measure now: one ``TIME`` (any node of a cluster)."""
        before = self.local()
        got = await redis.time()
        after = self.local()
        if isinstance(got, dict):  # a cluster client that asked several nodes
            got = next(iter(got.values()))
        sec, usec = got
        self.observe(int(sec) + int(usec) / 1e6, before=before, after=after)

    async def ensure(self, redis: Any) -> None:
        """Measure if never measured or last measured ``RESYNC_S`` ago."""
        if self.stale():
            await self.sync(redis)


# The clock of this process's daemons (``daemon.lifecycle.wall``).
PROCESS = Clock()
