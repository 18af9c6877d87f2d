"""``python -m bench exec`` (``make bench-exec``): command latency and output throughput
through the whole stack, against ``docker exec`` on the same runsc container.

Starts a private Redis, one scheduler process and one real docker+runsc worker process
(the SDK client is this process), makes one ``hotbed/base`` sandbox and measures:

* exec of ``true`` end to end from the SDK (Redis -> worker -> guest agent -> back);
* ``docker exec`` of ``true`` on the same container through the Engine API (aiodocker,
  as hotbed's old exec path did), in the same run: the ratio is printed;
* the guest agent's own share (``duration_s``: spawning ``true`` under gVisor);
* the floor: the same spawn (``subprocess.Popen`` of ``true`` with the agent's pipes and
  new session, read to EOF, reaped) timed by a loop inside the same sandbox, with no
  hotbed in the way; e2e p50 minus this is what hotbed itself costs;
* CPU per exec of the worker process, Redis and the client (on a 2-core box under
  load, CPU is latency);
* a persistent-session command (``true`` in ``sb.shell()``);
* streaming throughput of a command printing 100 MB;
* 1,000 sequential SWE-agent-style commands in one session (any failure counts);
* an SWE-agent episode (``swe_episode``): the same sequence of SWE-ReX calls through
  hotbed's SWE-ReX deployment and through SWE-ReX's own docker deployment on the same
  runtime, same image, same run (see :func:`swe_episode`).

Results go to bench/results/exec.json (``--out``; one run, one file: see
:mod:`bench.common.results`); bench/README.md has the table.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from bench.common import results
from bench.common.cluster import ROOT, Cluster, loadavg, proc_cpu_s
from bench.common.stats import pct, summary_ms


async def docker_exec_true(container: Any) -> float:
    t = time.perf_counter()
    exe = await container.exec(["true"], stdout=True, stderr=True)
    async with exe.start(detach=False) as stream:
        while await stream.read_out() is not None:
            pass
    while True:
        info = await exe.inspect()
        if not info.get("Running") and info.get("ExitCode") is not None:
            break
        await anyio.sleep(0.002)
    return time.perf_counter() - t


# Runs inside the sandbox (the image's python3): spawn `true` as the guest agent does,
# ARGV[1] times, and print each round trip in seconds.
FLOOR = """
import json, os, subprocess, sys, time
env = dict(os.environ)
xs = []
for _ in range(int(sys.argv[1])):
    t = time.perf_counter()
    p = subprocess.Popen(["true"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, start_new_session=True, close_fds=True)
    p.communicate()
    xs.append(time.perf_counter() - t)
print(json.dumps(xs))
"""

SWE_COMMANDS = [
    "cd /tmp/repo",
    "ls -la",
    "cat src/app.py",
    "grep -rn 'def ' src | head -5",
    "export STEP=$((STEP+1)); echo step $STEP",
    "sed -i 's/return 1/return 2/' src/app.py && cat src/app.py | tail -1",
    "sed -i 's/return 2/return 1/' src/app.py",
    "find . -name '*.py' | wc -l",
    "python3 -c 'import sys; print(sys.version_info[:2])'",
    "git status --short 2>/dev/null | head -3; true",
]


EPISODE_SETUP = "export LANG=C.UTF-8 LC_ALL=C.UTF-8 PIP_PROGRESS_BAR=off PAGER=cat"
EPISODE_EXECUTES: list[str | list[str]] = [
    ["python3", "-c", "print(6 * 7)"],
    ["ls", "/tmp/repo/src"],
    ["cat", "/tmp/repo/src/app.py"],
    "grep -c def /tmp/repo/src/app.py",
    ["sh", "-c", "echo out; echo err >&2"],
]


def make_repo(root: Path, files: int) -> Path:
    """A checkout-like tree of ``files`` small files (100 per folder), with the
    src/app.py the SWE-agent-style commands read and edit."""
    repo = root / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "app.py").write_text("def f():\n    return 1\n")
    for i in range(files - 1):
        d = repo / "pkg" / f"m{i // 100:03d}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        (d / f"f{i % 100:03d}.py").write_text(f"X_{i} = {i}\n")
    return repo


async def episode(
    deployment: Any, repo: Path, *, commands: int, on_start: Callable[[Any], object] | None = None,
) -> tuple[float, dict[str, list[float]]]:
    """One SWE-agent episode through a SWE-ReX deployment: start, session set-up,
    upload of the repository, ``commands`` session commands, 5 executes, 10 file
    writes and 10 reads, stop. Returns its wall time and each call's durations."""
    from swerex.runtime.abstract import (
        BashAction,
        Command,
        CreateBashSessionRequest,
        ReadFileRequest,
        UploadRequest,
        WriteFileRequest,
    )

    calls: dict[str, list[float]] = {}

    async def timed(kind: str, call: Any) -> Any:
        t = time.perf_counter()
        out = await call
        calls.setdefault(kind, []).append(time.perf_counter() - t)
        return out

    t0 = time.perf_counter()
    await timed("start", deployment.start())
    if on_start is not None:
        on_start(deployment)
    try:
        rt = deployment.runtime
        await timed("create_session", rt.create_session(
            CreateBashSessionRequest(startup_source=[], startup_timeout=10)))
        await timed("run_in_session", rt.run_in_session(BashAction(command=EPISODE_SETUP, check="silent")))
        await timed("upload", rt.upload(UploadRequest(source_path=str(repo), target_path="/tmp/repo")))
        for i in range(commands - 1):
            obs = await timed("run_in_session", rt.run_in_session(BashAction(
                command=SWE_COMMANDS[i % len(SWE_COMMANDS)], timeout=60, check="silent")))
            assert obs.exit_code == 0, obs
        for cmd in EPISODE_EXECUTES:
            res = await timed("execute", rt.execute(Command(command=cmd, shell=isinstance(cmd, str), timeout=60)))
            assert res.exit_code == 0, res
        for i in range(10):
            path = f"/tmp/repo/src/edit_{i}.py"
            await timed("write_file", rt.write_file(WriteFileRequest(path=path, content=f"V = {i}\n" * 50)))
            got = await timed("read_file", rt.read_file(ReadFileRequest(path=path)))
            assert got.content == f"V = {i}\n" * 50
    finally:
        await timed("stop", deployment.stop())
    return time.perf_counter() - t0, calls


async def swe_episode(args: argparse.Namespace, client: Any) -> dict[str, Any]:
    """The SWE-agent episode through hotbed and through SWE-ReX's docker deployment on
    ``args.oci_runtime``, alternating, on the same image (hotbed/base plus swe-rex,
    which SWE-ReX's server needs), in the same run. SWE-ReX's server is reached through
    a stdio relay over one ``docker exec`` (gVisor's network is not reachable from the
    host here): see bench.common.swerex_ref.

    hotbed runs each episode twice: from a cold create (the headline, as SWE-ReX's
    deployment boots a container), and with ``--swe-episode-pool`` > 0 also from a
    warm pool of a template made from the same image with no set-up (``pool``: what a
    user who keeps a pool for their agents waits for)."""
    import tempfile

    from bench.common.swerex_ref import ensure_image, swerex_docker
    from hotbed import templates
    from hotbed.integrations.swerex import HotbedDeployment

    image = await anyio.to_thread.run_sync(ensure_image)
    shape = {"cpu": args.swe_episode_cpu, "memory_mb": 512}
    sides = ["hotbed", "swerex"]
    pool = template = ""
    if args.swe_episode_pool > 0:
        template = f"swe-episode-{secrets.token_hex(3)}"
        await templates.create_template(template, image=image, client=client, **shape)
        pool = await templates.set_pool(template, args.swe_episode_pool, client=client, **shape)
        sides.insert(1, "hotbed_pool")
    walls: dict[str, list[float]] = {side: [] for side in sides}
    calls: dict[str, dict[str, list[float]]] = {side: {} for side in sides}
    paths: list[str] = []

    async def pool_ready() -> None:
        # A claim, not a cold fallback, is what this side measures: the pool refills
        # while the other sides run, and is waited for only if it has not.
        with anyio.fail_after(120):
            while not await client.redis.llen(client.keys.pool_ready(pool)):
                await anyio.sleep(0.05)

    try:
        with tempfile.TemporaryDirectory(prefix="bench-swe-") as tmp:
            repo = await anyio.to_thread.run_sync(make_repo, Path(tmp), args.swe_episode_files)
            for _ in range(args.swe_episodes):
                for side in sides:
                    if side == "swerex":
                        async with swerex_docker(image, oci_runtime=args.oci_runtime) as dep:
                            wall, got = await episode(dep, repo, commands=args.swe_episode_commands)
                    else:
                        pooled = side == "hotbed_pool"
                        if pooled:
                            await pool_ready()
                        hot = HotbedDeployment(image, client=client, timeout=600, **shape,
                                               **({"template": template} if pooled else {}))
                        wall, got = await episode(
                            hot, repo, commands=args.swe_episode_commands,
                            on_start=(lambda d: paths.append(d.sandbox.path)) if pooled else None,
                        )
                    walls[side].append(wall)
                    for kind, xs in got.items():
                        calls[side].setdefault(kind, []).extend(xs)
    finally:
        if template:
            with anyio.CancelScope(shield=True):
                await templates.set_pool(template, 0, client=client, **shape)
                await templates.delete_template(template, client=client)

    def compare(side: str) -> dict[str, Any]:
        per_call = {
            kind: {"hotbed": summary_ms(calls[side].get(kind, [])),
                   "swerex": summary_ms(calls["swerex"].get(kind, []))}
            for kind in calls["swerex"]
        }
        hotbed_s, swerex_s = pct(walls[side], 0.5), pct(walls["swerex"], 0.5)
        return {
            "hotbed_s": round(hotbed_s, 3), "swerex_s": round(swerex_s, 3),
            "ratio": round(swerex_s / hotbed_s, 2),
            "slower_calls": sorted(k for k, v in per_call.items()
                                   if v["hotbed"]["p50_ms"] > v["swerex"]["p50_ms"]),
            "calls": per_call,
        }

    out = {
        **compare("hotbed"), "hotbed_start": "cold create", "hotbed_worker_runtime": args.worker_runtime,
        "episodes": args.swe_episodes, "image": image,
        "files_uploaded": args.swe_episode_files, "hotbed_cpu": args.swe_episode_cpu,
        "session_commands": args.swe_episode_commands,
        "swerex_transport": "stdio relay over one docker exec into the runsc container "
                            "(--network=none); RemoteRuntime opens one connection per request",
    }
    if pool:
        out["pool"] = {**compare("hotbed_pool"), "hotbed_start": "warm pool claim",
                       "pool_size": args.swe_episode_pool,
                       "paths": {p: paths.count(p) for p in sorted(set(paths))}}
    return out


def runsc_platform(oci_runtime: str) -> str:
    """The gVisor platform of a dockerd runtime host-setup registers."""
    return "ptrace" if oci_runtime.endswith("ptrace") else "systrap"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import aiodocker

    from hotbed.client import Client
    from hotbed.sandbox import Sandbox
    from workers.runtimes.docker import container_name

    out: dict[str, Any] = {}
    prefix = f"bexec{secrets.token_hex(3)}"
    with Cluster(schedulers=1, fleets=0, prefix=prefix) as cluster:
        # Set-up before anything is timed: plain blocking calls are fine here.
        worker_log = open(Path(cluster.dir) / "worker.log", "wb")  # noqa: ASYNC230
        worker = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "workers", "--runtime", args.worker_runtime, "--worker-id", f"w-{prefix}"],
            env=cluster.env(HOTBED_DRAIN_ON_STOP="true", HOTBED_SHUTDOWN_GRACE_S="2",
                            HOTBED_OCI_RUNTIME=args.oci_runtime,
                            # The runsc runtime on the same gVisor platform as the
                            # dockerd runtime SWE-ReX's side runs on.
                            HOTBED_RUNSC_PLATFORM=runsc_platform(args.oci_runtime)),
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=worker_log,
        )
        docker = aiodocker.Docker()
        try:
            cluster.wait_workers(1, timeout=60)
            out["cluster"] = cluster.settings_record()
            async with Client(cluster.url, prefix=prefix) as client:
                if args.only_swe_episode:
                    out["swe_episode"] = await swe_episode(args, client)
                    return out
                sb = await Sandbox.create("hotbed/base", client=client, memory_mb=512, timeout=1800)
                try:
                    container = docker.containers.container(container_name(sb.id))
                    for _ in range(args.warmup):
                        await sb.exec("true")
                        await docker_exec_true(container)
                    hot, agent_side = [], []
                    cpu0 = (proc_cpu_s(worker.pid), proc_cpu_s(cluster.redis_proc.pid),  # type: ignore[union-attr]
                            time.process_time())
                    for _ in range(args.n):
                        t = time.perf_counter()
                        res = await sb.exec("true")
                        hot.append(time.perf_counter() - t)
                        agent_side.append(res.duration_s)
                        assert res.exit_code == 0
                    cpu1 = (proc_cpu_s(worker.pid), proc_cpu_s(cluster.redis_proc.pid),  # type: ignore[union-attr]
                            time.process_time())
                    out["cpu_ms_per_exec"] = {
                        name: round((b - a) / args.n * 1e3, 3)
                        for name, a, b in zip(("worker", "redis", "client"), cpu0, cpu1, strict=True)
                    }
                    base = [await docker_exec_true(container) for _ in range(args.n_docker)]
                    out["exec_true"] = summary_ms(hot)
                    out["exec_true_agent_spawn"] = summary_ms(agent_side)
                    out["docker_exec_true"] = summary_ms(base)
                    out["speedup_p50"] = round(pct(base, 0.5) / pct(hot, 0.5), 1)
                    floor = await sb.exec("python3", "-c", FLOOR, str(args.n), timeout=300)
                    out["floor_spawn_in_sandbox"] = summary_ms(json.loads(floor.stdout))
                    out["hotbed_share_p50_ms"] = round(
                        out["exec_true"]["p50_ms"] - out["floor_spawn_in_sandbox"]["p50_ms"], 2
                    )

                    # A plain shell command runs without /bin/sh in between; the same
                    # command through sh -c shows what that saves.
                    plain, via_sh = [], []
                    for _ in range(max(1, args.n // 5)):
                        t = time.perf_counter()
                        assert (await sb.exec("ls /", shell=True)).exit_code == 0
                        plain.append(time.perf_counter() - t)
                        t = time.perf_counter()
                        assert (await sb.exec("sh", "-c", "ls /")).exit_code == 0
                        via_sh.append(time.perf_counter() - t)
                    out["shell_plain_ls"] = summary_ms(plain)
                    out["sh_c_ls"] = summary_ms(via_sh)

                    sh = sb.shell("bench")
                    await sh.run("true")
                    sess = []
                    for _ in range(args.n):
                        t = time.perf_counter()
                        r = await sh.run("true")
                        sess.append(time.perf_counter() - t)
                        assert r.exit_code == 0
                    out["session_true"] = summary_ms(sess)

                    size = args.stream_mb * 1_000_000
                    t = time.perf_counter()
                    got = 0
                    async with sb.exec_stream(
                        "head", "-c", str(size), "/dev/zero", max_output=size + 1, timeout=300
                    ) as stream:
                        async for chunk in stream:
                            got += len(chunk.data)
                    dt = time.perf_counter() - t
                    assert got == size, (got, size)
                    out["stream"] = {"bytes": got, "seconds": round(dt, 3), "mb_per_s": round(got / dt / 1e6, 1)}

                    await sb.exec("sh", "-c", "mkdir -p /tmp/repo/src && printf 'def f():\\n    return 1\\n' > /tmp/repo/src/app.py")
                    swe = sb.shell("swe")
                    failures = 0
                    lat = []
                    t0 = time.perf_counter()
                    for i in range(args.swe_commands):
                        cmd = SWE_COMMANDS[i % len(SWE_COMMANDS)]
                        t = time.perf_counter()
                        r = await swe.run(cmd, timeout=60, merge_stderr=True)
                        lat.append(time.perf_counter() - t)
                        if r.exit_code != 0:
                            failures += 1
                    step = await swe.run("echo $STEP")
                    expected = sum(1 for i in range(args.swe_commands) if i % len(SWE_COMMANDS) == 4)
                    if step.stdout.strip() != str(expected):
                        failures += 1
                    out["swe_session"] = {
                        "commands": args.swe_commands, "failures": failures,
                        "seconds": round(time.perf_counter() - t0, 2), **summary_ms(lat),
                    }
                finally:
                    await sb.terminate()
                if args.swe_episodes:
                    out["swe_episode"] = await swe_episode(args, client)
        finally:
            await docker.close()
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench exec")
    p.add_argument("--n", type=int, default=500, help="timed execs / session commands")
    p.add_argument("--n-docker", type=int, default=100, help="timed docker execs (baseline)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--stream-mb", type=int, default=100)
    p.add_argument("--swe-commands", type=int, default=1000)
    p.add_argument("--swe-episodes", type=int, default=3,
                   help="SWE-agent episodes per side (0: skip the phase)")
    p.add_argument("--swe-episode-files", type=int, default=5000, help="files in the uploaded repository")
    p.add_argument("--swe-episode-commands", type=int, default=50, help="session commands per episode")
    p.add_argument("--swe-episode-pool", type=int, default=2,
                   help="also run hotbed's episodes from a warm pool of this size (0: cold creates only)")
    p.add_argument("--swe-episode-cpu", type=float, default=float(os.cpu_count() or 1),
                   help="CPUs of hotbed's episode sandbox (default: the host's, as SWE-ReX's "
                        "container has no CPU limit)")
    p.add_argument("--only-swe-episode", action="store_true", help="run only the SWE-agent episode phase")
    p.add_argument("--oci-runtime", default="runsc",
                   help="dockerd runtime of the sandbox (host-setup registers runsc, runsc-ptrace)")
    p.add_argument("--worker-runtime", choices=["docker", "runsc"], default="docker",
                   help="hotbed worker's runtime: sandboxes through dockerd, or runsc driven "
                        "directly (same gVisor platform as --oci-runtime); runsc needs --only-swe-episode")
    p.add_argument("--out", default=str(results.RESULTS / "exec.json"), help="results file")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    if args.worker_runtime != "docker" and not args.only_swe_episode:
        p.error("--worker-runtime runsc measures the SWE-agent episode only (--only-swe-episode): "
                "the other phases compare against docker exec into the sandbox's container")
    if args.only_swe_episode and not args.no_save and Path(args.out).exists():
        # Refused before the run, not after it: see merge_phase.
        try:
            results.load(args.out)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"{exc}; pass --out NEW_FILE") from None
    run_block = results.new_run("exec", argv)
    runtime = results.container_runtime(args.oci_runtime)
    load_before = loadavg()
    measured = anyio.run(run, args, backend="asyncio", backend_options={"use_uvloop": True})
    res: dict[str, Any] = {"run": run_block, "oci_runtime": args.oci_runtime, "runtime": runtime,
                           "loadavg_before": load_before, "loadavg_after": loadavg(), **measured}
    m = run_block["machine"]
    if args.only_swe_episode:
        print(f"machine: {m['cpus']} CPUs {m['cpu_model']}, load {load_before}, runtime "
              f"{args.oci_runtime} = {runtime['path']} ({runtime['version']})")
        print_swe_episode(res["swe_episode"])
        if not args.no_save:
            print(f"wrote {results.write(args.out, merge_phase(args.out, res, 'swe_episode'))}")
        return 0
    e, d, s = res["exec_true"], res["docker_exec_true"], res["session_true"]
    print(f"machine: {m['cpus']} CPUs {m['cpu_model']}, load {load_before}, runtime "
          f"{args.oci_runtime} = {runtime['path']} ({runtime['version']}), Docker {runtime['docker_server']}")
    print(f"{'measure':<44} {'p50 ms':>8} {'p99 ms':>8}")
    print(f"{'exec true, SDK end to end (guest agent)':<44} {e['p50_ms']:>8} {e['p99_ms']:>8}")
    a = res["exec_true_agent_spawn"]
    print(f"{'  of which: agent spawning true (gVisor)':<44} {a['p50_ms']:>8} {a['p99_ms']:>8}")
    f = res["floor_spawn_in_sandbox"]
    print(f"{'  floor: same spawn looped inside sandbox':<44} {f['p50_ms']:>8} {f['p99_ms']:>8}")
    print(f"{'  hotbed own share (e2e p50 - floor p50)':<44} {res['hotbed_share_p50_ms']:>8}")
    print(f"{'docker exec true, same container (baseline)':<44} {d['p50_ms']:>8} {d['p99_ms']:>8}")
    print(f"{'session command (true)':<44} {s['p50_ms']:>8} {s['p99_ms']:>8}")
    pl, vs = res["shell_plain_ls"], res["sh_c_ls"]
    print(f"{'exec ls / with shell=True (no sh between)':<44} {pl['p50_ms']:>8} {pl['p99_ms']:>8}")
    print(f"{'exec sh -c ls / (what that replaces)':<44} {vs['p50_ms']:>8} {vs['p99_ms']:>8}")
    print(f"exec vs docker exec: {res['speedup_p50']}x faster at p50")
    c = res["cpu_ms_per_exec"]
    print(f"CPU per exec: worker {c['worker']} ms, redis {c['redis']} ms, client {c['client']} ms")
    st = res["stream"]
    print(f"streaming {st['bytes'] / 1e6:.0f} MB: {st['seconds']} s = {st['mb_per_s']} MB/s")
    sw = res["swe_session"]
    print(f"{sw['commands']} SWE-agent-style session commands: {sw['failures']} failures, "
          f"{sw['seconds']} s, p50 {sw['p50_ms']} ms, p99 {sw['p99_ms']} ms")
    if "swe_episode" in res:
        print_swe_episode(res["swe_episode"])
    if not args.no_save:
        print(f"wrote {results.write(args.out, res)}")
    return 0 if sw["failures"] == 0 else 1


def merge_phase(path: str, res: dict[str, Any], phase: str) -> dict[str, Any]:
    """The results file at ``path`` (a whole run's, digest checked) with ``phase``
    replaced by this run's, which keeps its own run block, runtime and load beside it;
    this run's document alone where there is no file yet. A one-phase run must not throw
    away the other phases' results, so a file that is not one run's (legacy, edited) is
    refused: name another with ``--out``."""
    try:
        doc = results.load(path)
    except FileNotFoundError:
        return res
    except (OSError, ValueError) as exc:
        raise SystemExit(f"not adding {phase} to {path}: {exc}; pass --out NEW_FILE") from None
    section = dict(res[phase])
    for key in ("oci_runtime", "runtime", "loadavg_before", "loadavg_after"):
        section[key] = res[key]
    section["run"] = {**res["run"], "finished": results.utc_now()}
    doc[phase] = section
    return doc


def print_swe_episode(ep: dict[str, Any]) -> None:
    print(f"SWE-agent episode ({ep['episodes']} per side; {ep['session_commands']} session "
          f"commands, {ep['files_uploaded']}-file upload; image {ep['image']}; SWE-ReX via "
          f"{ep['swerex_transport']})")
    print(f"{'call':<16} {'hotbed p50':>10} {'p99':>8} {'SWE-ReX p50':>12} {'p99':>8}")
    for kind, v in ep["calls"].items():
        h, r = v["hotbed"], v["swerex"]
        print(f"{kind:<16} {h['p50_ms']:>10} {h['p99_ms']:>8} {r['p50_ms']:>12} {r['p99_ms']:>8}")
    print(f"episode wall: hotbed {ep['hotbed_s']} s, SWE-ReX {ep['swerex_s']} s = {ep['ratio']}x; "
          f"hotbed slower on: {', '.join(ep['slower_calls']) or 'nothing'}")
    if "pool" in ep:
        p = ep["pool"]
        print(f"from a warm pool of {p['pool_size']} (starts: {p['paths']}): hotbed {p['hotbed_s']} s = "
              f"{p['ratio']}x; start p50 {p['calls']['start']['hotbed']['p50_ms']} ms; "
              f"hotbed slower on: {', '.join(p['slower_calls']) or 'nothing'}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
