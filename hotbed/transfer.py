"""Copies between the local disk and a sandbox, of any size, in bounded memory.

A directory travels as a tar, packed and unpacked locally in a thread (anyio's
``to_thread``) so no disk I/O runs on the event loop, and streamed chunk by chunk: at
most ``AHEAD + 1`` chunks are held here, one in Redis and in the worker, one in the
sandbox. In the sandbox the tar runs behind a pipe of its guest agent
(``PipeOpen`` ... ``PipeClose``), which moves the tar's input or output only when a
request asks, so the transfer goes at the pace of its slowest hop. A sandbox without
the guest agent (an image with no python3) gets the same chunks through a temporary tar
file instead (chunked appends and ranged reads, which its runtime runs as shell). A
single file is written with appends and read with ranged reads, chunk by chunk.
The sandbox side is always done inside the sandbox, never through the host's archive
API. These are the bodies of the ``Sandbox`` methods of the same names.
"""

from __future__ import annotations

import os
import secrets
import shlex
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread

from hotbed import protocol
from hotbed.client import OP_TIMEOUT_S
from hotbed.errors import FileError, HotbedError, NotADirectory, UnsupportedRequest
from hotbed.handles import SandboxRef
from hotbed.protocol import ExecResult

CHUNK_BYTES = 8 << 20
# Chunks packed (or received) ahead of the one being sent (or unpacked).
AHEAD = 1
# A whole directory's archive step in the sandbox (a fallback's pack or unpack).
DIR_TIMEOUT_S = 600.0


# ------------------------------------------------------------------ the sandbox side


