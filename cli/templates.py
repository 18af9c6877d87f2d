"""``hotbed template ...`` and ``hotbed pool ...``: templates, snapshots, warm pools."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cli.main import with_client
from cli.sandboxes import _pairs
from hotbed import templates
from hotbed.client import Client


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def cmd_template_create(args: argparse.Namespace) -> int:
    files: dict[str, bytes | str] = {}
    for item in args.file or []:
        dest, sep, local = item.partition("=")
        if not sep:
            print("error: --file wants SANDBOX_PATH=LOCAL_PATH", file=sys.stderr)
            return 2
        files[dest] = Path(local).read_bytes()

    async def go(client: Client) -> int:
        r = await templates.create_template(
            args.name, image=args.image, run=args.run or [], start=args.start or [],
            files=files, ready=args.ready, ready_timeout=args.ready_timeout,
            setup_timeout=args.setup_timeout, env=_pairs(args.env, "--env"),
            workdir=args.workdir, user=args.user, cpu=args.cpu, memory_mb=args.memory,
            client=client,
        )
        print(f"{r.name}: snapshot {r.snapshot} ({_size(r.size_bytes)}) built in {r.build_s:.2f}s on {r.worker_id}")
        return 0

    return with_client(go)


def cmd_template_list(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        recs = await templates.list_templates(client=client)
        print(f"{'NAME':24} {'STATE':9} {'IMAGE':18} {'SNAPSHOT':22} {'SIZE':>9} {'BUILD':>7}  HOLDERS")
        for r in recs:
            print(f"{r.name:24} {r.state:9} {r.spec.image:18} {r.snapshot or '-':22} "
                  f"{_size(r.size_bytes):>9} {r.build_s:6.2f}s  {','.join(r.holders) or '-'}")
        return 0

    return with_client(go)


def cmd_template_show(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        r = await templates.get_template(args.name, client=client)
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
        gone = await templates.delete_template(args.name, client=client)
        if not gone:
            print(f"error: no template {args.name!r}", file=sys.stderr)
            return 1
        return 0

    return with_client(go)


def cmd_pool_set(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        name = await templates.set_pool(
            args.template, args.size, cpu=args.cpu, memory_mb=args.memory, gpu=args.gpu,
            client=client,
        )
        print(name)
        return 0

    return with_client(go)


def cmd_pool_list(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        pools = await templates.pool_status(client=client)
        print(f"{'POOL':36} {'SIZE':>5} {'READY':>6} {'WARMING':>8} {'CLAIMING':>9}")
        for p in pools:
            print(f"{p.name:36} {p.size:5d} {p.ready:6d} {p.warming:8d} {p.claiming:9d}")
        return 0

    return with_client(go)


def register(sub: Any) -> None:
    tp = sub.add_parser("template", help="templates: an image + set-up, snapshotted in memory")
    tsub = tp.add_subparsers(dest="template_command", metavar="ACTION", required=True)
    p = tsub.add_parser("create", help="build a template on a worker and snapshot it")
    p.add_argument("name")
    p.add_argument("--image", default="hotbed/base")
    p.add_argument("--run", action="append", metavar="CMD", help="set-up shell command (repeatable, in order)")
    p.add_argument("--start", action="append", metavar="CMD",
                   help="long-running process to start after set-up (kept in the snapshot)")
    p.add_argument("--file", action="append", metavar="PATH=LOCAL", help="write a local file into the template")
    p.add_argument("--ready", metavar="CMD", help="readiness check, retried until it exits 0")
    p.add_argument("--ready-timeout", type=float, default=60.0)
    p.add_argument("--setup-timeout", type=float, default=600.0)
    p.add_argument("--env", "-e", action="append", metavar="K=V")
    p.add_argument("--workdir", "-w")
    p.add_argument("--user", "-u")
    p.add_argument("--cpu", type=float, default=1.0)
    p.add_argument("--memory", type=int, default=512, metavar="MiB")
    p.set_defaults(func=cmd_template_create)
    p = tsub.add_parser("list", help="list templates")
    p.set_defaults(func=cmd_template_list)
    p = tsub.add_parser("show", help="show one template")
    p.add_argument("name")
    p.set_defaults(func=cmd_template_show)
    p = tsub.add_parser("delete", help="forget a template (its snapshot is collected)")
    p.add_argument("name")
    p.set_defaults(func=cmd_template_delete)

    pp = sub.add_parser("pool", help="warm pools of ready sandboxes per template and shape")
    psub = pp.add_subparsers(dest="pool_command", metavar="ACTION", required=True)
    p = psub.add_parser("set", help="keep SIZE warm sandboxes of TEMPLATE (0 removes the pool)")
    p.add_argument("template")
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--cpu", type=float, default=1.0)
    p.add_argument("--memory", type=int, default=512, metavar="MiB")
    p.add_argument("--gpu")
    p.set_defaults(func=cmd_pool_set)
    p = psub.add_parser("list", help="pools with their ready / warming counts")
    p.set_defaults(func=cmd_pool_list)
