"""The guest agent and the worker's channel to it, without Docker.

The agent runs here as a child process, started by the very command line
``guest_command`` gives a docker sandbox (only the spawner's FIFO moves to a temporary
directory), and the channel reaches it through an :class:`AttachedStdio` over that
child's pipes, as a runtime's ``attach`` would. Fakes stand in where the point is the
channel's handling of a broken or absent attach.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest

from hotbed.errors import ExecFailed, FileError, ProcessNotFound, SandboxNotRunning
from hotbed.protocol import SPAWN_FIFO
from workers.guest import agent
from workers.guest.channel import (
    GUEST_BOOT,
    NOAGENT,
    FrameParser,
    GuestChannel,
    GuestManager,
    encode_frame,
    guest_command,
)
from workers.runtimes.base import AttachedStdio

pytestmark = pytest.mark.anyio

VERBS = {
    "hello", "run", "start", "pty", "input", "resize", "cancel", "signal", "list", "read",
    "wait", "session_run", "session_open", "session_interrupt", "session_close", "sessions",
    "read_file", "write_file", "list_files", "watch", "stat", "remove", "make_dir", "rename",
    "pipe_open", "pipe_write", "pipe_read", "pipe_close",
    "tunnel", "tunnel_data", "tunnel_ack", "tunnel_close",
}


class PipeStdio:
    """An attach to a child process's stdin/stdout (stderr is not read: filtered out)."""

    def __init__(self, proc: anyio.abc.Process) -> None:
        self.proc = proc
        self.aborted = False

    async def read(self) -> bytes | None:
        assert self.proc.stdout is not None
        try:
            return await self.proc.stdout.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            return None

    async def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send(data)

    def abort(self) -> None:
        self.aborted = True


def _command(fifo: str) -> list[str]:
    cmd = guest_command(["/bin/sh", "-c", "exec /bin/sleep 60"])
    assert cmd[-1] == SPAWN_FIFO
    return [*cmd[:-1], fifo]


def _env(*, python: bool = True) -> dict[str, str]:
    # Without python3 on PATH the command falls back to the no-agent shell.
    path = os.path.dirname(sys.executable) + ":/usr/bin:/bin" if python else "/nonexistent"
    return {**os.environ, "PATH": path}


@asynccontextmanager
async def started(tmp_path: Path, *, python: bool = True) -> AsyncIterator[anyio.abc.Process]:
    proc = await anyio.open_process(
        _command(str(tmp_path / "hb" / "spawn")), env=_env(python=python),
        stderr=None, start_new_session=True,
    )
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        with anyio.move_on_after(10, shield=True):
            await proc.aclose()


@asynccontextmanager
async def manager(
    attach: Callable[[str], Awaitable[AttachedStdio | None]],
) -> AsyncIterator[GuestManager]:
    guests = GuestManager(attach)
    async with anyio.create_task_group() as tg:
        await tg.start(guests.run)
        try:
            yield guests
        finally:
            tg.cancel_scope.cancel()


def _attach_to(proc: anyio.abc.Process) -> Callable[[str], Awaitable[AttachedStdio | None]]:
    async def attach(_sandbox_id: str) -> AttachedStdio | None:
        return PipeStdio(proc)

    return attach


@asynccontextmanager
async def agent_channel(tmp_path: Path) -> AsyncIterator[tuple[GuestChannel, anyio.abc.Process]]:
    async with started(tmp_path) as proc, manager(_attach_to(proc)) as guests:
        ch = await guests.channel("sb1")
        assert ch is not None and ch.has_agent
        yield ch, proc


async def _run(ch: GuestChannel, header: dict[str, object]) -> tuple[bytes, bytes, dict[str, object]]:
    out = [b"", b"", b""]
    with anyio.fail_after(30):
        async with ch.open(header) as (_rid, frames):
            async for h, p in frames:
                if h["t"] == "out":
                    out[int(h["fd"])] += p
                elif h["t"] == "exit":
                    return out[1], out[2], h
    raise AssertionError("no exit frame")


# ------------------------------------------------------------------ the dispatch table


def test_every_request_type_has_a_handler() -> None:
    assert set(agent.HANDLERS) == VERBS
    assert set(agent.FILE_REQUESTS) <= VERBS


# ---------------------------------------------------------------- the agent, end to end


