"""The Redis shapes both daemons and the SDK share, each with its one codec.

* **Sandbox records** (:class:`SandboxRecord`, one hash per sandbox, ``Keys.sandbox``):
  :func:`to_hash` / :func:`from_hash`, and the named state transitions below, which
  give the exact field writes of each step (the worker, the scheduler and the Lua
  scripts take their field names from here, never spell them).
* **Worker capacity** (:class:`Capacity`, ``Keys.worker_cap``): written only by the
  capacity scripts in :mod:`hotbed.lua`; read with :func:`capacity_from_hash`.
* **Pool config** (:class:`PoolConfig`, ``Keys.pool_conf``):
  :func:`pool_config_to_hash` / :func:`pool_config_from_hash`.
* **Template records** (:class:`TemplateRecord`, ``Keys.template``):
  :func:`template_to_hash` / :func:`template_from_hash`; the ``holders`` list is only
  ever extended by the ``ADD_HOLDER`` script (:func:`add_template_holder`).
* **Held images** (:class:`HeldImages`, ``Keys.worker_images``): what a worker
  advertises holding; :func:`images_to_value` / :func:`images_from_value`, with the
  image-reference helpers both sides match names with (:func:`image_ref`,
  :func:`image_registry`).

A sandbox record is a hash rather than one encoded blob so that hot fields (``state``,
``last_active``) are updated with one HSET and no read-modify-write. Values are
strings; tags and GPU uuids are JSON.

States and the transition that writes each step::

    creating -> running -> terminated      to_started / to_restored, then to_ended
             \\-> failed                   to_ended(state="failed", reason=the error)
    running  -> lost                       to_lost (its worker stopped heartbeating)
    running <-> paused                     to_paused / to_resumed
    creating -> pooled -> running          to_restored(pool=...), then to_claimed
    pooled   -> terminated | failed        to_unlisted (before the container goes)

A paused record says who paused it (``paused_by``: ``"client"`` for an explicit pause,
``"auto"`` for the worker's idle or memory-pressure pause, which the next request
undoes by itself); :func:`shown_state` is how listings spell the two.

A live sandbox's lifetime and tags may change after create (:func:`with_lifetime`,
:func:`with_tags`); ``created_at + timeout`` always stays the moment it expires.

An ended record (terminated / failed / lost) is kept for ``ENDED_RECORD_TTL_S`` so
``Sandbox.from_id`` can say why a sandbox is gone, then expires.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import msgspec
import orjson
import redis.asyncio as aioredis

from hotbed import lua
from hotbed.batching import Command
from hotbed.protocol import NetworkPolicy, TemplateSpec, encode

State = Literal["creating", "pooled", "running", "paused", "terminated", "failed", "lost"]
ENDED_STATES = frozenset({"terminated", "failed", "lost"})
ENDED_RECORD_TTL_S = 3600


class SandboxRecord(msgspec.Struct, kw_only=True, frozen=True):
    id: str
    worker: str = ""
    image: str = ""
    template: str = ""
    state: State = "creating"
    reason: str = ""
    cpu: float = 0.0
    memory_mb: int = 0
    gpu: str = ""
    gpu_uuids: list[str] = []
    path: str = ""
    created_at: float = 0.0
    started_at: float = 0.0
    last_active: float = 0.0
    ended_at: float = 0.0
    timeout: float = 0.0
    idle_timeout: float = 0.0
    # As the create asked (None: the node's default; 0: never).
    auto_pause_after: float | None = None
    # While paused: "auto" (resumed by the next request) or "client".
    paused_by: str = ""
    paused_at: float = 0.0
    tags: dict[str, str] = {}
    # Warm pool the sandbox was made for ("" if none).
    pool: str = ""
    # The template snapshot it was restored from ("" = booted): a pooled sandbox whose
    # template has since been rebuilt is replaced, never handed out.
    snapshot: str = ""
    # Its network mode ("" = none) and allow list (protocol.NetworkPolicy): kept by its
    # snapshots and by a worker that adopts it after a restart.
    network: str = ""
    allow: list[str] = []

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES


# Written even when they hold their default: Lua scripts and pool code read them raw.
ALWAYS_WRITTEN = frozenset({"id", "state"})
_DEFAULTS = {
    f.name: f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
    for f in msgspec.structs.fields(SandboxRecord)
    if f.default is not msgspec.NODEFAULT or f.default_factory is not msgspec.NODEFAULT
}


def to_hash(rec: SandboxRecord) -> dict[str, str]:
    """The hash fields of ``rec``. Fields at their default are left out (``from_hash``
    restores them), which keeps a live sandbox's record near 300 bytes of Redis memory
    with 100,000 of them; ``id`` and ``state`` are always written."""
    out: dict[str, str] = {}
    for field in rec.__struct_fields__:
        value = getattr(rec, field)
        if field not in ALWAYS_WRITTEN and value == _DEFAULTS.get(field, msgspec.NODEFAULT):
            continue
        if field in ("tags", "gpu_uuids", "allow"):
            out[field] = orjson.dumps(value).decode()
        else:
            out[field] = str(value)
    return out


_FLOAT_FIELDS = frozenset(
    {"cpu", "created_at", "started_at", "last_active", "ended_at", "timeout", "idle_timeout",
     "paused_at"}
)


def from_hash(raw: Mapping[Any, Any]) -> SandboxRecord | None:
    if not raw:
        return None
    data: dict[str, object] = {}
    for k, v in raw.items():
        key = k.decode() if isinstance(k, bytes) else k
        val = v.decode() if isinstance(v, bytes) else v
        if key in ("tags", "gpu_uuids", "allow"):
            data[key] = orjson.loads(val) if val else ({} if key == "tags" else [])
        elif key in _FLOAT_FIELDS:
            data[key] = float(val or 0)
        elif key == "auto_pause_after":
            data[key] = float(val) if val else None
        elif key == "memory_mb":
            data[key] = int(val or 0)
        else:
            data[key] = val
    if "id" not in data:
        return None
    return msgspec.convert(data, SandboxRecord, strict=False)


# ------------------------------------------------------------ state transitions
# Each gives the exact fields one step writes (HSET them as they are): only this
# module spells a record's field names.

# Field name -> value. Keys typed Any so redis-py's ``hset(mapping=...)`` takes it.
Fields = dict[Any, str]


def field_names(*names: str) -> tuple[str, ...]:
    """``names``, checked to be record fields: for code that reads a few fields raw
    (HMGET) instead of decoding the whole record."""
    unknown = set(names) - set(SandboxRecord.__struct_fields__)
    if unknown:
        raise ValueError(f"not sandbox record fields: {sorted(unknown)}")
    return names


def hset(key: str, fields: Fields) -> Command:
    """``fields`` written to ``key``, as a command for ``AutoPipeline.execute``."""
    return ("HSET", key, *(x for kv in fields.items() for x in kv))


def to_started(*, now: float, path: str, worker: str) -> Fields:
    """creating -> running: a sandbox booted from an image."""
    return {
        "state": "running", "started_at": str(now), "last_active": str(now), "path": path,
        "created_at": str(now), "worker": worker,
    }


def to_restored(
    *, now: float, path: str, worker: str, pool: str, image: str, snapshot: str
) -> Fields:
    """creating -> running, or -> pooled when made for a warm pool (``pool``): a
    sandbox restored from a template's snapshot (or booted and set up from one)."""
    return {
        "state": "pooled" if pool else "running", "started_at": str(now),
        "last_active": str(now), "path": path, "created_at": str(now), "worker": worker,
        "pool": pool, "image": image, "snapshot": snapshot,
    }


