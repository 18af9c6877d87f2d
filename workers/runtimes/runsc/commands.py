"""Commands as ``runsc exec``: the road for images without the guest agent (no python3)
and for file verbs there.

The process is given whole as an OCI ``process`` file (user, groups, env, cwd), so
nothing in it depends on runsc's flag parsing. As with ``docker exec`` (same wrapper as
:mod:`workers.runtimes.docker.commands`), the command reports its pid first on stderr
and a timeout kills its whole process group from inside the sandbox.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
from collections.abc import Sequence
from pathlib import Path

import anyio
import msgspec
from anyio.abc import ByteReceiveStream

from hotbed.errors import ExecTimeout, HotbedError, InvalidRequest
from hotbed.protocol import ExecResult, ExecSpec
from workers.runtimes.docker.commands import PID_MARK, SHELL_WRAP, WRAP
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


class _Output:
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


def wrapped(spec: ExecSpec, sandbox_id: str) -> list[str]:
    if spec.shell is not None:
        return ["/bin/sh", "-c", SHELL_WRAP, "sh", spec.shell]
    if spec.argv:
        return ["/bin/sh", "-c", WRAP, "sh", *spec.argv]
    raise InvalidRequest("exec needs argv or shell", sandbox_id=sandbox_id)


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
    out, err = _Output(max_output), _Output(max_output)
    pid: int | None = None
    pending = bytearray()
    started = anyio.current_time()

    def on_err(data: bytes) -> None:
        nonlocal pid
        if pid is not None:
            err.feed(data)
            return
        pending.extend(data)
        nl = pending.find(b"\n")
        if nl >= 0 and pending.startswith(PID_MARK):
            pid = int(pending[len(PID_MARK) : nl])
            err.feed(bytes(pending[nl + 1 :]))
        elif nl >= 0 or len(pending) > 64:
            pid = -1
            err.feed(bytes(pending))

    async def pump(stream: ByteReceiveStream | None, feed: object) -> None:
        if stream is None:
            return
        async for chunk in stream:
            feed(chunk)  # type: ignore[operator]

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
                            inner.start_soon(pump, proc.stdout, out.feed)
                            inner.start_soon(pump, proc.stderr, on_err)

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
            await kill_group(runsc, target, pid, ident)
        raise ExecTimeout(
            f"command ran past its {timeout:g}s timeout and was killed",
            sandbox_id=sid,
            detail={
                "stdout": bytes(out.buf[-4096:]).decode("utf-8", "replace"),
                "stderr": bytes(err.buf[-4096:]).decode("utf-8", "replace"),
                "timeout": timeout,
            },
        )
    code = proc.returncode if proc.returncode is not None else -1
    if pid is None and code != 0:
        # runsc's own complaint (no such sandbox, not running), not the command's.
        raise runsc.failure("exec", sid, code, bytes(pending) + bytes(err.buf))
    return ExecResult(
        exit_code=code, stdout=bytes(out.buf), stderr=bytes(err.buf),
        truncated=bool(out.dropped or err.dropped), duration_s=anyio.current_time() - started,
    )


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
            ["/bin/sh", "-c", f"kill -s KILL -{pid} 2>/dev/null; kill -s KILL {pid} 2>/dev/null; true"],
            ident=ident, timeout=10.0, max_output=4096,
        )
    except HotbedError as exc:
        log.warning("could not kill timed-out command: %s", exc, extra={"sandbox_id": target.sandbox_id})
