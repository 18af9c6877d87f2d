"""A simulated runtime: no containers, for loading the control plane only.

Every sandbox is a few bytes of bookkeeping. Creating, restoring and running a command
take a modelled time (sleeps, so thousands overlap as real ones would on a fleet) and
each live sandbox counts a modelled amount of host memory. The defaults were measured
with the real gVisor runtime on the development machine (2 cores, dockerd 20.10 +
runsc; see bench/README.md); ``python -m bench scale`` prints the ones it used.

``kind = "simulated"``: workers running it say so in their WorkerInfo, and every
number measured on it is labelled "simulated runtime". It never stands in for a test
of real sandbox behaviour.

Commands: ``exit N`` (shell) exits N; ``sleep S`` sleeps S (capped by the exec
timeout, which raises ExecTimeout as the real runtime does); ``echo ...`` and
``cat PATH`` answer what a shell would; anything else exits 0 with empty output.
Files live in a dict per sandbox.
"""

from __future__ import annotations

import random
import shlex
import time
from pathlib import Path

import anyio
import msgspec

from hotbed.errors import ExecTimeout, FileError, SandboxNotFound, SandboxNotRunning
from hotbed.protocol import ExecResult, ExecSpec, FileEntry, SandboxSpec
from workers.runtimes.base import AttachedStdio, Managed, Placed


class SimParams(msgspec.Struct, frozen=True, kw_only=True):
    """Modelled costs, seconds and MiB. Defaults: the real runsc runtime on this host."""

    # `docker run` of a runsc container with networking off, until exec works.
    create_s: float = 0.40
    # Restoring a gVisor checkpoint into a new container (`runsc restore`).
    restore_s: float = 0.20
    # Checkpointing a running sandbox (`runsc checkpoint`).
    checkpoint_s: float = 0.15
    # One `docker exec` round trip of a trivial command.
    exec_s: float = 0.09
    # Removing a container.
    destroy_s: float = 0.0
    # Host memory of one idle sandbox (sentry + gofer + shell).
    memory_mib: float = 17.0
    # Each modelled time is scaled by a uniform factor in [1 - jitter, 1 + jitter].
    jitter: float = 0.2
    # Extra seconds a "warm" start (a pooled sandbox handed over) costs on the worker.
    warm_s: float = 0.0

    def scaled(self, factor: float) -> SimParams:
        """The same model with every latency multiplied by ``factor`` (0: instant)."""
        return msgspec.structs.replace(
            self,
            create_s=self.create_s * factor,
            restore_s=self.restore_s * factor,
            checkpoint_s=self.checkpoint_s * factor,
            exec_s=self.exec_s * factor,
            destroy_s=self.destroy_s * factor,
            warm_s=self.warm_s * factor,
        )


# Snapshot markers read or written by this process, by path: a snapshot is immutable
# once taken, so a restore (a pool refill: hundreds a second under load) costs no file
# read and no thread hop after the first from that snapshot.
_MARKERS: dict[str, dict[str, bytes]] = {}


class _SimSandbox:
    __slots__ = ("files", "paused", "placed")

    def __init__(self, placed: Placed) -> None:
        self.placed = placed
        self.files: dict[str, bytes] | None = None
        self.paused = False


