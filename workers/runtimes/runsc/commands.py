"""Commands as ``runsc exec``: the road for images without the guest agent (no python3)
and for file verbs there.

The process is given whole as an OCI ``process`` file (user, groups, env, cwd), so
nothing in it depends on runsc's flag parsing. As with ``docker exec`` (the wrapper of
:mod:`workers.runtimes.commands`), the command reports its pid first on stderr and a
timeout kills its whole process group from inside the sandbox.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import msgspec
from anyio.abc import ByteReceiveStream

from hotbed.errors import HotbedError
from hotbed.protocol import ExecResult, ExecSpec
from workers.runtimes.commands import WrappedOutput, kill_group_argv, wrapped
from workers.runtimes.runsc import oci
from workers.runtimes.runsc.cli import Runsc

log = logging.getLogger(__name__)

# After the command exits, how long its output may still drain (a background child
# that keeps the pipe open does not hold the answer longer than this).
DRAIN_S = 0.5


class Target(msgspec.Struct, frozen=True, kw_only=True):
    """What a command needs to know of its sandbox."""

    sandbox_id: str
    dir: Path
    env: list[str]
    cwd: str
    flags: list[str]


async def run(
    runsc: Runsc,
    target: Target,
    argv: Sequence[str],
    *,
    ident: oci.Identity,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    stdin: bytes | None = None,
    timeout: float,
    max_output: int,
) -> ExecResult:
    sid = target.sandbox_id
    spec = oci.process(
        list(argv), env=oci.merge_env(target.env, env or {}, home=ident.home), cwd=cwd or target.cwd, ident=ident
    )
    spec_file = anyio.Path(target.dir / f"exec-{secrets.token_hex(6)}.json")
    try:
        await spec_file.write_bytes(msgspec.json.encode(spec))
    except FileNotFoundError:
        # The state directory is gone: so is the sandbox.
        raise runsc.failure("exec", sid, 1, b"does not exist") from None
    output = WrappedOutput(max_output)
    started = anyio.current_time()

    async def pump(stream: ByteReceiveStream | None, feed: Callable[[bytes], None]) -> None:
        if stream is None:
            return
        async for chunk in stream:
            feed(chunk)

    try:
        proc = await anyio.open_process(
            runsc.argv(["exec", "--process", os.fspath(spec_file), sid], target.flags),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        )
    except OSError as exc:
        await spec_file.unlink(missing_ok=True)
        raise runsc.failure("exec", sid, 1, str(exc).encode()) from None
    timed_out = False
    try:
        with anyio.move_on_after(timeout) as scope:
            async with anyio.create_task_group() as tg:
                pumps = anyio.CancelScope()

                async def pumps_task() -> None:
                    with pumps:
                        async with anyio.create_task_group() as inner:
                            inner.start_soon(pump, proc.stdout, output.feed_out)
                            inner.start_soon(pump, proc.stderr, output.feed_err)

                tg.start_soon(pumps_task)
                if proc.stdin is not None:
                    try:
                        await proc.stdin.send(stdin or b"")
                    except (anyio.BrokenResourceError, BrokenPipeError):
                        pass
                    await proc.stdin.aclose()
                await proc.wait()
                pumps.deadline = anyio.current_time() + DRAIN_S
        timed_out = scope.cancelled_caught
    finally:
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.aclose()
            await spec_file.unlink(missing_ok=True)
    if timed_out:
        with anyio.CancelScope(shield=True):
            await kill_group(runsc, target, output.pid, ident)
        raise output.timed_out(timeout, sid)
    code = proc.returncode if proc.returncode is not None else -1
    if output.never_ran(code):
        # runsc's own complaint (no such sandbox, not running), not the command's.
        raise runsc.failure("exec", sid, code, output.complaint())
    return output.result(code, anyio.current_time() - started)


async def exec_spec(runsc: Runsc, target: Target, spec: ExecSpec, *, ident: oci.Identity) -> ExecResult:
    return await run(
        runsc, target, wrapped(spec, target.sandbox_id), ident=ident, env=spec.env, cwd=spec.cwd,
        stdin=spec.stdin, timeout=spec.timeout, max_output=spec.max_output,
    )


async def kill_group(runsc: Runsc, target: Target, pid: int | None, ident: oci.Identity) -> None:
    # As the command's own user: a root exec has no CAP_KILL over a non-root
    # sandbox's processes under gVisor.
    if not pid or pid <= 1:
        return
    try:
        await run(
            runsc, target,
            kill_group_argv(pid),
            ident=ident, timeout=10.0, max_output=4096,
        )
    except HotbedError as exc:
        log.warning("could not kill timed-out command: %s", exc, extra={"sandbox_id": target.sandbox_id})
