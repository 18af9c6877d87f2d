"""``python -m bench scale``: the control plane under load, on simulated workers.

Drives the real scheduler (separate processes) and a private real Redis with many
simulated worker agents (``workers.simfleet``: real WorkerAgents on the ``sim``
runtime, a few processes of 25 each). Everything it prints is labelled "simulated
runtime": it measures hotbed's scheduler, Redis schema and protocol, not sandboxes.

Phases (``--phases``, default all):

* ``throughput``: open-loop creates at rising rates (``--rates``) for ``--step-s`` each:
  achieved rate, p50/p90/p99/max latency, errors, scheduler CPU/RSS, Redis memory and
  ops/s. Latency is end to end and also "control plane" (end to end minus the
  simulated boot time the worker reports). The first step whose control-plane p99
  passes 100 ms or that has errors ends the climb; the step before it is the capacity.
* ``replicas``: closed-loop creates at full speed with one scheduler, then with two
  sharing the stream; checks that no sandbox was placed twice.
* ``concurrency``: ramp to ``--live`` live sandboxes; at 1k / 10k / 100k live, placement
  latency of a probe, scheduler RSS, Redis memory per sandbox, and the idle CPU of the
  scheduler and the workers (heartbeats, reaper, expiry); then execs on a sample and
  terminate everything.
* ``placement``: the cost of ranking workers (pure function) against fleet size.
* ``mixed``: SWE-agent-shaped sessions: create, 20-50 execs with think time, a few
  file writes, terminate; ``--sessions`` at once.

Writes ``bench/results/scale.json`` (``--out``) and ``bench/results/scale.png``.
The run bounds its own duration: every phase has a fixed length or a fixed count, and
every request a deadline. Only loopback is used.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import anyio
import msgspec

from bench._cluster import Cluster, delta, loadavg, machine
from hotbed.client import Client
from hotbed.errors import HotbedError
from hotbed.protocol import (
    CreateSandbox,
    ErrorReply,
    Resources,
    SandboxCreated,
    SandboxSpec,
    Terminate,
)
from hotbed.sandbox import Sandbox
from workers.runtimes.sim import SimParams

LABEL = "simulated runtime"
RESULTS = Path(__file__).resolve().parent / "results"
SPEC = SandboxSpec(image="sim", resources=Resources(cpu=0.25, memory_mb=256), timeout=3600)
P99_LIMIT_S = 0.100


def now() -> float:
    """Timing clock: uvloop's loop clock (anyio.current_time) only has 1 ms steps."""
    return time.perf_counter()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary_ms(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(pct(values, 0.50) * 1000, 2),
        "p90_ms": round(pct(values, 0.90) * 1000, 2),
        "p99_ms": round(pct(values, 0.99) * 1000, 2),
        "max_ms": round(max(values) * 1000, 2) if values else float("nan"),
    }


def step_line(what: str, rate: int, step: dict[str, Any], lat: dict[str, float], digits: int) -> str:
    """The start of a step's progress line: offered vs achieved rate and its latencies."""
    ms = "  ".join(f"{k} {lat[f'{k}_ms']:7.{digits}f}" for k in ("p50", "p90", "p99", "max"))
    return f"  [{LABEL}] {what}offered {rate:>6}/s achieved {step['achieved_rate']:>8}/s  {ms} ms  "


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


async def cpu_cost(cluster: Any, n: int, work: Any) -> tuple[dict[str, Any], Any]:
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


async def measured_step(cluster: Any, gens: Any, rate: float, seconds: float) -> dict[str, Any]:
    """One open-loop step: the generators' tally plus what the cluster spent on it."""
    before = cluster.sample()
    tally = await gens.run(rate, seconds)
    after = cluster.sample()
    step: dict[str, Any] = tally.report(offered=rate)
    step.update(delta(before, after))
    add_cpu_cost(step)
    step["loadavg"] = loadavg()
    return step


