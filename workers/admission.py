"""Admission at the node: how many starts run at once, and how much memory is left.

Starts (a boot, a restore, a template build, a resume) are what a node does slowly
and what load slows down most: under gVisor each costs a few hundred milliseconds of
CPU, and past the parallelism the cores carry, every start in flight gets slower
together until all of them miss their deadline. :class:`StartGate` lets at most
``slots`` run at once; the rest wait in arrival order, each until its request's
deadline. A start that cannot begin in time is refused at once with ``Overloaded``
(typed, while its client still waits) instead of joining a line it would leave only
by timing out. Pool refills wait behind client requests, and leave one slot free
(they hold at most ``slots - 1``), so a client start never waits for a refill (a
pool's sandboxes also run at a low CPU weight until claimed:
``workers.runtimes.docker.lifecycle``). Waiting starts hold no
intake slot (the agent gives it back first), so exec, terminate and claim notices
never queue behind them.

Memory is admitted against what the sandboxes actually use. The scheduler reserves
each sandbox's *requested* memory against the node's advertised capacity (its
memory times ``memory_overcommit``); :class:`MemoryWatch` keeps that honest by
watching the node itself, each heartbeat, through :class:`NodeMemory` (the one reader
of the node's memory, which the auto-pauser acts on too): ``MemAvailable`` less a
headroom, the sandboxes' cgroup (what they use per MiB they requested) and the
kernel's memory pressure stall (PSI). It withholds from the advertised free memory whatever real
memory could not back (the ``WITHHOLD`` script), so placement stops before the node
runs short, and gives it back as memory frees up.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import redis.asyncio as aioredis

from daemon import lifecycle
from hotbed import lua
from hotbed.errors import Overloaded

log = logging.getLogger(__name__)

# What a start is assumed to take before any has been measured on this node.
FIRST_START_S = 1.0
# Weight of the newest start in the running estimate of start time.
EWMA_ALPHA = 0.2
# Time kept between the predicted end of a start and its deadline: the reply's trip.
REPLY_MARGIN_S = 0.5
# How often a waiting start checks whether it can still make its deadline.
RECHECK_S = 1.0


class GateStats(msgspec.Struct, frozen=True, kw_only=True):
    slots: int
    running: int
    waiting: int
    start_s: float
    admitted: int
    refused: int
    background: int = 0


class _Waiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False


class StartGate:
    """At most ``slots`` starts at once; the rest wait in order, until their deadline.

    Two lines: client requests, then background work (pool refills), which runs only
    when no client start waits, at most ``background_slots`` at once (default: all but
    one slot, at least one). ``queue_limit`` bounds what waits (Overloaded past it).
    """

    def __init__(
        self, slots: int, *, queue_limit: int = 4096, worker_id: str | None = None,
        background_slots: int | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError("a start gate needs at least one slot")
        self.slots = slots
        self.background_slots = max(1, min(slots, background_slots or slots - 1))
        self.background_running = 0
        self.queue_limit = queue_limit
        self.worker_id = worker_id
        self.running = 0
        self._lines: tuple[deque[_Waiter], deque[_Waiter]] = (deque(), deque())
        self.start_s = FIRST_START_S
        self.admitted = 0
        self.refused = 0

    @property
    def waiting(self) -> int:
        return len(self._lines[0]) + len(self._lines[1])

    def statistics(self) -> GateStats:
        return GateStats(
            slots=self.slots, running=self.running, waiting=self.waiting,
            start_s=round(self.start_s, 4), admitted=self.admitted, refused=self.refused,
            background=self.background_running,
        )

    def predicted_wait(self, *, background: bool = False, ahead: int | None = None) -> float:
        """Seconds until a start would get a slot, by the running estimate: one arriving
        now, or (``ahead``) one with that many starts before it in line."""
        if ahead is None:
            ahead = len(self._lines[0]) + (len(self._lines[1]) if background else 0)
        if self.running + ahead < self.slots:
            return 0.0
        # Each round of `slots` starts ahead of us takes one start time.
        rounds = (self.running + ahead - self.slots) // self.slots + 1
        return rounds * self.start_s

    def _ahead_of(self, line: deque[_Waiter], waiter: _Waiter) -> int:
        ahead = line.index(waiter)
        if line is self._lines[1]:
            ahead += len(self._lines[0])
        return ahead

    def _refuse(self, why: str, sandbox_id: str | None) -> Overloaded:
        self.refused += 1
        return Overloaded(
            f"this node is busy starting sandboxes ({self.running} running, {self.waiting} "
            f"waiting, ~{self.start_s:.2f}s each): {why}; retry later or on another node",
            sandbox_id=sandbox_id, worker_id=self.worker_id,
            detail={"running": self.running, "waiting": self.waiting, "start_s": round(self.start_s, 3)},
        )

    @asynccontextmanager
    async def admitted_start(
        self, *, deadline: float, sandbox_id: str | None = None, background: bool = False,
    ) -> AsyncIterator[None]:
        """Hold a start slot for the body. ``deadline``: the request's, wall clock (0:
        none). Raises Overloaded at once when the start could not begin and end before
        it, or later when the wait for a slot ran out."""
        left = (deadline - lifecycle.wall()) if deadline else math.inf
        if self.waiting >= self.queue_limit:
            raise self._refuse(f"{self.queue_limit} starts wait already", sandbox_id)
        if self.predicted_wait(background=background) + self.start_s + REPLY_MARGIN_S > left:
            raise self._refuse("this start could not finish before its request's deadline", sandbox_id)
        if self.running < self.slots and not self._lines[0] and not (background and (
            self._lines[1] or self.background_running >= self.background_slots
        )):
            self.running += 1
            self.background_running += background
        else:
            waiter = _Waiter()
            line = self._lines[1 if background else 0]
            line.append(waiter)
            # Wait while a start could still finish in time after we get the slot,
            # looking again each second: when starts turn out slower than estimated,
            # the back of the line is told at once rather than at its deadline.
            give_up = anyio.current_time() + left - REPLY_MARGIN_S
            try:
                while not waiter.granted:
                    left_now = give_up - anyio.current_time()
                    if left_now <= self.start_s or (
                        self.predicted_wait(ahead=self._ahead_of(line, waiter)) + self.start_s > left_now
                    ):
                        break
                    with anyio.move_on_after(min(left_now - self.start_s, RECHECK_S)):
                        await waiter.event.wait()
            except BaseException:
                self._leave(line, waiter, background)
                raise
            if not waiter.granted:
                self._leave(line, waiter, background)
                raise self._refuse("no start slot could come free in time for its deadline", sandbox_id)
        self.admitted += 1
        began = anyio.current_time()
        try:
            yield
        finally:
            took = anyio.current_time() - began
            self.start_s += EWMA_ALPHA * (took - self.start_s)
            self._release(background)

    def _leave(self, line: deque[_Waiter], waiter: _Waiter, background: bool) -> None:
        if waiter.granted:
            # Granted while we were being cancelled: pass the slot on.
            self._release(background)
            return
        try:
            line.remove(waiter)
        except ValueError:
            pass

    def _release(self, background: bool) -> None:
        self.background_running -= background
        clients, refills = self._lines
        if refills and not clients and self.background_running >= self.background_slots:
            refills = deque()  # refills hold their share already: this slot stays free
        for line in (clients, refills):
            if line:
                waiter = line.popleft()
                waiter.granted = True
                waiter.event.set()
                self.background_running += line is self._lines[1]
                return  # the slot passes on; running stays
        self.running -= 1


# ------------------------------------------------------------------ memory


class MemoryReading(msgspec.Struct, frozen=True, kw_only=True):
    available_mb: int
    sandboxes_mb: int | None  # the sandboxes' cgroup, less reclaimable page cache
    psi_some_avg10: float | None


def _meminfo_available_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) >> 10
    return 0


def _psi_some_avg10() -> float | None:
    try:
        first = Path("/proc/pressure/memory").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    for part in first.split():
        if part.startswith("avg10="):
            return float(part[6:])
    return None


def cgroup_memory_mb(parent: str) -> int | None:
    """What the sandboxes under the cgroup ``parent`` use, less inactive page cache (the
    kernel takes that back first), in MiB; None where the cgroup cannot be read."""
    name = parent.strip("/")
    if not name:
        return None
    v2 = Path("/sys/fs/cgroup") / name
    try:
        if (v2 / "memory.current").exists():
            used = int((v2 / "memory.current").read_text())
            stat = (v2 / "memory.stat").read_text()
            inactive = _stat_field(stat, "inactive_file")
        else:
            v1 = Path("/sys/fs/cgroup/memory") / name
            used = int((v1 / "memory.usage_in_bytes").read_text())
            inactive = _stat_field((v1 / "memory.stat").read_text(), "total_inactive_file")
    except (OSError, ValueError):
        return None
    return max(0, used - inactive) >> 20


def _stat_field(stat: str, field: str) -> int:
    for line in stat.splitlines():
        name, _, value = line.partition(" ")
        if name == field:
            return int(value)
    return 0


def read_memory(cgroup_parent: str) -> MemoryReading:
    """One look at the node's memory. Blocking (procfs and cgroupfs reads, in memory):
    run it in a thread."""
    return MemoryReading(
        available_mb=_meminfo_available_mb(),
        sandboxes_mb=cgroup_memory_mb(cgroup_parent),
        psi_some_avg10=_psi_some_avg10(),
    )


class NodeMemory:
    """The one reader of this node's memory, and the one judge of memory pressure.

    Admission (:class:`MemoryWatch`) and the auto-pauser
    (:class:`workers.autopause.AutoPauser`) both act on its readings and verdicts, so
    the two never disagree about the node. Its settings are read at each verdict (a
    test, or an operator's reload, may change them):

    ``headroom_mb``: real memory admission always leaves free (the control plane, page
    cache, a burst); placement stops short of it. ``pressure_mb``: below this much
    ``MemAvailable`` the node is *under pressure*: idle sandboxes are paused, longest
    idle first (0: off). ``psi_limit``: a memory stall (PSI ``some avg10``, percent)
    above which the node is under pressure too: nothing new is admitted and idle
    sandboxes are paused (0: PSI ignored).
    """

    def __init__(
        self, *, cgroup_parent: str = "", headroom_mb: int = 0, pressure_mb: int = 0,
        psi_limit: float = 0.0, read: Callable[[str], MemoryReading] = read_memory,
    ) -> None:
        self.cgroup_parent = cgroup_parent
        self.headroom_mb = headroom_mb
        self.pressure_mb = pressure_mb
        self.psi_limit = psi_limit
        self._read = read
        self.last: MemoryReading | None = None

    async def sample(self) -> MemoryReading:
        """Read the node now (in a thread); kept as :attr:`last`."""
        self.last = await anyio.to_thread.run_sync(self._read, self.cgroup_parent)
        return self.last

    def stalled(self, reading: MemoryReading) -> bool:
        """Tasks stall on memory past the PSI limit."""
        psi = reading.psi_some_avg10
        return bool(self.psi_limit) and psi is not None and psi > self.psi_limit

    def room_mb(self, reading: MemoryReading) -> int:
        """Real memory new sandboxes may still take: none while the node stalls."""
        if self.stalled(reading):
            return 0
        return max(0, reading.available_mb - self.headroom_mb)

    def short(self, reading: MemoryReading) -> bool:
        """``MemAvailable`` is under the pressure line."""
        return bool(self.pressure_mb) and reading.available_mb < self.pressure_mb

    def pressure(self, reading: MemoryReading) -> str:
        """Why the node is under memory pressure ("" when it is not)."""
        if self.short(reading):
            return f"MemAvailable {reading.available_mb} MiB under {self.pressure_mb} MiB"
        if self.stalled(reading):
            return f"memory PSI some avg10 {reading.psi_some_avg10} over {self.psi_limit}"
        return ""


class MemoryWatch:
    """Keeps a worker's advertised free memory within what the node really has.

    ``node``: the reader whose room it admits against. ``overcommit``: requested MiB
    per real MiB assumed for new sandboxes before any runs here to measure it.
    """

    def __init__(
        self, redis: aioredis.Redis, cap_key: str, node: NodeMemory, *, overcommit: float, worker_id: str,
    ) -> None:
        self.redis = redis
        self.cap_key = cap_key
        self.node = node
        self.overcommit = overcommit
        self.worker_id = worker_id
        self.last: MemoryReading | None = None
        self.withheld_mb = 0
        self.under_pressure = False

    def fitting_mb(self, reading: MemoryReading, reserved_mb: int) -> int:
        """Requested MiB that the node's real free memory can still back."""
        room = self.node.room_mb(reading)
        if room <= 0:
            return 0
        # Requested MiB per MiB really used, as measured here; the configured
        # overcommit until enough runs to say (an empty node measures nothing).
        ratio = self.overcommit
        if reading.sandboxes_mb and reserved_mb >= 1024 and reading.sandboxes_mb >= 64:
            ratio = min(self.overcommit, reserved_mb / reading.sandboxes_mb)
        return int(room * max(ratio, 1.0))

    async def check(self, total_mb: int) -> None:
        """One tick: read the node, then withhold what real memory cannot back.
        ``total_mb``: the memory this worker advertises in all."""
        reading = await self.node.sample()
        self.last = reading
        cap = await self.redis.hmget(self.cap_key, ["mem", "withheld"])
        free = int(cap[0] or 0) + int(cap[1] or 0)
        fitting = self.fitting_mb(reading, max(0, total_mb - free))
        withheld = int(await lua.WITHHOLD.run(self.redis, [self.cap_key], [fitting]) or 0)
        pressure = withheld > 0
        if pressure != self.under_pressure:
            self.under_pressure = pressure
            if pressure:
                log.info(
                    "memory: %d MiB available (headroom %d MiB, PSI some avg10 %s): "
                    "withholding %d MiB of advertised capacity that real memory cannot back",
                    reading.available_mb, self.node.headroom_mb, reading.psi_some_avg10, withheld,
                    extra={"worker_id": self.worker_id},
                )
            else:
                log.info("memory: all advertised capacity backed again", extra={"worker_id": self.worker_id})
        self.withheld_mb = withheld
