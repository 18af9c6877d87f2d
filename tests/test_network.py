"""Sandbox networks on real runsc sandboxes, against servers in a network namespace
this test makes (a veth to the host): egress allow lists, refusals, "none".

Traffic goes only to that namespace, to the host's own veth address and to other
sandboxes of the test; the namespace, its veth and every rule are removed after."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from hotbed.errors import InvalidRequest, UnsupportedRequest
from hotbed.sandbox import Sandbox
from tests.conftest import BASE_IMAGE, Stack
from workers.runtimes.docker.network import chain_name

pytestmark = pytest.mark.anyio

# Connects to HOST:PORT (an HTTP GET); prints {"ok", "status" | "error", "s"}.
PROBE = r"""
import json, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
t = time.monotonic()
out = {}
try:
    with socket.create_connection((host, port), timeout=8) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    out = {"ok": True, "status": data.split(b"\r\n", 1)[0].decode()}
except OSError as exc:
    out = {"ok": False, "error": type(exc).__name__ + ": " + str(exc)}
out["s"] = time.monotonic() - t
print(json.dumps(out))
"""


# A minimal HTTP server (http.server looks its own address up in DNS before it listens,
# which in a namespace without DNS takes its resolver's whole timeout).
SERVER = r"""
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(64)
def answer(c):
    with c:
        c.recv(65536)
        c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello")
while True:
    c, _ = s.accept()
    threading.Thread(target=answer, args=(c,), daemon=True).start()
