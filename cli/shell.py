"""Interactive and process commands: shell (a PTY, like ``docker exec -it``), ps, logs,
kill, bg."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Any

import anyio

from cli.main import add_listing_options, print_json, run_async, with_client
from hotbed.client import Client
from hotbed.sandbox import Sandbox


def cmd_shell(args: argparse.Namespace) -> int:
    """Raw terminal in, PTY output out; SIGWINCH resizes the remote terminal."""
    import signal
    import termios
    import tty

    argv = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    interactive = sys.stdin.isatty()

    async def go() -> int:
        async with Client() as client:
            sb = await Sandbox.from_id(args.sandbox, client=client)
            size = shutil.get_terminal_size()
            async with sb.pty(argv or ["/bin/bash", "-l"], rows=size.lines, cols=size.columns) as term:

                async def pump_input() -> None:
                    while True:
                        data = await anyio.to_thread.run_sync(os.read, sys.stdin.fileno(), 4096, abandon_on_cancel=True)
                        if not data:
                            return
                        await term.write(data)

                async def resizes() -> None:
                    with anyio.open_signal_receiver(signal.SIGWINCH) as signals:
                        async for _ in signals:
                            s = shutil.get_terminal_size()
                            await term.resize(s.lines, s.columns)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(pump_input)
                    tg.start_soon(resizes)
                    async for data in term:
                        sys.stdout.buffer.write(data)
                        sys.stdout.flush()
                    tg.cancel_scope.cancel()
            return term.exit_code or 0

    if not interactive:
        return run_async(go)
    saved = termios.tcgetattr(sys.stdin.fileno())
    try:
        tty.setraw(sys.stdin.fileno())
        return run_async(go)
    finally:
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)


def cmd_ps(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        sb = await Sandbox.from_id(args.sandbox, client=client)
        procs = await sb.processes()
        if args.json:
            print_json(procs)
            return 0
        if args.quiet:
            for p in procs:
                print(p.pid)
            return 0
        print(f"{'PID':>7} {'STATE':<10} {'OUT':>9} {'ERR':>9}  COMMAND")
        for p in procs:
            state = "running" if p.running else f"exit {p.exit_code}"
            print(f"{p.pid:>7} {state:<10} {p.stdout_size:>9} {p.stderr_size:>9}  {' '.join(p.argv)}")
        return 0

    return with_client(go)


def cmd_bg(args: argparse.Namespace) -> int:
    argv = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd

    async def go(client: Client) -> int:
        sb = await Sandbox.from_id(args.sandbox, client=client)
        proc = await sb.start_process(*argv, shell=args.shell)
        print(proc.pid)
        return 0

    return with_client(go)


def cmd_logs(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        sb = await Sandbox.from_id(args.sandbox, client=client)
        proc = sb.process(args.pid)
        while True:
            out = await proc.read()
            sys.stdout.buffer.write(out.stdout)
            sys.stdout.flush()
            sys.stderr.buffer.write(out.stderr)
            if not args.follow or not out.info.running:
                return 0
            if not out.stdout and not out.stderr:
                await proc.wait(timeout=1.0)

    return with_client(go)


def cmd_kill(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        sb = await Sandbox.from_id(args.sandbox, client=client)
        await sb.process(args.pid).signal(args.signal)
        return 0

    return with_client(go)


def register(sub: Any) -> None:
    p = sub.add_parser("shell", help="interactive terminal in a sandbox (like docker exec -it)")
    p.add_argument("sandbox", help="sandbox id")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ... (default bash -l)")
    p.set_defaults(func=cmd_shell)

    p = sub.add_parser("bg", help="start a background process in a sandbox; prints its pid")
    p.add_argument("sandbox", help="sandbox id")
    p.add_argument("--shell", action="store_true", help="run CMD as one /bin/sh -c string")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ...")
    p.set_defaults(func=cmd_bg)

    p = sub.add_parser("ps", help="list a sandbox's background processes")
    p.add_argument("sandbox", help="sandbox id")
    add_listing_options(p, "pids")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("logs", help="print a background process's output")
    p.add_argument("sandbox", help="sandbox id")
    p.add_argument("pid", type=int, help="process id (from bg or ps)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the process exits")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("kill", help="signal a background process (its group)")
    p.add_argument("sandbox", help="sandbox id")
    p.add_argument("pid", type=int, help="process id (from bg or ps)")
    p.add_argument("--signal", "-s", type=int, default=15, help="signal number (default 15, TERM)")
    p.set_defaults(func=cmd_kill)
