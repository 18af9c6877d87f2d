"""Worker settings: TOML file (``--config``) plus ``HOTBED_*`` overrides.

Variables: HOTBED_REDIS_URL, HOTBED_PREFIX, HOTBED_WORKER_ID, HOTBED_RUNTIME
(docker | sim | process), HOTBED_CPU, HOTBED_MEMORY_MB, HOTBED_MAX_CONCURRENCY,
HOTBED_OCI_RUNTIME, HOTBED_DEFAULT_USER, HOTBED_TAGS (JSON), HOTBED_HEARTBEAT_S,
HOTBED_RECONCILE_S, HOTBED_SHUTDOWN_GRACE_S, HOTBED_DRAIN_ON_STOP, HOTBED_LOG_FORMAT.
"""

from __future__ import annotations

import os
import socket
from typing import Annotated, Literal

import msgspec

Positive = Annotated[float, msgspec.Meta(gt=0)]


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
    runtime: Literal["docker", "sim", "process"] = "docker"
    # Capacity this node offers; defaults from the host.
    cpu: Annotated[float, msgspec.Meta(gt=0)] | None = None
    memory_mb: Annotated[int, msgspec.Meta(gt=0)] | None = None
    max_concurrency: Annotated[int, msgspec.Meta(ge=1)] = 32
    oci_runtime: str = "runsc"
    default_user: str = "1000:1000"
    tags: dict[str, str] = {}
    heartbeat_s: Positive = 1.0
    reconcile_s: Positive = 5.0
    shutdown_grace_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    # On SIGTERM: False leaves sandboxes running, to be adopted when the worker returns.
    drain_on_stop: bool = False
    log_format: Literal["text", "json"] = "text"

    def resolved_id(self) -> str:
        return self.worker_id or socket.gethostname()

    def resolved_cpu_millis(self) -> int:
        return int((self.cpu or float(os.cpu_count() or 1)) * 1000)

    def resolved_memory_mb(self) -> int:
        return self.memory_mb or _default_memory_mb()
