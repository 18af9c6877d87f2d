"""``runsc`` invocations: one binary, one ``--root`` of hotbed's own (never dockerd's
state), ``--network=none``, each call a subprocess under a deadline.

runsc reads its configuration from the flags of every call, so a sandbox's flags
(``--nvproxy`` for a GPU sandbox) are kept with it and passed again on each call.
``create``/``restore`` leave the sandbox's processes running with whatever stdio they
were given: stderr goes to a log file, never to a pipe we would wait on forever.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from hotbed.errors import HotbedError, RuntimeFailure, SandboxNotFound, SandboxNotRunning

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 30.0
# Boot, restore and checkpoint of a large sandbox read or write its whole memory.
START_TIMEOUT_S = 120.0


class Runsc:
    def __init__(self, binary: str, root: Path, *, flags: Sequence[str] = ()) -> None:
        self.binary = binary
        self.root = root
        # Flags of every call (platform, debug), before the per-sandbox ones.
        self.flags = ["--root", os.fspath(root), "--network=none", *flags]

    def argv(self, args: Sequence[str], flags: Sequence[str] = ()) -> list[str]:
        return [self.binary, *self.flags, *flags, *args]

    def failure(self, what: str, sandbox_id: str, rc: int, err: bytes) -> HotbedError:
        text = err.decode("utf-8", "replace").strip().splitlines()
        msg = text[-1] if text else f"exit status {rc}"
        if "does not exist" in msg or "not found" in msg:
            return SandboxNotFound(f"sandbox {sandbox_id} has no runsc container", sandbox_id=sandbox_id)
        if "not running" in msg or "is stopped" in msg:
            return SandboxNotRunning(f"sandbox {sandbox_id}: {msg}", sandbox_id=sandbox_id)
        return RuntimeFailure(f"runsc {what}: {msg}", sandbox_id=sandbox_id)

    async def call(
        self,
        args: Sequence[str],
        *,
        sandbox_id: str = "",
        flags: Sequence[str] = (),
        timeout: float = CALL_TIMEOUT_S,
    ) -> bytes:
        """Run ``runsc <flags> <args>``; its stdout, or a typed error."""
        try:
            with anyio.fail_after(timeout):
                res = await anyio.run_process(self.argv(args, flags), check=False, stdin=subprocess.DEVNULL)
        except TimeoutError:
            raise RuntimeFailure(f"runsc {args[0]} took over {timeout:g}s", sandbox_id=sandbox_id) from None
        except OSError as exc:
            raise RuntimeFailure(f"cannot run {self.binary}: {exc.strerror}", sandbox_id=sandbox_id) from None
        if res.returncode != 0:
            raise self.failure(args[0], sandbox_id, res.returncode, res.stderr)
        return bytes(res.stdout)

    async def launch(
        self,
        args: Sequence[str],
        *,
        sandbox_id: str,
        flags: Sequence[str],
        stdio: tuple[int, int],
        log_path: Path,
        timeout: float = START_TIMEOUT_S,
    ) -> None:
        """``create``/``run --detach``/``restore --detach``: the sandbox keeps ``stdio``
        (its stdin, stdout) and writes its stderr to ``log_path``."""
        errlog = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            with anyio.fail_after(timeout):
                res = await anyio.run_process(
                    self.argv(args, flags), check=False, stdin=stdio[0], stdout=stdio[1], stderr=errlog,
                )
        except TimeoutError:
            raise RuntimeFailure(f"runsc {args[0]} took over {timeout:g}s", sandbox_id=sandbox_id) from None
        except OSError as exc:
            raise RuntimeFailure(f"cannot run {self.binary}: {exc.strerror}", sandbox_id=sandbox_id) from None
        finally:
            os.close(errlog)
        if res.returncode != 0:
            tail = await anyio.Path(log_path).read_bytes()
            raise self.failure(args[0], sandbox_id, res.returncode, tail[-2000:])

    async def state(self, sandbox_id: str, *, flags: Sequence[str] = ()) -> dict[str, Any] | None:
        """``runsc state``, or None if runsc has no such container."""
        try:
            out = await self.call(["state", sandbox_id], sandbox_id=sandbox_id, flags=flags)
        except SandboxNotFound:
            return None
        except RuntimeFailure as exc:
            if "does not exist" in exc.message or "cannot load" in exc.message:
                return None
            raise
        state: dict[str, Any] = json.loads(out)
        return state

    async def statuses(self) -> dict[str, str]:
        """Container id -> status ("running", "stopped", ...) of everything under root."""
        out = await self.call(["list", "--format=json"])
        found = json.loads(out or b"null") or []
        return {str(c.get("id")): str(c.get("status")) for c in found}
