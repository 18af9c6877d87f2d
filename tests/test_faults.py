"""Faults: daemons killed with SIGKILL, Redis restarted under running daemons.

Every other stop in the suite is a graceful SIGTERM; these are the unclean ones that
docs/protocol.md promises to survive. The daemons run as real subprocesses (the
``Daemon`` of tests/test_daemon_services.py, ready through READY=1); workers use the
unisolated ``process`` runtime where isolation is not the point, and docker+runsc where
containers are. Each test checks that the surviving daemons kept serving and that
nothing leaked.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import redis as sync_redis

from daemon import lifecycle
from hotbed import keys as keyspace
from hotbed.client import Client
from hotbed.protocol import (
    CreateSandbox,
    ErrorReply,
    ExecResult,
    ExecSpec,
    FileWritten,
    Resources,
    SandboxCreated,
    SandboxSpec,
    Terminate,
    Terminated,
    WriteFile,
)
from hotbed.protocol import Exec as ExecMsg
from hotbed.records import capacity_from_hash
from tests.conftest import (
    BUSYBOX_IMAGE,
    _free_port,
    docker_available,
    leftover_containers,
    running_stack,
)
from tests.test_daemon_services import Daemon
from workers.runtimes.docker import container_name

# ------------------------------------------------------------------ unit: the policy


@pytest.mark.anyio
async def test_supervised_loop_logs_once_backs_off_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[float] = []
    done = anyio.Event()

    async def step() -> None:
        calls.append(anyio.current_time())
        if len(calls) <= 4:
            raise TimeoutError("docker took too long")
        if len(calls) == 5:
            raise KeyError("a bug")
        done.set()

    caplog.set_level(logging.INFO, logger="hotbed.test")
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: lifecycle.supervised_loop(
                "probe", step, interval=0.01, log=logging.getLogger("hotbed.test"),
            ))
            await done.wait()
            tg.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if r.name == "hotbed.test"]
    # One line for the outage (the bug in it is not a new outage), one for the recovery.
    assert len(lines) == 2, lines
    assert "probe failed, retrying with backoff: TimeoutError" in lines[0]
    assert "probe recovered" in lines[1]
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert gaps[3] > gaps[0], f"no backoff: {gaps}"


@pytest.mark.anyio
async def test_supervised_loop_never_swallows_cancellation() -> None:
    async def step() -> None:
        await anyio.sleep_forever()

    with anyio.move_on_after(0.1) as scope:
        await lifecycle.supervised_loop("probe", step, interval=0.01)
    assert scope.cancelled_caught


# ------------------------------------------------------------------ fixtures


class RedisServer:
    """A redis-server of this test alone, so it can be killed and restarted."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.dir = workdir / "redis"
        self.dir.mkdir()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server, "redis-server not installed: run `make test`"
        # As `hotbed up` runs it: an append-only file, so a restart keeps the data.
        self.proc = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--save", "", "--maxclients", "2000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                if sync_redis.Redis(port=self.port, socket_timeout=1).ping():
                    return
            except sync_redis.exceptions.ConnectionError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self, *, lose_data: bool = False) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None
        if lose_data:
            shutil.rmtree(self.dir)
            self.dir.mkdir()

    def restart(self, *, lose_data: bool = False, down_s: float = 1.0) -> None:
        self.stop(lose_data=lose_data)
        time.sleep(down_s)  # the outage the daemons must ride out
        self.start()


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hotbed-faults-") as d:
        yield Path(d)


