"""The control plane under many requests, on simulated workers (functional, not timing).

Everything here runs on the ``sim`` runtime (no containers): these tests load the
scheduler, the Redis schema and the worker protocol, and say nothing about real
sandboxes. 10 simulated workers and 2 scheduler replicas take 5,000 creates: each is
placed exactly once and answered exactly once. A backlog past its limit answers
Overloaded at once, and the backlog is served once a scheduler runs.
"""

from __future__ import annotations

import collections
from typing import Any

import anyio
import msgspec
import pytest

from hotbed import keys as keyspace
from hotbed.client import Client
from hotbed.errors import Overloaded, SandboxNotFound
from hotbed.protocol import CreateSandbox, Resources, SandboxCreated, SandboxSpec
from hotbed.sandbox import Sandbox
from scheduler.config import SchedulerSettings
from scheduler.service import Scheduler
from workers.config import WorkerSettings
from workers.runtimes.sim import SimParams, SimRuntime
from workers.simfleet import SimFleet

pytestmark = pytest.mark.anyio

# Simulated workers isolate nothing: the creates opt out.
SPEC = SandboxSpec(image="sim", resources=Resources(cpu=0.1, memory_mb=64), timeout=600, allow_unisolated=True)


def fleet_for(redis_url: str, prefix: str, *, workers: int, params: SimParams) -> SimFleet:
    base = msgspec.convert(
        {"redis_url": redis_url, "prefix": prefix, "runtime": "sim", "cpu": 1000.0,
         "memory_mb": 1 << 22, "max_concurrency": 256, "heartbeat_s": 0.2,
         "reconcile_s": 30.0, "shutdown_grace_s": 2.0},
        WorkerSettings,
    )
    return SimFleet(base, workers=workers, id_prefix=f"{prefix}-sim", params=params)


def scheduler_for(redis_url: str, prefix: str, name: str, **overrides: Any) -> Scheduler:
    return Scheduler(msgspec.convert(
        {"redis_url": redis_url, "prefix": prefix, "name": name, "registry_refresh_s": 0.1,
         "heartbeat_ttl_s": 3.0, "shutdown_grace_s": 2.0, **overrides},
        SchedulerSettings,
    ))


async def wait_for_workers(scheduler: Scheduler, n: int) -> None:
    assert scheduler.registry is not None
    with anyio.fail_after(10):
        while len(scheduler.registry.workers) < n:
            await scheduler.registry.refresh()
            await anyio.sleep(0.02)


async def test_5000_creates_two_schedulers_ten_workers(redis_url: str, prefix: str) -> None:
    """No duplicate placement, no lost request, every reply delivered (simulated runtime)."""
    n = 5000
    fleet = fleet_for(redis_url, prefix, workers=10, params=SimParams(create_s=0.002, exec_s=0.0))
    schedulers = [scheduler_for(redis_url, prefix, f"s{i}", batch=64) for i in range(2)]
    replies: dict[str, SandboxCreated] = {}
    errors: list[BaseException] = []
    keys = keyspace.Keys(prefix)
    async with anyio.create_task_group() as tg:
        for s in schedulers:
            await tg.start(s.run)
        await tg.start(fleet.run)
        for s in schedulers:
            await wait_for_workers(s, 10)
        async with Client(redis_url, prefix=prefix) as client:
            limiter = anyio.CapacityLimiter(400)

            async def create(i: int) -> None:
                async with limiter:
                    try:
                        reply = await client.request(CreateSandbox(spec=SPEC), timeout=60)
                    except Exception as exc:  # noqa: BLE001 - collected and asserted below
                        errors.append(exc)
                        return
                assert isinstance(reply, SandboxCreated)
                replies[f"{i}"] = reply

            with anyio.fail_after(90):
                async with anyio.create_task_group() as load:
                    for i in range(n):
                        load.start_soon(create, i)

            # Every request answered, once, with a distinct sandbox.
            assert errors == []
            assert len(replies) == n
            sids = [r.sandbox_id for r in replies.values()]
            assert len(set(sids)) == n
            # Each sandbox reserved on exactly one worker, and started there exactly once.
            holders: collections.Counter[str] = collections.Counter()
            for agent in fleet.agents:
                for raw in await client.redis.hkeys(keys.worker_sandboxes(agent.id)):
                    holders[raw.decode()] += 1
            assert set(holders) == set(sids)
            assert max(holders.values()) == 1
            assert sum(a.runtime.created for a in fleet.agents) == n  # type: ignore[attr-defined]
            assert sum(s.placed for s in schedulers) == n
            # Both replicas took part; the load spread over the workers.
            assert all(s.placed > 0 for s in schedulers), [s.placed for s in schedulers]
            assert sum(1 for a in fleet.agents if a.sandboxes) == 10
            # The reply each client got names the worker that holds the sandbox.
            for r in list(replies.values())[:200]:
                assert await client.redis.hexists(keys.worker_sandboxes(r.worker_id), r.sandbox_id)
            # Nothing left in any stream or pending list; no reply left unread.
            assert await client.redis.xlen(keys.requests) == 0
            pending = await client.redis.xpending(keys.requests, keyspace.REQUESTS_GROUP)
            assert pending["pending"] == 0
            assert [k async for k in client.redis.scan_iter(match=f"{prefix}:reply:*")] == []
            rec = await client.record(replies["0"].sandbox_id)
            assert rec.state == "running" and rec.worker == replies["0"].worker_id
        fleet.stop()
        for s in schedulers:
            s.stopping.set()


