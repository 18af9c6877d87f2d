"""The worker's side of the guest agent: one persistent channel per sandbox.

The guest agent (:mod:`workers.guest.agent`) is the container's main process; the
channel is a ``docker attach`` of the container's stdin/stdout, opened once and kept,
so a command is one frame each way instead of a ``docker exec`` setup (~80-100 ms
here). After a worker restart or a checkpoint/restore the next use simply attaches
again: the agent keeps its state (sessions, background processes) and answers
``hello`` on the new attach.

Images without python3 run a shell that answers every line with ``HOTBED-NOAGENT``:
the channel reports ``has_agent = False`` and the worker keeps the ``docker exec`` path.

Flow control: one reader task per channel routes frames into small bounded streams,
one per request; a consumer that cannot keep up (Redis slower than the command)
blocks the reader, the attach socket fills, the agent stops reading its children and
their writes block. Nothing on the way buffers more than a few frames.
"""

from __future__ import annotations

import logging
import secrets
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from hotbed.errors import HotbedError, RuntimeFailure, SandboxNotRunning, error_class
from workers.runtimes.base import AttachedStdio

log = logging.getLogger(__name__)

MAGIC = b"HBG1"
HEAD = struct.Struct(">4sII")
NOAGENT = b"HOTBED-NOAGENT"
HELLO_TIMEOUT_S = 60.0
# Frames buffered per request before the reader waits for its consumer.
PER_REQUEST_FRAMES = 8
READ_QUEUE_BYTES = 2 << 20

GUEST_SOURCE = (Path(__file__).with_name("agent.py")).read_text()



def guest_command(idle_cmd: list[str]) -> list[str]:
    """PID 1 of a docker sandbox: the guest agent where the image has python3; else the
    runtime's idle shell (``idle_cmd``, a ``sh -c`` script), plus a reader that answers
    every line written to stdin with ``HOTBED-NOAGENT`` (so the worker knows at once).
    Either way PID 1 re-execs so that ``ps`` does not show the agent's source."""
    fallback = (
        f"exec 3<&0; (while read -r _l <&3; do echo {NOAGENT.decode()}; done) & " + idle_cmd[-1]
    )
    return [
        "/bin/sh",
        "-c",
        'if command -v python3 >/dev/null 2>&1; then exec python3 -I -c "$0" "$0"; fi; '
        'exec /bin/sh -c "$1"',
        GUEST_SOURCE,
        fallback,
    ]


_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder(dict[str, Any]).decode

Frame = tuple[dict[str, Any], bytes]


def encode_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    h = _json_encode(header)
    return HEAD.pack(MAGIC, len(h), len(payload)) + h + payload


def guest_error(header: dict[str, Any], sandbox_id: str) -> HotbedError:
    """The typed error of an ``error`` frame."""
    code = str(header.get("code") or "RuntimeFailure")
    return error_class(code)(str(header.get("message", "")), sandbox_id=sandbox_id)


class FrameParser:
    """Splits the agent's stdout into frames; resynchronises on the magic."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.noagent = False

    def feed(self, data: bytes) -> list[Frame]:
        self.buf += data
        out: list[Frame] = []
        while True:
            i = self.buf.find(MAGIC)
            if i < 0:
                if NOAGENT in self.buf:
                    self.noagent = True
                del self.buf[: max(0, len(self.buf) - len(NOAGENT))]
                return out
            if i:
                if NOAGENT in self.buf[:i]:
                    self.noagent = True
                del self.buf[:i]
            if len(self.buf) < HEAD.size:
                return out
            _m, hl, pl = HEAD.unpack_from(self.buf)
            total = HEAD.size + hl + pl
            if len(self.buf) < total:
                return out
            try:
                header = _json_decode(bytes(self.buf[HEAD.size : HEAD.size + hl]))
            except (msgspec.DecodeError, msgspec.ValidationError):
                del self.buf[:4]
                continue
            out.append((header, bytes(self.buf[HEAD.size + hl : total])))
            del self.buf[:total]


class GuestChannel:
    """One attach to one sandbox's agent. Use :meth:`call` or :meth:`open`."""

    def __init__(self, sandbox_id: str, stream: AttachedStdio) -> None:
        self.sandbox_id = sandbox_id
        self._stream = stream
        # Ids of a new attach never meet those of an earlier one whose commands the
        # agent may still be answering (after a worker restart or a restore).
        self._next_id = secrets.randbelow(1 << 48) << 4
        self._routes: dict[int, MemoryObjectSendStream[Frame]] = {}
        self._write_lock = anyio.Lock()
        self.closed = False
        self.has_agent: bool | None = None
        self.known = anyio.Event()
        self.info: dict[str, Any] = {}

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def read_loop(self) -> None:
        parser = FrameParser()
        try:
            while True:
                data = await self._stream.read()
                if data is None:
                    break
                for header, payload in parser.feed(data):
                    await self._route(header, payload)
                if parser.noagent and self.has_agent is None:
                    self.has_agent = False
                    self.known.set()
        except Exception as exc:  # the attach broke: the next use re-attaches
            log.info("guest channel lost: %s", exc, extra={"sandbox_id": self.sandbox_id})
        finally:
            self.close()

    async def _route(self, header: dict[str, Any], payload: bytes) -> None:
        rid = int(header.get("id") or 0)
        if rid == 0:
            if header.get("t") == "ready" and self.has_agent is None:
                self.has_agent = True
                self.info = header
                self.known.set()
            return
        route = self._routes.get(rid)
        if route is None:
            return
        try:
            await route.send((header, payload))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._routes.pop(rid, None)
        if header.get("t") in ("exit", "error") or (
            header.get("t") == "result" and not getattr(route, "_hotbed_stream", False)
        ):
            self._routes.pop(rid, None)
            route.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.has_agent is None:
            self.known.set()
        for route in self._routes.values():
            route.close()
        self._routes.clear()
        self._stream.abort()

    async def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        if self.closed:
            raise SandboxNotRunning("guest channel closed", sandbox_id=self.sandbox_id)
        data = encode_frame(header, payload)
        async with self._write_lock:
            try:
                await self._stream.write(data)
            except Exception as exc:
                self.close()
                raise SandboxNotRunning(
                    f"guest channel broke: {exc}", sandbox_id=self.sandbox_id
                ) from None

    @asynccontextmanager
    async def open(
        self, header: dict[str, Any], payload: bytes = b"", *, streaming: bool = True
    ) -> AsyncIterator[tuple[int, MemoryObjectReceiveStream[Frame]]]:
        """Send a request; yield its channel id and the stream of its frames (which ends
        after its exit/error frame)."""
        rid = self._new_id()
        send, recv = anyio.create_memory_object_stream[Frame](PER_REQUEST_FRAMES)
        send._hotbed_stream = streaming  # type: ignore[attr-defined]
        self._routes[rid] = send
        try:
            await self.send({**header, "id": rid}, payload)
            with recv:
                yield rid, recv
        finally:
            route = self._routes.pop(rid, None)
            if route is not None:
                route.close()

    async def call(
        self, header: dict[str, Any], payload: bytes = b"", *, timeout: float = 30.0
    ) -> Frame:
        """A request with one ``result`` frame; ``error`` frames raise typed errors."""
        with anyio.fail_after(timeout):
            async with self.open(header, payload, streaming=False) as (_rid, frames):
                async for h, p in frames:
                    if h.get("t") == "error":
                        raise guest_error(h, self.sandbox_id)
                    return h, p
        raise SandboxNotRunning(
            f"sandbox {self.sandbox_id}: agent went away mid-request", sandbox_id=self.sandbox_id
        )


