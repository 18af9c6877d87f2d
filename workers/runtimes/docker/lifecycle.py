"""Containers made, found and removed: the container config of a sandbox, create,
destroy, is_alive and list_managed."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from aiodocker.containers import DockerContainer
from aiodocker.exceptions import DockerError

from hotbed import limits
from hotbed import network as hotbed_network
from hotbed.errors import ImageNotFound, RuntimeFailure, UnsupportedRequest
from hotbed.network import Allow
from hotbed.protocol import SPAWN_FIFO, NetworkPolicy, SandboxSpec
from workers.guest.channel import guest_command
from workers.runtimes.base import (
    LABEL_MANAGED,
    LABEL_NETWORK,
    LABEL_PREFIX,
    LABEL_SANDBOX,
    LABEL_WORKER,
    Managed,
    Placed,
)
from workers.runtimes.docker.engine import API_TIMEOUT_S, Engine, container_name

log = logging.getLogger(__name__)

# CPU weight (cgroup v1 shares; runsc maps it onto v2's cpu.weight, 3) of a background
# sandbox: one being restored, or a pool's until claimed, which nobody runs commands
# in yet. A sixteenth of the normal weight (1024), so a claimed sandbox's first command
# and every running one's win the CPU from restores and pool refills, while a restore
# among CPU-bound sandboxes still moves (the lowest, 2, would all but stop it); the
# normal weight comes back when it is handed out (:func:`foreground`).
BACKGROUND_CPU_SHARES = 64

# Keeps PID 1 alive and idle; TERM ends it at once. It also runs a spawner: each line
# written to SPAWN_FIFO is started as a child of init. Under gVisor, processes that
# descend from a ``docker exec`` do not survive checkpoint/restore; init's descendants
# do, so long-running processes that must be in a snapshot start through the spawner.
IDLE_CMD = [
    "/bin/sh", "-c",
    "trap 'exit 0' TERM INT; mkdir -p /tmp/.hotbed && mkfifo -m 600 " + SPAWN_FIFO + "; "
    "(while :; do if read -r line < " + SPAWN_FIFO + "; then "
    'sh -c "$line" </dev/null >>/tmp/.hotbed/spawn.log 2>&1 & fi; done) & '
    "while :; do sleep 86400 & wait $!; done",
]


def container_config(
    engine: Engine, placed: Placed, spec: SandboxSpec, image_id: str, *, cmd: list[str] | None = None,
) -> dict[str, Any]:
    """The Engine API body that creates ``placed``'s container."""
    res = spec.resources
    labels = {
        LABEL_MANAGED: "1",
        LABEL_SANDBOX: placed.sandbox_id,
        LABEL_WORKER: placed.worker_id,
        LABEL_PREFIX: placed.prefix,
        **engine.extra_labels,
    }
    env = [f"{k}={v}" for k, v in spec.env.items()]
    host_config: dict[str, Any] = {
        "Runtime": engine.oci_runtime,
        "CgroupParent": engine.cgroup_parent,
        "NetworkMode": "none",
        # CPU is overcommitted (workers.config): a request past the host's cores is a
        # share of all of them, which is as much as dockerd lets a container have.
        "NanoCpus": int(min(res.cpu, float(os.cpu_count() or 1)) * 1e9),
        "Memory": res.memory_mb << 20,
        "MemorySwap": res.memory_mb << 20,
        "Ulimits": [
            {"Name": name, "Soft": value, "Hard": value}
            for name, value in limits.sandbox_rlimits(res.pids).items()
        ],
        "SecurityOpt": ["no-new-privileges"],
        **({"CpuShares": BACKGROUND_CPU_SHARES} if placed.background else {}),
        # The guest agent's channel is the container's stdout: keep it out of logs.
        "LogConfig": {"Type": "none", "Config": {}},
    }
    net = network_of(spec)
    networked = net.mode != "none"
    if networked:
        # Filtered on the host (workers/runtimes/docker/network.py).
        if placed.gpu_uuids:
            raise UnsupportedRequest(
                "a GPU sandbox cannot have a network yet (its runsc runtime has none)",
                sandbox_id=placed.sandbox_id,
            )
        host_config.update(engine.networks.host_config())
        labels[LABEL_NETWORK] = engine.networks.label(net)
    if placed.gpu_uuids:
        if engine.oci_runtime == "runsc":
            if engine.gpu_oci_runtime not in engine.runtimes:
                raise RuntimeFailure(
                    f"GPU sandbox needs dockerd runtime {engine.gpu_oci_runtime!r} (runsc "
                    "--nvproxy); run scripts/host-setup.sh on this GPU node",
                    sandbox_id=placed.sandbox_id, worker_id=placed.worker_id,
                )
            host_config["Runtime"] = engine.gpu_oci_runtime
        host_config["DeviceRequests"] = [
            {"Driver": "nvidia", "DeviceIDs": list(placed.gpu_uuids), "Capabilities": [["gpu"]]}
        ]
        env.append("NVIDIA_VISIBLE_DEVICES=" + ",".join(placed.gpu_uuids))
    host_config["PidsLimit"] = limits.host_pids_limit(
        res.pids, ptrace=host_config["Runtime"] in engine.ptrace
    )
    config: dict[str, Any] = {
        "Image": image_id,
        # PID 1 is the guest agent where the image has python3 (else IDLE_CMD): the
        # worker talks to it over the attached stdin/stdout.
        "Cmd": cmd or guest_command(IDLE_CMD),
        "OpenStdin": True,
        "StdinOnce": False,
        "User": spec.user or "",
        "Env": env,
        "Labels": labels,
        "NetworkDisabled": not networked,
        "HostConfig": host_config,
    }
    if spec.workdir:
        config["WorkingDir"] = spec.workdir
    return config