async def test_backlog_past_limit_is_overloaded_then_served(redis_url: str, prefix: str) -> None:
    limit = 40
    keys = keyspace.Keys(prefix)
    done: list[SandboxCreated] = []
    all_done = anyio.Event()
    async with Client(redis_url, prefix=prefix, backlog_limit=limit) as client:
        async with anyio.create_task_group() as tg:

            async def create() -> None:
                reply = await client.request(CreateSandbox(spec=SPEC), timeout=30)
                assert isinstance(reply, SandboxCreated)
                done.append(reply)
                if len(done) == limit:
                    all_done.set()

            for _ in range(limit):
                tg.start_soon(create)
            # No scheduler yet: the backlog fills to its limit and stays there.
            with anyio.fail_after(10):
                while True:  # the backlog lives in Redis: poll it
                    if await client.redis.xlen(keys.requests) >= limit:
                        break
                    await anyio.sleep(0.01)
            started = anyio.current_time()
            with pytest.raises(Overloaded):
                await client.request(CreateSandbox(spec=SPEC), timeout=30)
            assert anyio.current_time() - started < 1.0, "Overloaded must come at once"
            # A scheduler and a simulated worker arrive: the backlog drains, nothing lost.
            scheduler = scheduler_for(redis_url, prefix, "s0")
            fleet = fleet_for(redis_url, prefix, workers=1, params=SimParams().scaled(0))
            await tg.start(scheduler.run)
            await tg.start(fleet.run)
            with anyio.fail_after(20):
                await all_done.wait()
            fleet.stop()
            scheduler.stopping.set()
    assert len({r.sandbox_id for r in done}) == limit


async def test_sim_runtime_serves_the_sdk(redis_url: str, prefix: str) -> None:
    """The SDK works end to end on a simulated worker (labelled simulated in WorkerInfo)."""
    fleet = fleet_for(redis_url, prefix, workers=1, params=SimParams().scaled(0))
    scheduler = scheduler_for(redis_url, prefix, "s0")
    async with anyio.create_task_group() as tg:
        await tg.start(scheduler.run)
        await tg.start(fleet.run)
        await wait_for_workers(scheduler, 1)
        assert scheduler.registry is not None
        assert [w.info.kind for w in scheduler.registry.live()] == ["simulated"]
        async with Client(redis_url, prefix=prefix) as client:
            sb = await Sandbox.create("sim", cpu=0.5, memory_mb=64, allow_unisolated=True, client=client)
            assert (await sb.exec("echo", "hi")).stdout == "hi\n"
            assert (await sb.exec("exit 3", shell=True)).exit_code == 3
            await sb.write_file("/tmp/a.txt", b"data")
            assert await sb.read_file("/tmp/a.txt") == b"data"
            await sb.terminate()
            with pytest.raises(SandboxNotFound):
                await sb.exec("echo", "again")
        fleet.stop()
        scheduler.stopping.set()


async def test_sim_params_scale() -> None:
    p = SimParams()
    assert p.scaled(0).create_s == 0 and p.scaled(2).exec_s == pytest.approx(2 * p.exec_s)
    rt = SimRuntime(SimParams(jitter=0.0).scaled(0))
    assert rt.kind == "simulated"
    assert rt.statistics()["sandboxes"] == 0


async def test_pool_prune_walks_a_large_pool_in_slices(redis_url: str, prefix: str) -> None:
    """The pool controller's safety net checks a bounded slice per tick and still reaches
    every entry: dead ones anywhere in a pool larger than a slice are dropped."""
    from scheduler import pools

    keys = keyspace.Keys(prefix)
    n, dead = 2 * pools.PRUNE_SLICE + 500, {7, pools.PRUNE_SLICE + 3, 2 * pools.PRUNE_SLICE + 499}
    async with Client(redis_url, prefix=prefix) as client:
        r = client.redis
        async with r.pipeline(transaction=False) as pipe:
            for i in range(n):
                pipe.rpush(keys.pool_ready("p"), f"sb-{i} w")
                pipe.hset(keys.sandbox(f"sb-{i}"), mapping={"state": "failed" if i in dead else "pooled"})
            await pipe.execute()
        # Pruning needs neither placement nor the leader lock.
        ctl = pools.PoolController(r, keys, None, None, settings=SchedulerSettings())  # type: ignore[arg-type]
        seen = []
        for _ in range(3):
            await ctl._prune("p", "no-template")
            seen.append(await r.llen(keys.pool_ready("p")))
        assert seen[-1] == n - len(dead)
        assert seen[0] > n - len(dead), "one tick must not have walked the whole pool"
        left = {x.decode() for x in await r.lrange(keys.pool_ready("p"), 0, -1)}
        assert not {f"sb-{i} w" for i in dead} & left
