"""Shared fixtures: a real Redis per session, a real control plane per test.

``redis_url``: a private redis-server on a free loopback port for the whole session; with
``HOTBED_TEST_CLUSTER=1``, the URL of a local 3-primary Redis Cluster instead, so the
whole suite runs against a cluster.
``redis_cluster``: that local cluster (3 primaries, 1 replica each), started once per
session when a test asks for it.
``prefix``: a fresh key-space prefix per test, so tests never see each other's keys.
``hotbed_stack``: a scheduler and one docker+runsc worker running in the test's event
loop, with a connected client; on teardown the worker drains, and any container the
test's prefix left behind fails the test (a leak is a bug, not something to clean).
``wait_for``: wait for a condition that something else makes true, with a deadline.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import pytest

from hotbed.client import Client
from scheduler.config import SchedulerSettings
from scheduler.service import Scheduler
from workers.agent import WorkerAgent
from workers.config import WorkerSettings

if TYPE_CHECKING:
    from cli.localcluster import LocalCluster

# A developer's own client config (written by `hotbed up`) must not reach the suite:
# tests name their Redis and prefix themselves. setdefault so a test may point it on purpose.
os.environ.setdefault("HOTBED_CONFIG", os.path.join(tempfile.mkdtemp(prefix="hotbed-test-config-"), "config"))
BUSYBOX_IMAGE = os.environ.get("HOTBED_TEST_IMAGE", "hotbed/busybox")
BASE_IMAGE = os.environ.get("HOTBED_BASE_IMAGE", "hotbed/base")


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": True})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    from cli import localcluster

    root = Path(tempfile.mkdtemp(prefix="hotbed-cluster-"))
    try:
        cluster = localcluster.start(3, root, replicas=1)
    except localcluster.ClusterStartError as exc:
        pytest.fail(str(exc))
    try:
        yield cluster
    finally:
        localcluster.stop(root)
        shutil.rmtree(root, ignore_errors=True)


def sync_redis(url: str) -> Any:
    """A synchronous client for a test's own checks, standalone or cluster."""
    import redis

    if url.startswith(("redis+cluster://", "rediss+cluster://")):
        from hotbed.connection import RedisURL

        u = RedisURL(url)
        return redis.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in u.hosts],
            username=u.username, password=u.password,
        )
    return redis.Redis.from_url(url)


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if os.environ.get("HOTBED_TEST_CLUSTER") == "1":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        yield cluster.url
        return
    if url := os.environ.get("HOTBED_TEST_REDIS_URL"):
        yield url
        return
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server not installed: run `make test` (it installs it)")
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="hotbed-redis-")
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir, "--maxclients", "20000", "--maxmemory", "2gb",
         "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def prefix() -> str:
    return f"t{secrets.token_hex(4)}"


