"""One sandbox per create, ever: the request's lease (``hotbed:req:{RID}``).

A create can reach the schedulers more than once: the reclaim loop takes over an entry
that a live replica is still placing (it waited for room longer than
``reclaim_idle_s``), a replica dies after dispatching but before acknowledging, a
client sends the same request again. Each delivery first takes the request's lease
(``REQUEST_LEASE``); placement dispatches only while that lease is still the
delivery's, and ``RESERVE_DISPATCH`` turns it into ``placed WORKER`` in the same Lua
step as the dispatch. A delivery that finds

* ``placed WORKER`` or ``answered``: the request was handled; it does nothing, since
  the first handling answered the client and a second reply would be a second answer;
* another delivery's lease: it waits until that lease is settled (then nothing is left
  to do) or lapses (its holder died mid-placement: this delivery takes over).

A lease lives :data:`LEASE_S` and its holder renews it while it waits for room
(:meth:`Lease.keep`), so a dead holder's request is taken over within that. The settled
value is kept :data:`KEEP_S` past the request's deadline; a start that old is refused
by the worker anyway (a stale request), so no later delivery can make a second one.

On a Redis Cluster the request's key lives on another shard than the worker's keys:
there the placer checks the lease just before the dispatch and settles it just after
(two steps instead of one; a holder would have to stall for :data:`LEASE_S` between them
for another delivery to take over).
"""

from __future__ import annotations

import logging
import secrets

import anyio
import redis.asyncio as aioredis

from daemon import lifecycle
from hotbed import batching, lua
from hotbed.batching import raise_first_error
from hotbed.keys import Keys
from hotbed.protocol import Envelope

log = logging.getLogger(__name__)

LEASE_S = 10.0
# A waiting holder renews at least this often.
RENEW_S = 2.0
# How long a settled request is remembered after its deadline.
KEEP_S = 600.0
# A second delivery looks at the holder's lease this often (a rare path: duplicates
# and reclaims only), until the lease is settled or lapses.
POLL_S = 0.5

ANSWERED = "answered"


class LeaseLost(Exception):
    """The delivery no longer holds its request's lease: another one handles it."""


class Lease:
    """One delivery's hold on one create."""

    __slots__ = ("_renewed", "deadline", "key", "redis", "value")

    def __init__(self, redis: aioredis.Redis, key: str, deadline: float) -> None:
        self.redis = redis
        self.key = key
        self.deadline = deadline
        self.value = f"lease {secrets.token_hex(8)}"
        self._renewed = anyio.current_time()

    def keep_ms(self) -> int:
        """How long the settled value stays: until :data:`KEEP_S` past the deadline."""
        return int((max(self.deadline - lifecycle.wall(), 0.0) + KEEP_S) * 1000)

    @staticmethod
    def placed_value(worker_id: str) -> str:
        return f"placed {worker_id}"

    async def _swap(self, new: str, ttl_ms: int) -> bool:
        (got,) = raise_first_error(await batching.for_client(self.redis).execute(
            lua.REQUEST_SWAP.call([self.key], [self.value, new, ttl_ms])
        ))
        return bool(got)

    async def keep(self, *, force: bool = False) -> None:
        """Renew the lease if it is due (or ``force``); LeaseLost if it is not ours."""
        if not force and anyio.current_time() - self._renewed < RENEW_S:
            return
        if not await self._swap(self.value, int(LEASE_S * 1000)):
            raise LeaseLost(self.key)
        self._renewed = anyio.current_time()

    async def settle(self, value: str = ANSWERED) -> None:
        """The request is handled (answered, or ``placed WORKER``): no delivery redoes it."""
        if not await self._swap(value, self.keep_ms()):
            log.warning("request lease %s was lost before it was settled", self.key)

    async def release(self) -> None:
        """Hand the request back unhandled (to the stream, for another delivery)."""
        await self._swap("", 0)


async def acquire(redis: aioredis.Redis, keys: Keys, env: Envelope) -> Lease | None:
    """This delivery's lease on ``env``'s create, after waiting out another delivery's;
    None if the request was handled already (or its holder outlived its deadline)."""
    lease = Lease(redis, keys.request(env.id), env.deadline)
    while True:
        got = await lua.REQUEST_LEASE.run(redis, [lease.key], [lease.value, int(LEASE_S * 1000)])
        if got == 1:
            return lease
        value = got.decode() if isinstance(got, bytes) else str(got)
        if not value.startswith("lease "):
            log.info("request %s was handled already (%s); not placing it again", env.id, value,
                     extra={"request_id": env.id})
            return None
        if lifecycle.wall() > env.deadline + LEASE_S:
            # Its live holder answers it (CapacityExhausted at the deadline).
            return None
        await anyio.sleep(POLL_S)
