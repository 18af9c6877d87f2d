"""One contract for every runtime: what the worker relies on from a
:class:`~workers.runtimes.base.Runtime`, run against each of them.

:class:`RuntimeContract` holds the behaviour; a subclass per runtime (docker + runsc,
runsc direct, process, sim, and the test double of ``doubles``) gives the runtime and says
what it models, and the tests of what it does not model are skipped for it:

* ``runs_commands``: exec runs the command (``echo``, ``exit N``, ``sleep`` past the
  timeout) rather than answering every command alike;
* ``keeps_files``: files written can be read and listed back;
* ``guest_agent``: ``attach`` gives the main process's stdio (else it returns None);
* ``snapshots``: "yes" (checkpoint, restore, pause, resume work), "no" (they raise
  UnsupportedRequest) or "absent" (a double without them).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest
from conftest import BUSYBOX_IMAGE, docker_available, image_exists
from doubles import RecordingRuntime

from hotbed.errors import (
    ExecTimeout,
    FileError,
    SandboxNotFound,
    SandboxNotRunning,
    UnsupportedRequest,
)
from hotbed.protocol import ExecResult, ExecSpec, Resources, SandboxSpec
from workers.config import WorkerSettings
from workers.guest.channel import NOAGENT
from workers.runtimes.base import Placed

pytestmark = pytest.mark.anyio

USER = "1000:1000"
# Unpacked images of the runsc runtime's tests, kept across runs (one export per image).
RUNSC_IMAGE_CACHE = "/var/lib/hotbed/runsc-test/images"
WORKER = "w-contract"


class RuntimeContract:
    runs_commands: ClassVar[bool] = True
    keeps_files: ClassVar[bool] = True
    guest_agent: ClassVar[bool] = False
    snapshots: ClassVar[str] = "no"
    image: ClassVar[str] = "none"

    @pytest.fixture
    def prefix(self) -> str:
        return f"c{secrets.token_hex(4)}"

    @pytest.fixture
    async def runtime(self, prefix: str, tmp_path: Path) -> AsyncIterator[Any]:
        raise NotImplementedError
        yield

    def placed(self, prefix: str, sid: str | None = None) -> Placed:
        return Placed(sandbox_id=sid or f"sb-{secrets.token_hex(4)}", worker_id=WORKER, prefix=prefix)

    def spec(self) -> SandboxSpec:
        return SandboxSpec(image=self.image, resources=Resources(cpu=0.5, memory_mb=128), user=USER)

    async def make(self, runtime: Any, prefix: str) -> str:
        placed = self.placed(prefix)
        await runtime.create(placed, self.spec())
        return placed.sandbox_id

    # ------------------------------------------------------------- lifecycle

    async def test_create_list_destroy(self, runtime: Any, prefix: str) -> None:
        sid = await self.make(runtime, prefix)
        assert await runtime.is_alive(sid)
        mine = [m for m in await runtime.list_managed() if m.sandbox_id == sid]
        assert len(mine) == 1
        assert (mine[0].worker_id, mine[0].prefix, mine[0].running) == (WORKER, prefix, True)
        await runtime.destroy(sid)
        assert not await runtime.is_alive(sid)
        assert sid not in {m.sandbox_id for m in await runtime.list_managed()}
        # Destroy is idempotent, and quiet for ids it never knew.
        await runtime.destroy(sid)
        await runtime.destroy(f"sb-never-{secrets.token_hex(4)}")

    async def test_unknown_sandbox_is_not_found(self, runtime: Any) -> None:
        sid = f"sb-never-{secrets.token_hex(4)}"
        assert not await runtime.is_alive(sid)
        with pytest.raises(SandboxNotFound):
            await runtime.exec(sid, ExecSpec(shell="true"), default_user=USER)

    # ------------------------------------------------------------------ exec

    async def test_exec_returns_output_and_exit_code(self, runtime: Any, prefix: str) -> None:
        sid = await self.make(runtime, prefix)
        res = await runtime.exec(sid, ExecSpec(shell="echo hello"), default_user=USER)
        assert isinstance(res, ExecResult)
        if not self.runs_commands:
            return
        assert (res.exit_code, res.stdout) == (0, b"hello\n")
        res = await runtime.exec(sid, ExecSpec(shell="exit 3"), default_user=USER)
        assert res.exit_code == 3

    async def test_exec_timeout_raises(self, runtime: Any, prefix: str) -> None:
        if not self.runs_commands:
            pytest.skip("this runtime does not run commands")
        sid = await self.make(runtime, prefix)
        t0 = anyio.current_time()
        with pytest.raises(ExecTimeout):
            await runtime.exec(sid, ExecSpec(shell="sleep 20", timeout=0.5), default_user=USER)
        assert anyio.current_time() - t0 < 10

    # ----------------------------------------------------------------- files

    async def test_files_round_trip(self, runtime: Any, prefix: str) -> None:
        if not self.keeps_files:
            pytest.skip("this runtime does not keep files")
        sid = await self.make(runtime, prefix)
        n = await runtime.write_file(sid, "/tmp/ct/a.txt", b"data", mode=0o644, make_dirs=True, user=USER)
        assert n == 4
        assert await runtime.read_file(sid, "/tmp/ct/a.txt", max_bytes=1 << 20, user=USER) == b"data"
        listing = await runtime.list_files(sid, "/tmp/ct", user=USER)
        assert [(e.name, e.size, e.is_dir) for e in listing] == [("a.txt", 4, False)]
        with pytest.raises(FileError):
            await runtime.read_file(sid, "/tmp/ct/missing", max_bytes=1 << 20, user=USER)

    # ---------------------------------------------------------------- attach

    async def test_attach(self, runtime: Any, prefix: str) -> None:
        sid = await self.make(runtime, prefix)
        stdio = await runtime.attach(sid)
        if not self.guest_agent:
            assert stdio is None
            return
        assert stdio is not None
        try:
            # An image without python3: its PID 1 answers every line with the marker.
            await stdio.write(b"\n")
            got = b""
            with anyio.fail_after(20):
                while NOAGENT not in got:
                    chunk = await stdio.read()
                    assert chunk is not None, got
                    got += chunk
        finally:
            stdio.abort()
        with pytest.raises(SandboxNotRunning):
            await runtime.attach(f"sb-never-{secrets.token_hex(4)}")

    # ------------------------------------------------------------- snapshots

    async def test_snapshots(self, runtime: Any, prefix: str, tmp_path: Path) -> None:
        if self.snapshots == "absent":
            pytest.skip("this runtime has no snapshot methods")
        sid = await self.make(runtime, prefix)
        assert not await runtime.is_paused(sid)
        dest = tmp_path / "snap"
        if self.snapshots == "no":
            with pytest.raises(UnsupportedRequest):
                await runtime.checkpoint(sid, dest, leave_running=True)
            with pytest.raises(UnsupportedRequest):
                await runtime.restore(self.placed(prefix), self.spec(), dest)
            with pytest.raises(UnsupportedRequest):
                await runtime.pause(sid)
            with pytest.raises(UnsupportedRequest):
                await runtime.resume(sid)
            return
        await runtime.write_file(sid, "/tmp/kept", b"kept", mode=0o644, make_dirs=True, user=USER)
        size = await runtime.checkpoint(sid, dest, leave_running=True)
        assert size > 0 and await runtime.is_alive(sid)
        copy = self.placed(prefix)
        await runtime.restore(copy, self.spec(), dest)
        assert await runtime.is_alive(copy.sandbox_id)
        got = await runtime.read_file(copy.sandbox_id, "/tmp/kept", max_bytes=100, user=USER)
        assert got == b"kept"
        await runtime.pause(sid)
        assert await runtime.is_paused(sid)
        mine = [m for m in await runtime.list_managed() if m.sandbox_id == sid]
        assert [m.running for m in mine] == [False]
        await runtime.resume(sid)
        assert not await runtime.is_paused(sid)
        assert await runtime.read_file(sid, "/tmp/kept", max_bytes=100, user=USER) == b"kept"


class TestDockerRuntime(RuntimeContract):
    guest_agent = True
    snapshots = "yes"
    image = BUSYBOX_IMAGE

    @pytest.fixture
    async def runtime(self, prefix: str, tmp_path: Path) -> AsyncIterator[Any]:
        if not docker_available() or not image_exists(BUSYBOX_IMAGE):
            pytest.skip("needs dockerd with runsc and the test image")
        from workers.runtimes.docker import DockerRuntime

        rt = DockerRuntime()
        await rt.open()
        try:
            yield rt
        finally:
            with anyio.CancelScope(shield=True):
                for m in await rt.list_managed():
                    if m.prefix == prefix:
                        await rt.destroy(m.sandbox_id)
                await rt.aclose()


class TestRunscRuntime(RuntimeContract):
    """runsc driven directly, its images from the local Docker engine."""

    guest_agent = True
    snapshots = "yes"
    image = BUSYBOX_IMAGE

    @pytest.fixture
    async def runtime(self, prefix: str, tmp_path: Path) -> AsyncIterator[Any]:
        if not docker_available() or not image_exists(BUSYBOX_IMAGE):
            pytest.skip("needs runsc, and dockerd with the test image")
        from workers.runtimes.runsc import RunscRuntime

        # Image cache shared across tests (one export per image), sandboxes private;
        # the platform a worker gives it by default.
        rt = RunscRuntime(
            root="/run/hotbed/runsc-test", state_dir=tmp_path / "runsc", image_cache=RUNSC_IMAGE_CACHE,
            flags=[f"--platform={WorkerSettings().runsc_platform}"],
        )
        await rt.open()
        try:
            yield rt
        finally:
            with anyio.CancelScope(shield=True):
                for m in await rt.list_managed():
                    await rt.destroy(m.sandbox_id)
                await rt.aclose()


class TestProcessRuntime(RuntimeContract):
    @pytest.fixture
    async def runtime(self, prefix: str, tmp_path: Path) -> AsyncIterator[Any]:
        from workers.runtimes.process import ProcessRuntime

        rt = ProcessRuntime(root=tmp_path / "sandboxes")
        await rt.open()
        try:
            yield rt
        finally:
            for m in await rt.list_managed():
                await rt.destroy(m.sandbox_id)
            await rt.aclose()


class TestSimRuntime(RuntimeContract):
    snapshots = "yes"

    @pytest.fixture
    async def runtime(self, prefix: str, tmp_path: Path) -> AsyncIterator[Any]:
        from workers.runtimes.sim import SimParams, SimRuntime

        rt = SimRuntime(SimParams().scaled(0))
        await rt.open()
        try:
            yield rt
        finally:
            await rt.aclose()


class TestRecordingRuntime(RuntimeContract):
    runs_commands = False
    keeps_files = False
    snapshots = "absent"

    @pytest.fixture
    async def runtime(self, prefix: str, tmp_path: Path) -> AsyncIterator[Any]:
        rt = RecordingRuntime()
        await rt.open()
        try:
            yield rt
        finally:
            await rt.aclose()
