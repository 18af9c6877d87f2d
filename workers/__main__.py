"""``python -m workers [--config FILE]``: run the worker agent of this node."""

from __future__ import annotations

import argparse

import anyio

from hotbed import daemon
from hotbed.config import load_settings
from hotbed.errors import ConfigError, HotbedError
from workers.agent import WorkerAgent
from workers.config import WorkerSettings
from workers.runtimes import make_runtime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hotbed worker", description="Run the hotbed worker agent.")
    parser.add_argument("--config", help="TOML settings file (HOTBED_* variables override it)")
    parser.add_argument("--redis-url")
    parser.add_argument("--prefix")
    parser.add_argument("--worker-id")
    parser.add_argument("--runtime", choices=["docker", "sim", "process"])
    args = parser.parse_args(argv)
    try:
        settings = load_settings(
            WorkerSettings,
            args.config,
            overrides={
                "redis_url": args.redis_url, "prefix": args.prefix,
                "worker_id": args.worker_id, "runtime": args.runtime,
            },
        )
    except ConfigError as exc:
        daemon.fatal(str(exc))
        return
    daemon.setup_logging(settings.log_format)
    agent = WorkerAgent(settings, make_runtime(settings))

    async def serve() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.watch_signals, agent.stopping, tg.cancel_scope)
            await agent.run()
            tg.cancel_scope.cancel()

    try:
        daemon.run(serve)
    except HotbedError as exc:
        daemon.fatal(str(exc), code=1)


if __name__ == "__main__":
    main()