def docker_available() -> bool:
    try:
        out = subprocess.run(
            ["docker", "info", "--format", "{{json .Runtimes}}"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and b"runsc" in out.stdout


def image_exists(image: str) -> bool:
    return (
        subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0
    )


def leftover_containers(prefix: str) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=dev.hotbed.prefix={prefix}"],
        capture_output=True, text=True,
    )
    return out.stdout.split()


def orphan_shims() -> set[str]:
    """Container ids that a containerd shim still serves but dockerd no longer lists:
    a task that outlived its container's removal (its shim then lives on for good)."""
    shims = subprocess.run(["pgrep", "-a", "containerd-shim"], capture_output=True, text=True).stdout
    served = {line.split(" -id ", 1)[1].split()[0] for line in shims.splitlines() if " -id " in line}
    known = subprocess.run(["docker", "ps", "-aq", "--no-trunc"], capture_output=True, text=True).stdout
    return served - set(known.split())


class Stack(msgspec.Struct, kw_only=True):
    client: Client
    scheduler: Scheduler
    worker: WorkerAgent
    redis_url: str
    prefix: str


async def start_stack(
    redis_url: str,
    prefix: str,
    *,
    tg: anyio.abc.TaskGroup,
    worker_overrides: dict[str, object] | None = None,
    scheduler_overrides: dict[str, object] | None = None,
    runtime: object | None = None,
) -> Stack:
    from workers.runtimes import make_runtime

    wsettings = msgspec.convert(
        {"redis_url": redis_url, "prefix": prefix, "worker_id": f"w-{prefix}",
         "heartbeat_s": 0.2, "reconcile_s": 0.5, "drain_on_stop": True,
         "shutdown_grace_s": 2.0, **(worker_overrides or {})},
        WorkerSettings,
    )
    ssettings = msgspec.convert(
        {"redis_url": redis_url, "prefix": prefix, "registry_refresh_s": 0.1,
         "heartbeat_ttl_s": 3.0, "shutdown_grace_s": 2.0, **(scheduler_overrides or {})},
        SchedulerSettings,
    )
    worker = WorkerAgent(wsettings, runtime or make_runtime(wsettings))  # type: ignore[arg-type]
    scheduler = Scheduler(ssettings)
    await tg.start(scheduler.run)
    await tg.start(worker.run)
    # Placement needs the scheduler to have seen the worker's first heartbeat.
    assert scheduler.registry is not None
    with anyio.fail_after(10):
        while worker.id not in scheduler.registry.workers:
            await scheduler.registry.refresh()
            await anyio.sleep(0.05)
    client = Client(redis_url, prefix=prefix)
    return Stack(client=client, scheduler=scheduler, worker=worker, redis_url=redis_url, prefix=prefix)


async def restart_worker(stack: Stack, tg: anyio.abc.TaskGroup, **overrides: object) -> WorkerAgent:
    """Stop the stack's worker (its sandboxes keep running unless it drains) and start a
    new agent with the same settings (plus ``overrides``); it becomes ``stack.worker``."""
    from workers.runtimes import make_runtime

    first = stack.worker
    first.stopping.set()
    with anyio.fail_after(30):
        await first.stopped.wait()
    settings = msgspec.structs.replace(first.settings, **overrides)
    second = WorkerAgent(settings, make_runtime(settings))
    await tg.start(second.run)
    stack.worker = second
    return second


async def stop_stack(stack: Stack) -> None:
    await stack.client.aclose()
    stack.worker.stopping.set()
    stack.scheduler.stopping.set()


@asynccontextmanager
async def running_stack(
    redis_url: str,
    prefix: str,
    *,
    worker_overrides: dict[str, object] | None = None,
    scheduler_overrides: dict[str, object] | None = None,
) -> AsyncIterator[Stack]:
    """A docker+runsc stack for one test; leaking a container of its prefix fails it."""
    if not docker_available():
        pytest.fail("dockerd with runsc is not running: run `make test` (it sets them up)")
    if not image_exists(BUSYBOX_IMAGE):
        pytest.fail(f"test image {BUSYBOX_IMAGE} missing: run `make test-image`")
    async with anyio.create_task_group() as tg:
        stack = await start_stack(
            redis_url, prefix, tg=tg,
            worker_overrides=worker_overrides, scheduler_overrides=scheduler_overrides,
        )
        try:
            yield stack
        finally:
            with anyio.CancelScope(shield=True):
                await stop_stack(stack)
    left = leftover_containers(prefix)
    assert not left, f"test leaked containers: {left}"


@asynccontextmanager
async def process_stack(
    redis_url: str, prefix: str, root: Path, *, worker_overrides: dict[str, object] | None = None,
) -> AsyncIterator[Stack]:
    """A stack whose worker runs sandboxes as plain processes under ``root`` (no
    isolation, no dockerd): for tests of the control plane itself."""
    from workers.runtimes.process import ProcessRuntime

    async with anyio.create_task_group() as tg:
        stack = await start_stack(
            redis_url, prefix, tg=tg, runtime=ProcessRuntime(root=root),
            worker_overrides={"runtime": "process", **(worker_overrides or {})},
        )
        try:
            yield stack
        finally:
            with anyio.CancelScope(shield=True):
                await stop_stack(stack)


async def wait_for(cond: Callable[[], Awaitable[bool]], what: str, timeout: float = 60.0) -> None:
    """Look at ``cond`` every 50 ms until it holds; fail the test, naming ``what``,
    after ``timeout`` seconds."""
    try:
        with anyio.fail_after(timeout):
            while not await cond():
                await anyio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"no {what} within {timeout:g}s")


