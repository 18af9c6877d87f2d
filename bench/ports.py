"""``python -m bench ports``: an exposed port's tunnel against a direct loopback
connection, in the same run.

The same two servers (stdlib Python) run twice: on the host, reached directly on
loopback (the baseline), and inside a runsc sandbox (``network="none"``), reached
through ``sb.expose(port)``: the worker's listener, the guest channel (docker attach)
and the guest agent. Measured for each:

* throughput: ``--mib`` MiB sent by the server on connect, read to the end by the
  client, ``--rounds`` times (MB/s, the median and the best);
* connection set-up: ``--n`` times connect, one byte out and its echo back (the time
  until a program can talk to the server), p50/p90/p99.

A private Redis, a scheduler and one docker+runsc worker run in this process's event
loop. Results: bench/results/ports.json. Run it under the CPU lock on a shared box.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import anyio
import msgspec

from bench.common import results, stats
from bench.common.cluster import free_port

# Port+0: sends SIZE bytes on connect, then closes. Port+1: echoes until EOF.
SERVERS = r"""
import socket, sys, threading
base, size = int(sys.argv[1]), int(sys.argv[2])
blob = b"x" * (1 << 20)
def source(c):
    with c:
        left = size
        while left > 0:
            n = c.send(blob[: min(left, len(blob))])
            left -= n
def echo(c):
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                return
            c.sendall(d)
def serve(port, fn):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(128)
    while True:
        c, _ = s.accept()
        threading.Thread(target=fn, args=(c,), daemon=True).start()
threading.Thread(target=serve, args=(base, source), daemon=True).start()
print("ready", flush=True)
serve(base + 1, echo)
"""


async def _download(host: str, port: int, size: int) -> float:
    t0 = time.perf_counter()
    got = 0
    async with await anyio.connect_tcp(host, port) as conn:
        while True:
            try:
                got += len(await conn.receive(1 << 20))
            except anyio.EndOfStream:
                break
    elapsed = time.perf_counter() - t0
    if got != size:
        raise RuntimeError(f"read {got} of {size} bytes")
    return elapsed


async def _setup(host: str, port: int) -> float:
    t0 = time.perf_counter()
    async with await anyio.connect_tcp(host, port) as conn:
        await conn.send(b"x")
        await conn.receive(1)
        return time.perf_counter() - t0


async def _measure(
    host: str, source_port: int, echo_port: int, *, size: int, rounds: int, n: int
) -> dict[str, Any]:
    await _download(host, source_port, size)  # warm-up
    times = [await _download(host, source_port, size) for _ in range(rounds)]
    rates = sorted(size / t / 1e6 for t in times)
    setups = [await _setup(host, echo_port) for _ in range(n)]
    return {
        "mb_per_s_median": round(stats.pct(rates, 0.5), 1),
        "mb_per_s_best": round(rates[-1], 1),
        "download_bytes": size,
        "rounds": rounds,
        "connect_echo": stats.summary_ms(setups),
    }


async def run(args: argparse.Namespace, redis_port: int, host_base: int) -> dict[str, Any]:
    from hotbed.client import Client
    from hotbed.sandbox import Sandbox
    from scheduler.config import SchedulerSettings
    from scheduler.service import Scheduler
    from workers.agent import WorkerAgent
    from workers.config import WorkerSettings
    from workers.runtimes import make_runtime

    size = args.mib << 20
    out: dict[str, Any] = {}
    url = f"redis://127.0.0.1:{redis_port}/0"
    prefix = f"bp{os.getpid()}"
    wsettings = msgspec.convert(
        {"redis_url": url, "prefix": prefix, "worker_id": f"w-{prefix}", "drain_on_stop": True,
         "shutdown_grace_s": 2.0, "oci_runtime": args.oci_runtime}, WorkerSettings)
    ssettings = msgspec.convert({"redis_url": url, "prefix": prefix, "registry_refresh_s": 0.1},
                                SchedulerSettings)
    with anyio.fail_after(30):
        while True:
            try:
                await (await anyio.connect_tcp("127.0.0.1", redis_port)).aclose()
                break
            except OSError:
                await anyio.sleep(0.05)
    worker = WorkerAgent(wsettings, make_runtime(wsettings))
    scheduler = Scheduler(ssettings)
    async with anyio.create_task_group() as tg:
        await tg.start(scheduler.run)
        await tg.start(worker.run)
        client = Client(url, prefix=prefix)
        try:
            with anyio.fail_after(30):
                while scheduler.registry is None or worker.id not in scheduler.registry.workers:
                    await anyio.sleep(0.05)
            sb = await Sandbox.create(args.image, client=client, memory_mb=512)
            try:
                await sb.write_file("/tmp/servers.py", SERVERS)
                proc = await sb.start_process("python3", "/tmp/servers.py", "7000", str(size))
                with anyio.fail_after(30):
                    while b"ready" not in (await proc.read()).stdout:
                        await anyio.sleep(0.05)
                source = await sb.expose(7000)
                echo = await sb.expose(7001)
                assert echo.host_port and source.host == "127.0.0.1"
                out["direct"] = await _measure(
                    "127.0.0.1", host_base, host_base + 1, size=size, rounds=args.rounds, n=args.n)
                out["tunnel"] = await _measure(
                    source.host, source.host_port, echo.host_port, size=size,
                    rounds=args.rounds, n=args.n)
            finally:
                with anyio.CancelScope(shield=True):
                    await sb.terminate()
        finally:
            await client.aclose()
            worker.stopping.set()
            scheduler.stopping.set()
    d, t = out["direct"], out["tunnel"]
    out["ratio"] = {
        "throughput_tunnel_over_direct": round(t["mb_per_s_median"] / d["mb_per_s_median"], 3),
        "setup_p50_tunnel_over_direct": round(
            t["connect_echo"]["p50_ms"] / max(d["connect_echo"]["p50_ms"], 1e-3), 1),
    }
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench ports", description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=64, help="MiB per download (default 64)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n", type=int, default=100, help="connection set-ups (default 100)")
    p.add_argument("--image", default="hotbed/base")
    p.add_argument("--oci-runtime", default="runsc")
    p.add_argument("--out", default=str(results.RESULTS / "ports.json"))
    args = p.parse_args(argv)
    doc: dict[str, Any] = {"run": results.new_run("ports", argv)}
    redis_port, host_base = free_port(), free_port()
    workdir = tempfile.mkdtemp(prefix="hotbed-bench-ports-")
    redis_proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--bind",
         "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    host_servers = subprocess.Popen(
        [sys.executable, "-c", SERVERS, str(host_base), str(args.mib << 20)], stdout=subprocess.PIPE,
    )
    try:
        assert host_servers.stdout is not None
        host_servers.stdout.readline()
        doc["result"] = anyio.run(run, args, redis_port, host_base, backend="asyncio",
                                  backend_options={"use_uvloop": True})
    finally:
        host_servers.kill()
        host_servers.wait()
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
    path = results.write(args.out, doc)
    r = doc["result"]
    for name in ("direct", "tunnel"):
        m = r[name]
        print(f"{name:<7} {m['mb_per_s_median']:>8.1f} MB/s (best {m['mb_per_s_best']:.1f})  "  # noqa: T201
              f"connect+echo p50 {m['connect_echo']['p50_ms']:.2f} ms p99 {m['connect_echo']['p99_ms']:.2f} ms")
    print(f"ratios: {r['ratio']}  ->  {path}")  # noqa: T201
    return 0
