"""The OCI runtime spec (``config.json``) of a sandbox and of one command in it.

Pure functions of their arguments, so what runsc is told is unit-tested without runsc.
The limits are the docker runtime's (:mod:`workers.runtimes.docker.lifecycle`): CPU
quota, memory with no swap on top, a pids limit, no new privileges, no network (runsc
runs with ``--network=none``), a writable root (gVisor's overlay keeps writes in the
sandbox), Docker's default capabilities for root and none for other users.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec

from hotbed.protocol import Resources

OCI_VERSION = "1.0.2"
CPU_PERIOD_US = 100_000
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Docker's default capability set: what a root process in a docker sandbox holds.
DEFAULT_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]

# What gVisor itself provides in every sandbox (it never touches the host's).
BASE_MOUNTS: list[dict[str, Any]] = [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
]


class ImageConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What an image says about how to run it (Docker's ``Config``, the parts used)."""

    env: list[str] = []
    cmd: list[str] = []
    workdir: str = ""
    user: str = ""


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """A user as the OCI spec wants it, and its home directory."""

    uid: int
    gid: int
    gids: list[int] = []
    home: str = "/"


class GpuSetup(msgspec.Struct, frozen=True, kw_only=True):
    """What a sandbox gets for its GPUs: device nodes, read-only driver files, env."""

    devices: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    env: dict[str, str] = {}


def _passwd(rootfs: Path, name: str) -> list[list[str]]:
    try:
        lines = (rootfs / "etc" / name).read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line.split(":") for line in lines if line and not line.startswith("#")]


def resolve_user(rootfs: Path, user: str) -> Identity:
    """``user`` ("name", "uid", "uid:gid", "name:group") against the image's
    ``/etc/passwd`` and ``/etc/group``; numeric ids need no entry. Blocking (reads files).

    Raises ValueError for a name the image does not know."""
    name, _, group = (user or "0").partition(":")
    passwd = _passwd(rootfs, "passwd")
    entry = next(
        (p for p in passwd if len(p) >= 4 and (p[0] == name or (name.isdigit() and p[2] == name))), None
    )
    if name.isdigit():
        uid = int(name)
    elif entry is not None:
        uid = int(entry[2])
    else:
        raise ValueError(f"user {name!r} is not in the image's /etc/passwd")
    home = entry[5] if entry is not None and len(entry) >= 6 and entry[5] else "/"
    groups = _passwd(rootfs, "group")
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            found = next((g for g in groups if len(g) >= 3 and g[0] == group), None)
            if found is None:
                raise ValueError(f"group {group!r} is not in the image's /etc/group")
            gid = int(found[2])
    else:
        gid = int(entry[3]) if entry is not None else uid if name.isdigit() and uid else 0
    gids = sorted({
        int(g[2]) for g in groups
        if len(g) >= 4 and entry is not None and entry[0] in g[3].split(",") and int(g[2]) != gid
    })
    return Identity(uid=uid, gid=gid, gids=gids, home=home)


def merge_env(*layers: list[str] | dict[str, str], home: str = "/") -> list[str]:
    """``KEY=value`` entries, later layers winning; PATH and HOME get Docker's defaults."""
    out: dict[str, str] = {}
    for layer in layers:
        items = layer.items() if isinstance(layer, dict) else (e.partition("=")[::2] for e in layer)
        for k, v in items:
            if k:
                out[k] = v
    out.setdefault("PATH", DEFAULT_PATH)
    out.setdefault("HOME", home)
    return [f"{k}={v}" for k, v in out.items()]


def process(
    args: list[str], *, env: list[str], cwd: str, ident: Identity, terminal: bool = False
) -> dict[str, Any]:
    """The ``process`` object: the sandbox's main process, or one ``runsc exec``."""
    caps = DEFAULT_CAPS if ident.uid == 0 else []
    return {
        "terminal": terminal,
        "user": {"uid": ident.uid, "gid": ident.gid, "additionalGids": list(ident.gids)},
        "args": list(args),
        "env": list(env),
        "cwd": cwd or "/",
        "capabilities": {
            "bounding": list(DEFAULT_CAPS), "effective": list(caps), "permitted": list(caps),
        },
        "noNewPrivileges": True,
    }


def cgroups_path(parent: str, sandbox_id: str) -> str:
    """The sandbox's cgroup under the hotbed parent (a path, cgroupfs style: runsc
    creates it and removes it with the sandbox)."""
    return "/" + "/".join(p for p in (parent.strip("/"), f"hotbed-{sandbox_id}") if p)


def sandbox_spec(
    *,
    rootfs: Path,
    args: list[str],
    env: list[str],
    cwd: str,
    ident: Identity,
    hostname: str,
    annotations: dict[str, str],
    cgroup: str,
    resources: Resources,
    gpu: GpuSetup | None = None,
) -> dict[str, Any]:
    """The bundle's ``config.json`` for one sandbox."""
    proc = process(args, env=merge_env(env, gpu.env if gpu else {}, home=ident.home), cwd=cwd, ident=ident)
    mounts = [dict(m) for m in BASE_MOUNTS]
    devices: list[dict[str, Any]] = []
    if gpu is not None:
        mounts += [dict(m) for m in gpu.mounts]
        devices = [dict(d) for d in gpu.devices]
    memory = resources.memory_mb << 20
    return {
        "ociVersion": OCI_VERSION,
        "process": proc,
        "root": {"path": os.fspath(rootfs), "readonly": False},
        "hostname": hostname[:63],
        "mounts": mounts,
        "annotations": dict(annotations),
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "cgroupsPath": cgroup,
            "resources": {
                "cpu": {"quota": int(resources.cpu * CPU_PERIOD_US), "period": CPU_PERIOD_US},
                "memory": {"limit": memory, "swap": memory},
                "pids": {"limit": resources.pids},
            },
            "devices": devices,
            "maskedPaths": [],
            "readonlyPaths": [],
        },
    }
