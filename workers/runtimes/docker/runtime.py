"""The :class:`~workers.runtimes.base.Runtime` of Docker + gVisor: each method is one
call into the module that owns its concern."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.abc
from aiodocker.exceptions import DockerError

from hotbed.errors import SandboxNotRunning
from hotbed.protocol import ExecResult, ExecSpec, FileEntry, SandboxSpec
from hotbed.records import HeldImages
from workers.runtimes.base import Managed, Placed
from workers.runtimes.docker import _aiodocker, checkpoints, commands, files, images, lifecycle
from workers.runtimes.docker.engine import Engine, container_name
from workers.runtimes.docker.network import SandboxNetworks


class DockerRuntime:
    name = "docker"
    kind = "real"

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
        self.engine = Engine(
            oci_runtime=oci_runtime, docker_url=docker_url, extra_labels=extra_labels,
            gpu_oci_runtime=gpu_oci_runtime, cgroup_parent=cgroup_parent, networks=networks,
        )

    async def open(self) -> None:
        await self.engine.open()
        if self.engine.wrapped:
            await anyio.to_thread.run_sync(checkpoints.prepare_marks)
        # What restores cut short by a worker's death left behind.
        await anyio.to_thread.run_sync(checkpoints.sweep_restore_copies)

    async def aclose(self) -> None:
        await self.engine.aclose()

    async def serve_network(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The node's DNS resolver for networked sandboxes (idle until the first one)."""
        await self.engine.networks.dns.serve(task_status=task_status)

    @property
    def isolated(self) -> bool:
        """Whether every dockerd runtime its sandboxes may get is gVisor (runsc*)."""
        e = self.engine
        return all(r.startswith("runsc") for r in (e.oci_runtime, e.gpu_oci_runtime, e.networks.oci_runtime))

    @property
    def direct_restore(self) -> bool:
        """Whether this worker's (non-GPU) sandboxes restore through the wrapper."""
        return self.engine.oci_runtime in self.engine.wrapped

    # ---------------------------------------------------------------- lifecycle

    async def create(self, placed: Placed, spec: SandboxSpec) -> None:
        await lifecycle.create(self.engine, placed, spec)

    def foreground(self, sandbox_id: str) -> bool:
        return lifecycle.foreground(self.engine, sandbox_id)

    def adopt_background(self, found: Managed) -> None:
        if found.ref:
            self.engine.background[found.sandbox_id] = found.ref

    async def destroy(self, sandbox_id: str) -> None:
        await lifecycle.destroy(self.engine, sandbox_id)

    async def is_alive(self, sandbox_id: str) -> bool:
        return await lifecycle.is_alive(self.engine, sandbox_id)

    async def list_managed(self) -> list[Managed]:
        return await lifecycle.list_managed(self.engine)

    async def exit_reason(self, sandbox_id: str) -> str | None:
        return await lifecycle.exit_reason(self.engine, sandbox_id)

    async def disk_usage(self, sandbox_ids: list[str]) -> dict[str, int]:
        return await lifecycle.disk_usage(self.engine, sandbox_ids)

    async def attach(self, sandbox_id: str) -> _aiodocker.AttachedContainer:
        try:
            return await _aiodocker.attach(self.engine.docker, container_name(sandbox_id), sandbox_id)
        except DockerError as exc:
            raise SandboxNotRunning(
                f"sandbox {sandbox_id}: cannot attach: {exc.message}", sandbox_id=sandbox_id
            ) from None

    # ------------------------------------------------------------ exec and files

    async def exec(self, sandbox_id: str, spec: ExecSpec, *, default_user: str) -> ExecResult:
        return await commands.exec_spec(self.engine, sandbox_id, spec, default_user=default_user)

    async def write_file(
        self, sandbox_id: str, path: str, data: bytes, *, mode: int, make_dirs: bool, user: str
    ) -> int:
        return await files.write_file(
            self.engine, sandbox_id, path, data, mode=mode, make_dirs=make_dirs, user=user
        )

    async def read_file(self, sandbox_id: str, path: str, *, max_bytes: int, user: str) -> bytes:
        return await files.read_file(self.engine, sandbox_id, path, max_bytes=max_bytes, user=user)

    async def list_files(self, sandbox_id: str, path: str, *, user: str) -> list[FileEntry]:
        return await files.list_files(self.engine, sandbox_id, path, user=user)

    # ---------------------------------------------------------------- snapshots

    async def checkpoint(self, sandbox_id: str, dest: Path, *, leave_running: bool) -> int:
        return await checkpoints.checkpoint(self.engine, sandbox_id, dest, leave_running=leave_running)

    async def restore(self, placed: Placed, spec: SandboxSpec, src: Path) -> None:
        await checkpoints.restore(self.engine, placed, spec, src)

    async def pause(self, sandbox_id: str) -> None:
        await checkpoints.pause(self.engine, sandbox_id)

    async def resume(self, sandbox_id: str) -> None:
        await checkpoints.resume(self.engine, sandbox_id)

    async def is_paused(self, sandbox_id: str) -> bool:
        return await checkpoints.is_paused(self.engine, sandbox_id)

    # ------------------------------------------------------------------- images

    async def list_images(self) -> HeldImages:
        return await images.list_images(self.engine)

    async def has_image(self, ref: str) -> bool:
        return await images.has_image(self.engine, ref)

    async def pull_image(self, ref: str, *, login: tuple[str, str] | None = None) -> None:
        await images.pull(self.engine, ref, login=login)
