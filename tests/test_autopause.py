"""Auto-pause: idle sandboxes checkpointed to disk and resumed by their next request.

Real Redis, dockerd and runsc: a sandbox left idle is paused by the worker (its
capacity given back, its record ``paused (auto)``), and the next request from another
client resumes it with its files and its shell session as they were; memory pressure
pauses the longest idle first; lifetime and idle timeout keep counting while paused.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from hotbed.client import Client
from hotbed.records import SandboxRecord, capacity_from_hash, from_hash, shown_state
from hotbed.sandbox import Sandbox
from tests.conftest import BASE_IMAGE, BUSYBOX_IMAGE, Stack, running_stack, wait_for
from workers.admission import NodeMemory
from workers.runtimes.docker import checkpoints

pytestmark = pytest.mark.anyio


async def record(c: Client, sid: str) -> SandboxRecord:
    rec = from_hash(await c.redis.hgetall(c.keys.sandbox(sid)))
    assert rec is not None
    return rec


async def auto_paused(c: Client, sid: str) -> bool:
    rec = await record(c, sid)
    return rec.state == "paused" and rec.paused_by == "auto"


async def free(stack: Stack) -> tuple[int, int]:
    c = stack.client
    cap = capacity_from_hash(await c.redis.hgetall(c.keys.worker_cap(stack.worker.id)))
    return cap.cpu_free, cap.mem_free


async def still_serves(c: Client) -> None:
    """A new sandbox starts and answers: the node kept serving."""
    async with await Sandbox.create(BUSYBOX_IMAGE, memory_mb=128, client=c) as fresh:
        assert (await fresh.run("echo fresh")).stdout == "fresh\n"


def overrides(tmp_path: Path, **more: object) -> dict[str, object]:
    return {"snapshot_dir": str(tmp_path / "snapshots"), "auto_pause_check_s": 0.1,
            "memory_pressure_mb": 0, "cpu": 16, "memory_mb": 4096, **more}


async def test_idle_sandbox_paused_then_resumed_by_another_client(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    async with running_stack(redis_url, prefix, worker_overrides=overrides(tmp_path)) as stack:
        c = stack.client
        idle = await free(stack)
        # Opted out: never paused, however long it idles.
        keep = await Sandbox.create(BUSYBOX_IMAGE, memory_mb=128, auto_pause_after=0, client=c)
        sb = await Sandbox.create(BASE_IMAGE, memory_mb=256, auto_pause_after=1.0, client=c)
        try:
            await sb.write_file("/tmp/kept.txt", "written before the pause")
            await sb.shell("dev").run("export STAGE=before-pause; cd /tmp")
            assert (await record(c, sb.id)).auto_pause_after == 1.0
            await wait_for(lambda: auto_paused(c, sb.id), "auto-pause")
            # On a loaded machine a second between the set-up's requests is enough for a
            # pause and a resume already: count from here.
            resumed = stack.worker.autopause.statistics()["resumed"]
            # Its CPU and memory went back to the scheduler; the opted-out one holds its own.
            assert await free(stack) == (idle[0] - 1000, idle[1] - 128)
            assert (await record(c, keep.id)).state == "running"
            env = {**os.environ, "HOTBED_REDIS_URL": redis_url, "HOTBED_PREFIX": prefix}
            ls = (await anyio.run_process(
                [str(Path(sys.executable).parent / "hotbed"), "ls"], env=env,
            )).stdout.decode()
            assert any(sb.id in line and "paused (auto)" in line for line in ls.splitlines()), ls

            # A second client, three requests at once: one resume, all three served.
            other = Client(redis_url, prefix=prefix)
            try:
                again = await Sandbox.from_id(sb.id, client=other)
                got: dict[str, object] = {}

                async def ask(name: str, call: Callable[[], Awaitable[object]]) -> None:
                    got[name] = await call()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(ask, "exec", lambda: again.run("echo resumed"))
                    tg.start_soon(ask, "file", lambda: again.read_file("/tmp/kept.txt"))
                    tg.start_soon(ask, "session", lambda: again.shell("dev").run('echo "$STAGE:$PWD"'))
            finally:
                await other.aclose()
            assert got["exec"].stdout == "resumed\n"  # type: ignore[attr-defined]
            assert got["file"] == b"written before the pause"
            assert got["session"].stdout == "before-pause:/tmp\n"  # type: ignore[attr-defined]
            assert stack.worker.autopause.statistics()["resumed"] == resumed + 1
            rec = await record(c, sb.id)
            assert (rec.state, rec.paused_by) == ("running", "")
            assert await free(stack) == (idle[0] - 2000, idle[1] - 384)

            # A process and a terminal wake it too.
            await wait_for(lambda: auto_paused(c, sb.id), "second auto-pause")
            assert [p for p in await sb.processes() if p.running] == []
            await wait_for(lambda: auto_paused(c, sb.id), "third auto-pause")
            async with sb.pty(["/bin/bash", "--norc"]) as term:
                await term.write('echo "pty:$((6*7))"; exit\n')
                seen = bytearray()
                with anyio.fail_after(20):
                    async for data in term:
                        seen += data
            assert b"pty:42" in seen
            assert stack.worker.autopause.statistics()["resumed"] == resumed + 3
            # A terminal held open is a request in progress: never paused under it.
            async with sb.pty(["/bin/bash", "--norc"]) as term:
                await anyio.sleep(2.5)
                assert (await record(c, sb.id)).state == "running"
                await term.write("exit\n")
                with anyio.fail_after(20):
                    async for _ in term:
                        pass
            # An explicit pause stays explicit: no request resumes it.
            await wait_for(lambda: auto_paused(c, sb.id), "fourth auto-pause")
            await sb.pause()
            assert shown_state(await record(c, sb.id)) == "paused"
            await sb.resume()
            assert (await sb.run("echo ok")).stdout == "ok\n"
        finally:
            with anyio.CancelScope(shield=True):
                await sb.terminate()
                await keep.terminate()
        # The node kept serving, and gave everything back.
        await still_serves(c)
        assert await free(stack) == idle


async def test_memory_pressure_pauses_longest_idle_first(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    assert (await NodeMemory().sample()).available_mb > 0
    async with running_stack(redis_url, prefix, worker_overrides=overrides(tmp_path)) as stack:
        c = stack.client
        boxes = [await Sandbox.create(BUSYBOX_IMAGE, memory_mb=128, client=c) for _ in range(3)]
        never = await Sandbox.create(BUSYBOX_IMAGE, memory_mb=128, auto_pause_after=0, client=c)
        try:
            # The node default is no idle timer: nothing pauses without pressure.
            for sb in boxes:
                await sb.run("true")
            await anyio.sleep(1.0)
            assert [(await record(c, sb.id)).state for sb in boxes] == ["running"] * 3
            # One of them is busy with a command when the pressure comes.
            async with anyio.create_task_group() as tg:
                tg.start_soon(boxes[1].run, "sleep 4")
                await anyio.sleep(0.5)
                # Any node is "under pressure" below a threshold over its whole memory.
                assert stack.worker.autopause.memory is stack.worker.node_memory
                stack.worker.node_memory.pressure_mb = 1 << 30
                await wait_for(lambda: auto_paused(c, boxes[0].id), "first pressure pause")
                await wait_for(lambda: auto_paused(c, boxes[2].id), "second pressure pause")
                assert (await record(c, boxes[1].id)).state == "running"
            # Once its command is done, it is the last one left to pause.
            await wait_for(lambda: auto_paused(c, boxes[1].id), "third pressure pause")
            paused_at = [(await record(c, sb.id)).paused_at for sb in boxes]
            assert paused_at[0] < paused_at[2] < paused_at[1]
            assert (await record(c, never.id)).state == "running"
            assert stack.worker.autopause.statistics()["pressure"] == 3
            # The pressure is gone: a request resumes the first one and it stays up.
            stack.worker.node_memory.pressure_mb = 0
            assert (await boxes[0].run("echo back")).stdout == "back\n"
            await anyio.sleep(0.5)
            assert (await record(c, boxes[0].id)).state == "running"
        finally:
            with anyio.CancelScope(shield=True):
                for sb in [*boxes, never]:
                    await sb.terminate()


async def test_lifetime_and_idle_timeout_count_while_paused(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    async with running_stack(redis_url, prefix, worker_overrides=overrides(tmp_path)) as stack:
        c = stack.client
        idle = await free(stack)
        short = await Sandbox.create(BUSYBOX_IMAGE, memory_mb=128, timeout=6, auto_pause_after=0.5, client=c)
        lazy = await Sandbox.create(
            BUSYBOX_IMAGE, memory_mb=128, idle_timeout=6, auto_pause_after=0.5, client=c
        )
        try:
            async def checkpoint_dir(sid: str) -> Path:
                name = (await anyio.run_process(
                    ["docker", "ps", "-aq", "--no-trunc", "--filter", f"label=dev.hotbed.sandbox={sid}"],
                )).stdout.decode().strip()
                assert name, f"no container for {sid}"
                return Path("/var/lib/docker/containers", name, "checkpoints", "hotbed-paused")

            await wait_for(lambda: auto_paused(c, short.id), "auto-pause (lifetime)")
            await wait_for(lambda: auto_paused(c, lazy.id), "auto-pause (idle)")
            kept = [await checkpoint_dir(short.id), await checkpoint_dir(lazy.id)]
            assert all(p.is_dir() for p in kept)

            async def ended(sid: str) -> bool:
                return (await record(c, sid)).ended

            await wait_for(lambda: ended(short.id), "lifetime end", timeout=30)
            await wait_for(lambda: ended(lazy.id), "idle end", timeout=30)
            assert ((await record(c, short.id)).state, (await record(c, short.id)).reason) == ("terminated", "timeout")
            assert (await record(c, lazy.id)).reason == "idle_timeout"
            # The checkpoints went with their containers; the capacity was given back once.
            assert not any(p.exists() for p in kept)
            assert await free(stack) == idle
        finally:
            with anyio.CancelScope(shield=True):
                await short.terminate()
                await lazy.terminate()
        await still_serves(c)


async def test_resume_on_a_full_node_pauses_the_longest_idle_first(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """No room to resume: sandboxes with an idle timer of their own make room, longest
    idle first; one without a timer is never taken, and with nothing left to pause the
    request gets CapacityExhausted and the sandbox stays paused."""
    from hotbed.errors import CapacityExhausted

    async with running_stack(redis_url, prefix, worker_overrides=overrides(tmp_path, cpu=2)) as stack:
        c = stack.client
        sleeper = await Sandbox.create(BUSYBOX_IMAGE, memory_mb=128, auto_pause_after=0.5, client=c)
        try:
            await wait_for(lambda: auto_paused(c, sleeper.id), "auto-pause")
            older = await Sandbox.create(BUSYBOX_IMAGE, memory_mb=128, auto_pause_after=600, client=c)
            newer = await Sandbox.create(BUSYBOX_IMAGE, memory_mb=128, auto_pause_after=600, client=c)
            assert await free(stack) == (0, 4096 - 256)
            await older.run("true")
            await anyio.sleep(0.2)
            await newer.run("true")
            # The node is full: the older one is paused to make room, the newer one kept.
            assert (await sleeper.run("echo woke")).stdout == "woke\n"
            assert await auto_paused(c, older.id)
            assert (await record(c, newer.id)).state == "running"
            assert stack.worker.autopause.statistics()["room"] == 1
            # The older one takes the room back in turn, from the sandbox idle longest.
            await newer.run("true")
            assert (await older.run("echo back")).stdout == "back\n"
            assert await auto_paused(c, sleeper.id)
            # A sandbox without an idle timer is never paused to make room.
            for sb in (older, newer):
                await sb.terminate()
            keeper = await Sandbox.create(BUSYBOX_IMAGE, cpu=2, memory_mb=128, client=c)
            try:
                with pytest.raises(CapacityExhausted):
                    await sleeper.run("true")
                assert await auto_paused(c, sleeper.id)
            finally:
                await keeper.terminate()
            assert (await sleeper.run("echo again")).stdout == "again\n"
        finally:
            with anyio.CancelScope(shield=True):
                await sleeper.terminate()


# ------------------------------------------------ containerd's copies of checkpoints


def restore_copies() -> set[Path]:
    """containerd's copies of checkpoints hotbed restored from (they hold its token)."""
    return {p.parent for p in checkpoints.CONTAINERD_COPIES.glob(f"ctrd-checkpoint*/{checkpoints.RESTORE_ID}")}


