"""GPU detection and GPU placement, without a GPU.

Detection and usage run against NVML-shaped fakes (and the real binding, which must
find exactly the host's GPUs: none here). Placement runs the real scheduler and several worker agents against the real
Redis; the workers declare GPUs in their settings and run a recording test double
instead of containers, so what is checked is exactly where the scheduler put what.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import anyio
import msgspec
import pytest
from doubles import FakeNvml, RecordingRuntime, gpus

from hotbed.client import Client
from hotbed.errors import CapacityExhausted, NoMatchingWorker
from hotbed.protocol import CreateSandbox, Resources, SandboxCreated, SandboxSpec, Terminate
from scheduler.config import SchedulerSettings
from scheduler.service import Scheduler
from workers.agent import WorkerAgent
from workers.config import WorkerSettings
from workers.gpu import (
    NoGpuDetector,
    NvmlDetector,
    NvmlUsage,
    StaticDetector,
    detector_for,
    usage_samples,
)
from workers.runtimes.runsc.nvidia import gpu_minors

pytestmark = pytest.mark.anyio

# ------------------------------------------------------------------- detection


def test_nvml_detector_reads_models_memory_and_uuids() -> None:
    nvml = FakeNvml([
        (b"NVIDIA H100 80GB HBM3", b"GPU-aaaa", 85_520_809_984),
        ("NVIDIA H100 80GB HBM3", "GPU-bbbb", 85_520_809_984),
    ])
    got = NvmlDetector(nvml).detect()
    assert [(g.index, g.model, g.uuid, g.memory_mb) for g in got] == [
        (0, "NVIDIA H100 80GB HBM3", "GPU-aaaa", 81559),
        (1, "NVIDIA H100 80GB HBM3", "GPU-bbbb", 81559),
    ]
    assert nvml.shutdowns == 1


def test_no_driver_means_no_gpus_not_an_error() -> None:
    assert NvmlDetector(FakeNvml(None, fail_init=True)).detect() == []
    assert NvmlDetector(FakeNvml([])).detect() == []
    # The real binding: on a machine without the driver it finds nothing and raises
    # nothing; on a GPU host, exactly the GPUs the driver lists.
    assert {g.uuid for g in NvmlDetector().detect()} == host_gpus()


def host_gpus() -> set[str]:
    """The UUIDs of this host's GPUs as NVML would find them: the driver's list, when
    the NVML binding is installed."""
    try:
        import pynvml  # noqa: F401
    except ImportError:
        return set()
    return set(gpu_minors())


def test_gpu_usage_per_gpu_and_holding_sandbox() -> None:
    nvml = FakeNvml([("NVIDIA H200", "GPU-aaaa", 150 << 30), ("NVIDIA H200", "GPU-bbbb", 150 << 30)])
    nvml.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(used=(h + 1) << 30)  # type: ignore[method-assign]
    nvml.nvmlDeviceGetUtilizationRates = lambda h: SimpleNamespace(gpu=40 * h, memory=0)  # type: ignore[attr-defined]
    usage = NvmlUsage(nvml)
    got = usage.read()
    assert [(u.uuid, u.memory_used_bytes, u.utilization_pct) for u in got] == [
        ("GPU-aaaa", 1 << 30, 0), ("GPU-bbbb", 2 << 30, 40),
    ]
    samples = usage_samples("w1", got, {"GPU-bbbb": "sb-1"})
    assert samples["hotbed_gpu_memory_used_bytes"] == {
        ("w1", "GPU-aaaa", ""): float(1 << 30), ("w1", "GPU-bbbb", "sb-1"): float(2 << 30),
    }
    assert samples["hotbed_gpu_utilization_ratio"][("w1", "GPU-bbbb", "sb-1")] == 0.4
    usage.close()
    assert nvml.shutdowns == 1
    # No driver: no samples and no error.
    broken = FakeNvml(None, fail_init=True)
    assert NvmlUsage(broken).read() == []


def test_detector_choice() -> None:
    s = msgspec.convert({"gpus": gpus("H100", "GPU-1")}, WorkerSettings)
    assert isinstance(detector_for(s.gpu_detect, s.gpus), StaticDetector)
    assert detector_for(s.gpu_detect, s.gpus).detect()[0].uuid == "GPU-1"
    assert isinstance(detector_for("none", []), NoGpuDetector)
    assert isinstance(detector_for("auto", []), NvmlDetector)


# ------------------------------------------------------------------- placement


class Fleet(msgspec.Struct, kw_only=True):
    client: Client
    scheduler: Scheduler
    workers: dict[str, WorkerAgent]
    runtimes: dict[str, RecordingRuntime]


@asynccontextmanager
async def fleet(
    redis_url: str, prefix: str, nodes: dict[str, dict[str, object]], **sched: object
) -> AsyncIterator[Fleet]:
    """A real scheduler and one worker agent per entry of ``nodes`` (id -> settings)."""
    scheduler = Scheduler(msgspec.convert(
        {"redis_url": redis_url, "prefix": prefix, "registry_refresh_s": 0.05,
         "heartbeat_ttl_s": 3.0, "shutdown_grace_s": 1.0, **sched},
        SchedulerSettings,
    ))
    workers, runtimes = {}, {}
    for wid, opts in nodes.items():
        settings = msgspec.convert(
            {"redis_url": redis_url, "prefix": prefix, "worker_id": wid, "heartbeat_s": 0.2,
             "reconcile_s": 0.5, "shutdown_grace_s": 1.0, "drain_on_stop": True,
             "gpu_detect": "none", "cpu": 8, "memory_mb": 16384, **opts},
            WorkerSettings,
        )
        runtimes[wid] = RecordingRuntime()
        workers[wid] = WorkerAgent(settings, runtimes[wid])
    async with anyio.create_task_group() as tg:
        await tg.start(scheduler.run)
        for w in workers.values():
            await tg.start(w.run)
        assert scheduler.registry is not None
        with anyio.fail_after(10):
            while set(scheduler.registry.workers) != set(workers):
                await scheduler.registry.refresh()
                await anyio.sleep(0.02)
        client = Client(redis_url, prefix=prefix)
        try:
            yield Fleet(client=client, scheduler=scheduler, workers=workers, runtimes=runtimes)
        finally:
            await client.aclose()
            for w in workers.values():
                w.stopping.set()
            scheduler.stopping.set()


async def create(client: Client, *, gpu: str | None = None, cpu: float = 1.0, wait_s: float = 10.0) -> SandboxCreated:
    spec = SandboxSpec(image="none", resources=Resources(cpu=cpu, memory_mb=256, gpu=gpu))
    reply = await client.request(CreateSandbox(spec=spec), timeout=wait_s)
    assert isinstance(reply, SandboxCreated)
    return reply


async def terminate(client: Client, created: SandboxCreated) -> None:
    await client.worker_request(created.worker_id, Terminate(sandbox_id=created.sandbox_id), timeout=10)


NODES: dict[str, dict[str, object]] = {
    "h100": {"gpus": gpus("NVIDIA H100 80GB HBM3", "GPU-h1", "GPU-h2"), "tags": {"pool": "gpu"}},
    "a100": {"gpus": gpus("NVIDIA A100-SXM4-40GB", "GPU-a1")},
    "cpu": {"tags": {"pool": "cpu"}},
}


async def test_gpu_jobs_land_on_matching_gpu_workers_with_exclusive_uuids(redis_url: str, prefix: str) -> None:
    async with fleet(redis_url, prefix, NODES) as f:
        one = await create(f.client, gpu="H100")
        two = await create(f.client, gpu="h100")  # models match case-insensitively
        a = await create(f.client, gpu="A100")
        cpu_only = [await create(f.client) for _ in range(3)]
        assert (one.worker_id, two.worker_id, a.worker_id) == ("h100", "h100", "a100")
        assert sorted(one.gpu_uuids + two.gpu_uuids) == ["GPU-h1", "GPU-h2"]
        assert a.gpu_uuids == ["GPU-a1"]
        # CPU-only work stays off GPU nodes while the CPU node has room.
        assert {c.worker_id for c in cpu_only} == {"cpu"}
        # The runtime was told exactly its GPUs.
        placed = {p.sandbox_id: p.gpu_uuids for p in f.runtimes["h100"].created}
        assert placed[one.sandbox_id] == one.gpu_uuids
        # The record keeps the assignment.
        rec = await f.client.record(one.sandbox_id)
        assert rec.gpu_uuids == one.gpu_uuids and rec.gpu == "H100"


async def test_multi_gpu_and_any(redis_url: str, prefix: str) -> None:
    async with fleet(redis_url, prefix, NODES) as f:
        pair = await create(f.client, gpu="H100:2")
        assert pair.worker_id == "h100" and sorted(pair.gpu_uuids) == ["GPU-h1", "GPU-h2"]
        anyone = await create(f.client, gpu="any")
        assert anyone.worker_id == "a100" and anyone.gpu_uuids == ["GPU-a1"]


async def test_impossible_gpu_request_fails_at_once_naming_what_exists(redis_url: str, prefix: str) -> None:
    async with fleet(redis_url, prefix, NODES) as f:
        t0 = anyio.current_time()
        with pytest.raises(NoMatchingWorker) as err:
            await create(f.client, gpu="B200", wait_s=30)
        with pytest.raises(NoMatchingWorker):
            await create(f.client, gpu="H100:3", wait_s=30)
        assert anyio.current_time() - t0 < 5
        assert "gpu=B200" in err.value.message
        assert "NVIDIA H100 80GB HBM3" in err.value.message and "A100" in err.value.message


async def test_waiting_gpu_requests_are_placed_in_arrival_order(redis_url: str, prefix: str) -> None:
    async with fleet(redis_url, prefix, {"h100": NODES["h100"], "cpu": NODES["cpu"]}) as f:
        held = [await create(f.client, gpu="H100"), await create(f.client, gpu="H100")]
        order: list[str] = []
        results: dict[str, SandboxCreated] = {}
        first_placed = anyio.Event()

        async def waiter(name: str, gpu: str) -> None:
            results[name] = await create(f.client, gpu=gpu, wait_s=30)
            order.append(name)
            first_placed.set()

        async with anyio.create_task_group() as tg:
            # "big" arrives first and needs both GPUs: later single-GPU requests must not
            # overtake it even though each of them would fit sooner.
            for n, (name, gpu) in enumerate((("big", "H100:2"), ("s1", "H100"), ("s2", "H100"))):
                tg.start_soon(waiter, name, gpu)
                with anyio.fail_after(5):
                    while f.scheduler.waitline.depth() < n + 1:  # noqa: ASYNC110 - scheduler state
                        await anyio.sleep(0.01)
            # CPU-only work is not stuck behind the GPU line.
            cpu = await create(f.client, wait_s=5)
            assert cpu.worker_id == "cpu"
            await terminate(f.client, held[0])
            await anyio.sleep(0.3)
            assert order == [], "a single freed GPU must not go to a later, smaller request"
            await terminate(f.client, held[1])
            with anyio.fail_after(10):
                await first_placed.wait()
            assert order == ["big"]
            await terminate(f.client, results["big"])
        assert order == ["big", "s1", "s2"]
        assert sorted(results["s1"].gpu_uuids + results["s2"].gpu_uuids) == ["GPU-h1", "GPU-h2"]


async def test_waiting_gpu_request_fails_at_its_deadline(redis_url: str, prefix: str) -> None:
    async with fleet(redis_url, prefix, {"a100": NODES["a100"]}) as f:
        await create(f.client, gpu="A100")
        t0 = anyio.current_time()
        with pytest.raises(CapacityExhausted) as err:
            await create(f.client, gpu="A100", wait_s=1.0)
        waited = anyio.current_time() - t0
        assert 0.9 <= waited < 4, waited
        assert "gpu=A100" in err.value.message
        assert f.scheduler.waitline.depth() == 0


async def test_mixed_load_never_shares_a_gpu(redis_url: str, prefix: str) -> None:
    nodes = {
        "h100": NODES["h100"],
        "h100b": {"gpus": gpus("NVIDIA H100 80GB HBM3", "GPU-h3", "GPU-h4")},
        "cpu": {"cpu": 64},
    }
    async with fleet(redis_url, prefix, nodes) as f:
        holding: dict[str, str] = {}  # gpu uuid -> sandbox id
        done: list[SandboxCreated] = []

        async def gpu_job() -> None:
            c = await create(f.client, gpu="H100", wait_s=30)
            for u in c.gpu_uuids:
                assert u not in holding, f"{u} given to {c.sandbox_id} while {holding[u]} holds it"
                holding[u] = c.sandbox_id
            assert c.worker_id in ("h100", "h100b")
            await anyio.sleep(0.05)
            for u in c.gpu_uuids:
                del holding[u]
            await terminate(f.client, c)
            done.append(c)

        async def cpu_job() -> None:
            c = await create(f.client, wait_s=30)
            assert c.worker_id == "cpu" and not c.gpu_uuids
            done.append(c)

        async with anyio.create_task_group() as tg:
            for i in range(24):
                tg.start_soon(gpu_job if i % 2 else cpu_job)
        assert len(done) == 24
        assert f.scheduler.waitline.depth() == 0


async def test_gpu_and_worker_tags_from_sdk_and_cli(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.main import main as cli_main
    from hotbed.sandbox import Sandbox

    async with fleet(redis_url, prefix, NODES) as f:
        sb = await Sandbox.create("none", gpu="H100", worker_tags={"pool": "gpu"}, client=f.client)
        assert sb.worker_id == "h100"
        assert (await f.client.record(sb.id)).gpu_uuids[0].startswith("GPU-h")
        with pytest.raises(NoMatchingWorker) as err:
            await Sandbox.create("none", gpu="A100", worker_tags={"pool": "gpu"}, client=f.client)
        assert "worker_tags={'pool': 'gpu'}" in err.value.message
        monkeypatch.setenv("HOTBED_REDIS_URL", redis_url)
        monkeypatch.setenv("HOTBED_PREFIX", prefix)
        rc = await anyio.to_thread.run_sync(cli_main, ["create", "none", "--gpu", "A100", "--cpu", "0.5"])
        assert rc == 0
        sid = capsys.readouterr().out.strip()
        rec = await f.client.record(sid)
        assert rec.worker == "a100" and rec.gpu_uuids == ["GPU-a1"]
        rc = await anyio.to_thread.run_sync(cli_main, ["create", "none", "--on", "pool=cpu"])
        assert rc == 0
        assert (await f.client.record(capsys.readouterr().out.strip())).worker == "cpu"


async def test_stopping_scheduler_hands_waiting_creates_to_the_next(redis_url: str, prefix: str) -> None:
    """A graceful stop neither drops nor strands a create that waits for a GPU: it goes
    back to the stream at once and the replacement scheduler places it."""
    async with fleet(redis_url, prefix, {"a100": NODES["a100"]}) as f:
        held = await create(f.client, gpu="A100")
        result: list[SandboxCreated] = []

        async def waiter() -> None:
            result.append(await create(f.client, gpu="A100", wait_s=30))

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            with anyio.fail_after(5):
                while f.scheduler.waitline.depth() < 1:  # noqa: ASYNC110 - scheduler state
                    await anyio.sleep(0.01)
            t0 = anyio.current_time()
            f.scheduler.stopping.set()
            with anyio.fail_after(5):
                while f.scheduler.registry is not None and f.scheduler._redis is not None and (  # noqa: ASYNC110
                    f.scheduler._limiter.borrowed_tokens
                ):
                    await anyio.sleep(0.01)
            assert anyio.current_time() - t0 < 3, "the stop waited out its grace period"
            replacement = Scheduler(msgspec.convert(
                {"redis_url": redis_url, "prefix": prefix, "registry_refresh_s": 0.05}, SchedulerSettings))
            await tg.start(replacement.run)
            await terminate(f.client, held)
            with anyio.fail_after(10):
                while not result:  # noqa: ASYNC110 - the waiter's reply
                    await anyio.sleep(0.01)
            replacement.stopping.set()
        assert result[0].gpu_uuids == ["GPU-a1"] and result[0].worker_id == "a100"


async def test_a_large_waiting_cpu_request_does_not_block_small_ones(redis_url: str, prefix: str) -> None:
    async with fleet(redis_url, prefix, {"cpu": NODES["cpu"]}) as f:
        held = await create(f.client, cpu=4)
        big: list[SandboxCreated] = []

        async def waiter() -> None:
            big.append(await create(f.client, cpu=8, wait_s=30))

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            with anyio.fail_after(5):
                while f.scheduler.waitline.depth() < 1:  # noqa: ASYNC110 - scheduler state
                    await anyio.sleep(0.01)
            t0 = anyio.current_time()
            small = await create(f.client, cpu=1, wait_s=5)
            assert small.worker_id == "cpu" and anyio.current_time() - t0 < 1.0
            await terminate(f.client, small)
            await terminate(f.client, held)
        assert big and big[0].worker_id == "cpu"


def test_docker_container_gets_exactly_its_gpus_under_nvproxy() -> None:
    """The container config of a GPU sandbox (no GPU needed to check it): a device
    request for exactly the assigned UUIDs, NVIDIA_VISIBLE_DEVICES, runsc --nvproxy."""
    from hotbed.errors import RuntimeFailure
    from workers.runtimes.base import Placed
    from workers.runtimes.docker.engine import Engine
    from workers.runtimes.docker.lifecycle import container_config

    engine = Engine(oci_runtime="runsc", gpu_oci_runtime="runsc-nvproxy")
    engine.runtimes = {"runc", "runsc", "runsc-nvproxy"}
    spec = SandboxSpec(image="hotbed/busybox", resources=Resources(gpu="H100:2"))
    placed = Placed(sandbox_id="sb-x", worker_id="w", prefix="p", gpu_uuids=["GPU-b", "GPU-d"])
    host = container_config(engine, placed, spec, "sha256:0")["HostConfig"]
    cfg = container_config(engine, placed, spec, "sha256:0")
    assert host["Runtime"] == "runsc-nvproxy"
    assert host["DeviceRequests"] == [{"Driver": "nvidia", "DeviceIDs": ["GPU-b", "GPU-d"], "Capabilities": [["gpu"]]}]
    assert "NVIDIA_VISIBLE_DEVICES=GPU-b,GPU-d" in cfg["Env"]
    cpu_only = container_config(engine, Placed(sandbox_id="sb-y", worker_id="w", prefix="p"), SandboxSpec(), "sha256:0")
    assert cpu_only["HostConfig"]["Runtime"] == "runsc" and "DeviceRequests" not in cpu_only["HostConfig"]
    assert not any(e.startswith("NVIDIA_VISIBLE_DEVICES") for e in cpu_only["Env"])
    engine.runtimes = {"runc", "runsc"}
    with pytest.raises(RuntimeFailure, match="runsc-nvproxy"):
        container_config(engine, placed, spec, "sha256:0")


async def test_restores_prefer_workers_holding_the_snapshot(redis_url: str, prefix: str, tmp_path: Path) -> None:
    """A create from a template goes to a worker that holds its snapshot while one has
    room (no copy), even where the spread policy would pick an emptier worker; without
    room there, the next worker copies the snapshot from the store and restores."""
    from hotbed.keys import Keys
    from hotbed.protocol import TemplateSpec
    from hotbed.templates import TemplateRecord, template_to_hash

    store = tmp_path / "store"
    for where in (store, tmp_path / "holder"):
        (where / "snap-1").mkdir(parents=True)
        (where / "snap-1" / "state").write_bytes(b"x")
    nodes: dict[str, dict[str, object]] = {
        "big": {"cpu": 16, "snapshot_dir": str(tmp_path / "big"), "snapshot_store": str(store)},
        "holder": {"cpu": 4, "snapshot_dir": str(tmp_path / "holder"), "snapshot_store": str(store)},
    }
    async with fleet(redis_url, prefix, nodes) as f:
        keys = Keys(prefix)
        rec = TemplateRecord(name="t", state="ready", spec=TemplateSpec(image="none"),
                             snapshot="snap-1", holders=["holder"])
        await f.client.redis.hset(keys.template("t"), mapping=template_to_hash(rec))
        await f.client.redis.sadd(keys.templates, "t")
        spec = SandboxSpec(template="t", resources=Resources(cpu=2, memory_mb=256))
        got = [await f.client.request(CreateSandbox(spec=spec), timeout=10) for _ in range(3)]
        assert all(isinstance(g, SandboxCreated) and g.path == "restore" for g in got)
        # Spread alone would have sent the first to "big" (16 free CPUs against 4).
        assert [g.worker_id for g in got] == ["holder", "holder", "big"]  # type: ignore[union-attr]
        assert [src for _, src in f.runtimes["holder"].restored_from] == [tmp_path / "holder" / "snap-1"] * 2
        assert (tmp_path / "big" / "snap-1" / "state").exists()  # copied from the store
