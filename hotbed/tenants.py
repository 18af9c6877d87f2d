"""Tenants: who may touch what, enforced by Redis itself.

A tenant is a Redis ACL user. Its requests reach the daemons only through streams its
user alone may write (``Keys.tenant_requests``, ``Keys.tenant_worker_cmds``), so a
daemon knows a request's tenant from the stream it arrived on, never from a field of
the message. A tenant's request ids are ``T.<hex>`` and its sandboxes' ids
``sb-T.<hex>`` (:func:`owner`); daemons refuse ids outside the tenant of the stream,
and the tenant's user may read only reply, output and record keys named by its own
ids. It lists its live sandboxes from its own index (``Keys.tenant_sandboxes``), never
the whole one. It may read templates and pools (shared, written by operators), and
nothing else: no other tenant's keys, no worker's or scheduler's state, no Lua (a script
that loops would stall Redis for everyone), no KEYS or SCAN.

Roles and their Redis users (``PREFIX`` is the key-space prefix):

==========================  =====================================================
user                        may
==========================  =====================================================
``default`` (or any admin)  everything: operators, ``hotbed tenant ...``, tests
``PREFIX.scheduler``        every key under the prefix; no admin commands
``PREFIX.worker.ID``        its own ``{w:ID}`` keys (its streams, the tenants'
                            streams to it, capacity, reservations), heartbeats,
                            sandbox records, replies and output, templates and
                            pools; not another worker's streams or capacity
``PREFIX.tenant.T``         what the table above says
==========================  =====================================================

An open Redis with no tenants is the single-tenant default: every client is an
operator, exactly as before tenants existed.

Quotas (:class:`Quota`, ``Keys.tenant_quota``) are enforced by the scheduler when it
places a tenant's create (``lua.QUOTA_TAKE``); what each live sandbox holds is in
``Keys.tenant_held`` until the scheduler sees it ended (``lua.QUOTA_GIVE``).

ACLs live in each Redis process: on a Redis Cluster every node gets them (this module
sends ``ACL SETUSER`` to all; :func:`copy_users`, ``hotbed tenant sync``, gives a node
added later what the others have), and a Redis without an ``aclfile`` forgets them on
a restart (``ACL SAVE`` is tried after every change).
"""

from __future__ import annotations

import re
import secrets
from typing import Any, cast
from urllib.parse import quote, urlsplit, urlunsplit

import msgspec
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from hotbed import batching, lua
from hotbed.batching import raise_first_error
from hotbed.connection import is_cluster
from hotbed.errors import InvalidRequest, QuotaExceeded
from hotbed.keys import Keys, id_tenant

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_]{0,31}")

# What a tenant's client sends: connection upkeep, its own streams, waits and reads.
TENANT_COMMANDS = (
    "ping", "echo", "hello", "auth", "select", "reset", "quit", "acl|whoami",
    # Deadlines are on Redis's clock: a client measures its offset to it (hotbed.clock).
    "time",
    "client|setname", "client|id",
    # A Redis Cluster client maps slots and commands, and follows ASK redirections.
    "cluster|slots", "cluster|shards", "cluster|nodes", "command", "asking", "readwrite",
    "xadd", "xlen", "xread", "xrange", "xtrim", "del", "unlink", "exists",
    "blpop", "lpop", "llen", "hget", "hmget", "hgetall", "get", "type", "ttl", "pttl",
    "zrange", "zcard", "zscore", "smembers", "scard", "sismember",
)
# Daemons: everything but administration (ACL, CONFIG, DEBUG, SHUTDOWN, KEYS, ...).
DAEMON_CATEGORIES = ("+@all", "-@admin", "-@dangerous", "+script|load", "+script|exists", "+info")


class Quota(msgspec.Struct, frozen=True, kw_only=True):
    """A tenant's limits; 0 means unlimited."""

    sandboxes: int = 0
    cpu: float = 0.0
    memory_mb: int = 0
    gpus: int = 0
    creates_per_s: float = 0.0

    def to_hash(self) -> dict[str, str]:
        return {
            "sandboxes": str(self.sandboxes), "millicpu": str(round(self.cpu * 1000)),
            "memory_mb": str(self.memory_mb), "gpus": str(self.gpus),
            "creates_per_s": repr(float(self.creates_per_s)),
        }

    @classmethod
    def from_hash(cls, raw: dict[Any, Any]) -> Quota:
        d = {_s(k): _s(v) for k, v in raw.items()}
        return cls(
            sandboxes=int(d.get("sandboxes", 0)), cpu=int(d.get("millicpu", 0)) / 1000,
            memory_mb=int(d.get("memory_mb", 0)), gpus=int(d.get("gpus", 0)),
            creates_per_s=float(d.get("creates_per_s", 0)),
        )


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """What a tenant's live sandboxes hold of its quota."""

    sandboxes: int = 0
    cpu: float = 0.0
    memory_mb: int = 0
    gpus: int = 0


class TenantInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    user: str
    quota: Quota
    usage: Usage


class Credentials(msgspec.Struct, frozen=True, kw_only=True):
    """What ``create_tenant`` returns once: the password is not stored anywhere readable."""

    tenant: str
    user: str
    password: str
    url: str


def _r(redis: aioredis.Redis) -> Any:
    # redis-py's stubs type replies as bytes | str (decode_responses is off: bytes).
    return cast(Any, redis)


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidRequest(
            f"bad tenant name {name!r}: lower-case letters, digits and '_', at most 32"
        )
    return name


# ------------------------------------------------------------------ identity


def new_request_id(tenant: str) -> str:
    return f"{tenant}.{secrets.token_hex(8)}"


def owner(some_id: str) -> str | None:
    """The tenant a request or sandbox id belongs to (``T.x``, ``sb-T.x``); None for an
    operator's id."""
    return id_tenant(some_id)


def user_name(prefix: str, tenant: str) -> str:
    return f"{prefix}.tenant.{tenant}"


def scheduler_user(prefix: str) -> str:
    return f"{prefix}.scheduler"


def worker_user(prefix: str, worker_id: str) -> str:
    return f"{prefix}.worker.{worker_id}"


def tenant_of_user(prefix: str, username: str | None) -> str | None:
    """The tenant a Redis user name stands for, or None (an operator or a daemon)."""
    head = f"{prefix}.tenant."
    if username and username.startswith(head) and NAME_RE.fullmatch(username[len(head) :]):
        return username[len(head) :]
    return None