async def create(engine: Engine, placed: Placed, spec: SandboxSpec) -> None:
    sid = placed.sandbox_id
    try:
        with anyio.fail_after(API_TIMEOUT_S):
            image = await engine.docker.images.inspect(spec.image)
    except DockerError as exc:
        if exc.status == 404:
            raise ImageNotFound(
                f"image {spec.image!r} not found on worker {placed.worker_id} "
                "(build it with `hotbed image build`, or list its registry in the "
                "worker's `registries`)",
                sandbox_id=sid,
                worker_id=placed.worker_id,
            ) from None
        raise engine.translate(exc, sid) from None
    allows = await prepare_network(engine, placed, spec)
    config = container_config(engine, placed, spec, image["Id"])
    async with removed_on_failure(engine, sid, "start"):
        container = await create_container(engine, config, sid)
        created(engine, placed, container.id)
        await engine.start(container.id, sandbox_id=sid)
        await apply_network(engine, sid, spec, allows)


def network_of(spec: SandboxSpec) -> NetworkPolicy:
    return hotbed_network.of(spec.network)


async def prepare_network(engine: Engine, placed: Placed, spec: SandboxSpec) -> list[Allow]:
    """A networked sandbox's checked allow list (the node's network made on first
    use); nothing for ``network="none"``."""
    net = network_of(spec)
    if net.mode == "none":
        return []
    allows = engine.networks.check(net, sandbox_id=placed.sandbox_id)
    await engine.networks.ensure(engine.docker, engine.runtimes)
    return allows


async def apply_network(engine: Engine, sid: str, spec: SandboxSpec, allows: list[Allow]) -> None:
    """The started container's rules (none for ``network="none"``)."""
    net = network_of(spec)
    if net.mode != "none":
        await engine.networks.apply(sid, await engine.show(sid), net, allows)


@asynccontextmanager
async def removed_on_failure(engine: Engine, sid: str, what: str) -> AsyncIterator[None]:
    """A sandbox that fails (or is cancelled) half-made leaves no container behind."""
    try:
        yield
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await destroy(engine, sid)
        if isinstance(exc, DockerError):
            raise engine.translate(exc, sid) from None
        if isinstance(exc, TimeoutError):
            raise RuntimeFailure(f"docker did not {what} {sid} in time", sandbox_id=sid) from None
        raise


async def create_container(engine: Engine, config: dict[str, Any], sid: str) -> DockerContainer:
    """``docker create``, never abandoned half-way (:meth:`Engine.whole`); a cancelled
    one is then removed by :func:`removed_on_failure`, never started."""
    container: DockerContainer = await engine.whole(
        lambda: engine.docker.containers.create(config, name=container_name(sid)),
    )
    return container


def created(engine: Engine, placed: Placed, container_id: str) -> None:
    """Note a new container (its cgroup is named by its id) while it is background."""
    if placed.background:
        engine.background[placed.sandbox_id] = container_id


def foreground(engine: Engine, sandbox_id: str) -> bool:
    """Give a background sandbox the normal CPU weight.

    A direct write to its cgroup's CPU weight file: dockerd's update goes to the OCI
    runtime, and runsc has no ``update``. The write is an in-kernel setting, no I/O, so
    it is done in line: the claimer's first command may be the next one handled, and it
    must already run at the normal weight.
    """
    cid = engine.background.pop(sandbox_id, None)
    if cid is None:
        return False
    for path, value in _weight_files(engine.cgroup_parent, cid):
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError:
            continue
        try:
            os.write(fd, value)
        except OSError:
            log.warning("cpu weight of %s not raised (%s)", sandbox_id, path, extra={"sandbox_id": sandbox_id})
        finally:
            os.close(fd)
        return True
    return True


