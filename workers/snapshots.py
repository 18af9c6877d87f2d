"""The worker's side of templates, memory snapshots, warm pools and pause/resume.

The worker agent routes those commands here; this service works on the sandbox table
(:mod:`workers.sandboxes`) and the runtime's snapshot methods
(:class:`workers.runtimes.base.Runtime`), never on the agent.

Snapshots live in this node's ``snapshot_dir`` as ``<dir>/<SNAPSHOT_ID>/`` (layout owned
by the runtime). A snapshot this node does not hold is copied in once (however many
restores ask for it at once): from the operator's :class:`SnapshotStore` when one is
configured (:class:`LocalStore`, a directory: on one machine, or a shared file system;
with none, it is the snapshot dir itself and nothing is copied), else from a node that
holds it (:mod:`workers.snapshot_peers`). Either copy must match the digest recorded
when the snapshot was taken (``TemplateRecord.sha256``) before anything restores it.

Garbage collection: :meth:`SnapshotManager.collect` removes every snapshot that no
template record references (older than a grace period, so one being built or just
taken is safe); the worker runs it every ``GC_INTERVAL_S``. It deletes only what Redis
positively shows unreferenced: with no template listed at all (a Redis that lost its
data), or a listed template without its record, it deletes only snapshots retired
(``Keys.snapshots_retired``: their template was deleted or rebuilt).
"""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import anyio
import msgspec

