"""Sandbox commands: run, create, exec, cp, ls, rm, inspect, snapshot, fork, pause, resume.

``run`` and ``exec`` print output as it comes, exit with the command's code and stream
a piped or redirected stdin to it (``echo hi | hotbed exec ID -- cat``; a terminal with
``-i``), at the command's pace; ``ls`` takes ``--json`` and ``-q``, so
``hotbed rm $(hotbed ls -q)`` works, as do ``rm --all`` and ``rm --tag K=V``.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

from cli.main import EXIT_FAILURE, add_listing_options, print_listing, with_client
from cli.ports import port_number, publish
from hotbed import transfer
from hotbed.client import Client
from hotbed.errors import (
    FileNotFound,
    FileTooLarge,
    HotbedError,
    InvalidRequest,
    SandboxNotFound,
    UnsupportedRequest,
)
from hotbed.handles import ExecStream
from hotbed.protocol import MAX_FILE_BYTES, FileEntry
from hotbed.records import SandboxRecord, shown_state
from hotbed.sandbox import Sandbox

# Sandboxes ``rm`` terminates at once (each is one round trip to its worker).
RM_CONCURRENCY = 16
# Most bytes of stdin sent to a command in one request.
STDIN_PIECE = 1 << 20


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"{what} must look like KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _add_create_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu", type=float, default=1.0, help="CPUs (default 1)")
    p.add_argument("--memory", type=int, default=512, metavar="MiB", help="memory limit in MiB (default 512)")
    p.add_argument("--gpu", help='GPUs, e.g. "H100", "H100:2", "any"')
    p.add_argument("--timeout", type=float, default=300.0, help="lifetime in seconds (default 300, max 86400)")
    p.add_argument("--idle-timeout", type=float, help="end after this many idle seconds")
    p.add_argument("--auto-pause-after", type=float, metavar="S",
                   help="checkpoint to disk after S idle seconds, resumed by the next request "
                        "(default: the node's; 0: never)")
    p.add_argument("--tag", action="append", metavar="K=V", help="label the sandbox (repeatable)")
    p.add_argument("--env", "-e", action="append", metavar="K=V", help="environment variable (repeatable)")
    p.add_argument("--workdir", "-w", help="working directory")
    p.add_argument("--user", "-u", help="user (default 1000:1000)")
    p.add_argument("--template", help="create from this template (warm pool / snapshot)")
    p.add_argument("--on", action="append", metavar="K=V", help="only on workers with this tag (repeatable)")
    add_network_options(p, "none (default; from a template: the template's), egress (only --allow) or open")
    add_isolation_option(p, "the sandbox")


def add_isolation_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--unisolated", action="store_true",
                   help=f"{what} may run on a worker that does not isolate it (process or sim "
                        "runtime); by default only gVisor workers take it")


def add_network_options(p: argparse.ArgumentParser, network_help: str) -> None:
    p.add_argument("--network", choices=("none", "egress", "open"), help=network_help)
    p.add_argument("--allow", action="append", metavar="DEST",
                   help="with --network egress: CIDR, ADDR[:PORT[-PORT]], DOMAIN[:PORT] or "
                        "*.DOMAIN[:PORT] (repeatable; alone it means --network egress)")


def _create_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        cpu=args.cpu, memory_mb=args.memory, gpu=args.gpu, timeout=args.timeout,
        idle_timeout=args.idle_timeout, auto_pause_after=args.auto_pause_after, tags=_pairs(args.tag, "--tag"), env=_pairs(args.env, "--env"),
        workdir=args.workdir, user=args.user, template=args.template,
        worker_tags=_pairs(args.on, "--on"), network=args.network, allow=args.allow,
        allow_unisolated=args.unisolated,
    )


def _command(argv: list[str]) -> list[str]:
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise InvalidRequest("no command given (hotbed run IMAGE -- CMD ...)")
    return argv


def stdin_has_data() -> bool:
    """Whether stdin is data to forward: a pipe, a file or a socket. A terminal is left
    alone unless -i says otherwise (``hotbed shell`` is the interactive command), and so
    is /dev/null."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)


