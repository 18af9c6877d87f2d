"""Root file systems for runsc bundles: from the local Docker engine when there is one,
else from an image directory or tarball on the node.

An image is found, in order:

* in the local Docker engine (when its socket answers): ``docker save`` of the image,
  through aiodocker, unpacked once per image id into ``<cache>/<id>/``;
* under ``image_dir`` (for nodes without Docker): ``<image_dir>/<name>/rootfs/`` used
  in place, with an optional ``<image_dir>/<name>/image.json`` (Docker's ``Config``:
  ``Env``, ``Cmd``, ``WorkingDir``, ``User``); or a tarball ``<image_dir>/<name>.tar``
  (``.tar.gz``, ``.tgz``), either ``docker save`` output or a flat root file system as
  ``docker export`` writes it, unpacked once into the cache. ``<name>`` is the image
  name without a ``:latest`` tag (``hotbed/base`` -> ``<image_dir>/hotbed/base``).

Sandboxes share an unpacked root read-only: gVisor's overlay keeps each sandbox's
writes in the sandbox (``--overlay2=root:self``), never in the shared tree. Images are
the operator's own (hotbed never pulls); unpacking still refuses paths that leave the
tree. An image's ``ref`` names exactly the root a sandbox ran on, so a restore finds it
again even after the name moved to a newer build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import tarfile
from pathlib import Path
from typing import IO, Any

import anyio
import msgspec

from hotbed.errors import ImageNotFound, RuntimeFailure
from workers.runtimes.runsc.oci import ImageConfig

log = logging.getLogger(__name__)

DOCKER_TIMEOUT_S = 30.0
EXPORT_TIMEOUT_S = 600.0
TARBALL_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class Image(msgspec.Struct, frozen=True, kw_only=True):
    ref: str
    rootfs: str
    config: ImageConfig = ImageConfig()


def config_from_docker(cfg: dict[str, Any] | None) -> ImageConfig:
    cfg = cfg or {}
    return ImageConfig(
        env=list(cfg.get("Env") or []), cmd=list(cfg.get("Cmd") or []),
        workdir=str(cfg.get("WorkingDir") or ""), user=str(cfg.get("User") or ""),
    )


# ------------------------------------------------------------------ unpacking


def _inside(dest: Path, name: str) -> Path:
    rel = os.path.normpath(name.lstrip("/"))
    if rel == ".." or rel.startswith("../"):
        raise ValueError(f"image layer path {name!r} leaves the root")
    target = dest / rel
    # A parent reached through a symlink must stay in the tree (absolute links in a
    # root file system point at the host when resolved from here).
    real_parent = os.path.realpath(target.parent)
    if not (real_parent == os.fspath(dest) or real_parent.startswith(os.fspath(dest) + os.sep)):
        raise ValueError(f"image layer path {name!r} goes through a link out of the root")
    return target


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def apply_layer(layer: tarfile.TarFile, dest: Path) -> None:
    """Extract one layer over ``dest``, honouring OCI whiteouts (``.wh.<name>`` deletes
    a lower file, ``.wh..wh..opq`` empties a lower directory). Blocking."""
    added: set[Path] = set()
    for member in layer:
        if os.path.normpath(member.name.lstrip("/")) == ".":
            continue  # the root itself
        target = _inside(dest, member.name)
        base = target.name
        if base == ".wh..wh..opq":
            for child in list(target.parent.iterdir()) if target.parent.is_dir() else []:
                if child not in added:
                    _remove(child)
            continue
        if base.startswith(".wh."):
            _remove(target.with_name(base[4:]))
            continue
        if target.is_symlink() or (target.exists() and not (member.isdir() and target.is_dir())):
            _remove(target)
        # Modes, owners and device nodes are kept as they are (a root file system
        # needs them: /tmp is 1777, su is setuid); names are checked above.
        layer.extract(member, dest, set_attrs=True, numeric_owner=True, filter="fully_trusted")
        added.add(target)


def unpack(tarball: Path, dest: Path) -> ImageConfig:
    """Unpack ``docker save`` output or a flat root file system tarball into ``dest``
    (which must not exist); return the image's config. Blocking: run it in a thread."""
    dest.mkdir(parents=True)
    root = Path(os.path.realpath(dest))
    with tarfile.open(tarball) as outer:
        try:
            manifest_file = outer.extractfile("manifest.json")
        except KeyError:
            manifest_file = None
        if manifest_file is None:
            apply_layer(outer, root)
            return ImageConfig()
        manifest = json.load(manifest_file)[0]
        config = json.load(_member(outer, manifest["Config"]))
        for name in manifest["Layers"]:
            with tarfile.open(fileobj=_member(outer, name), mode="r|*") as layer:
                apply_layer(layer, root)
    return config_from_docker(config.get("config"))


