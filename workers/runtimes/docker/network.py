"""Sandbox networks on a docker node: the bridge, the host firewall, per-sandbox rules.

A sandbox with ``network="none"`` is exactly as before: runsc ``--network=none``, no
interface but loopback. One with ``"egress"`` or ``"open"`` runs under the
``net_oci_runtime`` dockerd runtime (``runsc-net``, scripts/host-setup.sh) on the
docker network ``hotbed-net`` (bridge ``hb-net0``, made here on first use), and
everything it sends is filtered on the host, outside the sandbox, where its code
cannot reach (docs/operations.md, "Sandbox network"):

* in the sandbox's network namespace (made by dockerd, entered from the host) its
  only route is the bridge's gateway, so even a neighbour on the bridge is reached
  through the host's FORWARD chain; and its port of the bridge is isolated
  (``bridge link ... isolated on``): frames between two sandboxes are not bridged,
  whatever routes one of them makes;
* ``HOTBED-FWD`` (FORWARD) and ``HOTBED-IN`` (INPUT, the node itself) let through
  replies, then each sandbox's own chain (``HB-<hash>``: its allow list, as
  address/port rules), then, for ``"open"``, ``HOTBED-OPEN`` (any address but private,
  shared, link-local, loopback and multicast ranges: not the node, other sandboxes or
  metadata services); everything else is rejected at once: a TCP reset (connection
  refused), an ICMP admin-prohibited for the rest. Nothing opens a connection into a
  sandbox (its ports are reached through the worker's tunnels);
* a domain in the allow list is resolved by the worker when the sandbox starts; its
  addresses are allowed and written to the sandbox's /etc/hosts. The sandbox's DNS
  server is the gateway, which answers nothing: there is no DNS channel out.

The rules of a sandbox are added once its container has an address and removed
before the container is destroyed, so an address that dockerd reuses never inherits
another sandbox's rules. Every firewall change is one ``iptables-restore`` batch.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
from typing import Any

import anyio
import msgspec
from aiodocker.exceptions import DockerError

from hotbed import network as policy_rules
from hotbed.errors import InvalidRequest, RuntimeFailure
from hotbed.network import Allow
from hotbed.protocol import NetworkPolicy
from workers.runtimes.base import LABEL_NETWORK

log = logging.getLogger(__name__)

DOCKER_NETWORK = "hotbed-net"
BRIDGE = "hb-net0"
FWD, INP, OPEN, SB_FWD, SB_IN = "HOTBED-FWD", "HOTBED-IN", "HOTBED-OPEN", "HOTBED-SB", "HOTBED-SBIN"
# Never reached in "open" mode unless listed (RFC 6890 special-purpose ranges).
BLOCKED = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4",
    "240.0.0.0/4",
)
TOOL_TIMEOUT_S = 30.0


def chain_name(sandbox_id: str) -> str:
    """The sandbox's own chain (iptables allows 28 characters)."""
    return "HB-" + hashlib.sha1(sandbox_id.encode()).hexdigest()[:20]


async def _run(argv: list[str], *, input: bytes | None = None, check: bool = True) -> tuple[int, str]:
    try:
        with anyio.fail_after(TOOL_TIMEOUT_S):
            res = await anyio.run_process(argv, input=input, check=False)
    except (OSError, TimeoutError) as exc:
        raise RuntimeFailure(f"{argv[0]} failed: {exc}") from None
    out = (res.stdout + res.stderr).decode(errors="replace")
    if check and res.returncode != 0:
        raise RuntimeFailure(f"{' '.join(argv[:3])} failed: {out.strip()[:500]}")
    return res.returncode, out


