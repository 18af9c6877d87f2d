"""``hotbed tenant ...`` and ``hotbed daemon-user ...``: who may use the control plane.

Operators only (the admin URL ``hotbed up`` wrote to the client config). ``tenant
create`` prints the tenant's Redis URL, password included, once: it is stored nowhere
readable, and a lost one is replaced by ``rm`` and ``create``. ``--write-config FILE``
also writes it as a client config file (mode 0600) for the tenant's machine, where the
SDK and CLI find it by themselves (``HOTBED_CONFIG=FILE``, or at the default path).
``tenant rm`` ends the tenant's sandboxes and closes its connections. ``tenant sync``
copies the tenants' and daemons' users to Redis Cluster nodes that lack them.
``daemon-user scheduler|worker ID`` creates the Redis user a scheduler or one worker
runs as (least privilege, :mod:`hotbed.tenants`) and prints its URL.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cli.main import add_listing_options, print_json, print_listing, with_client
from hotbed import config as client_config
from hotbed import protocol, tenants
from hotbed.client import OP_TIMEOUT_S, Client
from hotbed.errors import HotbedError, InvalidRequest

_LIMITS = (
    ("sandboxes", int, "concurrent sandboxes"),
    ("cpu", float, "CPUs over all its sandboxes"),
    ("memory_mb", int, "MiB of memory over all its sandboxes"),
    ("gpus", int, "GPUs over all its sandboxes"),
    ("creates_per_s", float, "creates per second"),
)


def _limits(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name, _t, _h in _LIMITS if getattr(args, name) is not None}


def _add_limit_options(p: argparse.ArgumentParser) -> None:
    for name, kind, what in _LIMITS:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, metavar="N",
                       help=f"at most N {what} (0: no limit)")


def _quota_line(q: tenants.Quota) -> str:
    def lim(v: float) -> str:
        return f"{v:g}" if v else "-"

    return (f"sandboxes={lim(q.sandboxes)} cpu={lim(q.cpu)} memory_mb={lim(q.memory_mb)} "
            f"gpus={lim(q.gpus)} creates_per_s={lim(q.creates_per_s)}")


def cmd_create(args: argparse.Namespace) -> int:
    async def go(c: Client) -> tenants.Credentials:
        return await tenants.create_tenant(
            c.redis, c.keys, args.name, url=c.url, quota=tenants.Quota(**_limits(args))
        )

    creds = with_client(go)
    if args.write_config:
        where = client_config.write(
            client_config.ClientConfig(redis_url=creds.url, prefix=_prefix()), Path(args.write_config)
        )
        print(f"hotbed: wrote {where}", file=sys.stderr)
    if args.json:
        print_json(creds)
    else:
        print(f"tenant:   {creds.tenant}\nuser:     {creds.user}\npassword: {creds.password}\nurl:      {creds.url}")
        print("hotbed: the password is shown only this once", file=sys.stderr)
    return 0


def _prefix() -> str:
    from hotbed.client import default_prefix

    return default_prefix()


def cmd_list(args: argparse.Namespace) -> int:
    async def go(c: Client) -> int:
        rows = await tenants.list_tenants(c.redis, c.keys)
        return await print_listing(args, rows, key=lambda t: t.name, table=_tenants_table)

    return with_client(go)


def _tenants_table(rows: Sequence[tenants.TenantInfo]) -> None:
    print(f"{'TENANT':<20} {'SANDBOXES':>9} {'CPU':>6} {'MEMORY':>8} {'GPUS':>4}  QUOTA")
    for t in rows:
        u = t.usage
        print(f"{t.name:<20} {u.sandboxes:>9} {u.cpu:>6g} {u.memory_mb:>7}M {u.gpus:>4}  {_quota_line(t.quota)}")


def cmd_quota(args: argparse.Namespace) -> int:
    limits = _limits(args)

    async def go(c: Client) -> tenants.TenantInfo:
        if limits:
            await tenants.set_quota(c.redis, c.keys, args.name, **limits)
        return await tenants.get_tenant(c.redis, c.keys, args.name)

    info = with_client(go)
    if args.json:
        print_json(info)
    else:
        print(f"{info.name}: {_quota_line(info.quota)}")
        u = info.usage
        print(f"in use: sandboxes={u.sandboxes} cpu={u.cpu:g} memory_mb={u.memory_mb} gpus={u.gpus}")
    return 0


async def remove(c: Client, name: str) -> int:
    """Delete tenant ``name`` and end its sandboxes; how many were ended."""
    if name not in await tenants.tenant_names(c.redis, c.keys):
        raise InvalidRequest(f"no tenant {name!r}")
    ended = 0
    for sid in await tenants.remove_tenant(c.redis, c.keys, name):
        try:
            rec = await c.record(sid)
            if not rec.ended and rec.worker:
                await c.worker_request(
                    rec.worker, protocol.Terminate(sandbox_id=sid, reason="tenant removed"), timeout=OP_TIMEOUT_S
                )
                ended += 1
        except HotbedError:
            continue  # ended meanwhile, or its worker is gone (the reaper ends it)
        finally:
            await tenants.give(c.redis, c.keys, name, sid)
    await c.redis.delete(c.keys.tenant_held(name), c.keys.tenant_usage(name))
    return ended


def cmd_rm(args: argparse.Namespace) -> int:
    n = with_client(lambda c: remove(c, args.name))
    print(f"removed tenant {args.name} ({n} sandboxes ended)")
    return 0


def cmd_daemon_user(args: argparse.Namespace) -> int:
    if args.role == "worker" and not args.worker_id:
        raise InvalidRequest("a worker's user is per worker: hotbed daemon-user worker WORKER_ID")

    async def go(c: Client) -> str:
        user, password = await tenants.provision_daemon_user(
            c.redis, c.keys, role=args.role, worker_id=args.worker_id or ""
        )
        return tenants.with_credentials(c.url, user, password)

    url = with_client(go)
    print(url)
    print("hotbed: give it to the daemon as HOTBED_REDIS_URL; the password is shown only this once",
          file=sys.stderr)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    async def go(c: Client) -> int:
        return await tenants.copy_users(c.redis, c.keys)

    n = with_client(go)
    print(f"hotbed: copied {n} user(s) to nodes that lacked them", file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    tp = sub.add_parser("tenant", help="tenants: Redis users that see only their own sandboxes, with quotas")
    tsub = tp.add_subparsers(dest="tenant_command", metavar="ACTION", required=True)
    p = tsub.add_parser("create", help="create a tenant and print its credentials (once)")
    p.add_argument("name", help="tenant name (a-z, 0-9, _; at most 32)")
    _add_limit_options(p)
    p.add_argument("--write-config", metavar="FILE", help="also write a client config file holding its URL")
    p.add_argument("--json", action="store_true", help="print the credentials as JSON")
    p.set_defaults(func=cmd_create)
    p = tsub.add_parser("list", help="tenants, what they use and their quotas")
    add_listing_options(p, "tenant names")
    p.set_defaults(func=cmd_list)
    p = tsub.add_parser("quota", help="show a tenant's quota and use, or change some limits")
    p.add_argument("name", help="tenant name")
    _add_limit_options(p)
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_quota)
    p = tsub.add_parser("rm", help="delete a tenant: end its sandboxes, close its connections")
    p.add_argument("name", help="tenant name")
    p.set_defaults(func=cmd_rm)
    p = tsub.add_parser("sync", help="give every Redis Cluster node the users the others have (a node added later)")
    p.set_defaults(func=cmd_sync)
    p = sub.add_parser("daemon-user", help="create the Redis user of a scheduler or of one worker")
    p.add_argument("role", choices=("scheduler", "worker"), help="which daemon")
    p.add_argument("worker_id", nargs="?", help="the worker's id (its HOTBED_WORKER_ID)")
    p.set_defaults(func=cmd_daemon_user)


__all__ = ["register", "remove"]
