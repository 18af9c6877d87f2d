"""Entry point of the ``hotbed`` CLI.

Each area module registers its subcommands with ``register(subparsers)`` and gives each
a ``func(args) -> int`` (synchronous; async work goes through :func:`run_async`).

Exit codes follow ``docker run``/``docker exec``:

* ``run`` and ``exec`` exit with the command's own code (0-255, 128+N for a signal).
* **125**: hotbed itself failed, whatever the command: a bad flag or argument, a bad
  setting, an unreachable Redis or dockerd, a typed :class:`~hotbed.errors.HotbedError`
  (no such sandbox, image not found, capacity exhausted, exec timeout, ...). Docker
  uses 125 for its own errors bad flags included, so hotbed has no separate usage code;
  a script tells "hotbed failed" (125) from "the command failed" (anything else).
* 130 on Ctrl-C.
* Two commands answer a question with their code, as their help says: ``config check``
  exits 2 for an invalid file (the code the daemons exit with on that file), and
  ``scheduler``/``worker`` are the daemons themselves (2 bad settings, 1 failure).

Every failure prints one line, ``error: <message>``, on stderr and no traceback
(``HOTBED_DEBUG=1`` shows it). A Redis or dockerd that does not answer is such a line.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import anyio

from hotbed.client import Client
from hotbed.errors import ConnectionLost, HotbedError

T = TypeVar("T")
R = TypeVar("R")

EXIT_FAILURE = 125
EXIT_INTERRUPTED = 130

# Area modules, in help order. A new area adds itself here.
AREAS = [
    "cli.sandboxes",
    "cli.templates",
    "cli.system",
    "cli.fleet",
    "cli.shell",
    "cli.tenants",
    "cli.ports",
]
# Commands that hand everything after their name to another program's parser (the
# daemons'), so ``hotbed scheduler --config FILE`` and ``--help`` reach it untouched.
PASSTHROUGH = frozenset({"scheduler", "worker"})
GLOBAL_OPTIONS = ("--redis-url", "--prefix")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    from hotbed.protocol import PROTOCOL_VERSION

    try:
        v = dist_version("hotbed")
    except PackageNotFoundError:
        v = "unknown"
    return f"hotbed {v} (protocol {PROTOCOL_VERSION})"


class Parser(argparse.ArgumentParser):
    """argparse with docker's convention: a usage error is one line and exit 125."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_FAILURE, f"error: {message} (see '{self.prog} --help')\n")


def run_async(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return anyio.run(fn, *args, backend="asyncio", backend_options={"use_uvloop": True})


def with_client(fn: Callable[[Client], Awaitable[T]]) -> T:
    """Run one command's coroutine with a client of the configured control plane."""

    async def go() -> T:
        async with Client() as client:
            return await fn(client)

    return run_async(go)


def print_json(value: Any) -> None:
    """One JSON document on stdout (Structs, lists of them, dicts)."""
    import msgspec

    sys.stdout.buffer.write(msgspec.json.encode(value) + b"\n")
    sys.stdout.flush()


async def print_listing(
    args: argparse.Namespace,
    rows: Sequence[R],
    *,
    key: Callable[[R], object],
    table: Callable[[Sequence[R]], object],
    as_json: Any = None,
) -> int:
    """The output of every listing command, chosen by :func:`add_listing_options`'s
    flags: ``--json`` one JSON document (``rows``, or ``as_json`` when the document is
    more than the rows), ``-q`` ``key(row)`` one per line, else ``table(rows)`` (which
    may be a coroutine function, for a table that reads more as it prints)."""
    if getattr(args, "json", False):
        print_json(rows if as_json is None else as_json)
    elif getattr(args, "quiet", False):
        for row in rows:
            print(key(row))
    else:
        done = table(rows)
        if inspect.isawaitable(done):
            await done
    return 0


def add_listing_options(p: argparse.ArgumentParser, quiet: str) -> None:
    """``--json`` and ``-q`` for a listing command; ``quiet`` says what -q prints."""
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    out.add_argument("--quiet", "-q", action="store_true", help=f"print only {quiet}, one per line")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="hotbed",
        description="Self-hosted code-execution sandboxes for AI coding agents.",
        epilog="Exit codes: a command's own code for run/exec, 125 when hotbed itself fails, "
               "130 on Ctrl-C. HOTBED_DEBUG=1 shows tracebacks.",
    )
    parser.add_argument("--version", action="version", version=version(), help="print the version and exit")
    parser.add_argument("--redis-url", help="control plane Redis (default $HOTBED_REDIS_URL or redis://127.0.0.1:6379/0)")
    parser.add_argument("--prefix", help="key-space prefix (default $HOTBED_PREFIX or hotbed)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in AREAS:
        importlib.import_module(name).register(sub)
    return parser


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``(ours, theirs)``: for ``[GLOBAL OPTIONS] scheduler|worker ARGS...`` ours ends at
    the command's name and theirs is ARGS; otherwise theirs is None. argparse cannot do
    this itself: a REMAINDER positional loses options that come first (``--config``)."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in PASSTHROUGH:
            return argv[: i + 1], argv[i + 1 :]
        if a in GLOBAL_OPTIONS:
            i += 2
        elif a.startswith(tuple(o + "=" for o in GLOBAL_OPTIONS)):
            i += 1
        else:
            break
    return argv, None


def _leaf(exc: BaseException) -> BaseException:
    # A task group wraps what one task raised; the user wants that, not the group.
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def describe(exc: BaseException) -> str | None:
    """The one line for a failure hotbed knows how to explain; None for anything else."""
    import redis.exceptions

    from daemon.config import redact_url
    from hotbed.client import default_url

    url = redact_url(default_url())
    if isinstance(exc, ConnectionLost) or isinstance(
        exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError
    ):
        # ConnectionLost's own message names the URL as given, password included.
        cause = str(exc).split(": ", 1)[1] if isinstance(exc, ConnectionLost) and ": " in str(exc) else str(exc)
        return f"cannot reach Redis at {url} ({cause.strip() or type(exc).__name__}); is hotbed up? (hotbed up -d)"
    if isinstance(exc, HotbedError):
        return str(exc)
    if isinstance(exc, redis.exceptions.RedisError | redis.exceptions.RedisClusterException):
        return f"Redis at {url}: {exc}"
    if isinstance(exc, OSError):
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ours, theirs = split_passthrough(argv)
    try:
        args = parser.parse_args(ours)
    except SystemExit as exc:  # --help, --version (0) or a usage error (125)
        return int(exc.code or 0)
    if theirs is not None:
        args.rest = theirs
    if args.redis_url:
        os.environ["HOTBED_REDIS_URL"] = args.redis_url
    if args.prefix:
        os.environ["HOTBED_PREFIX"] = args.prefix
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, KeyboardInterrupt):
            return EXIT_INTERRUPTED
        if os.environ.get("HOTBED_DEBUG"):
            raise
        line = describe(leaf)
        if line is None:
            line = f"unexpected {type(leaf).__name__}: {leaf} (HOTBED_DEBUG=1 shows the traceback)"
        print(f"error: {line}", file=sys.stderr)
        return EXIT_FAILURE


def console() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console()
