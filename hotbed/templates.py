"""Templates and warm pools: the SDK side, and the records both daemons share.

A **template** is an image plus set-up (files, commands, background processes, a
readiness check). Building one boots it on a worker, runs the set-up and takes a gVisor
memory checkpoint (a *snapshot*); sandboxes created from it are restored from that
snapshot instead of booted. Its record is the hash ``Keys.template(NAME)``
(:class:`TemplateRecord`); the name is listed in ``Keys.templates``.

A **pool** keeps ``size`` sandboxes of one template and one resource shape ready on
workers (the scheduler's pool controller fills it, :mod:`scheduler.pools`). Creating a
sandbox from a template first tries :func:`claim_nowait`: two Lua steps and one
pipeline straight against Redis, no scheduler or worker round trip:

1. ``POOL_CLAIM`` pops one ``"SID WORKER"`` off the pool's ready list and parks it in the
   pool's claims zset under a lease (never handed out twice, never lost: an expired
   lease is taken back by the pool controller);
2. ``CLAIM_RECORD`` flips the sandbox's record ``pooled -> running`` with the claim's
   timeout and tags (only if still pooled: a sandbox found dead is skipped);
3. one pipeline: the :class:`~hotbed.protocol.SandboxClaimed` notice onto the worker's
   stream (its lifetime clock and env start now), the live-sandbox index, lease done.

Only an empty pool falls back to the scheduler (restore on demand; a template without
a snapshot boots cold and runs its set-up).
"""

from __future__ import annotations

import re
import time
import weakref
from collections.abc import Mapping
from typing import Any, Literal

import msgspec
import orjson

from hotbed import batching, lua, protocol
from hotbed.batching import Script, raise_first_error
from hotbed.client import Client, new_id
from hotbed.errors import InvalidRequest, TemplateNotFound
from hotbed.protocol import (
    SPAWN_FIFO,
    BuildTemplate,
    Envelope,
    Resources,
    SandboxClaimed,
    SandboxCreated,
    SandboxSpec,
    TemplateReady,
    TemplateSpec,
)

TemplateState = Literal["building", "ready", "failed"]
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# How long a claimer may take between POOL_CLAIM and finishing the claim.
CLAIM_LEASE_MS = 10_000
BUILD_TIMEOUT_S = 900.0
# Waits (at most ~20 s) for init to have made the FIFO: the guest agent (issue 5), when
# it is PID 1, creates it a moment after the container starts.
SPAWN_SCRIPT = (
    f'i=0; while [ ! -p {SPAWN_FIFO} ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; '
    f'printf "%s\\n" "$1" > {SPAWN_FIFO}'
)


class TemplateRecord(msgspec.Struct, kw_only=True, frozen=True):
    name: str
    state: TemplateState = "building"
    spec: TemplateSpec = TemplateSpec()
    snapshot: str = ""
    size_bytes: int = 0
    build_s: float = 0.0
    # Workers holding the snapshot locally (restore there needs no copy).
    holders: list[str] = []
    error: str = ""
    created_at: float = 0.0
    # The sandbox a ``sb.snapshot()`` template was taken from ("" for a built one).
    source: str = ""


def template_to_hash(rec: TemplateRecord) -> dict[str, Any]:
    return {
        "name": rec.name, "state": rec.state, "spec": protocol.encode(rec.spec),
        "snapshot": rec.snapshot, "size_bytes": str(rec.size_bytes), "build_s": str(rec.build_s),
        "holders": orjson.dumps(rec.holders), "error": rec.error,
        "created_at": str(rec.created_at), "source": rec.source,
    }


_spec_decoder = msgspec.msgpack.Decoder(TemplateSpec)


def _b(x: bytes | str) -> bytes:
    return x if isinstance(x, bytes) else x.encode()


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def template_from_hash(hash_: Mapping[Any, Any]) -> TemplateRecord | None:
    raw = {_b(k): _b(v) for k, v in hash_.items()}
    if not raw or b"name" not in raw:
        return None
    g = raw.get
    return TemplateRecord(
        name=g(b"name", b"").decode(),
        state=g(b"state", b"building").decode(),  # type: ignore[arg-type]
        spec=_spec_decoder.decode(raw[b"spec"]) if raw.get(b"spec") else TemplateSpec(),
        snapshot=g(b"snapshot", b"").decode(),
        size_bytes=int(g(b"size_bytes", b"0") or 0),
        build_s=float(g(b"build_s", b"0") or 0),
        holders=orjson.loads(g(b"holders", b"[]") or b"[]"),
        error=g(b"error", b"").decode(),
        created_at=float(g(b"created_at", b"0") or 0),
        source=g(b"source", b"").decode(),
    )


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidRequest(
            f"bad template name {name!r}: letters, digits, '.', '_', '-', at most 128"
        )
    return name


