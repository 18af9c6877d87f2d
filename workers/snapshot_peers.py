"""Snapshots between nodes: the digest that names a snapshot's content, the small HTTP
endpoint a worker serves its snapshots on, and the copy from a node that holds one.

**Digest.** sha256 over the lines ``"<sha256 of file> <size> <path>\\n"`` of every file
under the snapshot's directory, sorted by path (``path`` relative, ``/``-separated).
The worker that takes a snapshot records it in the template record
(:attr:`hotbed.records.TemplateRecord.sha256`); a node that copies the snapshot, from
a peer or from the operator's store, checks it before anything restores from it.

**Endpoint.** ``HOTBED_SNAPSHOT_SERVE=HOST:PORT`` (port 0: any free one) makes the
worker serve its snapshot directory; the URL others reach it by is advertised in its
:class:`hotbed.protocol.WorkerInfo` (``snapshot_url``; ``HOTBED_SNAPSHOT_URL`` names it
when the listening address is not what peers should dial)::

    GET /snapshots/<ID>/manifest      JSON {"digest": HEX, "files": [[PATH, SIZE, SHA256], ...]}
    GET /snapshots/<ID>/files/<PATH>  the file's bytes

Every request carries ``Authorization: Bearer <token>``: ``HOTBED_SNAPSHOT_TOKEN``, or,
when that is unset, the fleet's token kept in Redis (``Keys.snapshot_token``, made by
the first worker that serves); anyone who can reach Redis can run sandboxes anyway.

**Copy.** :meth:`SnapshotPeers.fetch` tries the live holders of a snapshot in random
order: the manifest must hash to the recorded digest, each file is hashed as it
arrives, and a copy that fails either check is thrown away and the next holder tried.

**Spare copies.** A template whose snapshot only one live node holds is lost with that
node. :meth:`SnapshotPeers.replicate_loop` (on every serving node) looks at the ready
templates every ``REPLICATE_EVERY_S``; one held by fewer than ``copies`` live nodes, and
not by this one, is copied here by whichever node takes its short lock first
(``Keys.lock("copy:SNAPSHOT")``): one copy at a time per node, one node at a time per
snapshot, through the same checked, single-flight copy a restore uses.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import random
import secrets
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import msgspec
from aiohttp import web

from daemon import lifecycle
from hotbed import limits, protocol, records
from hotbed.errors import HotbedError
from hotbed.keys import Keys

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# A peer answering slower than this on a read is given up on (the next holder is tried).
READ_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 3.0
# Files of one snapshot copied at once.
PARALLEL_FILES = 4
# Manifests kept in memory by a serving node (one per snapshot; small).
MANIFEST_CACHE = 256
# How often a node looks for templates held by too few live nodes, how many it reads
# per look, and how long one node may hold a snapshot's copy lock.
REPLICATE_EVERY_S = 1.0
REPLICATE_SCAN = 500
REPLICATE_LOCK_MS = 300_000


class Manifest(msgspec.Struct, frozen=True):
    digest: str
    files: list[tuple[str, int, str]]


class SnapshotCopyError(Exception):
    """A copy from one source failed (unreachable, refused, or wrong content)."""


# What makes one source's copy fail (the next source is tried).
COPY_ERRORS = (SnapshotCopyError, aiohttp.ClientError, TimeoutError, OSError, msgspec.DecodeError)


def _digest(files: Iterable[tuple[str, int, str]]) -> str:
    h = hashlib.sha256()
    for path, size, sha in sorted(files):
        h.update(f"{sha} {size} {path}\n".encode())
    return h.hexdigest()


def manifest(root: Path) -> Manifest:
    """The files under ``root`` and their digest. Blocking: run it in a thread."""
    files = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            full = Path(dirpath, name)
            h = hashlib.sha256()
            size = 0
            with open(full, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
            files.append((full.relative_to(root).as_posix(), size, h.hexdigest()))
    files.sort()
    return Manifest(digest=_digest(files), files=files)


def _safe_relpath(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise SnapshotCopyError(f"bad file name {path!r} in a snapshot manifest")
    return path


class SnapshotPeers:
    """This node's snapshot endpoint and its copies from the other nodes."""

    def __init__(
        self, snapshot_dir: Path, *, keys: Keys, worker_id: str, listen: str = "",
        url: str = "", token: str = "",
    ) -> None:
        self.dir = snapshot_dir
        self.keys = keys
        self.worker_id = worker_id
        self.listen = listen
        self.url = url
        self._token = token
        self._manifests: dict[str, Manifest] = {}
        self._computing: dict[str, anyio.Lock] = {}
        self.redis: Any = None
        self.served = 0

    # ------------------------------------------------------------------ token

    async def token(self) -> str:
        if not self._token:
            key = self.keys.snapshot_token
            await self.redis.set(key, secrets.token_urlsafe(32), nx=True)
            raw = await self.redis.get(key)
            self._token = raw.decode() if isinstance(raw, bytes) else str(raw)
        return self._token

    # --------------------------------------------------------------- manifests

    async def manifest_of(self, snapshot_id: str) -> Manifest | None:
        """The manifest of a snapshot this node holds (None if it holds none), computed
        once per snapshot however many peers ask at once."""
        got = self._manifests.get(snapshot_id)
        if got is not None:
            return got
        lock = self._computing.setdefault(snapshot_id, anyio.Lock())
        async with lock:
            got = self._manifests.get(snapshot_id)
            if got is None:
                path = self.dir / snapshot_id
                if not await anyio.Path(path).is_dir():
                    self._computing.pop(snapshot_id, None)
                    return None
                got = await anyio.to_thread.run_sync(manifest, path)
                self.remember(snapshot_id, got)
        self._computing.pop(snapshot_id, None)
        return got

    def remember(self, snapshot_id: str, m: Manifest) -> None:
        if len(self._manifests) >= MANIFEST_CACHE:
            self._manifests.pop(next(iter(self._manifests)))
        self._manifests[snapshot_id] = m

    def forget(self, snapshot_id: str) -> None:
        self._manifests.pop(snapshot_id, None)

    # ------------------------------------------------------------------ serving

    def _authorized(self, request: web.Request) -> bool:
        got = request.headers.get("Authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {self._token}".encode())

    async def _get_manifest(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            raise web.HTTPUnauthorized()
        sid = request.match_info["sid"]
        try:
            limits.check_snapshot(sid)
        except Exception:
            raise web.HTTPBadRequest() from None
        m = await self.manifest_of(sid)
        if m is None:
            raise web.HTTPNotFound()
        self.served += 1
        return web.Response(body=msgspec.json.encode(m), content_type="application/json")

    async def _get_file(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            raise web.HTTPUnauthorized()
        sid, rel = request.match_info["sid"], request.match_info["path"]
        try:
            limits.check_snapshot(sid)
            _safe_relpath(rel)
        except Exception:
            raise web.HTTPBadRequest() from None
        m = await self.manifest_of(sid)
        # Only files the manifest lists: nothing else under the directory is served.
        if m is None or rel not in {f[0] for f in m.files}:
            raise web.HTTPNotFound()
        return web.FileResponse(self.dir / sid / rel, chunk_size=CHUNK)

    @asynccontextmanager
    async def serving(self, redis: Any) -> AsyncIterator[None]:
        """Serve this node's snapshots while the block runs (nothing if no ``listen``);
        :attr:`url` is the advertised address once it has started."""
        self.redis = redis
        if not self.listen:
            yield
            return
        await self.token()
        host, _, port = self.listen.rpartition(":")
        app = web.Application()
        app.router.add_get("/snapshots/{sid}/manifest", self._get_manifest)
        app.router.add_get("/snapshots/{sid}/files/{path:.+}", self._get_file)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host or "0.0.0.0", int(port))
            await site.start()
            bound = runner.addresses[0][1]
            if not self.url:
                shown = host if host not in ("", "0.0.0.0", "::") else socket.gethostname()
                self.url = f"http://{shown}:{bound}"
            log.info("serving snapshots at %s", self.url, extra={"worker_id": self.worker_id})
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()

    # ------------------------------------------------------------------ copying

    async def holder_urls(self, holders: Iterable[str]) -> list[tuple[str, str]]:
        """``(worker id, snapshot url)`` of the live holders other than this node, in
        random order (so the copies of many nodes spread over the holders)."""
        others = [h for h in holders if h != self.worker_id]
        if not others:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for h in others:
                pipe.get(self.keys.worker_info(h))
            raws = await pipe.execute()
        out = []
        for h, raw in zip(others, raws, strict=True):
            if not raw:  # reaped: the node is gone
                continue
            info = protocol.decode_worker_info(raw)
            if info.snapshot_url:
                out.append((h, info.snapshot_url))
        random.shuffle(out)
        return out

    async def fetch(
        self, snapshot_id: str, dest: Path, *, holders: Iterable[str], digest: str = "",
    ) -> str | None:
        """Copy the snapshot into ``dest`` (which must not exist) from the first holder
        that has it whole; returns that holder's id, or None if none could."""
        sources = await self.holder_urls(holders)
        if not sources:
            return None
        token = await self.token()
        timeout = aiohttp.ClientTimeout(connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
        async with aiohttp.ClientSession(
            timeout=timeout, headers={"Authorization": f"Bearer {token}"}
        ) as session:
            for holder, url in sources:
                try:
                    await self._copy(session, f"{url}/snapshots/{snapshot_id}", dest, digest)
                except COPY_ERRORS as exc:
                    log.warning("snapshot %s: copy from %s failed: %s", snapshot_id, holder, exc,
                                extra={"worker_id": self.worker_id})
                    await anyio.to_thread.run_sync(lambda: shutil.rmtree(dest, ignore_errors=True))
                    continue
                return holder
        return None

    async def _copy(self, session: aiohttp.ClientSession, base: str, dest: Path, digest: str) -> None:
        async with session.get(f"{base}/manifest") as resp:
            if resp.status != 200:
                raise SnapshotCopyError(f"manifest: HTTP {resp.status}")
            m = msgspec.json.decode(await resp.read(), type=Manifest)
        files = [(_safe_relpath(p), size, sha) for p, size, sha in m.files]
        # The peer's manifest must be the one recorded when the snapshot was taken.
        if _digest(files) != m.digest or (digest and m.digest != digest):
            raise SnapshotCopyError(f"manifest digest {m.digest[:12]} is not the recorded {digest[:12]}")
        await anyio.Path(dest).mkdir(parents=True)
        limit = anyio.CapacityLimiter(PARALLEL_FILES)

        failed: list[BaseException] = []

        async def one(rel: str, size: int, sha: str) -> None:
            try:
                async with limit:
                    await self._copy_file(session, f"{base}/files/{rel}", dest / rel, size, sha)
            except COPY_ERRORS as exc:
                # The first bad file fails the whole copy; the others stop.
                failed.append(exc)
                tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            for rel, size, sha in files:
                tg.start_soon(one, rel, size, sha)
        if failed:
            raise failed[0]

    @staticmethod
    async def _copy_file(
        session: aiohttp.ClientSession, url: str, target: Path, size: int, sha: str,
    ) -> None:
        await anyio.Path(target.parent).mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        got = 0
        async with session.get(url) as resp:
            if resp.status != 200:
                raise SnapshotCopyError(f"{url.rsplit('/files/', 1)[-1]}: HTTP {resp.status}")
            f = await anyio.open_file(target, "wb")
            try:
                async for chunk in resp.content.iter_chunked(CHUNK):
                    got += len(chunk)
                    if got > size:
                        raise SnapshotCopyError(f"{target.name}: more than the {size} bytes listed")
                    await anyio.to_thread.run_sync(h.update, chunk)
                    await f.write(chunk)
            finally:
                await f.aclose()
        if got != size or h.hexdigest() != sha:
            raise SnapshotCopyError(f"{target.name}: content does not match its manifest entry")


# ------------------------------------------------------------------ spare copies

# Copies this node into place (workers.snapshots.SnapshotManager.ensure_local): the
# checked, single-flight copy a restore uses, which lists this node among the holders.
EnsureLocal = Callable[[str, str], Awaitable[Path]]


async def replicate_once(peers: SnapshotPeers, ensure_local: EnsureLocal, *, copies: int) -> list[str]:
    """One look: copies here the snapshots of ready templates that fewer than ``copies``
    live nodes hold (this one not among them), each under its copy lock. Returns the
    templates copied."""
    redis, keys = peers.redis, peers.keys
    names = [n.decode() if isinstance(n, bytes) else n
             for n in await redis.srandmember(keys.templates, REPLICATE_SCAN) or []]
    if not names:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(keys.template(name))
        raws = await pipe.execute()
    done: list[str] = []
    for name, raw in zip(names, raws, strict=True):
        rec = records.template_from_hash(raw)
        if rec is None or rec.state != "ready" or not rec.snapshot or peers.worker_id in rec.holders:
            continue
        live = await peers.holder_urls(rec.holders)
        if not live or len(live) >= copies:
            # Nobody to copy from, or enough copies already.
            continue
        lock = keys.lock(f"copy:{rec.snapshot}")
        if not await redis.set(lock, peers.worker_id, nx=True, px=REPLICATE_LOCK_MS):
            continue
        try:
            await ensure_local(rec.snapshot, name)
        except (HotbedError, *COPY_ERRORS) as exc:
            log.warning("spare copy of template %s failed: %s", name, exc,
                        extra={"worker_id": peers.worker_id})
            continue
        finally:
            with anyio.CancelScope(shield=True):
                if await redis.get(lock) == peers.worker_id.encode():
                    await redis.delete(lock)
        log.info("template %s: spare copy of snapshot %s made here", name, rec.snapshot,
                 extra={"worker_id": peers.worker_id})
        done.append(name)
    return done


async def replicate_loop(peers: SnapshotPeers, ensure_local: EnsureLocal, *, copies: int) -> None:
    """:func:`replicate_once` every ``REPLICATE_EVERY_S`` under the survive policy, while
    this node serves its snapshots (``copies`` <= 1, or no endpoint: nothing to do)."""
    if copies <= 1 or not peers.listen:
        return

    async def step() -> None:
        with anyio.fail_after(REPLICATE_LOCK_MS / 1000):
            await replicate_once(peers, ensure_local, copies=copies)

    await lifecycle.supervised_loop(
        "spare snapshot copies", step, interval=REPLICATE_EVERY_S, initial_delay=REPLICATE_EVERY_S, log=log,
    )
