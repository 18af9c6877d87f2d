"""``python -m workers [--config FILE]``: run the worker agent of this node.

Exit codes: 2 for bad settings (one line on stderr), 1 for a failure while running.
SIGTERM/SIGINT stop gracefully (a second one exits at once); SIGHUP re-reads the
config and applies :data:`workers.config.RELOADABLE` (new tags are re-advertised).
Under systemd it speaks the notify protocol (daemon.sdnotify).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import msgspec

from daemon import lifecycle, metrics
from daemon.config import load_settings, reload_from_file
from hotbed import protocol
from hotbed.errors import ConfigError
from workers import metrics as worker_metrics
from workers.agent import WorkerAgent
from workers.config import RELOADABLE, WorkerSettings
from workers.gpu import NvmlUsage
from workers.runtimes import make_runtime

log = logging.getLogger("workers")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hotbed worker", description="Run the hotbed worker agent.")
    parser.add_argument("--config", help="TOML settings file (HOTBED_* variables override it)")
    parser.add_argument("--redis-url")
    parser.add_argument("--prefix")
    parser.add_argument("--worker-id")
    parser.add_argument("--runtime", choices=["docker", "runsc", "sim", "process"])
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {
        "redis_url": args.redis_url, "prefix": args.prefix,
        "worker_id": args.worker_id, "runtime": args.runtime,
    }
    try:
        settings = load_settings(WorkerSettings, args.config, overrides=overrides)
    except ConfigError as exc:
        lifecycle.fatal(str(exc))
        return
    lifecycle.setup_logging(settings.log_format, settings.log_level)
    agent = WorkerAgent(settings, make_runtime(settings))
    lifecycle.log_defaults["worker_id"] = agent.id
    try:
        agent.metrics = metrics.make("worker", settings.metrics_port)
    except ConfigError as exc:
        lifecycle.fatal(str(exc))
        return

    async def reload() -> None:
        got = reload_from_file(
            WorkerSettings, args.config, current=agent.settings, reloadable=RELOADABLE,
            overrides=overrides, log=log,
        )
        if got is None:
            return
        agent.settings, applied = got
        if {"log_format", "log_level"} & set(applied):
            lifecycle.setup_logging(agent.settings.log_format, agent.settings.log_level)
        if "tags" in applied:
            agent.info = msgspec.structs.replace(agent.info, tags=dict(agent.settings.tags))
            await agent.redis.set(agent.keys.worker_info(agent.id), protocol.encode(agent.info))

    # GPU memory and utilisation in the metrics, where NVML sees the GPUs.
    gpu_usage = NvmlUsage() if settings.metrics_port and agent.info.gpus and not settings.gpus else None

    async def serve() -> None:
        async with metrics.serve(
            agent.metrics, port=settings.metrics_port, addr=settings.metrics_addr,
            sample=lambda: worker_metrics.sample(agent.sandboxes, agent.info, gpu_usage),
        ):
            await lifecycle.run_service(agent.run, agent.stopping, name="worker", reload=reload)

    lifecycle.run_daemon(serve, redis_url=settings.redis_url)


if __name__ == "__main__":
    main()
