"""``python -m bench node`` (``make bench-node``): one real node under load.

Every role on this box: a private Redis, scheduler and worker processes, the worker on
dockerd + runsc (the worker's default runtime unless ``--oci-runtime``). Phases
(``--phase``, repeatable; default all four):

``burst``       a warm pool of ``--pool`` sandboxes, then ``--burst`` concurrent creates
                of its template from ``--procs`` processes; each create is answered by
                a sandbox (then one ``echo``, timed from the create call: first output)
                or by an error, which should be a typed CapacityExhausted/Overloaded.
``density``     idle ``hotbed/base`` sandboxes (guest agent up) added ``--density-step``
                at a time until ``exec true`` p99 passes ``--density-factor`` times its
                value on a node with one sandbox, or ``--density-max`` run; idle CPU and
                memory per sandbox read from the sandboxes' own cgroup.
``throughput``  restores per second at parallelism ``--parallelism`` against plain
                ``docker run`` (+ the same set-up) at the same parallelism, same run,
                for a light (busybox) and a heavy (Python set-up) template; with
                ``--sweep 1,2,4,8`` also restores/s per parallelism with the start gate
                wide open (how ``max_starts``' default was measured).
``faults``      a stream of creates and execs while the worker is killed -9 (and
                restarted, as ``hotbed up`` would), one of two schedulers is killed -9,
                Redis restarts, and dockerd restarts: a private dockerd (own socket,
                data root and containerd namespace), never the host's.
``idle``        idle CPU per sandbox under each ``--idle-runtimes`` (systrap, ptrace),
                ``--idle-n`` sandboxes each: how the default platform was chosen.

Results: ``bench/results/node.json`` (``--out``), read, updated and written back, so a
phase run alone (or ``bench/node_sessions.py``'s ``sessions``) replaces its own section
and keeps the others; each section names the run that measured it. Run it alone on the
box (the CPU lock): load from anything else moves every figure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import secrets
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from bench.common import results
from bench.common.cluster import loadavg
from bench.common.node import NodeStack, cgroup_memory_mib, containers_of, docker, idle_cpu_pct
from bench.common.stats import pct, summary_ms
from bench.start import TEMPLATES

PHASES = ("burst", "density", "throughput", "faults")
EXTRA_PHASES = ("idle",)
TYPED_REFUSALS = ("CapacityExhausted", "Overloaded")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}  (load {loadavg().split()[0]})", flush=True)  # noqa: T201


def runtime_env(args: argparse.Namespace) -> dict[str, str]:
    """The worker's environment: its runtime and any ``--worker-env KEY=VALUE``."""
    env = {"HOTBED_OCI_RUNTIME": args.oci_runtime} if args.oci_runtime else {}
    if args.runtime == "runsc":
        env["HOTBED_RUNTIME"] = "runsc"
    for item in args.worker_env:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def worker_runtime(args: argparse.Namespace) -> str:
    if args.oci_runtime:
        return str(args.oci_runtime)
    from workers.config import WorkerSettings

    return WorkerSettings().oci_runtime


async def build_template(client: Any, name: str, kind: str) -> float:
    from hotbed import templates

    # "base": hotbed/base as it is (the guest agent up), nothing set up.
    image, files, start, ready, mem = TEMPLATES[kind] if kind != "base" else ("hotbed/base", {}, None, None, 256)
    t = time.perf_counter()
    await templates.create_template(
        name, image=image, files=files, start=[start] if start else [], ready=ready,
        memory_mb=mem, client=client,
    )
    return time.perf_counter() - t


async def end_all(sandboxes: list[Any], parallel: int = 8) -> None:
    sem = anyio.Semaphore(parallel)

    async def end(sb: Any) -> None:
        async with sem:
            try:
                await sb.terminate()
            except Exception as exc:  # counted as a leak at the end if it stays
                log(f"terminate {sb.id}: {type(exc).__name__}: {exc}")

    async with anyio.create_task_group() as tg:
        for sb in sandboxes:
            tg.start_soon(end, sb)


