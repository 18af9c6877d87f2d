"""Templates, memory snapshots, warm pools, snapshot/fork/pause.

Real Redis, real dockerd + runsc, the busybox image. Each test gets its own prefix and
snapshot directory; teardown fails the test if a container with its prefix is left.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import pytest

from hotbed import lua, templates
from hotbed.client import Client
from hotbed.errors import CapacityExhausted, SandboxNotRunning, SetupFailed, TemplateNotFound
from hotbed.protocol import Resources, SandboxSpec
from hotbed.records import capacity_from_hash
from hotbed.sandbox import Sandbox
from tests.conftest import (
    BUSYBOX_IMAGE,
    Stack,
    docker_available,
    image_exists,
    leftover_containers,
    restart_worker,
    running_stack,
    start_stack,
    stop_stack,
)

pytestmark = pytest.mark.anyio

# A process that keeps, in memory only, a value read (then deleted) during set-up, and
# answers /tmp/ask by writing it to /tmp/answer: proof that memory state was restored.
KEEPER = (
    "X=$(cat /tmp/seed); rm -f /tmp/seed; "
    "while :; do if [ -e /tmp/ask ]; then rm -f /tmp/ask; echo \"$X\" > /tmp/answer; fi; sleep 0.05; done"
)


@pytest.fixture
async def stack(redis_url: str, prefix: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(
        redis_url, prefix,
        # Capacity is reserved per requested CPU: declare room for a pool of 50 on
        # this 2-core box rather than throttle each sandbox to a sliver of a core.
        worker_overrides={"snapshot_dir": str(tmp_path / "snapshots"), "reconcile_s": 0.3,
                          "cpu": 64},
        scheduler_overrides={"pool_interval_s": 0.05, "pool_refill_per_s": 50.0,
                             "pool_max_warming": 8},
    ) as stack:
        yield stack


async def keeper_template(stack: Stack, seed: str, name: str | None = None) -> str:
    name = name or f"keep-{secrets.token_hex(3)}"
    await templates.create_template(
        name, image=BUSYBOX_IMAGE, files={"/tmp/seed": seed}, run=["echo set-up ran > /tmp/setup"],
        start=[KEEPER], ready="test ! -e /tmp/seed", client=stack.client, memory_mb=128,
    )
    return name


async def ask(sb: Sandbox) -> str:
    """The keeper's in-memory value, asked through the file system."""
    res = await sb.run(
        "touch /tmp/ask; i=0; while [ ! -s /tmp/answer ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done;"
        " cat /tmp/answer; rm -f /tmp/answer"
    )
    return res.stdout.strip()


async def wait_for(cond, what: str, timeout: float = 90.0) -> None:  # type: ignore[no-untyped-def]
    with anyio.fail_after(timeout):
        while not await cond():
            await anyio.sleep(0.05)


async def ready_ids(c: Client, pool: str) -> list[str]:
    """Sandbox ids on the pool's ready list."""
    return [i.decode().split()[0] for i in await c.redis.lrange(c.keys.pool_ready(pool), 0, -1)]


async def pool_drained(stack: Stack) -> bool:
    return not any(s.pool for s in stack.worker.sandboxes.values())


async def test_restored_sandbox_keeps_template_memory_and_is_isolated(stack: Stack) -> None:
    seed = secrets.token_hex(8)
    name = await keeper_template(stack, seed)
    rec = await templates.get_template(name, client=stack.client)
    assert rec.state == "ready" and rec.snapshot and rec.size_bytes > 0
    assert rec.holders == [stack.worker.id]
    # make test registers hotbed's runsc wrapper: restores skip containerd's import.
    assert getattr(stack.worker.runtime, "direct_restore", False)
    a = await Sandbox.create(template=name, memory_mb=128, client=stack.client)
    b = await Sandbox.create(template=name, memory_mb=128, client=stack.client)
    try:
        assert a.path == b.path == "restore"
        assert a.id != b.id
        # The value lives only in the keeper's memory (set-up deleted the file).
        assert (await a.run("ls /tmp/seed 2>&1; cat /tmp/setup")).stdout.endswith("set-up ran\n")
        assert await ask(a) == seed
        assert await ask(b) == seed
        # Files and processes of one restored sandbox are invisible to the other.
        await a.write_file("/tmp/only-a", "a")
        await a.spawn("sleep 777")
        await wait_for(lambda: _has_proc(a, "sleep 777"), "spawned process")
        assert not (await b.run("test -e /tmp/only-a")).ok
        assert not await _has_proc(b, "sleep 777")
    finally:
        await a.terminate()
        await b.terminate()


async def _has_proc(sb: Sandbox, pattern: str) -> bool:
    return pattern in (await sb.run("ps -o args")).stdout


