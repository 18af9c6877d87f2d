"""The spine end to end: SDK -> Redis -> scheduler -> worker -> runsc container and back.

Real Redis, real dockerd + runsc. Each test gets its own key prefix and worker; the
``hotbed_stack`` fixture fails a test that leaves a container behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import hotbed
from hotbed import protocol
from hotbed.records import SandboxRecord
from tests.conftest import BASE_IMAGE, BUSYBOX_IMAGE, Stack
from workers.runtimes.docker import container_name

pytestmark = pytest.mark.anyio


async def wait_record(stack: Stack, sid: str, *, states: set[str], within: float = 20.0) -> SandboxRecord:
    with anyio.fail_after(within):
        while True:
            rec = await stack.client.record(sid)
            if rec.state in states:
                return rec
            await anyio.sleep(0.05)


def containers_of(sandbox_id: str) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=dev.hotbed.sandbox={sandbox_id}"],
        capture_output=True, text=True, check=True,
    )
    return out.stdout.split()


async def test_create_exec_files_terminate(hotbed_stack: Stack) -> None:
    c = hotbed_stack.client
    sb = await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=c, tags={"suite": "spine"}, env={"GREETING": "hi"})
    assert sb.path == "cold"
    res = await sb.exec("sh", "-c", 'echo "$GREETING"; id -u; echo oops >&2; exit 3')
    assert res.exit_code == 3
    assert res.stdout.split() == ["hi", "1000"]  # non-root by default
    assert res.stderr == "oops\n"

    payload = bytes(range(256)) * 1000
    assert await sb.write_file("/home/user/work/data.bin", payload) == len(payload)
    assert await sb.read_file("/home/user/work/data.bin") == payload
    entries = await sb.list_files("/home/user/work")
    assert [(e.name, e.size, e.is_dir) for e in entries] == [("data.bin", len(payload), False)]
    shell = await sb.run("cd /home/user/work && wc -c < data.bin")
    assert shell.stdout.strip() == str(len(payload))

    listed = await hotbed.Sandbox.list(tags={"suite": "spine"}, client=c)
    assert [r.id for r in listed] == [sb.id]
    again = await hotbed.Sandbox.from_id(sb.id, client=c)
    assert (await again.exec("true")).ok

    await sb.terminate()
    rec = await c.record(sb.id)
    assert (rec.state, rec.reason) == ("terminated", "client")
    assert containers_of(sb.id) == []
    with pytest.raises(hotbed.SandboxNotFound):
        await sb.exec("true")
    with pytest.raises(hotbed.SandboxNotFound):
        await hotbed.Sandbox.from_id(sb.id, client=c)
    await sb.terminate()  # idempotent


async def test_sandboxes_are_isolated(hotbed_stack: Stack) -> None:
    c = hotbed_stack.client
    a = await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=c)
    b = await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=c)
    try:
        await a.write_file("/tmp/secret", "a's file")
        await a.run("sleep 300 >/dev/null 2>&1 &")
        with pytest.raises(hotbed.FileError):
            await b.read_file("/tmp/secret")
        procs = await b.run("ps -o comm | grep -c '^sleep' || true")
        a_procs = await a.run("ps -o args | grep -c '^sleep 300' || true")
        assert a_procs.stdout.strip() == "1"
        # b sees only its own idle loop's sleep, never a's `sleep 300`.
        assert "300" not in (await b.run("ps -o args")).stdout
        assert procs.exit_code == 0
    finally:
        await a.terminate()
        await b.terminate()


async def test_sandbox_has_no_network(hotbed_stack: Stack) -> None:
    sb = await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=hotbed_stack.client)
    try:
        res = await sb.run("cat /proc/net/dev")
        interfaces = {line.split(":")[0].strip() for line in res.stdout.splitlines()[2:]}
        assert interfaces == {"lo"}
    finally:
        await sb.terminate()


async def test_sandboxes_share_hotbeds_parent_cgroup(hotbed_stack: Stack) -> None:
    """Sandboxes sit under one parent cgroup (the host weighs it below the control
    plane); their runsc processes are in it."""
    sb = await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=hotbed_stack.client)
    try:
        fmt = "{{.HostConfig.CgroupParent}} {{.State.Pid}} {{.Id}}"
        got = await anyio.run_process(["docker", "inspect", "-f", fmt, container_name(sb.id)])
        parent, pid, cid = got.stdout.decode().split()
        driver = (await anyio.run_process(["docker", "info", "-f", "{{.CgroupDriver}}"])).stdout.decode().strip()
        assert parent == ("hotbed.slice" if driver == "systemd" else "/hotbed")
        cgroups = await anyio.Path(f"/proc/{pid}/cgroup").read_text()
        if driver == "cgroupfs":
            assert f"/hotbed/{cid}" in cgroups
    finally:
        await sb.terminate()


async def test_memory_bomb_is_contained(hotbed_stack: Stack) -> None:
    c = hotbed_stack.client
    sb = await hotbed.Sandbox.create(BASE_IMAGE, client=c, memory_mb=128)
    try:
        bomb = "a = []\nwhile True:\n    a.append(bytearray(8 << 20))\n"
        try:
            res = await sb.exec("python3", "-c", bomb, timeout=60)
            assert res.exit_code != 0, "the memory bomb should have been killed"
        except hotbed.SandboxNotRunning:
            pass  # the whole sandbox was killed: also contained
    finally:
        await sb.terminate()
    # The worker is unharmed and still serves.
    other = await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=c)
    assert (await other.exec("echo", "alive")).stdout == "alive\n"
    await other.terminate()


async def test_exec_timeout_keeps_sandbox_usable(hotbed_stack: Stack) -> None:
    sb = await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=hotbed_stack.client)
    try:
        t0 = anyio.current_time()
        with pytest.raises(hotbed.ExecTimeout) as info:
            await sb.run("echo started; sleep 100", timeout=1)
        assert anyio.current_time() - t0 < 10
        assert info.value.detail["stdout"] == "started\n"
        assert isinstance(info.value, TimeoutError)
        # The timed-out command was killed, not left running.
        left = await sb.run("ps -o args | grep -c '^sleep 100' || true")
        assert left.stdout.strip() == "0"
        assert (await sb.exec("echo", "ok")).stdout == "ok\n"
    finally:
        await sb.terminate()


async def test_output_is_capped_and_flagged(hotbed_stack: Stack) -> None:
    sb = await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=hotbed_stack.client)
    try:
        res = await sb.run("yes hotbed | head -c 300000", max_output=1000)
        assert res.truncated
        assert len(res.stdout_bytes) == 1000
    finally:
        await sb.terminate()


async def test_lifetime_and_idle_timeouts(hotbed_stack: Stack) -> None:
    c = hotbed_stack.client
    short = await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=c, timeout=1.5)
    idle = await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=c, timeout=120, idle_timeout=1.5)
    rec = await wait_record(hotbed_stack, short.id, states={"terminated"})
    assert rec.reason == "timeout"
    rec = await wait_record(hotbed_stack, idle.id, states={"terminated"})
    assert rec.reason == "idle_timeout"
    assert containers_of(short.id) == [] and containers_of(idle.id) == []
    with pytest.raises(hotbed.SandboxNotFound, match="timeout"):
        await short.exec("true")


async def test_activity_defers_idle_timeout(hotbed_stack: Stack) -> None:
    sb = await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=hotbed_stack.client, idle_timeout=2.0)
    try:
        for _ in range(4):
            await anyio.sleep(0.8)
            assert (await sb.exec("true")).ok
        assert (await sb.info()).state == "running"
    finally:
        await sb.terminate()


async def test_bad_input_gets_typed_errors(hotbed_stack: Stack) -> None:
    c = hotbed_stack.client
    with pytest.raises(hotbed.ImageNotFound, match="no/such-image"):
        await hotbed.Sandbox.create("no/such-image", client=c)
    with pytest.raises(hotbed.InvalidRequest, match="timeout"):
        await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=c, timeout=-1)
    with pytest.raises(hotbed.InvalidRequest, match="cpu"):
        await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=c, cpu=0)
    # More CPU than the node advertises (its cores times the CPU overcommit).
    too_many = hotbed_stack.worker.info.cpu_millis // 1000 + 1
    with pytest.raises(hotbed.NoMatchingWorker, match=f"cpu={too_many}"):
        await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=c, cpu=too_many)
    with pytest.raises(hotbed.SandboxNotFound):
        await hotbed.Sandbox.from_id("sb-doesnotexist", client=c)
    sb = await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=c)
    try:
        with pytest.raises(hotbed.InvalidRequest):
            await sb.exec("true", timeout=-5)
        with pytest.raises(hotbed.FileTooLarge):
            await sb.write_file("/tmp/big", b"x" * (protocol.MAX_FILE_BYTES + 1))
        with pytest.raises(hotbed.FileError, match="no such file"):
            await sb.read_file("/nope")
        with pytest.raises(hotbed.FileError):
            await sb.write_file("/proc/forbidden/x", "no")
    finally:
        await sb.terminate()
    # The failed create left nothing behind.
    assert not [r for r in await hotbed.Sandbox.list(client=c)]


async def test_malformed_requests_are_answered_not_fatal(hotbed_stack: Stack) -> None:
    c = hotbed_stack.client
    r = c.redis
    # Garbage with no readable reply key: logged and dropped.
    await r.xadd(c.keys.requests, {"m": b"\x00not msgpack"})
    await r.xadd(c.keys.requests, {"other": b"field"})
    # A well-formed envelope around an unknown message type: answered with a typed error.
    raw = protocol.ENCODER.encode(
        {"id": "bad1", "reply_to": c.keys.reply("bad1"), "deadline": time.time() + 30,
         "body": {"t": "LaunchMissiles", "target": "moon"}}
    )
    await r.xadd(c.keys.requests, {"m": raw})
    got = await r.blpop([c.keys.reply("bad1")], timeout=10)
    assert got is not None
    reply = protocol.decode_reply(got[1]).body
    assert isinstance(reply, protocol.ErrorReply) and reply.code == "UnsupportedRequest"
    # Same on a worker's command stream.
    raw = protocol.ENCODER.encode(
        {"id": "bad2", "reply_to": c.keys.reply("bad2"), "deadline": time.time() + 30,
         "body": {"t": "Exec", "sandbox_id": 42}}
    )
    await r.xadd(c.keys.worker_cmds(hotbed_stack.worker.id), {"m": raw})
    got = await r.blpop([c.keys.reply("bad2")], timeout=10)
    assert got is not None
    assert protocol.decode_reply(got[1]).body.code == "UnsupportedRequest"  # type: ignore[union-attr]
    # Both daemons still work.
    sb = await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=c)
    assert (await sb.exec("true")).ok
    await sb.terminate()
    assert await r.xlen(c.keys.requests) == 0


async def test_overloaded_when_backlog_is_full(hotbed_stack: Stack) -> None:
    tiny = hotbed.Client(hotbed_stack.redis_url, prefix=hotbed_stack.prefix, backlog_limit=0)
    try:
        with pytest.raises(hotbed.Overloaded):
            await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=tiny)
    finally:
        await tiny.aclose()


async def test_client_never_hangs_without_a_scheduler(redis_url: str, prefix: str) -> None:
    async with hotbed.Client(redis_url, prefix=prefix) as c:
        t0 = anyio.current_time()
        with pytest.raises(hotbed.RequestTimeout):
            await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=c, request_timeout=0.5)
        assert anyio.current_time() - t0 < 10


async def test_capacity_exhausted_at_deadline(hotbed_stack: Stack) -> None:
    c = hotbed_stack.client
    cpu = hotbed_stack.worker.info.cpu_millis / 1000
    big = await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=c, cpu=cpu)
    try:
        with pytest.raises(hotbed.CapacityExhausted):
            await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=c, cpu=0.5, request_timeout=1.0)
    finally:
        await big.terminate()
    # Capacity came back.
    sb = await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=c, cpu=cpu)
    await sb.terminate()


async def test_worker_restart_adopts_its_sandboxes(redis_url: str, prefix: str) -> None:
    from tests.conftest import leftover_containers, restart_worker, start_stack, stop_stack

    async with anyio.create_task_group() as tg:
        stack = await start_stack(redis_url, prefix, tg=tg, worker_overrides={"drain_on_stop": False})
        sb = await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=stack.client)
        await sb.write_file("/tmp/keep", "still here")
        # Stop the worker without draining: its sandbox keeps running.
        second = await restart_worker(stack, tg)
        assert sb.id in second.sandboxes
        assert await sb.read_file("/tmp/keep") == b"still here"
        await sb.terminate()
        await stop_stack(stack)
    assert leftover_containers(prefix) == []


async def test_dead_worker_fails_fast_and_marks_sandboxes_lost(redis_url: str, prefix: str) -> None:
    """A worker that stops heartbeating: pending commands get WorkerLost, records say lost."""
    from tests.conftest import leftover_containers, start_stack, stop_stack

    async with anyio.create_task_group() as tg:
        stack = await start_stack(
            redis_url, prefix, tg=tg,
            worker_overrides={"drain_on_stop": False},
            scheduler_overrides={"heartbeat_ttl_s": 1.0},
        )
        sb = await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=stack.client)
        worker = stack.worker
        worker.stopping.set()  # stops heartbeats and intake; the container stays
        with anyio.fail_after(20):
            while await stack.client.redis.zscore(stack.client.keys.workers, worker.id) is not None:
                await anyio.sleep(0.1)
        rec = await stack.client.record(sb.id)
        assert rec.state == "lost"
        with pytest.raises(hotbed.SandboxNotFound):
            await sb.exec("true")
        await stop_stack(stack)
    # Clean up the container the dead worker left (what a restarted worker would do).
    from workers.runtimes.docker import DockerRuntime

    rt = DockerRuntime()
    await rt.open()
    try:
        for m in await rt.list_managed():
            if m.prefix == prefix:
                await rt.destroy(m.sandbox_id)
    finally:
        await rt.aclose()
    assert leftover_containers(prefix) == []


def test_sync_facade(daemons: tuple[str, str]) -> None:
    from hotbed import sync

    with sync.Sandbox.create(BUSYBOX_IMAGE, timeout=60) as sb:
        assert sb.exec("echo", "sync").stdout == "sync\n"
        sb.write_file("/tmp/x", "y")
        assert sb.read_file("/tmp/x") == b"y"
        assert [r.id for r in sync.Sandbox.list()] == [sb.id]
    assert sync.Sandbox.list() == []
    sync.close()


def test_sync_facade_templates_pause_fork(daemons: tuple[str, str]) -> None:
    """Templates, pools, pause/resume and fork through the blocking API."""
    import secrets

    from hotbed import sync

    name = f"sync-{secrets.token_hex(3)}"
    built = sync.create_template(name, image=BUSYBOX_IMAGE, files={"/tmp/t": "tpl"}, memory_mb=64)
    assert built.name == name and built.snapshot
    try:
        # A quarter CPU each: the worker here offers this box's two cores, and the
        # children of fork() are created in the parent's shape.
        with sync.Sandbox.create(template=name, cpu=0.25, memory_mb=64, timeout=120) as sb:
            assert sb.path == "restore"
            sb.write_file("/tmp/x", "kept")
            sb.pause()
            assert sb.info().state == "paused"
            sb.resume()
            assert sb.read_file("/tmp/x") == b"kept" and sb.read_file("/tmp/t") == b"tpl"
            kids = sb.fork(2)
            try:
                assert len({k.id for k in kids} | {sb.id}) == 3
                kids[0].write_file("/tmp/x", "child")
                assert [k.read_file("/tmp/x") for k in kids] == [b"child", b"kept"]
            finally:
                for k in kids:
                    k.terminate()
        assert sync.set_pool(name, 0, memory_mb=64)
    finally:
        assert sync.delete_template(name)
        sync.close()


def test_cli_run_create_exec_cp_ls_rm(daemons: tuple[str, str], tmp_path: object) -> None:
    env = dict(os.environ)
    hb = [sys.executable, "-m", "cli"]

    def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*hb, *args], capture_output=True, env=env, input=stdin, timeout=120)

    res = cli("run", BASE_IMAGE, "--", "python3", "-c", "print(6*7)")
    assert (res.returncode, res.stdout) == (0, b"42\n"), res.stderr
    res = cli("run", BUSYBOX_IMAGE, "--", "sh", "-c", "exit 7")
    assert res.returncode == 7
    res = cli("run", "no/such-image", "--", "true")
    assert res.returncode == 125  # hotbed failed, not the command (docker run's code)
    assert res.stderr.decode().startswith("error: image 'no/such-image' not found")
    assert b"Traceback" not in res.stderr

    sid = cli("create", BUSYBOX_IMAGE, "--tag", "who=cli").stdout.decode().strip()
    assert sid.startswith("sb-")
    assert cli("cp", "-", f"{sid}:/tmp/in.txt", stdin=b"from stdin").returncode == 0
    assert cli("exec", sid, "--", "cat", "/tmp/in.txt").stdout == b"from stdin"
    assert cli("cp", f"{sid}:/tmp/in.txt", "-").stdout == b"from stdin"
    listing = cli("ls", "--tag", "who=cli").stdout.decode()
    assert sid in listing
    assert "in.txt" in cli("ls", f"{sid}:/tmp").stdout.decode()
    assert cli("rm", sid).returncode == 0
    res = cli("exec", sid, "--", "true")
    assert res.returncode == 125 and b"has ended" in res.stderr
    status = cli("status").stdout.decode()
    assert "docker" in status


def test_cli_snapshot_fork_pause_resume(daemons: tuple[str, str]) -> None:
    import json
    import secrets

    def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
        res = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, timeout=120)
        assert res.returncode == 0 and b"Traceback" not in res.stderr, res.stderr
        return res

    sid = cli("create", BUSYBOX_IMAGE, "--cpu", "0.25", "--memory", "64").stdout.decode().strip()
    cli("exec", sid, "--", "sh", "-c", "echo parent > /tmp/who")
    assert cli("pause", sid).stdout.decode().split() == [sid]
    assert json.loads(cli("inspect", sid).stdout)["state"] == "paused"
    cli("resume", sid)
    kids = cli("fork", sid, "-n", "2").stdout.decode().split()
    assert len(set(kids)) == 2 and sid not in kids
    name = f"cli-{secrets.token_hex(3)}"
    assert cli("snapshot", sid, name).stdout.decode().strip() == name
    assert name in cli("template", "list").stdout.decode()
    for k in kids:
        assert cli("exec", k, "--", "cat", "/tmp/who").stdout == b"parent\n"
    cli("template", "delete", name)
    cli("rm", sid, *kids)


async def cancelled_at_any_moment(
    prefix: str, start: Callable[[Any, Any], Awaitable[None]], delays: Iterable[float],
    *, prepare: Callable[[Any], Awaitable[None]] | None = None, then_remove: bool = False,
) -> None:
    """``start(runtime, placed)`` cancelled after each of ``delays`` (a worker stopping
    with starts in flight cancels them; the n-th is sandbox ``{prefix}-c{n}``):
    whichever step each was at, none leaves a container, nor a containerd task whose
    shim outlives it. ``then_remove``: each is removed right after, cancelled or not,
    and that removal must work."""
    from tests.conftest import docker_available, leftover_containers, orphan_shims
    from workers.runtimes.base import Placed
    from workers.runtimes.docker import DockerRuntime

    if not docker_available():
        pytest.fail("dockerd with runsc is not running: run `make test` (it sets them up)")
    orphans = orphan_shims()
    rt = DockerRuntime()
    await rt.open()
    try:
        if prepare is not None:
            await prepare(rt)
        for n, delay in enumerate(delays):
            placed = Placed(sandbox_id=f"{prefix}-c{n}", worker_id="w", prefix=prefix)
            with anyio.move_on_after(delay) as scope:
                await start(rt, placed)
            if then_remove or not scope.cancel_called:
                await rt.destroy(placed.sandbox_id)
        # dockerd may finish an abandoned request after its caller has gone.
        await anyio.sleep(2)
        left = leftover_containers(prefix)
    finally:
        for m in await rt.list_managed():
            if m.prefix == prefix:
                await rt.destroy(m.sandbox_id)
        await rt.aclose()
    assert left == []
    with anyio.move_on_after(10):
        while orphan_shims() - orphans:
            await anyio.sleep(0.5)
    assert orphan_shims() - orphans == set(), "a removed container's task outlived it"


SPEC_64 = {"image": BUSYBOX_IMAGE, "resources": {"cpu": 0.5, "memory_mb": 64}}


async def test_a_start_cancelled_at_any_moment_leaves_no_container(prefix: str) -> None:
    from hotbed.protocol import SandboxSpec

    spec = msgspec.convert(SPEC_64, SandboxSpec)
    await cancelled_at_any_moment(
        prefix, lambda rt, placed: rt.create(placed, spec), (i * 0.02 for i in range(16)),
    )


async def test_a_restore_cancelled_at_any_moment_leaves_no_container(prefix: str, tmp_path: Path) -> None:
    """A restore's ``docker start`` runs runsc restore through hotbed's wrapper; removing
    the container while dockerd is still starting it left its task and shim behind."""
    from hotbed.protocol import SandboxSpec
    from workers.runtimes.base import Placed

    spec = msgspec.convert(SPEC_64, SandboxSpec)
    snapshot = tmp_path / "snapshot"

    async def snapshot_made(rt: Any) -> None:
        src = Placed(sandbox_id=f"{prefix}-src", worker_id="w", prefix=prefix)
        await rt.create(src, spec)
        await rt.checkpoint(src.sandbox_id, snapshot, leave_running=False)
        await rt.destroy(src.sandbox_id)

    await cancelled_at_any_moment(
        prefix, lambda rt, placed: rt.restore(placed, spec, snapshot), (i * 0.05 for i in range(1, 15)),
        prepare=snapshot_made,
    )


async def test_a_sandbox_whose_pause_was_cancelled_is_still_removed(prefix: str) -> None:
    """A pause is a checkpoint through dockerd; removing the sandbox while dockerd was
    still checkpointing it failed ("is zombie and can not be killed")."""
    from hotbed.protocol import SandboxSpec
    from workers.runtimes.base import Placed

    spec = msgspec.convert(SPEC_64, SandboxSpec)
    delays = [i * 0.03 for i in range(1, 13)]

    async def running(rt: Any) -> None:
        # All made first: a pause of a sandbox that has run a while (it met the
        # failure more often than one paused as soon as it started).
        for n in range(len(delays)):
            await rt.create(Placed(sandbox_id=f"{prefix}-c{n}", worker_id="w", prefix=prefix), spec)

    await cancelled_at_any_moment(
        prefix, lambda rt, placed: rt.pause(placed.sandbox_id), delays, prepare=running, then_remove=True,
    )


def test_expiry_heap_returns_each_sandbox_once_when_its_end_comes() -> None:
    """The expiry loop asks the table for the sandboxes due instead of scanning all of
    them: activity and longer lifetimes move an end later, a shorter lifetime sooner,
    and a pooled sandbox (no end) is never due."""
    from typing import cast

    from hotbed.keys import Keys
    from workers.runtimes.base import Runtime
    from workers.sandboxes import Local, SandboxTable

    table = SandboxTable(cast(Runtime, object()), worker_id="w", prefix="p", keys=Keys("p"))

    def hold(sid: str, *, expires_at: float = 100.0, idle_timeout: float | None = None, pool: str = "") -> Local:
        local = Local(id=sid, user="u", expires_at=expires_at, idle_timeout=idle_timeout, last_active=0.0, pool=pool)
        table._hold(local)  # what started() and reconcile() do, without Redis
        return local

    life = hold("life", expires_at=10.0)
    idle = hold("idle", idle_timeout=5.0)
    hold("pooled", expires_at=float("inf"), pool="tpl")
    assert table.due(4.9) == []
    idle.last_active = 3.0  # a request at t=3: idle until 8 now, not 5
    assert table.due(5.0) == []
    assert [s.id for s in table.due(8.0)] == ["idle"]
    assert table.due(9.0) == []  # returned once; the caller ends it or arms it again
    table.arm(idle, 9.5)
    life.expires_at = 9.5  # set_timeout shortened it
    table.arm(life)
    assert sorted(s.id for s in table.due(9.5)) == ["idle", "life"]
    assert table.due(1e9) == []
