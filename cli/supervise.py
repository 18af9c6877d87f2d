"""`hotbed up`'s supervisor: what it starts, it keeps running.

The scheduler and the worker run as child processes (``python -m scheduler``,
``python -m workers``), each in its own process group (a terminal's Ctrl-C reaches
the supervisor alone, which stops them in order), each with its own ``NOTIFY_SOCKET``
(an abstract datagram socket of the supervisor's), so "up" means both sent READY=1.
A child that exits while hotbed is not stopping is restarted after a backoff: 1 s,
doubling to 30 s, back to 1 s once a child has run for a minute. Redis, when `hotbed
up` started it, is pinged every couple of seconds and started again when it stops
answering. Every start, exit and restart is written to ``supervisor.json`` in
``$HOTBED_HOME``, which ``hotbed status`` prints.

Stopping (the first SIGTERM/SIGINT): each child gets SIGTERM and finishes its
in-flight work within its own grace period; one still running after
:data:`STOP_TIMEOUT_S` is killed. A second signal kills them at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.abc
import msgspec

from daemon import lifecycle
from hotbed.errors import HotbedError

log = logging.getLogger("hotbed.up")

RESTART_MIN_S = 1.0
RESTART_MAX_S = 30.0
# A child that ran this long before exiting starts again after the shortest backoff.
STABLE_S = 60.0
STOP_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 90.0
REDIS_CHECK_S = 2.0
STATE_FILE = "supervisor.json"


class ChildState(msgspec.Struct, kw_only=True):
    pid: int = 0
    running: bool = False
    restarts: int = 0
    started_at: float = 0.0
    # How the last run ended: "exit 1", "signal 9"; "" if it never ended.
    last_exit: str = ""
    last_exit_at: float = 0.0


class SupervisorState(msgspec.Struct, kw_only=True):
    pid: int
    started_at: float
    children: dict[str, ChildState] = {}


def exit_text(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit {code}"


def read_state(home: Path) -> SupervisorState | None:
    """The state a live supervisor wrote in ``home``; None if none runs."""
    try:
        state = msgspec.json.decode((home / STATE_FILE).read_bytes(), type=SupervisorState)
        os.kill(state.pid, 0)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    return state


class Child:
    """One supervised child process."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], state: ChildState) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.state = state
        self.process: anyio.abc.Process | None = None
        self.ready = anyio.Event()