async def test_restore_through_dockerd_without_the_wrapper(redis_url: str, prefix: str, tmp_path: Path) -> None:
    """runsc registered alone ("runsc-plain", no wrapper): checkpoints are runsc's
    compressed ones and restores take dockerd's road, `docker start --checkpoint`."""
    async with running_stack(
        redis_url, prefix,
        worker_overrides={"snapshot_dir": str(tmp_path / "snapshots"), "oci_runtime": "runsc-plain"},
    ) as stack:
        assert not getattr(stack.worker.runtime, "direct_restore", True)
        seed = secrets.token_hex(8)
        name = await keeper_template(stack, seed)
        async with await Sandbox.create(template=name, memory_mb=128, client=stack.client) as sb:
            assert sb.path == "restore"
            assert await ask(sb) == seed


async def test_failed_setup_reports_its_output(stack: Stack) -> None:
    name = f"bad-{secrets.token_hex(3)}"
    with pytest.raises(SetupFailed) as err:
        await templates.create_template(
            name, image=BUSYBOX_IMAGE, memory_mb=128, client=stack.client,
            run=["echo fine", "echo the-reason-it-broke >&2; exit 3"],
        )
    assert "the-reason-it-broke" in str(err.value)
    assert "exited with 3" in str(err.value)
    rec = await templates.get_template(name, client=stack.client)
    assert rec.state == "failed" and "the-reason-it-broke" in rec.error
    with pytest.raises(TemplateNotFound):
        await Sandbox.create(template="no-such-template", client=stack.client)


async def test_warm_pool_claims_and_refills(stack: Stack) -> None:
    seed = secrets.token_hex(8)
    name = await keeper_template(stack, seed)
    c = stack.client
    pool = await templates.set_pool(name, 3, memory_mb=128, client=c)

    async def full() -> bool:
        return await c.redis.llen(c.keys.pool_ready(pool)) == 3

    await wait_for(full, "pool filled")
    sb = await Sandbox.create(
        template=name, memory_mb=128, env={"CLAIM_VAR": "v1"}, tags={"who": "me"}, timeout=30,
        client=c,
    )
    try:
        assert sb.path == "warm"
        rec = await sb.info()
        assert rec.state == "running" and rec.tags == {"who": "me"} and rec.timeout == 30
        # Lifetime starts at claim, not at warm-up.
        assert rec.created_at >= rec.started_at
        assert (await sb.run("echo $CLAIM_VAR")).stdout == "v1\n"
        assert await ask(sb) == seed
        assert sb.id in [r.id for r in await Sandbox.list(client=c)]
        await wait_for(full, "pool refilled")
        local = stack.worker.sandboxes[sb.id]
        assert local.pool == "" and local.expires_at <= rec.created_at + 30.001
        # A claimer that vanishes between POOL_CLAIM and finishing its claim: the lease
        # expires and the pool controller puts the still-pooled sandbox back.
        ready, claims = c.keys.pool_ready(pool), c.keys.pool_claims(pool)
        item, _now = await lua.POOL_CLAIM.run(c.redis, [ready, claims], [50])

        async def taken_back() -> bool:
            return item in await c.redis.lrange(ready, 0, -1) and not await c.redis.zcard(claims)

        await wait_for(taken_back, "abandoned claim taken back")
        assert (await c.record(item.decode().split()[0])).state == "pooled"
    finally:
        await sb.terminate()
        await templates.set_pool(name, 0, memory_mb=128, client=c)

    await wait_for(lambda: pool_drained(stack), "pool drained")


@pytest.mark.timeout(300)
async def test_concurrent_claims_hand_out_each_pooled_sandbox_once(stack: Stack) -> None:
    """200 claims race for a pool of 50: 50 get distinct warm sandboxes, the rest find the
    pool empty and fall back (a few of them are carried through restore here; 150 full
    restores would cost this 2-core box half a minute and prove nothing more)."""
    name = f"race-{secrets.token_hex(3)}"
    await templates.create_template(name, image=BUSYBOX_IMAGE, memory_mb=32, client=stack.client)
    c = stack.client
    pool = await templates.set_pool(name, 50, memory_mb=32, client=c)

    async def full() -> bool:
        return await c.redis.llen(c.keys.pool_ready(pool)) >= 50

    await wait_for(full, "pool of 50 filled", timeout=240)
    # No refills during the race: exactly 200 claims against 50 entries.
    stack.scheduler.settings = msgspec.structs.replace(stack.scheduler.settings, pool_max_warming=0)
    spec = SandboxSpec(template=name, resources=Resources(memory_mb=32))
    got: list[str] = []
    empty = 0

    async def claim() -> None:
        nonlocal empty
        r = await templates.claim_nowait(spec, client=c)
        if r is None:
            empty += 1
        else:
            got.append(r.sandbox_id)

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(claim)
    assert len(got) + empty == 200
    assert len(set(got)) == len(got), "a pooled sandbox was handed out twice"
    assert len(got) == 50 and empty == 150
    assert await c.redis.zcard(c.keys.pool_claims(pool)) == 0
    restored = [await Sandbox.create(template=name, memory_mb=32, client=c) for _ in range(2)]
    assert [s.path for s in restored] == ["restore", "restore"]
    claimed = [Sandbox(sid, stack.worker.id, client=c) for sid in got]
    assert (await claimed[0].run("echo ok")).stdout == "ok\n"
    async with anyio.create_task_group() as tg:
        for s in claimed + restored:
            tg.start_soon(s.terminate)
    await templates.set_pool(name, 0, memory_mb=32, client=c)


