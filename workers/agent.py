"""The worker agent: one per node. Registers, heartbeats, runs its command stream.

Life of a worker::

    open runtime -> reconcile (adopt or remove its containers) -> register capacity
    -> [heartbeat | command stream | expiry | health] until stopped

The agent is intake (the command stream), lifecycle (the loops above) and one table
from message type to handler. The sandboxes themselves are in its
:class:`~workers.sandboxes.SandboxTable` (``agent.sandboxes``), which the services
(:mod:`workers.execution`, :mod:`workers.snapshots`) share with it.

Capacity is reserved by the scheduler (``RESERVE_DISPATCH``) before a StartSandbox
reaches us; every way a sandbox ends (client, lifetime, idle, died, failed start) goes
through :meth:`SandboxTable.end <workers.sandboxes.SandboxTable.end>`, which releases it
exactly once (``RELEASE`` is idempotent) and leaves an ended record saying why.

Workers verify what reaches their stream, since anything that can write to it skips
the scheduler: ids have the shape :mod:`hotbed.limits` allows and every float is finite
before anything is looked up; a start (or a template build) must match the
reservation the scheduler wrote in the same Lua step as its dispatch
(``RESERVE_DISPATCH``), within bounds and this node's capacity, naming only GPUs that
reservation took; anything else is refused with ``InvalidRequest`` and runs nothing.

Intake: at most ``max_concurrency`` commands hold an intake slot. Long-lived ones (a
terminal, a watch, streaming output, a process wait, a command allowed over
``SHORT_S``) give theirs back once they hold one of ``LONG_LIVED_PER_NODE`` slots (at
most ``LONG_LIVED_PER_SANDBOX`` per sandbox); when those are taken they are answered
``Overloaded``. So no number of open shells takes the slots short commands need.

Heartbeats are stamped with Redis's clock (``HEARTBEAT``), as is the reaper's cut-off,
so no host's clock decides who is dead. A worker the reaper declared dead anyway (its
loop stalled, Redis failed over) takes its sandboxes back when it notices
(:meth:`SandboxTable.readopt <workers.sandboxes.SandboxTable.readopt>`): doubt
destroys nothing.
Tenants (hotbed.tenants) write their commands to a stream of their own per worker,
read with this worker's own; a command's tenant is the stream it came on. A tenant may
only send what :data:`TENANT_COMMANDS` lists, for its own sandboxes (``sb-T.*``), under
a request id of its own (``T.*``: its reply key); anything else is refused
(``PermissionDenied``), and a foreign request id is not answered at all.

Lifetime and idle deadlines are wall-clock (``expires_at`` in the record) because
they must survive a worker restart; waits inside one process use the monotonic clock.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import redis.asyncio as aioredis

from daemon import lifecycle, tenancy
from daemon.metrics import NULL, NullMetrics
from daemon.streams import StreamConsumer, ensure_group, leave_intake, send_reply, set_arrival
from hotbed import batching, clock, limits, lua, protocol, records, tenants
from hotbed import keys as keyspace
from hotbed.batching import raise_first_error
from hotbed.connection import connect
from hotbed.errors import (
    HotbedError,
    ImageNotFound,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    RequestTimeout,
    UnsupportedRequest,
    WorkerLost,
)
from hotbed.protocol import (
    BuildTemplate,
    DownloadTar,
    Envelope,
    ErrorReply,
    Exec,
    ExecInput,
    ExposePort,
    ListFiles,
    PauseSandbox,
    ProcessWait,
    PtyOpen,
    ReadFile,
    Reply,
    Resources,
    ResumeSandbox,
    SandboxClaimed,
    SandboxCreated,
    SandboxState,
    SessionRun,
    SnapshotSandbox,
    StartSandbox,
    Terminate,
    Terminated,
    UpdateSandbox,
    WatchDir,
    WorkerInfo,
    WriteFile,
)
from workers.admission import MemoryWatch, NodeMemory, StartGate
from workers.autopause import AutoPauser
from workers.config import WorkerSettings
from workers.execution import HANDLED as EXECUTION_COMMANDS
from workers.execution import ExecutionService
from workers.gpu import GpuDetector, detector_for
from workers.health import HealthSchedule, full_check_interval
from workers.images import ImageService
from workers.inflight import InFlight
from workers.ports import PortTunnels, chain
from workers.runtimes.base import DiskUsage, ExitReasons, NetworkService, Runtime
from workers.sandboxes import Local, SandboxTable
from workers.snapshot_peers import SnapshotPeers, replicate_loop
from workers.snapshots import SnapshotManager

__all__ = ["Local", "WorkerAgent"]

log = logging.getLogger(__name__)

# Commands that may safely run again after a worker restart found them unacknowledged.
RETRYABLE = (StartSandbox, Terminate, ReadFile, ListFiles, WriteFile)

Handler = Callable[[Envelope], Awaitable[Reply]]

# Commands that boot or restore a sandbox: they go through the start gate.
STARTS = (StartSandbox, BuildTemplate, ResumeSandbox)

# Long-lived requests: at most this many per node and per sandbox, outside intake.
LONG_LIVED_PER_NODE = 256
LONG_LIVED_PER_SANDBOX = 16
# A command allowed to run longer than this is long-lived.
SHORT_S = 60.0
# A health check that failed (dockerd restarting) is retried after this, backing off.
HEALTH_RETRY_S = 0.5
# How often the expiry loop ends the sandboxes whose lifetime or idle timeout has come.
EXPIRY_TICK_S = 0.25
# A pull for a request that carries no deadline gives up after this long.
PULL_WITHOUT_DEADLINE_S = 600.0
# What a tenant may send a worker, each naming one of its own sandboxes. Starts come
# from the scheduler; builds, snapshots and pool notices are operators' business.
# ExposePort too: only the owner of a sandbox (checked below, as for every tenant
# command) can open a port on it.
TENANT_COMMANDS = frozenset(EXECUTION_COMMANDS) | {Terminate, UpdateSandbox, PauseSandbox, ResumeSandbox, ExposePort}


def long_lived(body: Any) -> bool:
    # An ExecInput waits until the command has read it: at the command's pace.
    if isinstance(body, (PtyOpen, WatchDir, DownloadTar, ProcessWait, ExecInput)):
        return True
    if getattr(body, "stream_to", ""):
        return True
    if isinstance(body, Exec):
        return body.exec.timeout > SHORT_S
    if isinstance(body, SessionRun):
        return body.timeout > SHORT_S
    return False


class WorkerAgent:
    def __init__(
        self,
        settings: WorkerSettings,
        runtime: Runtime,
        *,
        gpu_detector: GpuDetector | None = None,
        redis: aioredis.Redis | None = None,
    ) -> None:
        """``redis``: a command client shared with other agents of this process (the
        simulated fleet), so their writes share pipelines; the agent does not close it."""
        self.settings = settings
        self.runtime = runtime
        self.id = settings.resolved_id()
        self.keys = keyspace.Keys(settings.prefix)
        self.sandboxes = SandboxTable(
            runtime, worker_id=self.id, prefix=settings.prefix, keys=self.keys
        )
        self.stopping = anyio.Event()
        self.stopped = anyio.Event()
        self.info = WorkerInfo(
            id=self.id,
            host=socket.gethostname(),
            runtime=runtime.name,
            kind=runtime.kind,
            # A runtime that does not say counts as unisolated.
            isolated=bool(getattr(runtime, "isolated", False)),
            cpu_millis=settings.resolved_cpu_millis(),
            memory_mb=settings.resolved_memory_mb(),
            tags=dict(settings.tags),
            started_at=lifecycle.wall(),
            gpus=(gpu_detector or detector_for(settings.gpu_detect, settings.gpus)).detect(),
            registries=list(settings.registries),
        )
        self._redis: aioredis.Redis | None = None
        self._shared_redis = redis
        self._blocking: aioredis.Redis | None = None
        self._in_flight = anyio.CapacityLimiter(settings.max_concurrency)
        # Starts and restores run at most this many at once, outside intake.
        self.starts = StartGate(
            settings.resolved_max_starts(), queue_limit=settings.start_queue, worker_id=self.id
        )
        self.memory: MemoryWatch | None = None
        # Sandboxes (and builds) being started now: the health check leaves their
        # containers alone until they are in the table.
        self._starting = InFlight()
        # Long-lived requests running, per sandbox; and their limits.
        self._long = InFlight()
        self.long_lived_per_node = LONG_LIVED_PER_NODE
        self.long_lived_per_sandbox = LONG_LIVED_PER_SANDBOX
        # When to look for dead sandboxes: a sandbox whose guest channel ends unasked
        # is looked at at once, the whole node at an interval that grows with it.
        self.health = HealthSchedule()
        # Exec, sessions, processes, PTYs, files via the in-sandbox guest agent.
        self.execution = ExecutionService(self.sandboxes, runtime, on_channel_lost=self.health.suspect)
        # Exposed ports: tunnels over the guest channel, one long-lived slot each.
        self.ports = PortTunnels(
            self.sandboxes, self.execution, slots=self._long_lived,
            bind=settings.port_bind, advertise=settings.port_host,
        )
        # A sandbox's guest channel and exposed ports close when it ends.
        self.sandboxes.guests = chain(self.execution, self.ports)
        self.metrics: NullMetrics = NULL
        # This node's snapshot endpoint, and its copies of the other nodes' snapshots.
        self.snapshot_peers = SnapshotPeers(
            Path(settings.snapshot_dir), keys=self.keys, worker_id=self.id,
            listen=settings.snapshot_serve, url=settings.snapshot_url, token=settings.snapshot_token,
        )
        self.snapshots = SnapshotManager(
            self.sandboxes, runtime, guests=self.execution,
            snapshot_dir=settings.snapshot_dir, snapshot_store=settings.snapshot_store,
            default_user=settings.default_user, peers=self.snapshot_peers,
        )
        # Idle sandboxes checkpointed to disk, resumed by their next request.
        self.sandboxes.auto_pause_default = settings.auto_pause_after
        # The node's memory, read and judged in one place for admission and auto-pause;
        # a simulated or unisolated node declares exactly what it offers: none.
        self.node_memory = NodeMemory(
            cgroup_parent=settings.cgroup_parent, headroom_mb=settings.resolved_memory_headroom_mb(),
            pressure_mb=settings.resolved_memory_pressure_mb(), psi_limit=settings.resolved_memory_psi_limit(),
        ) if runtime.kind == "real" else None
        self.autopause = AutoPauser(
            self.sandboxes, self.snapshots, check_s=settings.auto_pause_check_s, memory=self.node_memory,
        )
        self.sandboxes.waker = self.autopause
        # Images held (advertised) and pulled on demand.
        self.images = ImageService(runtime, settings=settings, worker_id=self.id, keys=self.keys)
        self._handlers = self._handler_table()
        self.tenants: tenancy.TenantDirectory | None = None

    @property
    def redis(self) -> aioredis.Redis:
        assert self._redis is not None, "worker not started"
        return self._redis

    # ----------------------------------------------------------------- lifecycle

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until :attr:`stopping` is set, then shut down in order."""
        self._redis = self._shared_redis or connect(self.settings.redis_url)
        self._blocking = connect(self.settings.redis_url, blocking=True)
        self.sandboxes.bind(self._redis)
        self.images.bind(self._redis)
        try:
            await self.runtime.open()
            try:
                async with self.snapshot_peers.serving(self._redis):
                    self.info = msgspec.structs.replace(self.info, snapshot_url=self.snapshot_peers.url)
                    await self._serve(task_status)
            finally:
                with anyio.CancelScope(shield=True):
                    await self.runtime.aclose()
        finally:
            with anyio.CancelScope(shield=True):
                if self._shared_redis is None:
                    await self._redis.aclose()
                await self._blocking.aclose()
            self.stopped.set()

    async def _serve(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        self.tenants = directory = tenancy.TenantDirectory(self.redis, self.keys)
        await directory.refresh()
        consumer = StreamConsumer(
            redis=self.redis,
            blocking=self._blocking,  # type: ignore[arg-type]
            stream=self.keys.worker_cmds(self.id),
            group=keyspace.WORKER_GROUP,
            consumer="agent",
            limiter=self._in_flight,
            extra_streams=lambda: [self.keys.tenant_worker_cmds(self.id, t) for t in directory.names],
        )
        await ensure_group(self.redis, consumer.stream, consumer.group)
        await self.reconcile()
        await self.register()
        log.info(
            "worker %s ready: runtime=%s cpu=%.1f memory=%dMiB",
            self.id, self.runtime.name, self.info.cpu_millis / 1000, self.info.memory_mb,
            extra={"worker_id": self.id},
        )
        async with anyio.create_task_group() as tg:
            await tg.start(directory.run)
            tg.start_soon(self._heartbeat_loop)
            tg.start_soon(self._expiry_loop)
            tg.start_soon(self._health_loop)
            if isinstance(self.runtime, DiskUsage):
                tg.start_soon(self._disk_loop, self.runtime)
            tg.start_soon(self._memory_loop)
            await tg.start(self.execution.run)
            await tg.start(self.ports.run)
            if isinstance(self.runtime, NetworkService):
                await tg.start(self.runtime.serve_network)
            tg.start_soon(self.snapshots.gc_loop)
            tg.start_soon(functools.partial(
                replicate_loop, self.snapshot_peers, self.snapshots.ensure_local,
                copies=self.settings.snapshot_copies,
            ))
            await tg.start(self.autopause.run)
            await tg.start(self.images.run)
            async with anyio.create_task_group() as work:
                for entry_id, data, stream in await consumer.pending():
                    await self._in_flight.acquire_on_behalf_of(entry_id)
                    work.start_soon(self._replay, consumer, entry_id, data, stream)
                task_status.started()
                await consumer.run(work, self._handle_entry, stop=self.stopping)
                # Intake stopped: let in-flight commands finish within the grace period.
                with anyio.move_on_after(self.settings.shutdown_grace_s) as grace:
                    while self._in_flight.borrowed_tokens or self._long:  # noqa: ASYNC110 - a limiter has no drained event
                        await anyio.sleep(0.05)
                if grace.cancelled_caught:
                    log.warning(
                        "%d commands still running after %.0fs; cancelling (they stay pending)",
                        self._in_flight.borrowed_tokens + self._long.total(),
                        self.settings.shutdown_grace_s,
                    )
                    work.cancel_scope.cancel()
            if self.settings.drain_on_stop:
                with anyio.CancelScope(shield=True), anyio.move_on_after(60):
                    for sid in list(self.sandboxes):
                        await self.sandboxes.end(sid, reason="worker_drained")
            tg.cancel_scope.cancel()

    async def _replay(self, consumer: StreamConsumer, entry_id: bytes, data: bytes, stream: str = "") -> None:
        """An entry this worker took before a restart: retry it if that is safe."""
        set_arrival(stream or consumer.stream)
        try:
            try:
                env = protocol.decode_envelope(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                env = None
            retry = env is not None and isinstance(env.body, RETRYABLE) and not (
                isinstance(env.body, WriteFile) and env.body.append  # twice would append twice
            )
            if env is not None and not retry and tenancy.may_answer(tenancy.sender(self.keys), env.id):
                await send_reply(
                    self.redis, self.keys, env.id, env.reply_to,
                    protocol.error_reply(WorkerLost(
                        "the worker restarted while running this command; it may or may not "
                        "have run", worker_id=self.id,
                    )),
                )
            elif env is None or retry:
                await self._handle_entry(entry_id, data)
            await consumer.ack(entry_id, stream=stream or None)
        finally:
            self._in_flight.release_on_behalf_of(entry_id)

    async def register(self) -> None:
        """Publish capacity, recomputed from the reservations we still hold."""
        gpu_ids = [g.uuid for g in self.info.gpus]
        await lua.REGISTER.run(
            self.redis,
            [self.keys.worker_cap(self.id), self.keys.worker_sandboxes(self.id)],
            [self.info.cpu_millis, self.info.memory_mb, *gpu_ids],
        )
        await self.redis.set(self.keys.worker_info(self.id), protocol.encode(self.info))
        await self._stamp_heartbeat()

    async def reconcile(self) -> None:
        """Adopt the sandboxes we still hold; remove containers nobody holds."""
        await self.sandboxes.reconcile(self.settings.default_user)

    # -------------------------------------------------------------- background

    async def _heartbeat_loop(self) -> None:
        await lifecycle.supervised_loop(
            "heartbeat", self._heartbeat, interval=lambda: self.settings.heartbeat_s,
            max_backoff=1.0, log=log,
        )

    async def _stamp_heartbeat(self) -> None:
        # Stamped with Redis's clock (HEARTBEAT), which the reaper's cut-off uses too;
        # the stamp it returns keeps this process's clock (deadlines, records) on Redis's.
        before = clock.PROCESS.local()
        ms = await lua.HEARTBEAT.run(self.redis, [self.keys.workers], [self.id])
        clock.PROCESS.observe(int(ms) / 1000, before=before, after=clock.PROCESS.local())

    async def _heartbeat(self) -> None:
        await self._stamp_heartbeat()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(self.keys.worker_cap(self.id))
            self.sandboxes.write_activity(pipe)
            res = await pipe.execute()
        if not res[0]:
            # The reaper declared us dead (missed heartbeats) and dropped our keys. We
            # still run our sandboxes: take them back rather than destroy anything.
            log.warning("capacity record missing; re-registering", extra={"worker_id": self.id})
            await self.sandboxes.readopt()
            await self.reconcile()
            await self.register()

    async def _memory_loop(self) -> None:
        """Advertised memory kept within what the node really has (workers.admission);
        only where sandboxes are real gVisor containers: a simulated or unisolated node
        declares exactly what it offers."""
        if self.node_memory is None:
            return
        engine = getattr(self.runtime, "engine", None)
        # The docker runtime resolves its parent cgroup when it opens.
        self.node_memory.cgroup_parent = (
            getattr(engine, "cgroup_parent", "") or self.settings.cgroup_parent or "/hotbed"
        )
        self.memory = MemoryWatch(
            self.redis, self.keys.worker_cap(self.id), self.node_memory,
            overcommit=self.settings.resolved_memory_overcommit(), worker_id=self.id,
        )
        memory = self.memory
        await lifecycle.supervised_loop(
            "memory watch", lambda: memory.check(self.info.memory_mb),
            interval=lambda: self.settings.heartbeat_s, log=log,
        )

    async def _expiry_loop(self) -> None:
        await lifecycle.supervised_loop("expiry", self._expire, interval=EXPIRY_TICK_S, log=log)

    async def _expire(self) -> None:
        now = lifecycle.wall()
        for s in self.sandboxes.due(now):
            if s.busy:
                # Mid-checkpoint or mid-restore: ended by a later tick.
                self.sandboxes.arm(s, now + EXPIRY_TICK_S)
            elif now >= s.expires_at:
                await self._end_quietly(s.id, "timeout")
            else:
                await self._end_quietly(s.id, "idle_timeout")

    async def _health_loop(self) -> None:
        """Sandboxes whose container died (out of memory, killed out of band) end here."""
        self.health.full_done(self.settings.reconcile_s)
        # The schedule does the waiting; the loop's own interval only paces retries.
        await lifecycle.supervised_loop(
            "health check", self._health_step,
            interval=lambda: min(HEALTH_RETRY_S, self.settings.reconcile_s), log=log,
        )

    async def _health_step(self) -> None:
        suspects = await self.health.wait()
        if suspects is None:
            await self._check_health()
            self.health.full_done(full_check_interval(self.settings.reconcile_s, len(self.sandboxes)))
            return
        for sid in suspects:
            local = self.sandboxes.get(sid)
            if local is None or local.paused or local.busy:
                continue  # ended, or mid-checkpoint or restore (which drops the channel)
            try:
                alive = await self.runtime.is_alive(sid)
            except lifecycle.TRANSIENT_ERRORS as exc:
                # dockerd restarting breaks every channel at once: the rest wait for
                # the next full look rather than each failing the same way.
                log.info("could not look at suspected sandboxes: %s", exc, extra={"sandbox_id": sid})
                return
            if not alive:
                await self._end_dead(sid, local)

    async def _end_dead(self, sid: str, local: Local) -> None:
        """End a sandbox found dead, unless it changed while it was looked at (ended,
        replaced, or a pause or restore took its container away on purpose)."""
        if self.sandboxes.get(sid) is local and not (local.paused or local.busy):
            await self._end_quietly(sid, await self._death_reason(sid), state="failed")

    async def _check_health(self) -> None:
        # Only sandboxes known before listing: one started (or resumed) while the
        # list was in flight is not in it, and is not dead.
        known = {
            sid: local for sid, local in self.sandboxes.items()
            if not local.paused and not local.busy
        }
        starting = self._starting.ids()
        held = self.sandboxes.held()
        managed = [
            m for m in await self.runtime.list_managed()
            if m.worker_id == self.id and m.prefix == self.settings.prefix
        ]
        running = {m.sandbox_id for m in managed if m.running}
        for sid, local in known.items():
            if sid not in running:
                await self._end_dead(sid, local)
        # A container nobody holds: a start whose clean-up failed (dockerd restarting
        # under it) left it. Not one being started (listed before it joined the table),
        # nor one held when listed or since (an end removes the container after the
        # sandbox has left the table).
        for m in managed:
            sid = m.sandbox_id
            if (sid and sid not in held and not self.sandboxes.holds(sid)
                    and sid not in starting and sid not in self._starting):
                log.warning("removing a container nobody holds", extra={"sandbox_id": sid, "worker_id": self.id})
                try:
                    await self.runtime.destroy(sid)
                except lifecycle.TRANSIENT_ERRORS as exc:
                    log.warning("could not remove it: %s", exc, extra={"sandbox_id": sid})

    async def _disk_loop(self, runtime: DiskUsage) -> None:
        """Sandboxes whose writes hold more of the host's disk than a sandbox may end here."""
        await lifecycle.supervised_loop(
            "disk check", lambda: self._check_disk(runtime), interval=lambda: self.settings.disk_check_s,
            initial_delay=self.settings.disk_check_s, log=log,
        )

    async def _check_disk(self, runtime: DiskUsage) -> None:
        limit_mb = self.settings.sandbox_disk_mb
        if not limit_mb:
            return
        # Not one in a checkpoint or restore: the next tick looks at it.
        known = {sid: local for sid, local in self.sandboxes.items() if not (local.paused or local.busy)}
        for sid, used in (await runtime.disk_usage(list(known))).items():
            if used > limit_mb << 20 and self.sandboxes.get(sid) is known[sid]:
                log.warning("sandbox wrote %d MiB to the host's disk, past its %d MiB", used >> 20, limit_mb,
                            extra={"sandbox_id": sid, "worker_id": self.id})
                await self._end_quietly(
                    sid, f"disk full: its writes held {used >> 20} MiB, past this node's {limit_mb} MiB "
                         "per sandbox", state="failed",
                )

    async def _death_reason(self, sid: str) -> str:
        """``died``, with the runtime's reason when it is one worth telling (out of memory)."""
        if not isinstance(self.runtime, ExitReasons):
            return "died"
        try:
            why = await self.runtime.exit_reason(sid)
        except lifecycle.TRANSIENT_ERRORS:
            return "died"
        return f"died: {why}" if why and why.startswith("out of memory") else "died"

    async def _end_quietly(self, sid: str, reason: str, *, state: str = "terminated") -> None:
        try:
            await self.sandboxes.end(sid, reason=reason, state=state)
        except lifecycle.TRANSIENT_ERRORS as exc:
            # Left for the next tick of the loop that found it.
            log.warning("could not end sandbox: %s", exc, extra={"sandbox_id": sid})

    # ------------------------------------------------------------------ commands

    async def _handle_entry(self, entry_id: bytes, data: bytes) -> None:
        tenant = tenancy.sender(self.keys)
        try:
            env = protocol.decode_envelope(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            header = protocol.decode_header(data)
            log.warning("malformed command %s: %s", entry_id, exc, extra={"worker_id": self.id})
            if header is not None and tenancy.may_answer(tenant, header.id):
                await send_reply(
                    self.redis, self.keys, header.id, header.reply_to,
                    protocol.error_reply(UnsupportedRequest(f"malformed or unknown command: {exc}")),
                )
            return
        if not tenancy.may_answer(tenant, env.id):
            log.warning("dropped a command of tenant %s with a request id not its own", tenant)
            return
        body = env.body
        kind = type(body).__name__
        self.metrics.request(kind)
        try:
            self._verify(env)
            if tenant is not None:
                self._verify_tenant(env, tenant)
        except (InvalidRequest, PermissionDenied) as exc:
            log.warning("refused %s: %s", kind, exc, extra={"worker_id": self.id})
            exc.worker_id = self.id
            await self._reply(env, protocol.error_reply(exc))
            return
        lifecycle.log_context.set({"request_id": env.id, "sandbox_id": getattr(body, "sandbox_id", None)})
        if env.deadline and lifecycle.wall() > env.deadline:
            if isinstance(body, StartSandbox) and await self._reserved(body.sandbox_id) is not None:
                # The client gave up: starting it now would only leak it until its timeout.
                await self.sandboxes.end(body.sandbox_id, reason="request deadline passed before start", state="failed")
            await self._reply(env, protocol.error_reply(RequestTimeout("request expired in the queue")))
            return
        try:
            reply: Reply = await self._dispatch(env)
        except HotbedError as exc:
            if exc.worker_id is None:
                exc.worker_id = self.id
            reply = protocol.error_reply(exc)
        except Exception as exc:
            log.exception("command %s failed", type(body).__name__, extra={"worker_id": self.id})
            reply = protocol.error_reply(exc)
        if isinstance(reply, ErrorReply):
            self.metrics.error(kind, reply.code)
        await self._reply(env, reply)

    async def _reply(self, env: Envelope, body: Reply) -> None:
        # A notice (SandboxClaimed, a pool refill) has no reply_to: nobody waits.
        await send_reply(self.redis, self.keys, env.id, env.reply_to, body)

    def _verify(self, env: Envelope) -> None:
        """Shapes first: an id goes into key names and Docker API paths, a float into
        deadlines and sleeps."""
        body: Any = env.body
        limits.check_id(env.id, "request id")
        for field in ("sandbox_id", "build_id"):
            value = getattr(body, field, "")
            if value:
                limits.check_id(value, field)
        if isinstance(body, StartSandbox):
            if body.snapshot:
                limits.check_snapshot(body.snapshot)
            if body.pool:
                limits.check_pool(body.pool)
        limits.check_finite(body)

    def _verify_tenant(self, env: Envelope, tenant: str) -> None:
        """A tenant's command: one it may send, for a sandbox of its own."""
        body: Any = env.body
        if type(body) not in TENANT_COMMANDS:
            raise PermissionDenied(f"tenant {tenant!r} may not send {type(body).__name__}; operators only")
        sid = getattr(body, "sandbox_id", "")
        if tenants.owner(sid) != tenant:
            raise PermissionDenied(f"sandbox {sid} is not tenant {tenant!r}'s", sandbox_id=sid)

    async def _reserved(self, sid: str) -> records.Reservation | None:
        (held,) = raise_first_error(await batching.for_client(self.redis).execute(
            ("HGET", self.keys.worker_sandboxes(self.id), sid)
        ))
        return None if held is None else records.reservation_from_value(held)

    async def _verify_start(
        self, sid: str, resources: Resources, gpu_uuids: list[str] | None, *, allow_unisolated: bool,
    ) -> None:
        """A start runs only what the scheduler reserved for it: the reservation it wrote
        with the dispatch, the same CPU, memory and GPUs (``None``: a build, whose
        command names no GPUs), within bounds; on an unisolated worker, only a request
        that opted out of isolation."""
        problems = limits.resource_problems(resources)
        if not self.info.isolated and not allow_unisolated:
            problems.append("this worker does not isolate sandboxes and the request did not allow_unisolated")
        if resources.millicpu > self.info.cpu_millis:
            problems.append(f"cpu {resources.cpu:g} is over this worker's {self.info.cpu_millis / 1000:g}")
        if resources.memory_mb > self.info.memory_mb:
            problems.append(f"memory_mb {resources.memory_mb} is over this worker's {self.info.memory_mb}")
        if problems:
            raise InvalidRequest("; ".join(problems), sandbox_id=sid, worker_id=self.id)
        held = await self._reserved(sid)
        if held is None:
            raise InvalidRequest(
                f"no reservation for sandbox {sid} on this worker: starts come from the scheduler",
                sandbox_id=sid, worker_id=self.id,
            )
        gpus_differ = gpu_uuids is not None and sorted(held.gpus) != sorted(gpu_uuids)
        if (held.millicpu, held.memory_mb) != (resources.millicpu, resources.memory_mb) or gpus_differ:
            raise InvalidRequest(
                f"start of {sid} does not match its reservation (cpu/memory/GPUs)",
                sandbox_id=sid, worker_id=self.id,
            )

    @contextmanager
    def _long_lived(self, sid: str) -> Iterator[None]:
        """A slot for a long-lived request, instead of its intake slot."""
        if self._long.total() >= self.long_lived_per_node:
            raise Overloaded(
                f"this worker runs {self.long_lived_per_node} long-lived requests already",
                sandbox_id=sid, worker_id=self.id,
            )
        if self._long.count(sid) >= self.long_lived_per_sandbox:
            raise Overloaded(
                f"sandbox {sid} has {self.long_lived_per_sandbox} long-lived requests open already",
                sandbox_id=sid, worker_id=self.id,
            )
        with self._long.holding(sid):
            leave_intake()
            yield

    def _handler_table(self) -> dict[type, Handler]:
        """Message type -> handler. Every command a worker takes is in it."""
        table: dict[type, Handler] = {t: self.execution.dispatch for t in EXECUTION_COMMANDS}
        table.update({
            StartSandbox: self._start,
            Terminate: self._terminate,
            BuildTemplate: self._build,
            SnapshotSandbox: self._snapshot,
            PauseSandbox: self._pause,
            ResumeSandbox: self._resume,
            SandboxClaimed: self._claimed,
            ExposePort: self.ports.expose,
            UpdateSandbox: self._update,
        })
        return table

    async def _dispatch(self, env: Envelope) -> Reply:
        handler = self._handlers.get(type(env.body))
        if handler is None:
            raise UnsupportedRequest(f"worker does not handle {type(env.body).__name__}")
        if long_lived(env.body):
            with self._long_lived(env.body.sandbox_id):  # type: ignore[union-attr]
                return await handler(env)
        if isinstance(env.body, STARTS):
            return await self._admitted(env, handler)
        return await handler(env)

    async def _admitted(self, env: Envelope, handler: Handler) -> Reply:
        """A start, restore, build or resume: it waits for a start slot (in order, until
        its deadline) without holding an intake slot, so control traffic never queues
        behind it. Refused (Overloaded) when it could not start in time, its
        reservation given back."""
        body: Any = env.body
        sid = getattr(body, "sandbox_id", "") or getattr(body, "build_id", "") or f"build-{env.id}"
        pool = getattr(body, "pool", "")
        if isinstance(body, StartSandbox) and sid in self.sandboxes:
            return await handler(env)  # a redelivered start of one we run: nothing to do
        leave_intake()
        entered = False
        with self._starting.holding(sid):
            try:
                async with self.starts.admitted_start(
                    deadline=env.deadline, sandbox_id=sid, background=bool(pool) and not env.reply_to,
                ):
                    entered = True
                    return await handler(env)
            except Overloaded as exc:
                if not entered and not isinstance(body, ResumeSandbox):
                    with anyio.CancelScope(shield=True):
                        await self._refused_start(sid, pool, exc.message)
                raise

    async def _refused_start(self, sid: str, pool: str, reason: str) -> None:
        if await self._reserved(sid) is not None:
            await self.sandboxes.end(sid, reason=reason, state="failed", made=False)
        if pool:
            await self.redis.zrem(self.keys.pool_warming(pool), sid)

    async def _start(self, env: Envelope) -> Reply:
        body: Any = env.body
        if body.sandbox_id not in self.sandboxes:
            await self._verify_start(
                body.sandbox_id, body.spec.resources, body.gpu_uuids,
                allow_unisolated=body.spec.allow_unisolated,
            )
            problems = limits.spec_problems(body.spec)
            if problems:
                raise InvalidRequest("; ".join(problems), sandbox_id=body.sandbox_id, worker_id=self.id)
        if body.template is not None or body.snapshot or body.pool:
            return await self.snapshots.start(body)
        return await self.start_sandbox(body, deadline=env.deadline)

    async def _terminate(self, env: Envelope) -> Reply:
        body: Any = env.body
        await self.sandboxes.end(body.sandbox_id, reason=body.reason, must_exist=True)
        return Terminated(sandbox_id=body.sandbox_id)

    async def _build(self, env: Envelope) -> Reply:
        body: Any = env.body
        sid = body.build_id or f"build-{env.id}"
        await self._verify_start(sid, body.spec.resources, None, allow_unisolated=body.spec.allow_unisolated)
        try:
            await self.images.ensure(body.spec.image, deadline=env.deadline or self._pull_deadline(), sandbox_id=sid)
        except BaseException as exc:
            reason = exc.message if isinstance(exc, HotbedError) else f"{type(exc).__name__}: {exc}"
            with anyio.CancelScope(shield=True):
                await self.sandboxes.end(sid, reason=reason, state="failed")
            raise
        return await self.snapshots.build(env, body)

    async def _snapshot(self, env: Envelope) -> Reply:
        body: Any = env.body
        return await self.snapshots.snapshot(body)

    async def _pause(self, env: Envelope) -> Reply:
        body: Any = env.body
        await self.autopause.settle(body.sandbox_id)
        return await self.snapshots.pause(body.sandbox_id)

    async def _resume(self, env: Envelope) -> Reply:
        body: Any = env.body
        await self.autopause.resume(body.sandbox_id)
        return SandboxState(sandbox_id=body.sandbox_id, state="running")

    async def _update(self, env: Envelope) -> Reply:
        body: Any = env.body
        await self.sandboxes.update(body.sandbox_id, timeout=body.timeout, tags=body.tags)
        return protocol.Ack()

    async def _claimed(self, env: Envelope) -> Reply:
        body: Any = env.body
        return await self.snapshots.claimed(body)

    # --------------------------------------------------------------- sandboxes

    @staticmethod
    def _pull_deadline() -> float:
        """How long a pull may take for a request without a deadline of its own."""
        return lifecycle.wall() + PULL_WITHOUT_DEADLINE_S

    async def start_sandbox(self, cmd: StartSandbox, *, deadline: float = 0.0) -> SandboxCreated:
        """Boot ``cmd``'s sandbox, pulling its image first if it is missing (before
        ``deadline``, the request's, wall clock; 0: none)."""
        sid, spec = cmd.sandbox_id, cmd.spec
        if sid in self.sandboxes:
            # A redelivered start of a sandbox we already run.
            return SandboxCreated(sandbox_id=sid, worker_id=self.id, path=cmd.path)
        started = anyio.current_time()
        user = spec.user or self.settings.default_user
        # The container gets the image's env only (workers.execution.with_sandbox_env).
        env, spec = spec.env, msgspec.structs.replace(spec, user=user, env={})
        try:
            placed = self.sandboxes.placed(sid, cmd.gpu_uuids)
            try:
                await self.runtime.create(placed, spec)
            except ImageNotFound:
                # Pulled here rather than checked first: a start whose image is present
                # (nearly all) costs no extra Docker call.
                await self.images.ensure(spec.image, deadline=deadline or self._pull_deadline(), sandbox_id=sid)
                await self.runtime.create(placed, spec)
            # Started means serving: the guest agent answers (~0.5 s after docker start).
            await self.execution.wait_ready(sid)
        except BaseException as exc:
            reason = exc.message if isinstance(exc, HotbedError) else f"{type(exc).__name__}: {exc}"
            with anyio.CancelScope(shield=True):
                await self.sandboxes.end(sid, reason=reason, state="failed")
            raise
        now = lifecycle.wall()
        after, pausable = self.sandboxes.pause_policy(spec.auto_pause_after)
        await self.sandboxes.started(
            Local(
                id=sid,
                user=user,
                expires_at=now + spec.timeout,
                idle_timeout=spec.idle_timeout,
                last_active=now,
                auto_pause_after=after,
                pausable=pausable,
                env=dict(env),
            ),
            records.to_started(now=now, path=cmd.path, worker=self.id),
        )
        startup = anyio.current_time() - started
        self.metrics.create(cmd.path, startup)
        log.info("started sandbox in %.3fs", startup, extra={"sandbox_id": sid, "worker_id": self.id})
        return SandboxCreated(
            sandbox_id=sid, worker_id=self.id, path=cmd.path, startup_s=startup,
            gpu_uuids=list(cmd.gpu_uuids),
        )
