"""Worker settings: TOML file (``--config``) plus ``HOTBED_*`` overrides.

Variables: HOTBED_REDIS_URL, HOTBED_PREFIX, HOTBED_WORKER_ID, HOTBED_RUNTIME
(docker | runsc | sim | process), HOTBED_CPU, HOTBED_MEMORY_MB, HOTBED_MAX_CONCURRENCY,
HOTBED_OCI_RUNTIME, HOTBED_DEFAULT_USER, HOTBED_TAGS (JSON), HOTBED_HEARTBEAT_S,
HOTBED_RECONCILE_S, HOTBED_SANDBOX_DISK_MB (host disk a sandbox's writes may hold; 0: no limit), HOTBED_DISK_CHECK_S,
HOTBED_SHUTDOWN_GRACE_S, HOTBED_DRAIN_ON_STOP, HOTBED_LOG_FORMAT,
HOTBED_LOG_LEVEL, HOTBED_GPU_DETECT (auto | nvml | none), HOTBED_GPUS (JSON list of
``{uuid, model, memory_mb}``: declared GPUs instead of detection, for simulated fleets),
HOTBED_GPU_OCI_RUNTIME (the runsc runtime registered with ``--nvproxy``, used for GPU
sandboxes), HOTBED_PROCESS_ROOT (state directory of the unisolated ``process``
runtime), HOTBED_RUNSC (the runsc binary of the ``runsc`` runtime), HOTBED_RUNSC_ROOT
(its ``runsc --root``), HOTBED_RUNSC_PLATFORM (its gVisor platform: systrap or ptrace), HOTBED_RUNSC_DIR (its bundles, unpacked images and paused
sandboxes), HOTBED_IMAGE_DIR (image directories and tarballs it runs where no Docker
engine is), HOTBED_METRICS_PORT (Prometheus endpoint; 0 = off), HOTBED_METRICS_ADDR
(default 127.0.0.1), HOTBED_SNAPSHOT_DIR (memory snapshots kept on this node),
HOTBED_SNAPSHOT_STORE (where missing snapshots are copied from; default: the same),
HOTBED_SNAPSHOT_SERVE (``HOST:PORT`` this node serves its snapshots to the other nodes
on; port 0 = any free one; empty: it serves none), HOTBED_SNAPSHOT_URL (the address
peers reach that endpoint by; default ``http://HOST:PORT``), HOTBED_SNAPSHOT_TOKEN (the
fleet's shared secret for it; default: one kept in Redis), HOTBED_SNAPSHOT_COPIES (live
nodes that should hold each template's snapshot: spare copies are made in the
background; default 2, 1 = none),
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
at each pull), HOTBED_IMAGE_REFRESH_S (how often the held images are re-advertised),
HOTBED_MAX_STARTS (starts and restores run at once; the rest wait in order),
HOTBED_START_QUEUE (starts that may wait; Overloaded past it), HOTBED_CPU_OVERCOMMIT
(CPU advertised per core: CPU is shared, not reserved), HOTBED_MEMORY_OVERCOMMIT
(requested memory advertised per MiB of ``memory_mb``, kept within the node's real
memory by the memory watch), HOTBED_MEMORY_HEADROOM_MB (real memory always left
free), HOTBED_MEMORY_PSI_LIMIT (memory stall percentage, PSI ``some avg10``, above
which nothing new is admitted and idle sandboxes are paused; 0 = ignore PSI).
docs/operations.md says how the defaults were measured.
HOTBED_AUTO_PAUSE_AFTER (seconds without a request after which a sandbox that did not
choose is checkpointed to disk; 0 = never), HOTBED_MEMORY_PRESSURE_MB (while the node's
MemAvailable is below this, the longest-idle sandboxes are paused; default 5 % of the
host's memory; 0 = off), HOTBED_MEMORY_PRESSURE_PSI (older name of
HOTBED_MEMORY_PSI_LIMIT; when set, it wins), HOTBED_AUTO_PAUSE_CHECK_S (how often
auto-pause checks).
Credentials are never logged: settings print them as ``***``.

Validated at load (:func:`daemon.config.load_settings`): unknown keys and bad values
are one ConfigError line; the daemons exit with code 2 on it.
"""

from __future__ import annotations

import os
import socket
from typing import Annotated, Literal

import msgspec

from daemon.config import check_common, redact_url
from hotbed.protocol import GpuDevice

Positive = Annotated[float, msgspec.Meta(gt=0)]

