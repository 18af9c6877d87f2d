"""What both daemons need of tenants: who they are, and who sent an entry.

A daemon reads one stream per tenant besides its own (hotbed.keys, hotbed.tenants);
:class:`TenantDirectory` keeps the list of tenant names fresh, and :func:`sender`
names the tenant whose stream the entry being handled arrived on. Refusing what a
tenant may not do is each daemon's own business; :func:`may_answer` is the one rule
both share: a reply goes only to a request id of the stream's own tenant, so a tenant
cannot make a daemon write into another's reply or output keys.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import redis.asyncio as aioredis

from daemon import lifecycle
from daemon.streams import arrived_on
from hotbed import tenants
from hotbed.keys import Keys

log = logging.getLogger(__name__)

REFRESH_S = 1.0


class TenantDirectory:
    """The tenant names, re-read every ``interval`` seconds (``names``: sorted)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, *, interval: float = REFRESH_S) -> None:
        self.redis = redis
        self.keys = keys
        self.interval = interval
        self.names: tuple[str, ...] = ()

    async def refresh(self) -> None:
        raw: Any = await self.redis.smembers(self.keys.tenants)
        names = sorted(n.decode() if isinstance(n, bytes) else n for n in raw)
        self.names = tuple(n for n in names if tenants.NAME_RE.fullmatch(n))

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await self.refresh()
        except lifecycle.TRANSIENT_ERRORS as exc:
            log.warning("could not read the tenant list yet: %s", exc)
        task_status.started()
        await lifecycle.supervised_loop(
            "tenant list", self.refresh, interval=self.interval, initial_delay=self.interval, log=log
        )


def sender(keys: Keys) -> str | None:
    """The tenant whose stream the entry being handled came from; None: an operator's."""
    stream = arrived_on()
    return keys.stream_tenant(stream) if stream else None


def may_answer(tenant: str | None, request_id: str) -> bool:
    """Whether a request read from ``tenant``'s stream may be answered at all."""
    return tenant is None or tenants.owner(request_id) == tenant