# The claim's clock: set from Redis's time, by whoever flips the record.
CLAIM_CLOCK = ("created_at", "started_at", "last_active")


def claim_clock(now: float) -> Fields:
    """The :data:`CLAIM_CLOCK` fields of a claim made at ``now`` (Redis's clock)."""
    return dict.fromkeys(CLAIM_CLOCK, repr(now))


def to_claimed(
    *, now: float | None, timeout: float, idle_timeout: float, tags: dict[str, str], client_id: str,
    auto_pause_after: float | None = None,
) -> Fields:
    """pooled -> running: a client claimed a warm sandbox; its clock starts now. Sent
    as ARGV to ``lua.CLAIM_RECORD`` or ``lua.POOL_CLAIM``, which write it only if the
    record is still pooled; ``now`` None leaves out the :data:`CLAIM_CLOCK` fields, for
    ``POOL_CLAIM`` to set. ``claimed_by`` is for operators reading the hash (the record
    does not decode it)."""
    fields = {
        "state": "running", "path": "warm", "timeout": repr(timeout), "idle_timeout": repr(idle_timeout),
        "tags": orjson.dumps(tags).decode(), "claimed_by": client_id,
        # "" reads back as None: the node's default.
        "auto_pause_after": "" if auto_pause_after is None else repr(auto_pause_after),
    }
    if now is not None:
        fields.update(claim_clock(now))
    return fields


