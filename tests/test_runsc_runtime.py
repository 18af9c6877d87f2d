"""The runsc runtime's parts that need no runsc: the OCI spec of a CPU and of a GPU
sandbox (against a fake ``/proc`` and driver tree), users, images unpacked from
``docker save`` and flat tarballs (whiteouts included); then, with runsc, a sandbox
booted from an image directory with no Docker engine, and the guest agent over the
stdio pipes across a worker "restart"."""

from __future__ import annotations

import ctypes
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import BASE_IMAGE, docker_available, image_exists

from hotbed import limits
from hotbed.protocol import ExecSpec, Resources, SandboxSpec
from workers.guest.channel import GuestManager
from workers.runtimes.base import Placed
from workers.runtimes.runsc import nvidia, oci
from workers.runtimes.runsc.images import ImageStore, unpack
from workers.runtimes.runsc.nvidia import gpu_minors

UUID_A = "GPU-aaaaaaaa-1111-2222-3333-444444444444"
UUID_B = "GPU-bbbbbbbb-1111-2222-3333-444444444444"


def fake_proc(tmp_path: Path) -> Path:
    proc = tmp_path / "proc"
    for bus, uuid, minor in (("0000:01:00.0", UUID_A, 0), ("0000:02:00.0", UUID_B, 3)):
        d = proc / "driver" / "nvidia" / "gpus" / bus
        d.mkdir(parents=True)
        (d / "information").write_text(
            f"Model: \t\t NVIDIA H200\nIRQ:   \t\t 42\nGPU UUID: \t {uuid}\nDevice Minor: \t {minor}\n"
        )
    (proc / "devices").write_text("Character devices:\n  1 mem\n195 nvidia\n236 nvidia-uvm\n")
    return proc


def ident() -> oci.Identity:
    return oci.Identity(uid=1000, gid=1000, home="/home/user")


def make_spec(gpu: oci.GpuSetup | None = None) -> dict[str, Any]:
    return oci.sandbox_spec(
        rootfs=Path("/images/x/rootfs"), args=["/bin/sh"], env=["PATH=/bin", "A=1"], cwd="/work",
        ident=ident(), hostname="sb-1", annotations={"dev.hotbed.sandbox": "sb-1"},
        cgroup=oci.cgroups_path("/hotbed", "sb-1"), resources=Resources(cpu=0.5, memory_mb=256, pids=64),
        gpu=gpu,
    )


# ------------------------------------------------------------------ OCI spec


def test_cpu_sandbox_spec_has_the_docker_runtime_limits() -> None:
    spec = make_spec()
    res = spec["linux"]["resources"]
    assert res["cpu"] == {"quota": 50_000, "period": 100_000}
    assert res["memory"] == {"limit": 256 << 20, "swap": 256 << 20}
    # The sandbox's own processes stop at 64 (RLIMIT_NPROC, which gVisor enforces); the
    # host's pids cgroup, which also counts gVisor's threads, sits above it.
    assert res["pids"] == {"limit": limits.host_pids_limit(64)}
    assert {"type": "RLIMIT_NPROC", "soft": 64, "hard": 64} in spec["process"]["rlimits"]
    assert spec["linux"]["cgroupsPath"] == "/hotbed/hotbed-sb-1"
    proc = spec["process"]
    assert proc["user"] == {"uid": 1000, "gid": 1000, "additionalGids": []}
    assert proc["noNewPrivileges"] is True
    assert proc["capabilities"]["effective"] == []  # a non-root user holds no capability
    assert {"type": "network"} in spec["linux"]["namespaces"]
    assert "HOME=/home/user" in proc["env"] and "A=1" in proc["env"]
    assert spec["linux"]["devices"] == []
    assert not any(k.startswith(("NVIDIA_", "CUDA_")) for k in (e.partition("=")[0] for e in proc["env"]))
    assert not [m for m in spec["mounts"] if m["type"] == "bind"]


def test_node_platform_is_passed_and_gpu_sandboxes_keep_systrap() -> None:
    """The worker's ``runsc_platform`` reaches every runsc call; a GPU sandbox's own
    flags come after it, so it runs on systrap (the later flag wins in runsc)."""
    from workers.config import WorkerSettings
    from workers.runtimes import make_runtime
    from workers.runtimes.runsc.runtime import GPU_FLAGS, RunscRuntime

    rt = make_runtime(WorkerSettings(runtime="runsc"))
    assert isinstance(rt, RunscRuntime)
    assert "--platform=ptrace" in rt.runsc.argv(["state", "sb-1"])
    gpu = rt.runsc.argv(["state", "sb-1"], GPU_FLAGS)
    platforms = [a for a in gpu if a.startswith("--platform=")]
    assert platforms[-1] == "--platform=systrap" and gpu.index("--nvproxy") < gpu.index("state")
    systrap = make_runtime(WorkerSettings(runtime="runsc", runsc_platform="systrap"))
    assert isinstance(systrap, RunscRuntime)
    assert "--platform=systrap" in systrap.runsc.argv(["list"])


