"""The worker's sandbox table: the sandboxes this worker runs, and every write the
worker makes to a sandbox record (``Keys.sandbox``) or to its reservation.

Each sandbox has a :class:`Local` (user, deadlines, env, pool, paused/busy) while this
worker runs it. The table's verbs follow a sandbox's life on a worker:

* :meth:`SandboxTable.reconcile` adopts what a restarted worker still holds;
* :meth:`SandboxTable.started` records a new sandbox (running, or pooled);
* :meth:`SandboxTable.touch` marks activity (flushed with each heartbeat), and
  :meth:`SandboxTable.serving` holds a sandbox in use for one request; both first
  wake a sandbox the worker paused by itself (its :class:`Waker`);
* :meth:`SandboxTable.update` changes a live sandbox's lifetime or tags;
* :meth:`SandboxTable.paused` / :meth:`SandboxTable.unpark` / :meth:`SandboxTable.resumed`;
* :meth:`SandboxTable.end`, the one way a sandbox ends, which releases its reservation
  exactly once (``RELEASE`` is idempotent) and leaves an ended record saying why.

Services (execution, snapshots) take this table and the runtime, never the agent.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import AsyncIterator, ItemsView, Iterator, ValuesView
from contextlib import asynccontextmanager
from typing import Any, Protocol, cast

import msgspec
import redis.asyncio as aioredis

from daemon import lifecycle
from hotbed import batching, lua, records
from hotbed.batching import raise_first_error
from hotbed.errors import CapacityExhausted, InvalidRequest, SandboxNotFound, SandboxNotRunning
from hotbed.keys import Keys
from hotbed.protocol import MAX_TIMEOUT_S
from hotbed.records import ENDED_RECORD_TTL_S, SandboxRecord, from_hash
from workers.inflight import InFlight
from workers.runtimes.base import CpuWeights, Placed, Runtime

log = logging.getLogger(__name__)



class Local(msgspec.Struct, kw_only=True):
    """A sandbox this worker runs."""

    id: str
    user: str
    expires_at: float
    idle_timeout: float | None
    last_active: float
    # Env added to every exec (a claim's or restore's env), so that it applies on the
    # guest agent's path and on docker exec's alike.
    env: dict[str, str] = {}
    # The warm pool it waits in ("" once claimed).
    pool: str = ""
    # Checkpointed to disk and stopped: resumable, not running.
    paused: bool = False
    # Being checkpointed: the container looks stopped meanwhile; not a death.
    busy: bool = False
    # Who paused it: "auto" (the worker: the next request resumes it) or "client".
    paused_by: str = ""
    # Auto-pause after this many idle seconds (0: no idle timer); ``pausable`` False
    # when the create asked never to pause it (not even under memory pressure).
    auto_pause_after: float = 0.0
    pausable: bool = True
    # Requests running in it now: a sandbox in use is never idle.
    in_use: int = 0

    def idle_for(self, now: float) -> float:
        """Seconds without a request; 0 while one runs."""
        return 0.0 if self.in_use else max(0.0, now - self.last_active)

    def ends_at(self) -> float:
        """When it must end: its lifetime, or its idle timeout counted from its last
        activity, whichever comes first (inf: neither)."""
        idle_end = self.last_active + self.idle_timeout if self.idle_timeout else math.inf
        return min(self.expires_at, idle_end)


class GuestHooks(Protocol):
    """Whoever keeps the sandboxes' guest channels (the execution service)."""

    def prepare(self, sandbox_id: str) -> None: ...

    async def wait_ready(self, sandbox_id: str, *, warm_up: bool = False) -> None: ...

    def forget(self, sandbox_id: str) -> None: ...


class Waker(Protocol):
    """Whoever resumes a sandbox the worker paused by itself (the auto-pauser)."""

    async def wake(self, local: Local, *, deadline: float) -> None:
        """Return once ``local`` runs (or raise why it cannot), by ``deadline``
        (wall clock; 0: none)."""


