"""Isolation by default: placement sends a request only to workers whose runtime
isolates it (gVisor) unless the request opts out with ``allow_unisolated``."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import pytest
from conftest import BUSYBOX_IMAGE, process_stack, running_stack

from hotbed import protocol
from hotbed.errors import InvalidRequest, NoMatchingWorker
from hotbed.keys import Keys
from hotbed.protocol import (
    CreateSandbox,
    Resources,
    SandboxCreated,
    SandboxSpec,
    StartSandbox,
    Terminate,
    WorkerInfo,
)
from hotbed.sandbox import Sandbox
from scheduler.placement import WorkerView, could_ever, rank
from scheduler.registry import WorkerRegistry
from workers.runtimes.docker import DockerRuntime
from workers.runtimes.process import ProcessRuntime
from workers.runtimes.sim import SimRuntime

pytestmark = pytest.mark.anyio

DEFAULT = SandboxSpec(resources=Resources(cpu=0.5, memory_mb=64))
OPTED_OUT = SandboxSpec(resources=Resources(cpu=0.5, memory_mb=64), allow_unisolated=True)


def _view(wid: str, *, isolated: bool, cpu_free: int = 4000) -> WorkerView:
    info = WorkerInfo(id=wid, host="h", runtime="x", cpu_millis=4000, memory_mb=4096, isolated=isolated)
    return WorkerView(info=info, cpu_free=cpu_free, mem_free=4096)


def test_runtimes_say_whether_they_isolate() -> None:
    assert ProcessRuntime.isolated is False
    assert SimRuntime.isolated is False
    assert DockerRuntime(oci_runtime="runsc").isolated is True
    # docker with runc (or any non-gVisor runtime for some of its sandboxes) does not.
    assert DockerRuntime(oci_runtime="runc").isolated is False
    assert DockerRuntime(gpu_oci_runtime="nvidia").isolated is False
    # An older worker that does not say is taken as unisolated.
    assert protocol.decode_worker_info(protocol.encode(WorkerInfo(id="w", host="h", runtime="r",
                                                                  cpu_millis=1, memory_mb=1))).isolated is False


def test_rank_and_index_skip_unisolated_workers_unless_opted_out() -> None:
    # The unisolated worker has the most room: spread would pick it first.
    views = [_view("open", isolated=False, cpu_free=4000), _view("gv", isolated=True, cpu_free=1000)]
    assert [w.id for w, _ in rank(views, DEFAULT)] == ["gv"]
    assert [w.id for w, _ in rank(views, OPTED_OUT)] == ["open", "gv"]
    assert not could_ever(views[:1], DEFAULT, {})
    assert could_ever(views[:1], OPTED_OUT, {})
    reg = WorkerRegistry(None, Keys("x"), heartbeat_ttl_s=5)  # type: ignore[arg-type]
    reg.workers = {w.id: w for w in views}
    reg._rebuild()


    def order(spec: SandboxSpec) -> list[str]:
        # As the placer does: each candidate tried fails (found full), then the next.
        got = []
        for w, _ in reg.ranked(spec):
            got.append(w.id)
            w.cpu_free = 0
        for w in views:
            w.cpu_free = 4000 if w.id == "open" else 1000
        return got

    assert order(DEFAULT) == ["gv"]
    assert order(OPTED_OUT) == ["open", "gv"]
    # Skipping a worker does not drop it from the index.
    assert order(DEFAULT) == ["gv"]
    assert order(OPTED_OUT) == ["open", "gv"]


async def test_unisolated_worker_gets_only_requests_that_opt_out(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    async with process_stack(redis_url, prefix, tmp_path / "sandboxes") as stack:
        c = stack.client
        assert stack.worker.info.isolated is False
        # The default request is refused at once, saying why and how to opt out.
        with anyio.fail_after(10), pytest.raises(NoMatchingWorker, match="allow_unisolated"):
            await c.request(CreateSandbox(spec=DEFAULT), timeout=30)
        with anyio.fail_after(10), pytest.raises(NoMatchingWorker, match="isolates"):
            await Sandbox.create("none", cpu=0.5, memory_mb=64, client=c)
        # Nothing was placed: the worker holds nothing.
        assert await c.redis.hlen(c.keys.worker_sandboxes(stack.worker.id)) == 0
        # Opting out places it there.
        created = await c.request(CreateSandbox(spec=msgspec.structs.replace(OPTED_OUT, image="none")), timeout=30)
        assert isinstance(created, SandboxCreated) and created.worker_id == stack.worker.id
        await c.worker_request(created.worker_id, Terminate(sandbox_id=created.sandbox_id), timeout=10)
        sb = await Sandbox.create("none", cpu=0.5, memory_mb=64, allow_unisolated=True, client=c)
        await sb.terminate()
        # A start written straight to the worker's stream that did not opt out is
        # refused by the worker itself (a scheduler that does not check, or a forger).
        with pytest.raises(InvalidRequest, match="does not isolate"):
            await c.worker_request(
                stack.worker.id, StartSandbox(sandbox_id="sb-forged1", spec=DEFAULT), timeout=10
            )


async def test_isolated_docker_worker_takes_the_default_request(redis_url: str, prefix: str) -> None:
    async with running_stack(redis_url, prefix) as stack:
        assert stack.worker.info.isolated is True
        async with await Sandbox.create(BUSYBOX_IMAGE, cpu=0.25, memory_mb=64, client=stack.client) as sb:
            assert sb.worker_id == stack.worker.id