from daemon import lifecycle
from hotbed import batching, limits, lua, protocol, records
from hotbed import keys as keyspace
from hotbed.batching import raise_first_error
from hotbed.errors import (
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
from workers.runtimes.base import Runtime
from workers.sandboxes import GuestHooks, Local, SandboxTable
from workers.snapshot_peers import SnapshotPeers, manifest

log = logging.getLogger(__name__)

GC_INTERVAL_S = 60.0
GC_GRACE_S = 120.0
OUTPUT_TAIL = 2000
# Progress entries a build's output stream keeps (a reader that never comes).
BUILD_LOG_ENTRIES = 1000
# Seconds between "not ready yet" lines while a readiness check keeps failing.
READY_REPORT_S = 5.0


def new_snapshot_id() -> str:
    return f"snap-{secrets.token_hex(8)}"


class SnapshotStore(Protocol):
    async def put(self, snapshot_id: str, src: Path) -> None: ...

    async def fetch(self, snapshot_id: str, dest: Path) -> bool:
        """Copy a snapshot into ``dest``; False if the store does not have it."""

    async def delete(self, snapshot_id: str) -> None: ...

    async def list(self) -> list[str]: ...

    async def age(self, snapshot_id: str) -> float | None:
        """Seconds since the snapshot last changed; None if the store does not have it."""


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
        def scan() -> list[str]:
            if not self.root.is_dir():
                return []
            return [p.name for p in self.root.iterdir() if p.name.startswith("snap-") and p.is_dir()]

        return await anyio.to_thread.run_sync(scan)

    async def age(self, snapshot_id: str) -> float | None:
        """Seconds since the snapshot last changed; None if it is gone."""
        def mtime() -> float | None:
            try:
                return (self.root / snapshot_id).stat().st_mtime
            except OSError:
                return None

        changed = await anyio.to_thread.run_sync(mtime)
        return None if changed is None else time.time() - changed


class BuildLog:
    """A template build's progress on its request's output stream, for the client that
    asked (``BuildTemplate.progress``); nothing when none did. A line that cannot be
    written is dropped: progress never fails a build."""

    def __init__(self, redis: Any, key: str | None) -> None:
        self.redis = redis
        self.key = key
        self.t0 = anyio.current_time()

    async def say(self, line: str) -> None:
        await self._add(b"p", f"{anyio.current_time() - self.t0:6.1f}s  {line}".encode())

    async def output(self, data: bytes) -> None:
        if data:
            await self._add(b"o", data[-(OUTPUT_TAIL * 8):])

    async def _add(self, field: bytes, data: bytes) -> None:
        if self.key is None:
            return
        try:
            with anyio.fail_after(5):
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.xadd(self.key, {field: data}, maxlen=BUILD_LOG_ENTRIES, approximate=True)
                    pipe.expire(self.key, keyspace.REPLY_TTL_S)
                    await pipe.execute()
        except Exception as exc:  # progress is best effort; the build goes on
            log.debug("build progress not written: %s", exc)


def _tail(data: bytes) -> str:
    text = data.decode("utf-8", "replace").strip()
    return text[-OUTPUT_TAIL:]


class SnapshotManager:
    """Templates, snapshots, pools and pause/resume on one worker.

    ``guests`` is told when a sandbox's guest channel must be (re)made: exec'd
    processes, the guest agent's included, are not part of a restore.
    """

    def __init__(
        self,
        table: SandboxTable,
        runtime: Runtime,
        *,
        guests: GuestHooks,
        snapshot_dir: str,
        snapshot_store: str = "",
        default_user: str = "",
        peers: SnapshotPeers | None = None,
    ) -> None:
        self.table = table
        self.runtime = runtime
        self.guests = guests
        self.default_user = default_user
        self.dir = Path(snapshot_dir)
        self.store: SnapshotStore = LocalStore(Path(snapshot_store) if snapshot_store else self.dir)
        self._local = LocalStore(self.dir)
        self.peers = peers
        # One copy per snapshot at a time: restores that need it meanwhile wait for it.
        self._copying: dict[str, anyio.Lock] = {}
        self.copies = 0

    @property
    def redis(self) -> Any:
        return self.table.redis

    @property
    def worker_id(self) -> str:
        return self.table.worker_id

    # ----------------------------------------------------------- snapshots

    def path(self, snapshot_id: str) -> Path:
        # The id comes off the wire (a restore names its snapshot): only the shape
        # new_snapshot_id makes may become a path under the snapshot dir.
        return self.dir / limits.check_snapshot(snapshot_id)

    async def ensure_local(self, snapshot_id: str, template: str = "") -> Path:
        """The snapshot on this node's disk, copied in if needed (once, however many
        restores ask at once)."""
        dest = self.path(snapshot_id)
        if template:
            check_name(template)
        if await anyio.Path(dest).is_dir():
            return dest
        lock = self._copying.setdefault(snapshot_id, anyio.Lock())
        try:
            async with lock:
                if not await anyio.Path(dest).is_dir():
                    await self._copy_in(snapshot_id, template, dest)
        finally:
            if not lock.statistics().tasks_waiting:
                self._copying.pop(snapshot_id, None)
        return dest

    async def _copy_in(self, snapshot_id: str, template: str, dest: Path) -> None:
        """From the store, else from a node holding it; checked against the digest the
        template records, then moved into place in one rename."""
        rec = None
        if template:
            rec = template_from_hash(await self.redis.hgetall(self.table.keys.template(template)))
        # The record names a newer snapshot once the template is rebuilt: its digest and
        # holders are then not this one's (the copy is checked file by file only).
        current = rec is not None and rec.snapshot == snapshot_id
        digest = rec.sha256 if rec is not None and current else ""
        holders = rec.holders if rec is not None and current else []
        await anyio.Path(self.dir).mkdir(parents=True, exist_ok=True)
        part = dest.with_name(f"{dest.name}.part-{secrets.token_hex(4)}")
        started = anyio.current_time()
        source = ""
        try:
            if await self.store.fetch(snapshot_id, part):
                if digest and (await anyio.to_thread.run_sync(manifest, part)).digest != digest:
                    log.warning("snapshot %s in the store does not match its digest; ignoring it",
                                snapshot_id, extra={"worker_id": self.worker_id})
                    await anyio.to_thread.run_sync(lambda: shutil.rmtree(part, ignore_errors=True))
                else:
                    source = "store"
            if not source and self.peers is not None and holders:
                source = await self.peers.fetch(snapshot_id, part, holders=holders, digest=digest) or ""
            if not source:
                raise TemplateNotFound(
                    f"snapshot {snapshot_id} of template {template!r} is in no store and on no live node",
                    worker_id=self.worker_id, detail={"holders": holders},
                )
            await anyio.Path(part).rename(dest)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(part, ignore_errors=True))
            raise
        self.copies += 1
        log.info("snapshot %s copied from %s in %.3fs", snapshot_id, source,
                 anyio.current_time() - started, extra={"worker_id": self.worker_id})
        if template:
            await records.add_template_holder(
                self.redis, self.table.keys.template(template), self.worker_id
            )

    async def collect(self, *, grace_s: float = GC_GRACE_S) -> list[str]:
        """Remove snapshots no template references; returns the ids removed."""
        keys = self.table.keys
        names = [n.decode() for n in await self.redis.smembers(keys.templates)]
        retired = {n.decode() for n in await self.redis.smembers(keys.snapshots_retired)}
        # Without any template listed (what a Redis that lost its data looks like, too)
        # only snapshots positively retired go.
        complete = bool(names)
        referenced: set[str] = set()
        for n in names:
            rec = await self.redis.hgetall(keys.template(n))
            if not rec:
                # A listed template without its record: Redis is not telling the whole
                # story (a partial loss, a write in flight).
                log.warning("template %r is listed but has no record; collecting retired snapshots only", n)
                complete = False
                continue
            snap = rec.get(b"snapshot")
            if snap:
                referenced.add(snap.decode())
        removed = []
        for store in (self._local, self.store):
            for sid in await store.list():
                if sid in referenced or not (complete or sid in retired):
                    continue
                age = await store.age(sid)
                if age is None or age < grace_s:
                    continue
                await store.delete(sid)
                if self.peers is not None:
                    self.peers.forget(sid)
                if sid not in removed:
                    removed.append(sid)
        if removed:
            log.info("collected %d unreferenced snapshots", len(removed), extra={"worker_id": self.worker_id})
        return removed

    async def gc_loop(self) -> None:
        await lifecycle.supervised_loop(
            "snapshot collection", self.collect, interval=GC_INTERVAL_S,
            initial_delay=GC_INTERVAL_S, log=log,
        )

    # ------------------------------------------------------------- set-up

    async def setup(self, sid: str, ts: TemplateSpec, user: str, progress: BuildLog | None = None) -> None:
        """Files, ``run`` steps, ``start`` processes, then the readiness check."""
        rt = self.runtime
        say = progress or BuildLog(None, None)
        deadline = anyio.current_time() + ts.setup_timeout
        if ts.files:
            await say.say(f"writing {len(ts.files)} file(s)")
        for path, data in ts.files.items():
            await rt.write_file(sid, path, data, mode=0o644, make_dirs=True, user=user)
        for i, cmd in enumerate(ts.run, 1):
            left = max(1.0, deadline - anyio.current_time())
            await say.say(f"step {i}/{len(ts.run)}: {cmd}")
            step_t0 = anyio.current_time()
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
            await say.output(res.stdout + res.stderr)
            await say.say(f"step {i}/{len(ts.run)} exited {res.exit_code} after "
                          f"{anyio.current_time() - step_t0:.1f}s")
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
            await say.say(f"start: {cmd}")
            await self.spawn(sid, cmd, user, ts.env)
        if ts.ready:
            await say.say(f"readiness check: {ts.ready} (retried until it exits 0, up to {ts.ready_timeout:g}s)")
            ready_t0 = anyio.current_time()
            give_up = ready_t0 + ts.ready_timeout
            tries, last_said = 0, ready_t0
            while True:
                res = await rt.exec(
                    sid, ExecSpec(shell=ts.ready, env=ts.env, cwd=ts.workdir, timeout=ts.ready_timeout),
                    default_user=user,
                )
                tries += 1
                if res.exit_code == 0:
                    await say.say(f"ready after {tries} check(s), {anyio.current_time() - ready_t0:.1f}s")
                    break
                if anyio.current_time() - last_said >= READY_REPORT_S:
                    last_said = anyio.current_time()
                    await say.say(f"not ready yet: {tries} check(s), last exit {res.exit_code}"
                                  + (f": {_tail(res.stdout + res.stderr)[-200:]}" if res.stdout or res.stderr else ""))
                if anyio.current_time() > give_up:
                    raise SetupFailed(
                        f"readiness check ({ts.ready!r}) still failing after {ts.ready_timeout:g}s "
                        f"(exit {res.exit_code}); output:\n{_tail(res.stdout + res.stderr)}",
                        sandbox_id=sid, detail={"ready": ts.ready, "exit_code": res.exit_code},
                    )
                await anyio.sleep(0.05)

    async def spawn(self, sid: str, command: str, user: str, env: dict[str, str] | None = None) -> None:
        """Start ``command`` as a child of the sandbox's init (survives checkpoints),
        with ``env`` (init has only the image's)."""
        if "\n" in command:
            raise InvalidRequest("a start command is one line (use ';' or a script file)")
        res = await self.runtime.exec(
            sid,
            ExecSpec(argv=["/bin/sh", "-c", SPAWN_SCRIPT, "sh", command], env=env or {}, timeout=30.0),
            default_user=user,
        )
        if res.exit_code != 0:
            raise SetupFailed(f"could not start {command!r}: {_tail(res.stderr)}", sandbox_id=sid)

    # ------------------------------------------------------------- building

    async def _write_template(self, rec: TemplateRecord, *, holders: bool = True) -> None:
        """``holders=False`` leaves the stored holder list alone: a record read earlier
        must not write back a list that a concurrent ``ADD_HOLDER`` has grown since."""
        keys = self.table.keys
        fields = template_to_hash(rec)
        if not holders:
            fields.pop("holders", None)
        # Recorded, then listed: on a Redis Cluster the two keys may live on different
        # shards, and this order never lists a name before its record exists.
        raise_first_error(await batching.for_client(self.redis).execute(
            records.hset(keys.template(rec.name), fields), ("SADD", keys.templates, rec.name)
        ))

    async def _publish_snapshot(self, rec: TemplateRecord, replaced: str) -> None:
        """Record the template ready; if that replaced an older snapshot, retire what its
        pools hold (after the record: a refill racing this restores the new one)."""
        await self._write_template(rec)
        if not replaced or replaced == rec.snapshot:
            return
        keys = self.table.keys
        await self.redis.sadd(keys.snapshots_retired, replaced)
        for raw in await self.redis.smembers(keys.pools):
            pool = raw.decode()
            # Template names have no ':', so the prefix names this template's pools only.
            if pool.startswith(rec.name + ":"):
                n = await lua.POOL_RETIRE.run(self.redis, [keys.pool_ready(pool), keys.pool_stale(pool)])
                if n:
                    log.info("template %s rebuilt: retired %d pooled sandboxes of %s", rec.name, n, pool)

    async def build(self, env: Envelope, cmd: BuildTemplate) -> TemplateReady:
        table = self.table
        name, ts = check_name(cmd.name), cmd.spec
        sid = cmd.build_id or f"build-{env.id}"
        user = ts.user or self.default_user
        started = anyio.current_time()
        old = template_from_hash(await self.redis.hgetall(table.keys.template(name)))
        building = TemplateRecord(
            name=name, state="building", spec=ts, created_at=lifecycle.wall(),
            # Keep serving the previous snapshot while the new one builds.
            snapshot=old.snapshot if old else "", holders=old.holders if old else [],
            size_bytes=old.size_bytes if old else 0,
        )
        await self._write_template(building, holders=False)
        # The template's env is given to each set-up command, never to the container:
        # its PID 1 would keep it in the snapshot's memory.
        spec = SandboxSpec(
            image=ts.image, resources=ts.resources, workdir=ts.workdir, user=user, network=ts.network,
        )
        snap = new_snapshot_id()
        progress = BuildLog(self.redis, table.keys.output(env.id) if cmd.progress else None)
        try:
            await progress.say(f"booting {ts.image} on {self.worker_id}")
            await self.runtime.create(table.placed(sid), spec)
            await self.setup(sid, ts, user, progress)
            await progress.say("taking the memory snapshot")
            self.dir.mkdir(parents=True, exist_ok=True)
            size = await self.runtime.checkpoint(sid, self.path(snap), leave_running=False)
            digest = await self._digest(snap)
            await self.store.put(snap, self.path(snap))
            await progress.say(f"snapshot {snap} stored ({size / (1 << 20):.1f} MiB)")
        except BaseException as exc:
            reason = exc.message if isinstance(exc, HotbedError) else f"{type(exc).__name__}: {exc}"
            with anyio.CancelScope(shield=True):
                await self._write_template(
                    msgspec.structs.replace(building, state="failed", error=reason), holders=False
                )
                await table.end(sid, reason="template build failed", state="failed")
                await self._remove_partial(snap)
            if isinstance(exc, HotbedError):
                exc.detail.setdefault("template", name)
            raise
        await table.end(sid, reason="template built")
        build_s = anyio.current_time() - started
        await self._publish_snapshot(TemplateRecord(
            name=name, state="ready", spec=ts, snapshot=snap, size_bytes=size, build_s=build_s,
            holders=[self.worker_id], created_at=lifecycle.wall(), sha256=digest,
        ), replaced=old.snapshot if old else "")
        log.info("template %s built in %.2fs (snapshot %s, %d bytes)", name, build_s, snap, size,
                 extra={"worker_id": self.worker_id})
        return TemplateReady(
            name=name, snapshot=snap, size_bytes=size, build_s=build_s, worker_id=self.worker_id
        )

    async def _digest(self, snap: str) -> str:
        """The new snapshot's digest (recorded with the template); this node's endpoint
        serves the manifest it comes from without hashing the files again."""
        m = await anyio.to_thread.run_sync(manifest, self.path(snap))
        if self.peers is not None:
            self.peers.remember(snap, m)
        return m.digest

    async def _remove_partial(self, snap: str) -> None:
        """Drop what a failed checkpoint left on this node's disk."""
        path = self.path(snap)
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(path, ignore_errors=True))

    async def snapshot(self, cmd: SnapshotSandbox) -> TemplateReady:
        """Checkpoint a running sandbox (it keeps running) into a new template."""
        table = self.table
        name, sid = check_name(cmd.name), cmd.sandbox_id
        local = await table.touch(sid)
        started = anyio.current_time()
        rec = await table.record(sid)
        snap = new_snapshot_id()
        self.dir.mkdir(parents=True, exist_ok=True)
        local.busy = True
        try:
            size = await self.runtime.checkpoint(sid, self.path(snap), leave_running=True)
            digest = await self._digest(snap)
            await self.store.put(snap, self.path(snap))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._remove_partial(snap)
            raise
        finally:
            local.busy = False
        if rec and rec.network:
            # A sandbox with a network was stopped and started again from the snapshot
            # (workers/runtimes/docker/checkpoints.py): its guest channel is a new one.
            self.guests.forget(sid)
            self.guests.prepare(sid)
        took = anyio.current_time() - started
        ts = TemplateSpec(
            image=rec.image if rec else "", user=local.user,
            resources=protocol.Resources(
                cpu=(rec.cpu if rec else 0.0) or 1.0, memory_mb=(rec.memory_mb if rec else 0) or 512
            ),
            # Its sandboxes that state no network get the one this sandbox had.
            network=protocol.NetworkPolicy(mode=rec.network, allow=list(rec.allow))  # type: ignore[arg-type]
            if rec and rec.network else protocol.NetworkPolicy(),
        )
        old = template_from_hash(await self.redis.hgetall(table.keys.template(name)))
        await self._publish_snapshot(TemplateRecord(
            name=name, state="ready", spec=ts, snapshot=snap, size_bytes=size, build_s=took,
            holders=[self.worker_id], created_at=lifecycle.wall(), source=sid, sha256=digest,
        ), replaced=old.snapshot if old else "")
        return TemplateReady(
            name=name, snapshot=snap, size_bytes=size, build_s=took, worker_id=self.worker_id
        )

    # -------------------------------------------------------------- starting

    async def start(self, cmd: StartSandbox) -> SandboxCreated:
        """A sandbox from a template: restored from its snapshot, or booted + set up."""
        table = self.table
        sid, spec = cmd.sandbox_id, cmd.spec
        if sid in table:
            return SandboxCreated(sandbox_id=sid, worker_id=self.worker_id, path=cmd.path)
        started = anyio.current_time()
        ts = cmd.template or TemplateSpec(image=spec.image)
        user = spec.user or ts.user or self.default_user
        # Started at a low CPU weight, so running sandboxes' commands (a claimed
        # one's first, above all) win the CPU from restores; normal once it is handed
        # out: now for a client's, at claim for a pool's.
        placed = msgspec.structs.replace(table.placed(sid, cmd.gpu_uuids), background=True)
        try:
            # The container gets the image's env only; the worker hands this to each
            # command (workers.execution.with_sandbox_env), so no checkpoint holds it.
            env = {**ts.env, **spec.env}
            if cmd.snapshot:
                src = await self.ensure_local(cmd.snapshot, spec.template or "")
                await self.runtime.restore(placed, msgspec.structs.replace(spec, user=user, env={}), src)
            else:
                boot = msgspec.structs.replace(
                    spec, image=ts.image, user=user, env={}, workdir=spec.workdir or ts.workdir,
                )
                await self.runtime.create(placed, boot)
                await self.setup(sid, ts, user)
            # Ready means serving: the agent answers (a restored one some 0.5 s after
            # runsc returns), and a pooled sandbox has spawned once, off the claimer's clock.
            await self.guests.wait_ready(sid, warm_up=bool(cmd.pool))
            if not cmd.pool and table.weights is not None:
                table.weights.foreground(sid)
        except BaseException as exc:
            reason = exc.message if isinstance(exc, HotbedError) else f"{type(exc).__name__}: {exc}"
            with anyio.CancelScope(shield=True):
                await table.end(sid, reason=reason, state="failed")
                if cmd.pool:
                    await self.redis.zrem(table.keys.pool_warming(cmd.pool), sid)
            raise
        now = lifecycle.wall()
        pooled = bool(cmd.pool)
        after, pausable = table.pause_policy(spec.auto_pause_after)
        await table.started(
            Local(
                id=sid, user=user,
                expires_at=float("inf") if pooled else now + spec.timeout,
                idle_timeout=None if pooled else spec.idle_timeout,
                last_active=now, env=env, pool=cmd.pool,
                auto_pause_after=after, pausable=pausable,
            ),
            records.to_restored(
                now=now, path=cmd.path, worker=self.worker_id, pool=cmd.pool, image=ts.image,
                snapshot=cmd.snapshot,
            ),
        )
        startup = anyio.current_time() - started
        if pooled:
            keys = table.keys
            listed = await lua.POOL_PUT.run(
                self.redis,
                [keys.pool_ready(cmd.pool), keys.pool_warming(cmd.pool), keys.pool_conf(cmd.pool)],
                [f"{sid} {self.worker_id}"],
            )
            if not listed:
                await table.end(sid, reason="pool deleted")
            log.info("pool %s: sandbox ready in %.3fs (%s)", cmd.pool, startup, cmd.path,
                     extra={"sandbox_id": sid})
        return SandboxCreated(sandbox_id=sid, worker_id=self.worker_id, path=cmd.path,
                              startup_s=startup, gpu_uuids=list(cmd.gpu_uuids))

    async def claimed(self, cmd: SandboxClaimed) -> SandboxState:
        """A pooled sandbox was claimed: its lifetime starts now. No awaits before the
        update, so a command the claimer sends next (same stream) already sees it."""
        local = self.table.get(cmd.sandbox_id)
        if local is None:
            return SandboxState(sandbox_id=cmd.sandbox_id, state="gone")
        now = lifecycle.wall()
        local.pool = ""
        # Never later than the longest lifetime a sandbox may have.
        local.expires_at = min(cmd.expires_at, now + protocol.MAX_TIMEOUT_S)
        local.idle_timeout = (
            cmd.idle_timeout if cmd.idle_timeout and 0 < cmd.idle_timeout <= protocol.MAX_TIMEOUT_S else None
        )
        # The template's env (from the pool's start) under the claimer's own.
        env = {**local.env, **cmd.env}
        # Kept in Redis at the pool's start already: written again only if the claim
        # changed it (most claims bring no env, and this is one write less per claim).
        changed, local.env = env != local.env, env
        ok = cmd.auto_pause_after is None or 0 <= cmd.auto_pause_after <= protocol.MAX_TIMEOUT_S
        local.auto_pause_after, local.pausable = self.table.pause_policy(
            cmd.auto_pause_after if ok else None
        )
        local.last_active = lifecycle.wall()
        self.table.arm(local)
        # Off the pool's low CPU weight before the claimer's first command runs.
        if self.table.weights is not None:
            self.table.weights.foreground(cmd.sandbox_id)
        if changed:
            await self.table.keep_env(local)
        return SandboxState(sandbox_id=cmd.sandbox_id, state="running")

    # ---------------------------------------------------------- pause/resume

    async def pause(self, sid: str, *, by: records.PausedBy = "client") -> SandboxState:
        """Checkpoint to disk and stop (``by``: who asked; ``"auto"``: the worker, and
        the next request resumes it). A client's pause of an auto-paused sandbox only
        changes who paused it."""
        table = self.table
        local = table.get(sid)
        if local is None:
            await table.touch(sid)  # raises the right error
            raise SandboxNotFound(f"no sandbox {sid}", sandbox_id=sid)
        if local.paused:
            if local.paused_by != by and by == "client":
                local.paused_by = by
                await self.redis.hset(table.keys.sandbox(sid), mapping={"paused_by": by})
            return SandboxState(sandbox_id=sid, state="paused")
        if local.pool:
            raise SandboxNotRunning(f"sandbox {sid} is pooled, not claimed", sandbox_id=sid)
        # The health check must not take the stop for a death; a request meanwhile
        # waits for this pause (auto) or is told the sandbox is paused (client).
        local.paused, local.paused_by, local.busy = True, by, True
        self.guests.forget(sid)
        try:
            await self.runtime.pause(sid)
        except BaseException:
            local.paused, local.paused_by = False, ""
            raise
        finally:
            local.busy = False
        if table.get(sid) is not local:
            # Ended while it was being checkpointed: its record says so already.
            raise SandboxNotFound(f"sandbox {sid} ended while pausing", sandbox_id=sid)
        # Its CPU and memory are free while it sleeps on disk.
        await table.paused(sid, by=by)
        return SandboxState(sandbox_id=sid, state="paused")

    async def resume(self, sid: str) -> SandboxState:
        table = self.table
        local = table.get(sid)
        if local is None:
            await table.touch(sid)
            raise SandboxNotFound(f"no sandbox {sid}", sandbox_id=sid)
        if not local.paused:
            return SandboxState(sandbox_id=sid, state="running")
        await table.unpark(sid)
        local.busy = True
        try:
            try:
                await self.runtime.resume(sid)
            except RuntimeFailure:
                # One retry: dockerd/containerd occasionally refuse the first restore.
                await anyio.sleep(0.2)
                await self.runtime.resume(sid)
            local.paused = False
        except BaseException:
            with anyio.CancelScope(shield=True):
                await table.park(sid)
            raise
        finally:
            local.busy = False
        self.guests.forget(sid)
        if table.get(sid) is not local:
            raise SandboxNotFound(f"sandbox {sid} ended while resuming", sandbox_id=sid)
        self.guests.prepare(sid)
        await table.resumed(local)
        return SandboxState(sandbox_id=sid, state="running")
