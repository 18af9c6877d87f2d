"""The worker's sandbox table: the sandboxes this worker runs, and every write the
worker makes to a sandbox record (``Keys.sandbox``) or to its reservation.

Each sandbox has a :class:`Local` (user, deadlines, env, pool, paused/busy) while this
worker runs it. The table's verbs follow a sandbox's life on a worker:

* :meth:`SandboxTable.reconcile` adopts what a restarted worker still holds;
* :meth:`SandboxTable.started` records a new sandbox (running, or pooled);
* :meth:`SandboxTable.touch` marks activity (flushed with each heartbeat);
* :meth:`SandboxTable.update` changes a live sandbox's lifetime or tags;
* :meth:`SandboxTable.paused` / :meth:`SandboxTable.unpark` / :meth:`SandboxTable.resumed`;
* :meth:`SandboxTable.end`, the one way a sandbox ends, which releases its reservation
  exactly once (``RELEASE`` is idempotent) and leaves an ended record saying why.

Services (execution, snapshots) take this table and the runtime, never the agent.
"""

from __future__ import annotations

import logging
from collections.abc import ItemsView, Iterator, ValuesView
from typing import Any, Protocol

import msgspec
import redis.asyncio as aioredis

from daemon import lifecycle
from hotbed import batching, lua, records
from hotbed.batching import raise_first_error
from hotbed.errors import CapacityExhausted, InvalidRequest, SandboxNotFound, SandboxNotRunning
from hotbed.keys import Keys
from hotbed.protocol import MAX_TIMEOUT_S
from hotbed.records import ENDED_RECORD_TTL_S, SandboxRecord, from_hash
from workers.runtimes.base import Placed, Runtime

log = logging.getLogger(__name__)



class Local(msgspec.Struct, kw_only=True):
    """A sandbox this worker runs."""

    id: str
    user: str
    expires_at: float
    idle_timeout: float | None
    last_active: float
    dirty: bool = False
    # Env added to every exec (a claim's or restore's env), so that it applies on the
    # guest agent's path and on docker exec's alike.
    env: dict[str, str] = {}
    # The warm pool it waits in ("" once claimed).
    pool: str = ""
    # Checkpointed to disk and stopped: resumable, not running.
    paused: bool = False
    # Being checkpointed: the container looks stopped meanwhile; not a death.
    busy: bool = False


class GuestHooks(Protocol):
    """Whoever keeps the sandboxes' guest channels (the execution service)."""

    def prepare(self, sandbox_id: str) -> None: ...

    def forget(self, sandbox_id: str) -> None: ...


