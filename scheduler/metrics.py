"""What the scheduler samples for Prometheus (daemon.metrics): the fleet as Redis shows it.

One pipelined round trip per sample: the request backlog and its oldest entry, live
sandboxes, worker heartbeats, and every pool's ready count and target. Capacity and
GPU slots come from the registry's last refresh (no extra reads).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon import lifecycle
from daemon.metrics import Samples
from hotbed.records import pool_config_from_hash

if TYPE_CHECKING:
    from scheduler.service import Scheduler


async def sample(s: Scheduler) -> Samples:
    if s._redis is None:  # not started yet
        return {}
    keys = s.keys
    async with s.redis.pipeline(transaction=False) as pipe:
        pipe.xlen(keys.requests)
        pipe.xrange(keys.requests, count=1)
        pipe.zcard(keys.sandboxes)
        pipe.zrange(keys.workers, 0, -1, withscores=True)
        pipe.smembers(keys.pools)
        depth, oldest, live, beats, pools = await pipe.execute()
    now = lifecycle.wall()
    out: Samples = {
        "hotbed_queue_depth": {(): float(depth)},
        "hotbed_live_sandboxes": {(): float(live)},
        "hotbed_queue_oldest_age_seconds": {(): 0.0},
        "hotbed_queue_waiting": {(cls,): float(n) for cls, n in s.waitline.classes().items()},
        "hotbed_worker_heartbeat_age_seconds": {
            (m.decode(),): max(0.0, now - score / 1000) for m, score in beats
        },
    }
    if oldest:
        entry_ms = int(oldest[0][0].split(b"-")[0])
        out["hotbed_queue_oldest_age_seconds"] = {(): max(0.0, now - entry_ms / 1000)}
    names = sorted(p.decode() for p in pools)
    if names:
        async with s.redis.pipeline(transaction=False) as pipe:
            for n in names:
                pipe.hgetall(keys.pool_conf(n))
                pipe.llen(keys.pool_ready(n))
            rows = await pipe.execute()
        ready: dict[tuple[str, ...], float] = {}
        target: dict[tuple[str, ...], float] = {}
        for i, n in enumerate(names):
            conf, nready = pool_config_from_hash(rows[2 * i]), rows[2 * i + 1]
            label = (n, conf.template if conf else "")
            ready[label] = float(nready)
            target[label] = float(conf.size if conf else 0)
        out["hotbed_pool_ready"], out["hotbed_pool_target"] = ready, target
    gpu: dict[tuple[str, ...], float] = {}
    cap: dict[tuple[str, ...], float] = {}
    if s.registry is not None:
        for w in s.registry.live():
            free = set(w.gpu_free)
            for g in w.info.gpus:
                state = "free" if g.uuid in free else "used"
                gpu[(w.id, g.model, state)] = gpu.get((w.id, g.model, state), 0.0) + 1
                other = (w.id, g.model, "used" if state == "free" else "free")
                gpu.setdefault(other, 0.0)
            cap[(w.id, "cpu", "free")] = float(w.cpu_free)
            cap[(w.id, "cpu", "used")] = float(w.info.cpu_millis - w.cpu_free)
            cap[(w.id, "memory", "free")] = float(w.mem_free)
            cap[(w.id, "memory", "used")] = float(w.info.memory_mb - w.mem_free)
    out["hotbed_gpu_slots"], out["hotbed_worker_capacity"] = gpu, cap
    return out
