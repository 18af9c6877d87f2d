"""The low-level client: submit a message to a stream, wait for its one reply.

A request is an :class:`~hotbed.protocol.Envelope` appended to the scheduler's request
stream (creates) or to the command stream of the sandbox's worker (exec, files,
terminate), through the ``SUBMIT`` script so a full backlog answers ``Overloaded`` at
once. The reply arrives on a per-request list that the client BLPOPs in slices of at
most ``MAX_BLOCK_S``, until the request's deadline plus a grace for the daemon's own
timeout error to arrive first. Nothing runs in the background: a client is two
connection pools.

Settings (environment): ``HOTBED_REDIS_URL`` (default: the client config file's, see
:mod:`hotbed.config`, else ``redis://127.0.0.1:6379/0``), ``HOTBED_PREFIX`` (default:
the config file's, else ``hotbed``).

A client whose Redis user is a tenant's (``PREFIX.tenant.T``, :mod:`hotbed.tenants`)
acts as that tenant: its request ids are ``T.<hex>``, and it submits to T's own
streams with plain commands (a tenant may run no Lua), checking the backlog first; a
worker gone, or not serving T yet, answers WorkerLost. What Redis refuses it (another
tenant's keys) is PermissionDenied.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import anyio
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection

from hotbed import batching, lua, protocol, tenants
from hotbed import clock as hotbed_clock
from hotbed import config as client_config
from hotbed import keys as keyspace
from hotbed.batching import raise_first_error
from hotbed.connection import MAX_BLOCK_S, RedisURL, connect, is_cluster
from hotbed.errors import (
    ConnectionLost,
    Overloaded,
    PermissionDenied,
    RequestTimeout,
    SandboxNotFound,
    WorkerLost,
)
from hotbed.protocol import Envelope, Message, Reply
from hotbed.records import SandboxRecord, from_hash

DEFAULT_URL = "redis://127.0.0.1:6379/0"
# How long the control plane may take on top of the work itself: a file operation or
# other short request, and past a command's own timeout (so the worker's typed
# ExecTimeout reply arrives before the request's deadline does).
OP_TIMEOUT_S = 60.0
COMMAND_SLACK_S = 15.0
# Extra wait past a request's deadline, so the daemon's typed timeout reply wins the race.
REPLY_GRACE_S = 5.0
DEFAULT_BACKLOG_LIMIT = 100_000



def _moved_on(error: Exception) -> bool:
    """Whether a blocking wait on a cluster should follow its key elsewhere: the node
    failed, handed the slot over (MOVED), or became a replica mid-wait (UNBLOCKED)."""
    return isinstance(error, (
        redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
        redis.exceptions.MovedError, redis.exceptions.ClusterDownError,
        redis.exceptions.TryAgainError,
    )) or str(error).startswith(("UNBLOCKED", "READONLY"))


def new_id() -> str:
    return secrets.token_hex(8)


def default_url() -> str:
    return os.environ.get("HOTBED_REDIS_URL") or client_config.load().redis_url or DEFAULT_URL


def default_prefix() -> str:
    return os.environ.get("HOTBED_PREFIX") or client_config.load().prefix or "hotbed"


def _refused(exc: redis.exceptions.NoPermissionError, what: str) -> PermissionDenied:
    return PermissionDenied(f"Redis refused {what}: {exc}")


class Client:
    """Connection to a hotbed control plane (one Redis). Use ``async with`` or ``aclose()``."""

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str | None = None,
        backlog_limit: int = DEFAULT_BACKLOG_LIMIT,
        tenant: str | None = None,
    ) -> None:
        self.url = url or default_url()
        self.keys = keyspace.Keys(prefix or default_prefix())
        # The tenant this client acts as (its Redis user's), None for an operator.
        self.tenant = tenant or tenants.tenant_of_user(self.keys.prefix, RedisURL(self.url).username)
        self.client_id = new_id()
        # This host's offset to Redis's clock, for deadlines (measured on first use).
        self.clock = hotbed_clock.Clock()
        self.backlog_limit = backlog_limit
        self.redis: aioredis.Redis = connect(self.url)
        self._blocking: aioredis.Redis = connect(self.url, blocking=True)
        self._idle_waits: dict[str, list[AbstractConnection]] = {}
        self._closed = False

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._idle_waits.clear()  # checked out of the blocking pool, which closes them
        with anyio.CancelScope(shield=True):
            await self.redis.aclose()
            await self._blocking.aclose()

    # ------------------------------------------------------------------ requests

    async def deadline(self, timeout: float) -> float:
        """A request's deadline ``timeout`` seconds from now, on Redis's clock (which
        every host compares deadlines with, :mod:`hotbed.clock`)."""
        try:
            await self.clock.ensure(self.redis)
        except redis.exceptions.NoPermissionError:
            # Credentials without TIME: the local clock it is (measured again later).
            self.clock.observe(self.clock.local(), before=self.clock.local(), after=self.clock.local())
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise ConnectionLost(f"Redis at {self.url} unreachable: {exc}") from None
        return self.clock.now() + timeout

    def new_request_id(self) -> str:
        """A fresh request id, in this client's tenant's id space."""
        return tenants.new_request_id(self.tenant) if self.tenant else new_id()

    async def call(
        self, stream: str, body: Message, *, timeout: float, worker_id: str | None = None,
        request_id: str | None = None,
    ) -> Reply:
        """Submit ``body`` to ``stream``; return its reply (errors are returned, not raised).

        With ``worker_id`` the stream is that worker's command stream, and a worker the
        reaper has removed answers at once (WorkerLost) instead of never. ``request_id``:
        chosen by the caller, who needs it first (to read the request's output stream).
        """
        rid = await self.submit(stream, body, timeout=timeout, worker_id=worker_id, request_id=request_id)
        return await self._wait_reply(rid, self.keys.reply(rid), timeout + REPLY_GRACE_S)

    async def submit(
        self,
        stream: str,
        body: Message,
        *,
        timeout: float,
        worker_id: str | None = None,
        request_id: str | None = None,
    ) -> str:
        """Append ``body`` to ``stream`` without waiting; return the request's id.

        The reply will land on ``keys.reply(id)``. :meth:`call` is this plus the wait; a
        streaming request (:class:`hotbed.streaming.Streamed`) submits with its own
        ``request_id`` and reads its output with :meth:`read_stream`. Raises Overloaded
        on a full backlog, WorkerLost when ``worker_id``'s worker is gone.
        """
        rid = request_id or self.new_request_id()
        reply_key = self.keys.reply(rid)
        env = Envelope(
            id=rid,
            reply_to=reply_key,
            deadline=await self.deadline(timeout),
            body=body,
            client=self.client_id,
        )
        data = protocol.encode(env)
        if self.tenant is not None:
            await self._submit_as_tenant(stream, data, rid, worker_id)
            return rid
        try:
            # Auto-pipelined: concurrent calls of this client share one round trip.
            if worker_id is None:
                cmd = lua.SUBMIT.call([stream], [self.backlog_limit, data])
            else:
                cmd = lua.SUBMIT_TO_WORKER.call(
                    [stream, self.keys.worker_cap(worker_id)], [self.backlog_limit, data]
                )
            (accepted,) = raise_first_error(
                await batching.for_client(self.redis).execute(cmd)
            )
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise ConnectionLost(f"Redis at {self.url} unreachable: {exc}") from None
        if accepted == -1:
            raise WorkerLost(f"worker {worker_id} is gone", worker_id=worker_id, request_id=rid)
        if not accepted:
            raise Overloaded(
                f"request backlog at its limit ({self.backlog_limit}); retry later",
                request_id=rid,
            )
        return rid

    async def _submit_as_tenant(self, stream: str, data: bytes, rid: str, worker_id: str | None) -> None:
        """Submit onto the tenant's own stream (scheduler or worker) without Lua: the
        backlog and the worker's liveness are read first, then the entry is added
        (``NOMKSTREAM`` to a worker: a stream the reaper deleted is not recreated)."""
        assert self.tenant is not None
        tenant = self.tenant
        if worker_id is None:
            stream = self.keys.tenant_requests(tenant) if stream == self.keys.requests else stream
            first: list[Any] = [("XLEN", stream)]
        else:
            stream = self.keys.tenant_worker_cmds(worker_id, tenant)
            first = [("XLEN", stream), ("EXISTS", self.keys.worker_cap(worker_id))]
        ap = batching.for_client(self.redis)
        try:
            got = raise_first_error(await ap.execute(*first))
            if worker_id is not None and not got[1]:
                raise WorkerLost(f"worker {worker_id} is gone", worker_id=worker_id, request_id=rid)
            if got[0] >= self.backlog_limit:
                raise Overloaded(f"request backlog at its limit ({self.backlog_limit}); retry later", request_id=rid)
            add: list[Any] = ["XADD", stream]
            if worker_id is not None:
                add.append("NOMKSTREAM")
            (entry,) = raise_first_error(await ap.execute((*add, "*", keyspace.FIELD, data)))
        except redis.exceptions.NoPermissionError as exc:
            raise _refused(exc, f"tenant {tenant!r} writing {stream}") from None
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise ConnectionLost(f"Redis at {self.url} unreachable: {exc}") from None
        if entry is None:
            raise WorkerLost(
                f"worker {worker_id} is gone or does not serve tenant {tenant!r} yet",
                worker_id=worker_id, request_id=rid,
            )

    async def _wait_reply(self, rid: str, reply_key: str, wait_s: float) -> Reply:
        give_up = anyio.current_time() + wait_s
        # A connection of the blocking pool (of the node owning the reply key, on a
        # cluster), kept on this client's own free list between waits (no pool checkout
        # per request); a wait cancelled mid-BLPOP drops it (batching.exchange), so it
        # never hands a stale reply to the next request.
        cluster: RedisCluster | None = self._blocking if is_cluster(self._blocking) else None  # type: ignore[assignment]
        node, conn = "", None
        try:
            while True:
                left = give_up - anyio.current_time()
                if left <= 0:
                    raise RequestTimeout(f"no reply to request {rid} within {wait_s:.1f}s", request_id=rid)
                if conn is None:
                    try:
                        node, conn = await self._wait_connection(cluster, reply_key)
                    except (redis.exceptions.ConnectionError, redis.exceptions.SlotNotCoveredError):
                        if cluster is None:
                            raise
                        await batching.refresh_topology(cluster)
                        await anyio.sleep(min(0.1, left))
                        continue
                try:
                    (got,) = await batching.exchange(conn, [("BLPOP", reply_key, min(left, MAX_BLOCK_S))])
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                    if cluster is None:
                        raise ConnectionLost(f"Redis at {self.url} unreachable: {exc}") from None
                    got = exc
                if isinstance(got, Exception):
                    if cluster is None or not _moved_on(got):
                        raise got
                    # The key's node failed over or gave up the slot: wait where it is now.
                    if isinstance(got, redis.exceptions.MovedError):
                        await cluster.nodes_manager.move_slot(got)
                    else:
                        await batching.refresh_topology(cluster)
                        await anyio.sleep(min(0.1, left))
                    self._idle_waits.setdefault(node, []).append(conn)
                    conn = None
                    continue
                if got is not None:
                    return protocol.decode_reply(got[1]).body
        finally:
            if conn is not None and not self._closed:
                self._idle_waits.setdefault(node, []).append(conn)

    async def _wait_connection(
        self, cluster: RedisCluster | None, key: str
    ) -> tuple[str, AbstractConnection]:
        """A blocking connection to where ``key`` lives, and that node's name ("" for a
        standalone Redis)."""
        node = ""
        if cluster is not None:
            await cluster.initialize()
            node = batching.node_for_key(cluster, key)
        idle = self._idle_waits.get(node)
        if idle:
            return node, idle.pop()
        if cluster is not None:
            return node, batching.node_connection(cluster, node)
        return node, await self._blocking.connection_pool.get_connection()  # type: ignore[no-untyped-call]

    async def read_stream(
        self, key: str, after: str, *, count: int, block_s: float
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Entries of stream ``key`` after entry id ``after``: one XREAD that blocks up to
        ``block_s`` (at most ``MAX_BLOCK_S``) for the first, on the blocking pool so the
        wait cannot outlast the socket timeout. Empty when nothing came."""
        try:
            got: Any = await self._blocking.xread(
                {key: after}, count=count, block=max(1, int(min(block_s, MAX_BLOCK_S) * 1000))
            )
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise ConnectionLost(f"Redis at {self.url} unreachable: {exc}") from None
        except redis.exceptions.ResponseError as exc:
            # A cluster primary that became a replica mid-wait ends the wait; the caller
            # reads again, and redis-py follows the slot to its new primary.
            if is_cluster(self._blocking) and _moved_on(exc):
                return []
            raise
        return list(got[0][1]) if got else []

    async def request(self, body: Message, *, timeout: float, request_id: str | None = None) -> Reply:
        """A scheduler request; raises the typed error of an ErrorReply."""
        reply = await self.call(self.keys.requests, body, timeout=timeout, request_id=request_id)
        return protocol.raise_for_reply(reply)

    async def worker_request(
        self, worker_id: str, body: Message, *, timeout: float
    ) -> Reply:
        """A command for the worker that holds a sandbox; raises typed errors.

        If the worker is gone, the sandbox's record says why (SandboxNotFound when it
        ended or was lost with its worker).
        """
        try:
            reply = await self.call(
                self.keys.worker_cmds(worker_id), body, timeout=timeout, worker_id=worker_id
            )
        except WorkerLost:
            sid = getattr(body, "sandbox_id", None)
            if sid is not None:
                rec = await self.record(sid)
                if rec.ended:
                    raise SandboxNotFound(
                        f"sandbox {sid} has ended ({rec.state}: {rec.reason})", sandbox_id=sid
                    ) from None
            raise
        return protocol.raise_for_reply(reply)

    # ------------------------------------------------------------------ records

    async def record(self, sandbox_id: str) -> SandboxRecord:
        try:
            raw = await self.redis.hgetall(self.keys.sandbox(sandbox_id))
        except redis.exceptions.NoPermissionError as exc:
            raise _refused(exc, f"reading sandbox {sandbox_id}") from None
        rec = from_hash(raw)
        if rec is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id}", sandbox_id=sandbox_id)
        return rec

    async def records(self, *, tags: dict[str, str] | None = None) -> list[SandboxRecord]:
        """Live sandboxes, oldest first, optionally those carrying all of ``tags``."""
        # A tenant may list only its own index (hotbed.tenants).
        index = self.keys.tenant_sandboxes(self.tenant) if self.tenant else self.keys.sandboxes
        ids: Any = await self.redis.zrange(index, 0, -1)
        out: list[SandboxRecord] = []
        for start in range(0, len(ids), 500):
            async with self.redis.pipeline(transaction=False) as pipe:
                for sid in ids[start : start + 500]:
                    pipe.hgetall(self.keys.sandbox(sid.decode()))
                rows: list[Any] = await pipe.execute()
            for raw in rows:
                rec = from_hash(raw)
                if rec is None or rec.ended:
                    continue
                if tags and any(rec.tags.get(k) != v for k, v in tags.items()):
                    continue
                out.append(rec)
        return out
