"""Replicas phase: closed-loop creates with one scheduler, then two sharing the
stream; counts double placements."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

import anyio

from bench.common.cluster import Cluster, delta, loadavg
from bench.common.loadgen import closed_loop
from bench.scale.steps import (
    LABEL,
    add_cpu_cost,
    say,
)
from hotbed.client import Client


async def phase_replicas(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with Cluster(fleets=args.fleets, workers_per_fleet=args.workers_per_fleet,
                 latency_scale=args.latency_scale) as cluster:
        out["cluster"] = cluster.settings_record()
        async with Client(cluster.url, prefix=cluster.prefix) as client:
            await closed_loop(client, concurrency=50, count=500)
            all_sids: list[tuple[str, str]] = []
            for n in (1, 2):
                if n == 2:
                    cluster.start_scheduler()
                    await anyio.sleep(1.5)
                before = cluster.sample()
                tally = await closed_loop(client, concurrency=args.concurrency, seconds=args.step_s)
                after = cluster.sample()
                res = tally.report()
                res.update(delta(before, after))
                add_cpu_cost(res)
                res["loadavg"] = loadavg()
                out[f"schedulers_{n}"] = res
                all_sids.extend(tally.sids)
                say(f"  [{LABEL}] {n} scheduler(s): {res['achieved_rate']}/s closed-loop "
                    f"(concurrency {args.concurrency}), p99 {res['latency']['p99_ms']} ms, "
                    f"errors {res['errors']}")
            # Every create answered once, every sandbox held by exactly one worker.
            held: Counter[str] = Counter()
            workers = [m.decode() for m in await client.redis.zrange(client.keys.workers, 0, -1)]
            for wid in workers:
                for raw in await client.redis.hkeys(client.keys.worker_sandboxes(wid)):
                    held[raw.decode()] += 1
            returned = Counter(s for s, _ in all_sids)
            out["double_placed"] = sum(1 for v in held.values() if v > 1)
            out["duplicate_replies"] = sum(1 for v in returned.values() if v > 1)
            out["replied_not_held"] = sum(1 for s in returned if s not in held)
            one = out["schedulers_1"]["achieved_rate"]
            two = out["schedulers_2"]["achieved_rate"]
            out["speedup"] = round(two / one, 2) if one else None
            say(f"  two replicas / one: {out['speedup']}x; double placements {out['double_placed']}, "
                f"duplicate replies {out['duplicate_replies']}, replied but not held {out['replied_not_held']}")
    return out

