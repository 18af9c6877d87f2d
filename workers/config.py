"""Worker settings: TOML file (``--config``) plus ``HOTBED_*`` overrides.

Variables: HOTBED_REDIS_URL, HOTBED_PREFIX, HOTBED_WORKER_ID, HOTBED_RUNTIME
(docker | runsc | sim | process), HOTBED_CPU, HOTBED_MEMORY_MB, HOTBED_MAX_CONCURRENCY,
HOTBED_OCI_RUNTIME, HOTBED_DEFAULT_USER, HOTBED_TAGS (JSON), HOTBED_HEARTBEAT_S,
HOTBED_RECONCILE_S, HOTBED_SHUTDOWN_GRACE_S, HOTBED_DRAIN_ON_STOP, HOTBED_LOG_FORMAT,
HOTBED_LOG_LEVEL, HOTBED_GPU_DETECT (auto | nvml | none), HOTBED_GPUS (JSON list of
``{uuid, model, memory_mb}``: declared GPUs instead of detection, for simulated fleets),
HOTBED_GPU_OCI_RUNTIME (the runsc runtime registered with ``--nvproxy``, used for GPU
sandboxes), HOTBED_PROCESS_ROOT (state directory of the unisolated ``process``
runtime), HOTBED_RUNSC (the runsc binary of the ``runsc`` runtime), HOTBED_RUNSC_ROOT
(its ``runsc --root``), HOTBED_RUNSC_DIR (its bundles, unpacked images and paused
sandboxes), HOTBED_IMAGE_DIR (image directories and tarballs it runs where no Docker
engine is), HOTBED_METRICS_PORT (Prometheus endpoint; 0 = off), HOTBED_METRICS_ADDR
(default 127.0.0.1), HOTBED_SNAPSHOT_DIR (memory snapshots kept on this node),
HOTBED_SNAPSHOT_STORE (where missing snapshots are copied from; default: the same),
HOTBED_PORT_BIND (the address exposed sandbox ports listen on; default 127.0.0.1),
HOTBED_PORT_HOST (the host clients are told for them; default: the bind address),
HOTBED_NET_OCI_RUNTIME (the runsc runtime of sandboxes with a network; default
runsc-net), HOTBED_NET_SUBNET (their bridge's subnet; default 172.29.0.0/16),
HOTBED_ALLOW_OPEN_NETWORK (false forbids network="open" on this node),
HOTBED_NET_DNS_UPSTREAM (where the sandboxes' resolver forwards allowed names,
``host[:port]``; default the host's first nameserver),
HOTBED_REGISTRIES (JSON list of registry hosts, ``host[:port]`` as image names spell
them, ``docker.io`` for Docker Hub, that missing images are pulled from; empty: never
pull), HOTBED_REGISTRY_AUTH (JSON ``{"HOST": {"username": ..., "password": ...}}``),
HOTBED_REGISTRY_AUTH_FILE (a Docker ``config.json``-shaped file of credentials, read
at each pull), HOTBED_IMAGE_REFRESH_S (how often the held images are re-advertised).
Credentials are never logged: settings print them as ``***``.

Validated at load (:func:`daemon.config.load_settings`): unknown keys and bad values
are one ConfigError line; the daemons exit with code 2 on it.
"""

from __future__ import annotations

import os
import socket
from typing import Annotated, Literal

import msgspec

from daemon.config import check_common
from hotbed.protocol import GpuDevice

Positive = Annotated[float, msgspec.Meta(gt=0)]


