"""A real node for benchmarks: private Redis, scheduler and worker processes on this
machine, the worker on dockerd + runsc, every container under its own prefix.

The harness starts every process and ends it; a process that exits without the harness
asking (or killing it on purpose) is counted in :meth:`NodeStack.daemon_exits`. The
worker's sandboxes live in their own parent cgroup (``/hotbed/<prefix>``), so their CPU
and memory can be read apart from anything else on the host. On exit every container
of the prefix is counted (:attr:`NodeStack.leaked`) and then removed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.common.cluster import free_port

ROOT = Path(__file__).resolve().parents[2]
LABEL_PREFIX = "dev.hotbed.prefix"


def docker(*argv: str, host: str | None = None, timeout: float = 120, check: bool = False) -> str:
    env = dict(os.environ)
    if host:
        env["DOCKER_HOST"] = host
    res = subprocess.run(["docker", *argv], capture_output=True, text=True, timeout=timeout, env=env)
    if check and res.returncode != 0:
        raise RuntimeError(f"docker {' '.join(argv)}: {res.stderr.strip()}")
    return res.stdout


def containers_of(prefix: str, *, host: str | None = None) -> list[str]:
    return docker("ps", "-aq", "--filter", f"label={LABEL_PREFIX}={prefix}", host=host).split()


def remove_runsc(root: str) -> int:
    """Remove every container under a runsc ``--root`` (the runsc runtime's sandboxes)
    and the root itself; how many there were."""
    if not Path(root).is_dir() or shutil.which("runsc") is None:
        return 0
    left = subprocess.run(["runsc", "--root", root, "list", "-quiet"], capture_output=True, text=True,
                          check=False, timeout=60).stdout.split()
    for sid in left:
        subprocess.run(["runsc", "--root", root, "delete", "--force", sid], capture_output=True, check=False,
                       timeout=60)
    shutil.rmtree(root, ignore_errors=True)
    return len(left)


class NodeStack:
    """Redis + ``schedulers`` scheduler processes + one worker (docker + runsc, or
    runsc alone with ``HOTBED_RUNTIME=runsc`` in ``worker_env``)."""

    def __init__(
        self,
        *,
        schedulers: int = 1,
        worker_env: dict[str, str] | None = None,
        docker_host: str | None = None,
        persistent_redis: bool = False,
        prefix: str | None = None,
    ) -> None:
        self.prefix = prefix or f"bn{secrets.token_hex(4)}"
        self.n_schedulers = schedulers
        self.worker_env = worker_env or {}
        self.docker_host = docker_host
        self.persistent_redis = persistent_redis
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = Path(tempfile.mkdtemp(prefix=f"hotbed-{self.prefix}-"))
        self.cgroup_parent = f"/hotbed/{self.prefix}"
        # The runsc runtime's own state (a worker on the docker runtime leaves it empty).
        self.runsc_root = f"/run/hotbed/runsc-{self.prefix}"
        self.worker_id = f"w-{self.prefix}"
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.schedulers: list[subprocess.Popen[bytes]] = []
        self.worker: subprocess.Popen[bytes] | None = None
        # Processes the harness ended on purpose (kill -9, restarts): not daemon exits.
        self._ended_on_purpose: set[int] = set()
        self.exits: list[str] = []
        self.leaked: int | None = None

    # ----------------------------------------------------------------- processes

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, HOTBED_REDIS_URL=self.url, HOTBED_PREFIX=self.prefix,
                   PYTHONPATH=str(ROOT), HOTBED_LOG_LEVEL="WARNING")
        if self.docker_host:
            env["DOCKER_HOST"] = self.docker_host
        env.update(extra)
        return env

    def start_redis(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise SystemExit("redis-server is not installed (make install)")
        persist = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent_redis else ["--appendonly", "no"]
        self.redis_proc = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persist,
             "--dir", str(self.workdir), "--maxclients", "20000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
        )
        r = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        r.close()

    def restart_redis(self) -> None:
        assert self.redis_proc is not None
        self._ended_on_purpose.add(self.redis_proc.pid)
        self.redis_proc.send_signal(signal.SIGTERM)
        self.redis_proc.wait(timeout=30)
        self.start_redis()

    def _log(self, name: str) -> Any:
        return open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the child holds it

    def start_scheduler(self, i: int) -> subprocess.Popen[bytes]:
        env = self.env(HOTBED_NAME=f"s{i}-{self.prefix}", HOTBED_REGISTRY_REFRESH_S="0.2")
        proc = subprocess.Popen([sys.executable, "-m", "scheduler"], env=env, cwd=ROOT,
                                stdout=self._log(f"scheduler{i}"), stderr=subprocess.STDOUT, close_fds=True)
        return proc

    def start_worker(self) -> subprocess.Popen[bytes]:
        env = self.env(
            HOTBED_WORKER_ID=self.worker_id, HOTBED_SNAPSHOT_DIR=str(self.workdir / "snapshots"),
            HOTBED_CGROUP_PARENT=self.cgroup_parent, HOTBED_DRAIN_ON_STOP="true",
            HOTBED_HEARTBEAT_S="0.5", HOTBED_RUNSC_ROOT=self.runsc_root,
            HOTBED_RUNSC_DIR=str(self.workdir / "runsc"), **self.worker_env,
        )
        self.worker = subprocess.Popen([sys.executable, "-m", "workers"], env=env, cwd=ROOT,
                                       stdout=self._log("worker"), stderr=subprocess.STDOUT, close_fds=True)
        return self.worker

    def wait_worker(self, timeout: float = 60) -> None:
        r = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if r.zscore(f"{self.prefix}:workers", self.worker_id) is not None:
                        break
                except redis.ConnectionError:
                    pass
                if self.worker is not None and self.worker.poll() is not None:
                    raise RuntimeError("worker exited at start:\n" + self.log_tail("worker"))
                if time.monotonic() > deadline:
                    raise RuntimeError("worker did not register:\n" + self.log_tail("worker"))
                time.sleep(0.1)
        finally:
            r.close()
        time.sleep(0.5)  # the schedulers' registry refresh

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """kill -9, on purpose."""
        self._ended_on_purpose.add(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def log_tail(self, name: str, n: int = 3000) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self) -> NodeStack:
        self.start_redis()
        self.schedulers = [self.start_scheduler(i) for i in range(self.n_schedulers)]
        self.start_worker()
        self.wait_worker()
        return self

    def procs(self) -> dict[str, subprocess.Popen[bytes]]:
        out = {f"scheduler{i}": p for i, p in enumerate(self.schedulers)}
        if self.worker is not None:
            out["worker"] = self.worker
        if self.redis_proc is not None:
            out["redis"] = self.redis_proc
        return out

    def daemon_exits(self) -> list[str]:
        """Daemons that exited without the harness ending them."""
        return [f"{name} (exit {p.returncode})" for name, p in self.procs().items()
                if p.poll() is not None and p.pid not in self._ended_on_purpose]

    def __exit__(self, *exc: object) -> None:
        self.exits = self.daemon_exits()
        # The worker first, so it drains its sandboxes while Redis is still up.
        for p in [self.worker, *self.schedulers]:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [self.worker, *self.schedulers]:
            if p is None:
                continue
            try:
                p.wait(timeout=90)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        left = containers_of(self.prefix, host=self.docker_host)
        if left:
            docker("rm", "-f", *left, host=self.docker_host, timeout=300)
        self.leaked = len(left) + remove_runsc(self.runsc_root)
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.redis_proc.send_signal(signal.SIGTERM)
            self.redis_proc.wait(timeout=30)
        shutil.rmtree(self.workdir, ignore_errors=True)
        remove_cgroups(self.cgroup_parent)


def remove_cgroups(parent: str) -> None:
    """Remove the (emptied) cgroup ``parent`` and what is left under it, in every
    hierarchy: dockerd makes a container's parent cgroups and never removes them."""
    name = parent.strip("/")
    if not name:
        return
    roots = [Path("/sys/fs/cgroup") / name]
    try:
        roots += [c / name for c in Path("/sys/fs/cgroup").iterdir() if c.is_dir()]
    except OSError:
        pass
    for root in roots:
        if not root.is_dir():
            continue
        # Deepest first: a cgroup goes only once its children have.
        for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            try:
                d.rmdir()
            except OSError:
                pass
        try:
            root.rmdir()
        except OSError:
            pass


# ------------------------------------------------------------ cgroup readings


def cgroup_cpu_s(parent: str) -> float | None:
    """CPU seconds used so far by everything under the cgroup ``parent``."""
    name = parent.strip("/")
    for path in (Path("/sys/fs/cgroup/cpuacct") / name / "cpuacct.usage",):
        try:
            return int(path.read_text()) / 1e9
        except (OSError, ValueError):
            pass
    try:
        for line in (Path("/sys/fs/cgroup") / name / "cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec"):
                return int(line.split()[1]) / 1e6
    except (OSError, ValueError):
        pass
    return None


def cgroup_memory_mib(parent: str) -> float | None:
    from workers.admission import cgroup_memory_mb

    got = cgroup_memory_mb(parent)
    return None if got is None else float(got)


def idle_cpu_pct(parent: str, window_s: float) -> float | None:
    """Percent of one core used by the cgroup ``parent`` over ``window_s`` seconds."""
    a, t0 = cgroup_cpu_s(parent), time.monotonic()
    time.sleep(window_s)
    b, t1 = cgroup_cpu_s(parent), time.monotonic()
    if a is None or b is None:
        return None
    return (b - a) / (t1 - t0) * 100
