"""The scheduler daemon: intake of client requests, placement, and the reaper.

Several replicas may run: they share the request stream through one consumer group,
and entries a dead replica took are claimed by another after ``reclaim_idle_s``.
A create is placed with one round trip in the common case: the sandbox record write
and the ``RESERVE_DISPATCH`` script (capacity + the worker's start command, atomic on
the worker's hash tag) go in one pipeline; the worker replies to the client directly.
Requests that find no capacity wait in line (scheduler.waitline: strictly first come,
first placed per GPU model; ordered retries for CPU), retrying as the registry refreshes, until
their deadline (CapacityExhausted); on a graceful stop they go back to the stream.
Requests no live worker could ever take fail at once (NoMatchingWorker). A GPU start
command names the GPUs the scheduler picked; RESERVE_DISPATCH takes exactly those.

The reaper runs on the one replica that holds the ``reaper`` lock: a worker whose
heartbeat lapsed has its sandboxes marked lost, every command left in its stream
answered with WorkerLost (no client waits out its deadline), and its keys removed.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Collection, Iterator
from itertools import chain

import anyio
import msgspec
import redis.asyncio as aioredis

from daemon import lifecycle
from daemon.metrics import NULL, NullMetrics
from daemon.streams import StreamConsumer, ensure_group, reply_to, send_reply
from hotbed import batching, lua, protocol
from hotbed import keys as keyspace
from hotbed.batching import Script, raise_first_error
from hotbed.connection import connect
from hotbed.errors import (
    CapacityExhausted,
    HotbedError,
    InvalidRequest,
    NoMatchingWorker,
    UnsupportedRequest,
    WorkerLost,
)
from hotbed.protocol import (
    BuildTemplate,
    CreateSandbox,
    Envelope,
    ErrorReply,
    Message,
    Reply,
    SandboxSpec,
    StartSandbox,
)
from hotbed.records import ENDED_RECORD_TTL_S, SandboxRecord, to_hash
from scheduler import templates
from scheduler.config import SchedulerSettings
from scheduler.placement import could_ever, parse_gpu, rank
from scheduler.pools import PoolController
from scheduler.registry import WorkerRegistry, WorkerView
from scheduler.waitline import HandBack, WaitLine, wait_class

log = logging.getLogger(__name__)

RESERVE_DISPATCH = Script(lua.RESERVE_DISPATCH)

# A worker gets this long after its last heartbeat before a request that could only fit
# on it fails as NoMatchingWorker.
LOCK_TTL_MS = 5000


def validate(spec: SandboxSpec) -> None:
    """Bad input gets InvalidRequest, never a traceback."""
    r = spec.resources
    problems = []
    if not spec.image:
        problems.append("image is empty")
    if not 0 < spec.timeout <= protocol.MAX_TIMEOUT_S:
        problems.append(f"timeout must be in (0, {protocol.MAX_TIMEOUT_S:g}] seconds, got {spec.timeout:g}")
    if spec.idle_timeout is not None and spec.idle_timeout <= 0:
        problems.append(f"idle_timeout must be positive, got {spec.idle_timeout:g}")
    if r.cpu <= 0:
        problems.append(f"cpu must be positive, got {r.cpu:g}")
    if r.memory_mb < 16:
        problems.append(f"memory_mb must be at least 16, got {r.memory_mb}")
    if r.pids < 8:
        problems.append(f"pids must be at least 8, got {r.pids}")
    parse_gpu(r.gpu)
    if problems:
        raise InvalidRequest("; ".join(problems))


def sandbox_id_for(request_id: str) -> str:
    # Derived from the request id so a redelivered request names the same sandbox.
    return f"sb-{request_id}"


class Scheduler:
    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self.keys = keyspace.Keys(settings.prefix)
        self.name = settings.resolved_name()
        self.stopping = anyio.Event()
        self._redis: aioredis.Redis | None = None
        self._blocking: aioredis.Redis | None = None
        self.registry: WorkerRegistry | None = None
        self._limiter = anyio.CapacityLimiter(settings.max_in_flight)
        self._lock_token = secrets.token_hex(8)
        self.placed = 0
        self.waitline = WaitLine()
        self.pools = PoolController(self)
        self.metrics: NullMetrics = NULL

    @property
    def redis(self) -> aioredis.Redis:
        assert self._redis is not None, "scheduler not started"
        return self._redis

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._redis = connect(self.settings.redis_url)
        self._blocking = connect(self.settings.redis_url, blocking=True)
        try:
            await self._serve(task_status)
        finally:
            with anyio.CancelScope(shield=True):
                await self._redis.aclose()
                await self._blocking.aclose()

    async def _serve(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        self._reserve = self.redis.register_script(lua.RESERVE_DISPATCH)
        self._lock = self.redis.register_script(lua.LOCK)
        self.registry = WorkerRegistry(
            self.redis, self.keys, heartbeat_ttl_s=self.settings.heartbeat_ttl_s
        )
        await self.registry.refresh()
        consumer = StreamConsumer(
            redis=self.redis,
            blocking=self._blocking,  # type: ignore[arg-type]
            stream=self.keys.requests,
            group=keyspace.REQUESTS_GROUP,
            consumer=self.name,
            limiter=self._limiter,
        )
        await ensure_group(self.redis, consumer.stream, consumer.group)
        log.info("scheduler %s ready", self.name)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._refresh_loop)
            tg.start_soon(self._reaper_loop)
            tg.start_soon(self.pools.run)
            async with anyio.create_task_group() as work:
                tg.start_soon(self._reclaim_loop, consumer, work)
                task_status.started()
                await consumer.run(work, self._handle_entry, stop=self.stopping, batch=self.settings.batch)
                # Creates waiting for capacity go back to the stream at once.
                self.waitline.close()
                with anyio.move_on_after(self.settings.shutdown_grace_s) as grace:
                    while self._limiter.borrowed_tokens:  # noqa: ASYNC110 - a limiter has no drained event
                        await anyio.sleep(0.05)
                if grace.cancelled_caught:
                    log.warning(
                        "%d requests unfinished after %.0fs; leaving them pending for another replica",
                        self._limiter.borrowed_tokens, self.settings.shutdown_grace_s,
                    )
                    work.cancel_scope.cancel()
            tg.cancel_scope.cancel()

    # ------------------------------------------------------------ background

    async def _refresh_loop(self) -> None:
        assert self.registry is not None
        while True:
            await anyio.sleep(self.settings.registry_refresh_s)
            with lifecycle.survive("registry refresh"):
                await self.registry.refresh()
                self.waitline.capacity_changed()

    async def _reclaim_loop(self, consumer: StreamConsumer, work: anyio.abc.TaskGroup) -> None:
        """Take over requests a dead replica read and never finished."""
        min_idle_ms = int(self.settings.reclaim_idle_s * 1000)
        while True:
            stale: list[tuple[bytes, bytes]] = []
            with lifecycle.survive("reclaiming stale requests"):
                stale = await consumer.claim_stale(min_idle_ms)
            for entry_id, data in stale:
                log.info("reclaimed request %s from a stalled replica", entry_id.decode())
                token = object()
                await self._limiter.acquire_on_behalf_of(token)
                work.start_soon(self._run_reclaimed, consumer, entry_id, data, token)
            await anyio.sleep(min(self.settings.reclaim_idle_s / 2, 5.0))

    async def _run_reclaimed(
        self, consumer: StreamConsumer, entry_id: bytes, data: bytes, token: object
    ) -> None:
        try:
            await self._handle_entry(entry_id, data)
            await consumer.ack(entry_id)
        finally:
            self._limiter.release_on_behalf_of(token)

    async def _reaper_loop(self) -> None:
        while True:
            await anyio.sleep(1.0)
            with lifecycle.survive("reaper"):
                leader = await self._lock(
                    keys=[self.keys.lock("reaper")], args=[self._lock_token, LOCK_TTL_MS]
                )
                if leader:
                    await self.reap_dead_workers()

    async def reap_dead_workers(self) -> None:
        cutoff = int((lifecycle.wall() - self.settings.heartbeat_ttl_s) * 1000)
        dead = await self.redis.zrangebyscore(self.keys.workers, "-inf", cutoff)
        for raw in dead:
            await self._worker_lost(raw.decode())

    async def _worker_lost(self, wid: str) -> None:
        log.warning("worker %s stopped heartbeating; marking its sandboxes lost", wid, extra={"worker_id": wid})
        drain = self.redis.register_script(lua.DRAIN_WORKER)
        held, msgs = await drain(
            keys=[
                self.keys.worker_cmds(wid), self.keys.worker_cap(wid),
                self.keys.worker_sandboxes(wid), self.keys.worker_info(wid),
            ]
        )
        now = str(lifecycle.wall())
        async with self.redis.pipeline(transaction=False) as pipe:
            for raw in held:
                sid = raw.decode()
                pipe.hset(
                    self.keys.sandbox(sid),
                    mapping={"state": "lost", "reason": f"worker {wid} stopped heartbeating", "ended_at": now},
                )
                pipe.expire(self.keys.sandbox(sid), ENDED_RECORD_TTL_S)
                pipe.zrem(self.keys.sandboxes, sid)
            pipe.zrem(self.keys.workers, wid)
            await pipe.execute()
        err = protocol.error_reply(WorkerLost(f"worker {wid} stopped heartbeating", worker_id=wid))
        for data in msgs:
            header = protocol.decode_header(data)
            if header is not None:
                await send_reply(self.redis, header.id, header.reply_to, err)
        if self.registry is not None:
            self.registry.workers.pop(wid, None)

    # --------------------------------------------------------------- requests

    async def _handle_entry(self, entry_id: bytes, data: bytes) -> None:
        try:
            env = protocol.decode_envelope(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            header = protocol.decode_header(data)
            log.warning(
                "malformed request %s: %s", entry_id.decode(), exc,
                extra={"request_id": header.id if header else None},
            )
            if header is not None:
                await send_reply(
                    self.redis, header.id, header.reply_to,
                    protocol.error_reply(UnsupportedRequest(f"malformed or unknown request: {exc}")),
                )
            return
        kind = type(env.body).__name__
        self.metrics.request(kind)
        lifecycle.log_context.set({"request_id": env.id})
        try:
            reply = await self._dispatch(env)
        except HandBack:
            # Stopping while it waited for capacity: requeue it for a live replica.
            await self.redis.xadd(self.keys.requests, {keyspace.FIELD: data})
            log.info("handed a waiting create back to the request stream", extra={"request_id": env.id})
            return
        except HotbedError as exc:
            exc.request_id = env.id
            reply = protocol.error_reply(exc)
        except Exception as exc:
            log.exception("request %s failed", env.id, extra={"request_id": env.id})
            reply = protocol.error_reply(exc)
        if reply is not None:
            if isinstance(reply, ErrorReply):
                self.metrics.error(kind, reply.code)
            await reply_to(self.redis, env, reply)

    async def _dispatch(self, env: Envelope) -> Reply | None:
        body = env.body
        if isinstance(body, CreateSandbox):
            if body.spec.template:
                await templates.place_from_template(self, env, body.spec)
            else:
                await self.place(env, body.spec)
            return None  # the worker replies
        if isinstance(body, BuildTemplate):
            await templates.place_build(self, env, body)
            return None
        raise UnsupportedRequest(f"the scheduler does not handle {type(body).__name__}")

    async def place(
        self, env: Envelope, spec: SandboxSpec, *,
        make_start: Callable[[str], Message] | None = None, wait: bool = True,
        prefer: Collection[str] = (),
    ) -> str | None:
        """Reserve capacity on a worker and hand it the start command.

        ``make_start(sid)`` builds a different command (a template restore, a template
        build); ``wait=False`` returns None at once when no worker has room (pool refills).
        ``prefer``: workers tried first when they have room (those holding the snapshot
        a restore needs, so nothing is copied).
        """
        assert self.registry is not None
        validate(spec)
        sid = sandbox_id_for(env.id)
        start = make_start(sid) if make_start else StartSandbox(sandbox_id=sid, spec=spec)
        payload = protocol.encode(
            Envelope(id=env.id, reply_to=env.reply_to, deadline=env.deadline, body=start, client=env.client)
        )
        record = SandboxRecord(
            id=sid,
            image=spec.image,
            template=spec.template or "",
            cpu=spec.resources.cpu,
            memory_mb=spec.resources.memory_mb,
            gpu=spec.resources.gpu or "",
            created_at=lifecycle.wall(),
            timeout=spec.timeout,
            idle_timeout=spec.idle_timeout or 0.0,
            tags=spec.tags,
        )
        gpu = parse_gpu(spec.resources.gpu)
        ngpu = gpu.count if gpu else 0
        t0 = anyio.current_time()
        # Creates that find no room wait in line, per class, in arrival order.
        ticket = self.waitline.ticket(wait_class(spec))
        if not self.waitline.is_waiting(ticket.cls):
            self._check_matchable(env, spec)
            if await self._place_once(env, sid, spec, record, payload, ngpu, start=start, prefer=prefer):
                self.metrics.placement_wait(anyio.current_time() - t0)
                return sid
        if not wait:
            return None
        with self.waitline.joined(ticket):
            while True:
                if self.waitline.closed:
                    raise HandBack
                if lifecycle.wall() > env.deadline:
                    raise CapacityExhausted(
                        f"no worker had room for cpu={spec.resources.cpu:g} memory={spec.resources.memory_mb}MiB"
                        + (f" gpu={spec.resources.gpu}" if spec.resources.gpu else "")
                        + " before the request's deadline"
                    )
                self._check_matchable(env, spec)
                mark = self.waitline.mark()
                if self.waitline.may_try(ticket) and await self._place_once(
                    env, sid, spec, record, payload, ngpu, start=start, prefer=prefer
                ):
                    self.metrics.placement_wait(anyio.current_time() - t0)
                    return sid
                await self.waitline.wait_turn(ticket, mark, within=env.deadline - lifecycle.wall())

    def _check_matchable(self, env: Envelope, spec: SandboxSpec) -> None:
        assert self.registry is not None
        live = self.registry.live()
        if not could_ever(live, spec, spec.worker_tags):
            if live or lifecycle.wall() > env.deadline - 0.001:
                raise NoMatchingWorker(self._no_match_message(spec))

    async def _place_once(
        self, env: Envelope, sid: str, spec: SandboxSpec, record: SandboxRecord, payload: bytes,
        ngpu: int, *, start: Message | None = None, prefer: Collection[str] = (),
    ) -> bool:
        """One pass over the ranked candidates; True once a worker took the sandbox."""
        for w, gpus in self._candidates(spec, prefer):
            if ngpu:
                # The start command names its GPUs, so we pick them and RESERVE_DISPATCH
                # takes exactly these or none (a stale view just fails this candidate).
                gpus = gpus[:ngpu]
                gstart: Message
                if isinstance(start, StartSandbox):
                    gstart = msgspec.structs.replace(start, gpu_uuids=gpus)
                elif start is None:
                    gstart = StartSandbox(sandbox_id=sid, spec=spec, gpu_uuids=gpus)
                else:  # a command with no GPU list (a template build): sent as it is
                    gstart = start
                payload = protocol.encode(msgspec.structs.replace(env, body=gstart))
            got = await self._try_reserve(w.id, sid, spec, record, payload, gpus, ngpu)
            if got is not None:
                w.cpu_free -= spec.resources.millicpu
                w.mem_free -= spec.resources.memory_mb
                w.gpu_free = [g for g in w.gpu_free if g not in got]
                self.placed += 1
                return True
            # Our cached view was stale; the worker is fuller than we thought.
            w.cpu_free = min(w.cpu_free, spec.resources.millicpu - 1)
        return False

    def _candidates(self, spec: SandboxSpec, prefer: Collection[str]) -> Iterator[tuple[WorkerView, list[str]]]:
        assert self.registry is not None
        ranked = self.registry.ranked(
            spec, node_tags=spec.worker_tags, policy=self.settings.placement,
            gpu_workers_for_cpu=self.settings.gpu_workers_for_cpu,
        )
        if not prefer:
            return ranked
        # The preferred few in policy order, then everyone else as usual; a preferred
        # worker without room is simply not among the first.
        first = rank(
            [w for w in self.registry.live() if w.id in prefer], spec, node_tags=spec.worker_tags,
            policy=self.settings.placement, gpu_workers_for_cpu=self.settings.gpu_workers_for_cpu,
        )
        return chain(first, ((w, g) for w, g in ranked if w.id not in prefer))

    async def _try_reserve(
        self, wid: str, sid: str, spec: SandboxSpec, record: SandboxRecord,
        payload: bytes, gpus: list[str], ngpu: int,
    ) -> list[str] | None:
        rec = msgspec.structs.replace(record, worker=wid)
        fields = [x for kv in to_hash(rec).items() for x in kv]
        # One round trip, shared with the other placements of this moment (auto-pipelined).
        res = raise_first_error(await batching.for_client(self.redis).execute(
            ("HSET", self.keys.sandbox(sid), *fields),
            RESERVE_DISPATCH.call(
                [self.keys.worker_cap(wid), self.keys.worker_sandboxes(wid), self.keys.worker_cmds(wid)],
                [sid, spec.resources.millicpu, spec.resources.memory_mb, payload, ngpu, *gpus],
            ),
            scripts=(RESERVE_DISPATCH,),
        ))
        got = res[1]
        if got is None:
            return None
        uuids = [g.decode() if isinstance(g, bytes) else g for g in got]
        if uuids:
            await self.redis.hset(self.keys.sandbox(sid), "gpu_uuids", msgspec.json.encode(uuids))
        return uuids

    def _no_match_message(self, spec: SandboxSpec) -> str:
        assert self.registry is not None
        r = spec.resources
        asked = f"cpu={r.cpu:g} memory={r.memory_mb}MiB" + (f" gpu={r.gpu}" if r.gpu else "")
        if spec.worker_tags:
            asked += f" worker_tags={spec.worker_tags}"
        have = []
        for w in self.registry.live():
            gpus = ",".join(sorted({g.model for g in w.info.gpus})) or "no GPU"
            have.append(
                f"{w.id} (cpu={w.info.cpu_millis / 1000:g} memory={w.info.memory_mb}MiB {gpus} tags={w.info.tags})"
            )
        return f"no live worker could ever run {asked}; live workers: " + ("; ".join(have) or "none")

