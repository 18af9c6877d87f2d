"""SWE-ReX's own docker deployment on gVisor, as the reference hotbed is compared with.

The reference is swe-rex itself: its ``DockerDeployment`` starts ``swerex-remote`` (its
FastAPI server around its ``LocalRuntime``) in a container of the same image hotbed
uses, on the ``runsc`` runtime, and talks to it with its ``RemoteRuntime`` over HTTP.

* **Image.** ``hotbed/base`` plus swe-rex: :func:`ensure_image` builds
  ``hotbed/swerex-ref:<version>`` from the wheels of the swe-rex version installed here
  (``pip download`` on this machine; containers have no network). The build context is
  a temporary folder holding only the wheels and a Dockerfile.
* **Network.** A gVisor sandbox's network is not reachable from the host here, so the
  container runs with ``--network=none`` (its ``-p`` mapping is then inert) and
  :class:`StdioRelay` carries every TCP connection to the server over the stdin/stdout
  of one long-lived ``docker exec``: frames ``(kind, connection id, length, data)``,
  opened and closed per connection, so ``RemoteRuntime`` (which opens a new connection
  per request) sees an ordinary loopback port. One ``docker exec`` for the whole
  episode, not one per request: its start-up (≈100 ms under runsc) is paid once.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import struct
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectSendStream

BASE_IMAGE = "hotbed/base"
WHEELS_DIR = Path.home() / ".cache" / "hotbed" / "swerex-wheels"

DOCKERFILE = """\
FROM {base}
USER root
COPY wheels /tmp/wheels
RUN python3 /tmp/wheels/{pip}/pip install --no-index --find-links /tmp/wheels \\
        --break-system-packages --no-cache-dir swe-rex=={version} \\
    && rm -rf /tmp/wheels && swerex-remote --version
USER {user}
"""

# Runs inside the container (its python3, stdlib only): one thread per connection reads
# from the server; the main thread reads frames from stdin.
MUX = r"""
import socket, struct, sys, threading
PORT = int(sys.argv[1])
out, inp = sys.stdout.buffer, sys.stdin.buffer
lock = threading.Lock()
conns = {}
def send(kind, cid, data=b""):
    with lock:
        out.write(struct.pack(">cII", kind, cid, len(data)) + data)
        out.flush()
def pump(cid, s):
    try:
        while True:
            d = s.recv(262144)
            if not d:
                break
            send(b"D", cid, d)
    except OSError:
        pass
    conns.pop(cid, None)
    s.close()
    send(b"C", cid)
def readn(n):
    buf = b""
    while len(buf) < n:
        d = inp.read(n - len(buf))
        if not d:
            raise SystemExit(0)
        buf += d
    return buf