class Tally:
    def __init__(self) -> None:
        self.e2e: list[float] = []
        self.cp: list[float] = []
        self.errors: Counter[str] = Counter()
        self.sids: list[tuple[str, str]] = []
        # When each reply arrived (perf_counter).
        self.done_at: list[float] = []
        self.first = 0.0
        self.first_reply = float("inf")
        self.last = 0.0

    def ok(self, started: float, reply: SandboxCreated) -> None:
        t = now()
        self.e2e.append(t - started)
        self.cp.append(max(0.0, t - started - reply.startup_s))
        self.sids.append((reply.sandbox_id, reply.worker_id))
        self.done_at.append(t)
        self.first_reply = min(self.first_reply, t)
        self.last = max(self.last, t)

    def report(self, offered: float | None = None) -> dict[str, Any]:
        n = len(self.e2e)
        # Replies per second while they flowed (the simulated boot time shifts the
        # whole reply stream; it does not stretch it).
        span = max(1e-9, self.last - self.first_reply) * n / max(n - 1, 1)
        out: dict[str, Any] = {
            "completed": n,
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
            "achieved_rate": steady_rate(self.done_at) if len(self.done_at) >= 100 else (
                round(n / span, 1) if n else 0.0),
            # First reply to last: the simulated boot time's jitter (+-20 %) spreads the
            # edges of the reply stream, which over a few-second step reads a few
            # percent low; kept for comparison with earlier runs.
            "achieved_rate_full_span": round(n / span, 1) if n else 0.0,
            "latency": summary_ms(self.e2e),
            "control_plane_latency": summary_ms(self.cp),
        }
        if offered is not None:
            out["offered_rate"] = offered
        return out


def steady_rate(done_at: list[float]) -> float:
    """Replies per second over the middle 98 % of the reply stream (1st to 99th
    percentile of arrival times): the rate the system kept up, not counting the ramp-in
    and ramp-out that a random boot time adds at the step's edges."""
    t = sorted(done_at)
    lo, hi = int(0.01 * len(t)), int(0.99 * len(t))
    if hi <= lo or t[hi] <= t[lo]:
        return 0.0
    return round((hi - lo) / (t[hi] - t[lo]), 1)


async def create_one(client: Client, tally: Tally, started: float, timeout_s: float) -> None:
    try:
        reply = await client.call(client.keys.requests, CreateSandbox(spec=SPEC), timeout=timeout_s)
    except HotbedError as exc:
        tally.errors[exc.code] += 1
        return
    if isinstance(reply, ErrorReply):
        tally.errors[reply.code] += 1
    else:
        assert isinstance(reply, SandboxCreated)
        tally.ok(started, reply)


# One request of a load: ``op(client, tally, started)`` records its outcome in ``tally``.
Op = Callable[[Client, Tally, float], Awaitable[None]]


async def create_op(client: Client, tally: Tally, started: float) -> None:
    await create_one(client, tally, started, timeout_s=30)


def claim_spec(template: str) -> SandboxSpec:
    return SandboxSpec(image="sim", template=template,
                       resources=Resources(cpu=0.25, memory_mb=256), timeout=3600)


def claim_op(template: str) -> Op:
    """A warm-pool claim (``claim_nowait``: Lua against Redis, no scheduler round trip)."""
    from hotbed import templates

    spec = claim_spec(template)

    async def claim(client: Client, tally: Tally, started: float) -> None:
        try:
            got = await templates.claim_nowait(spec, client=client)
        except HotbedError as exc:
            tally.errors[exc.code] += 1
            return
        if got is None:
            tally.errors["pool_empty"] += 1
        else:
            tally.ok(started, got)

    return claim


