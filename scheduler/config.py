"""Scheduler settings: TOML file (``--config``) plus ``HOTBED_*`` overrides.

Variables: HOTBED_REDIS_URL, HOTBED_PREFIX, HOTBED_NAME (consumer name; default
host-pid), HOTBED_MAX_IN_FLIGHT, HOTBED_BATCH, HOTBED_HEARTBEAT_TTL_S,
HOTBED_RECLAIM_IDLE_S, HOTBED_REGISTRY_REFRESH_S, HOTBED_PLACEMENT (spread | pack),
HOTBED_GPU_WORKERS_FOR_CPU (true: CPU-only sandboxes may land on GPU workers even when
CPU-only workers have room), HOTBED_SHUTDOWN_GRACE_S, HOTBED_LOG_FORMAT.
"""

from __future__ import annotations

import os
import socket
from typing import Annotated, Literal

import msgspec

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

    def resolved_name(self) -> str:
        return self.name or f"{socket.gethostname()}-{os.getpid()}"
