"""``python -m bench first``: time to first output of a sandbox that is already "ready".

A user waits for the first output, not for the create call. This measures, on one real
docker+runsc worker (private Redis, one scheduler process, the SDK in this process):

* ``warm``: a claim from a full warm pool of a ``hotbed/base`` template, then its first
  ``exec("true")`` and a second one (what a warm exec costs once the first is paid);
* ``restore``: a create from the same template with no pool (a gVisor restore), then
  its first and second exec.

Each sample is one sandbox, claimed/created sequentially after the pool has filled and
the node has settled (pool sandboxes that just started are not measured while their
neighbours boot). ``first_output`` is claim + first exec, which the target is about.
Results: bench/results/first.json.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from bench.common import results
from bench.common.cluster import ROOT, Cluster, loadavg
from bench.common.stats import summary_ms


async def wait_pool(client: Any, pool: str, n: int, timeout: float = 600) -> None:
    with anyio.fail_after(timeout):
        while await client.redis.llen(client.keys.pool_ready(pool)) < n:
            await anyio.sleep(0.05)


async def sample(client: Any, template: str, mem: int, gap_s: float) -> tuple[str, float, float, float, float]:
    from hotbed.sandbox import Sandbox

    t = time.perf_counter()
    sb = await Sandbox.create(template=template, memory_mb=mem, client=client, timeout=600)
    created = time.perf_counter()
    try:
        if gap_s:
            await anyio.sleep(gap_s)
            created = time.perf_counter()
        r = await sb.exec("true")
        assert r.ok
        first = time.perf_counter()
        assert (await sb.exec("true")).ok
        second = time.perf_counter()
    finally:
        await sb.terminate()
    return sb.path, created - t, first - created, second - first, r.duration_s


async def run(args: argparse.Namespace, cluster: Cluster, client: Any) -> dict[str, Any]:
    from hotbed import templates

    name = f"first-{secrets.token_hex(3)}"
    await templates.create_template(name, image=args.image, memory_mb=args.memory_mb,
                                    client=client, ready_timeout=300)
    out: dict[str, Any] = {"image": args.image, "n": args.n}
    for path in ("warm", "restore"):
        if path not in args.paths:
            continue
        if path == "warm":
            pool = await templates.set_pool(name, args.n, memory_mb=args.memory_mb, client=client)
            await wait_pool(client, pool, args.n)
        await anyio.sleep(args.settle_s)
        claim, first, second, total, spawn = [], [], [], [], []
        for _ in range(args.n):
            got, c, f, s, d = await sample(client, name, args.memory_mb, args.gap_s)
            spawn.append(d)
            assert got == path, (got, path)
            claim.append(c)
            first.append(f)
            second.append(s)
            total.append(c + f)
        if path == "warm":
            await templates.set_pool(name, 0, memory_mb=args.memory_mb, client=client)
        out[path] = {"create": summary_ms(claim), "first_exec": summary_ms(first),
                     "second_exec": summary_ms(second), "first_output": summary_ms(total),
                     "first_exec_agent_spawn": summary_ms(spawn),
                     "first_exec_samples_ms": [round(x * 1e3, 1) for x in first]}
        print(f"{path:8} create p50 {out[path]['create']['p50_ms']:7.1f}  first exec p50 "
              f"{out[path]['first_exec']['p50_ms']:7.1f} p99 {out[path]['first_exec']['p99_ms']:7.1f} "
              f"(agent spawn {out[path]['first_exec_agent_spawn']['p50_ms']:6.1f})  "
              f"second exec p50 {out[path]['second_exec']['p50_ms']:7.1f}  first output p50 "
              f"{out[path]['first_output']['p50_ms']:7.1f}  [load {loadavg()}]", flush=True)
    await templates.delete_template(name, client=client)
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from hotbed.client import Client

    prefix = f"bfirst{secrets.token_hex(3)}"
    with Cluster(schedulers=1, fleets=0, prefix=prefix) as cluster:
        worker_log = open(Path(cluster.dir) / "worker.log", "wb")  # noqa: ASYNC230
        worker = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "workers", "--runtime", "docker", "--worker-id", f"w-{prefix}"],
            env=cluster.env(HOTBED_DRAIN_ON_STOP="true", HOTBED_SHUTDOWN_GRACE_S="2",
                            HOTBED_OCI_RUNTIME=args.oci_runtime, HOTBED_CPU=str(args.node_cpu),
                            HOTBED_LOG_LEVEL=args.worker_log_level),
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=worker_log,
        )
        try:
            cluster.wait_workers(1, timeout=60)
            async with Client(cluster.url, prefix=prefix) as client:
                return await run(args, cluster, client)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
            if args.keep_log:
                Path(args.keep_log).write_bytes((Path(cluster.dir) / "worker.log").read_bytes())  # noqa: ASYNC240 (after the run)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench first")
    p.add_argument("--n", type=int, default=20, help="sandboxes per path")
    p.add_argument("--image", default="hotbed/base")
    p.add_argument("--memory-mb", type=int, default=256)
    p.add_argument("--paths", nargs="+", default=["warm", "restore"])
    p.add_argument("--settle-s", type=float, default=3.0, help="wait after the pool filled")
    p.add_argument("--gap-s", type=float, default=0.0, help="wait between create and first exec")
    p.add_argument("--node-cpu", type=float, default=64.0, help="the worker's declared CPUs")
    p.add_argument("--oci-runtime", default="runsc")
    p.add_argument("--worker-log-level", default="WARNING")
    p.add_argument("--keep-log", default="", help="copy the worker's log here")
    p.add_argument("--out", default=str(results.RESULTS / "first.json"))
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    run_block = results.new_run("first", argv)
    load_before = loadavg()
    measured = anyio.run(main_async, args, backend="asyncio", backend_options={"use_uvloop": True})
    res = {"run": run_block, "loadavg_before": load_before, "loadavg_after": loadavg(), **measured}
    if not args.no_save:
        print(f"wrote {results.write(args.out, res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
