"""Several hotbed nodes on one machine, each with its own container engine, for tests
and benchmarks of behaviour across nodes.

A node is a private ``dockerd`` (its own ``--data-root``, ``--exec-root``, pid file and
unix socket under ``ROOT/<name>/``, a managed containerd of its own), the runsc
runtimes of the host's ``/etc/docker/daemon.json``, no bridge and no iptables (as the
host's engine is set up), its own snapshot directory and worker identity, and
optionally its own network namespace (``netns=True``: the engine runs in
``ip netns`` ``hotbed-<name>``; its socket is still a file the worker reaches).

:func:`start` brings up N engines and loads the images named into each (saved once
from the host's engine into ``CACHE``, keyed by image id, then ``docker load``);
:class:`Fleet` then starts a worker process per node (:meth:`Fleet.start_worker`),
kills a node outright (:meth:`Fleet.kill`: worker, dockerd and its containerd, as a
machine that loses power) and :meth:`Fleet.stop` ends every process it started and
every container on the nodes, whatever state they are in. The host's own engine is
only ever read from (``docker save``).

Every daemon is started with ``close_fds`` and a new session: a lock a caller holds
(the CPU lock of the test harness) never leaks into an engine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

HOST_DAEMON_JSON = Path("/etc/docker/daemon.json")
# Image tarballs saved from the host's engine, reused across runs (by image id).
CACHE = Path(os.environ.get("HOTBED_FLEET_CACHE", "/var/tmp/hotbed-fleet-images"))
ROOT_PYTHONPATH = str(Path(__file__).resolve().parents[1])
START_TIMEOUT_S = 60.0


class FleetError(RuntimeError):
    pass


class Node(msgspec.Struct, kw_only=True):
    name: str
    root: str
    netns: str = ""
    dockerd_pid: int = 0
    worker_pid: int = 0

    @property
    def socket(self) -> str:
        return f"{self.root}/docker.sock"

    @property
    def docker_url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def snapshot_dir(self) -> str:
        return f"{self.root}/snapshots"

    def docker(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            out = subprocess.run(
                ["docker", "-H", self.docker_url, *args], capture_output=True, text=True, timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise FleetError(f"node {self.name}: docker {' '.join(args)} took over {timeout:g}s") from None
        if check and out.returncode != 0:
            raise FleetError(f"node {self.name}: docker {' '.join(args)}: {out.stderr.strip()[-500:]}")
        return out


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0): reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)
    return done == 0


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for c in _children(todo.pop()):
            out.append(c)
            todo.append(c)
    return out


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def node_config() -> dict[str, Any]:
    """A node engine's daemon.json: the host's runtimes, no networking of its own."""
    try:
        host = json.loads(HOST_DAEMON_JSON.read_text())
    except (OSError, ValueError) as exc:
        raise FleetError(f"cannot read {HOST_DAEMON_JSON} (run scripts/host-setup.sh): {exc}") from None
    return {
        "runtimes": host.get("runtimes", {}), "experimental": True,
        "bridge": "none", "iptables": False, "ip-masq": False,
        # A killed node's sandboxes must die with it, as on a machine that lost power.
        "live-restore": False,
    }


def _image_tar(image: str) -> Path:
    """The host engine's ``image`` saved as a tarball (cached by image id)."""
    out = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", image], capture_output=True, text=True, timeout=60,
    )
    if out.returncode != 0:
        raise FleetError(f"image {image} is not on this host's engine: {out.stderr.strip()}")
    ident = out.stdout.strip().split(":")[-1][:24]
    CACHE.mkdir(parents=True, exist_ok=True)
    tar = CACHE / f"{image.replace('/', '_').replace(':', '_')}-{ident}.tar"
    if not tar.exists():
        tmp = tar.with_suffix(f".part{os.getpid()}")
        subprocess.run(["docker", "save", "-o", str(tmp), image], check=True, timeout=600)
        tmp.rename(tar)
    return tar


