"""Sandbox networks on real runsc sandboxes, against servers in a network namespace
this test makes (a veth to the host): egress allow lists, refusals, "none".

Traffic goes only to that namespace, to the host's own veth address and to other
sandboxes of the test; the namespace, its veth and every rule are removed after."""

from __future__ import annotations

import json
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial

import anyio
import pytest

from hotbed.errors import InvalidRequest
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


def _try(*argv: str) -> None:
    subprocess.run(argv, capture_output=True)


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


async def test_a_new_sandbox_drops_rules_left_on_its_address() -> None:
    """Rules a sandbox left behind (its worker was killed, its container removed behind
    hotbed's back) are dropped when dockerd gives its address to a new sandbox, so
    they open nothing to it; rules of other addresses stay."""
    from workers.runtimes.docker.network import SB_FWD, SB_IN, SandboxNetworks

    stale, other = chain_name(f"sb-gone-{secrets.token_hex(4)}"), chain_name(f"sb-kept-{secrets.token_hex(4)}")
    address, other_address = "172.29.254.250", "172.29.254.251"
    for parent in (SB_FWD, SB_IN):
        _try("iptables", "-w", "-N", parent)
    try:
        for chain, ip in ((stale, address), (other, other_address)):
            _sh("iptables", "-w", "-N", chain)
            _sh("iptables", "-w", "-A", chain, "-d", "10.251.0.2/32", "-j", "ACCEPT")
            for parent in (SB_FWD, SB_IN):
                _sh("iptables", "-w", "-A", parent, "-s", f"{ip}/32", "-j", chain)
        _sh("iptables", "-w", "-A", SB_FWD, "-s", f"{address}/32", "-m", "comment", "--comment", stale, "-j", "ACCEPT")

        await SandboxNetworks().remove(f"sb-new-{secrets.token_hex(4)}", address=address)

        rules = _rules()
        assert stale not in rules and f"{address}/32" not in rules, rules
        assert f"-A {SB_FWD} -s {other_address}/32 -j {other}" in rules
        assert f"-A {SB_IN} -s {other_address}/32 -j {other}" in rules
    finally:
        for chain, ip in ((stale, address), (other, other_address)):
            for parent in (SB_FWD, SB_IN):
                _try("iptables", "-w", "-D", parent, "-s", f"{ip}/32", "-j", chain)
            _try("iptables", "-w", "-D", SB_FWD, "-s", f"{ip}/32", "-m", "comment", "--comment", chain, "-j", "ACCEPT")
            _try("iptables", "-w", "-F", chain)
            _try("iptables", "-w", "-X", chain)


async def test_two_removals_of_one_sandbox_at_once_both_succeed() -> None:
    """A terminate and the health check may remove one sandbox's rules at the same
    time: the one whose batch finds the chain already gone still succeeds."""
    from workers.runtimes.docker.network import SB_FWD, SB_IN, SandboxNetworks

    for parent in (SB_FWD, SB_IN):
        _try("iptables", "-w", "-N", parent)
    for round_ in range(6):
        sid = f"sb-race-{secrets.token_hex(4)}"
        chain, address = chain_name(sid), f"172.29.254.{240 + round_}"
        try:
            _sh("iptables", "-w", "-N", chain)
            _sh("iptables", "-w", "-A", chain, "-d", "10.251.0.2/32", "-j", "ACCEPT")
            for parent in (SB_FWD, SB_IN):
                _sh("iptables", "-w", "-A", parent, "-s", f"{address}/32", "-j", chain)
            async with anyio.create_task_group() as tg:
                for _ in range(2):
                    tg.start_soon(partial(SandboxNetworks().remove, sid, address=address))
            rules = _rules()
            assert chain not in rules and f"{address}/32" not in rules, rules
        finally:
            for parent in (SB_FWD, SB_IN):
                _try("iptables", "-w", "-D", parent, "-s", f"{address}/32", "-j", chain)
            _try("iptables", "-w", "-F", chain)
            _try("iptables", "-w", "-X", chain)