async def test_agent_answers_every_kind_of_request(tmp_path: Path) -> None:
    async with agent_channel(tmp_path) as (ch, _proc):
        assert ch.info["version"] == agent.VERSION

        out, err, ex = await _run(ch, {"t": "run", "argv": ["echo", "hi"]})
        assert (out, err, ex["code"]) == (b"hi\n", b"", 0)
        out, err, ex = await _run(ch, {"t": "run", "shell": "echo oops >&2; exit 3"})
        assert (out, err, ex["code"]) == (b"", b"oops\n", 3)
        out, err, ex = await _run(ch, {"t": "run", "argv": ["/nonexistent/cmd"]})
        assert ex["code"] == 127 and b"No such file" in err

        path = str(tmp_path / "d" / "f.txt")
        h, _ = await ch.call({"t": "write_file", "path": path, "mode": 0o600}, b"hello")
        assert h["size"] == 5
        h, data = await ch.call({"t": "read_file", "path": path, "offset": 1, "length": 3})
        assert (h["size"], data) == (5, b"ell")
        h, _ = await ch.call({"t": "list_files", "path": str(tmp_path / "d")})
        assert [e[0] for e in h["entries"]] == ["f.txt"]

        h, _ = await ch.call({"t": "start", "argv": ["/bin/sh", "-c", "echo bg; echo e >&2"]})
        pid = h["proc"]["pid"]
        h, _ = await ch.call({"t": "wait", "pid": pid, "timeout": 20})
        assert h["proc"]["exit_code"] == 0
        h, p = await ch.call({"t": "read", "pid": pid})
        assert p[: h["stdout_len"]] == b"bg\n" and p[h["stdout_len"] :] == b"e\n"
        h, _ = await ch.call({"t": "list"})
        assert [x["pid"] for x in h["procs"]] == [pid]

        out, _, ex = await _run(ch, {"t": "session_run", "session": "s", "command": "X=7"})
        out, _, ex = await _run(ch, {"t": "session_run", "session": "s", "command": "echo $X"})
        assert (out, ex["code"]) == (b"7\n", 0)
        h, _ = await ch.call({"t": "sessions"})
        assert [s["name"] for s in h["sessions"]] == ["s"]
        h, _ = await ch.call({"t": "session_close", "session": "s"})
        assert h["existed"] is True


async def test_agent_errors_are_typed(tmp_path: Path) -> None:
    async with agent_channel(tmp_path) as (ch, _proc):
        with pytest.raises(ExecFailed, match="ValueError: unknown request 'nope'"):
            await ch.call({"t": "nope"})
        # Any JSON value can arrive as the type: it is answered, never raised.
        with pytest.raises(ExecFailed, match=r"ValueError: unknown request \[1\]"):
            await ch.call({"t": [1]})
        with pytest.raises(FileError, match="no such file or directory"):
            await ch.call({"t": "read_file", "path": str(tmp_path / "missing")})
        with pytest.raises(FileError, match="is a directory"):
            await ch.call({"t": "read_file", "path": str(tmp_path)})
        with pytest.raises(ProcessNotFound, match="no process 1"):
            await ch.call({"t": "read", "pid": 1})
        with pytest.raises(ProcessNotFound):
            await ch.call({"t": "signal", "pid": 1})
        # The agent is still there.
        h, _ = await ch.call({"t": "hello"})
        assert h["version"] == agent.VERSION


async def test_a_closed_session_never_closes_a_later_commands_pipes(tmp_path: Path) -> None:
    """Closing a session kills its shell, and reaping that shell ends the session again.
    A command started in between takes the freed fd numbers: the second ending must not
    close them (the command's output was lost and the agent's loop failed on EBADF)."""
    async with started(tmp_path) as proc:
        stdin, stdout = proc.stdin, proc.stdout
        assert stdin is not None and stdout is not None
        parser = FrameParser()
        out = bytearray()

        async def last_frame(rid: int) -> dict[str, object]:
            with anyio.fail_after(20):
                while True:
                    for h, p in parser.feed(await stdout.receive()):
                        if h.get("id") == rid and h["t"] == "out":
                            out.extend(p)
                        elif h.get("id") == rid and h["t"] in ("exit", "result", "error"):
                            return h

        await stdin.send(encode_frame({"t": "session_open", "id": 1, "session": "s"}))
        assert (await last_frame(1))["t"] == "result"
        # One write: the agent handles both frames before its next reap.
        await stdin.send(
            encode_frame({"t": "session_close", "id": 2, "session": "s"})
            + encode_frame({"t": "run", "id": 3, "argv": ["/bin/sh", "-c", "sleep 1; echo ok"]})
        )
        h = await last_frame(3)
        assert (bytes(out), h["t"], h.get("code")) == (b"ok\n", "exit", 0)
        await stdin.send(encode_frame({"t": "hello", "id": 4}))
        assert (await last_frame(4))["t"] == "result"


async def test_agent_hides_its_source_and_serves_the_spawner_fifo_it_was_given(tmp_path: Path) -> None:
    async with agent_channel(tmp_path) as (ch, proc):
        fifo = tmp_path / "hb" / "spawn"
        cmdline = await anyio.Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        argv = cmdline.split(b"\0")
        # ``ps`` shows the one-line loader and the worker's argument, not the source.
        assert argv[:4] == [b"python3", b"-I", b"-c", GUEST_BOOT.encode()]
        assert argv[4] == str(fifo).encode()
        assert all(len(a) < 200 for a in argv)

        marker = anyio.Path(tmp_path / "spawned")
        log = anyio.Path(tmp_path / "hb" / "spawn.log")
        with anyio.fail_after(10):
            await anyio.Path(fifo).write_text(f"echo ok > {marker}; echo logged\n")
            while not (await marker.exists() and await log.exists()):
                await anyio.sleep(0.05)
            while await log.read_text() != "logged\n":
                await anyio.sleep(0.05)
        assert await marker.read_text() == "ok\n"
        assert ch.has_agent


