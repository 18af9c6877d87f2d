"""Consuming a request stream through a consumer group, and answering requests.

Shared by the scheduler (``hotbed:{q}:requests``) and the worker (its command stream).
Reserve capacity before taking work: the consumer waits for a free slot in its
CapacityLimiter, reads at most as many entries as it has free slots (one blocking
XREADGROUP, no polling), and runs each in the caller's task group. An entry is
acknowledged and deleted only after its handler returns, so a crashed consumer's
entries stay pending for :meth:`StreamConsumer.claim_stale` (another replica) or for
its own restart (:meth:`StreamConsumer.pending`).

A handler that will run for long (a terminal, a watch) calls :func:`leave_intake` to
give its slot back once it holds a limit of its own, so long-lived requests never take
the slots that short ones need; its entry is still acknowledged only when it returns.

Replies go to ``keys.reply(request id)``, never to a key a message names: the
envelope's ``reply_to`` only says whether anyone waits for an answer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import anyio
import redis.asyncio as aioredis
from anyio.abc import TaskGroup
from redis import exceptions as redis_errors

from daemon import lifecycle
from hotbed import batching, limits, protocol
from hotbed import keys as keyspace
from hotbed.batching import raise_first_error
from hotbed.connection import MAX_BLOCK_S
from hotbed.keys import Keys
from hotbed.protocol import Envelope, Reply, ReplyEnvelope

log = logging.getLogger(__name__)

Handler = Callable[[bytes, bytes], Awaitable[None]]


async def ensure_group(redis: aioredis.Redis, stream: str, group: str) -> None:
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except redis_errors.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def send_reply(
    redis: aioredis.Redis, keys: Keys, request_id: str, reply_to: str, body: Reply
) -> None:
    """Push the one reply of a request to ``keys.reply(request_id)``, which then expires.

    ``reply_to`` (the envelope's field) only says whether anyone waits: empty for a
    notice. The key is derived from the id, so a message cannot make a daemon write
    to, or expire, any other key; a request whose id is malformed gets no reply."""
    if not reply_to:
        return
    if not isinstance(request_id, str) or not limits.ID_RE.fullmatch(request_id):
        log.warning("not answering a request with a malformed id %r", str(request_id)[:80])
        return
    key = keys.reply(request_id)
    data = protocol.encode(ReplyEnvelope(id=request_id, body=body))
    # Shares a round trip with every other reply, ack and write of this moment.
    raise_first_error(await batching.for_client(redis).execute(
        ("LPUSH", key, data), ("EXPIRE", key, keyspace.REPLY_TTL_S)
    ))


async def reply_to(redis: aioredis.Redis, keys: Keys, env: Envelope, body: Reply) -> None:
    await send_reply(redis, keys, env.id, env.reply_to, body)


class _Slot:
    """The intake slot an entry's handler holds, until it returns or leaves intake."""

    __slots__ = ("held", "limiter", "token")

    def __init__(self, limiter: anyio.CapacityLimiter, token: object) -> None:
        self.limiter = limiter
        self.token = token
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.limiter.release_on_behalf_of(self.token)


_slot: ContextVar[_Slot | None] = ContextVar("hotbed_intake_slot", default=None)


def leave_intake() -> None:
    """Give back the intake slot of the entry the calling task handles (no-op outside a
    :class:`StreamConsumer` handler, or when already given back)."""
    slot = _slot.get()
    if slot is not None:
        slot.release()


class StreamConsumer:
    """One consumer of one group on one stream, with at most ``limiter`` handlers at once."""

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        blocking: aioredis.Redis,
        stream: str,
        group: str,
        consumer: str,
        limiter: anyio.CapacityLimiter,
    ) -> None:
        self.redis = redis
        self.blocking = blocking
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.limiter = limiter
        self._acks: batching.Coalescer[bytes] = batching.Coalescer(self._flush_acks)

    async def ack(self, *entry_ids: bytes) -> None:
        # Entries finishing together are acknowledged by one XACK and one XDEL.
        await self._acks.add(*entry_ids)

    async def _flush_acks(self, entry_ids: list[bytes]) -> None:
        raise_first_error(await batching.for_client(self.redis).execute(
            ("XACK", self.stream, self.group, *entry_ids), ("XDEL", self.stream, *entry_ids)
        ))

    async def pending(self) -> list[tuple[bytes, bytes]]:
        """Entries delivered to this consumer name before a restart and never acknowledged."""
        out: list[tuple[bytes, bytes]] = []
        got = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: "0"}, count=10_000
        )
        for _stream, entries in got or []:
            for entry_id, fields in entries:
                if fields:
                    out.append((entry_id, fields.get(keyspace.FIELD, b"")))
                else:
                    # Deleted after delivery; nothing left to do but acknowledge.
                    await self.ack(entry_id)
        return out

    async def claim_stale(self, min_idle_ms: int) -> list[tuple[bytes, bytes]]:
        """Take over entries another consumer took and left unacknowledged (it died)."""
        out: list[tuple[bytes, bytes]] = []
        start = "0-0"
        while True:
            res: Any = await self.redis.xautoclaim(
                self.stream, self.group, self.consumer, min_idle_ms, start_id=start, count=500
            )
            start, entries = res[0], res[1]
            for entry_id, fields in entries:
                if fields:
                    out.append((entry_id, fields.get(keyspace.FIELD, b"")))
            deleted = res[2] if len(res) > 2 else []
            if deleted:
                await self.ack(*deleted)
            if start in (b"0-0", "0-0"):
                return out

    async def run(
        self,
        tg: TaskGroup,
        handle: Handler,
        *,
        stop: anyio.Event,
        batch: int = 256,
    ) -> None:
        """Read and dispatch until ``stop`` is set; ``handle(entry_id, data)`` must reply.

        An entry is acknowledged when its handler returns or fails, not when it is
        cancelled (shutdown): a cancelled entry stays pending for a replica or a restart.
        """
        # Reading survives like every background loop: Redis restarting, the stream or
        # its group gone with it, is one log line and a retry with backoff.
        backoff = lifecycle.Backoff(f"reading {self.stream}", interval=0.25, log=log)
        while not stop.is_set():
            token = object()
            await self.limiter.acquire_on_behalf_of(token)
            if stop.is_set():
                self.limiter.release_on_behalf_of(token)
                return
            count = min(batch, 1 + int(self.limiter.available_tokens))
            try:
                got = await self.blocking.xreadgroup(
                    self.group,
                    self.consumer,
                    {self.stream: ">"},
                    count=count,
                    block=int(min(MAX_BLOCK_S, 1.0) * 1000),
                )
            except redis_errors.ResponseError as exc:
                self.limiter.release_on_behalf_of(token)
                if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                    await anyio.sleep(backoff.failed(exc))
                    continue
                # The stream was deleted under us (a reaper declared this consumer's
                # owner dead, before or while we blocked on it; Redis restarted without
                # its data); recreate it and carry on rather than crash.
                log.warning("stream %s or its group vanished; recreating it", self.stream)
                try:
                    await ensure_group(self.redis, self.stream, self.group)
                except Exception as again:
                    await anyio.sleep(backoff.failed(again))
                continue
            except Exception as exc:
                self.limiter.release_on_behalf_of(token)
                await anyio.sleep(backoff.failed(exc))
                continue
            except BaseException:
                self.limiter.release_on_behalf_of(token)
                raise
            backoff.succeeded()
            entries = [e for _s, es in (got or []) for e in es]
            if not entries:
                self.limiter.release_on_behalf_of(token)
                continue
            tokens = [token]
            for _ in entries[1:]:
                extra = object()
                # Slots were free when we read; taking them cannot block for long.
                await self.limiter.acquire_on_behalf_of(extra)
                tokens.append(extra)
            for (entry_id, fields), tok in zip(entries, tokens, strict=True):
                tg.start_soon(self._run_one, handle, entry_id, fields.get(keyspace.FIELD, b""), tok)

    async def _run_one(self, handle: Handler, entry_id: bytes, data: bytes, token: object) -> None:
        slot = _Slot(self.limiter, token)
        _slot.set(slot)
        try:
            try:
                await handle(entry_id, data)
            except lifecycle.TRANSIENT_ERRORS as exc:
                # Redis went away mid-request: its reply is lost and its client times
                # out. A dependency's hiccup, not a bug: one line, no traceback.
                log.warning("handler failed on entry %s of %s: %s: %s", entry_id, self.stream, type(exc).__name__, exc)
            except Exception:
                log.exception("handler failed on entry %s of %s", entry_id, self.stream)
            # An entry that cannot be acknowledged now stays pending and is handled again
            # later (handlers are idempotent or answer WorkerLost on replay).
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                try:
                    await self.ack(entry_id)
                except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
                    log.warning("could not acknowledge %s on %s: %s", entry_id, self.stream, exc)
        finally:
            slot.release()
