"""Many simulated worker agents in one process, for control-plane load tests.

``python -m workers.simfleet --workers 25 --id-prefix sim-a`` runs 25 real
:class:`~workers.agent.WorkerAgent` instances on the ``sim`` runtime as tasks of one
event loop: each registers, heartbeats and consumes its own command stream exactly like
a node would; only the sandboxes are simulated. Every worker's WorkerInfo says
``kind="simulated"``. Settings come from the same ``HOTBED_*`` variables as a worker
(``HOTBED_REDIS_URL``, ``HOTBED_PREFIX``, ...) plus the options below.

Readiness: once every agent is serving, the process prints one line ``ready N`` on
stdout (for the bench harness); SIGTERM/SIGINT stops them all.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence

import anyio
import msgspec

from daemon import lifecycle
from daemon.config import load_settings
from hotbed.connection import connect
from hotbed.errors import ConfigError
from workers.agent import WorkerAgent
from workers.config import WorkerSettings
from workers.runtimes.sim import SimParams, SimRuntime

# Allocations between young-generation collections (CPython's default is 700).
GC_GEN0_THRESHOLD = 20_000


class SimFleet:
    """``n`` simulated workers sharing one event loop."""

    def __init__(
        self,
        base: WorkerSettings,
        *,
        workers: int,
        id_prefix: str,
        params: SimParams | None = None,
        seed: int = 0,
    ) -> None:
        self.params = params or SimParams()
        self.base = base
        self.agents: list[WorkerAgent] = []
        # One command client for all agents of the process: their record writes, replies
        # and acks share pipelines (a real node has one agent; this keeps the simulator's
        # own CPU from crowding out the control plane it is there to load).
        self.redis = connect(base.redis_url)
        for i in range(workers):
            settings = msgspec.structs.replace(base, worker_id=f"{id_prefix}-{i:03d}", runtime="sim")
            self.agents.append(
                WorkerAgent(settings, SimRuntime(self.params, seed=seed + i), redis=self.redis)
            )

    def stop(self) -> None:
        for agent in self.agents:
            agent.stopping.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with anyio.create_task_group() as tg:
                for agent in self.agents:
                    await tg.start(agent.run)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                await self.redis.aclose()

    def statistics(self) -> dict[str, float]:
        out: dict[str, float] = {"workers": len(self.agents)}
        for agent in self.agents:
            stats = agent.runtime.statistics()  # type: ignore[attr-defined]
            for k, v in stats.items():
                out[k] = out.get(k, 0) + v
        return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers.simfleet", description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=25)
    parser.add_argument("--id-prefix", default="sim")
    parser.add_argument("--cpu", type=float, default=1024.0, help="cores each simulated node offers")
    parser.add_argument("--memory-mb", type=int, default=4 << 20, help="MiB each simulated node offers")
    parser.add_argument("--max-concurrency", type=int, default=512, help="commands at once per worker")
    parser.add_argument(
        "--latency-scale", type=float, default=1.0,
        help="multiply every modelled runtime latency (0: instant)",
    )
    parser.add_argument("--heartbeat-s", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        base = load_settings(
            WorkerSettings,
            overrides={
                "runtime": "sim", "cpu": args.cpu, "memory_mb": args.memory_mb,
                "max_concurrency": args.max_concurrency, "heartbeat_s": args.heartbeat_s,
                "drain_on_stop": False, "shutdown_grace_s": 2.0,
                # Nothing dies out of band in a simulation; a slow health scan only costs CPU.
                "reconcile_s": 60.0,
            },
        )
    except ConfigError as exc:
        lifecycle.fatal(str(exc))
        return
    lifecycle.setup_logging(base.log_format, "WARNING")
    fleet = SimFleet(
        base, workers=args.workers, id_prefix=args.id_prefix,
        params=SimParams().scaled(args.latency_scale), seed=args.seed,
    )

    async def serve() -> None:
        stopping = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lifecycle.watch_signals, stopping, tg.cancel_scope)
            async with anyio.create_task_group() as fleet_tg:
                await fleet_tg.start(fleet.run)
                # Thousands of simulated sandboxes and tasks live in this one process:
                # leave what start-up made out of every collection, and collect the young
                # generation less often, so no collection pauses the event loop for long.
                gc.freeze()
                gc.set_threshold(GC_GEN0_THRESHOLD, 20, 100)
                sys.stdout.write(f"ready {len(fleet.agents)}\n")
                sys.stdout.flush()
                await stopping.wait()
                fleet.stop()
            tg.cancel_scope.cancel()

    lifecycle.run(serve)


if __name__ == "__main__":
    main()
