"""``python -m bench scale``: the control plane under load, on simulated workers.

Drives the real scheduler (separate processes) and a private real Redis with many
simulated worker agents (``workers.simfleet``: real WorkerAgents on the ``sim``
runtime, a few processes of 25 each). Everything it prints is labelled "simulated
runtime": it measures hotbed's scheduler, Redis schema and protocol, not sandboxes.

Phases (``--phases``, default all; one module each in this package):

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

* ``claims``: warm-pool claims (``claim_nowait``) from a filled pool at rising
  open-loop rates (``--claim-rates``), refills throttled.
* ``cost``: CPU per cold create and per warm claim, the client, a scheduler and 10
  simulated workers in this one process.

``--cluster``: the ``throughput`` and ``claims`` phases (the default then, and the only
ones it takes) against a local Redis Cluster (3 primaries, ``--cluster-replicas`` each)
instead of one standalone Redis; written to ``bench/results/scale-cluster.json``.

Writes ``bench/results/scale.json`` (``--out``; one run, one file: see
:mod:`bench.common.results`) and ``bench/results/scale.png``.
The run bounds its own duration: every phase has a fixed length or a fixed count, and
every request a deadline. Only loopback is used.
"""

from __future__ import annotations

import argparse
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec

from bench.common import results
from bench.common.cluster import loadavg
from bench.scale.claims import phase_claims
from bench.scale.concurrency import phase_concurrency
from bench.scale.cost import phase_cost
from bench.scale.mixed import phase_mixed
from bench.scale.placement import phase_placement
from bench.scale.plot import plot
from bench.scale.replicas import phase_replicas
from bench.scale.steps import LABEL, say
from bench.scale.throughput import phase_throughput
from workers.runtimes.sim import SimParams

PHASES: dict[str, Callable[[argparse.Namespace], Awaitable[dict[str, Any]]]] = {
    "cost": phase_cost, "throughput": phase_throughput, "claims": phase_claims,
    "replicas": phase_replicas, "concurrency": phase_concurrency, "mixed": phase_mixed,
}


# The phases that run on a Redis Cluster too (--cluster).
CLUSTER_PHASES = {"throughput", "claims"}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__.split("\n")[0])
    p.add_argument("--phases", default=None,
                   help="default: cost,throughput,claims,replicas,placement,concurrency,mixed "
                        "(with --cluster: throughput,claims)")
    p.add_argument("--cluster", action="store_true",
                   help="the throughput and claims phases on a local Redis Cluster")
    p.add_argument("--cluster-replicas", type=int, default=1, help="with --cluster: replicas per primary")
    p.add_argument("--cost-n", type=int, default=10_000, help="operations in the cost phase")
    p.add_argument("--claim-rates", default="1000,2500,5000,6000,7000,8000")
    p.add_argument("--claim-step-s", type=float, default=3.0,
                   help="seconds per claim step (the pool is filled for all steps first)")
    p.add_argument("--pool-refill", type=float, default=3000.0, help="pool refills/s allowed")
    p.add_argument("--fill-max-s", type=float, default=90.0)
    p.add_argument("--claim-refill", type=float, default=100.0,
                   help="pool refills/s allowed while claims are measured")
    p.add_argument("--claim-closed-s", type=float, default=0.0,
                   help="claims phase: seconds of a closed-loop step after the open-loop ones, "
                        "whose rate is the ceiling (0: none)")
    p.add_argument("--claim-closed-concurrency", type=int, default=200,
                   help="claims in flight per load-generator process in that step")
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
    p.add_argument("--out", default=None, help="default bench/results/scale.json (--cluster: scale-cluster.json)")
    args = p.parse_args(argv)
    if args.phases is None:
        args.phases = "throughput,claims" if args.cluster else "cost,throughput,claims,replicas,placement,concurrency,mixed"
    if args.out is None:
        args.out = str(results.RESULTS / ("scale-cluster.json" if args.cluster else "scale.json"))
    if args.cluster and {x.strip() for x in args.phases.split(",") if x.strip()} - CLUSTER_PHASES:
        p.error(f"--cluster runs only the {', '.join(sorted(CLUSTER_PHASES))} phases")
    unknown = {x.strip() for x in args.phases.split(",") if x.strip()} - {*PHASES, "placement"}
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}; have placement, {', '.join(PHASES)}")
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


def save(doc: dict[str, Any], out: Path, *, finished: bool) -> None:
    for p in doc.get("concurrency", {}).get("points", []):
        p.pop("_mem", None)
    results.write(out, doc, finished=finished)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    args = parse(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    params = SimParams().scaled(args.latency_scale)
    run = results.new_run("scale", argv)
    say(f"hotbed bench scale — {LABEL} (no containers; loads the real scheduler + Redis)")
    say(f"machine: {run['machine']}; loadavg {loadavg()}")
    say(f"simulated runtime model (workers.runtimes.sim defaults, x{args.latency_scale:g}): "
        f"{msgspec.json.encode(params).decode()}")
    doc: dict[str, Any] = {
        "run": run, "label": LABEL, "loadavg_start": loadavg(), "sim_params": msgspec.to_builtins(params),
        "fleets": args.fleets, "workers": args.fleets * args.workers_per_fleet,
        "redis": (f"local Redis Cluster, 3 primaries x {args.cluster_replicas} replicas"
                  if args.cluster else "standalone"),
    }
    out = Path(args.out)

    async def run_all() -> None:
        for phase in phases:
            say(f"== {phase}")
            t = time.monotonic()
            if phase == "placement":
                doc[phase] = phase_placement(args)
            else:
                doc[phase] = await PHASES[phase](args)
            doc[phase]["phase_seconds"] = round(time.monotonic() - t, 1)
            # After every phase: a run cut short keeps what it measured (marked unfinished).
            save(doc, out, finished=False)

    # SIGTERM ends the run like Ctrl-C: the clusters' context managers stop what they started.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    anyio.run(run_all, backend="asyncio", backend_options={"use_uvloop": True})
    doc["loadavg_end"] = loadavg()
    save(doc, out, finished=True)
    png = out.with_suffix(".png")
    if plot(doc, png):
        say(f"wrote {out} and {png}")
    else:
        say(f"wrote {out}")
    return 0
