"""A leader lock: at most one scheduler replica runs a given background job at a time.

The lock is a Redis string (``Keys.lock(NAME)``) holding its holder's random token,
with a TTL. :meth:`LeaderLock.hold` takes it when it is free and renews it when this
holder has it (``lua.LOCK``, one atomic step); a holder that stops renewing (crashed,
partitioned) loses it when the TTL runs out and another replica takes over. The
reaper and the warm pool controller each have one.
"""

from __future__ import annotations

import secrets

import redis.asyncio as aioredis

from hotbed import lua

# Renewed about every second by its holder: a dead holder is replaced within this.
LOCK_TTL_MS = 5000


class LeaderLock:
    def __init__(self, redis: aioredis.Redis, key: str, *, ttl_ms: int = LOCK_TTL_MS) -> None:
        self.redis = redis
        self.key = key
        self.ttl_ms = ttl_ms
        self.token = secrets.token_hex(8)

    async def hold(self) -> bool:
        """Take or renew the lock; True if this holder has it for the next ``ttl_ms``."""
        return bool(await lua.LOCK.run(self.redis, [self.key], [self.token, self.ttl_ms]))