async def read_stdin(limit: int = MAX_FILE_BYTES) -> bytes:
    """All of stdin, read in a worker thread so the event loop never blocks on it: for
    a sandbox that cannot take streamed input (no guest agent), the command gets it as
    one message, so it is read to its end first and bounded by the message size limit."""
    data: bytes = await anyio.to_thread.run_sync(sys.stdin.buffer.read, limit + 1, abandon_on_cancel=True)
    if len(data) > limit:
        raise FileTooLarge(
            f"stdin is over {limit >> 20} MiB; copy it in with `hotbed cp` and redirect from the file"
        )
    return data


def _forwards_stdin(args: argparse.Namespace) -> bool:
    return not args.no_stdin and (args.interactive or stdin_has_data())


async def _stdin_pieces() -> AsyncIterator[bytes]:
    """stdin as it comes: each read returns what is there (a line typed, a pipe's
    buffer), up to STDIN_PIECE, so an interactive producer is not kept waiting.

    A pipe or a terminal is awaited on the event loop, not in a thread: a thread left
    blocked in read() would keep the process from exiting after the command has ended
    until the producer writes again. A regular file (which cannot be polled) is read
    in a thread; its reads always end."""
    fd = sys.stdin.fileno()
    polled = not stat.S_ISREG(os.fstat(fd).st_mode)
    while True:
        if polled:
            await anyio.wait_readable(fd)
            data = os.read(fd, STDIN_PIECE)
        else:
            data = await anyio.to_thread.run_sync(os.read, fd, STDIN_PIECE)
        if not data:
            return
        yield data


async def _feed(stream: ExecStream) -> None:
    """stdin into the running command, one piece at a time (each write returns once the
    command has it), then EOF; stops when the command closes its stdin or ends."""
    if not await stream.wait_stdin():
        return
    async for data in _stdin_pieces():
        if not await stream.write(data):
            return
    await stream.close_stdin()


async def _exec_streamed(sb: Sandbox, argv: list[str], args: argparse.Namespace, *,
                         env: dict[str, str] | None = None, cwd: str | None = None) -> int:
    """Run ``argv`` with its output printed as it comes and stdin forwarded (streamed
    when the sandbox has the guest agent, else read whole first, up to 32 MiB); the
    command's exit code."""
    streamed = _forwards_stdin(args)
    opts: dict[str, Any] = dict(timeout=args.exec_timeout, env=env, cwd=cwd, shell=args.shell)
    try:
        return await _print_stream(sb.exec_stream(*argv, stdin_open=streamed, **opts), feed=streamed)
    except UnsupportedRequest:
        if not streamed:
            raise
    # No guest agent (busybox, say): nothing of stdin was read yet, so it goes whole.
    return await _print_stream(sb.exec_stream(*argv, stdin=await read_stdin(), **opts), feed=False)


async def _print_stream(stream: ExecStream, *, feed: bool) -> int:
    refused: UnsupportedRequest | None = None
    async with stream, anyio.create_task_group() as tg:
        if feed:
            tg.start_soon(_feed, stream)
        try:
            async for chunk in stream:
                dest = sys.stdout if chunk.stream == "stdout" else sys.stderr
                dest.buffer.write(chunk.data)
                dest.flush()
        except UnsupportedRequest as exc:
            # Raised as itself, not in the task group's ExceptionGroup: the caller
            # retries without streamed stdin.
            refused = exc
        # The command has ended: stdin still being read is of no use to it.
        tg.cancel_scope.cancel()
    if refused is not None:
        raise refused
    assert stream.result is not None
    if stream.result.truncated:
        print("hotbed: output truncated", file=sys.stderr)
    return int(stream.result.exit_code)


def cmd_run(args: argparse.Namespace) -> int:
    argv = _command(args.cmd)

    async def go(client: Client) -> int:
        t0 = time.perf_counter()
        sb = await Sandbox.create(args.image, client=client, **_create_kwargs(args))
        if args.verbose:
            print(f"hotbed: {sb.id} on {sb.worker_id} ({sb.path}) in {time.perf_counter() - t0:.3f}s", file=sys.stderr)
        try:
            return await _exec_streamed(sb, argv, args)
        finally:
            with anyio.CancelScope(shield=True):
                await sb.terminate()

    return with_client(go)


