"""``python -m bench runtimes``: the docker runtime and the runsc runtime side by side.

Both make the same gVisor sandboxes (runsc, same limits, the guest agent as PID 1);
one goes through dockerd and containerd, the other runs runsc on OCI bundles itself.
Measured at the runtime level, in one run, sample by sample alternating between the
two, so load drifts on a shared machine hit both alike:

* start: ``create`` until the guest agent answers ``hello`` (commands can run);
* restore: a new sandbox from a memory snapshot, until its agent answers;
* terminate: ``destroy`` of a started sandbox, until the runtime says it is gone;
* exec: ``true`` through the guest agent (the common road) and through the
  runtime's own exec (``docker exec`` / ``runsc exec``: images without python3);
* idle overhead, ``--idle`` idle sandboxes: the host processes they add (containerd's
  shim is per container) and those processes' PSS, and the drop of MemAvailable.

Results: bench/results/runtimes.json. Ratios are runsc / docker, lower is better for
runsc. The machine is shared: the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from bench.common import results
from bench.common.cluster import loadavg
from bench.common.stats import summary_ms
from hotbed.protocol import ExecSpec, Resources, SandboxSpec
from workers.guest.channel import GuestManager
from workers.runtimes.base import Placed
from workers.runtimes.docker import DockerRuntime
from workers.runtimes.runsc import RunscRuntime

USER = "1000:1000"
PREFIX = f"bench-rt-{secrets.token_hex(3)}"


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pids() -> set[int]:
    return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}


def pss_mib(of: set[int]) -> float:
    """Proportional set size of processes ``of`` (shared pages split among sharers)."""
    total = 0
    for pid in of:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


class Bench:
    def __init__(self, name: str, rt: Any, image: str) -> None:
        self.name = name
        self.rt = rt
        self.image = image
        self.guests = GuestManager(rt.attach)
        self.made: list[str] = []

    def spec(self) -> SandboxSpec:
        return SandboxSpec(image=self.image, resources=Resources(cpu=1.0, memory_mb=512), user=USER)

    def placed(self) -> Placed:
        sid = f"sb-{secrets.token_hex(5)}"
        self.made.append(sid)
        return Placed(sandbox_id=sid, worker_id="bench", prefix=PREFIX)

    async def ready(self, sid: str) -> None:
        ch = await self.guests.channel(sid)
        assert ch is not None, f"{self.name}: {self.image} has no guest agent"
        await ch.call({"t": "hello"})

    async def start(self) -> tuple[float, str]:
        placed = self.placed()
        t0 = time.perf_counter()
        await self.rt.create(placed, self.spec())
        await self.ready(placed.sandbox_id)
        return time.perf_counter() - t0, placed.sandbox_id

    async def restore(self, snap: Path) -> tuple[float, str]:
        placed = self.placed()
        t0 = time.perf_counter()
        await self.rt.restore(placed, self.spec(), snap)
        await self.ready(placed.sandbox_id)
        return time.perf_counter() - t0, placed.sandbox_id

    async def guest_exec(self, sid: str) -> float:
        ch = await self.guests.channel(sid)
        assert ch is not None
        t0 = time.perf_counter()
        async with ch.open({"t": "run", "argv": ["true"], "timeout": 10.0, "max_output": 4096}) as (_rid, frames):
            async for h, _p in frames:
                if h.get("t") in ("exit", "error"):
                    assert h.get("t") == "exit" and h.get("code") == 0, h
                    break
        return time.perf_counter() - t0

    async def runtime_exec(self, sid: str) -> float:
        t0 = time.perf_counter()
        res = await self.rt.exec(sid, ExecSpec(argv=["true"]), default_user=USER)
        assert res.exit_code == 0, res
        return time.perf_counter() - t0

    async def end(self, sid: str) -> None:
        self.guests.forget(sid)
        await self.rt.destroy(sid)
        if sid in self.made:
            self.made.remove(sid)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    docker = DockerRuntime()
    runsc = RunscRuntime(root="/run/hotbed/runsc-bench", state_dir="/var/lib/hotbed/runsc-bench")
    benches = [Bench("docker", docker, args.image), Bench("runsc", runsc, args.image)]
    samples: dict[str, dict[str, list[float]]] = {
        b.name: {"start": [], "terminate": [], "restore": [], "guest_exec": [], "runtime_exec": []} for b in benches
    }
    out: dict[str, Any] = {"image": args.image, "n": args.n, "idle": args.idle, "load_before": loadavg()}
    snapdir = Path(tempfile.mkdtemp(prefix="hotbed-bench-rt-", dir="/var/lib/hotbed"))
    async with anyio.create_task_group() as tg:
        for b in benches:
            await b.rt.open()
            await tg.start(b.guests.run)
        try:
            # First use: the runsc runtime unpacks the image once (cached afterwards).
            first: dict[str, float] = {}
            for b in benches:
                took, sid = await b.start()
                first[b.name] = round(took, 3)
                await b.end(sid)
            out["first_start_s"] = first
            for _ in range(args.n):
                for b in benches:
                    took, sid = await b.start()
                    samples[b.name]["start"].append(took)
                    t0 = time.perf_counter()
                    await b.end(sid)
                    samples[b.name]["terminate"].append(time.perf_counter() - t0)
            snaps: dict[str, Path] = {}
            live = {b.name: (await b.start())[1] for b in benches}
            for i in range(args.execs):
                for b in benches:
                    samples[b.name]["guest_exec"].append(await b.guest_exec(live[b.name]))
                    if i % 4 == 0:
                        samples[b.name]["runtime_exec"].append(await b.runtime_exec(live[b.name]))
            for b in benches:
                snaps[b.name] = snapdir / b.name
                await b.rt.checkpoint(live[b.name], snaps[b.name], leave_running=False)
                await b.end(live[b.name])
            for _ in range(args.n):
                for b in benches:
                    took, sid = await b.restore(snaps[b.name])
                    samples[b.name]["restore"].append(took)
                    await b.end(sid)
            idle: dict[str, Any] = {}
            for b in benches:
                await anyio.sleep(2)
                mem0, pids0 = mem_available_mib(), pids()
                sids = [(await b.start())[1] for _ in range(args.idle)]
                await anyio.sleep(3)
                mem1, added = mem_available_mib(), pids() - pids0
                idle[b.name] = {
                    "pss_mib_per_sandbox": round(pss_mib(added) / args.idle, 1),
                    "mem_available_drop_mib_per_sandbox": round((mem0 - mem1) / args.idle, 1),
                    "host_processes_per_sandbox": round(len(added) / args.idle, 1),
                }
                for sid in sids:
                    await b.end(sid)
            out["idle"] = idle
        finally:
            with anyio.CancelScope(shield=True):
                for b in benches:
                    for sid in list(b.made):
                        await b.end(sid)
                    await b.rt.aclose()
                await anyio.to_thread.run_sync(lambda: __import__("shutil").rmtree(snapdir, ignore_errors=True))
            tg.cancel_scope.cancel()
    out["samples"] = {name: {k: summary_ms(v) for k, v in s.items()} for name, s in samples.items()}
    out["ratios_runsc_over_docker"] = {
        k: round(out["samples"]["runsc"][k]["p50_ms"] / out["samples"]["docker"][k]["p50_ms"], 2)
        for k in samples["docker"]
    }
    out["load_after"] = loadavg()
    return out


def report(res: dict[str, Any]) -> str:
    lines = [f"image {res['image']}, n={res['n']}, load {res['load_before']} -> {res['load_after']}",
             f"first start (runsc unpacks the image once): {res['first_start_s']}",
             "| measure | docker p50 / p90 ms | runsc p50 / p90 ms | runsc / docker |",
             "|---|---|---|---|"]
    for k, ratio in res["ratios_runsc_over_docker"].items():
        d, r = res["samples"]["docker"][k], res["samples"]["runsc"][k]
        lines.append(f"| {k} | {d['p50_ms']:.0f} / {d['p90_ms']:.0f} | {r['p50_ms']:.0f} / {r['p90_ms']:.0f} | {ratio:.2f} |")
    for name, v in res["idle"].items():
        lines.append(f"idle {name}, per sandbox: {v['host_processes_per_sandbox']} host processes, "
                     f"{v['pss_mib_per_sandbox']} MiB PSS, MemAvailable -{v['mem_available_drop_mib_per_sandbox']} MiB")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench runtimes", description=__doc__.splitlines()[0])
    p.add_argument("--image", default="hotbed/base")
    p.add_argument("--n", type=int, default=5, help="starts and restores per runtime")
    p.add_argument("--execs", type=int, default=40, help="guest-agent execs per runtime")
    p.add_argument("--idle", type=int, default=4, help="idle sandboxes for the overhead")
    p.add_argument("--out", default=os.fspath(results.RESULTS / "runtimes.json"))
    args = p.parse_args(argv)
    doc: dict[str, Any] = {"run": results.new_run("runtimes", argv)}
    doc.update(anyio.run(measure, args, backend="asyncio", backend_options={"use_uvloop": True}))
    results.write(args.out, doc)
    print(report(doc))  # noqa: T201 - the bench's report
    return 0
