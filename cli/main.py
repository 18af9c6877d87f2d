"""Entry point of the ``hotbed`` CLI.

Each area module registers its subcommands with ``register(subparsers)`` and gives each
a ``func(args) -> int`` (synchronous; async work goes through :func:`run_async`).
Errors: a HotbedError prints ``error: <message>`` and exits 1; bad settings exit 2;
Ctrl-C exits 130. No traceback reaches the user unless HOTBED_DEBUG=1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from hotbed.client import Client
from hotbed.errors import ConfigError, HotbedError

T = TypeVar("T")

# Area modules, in help order. A new area adds itself here.
AREAS = [
    "cli.sandboxes",
    "cli.templates",
    "cli.system",
    "cli.fleet",
    "cli.shell",
    "cli.ports",
]


def run_async(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return anyio.run(fn, *args, backend="asyncio", backend_options={"use_uvloop": True})


def with_client(fn: Callable[[Client], Awaitable[T]]) -> T:
    """Run one command's coroutine with a client of the configured control plane."""

    async def go() -> T:
        async with Client() as client:
            return await fn(client)

    return run_async(go)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hotbed",
        description="Self-hosted code-execution sandboxes for AI coding agents.",
    )
    parser.add_argument("--redis-url", help="control plane Redis (default $HOTBED_REDIS_URL or redis://127.0.0.1:6379/0)")
    parser.add_argument("--prefix", help="key-space prefix (default $HOTBED_PREFIX or hotbed)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in AREAS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.redis_url:
        os.environ["HOTBED_REDIS_URL"] = args.redis_url
    if args.prefix:
        os.environ["HOTBED_PREFIX"] = args.prefix
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except HotbedError as exc:
        if os.environ.get("HOTBED_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def console() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console()