def cmd_create(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        sb = await Sandbox.create(args.image, client=client, **_create_kwargs(args))
        print(sb.id)
        sys.stdout.flush()
        await publish(sb, args.publish)
        return 0

    return with_client(go)


def cmd_exec(args: argparse.Namespace) -> int:
    argv = _command(args.cmd)

    async def go(client: Client) -> int:
        sb = await Sandbox.from_id(args.sandbox, client=client)
        return await _exec_streamed(sb, argv, args, env=_pairs(args.env, "--env"), cwd=args.workdir)

    return with_client(go)


def _split_remote(spec: str) -> tuple[str | None, str]:
    sid, sep, path = spec.partition(":")
    if sep and sid.startswith("sb-"):
        return sid, path
    return None, spec


async def _stdin_chunks(chunk_bytes: int = transfer.CHUNK_BYTES) -> AsyncIterator[bytes]:
    """stdin in chunks, each read in a worker thread (the loop never blocks on it)."""
    fd = sys.stdin.fileno()
    while True:
        data = await anyio.to_thread.run_sync(_read_up_to, fd, chunk_bytes, abandon_on_cancel=True)
        if not data:
            return
        yield data


def _read_up_to(fd: int, n: int) -> bytes:
    """Up to ``n`` bytes of ``fd``, fewer only at its end (a pipe gives what it has)."""
    parts, got = [], 0
    while got < n:
        data = os.read(fd, min(n - got, 1 << 20))
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


async def _to_stdout(chunks: AsyncIterator[bytes]) -> None:
    out = sys.stdout.buffer
    async for data in chunks:
        await anyio.to_thread.run_sync(out.write, data)
    await anyio.to_thread.run_sync(out.flush)


def _name(path: str) -> str:
    return Path(path.rstrip("/") or "/").name


async def _copy_in(sb: Sandbox, src: str, dst: str, *, recursive: bool) -> None:
    """Local ``src`` into the sandbox, as ``cp`` does: into ``dst`` if it is a directory
    (or ends with /), else as ``dst``."""
    into = dst.endswith("/")
    if not into:
        try:
            into = (await sb.stat(dst)).is_dir
        except FileNotFound:
            pass
    if src == "-":
        if into:
            raise InvalidRequest(f"cannot copy stdin to a directory: {dst}")
        await transfer.write_chunks(sb, _stdin_chunks(), dst)
        return
    local = anyio.Path(src)
    if not await local.exists():
        raise FileNotFoundError(f"no such local file or directory: {src}")
    target = f"{dst.rstrip('/')}/{_name(src)}" if into else dst
    if await local.is_dir():
        if not recursive:
            raise InvalidRequest(f"{src} is a directory (use cp -r)")
        await sb.upload_dir(src, target)
    else:
        await sb.upload_file(src, target, mode=stat.S_IMODE((await local.stat()).st_mode))


async def _copy_out(sb: Sandbox, src: str, dst: str, *, recursive: bool) -> None:
    """Sandbox ``src`` to the local disk (or stdout), as ``cp`` does."""
    entry = await sb.stat(src)
    if entry.is_dir and not recursive:
        raise InvalidRequest(f"{src} is a directory (use cp -r)")
    if dst == "-":
        if entry.is_dir:
            raise InvalidRequest(f"cannot copy a directory to stdout: {src}")
        await _to_stdout(transfer.read_chunks(sb, src))
        return
    target = anyio.Path(dst)
    if dst.endswith("/") or await target.is_dir():
        target = target / _name(src)
    if entry.is_dir:
        await sb.download_dir(src, target)
    else:
        await sb.download_file(src, target)


def cmd_cp(args: argparse.Namespace) -> int:
    """Files and (with -r) directories of any size, streamed in chunks: memory stays
    bounded whatever the size."""
    src_id, src = _split_remote(args.src)
    dst_id, dst = _split_remote(args.dst)
    if (src_id is None) == (dst_id is None):
        raise InvalidRequest("exactly one side of cp must be SANDBOX:PATH")

    async def go(client: Client) -> int:
        if src_id is not None:
            sb = await Sandbox.from_id(src_id, client=client)
            await _copy_out(sb, src or ".", dst, recursive=args.recursive)
        else:
            assert dst_id is not None
            sb = await Sandbox.from_id(dst_id, client=client)
            await _copy_in(sb, src, dst or ".", recursive=args.recursive)
        return 0

    return with_client(go)


def _files_table(entries: Sequence[FileEntry]) -> None:
    for e in entries:
        kind = "d" if e.is_dir else "-"
        print(f"{kind}{e.mode:04o} {e.size:>10} {e.name}{'/' if e.is_dir else ''}")


def _sandboxes_table(records: Sequence[SandboxRecord]) -> None:
    now = time.time()
    print(f"{'SANDBOX':<22} {'WORKER':<16} {'IMAGE':<22} {'STATE':<13} {'PATH':<7} {'AGE':>7}  TAGS")
    for r in records:
        tags = ",".join(f"{k}={v}" for k, v in r.tags.items())
        print(
            f"{r.id:<22} {r.worker:<16} {r.image[:22]:<22} {shown_state(r):<13} {r.path:<7} "
            f"{now - r.created_at:>6.0f}s  {tags}"
        )


def cmd_ls(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        if args.target:
            sid, path = _split_remote(args.target)
            if sid is None:
                sid, path = args.target, "."
            sb = await Sandbox.from_id(sid, client=client)
            entries = await sb.list_files(path or ".")
            return await print_listing(args, entries, key=lambda e: e.name, table=_files_table)
        records = await Sandbox.list_records(tags=_pairs(args.tag, "--tag"), client=client)
        return await print_listing(args, records, key=lambda r: r.id, table=_sandboxes_table)

    return with_client(go)


def for_each_sandbox(ids: list[str], act: Callable[[Sandbox], Awaitable[object]]) -> int:
    """``act`` on each sandbox in turn, printing its id once done (as ``docker rm`` does)."""

    async def go(client: Client) -> int:
        for sid in ids:
            await act(await Sandbox.from_id(sid, client=client))
            print(sid)
        return 0

    return with_client(go)


def cmd_rm(args: argparse.Namespace) -> int:
    """Terminate the named sandboxes, or every one (``--all``) or every one carrying the
    tags (``--tag``). Like ``docker rm``, one failure does not stop the others: each is
    reported on its own line and the exit code is 125 if any failed."""
    tags = _pairs(args.tag, "--tag")
    if args.sandboxes and (args.all or tags):
        raise InvalidRequest("give sandbox ids, or --all / --tag, not both")
    if not (args.sandboxes or args.all or tags):
        raise InvalidRequest("rm needs sandbox ids, --all or --tag K=V (e.g. hotbed rm $(hotbed ls -q))")

    async def go(client: Client) -> int:
        selected = not args.sandboxes
        ids = args.sandboxes or [r.id for r in await Sandbox.list(tags=tags, client=client)]
        failed = 0
        limit = anyio.CapacityLimiter(RM_CONCURRENCY)

        async def one(sid: str) -> None:
            nonlocal failed
            async with limit:
                try:
                    await (await Sandbox.from_id(sid, client=client)).terminate()
                except SandboxNotFound:
                    if selected:  # it ended between the listing and now: nothing to do
                        return
                    failed += 1
                    print(f"error: no live sandbox {sid}", file=sys.stderr)
                    return
                except HotbedError as exc:
                    failed += 1
                    print(f"error: {sid}: {exc}", file=sys.stderr)
                    return
            print(sid, flush=True)

        async with anyio.create_task_group() as tg:
            for sid in ids:
                tg.start_soon(one, sid)
        return EXIT_FAILURE if failed else 0

    return with_client(go)


def cmd_inspect(args: argparse.Namespace) -> int:
    import msgspec

    async def go(client: Client) -> int:
        rec = await client.record(args.sandbox)
        print(msgspec.json.format(msgspec.json.encode(rec), indent=2).decode())
        return 0

    return with_client(go)


def cmd_snapshot(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        sb = await Sandbox.from_id(args.sandbox, client=client)
        print(await sb.snapshot(args.name))
        return 0

    return with_client(go)


def cmd_fork(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        sb = await Sandbox.from_id(args.sandbox, client=client)
        for child in await sb.fork(args.n, timeout=args.timeout):
            print(child.id)
        return 0

    return with_client(go)


def cmd_pause_resume(args: argparse.Namespace) -> int:
    return for_each_sandbox(args.sandboxes, Sandbox.pause if args.verb == "pause" else Sandbox.resume)


def _add_stdin_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interactive", "-i", action="store_true",
                   help="forward stdin even when it is a terminal (like docker exec -i; Ctrl-D ends it)")
    p.add_argument("--no-stdin", action="store_true",
                   help="do not forward stdin (by default a piped or redirected stdin is streamed "
                        "to the command, which reads EOF at its end; a terminal only with -i)")


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="create a sandbox, run one command, print it, remove it")
    p.add_argument("image", help="image in the local Docker engine, e.g. hotbed/base")
    _add_create_options(p)
    p.add_argument("--exec-timeout", type=float, default=60.0, help="command timeout in seconds (default 60)")
    p.add_argument("--shell", action="store_true", help="run CMD as one /bin/sh -c string")
    p.add_argument("--verbose", "-v", action="store_true", help="print the sandbox id and timing")
    _add_stdin_option(p)
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ...")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("create", help="create a sandbox and print its id")
    p.add_argument("image", nargs="?", default="hotbed/base", help="image (default hotbed/base)")
    _add_create_options(p)
    p.add_argument("--publish", "-p", action="append", type=port_number, metavar="PORT",
                   help="expose this TCP port; prints PORT -> HOST:PORT on stderr (repeatable)")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("exec", help="run a command in a sandbox; exits with its code")
    p.add_argument("sandbox", help="sandbox id")
    p.add_argument("--env", "-e", action="append", metavar="K=V", help="environment variable (repeatable)")
    p.add_argument("--workdir", "-w", help="working directory")
    p.add_argument("--exec-timeout", type=float, default=60.0, help="command timeout in seconds (default 60)")
    p.add_argument("--shell", action="store_true", help="run CMD as one /bin/sh -c string")
    _add_stdin_option(p)
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ...")
    p.set_defaults(func=cmd_exec)

    p = sub.add_parser("cp", help="copy files or (-r) directories of any size in or out of a sandbox: "
                                  "cp [-r] LOCAL SANDBOX:PATH, cp [-r] SANDBOX:PATH LOCAL ('-' is stdio)")
    p.add_argument("src", help="LOCAL_PATH, SANDBOX:PATH or - (stdin, to a file)")
    p.add_argument("dst", help="LOCAL_PATH, SANDBOX:PATH or - (stdout, from a file); "
                               "an existing directory (or a path ending in /) receives SRC inside it")
    p.add_argument("--recursive", "-r", action="store_true", help="copy directories (their whole tree)")
    p.set_defaults(func=cmd_cp)

    p = sub.add_parser("ls", help="list sandboxes, or files with ls SANDBOX:PATH")
    p.add_argument("target", nargs="?", help="SANDBOX[:PATH]: list its files instead")
    p.add_argument("--tag", action="append", metavar="K=V", help="only sandboxes with this tag (repeatable)")
    add_listing_options(p, "sandbox ids (file names with SANDBOX:PATH)")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("rm", help="terminate sandboxes (ids, --all or --tag K=V)")
    p.add_argument("sandboxes", nargs="*", help="sandbox ids, e.g. $(hotbed ls -q)")
    p.add_argument("--all", "-a", action="store_true", help="every live sandbox of this prefix")
    p.add_argument("--tag", action="append", metavar="K=V", help="every live sandbox with this tag (repeatable)")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("inspect", help="print a sandbox's record as JSON")
    p.add_argument("sandbox", help="sandbox id")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("snapshot", help="checkpoint a running sandbox into a new template; prints its name")
    p.add_argument("sandbox", help="sandbox id")
    p.add_argument("name", nargs="?", help="template name (default: generated)")
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("fork", help="N independent copies of a running sandbox (memory, processes, files)")
    p.add_argument("sandbox", help="sandbox id")
    p.add_argument("-n", type=int, default=1, help="how many (default 1)")
    p.add_argument("--timeout", type=float, default=300.0, help="the copies' lifetime in seconds")
    p.set_defaults(func=cmd_fork)

    for verb, text in (("pause", "checkpoint sandboxes to disk and stop them (frees memory)"),
                       ("resume", "restore paused sandboxes: same id, files and processes")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("sandboxes", nargs="+", help="sandbox ids")
        p.set_defaults(func=cmd_pause_resume, verb=verb)
