"""A sandbox's env (API keys) never lives on in a snapshot.

Real Redis, dockerd and runsc. The container starts with the image's env only; the
worker hands the sandbox's own env to each command (exec, sessions, processes, pipes,
PTYs) as it starts. So a template made from a sandbox holds no trace of its env: not in
the snapshot's files (the checkpoint's bytes are searched), not in a restored sandbox's
``env`` or PID 1's environ, while that sandbox's own env reaches every kind of command.
Auto-pause and resume keep a sandbox's env working.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from hotbed import templates
from hotbed.sandbox import Sandbox
from tests.conftest import (
    BASE_IMAGE,
    BUSYBOX_IMAGE,
    leftover_containers,
    restart_worker,
    running_stack,
    start_stack,
    stop_stack,
)

pytestmark = pytest.mark.anyio


async def wait_for(cond: Callable[[], Awaitable[bool]], what: str, timeout: float = 60.0) -> None:
    with anyio.fail_after(timeout):
        while not await cond():
            await anyio.sleep(0.05)


def files_holding(root: Path, needle: bytes) -> list[str]:
    """Files under ``root`` whose bytes contain ``needle``."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if needle in data:
                found.append(str(path.relative_to(root)))
    return found


async def sees_env(sb: Sandbox, name: str, value: str) -> None:
    """``name=value`` reaches an exec, a session, a background process and a PTY-less pipe."""
    assert (await sb.run(f"echo ${name}")).stdout.strip() == value
    session = sb.shell(f"s-{secrets.token_hex(2)}")
    assert (await session.run(f"echo ${name}")).stdout.strip() == value
    proc = await sb.start_process(f"echo ${name}", shell=True)
    await proc.wait(30)
    assert (await proc.read()).stdout.strip() == value.encode()


async def test_snapshot_keeps_no_env_and_restores_take_their_own(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    snapshots = tmp_path / "snapshots"
    async with running_stack(
        redis_url, prefix, worker_overrides={"snapshot_dir": str(snapshots), "cpu": 16},
    ) as stack:
        c = stack.client
        secret = "hbsecret" + secrets.token_hex(16)
        marker = "hbmarker" + secrets.token_hex(16)
        other = "hbother" + secrets.token_hex(16)
        src = await Sandbox.create(BASE_IMAGE, memory_mb=256, env={"SECRET": secret}, client=c)
        name = ""
        try:
            # Its commands see it (compared by digest: output the agent relays or keeps
            # for a reader is the user's to print, and would be in the snapshot).
            digest = hashlib.md5(secret.encode()).hexdigest()
            assert (await src.run("printf %s \"$SECRET\" | md5sum")).stdout.split()[0] == digest
            proc = await src.start_process("printf %s \"$SECRET\" | md5sum", shell=True)
            await proc.wait(30)
            assert (await proc.read()).stdout.split()[0] == digest.encode()
            # PID 1 (the guest agent) never had it.
            assert secret not in (await src.run("cat /proc/1/environ")).stdout
            # The control: a value a process holds in memory is found in the checkpoint
            # files (the search reads what is really in them). The process drops the
            # sandbox's env first: it is the user's, a spawned process keeps it.
            await src.write_file("/tmp/marker", marker)
            await src.spawn(
                "exec env -u SECRET sh -c 'X=$(cat /tmp/marker); rm -f /tmp/marker; "
                "while :; do sleep 1; done'"
            )
            await wait_for(lambda: _gone(src, "/tmp/marker"), "the control process read its marker")
            name = await src.snapshot(f"envsec-{secrets.token_hex(3)}")
            rec = await templates.get_template(name, client=c)
            assert rec.spec.env == {}
            snap_dir = stack.worker.snapshots.path(rec.snapshot)
            assert files_holding(snap_dir, marker.encode()), "the control value is not in the checkpoint"
            assert files_holding(snap_dir, secret.encode()) == [], _around(snap_dir, secret.encode())
            # The source keeps its env after the checkpoint.
            await sees_env(src, "SECRET", secret)

            child = await Sandbox.create(template=name, memory_mb=256, env={"OTHER": other}, client=c)
            try:
                env = (await child.run("env")).stdout
                assert secret not in env and other in env
                assert secret not in (await child.run("cat /proc/1/environ")).stdout
                await sees_env(child, "OTHER", other)
                assert (await child.run("echo x${SECRET}x")).stdout.strip() == "xx"
            finally:
                await child.terminate()
        finally:
            with anyio.CancelScope(shield=True):
                await src.terminate()
                if name:
                    await templates.delete_template(name, client=c)


def _around(root: Path, needle: bytes) -> list[bytes]:
    """What surrounds each copy of ``needle`` (says which buffer kept it)."""
    out = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            i = data.find(needle)
            while i >= 0 and len(out) < 8:
                out.append(data[max(0, i - 64) : i + len(needle) + 32])
                i = data.find(needle, i + 1)
    return out


async def _gone(sb: Sandbox, path: str) -> bool:
    return not (await sb.run(f"test -e {path}")).ok


async def test_env_works_after_auto_pause_and_resume(redis_url: str, prefix: str, tmp_path: Path) -> None:
    async with running_stack(
        redis_url, prefix,
        worker_overrides={"snapshot_dir": str(tmp_path / "snapshots"), "auto_pause_check_s": 0.1,
                          "memory_pressure_mb": 0, "cpu": 16, "memory_mb": 4096},
    ) as stack:
        c = stack.client
        value = "hbkey" + secrets.token_hex(8)
        sb = await Sandbox.create(
            BASE_IMAGE, memory_mb=256, auto_pause_after=1.0, env={"API_KEY": value}, client=c
        )
        try:
            assert (await sb.run("echo $API_KEY")).stdout.strip() == value

            async def auto_paused() -> bool:
                return (await sb.info()).state == "paused"

            await wait_for(auto_paused, "auto-pause")
            # The next request resumes it; its env still reaches every command.
            await sees_env(sb, "API_KEY", value)
            assert (await sb.info()).state == "running"
            assert value not in (await sb.run("cat /proc/1/environ")).stdout
        finally:
            with anyio.CancelScope(shield=True):
                await sb.terminate()


async def test_env_survives_a_worker_restart(redis_url: str, prefix: str, tmp_path: Path) -> None:
    """The container does not hold the env, so a restarted worker adopts a sandbox with
    the env its predecessor kept for it."""
    overrides = {"snapshot_dir": str(tmp_path / "snapshots"), "drain_on_stop": False, "cpu": 16}
    async with anyio.create_task_group() as tg:
        stack = await start_stack(redis_url, prefix, tg=tg, worker_overrides=overrides)
        c = stack.client
        value = "hbkey" + secrets.token_hex(8)
        sb = await Sandbox.create(BUSYBOX_IMAGE, memory_mb=128, env={"API_KEY": value}, client=c)
        try:
            assert (await sb.run("echo $API_KEY")).stdout.strip() == value
            worker = await restart_worker(stack, tg, drain_on_stop=True)
            assert sb.id in worker.sandboxes
            assert (await sb.run("echo $API_KEY")).stdout.strip() == value
            assert value not in (await sb.run("cat /proc/1/environ")).stdout
        finally:
            with anyio.CancelScope(shield=True):
                await sb.terminate()
                assert await c.redis.exists(c.keys.sandbox_env(sb.id)) == 0
                await stop_stack(stack)
    left = leftover_containers(prefix)
    assert not left, f"test leaked containers: {left}"