async def test_bad_network_requests_are_refused_typed(hotbed_stack: Stack) -> None:
    client = hotbed_stack.client
    for allow, mode in ((["10.0.0.0/33"], "egress"), (["host.test:0"], "egress"), (["*.com"], "egress"),
                        (["pypi.org:70000"], "egress"), (["fe80::1"], "egress"), (["10.0.0.1"], "none")):
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


async def _reaches(sb: Sandbox, host: str, port: int) -> bool:
    got = await _probe(sb, host, port)
    if not got["ok"]:
        assert "ConnectionRefused" in str(got["error"]) and float(got["s"]) < 2.0, got  # type: ignore[arg-type]
    return bool(got["ok"])


async def test_pause_resume_and_snapshot_keep_the_network(hotbed_stack: Stack, netns: Namespace) -> None:
    """gVisor's own network stack is checkpointed with the sandbox: pause/resume and a
    snapshot keep its network and its rules, and the sandbox goes on serving."""
    netns.serve(netns.ns_ip, 8081)
    netns.serve(netns.ns_ip, 8082)
    client = hotbed_stack.client
    sb = await Sandbox.create(BASE_IMAGE, client=client, cpu=0.25, memory_mb=256,
                              network="egress", allow=[f"{netns.ns_ip}:8081"])
    try:
        await sb.exec("sh", "-c", "echo kept > /tmp/state")
        await sb.pause()
        await sb.resume()
        assert (await sb.exec("cat", "/tmp/state")).stdout == "kept\n"
        assert chain_name(sb.id) in _rules()
        assert await _reaches(sb, netns.ns_ip, 8081)
        assert not await _reaches(sb, netns.ns_ip, 8082)
        # A snapshot (it keeps running) is a template whose sandboxes get its network.
        await sb.snapshot("net-snap-" + sb.id[-6:])
        assert await _reaches(sb, netns.ns_ip, 8081)
        child = await Sandbox.create(template="net-snap-" + sb.id[-6:], client=client, cpu=0.25, memory_mb=256)
        try:
            assert (await child.exec("cat", "/tmp/state")).stdout == "kept\n"
            assert await _reaches(child, netns.ns_ip, 8081)
            assert not await _reaches(child, netns.ns_ip, 8082)
        finally:
            await child.terminate()
        # Restored into another network: what the create states (any mode with one).
        wider = await Sandbox.create(template="net-snap-" + sb.id[-6:], client=client, cpu=0.25,
                                     memory_mb=256, network="egress", allow=[f"{netns.ns_ip}/32"])
        try:
            assert await _reaches(wider, netns.ns_ip, 8082)
        finally:
            await wider.terminate()
        # Not into none: gVisor restores only with the mounts the snapshot had. Typed.
        with pytest.raises(InvalidRequest, match="snapshotted with a network"):
            await Sandbox.create(template="net-snap-" + sb.id[-6:], client=client, cpu=0.25,
                                 memory_mb=256, network="none")
    finally:
        await sb.terminate()
    assert chain_name(sb.id) not in _rules()


