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

Lifetime and idle deadlines are wall-clock (``expires_at`` in the record) because
they must survive a worker restart; waits inside one process use the monotonic clock.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import msgspec
import redis.asyncio as aioredis

from daemon import lifecycle
from daemon.metrics import NULL, NullMetrics
from daemon.streams import StreamConsumer, ensure_group, leave_intake, send_reply
from hotbed import batching, limits, lua, protocol, records
from hotbed import keys as keyspace
from hotbed.batching import raise_first_error
from hotbed.connection import connect
from hotbed.errors import (
    HotbedError,
    ImageNotFound,
    InvalidRequest,
    Overloaded,
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
from workers.config import WorkerSettings
from workers.execution import HANDLED as EXECUTION_COMMANDS
from workers.execution import ExecutionService
from workers.gpu import GpuDetector, detector_for
from workers.images import ImageService
from workers.ports import PortTunnels, chain
from workers.runtimes.base import NetworkService, Runtime
from workers.sandboxes import Local, SandboxTable
from workers.snapshots import SnapshotManager

__all__ = ["Local", "WorkerAgent"]

log = logging.getLogger(__name__)

# Commands that may safely run again after a worker restart found them unacknowledged.
RETRYABLE = (StartSandbox, Terminate, ReadFile, ListFiles, WriteFile)

Handler = Callable[[Envelope], Awaitable[Reply]]

# Long-lived requests: at most this many per node and per sandbox, outside intake.
LONG_LIVED_PER_NODE = 256
LONG_LIVED_PER_SANDBOX = 16
# A command allowed to run longer than this is long-lived.
SHORT_S = 60.0
# A pull for a request that carries no deadline gives up after this long.
PULL_WITHOUT_DEADLINE_S = 600.0


def long_lived(body: Any) -> bool:
    if isinstance(body, (PtyOpen, WatchDir, DownloadTar, ProcessWait)):
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
        # Long-lived requests running, per sandbox; and their limits.
        self._long: dict[str, int] = {}
        self.long_lived_per_node = LONG_LIVED_PER_NODE
        self.long_lived_per_sandbox = LONG_LIVED_PER_SANDBOX
        # Exec, sessions, processes, PTYs, files via the in-sandbox guest agent.
        self.execution = ExecutionService(self.sandboxes, runtime)
        # Exposed ports: tunnels over the guest channel, one long-lived slot each.
        self.ports = PortTunnels(
            self.sandboxes, self.execution, slots=self._long_lived,
            bind=settings.port_bind, advertise=settings.port_host,
        )
        # A sandbox's guest channel and exposed ports close when it ends.
        self.sandboxes.guests = chain(self.execution, self.ports)
        self.metrics: NullMetrics = NULL
        self.snapshots = SnapshotManager(
            self.sandboxes, runtime, guests=self.execution,
            snapshot_dir=settings.snapshot_dir, snapshot_store=settings.snapshot_store,
            default_user=settings.default_user,
        )
        # Images held (advertised) and pulled on demand.
        self.images = ImageService(runtime, settings=settings, worker_id=self.id, keys=self.keys)
        self._handlers = self._handler_table()

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
        consumer = StreamConsumer(
            redis=self.redis,
            blocking=self._blocking,  # type: ignore[arg-type]
            stream=self.keys.worker_cmds(self.id),
            group=keyspace.WORKER_GROUP,
            consumer="agent",
            limiter=self._in_flight,
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
            tg.start_soon(self._heartbeat_loop)
            tg.start_soon(self._expiry_loop)
            tg.start_soon(self._health_loop)
            await tg.start(self.execution.run)
            await tg.start(self.ports.run)
            if isinstance(self.runtime, NetworkService):
                await tg.start(self.runtime.serve_network)
            tg.start_soon(self.snapshots.gc_loop)
            await tg.start(self.images.run)
            async with anyio.create_task_group() as work:
                for entry_id, data in await consumer.pending():
                    await self._in_flight.acquire_on_behalf_of(entry_id)
                    work.start_soon(self._replay, consumer, entry_id, data)
                task_status.started()
                await consumer.run(work, self._handle_entry, stop=self.stopping)
                # Intake stopped: let in-flight commands finish within the grace period.
                with anyio.move_on_after(self.settings.shutdown_grace_s) as grace:
                    while self._in_flight.borrowed_tokens or self._long:  # noqa: ASYNC110 - a limiter has no drained event
                        await anyio.sleep(0.05)
                if grace.cancelled_caught:
                    log.warning(
                        "%d commands still running after %.0fs; cancelling (they stay pending)",
                        self._in_flight.borrowed_tokens + sum(self._long.values()),
                        self.settings.shutdown_grace_s,
                    )
                    work.cancel_scope.cancel()
            if self.settings.drain_on_stop:
                with anyio.CancelScope(shield=True), anyio.move_on_after(60):
                    for sid in list(self.sandboxes):
                        await self.sandboxes.end(sid, reason="worker_drained")
            tg.cancel_scope.cancel()

    async def _replay(self, consumer: StreamConsumer, entry_id: bytes, data: bytes) -> None:
        """An entry this worker took before a restart: retry it if that is safe."""
        try:
            try:
                env = protocol.decode_envelope(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                env = None
            retry = env is not None and isinstance(env.body, RETRYABLE) and not (
                isinstance(env.body, WriteFile) and env.body.append  # twice would append twice
            )
            if env is not None and not retry:
                await send_reply(
                    self.redis, self.keys, env.id, env.reply_to,
                    protocol.error_reply(WorkerLost(
                        "the worker restarted while running this command; it may or may not "
                        "have run", worker_id=self.id,
                    )),
                )
            else:
                await self._handle_entry(entry_id, data)
            await consumer.ack(entry_id)
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
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.worker_info(self.id), protocol.encode(self.info))
            pipe.zadd(self.keys.workers, {self.id: int(lifecycle.wall() * 1000)})
            await pipe.execute()

    async def reconcile(self) -> None:
        """Adopt the sandboxes we still hold; remove containers nobody holds."""
        await self.sandboxes.reconcile(self.settings.default_user)

    # -------------------------------------------------------------- background

    async def _heartbeat_loop(self) -> None:
        await lifecycle.supervised_loop(
            "heartbeat", self._heartbeat, interval=lambda: self.settings.heartbeat_s,
            max_backoff=1.0, log=log,
        )

    async def _heartbeat(self) -> None:
        now = lifecycle.wall()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.keys.workers, {self.id: int(now * 1000)})
            pipe.exists(self.keys.worker_cap(self.id))
            self.sandboxes.write_activity(pipe)
            res = await pipe.execute()
        if not res[1]:
            # The scheduler declared us dead (missed heartbeats) and dropped our keys.
            log.warning("capacity record missing; re-registering", extra={"worker_id": self.id})
            self.sandboxes.clear()
            await self.reconcile()
            await self.register()

    async def _expiry_loop(self) -> None:
        await lifecycle.supervised_loop("expiry", self._expire, interval=0.25, log=log)

    async def _expire(self) -> None:
        now = lifecycle.wall()
        for s in list(self.sandboxes.values()):
            if now >= s.expires_at:
                await self._end_quietly(s.id, "timeout")
            elif s.idle_timeout and now - s.last_active >= s.idle_timeout:
                await self._end_quietly(s.id, "idle_timeout")

    async def _health_loop(self) -> None:
        """Sandboxes whose container died (out of memory, killed out of band) end here."""
        await lifecycle.supervised_loop(
            "health check", self._check_health, interval=lambda: self.settings.reconcile_s,
            initial_delay=self.settings.reconcile_s, log=log,
        )

    async def _check_health(self) -> None:
        # Only sandboxes known before listing: one started (or resumed) while the
        # list was in flight is not in it, and is not dead.
        known = {
            sid: local for sid, local in self.sandboxes.items()
            if not local.paused and not local.busy
        }
        running = {
            m.sandbox_id for m in await self.runtime.list_managed()
            if m.running and m.worker_id == self.id
        }
        for sid, local in known.items():
            if sid not in running and self.sandboxes.get(sid) is local and not (local.paused or local.busy):
                await self._end_quietly(sid, "died", state="failed")

    async def _end_quietly(self, sid: str, reason: str, *, state: str = "terminated") -> None:
        try:
            await self.sandboxes.end(sid, reason=reason, state=state)
        except lifecycle.TRANSIENT_ERRORS as exc:
            # Left for the next tick of the loop that found it.
            log.warning("could not end sandbox: %s", exc, extra={"sandbox_id": sid})

    # ------------------------------------------------------------------ commands

    async def _handle_entry(self, entry_id: bytes, data: bytes) -> None:
        try:
            env = protocol.decode_envelope(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            header = protocol.decode_header(data)
            log.warning("malformed command %s: %s", entry_id, exc, extra={"worker_id": self.id})
            if header is not None:
                await send_reply(
                    self.redis, self.keys, header.id, header.reply_to,
                    protocol.error_reply(UnsupportedRequest(f"malformed or unknown command: {exc}")),
                )
            return
        body = env.body
        kind = type(body).__name__
        self.metrics.request(kind)
        try:
            self._verify(env)
        except InvalidRequest as exc:
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

    async def _reserved(self, sid: str) -> records.Reservation | None:
        (held,) = raise_first_error(await batching.for_client(self.redis).execute(
            ("HGET", self.keys.worker_sandboxes(self.id), sid)
        ))
        return None if held is None else records.reservation_from_value(held)

    async def _verify_start(self, sid: str, resources: Resources, gpu_uuids: list[str] | None) -> None:
        """A start runs only what the scheduler reserved for it: the reservation it wrote
        with the dispatch, the same CPU, memory and GPUs (``None``: a build, whose
        command names no GPUs), within bounds."""
        problems = limits.resource_problems(resources)
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
        if sum(self._long.values()) >= self.long_lived_per_node:
            raise Overloaded(
                f"this worker runs {self.long_lived_per_node} long-lived requests already",
                sandbox_id=sid, worker_id=self.id,
            )
        if self._long.get(sid, 0) >= self.long_lived_per_sandbox:
            raise Overloaded(
                f"sandbox {sid} has {self.long_lived_per_sandbox} long-lived requests open already",
                sandbox_id=sid, worker_id=self.id,
            )
        self._long[sid] = self._long.get(sid, 0) + 1
        try:
            leave_intake()
            yield
        finally:
            left = self._long[sid] - 1
            if left:
                self._long[sid] = left
            else:
                del self._long[sid]

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
        return await handler(env)

    async def _start(self, env: Envelope) -> Reply:
        body: Any = env.body
        if body.sandbox_id not in self.sandboxes:
            await self._verify_start(body.sandbox_id, body.spec.resources, body.gpu_uuids)
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
        await self._verify_start(sid, body.spec.resources, None)
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
        return await self.snapshots.pause(body.sandbox_id)

    async def _resume(self, env: Envelope) -> Reply:
        body: Any = env.body
        return await self.snapshots.resume(body.sandbox_id)

    async def _update(self, env: Envelope) -> Reply:
        body: Any = env.body
        await self.sandboxes.update(body.sandbox_id, timeout=body.timeout, tags=body.tags)
        return protocol.Ack()

    async def _claimed(self, env: Envelope) -> Reply:
        body: Any = env.body
        return self.snapshots.claimed(body)

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
        spec = msgspec.structs.replace(spec, user=user)
        try:
            placed = self.sandboxes.placed(sid, cmd.gpu_uuids)
            try:
                await self.runtime.create(placed, spec)
            except ImageNotFound:
                # Pulled here rather than checked first: a start whose image is present
                # (nearly all) costs no extra Docker call.
                await self.images.ensure(spec.image, deadline=deadline or self._pull_deadline(), sandbox_id=sid)
                await self.runtime.create(placed, spec)
            self.execution.prepare(sid)
        except BaseException as exc:
            reason = exc.message if isinstance(exc, HotbedError) else f"{type(exc).__name__}: {exc}"
            with anyio.CancelScope(shield=True):
                await self.sandboxes.end(sid, reason=reason, state="failed")
            raise
        now = lifecycle.wall()
        await self.sandboxes.started(
            Local(
                id=sid,
                user=user,
                expires_at=now + spec.timeout,
                idle_timeout=spec.idle_timeout,
                last_active=now,
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