while True:
    kind, cid, n = struct.unpack(">cII", readn(9))
    data = readn(n) if n else b""
    if kind == b"O":
        try:
            s = socket.create_connection(("127.0.0.1", PORT))
        except OSError:
            send(b"C", cid)
            continue
        conns[cid] = s
        threading.Thread(target=pump, args=(cid, s), daemon=True).start()
    elif kind == b"D":
        s = conns.get(cid)
        if s is not None:
            try:
                s.sendall(data)
            except OSError:
                pass
    elif kind == b"C":
        s = conns.get(cid)
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
"""

_HEADER = struct.Struct(">cII")


def swerex_version() -> str:
    return importlib.metadata.version("swe-rex")


def image_name() -> str:
    return f"hotbed/swerex-ref:{swerex_version()}"


def _image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def ensure_image(base: str = BASE_IMAGE) -> str:
    """Build (once) ``base`` plus the installed swe-rex version; returns the image name.

    Blocking: call it before anything is timed, or from a worker thread.
    """
    name = image_name()
    if _image_exists(name):
        return name
    version = swerex_version()
    WHEELS_DIR.mkdir(parents=True, exist_ok=True)
    py = subprocess.run(
        ["docker", "run", "--rm", base, "python3", "-c",
         "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "-d", str(WHEELS_DIR),
         "--only-binary=:all:", "--python-version", py,
         "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
         f"swe-rex=={version}", "pip"],
        check=True,
    )
    pip = sorted(p.name for p in WHEELS_DIR.glob("pip-*.whl"))[-1]
    user = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Config.User}}", base],
        capture_output=True, text=True, check=True,
    ).stdout.strip() or "root"
    with tempfile.TemporaryDirectory(prefix="swerex-ref-") as ctx:
        wheels = Path(ctx) / "wheels"
        wheels.mkdir()
        for whl in WHEELS_DIR.glob("*.whl"):
            (wheels / whl.name).write_bytes(whl.read_bytes())
        (Path(ctx) / "Dockerfile").write_text(
            DOCKERFILE.format(base=base, pip=pip, version=version, user=user)
        )
        subprocess.run(["docker", "build", "-q", "-t", name, ctx], check=True,
                       stdout=subprocess.DEVNULL)
    return name


class StdioRelay:
    """A loopback TCP port whose connections reach ``127.0.0.1:port`` inside a
    container through one ``docker exec -i`` (see the module docstring).

    ``container`` names the container, or None while it does not exist yet; the
    ``docker exec`` starts on the first connection after it does, and a connection
    that finds no container (or no server listening yet) is closed at once, which an
    HTTP client reads as "not alive yet".
    """

    def __init__(self, container: Callable[[], str | None], *, port_in_container: int = 8000):
        self._container = container
        self._inner_port = port_in_container
        self._ids = itertools.count(1)
        self._conns: dict[int, MemoryObjectSendStream[bytes]] = {}
        self._proc: anyio.abc.Process | None = None
        self._start_lock = anyio.Lock()
        self._write_lock = anyio.Lock()
        self._tg: anyio.abc.TaskGroup | None = None
        self.port = 0

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started(self.port)
                await listener.serve(self._handle, task_group=tg)
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
                await self._drop_proc()

    async def _drop_proc(self) -> None:
        proc, self._proc = self._proc, None
        for send in self._conns.values():
            send.close()
        self._conns.clear()
        if proc is not None:
            if proc.stdin is not None:
                await proc.stdin.aclose()
            if proc.returncode is None:
                proc.kill()
            with anyio.move_on_after(5, shield=True):
                await proc.wait()

    async def _ensure_proc(self) -> anyio.abc.Process | None:
        async with self._start_lock:
            if self._proc is not None and self._proc.returncode is None:
                return self._proc
            name = self._container()
            if name is None:
                return None
            proc = await anyio.open_process(
                ["docker", "exec", "-i", name, "python3", "-u", "-c", MUX, str(self._inner_port)],
                stderr=subprocess.DEVNULL,
            )
            self._proc = proc
            assert self._tg is not None
            self._tg.start_soon(self._read_frames, proc)
            return proc

    async def _read_frames(self, proc: anyio.abc.Process) -> None:
        assert proc.stdout is not None
        stream = BufferedByteReceiveStream(proc.stdout)
        try:
            while True:
                kind, cid, n = _HEADER.unpack(await stream.receive_exactly(_HEADER.size))
                data = await stream.receive_exactly(n) if n else b""
                send = self._conns.get(cid)
                if send is None:
                    continue
                if kind == b"D":
                    try:
                        await send.send(data)
                    except anyio.BrokenResourceError:
                        self._conns.pop(cid, None)
                elif kind == b"C":
                    self._conns.pop(cid, None)
                    send.close()
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.ClosedResourceError):
            pass
        # The exec ended (container stopped, or not started yet): every connection ends.
        if self._proc is proc:
            self._proc = None
        for s in list(self._conns.values()):
            s.close()
        self._conns.clear()

    async def _frame(self, proc: anyio.abc.Process, kind: bytes, cid: int, data: bytes = b"") -> None:
        assert proc.stdin is not None
        async with self._write_lock:
            await proc.stdin.send(_HEADER.pack(kind, cid, len(data)) + data)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            proc = await self._ensure_proc()
            if proc is None:
                return
            cid = next(self._ids)
            send, receive = anyio.create_memory_object_stream[bytes](64)
            self._conns[cid] = send
            try:
                await self._frame(proc, b"O", cid)
                async with anyio.create_task_group() as tg:
                    async def downstream() -> None:
                        async with receive:
                            async for data in receive:
                                await client.send(data)
                        tg.cancel_scope.cancel()

                    tg.start_soon(downstream)
                    try:
                        async for data in client:
                            await self._frame(proc, b"D", cid, data)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass
                    await self._frame(proc, b"C", cid)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass
            finally:
                self._conns.pop(cid, None)


@asynccontextmanager
async def swerex_docker(image: str, *, oci_runtime: str = "runsc", **config: Any) -> AsyncIterator[Any]:
    """An unstarted ``swerex.deployment.docker.DockerDeployment`` of ``image`` on
    ``oci_runtime``, whose ``RemoteRuntime`` reaches the server through a
    :class:`StdioRelay`; the caller starts and stops it (a deployment still running
    when the block ends is stopped)."""
    from swerex.deployment.docker import DockerDeployment

    holder: dict[str, DockerDeployment] = {}
    relay = StdioRelay(lambda: holder["d"].container_name if "d" in holder else None)
    async with anyio.create_task_group() as tg:
        port = await tg.start(relay.serve)
        dep = DockerDeployment(
            image=image, port=port, pull="never",
            docker_args=[f"--runtime={oci_runtime}", "--network=none"], **config,
        )
        holder["d"] = dep
        try:
            yield dep
        finally:
            with anyio.CancelScope(shield=True):
                if dep.container_name is not None:
                    await dep.stop()
                tg.cancel_scope.cancel()