async def test_dead_pooled_sandbox_is_replaced_never_handed_out(stack: Stack) -> None:
    name = f"die-{secrets.token_hex(3)}"
    await templates.create_template(name, image=BUSYBOX_IMAGE, memory_mb=32, client=stack.client)
    c = stack.client
    pool = await templates.set_pool(name, 2, memory_mb=32, client=c)

    async def full() -> bool:
        return len(await ready_ids(c, pool)) == 2

    await wait_for(full, "pool filled")
    victim = (await ready_ids(c, pool))[0]
    proc = await anyio.run_process(["docker", "rm", "-f", f"hotbed-{victim}"], check=False)
    assert proc.returncode == 0

    async def replaced() -> bool:
        ids = await ready_ids(c, pool)
        return len(ids) == 2 and victim not in ids

    await wait_for(replaced, "dead pooled sandbox replaced")
    rec = await c.record(victim)
    assert rec.state == "failed"
    sbs = [await Sandbox.create(template=name, memory_mb=32, client=c) for _ in range(2)]
    try:
        assert victim not in [s.id for s in sbs]
        assert all(s.path == "warm" for s in sbs)
    finally:
        await templates.set_pool(name, 0, memory_mb=32, client=c)
        for s in sbs:
            await s.terminate()

    await wait_for(lambda: pool_drained(stack), "pool drained")


async def test_rebuilt_template_replaces_its_pooled_sandboxes(stack: Stack) -> None:
    """Rebuilding a template (same name, new set-up) replaces the sandboxes pooled from
    its old snapshot: claims afterwards get the new set-up."""
    name = f"rebuild-{secrets.token_hex(3)}"
    c = stack.client

    async def build(version: str) -> str:
        r = await templates.create_template(
            name, image=BUSYBOX_IMAGE, files={"/tmp/version": version}, memory_mb=32, client=c,
        )
        return r.snapshot

    first = await build("v1")
    pool = await templates.set_pool(name, 2, memory_mb=32, client=c)

    async def full() -> bool:
        return len(await ready_ids(c, pool)) == 2

    await wait_for(full, "pool filled")
    old = await ready_ids(c, pool)
    assert {(await c.record(i)).snapshot for i in old} == {first}
    second = await build("v2")
    assert second != first
    # At once, before any pool tick: the rebuild retired the old entries itself.
    now = await Sandbox.create(template=name, memory_mb=32, client=c)
    try:
        assert (await now.run("cat /tmp/version")).stdout == "v2"
    finally:
        await now.terminate()

    async def replaced() -> bool:
        ids = await ready_ids(c, pool)
        return len(ids) == 2 and not set(ids) & set(old)

    await wait_for(replaced, "pool refilled from the new snapshot")
    assert {(await c.record(i)).snapshot for i in await ready_ids(c, pool)} == {second}
    assert {(await c.record(i)).reason for i in old} == {"template rebuilt"}
    sb = await Sandbox.create(template=name, memory_mb=32, client=c)
    try:
        assert sb.path == "warm"
        assert (await sb.run("cat /tmp/version")).stdout == "v2"
    finally:
        await sb.terminate()
        await templates.set_pool(name, 0, memory_mb=32, client=c)

    await wait_for(lambda: pool_drained(stack), "pool drained")


