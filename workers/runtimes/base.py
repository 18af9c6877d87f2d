"""The runtime interface a worker drives. Implementations: ``docker`` (gVisor via dockerd,
the default), ``runsc`` (gVisor driven directly on OCI bundles, no dockerd), ``sim`` (simulated, for control-plane load tests only) and ``process``
(UNISOLATED host processes, for development machines without Docker; never a default).

A runtime knows containers, not Redis: the worker agent owns records, capacity and
replies. Every method raises :mod:`hotbed.errors` types (runtime errors are translated
at this boundary) and must be safe to cancel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import anyio.abc
import msgspec

from hotbed.protocol import ExecResult, ExecSpec, FileEntry, SandboxSpec
from hotbed.records import HeldImages

# Labels put on every container hotbed makes, so a restarted worker can find its own.
LABEL_MANAGED = "dev.hotbed.managed"
LABEL_SANDBOX = "dev.hotbed.sandbox"
LABEL_WORKER = "dev.hotbed.worker"
LABEL_PREFIX = "dev.hotbed.prefix"
# A sandbox's network mode, where it is not "none".
LABEL_NETWORK = "dev.hotbed.network"


class Placed(msgspec.Struct, frozen=True, kw_only=True):
    """What the agent tells a runtime about a sandbox beyond its spec."""

    sandbox_id: str
    worker_id: str
    prefix: str
    gpu_uuids: list[str] = []
    # Nobody runs commands in it yet (starting, or a pool's): it starts (and a pool's
    # idles) at a low CPU weight, so running sandboxes' commands win the CPU,
    # until :class:`CpuWeights` ``foreground`` gives it the normal weight.
    background: bool = False


class Managed(msgspec.Struct, frozen=True, kw_only=True):
    """A sandbox found on the node by :meth:`Runtime.list_managed`."""

    sandbox_id: str
    worker_id: str
    prefix: str
    running: bool
    # The runtime's own name for it, where it has one (docker: the container id).
    ref: str = ""


class AttachedStdio(Protocol):
    """A sandbox main process's stdin and stdout, attached: the guest agent's channel.

    Returned by :meth:`Runtime.attach`; the runtime hides how (dockerd's attach socket,
    a pipe to a local process). Reads are bounded by the runtime's own buffer.
    """

    async def read(self) -> bytes | None:
        """The next chunk of the main process's stdout; ``None`` once it is closed."""

    async def write(self, data: bytes) -> None:
        """Write to the main process's stdin."""

    def abort(self) -> None:
        """Drop the connection now, without waiting (a broken or hostile channel)."""


class Runtime(Protocol):
    name: str
    # "real" or "simulated": surfaced in WorkerInfo so simulated numbers are labelled.
    kind: str

    @property
    def isolated(self) -> bool:
        """Whether sandboxes are isolated from the host (gVisor); placement sends a
        worker whose runtime is not only the requests that opt out of isolation."""

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    async def create(self, placed: Placed, spec: SandboxSpec) -> None:
        """Boot the sandbox; return once commands can run in it."""

    async def exec(self, sandbox_id: str, spec: ExecSpec, *, default_user: str) -> ExecResult:
        """Run a command; raise ExecTimeout (with partial output in ``detail``) on timeout."""

    async def write_file(
        self, sandbox_id: str, path: str, data: bytes, *, mode: int, make_dirs: bool, user: str
    ) -> int: ...

    async def read_file(self, sandbox_id: str, path: str, *, max_bytes: int, user: str) -> bytes: ...

    async def list_files(self, sandbox_id: str, path: str, *, user: str) -> list[FileEntry]: ...

    async def destroy(self, sandbox_id: str) -> None:
        """Remove the sandbox and everything it holds; no error if it is already gone."""

    async def is_alive(self, sandbox_id: str) -> bool: ...

    async def attach(self, sandbox_id: str) -> AttachedStdio | None:
        """Attach to the main process's stdio (the guest channel); ``None`` where this
        runtime has no guest agent. Raises SandboxNotRunning if the sandbox is gone."""

    async def list_managed(self) -> list[Managed]: ...

    # -- memory snapshots. ``dest``/``src`` is a directory the runtime owns the
    # layout of; a snapshot must carry what restore needs to rebuild the sandbox
    # (image, user, env, working directory), so any worker holding it can restore it.

    async def checkpoint(self, sandbox_id: str, dest: Path, *, leave_running: bool) -> int:
        """Checkpoint processes, memory and filesystem into ``dest``; return its bytes."""

    async def restore(self, placed: Placed, spec: SandboxSpec, src: Path) -> None:
        """Make a new, independent sandbox from the snapshot in ``src`` (resources from
        ``spec``); return once commands can run in it."""

    async def pause(self, sandbox_id: str) -> None:
        """Checkpoint to the node's disk and stop, freeing memory; survives a restart."""

    async def resume(self, sandbox_id: str) -> None:
        """Restore a paused sandbox in place: same id, files and processes."""

    async def is_paused(self, sandbox_id: str) -> bool: ...


@runtime_checkable
class ExitReasons(Protocol):
    """A runtime that can say why a sandbox's container stopped (``docker``), so a
    sandbox killed for memory ends saying so rather than just "died"."""

    async def exit_reason(self, sandbox_id: str) -> str | None:
        """Why the stopped sandbox stopped, e.g. ``out of memory (OOMKilled at its own
        128 MiB limit)``; ``None`` if the runtime does not know."""


@runtime_checkable
class DiskUsage(Protocol):
    """A runtime that can say how much of the host's disk a sandbox's own writes hold
    (``docker``: gVisor keeps a sandbox's root file system writes in one file of its
    container's layer, on the disk Redis, dockerd and the snapshots share)."""

    async def disk_usage(self, sandbox_ids: list[str]) -> dict[str, int]:
        """Bytes each sandbox's writes hold on the host; those it cannot tell (gone, or a
        storage driver without a layer directory) are left out."""


@runtime_checkable
class CpuWeights(Protocol):
    """A runtime that starts ``background`` sandboxes at a low CPU weight (``docker``)."""

    def foreground(self, sandbox_id: str) -> bool:
        """Give a background sandbox the normal CPU weight, now (no await: the claimer's
        next command may follow at once). False when it was not a background one."""

    def adopt_background(self, found: Managed) -> None:
        """``found`` (from :meth:`Runtime.list_managed`) still runs at the low weight it
        was started at: a pooled sandbox a restarted worker takes back, which
        :meth:`foreground` must still find at its claim."""


@runtime_checkable
class NetworkService(Protocol):
    """A runtime whose networked sandboxes need a service of the worker's (``docker``:
    the node's DNS resolver for them), run in the worker's task group."""

    async def serve_network(self, *, task_status: anyio.abc.TaskStatus[None]) -> None: ...


@runtime_checkable
class ImageStore(Protocol):
    """A runtime that keeps images on the node and can pull them (``docker``). The
    worker advertises what :meth:`list_images` returns and pulls what a start needs;
    runtimes without it (``sim``, ``process``) advertise nothing."""

    async def list_images(self) -> HeldImages:
        """The images held, bounded (``truncated`` set when there are more)."""

    async def has_image(self, ref: str) -> bool: ...

    async def pull_image(self, ref: str, *, login: tuple[str, str] | None = None) -> None:
        """Pull ``ref``; ImageNotFound when it cannot be had. No deadline of its own."""