def _weight_files(parent: str, container_id: str) -> list[tuple[str, bytes]]:
    """Where a container's CPU weight is, with the default value to write back: cgroup
    v1 ``cpu.shares`` (1024) or v2 ``cpu.weight`` (100), under the cgroupfs driver's
    ``<parent>/<id>`` or systemd's ``<parent>/docker-<id>.scope``."""
    name = parent.strip("/")
    out = []
    for leaf in (container_id, f"docker-{container_id}.scope"):
        out.append((f"/sys/fs/cgroup/cpu/{name}/{leaf}/cpu.shares", b"1024"))
        out.append((f"/sys/fs/cgroup/{name}/{leaf}/cpu.weight", b"100"))
    return out


async def destroy(engine: Engine, sandbox_id: str) -> None:
    engine.background.pop(sandbox_id, None)
    engine.upper_dirs.pop(sandbox_id, None)
    # Its rules go first: dockerd may give its address to the next sandbox.
    await engine.networks.remove(sandbox_id)
    try:
        with anyio.fail_after(API_TIMEOUT_S):
            await engine.container(sandbox_id).delete(force=True, v=True)
    except DockerError as exc:
        if exc.status not in (404, 409):
            raise engine.translate(exc, sandbox_id) from None


async def is_alive(engine: Engine, sandbox_id: str) -> bool:
    try:
        with anyio.fail_after(API_TIMEOUT_S):
            info = await engine.container(sandbox_id).show()
    except DockerError as exc:
        if exc.status == 404:
            return False
        raise engine.translate(exc, sandbox_id) from None
    return bool(info["State"]["Running"])


async def exit_reason(engine: Engine, sandbox_id: str) -> str | None:
    """Why a stopped container stopped: the kernel's OOM kill (under gVisor the host
    kills the whole sandbox at its memory cgroup's limit, the sandbox's own), else its
    exit code; ``None`` if it is gone or still running."""
    try:
        with anyio.fail_after(API_TIMEOUT_S):
            info = await engine.container(sandbox_id).show()
    except DockerError as exc:
        if exc.status == 404:
            return None
        raise engine.translate(exc, sandbox_id) from None
    state = info["State"]
    if state.get("Running"):
        return None
    if state.get("OOMKilled"):
        limit = int(info["HostConfig"].get("Memory") or 0) >> 20
        return f"out of memory (OOMKilled at its own {limit} MiB limit)"
    return f"exit code {state.get('ExitCode')}"


# A runc container's layer is a tree of its files; a gVisor one is a single file store.
# Past this many entries the count stops (an undercount, never a stall of the loop).
DISK_SCAN_ENTRIES = 20_000


async def disk_usage(engine: Engine, sandbox_ids: list[str]) -> dict[str, int]:
    """Bytes allocated on the host under each sandbox's container layer (its writes),
    measured in one trip to a thread; a sandbox gone, or whose storage driver has no
    upper directory, is left out."""
    for sid in sandbox_ids:
        if sid in engine.upper_dirs:
            continue
        try:
            with anyio.fail_after(API_TIMEOUT_S):
                info = await engine.container(sid).show()
        except DockerError as exc:
            if exc.status == 404:
                continue
            raise engine.translate(exc, sid) from None
        upper = ((info.get("GraphDriver") or {}).get("Data") or {}).get("UpperDir") or ""
        if upper:
            engine.upper_dirs[sid] = upper
    dirs = {sid: engine.upper_dirs[sid] for sid in sandbox_ids if sid in engine.upper_dirs}

    def measure() -> dict[str, int]:
        sizes = {sid: allocated_bytes(path) for sid, path in dirs.items()}
        return {sid: n for sid, n in sizes.items() if n is not None}

    return await anyio.to_thread.run_sync(measure)


def allocated_bytes(root: str, *, limit: int = DISK_SCAN_ENTRIES) -> int | None:
    """Blocks allocated under ``root`` (a sparse file counts what was written)."""
    total, seen, todo = 0, 0, [root]
    try:
        while todo and seen < limit:
            with os.scandir(todo.pop()) as it:
                for entry in it:
                    seen += 1
                    st = entry.stat(follow_symlinks=False)
                    total += st.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        todo.append(entry.path)
    except FileNotFoundError:
        return None if seen == 0 else total
    return total


async def list_managed(engine: Engine) -> list[Managed]:
    try:
        with anyio.fail_after(API_TIMEOUT_S):
            found = await engine.docker.containers.list(
                all=True, filters={"label": [f"{LABEL_MANAGED}=1"]}
            )
    except DockerError as exc:
        # dockerd restarting, say: the health check's caller retries.
        raise RuntimeFailure(f"docker: listing containers: {exc.message} (HTTP {exc.status})") from None
    out = []
    for c in found:
        labels = c["Labels"] or {}
        out.append(
            Managed(
                sandbox_id=labels.get(LABEL_SANDBOX, ""),
                worker_id=labels.get(LABEL_WORKER, ""),
                prefix=labels.get(LABEL_PREFIX, ""),
                running=c["State"] == "running",
                ref=c["Id"],
            )
        )
    return out