"""


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


class Namespace:
    """A network namespace with a veth to the host: host ``.1``, namespace ``.2``."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.name = f"hbt-{tag}"
        self.veth = f"hbv{tag}"
        n = 1 + secrets.randbelow(250)
        self.host_ip, self.ns_ip = f"10.251.{n}.1", f"10.251.{n}.2"
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Namespace:
        _sh("ip", "netns", "add", self.name)
        try:
            _sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.name)
            _sh("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.veth)
            _sh("ip", "link", "set", self.veth, "up")
            ns = ["ip", "netns", "exec", self.name]
            _sh(*ns, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", "eth0")
            _sh(*ns, "ip", "link", "set", "eth0", "up")
            _sh(*ns, "ip", "link", "set", "lo", "up")
            _sh(*ns, "ip", "route", "add", "default", "via", self.host_ip)
        except BaseException:
            self.__exit__()
            raise
        return self

    def serve(self, ip: str, port: int, *, in_namespace: bool = True) -> None:
        prefix = ["ip", "netns", "exec", self.name] if in_namespace else []
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", SERVER, ip, str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        deadline = time.monotonic() + 10
        probe = [*prefix, sys.executable, "-c",
                 f"import socket; socket.create_connection(('{ip}', {port}), timeout=1).close()"]
        while subprocess.run(probe, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and proc.poll() is None, "test server did not start"
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        # The veth goes with the namespace.
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)


@pytest.fixture
def netns() -> Iterator[Namespace]:
    with Namespace() as ns:
        yield ns


async def _probe(sb: Sandbox, host: str, port: int) -> dict[str, object]:
    res = await sb.exec("python3", "-c", PROBE, host, str(port), timeout=30)
    assert res.exit_code == 0, res.stderr
    return dict(json.loads(res.stdout))


def _address(sb: Sandbox) -> str:
    out = subprocess.run(
        ["docker", "inspect", "-f", "{{json .NetworkSettings.Networks}}", f"hotbed-{sb.id}"],
        capture_output=True, text=True, check=True,
    ).stdout
    return str(json.loads(out)["hotbed-net"]["IPAddress"])


def _rules() -> str:
    return subprocess.run(["iptables", "-S"], capture_output=True, text=True).stdout


async def test_egress_allows_only_what_is_listed(hotbed_stack: Stack, netns: Namespace) -> None:
    client = hotbed_stack.client
    netns.serve(netns.ns_ip, 8081)
    netns.serve(netns.ns_ip, 8082)
    # A service of the host itself, on its end of the veth.
    netns.serve(netns.host_ip, 8083, in_namespace=False)
    allowed = await Sandbox.create(
        BASE_IMAGE, client=client, cpu=0.25, memory_mb=256, network="egress", allow=[f"{netns.ns_ip}:8081"]
    )
    other = await Sandbox.create(BASE_IMAGE, client=client, cpu=0.25, memory_mb=256, network="egress",
                                 allow=[f"{netns.ns_ip}/32"])
    opened = await Sandbox.create(BASE_IMAGE, client=client, cpu=0.25, memory_mb=256, network="open")
    closed = await Sandbox.create(BASE_IMAGE, client=client, cpu=0.25, memory_mb=256)
    try:
        assert chain_name(allowed.id) in _rules()
        got = await _probe(allowed, netns.ns_ip, 8081)
        assert got["ok"] and "200" in str(got["status"]), got
        # Denied at once, with "connection refused": a port not listed, the host, another
        # sandbox (a server listens there), link-local metadata.
        await other.write_file("/tmp/server.py", SERVER)
        await other.start_process("python3", "/tmp/server.py", "0.0.0.0", "9000")
        neighbour = _address(other)
        # It does listen on its own address: a refusal below is the host's doing.
        for _ in range(100):
            if (await _probe(other, neighbour, 9000))["ok"]:
                break
        else:
            raise AssertionError("the neighbour's server did not start")
        for host, port in ((netns.ns_ip, 8082), (netns.host_ip, 8083), (neighbour, 9000),
                           ("169.254.169.254", 80)):
            got = await _probe(allowed, host, port)
            assert not got["ok"] and "ConnectionRefused" in str(got["error"]), (host, port, got)
            assert float(got["s"]) < 2.0, (host, port, got)  # type: ignore[arg-type]
        # The other sandbox lists the whole address: both ports.
        assert (await _probe(other, netns.ns_ip, 8082))["ok"]
        # "open" reaches public addresses only: a private range is refused unless listed.
        got = await _probe(opened, netns.ns_ip, 8081)
        assert not got["ok"] and "ConnectionRefused" in str(got["error"]), got
        # "none": no interface but loopback, nothing is reachable.
        got = await _probe(closed, netns.ns_ip, 8081)
        assert not got["ok"] and ("Unreachable" in str(got["error"]) or "No route" in str(got["error"])), got
    finally:
        for sb in (allowed, other, opened, closed):
            await sb.terminate()
    rules = _rules()
    for sb in (allowed, other, opened):
        assert chain_name(sb.id) not in rules


async def test_bad_network_requests_are_refused_typed(hotbed_stack: Stack) -> None:
    client = hotbed_stack.client
    for allow, mode in ((["10.0.0.0/33"], "egress"), (["host:0"], "egress"), (["*.example.com"], "egress"),
                        (["10.0.0.1"], "none")):
        with pytest.raises(InvalidRequest):
            await Sandbox.create(BASE_IMAGE, client=client, cpu=0.25, memory_mb=256, network=mode, allow=allow)  # type: ignore[arg-type]
    # Still serving.
    async with await Sandbox.create(BASE_IMAGE, client=client, cpu=0.25, memory_mb=256) as sb:
        assert (await sb.exec("echo", "ok")).stdout == "ok\n"


async def test_open_network_can_be_forbidden(redis_url: str, prefix: str) -> None:
    from tests.conftest import running_stack

    async with running_stack(redis_url, prefix, worker_overrides={"allow_open_network": False}) as stack:
        with pytest.raises(InvalidRequest, match="forbidden"):
            await Sandbox.create(BASE_IMAGE, client=stack.client, cpu=0.25, memory_mb=256, network="open")


async def test_pause_and_snapshot_refused_typed_and_the_network_stays(
    hotbed_stack: Stack, netns: Namespace
) -> None:
    """runsc cannot checkpoint the kernel network stack that networked sandboxes use:
    pause and snapshot say so (typed) and the sandbox keeps its network and rules."""
    netns.serve(netns.ns_ip, 8081)
    sb = await Sandbox.create(BASE_IMAGE, client=hotbed_stack.client, cpu=0.25, memory_mb=256,
                              network="egress", allow=[f"{netns.ns_ip}:8081"])
    try:
        with pytest.raises(UnsupportedRequest, match="network"):
            await sb.pause()
        with pytest.raises(UnsupportedRequest, match="network"):
            await sb.snapshot()
        assert chain_name(sb.id) in _rules()
        got = await _probe(sb, netns.ns_ip, 8081)
        assert got["ok"], got
    finally:
        await sb.terminate()
    assert chain_name(sb.id) not in _rules()
