"""The worker's side of the guest agent: one persistent channel per sandbox.

The guest agent (:mod:`workers.guest.agent`) is the container's main process; the
channel is its stdin/stdout, attached through the runtime (:meth:`Runtime.attach
<workers.runtimes.base.Runtime.attach>`, a ``docker attach`` for the docker runtime),
opened once and kept, so a command is one frame each way instead of a ``docker exec``
setup (~80-100 ms here). After a worker restart or a checkpoint/restore the next use
simply attaches again: the agent keeps its state (sessions, background processes) and
answers ``hello`` on the new attach.

Images without python3 run a shell that answers every line with ``HOTBED-NOAGENT``:
the channel reports ``has_agent = False`` and the worker keeps the ``docker exec`` path.

Flow control: one reader task per channel routes frames into small bounded streams,
one per request; a consumer that cannot keep up (Redis slower than the command)
blocks the reader, the attach socket fills, the agent stops reading its children and
their writes block. Nothing on the way buffers more than a few frames (and the
runtime's read buffer, which it bounds itself).

Limits: the sandbox's own code runs as the agent's uid and, under gVisor, can write to
the agent's stdout (``/proc/1/fd/1``) even though the agent makes itself undumpable,
so nothing read from the channel is trusted. A header over ``MAX_HEADER_BYTES``, a
payload over ``MAX_PAYLOAD_BYTES``, or over what the request asked for (a file read's
length, one pipe read for output) is a :class:`FrameViolation`: the worker drops the
channel before buffering any of it and ends the sandbox.
"""

from __future__ import annotations

import logging
import secrets
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from hotbed.errors import HotbedError, RuntimeFailure, SandboxNotRunning, error_class
from hotbed.protocol import MAX_FILE_BYTES, SPAWN_FIFO
from workers.runtimes.base import AttachedStdio

log = logging.getLogger(__name__)

MAGIC = b"HBG1"
HEAD = struct.Struct(">4sII")
NOAGENT = b"HOTBED-NOAGENT"
ATTACH_TIMEOUT_S = 30.0
HELLO_TIMEOUT_S = 60.0
# Frames buffered per request before the reader waits for its consumer.
PER_REQUEST_FRAMES = 8

GUEST_SOURCE = (Path(__file__).with_name("agent.py")).read_text()

# ``Runtime.attach``: the sandbox's main process's stdio, or None where the runtime has
# no guest agent.
Attach = Callable[[str], Awaitable[AttachedStdio | None]]
# Told (sandbox id, why) when a sandbox breaks its channel's frame limits.
Violation = Callable[[str, str], Coroutine[Any, Any, None]]


def guest_command(idle_cmd: list[str]) -> list[str]:
    """PID 1 of a docker sandbox: the guest agent where the image has python3; else the
    runtime's idle shell (``idle_cmd``, a ``sh -c`` script), plus a reader that answers
    every line written to stdin with ``HOTBED-NOAGENT`` (so the worker knows at once).

    The agent's source is a here-document on fd 3 of one ``python3 -I -c BOOT FIFO``:
    BOOT reads and runs it, so ``ps`` shows BOOT and the spawner's FIFO path (which the
    agent cannot import), never the source, and Python starts once. (Passing the source
    as ``-c SOURCE`` hid it only by a re-exec from a memfd: a second interpreter start and
    compile, 0.2-0.5 s of every cold start under gVisor.) The here-document is the shell
    script's own text, gone from PID 1 with the ``exec``; the fallback re-execs as
    ``sh -c <idle script>``."""
    fallback = (
        f"exec 3<&0; (while read -r _l <&3; do echo {NOAGENT.decode()}; done) & " + idle_cmd[-1]
    )
    return ["/bin/sh", "-c", _AGENT_SCRIPT, GUEST_BOOT, fallback, SPAWN_FIFO]


# The agent's entry point, as ``ps`` shows it: the source from fd 3, run as __main__
# with ``sys.argv`` = ["hotbed-guest-agent", FIFO].
# Nothing of the loader stays behind: the file object (and with it fd 3) and the source
# are dropped as soon as compile() has them.
GUEST_BOOT = (
    "import os,sys;sys.argv[:]=['hotbed-guest-agent',*sys.argv[1:]];"
    "exec(compile(os.fdopen(3,'rb').read(),'hotbed-guest-agent','exec'))"
)
_HEREDOC_END = "HOTBED_GUEST_AGENT_SOURCE_END"
assert _HEREDOC_END not in GUEST_SOURCE
_AGENT_SCRIPT = (
    f'if command -v python3 >/dev/null 2>&1; then exec python3 -I -c "$0" "$2" 3<<\'{_HEREDOC_END}\'\n'
    + GUEST_SOURCE.rstrip("\n") + f"\n{_HEREDOC_END}\nfi; exec /bin/sh -c \"$1\""
)


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


class FrameViolation(Exception):
    """The agent's stdout broke the frame limits: the sandbox is no longer trusted to
    speak the protocol (its code can write to the agent's stdout)."""


