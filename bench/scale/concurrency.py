"""Concurrency phase: ramp to many live sandboxes; placement latency, memory and idle
cost at checkpoints; then execs on a sample, the reaper timed, terminate the rest."""

from __future__ import annotations

import argparse
import random
from collections import Counter
from typing import Any

import anyio

from bench.common.cluster import Cluster, delta, loadavg
from bench.common.loadgen import closed_loop, now, open_loop
from bench.common.stats import summary_ms
from bench.scale.steps import (
    LABEL,
    say,
    terminate_all,
    wait_drained,
)
from hotbed.client import Client
from hotbed.errors import HotbedError
from hotbed.sandbox import Sandbox


async def phase_concurrency(args: argparse.Namespace) -> dict[str, Any]:
    checkpoints = sorted({c for c in (1_000, 10_000, 100_000) if c < args.live} | {args.live})
    points: list[dict[str, Any]] = []
    out: dict[str, Any] = {"target_live": args.live, "points": points}
    with Cluster(fleets=args.fleets, workers_per_fleet=args.workers_per_fleet,
                 latency_scale=args.latency_scale) as cluster:
        out["cluster"] = cluster.settings_record()
        async with Client(cluster.url, prefix=cluster.prefix) as client:
            await anyio.sleep(1.0)
            base = cluster.redis_info()["used_memory"]
            sids: list[tuple[str, str]] = []
            t_fill = now()
            for cp in checkpoints:
                need = cp - len(sids)
                if need > 0:
                    tally = await closed_loop(client, concurrency=args.concurrency, count=need)
                    sids.extend(tally.sids)
                    if tally.errors:
                        say(f"  fill errors: {dict(tally.errors)}")
                await wait_drained(client)
                await anyio.sleep(1.5)  # heartbeats flush, replies expire from view
                idle0 = cluster.sample()
                await anyio.sleep(3.0)
                idle1 = cluster.sample()
                idle = delta(idle0, idle1)
                probe = await open_loop(client, args.probe_rate, args.probe_n / args.probe_rate)
                sids.extend(probe.sids)
                live = len(sids)
                mem = cluster.redis_info()["used_memory"]
                point = {
                    "live": live,
                    "placement": probe.report(offered=args.probe_rate),
                    "scheduler_rss_mib": idle["scheduler_rss_mib"],
                    "fleet_rss_mib": idle["fleet_rss_mib"],
                    "redis_used_memory_mib": round(mem / 2**20, 1),
                    "redis_bytes_per_sandbox": round((mem - base) / max(live, 1)),
                    "idle_scheduler_cpu_pct": idle["scheduler_cpu_pct"],
                    "idle_fleet_cpu_pct": idle["fleet_cpu_pct"],
                    "idle_redis_cpu_pct": idle["redis_cpu_pct"],
                    "idle_redis_ops_per_s": idle["redis_ops_per_s"],
                    "loadavg": loadavg(),
                }
                # Marginal cost: the growth since the previous point over the sandboxes added
                # (the absolute figure also carries fixed costs: client connections, streams).
                prev_live, prev_mem = (points[-1]["live"], points[-1]["_mem"]) if points else (0, base)
                point["redis_marginal_bytes_per_sandbox"] = round((mem - prev_mem) / max(live - prev_live, 1))
                sample_ids = random.Random(live).sample(sids, min(200, len(sids)))
                rec_bytes = [await client.redis.memory_usage(client.keys.sandbox(s)) or 0 for s, _ in sample_ids]
                point["record_hash_bytes"] = round(sum(rec_bytes) / max(len(rec_bytes), 1))
                point["_mem"] = mem
                points.append(point)
                pl = point["placement"]["control_plane_latency"]
                say(f"  [{LABEL}] live {live:>7}: placement p50 {pl['p50_ms']} p99 {pl['p99_ms']} ms; "
                    f"scheduler RSS {point['scheduler_rss_mib']} MiB; Redis {point['redis_used_memory_mib']} MiB "
                    f"= {point['redis_bytes_per_sandbox']} B/sandbox (marginal {point['redis_marginal_bytes_per_sandbox']} B, "
                    f"record hash {point['record_hash_bytes']} B); idle CPU: scheduler "
                    f"{point['idle_scheduler_cpu_pct']}% workers {point['idle_fleet_cpu_pct']}% "
                    f"redis {point['idle_redis_cpu_pct']}% ({point['idle_redis_ops_per_s']} ops/s)")
            out["fill_seconds"] = round(now() - t_fill, 1)
            # Hold: touch a sample with execs.
            sample = random.Random(1).sample(sids, min(len(sids), args.exec_n))
            lat: list[float] = []
            errors: Counter[str] = Counter()

            async def touch(sid: str, wid: str) -> None:
                sb = Sandbox(sid, wid, client=client)
                s = now()
                try:
                    r = await sb.exec("true")
                    lat.append(now() - s - r.duration_s)
                except HotbedError as exc:
                    errors[exc.code] += 1

            limiter = anyio.CapacityLimiter(args.concurrency)

            async def limited(sid: str, wid: str) -> None:
                async with limiter:
                    await touch(sid, wid)

            async with anyio.create_task_group() as tg:
                for sid, wid in sample:
                    tg.start_soon(limited, sid, wid)
            out["hold_exec"] = {"n": len(lat), "errors": dict(errors),
                                "control_plane_latency": summary_ms(lat)}
            say(f"  [{LABEL}] exec on {len(sample)} of {len(sids)} live: control-plane "
                f"p50 {out['hold_exec']['control_plane_latency']['p50_ms']} "
                f"p99 {out['hold_exec']['control_plane_latency']['p99_ms']} ms, errors {dict(errors)}")
            if args.reap and len(cluster.fleets) > 1:
                # Reaper cost: one fleet process dies (SIGKILL); time until the reaper has
                # removed its workers and marked every sandbox they held lost.
                dead = cluster.fleets[-1]
                prefix = f"sim{len(cluster.fleets) - 1}-"
                lost = [s for s in sids if s[1].startswith(prefix)]
                sids = [s for s in sids if not s[1].startswith(prefix)]
                n_workers = await client.redis.zcard(client.keys.workers)
                before = cluster.sample()
                t_kill = now()
                dead.kill()
                dead.wait()
                detected = None
                with anyio.move_on_after(120):
                    while True:
                        left_workers = await client.redis.zcard(client.keys.workers)
                        if detected is None and left_workers < n_workers:
                            detected = now()
                        if left_workers <= n_workers - cluster.workers_per_fleet and (
                            await client.redis.zcard(client.keys.sandboxes) <= len(sids)
                        ):
                            break
                        await anyio.sleep(0.05)
                done_t = now()
                after = cluster.sample()
                cluster.fleets.remove(dead)
                out["reap"] = {
                    "workers_killed": cluster.workers_per_fleet, "sandboxes_lost": len(lost),
                    "heartbeat_ttl_s": cluster.heartbeat_ttl_s,
                    "detect_s": round((detected or done_t) - t_kill, 2),
                    "reap_s_after_detect": round(done_t - (detected or done_t), 2),
                    "scheduler_cpu_s": round(after["scheduler"]["cpu_s"] - before["scheduler"]["cpu_s"], 2),
                    "redis_cpu_s": round(after["redis"]["cpu_s"] - before["redis"]["cpu_s"], 2),
                }
                say(f"  [{LABEL}] killed {cluster.workers_per_fleet} workers holding {len(lost)} sandboxes: "
                    f"reaper noticed after {out['reap']['detect_s']}s (TTL {cluster.heartbeat_ttl_s:g} s), marked all lost "
                    f"{out['reap']['reap_s_after_detect']}s later; scheduler CPU "
                    f"{out['reap']['scheduler_cpu_s']}s, Redis CPU {out['reap']['redis_cpu_s']}s")
            if args.terminate:
                out["terminate"] = await terminate_all(client, sids, concurrency=args.concurrency)
                say(f"  [{LABEL}] terminated {out['terminate']['terminated']} at "
                    f"{out['terminate']['rate']}/s, errors {out['terminate']['errors']}")
    return out

