"""The ``hotbed`` command as a user meets it: exit codes, one error line when Redis or
dockerd is down, help on every argument, ``--json``/``-q`` listings, ``rm --all`` and
``rm --tag``, stdin forwarded by ``exec``, ``pool set --wait``, the daemons' own
arguments through ``hotbed scheduler|worker``.
"""

from __future__ import annotations

import argparse
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
