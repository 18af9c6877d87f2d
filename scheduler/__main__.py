"""``python -m scheduler [--config FILE]``: run the scheduler daemon.

Exit codes: 2 for bad settings (one line on stderr), 1 for a failure while running.
SIGTERM/SIGINT stop gracefully (a second one exits at once); SIGHUP re-reads the
config and applies :data:`scheduler.config.RELOADABLE`. Under systemd it speaks the
notify protocol (daemon.sdnotify).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from daemon import lifecycle, metrics
from daemon.config import load_settings, reload_from_file
from hotbed.errors import ConfigError
from scheduler import metrics as scheduler_metrics
from scheduler.config import RELOADABLE, SchedulerSettings
from scheduler.service import Scheduler

log = logging.getLogger("scheduler")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hotbed scheduler", description="Run the hotbed scheduler.")
    parser.add_argument("--config", help="TOML settings file (HOTBED_* variables override it)")
    parser.add_argument("--redis-url")
    parser.add_argument("--prefix")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {"redis_url": args.redis_url, "prefix": args.prefix}
    try:
        settings = load_settings(SchedulerSettings, args.config, overrides=overrides)
    except ConfigError as exc:
        lifecycle.fatal(str(exc))
        return
    lifecycle.setup_logging(settings.log_format, settings.log_level)
    scheduler = Scheduler(settings)
    try:
        scheduler.metrics = metrics.make("scheduler", settings.metrics_port)
    except ConfigError as exc:
        lifecycle.fatal(str(exc))
        return

    async def reload() -> None:
        got = reload_from_file(
            SchedulerSettings, args.config, current=scheduler.settings, reloadable=RELOADABLE,
            overrides=overrides, log=log,
        )
        if got is None:
            return
        scheduler.settings, applied = got
        if {"log_format", "log_level"} & set(applied):
            lifecycle.setup_logging(scheduler.settings.log_format, scheduler.settings.log_level)

    async def serve() -> None:
        async with metrics.serve(
            scheduler.metrics, port=settings.metrics_port, addr=settings.metrics_addr,
            sample=lambda: scheduler_metrics.sample(scheduler),
        ):
            await lifecycle.run_service(scheduler.run, scheduler.stopping, name="scheduler", reload=reload)

    lifecycle.run_daemon(serve, redis_url=settings.redis_url)


if __name__ == "__main__":
    main()
