"""Choosing workers for a sandbox: pure functions over the registry's view of them
(:class:`WorkerView`, kept fresh by :mod:`scheduler.registry`).

``rank`` filters the live workers that could take the sandbox now and orders them by
policy (``spread``: most free CPU first; ``pack``: least free first). ``could_ever``
says whether any live worker could take it at all, so an impossible request fails at
once (NoMatchingWorker) while a merely busy fleet makes it wait (CapacityExhausted at
its deadline).

Isolation: a worker advertises whether its runtime isolates sandboxes
(``WorkerInfo.isolated``: gVisor); a request goes to one that does not only when it
opted out (``SandboxSpec.allow_unisolated``). Both ``rank`` and ``could_ever`` apply
it, so a fleet with no isolated worker answers NoMatchingWorker at once.

Images: ``image_fit`` splits the workers into those holding the sandbox's image (as
they advertise, :class:`hotbed.records.HeldImages`), those that could get it (pull it
from a registry they list, or may hold it: no or a truncated advertisement) and the
rest; the placer tries holders first and never the rest while anyone could get it.

Snapshots: a restore prefers the nodes holding its snapshot; any other node must copy
it first (``copy_cost_s``), so while a holder could take the restore the placer waits
for one about as long as that copy would take, then places it anywhere.

GPU requests: ``"H100"`` (one), ``"H100:2"``, ``"any"``, ``"any:2"``; models match
case-insensitively as a substring of the NVML name ("H100" matches "NVIDIA H100 80GB
HBM3"). CPU-only sandboxes avoid GPU workers while a CPU-only worker has room.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from hotbed.errors import InvalidRequest
from hotbed.protocol import SandboxSpec, WorkerInfo
from hotbed.records import image_ref, image_registry

# What a snapshot copy costs beyond moving its bytes: connecting, the manifest, the
# last file's check, the rename.
COPY_OVERHEAD_S = 0.2


def copy_cost_s(size_bytes: int, mb_per_s: float) -> float:
    """Seconds a node needs to copy a snapshot of ``size_bytes`` from another."""
    return COPY_OVERHEAD_S + size_bytes / (mb_per_s * 2**20)


class WorkerView(msgspec.Struct, kw_only=True):
    info: WorkerInfo
    cpu_free: int = 0
    mem_free: int = 0
    gpu_free: list[str] = []
    sandboxes: int = 0
    heartbeat_at: float = 0.0
    # Image names and ids it advertises holding; None: it advertises none (a runtime
    # without images, or a list cut short), so it may hold any.
    images: frozenset[str] | None = None

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def has_gpus(self) -> bool:
        return bool(self.info.gpus)


class GpuNeed(msgspec.Struct, frozen=True):
    model: str  # "any" or a model name
    count: int


def parse_gpu(gpu: str | None) -> GpuNeed | None:
    if not gpu:
        return None
    model, _, count = gpu.partition(":")
    try:
        n = int(count) if count else 1
    except ValueError:
        raise InvalidRequest(f"bad gpu request {gpu!r}: want MODEL or MODEL:COUNT") from None
    if n < 1 or not model:
        raise InvalidRequest(f"bad gpu request {gpu!r}: want MODEL or MODEL:COUNT")
    return GpuNeed(model=model.strip(), count=n)


def matching_gpus(w: WorkerView, need: GpuNeed, *, free_only: bool) -> list[str]:
    pool = set(w.gpu_free) if free_only else None
    out = []
    for g in w.info.gpus:
        if pool is not None and g.uuid not in pool:
            continue
        if need.model.lower() == "any" or need.model.lower() in g.model.lower():
            out.append(g.uuid)
    return out


def _fits_tags(w: WorkerView, node_tags: dict[str, str]) -> bool:
    return all(w.info.tags.get(k) == v for k, v in node_tags.items())


def isolation_fits(w: WorkerView, spec: SandboxSpec) -> bool:
    """Whether ``w`` may run ``spec``: only a request that opted out of isolation goes
    to a worker whose runtime does not isolate (process, sim, docker with runc)."""
    return w.info.isolated or spec.allow_unisolated


def could_ever(workers: Sequence[WorkerView], spec: SandboxSpec, node_tags: dict[str, str]) -> bool:
    res = spec.resources
    need = parse_gpu(res.gpu)
    for w in workers:
        if not isolation_fits(w, spec):
            continue
        if w.info.cpu_millis < res.millicpu or w.info.memory_mb < res.memory_mb:
            continue
        if not _fits_tags(w, node_tags):
            continue
        if need and len(matching_gpus(w, need, free_only=False)) < need.count:
            continue
        return True
    return False


def rank(
    workers: Sequence[WorkerView],
    spec: SandboxSpec,
    *,
    node_tags: dict[str, str] | None = None,
    policy: str = "spread",
    gpu_workers_for_cpu: bool = False,
) -> list[tuple[WorkerView, list[str]]]:
    """Workers that could take ``spec`` now, best first, each with its eligible GPU uuids."""
    res = spec.resources
    need = parse_gpu(res.gpu)
    out: list[tuple[WorkerView, list[str]]] = []
    for w in workers:
        if w.cpu_free < res.millicpu or w.mem_free < res.memory_mb:
            continue
        if not isolation_fits(w, spec):
            continue
        if node_tags and not _fits_tags(w, node_tags):
            continue
        gpus: list[str] = []
        if need:
            gpus = matching_gpus(w, need, free_only=True)
            if len(gpus) < need.count:
                continue
        out.append((w, gpus))
    sign = -1 if policy == "spread" else 1
    if need is None and not gpu_workers_for_cpu:
        # CPU-only work goes to GPU nodes only when no CPU-only node has room.
        out.sort(key=lambda c: (c[0].has_gpus, sign * c[0].cpu_free))
    else:
        out.sort(key=lambda c: sign * c[0].cpu_free)
    return out


def image_fit(workers: Sequence[WorkerView], image: str) -> tuple[set[str], set[str] | None]:
    """(workers holding ``image``, workers that could get it). The second is None when
    placement need not care: no worker advertises images, or none could get it (only a
    worker's own check can then say, and it answers ImageNotFound at once)."""
    if not image or all(w.images is None for w in workers):
        return set(), None
    ref, registry = image_ref(image), image_registry(image)
    holders: set[str] = set()
    able: set[str] = set()
    for w in workers:
        if w.images is not None and (ref in w.images or image in w.images):
            holders.add(w.id)
            able.add(w.id)
        elif w.images is None or registry in w.info.registries:
            able.add(w.id)
    return holders, (able or None)
