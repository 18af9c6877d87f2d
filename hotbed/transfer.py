"""Copying files and directories between this machine and a sandbox.

Directories travel as one tar (packed and unpacked in a worker thread, extracted with
the ``data`` filter); files of any size travel in chunks of ``chunk_bytes``, each one
request, read and written locally through anyio's thread-backed files so no disk I/O
runs on the event loop. The sandbox side is done by its guest agent, never through the
host's archive API. These are the bodies of the ``Sandbox`` methods of the same names.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import anyio

from hotbed import protocol
from hotbed.client import OP_TIMEOUT_S
from hotbed.errors import FileError, FileTooLarge
from hotbed.handles import SandboxRef
from hotbed.protocol import ExecResult
from hotbed.streaming import Streamed

CHUNK_BYTES = 8 << 20
# A whole directory in one request: packing, sending and unpacking a large tree.
DIR_TIMEOUT_S = 600.0


async def upload_dir(sandbox: SandboxRef, local: str | os.PathLike[str], remote: str) -> int:
    """Copy a local directory's contents into ``remote`` (made if missing)."""
    def pack() -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for entry in sorted(Path(local).iterdir()):
                tar.add(str(entry), arcname=entry.name)
        return buf.getvalue()

    data = await anyio.to_thread.run_sync(pack)
    if len(data) > protocol.MAX_FILE_BYTES:
        raise FileTooLarge(f"directory archive is {len(data)} bytes, over {protocol.MAX_FILE_BYTES}")
    await sandbox.client.worker_request(
        sandbox.worker_id, protocol.UploadTar(sandbox_id=sandbox.id, path=remote, data=data),
        timeout=DIR_TIMEOUT_S,
    )
    return len(data)


async def download_dir(sandbox: SandboxRef, remote: str, local: str | os.PathLike[str]) -> int:
    """Copy ``remote``'s contents into a local directory (streamed as a tar)."""
    streamed = Streamed(
        sandbox.client, sandbox.worker_id, sandbox.id,
        lambda key: protocol.DownloadTar(sandbox_id=sandbox.id, path=remote, stream_to=key),
        timeout=DIR_TIMEOUT_S,
    )
    buf = bytearray()
    err = bytearray()
    async with streamed:
        async for field, value in streamed.entries():
            (buf if field == b"o" else err).extend(value)
    reply = streamed.final()
    if isinstance(reply, ExecResult) and reply.exit_code != 0:
        raise FileError(f"cannot archive {remote}: {bytes(err).decode('utf-8', 'replace').strip()}",
                        sandbox_id=sandbox.id)

    def unpack() -> None:
        Path(local).mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(bytes(buf)), mode="r") as tar:
            tar.extractall(str(local), filter="data")

    await anyio.to_thread.run_sync(unpack)
    return len(buf)


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
            reply = await sandbox.client.worker_request(
                sandbox.worker_id,
                protocol.WriteFile(sandbox_id=sandbox.id, path=remote, data=data, mode=mode,
                                   append=not first),
                timeout=OP_TIMEOUT_S,
            )
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
            reply = await sandbox.client.worker_request(
                sandbox.worker_id,
                protocol.ReadFile(sandbox_id=sandbox.id, path=remote, offset=offset,
                                  max_bytes=chunk_bytes),
                timeout=OP_TIMEOUT_S,
            )
            assert isinstance(reply, protocol.FileContent)
            await f.write(reply.data)
            offset += len(reply.data)
            if not reply.data or offset >= reply.size:
                return offset
