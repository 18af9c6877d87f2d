"""The node's DNS resolver for networked sandboxes: answers only the names a sandbox's
allow list names, and opens its firewall to the answer before the sandbox sees it.

A networked sandbox's resolv.conf names the bridge's gateway; this answers there
(UDP port 53). For a question from a sandbox's address it finds the sandbox's policy
(registered when its rules were installed, or looked up from its container's label
when another worker on this node made it), then:

* a name its allow list names (``pypi.org``, ``*.github.com``), or any name for an
  ``"open"`` sandbox: the question goes to the upstream resolver (``net_dns_upstream``;
  default the host's first ``nameserver``); the A records of the reply are added to
  the sandbox's chain, on the entry's ports (:meth:`SandboxNetworks.admit`), and then
  the reply is passed on unchanged. A name whose addresses change keeps working: each
  answer opens what it names. AAAA questions get an empty answer (sandboxes have no
  IPv6), so clients go straight to the A records;
* any other name: NXDOMAIN at once, with an Extended DNS Error "Blocked" (RFC 8914)
  naming the reason when the question carried EDNS, and a log line on the worker. A
  program sees "name not known" immediately, never a timeout;
* a question from an address that is no sandbox's: REFUSED.

DNS is thus no channel out: nothing but allowed names reaches the upstream resolver.
One resolver per node binds the port; a second worker on the same node waits and takes
over if the first one stops.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc

from hotbed.network import Allow

log = logging.getLogger(__name__)

PORT = 53
UPSTREAM_TIMEOUT_S = 3.0
# Questions answered at once; more wait for a slot (each holds one upstream socket).
MAX_IN_FLIGHT = 64
# Addresses one sandbox's answers may open (each is a firewall rule).
MAX_ADMITTED = 512
# How long a policy looked up from a container's label is trusted.
LOOKUP_TTL_S = 5.0
BIND_RETRY_S = 5.0

NOERROR, SERVFAIL, NXDOMAIN, REFUSED = 0, 2, 3, 5
TYPE_A, TYPE_AAAA, TYPE_OPT = 1, 28, 41
EDE_OPTION, EDE_BLOCKED = 15, 15


class DnsPolicy:
    """What the resolver needs to know of one sandbox."""

    def __init__(self, *, sandbox_id: str, chain: str, mode: str, allows: list[Allow]) -> None:
        self.sandbox_id = sandbox_id
        self.chain = chain
        self.mode = mode
        self.allows = allows
        self.admitted: set[tuple[str, str]] = set()  # (name, address) already in its chain
        self.expires = float("inf")

    def allows_name(self, name: str) -> bool:
        return self.mode == "open" or any(a.domain and a.matches(name) for a in self.allows)


class Query:
    """The parts of a DNS question this resolver looks at."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 12:
            raise ValueError("short packet")
        self.id, self.flags, qd, an, ns, ar = struct.unpack("!6H", data[:12])
        if self.flags & 0x8000 or qd != 1 or (self.flags >> 11) & 0xF:
            raise ValueError("not a standard query with one question")
        labels, off = [], 12
        while True:
            n = data[off]
            if n == 0:
                off += 1
                break
            if n & 0xC0:
                raise ValueError("compressed question")
            labels.append(data[off + 1: off + 1 + n].decode("ascii", "replace"))
            off += 1 + n
        self.qtype, _ = struct.unpack("!HH", data[off: off + 4])
        self.question = data[12: off + 4]
        self.name = ".".join(labels).lower().rstrip(".")
        self.edns = ar > 0 and TYPE_OPT in _record_types(data, off + 4, an + ns + ar)

    def reply(self, rcode: int, *, reason: str = "") -> bytes:
        flags = 0x8000 | (self.flags & 0x7900) | 0x0080 | rcode  # QR, opcode+RD kept, RA
        ar = 1 if self.edns else 0
        out = struct.pack("!6H", self.id, flags, 1, 0, 0, ar) + self.question
        if self.edns:
            text = reason.encode()[:200]
            option = struct.pack("!HHH", EDE_OPTION, 2 + len(text), EDE_BLOCKED) + text if reason else b""
            out += b"\x00" + struct.pack("!HHIH", TYPE_OPT, 1232, 0, len(option)) + option
        return out


def _skip_name(data: bytes, off: int) -> int:
    while True:
        n = data[off]
        if n == 0:
            return off + 1
        if n & 0xC0 == 0xC0:
            return off + 2
        off += 1 + n


def _record_types(data: bytes, off: int, count: int) -> list[int]:
    types = []
    for _ in range(count):
        off = _skip_name(data, off)
        rtype, _, _, length = struct.unpack("!HHIH", data[off: off + 10])
        types.append(rtype)
        off += 10 + length
    return types


def a_records(reply: bytes) -> list[str]:
    """The IPv4 addresses in a reply's answer section."""
    _, _, qd, an, _, _ = struct.unpack("!6H", reply[:12])
    off = 12
    for _ in range(qd):
        off = _skip_name(reply, off) + 4
    out = []
    for _ in range(an):
        off = _skip_name(reply, off)
        rtype, rclass, _, length = struct.unpack("!HHIH", reply[off: off + 10])
        off += 10
        if rtype == TYPE_A and rclass == 1 and length == 4:
            out.append(socket.inet_ntoa(reply[off: off + 4]))
        off += length
    return out