def is_pooled(fields: Fields) -> bool:
    """Whether a transition's ``fields`` leave the sandbox waiting in a warm pool."""
    return fields.get("state") == "pooled"


def touched(last_active: float) -> Fields:
    """Activity seen (written by the worker's heartbeat, at most once a beat)."""
    return {"last_active": str(last_active)}


PausedBy = Literal["client", "auto"]


def to_paused(*, by: PausedBy = "client", now: float = 0.0) -> Fields:
    """running -> paused (checkpointed to disk), by a client or by the worker."""
    return {"state": "paused", "paused_by": by, "paused_at": str(now)}


def to_resumed(*, now: float) -> Fields:
    return {"state": "running", "last_active": str(now), "paused_by": "", "paused_at": "0"}


def shown_state(rec: SandboxRecord) -> str:
    """The state as listings show it: ``paused (auto)`` for a worker's pause."""
    if rec.state == "paused" and rec.paused_by == "auto":
        return "paused (auto)"
    return rec.state


def to_unlisted(*, failed: bool) -> Fields:
    """A pooled sandbox leaving its pool: marked ended before its container goes, so a
    claim racing the end sees it is no longer pooled. :func:`to_ended` follows."""
    return {"state": "failed" if failed else "terminated"}


def to_ended(*, state: str, reason: str, now: float) -> Fields:
    """-> terminated | failed | lost; expire the record ``ENDED_RECORD_TTL_S`` later."""
    return {"state": state, "reason": reason, "ended_at": str(now)}


def to_lost(*, worker: str, now: float) -> Fields:
    """-> lost: its worker stopped heartbeating (the reaper's step)."""
    return to_ended(state="lost", reason=f"worker {worker} stopped heartbeating", now=now)


def to_readopted(*, state: str) -> Fields:
    """lost -> ``state`` (running, paused or pooled) again: its worker was declared dead
    but came back with the sandbox intact (:meth:`workers.sandboxes.SandboxTable.readopt`)."""
    return {"state": state, "reason": "", "ended_at": "0.0"}


def reservation_value(*, millicpu: int, memory_mb: int, gpus: list[str]) -> str:
    """A :class:`Reservation` as ``Keys.worker_sandboxes`` holds it."""
    return f"{millicpu} {memory_mb} {','.join(gpus)}"


def with_lifetime(*, created_at: float, expires_at: float) -> Fields:
    """A new end of life: ``timeout`` counts from ``created_at``, as at create."""
    return {"timeout": repr(max(0.0, expires_at - created_at))}