class SandboxNetworks:
    """The node's sandbox networking: what the container gets, and the firewall."""

    def __init__(
        self, *, oci_runtime: str = "runsc-net", subnet: str = "172.29.0.0/16",
        allow_open: bool = True,
    ) -> None:
        self.oci_runtime = oci_runtime
        self.subnet = ipaddress.ip_network(subnet)
        self.gateway = str(next(self.subnet.hosts()))
        self.allow_open = allow_open
        self._ready = False
        self._lock = anyio.Lock()
        # Whether this node has per-sandbox rules to remove at all (None: not looked).
        self._rules_exist: bool | None = None

    # ------------------------------------------------------------ node set-up

    async def ensure(self, docker: Any, runtimes: set[str]) -> None:
        """The docker network and the base rules, made once per worker (idempotent)."""
        if self._ready:
            return
        async with self._lock:
            if self._ready:
                return
            if self.oci_runtime not in runtimes:
                raise RuntimeFailure(
                    f"dockerd has no runtime {self.oci_runtime!r} for networked sandboxes; "
                    "run scripts/host-setup.sh"
                )
            await self._ensure_docker_network(docker)
            await self._ensure_rules()
            self._ready = self._rules_exist = True

    async def _ensure_docker_network(self, docker: Any) -> None:
        try:
            with anyio.fail_after(TOOL_TIMEOUT_S):
                await docker.networks.get(DOCKER_NETWORK)
            return
        except DockerError as exc:
            if exc.status != 404:
                raise RuntimeFailure(f"docker: {exc.message}") from None
        config = {
            "Name": DOCKER_NETWORK, "Driver": "bridge", "CheckDuplicate": True,
            "IPAM": {"Config": [{"Subnet": str(self.subnet), "Gateway": self.gateway}]},
            "Options": {
                "com.docker.network.bridge.name": BRIDGE,
                "com.docker.network.bridge.enable_ip_masquerade": "false",
                "com.docker.network.bridge.enable_icc": "false",
            },
            "Labels": {"dev.hotbed.managed": "1"},
        }
        try:
            with anyio.fail_after(TOOL_TIMEOUT_S):
                await docker.networks.create(config)
        except DockerError as exc:
            if exc.status != 409:  # another worker made it first
                raise RuntimeFailure(f"docker: cannot create network {DOCKER_NETWORK}: {exc.message}") from None

    async def _ensure_rules(self) -> None:
        for chain in (FWD, INP, OPEN, SB_FWD, SB_IN):
            await _run(["iptables", "-w", "-N", chain], check=False)
        reject = ["-p tcp -j REJECT --reject-with tcp-reset", "-j REJECT --reject-with icmp-admin-prohibited"]
        lines = [
            "*filter",
            # The static chains are rebuilt whole; the per-sandbox jumps live in
            # HOTBED-SB/HOTBED-SBIN, which this never flushes.
            f":{FWD} - [0:0]", f":{INP} - [0:0]", f":{OPEN} - [0:0]",
            f"-A {FWD} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            f"-A {FWD} -o {BRIDGE} {reject[0]}", f"-A {FWD} -o {BRIDGE} {reject[1]}",
            f"-A {FWD} -i {BRIDGE} -j {SB_FWD}",
            f"-A {FWD} -i {BRIDGE} {reject[0]}", f"-A {FWD} -i {BRIDGE} {reject[1]}",
            f"-A {INP} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            f"-A {INP} -j {SB_IN}",
            f"-A {INP} {reject[0]}", f"-A {INP} {reject[1]}",
            *(f"-A {OPEN} -d {net} -j RETURN" for net in BLOCKED),
            f"-A {OPEN} -j ACCEPT",
            "COMMIT",
        ]
        await _run(["iptables-restore", "-w", "5", "--noflush"], input="\n".join(lines).encode() + b"\n")
        for table, chain, rule in (
            ("filter", "FORWARD", ["-i", BRIDGE, "-j", FWD]),
            ("filter", "FORWARD", ["-o", BRIDGE, "-j", FWD]),
            ("filter", "INPUT", ["-i", BRIDGE, "-j", INP]),
            ("nat", "POSTROUTING", ["-s", str(self.subnet), "!", "-o", BRIDGE, "-j", "MASQUERADE"]),
        ):
            rc, _ = await _run(["iptables", "-w", "-t", table, "-C", chain, *rule], check=False)
            if rc != 0:
                where = ["-I", chain, "1"] if table == "filter" else ["-A", chain]
                await _run(["iptables", "-w", "-t", table, *where, *rule])

    # ------------------------------------------------------------ per sandbox

    def check(self, net: NetworkPolicy, *, sandbox_id: str) -> list[Allow]:
        """The parsed allow list, or InvalidRequest (a bad entry, "open" forbidden here)."""
        problems = policy_rules.problems(net)
        if net.mode == "open" and not self.allow_open:
            problems.append('network "open" is forbidden on this worker (allow_open_network)')
        if problems:
            raise InvalidRequest("; ".join(problems), sandbox_id=sandbox_id)
        return policy_rules.parse(net)

    async def resolve(self, allows: list[Allow], *, sandbox_id: str) -> dict[str, list[str]]:
        """Each allowed domain's IPv4 addresses, resolved now (pinned for the sandbox)."""
        out: dict[str, list[str]] = {}
        for a in allows:
            if not a.domain or a.domain in out:
                continue
            try:
                with anyio.fail_after(10):
                    infos = await anyio.getaddrinfo(a.domain, None, family=2)  # AF_INET
            except (OSError, TimeoutError) as exc:
                raise InvalidRequest(
                    f"allowed domain {a.domain!r} does not resolve: {exc}", sandbox_id=sandbox_id
                ) from None
            out[a.domain] = sorted({str(i[4][0]) for i in infos})
        return out

    def host_config(self, resolved: dict[str, list[str]]) -> dict[str, Any]:
        """What a networked sandbox's container gets instead of ``NetworkMode: none``."""
        return {
            "Runtime": self.oci_runtime,
            "NetworkMode": DOCKER_NETWORK,
            # The gateway answers no DNS (nothing listens): names come from /etc/hosts.
            "Dns": [self.gateway],
            "ExtraHosts": [f"{name}:{ip}" for name, ips in resolved.items() for ip in ips],
        }

    @staticmethod
    def label(net: NetworkPolicy) -> str:
        """The container label that keeps its policy (rules are rebuilt from it after a
        pause/resume or a worker restart)."""
        return msgspec.json.encode(net).decode()

    @staticmethod
    def from_labels(labels: dict[str, str]) -> NetworkPolicy:
        raw = labels.get(LABEL_NETWORK)
        if not raw:
            return NetworkPolicy()
        try:
            return msgspec.json.decode(raw, type=NetworkPolicy)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return NetworkPolicy()

    async def reapply(self, sandbox_id: str, info: dict[str, Any]) -> None:
        """Rules for a container started again (resume): its address may be new."""
        net = self.from_labels((info.get("Config") or {}).get("Labels") or {})
        if net.mode == "none":
            return
        allows = policy_rules.parse(net)
        await self.apply(sandbox_id, info, net, allows, await self.resolve(allows, sandbox_id=sandbox_id))

    async def apply(
        self, sandbox_id: str, info: dict[str, Any], net: NetworkPolicy,
        allows: list[Allow], resolved: dict[str, list[str]],
    ) -> None:
        """Route the started container through the gateway and install its rules."""
        settings = info.get("NetworkSettings") or {}
        endpoint = (settings.get("Networks") or {}).get(DOCKER_NETWORK) or {}
        ip = endpoint.get("IPAddress")
        netns = settings.get("SandboxKey")
        if not ip or not netns:
            raise RuntimeFailure(f"sandbox {sandbox_id} has no address on {DOCKER_NETWORK}", sandbox_id=sandbox_id)
        # Only the gateway is on-link: a neighbour on the bridge is reached through the
        # host's FORWARD chain (and refused there), not straight across the bridge.
        prefix = f"{self.subnet.network_address}/{self.subnet.prefixlen}"
        await _run(["nsenter", f"--net={netns}", "ip", "route", "del", prefix, "dev", "eth0"], check=False)
        await _run(["nsenter", f"--net={netns}", "ip", "route", "replace", self.gateway, "dev", "eth0", "scope", "link"])
        await _run(["nsenter", f"--net={netns}", "ip", "route", "replace", "default", "via", self.gateway, "dev", "eth0"])
        await self._isolate(sandbox_id, netns)
        chain = chain_name(sandbox_id)
        lines = ["*filter", f":{chain} - [0:0]"]
        for a in allows:
            nets = [a.network] if a.network else resolved.get(a.domain, [])
            for dest in nets:
                if a.all_ports:
                    lines.append(f"-A {chain} -d {dest} -j ACCEPT")
                else:
                    for proto in ("tcp", "udp"):
                        lines.append(f"-A {chain} -d {dest} -p {proto} --dport {a.ports} -j ACCEPT")
        lines.append(f"-A {SB_FWD} -s {ip}/32 -j {chain}")
        lines.append(f"-A {SB_IN} -s {ip}/32 -j {chain}")
        if net.mode == "open":
            lines.append(f"-A {SB_FWD} -s {ip}/32 -m comment --comment {chain} -j {OPEN}")
        lines.append("COMMIT")
        await self.remove(sandbox_id)
        await _run(["iptables-restore", "-w", "5", "--noflush"], input="\n".join(lines).encode() + b"\n")
        log.info("network %s: %s, %d rules", net.mode, ip, len(lines) - 3, extra={"sandbox_id": sandbox_id})

    async def _isolate(self, sandbox_id: str, netns: str) -> None:
        """Make the sandbox's port of the bridge an isolated one: frames between two
        isolated ports are not forwarded, so no sandbox reaches another across the
        bridge even with routes of its own making."""
        _, out = await _run(["nsenter", f"--net={netns}", "ip", "-o", "link", "show", "eth0"])
        peer = re.search(r"eth0@if(\d+)", out)
        port = None
        if peer:
            _, links = await _run(["ip", "-o", "link", "show", "master", BRIDGE])
            for line in links.splitlines():
                index, _, rest = line.partition(": ")
                if index.strip() == peer.group(1):
                    port = rest.split("@", 1)[0].split(":", 1)[0]
        if port is None:
            raise RuntimeFailure(f"cannot find sandbox {sandbox_id}'s port on {BRIDGE}", sandbox_id=sandbox_id)
        await _run(["bridge", "link", "set", "dev", port, "isolated", "on"])

    async def remove(self, sandbox_id: str) -> None:
        """Drop the sandbox's rules (none: nothing to do). A node that never had a
        networked sandbox learns so once, and runs nothing per sandbox after that."""
        if self._rules_exist is None:
            rc, _ = await _run(["iptables", "-w", "-S", SB_FWD], check=False)
            self._rules_exist = rc == 0
        if not self._rules_exist:
            return
        chain = chain_name(sandbox_id)
        rc, _ = await _run(["iptables", "-w", "-S", chain], check=False)
        if rc != 0:
            return
        lines = ["*filter"]
        for parent in (SB_FWD, SB_IN):
            _, out = await _run(["iptables", "-w", "-S", parent], check=False)
            for line in out.splitlines():
                if line.startswith(f"-A {parent} ") and chain in line.split():
                    lines.append("-D" + line[2:])
        lines += [f"-F {chain}", f"-X {chain}", "COMMIT"]
        await _run(["iptables-restore", "-w", "5", "--noflush"], input="\n".join(lines).encode() + b"\n")