async def test_templates_and_pools_carry_the_network(hotbed_stack: Stack, netns: Namespace) -> None:
    """A template's set-up runs with its network; a pool's key includes the network its
    claims state, so a claim never gets a warm sandbox with another network."""
    from hotbed import templates

    netns.serve(netns.ns_ip, 8081)
    client = hotbed_stack.client
    name = "net-tpl-" + secrets.token_hex(3)
    allow = [f"{netns.ns_ip}:8081"]
    # The set-up reaches the allowed server (it fails the build otherwise).
    fetch = f"python3 -c \"import socket; socket.create_connection(('{netns.ns_ip}', 8081), timeout=5).close()\""
    await templates.create_template(name, image=BASE_IMAGE, run=[fetch], cpu=0.25, memory_mb=256,
                                    network="egress", allow=allow, client=client)
    rec = await templates.get_template(name, client=client)
    assert rec.spec.network.mode == "egress" and rec.spec.network.allow == allow
    with pytest.raises(InvalidRequest):
        await templates.set_pool(name, 1, cpu=0.25, memory_mb=256, network="egress", allow=["nope:0"], client=client)
    with pytest.raises(InvalidRequest, match="snapshotted with a network"):
        await templates.set_pool(name, 1, cpu=0.25, memory_mb=256, network="none", client=client)
    # Two pools of one template and shape: the template's network, and a wider list.
    other = [f"{netns.ns_ip}:8082"]
    default_pool = await templates.set_pool(name, 1, cpu=0.25, memory_mb=256, client=client)
    other_pool = await templates.set_pool(name, 1, cpu=0.25, memory_mb=256, allow=other, client=client)
    assert default_pool != other_pool
    netns.serve(netns.ns_ip, 8082)
    try:
        for pool in (default_pool, other_pool):
            with anyio.fail_after(60):
                while not [p for p in await templates.pool_status(client=client) if p.name == pool and p.ready]:
                    await anyio.sleep(0.1)
        first = await Sandbox.create(template=name, client=client, cpu=0.25, memory_mb=256)
        second = await Sandbox.create(template=name, client=client, cpu=0.25, memory_mb=256, allow=other)
        try:
            assert first.path == "warm" and second.path == "warm", (first.path, second.path)
            assert await _reaches(first, netns.ns_ip, 8081)
            assert not await _reaches(first, netns.ns_ip, 8082)
            assert await _reaches(second, netns.ns_ip, 8082)
            assert not await _reaches(second, netns.ns_ip, 8081)
            rec1, rec2 = await first.info(), await second.info()
            assert rec1.network == "egress" and rec1.allow == allow and rec2.allow == other
        finally:
            await first.terminate()
            await second.terminate()
    finally:
        await templates.set_pool(name, 0, cpu=0.25, memory_mb=256, client=client)
        await templates.set_pool(name, 0, cpu=0.25, memory_mb=256, allow=other, client=client)
        with anyio.fail_after(60):
            while await templates.pool_status(client=client):
                await anyio.sleep(0.2)


class DnsServer:
    """An upstream resolver on loopback: A records for ``names``, NXDOMAIN otherwise;
    remembers every name it was asked."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self.asked: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            off, labels = 12, []
            while data[off]:
                labels.append(data[off + 1: off + 1 + data[off]].decode())
                off += 1 + data[off]
            name, qtype = ".".join(labels).lower(), struct.unpack("!H", data[off + 1: off + 3])[0]
            self.asked.append(name)
            question = data[12: off + 5]
            ip = self.names.get(name)
            answer = (b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + socket.inet_aton(ip)) if ip and qtype == 1 else b""
            rcode = 0 if ip else 3
            head = struct.pack("!6H", struct.unpack("!H", data[:2])[0], 0x8180 | rcode, 1, 1 if answer else 0, 0, 0)
            self.sock.sendto(head + question + answer, peer)

    def close(self) -> None:
        self.sock.close()


RESOLVE = r"""
import json, socket, sys, time
out = {}
for name in sys.argv[1:]:
    t = time.monotonic()
    try:
        out[name] = socket.gethostbyname(name)
    except OSError as exc:
        out[name] = "error: " + str(exc)
    out[name + " s"] = time.monotonic() - t
