"""The unisolated ``process`` runtime (development machines only), through the real stack."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anyio
import pytest
from conftest import start_stack, stop_stack

from hotbed.errors import ExecTimeout, FileError
from hotbed.protocol import (
    CreateSandbox,
    Exec,
    ExecSpec,
    ListFiles,
    ReadFile,
    Resources,
    SandboxCreated,
    SandboxSpec,
    Terminate,
    WriteFile,
)
from workers.runtimes.process import ProcessRuntime

pytestmark = pytest.mark.anyio


async def test_process_runtime_end_to_end(
    redis_url: str, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="workers.runtimes.process")
    runtime = ProcessRuntime(root=tmp_path / "sandboxes")
    async with anyio.create_task_group() as tg:
        stack = await start_stack(
            redis_url, prefix, tg=tg, runtime=runtime,
            worker_overrides={"runtime": "process", "gpus": [{"uuid": "GPU-p1", "model": "NVIDIA L4"}]},
        )
        try:
            c, wid = stack.client, stack.worker.id
            assert stack.worker.info.kind == "unisolated"
            created = await c.request(
                CreateSandbox(spec=SandboxSpec(image="none", env={"GREETING": "hi"}, allow_unisolated=True,
                                               resources=Resources(gpu="L4"))), timeout=20)
            assert isinstance(created, SandboxCreated) and created.gpu_uuids == ["GPU-p1"]
            sid = created.sandbox_id

            async def run(argv: list[str], **kw: object) -> object:
                return await c.worker_request(wid, Exec(sandbox_id=sid, exec=ExecSpec(argv=argv, **kw)), timeout=20)  # type: ignore[arg-type]

            res = await run(["sh", "-c", 'echo "$GREETING $NVIDIA_VISIBLE_DEVICES $CUDA_VISIBLE_DEVICES"; pwd; exit 3'])
            assert res.exit_code == 3  # type: ignore[attr-defined]
            lines = res.stdout.decode().splitlines()  # type: ignore[attr-defined]
            assert lines[0] == "hi GPU-p1 GPU-p1"
            assert lines[1].startswith(str(tmp_path / "sandboxes")) and lines[1].endswith("/fs/home")
            # Files are re-rooted under the sandbox's directory.
            await c.worker_request(wid, WriteFile(sandbox_id=sid, path="/work/a.txt", data=b"abc"), timeout=20)
            got = await c.worker_request(wid, ReadFile(sandbox_id=sid, path="/work/a.txt"), timeout=20)
            assert got.data == b"abc"  # type: ignore[union-attr]
            listing = await c.worker_request(wid, ListFiles(sandbox_id=sid, path="/work"), timeout=20)
            assert [e.name for e in listing.entries] == ["a.txt"]  # type: ignore[union-attr]
            res = await run(["cat", "../work/a.txt"])
            assert res.stdout == b"abc"  # type: ignore[attr-defined]
            with pytest.raises(FileError):
                await c.worker_request(wid, ReadFile(sandbox_id=sid, path="/nope"), timeout=20)
            # A timeout kills the whole process group, children included.
            t0 = anyio.current_time()
            with pytest.raises(ExecTimeout):
                await run(["sh", "-c", "sleep 30 & sleep 30; echo never"], timeout=0.5)
            assert anyio.current_time() - t0 < 5
            res = await run(["stdin-test-missing-binary"])
            assert res.exit_code == 127  # type: ignore[attr-defined]
            sandbox_dir = next((tmp_path / "sandboxes").glob(f"*/*/{sid}"))
            await c.worker_request(wid, Terminate(sandbox_id=sid), timeout=20)
            assert not sandbox_dir.exists()
        finally:
            with anyio.CancelScope(shield=True):
                await stop_stack(stack)
    assert any("does NOT isolate" in r.getMessage() for r in caplog.records)
    assert any("UNISOLATED" in r.getMessage() for r in caplog.records)
    assert os.listdir(tmp_path / "sandboxes" / prefix / f"w-{prefix}") == []
