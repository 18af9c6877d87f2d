"""The scheduler's view of live workers, refreshed from Redis.

A worker is live while its heartbeat (``hotbed:workers`` score) is younger than
``heartbeat_ttl_s``. The view's free capacity is a cache for ranking candidates; the
``RESERVE_DISPATCH`` script is the truth, and a failed reservation just moves on to the
next candidate. One refresh costs one ZRANGEBYSCORE plus one pipelined round trip.
"""

from __future__ import annotations

import msgspec
import redis.asyncio as aioredis

from hotbed import daemon, protocol
from hotbed.keys import Keys
from hotbed.protocol import WorkerInfo


class WorkerView(msgspec.Struct, kw_only=True):
    info: WorkerInfo
    cpu_free: int = 0
    mem_free: int = 0
    gpu_free: list[str] = []
    sandboxes: int = 0
    heartbeat_at: float = 0.0

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def has_gpus(self) -> bool:
        return bool(self.info.gpus)


class WorkerRegistry:
    def __init__(self, redis: aioredis.Redis, keys: Keys, *, heartbeat_ttl_s: float) -> None:
        self.redis = redis
        self.keys = keys
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.workers: dict[str, WorkerView] = {}

    def live(self) -> list[WorkerView]:
        return list(self.workers.values())

    async def refresh(self) -> None:
        now = daemon.wall()
        rows = await self.redis.zrangebyscore(
            self.keys.workers, int((now - self.heartbeat_ttl_s) * 1000), "+inf", withscores=True
        )
        ids = [(m.decode(), score / 1000) for m, score in rows]
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid, _ in ids:
                pipe.get(self.keys.worker_info(wid))
                pipe.hgetall(self.keys.worker_cap(wid))
            res = await pipe.execute()
        fresh: dict[str, WorkerView] = {}
        for i, (wid, hb) in enumerate(ids):
            raw_info, cap = res[2 * i], res[2 * i + 1]
            if not raw_info or not cap:
                continue
            try:
                info = protocol.decode_worker_info(raw_info)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            fresh[wid] = WorkerView(
                info=info,
                cpu_free=int(cap.get(b"cpu", 0)),
                mem_free=int(cap.get(b"mem", 0)),
                gpu_free=[
                    k.decode()[4:] for k, v in cap.items() if k.startswith(b"gpu:") and v == b"0"
                ],
                sandboxes=int(cap.get(b"n", 0)),
                heartbeat_at=hb,
            )
        self.workers = fresh
