"""A sandbox's own limits hold, against real Redis and dockerd + runsc: a fork bomb stops
at its pids limit (the sandbox keeps running, the host's pids cgroup is never reached),
a busy loop gets its CPU share and no more, and a memory bomb is OOM-killed at the
sandbox's own memory limit, which its record says. Other sandboxes keep serving, the
node keeps taking creates, and nothing leaks."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from hotbed import limits, templates
from hotbed.errors import HotbedError, InvalidRequest
from hotbed.protocol import CreateSandbox, Resources, SandboxCreated, SandboxSpec
from hotbed.sandbox import Sandbox
from tests.conftest import BASE_IMAGE, BUSYBOX_IMAGE, Stack, running_stack
from workers.runtimes.docker.engine import container_name

pytestmark = pytest.mark.anyio


async def create(stack: Stack, image: str, **resources: object) -> Sandbox:
    """A sandbox with ``resources`` the SDK's create does not expose (``pids``)."""
    spec = SandboxSpec(image=image, resources=Resources(**resources))  # type: ignore[arg-type]
    created = await stack.client.request(CreateSandbox(spec=spec), timeout=60)
    assert isinstance(created, SandboxCreated)
    return Sandbox(created.sandbox_id, created.worker_id, client=stack.client)


async def inspect(sid: str, fmt: str) -> str:
    got = await anyio.run_process(["docker", "inspect", "-f", fmt, container_name(sid)])
    return got.stdout.decode().strip()


async def cgroup_dir(sid: str, controller: str) -> Path:
    """The host cgroup directory of ``controller`` (v1) of the sandbox's container, or
    its unified directory (v2 only)."""
    pid = await inspect(sid, "{{.State.Pid}}")
    lines = [line.split(":", 2) for line in (await anyio.Path(f"/proc/{pid}/cgroup").read_text()).splitlines()]
    for _, names, path in lines:
        if controller in names.split(","):
            return Path("/sys/fs/cgroup", controller, path.lstrip("/"))
    unified = [path for _, names, path in lines if names == ""]
    assert unified, f"no {controller} cgroup for {sid}"
    return Path("/sys/fs/cgroup") / unified[0].lstrip("/")


def cpu_stat(cpu: Path, acct: Path) -> tuple[float, int]:
    """(CPU seconds used, times throttled) of a cgroup, v1 (cpu + cpuacct) or v2."""
    stat = dict(line.split() for line in (cpu / "cpu.stat").read_text().splitlines())
    if "usage_usec" in stat:
        return int(stat["usage_usec"]) / 1e6, int(stat["nr_throttled"])
    return int((acct / "cpuacct.usage").read_text()) / 1e9, int(stat["nr_throttled"])


async def still_serving(stack: Stack, other: Sandbox) -> None:
    with anyio.fail_after(60):
        assert (await other.exec("echo", "fine")).stdout == "fine\n"
        # Small, so that it fits beside the sandboxes of the test (a 2-core node).
        async with await Sandbox.create(BUSYBOX_IMAGE, client=stack.client, cpu=0.25) as fresh:
            assert (await fresh.exec("true")).ok


async def test_fork_bomb_stops_at_the_pids_limit(hotbed_stack: Stack) -> None:
    other = await Sandbox.create(BUSYBOX_IMAGE, client=hotbed_stack.client, cpu=0.25)
    bomb = await create(hotbed_stack, BUSYBOX_IMAGE, cpu=0.5, memory_mb=256, pids=64)
    try:
        pids = await cgroup_dir(bomb.id, "pids")
        host_limit = int((pids / "pids.max").read_text())
        assert host_limit in (limits.host_pids_limit(64), limits.host_pids_limit(64, ptrace=True))
        try:
            await bomb.exec(
                "sh", "-c", "(f() { f | f & }; f) >/dev/null 2>&1 </dev/null; sleep 3", timeout=10
            )
        except HotbedError:
            pass  # the bomb's own exec may not be able to fork either
        # The bomb keeps forking: its processes stay at the sandbox's limit (gVisor's
        # nproc), below the host's backstop, and the sandbox itself runs on.
        peak = 0
        for _ in range(20):
            peak = max(peak, int((pids / "pids.current").read_text()))
            await anyio.sleep(0.1)
        assert 64 <= peak < host_limit, peak
        assert await inspect(bomb.id, "{{.State.Running}}") == "true"
        rec = await hotbed_stack.client.record(bomb.id)
        assert rec is not None and rec.state == "running", rec
        await still_serving(hotbed_stack, other)
    finally:
        await bomb.terminate()
        await other.terminate()


