"""UNISOLATED sandboxes: plain host processes in a directory. For development machines only.

This runtime exists for machines without Docker or gVisor (a laptop, a bare GPU box),
where one wants to try the control plane and the SDK end to end. It isolates
NOTHING: commands run as the worker's own user on the host, see the host's files,
network and devices, and can kill the worker. Never point untrusted code at it. It is
never a default: a worker uses it only with ``runtime = "process"`` spelled out, and
says so in a WARNING at start and at every sandbox it creates. Workers running it
advertise ``kind = "unisolated"``.

A sandbox is a directory ``<process_root>/<prefix>/<worker>/<sandbox>/`` with a
``home/`` that is each command's working directory and ``HOME``. Commands run with
``anyio.run_process``-style subprocesses in their own session (a timeout kills the
whole process group); file paths are re-rooted under the sandbox directory
(``/x/y`` -> ``<sandbox>/x/y``), which keeps SDK file calls in their own tree but is
not a security boundary. Assigned GPUs are passed as ``NVIDIA_VISIBLE_DEVICES`` and
``CUDA_VISIBLE_DEVICES`` (UUIDs), which CUDA and ``nvidia-smi`` honour. CPU and
memory limits are recorded, not enforced.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import anyio
import msgspec

from hotbed.errors import (
    ExecTimeout,
    FileError,
    FileTooLarge,
    RuntimeFailure,
    SandboxNotFound,
    UnsupportedRequest,
)
from hotbed.protocol import ExecResult, ExecSpec, FileEntry, SandboxSpec
from workers.runtimes.base import AttachedStdio, Managed, Placed

log = logging.getLogger(__name__)

WARNING = (
    "the 'process' runtime does NOT isolate sandboxes: commands run as this worker's "
    "user on the host. Development machines only, never untrusted code."
)


class _Meta(msgspec.Struct, frozen=True, kw_only=True):
    sandbox_id: str
    worker_id: str
    prefix: str
    env: dict[str, str] = {}
    workdir: str | None = None
    gpu_uuids: list[str] = []


_meta_decoder = msgspec.json.Decoder(_Meta)


class ProcessRuntime:
    name = "process"
    kind = "unisolated"
    # Placement sends it only requests that opt out of isolation.
    isolated = False

    def __init__(self, *, root: str | os.PathLike[str] = "/var/lib/hotbed/process") -> None:
        self.root = Path(root)

    async def open(self) -> None:
        log.warning(WARNING)
        if os.geteuid() == 0:
            log.warning("the 'process' runtime is running as root: sandboxed commands are root on the host")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeFailure(f"cannot create process_root {self.root}: {exc}") from None

    async def aclose(self) -> None:
        pass

    # ---------------------------------------------------------------- layout

    def _dirs(self) -> list[Path]:
        return [p for p in self.root.glob("*/*/*") if (p / "meta.json").is_file()]

    def _find(self, sandbox_id: str) -> Path:
        for p in self.root.glob(f"*/*/{sandbox_id}"):
            if (p / "meta.json").is_file():
                return p
        raise SandboxNotFound(f"no sandbox {sandbox_id} on this worker", sandbox_id=sandbox_id)

    def _meta(self, d: Path) -> _Meta:
        return _meta_decoder.decode((d / "meta.json").read_bytes())

    def _locate(self, sandbox_id: str) -> tuple[Path, _Meta]:
        d = self._find(sandbox_id)
        return d, self._meta(d)

    @staticmethod
    def _inside(d: Path, path: str) -> Path:
        """A sandbox path re-rooted under the sandbox directory (not a security boundary)."""
        rel = Path(os.path.normpath("/" + path.lstrip("/"))).relative_to("/")
        return d / "fs" / rel

    # ---------------------------------------------------------------- lifecycle

    async def create(self, placed: Placed, spec: SandboxSpec) -> None:
        log.warning(
            "creating UNISOLATED sandbox (process runtime)",
            extra={"sandbox_id": placed.sandbox_id, "worker_id": placed.worker_id},
        )
        d = self.root / placed.prefix / placed.worker_id / placed.sandbox_id
        meta = _Meta(
            sandbox_id=placed.sandbox_id, worker_id=placed.worker_id, prefix=placed.prefix,
            env=dict(spec.env), workdir=spec.workdir, gpu_uuids=list(placed.gpu_uuids),
        )

        def make() -> None:
            (d / "fs" / "home").mkdir(parents=True, exist_ok=True)
            (d / "meta.json").write_bytes(msgspec.json.encode(meta))

        try:
            await anyio.to_thread.run_sync(make)
        except OSError as exc:
            raise RuntimeFailure(f"cannot create {d}: {exc}", sandbox_id=placed.sandbox_id) from None

    async def destroy(self, sandbox_id: str) -> None:
        def remove() -> None:
            try:
                d = self._find(sandbox_id)
            except SandboxNotFound:
                return
            pids = d / "pids"
            if pids.is_dir():
                for p in pids.iterdir():
                    try:
                        os.killpg(int(p.name), signal.SIGKILL)
                    except (ValueError, ProcessLookupError, PermissionError):
                        pass
            shutil.rmtree(d, ignore_errors=True)

        await anyio.to_thread.run_sync(remove)

    async def is_alive(self, sandbox_id: str) -> bool:
        try:
            await anyio.to_thread.run_sync(self._find, sandbox_id)
        except SandboxNotFound:
            return False
        return True

    async def attach(self, sandbox_id: str) -> AttachedStdio | None:
        """No guest agent: commands and files take this runtime's own methods."""
        return None

    async def list_managed(self) -> list[Managed]:
        def scan() -> list[Managed]:
            out = []
            for d in self._dirs():
                try:
                    m = self._meta(d)
                except (OSError, msgspec.DecodeError):
                    continue
                out.append(Managed(sandbox_id=m.sandbox_id, worker_id=m.worker_id, prefix=m.prefix, running=True))
            return out

        return await anyio.to_thread.run_sync(scan)

    # ---------------------------------------------------------------- commands

    async def exec(self, sandbox_id: str, spec: ExecSpec, *, default_user: str) -> ExecResult:
        d, meta = await anyio.to_thread.run_sync(self._locate, sandbox_id)
        if spec.argv:
            argv = list(spec.argv)
        elif spec.shell is not None:
            argv = ["/bin/sh", "-c", spec.shell]
        else:
            raise FileError("exec needs argv or shell", sandbox_id=sandbox_id)
        home = d / "fs" / "home"
        where = spec.cwd or meta.workdir
        cwd = self._inside(d, where) if where else home
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "HOTBED_SANDBOX_ID": sandbox_id,
            "HOTBED_SANDBOX_ROOT": str(d / "fs"),
            **meta.env,
            **spec.env,
        }
        if meta.gpu_uuids:
            env["NVIDIA_VISIBLE_DEVICES"] = env["CUDA_VISIBLE_DEVICES"] = ",".join(meta.gpu_uuids)
        started = anyio.current_time()
        try:
            proc = await anyio.open_process(
                argv, cwd=cwd, env=env, start_new_session=True,
                stdin=subprocess.PIPE if spec.stdin is not None else subprocess.DEVNULL,
            )
        except OSError as exc:
            return ExecResult(exit_code=127, stderr=f"{argv[0]}: {exc.strerror}\n".encode())
        (d / "pids").mkdir(exist_ok=True)
        pidfile = d / "pids" / str(proc.pid)
        pidfile.touch()
        out, err = bytearray(), bytearray()
        dropped = 0

        async def pump(stream: anyio.abc.ByteReceiveStream | None, buf: bytearray) -> None:
            nonlocal dropped
            if stream is None:
                return
            async for chunk in stream:
                room = spec.max_output - len(buf)
                buf += chunk[: max(room, 0)]
                dropped += max(0, len(chunk) - max(room, 0))

        try:
            with anyio.move_on_after(spec.timeout) as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(pump, proc.stdout, out)
                    tg.start_soon(pump, proc.stderr, err)
                    if proc.stdin is not None:
                        await proc.stdin.send(spec.stdin or b"")
                        await proc.stdin.aclose()
                    await proc.wait()
            if scope.cancelled_caught:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                with anyio.CancelScope(shield=True):
                    await proc.wait()
                raise ExecTimeout(
                    f"command ran past its {spec.timeout:g}s timeout and was killed",
                    sandbox_id=sandbox_id,
                    detail={
                        "stdout": bytes(out[-4096:]).decode("utf-8", "replace"),
                        "stderr": bytes(err[-4096:]).decode("utf-8", "replace"),
                        "timeout": spec.timeout,
                    },
                )
        finally:
            with anyio.CancelScope(shield=True):
                await proc.aclose()
            pidfile.unlink(missing_ok=True)
        return ExecResult(
            exit_code=proc.returncode if proc.returncode is not None else -1,
            stdout=bytes(out), stderr=bytes(err), truncated=bool(dropped),
            duration_s=anyio.current_time() - started,
        )

    async def write_file(
        self, sandbox_id: str, path: str, data: bytes, *, mode: int, make_dirs: bool, user: str
    ) -> int:
        def write() -> int:
            target = self._inside(self._find(sandbox_id), path)
            if make_dirs:
                target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            target.chmod(mode)
            return len(data)

        try:
            return await anyio.to_thread.run_sync(write)
        except OSError as exc:
            raise FileError(f"{path}: {exc.strerror}", sandbox_id=sandbox_id, detail={"path": path}) from None

    async def read_file(self, sandbox_id: str, path: str, *, max_bytes: int, user: str) -> bytes:
        def read() -> bytes:
            target = self._inside(self._find(sandbox_id), path)
            if target.stat().st_size > max_bytes:
                raise FileTooLarge(f"{path} is over {max_bytes} bytes", sandbox_id=sandbox_id)
            return target.read_bytes()

        try:
            return await anyio.to_thread.run_sync(read)
        except OSError as exc:
            raise FileError(f"{path}: {exc.strerror}", sandbox_id=sandbox_id, detail={"path": path}) from None

    async def list_files(self, sandbox_id: str, path: str, *, user: str) -> list[FileEntry]:
        def ls() -> list[FileEntry]:
            base = self._inside(self._find(sandbox_id), path)
            out = []
            for p in sorted(base.iterdir()):
                st = p.lstat()
                out.append(FileEntry(
                    name=p.name, path=os.path.join(path, p.name), size=st.st_size,
                    is_dir=stat.S_ISDIR(st.st_mode), mode=stat.S_IMODE(st.st_mode), mtime=st.st_mtime,
                ))
            return out

        try:
            return await anyio.to_thread.run_sync(ls)
        except OSError as exc:
            raise FileError(f"{path}: {exc.strerror}", sandbox_id=sandbox_id, detail={"path": path}) from None

    # -- snapshots are a gVisor feature; host processes cannot be checkpointed.

    async def checkpoint(self, sandbox_id: str, dest: Path, *, leave_running: bool) -> int:
        raise UnsupportedRequest("the process runtime cannot snapshot", sandbox_id=sandbox_id)

    async def restore(self, placed: Placed, spec: SandboxSpec, src: Path) -> None:
        raise UnsupportedRequest("the process runtime cannot restore snapshots", sandbox_id=placed.sandbox_id)

    async def pause(self, sandbox_id: str) -> None:
        raise UnsupportedRequest("the process runtime cannot pause", sandbox_id=sandbox_id)

    async def resume(self, sandbox_id: str) -> None:
        raise UnsupportedRequest("the process runtime cannot resume", sandbox_id=sandbox_id)

    async def is_paused(self, sandbox_id: str) -> bool:
        return False
