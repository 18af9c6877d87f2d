"""The daemons as services: real subprocesses, a real NOTIFY_SOCKET, signals.

Each daemon runs as ``python -m scheduler`` / ``python -m workers`` with its own
notify socket (a Unix datagram socket bound here, as systemd binds it), so readiness
is READY=1 rather than a sleep. Workers use the unisolated ``process`` runtime: these
tests are about the control plane's lifecycle, not about isolation, and need no
Docker.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from hotbed.client import Client
from hotbed.errors import HotbedError
from hotbed.protocol import (
    CreateSandbox,
    ExecSpec,
    Resources,
    SandboxCreated,
    SandboxSpec,
    Terminate,
)
from hotbed.protocol import Exec as ExecMsg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """One daemon subprocess with its own NOTIFY_SOCKET."""

    def __init__(self, module: str, workdir: Path, env: dict[str, str], *, abstract: bool = False,
                 args: list[str] | None = None) -> None:
        self.module = module
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"hotbed-test-{os.getpid()}-{id(self)}"
            self.sock.bind("\0" + name)
            notify = "@" + name
        else:
            path = str(workdir / f"{module}-{id(self)}.notify")
            self.sock.bind(path)
            notify = path
        self.log_path = workdir / f"{module}-{id(self)}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *(args or [])],
            env={**os.environ, **env, "NOTIFY_SOCKET": notify},
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.messages: list[str] = []

    def expect(self, state: str, timeout: float = 20.0, *, n: int = 1) -> None:
        """Block until ``n`` datagrams carrying ``state`` (e.g. READY=1) have arrived."""
        deadline = time.monotonic() + timeout
        while self.count(state) < n:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not self._drain(0.05):
                raise AssertionError(f"{self.module}: no {state} (got {self.messages}); log:\n{self.log()}")
            self._drain(min(left, 0.5))

    def _drain(self, wait: float) -> bool:
        self.sock.settimeout(wait)
        try:
            self.messages.append(self.sock.recv(4096).decode())
            return True
        except TimeoutError:
            return False

    def count(self, state: str) -> int:
        return sum(state in m.split("\n") for m in self.messages)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.module} ignored SIGTERM for {timeout}s; log:\n{self.log()}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()
        self._log.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hotbed-fleet-") as d:
        yield Path(d)


@pytest.fixture
def base_env(redis_url: str, prefix: str, workdir: Path) -> dict[str, str]:
    return {
        "HOTBED_REDIS_URL": redis_url, "HOTBED_PREFIX": prefix,
        "HOTBED_REGISTRY_REFRESH_S": "0.1", "HOTBED_HEARTBEAT_S": "0.2",
        "HOTBED_HEARTBEAT_TTL_S": "5", "HOTBED_SHUTDOWN_GRACE_S": "5",
        "HOTBED_RUNTIME": "process", "HOTBED_PROCESS_ROOT": str(workdir / "sandboxes"),
        "HOTBED_WORKER_ID": f"w-{prefix}", "HOTBED_GPU_DETECT": "none",
        "HOTBED_CPU": "64", "HOTBED_MEMORY_MB": "65536",
    }


@pytest.fixture
def spawn(workdir: Path, base_env: dict[str, str]) -> Iterator[object]:
    started: list[Daemon] = []

    def start(module: str, *, abstract: bool = False, args: list[str] | None = None, **env: str) -> Daemon:
        d = Daemon(module, workdir, {**base_env, **env}, abstract=abstract, args=args)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()
    for d in started:
        assert "Traceback" not in d.log_path.read_text(errors="replace"), d.log()


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:  # noqa: S310 - loopback
        return resp.read().decode()


def _metric(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == name or key == f"{name}{{{want}}}" or (labels and key.startswith(name + "{") and all(f'{k}="{v}"' in key for k, v in labels.items())):
            return float(value)
    return None


# ------------------------------------------------------------------ sd_notify


def test_ready_watchdog_stopping_on_a_real_notify_socket(spawn, prefix: str) -> None:  # type: ignore[no-untyped-def]
    sched = spawn("scheduler", WATCHDOG_USEC="200000")
    worker = spawn("workers", abstract=True, WATCHDOG_USEC="200000")
    sched.expect("READY=1")
    worker.expect("READY=1")
    # WatchdogSec=0.2s: pings every 0.1s from the event loop.
    deadline = time.monotonic() + 5
    while (sched.count("WATCHDOG=1") < 3 or worker.count("WATCHDOG=1") < 3) and time.monotonic() < deadline:
        sched._drain(0.1)
        worker._drain(0.1)
    assert sched.count("WATCHDOG=1") >= 3 and worker.count("WATCHDOG=1") >= 3
    assert sched.stop() == 0
    assert worker.stop() == 0
    sched.expect("STOPPING=1", timeout=1)
    worker.expect("STOPPING=1", timeout=1)
    # READY comes before any WATCHDOG and STOPPING last.
    states = [s for m in sched.messages for s in m.split("\n")]
    assert states.index("READY=1") < states.index("WATCHDOG=1") < states.index("STOPPING=1")


def test_sighup_reloads_what_it_can(spawn, workdir: Path, redis_url: str, prefix: str) -> None:  # type: ignore[no-untyped-def]
    from hotbed.keys import Keys
    from hotbed.protocol import decode_worker_info
    from tests.conftest import sync_redis

    wconf = workdir / "worker.toml"
    wconf.write_text('[tags]\nzone = "a"\n')
    sconf = workdir / "scheduler.toml"
    sconf.write_text('placement = "spread"\n')
    worker = spawn("workers", args=["--config", str(wconf)])
    sched = spawn("scheduler", args=["--config", str(sconf)])
    worker.expect("READY=1")
    sched.expect("READY=1")
    wconf.write_text('max_concurrency = 7\n[tags]\nzone = "b"\n')
    sconf.write_text('placement = "pack"\n')
    worker.proc.send_signal(signal.SIGHUP)
    sched.proc.send_signal(signal.SIGHUP)
    for d in (worker, sched):
        d.expect("RELOADING=1")
        d.expect("READY=1", n=2)
    r = sync_redis(redis_url)
    try:
        info = decode_worker_info(r.get(Keys(prefix).worker_info(f"w-{prefix}")))
    finally:
        r.close()
    assert info.tags == {"zone": "b"}
    # A bad file on reload keeps the running settings and the daemon alive.
    sconf.write_text("placement = 'nowhere'\n")
    sched.proc.send_signal(signal.SIGHUP)
    sched.expect("RELOADING=1")
    assert worker.stop() == 0 and sched.stop() == 0
    wlog, slog = worker.log(), sched.log()
    assert "reloaded: applied tags; need a restart: max_concurrency" in wlog, wlog
    assert "reloaded: applied placement" in slog, slog
    assert "reload: " in slog and "keeping the running settings" in slog


def test_metrics_endpoints(spawn, prefix: str, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    sport, wport = _free_port(), _free_port()
    gpus = '[{"uuid": "GPU-m1", "model": "NVIDIA H100 80GB HBM3"}, {"uuid": "GPU-m2", "model": "NVIDIA H100 80GB HBM3"}]'
    worker = spawn("workers", HOTBED_METRICS_PORT=str(wport), HOTBED_GPUS=gpus)
    sched = spawn("scheduler", HOTBED_METRICS_PORT=str(sport))
    worker.expect("READY=1")
    sched.expect("READY=1")

    async def load() -> None:
        async with Client(redis_url, prefix=prefix) as c:
            reply = await c.request(CreateSandbox(spec=SandboxSpec(resources=Resources(gpu="H100"), allow_unisolated=True)), timeout=20)
            assert isinstance(reply, SandboxCreated) and len(reply.gpu_uuids) == 1
            with pytest.raises(HotbedError):
                await c.request(CreateSandbox(spec=SandboxSpec(resources=Resources(gpu="B200"), allow_unisolated=True)), timeout=20)

    anyio.run(load, backend="asyncio", backend_options={"use_uvloop": True})
    deadline = time.monotonic() + 10
    while True:
        s, w = _scrape(sport), _scrape(wport)
        if (
            _metric(w, "hotbed_gpu_slots", state="used") == 1.0
            and _metric(s, "hotbed_live_sandboxes") == 1.0
            and _metric(s, "hotbed_gpu_slots", state="used") == 1.0
        ) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert _metric(s, "hotbed_requests_total", type="CreateSandbox") == 2.0, s
    assert _metric(s, "hotbed_errors_total", type="CreateSandbox", code="NoMatchingWorker") == 1.0, s
    assert _metric(s, "hotbed_placement_wait_seconds_count") == 1.0, s
    assert _metric(s, "hotbed_queue_depth") == 0.0, s
    assert _metric(s, "hotbed_live_sandboxes") == 1.0, s
    assert _metric(s, "hotbed_gpu_slots", worker=f"w-{prefix}", state="free") == 1.0, s
    assert _metric(s, "hotbed_worker_heartbeat_age_seconds", worker=f"w-{prefix}") is not None, s
    assert _metric(w, "hotbed_requests_total", type="StartSandbox") == 1.0, w
    assert _metric(w, "hotbed_create_seconds_count", path="cold") == 1.0, w
    assert _metric(w, "hotbed_live_sandboxes") == 1.0, w
    assert _metric(w, "hotbed_gpu_slots", state="used") == 1.0, w
    assert _metric(w, "hotbed_gpu_slots", state="free") == 1.0, w
    assert worker.stop() == 0 and sched.stop() == 0


# --------------------------------------------------------------- SIGTERM, load


async def until(predicate: Callable[[], bool], within: float = 20.0) -> None:
    """Wait for progress made by other tasks of this test (requests completing)."""
    with anyio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - a counter, not an event of ours
            await anyio.sleep(0.02)


def test_sigterm_during_load_loses_no_request(spawn, prefix: str, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    """Producers create, exec in and terminate sandboxes non-stop while the scheduler and
    then the worker are stopped with SIGTERM and replaced: every request gets its
    successful reply."""
    sched = spawn("scheduler")
    worker = spawn("workers", HOTBED_DRAIN_ON_STOP="false")
    sched.expect("READY=1")
    worker.expect("READY=1")
    done: list[str] = []
    failures: list[BaseException] = []

    async def producer(c: Client, stop: anyio.Event) -> None:
        while not stop.is_set():
            try:
                created = await c.request(CreateSandbox(spec=SandboxSpec(image="none", allow_unisolated=True)), timeout=60)
                assert isinstance(created, SandboxCreated)
                res = await c.worker_request(
                    created.worker_id,
                    ExecMsg(sandbox_id=created.sandbox_id, exec=ExecSpec(argv=["echo", created.sandbox_id])),
                    timeout=60,
                )
                assert res.stdout.strip() == created.sandbox_id.encode()  # type: ignore[union-attr]
                await c.worker_request(created.worker_id, Terminate(sandbox_id=created.sandbox_id), timeout=60)
                done.append(created.sandbox_id)
            except BaseException as exc:  # noqa: BLE001 - every failure is the test's finding
                failures.append(exc)
                raise

    def restart(old: object, module: str, **env: str) -> object:
        assert old.stop() == 0  # type: ignore[attr-defined]
        new = spawn(module, **env)
        new.expect("READY=1")  # type: ignore[attr-defined]
        return new

    async def main() -> None:
        nonlocal sched, worker
        stop = anyio.Event()
        async with Client(redis_url, prefix=prefix) as c, anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(producer, c, stop)
            await until(lambda: len(done) >= 10)
            before = len(done)
            sched = await anyio.to_thread.run_sync(restart, sched, "scheduler")
            await until(lambda: len(done) >= before + 10)
            before = len(done)
            worker = await anyio.to_thread.run_sync(lambda: restart(worker, "workers", HOTBED_DRAIN_ON_STOP="false"))
            await until(lambda: len(done) >= before + 10)
            stop.set()

    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
    assert not failures, failures
    assert len(done) >= 30 and len(set(done)) == len(done)
    assert worker.stop() == 0 and sched.stop() == 0  # type: ignore[attr-defined]
    assert "stopping gracefully" in worker.log()  # type: ignore[attr-defined]
