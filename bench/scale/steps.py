"""What the phases of ``python -m bench scale`` share: labels, progress lines, the
cost of a step in CPU, and ending what a phase made."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable
from typing import Any

import anyio

from bench.common.cluster import Cluster, delta, loadavg
from bench.common.loadgen import LoadGenerators, Tally, callers, now
from bench.common.stats import summary_ms
from hotbed.client import Client
from hotbed.errors import HotbedError
from hotbed.protocol import Terminate

LABEL = "simulated runtime"
P99_LIMIT_S = 0.100

def step_line(what: str, rate: int, step: dict[str, Any], lat: dict[str, float], digits: int) -> str:
    """The start of a step's progress line: offered vs achieved rate and its latencies."""
    ms = "  ".join(f"{k} {lat[f'{k}_ms']:7.{digits}f}" for k in ("p50", "p90", "p99", "max"))
    return f"  [{LABEL}] {what}offered {rate:>6}/s achieved {step['achieved_rate']:>8}/s  {ms} ms  "


def cpu_line(step: dict[str, Any]) -> str:
    """Where a claims step's CPU went, for its progress line."""
    return (f"cpu/claim {step.get('cpu_ms_per_op')} ms (load generators {step['loadgen_cpu_pct']}%, "
            f"scheduler {step['scheduler_cpu_pct']}%, workers {step['fleet_cpu_pct']}%, "
            f"Redis {step['redis_cpu_pct']}%)")


def say(msg: str) -> None:
    print(msg, flush=True)


def add_cpu_cost(step: dict[str, Any]) -> None:
    """CPU milliseconds the whole control plane spent per completed operation, and the
    rate two dedicated cores would sustain at that cost: on a machine shared with other
    work this is steadier than any measured rate."""
    n = step.get("completed", 0)
    if n:
        ms = 1000 * step["cpu_s_total"] / n
        step["cpu_ms_per_op"] = round(ms, 3)
        step["two_core_ceiling_per_s"] = round(2000 / ms) if ms else None
        if "loadgen_cpu_s" in step:
            # Without the load generator (for a claim that is the client SDK's own work).
            step["cpu_ms_per_op_excl_loadgen"] = round(1000 * (step["cpu_s_total"] - step["loadgen_cpu_s"]) / n, 3)


async def cpu_cost(cluster: Cluster, n: int, work: Any) -> tuple[dict[str, Any], Any]:
    """Python CPU (this process: client and in-process daemons) and Redis CPU per
    operation for ``n`` operations done by ``work()``, the two-core ceiling they imply,
    and what ``work()`` returned."""
    r0, c0, t0 = cluster.redis_info()["cpu_s"], time.process_time(), now()
    result = await work()
    r1, c1, t1 = cluster.redis_info()["cpu_s"], time.process_time(), now()
    py_ms, redis_ms = 1000 * (c1 - c0) / n, 1000 * (r1 - r0) / n
    return {
        "n": n, "python_cpu_ms": round(py_ms, 3), "redis_cpu_ms": round(redis_ms, 3),
        "one_process_rate": round(n / (t1 - t0), 1),
        "two_core_ceiling_per_s": round(2000 / (py_ms + redis_ms)),
    }, result


async def measured_step(cluster: Cluster, gens: LoadGenerators, rate: float, seconds: float) -> dict[str, Any]:
    """One open-loop step: the generators' tally plus what the cluster spent on it."""
    return await _measured(cluster, gens.run(rate, seconds), offered=rate)


async def measured_closed(cluster: Cluster, gens: LoadGenerators, concurrency: int, seconds: float) -> dict[str, Any]:
    """A closed-loop step (``concurrency`` in flight per generator process): the rate
    the system completes at its ceiling, plus what the cluster spent on it."""
    step = await _measured(cluster, gens.run_closed(concurrency, seconds))
    step["concurrency"] = concurrency * gens.procs
    return step


async def _measured(cluster: Cluster, load: Awaitable[Tally], *, offered: float | None = None) -> dict[str, Any]:
    before = cluster.sample()
    tally = await load
    after = cluster.sample()
    step: dict[str, Any] = tally.report(offered=offered)
    step.update(delta(before, after))
    add_cpu_cost(step)
    step["loadavg"] = loadavg()
    return step


async def terminate_all(client: Client, sids: list[tuple[str, str]], *, concurrency: int = 400) -> dict[str, Any]:
    lat: list[float] = []
    errors: Counter[str] = Counter()
    queue = list(sids)
    t0 = now()

    async def terminate_one() -> None:
        sid, wid = queue.pop()
        s = now()
        try:
            await client.worker_request(wid, Terminate(sandbox_id=sid), timeout=60)
            lat.append(now() - s)
        except HotbedError as exc:
            errors[exc.code] += 1

    await callers(concurrency, terminate_one, count=len(queue))
    span = now() - t0
    return {"terminated": len(lat), "errors": dict(errors),
            "rate": round(len(lat) / max(span, 1e-9), 1), "latency": summary_ms(lat)}


async def wait_drained(client: Client, within: float = 30) -> None:
    """Until the request backlog is empty (a poll: the backlog lives in Redis)."""
    with anyio.move_on_after(within):
        while True:
            if await client.redis.xlen(client.keys.requests) == 0:
                return
            await anyio.sleep(0.1)

