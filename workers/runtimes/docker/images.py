"""Images in dockerd: what the node holds, and pulls from a registry.

A pull goes through the Engine API (``POST /images/create``) with the registry login
in the ``X-Registry-Auth`` header; the password appears in no log line and no error
(dockerd's messages are passed through :func:`redact` all the same). Every failure of
a pull (unknown image, refused login, unreachable registry) is ``ImageNotFound``: the
worker could not get the image. The caller puts the pull under the request's deadline.
"""

from __future__ import annotations

import logging

import anyio
from aiodocker.exceptions import DockerError

from hotbed.errors import ImageNotFound, RuntimeFailure
from hotbed.records import (
    DOCKER_HUB,
    MAX_ADVERTISED_IMAGES,
    HeldImage,
    HeldImages,
    image_ref,
    image_registry,
)
from workers.runtimes.docker.engine import API_TIMEOUT_S, Engine

log = logging.getLogger(__name__)


def redact(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


async def list_images(engine: Engine, *, limit: int = MAX_ADVERTISED_IMAGES) -> HeldImages:
    """The tagged images in dockerd, newest first, at most ``limit`` names."""
    try:
        with anyio.fail_after(API_TIMEOUT_S):
            found = await engine.docker.images.list()
    except DockerError as exc:
        raise RuntimeFailure(f"docker: cannot list images: {exc.message}") from None
    found.sort(key=lambda i: i.get("Created") or 0, reverse=True)
    held: list[HeldImage] = []
    truncated = False
    for img in found:
        for tag in img.get("RepoTags") or []:
            if tag == "<none>:<none>":
                continue
            if len(held) == limit:
                truncated = True
                break
            held.append(HeldImage(
                name=image_ref(tag), id=img.get("Id") or "",
                size=int(img.get("Size") or 0), created=float(img.get("Created") or 0),
            ))
        if truncated:
            break
    return HeldImages(images=held, truncated=truncated)


async def has_image(engine: Engine, ref: str) -> bool:
    try:
        with anyio.fail_after(API_TIMEOUT_S):
            await engine.docker.images.inspect(ref)
    except DockerError as exc:
        if exc.status == 404:
            return False
        raise RuntimeFailure(f"docker: cannot inspect image {ref!r}: {exc.message}") from None
    return True


async def pull(engine: Engine, ref: str, *, login: tuple[str, str] | None = None) -> None:
    """Pull ``ref`` (raises ImageNotFound when dockerd cannot get it)."""
    registry = image_registry(ref)
    secret = login[1] if login else ""
    source = ref
    if login and registry == DOCKER_HUB and not ref.startswith(DOCKER_HUB + "/"):
        # The login header needs the registry spelled out in the name.
        source = f"{DOCKER_HUB}/{ref}"
    auth = {"username": login[0], "password": login[1]} if login else None

    def failed(msg: str) -> ImageNotFound:
        return ImageNotFound(
            f"image {ref!r} could not be pulled from {registry}: {redact(msg, secret)}",
            detail={"image": ref, "registry": registry},
        )

    try:
        async for event in engine.docker.images.pull(source, auth=auth, stream=True):
            # aiodocker before 0.27 passes error events through instead of raising.
            if isinstance(event, dict) and event.get("error"):
                raise failed(str(event["error"]))
    except DockerError as exc:
        raise failed(exc.message if isinstance(exc.message, str) else str(exc.message)) from None
    except OSError as exc:  # dockerd's socket itself failed
        raise RuntimeFailure(f"docker: pulling {ref!r}: {redact(str(exc), secret)}") from None