class GuestManager:
    """The channels of one worker's sandboxes; their reader tasks live in :meth:`run`."""

    def __init__(self, attach: Callable[[str], Awaitable[AttachedStdio | None]]) -> None:
        self._attach_stdio = attach
        self._channels: dict[str, GuestChannel] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._tg: TaskGroup | None = None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._tg = None
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()

    def forget(self, sandbox_id: str) -> None:
        ch = self._channels.pop(sandbox_id, None)
        self._locks.pop(sandbox_id, None)
        if ch is not None:
            ch.close()

    def prepare(self, sandbox_id: str) -> None:
        """Attach in the background now, so the first command finds the agent ready."""
        if self._tg is not None and sandbox_id not in self._channels:
            self._tg.start_soon(self._prepare_quietly, sandbox_id)

    async def _prepare_quietly(self, sandbox_id: str) -> None:
        try:
            await self.channel(sandbox_id)
        except Exception as exc:
            log.debug("guest attach failed: %s", exc, extra={"sandbox_id": sandbox_id})

    async def channel(self, sandbox_id: str) -> GuestChannel | None:
        """The sandbox's live channel to its agent, or None if its image (or the
        runtime) has none."""
        ch = self._channels.get(sandbox_id)
        if ch is not None and not ch.closed and ch.known.is_set():
            return ch if ch.has_agent else None
        lock = self._locks.setdefault(sandbox_id, anyio.Lock())
        async with lock:
            ch = self._channels.get(sandbox_id)
            if ch is None or ch.closed:
                ch = await self._attach(sandbox_id)
                if ch is None:
                    return None
            with anyio.move_on_after(HELLO_TIMEOUT_S):
                await ch.known.wait()
            if ch.has_agent is None or ch.closed:
                ch.close()
                self._channels.pop(sandbox_id, None)
                raise RuntimeFailure(
                    f"sandbox {sandbox_id}: guest agent did not answer", sandbox_id=sandbox_id
                )
            return ch if ch.has_agent else None

    async def _attach(self, sandbox_id: str) -> GuestChannel | None:
        if self._tg is None:
            raise RuntimeFailure("guest manager is not running", sandbox_id=sandbox_id)
        stream = await self._attach_stdio(sandbox_id)
        if stream is None:
            return None
        ch = GuestChannel(sandbox_id, stream)
        self._channels[sandbox_id] = ch
        self._tg.start_soon(ch.read_loop)
        # The agent answers hello with "ready" semantics; the no-agent shell answers
        # the trailing newline with its marker.
        hello_id = ch._new_id()
        send, recv = anyio.create_memory_object_stream[Frame](1)
        ch._routes[hello_id] = send
        self._tg.start_soon(self._await_hello, ch, recv)
        await ch.send({"t": "hello", "id": hello_id}, b"")
        await ch._stream.write(b"\n")
        return ch

    async def _await_hello(self, ch: GuestChannel, recv: MemoryObjectReceiveStream[Frame]) -> None:
        with recv:
            async for header, _payload in recv:
                if header.get("t") == "result" and ch.has_agent is None:
                    ch.has_agent = True
                    ch.info = header
                    ch.known.set()
                return