@pytest.fixture
def own_redis(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            server.stop()


def env_for(url: str, prefix: str, workdir: Path, **extra: str) -> dict[str, str]:
    return {
        "HOTBED_REDIS_URL": url, "HOTBED_PREFIX": prefix,
        "HOTBED_REGISTRY_REFRESH_S": "0.1", "HOTBED_HEARTBEAT_S": "0.2",
        "HOTBED_HEARTBEAT_TTL_S": "5", "HOTBED_SHUTDOWN_GRACE_S": "5",
        "HOTBED_RUNTIME": "process", "HOTBED_PROCESS_ROOT": str(workdir / "sandboxes"),
        "HOTBED_WORKER_ID": f"w-{prefix}", "HOTBED_GPU_DETECT": "none",
        "HOTBED_CPU": "8", "HOTBED_MEMORY_MB": "8192", "HOTBED_RECONCILE_S": "0.5",
        **extra,
    }


class Fleet:
    """The daemons of one test; each one left running must still be alive and stop
    cleanly at the end, and none may log a traceback."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.daemons: list[Daemon] = []

    def start(self, module: str, **env: str) -> Daemon:
        d = Daemon(module, self.workdir, {**self.env, **env})
        self.daemons.append(d)
        d.expect("READY=1", timeout=30)
        return d

    def kill(self, d: Daemon) -> None:
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(timeout=10)

    def close(self) -> None:
        for d in self.daemons:
            d.close()


@pytest.fixture
def fleet(workdir: Path, own_redis: RedisServer, prefix: str) -> Iterator[Fleet]:
    f = Fleet(workdir, env_for(own_redis.url, prefix, workdir))
    try:
        yield f
    finally:
        f.close()
        for d in f.daemons:
            # Shown with a failure: what each daemon went through.
            logging.getLogger("tests.faults").warning("%s log:\n%s", d.module, d.log())
    for d in f.daemons:
        assert "Traceback" not in d.log_path.read_text(errors="replace"), d.log()


def alive_and_stop(*daemons: Daemon) -> None:
    for d in daemons:
        assert d.proc.poll() is None, f"{d.module} exited ({d.proc.returncode}); log:\n{d.log()}"
    for d in daemons:
        assert d.stop() == 0, d.log()


def run(main: object) -> None:
    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})  # type: ignore[arg-type]


async def create(c: Client, *, timeout: float = 30.0, cpu: float = 1.0) -> SandboxCreated:
    # The fleet's workers run the unisolated process runtime: the create opts out.
    spec = SandboxSpec(image="none", resources=Resources(cpu=cpu, memory_mb=256), allow_unisolated=True)
    created = await c.request(CreateSandbox(spec=spec), timeout=timeout)
    assert isinstance(created, SandboxCreated)
    return created


async def echo(c: Client, created: SandboxCreated, text: str) -> None:
    res = await c.worker_request(
        created.worker_id,
        ExecMsg(sandbox_id=created.sandbox_id, exec=ExecSpec(argv=["echo", text])),
        timeout=30,
    )
    assert isinstance(res, ExecResult) and res.stdout == f"{text}\n".encode()


async def terminate(c: Client, created: SandboxCreated) -> None:
    got = await c.worker_request(created.worker_id, Terminate(sandbox_id=created.sandbox_id), timeout=30)
    assert isinstance(got, Terminated)


async def capacity_restored(c: Client, wid: str, *, cpu_millis: int, within: float = 20.0) -> None:
    with anyio.fail_after(within):
        while True:
            cap = capacity_from_hash(await c.redis.hgetall(c.keys.worker_cap(wid)))
            if cap.cpu_free == cpu_millis and cap.sandboxes == 0:
                return
            await anyio.sleep(0.1)


def sandbox_dirs(workdir: Path) -> list[Path]:
    root = workdir / "sandboxes"
    return [p for p in root.glob("*/*/*") if p.is_dir()] if root.exists() else []


def home_of(workdir: Path, sandbox_id: str) -> Path:
    """The home folder of a process-runtime sandbox, seen from the host."""
    return next(p for p in sandbox_dirs(workdir) if p.name == sandbox_id) / "fs" / "home"


async def send(c: Client, wid: str, msg: ExecMsg | WriteFile | Terminate, *, timeout: float = 60) -> str:
    """Queue ``msg`` on worker ``wid``'s command stream; returns its request id."""
    return await c.submit(c.keys.worker_cmds(wid), msg, timeout=timeout, worker_id=wid)


async def appear(*paths: Path, within: float = 10.0) -> None:
    """Wait until every one of ``paths`` exists (a command has begun writing)."""
    with anyio.fail_after(within):
        while not all(p.exists() for p in paths):
            await anyio.sleep(0.02)


# ------------------------------------------------------------------ Redis restart


def test_daemons_outlive_redis_restarts(fleet: Fleet, own_redis: RedisServer, prefix: str, workdir: Path) -> None:
    """Redis restarted twice under a running scheduler and worker: once keeping its
    data (append-only file, as `hotbed up` runs it), once losing it. Both daemons keep
    serving: the sandbox made before still answers after the first, and a create after
    each restart succeeds."""
    sched = fleet.start("scheduler")
    worker = fleet.start("workers")

    async def before() -> SandboxCreated:
        async with Client(own_redis.url, prefix=prefix) as c:
            created = await create(c)
            await echo(c, created, "before")
            return created

    async def after_restart(kept: SandboxCreated | None) -> None:
        async with Client(own_redis.url, prefix=prefix) as c:
            if kept is not None:
                await echo(c, kept, "kept")
                await terminate(c, kept)
            fresh = await create(c, timeout=30)
            await echo(c, fresh, "after")
            await terminate(c, fresh)
            await capacity_restored(c, f"w-{prefix}", cpu_millis=8000)

    kept = anyio.run(before)
    own_redis.restart()
    run(lambda: after_restart(kept))
    # Redis comes back empty: the worker re-registers, both recreate their streams.
    own_redis.restart(lose_data=True)
    run(lambda: after_restart(None))
    assert "retrying with backoff" in sched.log() + worker.log()
    alive_and_stop(sched, worker)
    assert sandbox_dirs(workdir) == []


# ------------------------------------------------------------------ SIGKILL


async def reply_of(c: Client, rid: str, *, within: float = 30.0) -> object:
    """The one reply of request ``rid`` (errors returned, not raised)."""
    return await c._wait_reply(rid, c.keys.reply(rid), within)  # noqa: SLF001 - a submitted request


async def no_second_reply(c: Client, rids: list[str]) -> None:
    await anyio.sleep(1.0)  # long enough for a duplicate to have arrived
    for rid in rids:
        assert await c.redis.llen(c.keys.reply(rid)) == 0, f"request {rid} answered twice"


def test_scheduler_killed_mid_placement_is_reclaimed_and_placed_once(
    fleet: Fleet, own_redis: RedisServer, prefix: str
) -> None:
    """Creates a scheduler has taken (waiting for room) when it is killed -9 are
    reclaimed by the other replica and each placed exactly once."""
    sched = fleet.start("scheduler")
    worker = fleet.start("workers", HOTBED_CPU="4")
    wid = f"w-{prefix}"
    half = SandboxSpec(image="none", resources=Resources(cpu=0.5, memory_mb=64), allow_unisolated=True)

    async def main() -> None:
        nonlocal sched
        async with Client(own_redis.url, prefix=prefix) as c:
            blocker = await create(c, cpu=4.0)  # the node is full: the next creates wait
            rids = [await c.submit(c.keys.requests, CreateSandbox(spec=half), timeout=60) for _ in range(6)]
            with anyio.fail_after(10):
                while (await c.redis.xpending(c.keys.requests, keyspace.REQUESTS_GROUP))["pending"] < 6:
                    await anyio.sleep(0.05)
            await anyio.to_thread.run_sync(fleet.kill, sched)
            sched = await anyio.to_thread.run_sync(
                lambda: fleet.start("scheduler", HOTBED_RECLAIM_IDLE_S="1")
            )
            await terminate(c, blocker)
            replies = [await reply_of(c, rid) for rid in rids]
            assert [type(r) for r in replies] == [SandboxCreated] * 6, replies
            assert sorted(r.sandbox_id for r in replies) == sorted(f"sb-{rid}" for rid in rids)  # type: ignore[attr-defined]
            await no_second_reply(c, rids)
            cap = capacity_from_hash(await c.redis.hgetall(c.keys.worker_cap(wid)))
            assert (cap.cpu_free, cap.sandboxes) == (1000, 6), cap
            assert (await c.redis.xpending(c.keys.requests, keyspace.REQUESTS_GROUP))["pending"] == 0
            for r in replies:
                await terminate(c, r)  # type: ignore[arg-type]
            await capacity_restored(c, wid, cpu_millis=4000)

    run(main)
    alive_and_stop(sched, worker)


def test_worker_killed_with_commands_in_flight_never_runs_one_twice(
    fleet: Fleet, own_redis: RedisServer, prefix: str, workdir: Path
) -> None:
    """A worker killed -9 while two commands run: on its restart each is answered
    WorkerLost (it may have run; it is not run again). Commands queued while it was
    down are served by the restarted worker."""
    sched = fleet.start("scheduler", HOTBED_HEARTBEAT_TTL_S="30")
    worker = fleet.start("workers")
    wid = f"w-{prefix}"

    async def main() -> None:
        nonlocal worker
        async with Client(own_redis.url, prefix=prefix) as c:
            created = await create(c)
            sid = created.sandbox_id
            home = home_of(workdir, sid)
            running = [
                await send(c, wid, ExecMsg(sandbox_id=sid, exec=ExecSpec(shell=f"echo ran >> marker{i}; sleep 3")))
                for i in range(2)
            ]
            await appear(*(home / f"marker{i}" for i in range(2)))
            await anyio.to_thread.run_sync(fleet.kill, worker)
            # Two independent commands: the restarted worker serves one read's worth of
            # commands concurrently, so neither may depend on the other.
            queued = [
                await send(c, wid, WriteFile(sandbox_id=sid, path="/home/later", data=b"x")),
                await send(c, wid, ExecMsg(sandbox_id=sid, exec=ExecSpec(argv=["echo", "queued"]))),
            ]
            worker = await anyio.to_thread.run_sync(lambda: fleet.start("workers"))
            for rid in running:
                got = await reply_of(c, rid)
                assert isinstance(got, ErrorReply) and got.code == "WorkerLost", got
            wrote, echoed = [await reply_of(c, rid) for rid in queued]
            assert isinstance(wrote, FileWritten), wrote
            assert isinstance(echoed, ExecResult) and echoed.stdout == b"queued\n", echoed
            cat = await reply_of(c, await send(c, wid, ExecMsg(sandbox_id=sid, exec=ExecSpec(argv=["cat", "later"]))))
            assert isinstance(cat, ExecResult) and cat.stdout == b"x", cat
            await no_second_reply(c, running + queued)
            await anyio.sleep(3)  # the orphaned commands' own run ends; none started again
            for i in range(2):
                assert (home / f"marker{i}").read_text() == "ran\n"
            await echo(c, created, "still serving")
            await terminate(c, created)
            await capacity_restored(c, wid, cpu_millis=8000)

    run(main)
    alive_and_stop(sched, worker)
    assert sandbox_dirs(workdir) == []


def test_reaper_answers_every_command_of_a_dead_worker(
    fleet: Fleet, own_redis: RedisServer, prefix: str, workdir: Path
) -> None:
    """A worker killed -9 and not restarted: the reaper answers WorkerLost to the command
    it was running and to every one queued after, none of which runs; its sandbox is
    marked lost. When it comes back it removes the sandbox nobody holds any more."""
    sched = fleet.start("scheduler", HOTBED_HEARTBEAT_TTL_S="1.5")
    worker = fleet.start("workers")
    wid = f"w-{prefix}"

    async def main() -> None:
        nonlocal worker
        async with Client(own_redis.url, prefix=prefix) as c:
            created = await create(c)
            sid = created.sandbox_id
            home = home_of(workdir, sid)
            rids = [await send(c, wid, ExecMsg(sandbox_id=sid, exec=ExecSpec(shell="echo ran >> marker; sleep 2")))]
            await appear(home / "marker")
            await anyio.to_thread.run_sync(fleet.kill, worker)
            rids += [
                await send(c, wid, ExecMsg(sandbox_id=sid, exec=ExecSpec(shell="echo ran >> marker"))),
                await send(c, wid, WriteFile(sandbox_id=sid, path="/home/never", data=b"x")),
                await send(c, wid, Terminate(sandbox_id=sid)),
            ]
            for rid in rids:
                got = await reply_of(c, rid, within=15)
                assert isinstance(got, ErrorReply) and got.code == "WorkerLost", got
            assert (await c.record(sid)).state == "lost"
            await anyio.sleep(2)  # the orphaned command's own run ends
            assert (home / "marker").read_text() == "ran\n"
            assert not (home / "never").exists()
            assert sandbox_dirs(workdir), "the dead worker's sandbox is still there"
            worker = await anyio.to_thread.run_sync(lambda: fleet.start("workers"))
            assert sandbox_dirs(workdir) == [], "the restarted worker kept a sandbox nobody holds"
            fresh = await create(c)
            await echo(c, fresh, "serving")
            await terminate(c, fresh)
            await capacity_restored(c, wid, cpu_millis=8000)

    run(main)
    alive_and_stop(sched, worker)


def test_stale_requests_are_answered_request_timeout_and_not_run(
    fleet: Fleet, own_redis: RedisServer, prefix: str, workdir: Path
) -> None:
    """A create that waited in the stream past its deadline (no scheduler was up) and a
    command that reaches the worker after its deadline: both answered RequestTimeout,
    neither runs, nothing is held."""
    worker = fleet.start("workers")
    wid = f"w-{prefix}"

    async def main() -> None:
        async with Client(own_redis.url, prefix=prefix) as c:
            stale_create = await c.submit(c.keys.requests, CreateSandbox(spec=SandboxSpec(image="none", allow_unisolated=True)), timeout=0.5)
            await anyio.sleep(1.0)
            sched = await anyio.to_thread.run_sync(lambda: fleet.start("scheduler"))
            got = await reply_of(c, stale_create)
            assert isinstance(got, ErrorReply) and got.code == "RequestTimeout", got
            rec = await c.record(f"sb-{stale_create}")
            assert rec.state == "failed", rec
            assert sandbox_dirs(workdir) == []
            await capacity_restored(c, wid, cpu_millis=8000)

            created = await create(c)
            home = home_of(workdir, created.sandbox_id)
            stale_exec = await send(
                c, wid, ExecMsg(sandbox_id=created.sandbox_id, exec=ExecSpec(shell="echo ran >> marker")), timeout=-1.0,
            )
            got = await reply_of(c, stale_exec)
            assert isinstance(got, ErrorReply) and got.code == "RequestTimeout", got
            await echo(c, created, "serving")
            assert not (home / "marker").exists()
            await terminate(c, created)
            await capacity_restored(c, wid, cpu_millis=8000)
            await anyio.to_thread.run_sync(alive_and_stop, sched)

    run(main)
    alive_and_stop(worker)


# ------------------------------------------------------------------ docker + runsc


def docker_fleet_env(workdir: Path) -> dict[str, str]:
    if not docker_available():
        pytest.fail("dockerd with runsc is not running: run `make test` (it sets them up)")
    return {"HOTBED_RUNTIME": "docker", "HOTBED_SNAPSHOT_DIR": str(workdir / "snapshots"),
            "HOTBED_DRAIN_ON_STOP": "true"}


async def busybox(c: Client) -> SandboxCreated:
    spec = SandboxSpec(image=BUSYBOX_IMAGE, resources=Resources(cpu=1.0, memory_mb=128))
    created = await c.request(CreateSandbox(spec=spec), timeout=60)
    assert isinstance(created, SandboxCreated)
    return created


def restart_dockerd(*, within: float = 60.0) -> None:
    """Stop dockerd and start it again as it was started, then wait until it answers."""
    if Path("/run/systemd/system").exists() and subprocess.run(
        ["systemctl", "is-active", "-q", "docker"], check=False
    ).returncode == 0:
        subprocess.run(["systemctl", "restart", "docker"], check=True, timeout=within)
    else:
        pid = int(subprocess.run(["pgrep", "-xo", "dockerd"], capture_output=True, text=True, check=True).stdout)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        nice = os.getpriority(os.PRIO_PROCESS, pid)
        log = os.readlink(f"/proc/{pid}/fd/1")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + within
        while Path(f"/proc/{pid}").exists():
            assert time.monotonic() < deadline, "dockerd did not stop"
            time.sleep(0.1)
        with open(log if log.startswith("/") else os.devnull, "ab") as out:
            subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                preexec_fn=lambda: os.nice(nice),  # noqa: PLW1509 - only nice, before exec
            )
    deadline = time.monotonic() + within
    while not docker_available():
        assert time.monotonic() < deadline, "dockerd did not come back"
        time.sleep(0.2)