class SimRuntime:
    name = "sim"
    kind = "simulated"
    # Nothing runs, but the worker must not pass for one that isolates real code.
    isolated = False

    def __init__(self, params: SimParams | None = None, *, seed: int | None = None) -> None:
        self.params = params or SimParams()
        self._rng = random.Random(seed)
        self._boxes: dict[str, _SimSandbox] = {}
        self.created = 0
        self.execs = 0

    # ---------------------------------------------------------------- modelling

    def _delay(self, base: float) -> float:
        if base <= 0:
            return 0.0
        j = self.params.jitter
        return base * (1.0 + j * (2.0 * self._rng.random() - 1.0)) if j else base

    async def _wait(self, base: float) -> None:
        delay = self._delay(base)
        if delay > 0:
            await anyio.sleep(delay)

    def statistics(self) -> dict[str, float]:
        """Live sandboxes and the host memory they would take on a real node."""
        return {
            "sandboxes": len(self._boxes),
            "memory_mib": len(self._boxes) * self.params.memory_mib,
            "created": self.created,
            "execs": self.execs,
        }

    def _box(self, sandbox_id: str) -> _SimSandbox:
        box = self._boxes.get(sandbox_id)
        if box is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id} on this node", sandbox_id=sandbox_id)
        return box

    def _running(self, sandbox_id: str) -> _SimSandbox:
        box = self._box(sandbox_id)
        if box.paused:
            raise SandboxNotRunning(f"sandbox {sandbox_id} is paused", sandbox_id=sandbox_id)
        return box

    # ------------------------------------------------------------------ Runtime

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        self._boxes.clear()

    async def create(self, placed: Placed, spec: SandboxSpec) -> None:
        await self._wait(self.params.create_s)
        self._boxes[placed.sandbox_id] = _SimSandbox(placed)
        self.created += 1

    async def checkpoint(self, sandbox_id: str, dest: Path, *, leave_running: bool) -> int:
        """A snapshot is a marker file holding the files dict (the model has no memory)."""
        box = self._box(sandbox_id)
        await self._wait(self.params.checkpoint_s)
        data = msgspec.msgpack.encode(box.files or {})
        await anyio.Path(dest).mkdir(parents=True, exist_ok=True)
        await anyio.Path(dest, "sim-snapshot").write_bytes(data)
        _MARKERS[str(Path(dest, "sim-snapshot"))] = dict(box.files or {})
        if not leave_running:
            self._boxes.pop(sandbox_id, None)
        return len(data)

    async def restore(self, placed: Placed, spec: SandboxSpec, src: Path) -> None:
        """A start from a memory snapshot: same bookkeeping, the restore's time."""
        await self._wait(self.params.restore_s)
        box = _SimSandbox(placed)
        key = str(Path(src, "sim-snapshot"))
        files = _MARKERS.get(key)
        if files is None:
            marker = anyio.Path(key)
            if await marker.exists():
                files = _MARKERS[key] = msgspec.msgpack.decode(await marker.read_bytes(), type=dict[str, bytes])
        box.files = dict(files) if files else None
        self._boxes[placed.sandbox_id] = box
        self.created += 1

    async def pause(self, sandbox_id: str) -> None:
        box = self._box(sandbox_id)
        await self._wait(self.params.checkpoint_s)
        box.paused = True

    async def resume(self, sandbox_id: str) -> None:
        box = self._box(sandbox_id)
        await self._wait(self.params.restore_s)
        box.paused = False

    async def is_paused(self, sandbox_id: str) -> bool:
        box = self._boxes.get(sandbox_id)
        return box is not None and box.paused

    async def exec(self, sandbox_id: str, spec: ExecSpec, *, default_user: str) -> ExecResult:
        box = self._running(sandbox_id)
        self.execs += 1
        started = time.monotonic()
        argv = spec.argv if spec.argv is not None else _split(spec.shell or "")
        code, out = 0, b""
        if argv and argv[0] == "exit" and len(argv) > 1 and argv[1].isdigit():
            code = int(argv[1])
        elif argv and argv[0] == "sleep" and len(argv) > 1:
            want = _float(argv[1])
            if want > spec.timeout:
                await anyio.sleep(spec.timeout)
                raise ExecTimeout(
                    f"command ran past its {spec.timeout:g}s timeout", sandbox_id=sandbox_id,
                    detail={"stdout": "", "stderr": ""},
                )
            await anyio.sleep(want)
        elif argv and argv[0] == "echo":
            out = (" ".join(argv[1:]) + "\n").encode()
        elif argv and argv[0] == "cat" and len(argv) > 1:
            data = (box.files or {}).get(argv[1])
            if data is None:
                code, out = 1, b""
            else:
                out = data
        await self._wait(self.params.exec_s)
        truncated = len(out) > spec.max_output
        return ExecResult(
            exit_code=code, stdout=out[: spec.max_output], truncated=truncated,
            duration_s=time.monotonic() - started,
        )

    async def write_file(
        self, sandbox_id: str, path: str, data: bytes, *, mode: int, make_dirs: bool, user: str
    ) -> int:
        box = self._running(sandbox_id)
        await self._wait(self.params.exec_s)
        if box.files is None:
            box.files = {}
        box.files[path] = bytes(data)
        return len(data)

    async def read_file(self, sandbox_id: str, path: str, *, max_bytes: int, user: str) -> bytes:
        box = self._running(sandbox_id)
        await self._wait(self.params.exec_s)
        data = (box.files or {}).get(path)
        if data is None:
            raise FileError(f"{path}: no such file", sandbox_id=sandbox_id)
        return data[:max_bytes]

    async def list_files(self, sandbox_id: str, path: str, *, user: str) -> list[FileEntry]:
        box = self._running(sandbox_id)
        await self._wait(self.params.exec_s)
        base = path.rstrip("/") + "/"
        return [
            FileEntry(name=p[len(base):], path=p, size=len(d), is_dir=False, mode=0o644)
            for p, d in sorted((box.files or {}).items())
            if p.startswith(base) and "/" not in p[len(base):]
        ]

    async def destroy(self, sandbox_id: str) -> None:
        if self._boxes.pop(sandbox_id, None) is not None:
            await self._wait(self.params.destroy_s)

    async def is_alive(self, sandbox_id: str) -> bool:
        return sandbox_id in self._boxes

    async def attach(self, sandbox_id: str) -> AttachedStdio | None:
        """No guest agent is modelled: commands take :meth:`exec` and the file methods."""
        return None

    async def list_managed(self) -> list[Managed]:
        return [
            Managed(
                sandbox_id=sid, worker_id=b.placed.worker_id, prefix=b.placed.prefix,
                running=not b.paused,
            )
            for sid, b in self._boxes.items()
        ]


def _split(shell: str) -> list[str]:
    try:
        return shlex.split(shell)
    except ValueError:
        return shell.split()


def _float(text: str) -> float:
    try:
        return max(0.0, float(text))
    except ValueError:
        return 0.0