async def test_snapshot_and_fork_give_independent_children(stack: Stack) -> None:
    c = stack.client
    # Checkpointing is charged to the sandbox's own memory limit (the gVisor sentry
    # serializes it): leave headroom.
    parent = await Sandbox.create(BUSYBOX_IMAGE, memory_mb=256, client=c)
    try:
        await parent.write_file("/tmp/seed", "forked-state")
        await parent.spawn(KEEPER)
        await wait_for(lambda: _gone(parent, "/tmp/seed"), "keeper read its seed")
        kids = await parent.fork(3)
        try:
            assert len({k.id for k in kids}) == 3 and all(k.path == "restore" for k in kids)
            for k in kids:
                assert await ask(k) == "forked-state"
            await kids[0].write_file("/tmp/mine", "0")
            assert not (await kids[1].run("test -e /tmp/mine")).ok
            assert not (await parent.run("test -e /tmp/mine")).ok
            # The parent kept running through the checkpoint.
            assert await ask(parent) == "forked-state"
        finally:
            for k in kids:
                await k.terminate()
        # A named snapshot is an ordinary template.
        name = await parent.snapshot(f"from-{secrets.token_hex(3)}")
        rec = await templates.get_template(name, client=c)
        assert rec.source == parent.id and rec.state == "ready"
        child = await Sandbox.create(template=name, memory_mb=256, client=c)
        try:
            assert await ask(child) == "forked-state"
        finally:
            await child.terminate()
        # Unreferenced snapshots are collected.
        await templates.delete_template(name, client=c)
        removed = await stack.worker.snapshots.collect(grace_s=0)
        assert rec.snapshot in removed
        assert not (stack.worker.snapshots.path(rec.snapshot)).exists()
    finally:
        await parent.terminate()


async def _gone(sb: Sandbox, path: str) -> bool:
    return not (await sb.run(f"test -e {path}")).ok


async def test_pause_resume_survives_worker_restart(redis_url: str, prefix: str, tmp_path: Path) -> None:
    if not docker_available() or not image_exists(BUSYBOX_IMAGE):
        pytest.fail("dockerd with runsc and the busybox image are needed: run `make test`")
    overrides = {"snapshot_dir": str(tmp_path / "snapshots"), "drain_on_stop": False, "cpu": 16,
                 "memory_mb": 1024}
    async with anyio.create_task_group() as tg:
        stack = await start_stack(redis_url, prefix, tg=tg, worker_overrides=overrides)
        c = stack.client
        sb = await Sandbox.create(BUSYBOX_IMAGE, memory_mb=256, client=c)

        async def free() -> tuple[int, int]:
            cap = capacity_from_hash(await c.redis.hgetall(c.keys.worker_cap(stack.worker.id)))
            return cap.cpu_free, cap.mem_free

        running = await free()
        try:
            await sb.write_file("/tmp/seed", "paused-state")
            await sb.spawn(KEEPER)
            await wait_for(lambda: _gone(sb, "/tmp/seed"), "keeper read its seed")
            await sb.write_file("/tmp/file", "kept")
            await sb.pause()
            assert (await sb.info()).state == "paused"
            with pytest.raises(SandboxNotRunning):
                await sb.run("true")
            # Restart the worker: the paused sandbox is adopted, not ended.
            worker = await restart_worker(stack, tg, drain_on_stop=True)
            settings = worker.settings
            assert worker.sandboxes[sb.id].paused
            await anyio.sleep(3 * settings.reconcile_s)  # the health check must leave it be
            assert (await sb.info()).state == "paused"
            # Paused, it holds no CPU or memory (also as re-registered after the restart);
            # with the worker full, resume says so and the sandbox stays paused.
            assert await free() == (running[0] + 1000, running[1] + 256)
            filler = await Sandbox.create(BUSYBOX_IMAGE, cpu=0.5, memory_mb=(await free())[1], client=c)
            with pytest.raises(CapacityExhausted):
                await sb.resume()
            assert (await sb.info()).state == "paused" and (await free())[1] == 0
            await filler.terminate()
            await sb.resume()
            assert await free() == running
            assert (await sb.info()).state == "running"
            assert (await sb.read_file("/tmp/file")) == b"kept"
            assert await ask(sb) == "paused-state"
            # And once more, for a sandbox that was resumed before.
            await sb.pause()
            await sb.resume()
            assert await ask(sb) == "paused-state"
        finally:
            with anyio.CancelScope(shield=True):
                await sb.terminate()
                await stop_stack(stack)
    left = leftover_containers(prefix)
    assert not left, f"test leaked containers: {left}"


async def test_local_store_copies_a_missing_snapshot(tmp_path: Path) -> None:
    """A node that lacks a snapshot copies it from the store (a shared directory here)."""
    from workers.snapshots import LocalStore

    store, cache = LocalStore(tmp_path / "store"), LocalStore(tmp_path / "cache")
    src = tmp_path / "built" / "snap-abc"
    (src / "checkpoint").mkdir(parents=True)
    (src / "checkpoint" / "checkpoint.img").write_bytes(b"memory")
    (src / "container.json").write_text("{}")
    await store.put("snap-abc", src)
    assert await store.list() == ["snap-abc"]
    dest = cache.root / "snap-abc"
    cache.root.mkdir()
    assert await store.fetch("snap-abc", dest)
    assert (dest / "checkpoint" / "checkpoint.img").read_bytes() == b"memory"
    assert not await store.fetch("snap-missing", cache.root / "snap-missing")
    await store.delete("snap-abc")
    assert await store.list() == []