def with_tags(tags: dict[str, str]) -> Fields:
    """Tags replaced whole (``Sandbox.list(tags=...)`` filters on them)."""
    return {"tags": orjson.dumps(tags).decode()}


# ------------------------------------------------------------------ capacity


class Capacity(msgspec.Struct, frozen=True, kw_only=True):
    """A worker's free capacity (``Keys.worker_cap``): fields ``cpu`` (millicpu),
    ``mem`` (MiB), ``n`` (sandboxes placed) and ``gpu:<uuid>`` (``0`` free, ``1``
    taken). Only the Lua scripts write it (REGISTER, RESERVE_DISPATCH, RELEASE, PARK,
    UNPARK); everything else reads it through :func:`capacity_from_hash`."""

    cpu_free: int = 0
    mem_free: int = 0
    sandboxes: int = 0
    gpu_free: list[str] = []
    gpu_taken: list[str] = []


def capacity_from_hash(raw: Mapping[Any, Any]) -> Capacity:
    """The capacity in ``raw`` (HGETALL of ``Keys.worker_cap``); absent fields are 0."""
    cpu = mem = n = 0
    free: list[str] = []
    taken: list[str] = []
    for k, v in raw.items():
        key = _s(k)
        if key.startswith("gpu:"):
            val = _s(v)
            if val == "0":
                free.append(key[4:])
            elif val == "1":
                taken.append(key[4:])
        elif key == "cpu":
            cpu = int(v)
        elif key == "mem":
            mem = int(v)
        elif key == "n":
            n = int(v)
    return Capacity(cpu_free=cpu, mem_free=mem, sandboxes=n, gpu_free=free, gpu_taken=taken)


class Reservation(msgspec.Struct, frozen=True, kw_only=True):
    """One sandbox's entry in ``Keys.worker_sandboxes``: ``"MILLICPU MIB GPU,GPU..."``
    (``"0 0 GPUS"`` while paused). Only the Lua scripts write it; this reads it."""

    millicpu: int
    memory_mb: int
    gpus: list[str] = []


def reservation_from_value(raw: bytes | str) -> Reservation:
    parts = _s(raw).split(" ")
    gpus = [g for g in parts[2].split(",") if g] if len(parts) > 2 else []
    return Reservation(millicpu=int(parts[0]), memory_mb=int(parts[1]), gpus=gpus)


# --------------------------------------------------------------- pool config


class PoolConfig(msgspec.Struct, frozen=True, kw_only=True):
    """A warm pool's target (``Keys.pool_conf``): its template, size and shape. Always
    written whole (:func:`hotbed.templates.set_pool`)."""

    template: str
    size: int = 0
    cpu: float = 0.0
    memory_mb: int = 0
    gpu: str = ""
    # The network its sandboxes get; None: the template's (hotbed.network.pool_key).
    network: NetworkPolicy | None = None
    # The tenant whose creates claim from it (its sandboxes get that tenant's ids); "":
    # the operators'.
    tenant: str = ""


def pool_config_to_hash(conf: PoolConfig) -> Fields:
    return {
        "template": conf.template, "size": str(conf.size), "cpu": f"{conf.cpu:g}",
        "memory_mb": str(conf.memory_mb), "gpu": conf.gpu,
        "network": msgspec.json.encode(conf.network).decode() if conf.network is not None else "",
        "tenant": conf.tenant,
    }


def pool_config_from_hash(raw: Mapping[Any, Any]) -> PoolConfig | None:
    """The config in ``raw`` (HGETALL of ``Keys.pool_conf``), or None for no pool."""
    if not raw:
        return None
    d = {_s(k): _s(v) for k, v in raw.items()}
    return PoolConfig(
        template=d.get("template", ""), size=int(d.get("size") or 0),
        cpu=float(d.get("cpu") or 0), memory_mb=int(d.get("memory_mb") or 0),
        gpu=d.get("gpu", ""),
        network=msgspec.json.decode(d["network"], type=NetworkPolicy) if d.get("network") else None,
        tenant=d.get("tenant", ""),
    )