# Measured on a 2-core / 24 GiB node (docs/operations.md, "Admission and density";
# bench/results/node.json): restores per second stop growing past two in flight per
# core; 500 idle 1-CPU sandboxes on 2 cores kept exec p99 within 3x of a one-sandbox
# node's (an idle sandbox costs ~0.04 % of a core under ptrace); an idle hotbed/base
# sandbox costs the host ~43 MiB of its 512 (26 MiB in its cgroup).
STARTS_PER_CORE = 2
CPU_OVERCOMMIT = 250.0
MEMORY_OVERCOMMIT = 12.0

# Fields printed as ``***`` (a registry login masks its own password).
SECRET_FIELDS = frozenset({"snapshot_token"})


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
    # Admission (workers.admission): starts at once (None: STARTS_PER_CORE per core),
    # how many may wait, and the density ratios; measured defaults, docs/operations.md.
    max_starts: Annotated[int, msgspec.Meta(ge=1)] | None = None
    start_queue: Annotated[int, msgspec.Meta(ge=1)] = 1024
    # None: the measured defaults for gVisor sandboxes (docker, runsc) on capacity taken
    # from the host; 1 where ``cpu``/``memory_mb`` are declared, and for the simulated
    # and unisolated runtimes: declared capacity is offered exactly.
    cpu_overcommit: Annotated[float, msgspec.Meta(ge=1)] | None = None
    memory_overcommit: Annotated[float, msgspec.Meta(ge=1)] | None = None
    memory_headroom_mb: Annotated[int, msgspec.Meta(ge=0)] | None = None
    memory_psi_limit: Annotated[float, msgspec.Meta(ge=0, le=100)] = 10.0
    # gVisor's ptrace platform: an idle sandbox costs ~0.02 % of a core there against
    # ~4 % under systrap, and starts processes faster (docs/operations.md); "runsc"
    # (systrap) streams syscall-heavy output faster.
    oci_runtime: str = "runsc-ptrace"
    # Parent cgroup of this worker's sandboxes, weighed below the control plane
    # (scripts/host-setup.sh, docs/operations.md). "" = "/hotbed" under dockerd's
    # cgroupfs driver, "hotbed.slice" under its systemd driver.
    cgroup_parent: str = ""
    default_user: str = "1000:1000"
    tags: dict[str, str] = {}
    heartbeat_s: Positive = 1.0
    # The health check lists the node's containers every reconcile_s, or every
    # running/10 s where more run (workers.health); a sandbox whose guest channel
    # ends unasked is looked at at once.
    reconcile_s: Positive = 5.0
    # Host disk a sandbox's own writes may hold before it is ended (0: no limit): its
    # writes share the disk of Redis, dockerd and the snapshots. Checked every
    # disk_check_s, so a fast writer may pass it by what it writes in that time.
    sandbox_disk_mb: Annotated[int, msgspec.Meta(ge=0)] = 10240
    disk_check_s: Positive = 1.0
    shutdown_grace_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    # On SIGTERM: False leaves sandboxes running, to be adopted when the worker returns.
    drain_on_stop: bool = False
    log_format: Literal["text", "json"] = "text"
    # Where this node keeps memory snapshots, and the store it copies missing
    # ones from ("" = the same directory: one machine, or a shared file system).
    snapshot_dir: str = "/var/lib/hotbed/snapshots"
    snapshot_store: str = ""
    # The endpoint other nodes copy this node's snapshots from (workers.snapshot_peers).
    snapshot_serve: str = ""
    snapshot_url: str = ""
    snapshot_token: str = ""
    # Live nodes that should hold each template's snapshot (spare copies made in the
    # background; 1: none).
    snapshot_copies: Annotated[int, msgspec.Meta(ge=1)] = 2
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
    # Its gVisor platform (KVM is never used): the same trade-off as ``oci_runtime``'s
    # runsc-ptrace and runsc, with the same default, for density and faster resumes
    # (docs/operations.md). GPU sandboxes always run on systrap.
    runsc_platform: Literal["ptrace", "systrap"] = "ptrace"
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
    # Auto-pause (workers/autopause.py): the idle time after which a sandbox whose create
    # did not say is checkpointed to disk (0 = never); below this much MemAvailable, or
    # above ``memory_psi_limit``, idle sandboxes are paused, longest idle first, before
    # the kernel's OOM killer has to choose (0 = that line is off). Both lines are judged
    # by the one memory reader admission uses (workers.admission.NodeMemory).
    auto_pause_after: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    memory_pressure_mb: Annotated[int, msgspec.Meta(ge=0)] | None = None
    # The older name of ``memory_psi_limit``, from when auto-pause had a PSI line of its
    # own: when set, it is the one PSI limit.
    memory_pressure_psi: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None
    auto_pause_check_s: Positive = 1.0

    def __post_init__(self) -> None:
        check_common(self.redis_url, self.prefix)
        if self.worker_id and any(c in self.worker_id for c in "{}: "):
            raise ValueError(f"worker_id {self.worker_id!r} must not contain braces, colons or spaces")
        uuids = [g.uuid for g in self.gpus]
        if len(set(uuids)) != len(uuids):
            raise ValueError("gpus: duplicate uuid")
        if any(not g.uuid or not g.model for g in self.gpus):
            raise ValueError("gpus: every GPU needs a uuid and a model")
        if self.snapshot_serve:
            _host, sep, port = self.snapshot_serve.rpartition(":")
            if not sep or not port.isdigit() or int(port) > 65535:
                raise ValueError(f"snapshot_serve {self.snapshot_serve!r}: want HOST:PORT")
        if self.snapshot_url and not self.snapshot_url.startswith(("http://", "https://")):
            raise ValueError(f"snapshot_url {self.snapshot_url!r}: want an http:// URL")
        for host in [*self.registries, *self.registry_auth]:
            if not host or "/" in host or " " in host:
                raise ValueError(f"registry {host!r}: want a host[:port] as image names spell it")

    def __repr__(self) -> str:
        # Settings end up in logs and error lines; secrets never do.
        shown = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name == "redis_url":
                value = redact_url(value)
            elif name in SECRET_FIELDS and value:
                shown.append(f"{name}=***")
                continue
            shown.append(f"{name}={value!r}")
        return f"WorkerSettings({', '.join(shown)})"

    def resolved_id(self) -> str:
        return self.worker_id or socket.gethostname()

    def resolved_cpu_millis(self) -> int:
        """CPU this node offers: its cores (or ``cpu``) times ``cpu_overcommit``."""
        return int(self.physical_cpu() * self.resolved_cpu_overcommit() * 1000)

    def _measured(self) -> bool:
        return self.runtime in ("docker", "runsc")

    def resolved_cpu_overcommit(self) -> float:
        """An explicit ratio always applies; the measured default only to capacity
        taken from the host (a declared ``cpu`` is offered as declared)."""
        if self.cpu_overcommit is not None:
            return self.cpu_overcommit
        return CPU_OVERCOMMIT if self._measured() and self.cpu is None else 1.0

    def resolved_memory_overcommit(self) -> float:
        if self.memory_overcommit is not None:
            return self.memory_overcommit
        return MEMORY_OVERCOMMIT if self._measured() and self.memory_mb is None else 1.0

    def physical_cpu(self) -> float:
        return self.cpu or float(os.cpu_count() or 1)

    def resolved_memory_mb(self) -> int:
        """Memory requests this node takes: ``memory_mb`` times ``memory_overcommit``
        (the memory watch withholds what real memory cannot back)."""
        return int(self.physical_memory_mb() * self.resolved_memory_overcommit())

    def physical_memory_mb(self) -> int:
        return self.memory_mb or _default_memory_mb()

    def resolved_max_starts(self) -> int:
        return self.max_starts or max(1, int(self.physical_cpu() * STARTS_PER_CORE))

    def resolved_memory_headroom_mb(self) -> int:
        """Default: a tenth of the host's memory, at least 1 GiB. The host's, never a
        declared ``memory_mb``: a node declared larger than its RAM (capacity as a
        reservation count) would otherwise keep a headroom over all its real memory
        and admit nothing."""
        if self.memory_headroom_mb is not None:
            return self.memory_headroom_mb
        return max(1024, int(_default_memory_mb() / 0.8 * 0.1))

    def resolved_memory_psi_limit(self) -> float:
        if self.memory_pressure_psi is not None:
            return self.memory_pressure_psi
        return self.memory_psi_limit

    def resolved_memory_pressure_mb(self) -> int:
        """Default: 5 % of the host's memory, within 256 MiB .. 4 GiB."""
        if self.memory_pressure_mb is not None:
            return self.memory_pressure_mb
        return min(4096, max(256, _default_memory_mb() // 16))


# Settings a running worker takes from a SIGHUP reload (tags are re-advertised).
RELOADABLE = ("tags", "heartbeat_s", "reconcile_s", "sandbox_disk_mb", "disk_check_s", "shutdown_grace_s", "drain_on_stop", "log_format", "log_level")