class SandboxTable:
    """The sandboxes of one worker. Reads like a ``dict`` of :class:`Local` by id."""

    def __init__(self, runtime: Runtime, *, worker_id: str, prefix: str, keys: Keys) -> None:
        self.runtime = runtime
        # The runtime's CPU weights, if it has them: looked up once, as a runtime-checkable
        # Protocol's isinstance walks its members (~10 us), and a claim asks every time.
        self.weights: CpuWeights | None = runtime if isinstance(runtime, CpuWeights) else None
        self.worker_id = worker_id
        self.prefix = prefix
        self.keys = keys
        # Told when a sandbox ends, so its guest channel closes with it.
        self.guests: GuestHooks | None = None
        # Resumes auto-paused sandboxes when a request comes for one.
        self.waker: Waker | None = None
        # The node's auto-pause default, for sandboxes whose create did not say.
        self.auto_pause_default = 0.0
        self._redis: aioredis.Redis | None = None
        self._locals: dict[str, Local] = {}
        # Each sandbox's end (Local.ends_at) on a heap, so the expiry loop looks only at
        # the sandboxes due, not at all of them four times a second; ``_armed`` holds the
        # time each one is armed for (an entry that differs is stale). Activity only
        # moves an end later, so a touch does not re-arm: a sandbox found active when
        # its entry comes due is armed again for its new end.
        self._due: list[tuple[float, str]] = []
        self._armed: dict[str, float] = {}
        # Sandboxes whose last activity is not yet in their records (one write per heartbeat).
        self._dirty: set[str] = set()
        # Sandboxes being ended (how many ends of each are under way): out of the table
        # already, their containers not yet removed.
        self._ending = InFlight()

    # --------------------------------------------------------------- plumbing

    def bind(self, redis: aioredis.Redis) -> None:
        """Use ``redis`` for every record write (the worker's command client)."""
        self._redis = redis

    @property
    def bound(self) -> bool:
        """Whether the worker has started (and given the table its client)."""
        return self._redis is not None

    @property
    def redis(self) -> aioredis.Redis:
        assert self._redis is not None, "worker not started"
        return self._redis

    def placed(self, sandbox_id: str, gpu_uuids: list[str] | None = None) -> Placed:
        """What the runtime is told about a sandbox of this worker."""
        return Placed(
            sandbox_id=sandbox_id, worker_id=self.worker_id, prefix=self.prefix,
            gpu_uuids=list(gpu_uuids or []),
        )

    # ------------------------------------------------------------- dict view

    def get(self, sandbox_id: str) -> Local | None:
        return self._locals.get(sandbox_id)

    def __getitem__(self, sandbox_id: str) -> Local:
        return self._locals[sandbox_id]

    def __contains__(self, sandbox_id: object) -> bool:
        return sandbox_id in self._locals

    def __iter__(self) -> Iterator[str]:
        return iter(self._locals)

    def __len__(self) -> int:
        return len(self._locals)

    def __bool__(self) -> bool:
        return bool(self._locals)

    def values(self) -> ValuesView[Local]:
        return self._locals.values()

    def held(self) -> set[str]:
        """This worker's sandboxes: those in the table and those being ended, whose
        containers outlive their place in the table by the removal's time."""
        return set(self._locals) | self._ending.ids()

    def holds(self, sandbox_id: str) -> bool:
        """Whether ``sandbox_id`` is in :meth:`held`."""
        return sandbox_id in self._locals or sandbox_id in self._ending

    def items(self) -> ItemsView[str, Local]:
        return self._locals.items()

    def clear(self) -> None:
        """Forget every sandbox (the scheduler dropped this worker's keys)."""
        self._locals.clear()
        self._due.clear()
        self._armed.clear()
        self._dirty.clear()

    def _hold(self, local: Local) -> None:
        self._locals[local.id] = local
        self.arm(local)

    def arm(self, local: Local, at: float | None = None) -> None:
        """Have :meth:`due` return ``local`` once its end (or ``at``) has come; call
        whenever its lifetime or idle timeout changes."""
        when = local.ends_at() if at is None else at
        if when < self._armed.get(local.id, math.inf):
            self._armed[local.id] = when
            heapq.heappush(self._due, (when, local.id))

    def _disarm(self, sid: str) -> None:
        self._armed.pop(sid, None)
        self._dirty.discard(sid)
        # Ended sandboxes leave stale entries behind: rebuilt once they are most of it.
        if len(self._due) > 2 * len(self._armed) + 1024:
            self._due = [(when, s) for s, when in self._armed.items()]
            heapq.heapify(self._due)

    def due(self, now: float) -> list[Local]:
        """The sandboxes whose end has come by ``now``, each returned once: the caller
        ends it, or arms it again (:meth:`arm`)."""
        out: list[Local] = []
        while self._due and self._due[0][0] <= now:
            when, sid = heapq.heappop(self._due)
            if self._armed.get(sid) != when:
                continue  # armed earlier since, or ended
            del self._armed[sid]
            local = self._locals.get(sid)
            if local is None:
                continue
            if local.ends_at() <= now:
                out.append(local)
            else:
                self.arm(local)  # active or given more time since it was armed
        return out

    # --------------------------------------------------------------- records

    async def record(self, sandbox_id: str) -> SandboxRecord | None:
        return from_hash(await self.redis.hgetall(self.keys.sandbox(sandbox_id)))

    async def _held(self, sandbox_id: str) -> Local:
        """The sandbox this worker holds; else the typed error saying why not."""
        local = self._locals.get(sandbox_id)
        if local is None:
            rec = await self.record(sandbox_id)
            if rec is None:
                raise SandboxNotFound(f"no sandbox {sandbox_id}", sandbox_id=sandbox_id)
            if rec.ended:
                raise SandboxNotFound(
                    f"sandbox {sandbox_id} has ended ({rec.state}: {rec.reason})", sandbox_id=sandbox_id
                )
            raise SandboxNotRunning(f"sandbox {sandbox_id} is {rec.state}", sandbox_id=sandbox_id)
        return local

    async def touch(self, sandbox_id: str, *, deadline: float = 0.0) -> Local:
        """The running sandbox a command is for, marked active; else the typed error
        saying why it cannot run one (unknown, ended, paused, not on this worker). One
        the worker paused by itself is resumed first, before ``deadline`` (wall clock).
        No await between the sandbox found running and the return: a caller that marks
        it in use at once cannot race an auto-pause."""
        local = await self._held(sandbox_id)
        while local.paused:
            if local.paused_by != "auto" or self.waker is None:
                raise SandboxNotRunning(
                    f"sandbox {sandbox_id} is paused; resume it first", sandbox_id=sandbox_id
                )
            await self.waker.wake(local, deadline=deadline)
            if self._locals.get(sandbox_id) is not local:
                local = await self._held(sandbox_id)  # ended meanwhile: says so
        local.last_active = lifecycle.wall()
        self._dirty.add(sandbox_id)
        return local

    @asynccontextmanager
    async def serving(self, sandbox_id: str, *, deadline: float = 0.0) -> AsyncIterator[Local]:
        """:meth:`touch`, then the sandbox held in use (never auto-paused) until the
        block ends; its idle time counts from then."""
        local = await self.touch(sandbox_id, deadline=deadline)
        local.in_use += 1
        try:
            yield local
        finally:
            local.in_use -= 1
            local.last_active = lifecycle.wall()
            self._dirty.add(local.id)

    def pause_policy(self, asked: float | None) -> tuple[float, bool]:
        """A create's ``auto_pause_after`` as (idle seconds, 0 = no timer; pausable)."""
        if asked is None:
            return self.auto_pause_default, True
        return asked, asked > 0

    async def update(
        self, sandbox_id: str, *, timeout: float | None = None, tags: dict[str, str] | None = None
    ) -> None:
        """Set a live sandbox's lifetime to ``timeout`` seconds from now (the expiry loop
        enforces :attr:`Local.expires_at`) and/or replace its tags; the record says the
        same (a restarted worker adopts the new end of life from it). A paused sandbox
        may change too: its lifetime runs while it is paused."""
        if timeout is not None and not 0 < timeout <= MAX_TIMEOUT_S:
            raise InvalidRequest(
                f"timeout must be in (0, {MAX_TIMEOUT_S:g}] seconds, got {timeout:g}",
                sandbox_id=sandbox_id,
            )
        local = await self._held(sandbox_id)
        if local.pool:
            raise SandboxNotRunning(f"sandbox {sandbox_id} is waiting in a warm pool", sandbox_id=sandbox_id)
        fields: records.Fields = {}
        if tags is not None:
            fields.update(records.with_tags(dict(tags)))
        if timeout is not None:
            (created,) = await self.redis.hmget(
                self.keys.sandbox(sandbox_id), records.field_names("created_at")
            )
            expires_at = lifecycle.wall() + timeout
            fields.update(records.with_lifetime(created_at=float(created or 0), expires_at=expires_at))
            local.expires_at = expires_at
            self.arm(local)  # a shorter lifetime must end sooner than it was armed for
        if fields:
            await self.redis.hset(self.keys.sandbox(sandbox_id), mapping=fields)

    def write_activity(self, pipe: Any) -> None:
        """Queue on ``pipe`` the last-activity times not yet written (one per heartbeat)."""
        dirty, self._dirty = self._dirty, set()
        for sid in dirty:
            s = self._locals.get(sid)
            if s is not None:
                pipe.hset(self.keys.sandbox(sid), mapping=records.touched(s.last_active))

    async def started(self, local: Local, fields: records.Fields) -> None:
        """Hold ``local`` and write its record's transition ``fields``
        (:func:`records.to_started` or :func:`records.to_restored`); a sandbox that went
        to ``pooled`` is not listed among the live sandboxes until it is claimed."""
        sid = local.id
        self._hold(local)
        commands: list[batching.Command] = [
            records.hset(self.keys.sandbox(sid), fields),
            *self._env_commands(local),
        ]
        if not records.is_pooled(fields):
            commands += [("ZADD", k, float(fields["started_at"]), sid) for k in self.keys.sandbox_indexes(sid)]
        # Auto-pipelined: one round trip for all the starts finishing together.
        raise_first_error(await batching.for_client(self.redis).execute(*commands))

    def _env_commands(self, local: Local) -> list[batching.Command]:
        """Keep ``local``'s env where a restarted worker finds it: its container never
        has it (workers.execution.with_sandbox_env)."""
        key = self.keys.sandbox_env(local.id)
        flat = [x for kv in local.env.items() for x in kv]
        return [("DEL", key), *([("HSET", key, *flat)] if flat else [])]

    async def keep_env(self, local: Local) -> None:
        raise_first_error(await batching.for_client(self.redis).execute(*self._env_commands(local)))

    async def _kept_env(self, sid: str) -> dict[str, str]:
        raw: Any = await self.redis.hgetall(self.keys.sandbox_env(sid))
        return {k.decode(): v.decode() for k, v in raw.items()}

    # ----------------------------------------------------------- adoption

    async def reconcile(self, default_user: str) -> None:
        """Adopt the sandboxes this worker still holds; remove containers nobody holds."""
        # Our clients return bytes (no decode_responses); redis-py's types allow str too.
        rows = cast("dict[bytes, bytes]", await self.redis.hgetall(self.keys.worker_sandboxes(self.worker_id)))
        held = {k.decode(): v for k, v in rows.items()}
        managed = [
            m for m in await self.runtime.list_managed()
            if m.worker_id == self.worker_id and m.prefix == self.prefix
        ]
        running = {m.sandbox_id for m in managed if m.running}
        for m in managed:
            if m.sandbox_id not in held:
                log.info("removing orphan container", extra={"sandbox_id": m.sandbox_id})
                await self.runtime.destroy(m.sandbox_id)
        found = {m.sandbox_id: m for m in managed}
        for sid in held:
            rec = await self.record(sid)
            if rec is not None and rec.state == "paused" and sid in found:
                # Checkpointed to disk before the restart: still resumable.
                self._hold(self._adopted(sid, rec, default_user, paused=True))
                self._locals[sid].paused_by = rec.paused_by or "client"
                self._locals[sid].env = await self._kept_env(sid)
                continue
            if rec is None or rec.ended or sid not in running:
                if rec is not None and rec.state == "creating" and sid not in running:
                    # Start command not yet run: it is still in our stream; keep it.
                    continue
                await self.end(sid, reason="lost on worker restart", state="failed")
                continue
            self._hold(self._adopted(sid, rec, default_user))
            self._locals[sid].env = await self._kept_env(sid)
            if self._locals[sid].pool and self.weights is not None:
                self.weights.adopt_background(found[sid])
        if held or managed:
            log.info("reconciled: adopted %d sandboxes", len(self._locals))

    async def readopt(self) -> int:
        """Take back what this worker still runs after the reaper declared it dead (its
        heartbeats lapsed: a stalled loop, a Redis failover) and dropped its keys: each
        sandbox it holds gets its reservation back and its record un-lost, so coming
        back kills nothing; :meth:`reconcile` and ``REGISTER`` follow. A sandbox whose
        record is gone too (Redis lost its data) is left to :meth:`reconcile`."""
        args: list[str] = []
        for sid, local in list(self._locals.items()):
            rec = await self.record(sid)
            if rec is None:
                continue
            held = records.reservation_value(
                millicpu=0 if local.paused else int(round(rec.cpu * 1000)),
                memory_mb=0 if local.paused else rec.memory_mb,
                gpus=list(rec.gpu_uuids),
            )
            args += [sid, held]
            state = "paused" if local.paused else "pooled" if local.pool else "running"
            commands: list[batching.Command] = [
                records.hset(self.keys.sandbox(sid), records.to_readopted(state=state)),
                ("PERSIST", self.keys.sandbox(sid)),
            ]
            if state != "pooled":
                commands += [("ZADD", k, rec.created_at, sid) for k in self.keys.sandbox_indexes(sid)]
            raise_first_error(await batching.for_client(self.redis).execute(*commands))
        if not args:
            return 0
        n = int(await lua.READOPT.run(self.redis, [self.keys.worker_sandboxes(self.worker_id)], args))
        log.warning(
            "declared dead while running %d sandboxes; took them back", n,
            extra={"worker_id": self.worker_id},
        )
        return n

    def _adopted(self, sid: str, rec: SandboxRecord, user: str, *, paused: bool = False) -> Local:
        after, pausable = self.pause_policy(rec.auto_pause_after)
        return Local(
            id=sid, user=user, auto_pause_after=after, pausable=pausable,
            expires_at=rec.created_at + rec.timeout if rec.timeout else float("inf"),
            idle_timeout=rec.idle_timeout or None,
            last_active=rec.last_active or lifecycle.wall(),
            paused=paused,
            pool=rec.pool if rec.state == "pooled" and not paused else "",
        )

    # ------------------------------------------------------------ pause/resume

    def _cap_keys(self) -> list[str]:
        return [self.keys.worker_cap(self.worker_id), self.keys.worker_sandboxes(self.worker_id)]

    async def park(self, sandbox_id: str) -> None:
        """Give back a paused sandbox's CPU and memory (it sleeps on disk)."""
        await lua.PARK.run(self.redis, self._cap_keys(), [sandbox_id])

    async def paused(self, sandbox_id: str, *, by: records.PausedBy = "client") -> None:
        """Free a paused sandbox's CPU and memory, then record it paused (by a client,
        or ``"auto"``): whoever reads "paused" sees its capacity back already."""
        await self.park(sandbox_id)
        await self.redis.hset(
            self.keys.sandbox(sandbox_id), mapping=records.to_paused(by=by, now=lifecycle.wall())
        )

    async def unpark(self, sandbox_id: str) -> None:
        """Reserve a paused sandbox's CPU and memory again, or CapacityExhausted."""
        cpu, mem = await self.redis.hmget(
            self.keys.sandbox(sandbox_id), records.field_names("cpu", "memory_mb")
        )
        need_cpu = int(round(float(cpu or 0) * 1000))
        got = await lua.UNPARK.run(self.redis, self._cap_keys(), [sandbox_id, need_cpu, int(mem or 0)])
        if got == 0:
            raise CapacityExhausted(
                f"worker {self.worker_id} has no room to resume {sandbox_id} now (it stays "
                f"paused; cpu={need_cpu / 1000:g} memory={int(mem or 0)}MiB needed)",
                sandbox_id=sandbox_id,
            )

    async def resumed(self, local: Local) -> None:
        """Record a resumed sandbox running again, active now."""
        local.paused_by = ""
        local.last_active = lifecycle.wall()
        await self.redis.hset(
            self.keys.sandbox(local.id), mapping=records.to_resumed(now=local.last_active)
        )

    # ------------------------------------------------------------------- end

    async def end(
        self, sandbox_id: str, *, reason: str, state: str = "terminated", must_exist: bool = False,
        made: bool = True,
    ) -> None:
        """Destroy, release, record why. Safe to call twice and for unknown ids.
        ``made=False``: no container was ever made (a start refused before it began)."""
        with self._ending.holding(sandbox_id):
            await self._end(sandbox_id, reason=reason, state=state, must_exist=must_exist, made=made)

    async def _end(self, sid: str, *, reason: str, state: str, must_exist: bool, made: bool) -> None:
        local = self._locals.pop(sid, None)
        self._disarm(sid)
        if self.guests is not None:
            self.guests.forget(sid)
        if local is None and must_exist:
            held = await self.redis.hexists(self.keys.worker_sandboxes(self.worker_id), sid)
            if not held:
                if await self.record(sid) is None:
                    raise SandboxNotFound(f"no sandbox {sid}", sandbox_id=sid)
                # Already ended: terminate is idempotent.
                return
        if local is not None and local.pool:
            # Out of the pool before anything else, so it is never handed out dead.
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(self.keys.sandbox(sid), mapping=records.to_unlisted(failed=state == "failed"))
                pipe.lrem(self.keys.pool_ready(local.pool), 0, f"{sid} {self.worker_id}")
                await pipe.execute()
        if made or local is not None:
            await self.runtime.destroy(sid)
        record = self.keys.sandbox(sid)
        raise_first_error(await batching.for_client(self.redis).execute(
            lua.RELEASE.call(self._cap_keys(), [sid]),
            records.hset(record, records.to_ended(state=state, reason=reason, now=lifecycle.wall())),
            ("EXPIRE", record, ENDED_RECORD_TTL_S),
            ("DEL", self.keys.sandbox_env(sid)),
            *(("ZREM", k, sid) for k in self.keys.sandbox_indexes(sid)),
        ))
        log.info(
            "sandbox ended: %s (%s)", state, reason,
            extra={"sandbox_id": sid, "worker_id": self.worker_id},
        )
