"""Sandbox networks on a docker node: the bridge, the host firewall, per-sandbox rules.

A sandbox with ``network="none"`` is exactly as before: runsc ``--network=none``, no
interface but loopback. One with ``"egress"`` or ``"open"`` runs under the
``net_oci_runtime`` dockerd runtime (``runsc-net``: gVisor's own network stack,
scripts/host-setup.sh) on the docker network ``hotbed-net`` (bridge ``hb-net0``, made
here on first use), and everything it sends is filtered on the host, outside the
sandbox, where its code cannot reach (docs/operations.md, "Sandbox network"):

* its port of the bridge is isolated (``bridge link ... isolated on``): frames between
  two sandboxes are not bridged, so a neighbour is reached, if at all, through the
  host's FORWARD chain; it has no CAP_NET_ADMIN or CAP_NET_RAW, so it cannot take
  another address (the rules below match on its own);
* ``HOTBED-FWD`` (FORWARD) and ``HOTBED-IN`` (INPUT, the node itself) let through
  replies, then each sandbox's own chain (``HB-<hash>``: its allow list, as
  address/port rules, and the node's resolver), then, for ``"open"``, ``HOTBED-OPEN``
  (any address but private, shared, link-local, loopback and multicast ranges: not the
  node, other sandboxes or metadata services); everything else is rejected at once: a
  TCP reset (connection refused), an ICMP admin-prohibited for the rest. Nothing opens
  a connection into a sandbox (its ports are reached through the worker's tunnels);
* its DNS server is the bridge's gateway, where the node's resolver
  (:mod:`workers.runtimes.docker.dns`) answers only the names its allow list names and
  adds each answer's addresses to its chain before the sandbox sees them.

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
from workers.runtimes.base import LABEL_NETWORK, LABEL_SANDBOX
from workers.runtimes.docker.dns import DnsPolicy, DnsResolver

log = logging.getLogger(__name__)

DOCKER_NETWORK = "hotbed-net"
BRIDGE = "hb-net0"
FWD, INP, OPEN, SB_FWD, SB_IN = "HOTBED-FWD", "HOTBED-IN", "HOTBED-OPEN", "HOTBED-SB", "HOTBED-SBIN"
CHAIN_PREFIX = "HB-"
# Never reached in "open" mode unless listed (RFC 6890 special-purpose ranges).
BLOCKED = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4",
    "240.0.0.0/4",
)
TOOL_TIMEOUT_S = 30.0
# What a networked sandbox's /etc/resolv.conf is (read-only): the gateway's resolver.
RESOLV_CONF = "/run/hotbed/net/resolv.conf"


def allow_rules(chain: str, dest: str, a: Allow) -> list[str]:
    """``iptables-restore`` lines that let ``chain``'s sandbox reach ``dest`` on ``a``'s ports."""
    if a.all_ports:
        return [f"-A {chain} -d {dest} -j ACCEPT"]
    return [f"-A {chain} -d {dest} -p {proto} --dport {a.ports} -j ACCEPT" for proto in ("tcp", "udp")]


def chain_name(sandbox_id: str) -> str:
    """The sandbox's own chain (iptables allows 28 characters)."""
    return CHAIN_PREFIX + hashlib.sha1(sandbox_id.encode()).hexdigest()[:20]


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
        allow_open: bool = True, dns_upstream: str = "",
    ) -> None:
        self.oci_runtime = oci_runtime
        self.subnet = ipaddress.ip_network(subnet)
        self.gateway = str(next(self.subnet.hosts()))
        self.allow_open = allow_open
        self._ready = False
        self._lock = anyio.Lock()
        # The node's resolver for its sandboxes (served by serve_dns once the bridge exists).
        self.dns = DnsResolver(gateway=self.gateway, subnet=self.subnet, upstream=dns_upstream, admit=self.admit)
        self.dns.lookup = self.lookup
        self._docker: Any = None
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
            self._docker = docker
            await self._ensure_forwarding()
            await self._ensure_resolv_conf()
            await self._ensure_rules()
            self._ready = self._rules_exist = True
            self.dns.bridge_ready.set()

    async def _ensure_forwarding(self) -> None:
        """The host routes for its sandboxes (dockerd, with "iptables": false, leaves
        ip_forward as it is); the rules here decide what it forwards from the bridge.
        The bridge answers ARP for every address on it (proxy ARP across its isolated
        ports): a sandbox's packets to a neighbour come to the host, whose rules refuse
        them at once, instead of an ARP query nobody answers (a 3 s "no route")."""
        conf = f"/proc/sys/net/ipv4/conf/{BRIDGE}"
        for path, value in (
            ("/proc/sys/net/ipv4/ip_forward", "1"), (f"{conf}/proxy_arp", "1"),
            (f"{conf}/proxy_arp_pvlan", "1"), (f"{conf}/send_redirects", "0"),
        ):
            p = anyio.Path(path)
            try:
                if (await p.read_text()).strip() != value:
                    await p.write_text(value + "\n")
            except OSError as exc:
                raise RuntimeFailure(f"cannot set {path}: {exc}") from None

    async def _ensure_resolv_conf(self) -> None:
        text = f"nameserver {self.gateway}\noptions timeout:2 attempts:2\n"
        path = anyio.Path(RESOLV_CONF)
        try:
            await path.parent.mkdir(parents=True, exist_ok=True)
            if not await path.exists() or await path.read_text() != text:
                await path.write_text(text)
        except OSError as exc:
            raise RuntimeFailure(f"cannot write {RESOLV_CONF}: {exc}") from None

    async def lookup(self, ip: str) -> DnsPolicy | None:
        """The policy of the sandbox at ``ip`` from its container's label (one another
        worker of this node started, or one adopted after a restart)."""
        if self._docker is None:
            return None
        try:
            with anyio.fail_after(TOOL_TIMEOUT_S):
                net = await self._docker.networks.get(DOCKER_NETWORK)
                for cid, c in ((await net.show()).get("Containers") or {}).items():
                    if str(c.get("IPv4Address", "")).split("/")[0] == ip:
                        info = await self._docker.containers.container(cid).show()
                        break
                else:
                    return None
        except (DockerError, TimeoutError):
            return None
        labels = (info.get("Config") or {}).get("Labels") or {}
        sid = labels.get(LABEL_SANDBOX, "")
        policy = self.from_labels(labels)
        if not sid or policy.mode == "none":
            return None
        return DnsPolicy(sandbox_id=sid, chain=chain_name(sid), mode=policy.mode, allows=policy_rules.parse(policy))

    async def admit(self, policy: DnsPolicy, name: str, addresses: list[str]) -> None:
        """Let ``policy``'s sandbox reach what the resolver just told it ``name`` is,
        on the ports of the entries that allowed the name (before it hears the answer)."""
        lines = ["*filter"]
        for a in policy.allows:
            if a.domain and a.matches(name):
                for ip in addresses:
                    lines += allow_rules(policy.chain, f"{ip}/32", a)
        if len(lines) > 1:
            lines.append("COMMIT")
            await _run(["iptables-restore", "-w", "5", "--noflush"], input="\n".join(lines).encode() + b"\n")

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

    def host_config(self) -> dict[str, Any]:
        """What a networked sandbox's container gets instead of ``NetworkMode: none``."""
        return {
            "Runtime": self.oci_runtime,
            "NetworkMode": DOCKER_NETWORK,
            # The node's resolver, on the gateway (workers/runtimes/docker/dns.py), named
            # in a resolv.conf of ours: dockerd's names its embedded resolver
            # (127.0.0.11), which its rules in the namespace reach only from the
            # kernel's stack, not from gVisor's.
            "Dns": [self.gateway],
            "Binds": [f"{RESOLV_CONF}:/etc/resolv.conf:ro"],
            # Neither another address (NET_ADMIN) nor forged packets (NET_RAW): the
            # host's rules know a sandbox by its address.
            "CapDrop": ["NET_ADMIN", "NET_RAW"],
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
        """Rules for a container started again (resume, a snapshot's restart): its
        address may be new, its policy is in its label."""
        net = self.from_labels((info.get("Config") or {}).get("Labels") or {})
        if net.mode == "none":
            return
        await self.apply(sandbox_id, info, net, policy_rules.parse(net))

    async def apply(self, sandbox_id: str, info: dict[str, Any], net: NetworkPolicy, allows: list[Allow]) -> None:
        """Isolate the started container's port of the bridge and install its rules."""
        settings = info.get("NetworkSettings") or {}
        endpoint = (settings.get("Networks") or {}).get(DOCKER_NETWORK) or {}
        ip = endpoint.get("IPAddress")
        netns = settings.get("SandboxKey")
        if not ip or not netns:
            raise RuntimeFailure(f"sandbox {sandbox_id} has no address on {DOCKER_NETWORK}", sandbox_id=sandbox_id)
        await self._isolate(sandbox_id, netns)
        chain = chain_name(sandbox_id)
        lines = ["*filter", f":{chain} - [0:0]"]
        # Its questions to the node's resolver; a domain's addresses are added as the
        # resolver answers them (DnsPolicy.admit).
        for proto in ("udp", "tcp"):
            lines.append(f"-A {chain} -d {self.gateway}/32 -p {proto} --dport 53 -j ACCEPT")
        for a in allows:
            if a.network:
                lines += allow_rules(chain, a.network, a)
        lines.append(f"-A {SB_FWD} -s {ip}/32 -j {chain}")
        lines.append(f"-A {SB_IN} -s {ip}/32 -j {chain}")
        if net.mode == "open":
            lines.append(f"-A {SB_FWD} -s {ip}/32 -m comment --comment {chain} -j {OPEN}")
        lines.append("COMMIT")
        await self.remove(sandbox_id, address=ip)
        await _run(["iptables-restore", "-w", "5", "--noflush"], input="\n".join(lines).encode() + b"\n")
        self.dns.register(ip, DnsPolicy(sandbox_id=sandbox_id, chain=chain, mode=net.mode, allows=allows))
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

    async def remove(self, sandbox_id: str, *, address: str | None = None) -> None:
        """Drop the sandbox's rules (none: nothing to do), and with ``address`` every
        other chain still hooked to that address: rules left by a sandbox that ended
        without this (its worker killed, its container removed behind hotbed's back)
        must not open anything to the next sandbox dockerd gives the address. A node
        that never had a networked sandbox learns so once, and runs nothing per
        sandbox after that."""
        if self._rules_exist is None:
            rc, _ = await _run(["iptables", "-w", "-S", SB_FWD], check=False)
            self._rules_exist = rc == 0
        if not self._rules_exist:
            return
        self.dns.forget(sandbox_id)
        own = chain_name(sandbox_id)
        if address is None and (await _run(["iptables", "-w", "-S", own], check=False))[0] != 0:
            return  # a sandbox without a network: one call
        # Two removals of one sandbox may race (a terminate, and the health check
        # removing a container it found nobody holding): the batch that lost finds a
        # chain gone under it. Read the rules again and finish what is left.
        try:
            await self._remove_rules(own, address)
        except RuntimeFailure:
            await self._remove_rules(own, address)

    async def _remove_rules(self, own: str, address: str | None) -> None:
        chains = {own}
        rules = []
        for parent in (SB_FWD, SB_IN):
            _, out = await _run(["iptables", "-w", "-S", parent], check=False)
            rules += [line.split() for line in out.splitlines() if line.startswith(f"-A {parent} ")]
        if address is not None:
            for words in rules:
                if f"{address}/32" in words:
                    chains.update(w for w in words if w.startswith(CHAIN_PREFIX))
        lines = ["*filter", *(" ".join(["-D", *words[1:]]) for words in rules if chains.intersection(words))]
        for chain in sorted(chains):
            rc, _ = await _run(["iptables", "-w", "-S", chain], check=False)
            if rc == 0:
                lines += [f"-F {chain}", f"-X {chain}"]
        if len(lines) == 1:
            return
        lines.append("COMMIT")
        await _run(["iptables-restore", "-w", "5", "--noflush"], input="\n".join(lines).encode() + b"\n")