async def test_a_busy_loop_gets_its_cpu_share(hotbed_stack: Stack) -> None:
    sb = await create(hotbed_stack, BASE_IMAGE, cpu=0.5, memory_mb=256)
    try:
        cpu, acct = await cgroup_dir(sb.id, "cpu"), await cgroup_dir(sb.id, "cpuacct")
        assert (await sb.exec("true")).ok
        used0, throttled0 = cpu_stat(cpu, acct)
        t0 = anyio.current_time()
        # Two busy processes: without a quota they would take both of the host's cores.
        busy = "import os, time\nos.fork()\nt = time.time()\nwhile time.time() - t < 3: pass\n"
        res = await sb.exec("python3", "-c", busy, timeout=30)
        assert res.ok, res
        wall = anyio.current_time() - t0
        used1, throttled1 = cpu_stat(cpu, acct)
        share = (used1 - used0) / wall
        assert share < 0.5 * 1.3, f"a cpu=0.5 sandbox used {share:.2f} of a core"
        assert throttled1 > throttled0, "the CPU quota never throttled the busy loop"
        assert (await sb.exec("echo", "ok")).stdout == "ok\n"
    finally:
        await sb.terminate()


def oom_kills(memory: Path) -> int:
    """How many processes the kernel OOM-killed in a memory cgroup (v1 or v2)."""
    for name in ("memory.oom_control", "memory.events"):
        if (memory / name).exists():
            stat = dict(line.split() for line in (memory / name).read_text().splitlines())
            return int(stat.get("oom_kill", 0))
    raise AssertionError(f"no OOM counter in {memory}")


async def test_memory_bomb_is_oom_killed_at_its_own_limit(hotbed_stack: Stack) -> None:
    """Under gVisor the kernel's OOM killer acts inside the sandbox's own memory cgroup:
    it kills the bomb's host-side process (the exec fails, the sandbox runs on) or, if
    the sandbox kernel itself is chosen, the whole sandbox, whose record then says
    ``out of memory``. Either way the kill is counted in that cgroup, at its limit."""
    c = hotbed_stack.client
    other = await Sandbox.create(BUSYBOX_IMAGE, client=c, cpu=0.25)
    sb = await Sandbox.create(BASE_IMAGE, client=c, memory_mb=128, cpu=0.5)
    try:
        memory = await cgroup_dir(sb.id, "memory")
        limit_file = "memory.limit_in_bytes" if (memory / "memory.limit_in_bytes").exists() else "memory.max"
        assert int((memory / limit_file).read_text()) == 128 << 20
        before = oom_kills(memory)
        bomb = "a = []\nwhile True:\n    a.append(bytearray(8 << 20))\n"
        res = None
        try:
            res = await sb.exec("python3", "-c", bomb, timeout=60)
            assert res.exit_code != 0, "the memory bomb should have been killed"
        except HotbedError:
            pass  # the whole sandbox was killed
        rec = await c.record(sb.id)
        if res is not None and rec.state == "running":
            # The bomb's process was the one killed, in the sandbox's own cgroup.
            assert oom_kills(memory) > before, "no OOM kill in the sandbox's memory cgroup"
            assert (await sb.exec("echo", "alive")).stdout == "alive\n"
        else:
            with anyio.fail_after(20):
                while not (rec := await c.record(sb.id)).ended:
                    await anyio.sleep(0.1)
            assert rec.state == "failed", rec
            assert rec.reason == "died: out of memory (OOMKilled at its own 128 MiB limit)", rec.reason
            held = await c.redis.hexists(c.keys.worker_sandboxes(sb.worker_id), sb.id)
            assert not held, "the OOM-killed sandbox still holds its reservation"
        await still_serving(hotbed_stack, other)
    finally:
        await sb.terminate()
        await other.terminate()


