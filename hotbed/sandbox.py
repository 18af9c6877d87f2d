"""The async SDK: ``Sandbox.create(...)``, ``sb.exec(...)``, files, ``sb.terminate()``.

Every call has a deadline and raises a typed :mod:`hotbed.errors` exception; none can
hang. A create goes through the scheduler; everything else goes straight to the
command stream of the sandbox's worker.
"""

from __future__ import annotations

from typing import Any

import anyio
import msgspec

from hotbed import protocol
from hotbed.client import Client
from hotbed.errors import InvalidRequest
from hotbed.protocol import (
    DEFAULT_EXEC_TIMEOUT_S,
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT_S,
    DirListing,
    ExecResult,
    ExecSpec,
    FileContent,
    FileEntry,
    Resources,
    SandboxCreated,
    SandboxSpec,
)
from hotbed.records import SandboxRecord

# Files and short commands: how long the control plane may take on top of the work.
OP_TIMEOUT_S = 60.0
CREATE_TIMEOUT_S = 120.0

_default_clients: dict[int, Client] = {}


def default_client() -> Client:
    """A client for the running event loop, from HOTBED_REDIS_URL / HOTBED_PREFIX."""
    import asyncio

    loop_id = id(asyncio.get_running_loop())
    client = _default_clients.get(loop_id)
    if client is None:
        client = _default_clients[loop_id] = Client()
    return client


class CommandResult(msgspec.Struct, frozen=True):
    exit_code: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    truncated: bool = False
    duration_s: float = 0.0

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @classmethod
    def from_reply(cls, r: ExecResult) -> CommandResult:
        return cls(r.exit_code, r.stdout, r.stderr, r.truncated, r.duration_s)


class Sandbox:
    """A handle on one sandbox. Cheap to make; holds no resources of its own."""

    def __init__(
        self,
        sandbox_id: str,
        worker_id: str,
        *,
        client: Client | None = None,
        path: str = "cold",
        startup_s: float = 0.0,
    ) -> None:
        self.id = sandbox_id
        self.worker_id = worker_id
        self.path = path
        self.startup_s = startup_s
        self._client = client

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, worker={self.worker_id!r})"

    @property
    def client(self) -> Client:
        return self._client or default_client()

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.terminate()

    # --------------------------------------------------------------- lifecycle

    @classmethod
    async def create(
        cls,
        image: str = "hotbed/base",
        *,
        cpu: float = 1.0,
        memory_mb: int = 512,
        gpu: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        idle_timeout: float | None = None,
        tags: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        template: str | None = None,
        client: Client | None = None,
        request_timeout: float = CREATE_TIMEOUT_S,
    ) -> Sandbox:
        """Create a sandbox and return once it can run commands."""
        spec = SandboxSpec(
            image=image,
            resources=Resources(cpu=cpu, memory_mb=memory_mb, gpu=gpu),
            timeout=timeout,
            idle_timeout=idle_timeout,
            tags=dict(tags or {}),
            env=dict(env or {}),
            workdir=workdir,
            user=user,
            template=template,
        )
        c = client or default_client()
        reply = await c.request(protocol.CreateSandbox(spec=spec), timeout=request_timeout)
        assert isinstance(reply, SandboxCreated)
        return cls(
            reply.sandbox_id, reply.worker_id, client=client, path=reply.path,
            startup_s=reply.startup_s,
        )

    @classmethod
    async def from_id(cls, sandbox_id: str, *, client: Client | None = None) -> Sandbox:
        """Reattach to a live sandbox; SandboxNotFound if it never existed or has ended."""
        c = client or default_client()
        rec = await c.record(sandbox_id)
        if rec.ended:
            from hotbed.errors import SandboxNotFound

            raise SandboxNotFound(
                f"sandbox {sandbox_id} has ended ({rec.state}: {rec.reason})",
                sandbox_id=sandbox_id,
            )
        return cls(sandbox_id, rec.worker, client=client, path=rec.path)

    @classmethod
    async def list(
        cls, *, tags: dict[str, str] | None = None, client: Client | None = None
    ) -> list[SandboxRecord]:
        return await (client or default_client()).records(tags=tags)

    async def info(self) -> SandboxRecord:
        return await self.client.record(self.id)

    async def terminate(self) -> None:
        """End the sandbox; a sandbox that has already ended is not an error."""
        from hotbed.errors import SandboxNotFound

        try:
            await self.client.worker_request(
                self.worker_id, protocol.Terminate(sandbox_id=self.id), timeout=OP_TIMEOUT_S
            )
        except SandboxNotFound:
            pass

    # ----------------------------------------------------------------- commands

    async def exec(
        self,
        *argv: str,
        shell: bool = False,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float = DEFAULT_EXEC_TIMEOUT_S,
        max_output: int = DEFAULT_MAX_OUTPUT,
        user: str | None = None,
        stdin: bytes | str | None = None,
    ) -> CommandResult:
        """Run a command: ``exec("python3", "-c", "print(1)")`` or ``exec("a | b", shell=True)``.

        Raises ExecTimeout if it runs past ``timeout`` (the sandbox stays usable).
        """
        if not argv:
            raise InvalidRequest("exec needs a command")
        if timeout <= 0:
            raise InvalidRequest(f"timeout must be positive, got {timeout}")
        spec = ExecSpec(
            argv=None if shell else list(argv),
            shell=" ".join(argv) if shell else None,
            env=dict(env or {}),
            cwd=cwd,
            timeout=timeout,
            max_output=max_output,
            user=user,
            stdin=stdin.encode() if isinstance(stdin, str) else stdin,
        )
        reply = await self.client.worker_request(
            self.worker_id, protocol.Exec(sandbox_id=self.id, exec=spec), timeout=timeout + 10.0
        )
        assert isinstance(reply, ExecResult)
        return CommandResult.from_reply(reply)

    async def run(self, command: str, **kwargs: Any) -> CommandResult:
        """Run a shell command string (``/bin/sh -c``)."""
        return await self.exec(command, shell=True, **kwargs)

    # -------------------------------------------------------------------- files

    async def write_file(self, path: str, data: bytes | str, *, mode: int = 0o644) -> int:
        payload = data.encode() if isinstance(data, str) else data
        if len(payload) > protocol.MAX_FILE_BYTES:
            from hotbed.errors import FileTooLarge

            raise FileTooLarge(
                f"{len(payload)} bytes is over the {protocol.MAX_FILE_BYTES}-byte limit of one write",
                sandbox_id=self.id,
            )
        reply = await self.client.worker_request(
            self.worker_id,
            protocol.WriteFile(sandbox_id=self.id, path=path, data=payload, mode=mode),
            timeout=OP_TIMEOUT_S,
        )
        assert isinstance(reply, protocol.FileWritten)
        return reply.size

    async def read_file(self, path: str) -> bytes:
        reply = await self.client.worker_request(
            self.worker_id, protocol.ReadFile(sandbox_id=self.id, path=path), timeout=OP_TIMEOUT_S
        )
        assert isinstance(reply, FileContent)
        return reply.data

    async def list_files(self, path: str = ".") -> list[FileEntry]:
        reply = await self.client.worker_request(
            self.worker_id, protocol.ListFiles(sandbox_id=self.id, path=path), timeout=OP_TIMEOUT_S
        )
        assert isinstance(reply, DirListing)
        return reply.entries
