"""A throwaway control plane for benchmarks: private Redis, scheduler processes,
simulated worker fleets, all on loopback, plus /proc sampling of their CPU and memory.

Every process is started by the harness and ended by it (SIGTERM, then SIGKILL after a
grace period); the Redis is private (free port, no persistence) and dies with the run.
``redis_cluster=True``: a local Redis Cluster (cli.localcluster: 3 primaries,
``cluster_replicas`` replicas each) instead of one standalone Redis; its servers'
CPU, memory and commands are summed where one Redis's would be.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import redis

from daemon.config import load_settings
from scheduler.config import SchedulerSettings

ROOT = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


class Cluster:
    """Redis + ``schedulers`` scheduler processes + ``fleets`` simfleet processes."""

    def __init__(
        self,
        *,
        schedulers: int = 1,
        fleets: int = 2,
        workers_per_fleet: int = 25,
        latency_scale: float = 1.0,
        scheduler_env: dict[str, str] | None = None,
        prefix: str = "bench",
        redis_cluster: bool = False,
        cluster_replicas: int = 0,
    ) -> None:
        self.prefix = prefix
        self.redis_cluster = redis_cluster
        self.cluster_replicas = cluster_replicas
        self.cluster_ports: list[int] = []
        self.n_schedulers = schedulers
        self.n_fleets = fleets
        self.workers_per_fleet = workers_per_fleet
        self.latency_scale = latency_scale
        self.scheduler_env = scheduler_env or {}
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="hotbed-bench-")
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.schedulers: list[subprocess.Popen[bytes]] = []
        self.fleets: list[subprocess.Popen[bytes]] = []
        self.r: Any = None
        # What the scheduler processes run with, resolved from the environment they
        # get as the scheduler resolves it (results record it; nothing is retyped).
        self.scheduler_settings: SchedulerSettings | None = None
        self.crashed: list[int] = []
        # Load-generator processes (bench.common.loadgen.LoadGenerators): sampled as
        # the load generator, with this process.
        self.loadgen_pids: list[int] = []

    # ------------------------------------------------------------------ lifecycle

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOTBED_")}
        env.update({"HOTBED_REDIS_URL": self.url, "HOTBED_PREFIX": self.prefix,
                    "PYTHONPATH": str(ROOT)})
        env.update(extra)
        return env

    def __enter__(self) -> Cluster:
        server = shutil.which("redis-server")
        if server is None:
            raise SystemExit("redis-server is not installed (make install)")
        if self.redis_cluster:
            from cli import localcluster

            try:
                local = localcluster.start(3, Path(self.dir) / "cluster", replicas=self.cluster_replicas)
            except BaseException:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise
            self.url, self.cluster_ports = local.url, list(local.ports)
            try:
                self._start()
            except BaseException:
                self.__exit__(None, None, None)
                raise
            return self
        self.redis_proc = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--maxclients", "20000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        if self.redis_cluster:
            self.r = redis.RedisCluster(host="127.0.0.1", port=self.cluster_ports[0])
        else:
            self.r = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        for i in range(self.n_fleets):
            self.start_fleet(i)
        for _ in range(self.n_schedulers):
            self.start_scheduler()
        if self.n_fleets:
            self.wait_workers(self.n_fleets * self.workers_per_fleet)

    def start_scheduler(self) -> subprocess.Popen[bytes]:
        name = f"sched-{len(self.schedulers)}"
        # A 15 s heartbeat TTL (default 5 s): on a machine shared with other work a starved
        # simulated fleet must not be reaped mid-run, which would measure the reaper.
        env = self.env(HOTBED_NAME=name, HOTBED_LOG_LEVEL="WARNING", HOTBED_HEARTBEAT_TTL_S="15",
                       **self.scheduler_env)
        self.scheduler_settings = load_settings(SchedulerSettings, environ=env)
        proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler"], env=env, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=open(Path(self.dir) / f"{name}.log", "wb"),
        )
        self.schedulers.append(proc)
        return proc

    def restart_schedulers(self, **env: str) -> None:
        """Stop every scheduler (SIGTERM, graceful) and start as many with ``env`` added."""
        n = len(self.schedulers)
        for p in self.schedulers:
            p.send_signal(signal.SIGTERM)
        for p in self.schedulers:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.schedulers = []
        self.scheduler_env = {**self.scheduler_env, **env}
        for _ in range(n):
            self.start_scheduler()

    def start_fleet(self, i: int) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.simfleet", "--workers", str(self.workers_per_fleet),
             "--id-prefix", f"sim{i}", "--latency-scale", str(self.latency_scale),
             "--seed", str(1000 * i)],
            env=self.env(HOTBED_SNAPSHOT_DIR=str(Path(self.dir) / "snapshots")), cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=open(Path(self.dir) / f"fleet{i}.log", "wb"),
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith(b"ready"):
            raise RuntimeError(f"simfleet {i} did not start: {line!r}; see {self.dir}/fleet{i}.log")
        self.fleets.append(proc)

    def wait_workers(self, n: int, timeout: float = 30) -> None:
        assert self.r is not None
        deadline = time.monotonic() + timeout
        while self.r.zcard(f"{self.prefix}:workers") < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.r.zcard(f'{self.prefix}:workers')} of {n} workers registered")
            time.sleep(0.05)
        # Give the schedulers one registry refresh to see them all.
        time.sleep(1.0)

    def __exit__(self, *exc: object) -> None:
        procs = [*self.schedulers, *self.fleets]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.r is not None:
            self.r.close()
        if self.redis_proc is not None:
            self.redis_proc.terminate()
            self.redis_proc.wait(timeout=10)
        if self.redis_cluster:
            from cli import localcluster

            localcluster.stop(Path(self.dir) / "cluster")
        self.report_crashes()
        if not os.environ.get("HOTBED_BENCH_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)

    def report_crashes(self) -> None:
        """A daemon that died during the run invalidates it: say so, with its log's tail."""
        for p in [*self.schedulers, *self.fleets]:
            if p.returncode not in (0, None, -signal.SIGTERM, -signal.SIGKILL):
                self.crashed.append(p.pid)
                logs = sorted(Path(self.dir).glob("*.log"))
                tail = "".join(f"--- {f.name}\n" + f.read_text()[-3000:] for f in logs)
                sys.stderr.write(f"process {p.args} exited {p.returncode}:\n{tail}\n")

    def check_alive(self) -> None:
        for p in [*self.schedulers, *self.fleets]:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args} exited {p.returncode} during the run; logs in {self.dir}")

    # ------------------------------------------------------------------ sampling

    @property
    def heartbeat_ttl_s(self) -> float | None:
        """The workers' heartbeat TTL the schedulers reap by (None: no scheduler)."""
        return self.scheduler_settings.heartbeat_ttl_s if self.scheduler_settings else None

    def _servers(self) -> list[redis.Redis]:
        """One client per Redis server of the run (the cluster's nodes, or the one)."""
        if not self.redis_cluster:
            return [self.r]
        return [redis.Redis(port=p, socket_timeout=5) for p in self.cluster_ports]

    def redis_version(self) -> str:
        server: Any = self._servers()[0].info("server")
        return str(server["redis_version"])

    def settings_record(self) -> dict[str, Any]:
        """What a results file records of this cluster: versions and settings in use."""
        return {
            "redis_version": self.redis_version(),
            "schedulers": len(self.schedulers),
            "scheduler_settings": (
                {k: v for k, v in msgspec.to_builtins(self.scheduler_settings).items()
                 if k not in ("redis_url", "name")}
                if self.scheduler_settings else None),
            "simfleet_processes": len(self.fleets), "workers_per_fleet": self.workers_per_fleet,
            "latency_scale": self.latency_scale,
            "redis": (f"local Redis Cluster, 3 primaries x {self.cluster_replicas} replicas"
                      if self.redis_cluster else "standalone"),
        }

    def redis_info(self) -> dict[str, float]:
        assert self.r is not None
        out = {"used_memory": 0.0, "commands": 0.0, "cpu_s": 0.0}
        servers = self._servers()
        for r in servers:
            mem: Any = r.info("memory")
            stats: Any = r.info("stats")
            cpu: Any = r.info("cpu")
            out["used_memory"] += float(mem["used_memory"])
            out["commands"] += float(stats["total_commands_processed"])
            out["cpu_s"] += float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])
        if self.redis_cluster:
            for r in servers:
                r.close()
        return out

    def scheduler_sample(self) -> dict[str, float]:
        return {
            "cpu_s": sum(proc_cpu_s(p.pid) for p in self.schedulers),
            "rss_mib": max((proc_rss_mib(p.pid) for p in self.schedulers), default=0.0),
        }

    def fleet_sample(self) -> dict[str, float]:
        return {
            "cpu_s": sum(proc_cpu_s(p.pid) for p in self.fleets),
            "rss_mib": sum(proc_rss_mib(p.pid) for p in self.fleets),
        }

    def sample(self) -> dict[str, Any]:
        return {
            "t": time.monotonic(),
            "redis": self.redis_info(),
            "scheduler": self.scheduler_sample(),
            "fleet": self.fleet_sample(),
            "bench_cpu_s": proc_cpu_s(os.getpid()),
            "loadgen_cpu_s": sum(proc_cpu_s(p) for p in self.loadgen_pids),
        }


def delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Rates and levels between two :meth:`Cluster.sample` results."""
    dt = max(1e-9, b["t"] - a["t"])
    # The load generator: this process plus any generator processes.
    gen_s = (b["bench_cpu_s"] - a["bench_cpu_s"]) + (b.get("loadgen_cpu_s", 0.0) - a.get("loadgen_cpu_s", 0.0))
    return {
        "seconds": round(dt, 3),
        "scheduler_cpu_pct": round(100 * (b["scheduler"]["cpu_s"] - a["scheduler"]["cpu_s"]) / dt, 1),
        "scheduler_rss_mib": round(b["scheduler"]["rss_mib"], 1),
        "fleet_cpu_pct": round(100 * (b["fleet"]["cpu_s"] - a["fleet"]["cpu_s"]) / dt, 1),
        "fleet_rss_mib": round(b["fleet"]["rss_mib"], 1),
        "loadgen_cpu_pct": round(100 * gen_s / dt, 1),
        "loadgen_cpu_s": round(gen_s, 3),
        "redis_cpu_pct": round(100 * (b["redis"]["cpu_s"] - a["redis"]["cpu_s"]) / dt, 1),
        "redis_ops_per_s": round((b["redis"]["commands"] - a["redis"]["commands"]) / dt),
        "redis_used_memory_mib": round(b["redis"]["used_memory"] / 2**20, 1),
        # CPU seconds the whole control plane (scheduler, workers, Redis, load generator)
        # spent: on a shared machine this is steadier than any rate.
        "cpu_s_total": round(
            (b["scheduler"]["cpu_s"] - a["scheduler"]["cpu_s"]) + (b["fleet"]["cpu_s"] - a["fleet"]["cpu_s"])
            + (b["redis"]["cpu_s"] - a["redis"]["cpu_s"]) + gen_s, 3),
    }
