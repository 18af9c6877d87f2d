"""The scheduler daemon: intake of client requests, and the reaper.

Several replicas may run: they share the request stream through one consumer group,
and entries a dead replica took are claimed by another after ``reclaim_idle_s``.
Creates and template builds go to the :class:`~scheduler.placer.Placer` (one round
trip in the common case; the worker replies to the client directly); creates waiting
for capacity go back to the stream on a graceful stop.

The reaper runs on the one replica that holds the ``reaper`` leader lock
(scheduler.leader): a worker whose heartbeat lapsed has its sandboxes marked lost,
every command left in its stream answered with WorkerLost (no client waits out its
deadline), and its keys removed. The warm pool controller (scheduler.pools) runs under
its own ``pools`` lock.

Tenants (hotbed.tenants): each writes its own request stream, read with the shared one;
a request's tenant is the stream it came on. A tenant may only create sandboxes (ids
``sb-T.*`` from its ``T.*`` request ids), within its quota (scheduler.quotas); a request
id outside the stream's tenant gets no answer at all.
"""

from __future__ import annotations

import logging

import anyio
import msgspec
import redis.asyncio as aioredis

from daemon import lifecycle, tenancy
from daemon.metrics import NULL, NullMetrics
from daemon.streams import StreamConsumer, ensure_group, reply_to, send_reply, set_arrival
from hotbed import keys as keyspace
from hotbed import limits, lua, protocol, records
from hotbed import tenants as tenancy_rules
from hotbed.connection import connect
from hotbed.errors import (
    HotbedError,
    InvalidRequest,
    PermissionDenied,
    UnsupportedRequest,
    WorkerLost,
)
from hotbed.keys import sandbox_id_for
from hotbed.protocol import (
    BuildTemplate,
    CreateSandbox,
    Envelope,
    ErrorReply,
    Reply,
    SandboxCreated,
    SandboxSpec,
)
from hotbed.records import ENDED_RECORD_TTL_S
from hotbed.templates import claim_from, pool_name
from scheduler import once, templates
from scheduler.config import SchedulerSettings
from scheduler.leader import LeaderLock
from scheduler.placer import Placer, validate
from scheduler.pools import PoolController
from scheduler.quotas import TenantQuotas
from scheduler.registry import WorkerRegistry
from scheduler.waitline import HandBack, WaitLine

log = logging.getLogger(__name__)

# Moved to scheduler.placer; still importable from here.
__all__ = ["Scheduler", "sandbox_id_for", "validate"]