def test_sandboxes_and_daemons_outlive_a_dockerd_restart(
    fleet: Fleet, own_redis: RedisServer, prefix: str, workdir: Path
) -> None:
    """dockerd restarted under a running worker (live-restore): the sandbox keeps its
    state and answers after, the worker keeps serving, a create after it succeeds."""
    info = subprocess.run(["docker", "info", "--format", "{{.LiveRestoreEnabled}}"], capture_output=True, text=True)
    if info.stdout.strip() != "true":
        pytest.fail("dockerd runs without live-restore: run `make install` (scripts/host-setup.sh)")
    fleet.env.update(docker_fleet_env(workdir))
    sched = fleet.start("scheduler")
    worker = fleet.start("workers")

    async def main() -> None:
        async with Client(own_redis.url, prefix=prefix) as c:
            kept = await busybox(c)
            await c.worker_request(kept.worker_id, WriteFile(sandbox_id=kept.sandbox_id, path="/tmp/keep", data=b"kept"), timeout=30)
            await anyio.to_thread.run_sync(restart_dockerd)
            res = await c.worker_request(
                kept.worker_id, ExecMsg(sandbox_id=kept.sandbox_id, exec=ExecSpec(argv=["cat", "/tmp/keep"])), timeout=30,
            )
            assert isinstance(res, ExecResult) and res.stdout == b"kept", res
            fresh = await busybox(c)
            await echo(c, fresh, "after")
            await anyio.sleep(1.5)  # health checks after the restart leave both running
            assert (await c.record(kept.sandbox_id)).state == "running"
            for created in (kept, fresh):
                await terminate(c, created)
            await capacity_restored(c, f"w-{prefix}", cpu_millis=8000)

    run(main)
    alive_and_stop(sched, worker)
    assert leftover_containers(prefix) == []