# ----------------------------------------------------------- template records

TemplateState = Literal["building", "ready", "failed"]


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
    # Digest of the snapshot's files (workers.snapshot_peers.manifest): a node that
    # copies the snapshot checks it before restoring from it.
    sha256: str = ""


def template_to_hash(rec: TemplateRecord) -> dict[str, Any]:
    return {
        "name": rec.name, "state": rec.state, "spec": encode(rec.spec),
        "snapshot": rec.snapshot, "size_bytes": str(rec.size_bytes), "build_s": str(rec.build_s),
        "holders": orjson.dumps(rec.holders), "error": rec.error,
        "created_at": str(rec.created_at), "source": rec.source, "sha256": rec.sha256,
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
        sha256=g(b"sha256", b"").decode(),
    )


async def add_template_holder(redis: aioredis.Redis, key: str, worker_id: str) -> bool:
    """List ``worker_id`` among the holders of the template at ``key`` (one Lua step:
    concurrent holders never overwrite each other). True if it was not listed yet."""
    return bool(await lua.ADD_HOLDER.run(redis, [key], [worker_id]))


# ----------------------------------------------------------------- held images

# At most this many names in one worker's advertisement: placement only needs to know
# the images a node holds, and a node with thousands of tags says "truncated" instead
# (it may hold anything, as far as placement knows).
MAX_ADVERTISED_IMAGES = 500
DOCKER_HUB = "docker.io"


class HeldImage(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """One name a worker holds: its normalized reference (:func:`image_ref`), image id
    (``sha256:...``), size in bytes and creation time (unix s)."""

    name: str
    id: str
    size: int = 0
    created: float = 0.0


class HeldImages(msgspec.Struct, frozen=True, kw_only=True):
    """A worker's advertisement (``Keys.worker_images``): rewritten with a TTL every
    image refresh and right after a pull, so a stopped worker's list expires."""

    images: list[HeldImage] = []
    # More names than MAX_ADVERTISED_IMAGES: the list is a prefix of what it holds.
    truncated: bool = False
    at: float = 0.0

    def names(self) -> set[str]:
        return {i.name for i in self.images} | {i.id for i in self.images}


_images_encoder = msgspec.msgpack.Encoder()
_images_decoder = msgspec.msgpack.Decoder(HeldImages)


def images_to_value(held: HeldImages) -> bytes:
    return _images_encoder.encode(held)


def images_from_value(raw: bytes | str | None) -> HeldImages | None:
    """The advertisement in ``raw`` (GET of ``Keys.worker_images``); None if absent or
    unreadable (placement then treats the worker as one that may hold anything)."""
    if not raw:
        return None
    try:
        return _images_decoder.decode(_b(raw))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _split_registry(ref: str) -> tuple[str, str]:
    first, sep, rest = ref.partition("/")
    # Docker's rule: the first component names a registry when it looks like a host.
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return DOCKER_HUB, ref


def image_registry(ref: str) -> str:
    """The registry host an image reference pulls from (``docker.io`` when unnamed)."""
    if ref.startswith("sha256:"):
        return ""
    return _split_registry(ref)[0]


def image_ref(ref: str) -> str:
    """``ref`` as dockerd lists it in RepoTags: a tag (``:latest`` when none is given),
    Docker Hub's ``docker.io/`` and ``library/`` left out. Ids and digests stay as given."""
    if ref.startswith("sha256:") or "@" in ref:
        return ref
    registry, path = _split_registry(ref)
    if registry in (DOCKER_HUB, "index.docker.io"):
        registry = ""
        if path.startswith("library/") and path.count("/") == 1:
            path = path[len("library/"):]
    if ":" not in path.rsplit("/", 1)[-1]:
        path += ":latest"
    return f"{registry}/{path}" if registry else path
