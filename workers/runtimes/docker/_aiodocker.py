"""The aiodocker internals hotbed still needs, in one place.

aiodocker has no public API for three things this runtime does:

* a POST whose response body we only drain (checkpoint, start from a checkpoint):
  ``Docker._query``;
* half-closing an exec's stdin while its output is still read (``cat`` must see EOF):
  the stream's ``_resp`` transport;
* an attach kept open as the guest channel: ``Stream._init`` (connect now, so a
  missing container fails here), ``Stream._queue._limit`` (aiodocker pauses the
  socket past 128 KiB queued) and ``Stream._resp`` (drop the connection at once);
* a connection pool without aiohttp's default cap of 100: every running sandbox's
  guest channel holds one connection for as long as it runs, so at 100 sandboxes
  every further Docker call (a create, a terminate) would wait for one to close.
  aiodocker builds its connector itself; its ``_limit`` (aiohttp 3) is raised here.

Checked against aiodocker 0.23 to 0.27; ``pyproject.toml`` bounds the version, and
nothing outside this module touches a private attribute of aiodocker.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiodocker
import anyio

log = logging.getLogger(__name__)

# What an attach's reader queues before aiodocker pauses the socket. Its default
# (128 KiB) throttles bulk output; the guest channel bounds what it holds itself
# (a few frames per request), so a few MiB between pauses only buys throughput.
ATTACH_QUEUE_BYTES = 2 << 20
ATTACH_TIMEOUT_S = 30.0


def open_docker(url: str | None) -> aiodocker.Docker:
    """An aiodocker client whose connections are not capped (see above)."""
    docker = aiodocker.Docker(url=url)
    if hasattr(docker.connector, "_limit"):
        docker.connector._limit = 0  # 0: no limit
    return docker


async def post(
    docker: aiodocker.Docker,
    path: str,
    *,
    params: dict[str, Any] | None = None,
    body: dict[str, Any] | None = None,
) -> None:
    """POST to the Engine API and drain the answer (raises ``DockerError``)."""
    async with docker._query(
        path, method="POST", params=params,
        data=json.dumps(body) if body is not None else None,
    ) as resp:
        await resp.read()


def write_eof(stream: Any) -> None:
    """Half-close an exec's stdin so ``cat`` sees EOF while we keep reading its output.

    aiodocker's Stream.close() would also drop the response; this reaches the transport.
    """
    resp = getattr(stream, "_resp", None)
    transport = resp.connection.transport if resp is not None and resp.connection else None
    if transport is not None and transport.can_write_eof():
        transport.write_eof()


class AttachedContainer:
    """A container's main process's stdin/stdout over ``docker attach``
    (:class:`workers.runtimes.base.AttachedStdio`)."""

    def __init__(self, stream: Any, sandbox_id: str) -> None:
        self._stream = stream
        self._sandbox_id = sandbox_id

    async def read(self) -> bytes | None:
        while True:
            msg = await self._stream.read_out()
            if msg is None:
                return None
            if msg.stream == 2:
                # The channel is stdout; stderr carries only the agent's own complaints.
                log.debug("guest stderr: %r", msg.data[:500], extra={"sandbox_id": self._sandbox_id})
                continue
            return bytes(msg.data)

    async def write(self, data: bytes) -> None:
        await self._stream.write_in(data)

    def abort(self) -> None:
        resp = getattr(self._stream, "_resp", None)
        if resp is not None:
            resp.close()


async def attach(docker: aiodocker.Docker, container: str, sandbox_id: str) -> AttachedContainer:
    """Attach to ``container``'s stdin, stdout and stderr, connected before returning
    (raises ``DockerError`` if the container is gone, ``TimeoutError`` past 30 s)."""
    stream = docker.containers.container(container).attach(stdin=True, stdout=True, stderr=True)
    with anyio.fail_after(ATTACH_TIMEOUT_S):
        await stream._init()
    queue = getattr(stream, "_queue", None)
    if queue is not None and hasattr(queue, "_limit"):
        queue._limit = ATTACH_QUEUE_BYTES
    return AttachedContainer(stream, sandbox_id)
