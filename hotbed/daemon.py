"""What every hotbed daemon shares: logging set-up, the uvloop entry point, signals.

Shutdown order (uvicorn's): the first SIGTERM/SIGINT sets the daemon's ``stopping``
event (stop taking work, let in-flight work finish within its grace period); a second
signal cancels everything at once.
"""

from __future__ import annotations

import logging
import logging.config
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import orjson

STANDARD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with ``extra`` fields (sandbox_id, worker_id, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in STANDARD_FIELDS:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = " ".join(
            f"{k}={v}" for k, v in record.__dict__.items() if k not in STANDARD_FIELDS
        )
        return f"{base} {extras}" if extras else base


def logging_config(fmt: str = "text", level: str = "INFO") -> dict[str, Any]:
    formatter: dict[str, Any] = (
        {"()": JsonFormatter}
        if fmt == "json"
        else {"()": TextFormatter, "format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {"aiohttp": {"level": "WARNING"}, "asyncio": {"level": "WARNING"}},
    }


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    logging.config.dictConfig(logging_config(fmt, level))


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main`` on asyncio + uvloop."""
    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})


async def watch_signals(stopping: anyio.Event, scope: anyio.CancelScope) -> None:
    """First SIGTERM/SIGINT: graceful stop. Second: cancel ``scope`` now."""
    log = logging.getLogger("hotbed.daemon")
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for sig in signals:
            if not stopping.is_set():
                log.info("got %s: stopping gracefully", signal.Signals(sig).name)
                stopping.set()
            else:
                log.warning("got %s again: exiting now", signal.Signals(sig).name)
                scope.cancel()
                return


def wall() -> float:
    """Wall-clock seconds, for records and cross-host deadlines only (never for waits)."""
    return time.time()


def fatal(message: str, code: int = 2) -> None:
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(code)
