"""Templates and warm pools: the SDK side, and the records both daemons share.

A **template** is an image plus set-up (files, commands, background processes, a
readiness check). Building one boots it on a worker, runs the set-up and takes a gVisor
memory checkpoint (a *snapshot*); sandboxes created from it are restored from that
snapshot instead of booted. Its record is the hash ``Keys.template(NAME)``
(:class:`TemplateRecord`); the name is listed in ``Keys.templates``.

A **pool** keeps ``size`` sandboxes of one template and one resource shape ready on
workers (the scheduler's pool controller fills it, :mod:`scheduler.pools`). Creating a
sandbox from a template first tries :func:`claim_nowait`: one Lua step and two
pipelined ones straight against Redis, no scheduler or worker round trip:

1. ``POOL_CLAIM`` pops one ``"SID WORKER"`` off the pool's ready list, parks it in the
   pool's claims zset under a lease (never handed out twice, never lost: an expired
   lease is taken back by the pool controller) and flips the sandbox's record
   ``pooled -> running`` with the claim's timeout and tags (only if still pooled: a
   sandbox found dead is skipped). The record shares the pool's Redis Cluster slot
   (the pool controller names pooled sandboxes so, :meth:`Keys.pooled_request_id`), so
   this is one script on one shard. A tenant's claim takes its quota between the take
   and the flip, which is then a second script (``CLAIM_RECORD``);
2. the :class:`~hotbed.protocol.SandboxClaimed` notice onto the worker's stream (its
   lifetime clock and env start now) and the live-sandbox index;
3. the lease done.

Only an empty pool falls back to the scheduler (restore on demand; a template without
a snapshot boots cold and runs its set-up).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import anyio
import msgspec

from hotbed import batching, lua, protocol, records, tenants
from hotbed import network as hotbed_network
from hotbed.batching import raise_first_error
from hotbed.client import Client, new_id
from hotbed.errors import InvalidRequest, TemplateNotFound
from hotbed.keys import Keys
from hotbed.protocol import (
    SPAWN_FIFO,
    BuildTemplate,
    Envelope,
    NetworkMode,
    NetworkPolicy,
    Reply,
    Resources,
    SandboxClaimed,
    SandboxCreated,
    SandboxSpec,
    TemplateReady,
    TemplateSpec,
)

# The template record's codec lives with the other Redis shapes (hotbed.records); its
# names are also this module's, where the SDK and the worker have always found them.
from hotbed.records import TemplateRecord, TemplateState, template_from_hash, template_to_hash

__all__ = [
    "TemplateRecord", "TemplateState", "template_from_hash", "template_to_hash",
    "check_name", "pool_name", "PoolStatus", "BuildEvent", "create_template", "get_template",
    "list_templates", "delete_template", "set_pool", "pool_status", "claim_nowait",
    "SPAWN_SCRIPT", "CLAIM_LEASE_MS", "BUILD_TIMEOUT_S", "NAME_RE",
]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# How long a claimer may take between POOL_CLAIM and finishing the claim.
CLAIM_LEASE_MS = 10_000
BUILD_TIMEOUT_S = 900.0
# Waits (at most ~20 s) for init to have made the FIFO: the guest agent, when it is
# PID 1, creates it a moment after the container starts. The command gets this exec's
# env (the sandbox's own, which init never holds), through a file it reads and removes.
SPAWN_SCRIPT = (
    f'i=0; while [ ! -p {SPAWN_FIFO} ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; '
    f'f=$(dirname {SPAWN_FIFO})/env.$$; (umask 077; export -p > "$f") && '
    f'printf ". %s; rm -f %s; %s\\n" "$f" "$f" "$1" > {SPAWN_FIFO}'
)


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidRequest(
            f"bad template name {name!r}: letters, digits, '.', '_', '-', at most 128"
        )
    return name


def pool_name(
    template: str, resources: Resources, network: NetworkPolicy | None = None, tenant: str = ""
) -> str:
    """The pool of one template, one resource shape and one network as claims state it
    (none stated: the template's own network), for one tenant's creates or ("") the
    operators'."""
    name = f"{template}:{resources.cpu:g}c:{resources.memory_mb}m"
    name += f":{resources.gpu}" if resources.gpu else ""
    net = hotbed_network.pool_key(network)
    return name + (f":net-{net}" if net else "") + (f":t-{tenant}" if tenant else "")


def _policy(network: NetworkMode | None, allow: list[str] | tuple[str, ...] | None) -> NetworkPolicy | None:
    """The SDK's ``network=``/``allow=`` as a policy (None: not stated); InvalidRequest
    for a bad one."""
    if network is None and not allow:
        return None
    policy = NetworkPolicy(mode=network or "egress", allow=list(allow or []))
    problems = hotbed_network.problems(policy)
    if problems:
        raise InvalidRequest("; ".join(problems))
    return policy


class PoolStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    template: str
    size: int
    ready: int
    warming: int
    claiming: int
    cpu: float
    memory_mb: int
    gpu: str = ""
    # The network its sandboxes get (None: the template's).
    network: NetworkPolicy | None = None


# ------------------------------------------------------------------ templates


async def create_template(
    name: str,
    *,
    image: str = "hotbed/base",
    run: list[str] | tuple[str, ...] = (),
    start: list[str] | tuple[str, ...] = (),
    files: dict[str, bytes | str] | None = None,
    ready: str | None = None,
    ready_timeout: float = 60.0,
    setup_timeout: float = 600.0,
    env: dict[str, str] | None = None,
    workdir: str | None = None,
    user: str | None = None,
    cpu: float = 1.0,
    memory_mb: int = 512,
    network: NetworkMode = "none",
    allow: list[str] | tuple[str, ...] = (),
    allow_unisolated: bool = False,
    client: Client,
    request_timeout: float = BUILD_TIMEOUT_S,
    on_progress: Callable[[BuildEvent], object] | None = None,
) -> TemplateReady:
    """Build template ``name`` on a worker and snapshot it; returns when it is ready.

    ``network``/``allow``: the set-up's network (``"egress"`` with ``allow=["pypi.org:443",
    "*.pythonhosted.org:443"]`` for a ``pip install``), also that of the sandboxes made
    from it that state none. Raises SetupFailed (the failing step's output in the
    message) if set-up fails. Rebuilding an existing name replaces its snapshot; the old
    one is collected.
    ``on_progress`` (a function or a coroutine function) sees the build as the worker
    reports it: a :class:`BuildEvent` per line of progress (boot, each set-up step and
    its exit, readiness checks, the snapshot) and per step's output, once it ends.
    ``allow_unisolated``: the build, its restores and its warm pools may run on workers
    that do not isolate sandboxes (``process``, ``sim``); by default only gVisor ones.
    """
    spec = TemplateSpec(
        image=image, run=list(run), start=list(start),
        files={k: v.encode() if isinstance(v, str) else v for k, v in (files or {}).items()},
        ready=ready, ready_timeout=ready_timeout, setup_timeout=setup_timeout,
        env=dict(env or {}), workdir=workdir, user=user,
        resources=Resources(cpu=cpu, memory_mb=memory_mb),
        network=_policy(network, allow) or NetworkPolicy(),
        allow_unisolated=allow_unisolated,
    )
    body = BuildTemplate(name=check_name(name), spec=spec)
    if on_progress is None:
        reply = await client.request(body, timeout=request_timeout)
    else:
        reply = await _build_following(client, body, request_timeout, on_progress)
    assert isinstance(reply, TemplateReady)
    return reply


class BuildEvent(msgspec.Struct, frozen=True):
    """What a template build reports as it goes: ``progress`` (one line) or a set-up
    step's ``output``."""

    kind: Literal["progress", "output"]
    text: str


async def _build_following(
    client: Client, body: BuildTemplate, timeout: float, on_progress: Callable[[BuildEvent], object]
) -> Reply:
    """The build request, its progress entries handed to ``on_progress`` while it runs
    (read with blocking XREADs, trimmed as read), the last ones before returning."""
    rid = new_id()
    key = client.keys.output(rid)
    last = "0-0"

    async def deliver(block_s: float) -> bool:
        nonlocal last
        got = await client.read_stream(key, last, count=256, block_s=block_s)
        for entry_id, fields in got:
            last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            for field, value in fields.items():
                text = value.decode("utf-8", "replace")
                done = on_progress(BuildEvent("progress" if field == b"p" else "output", text))
                if inspect.isawaitable(done):
                    await done
        if got:
            await client.redis.xtrim(key, minid=last, approximate=False)
        return bool(got)

    async def follow() -> None:
        while True:
            await deliver(1.0)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            reply = await client.request(
                msgspec.structs.replace(body, progress=True), timeout=timeout, request_id=rid
            )
            tg.cancel_scope.cancel()
        # The worker wrote its last lines before its reply.
        while await deliver(0.001):
            pass
    except BaseException:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await client.redis.delete(key)
        raise
    await client.redis.delete(key)
    return reply


async def get_template(name: str, *, client: Client) -> TemplateRecord:
    rec = template_from_hash(await client.redis.hgetall(client.keys.template(name)))
    if rec is None:
        raise TemplateNotFound(f"no template {name!r}")
    return rec


async def list_templates(*, client: Client) -> list[TemplateRecord]:
    names = sorted(_s(n) for n in await client.redis.smembers(client.keys.templates))
    out = []
    for n in names:
        rec = template_from_hash(await client.redis.hgetall(client.keys.template(n)))
        if rec is not None:
            out.append(rec)
    return out


async def delete_template(name: str, *, client: Client) -> bool:
    """Forget a template; its snapshot is garbage-collected by the workers holding it."""
    # Two keys that a Redis Cluster may keep on different shards, so two ordered steps
    # rather than a transaction: the name is unlisted first, and then a racing rebuild
    # (record first, then listed) can leave at worst a listed name without a record,
    # which listings skip, but never a record that nothing lists.
    snapshot = await client.redis.hget(client.keys.template(name), "snapshot")
    if snapshot:
        # Retired first: the one proof that lets a worker delete the snapshot.
        await client.redis.sadd(client.keys.snapshots_retired, snapshot)
    res = raise_first_error(await batching.for_client(client.redis).execute(
        ("SREM", client.keys.templates, name), ("DEL", client.keys.template(name))
    ))
    return bool(res[1])


# ---------------------------------------------------------------------- pools


async def set_pool(
    template: str,
    size: int,
    *,
    cpu: float = 1.0,
    memory_mb: int = 512,
    gpu: str | None = None,
    network: NetworkMode | None = None,
    allow: list[str] | tuple[str, ...] | None = None,
    tenant: str = "",
    client: Client,
) -> str:
    """Keep ``size`` warm sandboxes of ``template`` in this shape; returns the pool name.

    ``tenant``: a pool only that tenant's creates claim from (its sandboxes have the
    tenant's ids; each claim takes the tenant's quota); "": the operators'.

    ``network``/``allow``: the network of its sandboxes, claimed by creates that state
    the same (``Sandbox.create(template=..., network=..., allow=...)``); None: the
    template's, claimed by creates that state none. ``size=0`` deletes the pool (its
    warm sandboxes are ended by the pool controller).
    """
    if size < 0:
        raise InvalidRequest(f"pool size must be >= 0, got {size}")
    policy = _policy(network, allow)
    rec = await get_template(template, client=client)
    problem = hotbed_network.restore_problem(template, rec.spec.network, policy) if rec.snapshot else ""
    if problem:
        raise InvalidRequest(problem)
    if tenant:
        tenants.check_name(tenant)
    name = pool_name(template, Resources(cpu=cpu, memory_mb=memory_mb, gpu=gpu), policy, tenant)
    conf = records.PoolConfig(
        template=template, size=size, cpu=cpu, memory_mb=memory_mb, gpu=gpu or "", network=policy,
        tenant=tenant,
    )
    # Configured, then listed (the order delete_template explains; may span shards).
    raise_first_error(await batching.for_client(client.redis).execute(
        records.hset(client.keys.pool_conf(name), records.pool_config_to_hash(conf)),
        ("SADD", client.keys.pools, name),
    ))
    return name


async def pool_status(*, client: Client) -> list[PoolStatus]:
    names = sorted(_s(n) for n in await client.redis.smembers(client.keys.pools))
    out = []
    for n in names:
        async with client.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(client.keys.pool_conf(n))
            pipe.llen(client.keys.pool_ready(n))
            pipe.zcard(client.keys.pool_warming(n))
            pipe.zcard(client.keys.pool_claims(n))
            raw, ready, warming, claiming = await pipe.execute()
        conf = records.pool_config_from_hash(raw)
        if conf is None:
            continue
        out.append(PoolStatus(
            name=n, template=conf.template, size=conf.size,
            ready=ready, warming=warming, claiming=claiming, cpu=conf.cpu,
            memory_mb=conf.memory_mb, gpu=conf.gpu, network=conf.network,
        ))
    return out


async def claim_nowait(spec: SandboxSpec, *, client: Client) -> SandboxCreated | None:
    """Take a warm sandbox of ``spec.template`` in ``spec``'s shape, or None if none is ready."""
    if not spec.template:
        return None
    return await claim_from(
        client.redis, client.keys, pool_name(spec.template, spec.resources, spec.network), spec,
        client_id=client.client_id,
    )


async def claim_from(
    redis: Any, keys: Keys, pool: str, spec: SandboxSpec, *, client_id: str,
    before: Callable[[str], Awaitable[None]] | None = None,
) -> SandboxCreated | None:
    """Take a warm sandbox of ``pool`` for ``spec``, or None if none is ready.
    ``before(sandbox_id)`` runs once one is taken and before it is handed out (a
    tenant's quota); if it raises, the sandbox goes back to the pool."""
    if not 0 < spec.timeout <= protocol.MAX_TIMEOUT_S:
        raise InvalidRequest(f"timeout must be in (0, {protocol.MAX_TIMEOUT_S:g}], got {spec.timeout:g}")
    ready, claims = keys.pool_ready(pool), keys.pool_claims(pool)
    # Each step is auto-pipelined: concurrent claims of this client share round trips.
    ap = batching.for_client(redis)
    claim = records.to_claimed(
        now=None, timeout=spec.timeout, idle_timeout=spec.idle_timeout or 0.0,
        tags=spec.tags, client_id=client_id, auto_pause_after=spec.auto_pause_after,
    )
    claim_args = [x for kv in claim.items() for x in kv]
    # With nothing to run between the take and the flip, both are one step on the pool's
    # shard (a pooled sandbox's record shares its pool's slot, hotbed.keys).
    flip = [] if before else [keys.sandbox_head, " ".join(records.CLAIM_CLOCK), *claim_args]
    while True:
        (got,) = raise_first_error(await ap.execute(lua.POOL_CLAIM.call([ready, claims], [CLAIM_LEASE_MS, *flip])))
        if not got:
            return None
        item, now_ms = got[0], int(got[1])
        sid, wid = item.decode().split(" ", 1)
        now = now_ms / 1000
        if before is not None:
            try:
                await before(sid)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    async with redis.pipeline(transaction=True) as pipe:
                        pipe.zrem(claims, item)
                        pipe.lpush(ready, item)
                        await pipe.execute()
                raise
            clock = [x for kv in records.claim_clock(now).items() for x in kv]
            (ok,) = raise_first_error(await ap.execute(
                lua.CLAIM_RECORD.call([keys.sandbox(sid)], [*claim_args, *clock])
            ))
            if not ok:
                # Died (or was taken back) since it was listed: never hand it out.
                await redis.zrem(claims, item)
                continue
        notice = Envelope(
            # Redis's clock (the claim's), which the worker compares deadlines on.
            id=new_id(), reply_to="", deadline=now + 60, client=client_id,
            body=SandboxClaimed(
                sandbox_id=sid, expires_at=now + spec.timeout, idle_timeout=spec.idle_timeout,
                env=dict(spec.env), auto_pause_after=spec.auto_pause_after,
            ),
        )
        # The claim's lease goes only once the worker's notice and the listings are in
        # (on a Redis Cluster those go to their nodes at once).
        raise_first_error(await ap.execute_stages(
            (("XADD", keys.worker_cmds(wid), "*", "m", protocol.encode(notice)),
             *(("ZADD", index, now, sid) for index in keys.sandbox_indexes(sid))),
            (("ZREM", claims, item),),
        ))
        return SandboxCreated(sandbox_id=sid, worker_id=wid, path="warm")