def with_credentials(url: str, user: str, password: str) -> str:
    """``url`` with its user and password replaced."""
    u = urlsplit(url)
    hosts = u.netloc.rpartition("@")[2]
    return urlunsplit(u._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{hosts}"))


# ------------------------------------------------------------------ ACL rules


def _glob(text: str) -> str:
    """``text`` as a literal inside an ACL key pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def tenant_rules(keys: Keys, tenant: str) -> list[str]:
    p, t = _glob(keys.prefix), _glob(check_name(tenant))
    return [
        *(f"+{c}" for c in TENANT_COMMANDS),
        f"~{_glob(keys.tenant_requests(tenant))}",
        f"~{p}:{{w:*}}:cmds:{t}",
        f"~{p}:reply:{{{t}.*}}",
        f"~{p}:out:{{{t}.*}}",
        f"%R~{p}:sb:{{sb-{t}.*}}",
        f"%R~{p}:{{w:*}}:cap",
        f"%R~{p}:tpl:*",
        f"%R~{_glob(keys.templates)}",
        f"%R~{_glob(keys.pools)}",
        f"%R~{p}:{{pool:*}}:*",
        f"%R~{p}:{{t:{t}}}:*",
    ]


def scheduler_rules(keys: Keys) -> list[str]:
    return [*DAEMON_CATEGORIES, f"~{_glob(keys.prefix)}:*"]


def worker_rules(keys: Keys, worker_id: str) -> list[str]:
    p = _glob(keys.prefix)
    return [
        *DAEMON_CATEGORIES,
        f"~{p}:{{w:{_glob(worker_id)}}}:*",
        f"~{_glob(keys.workers)}",
        f"~{p}:sb:*", f"~{_glob(keys.sandboxes)}", f"~{p}:{{t:*}}:sandboxes",
        f"~{p}:reply:*", f"~{p}:out:*",
        # A build ends with the worker writing the template's record and retiring its
        # pools' stale entries; a pool refill is listed by the worker that made it.
        f"~{p}:tpl:*", f"~{_glob(keys.templates)}",
        f"~{p}:{{pool:*}}:*", f"%R~{_glob(keys.pools)}",
        f"%R~{_glob(keys.tenants)}",
    ]


async def _every_node(redis: aioredis.Redis, *args: Any) -> None:
    """An ACL command on every node (ACLs are per Redis process)."""
    if is_cluster(redis):
        # Every node, replicas too, named one by one: a node flag would be routed by
        # the command's key policy instead.
        cluster = _r(redis)
        await cluster.initialize()
        await cluster.execute_command(*args, target_nodes=cluster.get_nodes())
    else:
        await _r(redis).execute_command(*args)


async def _save_acl(redis: aioredis.Redis) -> None:
    try:
        await _every_node(redis, "ACL", "SAVE")
    except redis_errors.ResponseError:
        pass  # no aclfile: the users last until Redis restarts (module docstring)


async def set_user(redis: aioredis.Redis, user: str, password: str, rules: list[str]) -> None:
    """(Re)create Redis user ``user`` with exactly ``rules`` and this password."""
    await _every_node(redis, "ACL", "SETUSER", user, "reset", "on", f">{password}", *rules)
    await _save_acl(redis)


async def delete_user(redis: aioredis.Redis, user: str) -> None:
    """Delete Redis user ``user`` everywhere; its connections close."""
    try:
        await _every_node(redis, "ACL", "DELUSER", user)
    finally:
        await _save_acl(redis)


async def copy_users(redis: aioredis.Redis, keys: Keys) -> int:
    """Give every node of a Redis Cluster the hotbed users (tenants', daemons') that
    some node has and it lacks: a node added after they were made, or one restarted
    without an ACL file. Rules and password hashes are copied as ``ACL LIST`` shows
    them, so no password is needed. Returns how many users were set on some node; 0 on
    a single Redis."""
    if not is_cluster(redis):
        return 0
    cluster = _r(redis)
    await cluster.initialize()
    head = f"{keys.prefix}."
    have: dict[str, dict[str, list[str]]] = {}
    for node in cluster.get_nodes():
        users: dict[str, list[str]] = {}
        for line in await cluster.execute_command("ACL", "LIST", target_nodes=node):
            _user, name, *rules = _s(line).split()
            if name.startswith(head):
                users[name] = rules
        have[node.name] = users
    known: dict[str, list[str]] = {}
    for users in have.values():
        for name, rules in users.items():
            known.setdefault(name, rules)
    copied = 0
    for node in cluster.get_nodes():
        for name, rules in known.items():
            if name not in have[node.name]:
                await cluster.execute_command("ACL", "SETUSER", name, "reset", *rules, target_nodes=node)
                copied += 1
    if copied:
        await _save_acl(redis)
    return copied


async def provision_daemon_user(
    redis: aioredis.Redis, keys: Keys, *, role: str, worker_id: str = "", password: str | None = None
) -> tuple[str, str]:
    """Create the Redis user of a scheduler (``role="scheduler"``) or of worker
    ``worker_id`` (``role="worker"``); returns ``(user, password)``."""
    password = password or secrets.token_urlsafe(24)
    if role == "scheduler":
        user, rules = scheduler_user(keys.prefix), scheduler_rules(keys)
    elif role == "worker":
        user, rules = worker_user(keys.prefix, worker_id), worker_rules(keys, worker_id)
    else:
        raise InvalidRequest(f"unknown role {role!r}: scheduler or worker")
    await set_user(redis, user, password, rules)
    return user, password


# ------------------------------------------------------------------ administration


async def create_tenant(
    redis: aioredis.Redis, keys: Keys, name: str, *, url: str, quota: Quota | None = None
) -> Credentials:
    """Create tenant ``name`` with a fresh password (returned here, and only here)."""
    check_name(name)
    if await _r(redis).sismember(keys.tenants, name):
        raise InvalidRequest(f"tenant {name!r} exists already")
    user, password = user_name(keys.prefix, name), secrets.token_urlsafe(24)
    await set_user(redis, user, password, tenant_rules(keys, name))
    # Its streams, each with its consumer group, before it is listed: its first request
    # is read even before a daemon's next look at the tenant list.
    streams = [(keys.tenant_requests(name), "schedulers")] + [
        (keys.tenant_worker_cmds(_s(w), name), "worker") for w in await _r(redis).zrange(keys.workers, 0, -1)
    ]
    for stream, group in streams:
        try:
            await _r(redis).xgroup_create(stream, group, id="0", mkstream=True)
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
    await _r(redis).hset(keys.tenant_quota(name), mapping=(quota or Quota()).to_hash())
    await _r(redis).sadd(keys.tenants, name)
    return Credentials(tenant=name, user=user, password=password, url=with_credentials(url, user, password))


async def tenant_names(redis: aioredis.Redis, keys: Keys) -> list[str]:
    return sorted(_s(n) for n in await _r(redis).smembers(keys.tenants))


async def get_tenant(redis: aioredis.Redis, keys: Keys, name: str) -> TenantInfo:
    check_name(name)
    quota_raw, usage_raw = raise_first_error(await batching.for_client(redis).execute(
        ("HGETALL", keys.tenant_quota(name)), ("HGETALL", keys.tenant_usage(name))
    ))
    if not quota_raw:
        raise InvalidRequest(f"no tenant {name!r}")
    u = {_s(k): int(v) for k, v in _pairs(usage_raw)}
    return TenantInfo(
        name=name, user=user_name(keys.prefix, name), quota=Quota.from_hash(_as_dict(quota_raw)),
        usage=Usage(sandboxes=u.get("n", 0), cpu=u.get("cpu", 0) / 1000, memory_mb=u.get("mem", 0), gpus=u.get("gpu", 0)),
    )


def _pairs(raw: Any) -> list[tuple[Any, Any]]:
    if isinstance(raw, dict):
        return list(raw.items())
    return list(zip(raw[::2], raw[1::2], strict=True))


def _as_dict(raw: Any) -> dict[Any, Any]:
    return dict(_pairs(raw))


async def list_tenants(redis: aioredis.Redis, keys: Keys) -> list[TenantInfo]:
    out = []
    for name in await tenant_names(redis, keys):
        try:
            out.append(await get_tenant(redis, keys, name))
        except InvalidRequest:
            continue  # listed, record gone (a racing rm)
    return out


async def set_quota(redis: aioredis.Redis, keys: Keys, name: str, **limits: Any) -> Quota:
    """Change some of tenant ``name``'s limits (``sandboxes=10, cpu=4.0, ...``)."""
    info = await get_tenant(redis, keys, name)
    quota = msgspec.structs.replace(info.quota, **limits)
    await _r(redis).hset(keys.tenant_quota(name), mapping=quota.to_hash())
    return quota


async def remove_tenant(redis: aioredis.Redis, keys: Keys, name: str) -> list[str]:
    """Delete tenant ``name``: its Redis user (its connections close), its streams and
    quota. Returns the ids of its sandboxes still holding quota, for the caller to end."""
    check_name(name)
    held = [_s(s) for s in await _r(redis).hkeys(keys.tenant_held(name))]
    await _r(redis).srem(keys.tenants, name)
    await delete_user(redis, user_name(keys.prefix, name))
    streams = [keys.tenant_requests(name)] + [
        keys.tenant_worker_cmds(_s(w), name) for w in await _r(redis).zrange(keys.workers, 0, -1)
    ]
    for key in [*streams, keys.tenant_quota(name), keys.tenant_rate(name), keys.tenant_sandboxes(name)]:
        await _r(redis).delete(key)
    return held


def quota_exceeded(tenant: str, limit: str, quota: Quota | None = None) -> QuotaExceeded:
    what = {"sandboxes": "concurrent sandboxes", "cpu": "CPU", "memory_mb": "memory",
            "gpus": "GPUs", "creates_per_s": "creates per second"}.get(limit, limit)
    allowed = f" (limit {getattr(quota, limit):g})" if quota is not None and hasattr(quota, limit) else ""
    return QuotaExceeded(
        f"tenant {tenant!r} is at its quota of {what}{allowed}",
        detail={"tenant": tenant, "limit": limit},
    )


async def take(redis: aioredis.Redis, keys: Keys, tenant: str, sandbox_id: str, *,
               millicpu: int, memory_mb: int, gpus: int) -> str:
    """``lua.QUOTA_TAKE``: 'ok' or the limit a create would pass."""
    got = await lua.QUOTA_TAKE.run(
        redis,
        [keys.tenant_quota(tenant), keys.tenant_held(tenant), keys.tenant_usage(tenant), keys.tenant_rate(tenant)],
        [sandbox_id, millicpu, memory_mb, gpus],
    )
    return _s(got)


async def give(redis: aioredis.Redis, keys: Keys, tenant: str, sandbox_id: str) -> bool:
    """``lua.QUOTA_GIVE``: True if ``sandbox_id`` held quota until now."""
    got = await lua.QUOTA_GIVE.run(redis, [keys.tenant_held(tenant), keys.tenant_usage(tenant)], [sandbox_id])
    return bool(got)


__all__ = [
    "Credentials", "Quota", "TenantInfo", "Usage", "check_name", "copy_users", "create_tenant", "delete_user",
    "get_tenant",
    "give", "list_tenants", "new_request_id", "owner", "provision_daemon_user", "remove_tenant",
    "scheduler_rules", "set_quota", "take", "tenant_names", "tenant_of_user", "tenant_rules",
    "user_name", "with_credentials", "worker_rules",
]
