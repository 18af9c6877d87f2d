"""Commands as ``docker exec``: the road for images without the guest agent (no
python3) and for the worker's own set-up steps.

Under runsc an exec'd process leads its own process group, so the command is wrapped
to report its pid first (on stderr, stripped before returning) and a timeout kills
the whole group with ``kill -s KILL -PID``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import anyio
from aiodocker.exceptions import DockerError

from hotbed.errors import (
    ExecTimeout,
    HotbedError,
    InvalidRequest,
    RuntimeFailure,
    SandboxNotRunning,
)
from hotbed.protocol import ExecResult, ExecSpec
from workers.runtimes.docker import _aiodocker, lifecycle
from workers.runtimes.docker.engine import API_TIMEOUT_S, Engine

log = logging.getLogger(__name__)

PID_MARK = b"HOTBEDPID "
WRAP = 'echo "HOTBEDPID $$" >&2; exec "$@"'
SHELL_WRAP = 'echo "HOTBEDPID $$" >&2; exec /bin/sh -c "$1"'


class _Output:
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


async def exec_spec(engine: Engine, sandbox_id: str, spec: ExecSpec, *, default_user: str) -> ExecResult:
    """Run an exec request (the Runtime's ``exec``)."""
    if spec.shell is not None:
        argv = ["/bin/sh", "-c", SHELL_WRAP, "sh", spec.shell]
    elif spec.argv:
        argv = ["/bin/sh", "-c", WRAP, "sh", *spec.argv]
    else:
        raise InvalidRequest("exec needs argv or shell", sandbox_id=sandbox_id)
    return await run(
        engine,
        sandbox_id,
        argv,
        user=spec.user or default_user,
        env=spec.env,
        cwd=spec.cwd,
        stdin=spec.stdin,
        timeout=spec.timeout,
        max_output=spec.max_output,
    )


async def run(
    engine: Engine,
    sandbox_id: str,
    argv: Sequence[str],
    *,
    user: str,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    stdin: bytes | None = None,
    timeout: float,
    max_output: int,
) -> ExecResult:
    container = engine.container(sandbox_id)
    started = anyio.current_time()
    try:
        with anyio.fail_after(API_TIMEOUT_S):
            exe = await container.exec(
                list(argv),
                stdout=True,
                stderr=True,
                stdin=stdin is not None,
                user=user,
                environment={k: v for k, v in (env or {}).items()} or None,
                workdir=cwd,
            )
    except DockerError as exc:
        raise engine.translate(exc, sandbox_id) from None
    except TimeoutError:
        raise RuntimeFailure(
            f"docker did not create the exec within {API_TIMEOUT_S:g}s", sandbox_id=sandbox_id
        ) from None
    out, err = _Output(max_output), _Output(max_output)
    pid: int | None = None
    pending_err = bytearray()
    timed_out = False
    stream = exe.start(detach=False)
    try:
        with anyio.move_on_after(timeout) as scope:
            async with stream:
                if stdin is not None:
                    await stream.write_in(stdin)
                    _aiodocker.write_eof(stream)
                while True:
                    msg = await stream.read_out()
                    if msg is None:
                        break
                    if msg.stream == 1:
                        out.feed(msg.data)
                    elif pid is None:
                        pending_err += msg.data
                        nl = pending_err.find(b"\n")
                        if nl >= 0 and pending_err.startswith(PID_MARK):
                            pid = int(pending_err[len(PID_MARK) : nl])
                            err.feed(bytes(pending_err[nl + 1 :]))
                        elif nl >= 0 or len(pending_err) > 64:
                            pid = -1
                            err.feed(bytes(pending_err))
                    else:
                        err.feed(msg.data)
        timed_out = scope.cancelled_caught
    except DockerError as exc:
        raise engine.translate(exc, sandbox_id) from None
    if timed_out:
        with anyio.CancelScope(shield=True):
            await kill_group(engine, sandbox_id, pid, user)
        raise ExecTimeout(
            f"command ran past its {timeout:g}s timeout and was killed",
            sandbox_id=sandbox_id,
            detail={
                "stdout": bytes(out.buf[-4096:]).decode("utf-8", "replace"),
                "stderr": bytes(err.buf[-4096:]).decode("utf-8", "replace"),
                "timeout": timeout,
            },
        )
    code = await exit_code(engine, exe, sandbox_id)
    return ExecResult(
        exit_code=code,
        stdout=bytes(out.buf),
        stderr=bytes(err.buf),
        truncated=bool(out.dropped or err.dropped),
        duration_s=anyio.current_time() - started,
    )


async def exit_code(engine: Engine, exe: Any, sandbox_id: str) -> int:
    # The output stream ends a moment before dockerd records the exit code.
    for _ in range(200):
        try:
            with anyio.fail_after(API_TIMEOUT_S):
                info = await exe.inspect()
        except TimeoutError:
            raise RuntimeFailure(
                f"docker did not report the exec's exit within {API_TIMEOUT_S:g}s",
                sandbox_id=sandbox_id,
            ) from None
        if not info.get("Running") and info.get("ExitCode") is not None:
            return int(info["ExitCode"])
        await anyio.sleep(0.005)
    if not await lifecycle.is_alive(engine, sandbox_id):
        raise SandboxNotRunning(
            f"sandbox {sandbox_id} died during the command (memory limit?)",
            sandbox_id=sandbox_id,
        )
    raise RuntimeFailure("exec finished without an exit code", sandbox_id=sandbox_id)


async def kill_group(engine: Engine, sandbox_id: str, pid: int | None, user: str) -> None:
    # Killed as the command's own user: under gVisor an exec'd root has no
    # CAP_KILL over a non-root container's processes.
    if not pid or pid <= 1:
        return
    try:
        await run(
            engine,
            sandbox_id,
            ["/bin/sh", "-c", f"kill -s KILL -{pid} 2>/dev/null; kill -s KILL {pid} 2>/dev/null; true"],
            user=user,
            timeout=10.0,
            max_output=4096,
        )
    except HotbedError as exc:
        log.warning("could not kill timed-out command: %s", exc, extra={"sandbox_id": sandbox_id})