async def open_loop(
    client: Client, rate: float, seconds: float, *, op: Op = create_op, part: int = 0,
    parts: int = 1, t0: float | None = None, max_outstanding: int = 20_000,
    lane_slack_s: float = 2.0,
) -> Tally:
    """``rate`` requests/s for ``seconds``, each timed from when it was due (no
    coordinated omission). With ``parts`` > 1 this caller issues every ``parts``-th
    request of the schedule from ``part`` on, so several processes started on the same
    ``t0`` (``perf_counter`` is CLOCK_MONOTONIC, shared by the processes of a host)
    together offer ``rate``.

    No task per request: a fixed set of lanes (tasks) takes the schedule round robin,
    each sleeping until its next request is due. A lane comes round every
    ``lane_slack_s`` seconds, so the load stays open as long as requests take less than
    that; a lane still busy when its next request is due issues it late, and that
    request's latency, timed from when it was due, shows it."""
    tally = Tally()
    n = int(rate * seconds)
    mine = range(part, n, parts)
    lanes = max(1, min(len(mine), max_outstanding, int(rate / parts * lane_slack_s) + 1))

    async def lane(first: int) -> None:
        for i in mine[first::lanes]:
            due = t0_ + i / rate
            wait = due - now()
            if wait > 0:
                await anyio.sleep(wait)
            await op(client, tally, due)

    t0_ = now() if t0 is None else t0
    tally.first = t0_
    async with anyio.create_task_group() as tg:
        for k in range(lanes):
            tg.start_soon(lane, k)
    return tally


async def closed_loop(
    client: Client, *, concurrency: int, seconds: float | None = None, count: int | None = None,
    op: Op = create_op,
) -> Tally:
    """``concurrency`` callers back to back, for ``seconds`` or ``count`` requests."""
    tally = Tally()
    t0 = tally.first = now()
    left = [count if count is not None else 1 << 62]

    async def caller() -> None:
        while left[0] > 0 and (seconds is None or now() - t0 < seconds):
            left[0] -= 1
            await op(client, tally, now())

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(caller)
    return tally


def merge(tallies: list[Tally]) -> Tally:
    out = Tally()
    for t in tallies:
        out.e2e += t.e2e
        out.cp += t.cp
        out.errors.update(t.errors)
        out.sids += t.sids
        out.done_at += t.done_at
        out.first = min(t.first, out.first) if out.first else t.first
        out.first_reply = min(out.first_reply, t.first_reply)
        out.last = max(out.last, t.last)
    return out


# ------------------------------------------------------------- load generators


