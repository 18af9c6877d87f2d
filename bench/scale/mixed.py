"""Mixed phase: SWE-agent-shaped sessions (create, execs with think time, file
writes, terminate), many at once."""

from __future__ import annotations

import argparse
import random
from collections import Counter
from typing import Any

import anyio

from bench.common.cluster import Cluster, delta, loadavg
from bench.common.loadgen import now
from bench.common.stats import summary_ms
from bench.scale.steps import (
    LABEL,
    say,
)
from hotbed.client import Client
from hotbed.errors import HotbedError
from hotbed.sandbox import Sandbox


async def phase_mixed(args: argparse.Namespace) -> dict[str, Any]:
    create_lat: list[float] = []
    exec_lat: list[float] = []
    file_lat: list[float] = []
    errors: Counter[str] = Counter()
    done = [0]
    with Cluster(fleets=args.fleets, workers_per_fleet=args.workers_per_fleet,
                 latency_scale=args.latency_scale) as cluster:
        recorded = cluster.settings_record()
        async with Client(cluster.url, prefix=cluster.prefix) as client:

            async def session(i: int) -> None:
                rng = random.Random(i)
                await anyio.sleep(rng.uniform(0, args.ramp_s))
                try:
                    s = now()
                    sb = await Sandbox.create(
                        "sim", cpu=0.25, memory_mb=256, allow_unisolated=True, client=client, timeout=600,
                    )
                    create_lat.append(now() - s - sb.startup_s)
                    for k in range(rng.randint(20, 50)):
                        await anyio.sleep(rng.uniform(*args.think_s))
                        if k % 10 == 3:
                            s = now()
                            await sb.write_file(f"/work/f{k}.py", b"x" * rng.randint(100, 4000))
                            file_lat.append(now() - s)
                        s = now()
                        r = await sb.exec("python", "-c", "pass")
                        exec_lat.append(now() - s - r.duration_s)
                    await sb.terminate()
                    done[0] += 1
                except HotbedError as exc:
                    errors[exc.code] += 1

            before = cluster.sample()
            t0 = now()
            with anyio.move_on_after(args.mixed_max_s) as scope:
                async with anyio.create_task_group() as tg:
                    for i in range(args.sessions):
                        tg.start_soon(session, i)
            after = cluster.sample()
            span = now() - t0
    res: dict[str, Any] = {
        "sessions": args.sessions, "completed": done[0], "cut_off": scope.cancelled_caught,
        "seconds": round(span, 1), "errors": dict(errors),
        "execs": len(exec_lat), "exec_rate": round(len(exec_lat) / span, 1),
        "create_control_plane_latency": summary_ms(create_lat),
        "exec_control_plane_latency": summary_ms(exec_lat),
        "write_file_latency": summary_ms(file_lat),
        "think_s": list(args.think_s), "cluster": recorded,
        **delta(before, after), "loadavg": loadavg(),
    }
    say(f"  [{LABEL}] {done[0]}/{args.sessions} sessions in {span:.1f}s, {res['exec_rate']} execs/s; "
        f"exec control-plane p50 {res['exec_control_plane_latency']['p50_ms']} "
        f"p99 {res['exec_control_plane_latency']['p99_ms']} ms; errors {dict(errors)}")
    return res