def test_gpu_sandbox_spec_shows_exactly_the_assigned_gpu(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "libcuda.so.550.54").write_bytes(b"\x7fELF")
    (lib / "libcuda.so.1").symlink_to("libcuda.so.550.54")
    (lib / "libnvidia-ml.so.550.54").write_bytes(b"\x7fELF")
    (lib / "libunrelated.so").write_bytes(b"")
    bins = tmp_path / "bin"
    bins.mkdir()
    (bins / "nvidia-smi").write_bytes(b"#!")
    files = nvidia.driver_files((os.fspath(lib),), (os.fspath(bins),))
    gpu = nvidia.gpu_setup([UUID_B], proc=fake_proc(tmp_path), files=files)
    spec = make_spec(gpu)

    devices = {d["path"]: (d["major"], d["minor"]) for d in spec["linux"]["devices"]}
    # Only GPU B's node (minor 3); never GPU A's /dev/nvidia0.
    assert devices == {
        "/dev/nvidiactl": (195, 255), "/dev/nvidia-uvm": (236, 0), "/dev/nvidia-uvm-tools": (236, 1),
        "/dev/nvidia3": (195, 3),
    }
    env = dict(e.partition("=")[::2] for e in spec["process"]["env"])
    assert env["NVIDIA_VISIBLE_DEVICES"] == env["CUDA_VISIBLE_DEVICES"] == UUID_B
    binds = {m["destination"]: m for m in spec["mounts"] if m["type"] == "bind"}
    assert set(binds) == {
        f"{lib}/libcuda.so.1", f"{lib}/libcuda.so.550.54", f"{lib}/libnvidia-ml.so.550.54", f"{bins}/nvidia-smi"
    }
    # A link is mounted as the file it resolves to; everything read-only.
    assert binds[f"{lib}/libcuda.so.1"]["source"] == f"{lib}/libcuda.so.550.54"
    assert all("ro" in m["options"] for m in binds.values())


def test_gpu_setup_refuses_gpus_the_host_lacks(tmp_path: Path) -> None:
    with pytest.raises(nvidia.GpuHostError, match="not on this host"):
        nvidia.gpu_setup(["GPU-nope"], proc=fake_proc(tmp_path), files=[])
    with pytest.raises(nvidia.GpuHostError, match="driver"):
        nvidia.gpu_setup([UUID_A], proc=tmp_path / "empty", files=[])


def test_users_resolve_against_the_image(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\nuser:x:1000:\nvideo:x:44:user\n")
    assert oci.resolve_user(tmp_path, "user") == oci.Identity(uid=1000, gid=1000, gids=[44], home="/home/user")
    assert oci.resolve_user(tmp_path, "1000:1000").home == "/home/user"
    assert oci.resolve_user(tmp_path, "4242:7") == oci.Identity(uid=4242, gid=7, home="/")
    assert oci.resolve_user(tmp_path, "0").uid == 0
    with pytest.raises(ValueError):
        oci.resolve_user(tmp_path, "nobody-here")


# ------------------------------------------------------------------ images


def _tar(entries: dict[str, bytes | None], *, mode: int = 0o644) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
                t.addfile(info)
            else:
                info.size, info.mode = len(data), mode
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_unpack_docker_save_applies_layers_and_whiteouts(tmp_path: Path) -> None:
    lower = _tar({"tmp": None, "etc": None, "etc/a": b"a", "etc/b": b"b", "opt": None, "opt/old": b"o"})
    upper = _tar({"etc/.wh.a": b"", "opt": None, "opt/.wh..wh..opq": b"", "opt/new": b"n", "etc/b": b"B"})
    config = {"config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/w", "User": "1000"}}
    outer = {
        "manifest.json": json.dumps([{"Config": "cfg.json", "Layers": ["l1/layer.tar", "l2/layer.tar"]}]).encode(),
        "cfg.json": json.dumps(config).encode(), "l1/layer.tar": lower, "l2/layer.tar": upper,
    }
    (tmp_path / "img.tar").write_bytes(_tar(outer))
    got = unpack(tmp_path / "img.tar", tmp_path / "root")
    root = tmp_path / "root"
    assert got == oci.ImageConfig(env=["PATH=/bin"], cmd=["/bin/sh"], workdir="/w", user="1000")
    assert not (root / "etc" / "a").exists()
    assert (root / "etc" / "b").read_bytes() == b"B"
    assert sorted(p.name for p in (root / "opt").iterdir()) == ["new"]
    assert (root / "tmp").stat().st_mode & 0o7777 == 0o1777  # modes kept as they are


