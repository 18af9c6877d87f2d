"""A local Redis Cluster on loopback ports, for trying hotbed on one machine and for tests.

``hotbed up --cluster N`` starts N primaries (``--replicas R``: R replicas each), each a
``redis-server --cluster-enabled yes`` on a free loopback port with its own directory
under ``ROOT`` (``$HOTBED_HOME/cluster`` for ``up``), joined by
``redis-cli --cluster create``. ``ROOT/cluster.json`` records the ports and pids, so
``hotbed down`` (:func:`stop`) ends exactly these servers. :func:`start` returns once
every slot is served and every replica has synced with its primary.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import msgspec

STATE_FILE = "cluster.json"
# How long a primary may be unreachable before its replica takes over. Short, because
# this cluster is for trying failover out (and for tests), not for a flaky network.
NODE_TIMEOUT_MS = 2000
SERVER_FLAGS = ("--maxclients", "20000", "--maxmemory", "2gb", "--maxmemory-policy", "noeviction")


# Servers this process started, so stop() reaps them (and no Popen is dropped running).
_children: dict[int, subprocess.Popen[bytes]] = {}


class LocalCluster(msgspec.Struct, frozen=True):
    ports: list[int]
    pids: list[int]
    primaries: int
    replicas: int

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[: self.primaries])


class ClusterStartError(RuntimeError):
    pass


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """``n`` loopback ports that are free along with their cluster-bus port (+10000)."""
    rng = random.SystemRandom()
    out: list[int] = []
    while len(out) < n:
        port = rng.randrange(20_000, 55_000)
        if port not in out and _bindable(port) and _bindable(port + 10_000):
            out.append(port)
    return out


def _wait(check: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise ClusterStartError(f"local Redis Cluster: {what} within {timeout:.0f}s")


def _info(port: int, section: str) -> dict[str, str]:
    import redis

    r = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=1)
    try:
        text = r.execute_command("CLUSTER INFO") if section == "cluster" else r.execute_command("INFO", section)  # type: ignore[no-untyped-call]
    except redis.RedisError:
        return {}
    finally:
        r.close()
    if isinstance(text, dict):
        return {str(k): str(v) for k, v in text.items()}
    raw = text.decode() if isinstance(text, bytes) else str(text)
    return dict(line.split(":", 1) for line in raw.splitlines() if ":" in line)


def load(root: Path) -> LocalCluster | None:
    path = root / STATE_FILE
    if not path.exists():
        return None
    return msgspec.json.decode(path.read_bytes(), type=LocalCluster)


def running(cluster: LocalCluster) -> bool:
    return all(_info(p, "cluster").get("cluster_state") == "ok" for p in cluster.ports)


def start(primaries: int, root: Path, *, replicas: int = 0, node_timeout_ms: int = NODE_TIMEOUT_MS) -> LocalCluster:
    """Start a cluster of ``primaries`` primaries with ``replicas`` replicas each."""
    if primaries < 3:
        raise ClusterStartError("a Redis Cluster needs at least 3 primaries")
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        raise ClusterStartError("redis-server/redis-cli not installed; run `make install`")
    root.mkdir(parents=True, exist_ok=True)
    ports = _free_ports(primaries * (1 + replicas))
    pids: list[int] = []
    cluster = LocalCluster(ports=ports, pids=pids, primaries=primaries, replicas=replicas)
    try:
        for port in ports:
            d = root / str(port)
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            log = open(d / "redis.log", "ab")  # noqa: SIM115 - handed to the server
            proc = subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", str(node_timeout_ms), "--save", "", "--appendonly", "no",
                 "--repl-diskless-sync-delay", "0",
                 *SERVER_FLAGS],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
            )
            log.close()
            _children[proc.pid] = proc
            pids.append(proc.pid)
        (root / STATE_FILE).write_bytes(msgspec.json.encode(cluster))
        for port, pid in zip(ports, pids, strict=True):
            def answers(port: int = port, pid: int = pid) -> bool:
                if _children[pid].poll() is not None:
                    tail = (root / str(port) / "redis.log").read_text(errors="replace")[-800:]
                    raise ClusterStartError(f"redis-server on port {port} exited: {tail}")
                return bool(_info(port, "server"))
            _wait(answers, f"node {port} did not answer")
        out = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )
        if out.returncode != 0:
            raise ClusterStartError(f"redis-cli --cluster create failed: {(out.stdout + out.stderr)[-1500:]}")
        _wait(lambda: running(cluster), "not every node saw every slot served")
        if replicas:
            def synced() -> bool:
                infos = [_info(p, "replication") for p in ports]
                return sum(i.get("master_link_status") == "up" for i in infos) == primaries * replicas
            _wait(synced, "replicas did not sync")
    except BaseException:
        stop(root)
        raise
    return cluster


def stop(root: Path, *, timeout: float = 10.0) -> bool:
    """End the servers ``root``'s cluster.json names and remove their state; False if
    there was none."""
    cluster = load(root)
    if cluster is None:
        return False
    for pid in cluster.pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for pid in cluster.pids:
        child = _children.pop(pid, None)
        while time.monotonic() < deadline:
            if child is not None:
                if child.poll() is not None:
                    break
            else:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
            time.sleep(0.05)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if child is not None:
                child.wait(timeout=5)
    for port in cluster.ports:
        shutil.rmtree(root / str(port), ignore_errors=True)
    (root / STATE_FILE).unlink(missing_ok=True)
    return True
