"""Exposed ports: a TCP address on the worker for a port inside a sandbox.

``ExposePort`` makes the worker listen on ``port_bind`` (a free port, the same one
for the same sandbox port until the sandbox ends); each connection accepted there
becomes a tunnel over the sandbox's guest channel: the guest agent connects to
``127.0.0.1:PORT`` inside the sandbox and both relay bytes. Nothing goes through
the sandbox's network, so this works with ``network="none"``; it serves HTTP or any
other TCP protocol alike.

Flow control is by credit, end to end: the guest sends at most ``WINDOW_FRAMES``
frames (and ``WINDOW_BYTES``) of a connection's data before the worker acknowledges
them, which it does only once they are written to the client; the worker sends the
guest no more than the same window ahead of the guest's acknowledgements. So a slow
client or a slow server holds at most a window per connection here and in the
sandbox, and a connection's frames never back up into the guest channel's reader
(which serves every other request of the sandbox too).

Bounds: ``MAX_PORTS_PER_SANDBOX`` exposed ports; each open connection takes one of
the worker's long-lived slots (``slots``), so tunnels count against the same limits
as terminals and watches; past them a new connection is closed at once.

Listeners close with the sandbox (:meth:`PortTunnels.forget`, called by
:meth:`SandboxTable.end <workers.sandboxes.SandboxTable.end>`) and with the worker;
a paused sandbox keeps its address and refuses connections until it resumes.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from functools import partial
from typing import Any, Protocol

import anyio
from anyio.abc import TaskGroup

from hotbed.errors import HotbedError, InvalidRequest, Overloaded, UnsupportedRequest
from hotbed.protocol import Envelope, ExposePort, PortExposed, Reply
from workers import sandboxes
from workers.guest.channel import GuestChannel, GuestManager
from workers.sandboxes import SandboxTable

log = logging.getLogger(__name__)

MAX_PORTS_PER_SANDBOX = 16
# Credit window of one connection, each way (the guest agent's TUNNEL_FRAMES and
# TUNNEL_WINDOW are the same numbers).
WINDOW_FRAMES = 8
WINDOW_BYTES = 1 << 20
READ_BYTES = 256 << 10
CONNECT_TIMEOUT_S = 10.0

# A long-lived slot for one connection of a sandbox; raises Overloaded when none is free.
Slots = Callable[[str], AbstractContextManager[None]]


class Guests(Protocol):
    """Whoever keeps the sandboxes' guest channels (the execution service)."""

    @property
    def guests(self) -> GuestManager | None: ...


class GuestHooks(Protocol):
    def prepare(self, sandbox_id: str) -> None: ...

    def forget(self, sandbox_id: str) -> None: ...


def listen(host: str) -> socket.socket:
    """A non-blocking TCP listener on a free port of ``host``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def serve(listener: socket.socket, handle: Callable[[socket.socket], Awaitable[None]]) -> None:
    """Accept connections on ``listener`` until cancelled; each is handled in its own
    task and closed after. Raw sockets, not anyio's streams: those read ahead into an
    unbounded buffer, which would defeat the tunnels' flow control."""
    async with anyio.create_task_group() as tg:
        while True:
            await anyio.wait_readable(listener)
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tg.start_soon(_handled, handle, conn)


async def _handled(handle: Callable[[socket.socket], Awaitable[None]], conn: socket.socket) -> None:
    with conn:
        await handle(conn)


async def recv(sock: socket.socket, max_bytes: int) -> bytes:
    """What the peer sent (b"" at its end of stream), read only when asked for."""
    while True:
        try:
            return sock.recv(max_bytes)
        except (BlockingIOError, InterruptedError):
            await anyio.wait_readable(sock)


async def send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except (BlockingIOError, InterruptedError):
            await anyio.wait_writable(sock)


class _Exposed:
    """One listening port of one sandbox."""

    def __init__(self, sandbox_id: str, port: int, listener: socket.socket) -> None:
        self.sandbox_id = sandbox_id
        self.port = port
        self.listener = listener
        self.scope = anyio.CancelScope()
        self.host_port = int(listener.getsockname()[1])


