"""The connection to dockerd, what ``open`` learns about the host, and the error
translation every Docker call of this runtime goes through.

Every Docker call sits under a deadline (aiodocker has none of its own).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiodocker
import anyio
import anyio.lowlevel
from aiodocker.exceptions import DockerError

from hotbed.errors import HotbedError, RuntimeFailure, SandboxNotFound, SandboxNotRunning
from workers.runtimes.docker import _aiodocker
from workers.runtimes.docker.network import SandboxNetworks

log = logging.getLogger(__name__)

API_TIMEOUT_S = 30.0

T = TypeVar("T")

# The file name of hotbed's runsc wrapper (deploy/runsc/runsc-hotbed): a dockerd runtime
# whose binary has this name restores without containerd (see snapshots.py).
WRAPPER_NAME = "runsc-hotbed"


def container_name(sandbox_id: str) -> str:
    return f"hotbed-{sandbox_id}"


class Engine:
    """One dockerd client and the host facts the other modules need."""

    def __init__(
        self,
        *,
        oci_runtime: str = "runsc",
        docker_url: str | None = None,
        extra_labels: dict[str, str] | None = None,
        gpu_oci_runtime: str = "runsc-nvproxy",
        cgroup_parent: str = "",
        networks: SandboxNetworks | None = None,
    ) -> None:
        self.oci_runtime = oci_runtime
        # Sandboxes whose network is not "none" (workers/runtimes/docker/network.py).
        self.networks = networks or SandboxNetworks()
        self.cgroup_parent = cgroup_parent
        # GPU sandboxes under gVisor need runsc's --nvproxy: a second runtime entry in
        # daemon.json (scripts/host-setup.sh registers it on hosts with an NVIDIA driver).
        self.gpu_oci_runtime = gpu_oci_runtime
        # dockerd's runtimes, by name.
        self.runtimes: set[str] = set()
        # dockerd runtimes that are hotbed's runsc wrapper: their restores skip containerd.
        self.wrapped: set[str] = set()
        # Runtimes on gVisor's ptrace platform, whose host pids backstop is higher.
        self.ptrace: set[str] = set()
        self.docker_url = docker_url
        self.extra_labels = dict(extra_labels or {})
        self.root = Path("/var/lib/docker")
        # Background sandboxes (starting, or pooled) at a low CPU weight: sandbox id ->
        # container id, which names its cgroup (lifecycle.foreground).
        self.background: dict[str, str] = {}
        # Where each sandbox's writes land on the host (its container layer's upper
        # directory), looked up once: lifecycle.disk_usage.
        self.upper_dirs: dict[str, str] = {}
        self._docker: aiodocker.Docker | None = None

    @property
    def docker(self) -> aiodocker.Docker:
        if self._docker is None:
            raise RuntimeFailure("docker runtime is not open")
        return self._docker

    async def open(self) -> None:
        self._docker = _aiodocker.open_docker(self.docker_url)
        with anyio.fail_after(API_TIMEOUT_S):
            info = await self._docker.system.info()
        self.root = Path(info.get("DockerRootDir") or "/var/lib/docker")
        if not self.cgroup_parent:
            # Sandboxes share one parent cgroup, which the host weighs below the
            # control plane: nice alone does not reach across cgroups.
            systemd = info.get("CgroupDriver") == "systemd"
            self.cgroup_parent = "hotbed.slice" if systemd else "/hotbed"
        runtimes = info.get("Runtimes") or {}
        self.runtimes = set(runtimes)
        if self.oci_runtime not in runtimes:
            await self.aclose()
            raise RuntimeFailure(
                f"dockerd has no runtime {self.oci_runtime!r}; run scripts/host-setup.sh"
            )
        self.wrapped = {
            name for name, r in runtimes.items()
            if Path(str((r or {}).get("path") or "")).name == WRAPPER_NAME
        }
        self.ptrace = {
            name for name, r in runtimes.items()
            if "--platform=ptrace" in ((r or {}).get("runtimeArgs") or [])
        }

    async def aclose(self) -> None:
        if self._docker is not None:
            docker, self._docker = self._docker, None
            with anyio.CancelScope(shield=True):
                await docker.close()

    def container(self, sandbox_id: str) -> Any:
        """The sandbox's container (no API call)."""
        return self.docker.containers.container(container_name(sandbox_id))

    async def show(self, sandbox_id: str) -> dict[str, Any]:
        """``docker inspect`` of the sandbox's container."""
        try:
            with anyio.fail_after(API_TIMEOUT_S):
                info: dict[str, Any] = await self.container(sandbox_id).show()
        except DockerError as exc:
            raise self.translate(exc, sandbox_id) from None
        return info

    async def whole(self, request: Callable[[], Awaitable[T]]) -> T:
        """``request()`` to dockerd, for one that makes or changes a container (a
        create, a start, a checkpoint), never abandoned half-way. dockerd carries on
        with a request whose caller went away, and a removal sent meanwhile races it: a
        create registered after its delete left the container; cancelled runsc
        restores left their containerd task and shim running for good once dockerd had
        dropped the container ("cannot delete running task" in its log); a removal
        during a cancelled checkpoint failed ("is zombie and can not be killed").
        Cancellation waits for dockerd's answer (bounded by the API timeout: then
        TimeoutError), then reaches the caller, whose clean-up finds the container done
        with, before it takes any further step."""
        with anyio.CancelScope(shield=True), anyio.fail_after(API_TIMEOUT_S):
            result = await request()
        await anyio.lowlevel.checkpoint_if_cancelled()
        return result

    async def post(
        self, path: str, *, params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None, sandbox_id: str,
    ) -> None:
        """A POST that changes a container, as :meth:`whole`."""
        try:
            await self.whole(lambda: _aiodocker.post(self.docker, path, params=params, body=body))
        except DockerError as exc:
            raise self.translate(exc, sandbox_id) from None
        except TimeoutError:
            raise RuntimeFailure(f"docker: {path} timed out", sandbox_id=sandbox_id) from None

    async def start(self, container_id: str, *, sandbox_id: str, params: dict[str, Any] | None = None) -> None:
        """``docker start`` (``params``: a checkpoint to start from), as :meth:`post`."""
        await self.post(f"containers/{container_id}/start", params=params, sandbox_id=sandbox_id)

    def translate(self, exc: DockerError, sandbox_id: str) -> HotbedError:
        msg = exc.message if isinstance(exc.message, str) else str(exc.message)
        if exc.status == 404:
            return SandboxNotFound(f"sandbox {sandbox_id} has no container", sandbox_id=sandbox_id)
        if exc.status == 409:
            return SandboxNotRunning(f"sandbox {sandbox_id}: {msg}", sandbox_id=sandbox_id)
        return RuntimeFailure(f"docker: {msg} (HTTP {exc.status})", sandbox_id=sandbox_id)
