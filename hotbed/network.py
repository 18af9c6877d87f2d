"""A sandbox's network policy, parsed: what ``NetworkPolicy.allow`` entries mean.

Entries (``protocol.NetworkPolicy.allow``)::

    10.1.2.3            one address, every port
    10.1.0.0/16         a network (CIDR), every port
    10.1.2.3:443        one port
    10.1.0.0/16:8000-8099   a port range
    pypi.org            a domain, every port
    pypi.org:443        a domain, one port
    *.github.com:443    every name under github.com (not github.com itself), one port

A domain entry allows the addresses the node's resolver gives the sandbox for that
name, as it answers (workers/runtimes/docker/dns.py): the sandbox asks the resolver,
and only names its list allows are answered. Checked by the scheduler and again by the
worker (:func:`problems`); the worker's firewall takes the parsed :class:`Allow` rules
(:func:`parse`). IPv4 only: sandboxes have no IPv6 address.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re

import msgspec

from hotbed.protocol import NetworkPolicy

MAX_ALLOW = 64
_DOMAIN = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


class Allow(msgspec.Struct, frozen=True, kw_only=True):
    """One allowed destination: a network or a domain, and a port range."""

    network: str = ""  # "10.1.0.0/16"
    domain: str = ""
    first_port: int = 1
    last_port: int = 65535

    @property
    def ports(self) -> str:
        """iptables' ``--dport`` form."""
        return str(self.first_port) if self.first_port == self.last_port else f"{self.first_port}:{self.last_port}"

    @property
    def all_ports(self) -> bool:
        return (self.first_port, self.last_port) == (1, 65535)

    def matches(self, name: str) -> bool:
        """Whether this domain entry allows ``name`` (lower case, no trailing dot)."""
        if self.domain.startswith("*."):
            return name.endswith(self.domain[1:])
        return bool(self.domain) and name == self.domain


def _ports(text: str, entry: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        first, last = int(lo), int(hi) if sep else int(lo)
    except ValueError:
        raise ValueError(f"bad port in allow entry {entry!r}") from None
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"ports must be in 1-65535 in allow entry {entry!r}")
    return first, last


def parse_entry(entry: str) -> Allow:
    """One ``allow`` entry; ValueError says what is wrong with it."""
    if not isinstance(entry, str) or not entry or len(entry) > 300:
        raise ValueError(f"bad allow entry {entry!r}")
    host, sep, port_text = entry.rpartition(":") if ":" in entry else (entry, "", "")
    first, last = _ports(port_text, entry) if sep else (1, 65535)
    try:
        net = ipaddress.ip_network(host, strict=False)
    except ValueError:
        net = None
    if net is not None:
        if net.version != 4:
            raise ValueError(f"allow entry {entry!r}: only IPv4 is supported")
        return Allow(network=str(net), first_port=first, last_port=last)
    name = host[2:] if host.startswith("*.") else host
    if not _DOMAIN.fullmatch(name) or "." not in name.rstrip("."):
        raise ValueError(f"bad allow entry {entry!r}: not an address, CIDR or domain name")
    prefix = "*." if host.startswith("*.") else ""
    return Allow(domain=prefix + name.lower().rstrip("."), first_port=first, last_port=last)


def parse(policy: NetworkPolicy) -> list[Allow]:
    return [parse_entry(e) for e in policy.allow]


def problems(policy: NetworkPolicy | None) -> list[str]:
    """Everything wrong with a network policy."""
    if policy is None:
        return []
    out = []
    if policy.mode not in ("none", "egress", "open"):
        out.append(f"network must be none, egress or open, got {policy.mode!r}")
    if policy.mode == "none" and policy.allow:
        out.append('an allow list needs network="egress" (or "open")')
    if len(policy.allow) > MAX_ALLOW:
        out.append(f"at most {MAX_ALLOW} allow entries, got {len(policy.allow)}")
    for entry in policy.allow[:MAX_ALLOW]:
        try:
            parse_entry(entry)
        except ValueError as exc:
            out.append(str(exc))
    return out


def of(policy: NetworkPolicy | None) -> NetworkPolicy:
    """A spec's network: None (nothing stated) is no network."""
    return policy if policy is not None else NetworkPolicy()


def pool_key(policy: NetworkPolicy | None) -> str:
    """The part of a warm pool's name that its claims' network must match: "" when
    the claim states none (the template's own network), else the mode and a digest of
    the allow list, so a claim never gets a sandbox with another network."""
    if policy is None:
        return ""
    if not policy.allow:
        return policy.mode
    digest = hashlib.sha1("\n".join(sorted(policy.allow)).encode()).hexdigest()[:10]
    return f"{policy.mode}-{digest}"


def restore_problem(template: str, built: NetworkPolicy, stated: NetworkPolicy | None) -> str:
    """Why a snapshot of ``template`` (taken with network ``built``) cannot be restored
    into a sandbox with network ``stated``, or "". Across modes with a network (egress,
    open, any allow list) it can; between none and a network it cannot: gVisor restores
    a sandbox only with the files it had mounted, and dockerd mounts /etc/hosts and
    the node's /etc/resolv.conf into networked containers only."""
    if stated is None or (built.mode == "none") == (stated.mode == "none"):
        return ""
    had = "without" if built.mode == "none" else "with"
    need = "none" if built.mode == "none" else "one"
    return (
        f"template {template!r} was snapshotted {had} a network, so its sandboxes must have "
        f"{need} (got network={stated.mode!r}); build a template with the network they need"
    )
