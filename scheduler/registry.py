"""The scheduler's view of live workers, refreshed from Redis.

A worker is live while its heartbeat (``hotbed:workers`` score) is younger than
``heartbeat_ttl_s``. The view's free capacity is a cache for ranking candidates; the
``RESERVE_DISPATCH`` script is the truth, and a failed reservation just moves on to the
next candidate. One refresh costs one ZRANGEBYSCORE plus one pipelined round trip.

:meth:`WorkerRegistry.ranked` is what placement iterates. The common request (no GPU,
no worker tags, ``spread``) is served from a heap of workers keyed by (has GPUs, most
free CPU) with lazy invalidation, so a placement costs O(log workers) instead of a scan
and sort of the fleet; anything else goes through :func:`scheduler.placement.rank`.

The images workers advertise (``Keys.worker_images``) are re-read every
``image_refresh_s``, not every refresh: they change with pulls and builds, not with
placements, and are the largest thing a worker publishes.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterator
from typing import cast

import msgspec
import redis.asyncio as aioredis

from hotbed import clock, protocol, records
from hotbed.keys import Keys
from hotbed.protocol import SandboxSpec
from hotbed.records import capacity_from_hash
from scheduler.placement import WorkerView, image_fit, rank

# WorkerView is defined with the placement functions that read it; still importable here.
__all__ = ["WorkerRegistry", "WorkerView"]


class WorkerRegistry:
    def __init__(
        self, redis: aioredis.Redis, keys: Keys, *, heartbeat_ttl_s: float, image_refresh_s: float = 2.0,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.image_refresh_s = image_refresh_s
        self.workers: dict[str, WorkerView] = {}
        # Worker id -> the names and ids it advertises (absent: none advertised).
        self._images: dict[str, frozenset[str]] = {}
        self._images_read_at = float("-inf")
        # (has GPUs, -cpu_free, version, id): the spread order, stale entries skipped.
        self._heap: list[tuple[bool, int, int, str]] = []
        self._version: dict[str, int] = {}

    def live(self) -> list[WorkerView]:
        return list(self.workers.values())

    def image_fit(self, image: str) -> tuple[set[str], set[str] | None]:
        """Live workers holding ``image``, and those that could get it
        (:func:`scheduler.placement.image_fit`)."""
        if not self._images:
            return set(), None
        return image_fit(self.live(), image)

    # ------------------------------------------------------------- spread index

    def _push(self, w: WorkerView) -> None:
        v = self._version.get(w.id, 0) + 1
        self._version[w.id] = v
        heapq.heappush(self._heap, (w.has_gpus, -w.cpu_free, v, w.id))

    def _rebuild(self) -> None:
        self._version = {wid: 0 for wid in self.workers}
        self._heap = [(w.has_gpus, -w.cpu_free, 0, w.id) for w in self.workers.values()]
        heapq.heapify(self._heap)

    def ranked(
        self,
        spec: SandboxSpec,
        *,
        node_tags: dict[str, str] | None = None,
        policy: str = "spread",
        gpu_workers_for_cpu: bool = False,
    ) -> Iterator[tuple[WorkerView, list[str]]]:
        """Candidates for ``spec``, best first, as :func:`~scheduler.placement.rank`
        orders them. The caller updates the yielded worker's ``cpu_free`` / ``mem_free``
        (reserved, or found fuller than cached) before asking for the next one."""
        if spec.resources.gpu or node_tags or policy != "spread" or gpu_workers_for_cpu:
            yield from rank(
                self.live(), spec, node_tags=node_tags, policy=policy,
                gpu_workers_for_cpu=gpu_workers_for_cpu,
            )
            return
        need_cpu, need_mem = spec.resources.millicpu, spec.resources.memory_mb
        any_worker = spec.allow_unisolated
        heap = self._heap
        examined: list[WorkerView] = []
        try:
            while heap:
                _g, neg, v, wid = heap[0]
                w = self.workers.get(wid)
                if w is None or self._version.get(wid) != v:
                    heapq.heappop(heap)  # stale entry
                    continue
                if neg != -w.cpu_free:
                    # Its free CPU changed since it was keyed (a placement, a failed
                    # reservation): re-key it where it now belongs.
                    heapq.heappop(heap)
                    self._push(w)
                    continue
                examined.append(w)
                if w.cpu_free < need_cpu or w.mem_free < need_mem or not (any_worker or w.info.isolated):
                    heapq.heappop(heap)  # no room now, or not for this request; re-keyed below
                    continue
                yield w, []
                # Back here only if the reservation failed: re-key and move on.
                self._push(w)
        finally:
            # Re-key every worker looked at, with what the caller learned about it.
            for w in examined:
                if self.workers.get(w.id) is w:
                    self._push(w)

    async def refresh(self) -> None:
        # Heartbeats are stamped with Redis's clock (HEARTBEAT): so is the cut-off. The
        # same reading keeps this process's clock (deadlines, records) on Redis's.
        before = clock.PROCESS.local()
        sec, usec = await self.redis.time()
        now = sec + usec / 1e6
        clock.PROCESS.observe(now, before=before, after=clock.PROCESS.local())
        # Our clients return bytes (no decode_responses); redis-py's types allow str too.
        rows = cast("list[tuple[bytes, float]]", await self.redis.zrangebyscore(
            self.keys.workers, int((now - self.heartbeat_ttl_s) * 1000), "+inf", withscores=True
        ))
        ids = [(m.decode(), score / 1000) for m, score in rows]
        read_images = time.monotonic() - self._images_read_at >= self.image_refresh_s
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid, _ in ids:
                pipe.get(self.keys.worker_info(wid))
                pipe.hgetall(self.keys.worker_cap(wid))
            if read_images:
                for wid, _ in ids:
                    pipe.get(self.keys.worker_images(wid))
            res = await pipe.execute()
        if read_images:
            self._images_read_at = time.monotonic()
            self._images = {}
            for (wid, _), raw in zip(ids, res[2 * len(ids):], strict=True):
                held = records.images_from_value(raw)
                if held is not None and not held.truncated:
                    self._images[wid] = frozenset(held.names())
        fresh: dict[str, WorkerView] = {}
        for i, (wid, hb) in enumerate(ids):
            raw_info, cap = res[2 * i], res[2 * i + 1]
            if not raw_info or not cap:
                continue
            try:
                info = protocol.decode_worker_info(raw_info)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            free = capacity_from_hash(cap)
            fresh[wid] = WorkerView(
                info=info,
                cpu_free=free.cpu_free,
                mem_free=free.mem_free,
                gpu_free=free.gpu_free,
                sandboxes=free.sandboxes,
                heartbeat_at=hb,
                images=self._images.get(wid),
            )
        self.workers = fresh
        self._rebuild()