# ------------------------------------------------------------------ throughput


async def docker_ready(kind: str, runtime: str, label: str) -> str:
    """Plain ``docker run`` of the template's image plus its set-up, until ready."""
    image, files, start, ready, mem = TEMPLATES[kind]
    name = f"{label}-d{secrets.token_hex(4)}"

    async def sh(*argv: str) -> None:
        res = await anyio.run_process(list(argv), check=False)
        if res.returncode:
            raise RuntimeError(f"{' '.join(argv[:4])}: {res.stderr.decode()[-300:]}")

    await sh("docker", "run", "-d", "--name", name, "--runtime", runtime, "--network", "none",
             "--label", f"dev.hotbed.prefix={label}", "-m", f"{mem}m", "--user", "1000:1000",
             image, "sleep", "infinity")
    for path, content in files.items():
        await sh("docker", "exec", name, "sh", "-c", f'printf "%s" "$1" > {path}', "sh", content)
    if start:
        await sh("docker", "exec", "-d", name, "sh", "-c", start)
    if ready:
        while (await anyio.run_process(["docker", "exec", name, "sh", "-c", ready], check=False)).returncode:
            await anyio.sleep(0.05)
    return name


async def rate(n: int, parallel: int, op: Any) -> tuple[float, list[Any]]:
    """``n`` calls of ``op()`` with ``parallel`` at a time: (per second, results)."""
    sem = anyio.Semaphore(parallel)
    got: list[Any] = []

    async def one() -> None:
        async with sem:
            got.append(await op())

    t = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return n / (time.perf_counter() - t), got


async def phase_throughput(args: argparse.Namespace) -> dict[str, Any]:
    from hotbed.client import Client
    from hotbed.sandbox import Sandbox

    sweep = sorted({int(x) for x in args.sweep.split(",") if x} | {args.parallelism})
    # The gate wide open: this measures what the node does at each parallelism.
    env = {**runtime_env(args), "HOTBED_MAX_STARTS": str(max(sweep))}
    runtime = worker_runtime(args)
    out: dict[str, Any] = {"n": args.throughput_n, "parallelism": args.parallelism, "oci_runtime": runtime}
    with NodeStack(worker_env=env) as stack:
        async with Client(stack.url, prefix=stack.prefix) as c:
            for kind in ("light", "heavy"):
                name = f"tp-{kind}"
                build_s = await build_template(c, name, kind)
                mem = TEMPLATES[kind][4]
                per_p: dict[str, float] = {}
                for p in sweep:
                    async def restore(name: str = name, mem: int = mem) -> Any:
                        return await Sandbox.create(template=name, memory_mb=mem, client=c, timeout=600)

                    r, made = await rate(args.throughput_n, p, restore)
                    paths = {sb.path for sb in made}
                    await end_all(made)
                    per_p[str(p)] = round(r, 3)
                    log(f"throughput {kind}: restores x{p}: {r:.2f}/s (paths {paths})")
                label = f"{stack.prefix}-base"

                async def plain(kind: str = kind, label: str = label) -> str:
                    return await docker_ready(kind, runtime, label)

                d_rate, names = await rate(args.throughput_n, args.parallelism, plain)
                docker("rm", "-f", *names, timeout=300)
                log(f"throughput {kind}: docker run x{args.parallelism}: {d_rate:.2f}/s")
                ratio = per_p[str(args.parallelism)] / d_rate
                out[kind] = {
                    "template_build_s": round(build_s, 2), "restores_per_s": per_p,
                    "docker_run_per_s": round(d_rate, 3), "ratio": round(ratio, 2),
                }
                out[f"{kind}_ratio"] = round(ratio, 2)
    out["leaked_containers"] = stack.leaked
    out["daemon_exits"] = len(stack.exits)
    return out


# ----------------------------------------------------------------------- burst