class PortTunnels:
    """The exposed ports of one worker's sandboxes; listeners and tunnels run in :meth:`run`."""

    def __init__(
        self, table: SandboxTable, channels: Guests, *, slots: Slots,
        bind: str = "127.0.0.1", advertise: str = "",
    ) -> None:
        self.table = table
        self._channels = channels
        self._slots = slots
        self.bind = bind
        # The host clients are told: the bind address unless that is a wildcard.
        self.advertise = advertise or (bind if bind not in ("0.0.0.0", "::", "") else "127.0.0.1")
        self._exposed: dict[str, dict[int, _Exposed]] = {}
        self._tg: TaskGroup | None = None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._tg = None
            self._exposed.clear()

    # ---------------------------------------------------------------- verbs

    async def expose(self, env: Envelope) -> Reply:
        body = env.body
        assert isinstance(body, ExposePort)
        sid, port = body.sandbox_id, body.port
        if not 1 <= port <= 65535:
            raise InvalidRequest(f"port must be in 1-65535, got {port}", sandbox_id=sid)
        await self.table.touch(sid)  # SandboxNotFound / SandboxNotRunning, typed
        held = self._exposed.get(sid, {})
        if port in held:
            return self._reply(held[port])
        if len(held) >= MAX_PORTS_PER_SANDBOX:
            raise Overloaded(
                f"sandbox {sid} has {MAX_PORTS_PER_SANDBOX} ports exposed already", sandbox_id=sid
            )
        if await self._channel_of(sid) is None:
            raise UnsupportedRequest(
                f"exposing a port needs the guest agent, and sandbox {sid}'s image has no python3",
                sandbox_id=sid,
            )
        if self._tg is None:
            raise HotbedError("the port service is not running", sandbox_id=sid)
        # The sandbox may have ended while we asked for its channel.
        await self.table.touch(sid)
        if port in self._exposed.get(sid, {}):
            return self._reply(self._exposed[sid][port])
        listener = listen(self.bind)
        exposed = _Exposed(sid, port, listener)
        self._exposed.setdefault(sid, {})[port] = exposed
        self._tg.start_soon(self._serve, exposed)
        log.info("port %d exposed at %s:%d", port, self.advertise, exposed.host_port,
                 extra={"sandbox_id": sid})
        return self._reply(exposed)

    def _reply(self, exposed: _Exposed) -> PortExposed:
        return PortExposed(
            sandbox_id=exposed.sandbox_id, port=exposed.port, host=self.advertise,
            host_port=exposed.host_port,
        )

    def exposed(self, sandbox_id: str) -> dict[int, int]:
        """Sandbox port -> worker port, for the sandbox's exposed ports."""
        return {p: e.host_port for p, e in self._exposed.get(sandbox_id, {}).items()}

    async def _channel_of(self, sandbox_id: str) -> GuestChannel | None:
        """The sandbox's guest channel; None when it has no guest agent."""
        manager = self._channels.guests
        return None if manager is None else await manager.channel(sandbox_id)

    # GuestHooks: told when a sandbox ends (SandboxTable.end).

    def prepare(self, sandbox_id: str) -> None:
        pass

    def forget(self, sandbox_id: str) -> None:
        """Close the sandbox's listeners and its open connections."""
        for exposed in self._exposed.pop(sandbox_id, {}).values():
            exposed.scope.cancel()

    # ------------------------------------------------------------ serving

    async def _serve(self, exposed: _Exposed) -> None:
        sid = exposed.sandbox_id
        with exposed.scope, exposed.listener:
            try:
                await serve(exposed.listener, partial(self._connection, exposed))
            except OSError as exc:
                log.warning("port %d listener failed: %s", exposed.port, exc, extra={"sandbox_id": sid})
            finally:
                held = self._exposed.get(sid, {})
                if held.get(exposed.port) is exposed:
                    del held[exposed.port]

    async def _connection(self, exposed: _Exposed, client: socket.socket) -> None:
        sid = exposed.sandbox_id
        local = self.table.get(sid)
        if local is None or local.paused:
            return
        try:
            with self._slots(sid):
                ch = await self._channel_of(sid)
                if ch is not None:
                    await Tunnel(ch, exposed.port, client).run()
        except HotbedError as exc:
            log.info("port %d: connection refused: %s", exposed.port, exc, extra={"sandbox_id": sid})


def chain(channels: sandboxes.GuestHooks, *others: GuestHooks) -> sandboxes.GuestHooks:
    """The sandbox table's guest hooks: ``channels`` (the guest channels' keeper, which
    alone knows when one is ready) and ``others`` told of each start and end too."""
    return _Chain(channels, others)


