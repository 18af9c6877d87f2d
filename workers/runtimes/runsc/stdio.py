"""A sandbox's main-process stdin/stdout as two named pipes in its state directory.

runsc hands the stdio of ``runsc create``/``restore`` to the sandbox's first process.
Giving it FIFOs opened read-write means the sandbox itself holds a reader and a writer
of each: its stdin never sees EOF when the worker goes away, a write to its stdout
never fails for want of a reader, and a worker that restarts (or comes back after a
restore) attaches by opening the same two paths again. What the agent writes while
nobody reads waits in the pipe (64 KiB), then blocks the agent: the guest channel's
flow control, as with ``docker attach``.

:class:`FifoStdio` is the worker's end (:class:`workers.runtimes.base.AttachedStdio`):
non-blocking descriptors driven by the event loop, never a thread.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import anyio

STDIN = "stdin"
STDOUT = "stdout"
READ_CHUNK = 1 << 16


def make_fifos(d: Path) -> None:
    """Create the two pipes in ``d`` (replacing stale ones). Blocking."""
    for name in (STDIN, STDOUT):
        p = d / name
        p.unlink(missing_ok=True)
        os.mkfifo(p, 0o600)


def sandbox_ends(d: Path) -> tuple[int, int]:
    """(stdin, stdout) descriptors to give the sandbox: both read-write, so it holds
    both ends. The caller closes them once runsc has passed them on."""
    fin = os.open(d / STDIN, os.O_RDWR | os.O_CLOEXEC)
    try:
        fout = os.open(d / STDOUT, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        os.close(fin)
        raise
    return fin, fout


class FifoStdio:
    """The worker's end of a sandbox's stdio pipes."""

    def __init__(self, d: Path) -> None:
        # Opening the write end without blocking fails (ENXIO) if no one reads it: the
        # sandbox is gone. The read end opens at once either way.
        self._out = os.open(d / STDOUT, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._in = os.open(d / STDIN, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            os.close(self._out)
            raise
        self._closed = False

    async def read(self) -> bytes | None:
        while not self._closed:
            try:
                data = os.read(self._out, READ_CHUNK)
            except BlockingIOError:
                await anyio.wait_readable(self._out)
                continue
            except OSError:
                return None
            # EOF: every writer is gone, the sandbox with them.
            return data or None
        return None

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._closed:
                raise BrokenPipeError(errno.EPIPE, "sandbox stdio closed")
            try:
                n = os.write(self._in, view)
            except BlockingIOError:
                await anyio.wait_writable(self._in)
                continue
            view = view[n:]

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in (self._out, self._in):
            anyio.notify_closing(fd)
            os.close(fd)
