"""``python -m bench node_sessions`` (the ``sessions`` phase of ``make bench-node``):
more sessions on one node than its memory holds, with auto-pause on.

Starts a private Redis, one scheduler process and one real worker process with
``auto_pause_after`` set (``--runtime docker``: dockerd + runsc, the default; ``runsc``:
runsc driven directly, no dockerd on the sandbox path), then:

1. opens ``--sessions`` sessions: each a ``hotbed/base`` sandbox in which a file is
   written and a shell variable set in a persistent session, left idle so the worker
   checkpoints it to disk (``paused (auto)``); at most ``--parallel`` are being made at
   once, and none while ``--max-running`` are open and not yet paused (the opening is
   paced by the worker's pausing, as sessions arriving over time would be); making stops early (the figure says how many were reached) when a create
   is refused or ``--max-minutes`` pass;
2. measures what a paused session costs the node: its checkpoint's bytes on disk, and
   the node's memory (MemAvailable, the worker's RSS, Redis's ``used_memory``) per
   session once all are paused;
3. resume on request: ``--resumes`` paused sessions, picked at random, each asked from a
   second client for its variable and its file by one session command (which resumes
   it first): end-to-end latency p50/p99, and the state lost (a wrong or missing
   answer); the same command on a running session is the baseline, measured in the same
   run, so the resume's own cost is the difference;
4. ends every session, and checks that no container is left.

It adds only the ``sessions`` section to ``bench/results/node.json`` (``--out``),
keeping the sections ``bench/node.py`` wrote (the file's digest is made again):
``sessions.total``, ``sessions.resume_p50_ms``, ``sessions.resume_p99_ms``,
``sessions.state_lost`` and the details, with this phase's own ``run`` block (machine,
commit, versions).
"""

from __future__ import annotations

import argparse
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from bench.common import results
from bench.common.cluster import ROOT, Cluster, loadavg, proc_rss_mib
from bench.common.node import remove_runsc
from bench.common.stats import summary_ms

IMAGE = "hotbed/base"
CHECK = 'echo "$MARK"; cat /tmp/mark'


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def disk_bytes(path: Path) -> int:
    """Bytes a directory takes on disk (allocated blocks, so sparse files count as such)."""
    total = 0
    for f in path.rglob("*"):
        try:
            st = f.lstat()
        except OSError:
            continue
        total += st.st_blocks * 512
    return total


def docker_root() -> Path:
    out = subprocess.run(["docker", "info", "--format", "{{.DockerRootDir}}"],
                         capture_output=True, text=True, check=False)
    return Path(out.stdout.strip() or "/var/lib/docker")