class SandboxTable:
    """The sandboxes of one worker. Reads like a ``dict`` of :class:`Local` by id."""

    def __init__(self, runtime: Runtime, *, worker_id: str, prefix: str, keys: Keys) -> None:
        self.runtime = runtime
        self.worker_id = worker_id
        self.prefix = prefix
        self.keys = keys
        # Told when a sandbox ends, so its guest channel closes with it.
        self.guests: GuestHooks | None = None
        self._redis: aioredis.Redis | None = None
        self._locals: dict[str, Local] = {}

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

    def items(self) -> ItemsView[str, Local]:
        return self._locals.items()

    def clear(self) -> None:
        """Forget every sandbox (the scheduler dropped this worker's keys)."""
        self._locals.clear()

    # --------------------------------------------------------------- records

    async def record(self, sandbox_id: str) -> SandboxRecord | None:
        return from_hash(await self.redis.hgetall(self.keys.sandbox(sandbox_id)))  # type: ignore[arg-type]

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

    async def touch(self, sandbox_id: str) -> Local:
        """The running sandbox a command is for, marked active; else the typed error
        saying why it cannot run one (unknown, ended, paused, not on this worker)."""
        local = await self._held(sandbox_id)
        if local.paused:
            raise SandboxNotRunning(
                f"sandbox {sandbox_id} is paused; resume it first", sandbox_id=sandbox_id
            )
        local.last_active = lifecycle.wall()
        local.dirty = True
        return local

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
        if fields:
            await self.redis.hset(self.keys.sandbox(sandbox_id), mapping=fields)

    def write_activity(self, pipe: Any) -> None:
        """Queue on ``pipe`` the last-activity times not yet written (one per heartbeat)."""
        for s in self._locals.values():
            if s.dirty:
                s.dirty = False
                pipe.hset(self.keys.sandbox(s.id), mapping=records.touched(s.last_active))

    async def started(self, local: Local, fields: records.Fields) -> None:
        """Hold ``local`` and write its record's transition ``fields``
        (:func:`records.to_started` or :func:`records.to_restored`); a sandbox that went
        to ``pooled`` is not listed among the live sandboxes until it is claimed."""
        sid = local.id
        self._locals[sid] = local
        commands: list[batching.Command] = [
            records.hset(self.keys.sandbox(sid), fields),
        ]
        if not records.is_pooled(fields):
            commands.append(("ZADD", self.keys.sandboxes, float(fields["started_at"]), sid))
        # Auto-pipelined: one round trip for all the starts finishing together.
        raise_first_error(await batching.for_client(self.redis).execute(*commands))

    # ----------------------------------------------------------- adoption

    async def reconcile(self, default_user: str) -> None:
        """Adopt the sandboxes this worker still holds; remove containers nobody holds."""
        held = {
            k.decode(): v
            for k, v in (await self.redis.hgetall(self.keys.worker_sandboxes(self.worker_id))).items()
        }
        managed = [
            m for m in await self.runtime.list_managed()
            if m.worker_id == self.worker_id and m.prefix == self.prefix
        ]
        running = {m.sandbox_id for m in managed if m.running}
        for m in managed:
            if m.sandbox_id not in held:
                log.info("removing orphan container", extra={"sandbox_id": m.sandbox_id})
                await self.runtime.destroy(m.sandbox_id)
        present = {m.sandbox_id for m in managed}
        for sid in held:
            rec = await self.record(sid)
            if rec is not None and rec.state == "paused" and sid in present:
                # Checkpointed to disk before the restart: still resumable.
                self._locals[sid] = self._adopted(sid, rec, default_user, paused=True)
                continue
            if rec is None or rec.ended or sid not in running:
                if rec is not None and rec.state == "creating" and sid not in running:
                    # Start command not yet run: it is still in our stream; keep it.
                    continue
                await self.end(sid, reason="lost on worker restart", state="failed")
                continue
            self._locals[sid] = self._adopted(sid, rec, default_user)
        if held or managed:
            log.info("reconciled: adopted %d sandboxes", len(self._locals))

    @staticmethod
    def _adopted(sid: str, rec: SandboxRecord, user: str, *, paused: bool = False) -> Local:
        return Local(
            id=sid, user=user,
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

    async def paused(self, sandbox_id: str) -> None:
        """Record a sandbox paused and free its CPU and memory."""
        await self.redis.hset(self.keys.sandbox(sandbox_id), mapping=records.to_paused())
        await self.park(sandbox_id)

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
        local.last_active = lifecycle.wall()
        await self.redis.hset(
            self.keys.sandbox(local.id), mapping=records.to_resumed(now=local.last_active)
        )

    # ------------------------------------------------------------------- end

    async def end(
        self, sandbox_id: str, *, reason: str, state: str = "terminated", must_exist: bool = False
    ) -> None:
        """Destroy, release, record why. Safe to call twice and for unknown ids."""
        sid = sandbox_id
        local = self._locals.pop(sid, None)
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
        await self.runtime.destroy(sid)
        record = self.keys.sandbox(sid)
        raise_first_error(await batching.for_client(self.redis).execute(
            lua.RELEASE.call(self._cap_keys(), [sid]),
            records.hset(record, records.to_ended(state=state, reason=reason, now=lifecycle.wall())),
            ("EXPIRE", record, ENDED_RECORD_TTL_S),
            ("ZREM", self.keys.sandboxes, sid),
        ))
        log.info(
            "sandbox ended: %s (%s)", state, reason,
            extra={"sandbox_id": sid, "worker_id": self.worker_id},
        )
