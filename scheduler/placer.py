"""Placement: reserve capacity on a worker and hand it the start command.

A create is placed with one round trip in the common case: the sandbox record write
and the ``RESERVE_DISPATCH`` script (capacity + the worker's start command, atomic on
the worker's hash tag) go in one pipeline; the worker replies to the client directly.
Requests that find no capacity wait in line (scheduler.waitline: strictly first come,
first placed per GPU model; ordered retries for CPU), retrying as the registry
refreshes, until their deadline (CapacityExhausted); when the scheduler stops they are
handed back (HandBack). Requests no live worker could ever take fail at once
(NoMatchingWorker). A GPU start command names the GPUs the placer picked;
RESERVE_DISPATCH takes exactly those. A client's create carries its request's lease
(:mod:`scheduler.once`): it is dispatched only while that lease holds, and the dispatch
settles it, so a create is placed once however often it is delivered.

Images: workers that advertise holding the sandbox's image are tried first; while any
worker could get it (holds it, may hold it, or pulls from its registry) the others are
not tried at all, so a busy holder makes the request wait rather than land where the
image cannot be had. The chosen worker pulls a missing image within the request's
deadline (:mod:`workers.images`); ImageNotFound comes from a worker that tried.

The :class:`Placer` is what intake, the template paths and the pool controller share:
it needs the Redis client, the key schema, the worker registry, the wait line and the
placement settings, and nothing of the daemon around it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from itertools import chain

import anyio
import msgspec
import redis.asyncio as aioredis

from daemon import lifecycle
from daemon.metrics import NULL, NullMetrics
from hotbed import batching, limits, lua, protocol, records
from hotbed.batching import raise_first_error
from hotbed.connection import is_cluster
from hotbed.errors import CapacityExhausted, InvalidRequest, NoMatchingWorker
from hotbed.keys import Keys, sandbox_id_for
from hotbed.protocol import Envelope, Message, SandboxSpec, StartSandbox
from hotbed.records import SandboxRecord
from scheduler.config import SchedulerSettings
from scheduler.once import RENEW_S, Lease, LeaseLost
from scheduler.placement import WorkerView, could_ever, parse_gpu, rank
from scheduler.registry import WorkerRegistry
from scheduler.waitline import HandBack, WaitLine, wait_class


def validate(spec: SandboxSpec) -> None:
    """Bad input gets InvalidRequest, never a traceback (the worker checks again)."""
    problems = limits.spec_problems(spec)
    parse_gpu(spec.resources.gpu)
    if problems:
        raise InvalidRequest("; ".join(problems))


class Placer:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        registry: WorkerRegistry,
        waitline: WaitLine,
        *,
        settings: SchedulerSettings,
        metrics: NullMetrics = NULL,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.registry = registry
        self.waitline = waitline
        # Replaced on a settings reload (placement policy, GPU workers for CPU work).
        self.settings = settings
        self.metrics = metrics
        self.placed = 0

    async def place(
        self, env: Envelope, spec: SandboxSpec, *,
        make_start: Callable[[str], Message] | None = None, wait: bool = True,
        prefer: Collection[str] = (), lease: Lease | None = None,
        hold_for_s: float = 0.0,
    ) -> str | None:
        """Reserve capacity on a worker and hand it the start command.

        ``make_start(sid)`` builds a different command (a template restore, a template
        build); ``wait=False`` returns None at once when no worker has room (pool refills).
        ``prefer``: workers tried first when they have room (those holding the snapshot
        a restore needs, so nothing is copied). ``lease``: the request's
        (:mod:`scheduler.once`): dispatched only while it holds, renewed while waiting,
        LeaseLost once another delivery has it. ``hold_for_s``: until the request has
        waited this long, only live ``prefer`` workers are tried (what copying the
        snapshot to another node would cost is worth waiting for a holder to free up).
        """
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
            auto_pause_after=spec.auto_pause_after,
            tags=spec.tags,
            network="" if spec.network is None or spec.network.mode == "none" else spec.network.mode,
            allow=list(spec.network.allow) if spec.network is not None else [],
        )
        gpu = parse_gpu(spec.resources.gpu)
        ngpu = gpu.count if gpu else 0
        t0 = anyio.current_time()
        # Creates that find no room wait in line, per class, in arrival order.
        ticket = self.waitline.ticket(wait_class(spec))

        def only_preferred() -> bool:
            # Worth waiting for only while a live preferred worker could take it at all.
            return anyio.current_time() - t0 < hold_for_s and could_ever(
                [w for w in self.registry.live() if w.id in prefer], spec, spec.worker_tags
            )

        if not self.waitline.is_waiting(ticket.cls):
            self._check_matchable(env, spec)
            if await self._place_once(
                env, sid, spec, record, payload, ngpu, start=start, prefer=prefer, lease=lease,
                only_preferred=only_preferred(),
            ):
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
                if lease is not None:
                    await lease.keep()
                mark = self.waitline.mark()
                if self.waitline.may_try(ticket) and await self._place_once(
                    env, sid, spec, record, payload, ngpu, start=start, prefer=prefer, lease=lease,
                    only_preferred=only_preferred(),
                ):
                    self.metrics.placement_wait(anyio.current_time() - t0)
                    return sid
                within = env.deadline - lifecycle.wall()
                if lease is not None:
                    within = min(within, RENEW_S)  # back in time to renew the lease
                await self.waitline.wait_turn(ticket, mark, within=within)

    def _check_matchable(self, env: Envelope, spec: SandboxSpec) -> None:
        live = self.registry.live()
        if not could_ever(live, spec, spec.worker_tags):
            if live or lifecycle.wall() > env.deadline - 0.001:
                raise NoMatchingWorker(self._no_match_message(spec))

    async def _place_once(
        self, env: Envelope, sid: str, spec: SandboxSpec, record: SandboxRecord, payload: bytes,
        ngpu: int, *, start: Message | None = None, prefer: Collection[str] = (),
        lease: Lease | None = None,
        only_preferred: bool = False,
    ) -> bool:
        """One pass over the ranked candidates; True once a worker took the sandbox."""
        for w, gpus in self._candidates(spec, prefer, only_preferred=only_preferred):
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
            got = await self._try_reserve(w.id, sid, spec, record, payload, gpus, ngpu, lease)
            if got is not None:
                w.cpu_free -= spec.resources.millicpu
                w.mem_free -= spec.resources.memory_mb
                w.gpu_free = [g for g in w.gpu_free if g not in got]
                self.placed += 1
                return True
            # Our cached view was stale; the worker is fuller than we thought.
            w.cpu_free = min(w.cpu_free, spec.resources.millicpu - 1)
        return False

    def _candidates(
        self, spec: SandboxSpec, prefer: Collection[str], *, only_preferred: bool = False,
    ) -> Iterator[tuple[WorkerView, list[str]]]:
        holders, able = self.registry.image_fit(spec.image)
        ranked: Iterable[tuple[WorkerView, list[str]]]
        if able is None:
            ranked = self.registry.ranked(
                spec, node_tags=spec.worker_tags, policy=self.settings.placement,
                gpu_workers_for_cpu=self.settings.gpu_workers_for_cpu,
            )
        else:
            # Only workers that could get the image. (The registry's heap expects every
            # worker it yields to be tried, so this takes the scan instead.)
            ranked = rank(
                [w for w in self.registry.live() if w.id in able], spec, node_tags=spec.worker_tags,
                policy=self.settings.placement, gpu_workers_for_cpu=self.settings.gpu_workers_for_cpu,
            )
        prefer = prefer or holders
        if not prefer:
            return iter(ranked)
        # The preferred few in policy order, then everyone else as usual; a preferred
        # worker without room is simply not among the first.
        first = rank(
            [w for w in self.registry.live() if w.id in prefer], spec, node_tags=spec.worker_tags,
            policy=self.settings.placement, gpu_workers_for_cpu=self.settings.gpu_workers_for_cpu,
        )
        if only_preferred:
            return iter(first)
        return chain(first, ((w, g) for w, g in ranked if w.id not in prefer))

    async def _try_reserve(
        self, wid: str, sid: str, spec: SandboxSpec, record: SandboxRecord,
        payload: bytes, gpus: list[str], ngpu: int, lease: Lease | None = None,
    ) -> list[str] | None:
        # The GPUs go into the record now: RESERVE_DISPATCH takes exactly ``gpus`` or
        # nothing, and the worker's reply can reach the client before a later write would.
        rec = msgspec.structs.replace(record, worker=wid, gpu_uuids=list(gpus) if ngpu else [])
        keys = [self.keys.worker_cap(wid), self.keys.worker_sandboxes(wid), self.keys.worker_cmds(wid)]
        fence = placed = ""
        keep_ms = 0
        two_steps = lease is not None and is_cluster(self.redis)
        if lease is not None:
            placed, keep_ms = lease.placed_value(wid), lease.keep_ms()
            if two_steps:
                # The request's key is on another shard: checked just before instead.
                await lease.keep(force=True)
            else:
                keys.append(lease.key)
                fence = lease.value
        # One round trip, shared with the other placements of this moment (auto-pipelined);
        # the record first, so the worker's own write to it comes after. Only the delivery
        # holding the request's lease gets here: a duplicate never rewrites the record.
        res = raise_first_error(await batching.for_client(self.redis).execute(
            records.hset(self.keys.sandbox(sid), records.to_hash(rec)),
            lua.RESERVE_DISPATCH.call(
                keys,
                [sid, spec.resources.millicpu, spec.resources.memory_mb, payload, ngpu,
                 fence, placed, keep_ms, *gpus],
            ),
        ))
        got = res[1]
        if got == -1:
            raise LeaseLost(sid)
        if got is None:
            return None
        if two_steps:
            assert lease is not None
            await lease.settle(placed)
        return [g.decode() if isinstance(g, bytes) else g for g in got]

    def _no_match_message(self, spec: SandboxSpec) -> str:
        r = spec.resources
        asked = f"cpu={r.cpu:g} memory={r.memory_mb}MiB" + (f" gpu={r.gpu}" if r.gpu else "")
        if spec.worker_tags:
            asked += f" worker_tags={spec.worker_tags}"
        have = []
        live = self.registry.live()
        for w in live:
            gpus = ",".join(sorted({g.model for g in w.info.gpus})) or "no GPU"
            have.append(
                f"{w.id} (cpu={w.info.cpu_millis / 1000:g} memory={w.info.memory_mb}MiB {gpus} tags={w.info.tags}"
                + ("" if w.info.isolated else f" unisolated runtime={w.info.runtime}") + ")"
            )
        hint = ""
        if not spec.allow_unisolated and live and not any(w.info.isolated for w in live):
            hint = (
                "no live worker isolates its sandboxes (gVisor) and the request requires it; "
                "opt out with allow_unisolated=True (CLI: --unisolated) to run on an unisolated one; "
            )
        return f"{hint}no live worker could ever run {asked}; live workers: " + ("; ".join(have) or "none")