class Supervisor:
    def __init__(
        self,
        home: Path,
        *,
        redis_answers: Callable[[], bool] | None = None,
        start_redis: Callable[[], bool] | None = None,
    ) -> None:
        """``redis_answers()`` / ``start_redis()`` (True if it had to start one): to keep
        the Redis `hotbed up` started running (None when Redis is not ours to keep)."""
        self.home = home
        self.redis_answers = redis_answers
        self.start_redis = start_redis
        self.state = SupervisorState(pid=os.getpid(), started_at=lifecycle.wall())
        self.children: list[Child] = []
        self.stopping = anyio.Event()
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify_name = f"hotbed-up-{os.getpid()}-{os.urandom(4).hex()}"
        self._notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._notify.bind("\0" + self._notify_name)
        self._notify.setblocking(False)

    def add(self, name: str, module: str, args: list[str], env: dict[str, str] | None = None) -> None:
        state = self.state.children.setdefault(name, ChildState())
        child_env = {
            **os.environ, **(env or {}),
            # One socket for all children; the kernel tells which one sent a datagram.
            "NOTIFY_SOCKET": "@" + self._notify_name,
        }
        child_env.pop("WATCHDOG_USEC", None)
        self.children.append(Child(name, [sys.executable, "-m", module, *args], child_env, state))

    def _save(self) -> None:
        path = self.home / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.encode(self.state))
        tmp.replace(path)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start every child, report started once all are ready, keep them running until
        :attr:`stopping` is set, then stop them."""
        self._save()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read_notifications)
                async with anyio.create_task_group() as kids:
                    for child in self.children:
                        kids.start_soon(self._keep, child)
                    with anyio.fail_after(READY_TIMEOUT_S):
                        for child in self.children:
                            await child.ready.wait()
                    if self.redis_answers is not None and self.start_redis is not None:
                        tg.start_soon(self._watch_redis, self.redis_answers, self.start_redis)
                    task_status.started()
                tg.cancel_scope.cancel()
        finally:
            self._notify.close()
            (self.home / STATE_FILE).unlink(missing_ok=True)

    async def _read_notifications(self) -> None:
        ucred = struct.Struct("3i")
        while True:
            await anyio.wait_readable(self._notify)
            try:
                data, anc, _flags, _addr = self._notify.recvmsg(4096, socket.CMSG_SPACE(ucred.size))
            except BlockingIOError:
                continue
            # The sender's pid, from the kernel (SO_PASSCRED), says which child it is.
            pid = next(
                (ucred.unpack(d[: ucred.size])[0] for lvl, kind, d in anc
                 if lvl == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS),
                0,
            )
            if b"READY=1" not in data.split(b"\n"):
                continue
            for c in self.children:
                if c.state.pid == pid and c.state.running and not c.ready.is_set():
                    c.ready.set()
                    log.info("%s ready (pid %d)", c.name, pid)

    async def _keep(self, child: Child) -> None:
        """Run ``child``; while not stopping, start it again each time it exits."""
        quick_exits = 0
        while not self.stopping.is_set():
            if child.ready.is_set():
                child.ready = anyio.Event()
            started = anyio.current_time()
            process = await anyio.open_process(
                child.argv, stdin=None, stdout=None, stderr=None, env=child.env,
                start_new_session=True,
            )
            child.process = process
            st = child.state
            st.pid, st.running, st.started_at = process.pid, True, lifecycle.wall()
            self._save()
            code = await self._wait(child, process)
            st.running = False
            st.last_exit, st.last_exit_at = exit_text(code), lifecycle.wall()
            if self.stopping.is_set():
                self._save()
                return
            ran = anyio.current_time() - started
            quick_exits = 0 if ran >= STABLE_S else quick_exits + 1
            delay = min(RESTART_MAX_S, RESTART_MIN_S * 2 ** max(0, quick_exits - 1))
            st.restarts += 1
            self._save()
            log.warning(
                "%s (pid %d) exited (%s) after %.0fs; restarting it in %.0fs (restart %d)",
                child.name, process.pid, st.last_exit, ran, delay, st.restarts,
            )
            with anyio.move_on_after(delay):
                await self.stopping.wait()

    async def _wait(self, child: Child, process: anyio.abc.Process) -> int:
        """The child's exit code; on stopping, SIGTERM it and wait, killing it after
        :data:`STOP_TIMEOUT_S` or at a second signal (``scope`` cancelled)."""
        async with anyio.create_task_group() as tg:

            async def stop_on_signal() -> None:
                await self.stopping.wait()
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                with anyio.move_on_after(STOP_TIMEOUT_S):
                    await process.wait()
                    return
                log.warning("%s ignored SIGTERM for %.0fs; killing it", child.name, STOP_TIMEOUT_S)
                process.kill()

            tg.start_soon(stop_on_signal)
            try:
                code = await process.wait()
            except BaseException:
                # Cancelled (a second signal): the child goes now.
                with anyio.CancelScope(shield=True):
                    if process.returncode is None:
                        process.kill()
                    await process.wait()
                raise
            tg.cancel_scope.cancel()
        return code

    async def _watch_redis(self, answers: Callable[[], bool], start: Callable[[], bool]) -> None:
        st = self.state.children.setdefault("redis", ChildState(running=True))
        self._save()
        missed = 0

        async def check() -> None:
            nonlocal missed
            if await anyio.to_thread.run_sync(answers):
                missed = 0
                return
            # Twice in a row: one slow answer (a big AOF loading) is not a dead server.
            missed += 1
            if missed < 2:
                return
            st.running = False
            self._save()
            started = await anyio.to_thread.run_sync(start)
            missed = 0
            st.running = True
            if not started:  # it answered again after all
                self._save()
                return
            st.restarts += 1
            st.last_exit, st.last_exit_at = "stopped answering", lifecycle.wall()
            log.warning("redis stopped answering; started it again (restart %d)", st.restarts)
            self._save()

        await lifecycle.supervised_loop("redis watch", check, interval=REDIS_CHECK_S, log=log)


def status_lines(home: Path) -> list[str]:
    """What ``hotbed status`` prints about `hotbed up`'s processes (none if it is down)."""
    state = read_state(home)
    if state is None:
        return []
    now = lifecycle.wall()
    out = [f"\nhotbed up (pid {state.pid}, up {now - state.started_at:.0f}s)",
           f"{'PROCESS':<10} {'PID':>7} {'STATE':<8} {'RESTARTS':>8}  LAST EXIT"]
    for name, ch in state.children.items():
        last = f"{ch.last_exit}, {now - ch.last_exit_at:.0f}s ago" if ch.last_exit else "-"
        pid = str(ch.pid) if ch.pid else "-"
        out.append(f"{name:<10} {pid:>7} {'running' if ch.running else 'stopped':<8} {ch.restarts:>8}  {last}")
    return out


async def serve(supervisor: Supervisor, ready_message: str) -> None:
    """Run ``supervisor`` until a stop signal; print ``ready_message`` once all are up."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(lifecycle.watch_signals, supervisor.stopping, tg.cancel_scope)

        async def supervise(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            try:
                await supervisor.run(task_status=task_status)
            except TimeoutError:
                waiting = [c.name for c in supervisor.children if not c.ready.is_set()]
                raise HotbedError(
                    f"{', '.join(waiting)} did not become ready within {READY_TIMEOUT_S:.0f}s"
                ) from None
            tg.cancel_scope.cancel()

        await tg.start(supervise)
        sys.stderr.write(ready_message + "\n")
        sys.stderr.flush()
