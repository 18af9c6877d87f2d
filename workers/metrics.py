"""What a worker samples for Prometheus (daemon.metrics): its own sandboxes and slots.

One pipelined round trip per sample: the worker's capacity hash (GPU slots used/free
come from its ``gpu:<uuid>`` fields) and its heartbeat.
"""

from __future__ import annotations

import anyio

from daemon import lifecycle
from daemon.metrics import Samples
from hotbed.protocol import WorkerInfo
from hotbed.records import capacity_from_hash
from workers.gpu import NvmlUsage, usage_samples
from workers.sandboxes import SandboxTable


async def sample(table: SandboxTable, info: WorkerInfo, gpu_usage: NvmlUsage | None = None) -> Samples:
    """``table``: the worker's sandboxes; ``info``: what it advertises (its capacity);
    ``gpu_usage``: NVML, on a node with GPUs (memory and utilisation per GPU, labelled
    with the sandbox holding it where the runtime says, ``gpu_holders()``)."""
    if not table.bound:  # not started yet
        return {}
    keys, wid = table.keys, table.worker_id
    async with table.redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.worker_cap(wid))
        pipe.zscore(keys.workers, wid)
        cap, beat = await pipe.execute()
    capacity = capacity_from_hash(cap)
    gpu: dict[tuple[str, ...], float] = {}
    for g in info.gpus:
        taken = g.uuid in capacity.gpu_taken
        for state in ("used", "free"):
            gpu.setdefault((wid, g.model, state), 0.0)
        gpu[(wid, g.model, "used" if taken else "free")] += 1
    cpu_free, mem_free = float(capacity.cpu_free), float(capacity.mem_free)
    out: Samples = {
        "hotbed_live_sandboxes": {(): float(len(table))},
        "hotbed_gpu_slots": gpu,
        "hotbed_worker_capacity": {
            (wid, "cpu", "free"): cpu_free,
            (wid, "cpu", "used"): info.cpu_millis - cpu_free,
            (wid, "memory", "free"): mem_free,
            (wid, "memory", "used"): info.memory_mb - mem_free,
        },
    }
    if gpu_usage is not None and info.gpus:
        usage = await anyio.to_thread.run_sync(gpu_usage.read)
        holders: dict[str, str] = getattr(table.runtime, "gpu_holders", dict)()
        out.update(usage_samples(wid, usage, holders))
    if beat is not None:
        out["hotbed_worker_heartbeat_age_seconds"] = {(wid,): max(0.0, lifecycle.wall() - beat / 1000)}
    return out
