"""The async SDK: ``Sandbox.create(...)``, ``sb.exec(...)``, files, ``sb.terminate()``.

Every call has a deadline and raises a typed :mod:`hotbed.errors` exception; none can
hang. A create goes through the scheduler; everything else goes straight to the
command stream of the sandbox's worker, and the agent-grade calls (streaming exec,
shell sessions, background processes, PTYs, directory watches) through the sandbox's
guest agent. What they return lives in :mod:`hotbed.handles`; file and directory
copies in :mod:`hotbed.transfer`.
"""

from __future__ import annotations

import asyncio
import builtins
import codecs
import inspect
import os
import secrets
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import msgspec

from hotbed import protocol, transfer
from hotbed.client import COMMAND_SLACK_S, OP_TIMEOUT_S, Client
from hotbed.errors import FileTooLarge, InvalidRequest, SandboxNotFound
from hotbed.handles import CommandResult as CommandResult
from hotbed.handles import ExecStream, Process, Pty, Session, WatchEvent
from hotbed.protocol import (
    DEFAULT_EXEC_TIMEOUT_S,
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT_S,
    DirListing,
    ExecResult,
    ExecSpec,
    FileContent,
    FileEntry,
    FileStat,
    NetworkMode,
    NetworkPolicy,
    PortExposed,
    ProcessInfo,
    ProcessListing,
    Resources,
    SandboxCreated,
    SandboxSpec,
)
from hotbed.records import SandboxRecord
from hotbed.streaming import Streamed

CREATE_TIMEOUT_S = 120.0

# One client per event loop, dropped with its loop: keyed by the loop object itself,
# since an id() is reused once a closed loop is freed.
_default_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Client] = (
    weakref.WeakKeyDictionary()
)
_event_decode = msgspec.msgpack.Decoder(list[tuple[str, str, bool]]).decode

# What ``exec(on_stdout=..., on_stderr=...)`` calls with each piece of output (decoded
# text; a character split across two pieces arrives whole); may be a coroutine function.
OutputCallback = Callable[[str], Any]


