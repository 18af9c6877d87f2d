"""Tenants' quotas, as the scheduler enforces them.

A tenant's create takes its share of the tenant's quota (``lua.QUOTA_TAKE``: sandboxes,
CPU, memory, GPUs, creates per second, checked and taken in one step) before it is
placed, and gives it back if placement fails. A sandbox that ends is noticed by
:meth:`TenantQuotas.reconcile`: run for every tenant by the reaper's leader every
``SWEEP_S``, and for one tenant at once when a create of its finds the quota full, so
a create right after a terminate is not refused for a quota the ended sandbox no longer
uses. Nothing on the worker's path changes: the sandbox records say what has ended.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import redis.asyncio as aioredis

from daemon import lifecycle
from hotbed import records, tenants
from hotbed.keys import Keys
from hotbed.protocol import SandboxSpec
from hotbed.tenants import Quota
from scheduler.placement import parse_gpu

log = logging.getLogger(__name__)

SWEEP_S = 5.0
# A held share whose sandbox has no record yet is a create in flight; past this it is a
# create whose scheduler died before placing it, and the share goes back.
UNPLACED_GRACE_S = 600.0
_STATE = records.field_names("state")[0]


class TenantQuotas:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        # Shares this replica took for creates it is still placing.
        self._placing: set[str] = set()
        # First time a sweep saw a held share with no record (monotonic).
        self._unplaced_since: dict[str, float] = {}

    async def take(self, tenant: str, sandbox_id: str, spec: SandboxSpec) -> None:
        """Take ``spec``'s share of ``tenant``'s quota for ``sandbox_id``, or raise
        QuotaExceeded. Idempotent on ``sandbox_id``."""
        gpu = parse_gpu(spec.resources.gpu)
        need = {"millicpu": spec.resources.millicpu, "memory_mb": spec.resources.memory_mb,
                "gpus": gpu.count if gpu else 0}
        got = await tenants.take(self.redis, self.keys, tenant, sandbox_id, **need)
        if got != "ok" and got != "creates_per_s" and await self.reconcile(tenant):
            got = await tenants.take(self.redis, self.keys, tenant, sandbox_id, **need)
        if got != "ok":
            limits: Any = await self.redis.hgetall(self.keys.tenant_quota(tenant))
            raise tenants.quota_exceeded(tenant, got, Quota.from_hash(limits))
        self._placing.add(sandbox_id)

    def placed(self, sandbox_id: str) -> None:
        """Placement of ``sandbox_id`` is over (its record now says how it goes)."""
        self._placing.discard(sandbox_id)

    async def give(self, tenant: str, sandbox_id: str) -> None:
        self._placing.discard(sandbox_id)
        await tenants.give(self.redis, self.keys, tenant, sandbox_id)

    async def reconcile(self, tenant: str) -> int:
        """Give back the shares of ``tenant``'s sandboxes that have ended; how many."""
        raw: Any = await self.redis.hkeys(self.keys.tenant_held(tenant))
        held = [s.decode() for s in raw]
        if not held:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in held:
                pipe.hget(self.keys.sandbox(sid), _STATE)
            states = await pipe.execute()
        now = anyio.current_time()
        freed = 0
        for sid, state in zip(held, states, strict=True):
            if state is None:
                if sid in self._placing:
                    continue
                first = self._unplaced_since.setdefault(sid, now)
                if now - first < UNPLACED_GRACE_S:
                    continue
            elif state.decode() not in records.ENDED_STATES:
                self._unplaced_since.pop(sid, None)
                continue
            self._unplaced_since.pop(sid, None)
            if await tenants.give(self.redis, self.keys, tenant, sid):
                freed += 1
        return freed

    async def sweep(self) -> None:
        for name in await tenants.tenant_names(self.redis, self.keys):
            await self.reconcile(name)

    async def run(self, hold: Callable[[], Awaitable[bool]]) -> None:
        """Sweep every ``SWEEP_S`` while ``hold()`` says this replica leads."""

        async def step() -> None:
            if await hold():
                await self.sweep()

        await lifecycle.supervised_loop("quota sweep", step, interval=SWEEP_S, initial_delay=SWEEP_S, log=log)
