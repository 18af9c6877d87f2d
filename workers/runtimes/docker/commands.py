"""Commands as ``docker exec``: the road for images without the guest agent (no
python3) and for the worker's own set-up steps.

Commands run under the pid-reporting wrapper of :mod:`workers.runtimes.commands`, so a
timeout kills the whole process group.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import anyio
from aiodocker.exceptions import DockerError

from hotbed.errors import HotbedError, RuntimeFailure, SandboxNotRunning
from hotbed.protocol import ExecResult, ExecSpec
from workers.runtimes.commands import WrappedOutput, kill_group_argv, wrapped
from workers.runtimes.docker import _aiodocker, lifecycle
from workers.runtimes.docker.engine import API_TIMEOUT_S, Engine

log = logging.getLogger(__name__)
# Tries of an exec whose command the OCI runtime did not start.
EXEC_START_TRIES = 3

async def exec_spec(engine: Engine, sandbox_id: str, spec: ExecSpec, *, default_user: str) -> ExecResult:
    """Run an exec request (the Runtime's ``exec``)."""
    return await run(
        engine,
        sandbox_id,
        wrapped(spec, sandbox_id),
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
    """Run ``argv`` (wrapped), retrying an exec the OCI runtime failed to start.

    Under load ``runsc exec`` now and then fails before the command exists ("OCI
    runtime exec failed"), and dockerd writes its complaint into the output stream. The
    wrapper's pid line is what shows the command ran: with nothing at all on stderr,
    nothing ran, so trying again cannot run it twice, and what dockerd said is an error,
    never the output."""
    for attempt in range(EXEC_START_TRIES):
        output, code, took = await run_once(
            engine, sandbox_id, argv, user=user, env=env, cwd=cwd, stdin=stdin,
            timeout=timeout, max_output=max_output,
        )
        if not output.never_ran(code):
            return output.result(code, took)
        complaint = output.complaint().decode("utf-8", "replace").strip()
        log.warning("exec did not start (try %d): %s", attempt + 1, complaint, extra={"sandbox_id": sandbox_id})
        if not await lifecycle.is_alive(engine, sandbox_id):
            raise SandboxNotRunning(f"sandbox {sandbox_id} is not running", sandbox_id=sandbox_id)
        await anyio.sleep(0.05 * 2**attempt)
    raise RuntimeFailure(f"docker exec did not start the command: {complaint}", sandbox_id=sandbox_id)


async def run_once(
    engine: Engine,
    sandbox_id: str,
    argv: Sequence[str],
    *,
    user: str,
    env: dict[str, str] | None,
    cwd: str | None,
    stdin: bytes | None,
    timeout: float,
    max_output: int,
) -> tuple[WrappedOutput, int, float]:
    """One ``docker exec``: its output, exit code and duration."""
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
    output = WrappedOutput(max_output)
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
                        output.feed_out(msg.data)
                    else:
                        output.feed_err(msg.data)
        timed_out = scope.cancelled_caught
    except DockerError as exc:
        raise engine.translate(exc, sandbox_id) from None
    if timed_out:
        with anyio.CancelScope(shield=True):
            await kill_group(engine, sandbox_id, output.pid, user)
        raise output.timed_out(timeout, sandbox_id)
    code = await exit_code(engine, exe, sandbox_id)
    return output, code, anyio.current_time() - started


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
            kill_group_argv(pid),
            user=user,
            timeout=10.0,
            max_output=4096,
        )
    except HotbedError as exc:
        log.warning("could not kill timed-out command: %s", exc, extra={"sandbox_id": sandbox_id})