async def test_resumes_through_dockerd_leave_no_checkpoint_copies(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """runsc without hotbed's wrapper resumes through ``docker start --checkpoint``,
    for which containerd unpacks the checkpoint into a ctrd-checkpoint* directory and
    keeps it: the worker removes the copy of each of its restores."""
    before = restore_copies()
    settings = overrides(tmp_path, oci_runtime="runsc-plain")
    async with running_stack(redis_url, prefix, worker_overrides=settings) as stack:
        c = stack.client
        sb = await Sandbox.create(BUSYBOX_IMAGE, memory_mb=128, auto_pause_after=0.5, client=c)
        try:
            await sb.write_file("/tmp/kept.txt", "kept")
            # Counted from here: on a loaded machine the write may have had to resume it.
            resumed = stack.worker.autopause.statistics()["resumed"]
            for n in range(2):
                await wait_for(lambda: auto_paused(c, sb.id), f"auto-pause {n + 1}")
                assert (await sb.run("cat /tmp/kept.txt")).stdout == "kept"
            assert stack.worker.autopause.statistics()["resumed"] == resumed + 2
            assert restore_copies() - before == set()
        finally:
            with anyio.CancelScope(shield=True):
                await sb.terminate()


def test_sweep_removes_only_copies_of_finished_restores(tmp_path: Path) -> None:
    def copy(name: str, token: str | None, age_s: float = 0.0) -> Path:
        d = tmp_path / f"ctrd-checkpoint{name}"
        d.mkdir()
        (d / "checkpoint.img").write_bytes(b"x")
        if token is not None:
            (d / checkpoints.RESTORE_ID).write_text(token)
        if age_s:
            t = time.time() - age_s
            os.utime(d, (t, t))
        return d

    done = copy("1", "done")
    in_flight = copy("2", "running")
    stale = copy("3", "lost", age_s=checkpoints.STALE_COPY_S + 60)
    foreign = copy("4", None, age_s=checkpoints.STALE_COPY_S + 60)
    other = tmp_path / "unrelated"
    other.mkdir()
    (other / checkpoints.RESTORE_ID).write_text("done")
    assert checkpoints.sweep_restore_copies({"done"}, root=tmp_path) == 2
    assert not done.exists() and not stale.exists()
    assert in_flight.exists() and foreign.exists() and other.exists()
