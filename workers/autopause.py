"""Auto-pause: more sessions on a node than its memory holds.

A sandbox idle for its ``auto_pause_after`` seconds (the create's, else the node's
default) is checkpointed to disk (:meth:`SnapshotManager.pause
<workers.snapshots.SnapshotManager.pause>` with ``by="auto"``): its CPU and memory
reservation is given back to the scheduler, and its record reads ``paused (auto)``.
The next request for it, from any client, resumes it first
(:meth:`SandboxTable.touch <workers.sandboxes.SandboxTable.touch>` calls
:meth:`AutoPauser.wake`), then runs.

One *flight* (a pause or a resume) per sandbox at a time: requests that arrive while
one is in the air wait for it, each within its own deadline, and never start a second
resume. Flights belong to this service's task group, not to the request that asked
(a request that gives up does not cut a restore in half).

Under memory pressure, as the node's one memory reader judges it
(:meth:`NodeMemory.pressure <workers.admission.NodeMemory.pressure>`: ``MemAvailable``
under ``memory_pressure_mb``, or memory PSI over ``memory_psi_limit``), the longest-idle
sandboxes are paused one after another until the pressure is gone, instead of leaving
the choice to the kernel's OOM killer. A resume that finds no room on the node pauses
the longest-idle sandboxes that have an idle timer of their own first.

Never paused: a sandbox waiting in a warm pool, one serving a request (``in_use``),
one whose create said ``auto_pause_after=0``. Lifetime and idle timeout keep counting
while a sandbox is paused (the agent's expiry loop ends it, and its checkpoint with it).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc

from daemon import lifecycle
from hotbed.errors import CapacityExhausted, HotbedError, RequestTimeout, RuntimeFailure
from workers.admission import NodeMemory
from workers.sandboxes import Local, SandboxTable
from workers.snapshots import SnapshotManager

log = logging.getLogger(__name__)

# Checkpoints written at once: each is CPU- and disk-bound for a fraction of a second.
PARALLEL_PAUSES = 2
# Restores at once: more only share the same cores, and each waiter's deadline runs.
PARALLEL_RESUMES = 4
# Sandboxes paused to make room for one resume, at most.
MAX_EVICTIONS = 8
# Pressure pauses per check, at most (the probe is read again after each).
MAX_PRESSURE_PAUSES = 16
# After a pause that failed, the sandbox is left alone this long.
FAILED_PAUSE_BACKOFF_S = 60.0


class Flight:
    """One pause or resume of one sandbox; whoever needs it waits on :attr:`done`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.done = anyio.Event()
        self.error: HotbedError | None = None


