"""The warm pool controller: keeps each pool at its target size.

Runs on the one scheduler replica holding the ``pools`` lock. Every ``pool_interval_s``
it looks at each pool (``Keys.pools``):

* **refill**: ``size - ready - warming`` new sandboxes are placed like any create
  (spread over workers by the usual ranking, never waiting for room: a full fleet just
  leaves the pool short). Nodes holding the template's snapshot are not preferred: a
  pool spread over the fleet loses only part of itself with a node, and each node
  that copies the snapshot once more is one more node it survives on, each with a start command that restores the template's
  snapshot into the pool. A token bucket (``pool_refill_per_s``) and a cap on
  refills in flight per pool (``pool_max_warming``) bound the rate, so a burst of
  claims cannot starve running sandboxes. The worker lists a sandbox it made ready
  with ``POOL_PUT``; a refill that never reports is forgotten after ``WARM_DEADLINE_S``.
* **leases**: a claim whose claimer vanished between ``POOL_CLAIM`` and finishing (its
  lease in the claims zset expired) is taken back: still ``pooled`` -> back on the
  ready list; already flipped to running -> ended (nobody holds it).
* **pruning**: ready entries whose record is no longer ``pooled`` (container died,
  worker lost) are dropped; the worker's health check has usually removed them first.
* **retired**: a template rebuild moves the pools' ready entries to a stale list in
  the same step that could hand them out (``lua.POOL_RETIRE``, run by the worker that
  built it), so no later claim gets the old set-up; the controller ends them and the
  refill restores the new snapshot. Pruning also ends an entry whose snapshot is not
  the template's (one a refill made from the old snapshot during the rebuild).
* **shrinking**: a pool over its size (or deleted: size 0) has the surplus ended.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import redis.asyncio as aioredis

from daemon import lifecycle
from hotbed import batching, protocol, records, tenants
from hotbed import keys as keyspace
from hotbed.batching import raise_first_error
from hotbed.client import new_id
from hotbed.errors import HotbedError
from hotbed.keys import Keys, sandbox_id_for
from hotbed.protocol import CreateSandbox, Envelope, Resources, SandboxSpec, Terminate
from scheduler import templates
from scheduler.config import SchedulerSettings
from scheduler.leader import LeaderLock
from scheduler.placer import Placer

log = logging.getLogger(__name__)

# A refill that has not reported ready by then is no longer counted as warming.
WARM_DEADLINE_S = 120.0
PRUNE_EVERY_S = 1.0
# Ready entries checked per prune: a pool of 100k is walked in slices, so the safety
# net costs O(1) per tick instead of O(pool size) (the worker's health check is what
# removes a dead sandbox first; this catches what it could not).
PRUNE_SLICE = 1000
_PRUNE_FIELDS = records.field_names("state", "snapshot")


class PoolController:
    """Keeps the pools full; refills go through ``placer``, and only the holder of
    ``lock`` (the ``pools`` leader lock) acts. ``settings`` is replaced on a reload."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        placer: Placer,
        lock: LeaderLock,
        *,
        settings: SchedulerSettings,
    ) -> None:
        # Replies are bytes (decode_responses is off); redis-py's stubs say bytes | str.
        self.redis: Any = redis
        self.keys = keys
        self.placer = placer
        self.lock = lock
        self.settings = settings
        self._bucket = 0.0
        self._bucket_at: float | None = None
        self._pruned_at: dict[str, float] = {}
        self._prune_from: dict[str, int] = {}
        self.started = 0

    async def run(self) -> None:
        # The table that names pooled sandboxes into their pool's slot takes ~40 ms to
        # build: built here, off the loop, rather than at the first refill.
        await anyio.to_thread.run_sync(keyspace.prepare_slot_steering)

        async def step() -> None:
            if await self.lock.hold():
                await self.tick()

        await lifecycle.supervised_loop(
            "pool controller", step, interval=lambda: self.settings.pool_interval_s, log=log,
        )

    def _take_tokens(self, want: int) -> int:
        rate = self.settings.pool_refill_per_s
        now = anyio.current_time()
        burst = max(1.0, float(self.settings.pool_max_warming))
        last = now - burst / rate if self._bucket_at is None else self._bucket_at
        self._bucket = min(burst, self._bucket + (now - last) * rate)
        self._bucket_at = now
        n = min(want, int(self._bucket))
        self._bucket -= n
        return n

    async def tick(self) -> None:
        names = [n.decode() for n in await self.redis.smembers(self.keys.pools)]
        for name in names:
            await self.tick_pool(name)

    async def redis_now_ms(self) -> int:
        """Redis's clock: claim leases are stamped with it (POOL_CLAIM), so every time
        they are compared with is too, whichever replica leads."""
        sec, usec = await self.redis.time()
        return int(sec) * 1000 + int(usec) // 1000

    async def tick_pool(self, name: str) -> None:
        keys = self.keys
        now_ms = await self.redis_now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.pool_conf(name))
            pipe.zremrangebyscore(keys.pool_warming(name), "-inf", now_ms)
            pipe.zrangebyscore(keys.pool_claims(name), "-inf", now_ms)
            pipe.llen(keys.pool_stale(name))
            raw_conf, _expired, stale_claims, retired = await pipe.execute()
        conf = records.pool_config_from_hash(raw_conf)
        for item in stale_claims:
            await self._take_back(name, item.decode())
        if retired:
            await self._end_retired(name)
        size = conf.size if conf else 0
        now = anyio.current_time()
        if now - self._pruned_at.get(name, 0.0) >= PRUNE_EVERY_S:
            self._pruned_at[name] = now
            await self._prune(name, conf.template if conf else "")
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(keys.pool_ready(name))
            pipe.zcard(keys.pool_warming(name))
            ready, warming = await pipe.execute()
        if ready > size:
            await self._shrink(name, ready - size)
        if conf is None or size == 0:
            if conf is None or (ready == 0 and warming == 0):
                await self._forget(name)
            return
        deficit = size - ready - warming
        room = self.settings.pool_max_warming - warming
        n = self._take_tokens(min(deficit, room)) if deficit > 0 and room > 0 else 0
        if n <= 0:
            return
        spec = SandboxSpec(
            template=conf.template,
            resources=Resources(cpu=conf.cpu, memory_mb=conf.memory_mb, gpu=conf.gpu or None),
            timeout=protocol.MAX_TIMEOUT_S,
            network=conf.network,
        )
        try:
            recipe = await templates.resolve(self.redis, self.keys, spec)
        except HotbedError as exc:
            log.warning("pool %s: %s", name, exc)
            return
        for _ in range(n):
            if not await self._refill_one(name, recipe, conf.tenant):
                # No room on any worker: give the tokens back and try next tick.
                break

    async def _refill_one(self, name: str, recipe: templates.Resolved, tenant: str = "") -> bool:
        keys = self.keys
        # A tenant's pool holds sandboxes with the tenant's ids: its claims hand them to
        # the tenant as they are (records, keys and the workers' checks all go by id).
        # The id puts the sandbox's record in the pool's slot, for the claim script.
        rid = keys.pooled_request_id(name, (lambda: tenants.new_request_id(tenant)) if tenant else new_id)
        env = Envelope(
            id=rid, reply_to="", deadline=lifecycle.wall() + WARM_DEADLINE_S,
            body=CreateSandbox(spec=recipe.spec), client="pool-controller",
        )
        sid = sandbox_id_for(rid)
        give_up_ms = await self.redis_now_ms() + int(WARM_DEADLINE_S * 1000)
        await self.redis.zadd(keys.pool_warming(name), {sid: give_up_ms})
        try:
            placed = await self.placer.place(
                env, recipe.spec, make_start=lambda s: recipe.start(s, pool=name), wait=False,
            )
        except HotbedError as exc:
            placed = None
            log.warning("pool %s: refill failed: %s", name, exc)
        if placed is None:
            await self.redis.zrem(keys.pool_warming(name), sid)
            self._bucket += 1
            return False
        self.started += 1
        return True

    async def _end(self, item: str, reason: str) -> None:
        sid, wid = item.split(" ", 1)
        env = Envelope(
            id=new_id(), reply_to="", deadline=lifecycle.wall() + 60,
            body=Terminate(sandbox_id=sid, reason=reason), client="pool-controller",
        )
        await self.redis.xadd(self.keys.worker_cmds(wid), {b"m": protocol.encode(env)})

    async def _take_back(self, name: str, item: str) -> None:
        keys = self.keys
        sid = item.split(" ", 1)[0]
        (state,) = await self.redis.hmget(keys.sandbox(sid), records.field_names("state"))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(keys.pool_claims(name), item)
            if state == b"pooled":
                pipe.rpush(keys.pool_ready(name), item)
            removed, *_ = await pipe.execute()
        if removed and state != b"pooled":
            log.warning("pool %s: claim of %s abandoned; ending it", name, sid, extra={"sandbox_id": sid})
            await self._end(item, "claim abandoned")

    async def _prune(self, name: str, template: str) -> None:
        keys = self.keys
        start = self._prune_from.get(name, 0)
        items = await self.redis.lrange(keys.pool_ready(name), start, start + PRUNE_SLICE - 1)
        # Next tick goes on from here, or wraps; claims and refills move the list under
        # us, so an entry may be seen twice or skipped once: harmless for a safety net.
        self._prune_from[name] = start + PRUNE_SLICE if len(items) == PRUNE_SLICE else 0
        if not items:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(keys.template(template), "snapshot")
            for it in items:
                pipe.hmget(keys.sandbox(it.decode().split(" ", 1)[0]), _PRUNE_FIELDS)
            current, *rows = await pipe.execute()
        for it, (st, snap) in zip(items, rows, strict=True):
            if st != b"pooled":
                if await self.redis.lrem(keys.pool_ready(name), 0, it):
                    log.info("pool %s: dropped %s (%s)", name, it.decode(), (st or b"gone").decode())
            elif current is not None and (snap or b"") != current:
                # Made from what the template was before a rebuild: claims must get the
                # new set-up, so it is ended and the refill restores the new snapshot.
                if await self.redis.lrem(keys.pool_ready(name), 0, it):
                    log.info("pool %s: replacing %s (template %s rebuilt)", name, it.decode(), template)
                    await self._end(it.decode(), "template rebuilt")

    async def _end_retired(self, name: str) -> None:
        """End what a template rebuild retired (lua.POOL_RETIRE moved it off the list)."""
        while (item := await self.redis.lpop(self.keys.pool_stale(name))) is not None:
            await self._end(item.decode(), "template rebuilt")

    async def _shrink(self, name: str, surplus: int) -> None:
        keys = self.keys
        for _ in range(surplus):
            item = await self.redis.lpop(keys.pool_ready(name))
            if item is None:
                return
            await self._end(item.decode(), "pool shrunk")

    async def _forget(self, name: str) -> None:
        keys = self.keys
        # Unlisted, then deleted: on a Redis Cluster the two keys may live on different
        # shards, and this order never leaves a configuration that nothing lists.
        raise_first_error(await batching.for_client(self.redis).execute(
            ("SREM", keys.pools, name), ("DEL", keys.pool_conf(name))
        ))
        self._pruned_at.pop(name, None)
        self._prune_from.pop(name, None)