def pool_name(template: str, resources: Resources) -> str:
    """The pool of one template and one resource shape."""
    name = f"{template}:{resources.cpu:g}c:{resources.memory_mb}m"
    return name + (f":{resources.gpu}" if resources.gpu else "")


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
    client: Client,
    request_timeout: float = BUILD_TIMEOUT_S,
) -> TemplateReady:
    """Build template ``name`` on a worker and snapshot it; returns when it is ready.

    Raises SetupFailed (the failing step's output in the message) if set-up fails.
    Rebuilding an existing name replaces its snapshot; the old one is collected.
    """
    spec = TemplateSpec(
        image=image, run=list(run), start=list(start),
        files={k: v.encode() if isinstance(v, str) else v for k, v in (files or {}).items()},
        ready=ready, ready_timeout=ready_timeout, setup_timeout=setup_timeout,
        env=dict(env or {}), workdir=workdir, user=user,
        resources=Resources(cpu=cpu, memory_mb=memory_mb),
    )
    reply = await client.request(
        BuildTemplate(name=check_name(name), spec=spec), timeout=request_timeout
    )
    assert isinstance(reply, TemplateReady)
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
    async with client.redis.pipeline(transaction=True) as pipe:
        pipe.delete(client.keys.template(name))
        pipe.srem(client.keys.templates, name)
        res = await pipe.execute()
    return bool(res[0])


# ---------------------------------------------------------------------- pools


async def set_pool(
    template: str,
    size: int,
    *,
    cpu: float = 1.0,
    memory_mb: int = 512,
    gpu: str | None = None,
    client: Client,
) -> str:
    """Keep ``size`` warm sandboxes of ``template`` in this shape; returns the pool name.

    ``size=0`` deletes the pool (its warm sandboxes are ended by the pool controller).
    """
    if size < 0:
        raise InvalidRequest(f"pool size must be >= 0, got {size}")
    await get_template(template, client=client)
    name = pool_name(template, Resources(cpu=cpu, memory_mb=memory_mb, gpu=gpu))
    conf = client.keys.pool_conf(name)
    async with client.redis.pipeline(transaction=True) as pipe:
        pipe.hset(conf, mapping={
            "template": template, "size": str(size), "cpu": f"{cpu:g}",
            "memory_mb": str(memory_mb), "gpu": gpu or "",
        })
        pipe.sadd(client.keys.pools, name)
        await pipe.execute()
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
            conf, ready, warming, claiming = await pipe.execute()
        if not conf:
            continue
        out.append(PoolStatus(
            name=n, template=conf[b"template"].decode(), size=int(conf[b"size"]),
            ready=ready, warming=warming, claiming=claiming, cpu=float(conf[b"cpu"]),
            memory_mb=int(conf[b"memory_mb"]), gpu=conf.get(b"gpu", b"").decode(),
        ))
    return out


class _Scripts:
    def __init__(self, client: Client) -> None:
        self.claim = client.redis.register_script(lua.POOL_CLAIM)
        self.record = client.redis.register_script(lua.CLAIM_RECORD)


_scripts: weakref.WeakKeyDictionary[Client, _Scripts] = weakref.WeakKeyDictionary()
_POOL_CLAIM = Script(lua.POOL_CLAIM)
_CLAIM_RECORD = Script(lua.CLAIM_RECORD)


async def claim_nowait(spec: SandboxSpec, *, client: Client) -> SandboxCreated | None:
    """Take a warm sandbox of ``spec.template`` in ``spec``'s shape, or None if none is ready."""
    if not spec.template:
        return None
    if not 0 < spec.timeout <= protocol.MAX_TIMEOUT_S:
        raise InvalidRequest(f"timeout must be in (0, {protocol.MAX_TIMEOUT_S:g}], got {spec.timeout:g}")
    scripts = _scripts.get(client)
    if scripts is None:
        scripts = _scripts[client] = _Scripts(client)
    keys = client.keys
    pool = pool_name(spec.template, spec.resources)
    ready, claims = keys.pool_ready(pool), keys.pool_claims(pool)
    tags = orjson.dumps(spec.tags).decode()
    # Each step is auto-pipelined: concurrent claims of this client share round trips.
    ap = batching.for_client(client.redis)
    while True:
        (got,) = raise_first_error(await ap.execute(
            _POOL_CLAIM.call([ready, claims], [CLAIM_LEASE_MS]), scripts=(_POOL_CLAIM,)
        ))
        if not got:
            return None
        item, now_ms = got[0], int(got[1])
        sid, wid = item.decode().split(" ", 1)
        now = now_ms / 1000
        (ok,) = raise_first_error(await ap.execute(
            _CLAIM_RECORD.call(
                [keys.sandbox(sid)],
                [repr(now), repr(spec.timeout), repr(spec.idle_timeout or 0.0), tags, client.client_id],
            ),
            scripts=(_CLAIM_RECORD,),
        ))
        if not ok:
            # Died (or was taken back) since it was listed: never hand it out.
            await client.redis.zrem(claims, item)
            continue
        notice = Envelope(
            id=new_id(), reply_to="", deadline=time.time() + 60, client=client.client_id,
            body=SandboxClaimed(
                sandbox_id=sid, expires_at=now + spec.timeout, idle_timeout=spec.idle_timeout,
                env=dict(spec.env),
            ),
        )
        raise_first_error(await ap.execute(
            ("XADD", keys.worker_cmds(wid), "*", "m", protocol.encode(notice)),
            ("ZADD", keys.sandboxes, now, sid),
            ("ZREM", claims, item),
        ))
        return SandboxCreated(sandbox_id=sid, worker_id=wid, path="warm")
