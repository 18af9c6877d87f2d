"""A synchronous facade over the async SDK, for scripts and notebooks.

    from hotbed.sync import Sandbox

    with Sandbox.create("hotbed/base") as sb:
        print(sb.exec("python3", "-c", "print(6*7)").stdout)

One event loop (uvloop) runs in a daemon thread, started on first use and owned by an
anyio BlockingPortal; every call is a ``portal.call`` with the async SDK's own
deadlines, so a sync call can no more hang than an async one. ``close()`` stops the
loop and its Redis connections (also run at interpreter exit).

Live output is a plain iterator::

    with sb.exec_stream("make", "test") as out:
        for chunk in out:
            print(chunk.text, end="")
    print(out.result.exit_code)

or callbacks: ``sb.exec("make", on_stdout=print)`` (called on the loop's thread).
"""

from __future__ import annotations

import atexit
import builtins
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from hotbed import handles as _handles
from hotbed import sandbox as _async
from hotbed import templates as _templates
from hotbed.client import Client
from hotbed.handles import CommandResult, OutputChunk
from hotbed.protocol import FileEntry, PortExposed, ProcessInfo, ProcessOutput, TemplateReady
from hotbed.records import SandboxRecord

T = TypeVar("T")

_lock = threading.Lock()
_portal_cm: AbstractContextManager[BlockingPortal] | None = None
_portal: BlockingPortal | None = None
_client: Client | None = None


def _get_portal() -> BlockingPortal:
    global _portal_cm, _portal
    with _lock:
        if _portal is None:
            _portal_cm = start_blocking_portal("asyncio", {"use_uvloop": True})
            _portal = _portal_cm.__enter__()
        return _portal


