"""``python -m bench start`` (``make bench-start``): time from create to first exec.

One run, one machine, the same template for every path:

  (a) ``docker``  plain ``docker run`` of the image (runsc, no network) + the set-up via
                  ``docker exec``: what a SWE-agent user does today (the baseline);
  (b) ``cold``    hotbed ``Sandbox.create(image)`` + the same set-up through hotbed;
  (c) ``restore`` hotbed ``Sandbox.create(template=...)`` with no warm pool: restored
                  from the template's gVisor memory snapshot;
  (d) ``warm``    the same create with a warm pool: an atomic claim in Redis.

Each path is timed from the create call to the first successful ``true`` exec, over
``--n`` sandboxes sequentially and at ``--concurrency`` (each sandbox is ended right
after its sample, untimed); for (d) the claim alone (the
create call returning) is reported too. Two templates: ``heavy`` (hotbed/base: a Python
process that imports ~90 stdlib modules, hashes for a few seconds, builds a 200k-entry
table, then waits in a loop) and ``light`` (busybox, no set-up). Then:

* refill throughput: sandboxes made ready per second at parallelism ``--concurrency``,
  hotbed's pool controller restoring into a pool vs plain ``docker run`` (+ set-up);
* sustained creates: ``--concurrency`` clients creating (and ending) sandboxes for
  ``--sustain-s`` seconds against a pool of ``--pool`` while it is refilled.

Daemons are real processes (one scheduler, one docker+runsc worker, private Redis).
Results: bench/results/start.json (+ start.png). The load average is recorded: the box
is shared, so absolute numbers move with it; ratios are measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from bench.common import results
from bench.common.cluster import ROOT, Cluster, loadavg
from bench.common.loadgen import callers, run_many
from bench.common.stats import pct, summary_ms

HEAVY_PY = r'''
import time
t0 = time.time()
import json, re, csv, sqlite3, decimal, fractions, statistics, asyncio, email.parser, http.client
import urllib.request, xml.etree.ElementTree, xml.dom.minidom, html.parser, argparse, logging
import unittest, difflib, textwrap, tarfile, zipfile, gzip, bz2, lzma, hashlib, hmac, secrets
import uuid, pathlib, shutil, tempfile, subprocess, threading, concurrent.futures, dataclasses
import typing, enum, functools, itertools, collections, heapq, bisect, pprint, pickle, copy
import inspect, ast, dis, tokenize, datetime, calendar, locale, gettext, string, codecs, unicodedata
import multiprocessing, ssl, socket, selectors, sched, queue, contextlib, operator, numbers, random
t1 = time.time()
h = b"seed"
for _ in range(8_000_000):
    h = hashlib.sha256(h).digest()
table = {i: hashlib.sha256(str(i).encode()).hexdigest() for i in range(200_000)}
index = collections.defaultdict(list)
for k, v in table.items():
    index[v[:3]].append(k)
t2 = time.time()
with open("/tmp/heavy.ready", "w") as f:
    f.write(f"imports={t1-t0:.2f}s build={t2-t1:.2f}s entries={len(table)} digest={h.hex()[:16]}\n")
while True:
    time.sleep(1)
'''

# name -> (image, files, start command, readiness check, memory MiB)
TEMPLATES: dict[str, tuple[str, dict[str, str], str | None, str | None, int]] = {
    "heavy": ("hotbed/base", {"/tmp/heavy.py": HEAVY_PY}, "python3 /tmp/heavy.py",
              "test -e /tmp/heavy.ready", 512),
    "light": ("hotbed/busybox", {}, None, None, 128),
}


async def sh(*argv: str, check: bool = True) -> str:
    res = await anyio.run_process(list(argv), check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}... exited {res.returncode}: {res.stderr.decode()[-400:]}")
    return res.stdout.decode()


async def wait_ready_docker(name: str, check: str) -> None:
    while (await anyio.run_process(["docker", "exec", name, "sh", "-c", check], check=False)).returncode:
        await anyio.sleep(0.05)


# ------------------------------------------------------------------ the paths


async def path_docker(tpl: str, prefix: str) -> tuple[float, str]:
    """(a): docker run + set-up via docker exec + first exec. Returns (seconds, name)."""
    image, files, start, ready, mem = TEMPLATES[tpl]
    name = f"{prefix}-d{secrets.token_hex(4)}"
    t = time.perf_counter()
    await sh("docker", "run", "-d", "--name", name, "--runtime", "runsc", "--network", "none",
             "--label", f"dev.hotbed.bench={prefix}", "-m", f"{mem}m", "--user", "1000:1000",
             image, "sleep", "infinity")
    for path, content in files.items():
        # As an argument, not stdin: `docker exec -i` with piped stdin hangs now and then.
        await sh("docker", "exec", name, "sh", "-c", f'printf "%s" "$1" > {path}', "sh", content)
    if start:
        await sh("docker", "exec", "-d", name, "sh", "-c", start)
    if ready:
        await wait_ready_docker(name, ready)
    await sh("docker", "exec", name, "true")
    return time.perf_counter() - t, name


async def docker_rm(got: tuple[float, str]) -> None:
    await sh("docker", "rm", "-f", got[1], check=False)


async def path_cold(tpl: str, client: Any) -> tuple[float, Any]:
    from hotbed.sandbox import Sandbox

    image, files, start, ready, mem = TEMPLATES[tpl]
    t = time.perf_counter()
    sb = await Sandbox.create(image, memory_mb=mem, client=client, timeout=3600)
    for path, content in files.items():
        await sb.write_file(path, content)
    if start:
        await sb.spawn(start)
    if ready:
        while not (await sb.run(ready)).ok:
            await anyio.sleep(0.05)
    assert (await sb.exec("true")).ok
    return time.perf_counter() - t, sb


async def path_template(tpl: str, client: Any, name: str, want: str) -> tuple[float, float, Any]:
    """(c)/(d): create from the template; returns (create s, to-first-exec s, sandbox)."""
    from hotbed.sandbox import Sandbox

    mem = TEMPLATES[tpl][4]
    t = time.perf_counter()
    sb = await Sandbox.create(template=name, memory_mb=mem, client=client, timeout=3600)
    created = time.perf_counter() - t
    assert (await sb.exec("true")).ok
    if sb.path != want:
        raise RuntimeError(f"expected path {want}, got {sb.path}")
    return created, time.perf_counter() - t, sb


async def cleanup(sandboxes: list[Any], prefix: str) -> None:
    sem = anyio.Semaphore(8)

    async def end(sb: Any) -> None:
        async with sem:
            await sb.terminate()

    async with anyio.create_task_group() as tg:
        for sb in sandboxes:
            tg.start_soon(end, sb)
    ids = (await sh("docker", "ps", "-aq", "--filter", f"label=dev.hotbed.bench={prefix}")).split()
    if ids:
        await sh("docker", "rm", "-f", *ids, check=False)


async def wait_pool(client: Any, pool: str, n: int, timeout: float = 600) -> float:
    t = time.perf_counter()
    with anyio.fail_after(timeout):
        while await client.redis.llen(client.keys.pool_ready(pool)) < n:
            await anyio.sleep(0.02)
    return time.perf_counter() - t


# ------------------------------------------------------------------- the run


async def run(
    args: argparse.Namespace, cluster: Cluster, prefix: str, out: dict[str, Any]
) -> dict[str, Any]:
    """Fills ``out`` as it goes, so a run that fails late still reports what it measured."""
    from hotbed import templates
    from hotbed.client import Client

    out.update({"templates": {}, "paths": {}, "refill": {}, "sustained": {}})
    conc = args.concurrency
    async with Client(cluster.url, prefix=prefix) as client:
        names = {}
        for tpl in args.templates:
            image, files, start, ready, mem = TEMPLATES[tpl]
            name = f"{tpl}-{secrets.token_hex(3)}"
            r = await templates.create_template(
                name, image=image, files=files, start=[start] if start else [], ready=ready,
                ready_timeout=600, memory_mb=mem, client=client,
            )
            names[tpl] = name
            out["templates"][tpl] = {"image": image, "snapshot_bytes": r.size_bytes, "build_s": round(r.build_s, 2)}
            print(f"template {tpl}: built in {r.build_s:.2f}s, snapshot {r.size_bytes / 2**20:.1f} MiB", flush=True)

        for tpl in args.templates:
            name, mem = names[tpl], TEMPLATES[tpl][4]
            res: dict[str, Any] = {}
            for mode, c in (("seq", 1), (f"c{conc}", conc)):
                n = args.n_heavy if tpl == "heavy" and args.n_heavy else args.n
                if "docker" in args.paths:  # (a) docker run + set-up
                    got, wall = await run_many(n, c, lambda t=tpl: path_docker(t, prefix), end=docker_rm)
                    res[f"docker_{mode}"] = summary_ms([g[0] for g in got]) | {"per_s": round(n / wall, 2)}
                    await cleanup([], prefix)
                if "cold" in args.paths:  # (b) hotbed cold boot + set-up
                    got, wall = await run_many(
                        n, c, lambda t=tpl: path_cold(t, client), end=lambda g: g[1].terminate()
                    )
                    res[f"cold_{mode}"] = summary_ms([g[0] for g in got]) | {"per_s": round(n / wall, 2)}
                    await cleanup([], prefix)
                if "restore" in args.paths:  # (c) restore (no pool)
                    got, wall = await run_many(
                        n, c, lambda t=tpl, nm=name: path_template(t, client, nm, "restore"),
                        end=lambda g: g[2].terminate(),
                    )
                    res[f"restore_{mode}"] = summary_ms([g[1] for g in got]) | {"per_s": round(n / wall, 2)}
                    await cleanup([], prefix)
                if "warm" in args.paths:  # (d) warm claim: a pool as large as the run, filled first
                    pool = await templates.set_pool(name, n, memory_mb=mem, client=client)
                    await wait_pool(client, pool, n)
                    got, wall = await run_many(
                        n, c, lambda t=tpl, nm=name: path_template(t, client, nm, "warm"),
                        end=lambda g: g[2].terminate(),
                    )
                    await templates.set_pool(name, 0, memory_mb=mem, client=client)
                    res[f"warm_{mode}"] = summary_ms([g[1] for g in got]) | {"per_s": round(n / wall, 2)}
                    # The samples too, in order: a tail is then placeable in the run.
                    res[f"warm_claim_{mode}"] = summary_ms([g[0] for g in got]) | {
                        "samples_ms": [round(g[0] * 1000, 2) for g in got]}
                    await cleanup([], prefix)
                print(f"{tpl} {mode}: " + progress_line(res, mode) + f"  [load {loadavg()}]", flush=True)
            out["paths"][tpl] = res
            await anyio.sleep(2)  # let the drained pool's sandboxes end
            if "refill" not in args.phases:
                continue

            # Refill throughput at parallelism `conc`: pool controller vs docker run.
            k = args.refill_n
            _, wall = await run_many(k, conc, lambda t=tpl: path_docker(t, prefix))
            docker_rate = k / wall
            await cleanup([], prefix)
            pool = await templates.set_pool(name, k, memory_mb=mem, client=client)
            fill = await wait_pool(client, pool, k)
            restore_rate = k / fill
            out["refill"][tpl] = {
                "n": k, "parallelism": conc, "docker_run_per_s": round(docker_rate, 2),
                "pool_refill_per_s": round(restore_rate, 2), "ratio": round(restore_rate / docker_rate, 2),
            }
            print(f"{tpl} refill x{conc}: pool {restore_rate:.2f}/s vs docker run {docker_rate:.2f}/s "
                  f"({restore_rate / docker_rate:.1f}x)  [load {loadavg()}]", flush=True)
            if "sustained" not in args.phases:
                await templates.set_pool(name, 0, memory_mb=mem, client=client)
                continue

            # Sustained creates while the pool refills: `conc` clients for sustain_s.
            await templates.set_pool(name, args.pool, memory_mb=mem, client=client)
            await anyio.sleep(2)
            lat: list[float] = []
            paths: dict[str, int] = {}
            made: list[Any] = []
            t0 = time.perf_counter()
            await callers(conc, functools.partial(sustain_one, client, name, mem, lat, paths, made),
                          seconds=args.sustain_s)
            took = time.perf_counter() - t0
            await templates.set_pool(name, 0, memory_mb=mem, client=client)
            out["sustained"][tpl] = {
                "clients": conc, "seconds": round(took, 1), "pool": args.pool,
                "creates_per_s": round(len(lat) / took, 2), "paths": paths,
                "to_first_exec": summary_ms(lat),
            }
            print(f"{tpl} sustained: {len(lat) / took:.2f} creates/s over {took:.0f}s, paths {paths}, "
                  f"p50 {pct(lat, 0.5) * 1000:.0f} ms  [load {loadavg()}]", flush=True)
            await cleanup(made, prefix)
    return out


def progress_line(res: dict[str, Any], mode: str) -> str:
    base = res.get(f"docker_{mode}", {}).get("p50_ms")
    parts = []
    for p in ("docker", "cold", "restore", "warm"):
        r = res.get(f"{p}_{mode}")
        if r is not None:
            ratio = f" ({base / r['p50_ms']:.1f}x)" if base and p != "docker" else ""
            parts.append(f"{p} p50 {r['p50_ms']:.0f} ms{ratio}")
    claim = res.get(f"warm_claim_{mode}")
    if claim is not None:
        parts.append(f"claim p50 {claim['p50_ms']:.2f} ms p99 {claim['p99_ms']:.2f} ms")
    return "; ".join(parts)


async def sustain_one(
    client: Any, name: str, mem: int, lat: list[float], paths: dict[str, int], made: list[Any],
) -> None:
    """One create from ``name`` and its first exec, timed; outcomes counted by path."""
    from hotbed.errors import HotbedError
    from hotbed.sandbox import Sandbox

    t = time.perf_counter()
    try:
        sb = await Sandbox.create(template=name, memory_mb=mem, client=client, timeout=3600)
    except HotbedError as exc:
        paths[f"error:{exc.code}"] = paths.get(f"error:{exc.code}", 0) + 1
        return
    made.append(sb)
    try:
        assert (await sb.exec("true")).ok
    except HotbedError as exc:
        # Counted, not fatal: an overloaded box answering with typed errors is a
        # result of this phase too (the first of each kind is printed).
        key = f"exec error:{exc.code}"
        if key not in paths:
            print(f"sustained: {exc.code}: {exc.message}", file=sys.stderr, flush=True)
        paths[key] = paths.get(key, 0) + 1
        return
    lat.append(time.perf_counter() - t)
    paths[sb.path] = paths.get(sb.path, 0) + 1


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tpls = list(result["paths"])
    fig, axes = plt.subplots(1, len(tpls), figsize=(6 * len(tpls), 4), squeeze=False)
    for ax, tpl in zip(axes[0], tpls, strict=True):
        res = result["paths"][tpl]
        labels, p50, p99 = [], [], []
        for p in ("docker", "cold", "restore", "warm", "warm_claim"):
            for mode in ("seq", f"c{result['concurrency']}"):
                key = f"{p}_{mode}"
                if key in res:
                    labels.append(f"{p}\n{mode}")
                    p50.append(res[key]["p50_ms"])
                    p99.append(res[key]["p99_ms"])
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], p50, 0.4, label="p50")
        ax.bar([i + 0.2 for i in x], p99, 0.4, label="p99")
        ax.set_yscale("log")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_ylabel("create -> first exec (ms, log)")
        ax.set_title(f"{tpl} template")
        ax.legend()
    cpus = machine_of(result).get("cpus")
    fig.suptitle(f"hotbed sandbox start paths ({cpus} CPUs, load {result['load_before']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


PATHS = (("docker", "(a) docker run + set-up"), ("cold", "(b) hotbed cold + set-up"),
         ("restore", "(c) restore from snapshot"), ("warm", "(d) warm-pool claim + first exec"),
         ("warm_claim", "(d) claim alone"))


def machine_of(result: dict[str, Any]) -> dict[str, Any]:
    # Files written before the run block kept the machine at the top level.
    return dict(result.get("run", {}).get("machine") or result.get("machine") or {})


def runtime_text(rt: Any) -> str:
    if isinstance(rt, str):  # files written before the runtime was probed
        return f"{rt} (as typed into the benchmark then, not probed)"
    return (f"Docker {rt.get('docker_server')}, runtime `{rt.get('name')}` = {rt.get('path')} "
            f"({rt.get('version')}); restores: {rt.get('restores')}")


def report(result: dict[str, Any]) -> str:
    """The results as the markdown tables bench/README.md keeps."""
    conc = result["concurrency"]
    m = machine_of(result)
    lines = [
        f"Run: {results.describe(result)}." if "run" in result else "Run: not recorded in the file.",
        "",
        f"Machine: {m.get('cpus')} vCPU {m.get('cpu_model')}, {m.get('memory_gib')} GiB; "
        f"{runtime_text(result.get('runtime'))}. "
        f"Load average before / after: {result['load_before'].split()[0]} / "
        f"{result.get('load_after', '?').split()[0]}.",
    ]
    for tpl, res in result["paths"].items():
        meta = result["templates"].get(tpl, {})
        n = result["n_heavy"] if tpl == "heavy" else result["n"]
        lines += [
            "", f"**{tpl}** ({meta.get('image', '?')}, built in {meta.get('build_s', 0):.1f} s, snapshot "
            f"{meta.get('snapshot_bytes', 0) / 2**20:.1f} MiB), n = {n} per path and mode — create → first "
            "successful exec (ms):", "",
            f"| path | seq p50 | seq p90 | seq p99 | ×(a) seq | c{conc} p50 | c{conc} p90 | c{conc} p99 | ×(a) c{conc} |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key, label in PATHS:
            row = [label]
            for mode in ("seq", f"c{conc}"):
                r = res.get(f"{key}_{mode}")
                base = res.get(f"docker_{mode}")
                if r is None:
                    row += ["—"] * 4
                    continue
                ratio = "—" if key in ("docker", "warm_claim") or not base else f"{base['p50_ms'] / r['p50_ms']:.1f}×"
                row += [f"{r['p50_ms']:,.1f}", f"{r['p90_ms']:,.1f}", f"{r['p99_ms']:,.1f}", ratio]
            lines.append("| " + " | ".join(row) + " |")
    if result.get("refill"):
        lines += ["", f"Refill at parallelism {conc} (sandboxes made ready per second):", "",
                  "| template | pool controller (restore) | plain docker run + set-up | ratio |",
                  "| --- | ---: | ---: | ---: |"]
        for tpl, r in result["refill"].items():
            lines.append(f"| {tpl} | {r['pool_refill_per_s']:.2f}/s | {r['docker_run_per_s']:.2f}/s | **{r['ratio']:.1f}×** |")
    if result.get("sustained"):
        lines += ["", "Sustained creates while the pool refills:", "",
                  "| template | clients | pool | creates/s | paths | create → first exec p50 / p99 |",
                  "| --- | ---: | ---: | ---: | --- | --- |"]
        for tpl, r in result["sustained"].items():
            paths = ", ".join(f"{k} {v}" for k, v in r["paths"].items())
            fe = r["to_first_exec"]
            lines.append(f"| {tpl} | {r['clients']} | {r['pool']} | {r['creates_per_s']:.2f} | {paths} | "
                         f"{fe['p50_ms']:,.0f} / {fe['p99_ms']:,.0f} ms |")
    lines += ["", *targets(result)]
    return "\n".join(lines)


def _verdict(items: list[tuple[str, float]], ok: Any) -> str:
    if not items:
        return "not measured"
    good = [k for k, v in items if ok(v)]
    if len(good) == len(items):
        return "**met**"
    if not good:
        return "not met"
    return f"met for {', '.join(good)} only"


def targets(result: dict[str, Any]) -> list[str]:
    """The start targets against this run, each ratio like for like: both sides end at
    the same point (a sandbox with the template's set-up done that answered an exec)."""
    conc = result["concurrency"]
    modes = ("seq", f"c{conc}")
    paths = result["paths"]

    def each(key: str, field: str) -> list[tuple[str, float]]:
        return [(f"{tpl} {mode}", res[f"{key}_{mode}"][field])
                for tpl, res in paths.items() for mode in modes if f"{key}_{mode}" in res]

    def ratios(key: str, tpls: tuple[str, ...] | None = None) -> list[tuple[str, float]]:
        return [(f"{tpl} {mode}", res[f"docker_{mode}"]["p50_ms"] / res[f"{key}_{mode}"]["p50_ms"])
                for tpl, res in paths.items() if tpls is None or tpl in tpls
                for mode in modes if f"{key}_{mode}" in res and f"docker_{mode}" in res]

    claim50, claim99 = each("warm_claim", "p50_ms"), each("warm_claim", "p99_ms")
    warm, restore = ratios("warm"), ratios("restore", ("heavy",))
    refill = [(tpl, float(r["ratio"])) for tpl, r in result.get("refill", {}).items()]
    ms = "{:.1f} ms".format
    times = "{:.1f}×".format
    rows: list[tuple[str, list[tuple[str, float]], Any, Any]] = [
        ("warm claim p50 ≤ 5 ms (the create call alone: an atomic claim in Redis)",
         claim50, ms, lambda v: v <= 5),
        ("warm claim p99 ≤ 25 ms (the create call alone)", claim99, ms, lambda v: v <= 25),
        ("≥ 80× faster than `docker run`: (d) claim + first exec against (a) docker run + "
         "set-up + first exec, p50", warm, times, lambda v: v >= 80),
        ("restore of the heavy template ≥ 5× faster than (a): (c) restore + first exec, p50",
         restore, times, lambda v: v >= 5),
        (f"refill ≥ 2× plain `docker run` + set-up at parallelism {conc} (sandboxes ready per "
         "second)", refill, times, lambda v: v >= 2),
    ]
    out = ["Against the targets (computed from this run by `--report`):", "",
           "| target | measured | |", "| --- | --- | --- |"]
    for what, items, fmt, ok in rows:
        measured = ", ".join(f"{k} {fmt(v)}" for k, v in items) or "—"
        out.append(f"| {what} | {measured} | {_verdict(items, ok)} |")
    return out


def engine_nice() -> int | None:
    """The container engine's CPU priority (sandboxes inherit it): part of the setup."""
    try:
        pid = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout.split()[0]
        return os.getpriority(os.PRIO_PROCESS, int(pid))
    except (IndexError, ValueError, OSError):
        return None


def container_runtime() -> dict[str, Any]:
    """The engine and runsc this host runs sandboxes with, probed, and how it restores:
    through hotbed's runsc wrapper or dockerd's own road."""
    rt = results.container_runtime("runsc")
    wrapper = str(rt.get("path") or "").endswith("runsc-hotbed")
    rt["restores"] = ("runsc restore from the snapshot folder (hotbed's wrapper)" if wrapper
                      else "docker start --checkpoint")
    return rt


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench start")
    parser.add_argument("--n", type=int, default=50, help="sandboxes per path and mode")
    parser.add_argument("--n-heavy", type=int, default=0,
                        help="sandboxes per path and mode for the heavy template (default --n)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--refill-n", type=int, default=24)
    parser.add_argument("--pool", type=int, default=16, help="pool size for the sustained run")
    parser.add_argument("--sustain-s", type=float, default=20.0)
    parser.add_argument("--templates", nargs="+", default=["heavy", "light"], choices=list(TEMPLATES))
    parser.add_argument("--redis-nice", type=int, default=0, help="renice the private Redis (e.g. -10)")
    parser.add_argument("--out", default=str(results.RESULTS / "start.json"))
    parser.add_argument("--paths", nargs="+", default=["docker", "cold", "restore", "warm"],
                        choices=["docker", "cold", "restore", "warm"], help="start paths to time")
    parser.add_argument("--phases", nargs="*", default=["refill", "sustained"],
                        choices=["refill", "sustained"], help="phases after the paths (default both)")
    parser.add_argument("--report", metavar="JSON", help="print the markdown tables of a results file and exit")
    args = parser.parse_args(argv)
    if args.report:
        try:
            print(report(results.load(args.report)))
        except results.NotOneRun as exc:
            print(f"not a single-run results file: {exc}", file=sys.stderr)
            return 2
        return 0

    prefix = f"bstart{secrets.token_hex(3)}"
    sched_env = {"HOTBED_POOL_MAX_WARMING": str(args.concurrency), "HOTBED_POOL_REFILL_PER_S": "100"}
    result: dict[str, Any] = {
        "run": results.new_run("start", argv), "load_before": loadavg(),
        "n": args.n, "n_heavy": args.n_heavy or args.n, "concurrency": args.concurrency,
        "runtime": container_runtime(),
        "paths_run": args.paths, "phases": args.phases,
        "engine_nice": engine_nice(),
    }
    with Cluster(schedulers=1, fleets=0, prefix=prefix, scheduler_env=sched_env) as cluster:
        if args.redis_nice and cluster.redis_proc is not None:
            # On a shared, overloaded box the daemons give up when Redis answers late;
            # Redis is a few ms of CPU here, so it may jump the queue (recorded below).
            os.setpriority(os.PRIO_PROCESS, cluster.redis_proc.pid, args.redis_nice)
            result["redis_nice"] = args.redis_nice
        result["cluster"] = cluster.settings_record()
        snapdir = Path(cluster.dir) / "snapshots"
        worker_log = open(Path(cluster.dir) / "worker.log", "wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "workers", "--runtime", "docker", "--worker-id", f"w-{prefix}"],
            # Capacity is a reservation count here, not a CPU promise: room for the pools.
            env=cluster.env(HOTBED_DRAIN_ON_STOP="true", HOTBED_SHUTDOWN_GRACE_S="2",
                            HOTBED_CPU="128", HOTBED_MEMORY_MB="400000",
                            HOTBED_SNAPSHOT_DIR=str(snapdir), HOTBED_LOG_LEVEL="WARNING"),
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=worker_log,
        )
        try:
            cluster.wait_workers(1, timeout=60)
            try:
                anyio.run(run, args, cluster, prefix, result, backend="asyncio",
                          backend_options={"use_uvloop": True})
            except BaseException as exc:
                result["error"] = f"{type(exc).__name__}: {exc}"
                raise
        finally:
            result["load_after"] = loadavg()
            # A run that failed still writes what it measured, marked unfinished.
            results.write(args.out, result, finished="error" not in result)
            worker.terminate()
            try:
                worker.wait(timeout=120)
            except subprocess.TimeoutExpired:
                worker.kill()
            # hotbed's sandboxes, and the (a) path's plain containers of a run cut short.
            left = [
                cid
                for label in (f"dev.hotbed.prefix={prefix}", f"dev.hotbed.bench={prefix}")
                for cid in subprocess.run(["docker", "ps", "-aq", "--filter", f"label={label}"],
                                          capture_output=True, text=True).stdout.split()
            ]
            if left:
                subprocess.run(["docker", "rm", "-f", *left], capture_output=True)
    out = Path(args.out)
    try:
        plot(result, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing (pip install '.[bench]'): no plot", file=sys.stderr)
    print(report(result))
    print(f"wrote {out}")
    return 0
