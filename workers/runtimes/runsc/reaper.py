"""The worker as the reaper of the processes runsc leaves behind.

``runsc run --detach`` and ``runsc restore --detach`` exit once the sandbox is up, and
leave its two processes (the sandbox, the gofer) orphaned: the kernel hands them to the
nearest ancestor that is a child subreaper, else to PID 1. Under the ptrace platform the
sandbox's stub processes follow the same road when the sandbox dies.

``runsc delete`` (terminate, and the end of a pause) returns only once those processes
are reaped, not merely dead. Where PID 1 reaps late, every terminate and pause waits for
it: on this project's VMs PID 1 is an init agent, and a delete took 1.4-2.0 s of which
25 ms were runsc's own. So the runtime makes the worker a subreaper and reaps them
itself: a delete then takes about 0.1 s.

Only zombies named ``exe`` are reaped. runsc re-executes itself through
``/proc/self/exe`` for every process it leaves behind, and neither the worker nor a
library in it starts such a process directly, so no exit status that anyio, libuv or a
thread's ``subprocess`` is waiting for is ever taken.

A sandbox's own two processes are found by their command line (its bundle directory)
just after its launch, and waited for through pidfds while it is deleted: no polling.
The stubs, unknown until they die, are swept once after each delete.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36
# runsc re-executes itself as /proc/self/exe: the kernel names such a process "exe".
_RUNSC_COMM = "exe"
# A delete waits for its sandbox's processes at most this long before the sweep.
_WAIT_S = 5.0


# Reapers open in this process: the subreaper role is the process's, not one runtime's.
_holders = 0


def _set_subreaper(on: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, on, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _children() -> list[int]:
    """This process's children (every thread's: the kernel may hand an orphan to any)."""
    pids: list[int] = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children", "rb") as f:
                pids.extend(int(p) for p in f.read().split())
        except OSError:
            continue
    return pids


def _comm_state(pid: int) -> tuple[str, str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    # comm is in parentheses and may itself hold spaces or parentheses.
    head, _, tail = raw.rpartition(")")
    return head.partition("(")[2], tail[1:2]


def _runsc_children(known: set[int]) -> Iterator[tuple[int, str]]:
    """(pid, state) of our children that runsc left (named ``exe``), but ``known``."""
    for pid in _children():
        if pid in known:
            continue
        got = _comm_state(pid)
        if got is not None and got[0] == _RUNSC_COMM:
            yield pid, got[1]


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode("utf-8", "replace").split("\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """Reap ``pid`` if it has exited; True while it is a live child of ours."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False  # not ours (any more)
    return done == 0


class Reaper:
    """Reaps the sandbox processes runsc hands to this process (see the module)."""

    def __init__(self) -> None:
        self.enabled = False
        # Sandbox id -> its sandbox and gofer pids. They are our unreaped children, so
        # a pid here cannot be reused by another process until we reap it.
        self._pids: dict[str, tuple[int, ...]] = {}

    def enable(self) -> bool:
        """Make this process a child subreaper; False (and a log line) where it can't."""
        global _holders
        if self.enabled:
            return True
        if _holders == 0:
            try:
                _set_subreaper(1)
            except (OSError, AttributeError) as exc:
                log.warning("cannot reap runsc's processes (deletes wait for PID 1): %s", exc)
                return False
        _holders += 1
        self.enabled = True
        return True

    def disable(self) -> None:
        """Stop adopting (the runtime closes). The last reaper of the process hands the
        subreaper role back: a process that daemonizes later (``hotbed up -d`` started
        by the same process) must go to PID 1, which reaps it, not to us, who would not."""
        global _holders
        if not self.enabled:
            return
        self.enabled = False
        _holders -= 1
        if _holders == 0:
            try:
                _set_subreaper(0)
            except (OSError, AttributeError) as exc:
                log.warning("cannot stop being a subreaper: %s", exc)

    async def adopt(self, sandbox_id: str, bundle: Path) -> None:
        """Note the sandbox and gofer processes of the sandbox just launched from ``bundle``."""
        if not self.enabled:
            return
        marks = {os.fspath(bundle), f"--bundle={os.fspath(bundle)}"}
        known = self._known()  # read here, on the loop that changes it

        def find() -> tuple[int, ...]:
            return tuple(pid for pid, _ in _runsc_children(known) if marks.intersection(_cmdline(pid)))

        self._pids[sandbox_id] = await anyio.to_thread.run_sync(find)

    def reap_exited(self, sandbox_id: str | None = None) -> None:
        """Reap the exited processes of ``sandbox_id`` (of every sandbox if None). runsc
        reports a sandbox whose process is a zombie as running, so whatever asks runsc
        for a state calls this first: a sandbox that died alone is seen as stopped.
        Non-blocking (``WNOHANG``), two system calls a sandbox."""
        ids = list(self._pids) if sandbox_id is None else [sandbox_id]
        for sid in ids:
            pids = self._pids.get(sid)
            if not pids:
                continue
            left = tuple(pid for pid in pids if _alive(pid))
            if left:
                self._pids[sid] = left
            else:
                del self._pids[sid]

    def _known(self) -> set[int]:
        return {pid for pids in self._pids.values() for pid in pids}

    async def ending(self, sandbox_id: str, end: Callable[[], Awaitable[None]]) -> None:
        """Run ``end`` (the ``runsc delete`` that ends ``sandbox_id``) while reaping the
        sandbox's processes as they exit, then sweep what it left (stubs, strays)."""
        pids = self._pids.pop(sandbox_id, ())
        fds: dict[int, int] = {}
        for pid in pids:
            try:
                fds[pid] = os.pidfd_open(pid)
            except OSError:
                continue  # gone already: nothing to wait for
        failure: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                for pid, fd in fds.items():
                    tg.start_soon(_reap_when_exited, pid, fd)
                try:
                    await end()
                except Exception as exc:
                    # Raised after the waiters are gone, as itself (not in a group).
                    failure = exc
                tg.cancel_scope.cancel()
        finally:
            for fd in fds.values():
                os.close(fd)
            if self.enabled:
                known = self._known()
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(sweep, known)
        if failure is not None:
            raise failure


async def _reap_when_exited(pid: int, fd: int) -> None:
    with anyio.move_on_after(_WAIT_S):
        await anyio.wait_readable(fd)  # a pidfd reads ready once its process exits
        _alive(pid)


def sweep(known: set[int]) -> int:
    """Reap every exited runsc process among our children but ``known`` (the live
    sandboxes' own, which their deletes wait for); the number reaped."""
    return sum(1 for pid, state in _runsc_children(known) if state == "Z" and not _alive(pid))