def test_restarted_worker_removes_containers_nobody_holds(
    fleet: Fleet, own_redis: RedisServer, prefix: str, workdir: Path
) -> None:
    """A docker worker killed -9: the reaper marks its sandbox lost; the worker, back,
    removes the container nobody holds and serves again."""
    fleet.env.update(docker_fleet_env(workdir))
    sched = fleet.start("scheduler", HOTBED_HEARTBEAT_TTL_S="1.5")
    worker = fleet.start("workers")

    async def main() -> None:
        nonlocal worker
        async with Client(own_redis.url, prefix=prefix) as c:
            orphan = await busybox(c)
            await anyio.to_thread.run_sync(fleet.kill, worker)
            with anyio.fail_after(15):
                while (await c.record(orphan.sandbox_id)).state != "lost":
                    await anyio.sleep(0.1)
            assert leftover_containers(prefix), "the container went with its worker"
            worker = await anyio.to_thread.run_sync(lambda: fleet.start("workers"))
            assert leftover_containers(prefix) == [], "the restarted worker kept a container nobody holds"
            fresh = await busybox(c)
            await echo(c, fresh, "serving")
            await terminate(c, fresh)
            await capacity_restored(c, f"w-{prefix}", cpu_millis=8000)

    run(main)
    alive_and_stop(sched, worker)
    assert leftover_containers(prefix) == []


