"""Exposed ports on real runsc sandboxes (network "none"): HTTP and raw TCP servers
inside a sandbox reached through the worker's tunnel over the guest channel."""

from __future__ import annotations

import os
import secrets
import socket
import sys
from pathlib import Path

import anyio
import anyio.abc
import pytest

from hotbed import protocol
from hotbed.errors import InvalidRequest, SandboxNotFound
from hotbed.sandbox import Sandbox
from tests.conftest import BASE_IMAGE, Stack
from tests.test_guest_agent import agent_channel
from workers import ports
from workers.ports import Tunnel

pytestmark = pytest.mark.anyio

# A TCP echo server: echoes until the client half-closes, then half-closes itself.
ECHO_SERVER = r"""
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(64)
def serve(c):
    with c:
        while True:
            data = c.recv(1 << 16)
            if not data:
                break
            c.sendall(data)
        c.shutdown(socket.SHUT_WR)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


async def _listening(sb: Sandbox, port: int) -> None:
    """Until something inside the sandbox accepts on ``port``."""
    probe = (
        "import socket,sys\n"
        "s=socket.socket()\n"
        f"sys.exit(s.connect_ex(('127.0.0.1',{port})))\n"
    )
    with anyio.fail_after(30):
        while (await sb.exec("python3", "-c", probe)).exit_code != 0:  # noqa: ASYNC110 - polls the sandbox
            await anyio.sleep(0.1)


async def _start_servers(sb: Sandbox) -> None:
    await sb.write_file("/tmp/echo.py", ECHO_SERVER)
    await sb.start_process("python3", "/tmp/echo.py", "9000")
    await sb.start_process("python3", "-m", "http.server", "8000", "--bind", "127.0.0.1",
                           "--directory", "/tmp")
    await _listening(sb, 9000)
    await _listening(sb, 8000)


async def _echo(address: protocol.PortExposed, data: bytes) -> bytes:
    async with await anyio.connect_tcp(address.host, address.host_port) as conn:
        async with anyio.create_task_group() as tg:
            async def write() -> None:
                view = memoryview(data)
                while view:
                    await conn.send(view[:65536])
                    view = view[65536:]
                await conn.send_eof()

            tg.start_soon(write)
            got = bytearray()
            while True:
                try:
                    got += await conn.receive()
                except anyio.EndOfStream:
                    break
    return bytes(got)


async def _closed_at_once(address: protocol.PortExposed) -> bool:
    """The tunnel accepts, then closes (or resets) without a byte back."""
    with anyio.fail_after(15):
        async with await anyio.connect_tcp(address.host, address.host_port) as conn:
            await conn.send(b"hello")
            try:
                return not await conn.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return True


async def _http_get(address: protocol.PortExposed, path: str) -> bytes:
    async with await anyio.connect_tcp(address.host, address.host_port) as conn:
        await conn.send(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        got = bytearray()
        while True:
            try:
                got += await conn.receive()
            except anyio.EndOfStream:
                return bytes(got)


async def test_http_and_raw_tcp_through_the_tunnel_then_closed(hotbed_stack: Stack) -> None:
    sb = await Sandbox.create(BASE_IMAGE, client=hotbed_stack.client, memory_mb=256)
    try:
        await _start_servers(sb)
        page = secrets.token_hex(16)
        await sb.write_file("/tmp/page.txt", page)
        web = await sb.expose(8000)
        echo = await sb.expose(9000)
        assert web.host == "127.0.0.1" and web.host_port != echo.host_port
        # The same port again: the same address.
        assert (await sb.expose(8000)).host_port == web.host_port

        reply = await _http_get(web, "/page.txt")
        assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(page.encode()), reply[:200]

        # Several MiB each way, and connections at once: flow control keeps every byte.
        blobs = [os.urandom(n) for n in (1, 3 << 20, 100_000, 7 << 20)]
        got: list[bytes] = [b""] * len(blobs)

        async def one(i: int) -> None:
            got[i] = await _echo(echo, blobs[i])

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(len(blobs)):
                    tg.start_soon(one, i)
        assert [len(g) for g in got] == [len(b) for b in blobs]
        assert got == blobs

        # A port where nothing listens: the connection is closed at once.
        assert await _closed_at_once(await sb.expose(9999))
    finally:
        await sb.terminate()
    # Closed with the sandbox.
    for address in (web, echo):
        with pytest.raises(OSError):
            await anyio.connect_tcp(address.host, address.host_port)


async def test_bad_ports_get_typed_errors_and_the_worker_keeps_serving(hotbed_stack: Stack) -> None:
    client = hotbed_stack.client
    sb = await Sandbox.create(BASE_IMAGE, client=client, memory_mb=256)
    try:
        # Straight to the worker, past the SDK's own check.
        for bad in (0, -1, 65536, 1 << 40):
            with pytest.raises(InvalidRequest, match="1-65535"):
                await client.worker_request(
                    sb.worker_id, protocol.ExposePort(sandbox_id=sb.id, port=bad), timeout=10
                )
        with pytest.raises(InvalidRequest):
            await sb.expose(70000)
        gone = await Sandbox.create(BASE_IMAGE, client=client, memory_mb=256)
        await gone.terminate()
        with pytest.raises(SandboxNotFound):
            await gone.expose(8000)
        # Still serving.
        assert (await sb.exec("echo", "ok")).stdout == "ok\n"
        await sb.write_file("/tmp/echo.py", ECHO_SERVER)
        await sb.start_process("python3", "/tmp/echo.py", "9000")
        await _listening(sb, 9000)
        assert await _echo(await sb.expose(9000), b"still here") == b"still here"
    finally:
        await sb.terminate()


async def test_cli_port_and_publish(hotbed_stack: Stack) -> None:
    env = {**os.environ, "HOTBED_REDIS_URL": hotbed_stack.redis_url,
           "HOTBED_PREFIX": hotbed_stack.prefix}
    cli = [str(Path(sys.executable).parent / "hotbed")]
    res = await anyio.run_process(
        [*cli, "create", BASE_IMAGE, "--memory", "256", "--publish", "9000"], env=env, check=False
    )
    assert res.returncode == 0, res.stderr
    sid = res.stdout.decode().strip()
    sb = await Sandbox.from_id(sid, client=hotbed_stack.client)
    try:
        published = res.stderr.decode().strip()
        assert published.startswith("9000 -> 127.0.0.1:"), published
        res = await anyio.run_process([*cli, "port", sid, "9000"], env=env)
        address = res.stdout.decode().strip()
        assert published.endswith(address)
        await sb.write_file("/tmp/echo.py", ECHO_SERVER)
        await sb.start_process("python3", "/tmp/echo.py", "9000")
        await _listening(sb, 9000)
        host, port = address.rsplit(":", 1)
        exposed = protocol.PortExposed(sandbox_id=sid, port=9000, host=host, host_port=int(port))
        assert await _echo(exposed, b"via cli") == b"via cli"
        res = await anyio.run_process([*cli, "port", sid, "0"], env=env, check=False)
        assert res.returncode == 125 and b"1-65535" in res.stderr
    finally:
        await sb.terminate()


async def test_tunnel_against_a_local_agent(tmp_path: Path) -> None:
    """The tunnel protocol without Docker: the guest agent as a local child process,
    a TCP echo server on loopback, a few MiB each way on concurrent connections, a
    slow reader (the windows hold), and a port where nothing listens."""
    echoed: list[int] = []

    async def echo(conn: anyio.abc.SocketStream) -> None:
        async with conn:
            n = 0
            try:
                while True:
                    try:
                        data = await conn.receive()
                    except anyio.EndOfStream:
                        break
                    n += len(data)
                    await conn.send(data)
                await conn.send_eof()
            except anyio.BrokenResourceError:
                pass  # the slow client below goes away mid-echo
            echoed.append(n)

    async with agent_channel(tmp_path) as (ch, _proc), await anyio.create_tcp_listener(
        local_host="127.0.0.1"
    ) as server, anyio.create_task_group() as tg:
        tg.start_soon(server.serve, echo)
        port = server.extra(anyio.abc.SocketAttribute.local_port)
        front = ports.listen("127.0.0.1")
        tg.start_soon(ports.serve, front, lambda c: Tunnel(ch, port, c).run())
        exposed = protocol.PortExposed(
            sandbox_id="sb1", port=port, host="127.0.0.1", host_port=front.getsockname()[1],
        )
        blobs = [os.urandom(n) for n in (1, 5 << 20, 70_000, 3 << 20)]
        got: list[bytes] = [b""] * len(blobs)

        async def one(i: int) -> None:
            got[i] = await _echo(exposed, blobs[i])

        with anyio.fail_after(60):
            async with anyio.create_task_group() as clients:
                for i in range(len(blobs)):
                    clients.start_soon(one, i)
        assert got == blobs

        # A client that does not read: writes stop once the windows and the kernel's
        # socket buffers (tens of MiB on loopback) are full, long before 256 MiB.
        async with await anyio.connect_tcp(exposed.host, exposed.host_port) as slow:
            for _ in range(1024):
                with anyio.move_on_after(0.5) as stuck:
                    await slow.send(b"y" * (256 << 10))
                if stuck.cancelled_caught:
                    break
            assert stuck.cancelled_caught, "256 MiB went in without the client reading"

        # Nothing listens on the target: the connection is closed at once.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            dead = probe.getsockname()[1]
        refused = ports.listen("127.0.0.1")
        tg.start_soon(ports.serve, refused, lambda c: Tunnel(ch, dead, c).run())
        assert await _closed_at_once(protocol.PortExposed(
            sandbox_id="sb1", port=dead, host="127.0.0.1", host_port=refused.getsockname()[1],
        ))
        tg.cancel_scope.cancel()