async def test_a_disk_quota_is_refused_not_ignored(hotbed_stack: Stack) -> None:
    spec = SandboxSpec(image=BUSYBOX_IMAGE, resources=Resources(disk_mb=64))
    with pytest.raises(InvalidRequest, match="disk_mb"):
        await hotbed_stack.client.request(CreateSandbox(spec=spec), timeout=30)
    # Refused before anything ran or was reserved; the node serves the next create.
    c = hotbed_stack.client
    cap = await c.redis.hget(c.keys.worker_cap(hotbed_stack.worker.id), "n")
    assert cap == b"0"
    async with await Sandbox.create(BUSYBOX_IMAGE, client=c) as sb:
        assert (await sb.exec("true")).ok


def test_disk_usage_counts_what_was_written(tmp_path: Path) -> None:
    """A sandbox's file store is sparse (gVisor sizes it at 1 GiB at once): what counts
    is the blocks written, in the layer's files and folders."""
    from workers.runtimes.docker.lifecycle import allocated_bytes

    with open(tmp_path / "store", "wb") as f:
        f.truncate(1 << 30)
        f.write(b"x" * (1 << 20))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"y" * (1 << 20))
    used = allocated_bytes(str(tmp_path))
    assert used is not None and 2 << 20 <= used < 3 << 20, used
    assert allocated_bytes(str(tmp_path / "gone")) is None


async def test_a_sandbox_filling_the_disk_is_ended(redis_url: str, prefix: str) -> None:
    """gVisor keeps a sandbox's writes in one file on the host's disk, which Redis,
    dockerd and the snapshots share, and its memory limit does not bound them: a ``dd``
    past the node's per-sandbox disk limit ends that sandbox (its writes go with it);
    a neighbour writing under the limit runs on, and the node serves the next create."""
    async with running_stack(redis_url, prefix,
                             worker_overrides={"sandbox_disk_mb": 48, "disk_check_s": 0.2}) as stack:
        c = stack.client
        other = await Sandbox.create(BUSYBOX_IMAGE, client=c, cpu=0.25, memory_mb=128)
        sb = await Sandbox.create(BUSYBOX_IMAGE, client=c, cpu=0.25, memory_mb=128)
        try:
            assert (await other.exec("dd", "if=/dev/zero", "of=/home/user/kept", "bs=1M", "count=16")).ok
            try:
                # 400 MiB, three times the sandbox's memory: the memory limit is not what stops it.
                await sb.exec("dd", "if=/dev/zero", "of=/home/user/fill", "bs=1M", "count=400", timeout=60)
            except HotbedError:
                pass  # ended mid-write
            with anyio.fail_after(20):
                while not (rec := await c.record(sb.id)).ended:
                    await anyio.sleep(0.1)
            assert rec.state == "failed" and rec.reason.startswith("disk full"), rec
            held = await c.redis.hexists(c.keys.worker_sandboxes(sb.worker_id), sb.id)
            assert not held, "the ended sandbox still holds its reservation"
            assert (await other.exec("ls", "-l", "/home/user/kept")).ok
            assert (await c.record(other.id)).state == "running"
            await still_serving(stack, other)
        finally:
            await sb.terminate()
            await other.terminate()


async def test_a_snapshot_keeps_no_env_secret_and_is_private(redis_url: str, prefix: str, tmp_path: Path) -> None:
    secret = f"secret-{prefix}"
    async with running_stack(redis_url, prefix, worker_overrides={"snapshot_dir": str(tmp_path)}) as stack:
        c = stack.client
        async with await Sandbox.create(BASE_IMAGE, client=c, memory_mb=256, env={"API_KEY": secret}) as sb:
            assert (await sb.exec("sh", "-c", "echo $API_KEY")).stdout == f"{secret}\n"
            name = await sb.snapshot(f"scrub-{prefix}")
        rec = await templates.get_template(name, client=c)
        snap = anyio.Path(stack.worker.snapshots.path(rec.snapshot))
        meta = await (snap / "container.json").read_text()
        assert secret not in meta and "API_KEY" not in meta
        assert (await snap.stat()).st_mode & 0o777 == 0o700
        async for f in snap.rglob("*"):
            if await f.is_file():
                assert (await f.stat()).st_mode & 0o077 == 0, f"{f} is readable by others"
        await templates.delete_template(name, client=c)
        assert rec.snapshot in await stack.worker.snapshots.collect(grace_s=0)
