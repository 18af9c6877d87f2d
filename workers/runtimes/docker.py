"""Sandboxes as Docker containers under gVisor (``runsc``), driven through aiodocker.

Each sandbox is one container: labelled as hotbed's, networking off (``NetworkDisabled``
also skips dockerd's network hook, ~1.6x creation throughput here), CPU / memory /
pids limits from the request, a non-root user by default, a writable root filesystem.
Its main process is the guest agent where the image has python3 (commands are messages
on its attached stdin/stdout, :mod:`workers.execution`), else an idle shell, and
commands run as ``docker exec`` (this module's ``exec``). Snapshots: see "snapshots".

Exec timeouts: under runsc an exec'd process leads its own process group, so the
command is wrapped to report its pid first (on stderr, stripped before returning) and
a timeout kills the whole group with ``kill -s KILL -PID``.

Files go through exec too (``cat`` in, ``cat`` out, ``stat`` for listings): with
gVisor's overlay the container's writes never reach the host's layer, so Docker's
archive API would not see them. The images need ``/bin/sh``, ``cat`` and ``stat``
(busybox or coreutils).

Every Docker call sits under a deadline (aiodocker has none of its own).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiodocker
import anyio
from aiodocker.exceptions import DockerError

from hotbed.errors import (
    ExecTimeout,
    FileError,
    FileTooLarge,
    HotbedError,
    ImageNotFound,
    RuntimeFailure,
    SandboxNotFound,
    SandboxNotRunning,
)
from hotbed.protocol import SPAWN_FIFO, ExecResult, ExecSpec, FileEntry, SandboxSpec
from workers.guest.channel import guest_command
from workers.runtimes.base import (
    LABEL_MANAGED,
    LABEL_PREFIX,
    LABEL_SANDBOX,
    LABEL_WORKER,
    Managed,
    Placed,
)

log = logging.getLogger(__name__)

API_TIMEOUT_S = 30.0
PID_MARK = b"HOTBEDPID "
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
# Checkpoint name a paused sandbox's state is kept under, in its container's folder.
PAUSED_CHECKPOINT = "hotbed-paused"
# Where the worker marks a container for restore by hotbed's runsc wrapper
# (deploy/runsc/runsc-hotbed reads the same path): <container id> -> image directory.
RESTORE_MARKS = Path("/run/hotbed/restore")
WRAPPER_NAME = "runsc-hotbed"
WRAP = 'echo "HOTBEDPID $$" >&2; exec "$@"'
SHELL_WRAP = 'echo "HOTBEDPID $$" >&2; exec /bin/sh -c "$1"'


def container_name(sandbox_id: str) -> str:
    return f"hotbed-{sandbox_id}"


class _Output:
    """Collects one stream up to a cap, counting what it drops."""

    __slots__ = ("buf", "cap", "dropped")

    def __init__(self, cap: int) -> None:
        self.buf = bytearray()
        self.cap = cap
        self.dropped = 0

    def feed(self, data: bytes) -> None:
        room = self.cap - len(self.buf)
        if room > 0:
            self.buf += data[:room]
        self.dropped += max(0, len(data) - max(room, 0))


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
    ) -> None:
        self.oci_runtime = oci_runtime
        self.cgroup_parent = cgroup_parent
        # GPU sandboxes under gVisor need runsc's --nvproxy: a second runtime entry in
        # daemon.json (scripts/host-setup.sh registers it on hosts with an NVIDIA driver).
        self.gpu_oci_runtime = gpu_oci_runtime
        self._runtimes: set[str] = set()
        # dockerd runtimes that are hotbed's runsc wrapper: their restores skip containerd.
        self._wrapped: set[str] = set()
        self.docker_url = docker_url
        self.extra_labels = dict(extra_labels or {})
        self._docker: aiodocker.Docker | None = None
        self._root = Path("/var/lib/docker")

    @property
    def docker(self) -> aiodocker.Docker:
        if self._docker is None:
            raise RuntimeFailure("docker runtime is not open")
        return self._docker

    async def open(self) -> None:
        self._docker = aiodocker.Docker(url=self.docker_url)
        with anyio.fail_after(API_TIMEOUT_S):
            info = await self._docker.system.info()
        self._root = Path(info.get("DockerRootDir") or "/var/lib/docker")
        if not self.cgroup_parent:
            # Sandboxes share one parent cgroup, which the host weighs below the
            # control plane: nice alone does not reach across cgroups.
            systemd = info.get("CgroupDriver") == "systemd"
            self.cgroup_parent = "hotbed.slice" if systemd else "/hotbed"
        runtimes = info.get("Runtimes") or {}
        self._runtimes = set(runtimes)
        if self.oci_runtime not in runtimes:
            await self.aclose()
            raise RuntimeFailure(
                f"dockerd has no runtime {self.oci_runtime!r}; run scripts/host-setup.sh"
            )
        self._wrapped = {
            name for name, r in runtimes.items()
            if Path(str((r or {}).get("path") or "")).name == WRAPPER_NAME
        }
        if self._wrapped:
            await anyio.to_thread.run_sync(_prepare_marks)

    @property
    def direct_restore(self) -> bool:
        """Whether this worker's (non-GPU) sandboxes restore through the wrapper."""
        return self.oci_runtime in self._wrapped

    async def aclose(self) -> None:
        if self._docker is not None:
            docker, self._docker = self._docker, None
            with anyio.CancelScope(shield=True):
                await docker.close()

    # ---------------------------------------------------------------- lifecycle

    async def create(self, placed: Placed, spec: SandboxSpec) -> None:
        sid = placed.sandbox_id
        try:
            with anyio.fail_after(API_TIMEOUT_S):
                image = await self.docker.images.inspect(spec.image)
        except DockerError as exc:
            if exc.status == 404:
                raise ImageNotFound(
                    f"image {spec.image!r} not found on worker {placed.worker_id} "
                    "(hotbed never pulls; build it with `hotbed image build`)",
                    sandbox_id=sid,
                    worker_id=placed.worker_id,
                ) from None
            raise self._translate(exc, sid) from None
        config = self._container_config(placed, spec, image["Id"])
        async with self._removed_on_failure(sid, "start"):
            with anyio.fail_after(API_TIMEOUT_S):
                container = await self.docker.containers.create(config, name=container_name(sid))
            with anyio.fail_after(API_TIMEOUT_S):
                await container.start()

    @asynccontextmanager
    async def _removed_on_failure(self, sid: str, what: str) -> AsyncIterator[None]:
        """A sandbox that fails (or is cancelled) half-made leaves no container behind."""
        try:
            yield
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self.destroy(sid)
            if isinstance(exc, DockerError):
                raise self._translate(exc, sid) from None
            if isinstance(exc, TimeoutError):
                raise RuntimeFailure(f"docker did not {what} {sid} in time", sandbox_id=sid) from None
            raise

    def _container_config(
        self, placed: Placed, spec: SandboxSpec, image_id: str, *, cmd: list[str] | None = None
    ) -> dict[str, Any]:
        res = spec.resources
        labels = {
            LABEL_MANAGED: "1",
            LABEL_SANDBOX: placed.sandbox_id,
            LABEL_WORKER: placed.worker_id,
            LABEL_PREFIX: placed.prefix,
            **self.extra_labels,
        }
        env = [f"{k}={v}" for k, v in spec.env.items()]
        host_config: dict[str, Any] = {
            "Runtime": self.oci_runtime,
            "CgroupParent": self.cgroup_parent,
            "NetworkMode": "none",
            "NanoCpus": int(res.cpu * 1e9),
            "Memory": res.memory_mb << 20,
            "MemorySwap": res.memory_mb << 20,
            "PidsLimit": res.pids,
            "SecurityOpt": ["no-new-privileges"],
            # The guest agent's channel is the container's stdout: keep it out of logs.
            "LogConfig": {"Type": "none", "Config": {}},
        }
        if placed.gpu_uuids:
            if self.oci_runtime == "runsc":
                if self.gpu_oci_runtime not in self._runtimes:
                    raise RuntimeFailure(
                        f"GPU sandbox needs dockerd runtime {self.gpu_oci_runtime!r} (runsc "
                        "--nvproxy); run scripts/host-setup.sh on this GPU node",
                        sandbox_id=placed.sandbox_id, worker_id=placed.worker_id,
                    )
                host_config["Runtime"] = self.gpu_oci_runtime
            host_config["DeviceRequests"] = [
                {"Driver": "nvidia", "DeviceIDs": list(placed.gpu_uuids), "Capabilities": [["gpu"]]}
            ]
            env.append("NVIDIA_VISIBLE_DEVICES=" + ",".join(placed.gpu_uuids))
        config: dict[str, Any] = {
            "Image": image_id,
            # Issue 5: PID 1 is the guest agent where the image has python3 (else
            # IDLE_CMD); the worker talks to it over the attached stdin/stdout.
            "Cmd": cmd or guest_command(IDLE_CMD),
            "OpenStdin": True,
            "StdinOnce": False,
            "User": spec.user or "",
            "Env": env,
            "Labels": labels,
            "NetworkDisabled": True,
            "HostConfig": host_config,
        }
        if spec.workdir:
            config["WorkingDir"] = spec.workdir
        return config

    async def destroy(self, sandbox_id: str) -> None:
        try:
            with anyio.fail_after(API_TIMEOUT_S):
                await self.docker.containers.container(container_name(sandbox_id)).delete(
                    force=True, v=True
                )
        except DockerError as exc:
            if exc.status not in (404, 409):
                raise self._translate(exc, sandbox_id) from None

    async def is_alive(self, sandbox_id: str) -> bool:
        try:
            with anyio.fail_after(API_TIMEOUT_S):
                info = await self.docker.containers.container(container_name(sandbox_id)).show()
        except DockerError as exc:
            if exc.status == 404:
                return False
            raise self._translate(exc, sandbox_id) from None
        return bool(info["State"]["Running"])

    async def list_managed(self) -> list[Managed]:
        with anyio.fail_after(API_TIMEOUT_S):
            found = await self.docker.containers.list(
                all=True, filters={"label": [f"{LABEL_MANAGED}=1"]}
            )
        out = []
        for c in found:
            labels = c["Labels"] or {}
            out.append(
                Managed(
                    sandbox_id=labels.get(LABEL_SANDBOX, ""),
                    worker_id=labels.get(LABEL_WORKER, ""),
                    prefix=labels.get(LABEL_PREFIX, ""),
                    running=c["State"] == "running",
                )
            )
        return out

    # -------------------------------------------------------------------- exec

    async def exec(self, sandbox_id: str, spec: ExecSpec, *, default_user: str) -> ExecResult:
        if spec.shell is not None:
            argv = ["/bin/sh", "-c", SHELL_WRAP, "sh", spec.shell]
        elif spec.argv:
            argv = ["/bin/sh", "-c", WRAP, "sh", *spec.argv]
        else:
            from hotbed.errors import InvalidRequest

            raise InvalidRequest("exec needs argv or shell", sandbox_id=sandbox_id)
        return await self._run(
            sandbox_id,
            argv,
            user=spec.user or default_user,
            env=spec.env,
            cwd=spec.cwd,
            stdin=spec.stdin,
            timeout=spec.timeout,
            max_output=spec.max_output,
        )

    async def _run(
        self,
        sandbox_id: str,
        argv: Sequence[str],
        *,
        user: str,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout: float,
        max_output: int,
    ) -> ExecResult:
        container = self.docker.containers.container(container_name(sandbox_id))
        started = anyio.current_time()
        try:
            with anyio.fail_after(API_TIMEOUT_S):
                exe = await container.exec(
                    list(argv),
                    stdout=True,
                    stderr=True,
                    stdin=stdin is not None,
                    user=user,
                    environment={k: v for k, v in (env or {}).items()} or None,
                    workdir=cwd,
                )
        except DockerError as exc:
            raise self._translate(exc, sandbox_id) from None
        except TimeoutError:
            raise RuntimeFailure(
                f"docker did not create the exec within {API_TIMEOUT_S:g}s", sandbox_id=sandbox_id
            ) from None
        out, err = _Output(max_output), _Output(max_output)
        pid: int | None = None
        pending_err = bytearray()
        timed_out = False
        stream = exe.start(detach=False)
        try:
            with anyio.move_on_after(timeout) as scope:
                async with stream:
                    if stdin is not None:
                        await stream.write_in(stdin)
                        _write_eof(stream)
                    while True:
                        msg = await stream.read_out()
                        if msg is None:
                            break
                        if msg.stream == 1:
                            out.feed(msg.data)
                        elif pid is None:
                            pending_err += msg.data
                            nl = pending_err.find(b"\n")
                            if nl >= 0 and pending_err.startswith(PID_MARK):
                                pid = int(pending_err[len(PID_MARK) : nl])
                                err.feed(bytes(pending_err[nl + 1 :]))
                            elif nl >= 0 or len(pending_err) > 64:
                                pid = -1
                                err.feed(bytes(pending_err))
                        else:
                            err.feed(msg.data)
            timed_out = scope.cancelled_caught
        except DockerError as exc:
            raise self._translate(exc, sandbox_id) from None
        if timed_out:
            with anyio.CancelScope(shield=True):
                await self._kill_group(sandbox_id, pid, user)
            raise ExecTimeout(
                f"command ran past its {timeout:g}s timeout and was killed",
                sandbox_id=sandbox_id,
                detail={
                    "stdout": bytes(out.buf[-4096:]).decode("utf-8", "replace"),
                    "stderr": bytes(err.buf[-4096:]).decode("utf-8", "replace"),
                    "timeout": timeout,
                },
            )
        exit_code = await self._exit_code(exe, sandbox_id)
        return ExecResult(
            exit_code=exit_code,
            stdout=bytes(out.buf),
            stderr=bytes(err.buf),
            truncated=bool(out.dropped or err.dropped),
            duration_s=anyio.current_time() - started,
        )

    async def _exit_code(self, exe: Any, sandbox_id: str) -> int:
        # The output stream ends a moment before dockerd records the exit code.
        for _ in range(200):
            try:
                with anyio.fail_after(API_TIMEOUT_S):
                    info = await exe.inspect()
            except TimeoutError:
                raise RuntimeFailure(
                    f"docker did not report the exec's exit within {API_TIMEOUT_S:g}s",
                    sandbox_id=sandbox_id,
                ) from None
            if not info.get("Running") and info.get("ExitCode") is not None:
                return int(info["ExitCode"])
            await anyio.sleep(0.005)
        if not await self.is_alive(sandbox_id):
            raise SandboxNotRunning(
                f"sandbox {sandbox_id} died during the command (memory limit?)",
                sandbox_id=sandbox_id,
            )
        raise RuntimeFailure("exec finished without an exit code", sandbox_id=sandbox_id)

    async def _kill_group(self, sandbox_id: str, pid: int | None, user: str) -> None:
        # Killed as the command's own user: under gVisor an exec'd root has no
        # CAP_KILL over a non-root container's processes.
        if not pid or pid <= 1:
            return
        try:
            await self._run(
                sandbox_id,
                ["/bin/sh", "-c", f"kill -s KILL -{pid} 2>/dev/null; kill -s KILL {pid} 2>/dev/null; true"],
                user=user,
                timeout=10.0,
                max_output=4096,
            )
        except HotbedError as exc:
            log.warning("could not kill timed-out command: %s", exc, extra={"sandbox_id": sandbox_id})

    # ------------------------------------------------------------------- files

    async def write_file(
        self, sandbox_id: str, path: str, data: bytes, *, mode: int, make_dirs: bool, user: str
    ) -> int:
        q = shlex.quote(path)
        mk = f'mkdir -p "$(dirname {q})" && ' if make_dirs else ""
        script = f"{mk}cat > {q} && chmod {mode:o} {q}"
        res = await self._run(
            sandbox_id, ["/bin/sh", "-c", script], user=user, stdin=data, timeout=60.0,
            max_output=4096,
        )
        if res.exit_code != 0:
            raise FileError(
                f"cannot write {path}: {res.stderr.decode('utf-8', 'replace').strip()}",
                sandbox_id=sandbox_id,
            )
        return len(data)

    async def read_file(self, sandbox_id: str, path: str, *, max_bytes: int, user: str) -> bytes:
        q = shlex.quote(path)
        script = (
            f"if [ -d {q} ]; then echo 'is a directory' >&2; exit 3; fi; "
            f"if [ ! -e {q} ]; then echo 'no such file' >&2; exit 2; fi; cat {q}"
        )
        res = await self._run(
            sandbox_id, ["/bin/sh", "-c", script], user=user, timeout=60.0, max_output=max_bytes
        )
        if res.exit_code != 0:
            raise FileError(
                f"cannot read {path}: {res.stderr.decode('utf-8', 'replace').strip()}",
                sandbox_id=sandbox_id,
                detail={"path": path},
            )
        if res.truncated:
            raise FileTooLarge(
                f"{path} is larger than {max_bytes} bytes; read it in parts",
                sandbox_id=sandbox_id,
            )
        return res.stdout

    async def list_files(self, sandbox_id: str, path: str, *, user: str) -> list[FileEntry]:
        q = shlex.quote(path)
        script = (
            f"cd {q} || exit 2; for f in * .[!.]* ..?*; do "
            '[ -e "$f" ] || [ -L "$f" ] || continue; stat -c "%s|%f|%Y|%n" -- "$f"; done'
        )
        res = await self._run(
            sandbox_id, ["/bin/sh", "-c", script], user=user, timeout=60.0, max_output=8 << 20
        )
        if res.exit_code != 0:
            raise FileError(
                f"cannot list {path}: {res.stderr.decode('utf-8', 'replace').strip()}",
                sandbox_id=sandbox_id,
            )
        entries = []
        base = path.rstrip("/") or "/"
        for line in res.stdout.decode("utf-8", "replace").splitlines():
            parts = line.split("|", 3)
            if len(parts) != 4:
                continue
            size, raw_mode, mtime, name = parts
            mode = int(raw_mode, 16)
            entries.append(
                FileEntry(
                    name=name,
                    path=f"{base}/{name}" if base != "/" else f"/{name}",
                    size=int(size),
                    is_dir=(mode & 0o170000) == 0o040000,
                    mode=mode & 0o7777,
                    mtime=float(mtime),
                )
            )
        return sorted(entries, key=lambda e: e.name)

    # --------------------------------------------------------------- snapshots
    # dockerd drives ``runsc checkpoint``/``restore`` (Engine API, experimental mode). A
    # snapshot directory holds ``checkpoint/`` (runsc's image: memory, processes and the
    # sandbox's in-memory overlay) and ``container.json`` (what restore re-creates).
    # Restores take one of two roads:
    # * when the container's runtime is hotbed's runsc wrapper, the worker marks the
    #   new container (RESTORE_MARKS/<id> = the image directory) and starts it plainly;
    #   the wrapper turns runsc's ``create`` into ``runsc restore`` from that directory. No
    #   copy, and containerd never imports the image (0.28 s instead of 0.72 s here).
    # * with runsc alone, dockerd only restores from
    #   ``<root>/containers/<id>/checkpoints/<name>``: the files are hard-linked there,
    #   plus a unique file, as containerd refuses two parallel restores of
    #   byte-identical checkpoints ("content ... already exists").

    async def _post(self, path: str, *, params: dict[str, Any] | None = None,
                    body: dict[str, Any] | None = None, sandbox_id: str) -> None:
        try:
            with anyio.fail_after(API_TIMEOUT_S):
                async with self.docker._query(
                    path, method="POST", params=params,
                    data=json.dumps(body) if body is not None else None,
                ) as resp:
                    await resp.read()
        except DockerError as exc:
            raise self._translate(exc, sandbox_id) from None
        except TimeoutError:
            raise RuntimeFailure(f"docker: {path} timed out", sandbox_id=sandbox_id) from None

    async def _checkpoint_post(self, container_id: str, name: str, *, exit: bool, sandbox_id: str) -> None:
        """Checkpoint through dockerd, retrying containerd's "content ... already exists".

        A second checkpoint of one container within about two seconds of the first
        collides with the first one's blobs until containerd's garbage collector has run.
        """
        delay = 0.25
        for attempt in range(8):
            try:
                await self._post(
                    f"containers/{container_id}/checkpoints",
                    body={"CheckpointID": name, "Exit": exit},
                    sandbox_id=sandbox_id,
                )
                return
            except RuntimeFailure as exc:
                if "already exists" not in exc.message or attempt == 7:
                    raise
                await anyio.sleep(delay)
                delay = min(delay * 1.5, 1.5)

    async def _show(self, sandbox_id: str) -> dict[str, Any]:
        try:
            with anyio.fail_after(API_TIMEOUT_S):
                info: dict[str, Any] = await self.docker.containers.container(
                    container_name(sandbox_id)
                ).show()
        except DockerError as exc:
            raise self._translate(exc, sandbox_id) from None
        return info

    async def checkpoint(self, sandbox_id: str, dest: Path, *, leave_running: bool) -> int:
        info = await self._show(sandbox_id)
        if not info["State"]["Running"]:
            raise SandboxNotRunning(f"sandbox {sandbox_id} is not running", sandbox_id=sandbox_id)
        name = f"ck-{secrets.token_hex(6)}"
        await self._checkpoint_post(info["Id"], name, exit=not leave_running, sandbox_id=sandbox_id)
        made = self._root / "containers" / info["Id"] / "checkpoints" / name
        cfg = info["Config"]
        meta = {
            "Image": info["Image"], "Cmd": cfg.get("Cmd"), "User": cfg.get("User") or "",
            "Env": cfg.get("Env") or [], "WorkingDir": cfg.get("WorkingDir") or "",
        }

        def store() -> int:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.move(str(made), str(dest / "checkpoint"))
            (dest / "container.json").write_text(json.dumps(meta))
            return sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())

        return await anyio.to_thread.run_sync(store)

    async def restore(self, placed: Placed, spec: SandboxSpec, src: Path) -> None:
        sid = placed.sandbox_id
        try:
            meta = json.loads((src / "container.json").read_text())
        except (OSError, ValueError) as exc:
            raise RuntimeFailure(f"snapshot {src} unreadable: {exc}", sandbox_id=sid) from None
        config = self._container_config(placed, spec, meta["Image"], cmd=meta["Cmd"])
        config["User"] = meta["User"]
        config["Env"] = list(meta["Env"]) + [e for e in config["Env"] if e.startswith("NVIDIA_")]
        if meta["WorkingDir"]:
            config["WorkingDir"] = meta["WorkingDir"]
        else:
            config.pop("WorkingDir", None)
        async with self._removed_on_failure(sid, "restore"):
            with anyio.fail_after(API_TIMEOUT_S):
                container = await self.docker.containers.create(config, name=container_name(sid))
            if config["HostConfig"]["Runtime"] in self._wrapped:  # not GPU's runsc-nvproxy
                await self._start_restoring(container.id, src / "checkpoint", sandbox_id=sid)
                return
            target = self._root / "containers" / container.id / "checkpoints" / "restore"

            def link() -> None:
                target.mkdir(parents=True)
                for f in (src / "checkpoint").iterdir():
                    try:
                        os.link(f, target / f.name)
                    except OSError:
                        shutil.copy2(f, target / f.name)
                (target / "hotbed-restore-id").write_text(secrets.token_hex(16))

            await anyio.to_thread.run_sync(link)
            await self._post(
                f"containers/{container.id}/start", params={"checkpoint": "restore"}, sandbox_id=sid
            )

    async def pause(self, sandbox_id: str) -> None:
        info = await self._show(sandbox_id)
        # Checkpoint leaving it running, then stop it: a checkpoint with Exit=true that
        # trips containerd's "already exists" has already stopped the container, and a
        # retry would find nothing to checkpoint. What the sandbox does in the few
        # milliseconds between the two steps is not kept, as if it had paused earlier.
        await self._checkpoint_post(info["Id"], PAUSED_CHECKPOINT, exit=False, sandbox_id=sandbox_id)
        container = self.docker.containers.container(info["Id"])
        try:
            with anyio.fail_after(API_TIMEOUT_S):
                await container.kill(signal="SIGKILL")
                await container.wait()
        except DockerError as exc:
            raise self._translate(exc, sandbox_id) from None

    async def resume(self, sandbox_id: str) -> None:
        info = await self._show(sandbox_id)
        if info["State"]["Running"]:
            return
        ck = self._root / "containers" / info["Id"] / "checkpoints" / PAUSED_CHECKPOINT
        if info["HostConfig"].get("Runtime") in self._wrapped:
            await self._start_restoring(info["Id"], ck, sandbox_id=sandbox_id)
        else:
            await anyio.to_thread.run_sync(
                lambda: (ck / "hotbed-restore-id").write_text(secrets.token_hex(16))
            )
            await self._post(
                f"containers/{info['Id']}/start", params={"checkpoint": PAUSED_CHECKPOINT},
                sandbox_id=sandbox_id,
            )
        # runsc has the image open by now: removing the files frees them when it is done.
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(ck, ignore_errors=True))

    async def _start_restoring(self, container_id: str, image: Path, *, sandbox_id: str) -> None:
        """Start ``container_id`` as a restore of ``image`` through the runsc wrapper."""
        mark = RESTORE_MARKS / container_id

        def put() -> None:
            RESTORE_MARKS.mkdir(parents=True, exist_ok=True)
            mark.write_text(str(image))

        def clear() -> None:
            for m in (mark, mark.with_name(mark.name + ".restored")):
                m.unlink(missing_ok=True)

        await anyio.to_thread.run_sync(put)
        try:
            await self._post(f"containers/{container_id}/start", sandbox_id=sandbox_id)
        except BaseException:
            # A failed restore leaves its mark: the next plain start must not restore.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(clear)
            raise

    async def is_paused(self, sandbox_id: str) -> bool:
        try:
            info = await self._show(sandbox_id)
        except SandboxNotFound:
            return False
        ck = self._root / "containers" / info["Id"] / "checkpoints" / PAUSED_CHECKPOINT
        return not info["State"]["Running"] and ck.is_dir()

    # ------------------------------------------------------------------ errors

    def _translate(self, exc: DockerError, sandbox_id: str) -> HotbedError:
        msg = exc.message if isinstance(exc.message, str) else str(exc.message)
        if exc.status == 404:
            return SandboxNotFound(f"sandbox {sandbox_id} has no container", sandbox_id=sandbox_id)
        if exc.status == 409:
            return SandboxNotRunning(f"sandbox {sandbox_id}: {msg}", sandbox_id=sandbox_id)
        return RuntimeFailure(f"docker: {msg} (HTTP {exc.status})", sandbox_id=sandbox_id)


def _prepare_marks() -> None:
    """Make the restore-mark folder; drop marks a worker that died mid-restore left."""
    RESTORE_MARKS.mkdir(parents=True, exist_ok=True)
    old = time.time() - 600
    for mark in RESTORE_MARKS.iterdir():
        try:
            if mark.stat().st_mtime < old:
                mark.unlink()
        except OSError:
            pass


def _write_eof(stream: Any) -> None:
    """Half-close the exec's stdin so ``cat`` sees EOF while we keep reading its output.

    aiodocker's Stream.close() would also drop the response; this reaches the transport.
    """
    resp = getattr(stream, "_resp", None)
    transport = resp.connection.transport if resp is not None and resp.connection else None
    if transport is not None and transport.can_write_eof():
        transport.write_eof()

