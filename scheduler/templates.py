"""Creates from a template, and template builds: what the scheduler adds to placement.

A create naming a template that a client could not claim warm (its pool was empty or
it has none) is placed like any sandbox, with a start command that restores the
template's snapshot (``path="restore"``) or, for a template with no snapshot yet, boots
its image and runs its set-up (``path="cold"``). A build is placed like a sandbox of
the template's shape, so it holds capacity while it runs; the worker replies.
"""

from __future__ import annotations

import msgspec
import redis.asyncio as aioredis

from hotbed import network as hotbed_network
from hotbed.errors import InvalidRequest, TemplateNotFound
from hotbed.keys import Keys
from hotbed.protocol import (
    BuildTemplate,
    CreatePath,
    Envelope,
    SandboxSpec,
    StartSandbox,
    TemplateSpec,
)
from hotbed.records import template_from_hash
from hotbed.templates import check_name
from scheduler.once import Lease
from scheduler.placement import copy_cost_s
from scheduler.placer import Placer


class Resolved(msgspec.Struct, frozen=True, kw_only=True):
    spec: SandboxSpec
    template: TemplateSpec
    snapshot: str
    path: CreatePath
    holders: list[str]
    size_bytes: int = 0

    def start(self, sid: str, *, pool: str = "") -> StartSandbox:
        return StartSandbox(
            sandbox_id=sid, spec=self.spec, path=self.path, template=self.template,
            snapshot=self.snapshot, pool=pool,
        )


async def resolve(redis: aioredis.Redis, keys: Keys, spec: SandboxSpec) -> Resolved:
    """The start recipe for ``spec.template``: TemplateNotFound if there is none."""
    name = spec.template or ""
    rec = template_from_hash(await redis.hgetall(keys.template(name)))
    if rec is None:
        raise TemplateNotFound(f"no template {name!r}")
    ts = rec.spec
    problem = hotbed_network.restore_problem(name, ts.network, spec.network) if rec.snapshot else ""
    if problem:
        raise InvalidRequest(problem)
    spec = msgspec.structs.replace(
        spec, image=ts.image, user=spec.user or ts.user, workdir=spec.workdir or ts.workdir,
        # Stated by the create (or its pool), else the template's: a snapshot restores
        # into any network (gVisor's stack takes the new sandbox's interfaces).
        network=spec.network if spec.network is not None else ts.network,
        # A template built where isolation was waived is restored under the same terms.
        allow_unisolated=spec.allow_unisolated or ts.allow_unisolated,
    )
    # A template being rebuilt keeps serving its previous snapshot.
    return Resolved(
        spec=spec, template=ts, snapshot=rec.snapshot,
        path="restore" if rec.snapshot else "cold", holders=rec.holders, size_bytes=rec.size_bytes,
    )


async def place_from_template(
    placer: Placer, env: Envelope, spec: SandboxSpec, *, lease: Lease | None = None
) -> None:
    """A restore goes to a node holding the snapshot if one has room, or frees up
    within what copying the snapshot would take; else to any node (which copies it)."""
    r = await resolve(placer.redis, placer.keys, spec)
    hold = copy_cost_s(r.size_bytes, placer.settings.snapshot_copy_mb_per_s) if r.snapshot else 0.0
    await placer.place(
        env, r.spec, make_start=r.start, prefer=r.holders if r.snapshot else (), hold_for_s=hold,
        lease=lease,
    )


async def place_build(placer: Placer, env: Envelope, cmd: BuildTemplate, *, lease: Lease | None = None) -> None:
    check_name(cmd.name)
    ts = cmd.spec
    spec = SandboxSpec(
        image=ts.image, resources=ts.resources, timeout=max(ts.setup_timeout, 1.0), network=ts.network,
        allow_unisolated=ts.allow_unisolated,
    )
    await placer.place(
        env, spec, make_start=lambda sid: msgspec.structs.replace(cmd, build_id=sid), lease=lease
    )
