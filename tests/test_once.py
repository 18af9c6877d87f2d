"""One sandbox per create request, ever, against real Redis and dockerd + runsc: a create
delivered twice (the same request added again, a reclaim of an entry its scheduler is
still placing), or delivered again after its sandbox ended, makes no second sandbox and
no second reply; the node keeps serving."""

from __future__ import annotations

import subprocess
import time

import anyio
import msgspec
import pytest

from hotbed import keys as keyspace
from hotbed import protocol
from hotbed.client import new_id
from hotbed.protocol import (
    CreateSandbox,
    Envelope,
    Resources,
    SandboxCreated,
    SandboxSpec,
    Terminate,
)
from hotbed.records import capacity_from_hash
from tests.conftest import BUSYBOX_IMAGE, Stack, running_stack
from workers.agent import WorkerAgent
from workers.runtimes import make_runtime

pytestmark = pytest.mark.anyio


def containers_of(prefix: str, sid: str) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=dev.hotbed.prefix={prefix}",
         "--filter", f"label=dev.hotbed.sandbox={sid}"],
        capture_output=True, text=True, check=True,
    )
    return out.stdout.split()


def create_envelope(stack: Stack, *, cpu: float = 0.5, timeout: float = 60.0) -> Envelope:
    rid = new_id()
    spec = SandboxSpec(image=BUSYBOX_IMAGE, resources=Resources(cpu=cpu, memory_mb=128))
    return Envelope(
        id=rid, reply_to=stack.client.keys.reply(rid), deadline=time.time() + timeout,
        body=CreateSandbox(spec=spec),
    )


async def handled(stack: Stack, *, within: float = 30.0) -> None:
    """Every request the scheduler took is handled and acknowledged (deleted)."""
    c = stack.client
    with anyio.fail_after(within):
        while await c.redis.xlen(c.keys.requests):
            await anyio.sleep(0.05)


async def the_reply(stack: Stack, rid: str, *, within: float = 60.0) -> protocol.Reply:
    got = await stack.client.redis.blpop([stack.client.keys.reply(rid)], timeout=within)
    assert got is not None, f"no reply to {rid}"
    return protocol.decode_reply(got[1]).body


async def terminate(stack: Stack, created: SandboxCreated) -> None:
    await stack.client.worker_request(created.worker_id, Terminate(sandbox_id=created.sandbox_id), timeout=30)


async def placed_total(stack: Stack, worker_ids: list[str]) -> int:
    c = stack.client
    total = 0
    for w in worker_ids:
        total += capacity_from_hash(await c.redis.hgetall(c.keys.worker_cap(w))).sandboxes
    return total


async def test_a_create_added_twice_and_again_after_its_end_makes_one_sandbox(redis_url: str, prefix: str) -> None:
    async with running_stack(redis_url, prefix) as stack:
        c = stack.client
        env = create_envelope(stack)
        data = {keyspace.FIELD: protocol.encode(env)}
        # The same request twice at once (a client's retry).
        async with anyio.create_task_group() as tg:
            tg.start_soon(c.redis.xadd, c.keys.requests, data)
            tg.start_soon(c.redis.xadd, c.keys.requests, data)
        created = await the_reply(stack, env.id)
        assert isinstance(created, SandboxCreated), created
        await handled(stack)
        assert len(containers_of(prefix, created.sandbox_id)) == 1
        assert await placed_total(stack, [stack.worker.id]) == 1
        assert await c.redis.llen(c.keys.reply(env.id)) == 0, "answered twice"
        assert await c.redis.get(c.keys.request(env.id)) == f"placed {stack.worker.id}".encode()
        await terminate(stack, created)

        # Delivered again after its sandbox ended (within its deadline): nothing runs.
        await c.redis.xadd(c.keys.requests, data)
        await handled(stack)
        assert containers_of(prefix, created.sandbox_id) == []
        assert await placed_total(stack, [stack.worker.id]) == 0
        state = await c.redis.hget(c.keys.sandbox(created.sandbox_id), "state")
        assert state == b"terminated", state
        assert await c.redis.llen(c.keys.reply(env.id)) == 0

        # The node keeps serving.
        fresh = create_envelope(stack)
        await c.redis.xadd(c.keys.requests, {keyspace.FIELD: protocol.encode(fresh)})
        again = await the_reply(stack, fresh.id)
        assert isinstance(again, SandboxCreated), again
        await terminate(stack, again)


async def test_a_reclaimed_create_is_placed_once_across_workers(redis_url: str, prefix: str) -> None:
    """The scheduler's reclaim loop takes over a create that is still waiting for room
    (idle past ``reclaim_idle_s``); when two workers free up at once, it is still placed
    on one of them only."""
    async with running_stack(
        redis_url, prefix, worker_overrides={"cpu": 1}, scheduler_overrides={"reclaim_idle_s": 1.0},
    ) as stack, anyio.create_task_group() as tg:
        c = stack.client
        settings = msgspec.structs.replace(stack.worker.settings, worker_id=f"w2-{prefix}")
        second = WorkerAgent(settings, make_runtime(settings))
        await tg.start(second.run)
        workers = [stack.worker.id, second.id]
        try:
            assert stack.scheduler.registry is not None
            with anyio.fail_after(10):
                while second.id not in stack.scheduler.registry.workers:
                    await anyio.sleep(0.05)
            blockers = []
            for _ in workers:  # each worker full
                env = create_envelope(stack, cpu=1.0)
                await c.redis.xadd(c.keys.requests, {keyspace.FIELD: protocol.encode(env)})
                got = await the_reply(stack, env.id)
                assert isinstance(got, SandboxCreated), got
                blockers.append(got)
            assert sorted(b.worker_id for b in blockers) == sorted(workers)

            env = create_envelope(stack, cpu=1.0)
            await c.redis.xadd(c.keys.requests, {keyspace.FIELD: protocol.encode(env)})
            # Waiting for room, then reclaimed: delivered a second time.
            with anyio.fail_after(20):
                while True:
                    pending = await c.redis.xpending_range(
                        c.keys.requests, keyspace.REQUESTS_GROUP, min="-", max="+", count=10
                    )
                    if pending and pending[0]["times_delivered"] >= 2:
                        break
                    await anyio.sleep(0.1)
            # Both workers free up at once.
            async with anyio.create_task_group() as frees:
                for b in blockers:
                    frees.start_soon(terminate, stack, b)
            created = await the_reply(stack, env.id)
            assert isinstance(created, SandboxCreated), created
            await handled(stack)
            await anyio.sleep(1.0)  # long enough for a second placement to have started
            assert len(containers_of(prefix, created.sandbox_id)) == 1
            assert await placed_total(stack, workers) == 1
            assert await c.redis.llen(c.keys.reply(env.id)) == 0, "answered twice"
            await terminate(stack, created)
        finally:
            second.stopping.set()
