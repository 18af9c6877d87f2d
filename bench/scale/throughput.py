"""Throughput phase: open-loop cold creates at rising rates, until the control-plane
p99 passes its limit or errors appear; the step before is the capacity."""

from __future__ import annotations

import argparse
from typing import Any

from bench.common.cluster import Cluster
from bench.common.loadgen import LoadGenerators, closed_loop
from bench.scale.steps import (
    LABEL,
    P99_LIMIT_S,
    measured_step,
    say,
    step_line,
    wait_drained,
)
from hotbed.client import Client


async def phase_throughput(args: argparse.Namespace) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    capacity: dict[str, Any] | None = None
    with Cluster(fleets=args.fleets, workers_per_fleet=args.workers_per_fleet,
                 latency_scale=args.latency_scale,
                 redis_cluster=getattr(args, "cluster", False),
                 cluster_replicas=getattr(args, "cluster_replicas", 0)) as cluster:
        recorded = cluster.settings_record()
        async with Client(cluster.url, prefix=cluster.prefix) as client, \
                LoadGenerators(cluster, "create", procs=args.loadgen_procs) as gens:
            await closed_loop(client, concurrency=50, count=500)  # warm-up
            # Each generator opens the connections its share of the top step holds
            # (every create in flight waits on one BLPOP).
            await gens.warm(count=400, concurrency=min(400, max(50, int(max(args.rates) * 0.25 / gens.procs))))
            for rate in args.rates:
                await wait_drained(client)
                step = await measured_step(cluster, gens, rate, args.step_s)
                steps.append(step)
                cp = step["control_plane_latency"]
                say(step_line("", rate, step, cp, 1) + f"errors {step['errors']}  "
                    f"sched cpu {step['scheduler_cpu_pct']}% rss {step['scheduler_rss_mib']} MiB  "
                    f"cpu/create {step.get('cpu_ms_per_op')} ms (load generator "
                    f"{step['loadgen_cpu_pct']}%)  "
                    f"redis {step['redis_ops_per_s']} ops/s {step['redis_used_memory_mib']} MiB")
                if cp["p99_ms"] > P99_LIMIT_S * 1000 or step["errors"]:
                    why = (f"errors {step['error_kinds']}" if step["errors"]
                           else f"control-plane p99 {cp['p99_ms']} ms > {P99_LIMIT_S * 1000:.0f} ms")
                    capacity = {"failed_at_offered": rate, "why": why}
                    break
    ok = [s for s in steps if not (capacity and s["offered_rate"] == capacity["failed_at_offered"])]
    best = max(ok, key=lambda s: s["achieved_rate"]) if ok else None
    cap_rate = best["achieved_rate"] if best else 0.0
    line = (f"capacity ({LABEL}): {cap_rate:.0f} cold creates/s with p99 <= {P99_LIMIT_S * 1000:.0f} ms "
            + (f"(next step {capacity['failed_at_offered']}/s failed: {capacity['why']})" if capacity
               else "(every step passed)"))
    say(line)
    return {"steps": steps, "capacity_rate": cap_rate, "capacity_line": line, "limit": capacity,
            "cluster": recorded}