class RegistryCredential(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A login for one registry: ``username`` and ``password`` (or a token as password)."""

    username: str = ""
    password: str = ""

    def __repr__(self) -> str:
        # Settings end up in logs and error lines; the secret never does.
        return f"RegistryCredential(username={self.username!r}, password=***)"


def _default_memory_mb() -> int:
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4096
    # Leave a fifth of the host to dockerd, Redis and the daemons themselves.
    return int(pages * 0.8) >> 20


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "hotbed"
    worker_id: str = ""
    runtime: Literal["docker", "runsc", "sim", "process"] = "docker"
    # Capacity this node offers; defaults from the host.
    cpu: Annotated[float, msgspec.Meta(gt=0)] | None = None
    memory_mb: Annotated[int, msgspec.Meta(gt=0)] | None = None
    max_concurrency: Annotated[int, msgspec.Meta(ge=1)] = 32
    oci_runtime: str = "runsc"
    # Parent cgroup of this worker's sandboxes, weighed below the control plane
    # (scripts/host-setup.sh, docs/operations.md). "" = "/hotbed" under dockerd's
    # cgroupfs driver, "hotbed.slice" under its systemd driver.
    cgroup_parent: str = ""
    default_user: str = "1000:1000"
    tags: dict[str, str] = {}
    heartbeat_s: Positive = 1.0
    reconcile_s: Positive = 5.0
    shutdown_grace_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    # On SIGTERM: False leaves sandboxes running, to be adopted when the worker returns.
    drain_on_stop: bool = False
    log_format: Literal["text", "json"] = "text"
    # Where this node keeps memory snapshots, and the store it copies missing
    # ones from ("" = the same directory: one machine, or a shared file system).
    snapshot_dir: str = "/var/lib/hotbed/snapshots"
    snapshot_store: str = ""
    # Fleet operation: logging, GPUs, the process runtime's root, metrics.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    gpu_detect: Literal["auto", "nvml", "none"] = "auto"
    gpus: list[GpuDevice] = []
    gpu_oci_runtime: str = "runsc-nvproxy"
    process_root: str = "/var/lib/hotbed/process"
    # The "runsc" runtime (runsc driven directly, no dockerd): its binary, its state,
    # and where it finds images when there is no Docker engine on the node.
    runsc: str = "runsc"
    runsc_root: str = "/run/hotbed/runsc"
    runsc_dir: str = "/var/lib/hotbed/runsc"
    image_dir: str = "/var/lib/hotbed/images"
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    metrics_addr: str = "127.0.0.1"
    # Exposed sandbox ports (workers/ports.py): where they listen and the host clients
    # are told ("" = the bind address, or 127.0.0.1 for a wildcard bind).
    port_bind: str = "127.0.0.1"
    port_host: str = ""
    # Sandboxes with network "egress"/"open" (docs/operations.md, "Sandbox network").
    net_oci_runtime: str = "runsc-net"
    net_subnet: str = "172.29.0.0/16"
    allow_open_network: bool = True
    net_dns_upstream: str = ""
    # Images: registries missing images are pulled from, their logins, and how often
    # the images this node holds are re-advertised (also right after a pull).
    registries: list[str] = []
    registry_auth: dict[str, RegistryCredential] = {}
    registry_auth_file: str = ""
    image_refresh_s: Positive = 10.0

    def __post_init__(self) -> None:
        check_common(self.redis_url, self.prefix)
        if self.worker_id and any(c in self.worker_id for c in "{}: "):
            raise ValueError(f"worker_id {self.worker_id!r} must not contain braces, colons or spaces")
        uuids = [g.uuid for g in self.gpus]
        if len(set(uuids)) != len(uuids):
            raise ValueError("gpus: duplicate uuid")
        if any(not g.uuid or not g.model for g in self.gpus):
            raise ValueError("gpus: every GPU needs a uuid and a model")
        for host in [*self.registries, *self.registry_auth]:
            if not host or "/" in host or " " in host:
                raise ValueError(f"registry {host!r}: want a host[:port] as image names spell it")

    def resolved_id(self) -> str:
        return self.worker_id or socket.gethostname()

    def resolved_cpu_millis(self) -> int:
        return int((self.cpu or float(os.cpu_count() or 1)) * 1000)

    def resolved_memory_mb(self) -> int:
        return self.memory_mb or _default_memory_mb()


# Settings a running worker takes from a SIGHUP reload (tags are re-advertised).
RELOADABLE = ("tags", "heartbeat_s", "reconcile_s", "shutdown_grace_s", "drain_on_stop", "log_format", "log_level")
