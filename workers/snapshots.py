"""The worker's side of templates, memory snapshots, warm pools and pause/resume.

The agent delegates here (``WorkerAgent.snapshots``); the runtime does the container
work through the snapshot methods of :class:`workers.runtimes.base.Runtime`.

Snapshots live in this node's ``snapshot_dir`` as ``<dir>/<SNAPSHOT_ID>/`` (layout owned
by the runtime). A :class:`SnapshotStore` is where a node copies a snapshot it does not
hold from; :class:`LocalStore` is a directory (on one machine, or a shared file system,
it is the snapshot dir itself and nothing is copied). Another store (S3, a peer
fetch) plugs in behind the same four methods.

Garbage collection: :meth:`SnapshotManager.collect` removes every snapshot that no
template record references (older than a grace period, so one being built or just
taken is safe); the worker runs it every ``GC_INTERVAL_S``.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import anyio
import msgspec
import orjson

from daemon import lifecycle
from hotbed import lua, protocol
from hotbed.errors import (
    CapacityExhausted,
    ExecTimeout,
    HotbedError,
    InvalidRequest,
    RuntimeFailure,
    SandboxNotFound,
    SandboxNotRunning,
    SetupFailed,
    TemplateNotFound,
)
from hotbed.protocol import (
    BuildTemplate,
    Envelope,
    ExecSpec,
    PauseSandbox,
    Reply,
    ResumeSandbox,
    SandboxClaimed,
    SandboxCreated,
    SandboxSpec,
    SandboxState,
    SnapshotSandbox,
    StartSandbox,
    TemplateReady,
    TemplateSpec,
)
from hotbed.templates import (
    SPAWN_SCRIPT,
    TemplateRecord,
    check_name,
    template_from_hash,
    template_to_hash,
)
from workers.runtimes.base import Placed

if TYPE_CHECKING:
    from workers.agent import WorkerAgent

log = logging.getLogger(__name__)

GC_INTERVAL_S = 60.0
GC_GRACE_S = 120.0
OUTPUT_TAIL = 2000


def new_snapshot_id() -> str:
    return f"snap-{secrets.token_hex(8)}"


class SnapshotStore(Protocol):
    async def put(self, snapshot_id: str, src: Path) -> None: ...

    async def fetch(self, snapshot_id: str, dest: Path) -> bool:
        """Copy a snapshot into ``dest``; False if the store does not have it."""

    async def delete(self, snapshot_id: str) -> None: ...

    async def list(self) -> list[str]: ...


class LocalStore:
    """A directory of snapshots (``<root>/<id>/``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    async def put(self, snapshot_id: str, src: Path) -> None:
        dest = self.root / snapshot_id

        def copy() -> None:
            if dest.resolve() != src.resolve():
                shutil.copytree(src, dest, dirs_exist_ok=True)

        await anyio.to_thread.run_sync(copy)

    async def fetch(self, snapshot_id: str, dest: Path) -> bool:
        src = self.root / snapshot_id

        def copy() -> bool:
            if not src.is_dir():
                return False
            if src.resolve() == dest.resolve():
                return True
            tmp = dest.with_name(dest.name + f".part-{secrets.token_hex(4)}")
            shutil.copytree(src, tmp)
            try:
                tmp.rename(dest)
            except OSError:  # another restore fetched it first
                shutil.rmtree(tmp, ignore_errors=True)
            return True

        return await anyio.to_thread.run_sync(copy)

    async def delete(self, snapshot_id: str) -> None:
        await anyio.to_thread.run_sync(
            lambda: shutil.rmtree(self.root / snapshot_id, ignore_errors=True)
        )

    async def list(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if p.name.startswith("snap-") and p.is_dir()]


def _text(v: bytes | str | None) -> str:
    return v.decode() if isinstance(v, bytes) else (v or "")


def _tail(data: bytes) -> str:
    text = data.decode("utf-8", "replace").strip()
    return text[-OUTPUT_TAIL:]


class SnapshotManager:
    def __init__(self, agent: WorkerAgent) -> None:
        self.agent = agent
        self.dir = Path(agent.settings.snapshot_dir)
        store_dir = agent.settings.snapshot_store
        self.store: SnapshotStore = LocalStore(Path(store_dir) if store_dir else self.dir)
        self._local = LocalStore(self.dir)

    @property
    def redis(self):  # type: ignore[no-untyped-def]
        return self.agent.redis

    def _guest(self, what: str, sid: str) -> None:
        """Tell the exec service (issue 5) a sandbox's guest channel must be (re)made:
        exec'd processes, the guest agent's included, are not part of a restore."""
        execution = getattr(self.agent, "execution", None)
        if execution is not None:
            getattr(execution, what)(sid)

    # ------------------------------------------------------------ dispatch

    async def handle(self, env: Envelope) -> Reply:
        body = env.body
        if isinstance(body, BuildTemplate):
            return await self.build(env, body)
        if isinstance(body, SnapshotSandbox):
            return await self.snapshot(body)
        if isinstance(body, PauseSandbox):
            return await self.pause(body.sandbox_id)
        if isinstance(body, ResumeSandbox):
            return await self.resume(body.sandbox_id)
        if isinstance(body, SandboxClaimed):
            return self.claimed(body)
        if isinstance(body, StartSandbox):
            return await self.start(body)
        raise InvalidRequest(f"not a snapshot command: {type(body).__name__}")

    # ----------------------------------------------------------- snapshots

    def path(self, snapshot_id: str) -> Path:
        return self.dir / snapshot_id

    async def ensure_local(self, snapshot_id: str, template: str = "") -> Path:
        """The snapshot on this node's disk, copied from the store if needed."""
        dest = self.path(snapshot_id)
        if dest.is_dir():
            return dest
        self.dir.mkdir(parents=True, exist_ok=True)
        if not await self.store.fetch(snapshot_id, dest):
            raise TemplateNotFound(
                f"snapshot {snapshot_id} of template {template!r} is in no store",
                worker_id=self.agent.id,
            )
        if template:
            await self._add_holder(template)
        return dest

    async def _add_holder(self, template: str) -> None:
        key = self.agent.keys.template(template)
        raw = await self.redis.hget(key, "holders")
        holders = set(orjson.loads(raw or b"[]"))
        if self.agent.id not in holders:
            holders.add(self.agent.id)
            await self.redis.hset(key, "holders", orjson.dumps(sorted(holders)))

    async def collect(self, *, grace_s: float = GC_GRACE_S) -> list[str]:
        """Remove snapshots no template references; returns the ids removed."""
        keys = self.agent.keys
        names = [n.decode() for n in await self.redis.smembers(keys.templates)]
        referenced: set[str] = set()
        for n in names:
            snap = await self.redis.hget(keys.template(n), "snapshot")
            if snap:
                referenced.add(snap.decode())
        removed = []
        now = time.time()
        for store in (self._local, self.store):
            for sid in await store.list():
                if sid in referenced:
                    continue
                try:
                    age = now - (store.root / sid).stat().st_mtime  # type: ignore[attr-defined]
                except OSError:
                    continue
                if age < grace_s:
                    continue
                await store.delete(sid)
                if sid not in removed:
                    removed.append(sid)
        if removed:
            log.info("collected %d unreferenced snapshots", len(removed), extra={"worker_id": self.agent.id})
        return removed

    async def gc_loop(self) -> None:
        while True:
            await anyio.sleep(GC_INTERVAL_S)
            try:
                await self.collect()
            except (HotbedError, OSError) as exc:
                log.warning("snapshot collection failed: %s", exc)

    # ------------------------------------------------------------- set-up

    async def setup(self, sid: str, ts: TemplateSpec, user: str) -> None:
        """Files, ``run`` steps, ``start`` processes, then the readiness check."""
        rt = self.agent.runtime
        deadline = anyio.current_time() + ts.setup_timeout
        for path, data in ts.files.items():
            await rt.write_file(sid, path, data, mode=0o644, make_dirs=True, user=user)
        for i, cmd in enumerate(ts.run, 1):
            left = max(1.0, deadline - anyio.current_time())
            try:
                res = await rt.exec(
                    sid, ExecSpec(shell=cmd, env=ts.env, cwd=ts.workdir, timeout=left),
                    default_user=user,
                )
            except ExecTimeout as exc:
                raise SetupFailed(
                    f"set-up step {i} ({cmd!r}) ran past the {ts.setup_timeout:g}s set-up timeout; "
                    f"output:\n{exc.detail.get('stdout', '')}{exc.detail.get('stderr', '')}",
                    sandbox_id=sid, detail={"step": i, "command": cmd},
                ) from None
            if res.exit_code != 0:
                out = _tail(res.stdout + (b"\n" if res.stdout and res.stderr else b"") + res.stderr)
                raise SetupFailed(
                    f"set-up step {i} ({cmd!r}) exited with {res.exit_code}; output:\n{out}",
                    sandbox_id=sid,
                    detail={
                        "step": i, "command": cmd, "exit_code": res.exit_code,
                        "stdout": _tail(res.stdout), "stderr": _tail(res.stderr),
                    },
                )
        for cmd in ts.start:
            await self.spawn(sid, cmd, user)
        if ts.ready:
            give_up = anyio.current_time() + ts.ready_timeout
            while True:
                res = await rt.exec(
                    sid, ExecSpec(shell=ts.ready, env=ts.env, cwd=ts.workdir, timeout=ts.ready_timeout),
                    default_user=user,
                )
                if res.exit_code == 0:
                    break
                if anyio.current_time() > give_up:
                    raise SetupFailed(
                        f"readiness check ({ts.ready!r}) still failing after {ts.ready_timeout:g}s "
                        f"(exit {res.exit_code}); output:\n{_tail(res.stdout + res.stderr)}",
                        sandbox_id=sid, detail={"ready": ts.ready, "exit_code": res.exit_code},
                    )
                await anyio.sleep(0.05)

    async def spawn(self, sid: str, command: str, user: str) -> None:
        """Start ``command`` as a child of the sandbox's init (survives checkpoints)."""
        if "\n" in command:
            raise InvalidRequest("a start command is one line (use ';' or a script file)")
        res = await self.agent.runtime.exec(
            sid,
            ExecSpec(argv=["/bin/sh", "-c", SPAWN_SCRIPT, "sh", command], timeout=30.0),
            default_user=user,
        )
        if res.exit_code != 0:
            raise SetupFailed(f"could not start {command!r}: {_tail(res.stderr)}", sandbox_id=sid)

    # ------------------------------------------------------------- building

    async def _write_template(self, rec: TemplateRecord) -> None:
        keys = self.agent.keys
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.template(rec.name), mapping=template_to_hash(rec))
            pipe.sadd(keys.templates, rec.name)
            await pipe.execute()

    async def _publish_snapshot(self, rec: TemplateRecord, replaced: str) -> None:
        """Record the template ready; if that replaced an older snapshot, retire what its
        pools hold (after the record: a refill racing this restores the new one)."""
        await self._write_template(rec)
        if not replaced or replaced == rec.snapshot:
            return
        keys = self.agent.keys
        retire = self._script(lua.POOL_RETIRE)
        for raw in await self.redis.smembers(keys.pools):
            pool = raw.decode()
            # Template names have no ':', so the prefix names this template's pools only.
            if pool.startswith(rec.name + ":"):
                n = await retire(keys=[keys.pool_ready(pool), keys.pool_stale(pool)])
                if n:
                    log.info("template %s rebuilt: retired %d pooled sandboxes of %s", rec.name, n, pool)

    async def build(self, env: Envelope, cmd: BuildTemplate) -> TemplateReady:
        agent = self.agent
        name, ts = check_name(cmd.name), cmd.spec
        sid = cmd.build_id or f"build-{env.id}"
        user = ts.user or agent.settings.default_user
        started = anyio.current_time()
        old = template_from_hash(await self.redis.hgetall(agent.keys.template(name)))
        building = TemplateRecord(
            name=name, state="building", spec=ts, created_at=lifecycle.wall(),
            # Keep serving the previous snapshot while the new one builds.
            snapshot=old.snapshot if old else "", holders=old.holders if old else [],
            size_bytes=old.size_bytes if old else 0,
        )
        await self._write_template(building)
        placed = Placed(sandbox_id=sid, worker_id=agent.id, prefix=agent.settings.prefix)
        spec = SandboxSpec(
            image=ts.image, resources=ts.resources, env=ts.env, workdir=ts.workdir, user=user,
        )
        snap = new_snapshot_id()
        try:
            await agent.runtime.create(placed, spec)
            await self.setup(sid, ts, user)
            self.dir.mkdir(parents=True, exist_ok=True)
            size = await agent.runtime.checkpoint(sid, self.path(snap), leave_running=False)
            await self.store.put(snap, self.path(snap))
        except BaseException as exc:
            reason = exc.message if isinstance(exc, HotbedError) else f"{type(exc).__name__}: {exc}"
            with anyio.CancelScope(shield=True):
                await self._write_template(msgspec.structs.replace(building, state="failed", error=reason))
                await agent.end_sandbox(sid, reason="template build failed", state="failed")
                shutil.rmtree(self.path(snap), ignore_errors=True)
            if isinstance(exc, HotbedError):
                exc.detail.setdefault("template", name)
            raise
        await agent.end_sandbox(sid, reason="template built")
        build_s = anyio.current_time() - started
        await self._publish_snapshot(TemplateRecord(
            name=name, state="ready", spec=ts, snapshot=snap, size_bytes=size, build_s=build_s,
            holders=[agent.id], created_at=lifecycle.wall(),
        ), replaced=old.snapshot if old else "")
        log.info("template %s built in %.2fs (snapshot %s, %d bytes)", name, build_s, snap, size,
                 extra={"worker_id": agent.id})
        return TemplateReady(name=name, snapshot=snap, size_bytes=size, build_s=build_s, worker_id=agent.id)

    async def snapshot(self, cmd: SnapshotSandbox) -> TemplateReady:
        """Checkpoint a running sandbox (it keeps running) into a new template."""
        agent = self.agent
        name, sid = check_name(cmd.name), cmd.sandbox_id
        local = await agent._touch(sid)
        started = anyio.current_time()
        rec = await agent.redis.hgetall(agent.keys.sandbox(sid))
        snap = new_snapshot_id()
        self.dir.mkdir(parents=True, exist_ok=True)
        local.busy = True
        try:
            size = await agent.runtime.checkpoint(sid, self.path(snap), leave_running=True)
            await self.store.put(snap, self.path(snap))
        except BaseException:
            shutil.rmtree(self.path(snap), ignore_errors=True)
            raise
        finally:
            local.busy = False
        took = anyio.current_time() - started
        ts = TemplateSpec(
            image=_text(rec.get(b"image")), user=local.user,
            resources=protocol.Resources(
                cpu=float(rec.get(b"cpu") or 1.0), memory_mb=int(rec.get(b"memory_mb") or 512)
            ),
        )
        old = template_from_hash(await self.redis.hgetall(agent.keys.template(name)))
        await self._publish_snapshot(TemplateRecord(
            name=name, state="ready", spec=ts, snapshot=snap, size_bytes=size, build_s=took,
            holders=[agent.id], created_at=lifecycle.wall(), source=sid,
        ), replaced=old.snapshot if old else "")
        return TemplateReady(name=name, snapshot=snap, size_bytes=size, build_s=took, worker_id=agent.id)

    # -------------------------------------------------------------- starting

    async def start(self, cmd: StartSandbox) -> SandboxCreated:
        """A sandbox from a template: restored from its snapshot, or booted + set up."""
        from workers.agent import Local

        agent = self.agent
        sid, spec = cmd.sandbox_id, cmd.spec
        if sid in agent.sandboxes:
            return SandboxCreated(sandbox_id=sid, worker_id=agent.id, path=cmd.path)
        started = anyio.current_time()
        ts = cmd.template or TemplateSpec(image=spec.image)
        user = spec.user or ts.user or agent.settings.default_user
        placed = Placed(sandbox_id=sid, worker_id=agent.id, prefix=agent.settings.prefix,
                        gpu_uuids=list(cmd.gpu_uuids))
        try:
            if cmd.snapshot:
                src = await self.ensure_local(cmd.snapshot, spec.template or "")
                await agent.runtime.restore(placed, msgspec.structs.replace(spec, user=user), src)
                env = dict(spec.env)
            else:
                boot = msgspec.structs.replace(
                    spec, image=ts.image, user=user, env={**ts.env, **spec.env},
                    workdir=spec.workdir or ts.workdir,
                )
                await agent.runtime.create(placed, boot)
                await self.setup(sid, ts, user)
                env = {}
        except BaseException as exc:
            reason = exc.message if isinstance(exc, HotbedError) else f"{type(exc).__name__}: {exc}"
            with anyio.CancelScope(shield=True):
                await agent.end_sandbox(sid, reason=reason, state="failed")
                if cmd.pool:
                    await self.redis.zrem(agent.keys.pool_warming(cmd.pool), sid)
            raise
        self._guest("prepare", sid)
        now = lifecycle.wall()
        pooled = bool(cmd.pool)
        agent.sandboxes[sid] = Local(
            id=sid, user=user,
            expires_at=float("inf") if pooled else now + spec.timeout,
            idle_timeout=None if pooled else spec.idle_timeout,
            last_active=now, env=env, pool=cmd.pool,
        )
        keys = agent.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(keys.sandbox(sid), mapping={
                "state": "pooled" if pooled else "running", "started_at": str(now),
                "last_active": str(now), "path": cmd.path, "created_at": str(now),
                "worker": agent.id, "pool": cmd.pool, "image": ts.image, "snapshot": cmd.snapshot,
            })
            if not pooled:
                pipe.zadd(keys.sandboxes, {sid: now})
            await pipe.execute()
        startup = anyio.current_time() - started
        if pooled:
            put = self.redis.register_script(lua.POOL_PUT)
            listed = await put(
                keys=[keys.pool_ready(cmd.pool), keys.pool_warming(cmd.pool), keys.pool_conf(cmd.pool)],
                args=[f"{sid} {agent.id}"],
            )
            if not listed:
                await agent.end_sandbox(sid, reason="pool deleted")
            log.info("pool %s: sandbox ready in %.3fs (%s)", cmd.pool, startup, cmd.path,
                     extra={"sandbox_id": sid})
        return SandboxCreated(sandbox_id=sid, worker_id=agent.id, path=cmd.path, startup_s=startup,
                              gpu_uuids=list(cmd.gpu_uuids))

    def claimed(self, cmd: SandboxClaimed) -> SandboxState:
        """A pooled sandbox was claimed: its lifetime starts now. No awaits before the
        update, so a command the claimer sends next (same stream) already sees it."""
        local = self.agent.sandboxes.get(cmd.sandbox_id)
        if local is None:
            return SandboxState(sandbox_id=cmd.sandbox_id, state="gone")
        local.pool = ""
        local.expires_at = cmd.expires_at
        local.idle_timeout = cmd.idle_timeout
        local.env = dict(cmd.env)
        local.last_active = lifecycle.wall()
        return SandboxState(sandbox_id=cmd.sandbox_id, state="running")

    # ---------------------------------------------------------- pause/resume

    async def pause(self, sid: str) -> SandboxState:
        agent = self.agent
        local = agent.sandboxes.get(sid)
        if local is None:
            await agent._touch(sid)  # raises the right error
            raise SandboxNotFound(f"no sandbox {sid}", sandbox_id=sid)
        if local.paused:
            return SandboxState(sandbox_id=sid, state="paused")
        if local.pool:
            raise SandboxNotRunning(f"sandbox {sid} is pooled, not claimed", sandbox_id=sid)
        local.paused = True  # the health check must not take the stop for a death
        self._guest("forget", sid)
        try:
            await agent.runtime.pause(sid)
        except BaseException:
            local.paused = False
            raise
        await self.redis.hset(agent.keys.sandbox(sid), "state", "paused")
        # Its CPU and memory are free while it sleeps on disk.
        await self._script(lua.PARK)(keys=self._cap_keys(), args=[sid])
        return SandboxState(sandbox_id=sid, state="paused")

    def _script(self, source: str):  # type: ignore[no-untyped-def]
        return self.redis.register_script(source)

    def _cap_keys(self) -> list[str]:
        keys, wid = self.agent.keys, self.agent.id
        return [keys.worker_cap(wid), keys.worker_sandboxes(wid)]

    async def _unpark(self, sid: str) -> None:
        """Reserve a paused sandbox's CPU and memory again, or CapacityExhausted."""
        cpu, mem = await self.redis.hmget(self.agent.keys.sandbox(sid), "cpu", "memory_mb")
        need_cpu = int(round(float(cpu or 0) * 1000))
        got = await self._script(lua.UNPARK)(keys=self._cap_keys(), args=[sid, need_cpu, int(mem or 0)])
        if got == 0:
            raise CapacityExhausted(
                f"worker {self.agent.id} has no room to resume {sid} now (it stays paused; "
                f"cpu={need_cpu / 1000:g} memory={int(mem or 0)}MiB needed)", sandbox_id=sid,
            )

    async def resume(self, sid: str) -> SandboxState:
        agent = self.agent
        local = agent.sandboxes.get(sid)
        if local is None:
            await agent._touch(sid)
            raise SandboxNotFound(f"no sandbox {sid}", sandbox_id=sid)
        if not local.paused:
            return SandboxState(sandbox_id=sid, state="running")
        await self._unpark(sid)
        local.busy = True
        try:
            try:
                await agent.runtime.resume(sid)
            except RuntimeFailure:
                # One retry: dockerd/containerd occasionally refuse the first restore.
                await anyio.sleep(0.2)
                await agent.runtime.resume(sid)
            local.paused = False
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._script(lua.PARK)(keys=self._cap_keys(), args=[sid])
            raise
        finally:
            local.busy = False
        self._guest("forget", sid)
        self._guest("prepare", sid)
        local.last_active = lifecycle.wall()
        await self.redis.hset(agent.keys.sandbox(sid), mapping={"state": "running", "last_active": str(local.last_active)})
        return SandboxState(sandbox_id=sid, state="running")
