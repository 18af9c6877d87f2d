"""Automatic pipelining: commands issued by concurrent tasks share round trips.

A scheduler placing hundreds of sandboxes at once, or a worker acknowledging and
answering hundreds of commands, would otherwise spend one round trip and one pooled
connection per task: at a few thousand requests a second that is most of the CPU, and a
connection per waiting task. :class:`AutoPipeline` queues each task's commands; one of
the waiting tasks (never a background task) takes the queue after one pass of the event
loop, sends it as one pipeline, hands every task its results, and passes the role on to
the next waiter. At most one pipeline per AutoPipeline is in flight, so everything
queued meanwhile goes in the next one.

A task's commands stay together and in order within one pipeline (not a transaction:
use a Lua script where atomicity matters). Lua scripts (:class:`Script`, the one way
hotbed runs Lua) go as EVALSHA; a script the server does not know yet is loaded and
its commands re-sent once.

Cancellation: a task cancelled while its commands are queued withdraws them; once they
are sent, the send finishes under a shield (bounded by the connection's socket
timeout) so the other tasks of that pipeline always get their results.

``for_client(redis)`` gives the one AutoPipeline of a Redis client, so independent
modules sharing a client also share its pipelines.

The wire path is lean on purpose (it carries every claim, placement, reply and ack):
the AutoPipeline keeps one connection of the client's pool checked out for its
pipelines (only one is in flight at a time), packs the batch with hiredis, writes it in
one call and reads the replies under one deadline (the connection's socket timeout) for
the whole batch, instead of redis-py's per-pipeline pool checkout, per-reply timeout
context and write-timeout task. A connection that fails or times out is dropped and the
batch retried by the client's retry policy, as redis-py's own pipelines do. Replies go
through the client's response callbacks, so they read as redis-py's would.

:class:`Coalescer` goes one step further for commands that take many arguments: values
added by concurrent tasks in one pass of the event loop go to one call (a stream's
acknowledgements become one XACK and one XDEL).
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel
import hiredis
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.connection import AbstractConnection

Command = tuple[Any, ...]
T = TypeVar("T")

MAX_BATCH_COMMANDS = 2000


def script_sha(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()


# sha -> source of every Script made in this process, so a pipeline that meets NOSCRIPT
# (a server restarted or flushed since) can load it, whoever queued the call.
_SOURCES: dict[str, str] = {}


class Script:
    """A Lua script, and the one way hotbed runs Lua.

    ``await script.run(redis, keys, args)`` runs it alone; ``script.call(keys, args)`` is
    its command for :meth:`AutoPipeline.execute`, to send it in one round trip with
    other commands. Either way it goes as EVALSHA through the client's auto-pipeline,
    and a server that does not know it yet gets it loaded and the call re-sent once.
    """

    __slots__ = ("source", "sha")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = script_sha(source)
        _SOURCES[self.sha] = source

    def call(self, keys: Sequence[Any], args: Sequence[Any] = ()) -> Command:
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    async def run(self, redis: aioredis.Redis, keys: Sequence[Any], args: Sequence[Any] = ()) -> Any:
        """Run the script (auto-pipelined with this client's other commands); its reply."""
        (reply,) = raise_first_error(await for_client(redis).execute(self.call(keys, args)))
        return reply


class _Item:
    __slots__ = ("commands", "results", "error", "done", "event")

    def __init__(self, commands: tuple[Command, ...]) -> None:
        self.commands = commands
        self.results: list[Any] = []
        self.error: BaseException | None = None
        self.done = False
        # Made only when the task has to wait for another task's pipeline.
        self.event: anyio.Event | None = None


class AutoPipeline:
    def __init__(self, redis: aioredis.Redis, *, max_batch: int = MAX_BATCH_COMMANDS) -> None:
        self.redis = redis
        self.max_batch = max_batch
        self._queue: deque[_Item] = deque()
        self._busy = False
        self._conn: AbstractConnection | None = None
        # Command name (as callers spell it) -> the client's response callback, or None.
        self._callbacks: dict[Any, Any] = {}
        self.round_trips = 0
        self.commands_sent = 0

    async def execute(self, *commands: Command) -> list[Any]:
        """Send ``commands`` (``("HSET", key, f, v)``, ``script.call(...)``) in order, in
        a pipeline shared with other tasks; return their replies. A command that failed
        gives its exception object in place of a reply (a failed connection raises)."""
        item = _Item(commands)
        self._queue.append(item)
        try:
            while not item.done:
                if not self._busy:
                    self._busy = True
                    try:
                        await self._flush()
                    finally:
                        self._busy = False
                        self._wake_next()
                else:
                    item.event = anyio.Event()
                    await item.event.wait()
                    item.event = None
        except BaseException:
            if not item.done:
                try:
                    self._queue.remove(item)
                except ValueError:
                    pass
                if not self._busy:
                    self._wake_next()
            raise
        if item.error is not None:
            raise item.error
        return item.results

    def _wake_next(self) -> None:
        if self._queue and self._queue[0].event is not None:
            self._queue[0].event.set()

    async def _flush(self) -> None:
        # One pass of the event loop: tasks made ready together queue together.
        await anyio.lowlevel.checkpoint()
        batch: list[_Item] = []
        n = 0
        while self._queue and (not batch or n + len(self._queue[0].commands) <= self.max_batch):
            it = self._queue.popleft()
            batch.append(it)
            n += len(it.commands)
        if not batch:
            return
        with anyio.CancelScope(shield=True):
            try:
                await self._send(batch)
            except Exception as exc:  # noqa: BLE001 - handed to every waiter of the batch
                for it in batch:
                    it.error = exc
            for it in batch:
                it.done = True
                if it.event is not None:
                    it.event.set()

    async def _send(self, batch: list[_Item]) -> None:
        flat = [c for it in batch for c in it.commands]
        results = await self._pipeline(flat)
        retry = [i for i, r in enumerate(results) if _noscript(r)]
        if retry:
            async with self.redis.pipeline(transaction=False) as pipe:
                for sha in {flat[i][1] for i in retry}:
                    pipe.script_load(_SOURCES[sha])
                await pipe.execute()
            again = await self._pipeline([flat[i] for i in retry])
            for i, r in zip(retry, again, strict=True):
                results[i] = r
        pos = 0
        for it in batch:
            it.results = results[pos : pos + len(it.commands)]
            pos += len(it.commands)

    async def _pipeline(self, commands: list[Command]) -> list[Any]:
        self.round_trips += 1
        self.commands_sent += len(commands)
        conn = self._conn
        if conn is None:
            # Kept checked out: the client's aclose() disconnects in-use connections too.
            conn = self._conn = await self.redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        replies = await exchange(conn, commands)
        callbacks = self._callbacks
        for i, c in enumerate(commands):
            reply = replies[i]
            if isinstance(reply, Exception):
                continue
            cb = callbacks.get(c[0], _UNKNOWN)
            if cb is _UNKNOWN:
                cb = callbacks[c[0]] = self.redis.response_callbacks.get(
                    c[0].decode() if isinstance(c[0], bytes) else c[0]
                )
            if cb is not None:
                replies[i] = cb(reply)
        return replies

async def exchange(conn: AbstractConnection, commands: list[Command]) -> list[Any]:
    """Send ``commands`` on ``conn`` in one write and return their raw replies (a
    command that failed gives its ResponseError), all under one deadline: the
    connection's socket timeout. A connection that fails is dropped and the exchange
    retried by its retry policy (as redis-py's pipelines are); one cancelled mid-way
    is dropped, so it never carries a stale reply into its next use."""
    packed = [hiredis.pack_command(c) for c in commands]

    async def drop(error: Exception) -> None:
        await conn.disconnect(nowait=True)

    replies: list[Any] = await conn.retry.call_with_retry(lambda: _exchange(conn, packed), drop)
    return replies


async def _exchange(conn: AbstractConnection, packed: list[bytes]) -> list[Any]:
    """Write ``packed`` and read one reply each, all under one deadline."""
    timeout = conn.socket_timeout or None
    try:
        with anyio.fail_after(timeout):
            reader = conn._reader  # noqa: SLF001 - is the kept connection still open?
            if conn.is_connected and reader is not None and reader.at_eof():
                # The server closed it while it sat idle (Redis restarted): a new one,
                # rather than a batch lost on a dead socket.
                await conn.disconnect(nowait=True)
            if not conn.is_connected:
                await conn.connect()  # type: ignore[no-untyped-call]
            await conn.check_health()  # type: ignore[no-untyped-call]
            writer = conn._writer  # noqa: SLF001 - one write for the batch
            assert writer is not None
            writer.writelines(packed)
            await writer.drain()
            out: list[Any] = []
            for _ in packed:
                try:
                    out.append(await conn.read_response(timeout=math.inf))
                except redis_errors.ResponseError as exc:
                    out.append(exc)
            return out
    except TimeoutError:
        await conn.disconnect(nowait=True)
        raise redis_errors.TimeoutError(f"no reply from Redis within {timeout}s") from None
    except OSError as exc:
        await conn.disconnect(nowait=True)
        raise redis_errors.ConnectionError(f"Redis connection failed: {exc}") from exc
    except BaseException:
        # Cancelled or failed mid-batch: the connection's replies are out of step.
        await conn.disconnect(nowait=True)
        raise


_UNKNOWN = object()


def _noscript(result: Any) -> bool:
    return isinstance(result, redis_errors.NoScriptError) or (
        isinstance(result, redis_errors.ResponseError) and str(result).startswith("NOSCRIPT")
    )


_by_client: weakref.WeakKeyDictionary[aioredis.Redis, AutoPipeline] = weakref.WeakKeyDictionary()


def for_client(redis: aioredis.Redis) -> AutoPipeline:
    """The AutoPipeline shared by everything that uses ``redis``."""
    ap = _by_client.get(redis)
    if ap is None:
        ap = _by_client[redis] = AutoPipeline(redis)
    return ap


def raise_first_error(results: list[Any]) -> list[Any]:
    """``results`` unless one of them is an exception, which is raised."""
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results


class _Round(Generic[T]):
    __slots__ = ("values", "led", "event", "error")

    def __init__(self) -> None:
        self.values: list[T] = []
        self.led = False
        self.event = anyio.Event()
        self.error: BaseException | None = None


class Coalescer(Generic[T]):
    """Hands ``flush`` the values added by all tasks during one pass of the event loop.

    The first task to add in a round leads it: it lets the loop run once, closes the
    round and flushes it (shielded, so its followers are never stranded); the others
    wait for that flush and see its error, if any.
    """

    def __init__(self, flush: Callable[[list[T]], Awaitable[None]]) -> None:
        self._flush = flush
        self._round: _Round[T] = _Round()

    async def add(self, *values: T) -> None:
        rnd = self._round
        rnd.values.extend(values)
        if rnd.led:
            await rnd.event.wait()
        else:
            rnd.led = True
            with anyio.CancelScope(shield=True):
                await anyio.lowlevel.checkpoint()
                self._round = _Round()
                try:
                    await self._flush(rnd.values)
                except Exception as exc:  # noqa: BLE001 - handed to every follower
                    rnd.error = exc
                finally:
                    rnd.event.set()
        if rnd.error is not None:
            raise rnd.error