print(json.dumps(out))
"""


async def test_dns_answers_allowed_names_only(redis_url: str, prefix: str, netns: Namespace) -> None:
    """The node's resolver answers a sandbox only the names its list allows (forwarded
    upstream), opens the answer's addresses on the entry's ports, and refuses the rest
    at once without asking upstream."""
    from tests.conftest import running_stack

    netns.serve(netns.ns_ip, 8081)
    netns.serve(netns.ns_ip, 8082)
    upstream = DnsServer({"allowed.test": netns.ns_ip, "a.wild.test": netns.ns_ip, "denied.test": netns.ns_ip})
    try:
        async with running_stack(redis_url, prefix,
                                 worker_overrides={"net_dns_upstream": f"127.0.0.1:{upstream.port}"}) as stack:
            sb = await Sandbox.create(BASE_IMAGE, client=stack.client, cpu=0.25, memory_mb=256,
                                      network="egress", allow=["allowed.test:8081", "*.wild.test:8082"])
            try:
                # Nothing is open before the sandbox asks.
                assert not await _reaches(sb, netns.ns_ip, 8081)
                res = await sb.exec("python3", "-c", RESOLVE, "allowed.test", "denied.test", timeout=30)
                got = json.loads(res.stdout)
                assert got["allowed.test"] == netns.ns_ip, got
                assert got["denied.test"].startswith("error"), got
                assert got["denied.test s"] < 1.0, got
                assert "denied.test" not in upstream.asked
                # The answer opened its entry's port, and only that one.
                assert await _reaches(sb, "allowed.test", 8081)
                assert not await _reaches(sb, "allowed.test", 8082)
                # A name under a wildcard entry, with its own port.
                res = await sb.exec("python3", "-c", RESOLVE, "a.wild.test", timeout=30)
                assert json.loads(res.stdout)["a.wild.test"] == netns.ns_ip, res.stdout
                assert await _reaches(sb, "a.wild.test", 8082)
            finally:
                await sb.terminate()
    finally:
        upstream.close()


def _question(name: str, qtype: int = 1, *, edns: bool = False) -> bytes:
    head = struct.pack("!6H", 0x4242, 0x0100, 1, 0, 0, 1 if edns else 0)
    body = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", qtype, 1)
    return head + body + (b"\0" + struct.pack("!HHIH", 41, 1232, 0, 0) if edns else b"")


async def test_resolver_decides_by_the_sandbox_list() -> None:
    """The resolver's decisions without a network: allowed names go upstream and open
    their addresses first; others are NXDOMAIN with the reason; strangers are refused."""
    import ipaddress

    from hotbed.network import parse_entry
    from workers.runtimes.docker.dns import DnsPolicy, DnsResolver

    upstream = DnsServer({"ok.test": "10.9.8.7", "x.wild.test": "10.9.8.6"})
    admitted: list[tuple[str, list[str]]] = []

    async def admit(policy: DnsPolicy, name: str, addresses: list[str]) -> None:
        admitted.append((name, addresses))

    try:
        r = DnsResolver(gateway="172.29.0.1", subnet=ipaddress.ip_network("172.29.0.0/16"),
                        upstream=f"127.0.0.1:{upstream.port}", admit=admit)
        r.register("172.29.0.5", DnsPolicy(sandbox_id="sb", chain="HB-x", mode="egress",
                                           allows=[parse_entry("ok.test:443"), parse_entry("*.wild.test")]))

        def rcode(reply: bytes | None) -> int:
            assert reply is not None
            return reply[3] & 0xF

        assert rcode(await r.answer(_question("OK.test"), "172.29.0.5")) == 0
        assert rcode(await r.answer(_question("x.wild.test"), "172.29.0.5")) == 0
        assert admitted == [("ok.test", ["10.9.8.7"]), ("x.wild.test", ["10.9.8.6"])]
        # Asked again: nothing new to open.
        assert rcode(await r.answer(_question("ok.test"), "172.29.0.5")) == 0
        assert len(admitted) == 2
        denied = await r.answer(_question("evil.test", edns=True), "172.29.0.5")
        assert rcode(denied) == 3 and b"not in this sandbox's allow list" in (denied or b"")
        assert rcode(await r.answer(_question("wild.test"), "172.29.0.5")) == 3
        assert rcode(await r.answer(_question("ok.test"), "172.29.0.9")) == 5  # no sandbox there
        assert rcode(await r.answer(_question("ok.test", 28), "172.29.0.5")) == 0  # AAAA: empty
        assert upstream.asked == ["ok.test", "x.wild.test", "ok.test"]
        assert await r.answer(b"junk", "172.29.0.5") is None
    finally:
        upstream.close()


def test_pool_names_carry_the_claimed_network() -> None:
    from hotbed.protocol import NetworkPolicy, Resources
    from hotbed.templates import pool_name

    shape = Resources(cpu=1, memory_mb=512)
    names = {
        pool_name("t", shape),
        pool_name("t", shape, NetworkPolicy()),
        pool_name("t", shape, NetworkPolicy(mode="egress", allow=["a.test", "b.test"])),
        pool_name("t", shape, NetworkPolicy(mode="egress", allow=["a.test"])),
        pool_name("t", shape, NetworkPolicy(mode="open")),
    }
    assert len(names) == 5
    assert pool_name("t", shape) == "t:1c:512m"
    assert pool_name("t", shape, NetworkPolicy(mode="egress", allow=["b.test", "a.test"])) in names