def containers(prefix: str) -> dict[str, str]:
    """Sandbox id -> full container id, for this run's containers."""
    out = subprocess.run(
        ["docker", "ps", "-a", "--no-trunc", "--filter", f"label=dev.hotbed.prefix={prefix}",
         "--format", '{{.ID}} {{.Label "dev.hotbed.sandbox"}}'],
        capture_output=True, text=True, check=False,
    ).stdout
    pairs = (line.split() for line in out.splitlines())
    return {p[1]: p[0] for p in pairs if len(p) == 2}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from hotbed.client import Client
    from hotbed.errors import HotbedError
    from hotbed.records import from_hash
    from hotbed.sandbox import Sandbox

    out: dict[str, Any] = {}
    prefix = f"bsess{secrets.token_hex(3)}"
    snapdir = Path(args.snapshot_dir or f"/var/lib/hotbed/bench-{prefix}")
    with Cluster(schedulers=1, fleets=0, prefix=prefix) as cluster:
        worker_log_path = Path(cluster.dir) / "worker.log"
        worker_log = open(worker_log_path, "wb")  # noqa: ASYNC230 - set-up, nothing timed yet
        worker = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "workers", "--runtime", args.runtime, "--worker-id", f"w-{prefix}"],
            env=cluster.env(
                HOTBED_RUNSC_ROOT=f"/run/hotbed/runsc-{prefix}", HOTBED_RUNSC_DIR=str(snapdir / "runsc"),
                HOTBED_DRAIN_ON_STOP="true", HOTBED_SHUTDOWN_GRACE_S="2",
                HOTBED_OCI_RUNTIME=args.oci_runtime, HOTBED_RUNSC_PLATFORM=args.runsc_platform,
                HOTBED_AUTO_PAUSE_AFTER=str(args.pause_after),
                HOTBED_AUTO_PAUSE_CHECK_S="0.5", HOTBED_SNAPSHOT_DIR=str(snapdir),
                # Declared capacity is not what this measures: sessions are admitted by
                # it, and paused ones hold none.
                HOTBED_CPU=str(args.node_cpu), HOTBED_MEMORY_MB=str(args.node_memory_mb),
            ),
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=worker_log,
        )
        redis = cluster.r
        ids: list[str] = []
        try:
            cluster.wait_workers(1, timeout=60)
            out["cluster"] = cluster.settings_record()
            mem0 = mem_available_mib()
            rss0 = proc_rss_mib(worker.pid)
            redis0 = float(redis.info("memory")["used_memory"])
            async with Client(cluster.url, prefix=prefix) as client:
                # ------------------------------------------------ 1. open sessions
                t0 = time.perf_counter()
                give_up = t0 + args.max_minutes * 60
                refused: list[str] = []
                made_s: list[float] = []
                lock = anyio.Lock()
                marks: dict[str, int] = {}
                todo = iter(range(args.sessions))

                # Sessions opened and auto-paused so far (read from Redis every 0.5 s)
                # and those being opened now.
                paused_now = [0]
                opening = [0]

                def unpaused() -> int:
                    return opening[0] + len(ids) - paused_now[0]

                async def opener() -> None:
                    for i in todo:
                        # Paced by the worker's pausing: a node pauses about as fast as
                        # it opens, and sessions waiting for their pause hold CPU.
                        while unpaused() >= args.max_running and not refused:
                            await anyio.sleep(0.1)
                        if refused or time.perf_counter() > give_up:
                            return
                        opening[0] += 1
                        t = time.perf_counter()
                        try:
                            sb = await Sandbox.create(
                                IMAGE, client=client, cpu=args.cpu, memory_mb=args.memory_mb,
                                timeout=args.lifetime_s, auto_pause_after=args.pause_after,
                            )
                        except HotbedError as exc:
                            refused.append(f"{type(exc).__name__}: {exc}")
                            return
                        finally:
                            opening[0] -= 1
                        async with lock:
                            ids.append(sb.id)
                            marks[sb.id] = i
                        await sb.shell("s").run(f"export MARK=m{i}; echo f{i} > /tmp/mark")
                        made_s.append(time.perf_counter() - t)
                        if len(made_s) % 50 == 0:
                            print(f"  {len(made_s)} sessions open ({time.perf_counter() - t0:.0f} s, "
                                  f"{unpaused()} not yet paused)", flush=True)

                async def count_paused() -> None:
                    while True:
                        made = list(ids)
                        async with client.redis.pipeline(transaction=False) as pipe:
                            for sid in made:
                                pipe.hget(client.keys.sandbox(sid), "state")
                            paused_now[0] = sum(1 for st in await pipe.execute() if st == b"paused")
                        await anyio.sleep(0.5)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(count_paused)
                    async with anyio.create_task_group() as openers:
                        for _ in range(args.parallel):
                            openers.start_soon(opener)
                    tg.cancel_scope.cancel()
                out["open_s"] = round(time.perf_counter() - t0, 1)
                out["create_and_first_command"] = summary_ms(made_s)
                out["stopped_by"] = refused[0] if refused else (
                    "time limit" if len(ids) < args.sessions else "count reached")

                # ------------------------------------ 2. all paused: what each costs
                async def states() -> dict[str, int]:
                    got: dict[str, int] = {}
                    async with client.redis.pipeline(transaction=False) as pipe:
                        for sid in ids:
                            pipe.hmget(client.keys.sandbox(sid), "state", "paused_by")
                        for state, by in await pipe.execute():
                            key = (state or b"?").decode() + (" (auto)" if by == b"auto" else "")
                            got[key] = got.get(key, 0) + 1
                    return got

                with anyio.move_on_after(args.pause_after + 60 + len(ids) * 2):
                    while (await states()).get("paused (auto)", 0) < len(ids):
                        await anyio.sleep(0.5)
                counted = await states()
                out["states_after_open"] = counted
                paused_n = counted.get("paused (auto)", 0)
                mem1, rss1 = mem_available_mib(), proc_rss_mib(worker.pid)
                redis1 = float(redis.info("memory")["used_memory"])
                root = docker_root()
                by_sandbox = await anyio.to_thread.run_sync(containers, prefix)
                sample = random.sample(ids, min(len(ids), args.disk_sample))
                sizes = []
                for sid in sample:
                    if args.runtime == "runsc":
                        ck = snapdir / "runsc" / "sandboxes" / sid / "paused"
                    else:
                        ck = root / "containers" / by_sandbox.get(sid, "?") / "checkpoints" / "hotbed-paused"
                    if ck.is_dir():
                        sizes.append(await anyio.to_thread.run_sync(disk_bytes, ck))
                out["per_paused_session"] = {
                    "disk_mib": round(sum(sizes) / max(1, len(sizes)) / 2**20, 2),
                    "disk_sample": len(sizes),
                    "node_memory_mib": round((mem0 - mem1) / max(1, len(ids)), 2),
                    "worker_rss_kib": round((rss1 - rss0) * 1024 / max(1, len(ids)), 1),
                    "redis_bytes": round((redis1 - redis0) / max(1, len(ids))),
                }
                out["total"] = len(ids)
                out["paused"] = paused_n

                # ---------------------------------------- 3. resume on request
                lost: list[str] = []
                resumes: list[float] = []
                running: list[float] = []
                async with Client(cluster.url, prefix=prefix) as other:
                    picked = random.sample(ids, min(len(ids), args.resumes))
                    for sid in picked:
                        sb = Sandbox(sid, f"w-{prefix}", client=other)
                        rec = from_hash(await other.redis.hgetall(other.keys.sandbox(sid)))
                        if rec is None or rec.state != "paused":
                            continue
                        t = time.perf_counter()
                        try:
                            res = await sb.shell("s").run(CHECK, timeout=60)
                            answer = res.stdout
                        except HotbedError as exc:
                            answer = f"error: {exc}"
                        resumes.append(time.perf_counter() - t)
                        want = f"m{marks[sid]}\nf{marks[sid]}\n"
                        if answer != want:
                            lost.append(f"{sid}: {answer!r}")
                        # Running now: the same command, without a resume.
                        t = time.perf_counter()
                        await sb.shell("s").run(CHECK, timeout=60)
                        running.append(time.perf_counter() - t)
                out["resume_on_request"] = summary_ms(resumes)
                out["same_command_running"] = summary_ms(running)
                out["state_lost"] = len(lost)
                out["state_lost_examples"] = lost[:5]
                out["resume_p50_ms"] = out["resume_on_request"]["p50_ms"]
                out["resume_p99_ms"] = out["resume_on_request"]["p99_ms"]
                flights = [float(x) for x in re.findall(
                    rb"auto-resumed in ([0-9.]+)s", worker_log_path.read_bytes())]
                out["worker_resume"] = summary_ms(flights)

                # ----------------------------------------------- 4. end them all
                t = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    limiter = anyio.CapacityLimiter(16)

                    async def end(sid: str) -> None:
                        async with limiter:
                            await Sandbox(sid, f"w-{prefix}", client=client).terminate()

                    for sid in ids:
                        tg.start_soon(end, sid)
                out["end_all_s"] = round(time.perf_counter() - t, 1)
                ids.clear()
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=600)
            except subprocess.TimeoutExpired:
                worker.kill()
            worker_log.close()
            out["worker_tracebacks"] = worker_log_path.read_bytes().count(b"Traceback")
    out["prefix"], out["snapshot_dir"] = prefix, str(snapdir)
    return out