class Scheduler:
    def __init__(self, settings: SchedulerSettings) -> None:
        self._settings = settings
        self.keys = keyspace.Keys(settings.prefix)
        self.name = settings.resolved_name()
        self.stopping = anyio.Event()
        self._redis: aioredis.Redis | None = None
        self._blocking: aioredis.Redis | None = None
        self._limiter = anyio.CapacityLimiter(settings.max_in_flight)
        self.waitline = WaitLine()
        self.metrics: NullMetrics = NULL
        # Made once Redis is connected (run()).
        self.registry: WorkerRegistry | None = None
        self.placer: Placer | None = None
        self.pools: PoolController | None = None
        self.tenants: tenancy.TenantDirectory | None = None
        self.quotas: TenantQuotas | None = None

    @property
    def settings(self) -> SchedulerSettings:
        return self._settings

    @settings.setter
    def settings(self, value: SchedulerSettings) -> None:
        # A reload (SIGHUP) reaches the parts that read reloadable settings.
        self._settings = value
        if self.placer is not None:
            self.placer.settings = value
        if self.pools is not None:
            self.pools.settings = value

    @property
    def redis(self) -> aioredis.Redis:
        assert self._redis is not None, "scheduler not started"
        return self._redis

    @property
    def placed(self) -> int:
        """Sandboxes this replica placed."""
        return self.placer.placed if self.placer is not None else 0

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
        self.registry = WorkerRegistry(
            self.redis, self.keys, heartbeat_ttl_s=self.settings.heartbeat_ttl_s,
            image_refresh_s=self.settings.image_refresh_s,
        )
        self.placer = Placer(
            self.redis, self.keys, self.registry, self.waitline,
            settings=self.settings, metrics=self.metrics,
        )
        self.pools = pools = PoolController(
            self.redis, self.keys, self.placer, LeaderLock(self.redis, self.keys.lock("pools")),
            settings=self.settings,
        )
        reaper_lock = LeaderLock(self.redis, self.keys.lock("reaper"))
        await self.registry.refresh()
        self.tenants = directory = tenancy.TenantDirectory(self.redis, self.keys)
        self.quotas = quotas = TenantQuotas(self.redis, self.keys)
        consumer = StreamConsumer(
            redis=self.redis,
            blocking=self._blocking,  # type: ignore[arg-type]
            stream=self.keys.requests,
            group=keyspace.REQUESTS_GROUP,
            consumer=self.name,
            limiter=self._limiter,
            extra_streams=lambda: [self.keys.tenant_requests(t) for t in directory.names],
        )
        await ensure_group(self.redis, consumer.stream, consumer.group)
        log.info("scheduler %s ready", self.name)
        async with anyio.create_task_group() as tg:
            await tg.start(directory.run)
            tg.start_soon(self._refresh_loop)
            tg.start_soon(self._reaper_loop, reaper_lock)
            tg.start_soon(quotas.run, reaper_lock.hold)
            tg.start_soon(pools.run)
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
        registry = self.registry
        assert registry is not None

        async def refresh() -> None:
            await registry.refresh()
            self.waitline.capacity_changed()

        await lifecycle.supervised_loop(
            "registry refresh", refresh, interval=lambda: self.settings.registry_refresh_s,
            initial_delay=self.settings.registry_refresh_s, log=log,
        )

    async def _reclaim_loop(self, consumer: StreamConsumer, work: anyio.abc.TaskGroup) -> None:
        """Take over requests a dead replica read and never finished."""

        async def reclaim() -> None:
            stale = await consumer.claim_stale(int(self.settings.reclaim_idle_s * 1000))
            for entry_id, data, stream in stale:
                log.info("reclaimed request %s from a stalled replica", entry_id.decode())
                token = object()
                await self._limiter.acquire_on_behalf_of(token)
                work.start_soon(self._run_reclaimed, consumer, entry_id, data, token, stream)

        await lifecycle.supervised_loop(
            "reclaiming stale requests", reclaim,
            interval=lambda: min(self.settings.reclaim_idle_s / 2, 5.0), log=log,
        )

    async def _run_reclaimed(
        self, consumer: StreamConsumer, entry_id: bytes, data: bytes, token: object, stream: str = ""
    ) -> None:
        try:
            set_arrival(stream or consumer.stream)
            await self._handle_entry(entry_id, data)
            await consumer.ack(entry_id, stream=stream or None)
        finally:
            self._limiter.release_on_behalf_of(token)

    async def _reaper_loop(self, lock: LeaderLock) -> None:
        async def reap() -> None:
            if await lock.hold():
                await self.reap_dead_workers()

        await lifecycle.supervised_loop("reaper", reap, interval=1.0, initial_delay=1.0, log=log)

    async def reap_dead_workers(self) -> None:
        # Heartbeats and this cut-off are both on Redis's clock: no host's clock counts.
        dead = await lua.LAPSED_WORKERS.run(
            self.redis, [self.keys.workers], [int(self.settings.heartbeat_ttl_s * 1000)]
        )
        for raw in dead:
            await self._worker_lost(raw.decode())

    async def _worker_lost(self, wid: str) -> None:
        log.warning("worker %s stopped heartbeating; marking its sandboxes lost", wid, extra={"worker_id": wid})
        names = self.tenants.names if self.tenants is not None else ()
        held, msgs = await lua.DRAIN_WORKER.run(
            self.redis,
            [
                self.keys.worker_cmds(wid), self.keys.worker_cap(wid),
                self.keys.worker_sandboxes(wid), self.keys.worker_info(wid),
                *(self.keys.tenant_worker_cmds(wid, t) for t in names),
            ],
        )
        lost = records.to_lost(worker=wid, now=lifecycle.wall())
        async with self.redis.pipeline(transaction=False) as pipe:
            for raw in held:
                sid = raw.decode()
                pipe.hset(self.keys.sandbox(sid), mapping=lost)
                pipe.expire(self.keys.sandbox(sid), ENDED_RECORD_TTL_S)
                pipe.delete(self.keys.sandbox_env(sid))
                for index in self.keys.sandbox_indexes(sid):
                    pipe.zrem(index, sid)
            pipe.zrem(self.keys.workers, wid)
            await pipe.execute()
        err = protocol.error_reply(WorkerLost(f"worker {wid} stopped heartbeating", worker_id=wid))
        for stream, data in msgs:
            header = protocol.decode_header(data)
            tenant = self.keys.stream_tenant(stream.decode())
            if header is not None and tenancy.may_answer(tenant, header.id):
                await send_reply(self.redis, self.keys, header.id, header.reply_to, err)
        if self.registry is not None:
            self.registry.workers.pop(wid, None)

    # --------------------------------------------------------------- requests

    async def _handle_entry(self, entry_id: bytes, data: bytes) -> None:
        tenant = tenancy.sender(self.keys)
        try:
            env = protocol.decode_envelope(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            header = protocol.decode_header(data)
            log.warning(
                "malformed request %s: %s", entry_id.decode(), exc,
                extra={"request_id": header.id if header else None},
            )
            if header is not None and tenancy.may_answer(tenant, header.id):
                await send_reply(
                    self.redis, self.keys, header.id, header.reply_to,
                    protocol.error_reply(UnsupportedRequest(f"malformed or unknown request: {exc}")),
                )
            return
        if not tenancy.may_answer(tenant, env.id):
            log.warning("dropped a request of tenant %s with a request id not its own", tenant)
            return
        kind = type(env.body).__name__
        self.metrics.request(kind)
        lifecycle.log_context.set({"request_id": env.id})
        lease: once.Lease | None = None
        try:
            if isinstance(env.body, (CreateSandbox, BuildTemplate)):
                # The id names the request's key and its sandbox: its shape comes first.
                limits.check_id(env.id, "request id")
                # One sandbox per request id, however often the request is delivered.
                lease = await once.acquire(self.redis, self.keys, env)
                if lease is None:
                    return
            reply = await self._dispatch(env, lease, tenant)
        except HandBack:
            # Stopping while it waited for capacity: requeue it for a live replica, on
            # the stream it came on (which says whose it is).
            assert lease is not None
            await lease.release()
            stream = self.keys.tenant_requests(tenant) if tenant else self.keys.requests
            await self.redis.xadd(stream, {keyspace.FIELD: data})
            log.info("handed a waiting create back to the request stream", extra={"request_id": env.id})
            return
        except once.LeaseLost:
            log.warning("another delivery took over request %s", env.id, extra={"request_id": env.id})
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
            if lease is not None:
                await lease.settle(once.ANSWERED)
            await reply_to(self.redis, self.keys, env, reply)

    async def _dispatch(
        self, env: Envelope, lease: once.Lease | None = None, tenant: str | None = None,
    ) -> Reply | None:
        assert self.placer is not None
        body = env.body
        if tenant is not None:
            return await self._dispatch_tenant(env, tenant, lease)
        if isinstance(body, CreateSandbox):
            if body.spec.template:
                await templates.place_from_template(self.placer, env, body.spec, lease=lease)
            else:
                await self.placer.place(env, body.spec, lease=lease)
            return None  # the worker replies
        if isinstance(body, BuildTemplate):
            await templates.place_build(self.placer, env, body, lease=lease)
            return None
        raise UnsupportedRequest(f"the scheduler does not handle {type(body).__name__}")

    async def _dispatch_tenant(self, env: Envelope, tenant: str, lease: once.Lease | None) -> Reply | None:
        """A tenant's request: a create within its quota, nothing else."""
        assert self.placer is not None and self.quotas is not None
        body = env.body
        if not isinstance(body, CreateSandbox):
            raise PermissionDenied(f"tenant {tenant!r} may not send {type(body).__name__}; operators only")
        # Shares are sums: a negative or NaN shape must not reach the quota step.
        problems = limits.resource_problems(body.spec.resources)
        if problems:
            raise InvalidRequest("; ".join(problems))
        if body.spec.template:
            warm = await self._claim_warm(env, tenant, body.spec)
            if warm is not None:
                return warm
        sid = sandbox_id_for(env.id)
        assert tenancy_rules.owner(sid) == tenant
        await self.quotas.take(tenant, sid, body.spec)
        try:
            if body.spec.template:
                await templates.place_from_template(self.placer, env, body.spec, lease=lease)
            else:
                await self.placer.place(env, body.spec, lease=lease)
        except HandBack:
            self.quotas.placed(sid)  # still held: the create comes back on the same id
            raise
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.quotas.give(tenant, sid)
            raise
        self.quotas.placed(sid)
        return None  # the worker replies

    async def _claim_warm(self, env: Envelope, tenant: str, spec: SandboxSpec) -> SandboxCreated | None:
        """A warm sandbox of the tenant's own pool for this template, shape and network
        (hotbed.templates.set_pool ``tenant``), its quota taken at the claim; None when
        that pool has none ready. Pools of operators or other tenants are never used:
        their sandboxes' ids are not this tenant's."""
        quotas = self.quotas
        assert quotas is not None

        async def take(sid: str) -> None:
            assert tenancy_rules.owner(sid) == tenant
            await quotas.take(tenant, sid, spec)

        pool = pool_name(spec.template or "", spec.resources, spec.network, tenant)
        got = await claim_from(self.redis, self.keys, pool, spec, client_id=env.client, before=take)
        if got is not None:
            quotas.placed(got.sandbox_id)
        return got
