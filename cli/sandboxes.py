"""Sandbox commands: run, create, exec, cp, ls, rm, inspect, snapshot, fork, pause, resume.

``run`` and ``exec`` exit with the command's code and forward a piped or redirected
stdin (``echo hi | hotbed exec ID -- cat``); ``ls`` takes ``--json`` and ``-q``, so
``hotbed rm $(hotbed ls -q)`` works, as do ``rm --all`` and ``rm --tag K=V``.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from cli.main import EXIT_FAILURE, add_listing_options, print_json, with_client
from cli.ports import port_number, publish
from hotbed.client import Client
from hotbed.errors import FileTooLarge, HotbedError, InvalidRequest, SandboxNotFound
from hotbed.protocol import MAX_FILE_BYTES
from hotbed.sandbox import Sandbox

# Sandboxes ``rm`` terminates at once (each is one round trip to its worker).
RM_CONCURRENCY = 16


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
    p.add_argument("--tag", action="append", metavar="K=V", help="label the sandbox (repeatable)")
    p.add_argument("--env", "-e", action="append", metavar="K=V", help="environment variable (repeatable)")
    p.add_argument("--workdir", "-w", help="working directory")
    p.add_argument("--user", "-u", help="user (default 1000:1000)")
    p.add_argument("--template", help="create from this template (warm pool / snapshot)")
    p.add_argument("--on", action="append", metavar="K=V", help="only on workers with this tag (repeatable)")
    add_network_options(p, "none (default; from a template: the template's), egress (only --allow) or open")


def add_network_options(p: argparse.ArgumentParser, network_help: str) -> None:
    p.add_argument("--network", choices=("none", "egress", "open"), help=network_help)
    p.add_argument("--allow", action="append", metavar="DEST",
                   help="with --network egress: CIDR, ADDR[:PORT[-PORT]], DOMAIN[:PORT] or "
                        "*.DOMAIN[:PORT] (repeatable; alone it means --network egress)")


def _create_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        cpu=args.cpu, memory_mb=args.memory, gpu=args.gpu, timeout=args.timeout,
        idle_timeout=args.idle_timeout, tags=_pairs(args.tag, "--tag"), env=_pairs(args.env, "--env"),
        workdir=args.workdir, user=args.user, template=args.template,
        worker_tags=_pairs(args.on, "--on"), network=args.network, allow=args.allow,
    )


def _command(argv: list[str]) -> list[str]:
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise InvalidRequest("no command given (hotbed run IMAGE -- CMD ...)")
    return argv


def _emit(res: Any) -> int:
    sys.stdout.buffer.write(res.stdout_bytes)
    sys.stdout.flush()
    sys.stderr.buffer.write(res.stderr_bytes)
    if res.truncated:
        print("hotbed: output truncated", file=sys.stderr)
    return int(res.exit_code)


def stdin_has_data() -> bool:
    """Whether stdin is data to forward: a pipe, a file or a socket. A terminal is left
    alone (``hotbed shell`` is the interactive command), and so is /dev/null."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)


async def read_stdin(limit: int = MAX_FILE_BYTES) -> bytes:
    """All of stdin, read in a worker thread so the event loop never blocks on it.

    The command gets it as one message, so it is read to its end before the command
    starts and is bounded by the message size limit."""
    data: bytes = await anyio.to_thread.run_sync(sys.stdin.buffer.read, limit + 1, abandon_on_cancel=True)
    if len(data) > limit:
        raise FileTooLarge(
            f"stdin is over {limit >> 20} MiB; copy it in with `hotbed cp` and redirect from the file"
        )
    return data


async def _stdin_for(args: argparse.Namespace) -> bytes | None:
    return await read_stdin() if not args.no_stdin and stdin_has_data() else None