def default_client() -> Client:
    """A client for the running event loop, from HOTBED_REDIS_URL / HOTBED_PREFIX."""
    loop = asyncio.get_running_loop()
    client = _default_clients.get(loop)
    if client is None:
        client = _default_clients[loop] = Client()
    return client


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
        record: SandboxRecord | None = None,
    ) -> None:
        self.id = sandbox_id
        self.worker_id = worker_id
        self.path = path
        self.startup_s = startup_s
        # The record this handle was made from (``Sandbox.list``), as it was then;
        # ``info()`` reads it afresh.
        self.record = record
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
        auto_pause_after: float | None = None,
        tags: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        template: str | None = None,
        worker_tags: dict[str, str] | None = None,
        network: NetworkMode | None = None,
        allow: builtins.list[str] | None = None,
        allow_unisolated: bool = False,
        client: Client | None = None,
        request_timeout: float = CREATE_TIMEOUT_S,
    ) -> Sandbox:
        """Create a sandbox and return once it can run commands.

        ``gpu``: ``"H100"``, ``"H100:2"``, ``"any"``; the sandbox gets exactly those GPUs.
        ``worker_tags``: only workers carrying all these operator tags (zone, node pool).
        ``auto_pause_after``: after this many seconds without a request the sandbox is
        checkpointed to disk (``paused (auto)``) and the next request, from any client,
        resumes it first; None takes the node's default, 0 never pauses it.
        ``network``: ``"none"`` (loopback only), ``"egress"`` (only what ``allow`` lists:
        ``"10.0.0.0/8"``, ``"10.1.2.3:443"``, ``"pypi.org:443"``...) or ``"open"`` (public
        addresses; the worker may forbid it); ``allow`` alone means ``"egress"``. Not
        stated: none, or for a ``template`` the template's network (its warm pool is
        the one set with no network). A bad entry raises InvalidRequest.
        ``allow_unisolated``: may run on a worker whose runtime does not isolate it
        (``process``, ``sim``); by default only gVisor workers take it, and with none
        live the create fails with NoMatchingWorker.
        """
        spec = SandboxSpec(
            image=image,
            resources=Resources(cpu=cpu, memory_mb=memory_mb, gpu=gpu),
            timeout=timeout,
            idle_timeout=idle_timeout,
            auto_pause_after=auto_pause_after,
            tags=dict(tags or {}),
            env=dict(env or {}),
            workdir=workdir,
            user=user,
            template=template,
            worker_tags=dict(worker_tags or {}),
            network=(
                None if network is None and not allow
                else NetworkPolicy(mode=network or "egress", allow=list(allow or []))
            ),
            allow_unisolated=allow_unisolated,
        )
        c = client or default_client()
        reply: protocol.Reply | None = None
        if template and c.tenant is None:
            # Warm pool first: a claim in Redis, no scheduler or worker round trip
            # (operators only: pools are shared, so a tenant's create goes through the
            # scheduler, which holds it to the tenant's quota).
            from hotbed.templates import claim_nowait

            reply = await claim_nowait(spec, client=c)
        if reply is None:
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
            raise SandboxNotFound(
                f"sandbox {sandbox_id} has ended ({rec.state}: {rec.reason})",
                sandbox_id=sandbox_id,
            )
        return cls(sandbox_id, rec.worker, client=client, path=rec.path)

    @classmethod
    async def list(
        cls, *, tags: dict[str, str] | None = None, client: Client | None = None
    ) -> builtins.list[Sandbox]:
        """Handles on the live sandboxes (those carrying all of ``tags``), oldest first;
        each keeps the record it was listed from in :attr:`record`."""
        return [
            cls(rec.id, rec.worker, client=client, path=rec.path, record=rec)
            for rec in await cls.list_records(tags=tags, client=client)
        ]

    @classmethod
    async def list_records(
        cls, *, tags: dict[str, str] | None = None, client: Client | None = None
    ) -> builtins.list[SandboxRecord]:
        """The records of the live sandboxes (those carrying all of ``tags``), oldest first."""
        return await (client or default_client()).records(tags=tags)

    async def info(self) -> SandboxRecord:
        return await self.client.record(self.id)

    async def set_timeout(self, seconds: float) -> None:
        """End the sandbox ``seconds`` from now instead of when it would have: longer or
        shorter than its create-time ``timeout``. Its record's ``timeout`` follows."""
        if not 0 < seconds <= protocol.MAX_TIMEOUT_S:
            raise InvalidRequest(
                f"timeout must be in (0, {protocol.MAX_TIMEOUT_S:g}] seconds, got {seconds}",
                sandbox_id=self.id,
            )
        await self.client.worker_request(
            self.worker_id, protocol.UpdateSandbox(sandbox_id=self.id, timeout=float(seconds)),
            timeout=OP_TIMEOUT_S,
        )

    async def set_tags(self, tags: dict[str, str]) -> None:
        """Replace the sandbox's tags (``Sandbox.list(tags=...)`` finds it by them)."""
        await self.client.worker_request(
            self.worker_id, protocol.UpdateSandbox(sandbox_id=self.id, tags=dict(tags)),
            timeout=OP_TIMEOUT_S,
        )

    async def terminate(self) -> None:
        """End the sandbox; a sandbox that has already ended is not an error."""
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
        idle_timeout: float | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandResult:
        """Run a command: ``exec("python3", "-c", "print(1)")`` or ``exec("a | b", shell=True)``.

        ``on_stdout`` / ``on_stderr`` are called with the output as it is produced (the
        result still holds it all, up to ``max_output``). Raises ExecTimeout if it runs
        past ``timeout`` (the sandbox stays usable).
        """
        if not argv:
            raise InvalidRequest("exec needs a command")
        if timeout <= 0:
            raise InvalidRequest(f"timeout must be positive, got {timeout}")
        if on_stdout is not None or on_stderr is not None:
            if user is not None:
                raise InvalidRequest("output callbacks and user= do not go together", sandbox_id=self.id)
            stream = self.exec_stream(
                *argv, shell=shell, env=env, cwd=cwd, timeout=timeout, idle_timeout=idle_timeout,
                max_output=max_output, stdin=stdin,
            )
            return await _with_callbacks(stream, on_stdout, on_stderr)
        spec = ExecSpec(
            argv=None if shell else list(argv),
            shell=" ".join(argv) if shell else None,
            env=dict(env or {}),
            cwd=cwd,
            timeout=timeout,
            max_output=max_output,
            user=user,
            stdin=stdin.encode() if isinstance(stdin, str) else stdin,
            idle_timeout=idle_timeout,
        )
        reply = await self.client.worker_request(
            self.worker_id, protocol.Exec(sandbox_id=self.id, exec=spec), timeout=timeout + COMMAND_SLACK_S
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
            raise FileTooLarge(
                f"{len(payload)} bytes is over the {protocol.MAX_FILE_BYTES}-byte limit of one write "
                "(upload_file streams a file of any size)",
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

    async def list_files(self, path: str = ".", *, depth: int = 1) -> builtins.list[FileEntry]:
        """The entries of directory ``path``; with ``depth`` > 1 also those of its
        subdirectories, that many levels down (sorted by path; ``name`` is the last part)."""
        if depth < 1:
            raise InvalidRequest(f"depth must be at least 1, got {depth}", sandbox_id=self.id)
        reply = await self.client.worker_request(
            self.worker_id, protocol.ListFiles(sandbox_id=self.id, path=path, depth=depth),
            timeout=OP_TIMEOUT_S,
        )
        assert isinstance(reply, DirListing)
        return reply.entries

    async def stat(self, path: str) -> FileEntry:
        """What is at ``path`` (a symlink's target, with ``is_symlink`` set); FileNotFound
        when nothing is."""
        reply = await self._file_op(protocol.StatFile(sandbox_id=self.id, path=path))
        assert isinstance(reply, FileStat) and reply.entry is not None
        return reply.entry

    async def exists(self, path: str) -> bool:
        reply = await self._file_op(protocol.StatFile(sandbox_id=self.id, path=path, missing_ok=True))
        assert isinstance(reply, FileStat)
        return reply.entry is not None

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file, a symlink or an empty directory; a whole tree with
        ``recursive``. FileNotFound when nothing is there, DirectoryNotEmpty for a
        directory with entries and no ``recursive``."""
        await self._file_op(protocol.RemoveFile(sandbox_id=self.id, path=path, recursive=recursive))

    async def make_dir(self, path: str, *, parents: bool = True, exist_ok: bool = True,
                       mode: int = 0o755) -> None:
        """Make directory ``path`` (and its missing parents unless ``parents=False``);
        FileExists if something is there (with ``exist_ok``: unless it is a directory)."""
        await self._file_op(protocol.MakeDir(
            sandbox_id=self.id, path=path, parents=parents, exist_ok=exist_ok, mode=mode,
        ))

    async def rename(self, src: str, dst: str) -> None:
        """Move ``src`` to ``dst``, replacing a file there."""
        await self._file_op(protocol.RenameFile(sandbox_id=self.id, src=src, dst=dst))

    async def _file_op(self, body: protocol.Message) -> protocol.Reply:
        return await self.client.worker_request(self.worker_id, body, timeout=OP_TIMEOUT_S)

    # ---------------------------------------------------------------- snapshots

    async def snapshot(self, name: str | None = None, *, timeout: float = OP_TIMEOUT_S) -> str:
        """Checkpoint this sandbox (memory, processes, files; it keeps running) into a
        new template that sandboxes can be created from; returns the template's name."""
        name = name or f"snap-{self.id}-{secrets.token_hex(3)}"
        reply = await self.client.worker_request(
            self.worker_id, protocol.SnapshotSandbox(sandbox_id=self.id, name=name), timeout=timeout
        )
        assert isinstance(reply, protocol.TemplateReady)
        return reply.name

    async def fork(self, n: int, *, timeout: float = DEFAULT_TIMEOUT_S, **create: Any) -> builtins.list[Sandbox]:
        """``n`` independent sandboxes restored from a fresh checkpoint of this one."""
        from hotbed.templates import delete_template

        if n < 1:
            raise InvalidRequest(f"fork needs n >= 1, got {n}")
        rec = await self.info()
        name = await self.snapshot()
        children: list[Sandbox | None] = [None] * n

        async def one(i: int) -> None:
            children[i] = await Sandbox.create(
                template=name, cpu=rec.cpu or 1.0, memory_mb=rec.memory_mb or 512,
                timeout=timeout, client=self._client, **create,
            )

        try:
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(one, i)
        except BaseException:
            with anyio.CancelScope(shield=True):
                for child in children:
                    if child is not None:
                        await child.terminate()
            raise
        finally:
            # The snapshot served its purpose; workers collect it once unreferenced.
            with anyio.CancelScope(shield=True):
                await delete_template(name, client=self.client)
        return [c for c in children if c is not None]

    async def pause(self, *, timeout: float = OP_TIMEOUT_S) -> None:
        """Checkpoint to the worker's disk and stop: memory is freed, files and processes
        kept; survives a worker restart. Commands fail (SandboxNotRunning) until resume."""
        await self.client.worker_request(
            self.worker_id, protocol.PauseSandbox(sandbox_id=self.id), timeout=timeout
        )

    async def resume(self, *, timeout: float = OP_TIMEOUT_S) -> None:
        """Restore a paused sandbox: same id, files and running processes."""
        await self.client.worker_request(
            self.worker_id, protocol.ResumeSandbox(sandbox_id=self.id), timeout=timeout
        )

    async def spawn(self, command: str) -> None:
        """Start a long-running shell command as a child of the sandbox's init, so it is
        part of snapshots, forks and pause/resume (under gVisor, processes started by a
        plain exec are not restored). Output goes to /tmp/.hotbed/spawn.log."""
        if "\n" in command:
            raise InvalidRequest("spawn takes one line (use ';' or a script file)")
        from hotbed.templates import SPAWN_SCRIPT

        res = await self.exec("/bin/sh", "-c", SPAWN_SCRIPT, "sh", command, timeout=30.0)
        if not res.ok:
            raise InvalidRequest(f"could not spawn {command!r}: {res.stderr.strip()}", sandbox_id=self.id)

    # ----------------------------------------------------------- streaming exec

    def exec_stream(
        self,
        *argv: str,
        shell: bool = False,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float = DEFAULT_EXEC_TIMEOUT_S,
        idle_timeout: float | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
        stdin: bytes | str | None = None,
        stdin_open: bool = False,
    ) -> ExecStream:
        """Run a command and get its output as it is produced::

            async with sb.exec_stream("make", "test") as out:
                async for chunk in out:
                    print(chunk.stream, chunk.text, end="")
            print(out.result.exit_code)

        ``timeout`` bounds the whole command, ``idle_timeout`` the time without output
        (both raise ExecTimeout); past ``max_output`` bytes per stream the rest is
        dropped and ``result.truncated`` is set.

        ``stdin`` is the command's whole input; with ``stdin_open`` it is only the start,
        and the stream's :meth:`~ExecStream.write` streams the rest at the command's pace
        (``close_stdin`` ends it). That needs the guest agent (UnsupportedRequest, raised
        from the stream, on an image without python3).
        """
        if not argv:
            raise InvalidRequest("exec needs a command")
        spec = ExecSpec(
            argv=None if shell else list(argv), shell=" ".join(argv) if shell else None,
            env=dict(env or {}), cwd=cwd, timeout=timeout, max_output=max_output,
            stdin=stdin.encode() if isinstance(stdin, str) else stdin, idle_timeout=idle_timeout,
        )
        return ExecStream(Streamed(
            self.client, self.worker_id, self.id,
            lambda key: protocol.Exec(sandbox_id=self.id, exec=spec, stream_to=key, stdin_open=stdin_open),
            timeout=timeout + COMMAND_SLACK_S,
        ), input_timeout=timeout + COMMAND_SLACK_S)

    # -------------------------------------------------------------------- ports

    async def expose(self, port: int, *, timeout: float = OP_TIMEOUT_S) -> PortExposed:
        """Make TCP ``port`` inside the sandbox reachable from outside it: returns where
        on the worker (``.address`` is ``host:port``, ``.url`` its ``http://`` form), for
        HTTP or any TCP protocol. Works with ``network="none"``; the same port again
        gets the same address; it closes when the sandbox ends."""
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise InvalidRequest(f"port must be in 1-65535, got {port!r}", sandbox_id=self.id)
        reply = await self.client.worker_request(
            self.worker_id, protocol.ExposePort(sandbox_id=self.id, port=port), timeout=timeout
        )
        assert isinstance(reply, PortExposed)
        return reply

    # ----------------------------------------------------------------- sessions

    def shell(self, name: str = "default", *, env: dict[str, str] | None = None,
              cwd: str | None = None) -> Session:
        """A persistent bash session (created in the sandbox on its first command)."""
        return Session(self, name, env=env, cwd=cwd)

    # ---------------------------------------------------------------- processes

    async def start_process(
        self, *argv: str, shell: bool = False, env: dict[str, str] | None = None,
        cwd: str | None = None, stdin_open: bool = False,
    ) -> Process:
        """Start a detached background process; read, wait, signal it later (from any
        client: ``sb.process(pid)``)."""
        if not argv:
            raise InvalidRequest("start_process needs a command")
        spec = ExecSpec(
            argv=None if shell else list(argv), shell=" ".join(argv) if shell else None,
            env=dict(env or {}), cwd=cwd, timeout=0.0,
        )
        body = protocol.ProcessStart(sandbox_id=self.id, exec=spec)
        if stdin_open:
            body = protocol.ProcessStart(
                sandbox_id=self.id, exec=msgspec.structs.replace(spec, stdin=b"")
            )
        reply = await self.client.worker_request(self.worker_id, body, timeout=OP_TIMEOUT_S)
        assert isinstance(reply, ProcessInfo)
        return Process(self, reply.pid, reply)

    def process(self, pid: int) -> Process:
        """Reattach to a background process by id."""
        return Process(self, pid)

    async def processes(self) -> builtins.list[ProcessInfo]:
        reply = await self.client.worker_request(
            self.worker_id, protocol.ProcessList(sandbox_id=self.id), timeout=OP_TIMEOUT_S
        )
        assert isinstance(reply, ProcessListing)
        return reply.procs

    # ---------------------------------------------------------------------- pty

    def pty(self, argv: builtins.list[str] | None = None, *, rows: int = 24, cols: int = 80,
            env: dict[str, str] | None = None, timeout: float = 3600.0) -> Pty:
        """An interactive terminal (``hotbed shell ID`` is built on it)."""
        return Pty(self, Streamed(
            self.client, self.worker_id, self.id,
            lambda key: protocol.PtyOpen(
                sandbox_id=self.id, stream_to=key, argv=list(argv or ["/bin/bash", "-l"]),
                rows=rows, cols=cols, env=dict(env or {}), timeout=timeout,
            ),
            timeout=timeout + COMMAND_SLACK_S,
        ))

    # ------------------------------------------------------ copies and watches

    async def upload_dir(self, local: str | os.PathLike[str], remote: str, *,
                         chunk_bytes: int = transfer.CHUNK_BYTES) -> int:
        """Copy a local directory's contents into ``remote`` (made if missing), streamed
        as a tar in chunks: any size, in bounded memory. Returns the tar's size."""
        return await transfer.upload_dir(self, local, remote, chunk_bytes=chunk_bytes)

    async def download_dir(self, remote: str, local: str | os.PathLike[str], *,
                           chunk_bytes: int = transfer.CHUNK_BYTES) -> int:
        """Copy ``remote``'s contents into a local directory, streamed as a tar in
        chunks: any size, in bounded memory. Returns the tar's size."""
        return await transfer.download_dir(self, remote, local, chunk_bytes=chunk_bytes)

    async def upload_file(self, local: str | os.PathLike[str], remote: str, *,
                          chunk_bytes: int = transfer.CHUNK_BYTES, mode: int = 0o644) -> int:
        """Copy a local file of any size, in chunks."""
        return await transfer.upload_file(self, local, remote, chunk_bytes=chunk_bytes, mode=mode)

    async def download_file(self, remote: str, local: str | os.PathLike[str], *,
                            chunk_bytes: int = transfer.CHUNK_BYTES) -> int:
        """Copy a sandbox file of any size to a local path, in chunks."""
        return await transfer.download_file(self, remote, local, chunk_bytes=chunk_bytes)

    async def watch(self, path: str, *, timeout: float = 3600.0,
                    interval: float = 0.2) -> AsyncIterator[WatchEvent]:
        """Created/modified/deleted events under ``path`` until ``timeout`` (or until the
        caller stops iterating: use ``contextlib.aclosing``)."""
        streamed = Streamed(
            self.client, self.worker_id, self.id,
            lambda key: protocol.WatchDir(sandbox_id=self.id, path=path, stream_to=key,
                                          timeout=timeout, interval=interval),
            timeout=timeout,
        )
        async with streamed:
            async for field, value in streamed.entries():
                if field == b"v":
                    for kind, p, is_dir in _event_decode(value):
                        yield WatchEvent(kind, p, is_dir)  # type: ignore[arg-type]
            streamed.final()


async def _with_callbacks(
    stream: ExecStream, on_stdout: OutputCallback | None, on_stderr: OutputCallback | None
) -> CommandResult:
    """Run ``stream`` to its end, handing each piece of output to its callback."""
    decoders = {
        "stdout": codecs.getincrementaldecoder("utf-8")("replace"),
        "stderr": codecs.getincrementaldecoder("utf-8")("replace"),
    }
    callbacks = {"stdout": on_stdout, "stderr": on_stderr}

    async def deliver(name: str, text: str) -> None:
        fn = callbacks[name]
        if fn is not None and text:
            res = fn(text)
            if inspect.isawaitable(res):
                await res

    async with stream:
        result = await stream.collect(on_chunk=lambda c: deliver(c.stream, decoders[c.stream].decode(c.data)))
    for name, dec in decoders.items():
        await deliver(name, dec.decode(b"", final=True))
    return result