def host_upstream() -> str:
    """The host's first nameserver (blocking: a file read)."""
    try:
        with open("/etc/resolv.conf") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    return parts[1]
    except OSError:
        pass
    return "127.0.0.1"


def _split(upstream: str) -> tuple[str, int]:
    host, sep, port = upstream.rpartition(":")
    if sep and host and "]" not in port and host.count(":") == 0:
        return host, int(port)
    return upstream.strip("[]"), PORT


Admit = Callable[[DnsPolicy, str, list[str]], Awaitable[None]]
Lookup = Callable[[str], Awaitable["DnsPolicy | None"]]


class DnsResolver:
    def __init__(self, *, gateway: str, subnet: Any, upstream: str, admit: Admit) -> None:
        self.gateway = gateway
        self.subnet = subnet
        self.upstream = upstream
        self._admit = admit
        # Set by whoever can find a sandbox's policy by its address (the engine).
        self.lookup: Lookup | None = None
        self.bridge_ready = anyio.Event()
        self._by_ip: dict[str, DnsPolicy] = {}
        # A semaphore, not a limiter: the serving loop takes the slot, the answer's task
        # gives it back.
        self._slots = anyio.Semaphore(MAX_IN_FLIGHT)

    def register(self, ip: str, policy: DnsPolicy) -> None:
        self._by_ip[ip] = policy

    def forget(self, sandbox_id: str) -> None:
        for ip in [ip for ip, p in self._by_ip.items() if p.sandbox_id == sandbox_id]:
            del self._by_ip[ip]

    async def _policy(self, ip: str) -> DnsPolicy | None:
        policy = self._by_ip.get(ip)
        if policy is not None and policy.expires > anyio.current_time():
            return policy
        if self.lookup is None:
            return None
        policy = await self.lookup(ip)
        if policy is not None:
            policy.expires = anyio.current_time() + LOOKUP_TTL_S
            self._by_ip[ip] = policy
        return policy

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Answer on the gateway once the bridge exists (the first networked sandbox)."""
        task_status.started()
        await self.bridge_ready.wait()
        if not self.upstream:
            self.upstream = await anyio.to_thread.run_sync(host_upstream)
        while True:
            try:
                sock = await anyio.create_udp_socket(local_host=self.gateway, local_port=PORT)
            except OSError as exc:
                # Another worker on this node answers (it looks our sandboxes up by label).
                log.debug("dns: cannot bind %s:%d (%s); retrying", self.gateway, PORT, exc)
                await anyio.sleep(BIND_RETRY_S)
                continue
            log.info("dns: answering sandboxes on %s:%d, upstream %s", self.gateway, PORT, self.upstream)
            async with sock, anyio.create_task_group() as tg:
                async for data, (ip, port) in sock:
                    await self._slots.acquire()
                    tg.start_soon(self._answer, sock, data, ip, port)

    async def _answer(self, sock: anyio.abc.UDPSocket, data: bytes, ip: str, port: int) -> None:
        try:
            reply = await self.answer(data, ip)
            if reply:
                await sock.sendto(reply, ip, port)
        except Exception:  # one bad packet never ends the resolver
            log.exception("dns: answering %s failed", ip)
        finally:
            self._slots.release()

    async def answer(self, data: bytes, ip: str) -> bytes | None:
        """The reply to ``data`` from sandbox address ``ip`` (None: ignore it)."""
        try:
            q = Query(data)
        except (ValueError, IndexError, struct.error):
            return None
        if ipaddress.ip_address(ip) not in self.subnet:
            return q.reply(REFUSED)
        policy = await self._policy(ip)
        if policy is None:
            return q.reply(REFUSED)
        if not policy.allows_name(q.name):
            log.info("dns: %s is not in the allow list", q.name, extra={"sandbox_id": policy.sandbox_id})
            return q.reply(NXDOMAIN, reason=f"hotbed: {q.name} is not in this sandbox's allow list")
        if q.qtype == TYPE_AAAA:
            return q.reply(NOERROR)
        try:
            reply = await self._ask_upstream(data)
        except (OSError, TimeoutError) as exc:
            log.warning("dns: upstream %s: %s", self.upstream, exc)
            return q.reply(SERVFAIL)
        if len(reply) < 12 or reply[:2] != data[:2]:
            return q.reply(SERVFAIL)
        listed = any(a.domain and a.matches(q.name) for a in policy.allows)
        new = [a for a in a_records(reply) if (q.name, a) not in policy.admitted] if listed else []
        if new:
            if len(policy.admitted) + len(new) > MAX_ADMITTED:
                return q.reply(REFUSED)
            await self._admit(policy, q.name, new)
            policy.admitted.update((q.name, a) for a in new)
        return reply

    async def _ask_upstream(self, data: bytes) -> bytes:
        host, port = _split(self.upstream)
        with anyio.fail_after(UPSTREAM_TIMEOUT_S):
            async with await anyio.create_connected_udp_socket(host, port) as up:
                await up.send(data)
                return await up.receive()