def _call(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return _get_portal().call(fn, *args)


def _default_client() -> Client:
    global _client
    if _client is None:
        _client = _call(_make_client)
    return _client


async def _make_client() -> Client:
    return Client()


def close() -> None:
    """Close the shared client and stop the background loop."""
    global _portal_cm, _portal, _client
    with _lock:
        if _portal is None:
            return
        if _client is not None:
            _portal.call(_client.aclose)
            _client = None
        assert _portal_cm is not None
        _portal_cm.__exit__(None, None, None)
        _portal, _portal_cm = None, None


atexit.register(close)


class Sandbox:
    """Blocking twin of :class:`hotbed.sandbox.Sandbox`; same arguments, same errors."""

    def __init__(self, inner: _async.Sandbox) -> None:
        self._inner = inner

    @property
    def id(self) -> str:
        return self._inner.id

    @property
    def worker_id(self) -> str:
        return self._inner.worker_id

    @property
    def path(self) -> str:
        return self._inner.path

    @property
    def record(self) -> SandboxRecord | None:
        """The record this handle was listed from (``Sandbox.list``), if it was."""
        return self._inner.record

    def __repr__(self) -> str:
        return f"hotbed.sync.Sandbox(id={self.id!r})"

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    @classmethod
    def create(cls, image: str = "hotbed/base", **kwargs: Any) -> Sandbox:
        kwargs.setdefault("client", _default_client())
        inner = _call(lambda: _async.Sandbox.create(image, **kwargs))
        return cls(inner)

    @classmethod
    def from_id(cls, sandbox_id: str) -> Sandbox:
        client = _default_client()
        return cls(_call(lambda: _async.Sandbox.from_id(sandbox_id, client=client)))

    @classmethod
    def list(cls, *, tags: dict[str, str] | None = None) -> builtins.list[Sandbox]:
        """Handles on the live sandboxes (each with its :attr:`record`)."""
        client = _default_client()
        return [cls(sb) for sb in _call(lambda: _async.Sandbox.list(tags=tags, client=client))]

    @classmethod
    def list_records(cls, *, tags: dict[str, str] | None = None) -> builtins.list[SandboxRecord]:
        client = _default_client()
        return _call(lambda: _async.Sandbox.list_records(tags=tags, client=client))

    def set_timeout(self, seconds: float) -> None:
        _call(lambda: self._inner.set_timeout(seconds))

    def set_tags(self, tags: dict[str, str]) -> None:
        _call(lambda: self._inner.set_tags(tags))

    def exec(self, *argv: str, **kwargs: Any) -> CommandResult:
        return _call(lambda: self._inner.exec(*argv, **kwargs))

    def exec_stream(self, *argv: str, **kwargs: Any) -> ExecStream:
        """A command's output as it is produced: ``with sb.exec_stream(...) as out:
        for chunk in out: ...``; then ``out.result``."""
        return ExecStream(self._inner.exec_stream(*argv, **kwargs))

    def run(self, command: str, **kwargs: Any) -> CommandResult:
        return _call(lambda: self._inner.run(command, **kwargs))

    def write_file(self, path: str, data: bytes | str, *, mode: int = 0o644) -> int:
        return _call(lambda: self._inner.write_file(path, data, mode=mode))

    def read_file(self, path: str) -> bytes:
        return _call(lambda: self._inner.read_file(path))

    def list_files(self, path: str = ".", *, depth: int = 1) -> builtins.list[FileEntry]:
        return _call(lambda: self._inner.list_files(path, depth=depth))

    def stat(self, path: str) -> FileEntry:
        return _call(lambda: self._inner.stat(path))

    def exists(self, path: str) -> bool:
        return _call(lambda: self._inner.exists(path))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        _call(lambda: self._inner.remove(path, recursive=recursive))

    def make_dir(self, path: str, **kwargs: Any) -> None:
        _call(lambda: self._inner.make_dir(path, **kwargs))

    def rename(self, src: str, dst: str) -> None:
        _call(lambda: self._inner.rename(src, dst))

    def info(self) -> SandboxRecord:
        return _call(self._inner.info)

    def terminate(self) -> None:
        _call(self._inner.terminate)

    # ------------------------------------------------------- snapshots and pools

    def snapshot(self, name: str | None = None, **kwargs: Any) -> str:
        """Checkpoint into a new template; returns its name."""
        return _call(lambda: self._inner.snapshot(name, **kwargs))

    def fork(self, n: int, **kwargs: Any) -> builtins.list[Sandbox]:
        return [Sandbox(c) for c in _call(lambda: self._inner.fork(n, **kwargs))]

    def pause(self, **kwargs: Any) -> None:
        _call(lambda: self._inner.pause(**kwargs))

    def resume(self, **kwargs: Any) -> None:
        _call(lambda: self._inner.resume(**kwargs))

    def spawn(self, command: str) -> None:
        _call(lambda: self._inner.spawn(command))

    def expose(self, port: int, **kwargs: Any) -> PortExposed:
        """Where TCP ``port`` inside the sandbox is reachable (see
        :meth:`hotbed.sandbox.Sandbox.expose`)."""
        return _call(lambda: self._inner.expose(port, **kwargs))

    # ---------------------------------------------------- agent-grade execution

    def shell(self, name: str = "default", **kwargs: Any) -> Session:
        """A persistent bash session (see :meth:`hotbed.sandbox.Sandbox.shell`)."""
        return Session(self._inner.shell(name, **kwargs))

    def start_process(self, *argv: str, **kwargs: Any) -> Process:
        return Process(_call(lambda: self._inner.start_process(*argv, **kwargs)))

    def process(self, pid: int) -> Process:
        return Process(self._inner.process(pid))

    def processes(self) -> builtins.list[ProcessInfo]:
        return _call(self._inner.processes)

    def upload_dir(self, local: str, remote: str, **kwargs: Any) -> int:
        return _call(lambda: self._inner.upload_dir(local, remote, **kwargs))

    def download_dir(self, remote: str, local: str, **kwargs: Any) -> int:
        return _call(lambda: self._inner.download_dir(remote, local, **kwargs))

    def upload_file(self, local: str, remote: str, **kwargs: Any) -> int:
        return _call(lambda: self._inner.upload_file(local, remote, **kwargs))

    def download_file(self, remote: str, local: str, **kwargs: Any) -> int:
        return _call(lambda: self._inner.download_file(remote, local, **kwargs))


def create_template(name: str, **kwargs: Any) -> TemplateReady:
    """Blocking :func:`hotbed.templates.create_template`."""
    kwargs.setdefault("client", _default_client())
    return _call(lambda: _templates.create_template(name, **kwargs))


def set_pool(template: str, size: int, **kwargs: Any) -> str:
    """Blocking :func:`hotbed.templates.set_pool`; returns the pool's name."""
    kwargs.setdefault("client", _default_client())
    return _call(lambda: _templates.set_pool(template, size, **kwargs))


def delete_template(name: str) -> bool:
    client = _default_client()
    return _call(lambda: _templates.delete_template(name, client=client))


class ExecStream:
    """Blocking twin of :class:`hotbed.handles.ExecStream`: iterate chunks, then
    :attr:`result`. Leaving the ``with`` block early cancels the command."""

    def __init__(self, inner: _handles.ExecStream) -> None:
        self._inner = inner
        self._chunks: AsyncIterator[OutputChunk] | None = None

    @property
    def result(self) -> CommandResult | None:
        return self._inner.result

    def __enter__(self) -> ExecStream:
        _call(self._inner.__aenter__)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        _call(self._inner.aclose)

    def __iter__(self) -> Iterator[OutputChunk]:
        if self._chunks is None:
            self._chunks = self._inner.__aiter__()
        chunks = self._chunks
        while True:
            try:
                yield _call(chunks.__anext__)
            except StopAsyncIteration:
                return

    def collect(self) -> CommandResult:
        """Read it all and return the result."""
        return _call(self._inner.collect)


class Session:
    """Blocking twin of :class:`hotbed.handles.Session`."""

    def __init__(self, inner: _handles.Session) -> None:
        self._inner = inner
        self.name = inner.name

    def run(self, command: str, **kwargs: Any) -> CommandResult:
        return _call(lambda: self._inner.run(command, **kwargs))

    def stream(self, command: str, **kwargs: Any) -> ExecStream:
        return ExecStream(self._inner.stream(command, **kwargs))

    def interrupt(self) -> None:
        _call(self._inner.interrupt)

    def close(self) -> None:
        _call(self._inner.close)


class Process:
    """Blocking twin of :class:`hotbed.handles.Process`."""

    def __init__(self, inner: _handles.Process) -> None:
        self._inner = inner
        self.pid = inner.pid

    def read(self, **kwargs: Any) -> ProcessOutput:
        return _call(lambda: self._inner.read(**kwargs))

    def wait(self, timeout: float = 60.0) -> ProcessInfo:
        return _call(lambda: self._inner.wait(timeout))

    def signal(self, signal: int = 15) -> None:
        _call(lambda: self._inner.signal(signal))

    def kill(self) -> None:
        _call(self._inner.kill)
