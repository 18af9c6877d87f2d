"""Claims phase: warm-pool claims from a filled pool at rising open-loop rates."""

from __future__ import annotations

import argparse
from typing import Any

import anyio

from bench.common.cluster import Cluster
from bench.common.loadgen import LoadGenerators, now
from bench.scale.steps import (
    LABEL,
    cpu_line,
    measured_closed,
    measured_step,
    say,
    step_line,
)
from hotbed.client import Client


async def phase_claims(args: argparse.Namespace) -> dict[str, Any]:
    """Warm-pool claims (hotbed.templates.claim_nowait: Lua against Redis, no scheduler
    round trip) at rising open-loop rates, while the pool controller refills."""
    from hotbed import templates

    steps: list[dict[str, Any]] = []
    closed_s = getattr(args, "claim_closed_s", 0.0)
    # The closed-loop step takes as many as the box completes: room for 15,000/s (a
    # standalone Redis on 2 cores completed up to 12,000/s).
    need = int(sum(args.claim_rates) * args.claim_step_s + 15_000 * closed_s)
    size = int(need * 1.1) + 500
    env = {"HOTBED_POOL_REFILL_PER_S": str(args.pool_refill), "HOTBED_POOL_MAX_WARMING": "4000"}
    out: dict[str, Any] = {"pool_size": size, "steps": steps}
    with Cluster(fleets=args.fleets, workers_per_fleet=args.workers_per_fleet,
                 latency_scale=args.latency_scale,
                 redis_cluster=getattr(args, "cluster", False),
                 cluster_replicas=getattr(args, "cluster_replicas", 0), scheduler_env=env) as cluster:
        async with Client(cluster.url, prefix=cluster.prefix) as client:
            await templates.create_template(
                "simtpl", image="sim", run=["true"], cpu=0.25, memory_mb=256, allow_unisolated=True, client=client,
                request_timeout=60,
            )
            pool = await templates.set_pool("simtpl", size, cpu=0.25, memory_mb=256, client=client)
            t0 = now()
            ready_key = client.keys.pool_ready(pool)
            with anyio.move_on_after(args.fill_max_s):
                while True:
                    if await client.redis.llen(ready_key) >= need:
                        break
                    await anyio.sleep(0.5)
            ready = await client.redis.llen(ready_key)
            out["fill"] = {"ready": ready, "seconds": round(now() - t0, 1),
                           "rate": round(ready / max(now() - t0, 1e-9), 1)}
            say(f"  [{LABEL}] pool filled to {ready} in {out['fill']['seconds']}s "
                f"({out['fill']['rate']}/s through the scheduler)")
            # Claims are measured from the filled pool with refills throttled to a trickle
            # (the pool controller's token bucket), so the claim path is what is loaded.
            cluster.restart_schedulers(HOTBED_POOL_REFILL_PER_S=str(args.claim_refill))
            out["cluster"] = cluster.settings_record()
            await anyio.sleep(2.0)
            async with LoadGenerators(cluster, "claim:simtpl", procs=args.loadgen_procs) as gens:
                await gens.warm(count=25, concurrency=5)
                for rate in args.claim_rates:
                    step = await measured_step(cluster, gens, rate, args.claim_step_s)
                    steps.append(step)
                    say(step_line("claims ", rate, step, step["latency"], 2) + f"errors {step['error_kinds']}  "
                        f"{cpu_line(step)}  load {step['loadavg'].split()[0]}")
                if closed_s:
                    sat = await measured_closed(cluster, gens, args.claim_closed_concurrency, closed_s)
                    out["saturation"] = sat
                    say(f"  [{LABEL}] claims closed loop, {sat['concurrency']} in flight: "
                        f"{sat['achieved_rate']:.0f}/s  p50 {sat['latency']['p50_ms']:.2f}  p99 "
                        f"{sat['latency']['p99_ms']:.2f} ms  errors {sat['error_kinds']}  {cpu_line(sat)}")
    ok = [s for s in steps if not s["errors"] and s["latency"]["p99_ms"] <= 50]
    out["capacity_rate"] = max((s["achieved_rate"] for s in ok), default=0.0)
    out["capacity_line"] = (f"warm-pool claims ({LABEL}): {out['capacity_rate']:.0f}/s sustained "
                            f"with p99 <= 50 ms and no errors")
    say(out["capacity_line"])
    return out