# Limits on what the worker buffers of one frame. Headers carry directory listings and
# watch events (tens of bytes per entry), payloads at most a file read (MAX_FILE_BYTES).
MAX_HEADER_BYTES = 8 << 20
MAX_PAYLOAD_BYTES = MAX_FILE_BYTES + (1 << 20)
# An ``out`` frame carries one read of a child's pipe (the agent's READ_CHUNK).
MAX_OUT_BYTES = 1 << 20

# How much payload a frame may carry given its header: an int, or None to skip the
# payload unread (a frame nobody waits for).
PayloadLimit = Callable[[dict[str, Any]], int | None]


class FrameParser:
    """Splits the agent's stdout into frames; resynchronises on the magic.

    Holds at most one frame's header (``MAX_HEADER_BYTES``) and the payload its
    ``limit`` allows; a frame claiming more raises :class:`FrameViolation` before any
    of it is buffered."""

    def __init__(self, limit: PayloadLimit | None = None) -> None:
        self.buf = bytearray()
        self.noagent = False
        self._limit = limit
        # Payload bytes still to drop (a frame with no reader), and the header being
        # read once its length is known.
        self._skip = 0
        self._header: dict[str, Any] | None = None
        self._payload_len = 0

    def feed(self, data: bytes) -> list[Frame]:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        self.buf += data
        out: list[Frame] = []
        while True:
            if self._skip:
                n = min(self._skip, len(self.buf))
                self._skip -= n
                del self.buf[:n]
                if self._skip:
                    return out
            if self._header is not None:
                if len(self.buf) < self._payload_len:
                    return out
                out.append((self._header, bytes(self.buf[: self._payload_len])))
                del self.buf[: self._payload_len]
                self._header = None
                continue
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
            if hl > MAX_HEADER_BYTES:
                raise FrameViolation(f"frame header of {hl} bytes (limit {MAX_HEADER_BYTES})")
            if pl > MAX_PAYLOAD_BYTES:
                raise FrameViolation(f"frame payload of {pl} bytes (limit {MAX_PAYLOAD_BYTES})")
            if len(self.buf) < HEAD.size + hl:
                return out
            try:
                header = _json_decode(bytes(self.buf[HEAD.size : HEAD.size + hl]))
            except (msgspec.DecodeError, msgspec.ValidationError):
                del self.buf[:4]
                continue
            del self.buf[: HEAD.size + hl]
            allowed = MAX_PAYLOAD_BYTES if self._limit is None else self._limit(header)
            if allowed is None:
                self._skip = pl
                continue
            if pl > allowed:
                raise FrameViolation(
                    f"{header.get('t')!r} frame with a {pl}-byte payload where at most "
                    f"{allowed} was asked for"
                )
            self._header, self._payload_len = header, pl


