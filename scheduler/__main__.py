"""``python -m scheduler [--config FILE]``: run the scheduler daemon."""

from __future__ import annotations

import argparse

import anyio

from hotbed import daemon
from hotbed.config import load_settings
from hotbed.errors import ConfigError
from scheduler.config import SchedulerSettings
from scheduler.service import Scheduler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hotbed scheduler", description="Run the hotbed scheduler.")
    parser.add_argument("--config", help="TOML settings file (HOTBED_* variables override it)")
    parser.add_argument("--redis-url")
    parser.add_argument("--prefix")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(
            SchedulerSettings, args.config, overrides={"redis_url": args.redis_url, "prefix": args.prefix}
        )
    except ConfigError as exc:
        daemon.fatal(str(exc))
        return
    daemon.setup_logging(settings.log_format)
    scheduler = Scheduler(settings)

    async def serve() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.watch_signals, scheduler.stopping, tg.cancel_scope)
            await scheduler.run()
            tg.cancel_scope.cancel()

    daemon.run(serve)


if __name__ == "__main__":
    main()