def _member(tar: tarfile.TarFile, name: str) -> IO[bytes]:
    f = tar.extractfile(name)
    if f is None:
        raise ValueError(f"{name} is not a file in the image tarball")
    return f


# ------------------------------------------------------------------ the store


class ImageStore:
    """Finds images and keeps their unpacked roots under ``cache``."""

    def __init__(self, cache: Path, image_dir: Path, *, docker_url: str | None = None, use_docker: bool = True) -> None:
        self.cache = cache
        self.image_dir = image_dir
        self.docker_url = docker_url
        self.use_docker = use_docker
        self._docker: Any = None
        self._locks: dict[str, anyio.Lock] = {}

    @property
    def has_docker(self) -> bool:
        return self._docker is not None

    async def open(self) -> None:
        await anyio.Path(self.cache).mkdir(parents=True, exist_ok=True)
        await anyio.to_thread.run_sync(self._drop_partial)
        if not self.use_docker:
            return
        import aiodocker

        docker = aiodocker.Docker(url=self.docker_url)
        try:
            with anyio.fail_after(5):
                await docker.version()
        except Exception as exc:  # no engine here: images come from image_dir
            log.info("no Docker engine (%s): images come from %s", exc, self.image_dir)
            with anyio.CancelScope(shield=True):
                await docker.close()
            return
        self._docker = docker

    async def aclose(self) -> None:
        if self._docker is not None:
            docker, self._docker = self._docker, None
            with anyio.CancelScope(shield=True):
                await docker.close()

    def _drop_partial(self) -> None:
        """Remove what a worker that died mid-export left (one worker per cache)."""
        for p in self.cache.glob(".*"):
            if p.name.startswith((".export-", ".unpack-")):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    def _cached(self, key: str) -> Image | None:
        d = self.cache / key
        done = d / "image.json"
        if not done.is_file():
            return None
        return Image(ref=f"cache:{key}", rootfs=os.fspath(d / "rootfs"),
                     config=msgspec.json.decode(done.read_bytes(), type=ImageConfig))

    async def get(self, name: str, *, ref: str = "", sandbox_id: str = "") -> Image:
        """The image ``name`` (or, first, the exact root ``ref`` names)."""
        if ref.startswith("cache:"):
            found = await anyio.to_thread.run_sync(self._cached, ref[6:])
            if found is not None:
                return found
        elif ref.startswith("dir:") and await anyio.Path(ref[4:], "rootfs").is_dir():
            return await anyio.to_thread.run_sync(self._directory, Path(ref[4:]))
        if self._docker is not None:
            found = await self._from_docker(name, sandbox_id)
            if found is not None:
                return found
        found = await self._from_image_dir(name, sandbox_id)
        if found is not None:
            return found
        where = "the Docker engine or " if self._docker is not None else ""
        raise ImageNotFound(
            f"image {name!r} not found in {where}{self.image_dir} (hotbed never pulls)",
            sandbox_id=sandbox_id,
        )

    # -- Docker

    async def _from_docker(self, name: str, sandbox_id: str) -> Image | None:
        from aiodocker.exceptions import DockerError

        try:
            with anyio.fail_after(DOCKER_TIMEOUT_S):
                info = await self._docker.images.inspect(name)
        except DockerError as exc:
            if exc.status == 404:
                return None
            raise RuntimeFailure(f"docker: {exc.message}", sandbox_id=sandbox_id) from None
        key = str(info["Id"]).removeprefix("sha256:")
        found = await anyio.to_thread.run_sync(self._cached, key)
        if found is not None:
            return found
        async with self._locks.setdefault(key, anyio.Lock()):
            found = await anyio.to_thread.run_sync(self._cached, key)
            if found is None:
                found = await self._export(name, key, config_from_docker(info.get("Config")), sandbox_id)
        return found

    async def _export(self, name: str, key: str, config: ImageConfig, sandbox_id: str) -> Image:
        tmp = self.cache / f".export-{secrets.token_hex(6)}.tar"
        log.info("unpacking image %s (%s) for runsc", name, key[:12])
        try:
            with anyio.fail_after(EXPORT_TIMEOUT_S):
                async with self._docker.images.export_image(name) as stream:
                    async with await anyio.open_file(tmp, "wb") as f:
                        async for chunk in stream.iter_chunked(1 << 20):
                            await f.write(chunk)
            return await anyio.to_thread.run_sync(self._store, tmp, key, config)
        except TimeoutError:
            raise RuntimeFailure(f"exporting image {name!r} took over {EXPORT_TIMEOUT_S:g}s", sandbox_id=sandbox_id) from None
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.Path(tmp).unlink(missing_ok=True)

    def _store(self, tarball: Path, key: str, config: ImageConfig | None) -> Image:
        """Unpack ``tarball`` as cache entry ``key``, atomically (a crash leaves no half
        root that looks whole). Blocking."""
        work = self.cache / f".unpack-{key}-{secrets.token_hex(4)}"
        try:
            found = unpack(tarball, work / "rootfs")
            (work / "image.json").write_bytes(msgspec.json.encode(config or found))
            final = self.cache / key
            if final.exists():
                shutil.rmtree(final)
            work.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        image = self._cached(key)
        assert image is not None
        return image

    # -- image directory

    def _name_path(self, name: str) -> Path | None:
        base = name.removesuffix(":latest")
        rel = os.path.normpath(base)
        if rel.startswith(("/", "..")) or not base:
            return None
        return self.image_dir / rel

    def _directory(self, d: Path) -> Image:
        cfg = d / "image.json"
        config = config_from_docker(json.loads(cfg.read_text())) if cfg.is_file() else ImageConfig()
        return Image(ref=f"dir:{d}", rootfs=os.fspath(d / "rootfs"), config=config)

    async def _from_image_dir(self, name: str, sandbox_id: str) -> Image | None:
        base = self._name_path(name)
        if base is None:
            return None
        if await anyio.Path(base, "rootfs").is_dir():
            return await anyio.to_thread.run_sync(self._directory, base)
        for suffix in TARBALL_SUFFIXES:
            tarball = base.with_name(base.name + suffix)
            try:
                st = await anyio.Path(tarball).stat()
            except OSError:
                continue
            key = "tar-" + hashlib.sha256(f"{tarball}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
            async with self._locks.setdefault(key, anyio.Lock()):
                found = await anyio.to_thread.run_sync(self._cached, key)
                if found is None:
                    sidecar = base.with_name(base.name + ".json")
                    config = None
                    if await anyio.Path(sidecar).is_file():
                        config = config_from_docker(json.loads(await anyio.Path(sidecar).read_text()))
                    log.info("unpacking image tarball %s for runsc", tarball)
                    try:
                        found = await anyio.to_thread.run_sync(self._store, tarball, key, config)
                    except (OSError, ValueError, tarfile.TarError) as exc:
                        raise RuntimeFailure(f"image tarball {tarball}: {exc}", sandbox_id=sandbox_id) from None
            return found
        return None
