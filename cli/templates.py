"""``hotbed template ...`` and ``hotbed pool ...``: templates, snapshots, warm pools.

``template create`` prints the build as the worker reports it (boot, each set-up step
and its output, readiness checks, the snapshot), and a state line from the template's
record whenever nothing was printed for a few seconds (a long step, a queued build). ``pool set --wait`` returns once the pool
holds its size of ready sandboxes, printing each change, or fails (125) at
``--wait-timeout``. ``template list`` and ``pool list`` take ``--json`` and ``-q``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from cli.main import add_listing_options, print_json, print_listing, with_client
from cli.sandboxes import _pairs, add_isolation_option, add_network_options
from hotbed import templates
from hotbed.client import Client
from hotbed.errors import InvalidRequest, RequestTimeout, TemplateNotFound

# Seconds between progress lines while a template builds, and between pool checks.
BUILD_PROGRESS_S = 5.0
POOL_POLL_S = 0.25


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _say(line: str) -> None:
    print(f"hotbed: {line}", file=sys.stderr, flush=True)


async def report_build(name: str, client: Client, *, every: float = BUILD_PROGRESS_S,
                       quiet_for: Callable[[], float] | None = None) -> None:
    """A line (elapsed time, build state) whenever ``every`` seconds pass without one:
    ``quiet_for()`` says how long since the last line printed by anyone (default: this
    function's own), so a long set-up step or a build waiting for a worker still says
    it is alive between the worker's own progress lines."""
    t0, wall0 = anyio.current_time(), time.time()
    mine = t0  # when this function last printed
    while True:
        since = anyio.current_time() - mine
        if quiet_for is not None:
            since = min(since, quiet_for())
        if since < every:
            await anyio.sleep(every - since)
            continue
        try:
            rec = await templates.get_template(name, client=client)
        except TemplateNotFound:
            rec = None
        # A record older than this request is the previous build's.
        if rec is None or rec.created_at < wall0 - 1:
            state = "waiting for a worker"
        else:
            state = "set-up and snapshot running on a worker" if rec.state == "building" else rec.state
        _say(f"template {name}: {anyio.current_time() - t0:.0f}s, {state}")
        mine = anyio.current_time()


def cmd_template_create(args: argparse.Namespace) -> int:
    """Streams the worker's progress (boot, each step and its output, readiness
    checks, the snapshot) as it comes, with a state line whenever it is quiet."""
    files: dict[str, bytes | str] = {}
    for item in args.file or []:
        dest, sep, local = item.partition("=")
        if not sep:
            raise InvalidRequest(f"--file wants SANDBOX_PATH=LOCAL_PATH, got {item!r}")
        files[dest] = Path(local).read_bytes()
    last_line = [time.monotonic()]

    def show(event: templates.BuildEvent) -> None:
        if event.kind == "progress":
            _say(f"template {args.name}: {event.text}")
        else:
            for line in event.text.rstrip("\n").splitlines():
                print(f"  | {line}", file=sys.stderr, flush=True)
        last_line[0] = time.monotonic()

    async def go(client: Client) -> int:
        async with anyio.create_task_group() as tg:
            if not args.quiet:
                tg.start_soon(partial(
                    report_build, args.name, client, quiet_for=lambda: time.monotonic() - last_line[0],
                ))
            r = await templates.create_template(
                args.name, image=args.image, run=args.run or [], start=args.start or [],
                files=files, ready=args.ready, ready_timeout=args.ready_timeout,
                setup_timeout=args.setup_timeout, env=_pairs(args.env, "--env"),
                workdir=args.workdir, user=args.user, cpu=args.cpu, memory_mb=args.memory,
                network=args.network or ("egress" if args.allow else "none"), allow=args.allow or [],
                allow_unisolated=args.unisolated, client=client, on_progress=None if args.quiet else show,
            )
            tg.cancel_scope.cancel()
        print(f"{r.name}: snapshot {r.snapshot} ({_size(r.size_bytes)}) built in {r.build_s:.2f}s on {r.worker_id}")
        return 0

    return with_client(go)


def _templates_table(recs: Sequence[templates.TemplateRecord]) -> None:
    print(f"{'NAME':24} {'STATE':9} {'IMAGE':18} {'SNAPSHOT':22} {'SIZE':>9} {'BUILD':>7}  HOLDERS")
    for r in recs:
        print(f"{r.name:24} {r.state:9} {r.spec.image:18} {r.snapshot or '-':22} "
              f"{_size(r.size_bytes):>9} {r.build_s:6.2f}s  {','.join(r.holders) or '-'}")


def cmd_template_list(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        recs = await templates.list_templates(client=client)
        return await print_listing(args, recs, key=lambda r: r.name, table=_templates_table)

    return with_client(go)


def cmd_template_show(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        r = await templates.get_template(args.name, client=client)
        if args.json:
            print_json(r)
            return 0
        for k in ("name", "state", "snapshot", "size_bytes", "build_s", "holders", "source", "error"):
            print(f"{k:11} {getattr(r, k)}")
        s = r.spec
        print(f"{'image':11} {s.image}")
        for i, cmd in enumerate(s.run, 1):
            print(f"{'run ' + str(i):11} {cmd}")
        for cmd in s.start:
            print(f"{'start':11} {cmd}")
        if s.ready:
            print(f"{'ready':11} {s.ready}")
        return 0

    return with_client(go)


def cmd_template_delete(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        if not await templates.delete_template(args.name, client=client):
            raise TemplateNotFound(f"no template {args.name!r}")
        return 0

    return with_client(go)


async def wait_pool(name: str, client: Client, *, timeout: float, quiet: bool = False) -> templates.PoolStatus:
    """Until pool ``name`` holds its size of ready sandboxes; a line on each change.

    Polled: pool counts change through several scripts and no event announces them."""
    last = None
    with anyio.move_on_after(timeout):
        while True:
            pool = next((p for p in await templates.pool_status(client=client) if p.name == name), None)
            if pool is None:
                raise TemplateNotFound(f"no pool {name!r} (removed while waiting?)")
            now = (pool.ready, pool.warming, pool.size)
            if now != last and not quiet:
                _say(f"pool {name}: {pool.ready}/{pool.size} ready, {pool.warming} warming")
            last = now
            if pool.ready >= pool.size:
                return pool
            await anyio.sleep(POOL_POLL_S)
    raise RequestTimeout(
        f"pool {name} not full after {timeout:g}s ({last[0] if last else 0}/{last[2] if last else '?'} ready); "
        "`hotbed status` shows free capacity, `hotbed pool list` the pool"
    )


def cmd_pool_set(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        name = await templates.set_pool(
            args.template, args.size, cpu=args.cpu, memory_mb=args.memory, gpu=args.gpu,
            network=args.network, allow=args.allow, tenant=args.tenant or "", client=client,
        )
        if args.wait and args.size > 0:
            await wait_pool(name, client, timeout=args.wait_timeout, quiet=args.quiet)
        print(name)
        return 0

    return with_client(go)


def _pools_table(pools: Sequence[templates.PoolStatus]) -> None:
    print(f"{'POOL':36} {'SIZE':>5} {'READY':>6} {'WARMING':>8} {'CLAIMING':>9}")
    for p in pools:
        print(f"{p.name:36} {p.size:5d} {p.ready:6d} {p.warming:8d} {p.claiming:9d}")


def cmd_pool_list(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        pools = await templates.pool_status(client=client)
        return await print_listing(args, pools, key=lambda p: p.name, table=_pools_table)

    return with_client(go)


def register(sub: Any) -> None:
    tp = sub.add_parser("template", help="templates: an image + set-up, snapshotted in memory")
    tsub = tp.add_subparsers(dest="template_command", metavar="ACTION", required=True)
    p = tsub.add_parser("create", help="build a template on a worker and snapshot it")
    p.add_argument("name", help="template name (letters, digits, . _ -)")
    p.add_argument("--image", default="hotbed/base", help="image to boot (default hotbed/base)")
    p.add_argument("--run", action="append", metavar="CMD", help="set-up shell command (repeatable, in order)")
    p.add_argument("--start", action="append", metavar="CMD",
                   help="long-running process to start after set-up (kept in the snapshot)")
    p.add_argument("--file", action="append", metavar="PATH=LOCAL", help="write a local file into the template")
    p.add_argument("--ready", metavar="CMD", help="readiness check, retried until it exits 0")
    p.add_argument("--ready-timeout", type=float, default=60.0, help="seconds the readiness check may take (default 60)")
    p.add_argument("--setup-timeout", type=float, default=600.0, help="seconds the set-up may take (default 600)")
    p.add_argument("--env", "-e", action="append", metavar="K=V", help="environment variable (repeatable)")
    p.add_argument("--workdir", "-w", help="working directory")
    p.add_argument("--user", "-u", help="user (default 1000:1000)")
    p.add_argument("--cpu", type=float, default=1.0, help="CPUs while building (default 1)")
    p.add_argument("--memory", type=int, default=512, metavar="MiB", help="memory limit in MiB (default 512)")
    add_network_options(p, "the set-up's network, and that of sandboxes made from it that state none "
                           "(default none)")
    add_isolation_option(p, "the build, its restores and its warm pools")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines while it builds")
    p.set_defaults(func=cmd_template_create)
    p = tsub.add_parser("list", help="list templates")
    add_listing_options(p, "template names")
    p.set_defaults(func=cmd_template_list)
    p = tsub.add_parser("show", help="show one template")
    p.add_argument("name", help="template name")
    p.add_argument("--json", action="store_true", help="print its record as JSON")
    p.set_defaults(func=cmd_template_show)
    p = tsub.add_parser("delete", help="forget a template (its snapshot is collected)")
    p.add_argument("name", help="template name")
    p.set_defaults(func=cmd_template_delete)

    pp = sub.add_parser("pool", help="warm pools of ready sandboxes per template and shape")
    psub = pp.add_subparsers(dest="pool_command", metavar="ACTION", required=True)
    p = psub.add_parser("set", help="keep SIZE warm sandboxes of TEMPLATE (0 removes the pool); prints its name")
    p.add_argument("template", help="template name")
    p.add_argument("--size", type=int, required=True, help="how many ready sandboxes to keep")
    p.add_argument("--cpu", type=float, default=1.0, help="CPUs of each sandbox (default 1)")
    p.add_argument("--memory", type=int, default=512, metavar="MiB", help="memory of each sandbox in MiB (default 512)")
    p.add_argument("--gpu", help='GPUs of each sandbox, e.g. "H100", "H100:2"')
    add_network_options(p, "its sandboxes' network, claimed by creates that state the same "
                           "(default: the template's, claimed by creates that state none)")
    p.add_argument("--tenant", metavar="NAME",
                   help="a pool for this tenant's creates only (each claim takes its quota)")
    p.add_argument("--wait", action="store_true", help="return once the pool is full, printing its progress")
    p.add_argument("--wait-timeout", type=float, default=300.0, metavar="S",
                   help="with --wait: fail (exit 125) if not full after S seconds (default 300)")
    p.add_argument("--quiet", "-q", action="store_true", help="with --wait: no progress lines")
    p.set_defaults(func=cmd_pool_set)
    p = psub.add_parser("list", help="pools with their ready / warming counts")
    add_listing_options(p, "pool names")
    p.set_defaults(func=cmd_pool_list)