class _Chain:
    def __init__(self, channels: sandboxes.GuestHooks, others: tuple[GuestHooks, ...]) -> None:
        self.channels = channels
        self.others = others

    def prepare(self, sandbox_id: str) -> None:
        self.channels.prepare(sandbox_id)
        for h in self.others:
            h.prepare(sandbox_id)

    async def wait_ready(self, sandbox_id: str, *, warm_up: bool = False) -> None:
        await self.channels.wait_ready(sandbox_id, warm_up=warm_up)

    def forget(self, sandbox_id: str) -> None:
        self.channels.forget(sandbox_id)
        for h in self.others:
            h.forget(sandbox_id)


# What ends one side of a tunnel: the client, the channel or the sandbox went away.
_GONE = (HotbedError, OSError, anyio.BrokenResourceError, anyio.ClosedResourceError)


class Tunnel:
    """One accepted connection relayed to ``127.0.0.1:port`` in the sandbox.

    Three tasks: the guest's frames routed (data to a queue no deeper than the window,
    acknowledgements to the sender's credit); the queue written to the client, each
    frame acknowledged once written; the client's bytes sent to the guest within the
    credit. The tunnel ends when the guest ends it (both sides closed, or an error)
    and the queue is written, or at once when the client or the channel breaks."""

    def __init__(self, ch: GuestChannel, port: int, client: socket.socket) -> None:
        self.ch = ch
        self.port = port
        self.client = client
        # Our frames (and bytes) the guest has not acknowledged yet, and a wake-up for
        # the sender when it does.
        self._sent_frames = 0
        self._sent_bytes = 0
        self._credit = anyio.Event()

    async def run(self) -> None:
        ch = self.ch
        async with ch.open({"t": "tunnel", "port": self.port}) as (gid, frames):
            try:
                with anyio.fail_after(CONNECT_TIMEOUT_S):
                    header, _ = await frames.receive()
                if header.get("t") != "result":
                    log.info("port %d: %s", self.port, header.get("message", header.get("t")),
                             extra={"sandbox_id": ch.sandbox_id})
                    return
                send, recv = anyio.create_memory_object_stream[bytes | None](WINDOW_FRAMES + 2)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._guarded, tg, self._upstream, gid)
                    tg.start_soon(self._guarded, tg, self._to_client, gid, recv, tg)
                    with send:
                        await self._from_guest(frames, send)
            except (anyio.EndOfStream, TimeoutError):
                pass
            finally:
                if not ch.closed:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                        try:
                            await ch.send({"t": "tunnel_close", "id": 0, "target": gid})
                        except HotbedError:
                            pass

    @staticmethod
    async def _guarded(tg: TaskGroup, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        try:
            await fn(*args)
        except _GONE:
            tg.cancel_scope.cancel()

    async def _from_guest(self, frames: Any, to_client: Any) -> None:
        """Route the guest's frames; returns when the tunnel ends on its side."""
        async for header, payload in frames:
            t = header.get("t")
            try:
                if t == "out":
                    to_client.send_nowait(payload)
                elif t == "eof":
                    to_client.send_nowait(None)
            except anyio.WouldBlock:
                # More than the window: the sandbox does not keep the protocol.
                log.warning("port %d: tunnel over its window; closed", self.port,
                            extra={"sandbox_id": self.ch.sandbox_id})
                return
            if t == "ack":
                self._sent_frames = max(0, self._sent_frames - 1)
                self._sent_bytes = max(0, self._sent_bytes - int(header.get("n") or 0))
                self._credit.set()
            elif t in ("exit", "error"):
                return

    async def _to_client(self, gid: int, recv: Any, tg: TaskGroup) -> None:
        with recv:
            async for data in recv:
                if data is None:
                    self.client.shutdown(socket.SHUT_WR)
                    continue
                await send_all(self.client, data)
                await self.ch.send({"t": "tunnel_ack", "id": 0, "target": gid, "n": len(data)})
        # The guest ended the tunnel and everything it sent is written.
        tg.cancel_scope.cancel()

    async def _upstream(self, gid: int) -> None:
        """Client -> guest, within the credit the guest's acknowledgements give."""
        while True:
            while self._sent_frames >= WINDOW_FRAMES or self._sent_bytes >= WINDOW_BYTES:
                self._credit = anyio.Event()
                await self._credit.wait()
            data = await recv(self.client, READ_BYTES)
            if not data:
                await self.ch.send({"t": "tunnel_data", "id": 0, "target": gid, "eof": True})
                return
            self._sent_frames += 1
            self._sent_bytes += len(data)
            await self.ch.send({"t": "tunnel_data", "id": 0, "target": gid}, data)