def clean_up(prefix: str, snapdir: str) -> int:
    """Remove what the run left (a leak is counted, then cleared); how many sandboxes."""
    left = containers(prefix)
    for cid in left.values():
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True, check=False)
    direct = remove_runsc(f"/run/hotbed/runsc-{prefix}")
    shutil.rmtree(snapdir, ignore_errors=True)
    return len(left) + direct


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench node_sessions")
    p.add_argument("--sessions", type=int, default=5000, help="sessions to open (running + paused)")
    p.add_argument("--parallel", type=int, default=4, help="sessions being opened at once")
    p.add_argument("--max-minutes", type=float, default=90.0, help="stop opening sessions after this")
    p.add_argument("--pause-after", type=float, default=2.0, help="auto_pause_after of each session (s)")
    p.add_argument("--max-running", type=int, default=32,
                   help="open no more while this many sessions are open or opening and not yet paused")
    p.add_argument("--resumes", type=int, default=100, help="paused sessions resumed by a request")
    p.add_argument("--disk-sample", type=int, default=50, help="checkpoints whose size is measured")
    p.add_argument("--cpu", type=float, default=1.0, help="CPU of each session (the SDK default)")
    p.add_argument("--memory-mb", type=int, default=256, help="memory limit of each session")
    p.add_argument("--lifetime-s", type=float, default=6 * 3600, help="timeout of each session")
    p.add_argument("--node-cpu", type=float, default=64.0, help="the worker's declared CPU")
    p.add_argument("--node-memory-mb", type=int, default=64 * 1024, help="the worker's declared memory")
    p.add_argument("--snapshot-dir", default="", help="the worker's snapshot dir (default: a fresh one)")
    p.add_argument("--runtime", choices=["docker", "runsc"], default="docker",
                   help="the worker's runtime: dockerd + runsc, or runsc driven directly")
    p.add_argument("--oci-runtime", default="runsc", help="dockerd's runtime (--runtime docker)")
    p.add_argument("--runsc-platform", choices=["systrap", "ptrace"], default="ptrace",
                   help="gVisor's platform (--runtime runsc)")
    p.add_argument("--out", default=str(results.RESULTS / "node.json"), help="results file")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    run_block = results.new_run("node_sessions", argv)
    load_before = loadavg()
    measured = anyio.run(run, args, backend="asyncio", backend_options={"use_uvloop": True})
    measured["leaked_containers"] = clean_up(measured.pop("prefix"), measured.pop("snapshot_dir"))
    run_block["finished"] = results.utc_now()
    section = {
        "run": run_block, "runtime": results.container_runtime(args.oci_runtime),
        "loadavg_before": load_before, "loadavg_after": loadavg(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "no_save")},
        **measured,
    }
    m = run_block["machine"]
    print(f"machine: {m['cpus']} CPUs {m['cpu_model']}, {m['memory_gib']} GiB; load {load_before}")
    print(f"sessions open: {section['total']} (asked {args.sessions}; {section['stopped_by']}), "
          f"{section['paused']} auto-paused, in {section['open_s']} s")
    c = section["per_paused_session"]
    print(f"per paused session: {c['disk_mib']} MiB disk (sample of {c['disk_sample']}), "
          f"{c['node_memory_mib']} MiB node memory, {c['worker_rss_kib']} KiB worker RSS, "
          f"{c['redis_bytes']} B Redis")
    r, b, w = section["resume_on_request"], section["same_command_running"], section["worker_resume"]
    print(f"{'session command':<36} {'p50 ms':>8} {'p99 ms':>8} {'n':>5}")
    print(f"{'on a paused session (resume first)':<36} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['n']:>5}")
    print(f"{'  worker: the resume itself':<36} {w['p50_ms']:>8} {w['p99_ms']:>8} {w['n']:>5}")
    print(f"{'on a running session (baseline)':<36} {b['p50_ms']:>8} {b['p99_ms']:>8} {b['n']:>5}")
    print(f"state lost: {section['state_lost']} {section['state_lost_examples']}; leaked sandboxes: "
          f"{section['leaked_containers']}; worker tracebacks: {section['worker_tracebacks']}")
    if not args.no_save:
        out = Path(args.out)
        try:
            doc = results.load(out)
        except (OSError, ValueError):
            # No node.json from bench/node.py (yet): this phase's own document.
            doc = {"run": results.new_run("node", argv)}
        doc["sessions"] = section
        print(f"wrote {results.write(out, doc)}")
    ok = section["state_lost"] == 0 and section["leaked_containers"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
