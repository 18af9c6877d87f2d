"""The ``hotbed`` command as a user meets it: exit codes, one error line when Redis or
dockerd is down, help on every argument, ``--json``/``-q`` listings, ``rm --all`` and
``rm --tag``, stdin forwarded by ``exec``, ``pool set --wait``, the daemons' own
arguments through ``hotbed scheduler|worker``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import socket
import sys
from functools import partial
from pathlib import Path

import anyio
import pytest

from cli.main import EXIT_FAILURE, build_parser, split_passthrough
from cli.main import main as cli_main
from hotbed.sandbox import Sandbox
from tests.conftest import BUSYBOX_IMAGE, Stack

HB = [sys.executable, "-m", "cli"]
ROOT = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTBED_")}
    env["PYTHONPATH"] = f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"
    return {**env, **extra}


def _walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {a.dest for a in action._choices_actions if a.help}
            for name, child in action.choices.items():
                if name not in helped:
                    missing.append(f"{path} {name} (the command itself)")
                missing += _walk(child, f"{path} {name}")
        elif not action.help or action.help == argparse.SUPPRESS:
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_command_and_argument_has_help() -> None:
    assert _walk(build_parser(), "hotbed") == []


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("hotbed ")


@pytest.mark.parametrize("argv", [["ls", "--bogus"], ["pool", "set", "t"], ["nosuch"], ["rm"],
                                  ["ls", "--json", "-q"], ["rm", "sb-1", "--all"]])
def test_usage_errors_are_one_line_and_125(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(argv) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_passthrough_split() -> None:
    assert split_passthrough(["scheduler", "--config", "f"]) == (["scheduler"], ["--config", "f"])
    assert split_passthrough(["--prefix", "p", "--redis-url=u", "worker", "-h"]) == (
        ["--prefix", "p", "--redis-url=u", "worker"], ["-h"])
    assert split_passthrough(["ls", "worker"]) == (["ls", "worker"], None)


@pytest.mark.parametrize("daemon", ["scheduler", "worker"])
def test_daemons_take_config_and_help_through_hotbed(daemon: str, tmp_path: Path) -> None:
    import subprocess

    out = subprocess.run([*HB, daemon, "--help"], capture_output=True, text=True, timeout=60, env=_clean_env())
    assert out.returncode == 0 and "--config" in out.stdout, out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("prefix = ''\n")
    out = subprocess.run([*HB, daemon, "--config", str(bad)], capture_output=True, text=True, timeout=60,
                         env=_clean_env())
    # The daemon's own code for bad settings, and its one line.
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "prefix" in out.stderr, out.stderr


@pytest.mark.parametrize("argv", [
    ["ls"], ["ls", "-q"], ["ls", "sb-1:/tmp"], ["exec", "sb-1", "--", "true"], ["status"],
    ["status", "--json"], ["top", "--once"], ["template", "list"], ["pool", "list", "--json"],
    ["rm", "--all"], ["inspect", "sb-1"], ["ps", "sb-1"],
])
def test_redis_down_is_one_line_and_125(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOTBED_REDIS_URL", f"redis://app:s3cret@127.0.0.1:{_closed_port()}/0")
    assert cli_main(argv) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach Redis at redis://app:***@127.0.0.1:"), err
    assert err.count("\n") == 1 and "s3cret" not in err


def test_redis_and_dockerd_down_from_a_shell(tmp_path: Path) -> None:
    """The real process: exit 125, one line, no traceback."""
    import subprocess

    env = _clean_env(HOTBED_REDIS_URL=f"redis://127.0.0.1:{_closed_port()}/0")
    out = subprocess.run([*HB, "exec", "sb-1", "--", "true"], capture_output=True, text=True, timeout=60,
                         env=env, input="piped")
    assert (out.returncode, out.stdout) == (EXIT_FAILURE, ""), out.stderr
    assert out.stderr.startswith("error: cannot reach Redis") and out.stderr.count("\n") == 1, out.stderr
    # No `docker` on PATH answers: the same kind of line.
    env["PATH"] = str(tmp_path)
    out = subprocess.run([*HB, "image", "build", "busybox"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == EXIT_FAILURE and out.stderr.startswith("error: dockerd does not answer"), out.stderr
    assert out.stderr.count("\n") == 1


# ------------------------------------------------------------ against a stack


async def _hb(stack: Stack, *args: str, input: bytes | None = None) -> tuple[int, str, str]:
    env = _clean_env(HOTBED_REDIS_URL=stack.redis_url, HOTBED_PREFIX=stack.prefix)
    res = await anyio.run_process([*HB, *args], input=input, env=env, check=False)
    return res.returncode, res.stdout.decode(), res.stderr.decode()


@pytest.mark.anyio
async def test_listings_rm_selections_exit_codes_and_stdin(hotbed_stack: Stack) -> None:
    c = hotbed_stack.client
    shape = {"cpu": 0.25, "memory_mb": 64, "client": c}
    a1 = await Sandbox.create(BUSYBOX_IMAGE, tags={"group": "a"}, **shape)  # type: ignore[arg-type]
    a2 = await Sandbox.create(BUSYBOX_IMAGE, tags={"group": "a"}, **shape)  # type: ignore[arg-type]
    b = await Sandbox.create(BUSYBOX_IMAGE, tags={"group": "b"}, **shape)  # type: ignore[arg-type]
    try:
        rc, out, _ = await _hb(hotbed_stack, "ls", "-q")
        assert rc == 0 and set(out.split()) == {a1.id, a2.id, b.id}
        rc, out, _ = await _hb(hotbed_stack, "ls", "--json", "--tag", "group=b")
        assert rc == 0 and [(r["id"], r["tags"]) for r in json.loads(out)] == [(b.id, {"group": "b"})]

        # stdin: forwarded when piped, never when --no-stdin; the command's code is ours.
        assert await _hb(hotbed_stack, "exec", b.id, "--", "cat", input=b"hi\n") == (0, "hi\n", "")
        assert (await _hb(hotbed_stack, "exec", "--no-stdin", b.id, "--", "cat", input=b"hi\n"))[:2] == (0, "")
        assert (await _hb(hotbed_stack, "exec", b.id, "--", "sh", "-c", "exit 7"))[0] == 7
        rc, out, err = await _hb(hotbed_stack, "exec", "sb-nosuch", "--", "true")
        assert rc == EXIT_FAILURE and err.startswith("error: ") and err.count("\n") == 1, err
        # A typed error from the worker (busybox has no python3 for the guest agent).
        rc, out, err = await _hb(hotbed_stack, "ps", b.id, "--json")
        assert (rc, out) == (EXIT_FAILURE, "") and "guest agent" in err and err.count("\n") == 1, err
        rc, out, _ = await _hb(hotbed_stack, "ls", f"{b.id}:/", "-q")
        assert rc == 0 and "tmp" in out.split()

        rc, out, _ = await _hb(hotbed_stack, "rm", "--tag", "group=a")
        assert rc == 0 and set(out.split()) == {a1.id, a2.id}
        rc, out, _ = await _hb(hotbed_stack, "ls", "-q")
        assert out.split() == [b.id]
        # An id that is not live: reported, the others still removed, exit 125.
        rc, out, err = await _hb(hotbed_stack, "rm", "sb-nosuch", *out.split())
        assert (rc, out.split()) == (EXIT_FAILURE, [b.id]) and "sb-nosuch" in err
        assert await _hb(hotbed_stack, "rm", "--all") == (0, "", "")
    finally:
        for sb in (a1, a2, b):
            await sb.terminate()


@pytest.mark.anyio
async def test_template_progress_and_pool_set_wait(
    hotbed_stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli import templates as cli_templates
    from hotbed.templates import create_template, delete_template

    c, name = hotbed_stack.client, f"cli-{secrets.token_hex(3)}"
    shape = ["--cpu", "0.25", "--memory", "64"]
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(cli_templates.report_build, name, c, every=0.05))
        await create_template(name, image=BUSYBOX_IMAGE, run=["echo set-up > /tmp/s"], cpu=0.25,
                              memory_mb=64, client=c)
        tg.cancel_scope.cancel()
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith(f"hotbed: template {name}: ") for line in lines), lines
    try:
        rc, out, _ = await _hb(hotbed_stack, "template", "list", "-q")
        assert rc == 0 and name in out.split()
        rc, out, _ = await _hb(hotbed_stack, "template", "list", "--json")
        assert any(t["name"] == name and t["state"] == "ready" for t in json.loads(out))
        rc, _, err = await _hb(hotbed_stack, "pool", "set", name, "--size", "1", *shape, "--wait",
                               "--wait-timeout", "0.001")
        assert rc == EXIT_FAILURE and "not full after" in err, err
        rc, out, err = await _hb(hotbed_stack, "pool", "set", name, "--size", "1", *shape, "--wait")
        assert rc == 0 and "1/1 ready" in err, err
        pool = out.strip()
        rc, out, _ = await _hb(hotbed_stack, "pool", "list", "-q")
        assert out.split() == [pool]
        rc, out, _ = await _hb(hotbed_stack, "pool", "list", "--json")
        assert [(p["name"], p["ready"]) for p in json.loads(out)] == [(pool, 1)]
        assert (await _hb(hotbed_stack, "pool", "set", name, "--size", "0", *shape))[0] == 0
        rc, _, err = await _hb(hotbed_stack, "template", "delete", "no-such-template")
        assert rc == EXIT_FAILURE and err.count("\n") == 1
    finally:
        await delete_template(name, client=c)


# A hotbed process that reports the peak of what it allocated (tracemalloc: every
# bytes object it holds, not the allocator's reserve) as its last stderr line.
HB_PEAK = [sys.executable, "-c",
           "import runpy, sys, tracemalloc\n"
           "tracemalloc.start()\n"
           "sys.argv = ['hotbed', *sys.argv[1:]]\n"
           "try:\n    runpy.run_module('cli', run_name='__main__')\n"
           "finally:\n    print(f'peak={tracemalloc.get_traced_memory()[1]}', file=sys.stderr)\n"]


async def _hb_peak(stack: Stack, *args: str, input: bytes | None = None) -> tuple[bytes, int]:
    env = _clean_env(HOTBED_REDIS_URL=stack.redis_url, HOTBED_PREFIX=stack.prefix)
    res = await anyio.run_process([*HB_PEAK, *args], input=input, env=env, check=False)
    err = res.stderr.decode()
    last = err.strip().splitlines()[-1]
    assert res.returncode == 0 and last.startswith("peak="), err
    return res.stdout, int(last.split("=")[1])


@pytest.mark.anyio
async def test_cp_directories_and_any_size_in_bounded_memory(hotbed_stack: Stack, tmp_path: Path) -> None:
    """cp -r both ways (into an existing directory, or as a new name), and files and
    stdio over the 32 MiB of one message, with the CLI's peak memory far below them."""
    import hashlib

    from tests.conftest import BASE_IMAGE

    size = 128 << 20
    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    src = tmp_path / "proj"
    (src / "pkg" / "sub").mkdir(parents=True)
    (src / "README").write_text("hello\n")
    (src / "pkg" / "sub" / "mod.py").write_text("x = 1\n")
    (src / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (src / "run.sh").chmod(0o755)

    async with await Sandbox.create(BASE_IMAGE, client=hotbed_stack.client, memory_mb=512) as sb:
        s = hotbed_stack
        # A directory needs -r.
        rc, _, err = await _hb(s, "cp", str(src), f"{sb.id}:/tmp/")
        assert rc == EXIT_FAILURE and "use cp -r" in err, err
        # Into an existing directory: /tmp/proj; to a new name: /tmp/copy.
        assert (await _hb(s, "cp", "-r", str(src), f"{sb.id}:/tmp"))[0] == 0
        assert (await _hb(s, "cp", "-r", str(src), f"{sb.id}:/tmp/copy"))[0] == 0
        res = await sb.exec("sh", "-c", "cd /tmp && cat proj/pkg/sub/mod.py copy/README && copy/run.sh")
        assert res.stdout == "x = 1\nhello\nran\n", res.stderr
        # And back out.
        out = tmp_path / "out"
        out.mkdir()
        assert (await _hb(s, "cp", "-r", f"{sb.id}:/tmp/copy", str(out)))[0] == 0
        assert (out / "copy" / "pkg" / "sub" / "mod.py").read_text() == "x = 1\n"
        assert os.access(out / "copy" / "run.sh", os.X_OK)
        assert (await _hb(s, "cp", "-r", f"{sb.id}:/tmp/proj", str(tmp_path / "again")))[0] == 0
        assert (tmp_path / "again" / "README").read_text() == "hello\n"
        rc, _, err = await _hb(s, "cp", f"{sb.id}:/tmp/proj", str(tmp_path / "x"))
        assert rc == EXIT_FAILURE and "use cp -r" in err, err

        # A file four times one message's limit, each way, and through stdin and stdout.
        peaks = {}
        _, peaks["up"] = await _hb_peak(s, "cp", str(big), f"{sb.id}:/tmp/")
        assert (await sb.exec("sha256sum", "/tmp/big.bin")).stdout.split()[0] == digest
        _, peaks["down"] = await _hb_peak(s, "cp", f"{sb.id}:/tmp/big.bin", str(out))
        assert hashlib.sha256((out / "big.bin").read_bytes()).hexdigest() == digest
        _, peaks["stdin"] = await _hb_peak(s, "cp", "-", f"{sb.id}:/tmp/piped", input=big.read_bytes())
        piped, peaks["stdout"] = await _hb_peak(s, "cp", f"{sb.id}:/tmp/piped", "-")
        assert hashlib.sha256(piped).hexdigest() == digest
        # 8 MiB chunks: a few in flight at once, never the file.
        assert max(peaks.values()) < 64 << 20, {k: v >> 20 for k, v in peaks.items()}


# ---------------------------------------------------------------- exec's stdin


@pytest.mark.anyio
async def test_guest_paces_streamed_input(tmp_path: Path) -> None:
    """A paced input is answered once its bytes are in the command's stdin: not before
    the command reads them, and at once (closed) when the command has closed it."""
    import time

    from tests.test_guest_agent import agent_channel

    out = tmp_path / "got.bin"
    blob = os.urandom(6 << 20)  # well over what the pipe holds
    async with agent_channel(tmp_path) as (ch, _proc):
        header = {"t": "run", "argv": ["/bin/sh", "-c", f"sleep 1; cat > {out}; echo done"],
                  "stdin": False, "stdin_open": True, "max_output": 1 << 16, "timeout": 30}
        with anyio.fail_after(30):
            async with ch.open(header) as (gid, frames):
                t0 = time.monotonic()
                h, _ = await ch.call({"t": "input", "target": gid, "paced": True}, blob, timeout=30)
                assert time.monotonic() - t0 > 0.8 and h["closed"] is False
                h, _ = await ch.call({"t": "input", "target": gid, "paced": True, "eof": True}, timeout=30)
                assert h["closed"] is True
                got = [(h2, p) async for h2, p in frames]
        assert got[0][1] == b"done\n" and got[-1][0]["code"] == 0
        assert out.read_bytes() == blob

        # head reads 3 bytes and exits: the input after that is dropped, answered closed.
        header["argv"] = ["head", "-c", "3"]
        with anyio.fail_after(30):
            async with ch.open(header) as (gid, frames):
                h, _ = await ch.call({"t": "input", "target": gid, "paced": True}, blob, timeout=30)
                assert h["closed"] is True
                got = [(h2, p) async for h2, p in frames]
        assert got[0][1] == blob[:3] and got[-1][0]["code"] == 0


@pytest.mark.anyio
async def test_exec_streams_stdin(hotbed_stack: Stack) -> None:
    """``hotbed exec`` streams stdin: far over one message's 32 MiB, as the command
    reads it (a reply to the first line comes back before the second is written), and
    it stops sending once the command has closed its stdin."""
    import hashlib

    from tests.conftest import BASE_IMAGE

    blob = os.urandom(48 << 20)
    async with await Sandbox.create(BASE_IMAGE, client=hotbed_stack.client, memory_mb=256) as sb:
        s = hotbed_stack
        rc, out, err = await _hb(s, "exec", sb.id, "--", "sha256sum", input=blob)
        assert rc == 0 and out.split()[0] == hashlib.sha256(blob).hexdigest(), err
        # head reads 5 bytes and exits: so does hotbed, long before the 40 MiB are read.
        env = _clean_env(HOTBED_REDIS_URL=s.redis_url, HOTBED_PREFIX=s.prefix)
        with anyio.fail_after(60):
            async with await anyio.open_process([*HB, "exec", sb.id, "--", "head", "-c", "5"], env=env) as p:
                assert p.stdin is not None and p.stdout is not None
                sent = 0

                async def produce() -> None:
                    nonlocal sent
                    with contextlib.suppress(anyio.BrokenResourceError):
                        for piece in [b"hello", *[bytes(1 << 20)] * 40]:
                            await p.stdin.send(piece)  # type: ignore[union-attr]
                            sent += len(piece)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(produce)
                    assert await p.wait() == 0
                assert await p.stdout.receive() == b"hello" and sent < 40 << 20
        # `run` streams it the same way.
        rc, out, err = await _hb(s, "run", "--memory", "256", BASE_IMAGE, "--", "wc", "-c", input=b"x" * 1000)
        assert (rc, out.strip()) == (0, "1000"), err

        script = 'read a; echo "got $a"; read b; echo "got $b"; exit 3'
        with anyio.fail_after(60):
            async with await anyio.open_process([*HB, "exec", sb.id, "--", "sh", "-c", script], env=env) as p:
                assert p.stdin is not None and p.stdout is not None
                await p.stdin.send(b"one\n")
                first = await p.stdout.receive()
                assert first == b"got one\n"
                await p.stdin.send(b"two\n")
                await p.stdin.aclose()
                rest = b"".join([chunk async for chunk in p.stdout])
                assert rest == b"got two\n"
                assert await p.wait() == 3
            # A command that ends while its stdin is still open: hotbed exits with it,
            # without waiting for the producer to write again or close.
            async with await anyio.open_process([*HB, "exec", sb.id, "--", "head", "-n", "1"], env=env) as p:
                assert p.stdin is not None and p.stdout is not None
                await p.stdin.send(b"only\n")
                assert await p.wait() == 0
                assert await p.stdout.receive() == b"only\n"


# ------------------------------------------------------------ template build output


@pytest.mark.anyio
async def test_template_create_streams_the_build(hotbed_stack: Stack) -> None:
    """Each set-up step, its output and the snapshot are printed as the worker gets to
    them, while the build is still running, not once it ends."""
    from hotbed.templates import delete_template

    s, name = hotbed_stack, f"cli-{secrets.token_hex(3)}"
    env = _clean_env(HOTBED_REDIS_URL=s.redis_url, HOTBED_PREFIX=s.prefix)
    argv = [*HB, "template", "create", name, "--image", BUSYBOX_IMAGE, "--cpu", "0.25", "--memory", "64",
            "--run", "echo first-out; sleep 2", "--run", "echo second-out >&2", "--ready", "true"]
    lines: list[str] = []
    try:
        with anyio.fail_after(120):
            async with await anyio.open_process(argv, env=env) as p:
                assert p.stderr is not None and p.stdout is not None
                buf = b""
                async for data in p.stderr:
                    buf += data
                    *done, buf = buf.split(b"\n")
                    for raw in done:
                        line = raw.decode()
                        lines.append(line)
                        if "step 1/2 exited 0" in line:
                            # Printed while the build goes on (step 2, the snapshot).
                            assert p.returncode is None
                out = b"".join([d async for d in p.stdout]).decode()
                assert await p.wait() == 0, lines
        assert out.startswith(f"{name}: snapshot "), out
        import re

        said = [m.group(1) for line in lines if (m := re.match(rf"hotbed: template {name}: +[\d.]+s  (.*)$", line))]
        wanted = [f"booting {BUSYBOX_IMAGE}", "step 1/2: echo first-out; sleep 2", "step 1/2 exited 0",
                  "step 2/2: echo second-out >&2", "step 2/2 exited 0", "readiness check: true",
                  "ready after 1 check(s)", "taking the memory snapshot", "snapshot "]
        found = [next((i for i, text in enumerate(said) if text.startswith(w)), -1) for w in wanted]
        assert -1 not in found and found == sorted(found), lines
        assert "  | first-out" in lines and "  | second-out" in lines, lines
        assert lines.index("  | first-out") < next(i for i, x in enumerate(lines) if "step 1/2 exited" in x)
    finally:
        await delete_template(name, client=s.client)
