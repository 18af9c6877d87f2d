"""Never destroy on doubt, against real Redis (and dockerd + runsc where sandboxes run):
a worker whose heartbeats lapsed for 6 s comes back with every sandbox intact; a worker
whose clock runs behind is neither drained nor has its sandboxes expired; snapshot
collection facing an empty template set (a Redis that lost its data) deletes nothing."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from daemon import lifecycle
from hotbed import records, templates
from hotbed.client import Client
from hotbed.keys import Keys
from hotbed.records import capacity_from_hash
from hotbed.sandbox import Sandbox
from tests.conftest import BUSYBOX_IMAGE, Stack, running_stack
from workers import agent as agent_module
from workers import sandboxes as sandboxes_module
from workers.runtimes.docker.engine import container_name
from workers.sandboxes import SandboxTable
from workers.snapshots import SnapshotManager

pytestmark = pytest.mark.anyio


async def state_of(c: Client, sid: str) -> str:
    raw = await c.redis.hget(c.keys.sandbox(sid), "state")
    return raw.decode() if raw else ""


async def running_in_docker(sid: str) -> bool:
    got = await anyio.run_process(
        ["docker", "inspect", "-f", "{{.State.Running}}", container_name(sid)], check=False
    )
    return got.stdout.decode().strip() == "true"


async def capacity(stack: Stack) -> records.Capacity:
    c = stack.client
    return capacity_from_hash(await c.redis.hgetall(c.keys.worker_cap(stack.worker.id)))


async def test_a_six_second_heartbeat_gap_kills_nothing(redis_url: str, prefix: str) -> None:
    """The worker's heartbeat loop stalls for 6 s (twice the scheduler's heartbeat
    TTL): the reaper declares it dead and drops its keys. When the loop runs again the
    worker takes its sandbox back (reservation, record) instead of removing it."""
    async with running_stack(redis_url, prefix) as stack:
        c = stack.client
        w = stack.worker
        async with await Sandbox.create(BUSYBOX_IMAGE, client=c, cpu=1.0) as sb:
            assert (await sb.exec("echo", "before")).stdout == "before\n"
            full = w.info.cpu_millis
            assert (await capacity(stack)).cpu_free == full - 1000
            fast = w.settings
            w.settings = msgspec.structs.replace(fast, heartbeat_s=6.0)
            # Declared dead meanwhile: its sandbox marked lost, its keys gone.
            with anyio.fail_after(15):
                while await state_of(c, sb.id) != "lost":
                    await anyio.sleep(0.05)
            assert not await c.redis.exists(c.keys.worker_cap(w.id))
            w.settings = fast
            # Back: the same sandbox runs on, held and accounted for again.
            with anyio.fail_after(20):
                while await state_of(c, sb.id) != "running" or not await c.redis.exists(c.keys.worker_cap(w.id)):
                    await anyio.sleep(0.05)
            assert await running_in_docker(sb.id)
            assert sb.id in w.sandboxes
            cap = await capacity(stack)
            assert (cap.cpu_free, cap.sandboxes) == (full - 1000, 1), cap
            assert await c.redis.zscore(c.keys.sandboxes, sb.id) is not None
            assert await c.redis.ttl(c.keys.sandbox(sb.id)) == -1, "the record still expires"
            assert (await sb.exec("echo", "after")).stdout == "after\n"
        # The node keeps serving, and the end gives everything back.
        async with await Sandbox.create(BUSYBOX_IMAGE, client=c) as fresh:
            assert (await fresh.exec("true")).ok
        cap = await capacity(stack)
        assert (cap.cpu_free, cap.sandboxes) == (w.info.cpu_millis, 0), cap


class _Behind:
    """``daemon.lifecycle`` as a worker whose clock runs ``by`` seconds behind sees it."""

    def __init__(self, by: float) -> None:
        self.by = by

    def __getattr__(self, name: str) -> Any:
        return getattr(lifecycle, name)

    def wall(self) -> float:
        return time.time() - self.by


async def test_a_worker_clock_running_behind_neither_drains_nor_expires(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_module, "lifecycle", _Behind(8.0))
    monkeypatch.setattr(sandboxes_module, "lifecycle", _Behind(8.0))
    async with running_stack(redis_url, prefix) as stack:
        c = stack.client
        async with await Sandbox.create(BUSYBOX_IMAGE, client=c, timeout=60) as sb:
            # Longer than the scheduler's heartbeat TTL (3 s) and than the skew's share
            # of it: a worker's clock is never compared with the scheduler's.
            await anyio.sleep(4.0)
            assert await state_of(c, sb.id) == "running"
            assert await c.redis.exists(c.keys.worker_cap(stack.worker.id))
            assert (await sb.exec("echo", "alive")).stdout == "alive\n"
            assert await running_in_docker(sb.id)


async def test_gc_with_an_empty_template_set_deletes_no_snapshot(redis_url: str, prefix: str, tmp_path: Path) -> None:
    keys = Keys(prefix)
    client = Client(redis_url, prefix=prefix)
    try:
        table = SandboxTable(None, worker_id=f"w-{prefix}", prefix=prefix, keys=keys)  # type: ignore[arg-type]
        table.bind(client.redis)
        snapshots = SnapshotManager(table, None, guests=None, snapshot_dir=os.fspath(tmp_path))  # type: ignore[arg-type]
        for name in ("snap-kept", "snap-old"):
            await anyio.Path(tmp_path / name).mkdir()
            await anyio.Path(tmp_path / name / "data").write_bytes(b"x")
        # Redis knows no template at all (it lost its data): nothing is collected.
        assert await snapshots.collect(grace_s=0) == []
        # A listed template whose record is missing: still nothing.
        await client.redis.sadd(keys.templates, "t1")
        assert await snapshots.collect(grace_s=0) == []
        # Positively unreferenced: t1's record names snap-kept, so snap-old goes.
        await client.redis.hset(keys.template("t1"), mapping={"snapshot": "snap-kept", "spec": "{}"})
        assert await snapshots.collect(grace_s=0) == ["snap-old"]
        assert sorted([p.name async for p in anyio.Path(tmp_path).iterdir()]) == ["snap-kept"]
        # Its template deleted, the last snapshot is retired: positively unreferenced.
        await templates.delete_template("t1", client=client)
        assert await client.redis.scard(keys.templates) == 0
        assert await snapshots.collect(grace_s=0) == ["snap-kept"]
    finally:
        await client.redis.delete(keys.templates, keys.template("t1"), keys.snapshots_retired)
        await client.aclose()
