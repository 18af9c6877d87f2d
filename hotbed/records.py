"""Sandbox records as stored in Redis (one hash per sandbox, ``Keys.sandbox``).

A hash rather than one encoded blob so that hot fields (``state``, ``last_active``) are
updated with one HSET and no read-modify-write. Values are strings; tags are JSON.

States::

    creating -> running -> terminated      (reason: client | timeout | idle_timeout | ...)
             \\-> failed                   (reason: the error)
    running  -> lost                       (its worker stopped heartbeating)
    running <-> paused                     (issue 3)
    creating -> pooled -> running           (warm pool: made ready, then claimed)

An ended record (terminated / failed / lost) is kept for ``ENDED_RECORD_TTL_S`` so
``Sandbox.from_id`` can say why a sandbox is gone, then expires.
"""

from __future__ import annotations

from typing import Literal

import msgspec
import orjson

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
    tags: dict[str, str] = {}
    # Warm pool the sandbox was made for ("" if none).
    pool: str = ""
    # The template snapshot it was restored from ("" = booted): a pooled sandbox whose
    # template has since been rebuilt is replaced, never handed out.
    snapshot: str = ""

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
        if field in ("tags", "gpu_uuids"):
            out[field] = orjson.dumps(value).decode()
        else:
            out[field] = str(value)
    return out


_FLOAT_FIELDS = frozenset(
    {"cpu", "created_at", "started_at", "last_active", "ended_at", "timeout", "idle_timeout"}
)


def from_hash(raw: dict[bytes, bytes] | dict[str, str]) -> SandboxRecord | None:
    if not raw:
        return None
    data: dict[str, object] = {}
    for k, v in raw.items():
        key = k.decode() if isinstance(k, bytes) else k
        val = v.decode() if isinstance(v, bytes) else v
        if key in ("tags", "gpu_uuids"):
            data[key] = orjson.loads(val) if val else ([] if key == "gpu_uuids" else {})
        elif key in _FLOAT_FIELDS:
            data[key] = float(val or 0)
        elif key == "memory_mb":
            data[key] = int(val or 0)
        else:
            data[key] = val
    if "id" not in data:
        return None
    return msgspec.convert(data, SandboxRecord, strict=False)
