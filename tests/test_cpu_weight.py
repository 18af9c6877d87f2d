"""CPU weight: a sandbox that nobody runs commands in yet (restoring, or idle in a warm
pool) runs at a low CPU weight; it gets the normal weight once handed out (a
client's restore when it is reported started, a pool's at claim), so a claimed
sandbox's first command wins the CPU from pool refills and restores."""

from __future__ import annotations

import secrets
from pathlib import Path

import anyio
import pytest

from hotbed import templates
from hotbed.sandbox import Sandbox
from tests.conftest import BUSYBOX_IMAGE, Stack, restart_worker, running_stack

pytestmark = pytest.mark.anyio


async def cpu_weight(stack: Stack, sandbox_id: str) -> float:
    """The sandbox's container cgroup's CPU weight as the kernel has it, as a fraction
    of the default (cgroup v1 ``cpu.shares`` 1024, v2 ``cpu.weight`` 100)."""
    engine = stack.worker.runtime.engine  # type: ignore[attr-defined]
    cid = (await engine.show(sandbox_id))["Id"]
    parent = engine.cgroup_parent.strip("/")
    for path, default in ((f"/sys/fs/cgroup/cpu/{parent}/{cid}/cpu.shares", 1024),
                          (f"/sys/fs/cgroup/{parent}/{cid}/cpu.weight", 100)):
        if await anyio.Path(path).exists():
            return int(await anyio.Path(path).read_text()) / default
    pytest.skip("no cgroupfs CPU weight file for the container (systemd driver?)")


async def pool_filled(stack: Stack, pool: str) -> None:
    c = stack.client
    with anyio.fail_after(120):
        while await c.redis.llen(c.keys.pool_ready(pool)) < 1:
            await anyio.sleep(0.05)


async def the_pooled(stack: Stack, pool: str) -> str:
    """The one ready sandbox of ``pool``, checked to idle at the low weight."""
    c = stack.client
    (item,) = await c.redis.lrange(c.keys.pool_ready(pool), 0, -1)
    pooled = (item.decode() if isinstance(item, bytes) else str(item)).split()[0]
    assert await cpu_weight(stack, pooled) <= 1 / 16
    return pooled


async def claim_is_raised(stack: Stack, template: str, pooled: str) -> None:
    """Claim ``pooled``: its first command finds it at the normal weight."""
    warm = await Sandbox.create(template=template, memory_mb=64, client=stack.client)
    try:
        assert warm.path == "warm" and warm.id == pooled
        # The claim notice is handled before the first command on the same stream.
        assert (await warm.exec("echo", "hi")).stdout == "hi\n"
        assert await cpu_weight(stack, warm.id) == 1
    finally:
        await warm.terminate()


@pytest.mark.timeout(300)
async def test_pooled_sandboxes_idle_at_a_low_weight_until_claimed(stack: Stack) -> None:
    c = stack.client
    name = f"cw-{secrets.token_hex(3)}"
    await templates.create_template(name, image=BUSYBOX_IMAGE, memory_mb=64, client=c)
    restored = await Sandbox.create(template=name, memory_mb=64, client=c)
    try:
        assert restored.path == "restore"
        assert await cpu_weight(stack, restored.id) == 1
    finally:
        await restored.terminate()

    pool = await templates.set_pool(name, 1, memory_mb=64, client=c)
    try:
        await pool_filled(stack, pool)
        await claim_is_raised(stack, name, await the_pooled(stack, pool))
    finally:
        await templates.set_pool(name, 0, memory_mb=64, client=c)


@pytest.mark.timeout(300)
async def test_a_pooled_sandbox_taken_back_by_a_restarted_worker_is_raised_at_claim(
    redis_url: str, prefix: str, tmp_path: Path,
) -> None:
    """The low weight is in the container's cgroup, which outlives the worker; the
    worker that takes the pool back must still raise it when the sandbox is claimed."""
    async with running_stack(
        redis_url, prefix,
        worker_overrides={"snapshot_dir": str(tmp_path / "snapshots"), "cpu": 16, "drain_on_stop": False},
        scheduler_overrides={"pool_interval_s": 0.05, "pool_refill_per_s": 50.0},
    ) as stack:
        c = stack.client
        name = f"cw-{secrets.token_hex(3)}"
        await templates.create_template(name, image=BUSYBOX_IMAGE, memory_mb=64, client=c)
        pool = await templates.set_pool(name, 1, memory_mb=64, client=c)
        try:
            await pool_filled(stack, pool)
            async with anyio.create_task_group() as tg:
                await restart_worker(stack, tg, drain_on_stop=True)
                try:
                    pooled = await the_pooled(stack, pool)
                    assert pooled in stack.worker.sandboxes
                    await claim_is_raised(stack, name, pooled)
                finally:
                    await templates.set_pool(name, 0, memory_mb=64, client=c)
                    stack.worker.stopping.set()
        finally:
            await templates.set_pool(name, 0, memory_mb=64, client=c)
