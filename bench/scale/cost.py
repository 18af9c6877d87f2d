"""Cost phase: CPU per cold create and per warm claim, with the client, a scheduler
and the simulated workers in this one process."""

from __future__ import annotations

import argparse
import gc
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import msgspec

from bench.common.cluster import Cluster, loadavg
from bench.common.loadgen import callers, claim_spec, closed_loop
from bench.scale.steps import LABEL, cpu_cost, say
from hotbed.client import Client
from workers.runtimes.sim import SimParams


async def phase_cost(args: argparse.Namespace) -> dict[str, Any]:
    """CPU per operation, steady under load from other work: the client, one scheduler
    and 10 simulated workers in this one process (CPU time of the process) against a
    private Redis (its CPU from INFO), creates closed-loop with zero simulated latency,
    then warm-pool claims. The two-core ceiling is 2 s of CPU over the cost of one."""
    from scheduler.config import SchedulerSettings
    from scheduler.service import Scheduler
    from workers.config import WorkerSettings
    from workers.simfleet import SimFleet

    out: dict[str, Any] = {}
    # The same collector settings as the simfleet and load-generator processes.
    gc.freeze()
    gc.set_threshold(20_000, 20, 100)
    with Cluster(fleets=0, schedulers=0) as cluster:
        base = msgspec.convert(
            {"redis_url": cluster.url, "prefix": cluster.prefix, "runtime": "sim", "cpu": 4096.0,
             "memory_mb": 1 << 24, "max_concurrency": 1024, "reconcile_s": 60.0,
             "snapshot_dir": str(Path(cluster.dir) / "snap")},
            WorkerSettings,
        )
        fleet = SimFleet(base, workers=10, id_prefix="cost", params=SimParams().scaled(0))
        sched = Scheduler(msgspec.convert(
            {"redis_url": cluster.url, "prefix": cluster.prefix, "name": "cost",
             "log_level": "WARNING", "pool_refill_per_s": 5000.0, "pool_max_warming": 2000,
             "heartbeat_ttl_s": 30.0},
            SchedulerSettings,
        ))
        async with anyio.create_task_group() as tg:
            await tg.start(sched.run)
            await tg.start(fleet.run)
            assert sched.registry is not None
            while len(sched.registry.workers) < 10:
                await sched.registry.refresh()
                await anyio.sleep(0.05)
            async with Client(cluster.url, prefix=cluster.prefix) as client:
                await closed_loop(client, concurrency=200, count=1000)
                n = args.cost_n
                out["create"], tally = await cpu_cost(
                    cluster, n, lambda: closed_loop(client, concurrency=400, count=n)
                )
                out["create"]["errors"] = dict(tally.errors)
                py_ms, redis_ms = out["create"]["python_cpu_ms"], out["create"]["redis_cpu_ms"]
                say(f"  [{LABEL}] cold create costs {py_ms:.3f} ms Python CPU (client + scheduler + "
                    f"worker) + {redis_ms:.3f} ms Redis CPU -> two-core ceiling "
                    f"{out['create']['two_core_ceiling_per_s']}/s (one process did {out['create']['one_process_rate']}/s)")
                from hotbed import templates

                await templates.create_template("costtpl", image="sim", run=["true"], cpu=0.25,
                                                memory_mb=256, allow_unisolated=True, client=client, request_timeout=60)
                pool = await templates.set_pool("costtpl", n + 500, cpu=0.25, memory_mb=256, client=client)
                with anyio.move_on_after(args.fill_max_s):
                    while True:
                        if await client.redis.llen(client.keys.pool_ready(pool)) >= n:
                            break
                        await anyio.sleep(0.2)
                await templates.set_pool("costtpl", 1, cpu=0.25, memory_mb=256, client=client)
                await anyio.sleep(0.5)
                spec = claim_spec("costtpl")
                errors: Counter[str] = Counter()

                async def claim() -> None:
                    if await templates.claim_nowait(spec, client=client) is None:
                        errors["pool_empty"] += 1

                out["claim"], _ = await cpu_cost(cluster, n, lambda: callers(200, claim, count=n))
                out["claim"]["errors"] = dict(errors)
                py_ms, redis_ms = out["claim"]["python_cpu_ms"], out["claim"]["redis_cpu_ms"]
                say(f"  [{LABEL}] warm claim costs {py_ms:.3f} ms Python CPU (client + worker notice) + "
                    f"{redis_ms:.3f} ms Redis CPU -> two-core ceiling {out['claim']['two_core_ceiling_per_s']}/s "
                    f"(one process did {out['claim']['one_process_rate']}/s; errors {dict(errors)})")
            fleet.stop()
            sched.stopping.set()
        out["redis_version"] = cluster.redis_version()
    # The settings the in-process daemons ran with, as they resolved them.
    out["scheduler_settings"] = {k: v for k, v in msgspec.to_builtins(sched.settings).items()
                                 if k not in ("redis_url", "name")}
    out["worker_settings"] = {k: v for k, v in msgspec.to_builtins(base).items()
                              if k not in ("redis_url", "snapshot_dir")}
    out["loadavg"] = loadavg()
    return out