def test_unpack_refuses_paths_out_of_the_root(tmp_path: Path) -> None:
    (tmp_path / "bad.tar").write_bytes(_tar({"../escape": b"x"}))
    with pytest.raises(ValueError):
        unpack(tmp_path / "bad.tar", tmp_path / "root")
    assert not (tmp_path / "escape").exists()


@pytest.mark.anyio
async def test_image_dir_serves_directories_and_tarballs_without_docker(tmp_path: Path) -> None:
    images = tmp_path / "images"
    (images / "team" / "dirimg" / "rootfs" / "bin").mkdir(parents=True)
    (images / "team" / "dirimg" / "image.json").write_text(json.dumps({"Env": ["X=1"], "User": "1000"}))
    (images / "flat.tar").write_bytes(_tar({"bin": None, "bin/sh": b"#!"}))
    store = ImageStore(tmp_path / "cache", images, use_docker=False)
    await store.open()
    d = await store.get("team/dirimg:latest")
    assert d.rootfs == os.fspath(images / "team" / "dirimg" / "rootfs")
    assert d.config.env == ["X=1"] and d.config.user == "1000"
    t = await store.get("flat")
    assert (Path(t.rootfs) / "bin" / "sh").read_bytes() == b"#!"
    assert t.ref.startswith("cache:")
    assert (await store.get("flat", ref=t.ref)).rootfs == t.rootfs
    from hotbed.errors import ImageNotFound

    with pytest.raises(ImageNotFound):
        await store.get("missing")
    with pytest.raises(ImageNotFound):
        await store.get("../../etc")


# ------------------------------------------------------------------ with runsc

