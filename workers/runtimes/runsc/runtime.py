"""The :class:`~workers.runtimes.base.Runtime` of runsc driven directly: no dockerd, no
containerd.

A sandbox is a runsc container under hotbed's own ``--root`` and a state directory
``<state_dir>/sandboxes/<sandbox id>/`` holding its OCI bundle (``config.json``, the
hotbed labels in its annotations), ``sandbox.json`` (what exec, restore and a restarted
worker need), the two stdio pipes of the guest agent (:mod:`.stdio`), runsc's log, and
``paused/`` while it is paused. The root file system is the image's unpacked root,
shared read-only (:mod:`.images`).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import anyio
import msgspec

from hotbed.errors import (
    HotbedError,
    RuntimeFailure,
    SandboxNotFound,
    SandboxNotRunning,
    UnsupportedRequest,
)
from hotbed.protocol import ExecResult, ExecSpec, FileEntry, SandboxSpec
from workers.guest.channel import guest_command
from workers.runtimes.base import (
    LABEL_MANAGED,
    LABEL_PREFIX,
    LABEL_SANDBOX,
    LABEL_WORKER,
    Managed,
    Placed,
)
from workers.runtimes.docker.lifecycle import IDLE_CMD
from workers.runtimes.runsc import commands, files, nvidia, oci, stdio
from workers.runtimes.runsc.cli import Runsc
from workers.runtimes.runsc.images import Image, ImageStore
from workers.runtimes.runsc.reaper import Reaper

log = logging.getLogger(__name__)

META = "sandbox.json"
PAUSED = "paused"
# GPU sandboxes stay on systrap whatever the node's platform: nvproxy has been
# checked on GPU machines there, not under ptrace (a later flag wins in runsc).
GPU_FLAGS = ["--nvproxy", "--platform=systrap"]


class SandboxMeta(msgspec.Struct, frozen=True, kw_only=True):
    """A sandbox as this runtime keeps it on disk (and in a snapshot, for restore)."""

    sandbox_id: str
    worker_id: str
    prefix: str
    image: str
    image_ref: str
    rootfs: str
    args: list[str]
    # The image's env and the sandbox's own (GPU variables come from the placement).
    env: list[str]
    cwd: str
    user: str
    gpu_uuids: list[str] = []
    flags: list[str] = []


_meta_decode = msgspec.json.Decoder(SandboxMeta).decode


class RunscRuntime:
    name = "runsc"
    kind = "real"
    isolated = True

    def __init__(
        self,
        *,
        runsc: str = "runsc",
        root: str | os.PathLike[str] = "/run/hotbed/runsc",
        state_dir: str | os.PathLike[str] = "/var/lib/hotbed/runsc",
        image_dir: str | os.PathLike[str] = "/var/lib/hotbed/images",
        image_cache: str | os.PathLike[str] | None = None,
        cgroup_parent: str = "",
        use_docker: bool = True,
        docker_url: str | None = None,
        flags: Sequence[str] = (),
        gpu_proc: Path = Path("/proc"),
    ) -> None:
        if any("kvm" in f for f in flags):
            raise ValueError("the runsc runtime never runs on gVisor's KVM platform")
        self.runsc = Runsc(runsc, Path(root), flags=flags)
        self.state_dir = Path(state_dir)
        self.sandboxes_dir = self.state_dir / "sandboxes"
        self.images = ImageStore(
            Path(image_cache or self.state_dir / "images"), Path(image_dir),
            docker_url=docker_url, use_docker=use_docker,
        )
        # Same parent as the docker runtime's sandboxes ("/hotbed" under cgroupfs).
        self.cgroup_parent = cgroup_parent or "/hotbed"
        self.gpu_proc = gpu_proc
        self._metas: dict[str, SandboxMeta] = {}
        self._idents: dict[tuple[str, str], oci.Identity] = {}
        self.reaper = Reaper()

    async def open(self) -> None:
        try:
            await anyio.Path(self.sandboxes_dir).mkdir(parents=True, exist_ok=True)
            await anyio.Path(self.runsc.root).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeFailure(f"cannot create the runsc state directories: {exc}") from None
        await self.runsc.call(["list"])  # fails here, once, if runsc cannot run
        await self.images.open()
        # Last: a runtime that failed to open is never closed, and must not keep the
        # process a subreaper.
        self.reaper.enable()

    async def aclose(self) -> None:
        self.reaper.disable()
        await self.images.aclose()

    # ---------------------------------------------------------------- state

    def _dir(self, sandbox_id: str) -> Path:
        if not sandbox_id or "/" in sandbox_id or sandbox_id.startswith("."):
            raise SandboxNotFound(f"bad sandbox id {sandbox_id!r}", sandbox_id=sandbox_id)
        return self.sandboxes_dir / sandbox_id

    async def _meta(self, sandbox_id: str) -> SandboxMeta:
        meta = self._metas.get(sandbox_id)
        if meta is not None:
            return meta
        try:
            raw = await anyio.Path(self._dir(sandbox_id), META).read_bytes()
            meta = _meta_decode(raw)
        except (OSError, msgspec.DecodeError):
            raise SandboxNotFound(f"no sandbox {sandbox_id} on this worker", sandbox_id=sandbox_id) from None
        self._metas[sandbox_id] = meta
        return meta

    async def _ident(self, rootfs: str, user: str, sandbox_id: str) -> oci.Identity:
        key = (rootfs, user)
        ident = self._idents.get(key)
        if ident is None:
            try:
                ident = await anyio.to_thread.run_sync(oci.resolve_user, Path(rootfs), user)
            except ValueError as exc:
                raise RuntimeFailure(f"sandbox {sandbox_id}: {exc}", sandbox_id=sandbox_id) from None
            self._idents[key] = ident
        return ident

    async def _status(self, meta: SandboxMeta) -> str | None:
        self.reaper.reap_exited(meta.sandbox_id)
        state = await self.runsc.state(meta.sandbox_id, flags=meta.flags)
        return None if state is None else str(state.get("status"))

    # ---------------------------------------------------------------- lifecycle

    async def create(self, placed: Placed, spec: SandboxSpec) -> None:
        sid = placed.sandbox_id
        _no_network(spec, sid)
        image = await self.images.get(spec.image, sandbox_id=sid)
        meta = SandboxMeta(
            sandbox_id=sid, worker_id=placed.worker_id, prefix=placed.prefix, image=spec.image,
            image_ref=image.ref, rootfs=image.rootfs,
            # PID 1 is the guest agent where the image has python3, else the idle shell.
            args=guest_command(IDLE_CMD),
            # Defaults (PATH, HOME from the user's passwd entry) are filled in at boot.
            env=[*image.config.env, *(f"{k}={v}" for k, v in spec.env.items())],
            cwd=spec.workdir or image.config.workdir or "/",
            user=spec.user or image.config.user or "0",
            gpu_uuids=list(placed.gpu_uuids), flags=list(GPU_FLAGS) if placed.gpu_uuids else [],
        )
        await self._boot(placed, spec, meta, image, restore_from=None)

    async def restore(self, placed: Placed, spec: SandboxSpec, src: Path) -> None:
        sid = placed.sandbox_id
        _no_network(spec, sid)
        try:
            old = _meta_decode(await anyio.Path(src, META).read_bytes())
        except (OSError, msgspec.DecodeError) as exc:
            raise RuntimeFailure(f"snapshot {src} unreadable: {exc}", sandbox_id=sid) from None
        image = await self.images.get(old.image, ref=old.image_ref, sandbox_id=sid)
        meta = msgspec.structs.replace(
            old, sandbox_id=sid, worker_id=placed.worker_id, prefix=placed.prefix,
            image_ref=image.ref, rootfs=image.rootfs, gpu_uuids=list(placed.gpu_uuids),
            flags=list(GPU_FLAGS) if placed.gpu_uuids else [],
        )
        await self._boot(placed, spec, meta, image, restore_from=src / "checkpoint")

    async def _boot(
        self, placed: Placed, spec: SandboxSpec, meta: SandboxMeta, image: Image, *, restore_from: Path | None
    ) -> None:
        sid = placed.sandbox_id
        d = self._dir(sid)
        ident = await self._ident(meta.rootfs, meta.user, sid)
        gpu = None
        if meta.gpu_uuids:
            try:
                gpu = await anyio.to_thread.run_sync(
                    lambda: nvidia.gpu_setup(meta.gpu_uuids, proc=self.gpu_proc)
                )
            except (nvidia.GpuHostError, OSError) as exc:
                raise RuntimeFailure(f"GPU sandbox: {exc}", sandbox_id=sid, worker_id=placed.worker_id) from None
        bundle = oci.sandbox_spec(
            rootfs=Path(image.rootfs), args=meta.args, env=meta.env, cwd=meta.cwd, ident=ident,
            hostname=sid,
            annotations={
                LABEL_MANAGED: "1", LABEL_SANDBOX: sid, LABEL_WORKER: placed.worker_id,
                LABEL_PREFIX: placed.prefix,
            },
            cgroup=oci.cgroups_path(self.cgroup_parent, sid), resources=spec.resources, gpu=gpu,
        )

        def prepare() -> tuple[int, int]:
            d.mkdir(parents=True, exist_ok=False)
            (d / "config.json").write_bytes(msgspec.json.encode(bundle))
            (d / META).write_bytes(msgspec.json.encode(meta))
            stdio.make_fifos(d)
            return stdio.sandbox_ends(d)

        try:
            ends = await anyio.to_thread.run_sync(prepare)
        except FileExistsError:
            raise RuntimeFailure(f"sandbox {sid} already exists on this worker", sandbox_id=sid) from None
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(d, ignore_errors=True))
            if isinstance(exc, OSError):
                raise RuntimeFailure(f"cannot prepare sandbox {sid}: {exc}", sandbox_id=sid) from None
            raise
        self._metas[sid] = meta
        try:
            if restore_from is None:
                args = ["run", "--detach", "--bundle", os.fspath(d), sid]
            else:
                args = ["restore", "--detach", "--image-path", os.fspath(restore_from), "--bundle", os.fspath(d), sid]
            await self.runsc.launch(args, sandbox_id=sid, flags=meta.flags, stdio=ends, log_path=d / "runsc.log")
            await self.reaper.adopt(sid, d)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.destroy(sid)
            raise
        finally:
            for fd in ends:
                os.close(fd)

    async def destroy(self, sandbox_id: str) -> None:
        d = self._dir(sandbox_id)
        try:
            meta = await self._meta(sandbox_id)
            flags = meta.flags
        except SandboxNotFound:
            flags = []
        await self._delete(sandbox_id, flags)
        self._metas.pop(sandbox_id, None)
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(d, ignore_errors=True))

    async def _delete(self, sandbox_id: str, flags: Sequence[str]) -> None:
        """``runsc delete --force``, reaping the sandbox's processes as it waits for them."""

        async def delete() -> None:
            try:
                await self.runsc.call(["delete", "--force", sandbox_id], sandbox_id=sandbox_id, flags=flags)
            except SandboxNotFound:
                pass

        await self.reaper.ending(sandbox_id, delete)

    async def is_alive(self, sandbox_id: str) -> bool:
        try:
            meta = await self._meta(sandbox_id)
        except SandboxNotFound:
            return False
        return await self._status(meta) == "running"

    async def attach(self, sandbox_id: str) -> stdio.FifoStdio:
        # No `runsc state` first (a process start, 15-40 ms, on the path of the first
        # command after every resume): the pipes answer the same question, since only
        # a live sandbox holds their other ends.
        try:
            await self._meta(sandbox_id)
            return stdio.FifoStdio(self._dir(sandbox_id))
        except (HotbedError, OSError):
            raise SandboxNotRunning(
                f"sandbox {sandbox_id}: cannot attach: not running", sandbox_id=sandbox_id
            ) from None

    async def list_managed(self) -> list[Managed]:
        def scan() -> list[SandboxMeta]:
            out = []
            for f in self.sandboxes_dir.glob(f"*/{META}"):
                try:
                    out.append(_meta_decode(f.read_bytes()))
                except (OSError, msgspec.DecodeError):
                    continue
            return out

        metas = await anyio.to_thread.run_sync(scan)
        self.reaper.reap_exited()
        statuses = await self.runsc.statuses()
        for m in metas:
            self._metas.setdefault(m.sandbox_id, m)
        return [
            Managed(sandbox_id=m.sandbox_id, worker_id=m.worker_id, prefix=m.prefix,
                    running=statuses.get(m.sandbox_id) == "running")
            for m in metas
        ]

    def gpu_holders(self) -> dict[str, str]:
        """GPU UUID -> the sandbox holding it, for the worker's GPU metrics."""
        return {u: m.sandbox_id for m in self._metas.values() for u in m.gpu_uuids}

    # ------------------------------------------------------------ exec and files

    async def _target(self, sandbox_id: str) -> tuple[commands.Target, SandboxMeta]:
        meta = await self._meta(sandbox_id)
        return commands.Target(
            sandbox_id=sandbox_id, dir=self._dir(sandbox_id), env=meta.env, cwd=meta.cwd, flags=meta.flags,
        ), meta

    async def exec(self, sandbox_id: str, spec: ExecSpec, *, default_user: str) -> ExecResult:
        target, meta = await self._target(sandbox_id)
        ident = await self._ident(meta.rootfs, spec.user or default_user, sandbox_id)
        return await commands.exec_spec(self.runsc, target, spec, ident=ident)

    async def _run_as(self, sandbox_id: str, user: str) -> files.RunAs:
        target, meta = await self._target(sandbox_id)
        ident = await self._ident(meta.rootfs, user, sandbox_id)

        async def run(argv: list[str], data: bytes | None, max_output: int) -> ExecResult:
            return await commands.run(
                self.runsc, target, argv, ident=ident, stdin=data, timeout=60.0, max_output=max_output
            )

        return run

    async def write_file(
        self, sandbox_id: str, path: str, data: bytes, *, mode: int, make_dirs: bool, user: str
    ) -> int:
        run = await self._run_as(sandbox_id, user)
        return await files.write_file(run, sandbox_id, path, data, mode=mode, make_dirs=make_dirs)

    async def read_file(self, sandbox_id: str, path: str, *, max_bytes: int, user: str) -> bytes:
        run = await self._run_as(sandbox_id, user)
        return await files.read_file(run, sandbox_id, path, max_bytes=max_bytes)

    async def list_files(self, sandbox_id: str, path: str, *, user: str) -> list[FileEntry]:
        run = await self._run_as(sandbox_id, user)
        return await files.list_files(run, sandbox_id, path)

    # ---------------------------------------------------------------- snapshots
    # A snapshot directory holds ``checkpoint/`` (runsc's image: memory, processes and
    # the sandbox's overlay, pages uncompressed so a restore reads instead of
    # inflating) and ``sandbox.json`` (image, user, env, working directory, command).

    async def checkpoint(self, sandbox_id: str, dest: Path, *, leave_running: bool) -> int:
        meta = await self._meta(sandbox_id)
        if await self._status(meta) != "running":
            raise SandboxNotRunning(f"sandbox {sandbox_id} is not running", sandbox_id=sandbox_id)
        await anyio.Path(dest).mkdir(parents=True, exist_ok=True)
        args = ["checkpoint", "--image-path", os.fspath(dest / "checkpoint"), "--compression=none"]
        if leave_running:
            args.append("--leave-running")
        await self.runsc.call([*args, sandbox_id], sandbox_id=sandbox_id, flags=meta.flags, timeout=120.0)

        def store() -> int:
            (dest / META).write_bytes(msgspec.json.encode(meta))
            return sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())

        return await anyio.to_thread.run_sync(store)

    async def pause(self, sandbox_id: str) -> None:
        meta = await self._meta(sandbox_id)
        paused = self._dir(sandbox_id) / PAUSED
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(paused, ignore_errors=True))
        # Without --leave-running the sandbox stops as its image is written: nothing
        # it does after the checkpoint is lost.
        try:
            await self.runsc.call(
                ["checkpoint", "--image-path", os.fspath(paused), "--compression=none", sandbox_id],
                sandbox_id=sandbox_id, flags=meta.flags, timeout=120.0,
            )
        except BaseException:
            # A half-written image must not pass for a paused sandbox (resume trusts it).
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(paused, ignore_errors=True))
            raise
        await self._delete(sandbox_id, meta.flags)

    async def resume(self, sandbox_id: str) -> None:
        meta = await self._meta(sandbox_id)
        d = self._dir(sandbox_id)
        paused = d / PAUSED
        if not await anyio.Path(paused).is_dir():
            if await self._status(meta) == "running":
                return
            raise SandboxNotRunning(f"sandbox {sandbox_id} is stopped and not paused", sandbox_id=sandbox_id)
        # The image is removed once a restore has read it, so its presence says the
        # sandbox is not running: restore without asking `runsc state` first (a process
        # start, 15-40 ms). Only a restore that fails asks, and clears what is left of
        # the container (a worker that died between checkpoint and delete, or between
        # restore and removing the image) before one more try.
        try:
            await self._restore_paused(sandbox_id, meta, d)
        except RuntimeFailure:
            self.reaper.reap_exited(sandbox_id)
            if await self.runsc.state(sandbox_id, flags=meta.flags) is None:
                raise
            await self._delete(sandbox_id, meta.flags)
            await self._restore_paused(sandbox_id, meta, d)
        # runsc has read the image by now.
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(paused, ignore_errors=True))

    async def _restore_paused(self, sandbox_id: str, meta: SandboxMeta, d: Path) -> None:
        def reopen() -> tuple[int, int]:
            stdio.make_fifos(d)
            return stdio.sandbox_ends(d)

        ends = await anyio.to_thread.run_sync(reopen)
        try:
            await self.runsc.launch(
                ["restore", "--detach", "--image-path", os.fspath(d / PAUSED), "--bundle", os.fspath(d), sandbox_id],
                sandbox_id=sandbox_id, flags=meta.flags, stdio=ends, log_path=d / "runsc.log",
            )
            await self.reaper.adopt(sandbox_id, d)
        finally:
            for fd in ends:
                os.close(fd)

    async def is_paused(self, sandbox_id: str) -> bool:
        try:
            meta = await self._meta(sandbox_id)
        except SandboxNotFound:
            return False
        if not await anyio.Path(self._dir(sandbox_id), PAUSED).is_dir():
            return False
        return await self._status(meta) != "running"


def _no_network(spec: SandboxSpec, sandbox_id: str) -> None:
    """This runtime's sandboxes have loopback only: a network is the docker runtime's."""
    if spec.network is not None and spec.network.mode != "none":
        raise UnsupportedRequest(
            f'network="{spec.network.mode}" needs the docker runtime; this worker runs runsc directly',
            sandbox_id=sandbox_id,
        )