@pytest.mark.anyio
async def test_dead_container_fails_its_sandbox_and_frees_capacity(redis_url: str, prefix: str) -> None:
    """A running sandbox whose container dies out of band becomes ``failed`` and its
    capacity is released; the worker keeps serving."""
    async with running_stack(redis_url, prefix) as stack:
        c = stack.client
        wid = stack.worker.id
        total = stack.worker.info.cpu_millis
        created = await busybox(c)
        await anyio.run_process(["docker", "kill", container_name(created.sandbox_id)])
        with anyio.fail_after(15):
            while (rec := await c.record(created.sandbox_id)).state != "failed":
                await anyio.sleep(0.1)
        assert rec.reason == "died", rec
        await capacity_restored(c, wid, cpu_millis=total)
        fresh = await busybox(c)
        await echo(c, fresh, "serving")
        await terminate(c, fresh)


@pytest.mark.anyio
async def test_a_sandbox_whose_container_dies_ends_before_the_next_full_look(redis_url: str, prefix: str) -> None:
    """A container that dies takes its guest channel with it: the worker looks at that
    sandbox at once, not at the next listing of the whole node (a minute away here)."""
    async with running_stack(redis_url, prefix, worker_overrides={"reconcile_s": 60.0}) as stack:
        c = stack.client
        created = await busybox(c)
        await echo(c, created, "up")
        await anyio.run_process(["docker", "kill", container_name(created.sandbox_id)])
        with anyio.fail_after(10):
            while (rec := await c.record(created.sandbox_id)).state != "failed":
                await anyio.sleep(0.1)
        assert rec.reason == "died", rec
        fresh = await busybox(c)
        await echo(c, fresh, "serving")
        await terminate(c, fresh)


