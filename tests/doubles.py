"""Test doubles for the fleet tests. Nothing here runs a real sandbox.

``RecordingRuntime`` is a runtime that only remembers what it was asked to create, so
several workers fit in one test's event loop and placement can be checked exactly.
``FakeNvml`` is shaped like the ``pynvml`` module for the NVML detector.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec

from hotbed.errors import SandboxNotFound
from hotbed.protocol import ExecResult, ExecSpec, FileEntry, SandboxSpec
from workers.runtimes.base import AttachedStdio, Managed, Placed


class RecordingRuntime:
    """TEST DOUBLE: a runtime whose sandboxes are entries in a dict."""

    name = "test-double"
    kind = "simulated"
    # Stands in for a gVisor node's runtime in the placement tests.
    isolated = True

    def __init__(self) -> None:
        self.live: dict[str, Placed] = {}
        self.created: list[Placed] = []
        self.restored_from: list[tuple[str, Path]] = []

    async def open(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def create(self, placed: Placed, spec: SandboxSpec) -> None:
        self.live[placed.sandbox_id] = placed
        self.created.append(placed)

    async def restore(self, placed: Placed, spec: SandboxSpec, src: Path) -> None:
        self.restored_from.append((placed.sandbox_id, src))
        await self.create(placed, spec)

    def _placed(self, sandbox_id: str) -> Placed:
        placed = self.live.get(sandbox_id)
        if placed is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id}", sandbox_id=sandbox_id)
        return placed

    async def exec(self, sandbox_id: str, spec: ExecSpec, *, default_user: str) -> ExecResult:
        """Answers every command with the sandbox's GPU UUIDs (comma-separated)."""
        placed = self._placed(sandbox_id)
        return ExecResult(exit_code=0, stdout=",".join(placed.gpu_uuids).encode())

    async def write_file(
        self, sandbox_id: str, path: str, data: bytes, *, mode: int, make_dirs: bool, user: str
    ) -> int:
        return len(data)

    async def read_file(self, sandbox_id: str, path: str, *, max_bytes: int, user: str) -> bytes:
        return b""

    async def list_files(self, sandbox_id: str, path: str, *, user: str) -> list[FileEntry]:
        return []

    async def destroy(self, sandbox_id: str) -> None:
        self.live.pop(sandbox_id, None)

    async def is_alive(self, sandbox_id: str) -> bool:
        return sandbox_id in self.live

    async def attach(self, sandbox_id: str) -> AttachedStdio | None:
        return None

    async def list_managed(self) -> list[Managed]:
        return [
            Managed(sandbox_id=p.sandbox_id, worker_id=p.worker_id, prefix=p.prefix, running=True)
            for p in self.live.values()
        ]


class FakeNvmlError(Exception):
    pass


class FakeNvml:
    """TEST DOUBLE shaped like ``pynvml``: devices given as (name, uuid, total bytes)."""

    NVMLError = FakeNvmlError

    def __init__(self, devices: list[tuple[Any, Any, int]] | None, *, fail_init: bool = False) -> None:
        self.devices = devices or []
        self.fail_init = fail_init
        self.shutdowns = 0

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        if self.fail_init:
            raise FakeNvmlError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # noqa: N802
        return i

    def nvmlDeviceGetName(self, h: int) -> Any:  # noqa: N802
        return self.devices[h][0]

    def nvmlDeviceGetUUID(self, h: int) -> Any:  # noqa: N802
        return self.devices[h][1]

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:  # noqa: N802
        return SimpleNamespace(total=self.devices[h][2], free=self.devices[h][2], used=0)


def gpus(model: str, *uuids: str, memory_mb: int = 81559) -> list[dict[str, object]]:
    return [{"uuid": u, "model": model, "memory_mb": memory_mb, "index": i} for i, u in enumerate(uuids)]


def settings_dict(obj: msgspec.Struct) -> dict[str, Any]:
    return msgspec.to_builtins(obj)  # type: ignore[no-any-return]
