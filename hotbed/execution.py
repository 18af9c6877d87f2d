"""Agent-grade execution in the SDK (issue 5): streaming exec, shell sessions,
background processes, PTYs, directory transfer, chunked files and directory watches.

These are methods of :class:`hotbed.sandbox.Sandbox` (through :class:`AgentExecMixin`)
and the small handle classes they return. All of them talk to the command stream of
the sandbox's worker, which serves them through the in-sandbox guest agent.

A streaming request names an output stream key (``hotbed.keys.output``): the client
reads it with blocking XREADs (never polling), trims what it has read so Redis keeps
only unread output, and stops at the ``r`` entry holding the reply.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
import msgspec
import redis.exceptions

from hotbed import lua, protocol
from hotbed.client import REPLY_GRACE_S, Client, new_id
from hotbed.connection import MAX_BLOCK_S
from hotbed.errors import ConnectionLost, InvalidRequest, Overloaded, RequestTimeout, WorkerLost
from hotbed.protocol import (
    DEFAULT_EXEC_TIMEOUT_S,
    DEFAULT_MAX_OUTPUT,
    Envelope,
    ExecResult,
    ExecSpec,
    Message,
    ProcessInfo,
    ProcessListing,
    ProcessOutput,
    Reply,
)

if TYPE_CHECKING:
    from hotbed.sandbox import CommandResult

OP_TIMEOUT_S = 60.0
CHUNK_BYTES = 8 << 20

_event_decode = msgspec.msgpack.Decoder(list[tuple[str, str, bool]]).decode


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


def _result(reply: ExecResult, out: bytes = b"", err: bytes = b"") -> CommandResult:
    from hotbed.sandbox import CommandResult

    return CommandResult(
        reply.exit_code, out or reply.stdout, err or reply.stderr, reply.truncated,
        reply.duration_s,
    )


class Streamed:
    """One streaming request: async-iterate its entries, then read :attr:`reply`.

    Use as ``async with`` (or call :meth:`aclose`): leaving early cancels the request in
    the sandbox.
    """

    def __init__(
        self, client: Client, worker_id: str, sandbox_id: str, make: Any, *, timeout: float
    ) -> None:
        self.client = client
        self.worker_id = worker_id
        self.sandbox_id = sandbox_id
        self.request_id = new_id()
        self.key = client.keys.output(self.request_id)
        self._body: Message = make(self.key)
        self._timeout = timeout
        self._last = "0-0"
        self._pending: list[tuple[bytes, bytes]] = []
        self._started = False
        self.reply: Reply | None = None

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        env = Envelope(
            id=self.request_id,
            reply_to=self.client.keys.reply(self.request_id),
            deadline=time.time() + self._timeout,
            body=self._body,
            client=self.client.client_id,
        )
        submit = self.client.redis.register_script(lua.SUBMIT_TO_WORKER)
        try:
            ok = await submit(
                keys=[self.client.keys.worker_cmds(self.worker_id),
                      self.client.keys.worker_cap(self.worker_id)],
                args=[self.client.backlog_limit, protocol.encode(env)],
            )
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise ConnectionLost(f"Redis unreachable: {exc}") from None
        if ok == -1:
            raise WorkerLost(f"worker {self.worker_id} is gone", worker_id=self.worker_id,
                             request_id=self.request_id)
        if not ok:
            raise Overloaded("worker command backlog at its limit; retry later")
        self._give_up = anyio.current_time() + self._timeout + REPLY_GRACE_S

    async def __aenter__(self) -> Streamed:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._started and self.reply is None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                try:
                    await self.client.worker_request(
                        self.worker_id,
                        protocol.Cancel(sandbox_id=self.sandbox_id, target=self.request_id),
                        timeout=OP_TIMEOUT_S,
                    )
                except Exception:
                    pass
        if self._started:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                try:
                    await self.client.redis.delete(self.key)
                except redis.exceptions.RedisError:
                    pass

    async def entries(self) -> AsyncIterator[tuple[bytes, bytes]]:
        """``(field, value)`` of each entry until the reply (``r``) arrives."""
        await self.start()
        reply_key = self.client.keys.reply(self.request_id)
        while self.reply is None:
            left = self._give_up - anyio.current_time()
            if left <= 0:
                raise RequestTimeout(
                    f"no end to streaming request {self.request_id}", request_id=self.request_id
                )
            try:
                got: Any = await self.client._blocking.xread(
                    {self.key: self._last}, count=512,
                    block=int(min(left, MAX_BLOCK_S, 1.0) * 1000),
                )
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                raise ConnectionLost(f"Redis unreachable: {exc}") from None
            if not got:
                # Nothing streamed: a request refused before it ran (expired in the
                # queue) only answers on its reply key.
                raw: Any = await self.client.redis.lpop(reply_key)
                if raw is not None:
                    self.reply = protocol.decode_reply(raw).body
                continue
            entries = got[0][1]
            for entry_id, fields in entries:
                self._last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                for field, value in fields.items():
                    if field == b"r":
                        self.reply = protocol.decode_reply(value).body
                    else:
                        yield field, value
            await self.client.redis.xtrim(self.key, minid=self._last, approximate=False)
        await self.client.redis.delete(self.key, reply_key)

    def final(self) -> Reply:
        assert self.reply is not None, "stream not consumed"
        return protocol.raise_for_reply(self.reply, request_id=self.request_id)


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
        self.result = _result(reply)

    async def collect(self) -> CommandResult:
        """Read it all (stdout and stderr joined per stream) and return the result."""
        out, err = bytearray(), bytearray()
        async for chunk in self:
            (out if chunk.stream == "stdout" else err).extend(chunk.data)
        assert self.result is not None
        from hotbed.sandbox import CommandResult

        r = self.result
        return CommandResult(r.exit_code, bytes(out), bytes(err), r.truncated, r.duration_s)


class Session:
    """A persistent bash session in a sandbox (``sb.shell(name)``)."""

    def __init__(self, sandbox: AgentExecMixin, name: str, *, env: dict[str, str] | None = None,
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
            timeout=timeout + 15.0,
        )
        assert isinstance(reply, ExecResult)
        return _result(reply)

    def stream(self, command: str, *, timeout: float = DEFAULT_EXEC_TIMEOUT_S,
               max_output: int = DEFAULT_MAX_OUTPUT, merge_stderr: bool = False) -> ExecStream:
        return ExecStream(Streamed(
            self.sandbox.client, self.sandbox.worker_id, self.sandbox.id,
            lambda key: self._body(command, timeout, max_output, merge_stderr, key),
            timeout=timeout + 15.0,
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

    def __init__(self, sandbox: AgentExecMixin, pid: int, info: ProcessInfo | None = None) -> None:
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
        from hotbed.errors import ProcessNotFound

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
            timeout=timeout + 15.0,
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

    def __init__(self, sandbox: AgentExecMixin, streamed: Streamed) -> None:
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


class AgentExecMixin:
    """Issue-5 methods of :class:`hotbed.sandbox.Sandbox`."""

    id: str
    worker_id: str

    @property
    def client(self) -> Client:  # provided by Sandbox
        raise NotImplementedError

    # ------------------------------------------------------------ streaming exec

    def exec_stream(
        self,
        *argv: str,
        shell: bool = False,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float = DEFAULT_EXEC_TIMEOUT_S,
        idle_timeout: float | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
        stdin: bytes | str | None = None,
    ) -> ExecStream:
        """Run a command and get its output as it is produced::

            async with sb.exec_stream("make", "test") as out:
                async for chunk in out:
                    print(chunk.stream, chunk.text, end="")
            print(out.result.exit_code)

        ``timeout`` bounds the whole command, ``idle_timeout`` the time without output
        (both raise ExecTimeout); past ``max_output`` bytes per stream the rest is
        dropped and ``result.truncated`` is set.
        """
        if not argv:
            raise InvalidRequest("exec needs a command")
        spec = ExecSpec(
            argv=None if shell else list(argv), shell=" ".join(argv) if shell else None,
            env=dict(env or {}), cwd=cwd, timeout=timeout, max_output=max_output,
            stdin=stdin.encode() if isinstance(stdin, str) else stdin, idle_timeout=idle_timeout,
        )
        return ExecStream(Streamed(
            self.client, self.worker_id, self.id,
            lambda key: protocol.Exec(sandbox_id=self.id, exec=spec, stream_to=key),
            timeout=timeout + 15.0,
        ))

    # ---------------------------------------------------------------- sessions

    def shell(self, name: str = "default", *, env: dict[str, str] | None = None,
              cwd: str | None = None) -> Session:
        """A persistent bash session (created in the sandbox on its first command)."""
        return Session(self, name, env=env, cwd=cwd)

    # --------------------------------------------------------------- processes

    async def start_process(
        self, *argv: str, shell: bool = False, env: dict[str, str] | None = None,
        cwd: str | None = None, stdin_open: bool = False,
    ) -> Process:
        """Start a detached background process; read, wait, signal it later (from any
        client: ``sb.process(pid)``)."""
        if not argv:
            raise InvalidRequest("start_process needs a command")
        spec = ExecSpec(
            argv=None if shell else list(argv), shell=" ".join(argv) if shell else None,
            env=dict(env or {}), cwd=cwd, timeout=0.0,
        )
        body = protocol.ProcessStart(sandbox_id=self.id, exec=spec)
        if stdin_open:
            body = protocol.ProcessStart(
                sandbox_id=self.id, exec=msgspec.structs.replace(spec, stdin=b"")
            )
        reply = await self.client.worker_request(self.worker_id, body, timeout=OP_TIMEOUT_S)
        assert isinstance(reply, ProcessInfo)
        return Process(self, reply.pid, reply)

    def process(self, pid: int) -> Process:
        """Reattach to a background process by id."""
        return Process(self, pid)

    async def processes(self) -> list[ProcessInfo]:
        reply = await self.client.worker_request(
            self.worker_id, protocol.ProcessList(sandbox_id=self.id), timeout=OP_TIMEOUT_S
        )
        assert isinstance(reply, ProcessListing)
        return reply.procs

    # --------------------------------------------------------------------- pty

    def pty(self, argv: list[str] | None = None, *, rows: int = 24, cols: int = 80,
            env: dict[str, str] | None = None, timeout: float = 3600.0) -> Pty:
        """An interactive terminal (``hotbed shell ID`` is built on it)."""
        return Pty(self, Streamed(
            self.client, self.worker_id, self.id,
            lambda key: protocol.PtyOpen(
                sandbox_id=self.id, stream_to=key, argv=list(argv or ["/bin/bash", "-l"]),
                rows=rows, cols=cols, env=dict(env or {}), timeout=timeout,
            ),
            timeout=timeout + 15.0,
        ))

    # ------------------------------------------------------------------- files

    async def upload_dir(self, local: str | os.PathLike[str], remote: str) -> int:
        """Copy a local directory's contents into ``remote`` (made if missing)."""
        def pack() -> bytes:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for entry in sorted(Path(local).iterdir()):
                    tar.add(str(entry), arcname=entry.name)
            return buf.getvalue()

        data = await anyio.to_thread.run_sync(pack)
        if len(data) > protocol.MAX_FILE_BYTES:
            from hotbed.errors import FileTooLarge

            raise FileTooLarge(f"directory archive is {len(data)} bytes, over {protocol.MAX_FILE_BYTES}")
        await self.client.worker_request(
            self.worker_id, protocol.UploadTar(sandbox_id=self.id, path=remote, data=data),
            timeout=600.0,
        )
        return len(data)

    async def download_dir(self, remote: str, local: str | os.PathLike[str]) -> int:
        """Copy ``remote``'s contents into a local directory (streamed as a tar)."""
        streamed = Streamed(
            self.client, self.worker_id, self.id,
            lambda key: protocol.DownloadTar(sandbox_id=self.id, path=remote, stream_to=key),
            timeout=600.0,
        )
        buf = bytearray()
        err = bytearray()
        async with streamed:
            async for field, value in streamed.entries():
                (buf if field == b"o" else err).extend(value)
        reply = streamed.final()
        if isinstance(reply, ExecResult) and reply.exit_code != 0:
            from hotbed.errors import FileError

            raise FileError(f"cannot archive {remote}: {bytes(err).decode('utf-8', 'replace').strip()}",
                            sandbox_id=self.id)

        def unpack() -> None:
            Path(local).mkdir(parents=True, exist_ok=True)
            with tarfile.open(fileobj=io.BytesIO(bytes(buf)), mode="r") as tar:
                tar.extractall(str(local), filter="data")

        await anyio.to_thread.run_sync(unpack)
        return len(buf)

    async def upload_file(self, local: str | os.PathLike[str], remote: str, *,
                          chunk_bytes: int = CHUNK_BYTES, mode: int = 0o644) -> int:
        """Copy a local file of any size, in chunks."""
        total = 0
        with open(local, "rb") as f:  # noqa: ASYNC230 - bounded local reads between awaits
            first = True
            while True:
                data = f.read(chunk_bytes)
                if not data and not first:
                    break
                reply = await self.client.worker_request(
                    self.worker_id,
                    protocol.WriteFile(sandbox_id=self.id, path=remote, data=data, mode=mode,
                                       append=not first),
                    timeout=OP_TIMEOUT_S,
                )
                assert isinstance(reply, protocol.FileWritten)
                total += len(data)
                first = False
                if not data:
                    break
        return total

    async def download_file(self, remote: str, local: str | os.PathLike[str], *,
                            chunk_bytes: int = CHUNK_BYTES) -> int:
        """Copy a sandbox file of any size to a local path, in chunks."""
        offset = 0
        with open(local, "wb") as f:  # noqa: ASYNC230
            while True:
                reply = await self.client.worker_request(
                    self.worker_id,
                    protocol.ReadFile(sandbox_id=self.id, path=remote, offset=offset,
                                      max_bytes=chunk_bytes),
                    timeout=OP_TIMEOUT_S,
                )
                assert isinstance(reply, protocol.FileContent)
                f.write(reply.data)
                offset += len(reply.data)
                if not reply.data or offset >= reply.size:
                    return offset

    async def watch(self, path: str, *, timeout: float = 3600.0,
                    interval: float = 0.2) -> AsyncIterator[WatchEvent]:
        """Created/modified/deleted events under ``path`` until ``timeout`` (or until the
        caller stops iterating: use ``contextlib.aclosing``)."""
        streamed = Streamed(
            self.client, self.worker_id, self.id,
            lambda key: protocol.WatchDir(sandbox_id=self.id, path=path, stream_to=key,
                                          timeout=timeout, interval=interval),
            timeout=timeout,
        )
        async with streamed:
            async for field, value in streamed.entries():
                if field == b"v":
                    for kind, p, is_dir in _event_decode(value):
                        yield WatchEvent(kind, p, is_dir)  # type: ignore[arg-type]
            streamed.final()