@pytest.fixture
async def hotbed_stack(redis_url: str, prefix: str) -> AsyncIterator[Stack]:
    async with running_stack(redis_url, prefix) as stack:
        yield stack


@pytest.fixture
async def stack(redis_url: str, prefix: str, tmp_path: Path) -> AsyncIterator[Stack]:
    """A stack for pool and template tests: its own snapshot folder, room for 16
    one-CPU sandboxes, pools refilled at once (a module may define its own)."""
    async with running_stack(
        redis_url, prefix,
        worker_overrides={"snapshot_dir": str(tmp_path / "snapshots"), "cpu": 16},
        scheduler_overrides={"pool_interval_s": 0.05, "pool_refill_per_s": 50.0},
    ) as stack:
        yield stack


@pytest.fixture
def daemons(redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """A scheduler and a worker as real subprocesses (`python -m scheduler|workers`)."""
    import signal
    import sys

    if not docker_available():
        pytest.fail("dockerd with runsc is not running: run `make test` (it sets them up)")
    monkeypatch.setenv("HOTBED_REDIS_URL", redis_url)
    monkeypatch.setenv("HOTBED_PREFIX", prefix)
    env = dict(os.environ, HOTBED_WORKER_ID=f"w-{prefix}", HOTBED_DRAIN_ON_STOP="true",
               HOTBED_HEARTBEAT_S="0.2", HOTBED_REGISTRY_REFRESH_S="0.1")
    logs = tempfile.mkdtemp(prefix="hotbed-daemons-")
    env["HOTBED_SNAPSHOT_DIR"] = os.path.join(logs, "snapshots")
    procs = []
    for module in ("scheduler", "workers"):
        log = open(os.path.join(logs, f"{module}.log"), "wb")  # noqa: SIM115
        procs.append(subprocess.Popen([sys.executable, "-m", module], env=env, stdout=log, stderr=log))
    r = sync_redis(redis_url)
    deadline = time.monotonic() + 30
    while r.zscore(f"{prefix}:workers", f"w-{prefix}") is None:
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            pytest.fail("daemons did not come up: " + open(os.path.join(logs, "workers.log")).read()[-2000:])
        time.sleep(0.05)
    time.sleep(0.3)  # the scheduler's registry refresh
    try:
        yield redis_url, prefix
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        r.close()
        for name in ("scheduler", "workers"):
            text = open(os.path.join(logs, f"{name}.log")).read()
            assert "Traceback" not in text, f"{name} logged a traceback:\n{text[-3000:]}"
        shutil.rmtree(logs, ignore_errors=True)
    assert not leftover_containers(prefix), "daemons leaked containers"


@pytest.fixture(scope="session", autouse=True)
def no_containers_left_by_the_suite() -> Iterator[None]:
    """After the whole suite: no container of any test prefix (t + 8 hex) is left."""
    yield
    if not docker_available():
        return
    out = subprocess.run(
        ["docker", "ps", "-a", "--filter", "label=dev.hotbed.managed=1",
         "--format", '{{.ID}} {{.Label "dev.hotbed.prefix"}}'],
        capture_output=True, text=True,
    )
    import re

    leaked = [line for line in out.stdout.splitlines() if re.fullmatch(r"\S+ t[0-9a-f]{8}", line)]
    assert not leaked, f"the test suite leaked containers: {leaked}"
