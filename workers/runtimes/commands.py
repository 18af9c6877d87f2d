"""What ``docker exec`` and ``runsc exec`` share: the pid-reporting wrapper and the
reader of its output.

Under runsc an exec'd process leads its own process group, so a command is wrapped to
report its pid first (a ``HOTBEDPID <pid>`` line on stderr, taken off before the
output is returned) and a timeout kills the whole group with ``kill -s KILL -PID``.
"""

from __future__ import annotations

from hotbed.errors import ExecTimeout, InvalidRequest
from hotbed.protocol import ExecResult, ExecSpec

PID_MARK = b"HOTBEDPID "
WRAP = 'echo "HOTBEDPID $$" >&2; exec "$@"'
SHELL_WRAP = 'echo "HOTBEDPID $$" >&2; exec /bin/sh -c "$1"'
# Stderr read before giving up on a pid line: the wrapper's line is short.
PID_LINE_MAX = 64
# Output kept in an ExecTimeout's detail, per stream.
TIMEOUT_TAIL = 4096


def wrapped(spec: ExecSpec, sandbox_id: str) -> list[str]:
    """The argv that runs ``spec``'s command under the pid-reporting wrapper."""
    if spec.shell is not None:
        return ["/bin/sh", "-c", SHELL_WRAP, "sh", spec.shell]
    if spec.argv:
        return ["/bin/sh", "-c", WRAP, "sh", *spec.argv]
    raise InvalidRequest("exec needs argv or shell", sandbox_id=sandbox_id)


def kill_group_argv(pid: int) -> list[str]:
    """The command that kills a timed-out command's process group, and it."""
    return ["/bin/sh", "-c", f"kill -s KILL -{pid} 2>/dev/null; kill -s KILL {pid} 2>/dev/null; true"]


class Capped:
    """Collects one stream up to a cap, counting what it drops."""

    __slots__ = ("buf", "cap", "dropped")

    def __init__(self, cap: int) -> None:
        self.buf = bytearray()
        self.cap = cap
        self.dropped = 0

    def feed(self, data: bytes) -> None:
        room = self.cap - len(self.buf)
        if room > 0:
            self.buf += data[:room]
        self.dropped += max(0, len(data) - max(room, 0))


class WrappedOutput:
    """One wrapped command's stdout and stderr, each up to ``cap`` bytes, with the
    wrapper's pid line taken off stderr.

    :attr:`pid`: None until the first stderr line has come; -1 where it was not the
    wrapper's (the command never ran: the runtime's own complaint is on stderr).
    """

    __slots__ = ("err", "out", "pending", "pid")

    def __init__(self, cap: int) -> None:
        self.out = Capped(cap)
        self.err = Capped(cap)
        self.pid: int | None = None
        # Stderr before the pid line is complete.
        self.pending = bytearray()

    def feed_out(self, data: bytes) -> None:
        self.out.feed(data)

    def feed_err(self, data: bytes) -> None:
        if self.pid is not None:
            self.err.feed(data)
            return
        self.pending += data
        nl = self.pending.find(b"\n")
        if nl >= 0 and self.pending.startswith(PID_MARK):
            self.pid = int(self.pending[len(PID_MARK) : nl])
            self.err.feed(bytes(self.pending[nl + 1 :]))
        elif nl >= 0 or len(self.pending) > PID_LINE_MAX:
            self.pid = -1
            self.err.feed(bytes(self.pending))

    def never_ran(self, exit_code: int) -> bool:
        """Nothing at all on stderr and a failure: the wrapper never printed its pid, so
        the command never started (the runtime failed the exec)."""
        return self.pid is None and exit_code != 0

    def complaint(self) -> bytes:
        """What the runtime said when :meth:`never_ran`: whatever came on either stream."""
        return bytes(self.out.buf) + bytes(self.pending)

    def result(self, exit_code: int, duration_s: float) -> ExecResult:
        return ExecResult(
            exit_code=exit_code, stdout=bytes(self.out.buf), stderr=bytes(self.err.buf),
            truncated=bool(self.out.dropped or self.err.dropped), duration_s=duration_s,
        )

    def timed_out(self, timeout: float, sandbox_id: str) -> ExecTimeout:
        """The error for a command killed at its timeout, with the tail of its output."""
        return ExecTimeout(
            f"command ran past its {timeout:g}s timeout and was killed",
            sandbox_id=sandbox_id,
            detail={
                "stdout": bytes(self.out.buf[-TIMEOUT_TAIL:]).decode("utf-8", "replace"),
                "stderr": bytes(self.err.buf[-TIMEOUT_TAIL:]).decode("utf-8", "replace"),
                "timeout": timeout,
            },
        )