# ------------------------------------------------------------------------ the channel


async def test_no_agent_shell_means_no_channel(tmp_path: Path) -> None:
    async with started(tmp_path, python=False) as proc, manager(_attach_to(proc)) as guests:
        assert await guests.channel("sb1") is None
        assert await guests.channel("sb1") is None  # known now: no second attach


async def test_runtime_without_agent_means_no_channel() -> None:
    calls: list[str] = []

    async def attach(sandbox_id: str) -> AttachedStdio | None:
        calls.append(sandbox_id)
        return None

    async with manager(attach) as guests:
        assert await guests.channel("sb1") is None
    assert calls == ["sb1"]


async def test_attach_failure_propagates() -> None:
    async def attach(sandbox_id: str) -> AttachedStdio | None:
        raise SandboxNotRunning(f"sandbox {sandbox_id}: cannot attach: gone", sandbox_id=sandbox_id)

    async with manager(attach) as guests:
        with pytest.raises(SandboxNotRunning, match="cannot attach"):
            await guests.channel("sb1")


class ScriptedStdio:
    """A fake agent: answers ``hello`` with ``result``, then whatever ``reply`` says."""

    def __init__(self, reply: Callable[[dict[str, object]], list[bytes]] | None = None) -> None:
        self.send, self.recv = anyio.create_memory_object_stream[bytes | None](16)
        self.parser = FrameParser()
        self.reply = reply
        self.aborted = False
        self.fail_writes = False

    async def read(self) -> bytes | None:
        return await self.recv.receive()

    async def write(self, data: bytes) -> None:
        if self.fail_writes:
            raise ConnectionResetError("attach socket closed")
        for header, _payload in self.parser.feed(data):
            if header["t"] == "hello":
                await self.send.send(encode_frame({"t": "result", "id": header["id"], "version": 1}))
            elif self.reply is not None:
                for chunk in self.reply(header):
                    await self.send.send(chunk)

    def abort(self) -> None:
        self.aborted = True


async def test_frames_split_anywhere_reach_their_request() -> None:
    def reply(h: dict[str, object]) -> list[bytes]:
        data = (
            b"noise"
            + encode_frame({"t": "out", "id": h["id"], "fd": 1}, b"abc")
            + encode_frame({"t": "exit", "id": h["id"], "code": 0})
        )
        return [data[i : i + 3] for i in range(0, len(data), 3)]

    stdio = ScriptedStdio(reply)

    async def attach(_sandbox_id: str) -> AttachedStdio | None:
        return stdio

    async with manager(attach) as guests:
        ch = await guests.channel("sb1")
        assert ch is not None
        out, _, ex = await _run(ch, {"t": "run", "argv": ["x"]})
        assert (out, ex["code"]) == (b"abc", 0)


async def test_eof_closes_the_channel_and_the_next_use_attaches_again() -> None:
    attached: list[ScriptedStdio] = []

    async def attach(_sandbox_id: str) -> AttachedStdio | None:
        attached.append(ScriptedStdio())
        return attached[-1]

    async with manager(attach) as guests:
        ch = await guests.channel("sb1")
        assert ch is not None
        await attached[0].send.send(None)  # the attach ended
        with anyio.fail_after(5):
            while not ch.closed:
                await anyio.sleep(0.01)
        assert attached[0].aborted
        ch2 = await guests.channel("sb1")
        assert ch2 is not None and ch2 is not ch and len(attached) == 2


async def test_a_broken_write_is_sandbox_not_running() -> None:
    stdio = ScriptedStdio()

    async def attach(_sandbox_id: str) -> AttachedStdio | None:
        return stdio

    async with manager(attach) as guests:
        ch = await guests.channel("sb1")
        assert ch is not None
        stdio.fail_writes = True
        with pytest.raises(SandboxNotRunning, match="guest channel broke"):
            await ch.call({"t": "hello"})
        assert ch.closed and stdio.aborted
        with pytest.raises(SandboxNotRunning, match="guest channel closed"):
            await ch.send({"t": "hello", "id": 1})


async def test_noagent_marker_split_across_reads() -> None:
    parser = FrameParser()
    half = len(NOAGENT) // 2
    assert parser.feed(b"junk\n" + NOAGENT[:half]) == []
    assert not parser.noagent
    parser.feed(NOAGENT[half:] + b"\n")
    assert parser.noagent
