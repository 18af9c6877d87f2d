"""What every hotbed daemon shares: logging set-up, the uvloop entry point, signals.

Shutdown order (uvicorn's): the first SIGTERM/SIGINT sets the daemon's ``stopping``
event (stop taking work, let in-flight work finish within its grace period); a second
signal cancels everything at once.

The survive policy (:func:`supervised_loop`, :class:`Backoff`): every background loop
of both daemons (heartbeat, health, expiry, registry, reclaim, reaper, pool controller,
snapshot collection, metrics, stream intake) survives any failure of one step. It logs
the first failure of an outage once, retries with capped exponential backoff, logs the
recovery, and keeps serving; only cancellation ends a loop.
"""

from __future__ import annotations

import logging
import logging.config
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NoReturn

import anyio
import orjson

from hotbed import clock

STANDARD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
}


# Fields every log line of the current task carries (request_id, sandbox_id, ...): a
# request handler sets them once; :class:`ContextFilter` copies them onto each record
# unless the call gave its own ``extra``. Each anyio task has its own copy.
log_context: ContextVar[dict[str, Any] | None] = ContextVar("hotbed_log_context", default=None)
# Fields of the whole process (worker_id on a worker).
log_defaults: dict[str, Any] = {}


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for source in (log_context.get() or {}, log_defaults):
            for k, v in source.items():
                if v is not None and k not in record.__dict__:
                    record.__dict__[k] = v
        return True


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
        "filters": {"context": {"()": ContextFilter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr",
                "filters": ["context"],
            }
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {"aiohttp": {"level": "WARNING"}, "asyncio": {"level": "WARNING"}},
    }


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    logging.config.dictConfig(logging_config(fmt, level))


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main`` on asyncio + uvloop."""
    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})


async def watch_signals(
    stopping: anyio.Event,
    scope: anyio.CancelScope,
    reload: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """First SIGTERM/SIGINT: graceful stop. Second: cancel ``scope`` now. SIGHUP: ``reload``."""
    log = logging.getLogger("hotbed.daemon")
    sigs = (signal.SIGTERM, signal.SIGINT) + ((signal.SIGHUP,) if reload is not None else ())
    with anyio.open_signal_receiver(*sigs) as signals:
        async for sig in signals:
            if sig == signal.SIGHUP and reload is not None:
                log.info("got SIGHUP: reloading settings")
                try:
                    await reload()
                except Exception:
                    log.exception("reload failed; keeping the running settings")
                continue
            if not stopping.is_set():
                log.info("got %s: stopping gracefully", signal.Signals(sig).name)
                stopping.set()
            else:
                log.warning("got %s again: exiting now", signal.Signals(sig).name)
                scope.cancel()
                return


def wall() -> float:
    """Redis's clock as this process sees it (:mod:`hotbed.clock`), for records and
    cross-host deadlines only (never for waits)."""
    return clock.PROCESS.now()


def fatal(message: str, code: int = 2) -> None:
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(code)


async def run_service(
    serve: Callable[..., Awaitable[None]],
    stopping: anyio.Event,
    *,
    name: str,
    reload: Callable[[], Awaitable[None]] | None = None,
    notifier: Any | None = None,
) -> None:
    """Run a daemon's ``serve(task_status=...)`` as a service.

    Signals as :func:`watch_signals`; under systemd (``NOTIFY_SOCKET``) it sends
    READY=1 once ``serve`` reports started, WATCHDOG=1 every half ``WATCHDOG_USEC``
    from the event loop (a blocked loop misses them and systemd restarts the unit),
    RELOADING=1/READY=1 around a SIGHUP reload, and STOPPING=1 on the first stop
    signal.
    """
    from daemon.sdnotify import Notifier

    sd = notifier or Notifier()
    log = logging.getLogger("hotbed.daemon")

    async def reload_notified() -> None:
        assert reload is not None
        sd.reloading()
        try:
            await reload()
        finally:
            sd.ready()

    async def watchdog() -> None:
        assert sd.watchdog_s is not None
        while True:
            sd.watchdog()
            await anyio.sleep(sd.watchdog_s / 2)

    async def announce_stop() -> None:
        await stopping.wait()
        sd.stopping(f"{name} stopping")

    try:
        async with anyio.create_task_group() as tg:

            async def serving(*, task_status: anyio.abc.TaskStatus[None]) -> None:
                await serve(task_status=task_status)
                # serve() returned (stopped): the helpers go with it. (A failure
                # cancels them through the task group and propagates.)
                tg.cancel_scope.cancel()

            tg.start_soon(
                watch_signals, stopping, tg.cancel_scope, reload_notified if reload else None
            )
            tg.start_soon(announce_stop)
            await tg.start(serving)
            sd.ready(f"{name} serving")
            log.info("%s ready", name)
            if sd.watchdog_s:
                tg.start_soon(watchdog)
    finally:
        sd.close()


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def run_daemon(main: Callable[[], Awaitable[None]], *, redis_url: str) -> None:
    """:func:`run`, with a daemon's fatal errors as one ``error:`` line and exit code 1
    (Redis unreachable or refusing the credentials, a runtime that cannot start)."""
    import redis.exceptions

    from daemon.config import redact_url
    from hotbed.errors import HotbedError

    try:
        run(main)
    except BaseException as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, HotbedError):
            fatal(str(leaf), code=1)
        # A Redis Cluster none of whose seeds takes the connection (down, or refusing the
        # credentials) says so as RedisClusterException, which is no RedisError.
        if isinstance(leaf, redis.exceptions.RedisError | redis.exceptions.RedisClusterException):
            fatal(f"Redis at {redact_url(redis_url)}: {leaf}", code=1)
        raise


def _transient_errors() -> tuple[type[BaseException], ...]:
    from redis import exceptions as redis_errors

    from hotbed.errors import HotbedError

    # OSError covers TimeoutError (every fail_after), a refused or reset socket, and
    # aiohttp's client errors reaching Docker. RedisClusterException: no node of a
    # Redis Cluster could be reached (all restarting, say).
    return (redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.RedisClusterException,
            HotbedError, OSError)


TRANSIENT_ERRORS = _transient_errors()

# A failing step is retried after min(MAX_BACKOFF_S or its interval if longer,
# interval * 2**failures), less up to a fifth at random so a fleet that lost Redis
# together does not come back in step.
MAX_BACKOFF_S = 5.0
# While a fault lasts one line says so this often, not one per retry.
STILL_FAILING_EVERY_S = 300.0


class Backoff:
    """The survive policy's state for one background loop.

    ``failed(exc)`` logs the first failure of an outage (a Redis or runtime hiccup as one
    warning line; anything else with its traceback, since it is a bug), stays quiet on
    the retries that follow (one reminder every :data:`STILL_FAILING_EVERY_S`), and
    returns how long to wait before the next try; ``succeeded()`` logs the recovery
    once and resets the backoff. Cancellation is never its business: callers catch
    ``Exception`` only.
    """

    def __init__(
        self,
        name: str,
        *,
        interval: float = 1.0,
        max_backoff: float = MAX_BACKOFF_S,
        log: logging.Logger | None = None,
    ) -> None:
        self.name = name
        self.interval = interval
        self.max_backoff = max_backoff
        self.log = log or logging.getLogger("hotbed.daemon")
        self.failures = 0
        self.total_failures = 0
        self._since = 0.0
        self._reminded = 0.0

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def failed(self, exc: Exception) -> float:
        now = time.monotonic()
        self.total_failures += 1
        if self.failures == 0:
            self._since = self._reminded = now
            if isinstance(exc, TRANSIENT_ERRORS):
                self.log.warning(
                    "%s failed, retrying with backoff: %s: %s", self.name, type(exc).__name__, exc,
                    extra={"loop": self.name},
                )
            else:
                self.log.error(
                    "%s failed unexpectedly, retrying with backoff", self.name,
                    exc_info=exc, extra={"loop": self.name},
                )
        elif now - self._reminded >= STILL_FAILING_EVERY_S:
            self._reminded = now
            self.log.warning(
                "%s still failing after %.0fs (%d tries): %s: %s",
                self.name, now - self._since, self.failures + 1, type(exc).__name__, exc,
                extra={"loop": self.name},
            )
        self.failures += 1
        cap = max(self.interval, self.max_backoff)
        delay = min(cap, self.interval * 2.0 ** self.failures)
        return delay * random.uniform(0.8, 1.0)

    def succeeded(self) -> None:
        if self.failures:
            self.log.info(
                "%s recovered after %.1fs (%d failed tries)",
                self.name, time.monotonic() - self._since, self.failures, extra={"loop": self.name},
            )
            self.failures = 0


async def supervised_loop(
    name: str,
    step: Callable[[], Awaitable[object]],
    *,
    interval: float | Callable[[], float],
    initial_delay: float = 0.0,
    max_backoff: float = MAX_BACKOFF_S,
    log: logging.Logger | None = None,
) -> NoReturn:
    """Run ``step()`` every ``interval`` seconds, forever, under the survive policy.

    Every background loop of a daemon runs through this: a step that raises any
    ``Exception`` (Redis restarting, Docker timing out, a bug) is logged once per
    outage and retried with backoff (:class:`Backoff`) while the daemon keeps serving.
    Cancellation passes through untouched. ``interval`` may be a callable, read before
    each wait, for settings a reload changes.
    """
    backoff = Backoff(name, max_backoff=max_backoff, log=log)
    if initial_delay > 0:
        await anyio.sleep(initial_delay)
    while True:
        backoff.interval = interval() if callable(interval) else interval
        try:
            await step()
        except Exception as exc:
            await anyio.sleep(backoff.failed(exc))
            continue
        backoff.succeeded()
        await anyio.sleep(backoff.interval)


@contextmanager
def survive(what: str) -> Iterator[None]:
    """Around one step that is not a loop of its own: a Redis or runtime hiccup is
    logged and the caller goes on. Loops use :func:`supervised_loop`."""
    try:
        yield
    except TRANSIENT_ERRORS as exc:
        logging.getLogger("hotbed.daemon").warning("%s failed, will retry: %s: %s", what, type(exc).__name__, exc)
