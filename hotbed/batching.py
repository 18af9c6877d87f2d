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
hotbed runs Lua) go as EVALSHA, loaded (SCRIPT LOAD) ahead of the first batch that uses
them; a server that lost them since (restarted, flushed) answers NOSCRIPT, and they are
loaded and their commands re-sent once.

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

On a Redis Cluster (hotbed.connection) the same machinery runs per node: every command
hotbed sends names its key first (a script, its first key; all keys of one script share
a hash tag), so each goes to the lane (queue + connection) of the primary that owns its
slot, and scripts are loaded per node on NOSCRIPT. A task's commands that span nodes go
as consecutive runs, one after the other, so they still apply in order; MOVED, ASK and
a lost node are followed (see ``AutoPipeline._follow``).

:class:`Coalescer` goes one step further for commands that take many arguments: values
added by concurrent tasks in one pass of the event loop go to one call (a stream's
acknowledgements become one XACK and one XDEL).
"""

from __future__ import annotations

import functools
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
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

from hotbed.connection import COMMAND_TIMEOUT_S, is_cluster

Command = tuple[Any, ...]
T = TypeVar("T")

MAX_BATCH_COMMANDS = 2000


_event_type: type[anyio.Event] | None = None


def new_event() -> anyio.Event:
    """An event of the running async library's own type. ``anyio.Event()`` looks up
    the running library on every call (2.2 µs against 1.1 µs made directly; in a
    profile of warm claims through a Redis Cluster, where a claim waits on several
    lanes, 13 % of the client's CPU), so the type it returns is taken once."""
    global _event_type  # noqa: PLW0603 - one process, one async library
    if _event_type is None:
        _event_type = type(anyio.Event())
    return _event_type()


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
    __slots__ = ("commands", "results", "error", "done", "event", "group")

    def __init__(self, commands: tuple[Command, ...]) -> None:
        self.commands = commands
        self.results: list[Any] = []
        self.error: BaseException | None = None
        self.done = False
        # Made only when the task has to wait for another task's pipeline.
        self.event: anyio.Event | None = None
        # One task's items on several lanes (_together): how many are not done yet.
        self.group: list[int] | None = None


class AutoPipeline:
    """The auto-pipeline of one client: one lane (connection) for a standalone Redis, one
    lane per node for a Redis Cluster (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis, *, max_batch: int = MAX_BATCH_COMMANDS) -> None:
        self.redis = redis
        self.max_batch = max_batch
        # Command name (as callers spell it) -> the client's response callback, or None.
        self._callbacks: dict[Any, Any] = {}
        self.round_trips = 0
        self.commands_sent = 0
        self._cluster: RedisCluster | None = redis if is_cluster(redis) else None  # type: ignore[assignment]
        self._lane = _Lane(self, self._pool_connection)
        self._lanes: dict[str, _Lane] = {}
        self._ready: anyio.Event | None = None

    async def execute(self, *commands: Command) -> list[Any]:
        """Send ``commands`` (``("HSET", key, f, v)``, ``script.call(...)``) in order, in
        a pipeline shared with other tasks; return their replies. A command that failed
        gives its exception object in place of a reply (a failed connection raises)."""
        if self._cluster is None:
            return await self._lane.execute(commands)
        return await self._execute_routed(self._cluster, commands)

    async def execute_stages(self, *stages: Sequence[Command]) -> list[Any]:
        """Like :meth:`execute` of all the stages' commands, where only the stages need
        to apply in order: the commands of one stage may apply in any order among
        themselves. On a Redis Cluster each stage's commands go to their nodes at once
        (one round trip for the stage, not one per node); on one Redis it is one
        pipeline, as :meth:`execute`."""
        if self._cluster is None:
            return await self._lane.execute(tuple(c for stage in stages for c in stage))
        out: list[Any] = []
        for stage in stages:
            out += await self._execute_spread(self._cluster, tuple(stage))
        return out

    async def _pool_connection(self) -> AbstractConnection:
        # Kept checked out: the client's aclose() disconnects in-use connections too.
        return await self.redis.connection_pool.get_connection()  # type: ignore[no-untyped-call,no-any-return]

    # ------------------------------------------------------------ Redis Cluster

    async def _discover(self, cluster: RedisCluster) -> None:
        """The cluster's topology, read once by the first caller while the others wait
        (and then start together, so their first commands share round trips)."""
        if self._ready is None:
            self._ready = ready = anyio.Event()
            try:
                # Shielded: the callers waiting on it must not fail for this one's cancel.
                with anyio.CancelScope(shield=True), anyio.fail_after(COMMAND_TIMEOUT_S):
                    await cluster.initialize()
            except BaseException:
                self._ready = None
                ready.set()
                raise
            ready.set()
        else:
            await self._ready.wait()
            if self._ready is None:
                await self._discover(cluster)

    def _node_lane(self, cluster: RedisCluster, name: str) -> _Lane:
        lane = self._lanes.get(name)
        if lane is None:

            async def acquire() -> AbstractConnection:
                return node_connection(cluster, name)

            lane = self._lanes[name] = _Lane(self, acquire)
        return lane

    async def _execute_routed(self, cluster: RedisCluster, commands: tuple[Command, ...]) -> list[Any]:
        if self._ready is None or not self._ready.is_set():
            await self._discover(cluster)
        try:
            first = node_of(cluster, commands[0])
            nodes = [first]
            single = True
            for c in commands[1:]:
                node = node_of(cluster, c)
                nodes.append(node)
                single = single and node == first
        except redis_errors.SlotNotCoveredError:
            single, nodes = False, []
        if single:
            # The common case (one key, or one script): straight to the node's lane.
            try:
                replies = await self._node_lane(cluster, first).execute(commands)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError):
                return await self._follow(cluster, commands, [None] * len(commands), list(range(len(commands))))
            if not any(isinstance(r, _REDIRECTS) for r in replies):
                return replies
            redo, busy = await self._triage(cluster, range(len(commands)), replies, replies, {})
            if busy:
                await anyio.sleep(0.05)
            return await self._follow(cluster, commands, replies, redo, sent=True)
        return await self._follow(
            cluster, commands, [None] * len(commands), list(range(len(commands))), nodes=nodes,
        )

    async def _execute_spread(self, cluster: RedisCluster, commands: tuple[Command, ...]) -> list[Any]:
        """``commands`` in any order: each node's share is queued on its lane at once and
        this task waits for (or leads) them together. What a lost node or a redirection
        left unanswered is sent again as :meth:`_follow` does."""
        if self._ready is None or not self._ready.is_set():
            await self._discover(cluster)
        by_node: dict[str, list[int]] = {}
        try:
            for i, c in enumerate(commands):
                by_node.setdefault(node_of(cluster, c), []).append(i)
        except redis_errors.SlotNotCoveredError:
            return await self._follow(cluster, commands, [None] * len(commands), list(range(len(commands))))
        if len(by_node) == 1:
            return await self._execute_routed(cluster, commands)
        parts = [(self._node_lane(cluster, node), idx, _Item(tuple(commands[i] for i in idx)))
                 for node, idx in by_node.items()]
        # Shielded like a run of _follow once sent: every lane's wait is bounded by its
        # connection's socket timeout, and the commands go whole.
        with anyio.CancelScope(shield=True):
            await _together([(lane, item) for lane, _, item in parts])
            results: list[Any] = [None] * len(commands)
            redo: list[int] = []
            for _, idx, item in parts:
                if item.error is not None:
                    if not isinstance(item.error, redis_errors.ConnectionError | redis_errors.TimeoutError):
                        raise item.error
                    redo += idx
                    continue
                again, _busy = await self._triage(cluster, idx, item.results, results, {})
                redo += again
            if redo:
                results = await self._follow(cluster, commands, results, sorted(redo), sent=True)
        return results

    async def _follow(
        self, cluster: RedisCluster, commands: tuple[Command, ...], results: list[Any],
        todo: list[int], *, sent: bool = False, nodes: list[str] | None = None,
    ) -> list[Any]:
        """Sends ``commands[todo]``: runs of consecutive commands owned by one node go,
        one run after the other, to that node's lane, so a task's commands apply in
        order even across shards (a reply pushed after a record write is never seen
        before it). Redirections (MOVED after a failover or resharding, ASK during a
        slot migration) and a lost node (topology re-read, then retried until the
        command deadline) are followed per command. Once a run is sent (``sent``), the
        rest is shielded from cancellation: a task's commands go whole. ``nodes``: each
        command's node as routed a moment ago (read afresh once anything is redirected
        or the topology re-read)."""
        pending = deque(todo)
        asking: dict[int, str] = {}
        known: dict[int, str] = dict(enumerate(nodes)) if nodes else {}
        give_up = anyio.current_time() + COMMAND_TIMEOUT_S
        pause = 0.05

        def owner(i: int) -> str:
            node = asking.get(i) or known.get(i)
            if node is None:
                node = known[i] = node_of(cluster, commands[i])
            return node

        with anyio.CancelScope(shield=sent) as scope:
            while pending:
                run: list[int] = []
                try:
                    node = owner(pending[0])
                    run.append(pending.popleft())
                    while pending and owner(pending[0]) == node:
                        run.append(pending.popleft())
                    wire: list[Command] = []
                    for i in run:
                        if i in asking:
                            wire.append(("ASKING",))
                        wire.append(commands[i])
                    replies = await self._node_lane(cluster, node).execute(tuple(wire))
                except (redis_errors.ConnectionError, redis_errors.TimeoutError,
                        redis_errors.SlotNotCoveredError) as exc:
                    # A node is gone (failover in progress): re-read the topology, retry.
                    pending.extendleft(reversed(run))
                    known.clear()
                    if anyio.current_time() + pause > give_up:
                        if isinstance(exc, redis_errors.SlotNotCoveredError):
                            raise redis_errors.ConnectionError(str(exc)) from exc
                        raise
                    await refresh_topology(cluster)
                    await anyio.sleep(pause)
                    pause = min(pause * 2, 1.0)
                    continue
                scope.shield = True
                if any(i in asking for i in run):
                    kept, pos = [], 0
                    for i in run:
                        pos += i in asking  # past the ASKING reply
                        kept.append(replies[pos])
                        pos += 1
                    replies = kept
                redo, busy = await self._triage(cluster, run, replies, results, asking)
                if redo:
                    known.clear()
                    if anyio.current_time() > give_up:
                        continue  # their redirection errors stand as their replies
                    if busy:
                        await anyio.sleep(pause)
                        pause = min(pause * 2, 1.0)
                    pending.extendleft(reversed(redo))
        return results

    @staticmethod
    async def _triage(
        cluster: RedisCluster, run: Sequence[int], replies: list[Any], results: list[Any],
        asking: dict[int, str],
    ) -> tuple[list[int], bool]:
        """Files each reply of ``run`` into ``results``; returns the commands to send
        again (redirected) and whether the cluster asked to wait (TRYAGAIN, CLUSTERDOWN)."""
        redo: list[int] = []
        busy = False
        for i, reply in zip(run, replies, strict=True):
            results[i] = reply
            asking.pop(i, None)
            if isinstance(reply, redis_errors.MovedError):
                await cluster.nodes_manager.move_slot(reply)
            elif isinstance(reply, redis_errors.AskError):
                asking[i] = f"{reply.host}:{reply.port}"
            elif isinstance(reply, redis_errors.TryAgainError | redis_errors.ClusterDownError):
                busy = True
            else:
                continue
            redo.append(i)
        return redo, busy


_REDIRECTS = (redis_errors.AskError, redis_errors.TryAgainError, redis_errors.ClusterDownError)


class _Lane:
    """One connection's pipeline: at most one batch in flight; everything queued
    meanwhile goes in the next one."""

    def __init__(self, owner: AutoPipeline, acquire: Callable[[], Awaitable[AbstractConnection]]) -> None:
        self.owner = owner
        self._acquire = acquire
        self._queue: deque[_Item] = deque()
        self._busy = False
        self._conn: AbstractConnection | None = None
        # Scripts sent through this lane; a server that lost them since answers NOSCRIPT.
        self._loaded: set[str] = set()

    async def execute(self, commands: tuple[Command, ...]) -> list[Any]:
        item = _Item(commands)
        self._queue.append(item)
        try:
            while not item.done:
                if not self._busy:
                    await self._lead()
                else:
                    item.event = new_event()
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

    async def _lead(self) -> None:
        self._busy = True
        try:
            await self._flush()
        finally:
            self._busy = False
            self._wake_next()

    def _wake_next(self) -> None:
        # The first waiting task leads next. An item without an event belongs to a task
        # busy leading another lane (_together): it is swept into this lane's next batch.
        for it in self._queue:
            if it.event is not None:
                it.event.set()
                return

    async def _flush(self) -> None:
        # One pass of the event loop: tasks made ready together queue together.
        await anyio.lowlevel.checkpoint()
        batch: list[_Item] = []
        n = 0
        max_batch = self.owner.max_batch
        while self._queue and (not batch or n + len(self._queue[0].commands) <= max_batch):
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
                group = it.group
                if group is not None:
                    group[0] -= 1
                    if group[0]:
                        # Its task wakes once all its items are done (or to lead a lane).
                        continue
                if it.event is not None:
                    it.event.set()

    async def _send(self, batch: list[_Item]) -> None:
        flat = [c for it in batch for c in it.commands]
        # A script this lane has not sent before is loaded ahead of the batch, so a
        # task's commands after it never run before it (NOSCRIPT's re-send would).
        new = {c[1] for c in flat if c[0] == "EVALSHA" and c[1] not in self._loaded}
        if new:
            flat = [("SCRIPT", "LOAD", _SOURCES[sha]) for sha in new] + flat
        results = await self._pipeline(flat)
        if new:
            raise_first_error(results[: len(new)])
            self._loaded |= new
            flat, results = flat[len(new):], results[len(new):]
        retry = [i for i, r in enumerate(results) if _noscript(r)]
        if retry:
            # Loaded on this lane's server (each node of a cluster has its own cache).
            raise_first_error(await self._pipeline(
                [("SCRIPT", "LOAD", _SOURCES[sha]) for sha in {flat[i][1] for i in retry}]
            ))
            again = await self._pipeline([flat[i] for i in retry])
            for i, r in zip(retry, again, strict=True):
                results[i] = r
        pos = 0
        for it in batch:
            it.results = results[pos : pos + len(it.commands)]
            pos += len(it.commands)

    async def _pipeline(self, commands: list[Command]) -> list[Any]:
        owner = self.owner
        owner.round_trips += 1
        owner.commands_sent += len(commands)
        conn = self._conn
        if conn is None:
            conn = self._conn = await self._acquire()
        replies = await exchange(conn, commands)
        callbacks = owner._callbacks
        for i, c in enumerate(commands):
            reply = replies[i]
            if isinstance(reply, Exception):
                continue
            cb = callbacks.get(c[0], _UNKNOWN)
            if cb is _UNKNOWN:
                cb = callbacks[c[0]] = owner.redis.response_callbacks.get(
                    c[0].decode() if isinstance(c[0], bytes) else c[0]
                )
            if cb is not None:
                replies[i] = cb(reply)
        return replies


async def _together(parts: list[tuple[_Lane, _Item]]) -> None:
    """Queues each item on its lane and returns once all are done: this task leads any
    of those lanes that is idle, one after the other, and otherwise waits until all its
    items are done or a lane hands it the lead."""
    group = [len(parts)]
    for lane, item in parts:
        item.group = group
        lane._queue.append(item)  # noqa: SLF001 - the lanes' own protocol
    try:
        while True:
            waiting = [(lane, item) for lane, item in parts if not item.done]
            if not waiting:
                return
            idle = next((lane for lane, _ in waiting if not lane._busy), None)  # noqa: SLF001
            if idle is not None:
                await idle._lead()  # noqa: SLF001
                continue
            event = new_event()
            for _, item in waiting:
                item.event = event
            try:
                await event.wait()
            finally:
                for _, item in waiting:
                    item.event = None
    except BaseException:
        for lane, item in parts:
            if not item.done:
                try:
                    lane._queue.remove(item)  # noqa: SLF001
                except ValueError:
                    pass
                if not lane._busy:  # noqa: SLF001
                    lane._wake_next()  # noqa: SLF001
        raise


# ---------------------------------------------------------------- cluster routing

_SCRIPT_COMMANDS = frozenset({"EVALSHA", "EVAL", b"EVALSHA", b"EVAL"})


def key_of(command: Command) -> Any:
    """The key that routes ``command`` (hotbed names every command's key first, or as a
    script's first key); None for a command without one."""
    if command[0] in _SCRIPT_COMMANDS:
        return command[3] if int(command[2]) > 0 else None
    return command[1] if len(command) > 1 and command[0] not in ("ASKING", "SCRIPT") else None


def node_of(cluster: RedisCluster, command: Command) -> str:
    """The name (``host:port``) of the primary owning ``command``'s key."""
    key = key_of(command)
    if key is None:
        return cluster.get_default_node().name
    return node_for_key(cluster, key)


@functools.lru_cache(maxsize=1 << 16)
def _slot(key: str | bytes) -> int:
    # The slot of a key never changes; most keys hotbed routes recur (streams, pools,
    # indexes), and redis-py's crc16 is a Python loop over the hash tag.
    return key_slot(key if isinstance(key, bytes) else key.encode())


def node_for_key(cluster: RedisCluster, key: Any) -> str:
    # Without the client's encoder: every command of every claim and placement is
    # routed here, and hotbed's keys are str or bytes.
    slot = (_slot(key) if isinstance(key, str | bytes)
            else key_slot(cluster.encoder.encode(key)))  # type: ignore[no-untyped-call]
    try:
        return cluster.nodes_manager.get_node_from_slot(slot).name
    except KeyError:  # the topology is being re-read
        raise redis_errors.SlotNotCoveredError(f"slot {slot} has no known node") from None


def node_connection(cluster: RedisCluster, name: str) -> AbstractConnection:
    """A connection to node ``name``, taken out of its pool for good (a lane or a
    blocking wait keeps it; the client's aclose() disconnects it)."""
    node = cluster.nodes_manager.get_node(node_name=name)
    if node is None:
        raise redis_errors.ConnectionError(f"Redis Cluster node {name} is no longer known")
    return node.acquire_connection()


async def refresh_topology(cluster: RedisCluster) -> None:
    """Re-read which node owns which slots (after a node failed); a failure to reach any
    node now is left for the caller's retry to meet."""
    try:
        await cluster.nodes_manager.initialize()
    except redis_errors.RedisError:
        pass


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
        self.event = new_event()
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
