"""Scheduler settings: TOML file (``--config``) plus ``HOTBED_*`` overrides.

Variables: HOTBED_REDIS_URL, HOTBED_PREFIX, HOTBED_NAME (consumer name; default
host-pid), HOTBED_MAX_IN_FLIGHT, HOTBED_BATCH, HOTBED_HEARTBEAT_TTL_S,
HOTBED_RECLAIM_IDLE_S, HOTBED_REGISTRY_REFRESH_S, HOTBED_PLACEMENT (spread | pack),
HOTBED_GPU_WORKERS_FOR_CPU (true: CPU-only sandboxes may land on GPU workers even when
CPU-only workers have room), HOTBED_SHUTDOWN_GRACE_S, HOTBED_LOG_FORMAT,
HOTBED_LOG_LEVEL, HOTBED_METRICS_PORT (Prometheus endpoint; 0 = off),
HOTBED_METRICS_ADDR (default 127.0.0.1), HOTBED_POOL_REFILL_PER_S,
HOTBED_POOL_MAX_WARMING, HOTBED_POOL_INTERVAL_S (the warm pool controller),
HOTBED_IMAGE_REFRESH_S (how often the images workers advertise are re-read; placement
prefers a worker holding the sandbox's image). Registries and their logins are worker
settings (:mod:`workers.config`): the worker pulls.

Validated at load: unknown keys and bad values are one ConfigError line (exit code 2).
SIGHUP reloads :data:`RELOADABLE`; other fields need a restart.
"""

from __future__ import annotations

import os
import socket
from typing import Annotated, Literal

import msgspec

from daemon.config import check_common

Positive = Annotated[float, msgspec.Meta(gt=0)]


class SchedulerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "hotbed"
    name: str = ""
    # Requests handled at once (those waiting for capacity included).
    max_in_flight: Annotated[int, msgspec.Meta(ge=1)] = 1024
    batch: Annotated[int, msgspec.Meta(ge=1)] = 256
    heartbeat_ttl_s: Positive = 5.0
    reclaim_idle_s: Positive = 30.0
    registry_refresh_s: Positive = 0.5
    placement: Literal["spread", "pack"] = "spread"
    gpu_workers_for_cpu: bool = False
    shutdown_grace_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    metrics_addr: str = "127.0.0.1"
    # Warm pools: refills started per second over all pools (a burst of
    # claims cannot starve running sandboxes of CPU), refills in flight per pool, and
    # how often the pool controller looks.
    pool_refill_per_s: Positive = 20.0
    pool_max_warming: Annotated[int, msgspec.Meta(ge=1)] = 8
    pool_interval_s: Positive = 0.1
    image_refresh_s: Positive = 2.0

    def __post_init__(self) -> None:
        check_common(self.redis_url, self.prefix)

    def resolved_name(self) -> str:
        return self.name or f"{socket.gethostname()}-{os.getpid()}"


# Settings a running scheduler takes from a SIGHUP reload.
RELOADABLE = (
    "placement", "gpu_workers_for_cpu", "registry_refresh_s", "shutdown_grace_s",
    "log_format", "log_level",
    "pool_refill_per_s", "pool_max_warming", "pool_interval_s",
)