@pytest.mark.anyio
async def test_health_schedule_looks_at_suspects_at_once_and_at_the_node_when_due() -> None:
    from workers.health import HealthSchedule, full_check_interval

    assert full_check_interval(5.0, 10) == 5.0
    assert full_check_interval(5.0, 450) == 45.0
    schedule = HealthSchedule()
    schedule.full_done(30.0)
    schedule.suspect("sb-a")
    schedule.suspect("sb-b")
    with anyio.fail_after(1):
        assert await schedule.wait() == {"sb-a", "sb-b"}
    with anyio.move_on_after(0.2) as idle:
        await schedule.wait()
    assert idle.cancelled_caught, "nothing suspected, no full look due: it waits"
    schedule.full_done(0.05)
    schedule.suspect("sb-c")
    await anyio.sleep(0.1)
    with anyio.fail_after(1):
        assert await schedule.wait() is None, "a full look due covers the suspects"


@pytest.mark.anyio
async def test_health_check_leaves_a_sandbox_being_ended_to_its_end(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A terminate removes its container after the sandbox has left the worker's table:
    a health check that lists containers meanwhile must not take that container for one
    nobody holds (and remove it a second time)."""
    caplog.set_level(logging.WARNING, logger="workers.agent")
    async with running_stack(redis_url, prefix, worker_overrides={"reconcile_s": 0.02}) as stack:
        c = stack.client
        for _ in range(4):
            created = await busybox(c)
            await echo(c, created, "up")
            await terminate(c, created)
        fresh = await busybox(c)
        await echo(c, fresh, "serving")
        await terminate(c, fresh)
    nobodys = [r.getMessage() for r in caplog.records if "nobody holds" in r.getMessage()]
    assert nobodys == []


# ------------------------------------------------------------------ hotbed up supervises


def test_up_restarts_what_dies_and_status_says_so(workdir: Path, prefix: str) -> None:
    """`hotbed up` with its worker killed -9 and its Redis shut down: both are started
    again, `hotbed status` counts the restarts, the node serves after, and `hotbed down`
    leaves no child behind."""
    import sys

    from cli.supervise import read_state

    port = _free_port()
    home = workdir / "home"
    env = dict(
        os.environ, HOTBED_HOME=str(home), HOTBED_REDIS_URL=f"redis://127.0.0.1:{port}/0",
        HOTBED_PREFIX=prefix, HOTBED_WORKER_ID=f"w-{prefix}", HOTBED_GPU_DETECT="none",
        HOTBED_PROCESS_ROOT=str(workdir / "sandboxes"), HOTBED_HEARTBEAT_S="0.2",
        HOTBED_REGISTRY_REFRESH_S="0.1", HOTBED_CPU="8", HOTBED_MEMORY_MB="8192",
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env, timeout=120)

    def state_where(ok: object, within: float = 30.0) -> object:
        deadline = time.monotonic() + within
        while True:
            state = read_state(home)
            if state is not None and ok(state):  # type: ignore[operator]
                return state
            assert time.monotonic() < deadline, f"supervisor state: {state}"
            time.sleep(0.1)

    def logs() -> str:
        # What a rare failure here needs to be understood after the fact.
        out = [f"supervisor: {read_state(home)}"]
        for name in ("hotbed.log", "redis.log"):
            path = home / name
            out.append(f"--- {name} (tail)\n" + ("\n".join(path.read_text().splitlines()[-60:]) if path.exists() else "(none)"))
        return "\n".join(out)

    def serves() -> None:
        run = cli("run", "--unisolated", "none", "--", "echo", "served")
        assert (run.returncode, run.stdout) == (0, "served\n"), run.stderr + logs()

    r = sync_redis.Redis(host="127.0.0.1", port=port)
    children: list[int] = []
    try:
        up = cli("up", "--detach", "--runtime", "process")
        assert up.returncode == 0, up.stderr + (home / "hotbed.log").read_text()
        first = state_where(lambda s: "redis" in s.children)
        children += [c.pid for c in first.children.values() if c.pid]  # type: ignore[attr-defined]
        serves()
        worker_pid = first.children["worker"].pid  # type: ignore[attr-defined]
        os.kill(worker_pid, signal.SIGKILL)
        again = state_where(lambda s: s.children["worker"].restarts == 1 and s.children["worker"].running)
        assert again.children["worker"].last_exit == "signal 9"  # type: ignore[attr-defined]
        children.append(again.children["worker"].pid)  # type: ignore[attr-defined]
        serves()  # by the restarted worker, once it is ready
        # Not redis-py's shutdown(): its retries would stop the restarted server too.
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True, timeout=30)
        state_where(lambda s: s.children["redis"].restarts == 1)
        assert r.ping()
        status = cli("status")
        assert status.returncode == 0, status.stderr
        rows = {line.split()[0]: line.split() for line in status.stdout.splitlines() if line.split()[:1]}
        assert rows["worker"][2:4] == ["running", "1"], status.stdout
        assert rows["scheduler"][2:4] == ["running", "0"], status.stdout
        assert rows["redis"][3] == "1", status.stdout
        serves()
        down = cli("down")
        assert down.returncode == 0, down.stderr
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), pid
        log = (home / "hotbed.log").read_text()
        assert "Traceback" not in log, log
    finally:
        cli("down")
        try:
            r.shutdown(nosave=True)
        except sync_redis.exceptions.ConnectionError:
            pass
    assert sandbox_dirs(workdir) == []
