"""What a sandbox's commands hand back: results, live output, and handles.

:class:`CommandResult` is a finished command; :class:`ExecStream` is a command's output
as it is produced; :class:`Session` (a persistent bash session), :class:`Process` (a
background process) and :class:`Pty` (an interactive terminal) are handles on state
that lives in the sandbox, served by its guest agent. A handle is cheap and holds no
resources of its own: any client can make a :class:`Process` from sandbox id + pid.

A handle needs only a :class:`SandboxRef` (the sandbox's id, worker and client), which
:class:`hotbed.sandbox.Sandbox` is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal, Protocol

import msgspec

from hotbed import protocol
from hotbed.client import COMMAND_SLACK_S, OP_TIMEOUT_S, Client
from hotbed.errors import ProcessNotFound
from hotbed.protocol import (
    DEFAULT_EXEC_TIMEOUT_S,
    DEFAULT_MAX_OUTPUT,
    ExecResult,
    Message,
    ProcessInfo,
    ProcessOutput,
    Reply,
)
from hotbed.streaming import Streamed


class SandboxRef(Protocol):
    """What a handle needs of its sandbox."""

    @property
    def id(self) -> str: ...

    @property
    def worker_id(self) -> str: ...

    @property
    def client(self) -> Client: ...

    async def processes(self) -> list[ProcessInfo]: ...


class CommandResult(msgspec.Struct, frozen=True):
    exit_code: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    truncated: bool = False
    duration_s: float = 0.0

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @classmethod
    def from_reply(cls, r: ExecResult) -> CommandResult:
        return cls(r.exit_code, r.stdout, r.stderr, r.truncated, r.duration_s)


class OutputChunk(msgspec.Struct, frozen=True):
    stream: Literal["stdout", "stderr"]
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


class WatchEvent(msgspec.Struct, frozen=True):
    kind: Literal["created", "modified", "deleted"]
    path: str
    is_dir: bool = False


class ExecStream:
    """Live output of a command: ``async for chunk in stream``; then :attr:`result`."""

    def __init__(self, streamed: Streamed) -> None:
        self._s = streamed
        self.result: CommandResult | None = None

    async def __aenter__(self) -> ExecStream:
        await self._s.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._s.aclose()

    async def aclose(self) -> None:
        await self._s.aclose()

    def __aiter__(self) -> AsyncIterator[OutputChunk]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[OutputChunk]:
        async for field, value in self._s.entries():
            if field == b"o":
                yield OutputChunk("stdout", value)
            elif field == b"e":
                yield OutputChunk("stderr", value)
        reply = self._s.final()
        assert isinstance(reply, ExecResult)
        self.result = CommandResult.from_reply(reply)

    async def collect(
        self, *, on_chunk: Callable[[OutputChunk], Awaitable[None]] | None = None
    ) -> CommandResult:
        """Read it all (stdout and stderr joined per stream) and return the result;
        ``on_chunk`` sees each chunk first."""
        out, err = bytearray(), bytearray()
        async for chunk in self:
            if on_chunk is not None:
                await on_chunk(chunk)
            (out if chunk.stream == "stdout" else err).extend(chunk.data)
        assert self.result is not None
        r = self.result
        return CommandResult(r.exit_code, bytes(out), bytes(err), r.truncated, r.duration_s)


class Session:
    """A persistent bash session in a sandbox (``sb.shell(name)``)."""

    def __init__(self, sandbox: SandboxRef, name: str, *, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:
        self.sandbox = sandbox
        self.name = name
        self.env = dict(env or {})
        self.cwd = cwd

    def _body(self, command: str, timeout: float, max_output: int, merge_stderr: bool,
              stream_to: str = "") -> protocol.SessionRun:
        return protocol.SessionRun(
            sandbox_id=self.sandbox.id, session=self.name, command=command, timeout=timeout,
            max_output=max_output, merge_stderr=merge_stderr, stream_to=stream_to,
            env=self.env, cwd=self.cwd,
        )

    async def run(
        self, command: str, *, timeout: float = DEFAULT_EXEC_TIMEOUT_S,
        max_output: int = DEFAULT_MAX_OUTPUT, merge_stderr: bool = False,
    ) -> CommandResult:
        """Run ``command`` in the session; its exit code, output, and state changes (cd,
        export, functions) stay. On timeout the command is interrupted, the session
        lives on, and ExecTimeout is raised."""
        reply = await self.sandbox.client.worker_request(
            self.sandbox.worker_id, self._body(command, timeout, max_output, merge_stderr),
            timeout=timeout + COMMAND_SLACK_S,
        )
        assert isinstance(reply, ExecResult)
        return CommandResult.from_reply(reply)

    def stream(self, command: str, *, timeout: float = DEFAULT_EXEC_TIMEOUT_S,
               max_output: int = DEFAULT_MAX_OUTPUT, merge_stderr: bool = False) -> ExecStream:
        return ExecStream(Streamed(
            self.sandbox.client, self.sandbox.worker_id, self.sandbox.id,
            lambda key: self._body(command, timeout, max_output, merge_stderr, key),
            timeout=timeout + COMMAND_SLACK_S,
        ))

    async def interrupt(self) -> None:
        """Ctrl-C: end the running command (exit 130); the session keeps its state."""
        await self.sandbox.client.worker_request(
            self.sandbox.worker_id,
            protocol.SessionInterrupt(sandbox_id=self.sandbox.id, session=self.name),
            timeout=OP_TIMEOUT_S,
        )

    async def close(self) -> None:
        await self.sandbox.client.worker_request(
            self.sandbox.worker_id,
            protocol.SessionClose(sandbox_id=self.sandbox.id, session=self.name),
            timeout=OP_TIMEOUT_S,
        )


class Process:
    """A background process; any client can make one from sandbox id + pid."""

    def __init__(self, sandbox: SandboxRef, pid: int, info: ProcessInfo | None = None) -> None:
        self.sandbox = sandbox
        self.pid = pid
        self.info = info
        self.stdout_offset = 0
        self.stderr_offset = 0

    def __repr__(self) -> str:
        return f"Process(sandbox={self.sandbox.id!r}, pid={self.pid})"

    async def _call(self, body: Message, timeout: float = OP_TIMEOUT_S) -> Reply:
        return await self.sandbox.client.worker_request(
            self.sandbox.worker_id, body, timeout=timeout
        )

    async def refresh(self) -> ProcessInfo:
        for info in await self.sandbox.processes():
            if info.pid == self.pid:
                self.info = info
                return info
        raise ProcessNotFound(f"no process {self.pid}", sandbox_id=self.sandbox.id)

    async def read(self, *, max_bytes: int = DEFAULT_MAX_OUTPUT) -> ProcessOutput:
        """Output produced since the last read (from offset 0 for a new handle)."""
        out = await self.read_from(self.stdout_offset, self.stderr_offset, max_bytes=max_bytes)
        self.stdout_offset = out.stdout_offset + len(out.stdout)
        self.stderr_offset = out.stderr_offset + len(out.stderr)
        return out

    async def read_from(self, stdout_offset: int = 0, stderr_offset: int = 0, *,
                        max_bytes: int = DEFAULT_MAX_OUTPUT) -> ProcessOutput:
        reply = await self._call(protocol.ProcessRead(
            sandbox_id=self.sandbox.id, pid=self.pid, stdout_offset=stdout_offset,
            stderr_offset=stderr_offset, max_bytes=max_bytes,
        ))
        assert isinstance(reply, ProcessOutput)
        self.info = reply.info
        return reply

    async def wait(self, timeout: float = DEFAULT_EXEC_TIMEOUT_S) -> ProcessInfo:
        """Wait until it exits or ``timeout`` passes; returns its info either way."""
        reply = await self._call(
            protocol.ProcessWait(sandbox_id=self.sandbox.id, pid=self.pid, timeout=timeout),
            timeout=timeout + COMMAND_SLACK_S,
        )
        assert isinstance(reply, ProcessInfo)
        self.info = reply
        return reply

    async def signal(self, signal: int = 15, *, group: bool = True) -> None:
        await self._call(protocol.ProcessSignal(
            sandbox_id=self.sandbox.id, pid=self.pid, signal=signal, group=group
        ))

    async def kill(self) -> None:
        await self.signal(9)

    async def write(self, data: bytes | str, *, eof: bool = False) -> None:
        """Write to its stdin (started with ``stdin_open=True``)."""
        await self._call(protocol.ProcessInput(
            sandbox_id=self.sandbox.id, pid=self.pid,
            data=data.encode() if isinstance(data, str) else data, eof=eof,
        ))


class Pty:
    """An interactive terminal: iterate output, :meth:`write` keys, :meth:`resize`."""

    def __init__(self, sandbox: SandboxRef, streamed: Streamed) -> None:
        self.sandbox = sandbox
        self._s = streamed
        self.exit_code: int | None = None

    async def __aenter__(self) -> Pty:
        await self._s.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._s.aclose()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[bytes]:
        async for field, value in self._s.entries():
            if field in (b"o", b"e"):
                yield value
        reply = self._s.final()
        if isinstance(reply, ExecResult):
            self.exit_code = reply.exit_code

    async def write(self, data: bytes | str) -> None:
        await self.sandbox.client.worker_request(
            self.sandbox.worker_id,
            protocol.PtyInput(sandbox_id=self.sandbox.id, pty=self._s.request_id,
                              data=data.encode() if isinstance(data, str) else data),
            timeout=OP_TIMEOUT_S,
        )

    async def resize(self, rows: int, cols: int) -> None:
        await self.sandbox.client.worker_request(
            self.sandbox.worker_id,
            protocol.PtyResize(sandbox_id=self.sandbox.id, pty=self._s.request_id, rows=rows, cols=cols),
            timeout=OP_TIMEOUT_S,
        )