class Pipe:
    """A command in the sandbox fed or drained chunk by chunk (``PipeOpen``)."""

    def __init__(self, sandbox: SandboxRef, pid: int) -> None:
        self.sandbox = sandbox
        self.pid = pid

    @classmethod
    async def open(cls, sandbox: SandboxRef, argv: list[str], *, read: bool = False,
                   write: bool = False) -> Pipe:
        reply = await _call(sandbox, protocol.PipeOpen(
            sandbox_id=sandbox.id, argv=argv, read=read, write=write,
        ))
        assert isinstance(reply, protocol.ProcessInfo)
        return cls(sandbox, reply.pid)

    async def write(self, data: bytes, *, eof: bool = False) -> None:
        await _call(self.sandbox, protocol.PipeWrite(
            sandbox_id=self.sandbox.id, pipe=self.pid, data=data, eof=eof,
        ))

    async def read(self, max_bytes: int) -> tuple[bytes, bool]:
        reply = await _call(self.sandbox, protocol.PipeRead(
            sandbox_id=self.sandbox.id, pipe=self.pid, max_bytes=max_bytes,
        ))
        assert isinstance(reply, protocol.PipeData)
        return reply.data, reply.eof

    async def close(self, *, kill: bool = False) -> ExecResult:
        reply = await _call(
            self.sandbox,
            protocol.PipeClose(sandbox_id=self.sandbox.id, pipe=self.pid, kill=kill,
                               timeout=DIR_TIMEOUT_S),
            timeout=DIR_TIMEOUT_S + OP_TIMEOUT_S,
        )
        assert isinstance(reply, ExecResult)
        return reply

    async def abandon(self) -> None:
        """Kill and drop it, whatever state it is in (cleanup after a failure)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            try:
                await self.close(kill=True)
            except HotbedError:
                pass


async def _call(sandbox: SandboxRef, body: protocol.Message, *,
                timeout: float = OP_TIMEOUT_S) -> protocol.Reply:
    return await sandbox.client.worker_request(sandbox.worker_id, body, timeout=timeout)


async def _sh(sandbox: SandboxRef, script: str, *args: str) -> ExecResult:
    reply = await _call(
        sandbox,
        protocol.Exec(sandbox_id=sandbox.id, exec=protocol.ExecSpec(
            argv=["/bin/sh", "-c", script, "sh", *args], timeout=DIR_TIMEOUT_S, max_output=1 << 16,
        )),
        timeout=DIR_TIMEOUT_S + OP_TIMEOUT_S,
    )
    assert isinstance(reply, ExecResult)
    return reply


async def _why(sandbox: SandboxRef, remote: str, what: str, stderr: bytes) -> HotbedError:
    """The typed error of a failed tar at ``remote``: FileNotFound / NotADirectory when
    the path is the problem, else FileError with what tar said."""
    try:
        reply = await _call(sandbox, protocol.StatFile(sandbox_id=sandbox.id, path=remote))
    except FileError as exc:
        return exc
    assert isinstance(reply, protocol.FileStat)
    if reply.entry is not None and not reply.entry.is_dir:
        return NotADirectory(f"not a directory: {remote}", sandbox_id=sandbox.id)
    detail = stderr.decode("utf-8", "replace").strip()
    return FileError(f"cannot {what} {remote}: {detail}", sandbox_id=sandbox.id)


# ------------------------------------------------------- a thread and the event loop


class _ChunkWriter:
    """A write-only file for tarfile that hands each full chunk to ``emit``."""

    def __init__(self, emit: Callable[[bytes], None], chunk_bytes: int) -> None:
        self.emit = emit
        self.chunk_bytes = chunk_bytes
        self.buf = bytearray()

    def write(self, data: bytes) -> int:
        self.buf += data
        while len(self.buf) >= self.chunk_bytes:
            self.emit(bytes(self.buf[: self.chunk_bytes]))
            del self.buf[: self.chunk_bytes]
        return len(data)

    def finish(self) -> None:
        if self.buf:
            self.emit(bytes(self.buf))
            self.buf.clear()


class _ChunkReader:
    """A read-only file for tarfile over the chunks ``take`` returns (b"" at the end)."""

    def __init__(self, take: Callable[[], bytes]) -> None:
        self.take = take
        self.buf = bytearray()
        self.done = False

    def read(self, n: int = -1) -> bytes:
        while not self.done and (n < 0 or len(self.buf) < n):
            chunk = self.take()
            if not chunk:
                self.done = True
                break
            self.buf += chunk
        if n < 0:
            n = len(self.buf)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


async def _from_thread(produce: Callable[[Callable[[bytes], None]], None],
                       consume: Callable[[bytes], Awaitable[None]]) -> None:
    """``produce(emit)`` runs in a thread; each chunk it emits is ``consume``d here, at
    most ``AHEAD`` chunks behind. The first failure on either side is raised."""
    send, recv = anyio.create_memory_object_stream[bytes](AHEAD)
    errors: list[Exception] = []

    async def producer() -> None:
        with send:
            try:
                await anyio.to_thread.run_sync(produce, lambda c: anyio.from_thread.run(send.send, c))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the consumer stopped; its error is the one to raise
            except Exception as exc:
                errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(producer)
        with recv:
            try:
                async for chunk in recv:
                    await consume(chunk)
            except Exception as exc:
                errors.append(exc)
    if errors:
        raise errors[0]


async def _to_thread(chunks: AsyncIterator[bytes], consume: Callable[[Callable[[], bytes]], None]) -> None:
    """Each of ``chunks`` is handed to ``consume(take)``, which runs in a thread and
    calls ``take()`` for the next (b"" at the end), at most ``AHEAD`` chunks behind.
    The first failure on either side is raised."""
    send, recv = anyio.create_memory_object_stream[bytes](AHEAD)
    errors: list[Exception] = []

    def take() -> bytes:
        try:
            return anyio.from_thread.run(recv.receive)
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return b""

    async def consumer() -> None:
        with recv:
            try:
                await anyio.to_thread.run_sync(consume, take)
            except Exception as exc:
                errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer)
        with send:
            try:
                async for chunk in chunks:
                    await send.send(chunk)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the consumer stopped; its error is the one to raise
            except Exception as exc:
                errors.insert(0, exc)
    if errors:
        raise errors[0]


def _pack(local: Path, emit: Callable[[bytes], None], chunk_bytes: int) -> None:
    out = _ChunkWriter(emit, chunk_bytes)
    with tarfile.open(fileobj=out, mode="w|") as tar:  # type: ignore[call-overload]
        for entry in sorted(local.iterdir()):
            tar.add(str(entry), arcname=entry.name)
    out.finish()


def _unpack(local: Path, take: Callable[[], bytes]) -> None:
    local.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=_ChunkReader(take), mode="r|") as tar:  # type: ignore[call-overload]
        tar.extractall(str(local), filter="data")


# ------------------------------------------------------------------- directories


async def upload_dir(sandbox: SandboxRef, local: str | os.PathLike[str], remote: str, *,
                     chunk_bytes: int = CHUNK_BYTES) -> int:
    """Copy a local directory's contents into ``remote`` (made if missing). A tar that
    fits in one chunk goes in one request; a larger one streams through a pipe."""
    src = Path(local)
    if not await anyio.Path(src).is_dir():
        raise NotADirectoryError(f"not a local directory: {src}")
    first: bytes | None = None
    sink: _Sink | None = None
    sent = 0

    async def push(chunk: bytes) -> None:
        nonlocal first, sink, sent
        if sink is None:
            if first is None:
                first = chunk
                return
            sink = await _open_sink(sandbox, remote)
            await sink.write(first)
            sent += len(first)
            first = None
        await sink.write(chunk)
        sent += len(chunk)

    try:
        await _from_thread(lambda emit: _pack(src, emit, chunk_bytes), push)
        if sink is None:
            await _untar_one(sandbox, remote, first or b"")
            return len(first or b"")
        await sink.finish()
    except BaseException:
        if sink is not None:
            await sink.abandon()
        raise
    return sent


class _Sink:
    """Where a streamed directory upload's tar chunks go."""

    async def write(self, chunk: bytes) -> None:
        raise NotImplementedError

    async def finish(self) -> None:
        """Unpack what was written; FileError saying why not."""
        raise NotImplementedError

    async def abandon(self) -> None:
        raise NotImplementedError