class LoadGenerators:
    """``procs`` load-generator processes that share one open-loop schedule.

    One process cannot offer thousands of requests a second and also run the client
    side of each (for a warm claim the client *is* the claim: it runs the Lua steps), so
    each process runs its own event loop and :class:`Client` and issues every
    ``procs``-th request of the schedule; their latency samples are merged. Their CPU is
    sampled from /proc through ``cluster.loadgen_pids`` and reported as the load
    generator's, apart from the control plane's. ``op`` names what each request is:
    ``"create"`` or ``"claim:TEMPLATE"``. Use ``async with``.
    """

    def __init__(self, cluster: Cluster, op: str, *, procs: int) -> None:
        self.cluster = cluster
        self.op = op
        self.procs = max(1, procs)
        self._conns: list[Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []

    async def __aenter__(self) -> LoadGenerators:
        ctx = multiprocessing.get_context("spawn")

        def start() -> None:
            for part in range(self.procs):
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(
                    target=generator_process, name=f"hotbed-loadgen-{part}", daemon=True,
                    args=(theirs, self.cluster.url, self.cluster.prefix, self.op, part, self.procs),
                )
                proc.start()
                theirs.close()
                self._conns.append(mine)
                self._procs.append(proc)

        try:
            await anyio.to_thread.run_sync(start)
            pids = [await self._recv(c, "ready") for c in self._conns]
        except BaseException:
            await self.__aexit__()
            raise
        self.cluster.loadgen_pids = [int(p) for p in pids]
        return self

    async def _recv(self, conn: Connection, want: str) -> Any:
        msg = await anyio.to_thread.run_sync(conn.recv)
        if msg[0] != want:
            raise RuntimeError(f"load generator answered {msg!r}, expected {want!r}")
        return msg[1]

    async def warm(self, *, count: int, concurrency: int) -> None:
        """Each process runs ``count`` requests closed-loop (connections, scripts)."""
        for c in self._conns:
            c.send(("warm", count, concurrency))
        for c in self._conns:
            await self._recv(c, "warmed")

    async def run(self, rate: float, seconds: float) -> Tally:
        # Time for every process to start its lanes before the first request is due.
        t0 = now() + 0.1 + 0.5 * min(1.0, rate / 8000)
        for c in self._conns:
            c.send(("run", rate, seconds, t0))
        tallies = []
        for c in self._conns:
            e2e, cp, done_at, errors, first_reply, last = await self._recv(c, "done")
            t = Tally()
            t.e2e, t.cp, t.done_at, t.errors = e2e, cp, done_at, Counter(errors)
            t.first, t.first_reply, t.last = t0, first_reply, last
            tallies.append(t)
        return merge(tallies)

    async def __aexit__(self, *exc: object) -> None:
        for c in self._conns:
            try:
                c.send(("stop",))
            except OSError:
                pass

        def join() -> None:
            for p in self._procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join()

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(join)
        for c in self._conns:
            c.close()
        self.cluster.loadgen_pids = []


def generator_process(conn: Connection, url: str, prefix: str, op: str, part: int, parts: int) -> None:
    """A load generator's process (multiprocessing target): serves ``warm`` / ``run``
    / ``stop`` messages from the parent until ``stop`` or the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends the run
    do: Op = claim_op(op.split(":", 1)[1]) if op.startswith("claim:") else create_op

    async def serve() -> None:
        async with Client(url, prefix=prefix) as client:
            # Tens of thousands of latency samples and in-flight requests: no long
            # collection pauses in the middle of a step (as workers.simfleet does).
            gc.freeze()
            gc.set_threshold(20_000, 20, 100)
            conn.send(("ready", os.getpid()))
            while True:
                try:
                    msg = await anyio.to_thread.run_sync(conn.recv)
                except EOFError:
                    return
                if msg[0] == "warm":
                    await closed_loop(client, concurrency=msg[2], count=msg[1], op=do)
                    conn.send(("warmed", None))
                elif msg[0] == "run":
                    _, rate, seconds, t0 = msg
                    t = await open_loop(client, rate, seconds, op=do, part=part, parts=parts, t0=t0)
                    conn.send(("done", (t.e2e, t.cp, t.done_at, dict(t.errors), t.first_reply, t.last)))
                else:
                    return

    anyio.run(serve, backend="asyncio", backend_options={"use_uvloop": True})


async def terminate_all(client: Client, sids: list[tuple[str, str]], *, concurrency: int = 400) -> dict[str, Any]:
    lat: list[float] = []
    errors: Counter[str] = Counter()
    queue = list(sids)
    t0 = now()

    async def caller() -> None:
        while queue:
            sid, wid = queue.pop()
            s = now()
            try:
                await client.worker_request(wid, Terminate(sandbox_id=sid), timeout=60)
                lat.append(now() - s)
            except HotbedError as exc:
                errors[exc.code] += 1

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(caller)
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


# ----------------------------------------------------------------------- phases


async def phase_throughput(args: argparse.Namespace) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    capacity: dict[str, Any] | None = None
    with Cluster(fleets=args.fleets, workers_per_fleet=args.workers_per_fleet,
                 latency_scale=args.latency_scale) as cluster:
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
    return {"steps": steps, "capacity_rate": cap_rate, "capacity_line": line, "limit": capacity}


async def phase_replicas(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with Cluster(fleets=args.fleets, workers_per_fleet=args.workers_per_fleet,
                 latency_scale=args.latency_scale) as cluster:
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


async def phase_concurrency(args: argparse.Namespace) -> dict[str, Any]:
    checkpoints = sorted({c for c in (1_000, 10_000, 100_000) if c < args.live} | {args.live})
    points: list[dict[str, Any]] = []
    out: dict[str, Any] = {"target_live": args.live, "points": points}
    with Cluster(fleets=args.fleets, workers_per_fleet=args.workers_per_fleet,
                 latency_scale=args.latency_scale) as cluster:
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
                    "heartbeat_ttl_s": 15.0,
                    "detect_s": round((detected or done_t) - t_kill, 2),
                    "reap_s_after_detect": round(done_t - (detected or done_t), 2),
                    "scheduler_cpu_s": round(after["scheduler"]["cpu_s"] - before["scheduler"]["cpu_s"], 2),
                    "redis_cpu_s": round(after["redis"]["cpu_s"] - before["redis"]["cpu_s"], 2),
                }
                say(f"  [{LABEL}] killed {cluster.workers_per_fleet} workers holding {len(lost)} sandboxes: "
                    f"reaper noticed after {out['reap']['detect_s']}s (TTL 15 s), marked all lost "
                    f"{out['reap']['reap_s_after_detect']}s later; scheduler CPU "
                    f"{out['reap']['scheduler_cpu_s']}s, Redis CPU {out['reap']['redis_cpu_s']}s")
            if args.terminate:
                out["terminate"] = await terminate_all(client, sids, concurrency=args.concurrency)
                say(f"  [{LABEL}] terminated {out['terminate']['terminated']} at "
                    f"{out['terminate']['rate']}/s, errors {out['terminate']['errors']}")
    return out


def phase_placement(args: argparse.Namespace) -> dict[str, Any]:
    """CPU per placement decision against fleet size: the full scan (``rank``, used for
    GPU / tagged / pack requests) and the heap index (``WorkerRegistry.ranked``, the
    common request)."""
    from hotbed.keys import Keys
    from hotbed.protocol import WorkerInfo
    from scheduler.placement import rank
    from scheduler.registry import WorkerRegistry, WorkerView

    rows = []
    for n in (10, 100, 1_000, 10_000):
        rng = random.Random(n)
        views = {
            f"w{i}": WorkerView(
                info=WorkerInfo(id=f"w{i}", host="h", runtime="sim", cpu_millis=64_000,
                                memory_mb=256_000, kind="simulated"),
                cpu_free=rng.randrange(0, 64_000), mem_free=rng.randrange(0, 256_000))
            for i in range(n)
        }
        reps = max(20, 20_000 // n)
        t = time.perf_counter()
        for _ in range(reps):
            rank(list(views.values()), SPEC)
        scan_us = (time.perf_counter() - t) / reps * 1e6
        reg = WorkerRegistry(None, Keys("x"), heartbeat_ttl_s=5)  # type: ignore[arg-type]
        reg.workers = views
        reg._rebuild()
        reps = 20_000
        t = time.perf_counter()
        for i in range(reps):
            if i % 1000 == 0:
                reg._rebuild()  # the registry refresh does this every 0.5 s
            for w, _g in reg.ranked(SPEC):
                w.cpu_free -= SPEC.resources.millicpu  # what a placement does on success
                break
        index_us = (time.perf_counter() - t) / reps * 1e6
        rows.append({"workers": n, "rank_scan_us": round(scan_us, 1), "index_us": round(index_us, 2)})
        say(f"  placement decision over {n:>6} workers: full scan {scan_us:9.1f} us, "
            f"heap index {index_us:6.2f} us")
    return {"rank": rows}


async def phase_claims(args: argparse.Namespace) -> dict[str, Any]:
    """Warm-pool claims (hotbed.templates.claim_nowait: Lua against Redis, no scheduler
    round trip) at rising open-loop rates, while the pool controller refills."""
    from hotbed import templates

    steps: list[dict[str, Any]] = []
    need = int(sum(args.claim_rates) * args.claim_step_s)
    size = int(need * 1.1) + 500
    env = {"HOTBED_POOL_REFILL_PER_S": str(args.pool_refill), "HOTBED_POOL_MAX_WARMING": "4000"}
    out: dict[str, Any] = {"pool_size": size, "steps": steps}
    with Cluster(fleets=args.fleets, workers_per_fleet=args.workers_per_fleet,
                 latency_scale=args.latency_scale, scheduler_env=env) as cluster:
        async with Client(cluster.url, prefix=cluster.prefix) as client:
            await templates.create_template(
                "simtpl", image="sim", run=["true"], cpu=0.25, memory_mb=256, client=client,
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
            await anyio.sleep(2.0)
            async with LoadGenerators(cluster, "claim:simtpl", procs=args.loadgen_procs) as gens:
                await gens.warm(count=25, concurrency=5)
                for rate in args.claim_rates:
                    step = await measured_step(cluster, gens, rate, args.claim_step_s)
                    steps.append(step)
                    say(step_line("claims ", rate, step, step["latency"], 2) + f"errors {step['error_kinds']}  "
                        f"cpu/claim {step.get('cpu_ms_per_op')} ms (load generators "
                        f"{step['loadgen_cpu_pct']}%, scheduler {step['scheduler_cpu_pct']}%, workers "
                        f"{step['fleet_cpu_pct']}%, Redis {step['redis_cpu_pct']}%)  load {step['loadavg'].split()[0]}")
    ok = [s for s in steps if not s["errors"] and s["latency"]["p99_ms"] <= 50]
    out["capacity_rate"] = max((s["achieved_rate"] for s in ok), default=0.0)
    out["capacity_line"] = (f"warm-pool claims ({LABEL}): {out['capacity_rate']:.0f}/s sustained "
                            f"with p99 <= 50 ms and no errors")
    say(out["capacity_line"])
    return out


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
                                                memory_mb=256, client=client, request_timeout=60)
                pool = await templates.set_pool("costtpl", n + 500, cpu=0.25, memory_mb=256, client=client)
                with anyio.move_on_after(args.fill_max_s):
                    while True:
                        if await client.redis.llen(client.keys.pool_ready(pool)) >= n:
                            break
                        await anyio.sleep(0.2)
                await templates.set_pool("costtpl", 1, cpu=0.25, memory_mb=256, client=client)
                await anyio.sleep(0.5)
                spec = SandboxSpec(image="sim", template="costtpl",
                                   resources=Resources(cpu=0.25, memory_mb=256), timeout=3600)
                errors: Counter[str] = Counter()
                left = [n]

                async def claimer() -> None:
                    while left[0] > 0:
                        left[0] -= 1
                        if await templates.claim_nowait(spec, client=client) is None:
                            errors["pool_empty"] += 1

                async def claimers() -> None:
                    async with anyio.create_task_group() as ctg:
                        for _ in range(200):
                            ctg.start_soon(claimer)

                out["claim"], _ = await cpu_cost(cluster, n, claimers)
                out["claim"]["errors"] = dict(errors)
                py_ms, redis_ms = out["claim"]["python_cpu_ms"], out["claim"]["redis_cpu_ms"]
                say(f"  [{LABEL}] warm claim costs {py_ms:.3f} ms Python CPU (client + worker notice) + "
                    f"{redis_ms:.3f} ms Redis CPU -> two-core ceiling {out['claim']['two_core_ceiling_per_s']}/s "
                    f"(one process did {out['claim']['one_process_rate']}/s; errors {dict(errors)})")
            fleet.stop()
            sched.stopping.set()
    out["loadavg"] = loadavg()
    return out


async def phase_mixed(args: argparse.Namespace) -> dict[str, Any]:
    create_lat: list[float] = []
    exec_lat: list[float] = []
    file_lat: list[float] = []
    errors: Counter[str] = Counter()
    done = [0]
    with Cluster(fleets=args.fleets, workers_per_fleet=args.workers_per_fleet,
                 latency_scale=args.latency_scale) as cluster:
        async with Client(cluster.url, prefix=cluster.prefix) as client:

            async def session(i: int) -> None:
                rng = random.Random(i)
                await anyio.sleep(rng.uniform(0, args.ramp_s))
                try:
                    s = now()
                    sb = await Sandbox.create("sim", cpu=0.25, memory_mb=256, client=client, timeout=600)
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
        "think_s": list(args.think_s),
        **delta(before, after), "loadavg": loadavg(),
    }
    say(f"  [{LABEL}] {done[0]}/{args.sessions} sessions in {span:.1f}s, {res['exec_rate']} execs/s; "
        f"exec control-plane p50 {res['exec_control_plane_latency']['p50_ms']} "
        f"p99 {res['exec_control_plane_latency']['p99_ms']} ms; errors {dict(errors)}")
    return res


# ------------------------------------------------------------------------- plots


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("  (matplotlib not installed: pip install -e '.[bench]' for the plot)")
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    tp = results.get("throughput", {}).get("steps", [])
    if tp:
        ax = axes[0]
        x = [s["offered_rate"] for s in tp]
        for key, style in (("p50_ms", "o-"), ("p90_ms", "s-"), ("p99_ms", "^-")):
            ax.plot(x, [s["control_plane_latency"][key] for s in tp], style, label=key[:3])
        ax.axhline(P99_LIMIT_S * 1000, color="grey", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered creates/s")
        ax.set_ylabel("control-plane create latency (ms)")
        ax.set_title(f"Latency vs offered load ({LABEL})")
        ax.legend()
    pts = results.get("concurrency", {}).get("points", [])
    if pts:
        ax = axes[1]
        x = [p["live"] for p in pts]
        ax.plot(x, [p["redis_used_memory_mib"] for p in pts], "o-", label="Redis used memory (MiB)")
        ax.plot(x, [p["scheduler_rss_mib"] for p in pts], "s-", label="scheduler RSS (MiB)")
        ax.set_xscale("log")
        ax.set_xlabel("live sandboxes")
        ax.set_ylabel("MiB")
        ax.set_title(f"Memory vs live sandboxes ({LABEL})")
        ax.legend()
        ax2 = axes[2]
        ax2.plot(x, [p["placement"]["control_plane_latency"]["p50_ms"] for p in pts], "o-", label="placement p50")
        ax2.plot(x, [p["placement"]["control_plane_latency"]["p99_ms"] for p in pts], "^-", label="placement p99")
        ax2.set_xscale("log")
        ax2.set_xlabel("live sandboxes")
        ax2.set_ylabel("ms")
        ax2.set_title(f"Placement latency vs live ({LABEL})")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# -------------------------------------------------------------------------- main


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__.split("\n")[0])
    p.add_argument("--phases", default="cost,throughput,claims,replicas,placement,concurrency,mixed")
    p.add_argument("--cost-n", type=int, default=10_000, help="operations in the cost phase")
    p.add_argument("--claim-rates", default="1000,2500,5000,6000,7000,8000")
    p.add_argument("--claim-step-s", type=float, default=3.0,
                   help="seconds per claim step (the pool is filled for all steps first)")
    p.add_argument("--pool-refill", type=float, default=3000.0, help="pool refills/s allowed")
    p.add_argument("--fill-max-s", type=float, default=90.0)
    p.add_argument("--claim-refill", type=float, default=100.0,
                   help="pool refills/s allowed while claims are measured")
    p.add_argument("--rates", default="250,500,1000,2000,3000,3500,4000,6000,8000")
    p.add_argument("--step-s", type=float, default=5.0)
    p.add_argument("--fleets", type=int, default=2, help="simfleet processes")
    p.add_argument("--loadgen-procs", type=int, default=2,
                   help="load-generator processes sharing the open-loop schedule (throughput, claims)")
    p.add_argument("--workers-per-fleet", type=int, default=25)
    p.add_argument("--latency-scale", type=float, default=1.0,
                   help="scale the simulated runtime's latencies (1: as measured on runsc)")
    p.add_argument("--concurrency", type=int, default=400, help="closed-loop callers")
    p.add_argument("--live", type=int, default=100_000)
    p.add_argument("--probe-rate", type=float, default=500.0)
    p.add_argument("--probe-n", type=int, default=1000)
    p.add_argument("--exec-n", type=int, default=5000)
    p.add_argument("--no-terminate", dest="terminate", action="store_false")
    p.add_argument("--no-reap", dest="reap", action="store_false",
                   help="skip killing a fleet process to time the reaper")
    p.add_argument("--sessions", type=int, default=2000)
    p.add_argument("--think-s", default="0.2,1.0", help="think time between execs, min,max seconds")
    p.add_argument("--ramp-s", type=float, default=5.0, help="sessions start spread over this")
    p.add_argument("--mixed-max-s", type=float, default=120.0)
    p.add_argument("--quick", action="store_true", help="small numbers for a smoke run (~1 min)")
    p.add_argument("--out", default=str(RESULTS / "scale.json"))
    args = p.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",")]
    args.claim_rates = [float(r) for r in args.claim_rates.split(",")]
    args.think_s = tuple(float(x) for x in args.think_s.split(","))
    if args.quick:
        args.rates = [250.0, 1000.0]
        args.claim_rates = [1000.0, 2000.0]
        args.claim_step_s = 1.0
        args.cost_n = 2000
        args.step_s = 2.0
        args.live = 5_000
        args.exec_n = 500
        args.sessions = 200
        args.probe_n = 200
        args.mixed_max_s = 40.0
    return args


def save(results: dict[str, Any], out: Path) -> None:
    for p in results.get("concurrency", {}).get("points", []):
        p.pop("_mem", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    args = parse(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    params = SimParams().scaled(args.latency_scale)
    say(f"hotbed bench scale — {LABEL} (no containers; loads the real scheduler + Redis)")
    say(f"machine: {machine()}; loadavg {loadavg()}")
    say(f"simulated runtime model (measured on runsc here, x{args.latency_scale:g}): "
        f"{msgspec.json.encode(params).decode()}")
    results: dict[str, Any] = {
        "label": LABEL, "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_start": loadavg(), "sim_params": msgspec.to_builtins(params),
        "fleets": args.fleets, "workers": args.fleets * args.workers_per_fleet,
        "argv": argv,
    }
    runners: dict[str, Callable[[argparse.Namespace], Awaitable[dict[str, Any]]]] = {
        "throughput": phase_throughput, "replicas": phase_replicas,
        "concurrency": phase_concurrency, "mixed": phase_mixed, "claims": phase_claims,
        "cost": phase_cost,
    }

    async def run_all() -> None:
        for phase in phases:
            say(f"== {phase}")
            t = time.monotonic()
            if phase == "placement":
                results[phase] = phase_placement(args)
            else:
                results[phase] = await runners[phase](args)
            results[phase]["phase_seconds"] = round(time.monotonic() - t, 1)
            save(results, Path(args.out))  # after every phase: a cut-short run keeps its data

    # SIGTERM ends the run like Ctrl-C: the clusters' context managers stop what they started.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    anyio.run(run_all, backend="asyncio", backend_options={"use_uvloop": True})
    results["loadavg_end"] = loadavg()
    out = Path(args.out)
    save(results, out)
    png = out.with_suffix(".png")
    if plot(results, png):
        say(f"wrote {out} and {png}")
    else:
        say(f"wrote {out}")
    return 0