class AutoPauser:
    """Pauses idle sandboxes and resumes them on their next request."""

    def __init__(
        self,
        table: SandboxTable,
        snapshots: SnapshotManager,
        *,
        check_s: float = 1.0,
        memory: NodeMemory | None = None,
    ) -> None:
        self.table = table
        self.snapshots = snapshots
        self.check_s = check_s
        # The node's memory reader (None: nothing to watch, a simulated node).
        self.memory = memory
        self._flights: dict[str, Flight] = {}
        self._slots = anyio.Semaphore(PARALLEL_PAUSES)
        self._resume_slots = anyio.Semaphore(PARALLEL_RESUMES)
        self._tg: anyio.abc.TaskGroup | None = None
        # Sandbox id -> wall time before which a failed pause is not retried.
        self._failed: dict[str, float] = {}
        # Counters for statistics(): auto pauses (idle, pressure, room), resumes.
        self._counts = {"idle": 0, "pressure": 0, "room": 0, "resumed": 0}

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                task_status.started()
                await lifecycle.supervised_loop("auto-pause", self.check, interval=lambda: self.check_s, log=log)
            finally:
                self._tg = None

    def statistics(self) -> dict[str, int]:
        """Pauses by cause (``idle``, ``pressure``, ``room``), ``resumed``, and the
        sandboxes auto-paused now (``paused``)."""
        paused = sum(1 for s in self.table.values() if s.paused and s.paused_by == "auto")
        return {**self._counts, "paused": paused}

    # ------------------------------------------------------------------ flights

    def _candidate(self, local: Local, now: float) -> bool:
        return (
            local.pausable and not local.paused and not local.busy and not local.pool
            and not local.in_use and local.id not in self._flights
            and self._failed.get(local.id, 0.0) <= now
        )

    async def _fly(self, sid: str, kind: str, work: Callable[[], Awaitable[object]]) -> Flight:
        """Run ``work`` as ``sid``'s flight (registered by the caller, synchronously)."""
        flight = self._flights[sid]
        try:
            await work()
        except Exception as exc:
            if isinstance(exc, HotbedError):
                flight.error = exc
            else:
                log.exception("auto %s failed", kind, extra={"sandbox_id": sid})
                flight.error = RuntimeFailure(f"{kind} failed: {type(exc).__name__}: {exc}", sandbox_id=sid)
        finally:
            flight.done.set()
            if self._flights.get(sid) is flight:
                del self._flights[sid]
        return flight

    def _begin(self, sid: str, kind: str) -> Flight:
        flight = Flight(kind)
        self._flights[sid] = flight
        return flight

    async def _pause(self, local: Local, cause: str) -> bool:
        """Pause ``local`` (already chosen: a candidate, and no await since); True if
        it is paused now."""
        sid = local.id
        self._begin(sid, "pause")
        flight = await self._fly(sid, "pause", lambda: self.snapshots.pause(sid, by="auto"))
        if flight.error is not None:
            self._failed[sid] = lifecycle.wall() + FAILED_PAUSE_BACKOFF_S
            if self.table.get(sid) is local:
                log.warning("auto-pause failed: %s", flight.error.message, extra={"sandbox_id": sid})
            return False
        self._failed.pop(sid, None)
        self._counts[cause] += 1
        log.info("auto-paused (%s) after %.0fs idle", cause, lifecycle.wall() - local.last_active,
                 extra={"sandbox_id": sid})
        return True

    async def wake(self, local: Local, *, deadline: float) -> None:
        """Wait for ``local``'s flight, starting its resume if none is in the air and
        it is auto-paused; by ``deadline`` (wall clock, 0: none)."""
        sid = local.id
        flight = self._flights.get(sid)
        if flight is None:
            if not (local.paused and local.paused_by == "auto"):
                return
            flight = self._begin(sid, "resume")
            if self._tg is not None:
                self._tg.start_soon(self._fly, sid, "resume", lambda: self._resume(sid))
            else:
                await self._fly(sid, "resume", lambda: self._resume(sid))
        left = deadline - lifecycle.wall() if deadline else float("inf")
        with anyio.move_on_after(max(0.0, left)):
            await flight.done.wait()
        if not flight.done.is_set():
            raise RequestTimeout(
                f"sandbox {sid} was still {flight.kind.rstrip('e')}ing at the request's deadline",
                sandbox_id=sid,
            )
        if flight.error is not None and flight.kind == "resume":
            raise flight.error

    async def _resume(self, sid: str) -> None:
        """Resume, pausing the longest-idle sandboxes with an idle timer to make room."""
        started = anyio.current_time()
        for evicted in range(MAX_EVICTIONS + 1):
            try:
                async with self._resume_slots:
                    await self.snapshots.resume(sid)
                self._counts["resumed"] += 1
                log.info("auto-resumed in %.3fs", anyio.current_time() - started, extra={"sandbox_id": sid})
                return
            except CapacityExhausted:
                if evicted == MAX_EVICTIONS or not await self._make_room(exclude=sid):
                    raise

    async def _make_room(self, *, exclude: str) -> bool:
        now = lifecycle.wall()
        ready = [
            s for s in self.table.values()
            if s.id != exclude and s.auto_pause_after > 0 and self._candidate(s, now)
        ]
        if not ready:
            return False
        return await self._pause(max(ready, key=lambda s: s.idle_for(now)), "room")

    # -------------------------------------------------------- explicit requests

    async def settle(self, sid: str) -> None:
        """Wait for the flight of ``sid`` in the air, if any (a client's pause or
        resume then acts on where it landed)."""
        while (flight := self._flights.get(sid)) is not None:
            await flight.done.wait()

    async def resume(self, sid: str) -> None:
        """A client's resume: the same flight as a request's, so it never runs twice."""
        await self.settle(sid)
        local = self.table.get(sid)
        if local is None or not local.paused:
            await self.snapshots.resume(sid)  # the typed error, or "running"
            return
        self._begin(sid, "resume")
        flight = await self._fly(sid, "resume", lambda: self._resume(sid))
        if flight.error is not None:
            raise flight.error

    # --------------------------------------------------------------- the check

    async def check(self) -> None:
        """Pause what has been idle past its timer, then relieve memory pressure."""
        now = lifecycle.wall()
        for sid, until in list(self._failed.items()):
            if until <= now or sid not in self.table:
                del self._failed[sid]
        due = sorted(
            (s for s in self.table.values()
             if s.auto_pause_after > 0 and self._candidate(s, now)
             and s.idle_for(now) >= s.auto_pause_after),
            key=lambda s: s.idle_for(now), reverse=True,
        )
        if due:
            async with anyio.create_task_group() as tg:
                for local in due:
                    await self._slots.acquire()
                    # Checked again: a request may have come while this waited its turn.
                    now = lifecycle.wall()
                    if self.table.get(local.id) is not local or not self._candidate(local, now) \
                            or local.idle_for(now) < local.auto_pause_after:
                        self._slots.release()
                        continue
                    tg.start_soon(self._pause_then_release, local)
        await self.relieve_pressure()

    async def _pause_then_release(self, local: Local) -> None:
        try:
            await self._pause(local, "idle")
        finally:
            self._slots.release()

    async def relieve_pressure(self) -> int:
        """Pause the longest-idle sandboxes, one at a time, while the node is under
        memory pressure; returns how many were paused."""
        if self.memory is None:
            return 0
        paused = 0
        while paused < MAX_PRESSURE_PAUSES:
            reading = await self.memory.sample()
            why = self.memory.pressure(reading)
            if not why:
                break
            async with self._slots:
                # Chosen once the slot is held, with no await before the pause starts.
                now = lifecycle.wall()
                ready = [s for s in self.table.values() if self._candidate(s, now)]
                if not ready:
                    break
                local = max(ready, key=lambda s: s.idle_for(now))
                log.warning("memory pressure (%s): pausing the longest-idle sandbox (%.0fs idle)",
                            why, local.idle_for(now), extra={"sandbox_id": local.id})
                if not await self._pause(local, "pressure"):
                    continue
            paused += 1
            if not self.memory.short(reading):
                # Only the stall says so: PSI is a 10 s average that a pause lowers
                # slowly; one pause per check, not a run of them on a stale figure.
                break
        return paused