class Fleet:
    """N engine nodes under ``root`` (see the module docstring)."""

    def __init__(self, root: Path, nodes: list[Node]) -> None:
        self.root = root
        self.nodes = nodes
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    # --------------------------------------------------------------- engines

    def _start_engine(self, node: Node) -> None:
        root = Path(node.root)
        for d in ("data", "exec", "snapshots"):
            (root / d).mkdir(parents=True, exist_ok=True)
        Path(node.socket).unlink(missing_ok=True)
        # dockerd reuses a containerd whose pidfile names a live pid, and kill(0) says a
        # zombie lives: a killed node's containerd, re-parented to an init that has not
        # reaped it yet, would leave dockerd waiting for a socket nobody serves.
        pidfile = root / "exec" / "containerd" / "containerd.pid"
        try:
            old = int(pidfile.read_text())
        except (OSError, ValueError):
            old = 0
        if old and not _alive(old):
            pidfile.unlink(missing_ok=True)
        (root / "daemon.json").write_text(json.dumps(node_config()))
        cmd = [
            "dockerd", "--config-file", str(root / "daemon.json"),
            "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
            "--pidfile", str(root / "dockerd.pid"), "-H", node.docker_url,
        ]
        if node.netns:
            cmd = ["ip", "netns", "exec", node.netns, *cmd]
        log = open(root / "dockerd.log", "ab")  # noqa: SIM115 - handed to the daemon
        # The engine runs below the control plane's priority, as scripts/host-setup.sh
        # sets the host's up.
        proc = subprocess.Popen(
            ["nice", "-n", os.environ.get("HOTBED_ENGINE_NICE", "10"), *cmd],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True,
        )
        log.close()
        self._procs[proc.pid] = proc
        node.dockerd_pid = proc.pid

    def _wait_engine(self, node: Node) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            proc = self._procs.get(node.dockerd_pid)
            if proc is not None and proc.poll() is not None:
                tail = (Path(node.root) / "dockerd.log").read_text(errors="replace")[-1500:]
                raise FleetError(f"dockerd of node {node.name} exited: {tail}")
            if Path(node.socket).exists():
                try:
                    if node.docker("version", "--format", "{{.Server.Version}}", timeout=10,
                                   check=False).returncode == 0:
                        return
                except FleetError:
                    # A dockerd restarted after a kill may hold requests while it cleans up
                    # what the kill left: slow, not dead; ask again until the deadline.
                    pass
            time.sleep(0.1)
        raise FleetError(f"dockerd of node {node.name} did not answer within {START_TIMEOUT_S:.0f}s")

    def load_images(self, images: list[str]) -> None:
        """Every node gets ``images`` (skipped where it already has them)."""
        for image in images:
            tar = _image_tar(image)
            for node in self.nodes:
                if node.docker("image", "inspect", image, check=False).returncode != 0:
                    node.docker("load", "-q", "-i", str(tar), timeout=600)

    def restart_engine(self, node: Node) -> None:
        """Start a node's dockerd again (after :meth:`kill`) on the same roots, without
        the containers it had: their processes died with the node."""
        self._start_engine(node)
        self._wait_engine(node)
        ids = node.docker("ps", "-aq").stdout.split()
        if ids:
            node.docker("rm", "-f", *ids, check=False)
        self._save()

    # --------------------------------------------------------------- workers

    def worker_env(self, node: Node, redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOTBED_")}
        env.update({
            "PYTHONPATH": ROOT_PYTHONPATH, "DOCKER_HOST": node.docker_url,
            "HOTBED_REDIS_URL": redis_url, "HOTBED_PREFIX": prefix,
            "HOTBED_WORKER_ID": f"{prefix}-{node.name}", "HOTBED_RUNTIME": "docker",
            "HOTBED_SNAPSHOT_DIR": node.snapshot_dir,
            # Each node serves its snapshots to the others on a loopback port of its own.
            "HOTBED_SNAPSHOT_SERVE": "127.0.0.1:0",
        })
        env.update(extra)
        return env

    def start_worker(self, node: Node, redis_url: str, prefix: str, **extra: str) -> subprocess.Popen[bytes]:
        """``python -m workers`` for ``node`` (HOTBED_* ``extra`` added); its log is
        ``ROOT/<name>/worker.log``."""
        log = open(Path(node.root) / "worker.log", "ab")  # noqa: SIM115 - handed to the worker
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers"], env=self.worker_env(node, redis_url, prefix, **extra),
            cwd=ROOT_PYTHONPATH, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
        log.close()
        self._procs[proc.pid] = proc
        node.worker_pid = proc.pid
        self._save()
        return proc

    def stop_worker(self, node: Node, *, timeout: float = 30) -> None:
        pid, node.worker_pid = node.worker_pid, 0
        if pid:
            _signal(pid, signal.SIGTERM)
            if not _wait_gone([pid], timeout):
                _signal(pid, signal.SIGKILL)
                _wait_gone([pid], 5)
        self._save()

    def worker_log(self, node: Node) -> str:
        try:
            return (Path(node.root) / "worker.log").read_text(errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------ failure, stop

    def kill(self, node: Node) -> None:
        """The node dies at once, as a machine that loses power: its worker, dockerd,
        containerd, the shims and every runsc process of its sandboxes get SIGKILL."""
        pids = [p for p in (node.worker_pid, node.dockerd_pid) if p]
        # Shims re-parent themselves to init, so they are found by the node's exec
        # root on their command lines rather than as the engine's descendants.
        pids += _descendants(node.dockerd_pid) if node.dockerd_pid else []
        pids += self._engine_processes(node)
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        _wait_gone(pids, 10)
        node.worker_pid = 0
        node.dockerd_pid = 0
        self._save()

    def _engine_processes(self, node: Node) -> list[int]:
        """Every process whose command line names the node's exec root."""
        marker = (node.root + "/exec").encode()
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                if marker in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                continue
        return out

    def _stop_engine(self, node: Node) -> None:
        if node.dockerd_pid and _alive(node.dockerd_pid):
            try:
                ids = node.docker("ps", "-aq", timeout=30).stdout.split()
                if ids:
                    node.docker("rm", "-f", *ids, check=False, timeout=120)
            except FleetError:
                pass
            _signal(node.dockerd_pid, signal.SIGTERM)
            if not _wait_gone([node.dockerd_pid], 20):
                _signal(node.dockerd_pid, signal.SIGKILL)
                _wait_gone([node.dockerd_pid], 5)
        node.dockerd_pid = 0
        # What a killed (or unanswering) engine left: killed like the rest of the node.
        left = self._engine_processes(node)
        for pid in left:
            _signal(pid, signal.SIGKILL)
        _wait_gone(left, 10)
        if left:
            _remove_cgroups(Path(node.root, "data", "containers"))

    def stop(self) -> None:
        """End every worker and engine of the fleet, remove the nodes' containers, and
        delete the nodes' directories."""
        for node in self.nodes:
            self.stop_worker(node, timeout=15)
        for node in self.nodes:
            self._stop_engine(node)
            if node.netns:
                subprocess.run(["ip", "netns", "delete", node.netns], capture_output=True)
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        self._procs.clear()
        _unmount_under(self.root)
        shutil.rmtree(self.root, ignore_errors=True)

    def _save(self) -> None:
        (self.root / "fleet.json").write_bytes(msgspec.json.encode(self.nodes))

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _remove_cgroups(containers: Path) -> None:
    """The (empty) cgroups of containers whose processes were killed under a dead
    engine: nobody else removes them."""
    try:
        ids = [d.name for d in containers.iterdir()]
    except OSError:
        return
    for cg in Path("/sys/fs/cgroup").glob("*/"):
        for found in [*cg.glob("*/" + "[0-9a-f]" * 12 + "*")]:
            if found.name in ids:
                try:
                    found.rmdir()
                except OSError:
                    pass


def _unmount_under(root: Path) -> None:
    """Mounts a killed engine left under ``root`` (overlay, shm): unmounted deepest
    first, so the tree can be removed."""
    prefix = str(root.resolve()) + "/"
    try:
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    except OSError:
        return
    for m in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True)


def start(n: int, *, images: list[str], root: Path | None = None, netns: bool = False,
          prefix: str = "node") -> Fleet:
    """``n`` engine nodes named ``{prefix}1..{prefix}N`` under ``root`` (a new temporary
    directory by default) with ``images`` loaded; :meth:`Fleet.stop` ends them."""
    if shutil.which("dockerd") is None:
        raise FleetError("dockerd is not installed (make install)")
    # Short: containerd's socket path under the exec root must fit a unix socket name.
    root = root or Path(tempfile.mkdtemp(prefix="hbf-", dir="/var/tmp"))
    nodes = [Node(name=f"{prefix}{i}", root=str(root / f"{prefix}{i}")) for i in range(1, n + 1)]
    fleet = Fleet(root, nodes)
    try:
        for node in nodes:
            if netns:
                node.netns = f"hotbed-{root.name}-{node.name}"
                subprocess.run(["ip", "netns", "add", node.netns], check=True, capture_output=True)
                subprocess.run(["ip", "-n", node.netns, "link", "set", "lo", "up"], check=True, capture_output=True)
            fleet._start_engine(node)
        for node in nodes:
            fleet._wait_engine(node)
        fleet._save()
        fleet.load_images(images)
    except BaseException:
        fleet.stop()
        raise
    return fleet