def burst_process(url: str, prefix: str, template: str, n: int, start_at: float,
                  timeout: float, conn: Any) -> None:
    """One of the burst's client processes: ``n`` concurrent creates at ``start_at``."""
    import uvloop

    from hotbed.client import Client
    from hotbed.errors import HotbedError
    from hotbed.sandbox import Sandbox

    async def one(c: Client) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            with anyio.fail_after(timeout + 15):
                sb = await Sandbox.create(template=template, cpu=0.5, memory_mb=256, client=c,
                                          request_timeout=timeout)
        except HotbedError as exc:
            return {"error": type(exc).__name__, "message": str(exc)[:200],
                    "answered_s": time.perf_counter() - t0}
        except TimeoutError:
            return {"error": "hung", "answered_s": time.perf_counter() - t0}
        except Exception as exc:
            return {"error": f"untyped {type(exc).__name__}", "message": str(exc)[:200],
                    "answered_s": time.perf_counter() - t0}
        t1 = time.perf_counter()
        out: dict[str, Any] = {"id": sb.id, "path": sb.path, "claim_ms": (t1 - t0) * 1000,
                               "answered_s": t1 - t0}
        try:
            res = await sb.exec("echo", "hi", timeout=30)
            out["first_output_ms"] = (time.perf_counter() - t0) * 1000
            out["exec_ok"] = res.stdout.strip() == "hi"
        except Exception as exc:
            out["exec_error"] = type(exc).__name__
        try:
            await sb.terminate()
        except Exception as exc:
            out["terminate_error"] = type(exc).__name__
        return out

    async def main() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        async with Client(url, prefix=prefix) as c:
            await anyio.sleep(max(0.0, start_at - time.time()))

            async def run_one() -> None:
                got.append(await one(c))

            async with anyio.create_task_group() as tg:
                for _ in range(n):
                    tg.start_soon(run_one)
        return got

    conn.send(anyio.run(main, backend_options={"loop_factory": uvloop.new_event_loop}))
    conn.close()