class _PipeSink(_Sink):
    """Into ``tar -x`` in the sandbox, through a guest-agent pipe."""

    def __init__(self, sandbox: SandboxRef, remote: str, pipe: Pipe) -> None:
        self.sandbox, self.remote, self.pipe = sandbox, remote, pipe

    async def write(self, chunk: bytes) -> None:
        await self.pipe.write(chunk)

    async def finish(self) -> None:
        await self.pipe.write(b"", eof=True)
        res = await self.pipe.close()
        if res.exit_code != 0:
            raise FileError(
                f"cannot unpack into {self.remote}: {res.stderr.decode('utf-8', 'replace').strip()}",
                sandbox_id=self.sandbox.id,
            )

    async def abandon(self) -> None:
        await self.pipe.abandon()


class _FileSink(_Sink):
    """No pipes (no guest agent): into a temporary tar file, unpacked at the end."""

    def __init__(self, sandbox: SandboxRef, remote: str) -> None:
        self.sandbox, self.remote = sandbox, remote
        self.tmp = _temp_tar()
        self.written = 0

    async def write(self, chunk: bytes) -> None:
        await _call(self.sandbox, protocol.WriteFile(
            sandbox_id=self.sandbox.id, path=self.tmp, data=chunk, mode=0o600,
            append=self.written > 0,
        ))
        self.written += len(chunk)

    async def finish(self) -> None:
        try:
            res = await _sh(self.sandbox, 'mkdir -p "$1" && tar -C "$1" -xf "$2"', self.remote, self.tmp)
        finally:
            await self.abandon()
        if res.exit_code != 0:
            raise FileError(
                f"cannot unpack into {self.remote}: {res.stderr.decode('utf-8', 'replace').strip()}",
                sandbox_id=self.sandbox.id,
            )

    async def abandon(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(30):
            try:
                await _sh(self.sandbox, 'rm -f "$1"', self.tmp)
            except HotbedError:
                pass


async def _open_sink(sandbox: SandboxRef, remote: str) -> _Sink:
    q = shlex.quote(remote)
    try:
        pipe = await Pipe.open(sandbox, ["/bin/sh", "-c", f"mkdir -p {q} && exec tar -C {q} -xf -"],
                               write=True)
    except UnsupportedRequest:
        return _FileSink(sandbox, remote)
    return _PipeSink(sandbox, remote, pipe)


async def _untar_one(sandbox: SandboxRef, remote: str, data: bytes) -> None:
    """A whole (small) tar in one request."""
    try:
        await _call(sandbox, protocol.UploadTar(sandbox_id=sandbox.id, path=remote, data=data),
                    timeout=DIR_TIMEOUT_S)
    except UnsupportedRequest:
        sink = _FileSink(sandbox, remote)
        try:
            await sink.write(data)
        except BaseException:
            await sink.abandon()
            raise
        await sink.finish()


async def download_dir(sandbox: SandboxRef, remote: str, local: str | os.PathLike[str], *,
                       chunk_bytes: int = CHUNK_BYTES) -> int:
    """Copy ``remote``'s contents into a local directory."""
    dst = Path(local)
    try:
        pipe = await Pipe.open(sandbox, ["tar", "-C", remote, "-cf", "-", "."], read=True)
    except UnsupportedRequest:
        return await _download_dir_via_file(sandbox, remote, dst, chunk_bytes)
    received = 0

    async def pull() -> AsyncIterator[bytes]:
        nonlocal received
        while True:
            data, eof = await pipe.read(chunk_bytes)
            received += len(data)
            if data:
                yield data
            if eof:
                return

    try:
        try:
            await _to_thread(pull(), lambda take: _unpack(dst, take))
        except (tarfile.TarError, EOFError) as exc:
            # Most likely tar failed in the sandbox and sent nothing usable: say why.
            res = await pipe.close(kill=True)
            if res.exit_code != 0:
                raise await _why(sandbox, remote, "archive", res.stderr) from exc
            raise
        res = await pipe.close()
    except BaseException:
        await pipe.abandon()
        raise
    if res.exit_code != 0:
        raise await _why(sandbox, remote, "archive", res.stderr)
    return received


def _temp_tar() -> str:
    return f"/tmp/.hotbed-transfer-{secrets.token_hex(6)}.tar"


async def _download_dir_via_file(sandbox: SandboxRef, remote: str, dst: Path, chunk_bytes: int) -> int:
    """No pipes (no guest agent): tar to a temporary file, which is read in ranges."""
    tmp = _temp_tar()
    received = 0

    async def pull() -> AsyncIterator[bytes]:
        nonlocal received
        while True:
            reply = await _call(sandbox, protocol.ReadFile(
                sandbox_id=sandbox.id, path=tmp, offset=received, max_bytes=chunk_bytes,
            ))
            assert isinstance(reply, protocol.FileContent)
            received += len(reply.data)
            if reply.data:
                yield reply.data
            if not reply.data or received >= reply.size:
                return

    try:
        res = await _sh(sandbox, 'tar -C "$1" -cf "$2" .', remote, tmp)
        if res.exit_code != 0:
            raise await _why(sandbox, remote, "archive", res.stderr)
        await _to_thread(pull(), lambda take: _unpack(dst, take))
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(30):
            await _sh(sandbox, 'rm -f "$1"', tmp)
    return received


# ------------------------------------------------------------------------- files


async def upload_file(sandbox: SandboxRef, local: str | os.PathLike[str], remote: str, *,
                      chunk_bytes: int = CHUNK_BYTES, mode: int = 0o644) -> int:
    """Copy a local file of any size, in chunks (an empty file is one empty write)."""
    total = 0
    async with await anyio.open_file(local, "rb") as f:
        first = True
        while True:
            data = await f.read(chunk_bytes)
            if not data and not first:
                break
            reply = await _call(sandbox, protocol.WriteFile(
                sandbox_id=sandbox.id, path=remote, data=data, mode=mode, append=not first,
            ))
            assert isinstance(reply, protocol.FileWritten)
            total += len(data)
            first = False
            if not data:
                break
    return total


async def download_file(sandbox: SandboxRef, remote: str, local: str | os.PathLike[str], *,
                        chunk_bytes: int = CHUNK_BYTES) -> int:
    """Copy a sandbox file of any size to a local path, in chunks."""
    offset = 0
    async with await anyio.open_file(local, "wb") as f:
        while True:
            reply: Any = await _call(sandbox, protocol.ReadFile(
                sandbox_id=sandbox.id, path=remote, offset=offset, max_bytes=chunk_bytes,
            ))
            assert isinstance(reply, protocol.FileContent)
            await f.write(reply.data)
            offset += len(reply.data)
            if not reply.data or offset >= reply.size:
                return offset
