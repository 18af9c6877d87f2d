"""Port commands: ``hotbed port SANDBOX PORT`` prints where a sandbox's TCP port is
reachable on its worker (``host:port``); ``hotbed create --publish PORT`` does the same
at create time."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cli.main import with_client
from hotbed.client import Client
from hotbed.sandbox import Sandbox


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1-65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 1-65535, got {port}")
    return port


async def publish(sb: Sandbox, ports: list[int] | None) -> None:
    """Expose each of ``ports``; say where on stderr (stdout keeps the sandbox id)."""
    for port in ports or []:
        exposed = await sb.expose(port)
        print(f"{port} -> {exposed.address}", file=sys.stderr)


def cmd_port(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        sb = await Sandbox.from_id(args.sandbox, client=client)
        exposed = await sb.expose(args.port)
        print(exposed.url if args.url else exposed.address)
        return 0

    return with_client(go)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "port", help="expose a TCP port of a sandbox; prints HOST:PORT on its worker"
    )
    p.add_argument("sandbox", help="sandbox id")
    p.add_argument("port", type=port_number, help="TCP port inside the sandbox (1-65535)")
    p.add_argument("--url", action="store_true", help="print it as an http:// URL")
    p.set_defaults(func=cmd_port)
