"""The images this node holds: advertised to the scheduler, pulled when a start needs one.

Advertising: every ``image_refresh_s`` (and right after a pull) the worker writes the
images its runtime holds, bounded (:data:`hotbed.records.MAX_ADVERTISED_IMAGES`), to
``Keys.worker_images`` with a TTL, so a stopped worker's list expires. Placement
prefers nodes that hold the image (:mod:`scheduler.placer`).

Pulling: a start (or template build) whose image is missing pulls it, under the
request's deadline, when the image's registry is one of the worker's ``registries``;
the login comes from ``registry_auth`` or ``registry_auth_file`` (a Docker
``config.json``: ``{"auths": {"HOST": {"auth": base64("user:password")}}}``), read at
each pull so a rotated secret needs no restart. A missing image that cannot be pulled
is ``ImageNotFound``, at once. Neither password nor file content is ever logged.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import anyio
import redis.asyncio as aioredis

from daemon import lifecycle
from hotbed import records
from hotbed.errors import ConfigError, ImageNotFound, RequestTimeout
from hotbed.keys import Keys
from hotbed.records import DOCKER_HUB, HeldImages, image_registry
from workers.config import WorkerSettings
from workers.runtimes.base import ImageStore, Runtime

log = logging.getLogger(__name__)

# Names Docker's own config.json gives Docker Hub.
HUB_ALIASES = (DOCKER_HUB, "index.docker.io", "https://index.docker.io/v1/", "registry-1.docker.io")


def login_from_config(text: str, registry: str, *, source: str) -> tuple[str, str] | None:
    """The (username, password) for ``registry`` in a Docker ``config.json`` text."""
    try:
        auths = json.loads(text).get("auths") or {}
    except (ValueError, AttributeError):
        raise ConfigError(f"{source}: not a Docker config.json (want {{\"auths\": {{...}}}})") from None
    names = HUB_ALIASES if registry == DOCKER_HUB else (registry,)
    for key, entry in auths.items():
        host = key.removeprefix("https://").removeprefix("http://").rstrip("/")
        if key not in names and host not in names:
            continue
        if not isinstance(entry, dict):
            break
        if entry.get("username"):
            return str(entry["username"]), str(entry.get("password") or "")
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise ConfigError(f"{source}: the login for {registry} is not base64 user:password") from None
            return user, password
    return None


class ImageService:
    """Advertises this node's images and pulls missing ones (a runtime without an
    :class:`~workers.runtimes.base.ImageStore` advertises nothing and never pulls)."""

    def __init__(self, runtime: Runtime, *, settings: WorkerSettings, worker_id: str, keys: Keys) -> None:
        self.store: ImageStore | None = runtime if isinstance(runtime, ImageStore) else None
        self.settings = settings
        self.worker_id = worker_id
        self.keys = keys
        self._redis: aioredis.Redis | None = None
        self._changed = anyio.Event()
        self.held = HeldImages()

    def bind(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    @property
    def ttl_s(self) -> int:
        return int(max(60.0, 3 * self.settings.image_refresh_s))

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Advertise now, then every ``image_refresh_s`` or right after a pull."""
        if self.store is None:
            task_status.started()
            return
        with lifecycle.survive("image advertising"):
            await self.advertise()
        task_status.started()
        while True:
            with anyio.move_on_after(self.settings.image_refresh_s):
                await self._changed.wait()
            self._changed = anyio.Event()
            with lifecycle.survive("image advertising"):
                await self.advertise()

    async def advertise(self) -> None:
        assert self.store is not None and self._redis is not None
        held = await self.store.list_images()
        self.held = HeldImages(images=held.images, truncated=held.truncated, at=lifecycle.wall())
        with anyio.fail_after(10):
            await self._redis.set(
                self.keys.worker_images(self.worker_id), records.images_to_value(self.held), ex=self.ttl_s
            )

    async def ensure(self, image: str, *, deadline: float, sandbox_id: str = "") -> None:
        """Make sure ``image`` is on this node: pull it if it is missing and may be pulled,
        before ``deadline`` (wall clock, the request's). ImageNotFound if it cannot be had."""
        if self.store is None or await self.store.has_image(image):
            return
        registry = image_registry(image)
        if registry not in self.settings.registries:
            allowed = ", ".join(self.settings.registries) or "none"
            raise ImageNotFound(
                f"image {image!r} not found on worker {self.worker_id}, and {registry or 'an image id'} "
                f"is not a registry it pulls from (registries: {allowed})",
                sandbox_id=sandbox_id or None, worker_id=self.worker_id,
                detail={"image": image, "registry": registry},
            )
        login = await self._login(registry)
        left = deadline - lifecycle.wall()
        log.info("pulling %s from %s%s", image, registry, " with a login" if login else "",
                 extra={"sandbox_id": sandbox_id, "worker_id": self.worker_id})
        started = anyio.current_time()
        try:
            with anyio.fail_after(max(left, 0.001)):
                await self.store.pull_image(image, login=login)
        except TimeoutError:
            raise RequestTimeout(
                f"pulling {image!r} from {registry} did not finish before the request's deadline",
                sandbox_id=sandbox_id or None, worker_id=self.worker_id,
            ) from None
        except ImageNotFound as exc:
            exc.sandbox_id, exc.worker_id = sandbox_id or None, self.worker_id
            log.warning("pull failed: %s", exc.message, extra={"sandbox_id": sandbox_id})
            raise
        log.info("pulled %s in %.1fs", image, anyio.current_time() - started,
                 extra={"sandbox_id": sandbox_id, "worker_id": self.worker_id})
        self._changed.set()

    async def _login(self, registry: str) -> tuple[str, str] | None:
        cred = self.settings.registry_auth.get(registry)
        if cred is not None:
            return cred.username, cred.password
        path = self.settings.registry_auth_file
        if not path:
            return None
        try:
            text = await anyio.Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"registry_auth_file {path}: {exc.strerror}") from None
        return login_from_config(text, registry, source=str(Path(path)))