@pytest.fixture
async def base_rootfs_runtime(tmp_path: Path) -> AsyncIterator[Any]:
    """A runsc runtime with no Docker engine: its one image is a directory on the node
    (hotbed/base, exported once for the test)."""
    if shutil.which("runsc") is None or not docker_available() or not image_exists(BASE_IMAGE):
        pytest.skip("needs runsc, and the base image to export")
    from workers.runtimes.runsc import RunscRuntime

    helper = RunscRuntime(root="/run/hotbed/runsc-test", state_dir=tmp_path / "h",
                          image_cache="/var/lib/hotbed/runsc-test/images")
    await helper.open()
    try:
        image = await helper.images.get(BASE_IMAGE)
    finally:
        await helper.aclose()
    images = tmp_path / "images"
    (images / "nodebase").mkdir(parents=True)
    (images / "nodebase" / "rootfs").symlink_to(image.rootfs)
    # No HOME in the image's env: it comes from the user's passwd entry, as with Docker.
    (images / "nodebase" / "image.json").write_text(json.dumps({"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]}))
    rt = RunscRuntime(root="/run/hotbed/runsc-test", state_dir=tmp_path / "runsc", image_dir=images, use_docker=False)
    await rt.open()
    try:
        yield rt
    finally:
        with anyio.CancelScope(shield=True):
            for m in await rt.list_managed():
                await rt.destroy(m.sandbox_id)
            await rt.aclose()


@pytest.mark.anyio
async def test_guest_agent_over_the_pipes_survives_a_new_attach(base_rootfs_runtime: Any) -> None:
    rt = base_rootfs_runtime
    assert not rt.images.has_docker
    sid = f"sb-{secrets.token_hex(4)}"
    placed = Placed(sandbox_id=sid, worker_id="w-runsc", prefix="t-runsc")
    await rt.create(placed, SandboxSpec(image="nodebase", resources=Resources(cpu=0.5, memory_mb=256), user="1000:1000"))
    for _attempt in range(2):  # the second manager is a restarted worker
        guests = GuestManager(rt.attach)
        async with anyio.create_task_group() as tg:
            await tg.start(guests.run)
            ch = await guests.channel(sid)
            assert ch is not None and ch.has_agent
            head, _ = await ch.call({"t": "hello"})
            assert head.get("t") == "result"
            tg.cancel_scope.cancel()
    res = await rt.exec(sid, ExecSpec(shell="id -u; echo $HOME"), default_user="1000:1000")
    assert res.stdout.split() == [b"1000", b"/home/user"]


@pytest.mark.anyio
async def test_resume_clears_a_container_left_by_a_dead_worker(base_rootfs_runtime: Any) -> None:
    """A resume restores without asking runsc first; when a worker died between the
    checkpoint and the delete, the stopped container left behind is cleared and the
    restore tried again. A sandbox that is gone cannot be attached."""
    from hotbed.errors import SandboxNotRunning

    rt = base_rootfs_runtime
    sid = f"sb-{secrets.token_hex(4)}"
    placed = Placed(sandbox_id=sid, worker_id="w-runsc", prefix="t-runsc")
    await rt.create(placed, SandboxSpec(image="nodebase", resources=Resources(cpu=0.5, memory_mb=256)))
    await rt.exec(sid, ExecSpec(shell="echo kept > /tmp/mark"), default_user="0")
    # The pause's checkpoint, without the delete that follows it.
    paused = rt._dir(sid) / "paused"
    await rt.runsc.call(["checkpoint", "--image-path", os.fspath(paused), "--compression=none", sid])
    await wait_stopped(rt, sid)
    assert (await rt.runsc.state(sid) or {}).get("status") == "stopped"
    assert await rt.is_paused(sid)
    with pytest.raises(SandboxNotRunning):
        await rt.attach(sid)
    await rt.resume(sid)
    assert not paused.exists()
    res = await rt.exec(sid, ExecSpec(shell="cat /tmp/mark"), default_user="0")
    assert res.stdout == b"kept\n"
    (await rt.attach(sid)).abort()
    await rt.resume(sid)  # running: nothing to do
    await rt.runsc.call(["kill", sid, "KILL"])
    await wait_stopped(rt, sid)
    with pytest.raises(SandboxNotRunning):
        await rt.attach(sid)


@pytest.mark.anyio
async def test_the_runtime_reaps_the_processes_runsc_leaves_it(base_rootfs_runtime: Any) -> None:
    """runsc's sandbox and gofer processes outlive the `runsc run` that started them:
    they become the worker's children (it is a subreaper), are reaped when a delete
    ends them, and one that dies alone is seen as stopped. None is left, as a zombie
    here or handed to PID 1, whose late reaping would hold every delete."""
    from workers.runtimes.runsc import reaper

    rt = base_rootfs_runtime
    assert rt.reaper.enabled
    spec = SandboxSpec(image="nodebase", resources=Resources(cpu=0.5, memory_mb=256))
    sids = [f"sb-{secrets.token_hex(4)}" for _ in range(2)]
    pids = {}
    for sid in sids:
        await rt.create(Placed(sandbox_id=sid, worker_id="w-runsc", prefix="t-runsc"), spec)
        pids[sid] = rt.reaper._pids[sid]
        assert len(pids[sid]) == 2, pids  # the sandbox and its gofer
        for pid in pids[sid]:
            assert _ppid(pid) == os.getpid()
    # One ends through the runtime: its processes are reaped, not left to anyone.
    await rt.destroy(sids[0])
    assert [pid for pid in pids[sids[0]] if _ppid(pid) is not None] == []
    # One dies alone (its whole sandbox killed from outside): stopped, then reaped.
    await rt.runsc.call(["kill", "--all", sids[1], "KILL"])
    await wait_stopped(rt, sids[1])
    await rt.destroy(sids[1])
    assert [pid for pid in pids[sids[1]] if _ppid(pid) is not None] == []
    # The ptrace platform's stubs die after their sandbox; a sweep takes the last.
    with anyio.fail_after(10):
        while list(reaper._runsc_children(set())):
            reaper.sweep(set())
            await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_a_closed_runtime_hands_the_subreaper_role_back(tmp_path: Path) -> None:
    """Only while a runsc runtime is open is the process a subreaper: a process it starts
    afterwards that daemonizes (`hotbed up -d`) must go to PID 1, which reaps it."""
    if shutil.which("runsc") is None:
        pytest.skip("needs runsc")
    from workers.runtimes.runsc import RunscRuntime

    def subreaper() -> int:
        got = ctypes.c_int(-1)
        assert ctypes.CDLL(None).prctl(37, ctypes.byref(got), 0, 0, 0) == 0  # PR_GET_CHILD_SUBREAPER
        return got.value

    assert subreaper() == 0
    rts = [RunscRuntime(root=tmp_path / f"root{i}", state_dir=tmp_path / f"s{i}", use_docker=False) for i in range(2)]
    for rt in rts:
        await rt.open()
    assert subreaper() == 1
    await rts[0].aclose()
    assert subreaper() == 1  # the other is still open
    await rts[1].aclose()
    assert subreaper() == 0


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[1])
    except OSError:
        return None


async def wait_stopped(rt: Any, sid: str) -> None:
    # Through the runtime, which reaps the sandbox's exited processes before it asks
    # runsc (a zombie sandbox process still reads as running). Right after a checkpoint
    # runsc can say "stopped" while the sandbox process is still on its way out, then
    # "running" again: stopped is when its processes are gone as well.
    meta = await rt._meta(sid)
    with anyio.fail_after(10):
        while await rt._status(meta) != "stopped" or rt.reaper._pids.get(sid):
            await anyio.sleep(0.05)


# ------------------------------------------------------- bench/gpu_check_runsc.sh

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check(tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTBED_")}
    env.update(PYTHON=sys.executable, GPU_CHECK_OUT=os.fspath(tmp_path / "gpu_check.txt"),
               GPU_CHECK_MEMORY_MB="256", **extra)
    return subprocess.run(["bash", os.fspath(ROOT / "bench" / "gpu_check_runsc.sh")], capture_output=True,
                          text=True, timeout=240, env=env)


@pytest.mark.timeout(300)
def test_gpu_check_script_without_a_gpu_fails_clearly(tmp_path: Path) -> None:
    """The GPU check for the lent machine, run here: the whole stack comes up on the
    runsc runtime (host root as the image), and with no GPU it says so and fails."""
    if shutil.which("runsc") is None or shutil.which("redis-server") is None or os.geteuid() != 0:
        pytest.skip("needs root, runsc and redis-server")
    if set(gpu_minors()):
        pytest.skip("this host has GPUs: the check itself is the test")
    out = _gpu_check(tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "worker gpu-node: runtime=runsc kind=real GPUs: none" in out.stdout
    assert "FAILED: no GPU detected" in out.stdout
    assert (tmp_path / "gpu_check.txt").read_text() == out.stdout

    # GPUs declared but absent: the CPU-only sandbox runs under runsc, the GPU sandbox
    # is refused with the reason (no driver), and nothing is left behind.
    fake = '[{"uuid": "GPU-fake-1", "model": "NVIDIA H200", "memory_mb": 143771}]'
    out = _gpu_check(tmp_path, GPU_CHECK_FAKE_GPUS=fake)
    assert out.returncode == 1, out.stdout + out.stderr
    text = out.stdout
    assert "ok    CPU-only sandbox created" in text
    assert "FAIL  GPU sandbox created under runsc --nvproxy" in text
    assert "no NVIDIA GPU in /proc/driver/nvidia/gpus" in text


# ------------------------------------------------------- a worker on the runtime


@pytest.mark.anyio
async def test_worker_on_the_runsc_runtime_end_to_end(redis_url: str, prefix: str, tmp_path: Path) -> None:
    """SDK -> scheduler -> a worker with ``runtime = "runsc"``: the guest agent's exec
    and files, a fork from a memory snapshot, pause and resume; nothing left behind."""
    if shutil.which("runsc") is None or not docker_available() or not image_exists(BASE_IMAGE):
        pytest.skip("needs runsc, and dockerd with the base image")
    import hotbed
    from tests.conftest import running_stack

    state = tmp_path / "runsc"
    overrides = {"runtime": "runsc", "runsc_root": "/run/hotbed/runsc-test", "runsc_dir": os.fspath(state),
                 "snapshot_dir": os.fspath(tmp_path / "snapshots")}
    async with running_stack(redis_url, prefix, worker_overrides=overrides) as stack:
        c = stack.client
        sb = await hotbed.Sandbox.create(BASE_IMAGE, client=c, env={"GREETING": "hi"})
        res = await sb.exec("sh", "-c", 'echo "$GREETING"; id -u; cat /proc/self/cgroup >/dev/null; exit 3')
        assert (res.exit_code, res.stdout.split()) == (3, ["hi", "1000"])
        assert await sb.write_file("/home/user/kept.txt", b"kept") == 4
        kids = await sb.fork(1)
        assert await kids[0].read_file("/home/user/kept.txt") == b"kept"
        await sb.pause()
        assert [p.name for p in (state / "sandboxes" / sb.id).iterdir() if p.name == "paused"] == ["paused"]
        await sb.resume()
        assert await sb.read_file("/home/user/kept.txt") == b"kept"
        for s in (sb, *kids):
            await s.terminate()
    assert list((state / "sandboxes").iterdir()) == []