async def phase_burst(args: argparse.Namespace) -> dict[str, Any]:
    from hotbed import templates
    from hotbed.client import Client
    from hotbed.sandbox import Sandbox

    out: dict[str, Any] = {"pool": args.pool, "creates": args.burst, "procs": args.procs,
                           "request_timeout_s": args.burst_timeout, "oci_runtime": worker_runtime(args)}
    with NodeStack(worker_env=runtime_env(args)) as stack:
        async with Client(stack.url, prefix=stack.prefix) as c:
            await build_template(c, "burst", args.burst_template)
            mem = 256
            pool = await templates.set_pool("burst", args.pool, cpu=0.5, memory_mb=mem, client=c)
            t = time.perf_counter()
            with anyio.fail_after(args.pool_fill_timeout):
                while await c.redis.llen(c.keys.pool_ready(pool)) < args.pool:
                    await anyio.sleep(0.1)
            out["pool_fill_s"] = round(time.perf_counter() - t, 2)
            log(f"burst: pool of {args.pool} ready in {out['pool_fill_s']}s")
            ctx = multiprocessing.get_context("spawn")
            start_at = time.time() + 3.0
            share = [args.burst // args.procs + (1 if i < args.burst % args.procs else 0) for i in range(args.procs)]
            pipes, procs = [], []
            for n in share:
                parent, child = ctx.Pipe(duplex=False)
                p = ctx.Process(target=burst_process, args=(stack.url, stack.prefix, "burst", n, start_at,
                                                            args.burst_timeout, child))
                p.start()
                pipes.append(parent)
                procs.append(p)
            rows: list[dict[str, Any]] = []
            for parent in pipes:
                rows.extend(await anyio.to_thread.run_sync(parent.recv))
            for p in procs:
                p.join()
            await templates.set_pool("burst", 0, cpu=0.5, memory_mb=mem, client=c)
            # The node kept serving: one more create and exec after the burst.
            try:
                sb = await Sandbox.create(template="burst", cpu=0.5, memory_mb=mem, client=c,
                                          request_timeout=60)
                out["serving_after"] = (await sb.exec("true")).ok
                await sb.terminate()
            except Exception as exc:
                out["serving_after"] = f"{type(exc).__name__}: {exc}"
            # Let the pool controller end the pool's warm sandboxes.
            with anyio.move_on_after(60):
                while await c.redis.llen(c.keys.pool_ready(pool)) or await c.redis.zcard(c.keys.pool_warming(pool)):
                    await anyio.sleep(0.5)
        out["daemon_exits_list"] = stack.daemon_exits()
    errors: dict[str, int] = {}
    for r in rows:
        if "error" in r:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    served = [r for r in rows if "id" in r]
    warm = [r for r in served if r["path"] == "warm"]
    ids = [r["id"] for r in served]
    firsts = [r["first_output_ms"] for r in warm if "first_output_ms" in r]
    late = [r for r in rows if r["answered_s"] > args.burst_timeout + 5]
    out.update({
        "answered": sum(1 for r in rows if r.get("error") != "hung"),
        "served": len(served),
        "errors": errors,
        "untyped_errors": sum(n for e, n in errors.items() if e not in TYPED_REFUSALS),
        "late_answers": len(late),
        "daemon_exits": len(out["daemon_exits_list"]),
        "warm": len(warm),
        "paths": {p: sum(1 for r in served if r["path"] == p) for p in {r["path"] for r in served}},
        "exec_failures": sum(1 for r in served if not r.get("exec_ok")),
        "first_output_p50_ms": round(pct(firsts, 0.5), 2) if firsts else None,
        "first_output_p99_ms": round(pct(firsts, 0.99), 2) if firsts else None,
        "first_output_ms_warm": summary_ms([r["first_output_ms"] / 1000 for r in warm if "first_output_ms" in r]),
        "claim_ms_warm": summary_ms([r["claim_ms"] / 1000 for r in warm]),
        "answered_s": summary_ms([r["answered_s"] for r in rows]),
        "duplicate_ids": len(ids) - len(set(ids)),
        "leaked_containers": stack.leaked,
        "error_samples": sorted({f"{r['error']}: {r.get('message', '')}" for r in rows if "error" in r})[:8],
    })
    return out


# --------------------------------------------------------------------- density


async def exec_p99(sandboxes: list[Any], n: int) -> dict[str, float]:
    times = []
    for _ in range(n):
        sb = random.choice(sandboxes)
        t = time.perf_counter()
        res = await sb.exec("true", timeout=30)
        times.append(time.perf_counter() - t)
        assert res.ok
    return summary_ms(times)


async def phase_density(args: argparse.Namespace) -> dict[str, Any]:
    from hotbed.client import Client
    from hotbed.sandbox import Sandbox

    out: dict[str, Any] = {"step": args.density_step, "max": args.density_max,
                           "cpu": args.density_cpu, "memory_mb": args.density_memory_mb,
                           "factor": args.density_factor, "oci_runtime": worker_runtime(args), "steps": []}
    out["worker_env"] = runtime_env(args)
    with NodeStack(worker_env=runtime_env(args)) as stack:
        async with Client(stack.url, prefix=stack.prefix) as c:
            live: list[Any] = []

            async def add() -> Any:
                sb = await Sandbox.create("hotbed/base", cpu=args.density_cpu, memory_mb=args.density_memory_mb,
                                          client=c, timeout=7200, request_timeout=120)
                live.append(sb)
                return sb

            await add()
            # As long to settle as every step gets: the bar is 3x this p99, and a box
            # still busy from what ran before would set it high.
            await anyio.sleep(args.density_settle_s)
            base = await exec_p99(live, args.density_execs)
            out["empty_exec_ms"] = base
            limit = base["p99_ms"] * args.density_factor
            log(f"density: 1 sandbox: exec p50 {base['p50_ms']:.1f} p99 {base['p99_ms']:.1f} ms (limit {limit:.1f})")
            running_max = 1
            stop = ""
            while len(live) < args.density_max and not stop:
                want = min(args.density_step, args.density_max - len(live))
                try:
                    await rate(want, 4, add)
                except Exception as exc:
                    inner = exc.exceptions if isinstance(exc, BaseExceptionGroup) else [exc]
                    stop = f"create failed at {len(live)}: " + "; ".join(
                        f"{type(e).__name__}: {e}"[:200] for e in inner[:3])
                    break
                await anyio.sleep(args.density_settle_s)
                lat = await exec_p99(live, args.density_execs)
                cpu = await anyio.to_thread.run_sync(idle_cpu_pct, stack.cgroup_parent, args.density_window_s)
                mem = cgroup_memory_mib(stack.cgroup_parent)
                step = {"running": len(live), "exec_ms": lat, "idle_cpu_pct": cpu and round(cpu, 3),
                        "sandboxes_mib": mem}
                out["steps"].append(step)
                log(f"density: {len(live)} running: exec p50 {lat['p50_ms']:.1f} p99 {lat['p99_ms']:.1f} ms, "
                    f"idle CPU {cpu or 0:.2f}% of a core, {mem} MiB")
                if lat["p99_ms"] > limit:
                    stop = f"exec p99 {lat['p99_ms']:.1f} ms > {args.density_factor:g}x the empty node's"
                else:
                    running_max = len(live)
            out["stopped"] = stop or f"reached --density-max {args.density_max}"
            out["running_max"] = running_max
            last = out["steps"][-1] if out["steps"] else {}
            n = last.get("running") or 1
            if last.get("idle_cpu_pct") is not None:
                out["idle_cpu_pct_per_sandbox"] = round(last["idle_cpu_pct"] / n, 4)
            if last.get("sandboxes_mib") is not None:
                out["memory_mib_per_sandbox"] = round(last["sandboxes_mib"] / n, 1)
            await end_all(live, parallel=8)
    out["leaked_containers"] = stack.leaked
    out["daemon_exits"] = len(stack.exits)
    return out


async def phase_idle(args: argparse.Namespace) -> dict[str, Any]:
    """Idle CPU per hotbed/base sandbox (guest agent up) under each gVisor platform."""
    from hotbed.client import Client
    from hotbed.sandbox import Sandbox

    out: dict[str, Any] = {"n": args.idle_n, "window_s": args.density_window_s, "runtimes": {}}
    for runtime in args.idle_runtimes.split(","):
        with NodeStack(worker_env={"HOTBED_OCI_RUNTIME": runtime}) as stack:
            async with Client(stack.url, prefix=stack.prefix) as c:
                async def add() -> Any:
                    return await Sandbox.create("hotbed/base", cpu=0.25, memory_mb=256, client=c, timeout=3600)

                _r, live = await rate(args.idle_n, 4, add)
                await anyio.sleep(args.density_settle_s)
                cpu = await anyio.to_thread.run_sync(idle_cpu_pct, stack.cgroup_parent, args.density_window_s)
                mem = cgroup_memory_mib(stack.cgroup_parent)
                lat = await exec_p99(live, args.density_execs)
                out["runtimes"][runtime] = {
                    "idle_cpu_pct_per_sandbox": cpu and round(cpu / args.idle_n, 4),
                    "memory_mib_per_sandbox": mem and round(mem / args.idle_n, 1), "exec_ms": lat,
                }
                log(f"idle {runtime}: {cpu and cpu / args.idle_n:.3f}% of a core per sandbox, "
                    f"{mem and mem / args.idle_n:.1f} MiB, exec p50 {lat['p50_ms']:.1f} ms")
                await end_all(live)
    return out


# ---------------------------------------------------------------------- faults


class PrivateDockerd:
    """A dockerd of our own (socket, data root, exec root, containerd namespace), with
    the host's runsc runtimes, so the faults phase can restart it; the host's dockerd
    is never touched."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hotbed-dockerd-", dir="/var/tmp"))
        self.sock = self.dir / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.proc: subprocess.Popen[bytes] | None = None
        ns = self.ns = f"hotbed-bench-{secrets.token_hex(3)}"
        self.exec_root = f"/run/{ns}"
        host_conf = json.loads(Path("/etc/docker/daemon.json").read_text())
        conf = {
            "runtimes": host_conf.get("runtimes", {}), "experimental": True, "live-restore": True,
            "bridge": "none", "iptables": False, "ip-masq": False,
            "data-root": str(self.dir / "data"), "exec-root": self.exec_root, "pidfile": str(self.dir / "docker.pid"),
            "hosts": [self.host], "containerd-namespace": ns, "containerd-plugins-namespace": f"{ns}-plugins",
        }
        self.conf = self.dir / "daemon.json"
        self.conf.write_text(json.dumps(conf))

    def start(self) -> None:
        log_file = open(self.dir / "dockerd.log", "ab")  # noqa: SIM115 - the child holds it
        # close_fds: the CPU lock (and every other fd of ours) must not leak into dockerd.
        self.proc = subprocess.Popen(["dockerd", "--config-file", str(self.conf)], stdout=log_file,
                                     stderr=subprocess.STDOUT, close_fds=True, start_new_session=True)
        deadline = time.monotonic() + 60
        while docker("version", "--format", "{{.Server.Version}}", host=self.host, timeout=10).strip() == "":
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("private dockerd did not start: " + (self.dir / "dockerd.log").read_text()[-2000:])
            time.sleep(0.2)

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def load(self, image: str) -> None:
        save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
        subprocess.run(["docker", "load"], stdin=save.stdout, capture_output=True, check=True, timeout=300,
                       env=dict(os.environ, DOCKER_HOST=self.host))
        save.wait()

    def remove(self) -> None:
        try:
            left = docker("ps", "-aq", host=self.host).split()
            if left:
                docker("rm", "-f", *left, host=self.host, timeout=300)
        finally:
            self.stop()
            # With live-restore, a container dockerd did not remove (one made as it
            # stopped, or one the restart orphaned) keeps running when it stops: its
            # containerd shim and runsc's processes outlive this dockerd.
            ended = kill_matching((self.ns, self.exec_root, str(self.dir)))
            if ended:
                log(f"faults: killed {ended} process(es) the private dockerd left running")
        # dockerd leaves its data root (and the exec root) mounted on themselves.
        for path in (self.dir / "data", Path(self.exec_root)):
            subprocess.run(["umount", "-R", "-l", str(path)], capture_output=True, check=False)
        subprocess.run(["rm", "-rf", str(self.dir), self.exec_root], check=False)


def kill_matching(marks: tuple[str, ...]) -> int:
    """kill -9 every process whose command line names one of ``marks`` (a private
    dockerd's containerd namespace, exec root or folder: its containerd, shims and
    runsc's sandbox and gofer processes), then anything still a child of those; the
    number ended. Never this process or its parents."""
    mine = {os.getpid(), os.getppid()}
    found: set[int] = set()
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
        if pid not in mine and any(m in cmd for m in marks):
            found.add(pid)
    # Their descendants too (runsc's stub processes under ptrace name nothing).
    grew = True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in found and pid not in found and pid not in mine}
        found |= more
        grew = bool(more)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(found)


async def phase_faults(args: argparse.Namespace) -> dict[str, Any]:
    from hotbed.client import Client
    from hotbed.errors import HotbedError
    from hotbed.sandbox import Sandbox

    out: dict[str, Any] = {"clients": args.fault_clients, "timeline": []}
    dockerd = PrivateDockerd()
    dockerd.start()
    calls: list[dict[str, Any]] = []
    served: list[str] = []
    try:
        dockerd.load("hotbed/busybox")
        stack = NodeStack(schedulers=2, worker_env=runtime_env(args), docker_host=dockerd.host,
                          persistent_redis=True)
        with stack:
            stop = anyio.Event()

            async def timed(kind: str, fn: Any, timeout: float) -> Any:
                t = time.perf_counter()
                row: dict[str, Any] = {"kind": kind}
                try:
                    with anyio.fail_after(timeout + 10):
                        got = await fn()
                    row["ok"] = True
                    return got
                except HotbedError as exc:
                    row["error"] = type(exc).__name__
                except TimeoutError:
                    row["error"] = "hung"
                except Exception as exc:
                    row["error"] = f"untyped {type(exc).__name__}: {exc}"[:160]
                finally:
                    row["s"] = round(time.perf_counter() - t, 3)
                    calls.append(row)
                return None

            async def client_loop() -> None:
                async with Client(stack.url, prefix=stack.prefix) as c:
                    while not stop.is_set():
                        sb = await timed("create", lambda: Sandbox.create(
                            "hotbed/busybox", cpu=0.25, memory_mb=128, client=c, request_timeout=20,
                            timeout=120), 20)
                        if sb is None:
                            await anyio.sleep(0.2)
                            continue
                        served.append(sb.id)
                        for _ in range(3):
                            await timed("exec", lambda sb=sb: sb.exec("echo", "x", timeout=10), 10 + 15)
                        await timed("terminate", sb.terminate, 60 + 5)

            def mark(what: str) -> None:
                out["timeline"].append({"t": round(time.perf_counter() - t0, 1), "event": what})
                log(f"faults: {what}")

            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(args.fault_clients):
                    tg.start_soon(client_loop)
                gap = args.fault_gap_s
                await anyio.sleep(gap)
                mark("kill -9 worker")
                assert stack.worker is not None
                await anyio.to_thread.run_sync(stack.kill, stack.worker)
                await anyio.sleep(1.0)
                await anyio.to_thread.run_sync(stack.start_worker)
                mark("worker restarted")
                await anyio.sleep(gap)
                mark("kill -9 scheduler0")
                await anyio.to_thread.run_sync(stack.kill, stack.schedulers[0])
                await anyio.sleep(1.0)
                stack.schedulers[0] = await anyio.to_thread.run_sync(stack.start_scheduler, 0)
                mark("scheduler0 restarted")
                await anyio.sleep(gap)
                mark("restart redis")
                await anyio.to_thread.run_sync(stack.restart_redis)
                mark("redis back")
                await anyio.sleep(gap)
                mark("restart dockerd")
                await anyio.to_thread.run_sync(dockerd.restart)
                mark("dockerd back")
                await anyio.sleep(gap)
                stop.set()
            mark("load stopped")
            out["daemon_exits_list"] = stack.daemon_exits()
        out["leaked_containers"] = stack.leaked
    finally:
        await anyio.to_thread.run_sync(dockerd.remove)
    errors: dict[str, int] = {}
    for r in calls:
        if "error" in r:
            key = f"{r['kind']} {r['error']}"
            errors[key] = errors.get(key, 0) + 1
    out.update({
        "calls": len(calls), "ok": sum(1 for r in calls if r.get("ok")), "errors": errors,
        "hung_calls": sum(1 for r in calls if r.get("error") == "hung"),
        "untyped_errors": sum(1 for r in calls if str(r.get("error", "")).startswith("untyped")),
        "daemon_exits": len(out["daemon_exits_list"]),
        "duplicate_ids": len(served) - len(set(served)),
        "call_s": summary_ms([r["s"] for r in calls]),
    })
    return out


# ------------------------------------------------------------------------ main


RUNNERS = {"burst": phase_burst, "density": phase_density, "throughput": phase_throughput,
           "faults": phase_faults, "idle": phase_idle}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench node", description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", action="append", choices=[*PHASES, *EXTRA_PHASES],
                   help="run only this phase (repeatable); default: " + ", ".join(PHASES))
    p.add_argument("--out", default=str(results.RESULTS / "node.json"))
    p.add_argument("--runtime", choices=["docker", "runsc"], default="docker",
                   help="the worker's runtime: dockerd + runsc, or runsc driven directly (the "
                        "docker run baseline stays on dockerd)")
    p.add_argument("--oci-runtime", default="", help="dockerd runtime of the worker (default: the worker's)")
    p.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                   help="worker setting for the run, e.g. HOTBED_CPU_OVERCOMMIT=300 (repeatable)")
    p.add_argument("--pool", type=int, default=100)
    p.add_argument("--burst", type=int, default=300)
    p.add_argument("--procs", type=int, default=5)
    p.add_argument("--burst-timeout", type=float, default=60.0, help="each create's request timeout")
    p.add_argument("--burst-template", default="base", choices=["base", "light", "heavy"],
                   help="base: hotbed/base as it is; light: busybox; heavy: the Python set-up")
    p.add_argument("--pool-fill-timeout", type=float, default=600.0)
    p.add_argument("--density-max", type=int, default=500)
    p.add_argument("--density-step", type=int, default=50)
    p.add_argument("--density-factor", type=float, default=3.0)
    p.add_argument("--density-cpu", type=float, default=1.0)
    p.add_argument("--density-memory-mb", type=int, default=512)
    p.add_argument("--density-execs", type=int, default=100)
    p.add_argument("--density-settle-s", type=float, default=15.0)
    p.add_argument("--density-window-s", type=float, default=10.0)
    p.add_argument("--throughput-n", type=int, default=16)
    p.add_argument("--parallelism", type=int, default=8)
    p.add_argument("--sweep", default="", help="also restores/s at these parallelisms, e.g. 1,2,4,8")
    p.add_argument("--fault-clients", type=int, default=4)
    p.add_argument("--fault-gap-s", type=float, default=12.0)
    p.add_argument("--idle-n", type=int, default=20)
    p.add_argument("--idle-runtimes", default="runsc,runsc-ptrace")
    return p.parse_args(argv)


def load_doc(path: Path) -> dict[str, Any]:
    """The results so far: other phases' sections are kept (read, updated, written)."""
    if not path.exists():
        return {}
    try:
        return results.load(path)
    except (results.NotOneRun, ValueError) as exc:
        log(f"{path}: not kept ({exc})")
        return {}


def main(argv: list[str]) -> int:
    import uvloop

    args = parse(argv)
    phases = args.phase or list(PHASES)
    if args.runtime == "runsc" and {"faults", "idle"} & set(phases):
        # Both are about dockerd: its restarts, and its OCI runtimes' idle cost.
        raise SystemExit("--runtime runsc: the faults and idle phases need the docker runtime")
    out = Path(args.out)
    run = results.new_run("node", argv)
    run["container_runtime"] = results.container_runtime(worker_runtime(args))
    run["worker_runtime"] = args.runtime
    code = 0
    for phase in phases:
        left = containers_of_prefix_count()
        log(f"phase {phase} (hotbed containers on the host before: {left})")
        started = results.utc_now()
        try:
            section = anyio.run(RUNNERS[phase], args, backend_options={"loop_factory": uvloop.new_event_loop})
        except Exception as exc:
            log(f"phase {phase} failed: {type(exc).__name__}: {exc}")
            section = {"failed": f"{type(exc).__name__}: {exc}"}
            code = 1
        section["measured"] = {"run": run["id"], "started": started, "finished": results.utc_now(),
                               "argv": list(argv), "load_after": loadavg()}
        doc = load_doc(out)
        doc.setdefault("runs", {})[run["id"]] = {k: v for k, v in run.items() if k != "finished"}
        doc[phase] = section
        doc["run"] = run
        results.write(out, doc)
        log(f"phase {phase}: {json.dumps({k: v for k, v in section.items() if not isinstance(v, (dict, list))})}")
    return code


def containers_of_prefix_count() -> int:
    return len(docker("ps", "-q", "--filter", "label=dev.hotbed.managed=1").split())


__all__ = ["containers_of", "main"]