class GuestChannel:
    """One attach to one sandbox's agent. Use :meth:`call` or :meth:`open`."""

    def __init__(
        self, sandbox_id: str, stdio: AttachedStdio, *,
        on_violation: Callable[[str, str], None] | None = None,
    ) -> None:
        self.sandbox_id = sandbox_id
        self._stdio = stdio
        self._on_violation = on_violation
        # Ids of a new attach never meet those of an earlier one whose commands the
        # agent may still be answering (after a worker restart or a restore).
        self._next_id = secrets.randbelow(1 << 48) << 4
        self._routes: dict[int, MemoryObjectSendStream[Frame]] = {}
        # The payload a request's ``result`` frame may carry (what the worker asked for).
        self._result_limits: dict[int, int] = {}
        self._write_lock = anyio.Lock()
        self.closed = False
        self.has_agent: bool | None = None
        self.known = anyio.Event()
        self.info: dict[str, Any] = {}

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _payload_limit(self, header: dict[str, Any]) -> int | None:
        rid = header.get("id")
        if not isinstance(rid, int) or (rid and rid not in self._routes):
            # Nobody waits for it (a request of an earlier attach): dropped unread.
            return None if rid else 0
        t = header.get("t")
        if t == "result":
            return self._result_limits.get(rid, MAX_PAYLOAD_BYTES)
        return MAX_OUT_BYTES

    async def read_loop(self) -> None:
        parser = FrameParser(self._payload_limit)
        try:
            while True:
                chunk = await self._stdio.read()
                if chunk is None:
                    break
                for header, payload in parser.feed(chunk):
                    await self._route(header, payload)
                if parser.noagent and self.has_agent is None:
                    self.has_agent = False
                    self.known.set()
        except FrameViolation as exc:
            log.warning(
                "guest channel violated the frame limits, dropping it: %s", exc,
                extra={"sandbox_id": self.sandbox_id},
            )
            self.close()
            if self._on_violation is not None:
                self._on_violation(self.sandbox_id, str(exc))
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
        self._result_limits.clear()
        self._stdio.abort()

    async def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        if self.closed:
            raise SandboxNotRunning("guest channel closed", sandbox_id=self.sandbox_id)
        data = encode_frame(header, payload)
        async with self._write_lock:
            try:
                await self._stdio.write(data)
            except Exception as exc:
                self.close()
                raise SandboxNotRunning(
                    f"guest channel broke: {exc}", sandbox_id=self.sandbox_id
                ) from None

    @asynccontextmanager
    async def open(
        self, header: dict[str, Any], payload: bytes = b"", *, streaming: bool = True,
        max_payload: int | None = None,
    ) -> AsyncIterator[tuple[int, MemoryObjectReceiveStream[Frame]]]:
        """Send a request; yield its channel id and the stream of its frames (which ends
        after its exit/error frame). ``max_payload``: the most its ``result`` frame may
        carry; more breaks the channel (:class:`FrameViolation`)."""
        rid = self._new_id()
        send, recv = anyio.create_memory_object_stream[Frame](PER_REQUEST_FRAMES)
        send._hotbed_stream = streaming  # type: ignore[attr-defined]
        self._routes[rid] = send
        if max_payload is not None:
            self._result_limits[rid] = max_payload
        try:
            await self.send({**header, "id": rid}, payload)
            with recv:
                yield rid, recv
        finally:
            self._result_limits.pop(rid, None)
            route = self._routes.pop(rid, None)
            if route is not None:
                route.close()

    async def greet(self, tg: TaskGroup) -> None:
        """Find out what answers on the other end: the agent answers ``hello`` (and sets
        :attr:`known` with :attr:`has_agent` true); the no-agent shell answers the
        trailing newline with its marker. The answer is awaited in ``tg``."""
        hello_id = self._new_id()
        send, recv = anyio.create_memory_object_stream[Frame](1)
        self._routes[hello_id] = send
        tg.start_soon(self._await_hello, recv)
        await self.send({"t": "hello", "id": hello_id}, b"")
        await self._stdio.write(b"\n")

    async def _await_hello(self, recv: MemoryObjectReceiveStream[Frame]) -> None:
        with recv:
            async for header, _payload in recv:
                if header.get("t") == "result" and self.has_agent is None:
                    self.has_agent = True
                    self.info = header
                    self.known.set()
                return

    async def call(
        self, header: dict[str, Any], payload: bytes = b"", *, timeout: float = 30.0,
        max_payload: int | None = None,
    ) -> Frame:
        """A request with one ``result`` frame; ``error`` frames raise typed errors."""
        with anyio.fail_after(timeout):
            async with self.open(
                header, payload, streaming=False, max_payload=max_payload
            ) as (_rid, frames):
                async for h, p in frames:
                    if h.get("t") == "error":
                        raise guest_error(h, self.sandbox_id)
                    return h, p
        raise SandboxNotRunning(
            f"sandbox {self.sandbox_id}: agent went away mid-request", sandbox_id=self.sandbox_id
        )


class GuestManager:
    """The channels of one worker's sandboxes; their reader tasks live in :meth:`run`.

    ``attach`` is the runtime's :meth:`~workers.runtimes.base.Runtime.attach`: all this
    needs of a runtime, so it never sees how the stdio is reached."""

    def __init__(
        self, attach: Attach, *, on_violation: Violation | None = None,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self._attach_stdio = attach
        self._on_violation = on_violation
        # Told of a channel that ended while still this manager's: its sandbox may be
        # dead (a container that dies takes its attach with it), or only the attach.
        self._on_lost = on_lost
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

    def _violated(self, sandbox_id: str, reason: str) -> None:
        """A sandbox broke its channel's limits: end it (in this manager's task group)."""
        self._channels.pop(sandbox_id, None)
        if self._on_violation is not None and self._tg is not None:
            self._tg.start_soon(self._on_violation, sandbox_id, reason)

    def forget(self, sandbox_id: str) -> None:
        ch = self._channels.pop(sandbox_id, None)
        self._locks.pop(sandbox_id, None)
        if ch is not None:
            ch.close()

    def serving(self, sandbox_id: str) -> bool:
        """Whether the sandbox's channel is attached and its agent has answered."""
        ch = self._channels.get(sandbox_id)
        return ch is not None and not ch.closed and ch.known.is_set() and bool(ch.has_agent)

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
        """The sandbox's live channel to its agent, or None if it has none (its image
        lacks python3, or its runtime has no guest agent)."""
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

    async def _read(self, ch: GuestChannel) -> None:
        await ch.read_loop()
        # Still ours: nobody forgot it (an end, a pause) or replaced it, so it ended
        # from the other side.
        if self._channels.get(ch.sandbox_id) is ch and self._on_lost is not None:
            self._on_lost(ch.sandbox_id)

    async def _attach(self, sandbox_id: str) -> GuestChannel | None:
        if self._tg is None:
            raise RuntimeFailure("guest manager is not running", sandbox_id=sandbox_id)
        # SandboxNotRunning from the runtime (it cannot attach) reaches the caller as is.
        with anyio.fail_after(ATTACH_TIMEOUT_S):
            stdio = await self._attach_stdio(sandbox_id)
        if stdio is None:
            return None
        ch = GuestChannel(sandbox_id, stdio, on_violation=self._violated)
        self._channels[sandbox_id] = ch
        self._tg.start_soon(self._read, ch)
        await ch.greet(self._tg)
        return ch