def cmd_run(args: argparse.Namespace) -> int:
    argv = _command(args.cmd)

    async def go(client: Client) -> int:
        stdin = await _stdin_for(args)
        t0 = time.perf_counter()
        sb = await Sandbox.create(args.image, client=client, **_create_kwargs(args))
        if args.verbose:
            print(f"hotbed: {sb.id} on {sb.worker_id} ({sb.path}) in {time.perf_counter() - t0:.3f}s", file=sys.stderr)
        try:
            res = await sb.exec(*argv, timeout=args.exec_timeout, shell=args.shell, stdin=stdin)
        finally:
            await sb.terminate()
        return _emit(res)

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
        stdin = await _stdin_for(args)
        env = _pairs(args.env, "--env")
        # Streamed, so output is printed as the command produces it, not at its end.
        async with sb.exec_stream(
            *argv, timeout=args.exec_timeout, env=env, cwd=args.workdir, shell=args.shell, stdin=stdin
        ) as stream:
            async for chunk in stream:
                dest = sys.stdout if chunk.stream == "stdout" else sys.stderr
                dest.buffer.write(chunk.data)
                dest.flush()
        assert stream.result is not None
        if stream.result.truncated:
            print("hotbed: output truncated", file=sys.stderr)
        return int(stream.result.exit_code)

    return with_client(go)


def _split_remote(spec: str) -> tuple[str | None, str]:
    sid, sep, path = spec.partition(":")
    if sep and sid.startswith("sb-"):
        return sid, path
    return None, spec


def cmd_cp(args: argparse.Namespace) -> int:
    src_id, src = _split_remote(args.src)
    dst_id, dst = _split_remote(args.dst)
    if (src_id is None) == (dst_id is None):
        raise InvalidRequest("exactly one side of cp must be SANDBOX:PATH")

    async def go(client: Client) -> int:
        if src_id is not None:
            sb = await Sandbox.from_id(src_id, client=client)
            data = await sb.read_file(src)
            if dst == "-":
                sys.stdout.buffer.write(data)
            else:
                target = anyio.Path(dst)
                if await target.is_dir():
                    target = target / Path(src).name
                await target.write_bytes(data)
        else:
            assert dst_id is not None
            sb = await Sandbox.from_id(dst_id, client=client)
            data = await read_stdin() if src == "-" else await anyio.Path(src).read_bytes()
            target_path = dst.rstrip("/") + "/" + Path(src).name if dst.endswith("/") else dst
            await sb.write_file(target_path, data)
        return 0

    return with_client(go)


def cmd_ls(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        if args.target:
            sid, path = _split_remote(args.target)
            if sid is None:
                sid, path = args.target, "."
            sb = await Sandbox.from_id(sid, client=client)
            entries = await sb.list_files(path or ".")
            if args.json:
                print_json(entries)
            elif args.quiet:
                for e in entries:
                    print(e.name)
            else:
                for e in entries:
                    kind = "d" if e.is_dir else "-"
                    print(f"{kind}{e.mode:04o} {e.size:>10} {e.name}{'/' if e.is_dir else ''}")
            return 0
        records = await Sandbox.list_records(tags=_pairs(args.tag, "--tag"), client=client)
        if args.json:
            print_json(records)
            return 0
        if args.quiet:
            for r in records:
                print(r.id)
            return 0
        now = time.time()
        print(f"{'SANDBOX':<22} {'WORKER':<16} {'IMAGE':<22} {'STATE':<9} {'PATH':<7} {'AGE':>7}  TAGS")
        for r in records:
            tags = ",".join(f"{k}={v}" for k, v in r.tags.items())
            print(
                f"{r.id:<22} {r.worker:<16} {r.image[:22]:<22} {r.state:<9} {r.path:<7} "
                f"{now - r.created_at:>6.0f}s  {tags}"
            )
        return 0

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
    p.add_argument("--no-stdin", action="store_true",
                   help="do not forward stdin (by default a piped or redirected stdin is the command's, "
                        "read to its end first, up to 32 MiB; a terminal never is)")


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

    p = sub.add_parser("cp", help="copy a file: cp LOCAL SANDBOX:PATH or cp SANDBOX:PATH LOCAL ('-' is stdio)")
    p.add_argument("src", help="LOCAL_PATH, SANDBOX:PATH or - (stdin)")
    p.add_argument("dst", help="LOCAL_PATH, SANDBOX:PATH or - (stdout)")
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
