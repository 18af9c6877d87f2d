"""Agent-grade execution on the worker: exec, sessions, background processes, PTYs,
watches and file transfer served by the in-sandbox guest agent.

The worker agent hands every command in :data:`HANDLED` to
:meth:`ExecutionService.dispatch`. Commands reach the sandbox's guest agent over its
persistent channel (:mod:`workers.guest.channel`, attached through
:meth:`Runtime.attach <workers.runtimes.base.Runtime.attach>`); a sandbox without one
(an image with no python3, or a runtime with no guest agent) keeps the runtime's own
exec and file methods, and answers the rest with ``UnsupportedRequest``. File
operations the runtime has no method for (remove, mkdir, rename, stat, deep listings,
chunked reads and appends) run there as small shell scripts through the runtime's
exec, on an isolated runtime only: an unisolated one would run them on the host.

Pipes (``PipeOpen`` ... ``PipeClose``) are how a transfer of any size stays in bounded
memory: the guest agent moves a command's stdin and stdout only when a request asks,
so each hop (client, Redis, worker, agent) holds at most one chunk.

Streaming: a request with ``stream_to`` gets its output as stream entries on its
output key (``keys.output`` of its request id: never a key the message names), ``o``
stdout, ``e`` stderr, ``v`` an msgpack event, written in pipelined batches as frames
arrive, and a last ``r`` entry holding the reply. The channel's reader waits for each
batch to be written, so a command's output is never held in the worker beyond a few
frames (the agent stops reading the command instead). The reader trims what it has
read, so the stream's length is what it has not: past ``LAG_ENTRIES`` the pump stops
reading the sandbox until the reader catches up, and a reader ``LAG_DEADLINE_S``
behind ends the request with ``Overloaded`` (the command is cancelled). Every entry is
added with an approximate ``MAXLEN`` as a backstop.

Bounds: sizes asked by the client are clamped (output collected into one reply to
``limits.MAX_COLLECTED_OUTPUT``, process reads to ``limits.MAX_READ_BYTES``), and what
the agent sends back may not exceed what was asked (the channel's frame limits).
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream

from daemon import lifecycle
from hotbed import keys as keyspace
from hotbed import limits, protocol
from hotbed.errors import (
    DirectoryNotEmpty,
    ExecTimeout,
    FileError,
    FileExists,
    FileNotFound,
    FileTooLarge,
    HotbedError,
    InvalidRequest,
    IsADirectory,
    NotADirectory,
    Overloaded,
    SandboxNotRunning,
    UnsupportedRequest,
)
from hotbed.protocol import (
    Ack,
    Cancel,
    DirListing,
    DownloadTar,
    Envelope,
    Exec,
    ExecInput,
    ExecResult,
    ExecSpec,
    FileContent,
    FileEntry,
    FileStat,
    FileWritten,
    ListFiles,
    MakeDir,
    PipeClose,
    PipeData,
    PipeOpen,
    PipeRead,
    PipeWrite,
    ProcessInfo,
    ProcessInput,
    ProcessList,
    ProcessListing,
    ProcessOutput,
    ProcessRead,
    ProcessSignal,
    ProcessStart,
    ProcessWait,
    PtyInput,
    PtyOpen,
    PtyResize,
    ReadFile,
    RemoveFile,
    RenameFile,
    Reply,
    ReplyEnvelope,
    SessionClose,
    SessionInterrupt,
    SessionRun,
    StatFile,
    StdinState,
    UploadTar,
    WatchDir,
    WriteFile,
)
from workers.guest.channel import Frame, GuestChannel, GuestManager, guest_error
from workers.runtimes.base import AttachedStdio, Runtime
from workers.sandboxes import SandboxTable

log = logging.getLogger(__name__)

GUEST_ONLY = (
    SessionRun, SessionInterrupt, SessionClose, ProcessStart, ProcessList, ProcessRead,
    ProcessWait, ProcessSignal, ProcessInput, ExecInput, PtyOpen, PtyInput, PtyResize, Cancel,
    WatchDir, UploadTar, DownloadTar, PipeOpen, PipeWrite, PipeRead, PipeClose,
)
PATH_OPS = (StatFile, RemoveFile, MakeDir, RenameFile)
HANDLED = (Exec, ReadFile, WriteFile, ListFiles, *PATH_OPS, *GUEST_ONLY)
# The guest agent version that has the file verbs and pipes (a sandbox restored from an
# older template runs the agent of its snapshot).
GUEST_FILE_VERBS = 2
# The guest agent version that answers an input once it is in the command's stdin.
GUEST_PACED_INPUT = 3
# How long one pipe request may wait on the command (a slow reader or writer).
PIPE_CALL_S = 120.0
# Keys and resizes for a terminal travel apart from its PtyOpen and can overtake it:
# they wait this long (at most) for it to start rather than be dropped.
ARRIVAL_WAIT_S = 5.0
# Terminals ended recently, kept so that input for one that has ended is not waited for.
ENDED_KEPT = 1024
# A script's exit code -> the typed error (the shell fallback of the file verbs).
SCRIPT_ERRORS: dict[int, type[FileError]] = {
    2: FileNotFound, 3: NotADirectory, 4: IsADirectory, 5: FileExists, 6: DirectoryNotEmpty,
}
_MISSING = '[ -e "$1" ] || [ -L "$1" ] || { echo "no such file or directory: $1" >&2; exit 2; }; '
SCRIPTS = {
    "stat": _MISSING + 'stat -c "%s|%f|%Y" -- "$1" && { [ ! -L "$1" ] || stat -L -c "%s|%f|%Y" -- "$1" 2>/dev/null || true; }',
    "remove": _MISSING
    + 'if [ -d "$1" ] && [ ! -L "$1" ]; then if [ "$2" = 1 ]; then exec rm -rf -- "$1"; fi; '
    '[ -z "$(ls -A -- "$1")" ] || { echo "directory not empty: $1" >&2; exit 6; }; exec rmdir -- "$1"; fi; '
    'exec rm -f -- "$1"',
    "make_dir": 'if [ -e "$1" ] || [ -L "$1" ]; then [ -d "$1" ] && [ "$3" = 1 ] && { echo 0; exit 0; }; '
    'echo "file exists: $1" >&2; exit 5; fi; '
    'if [ "$2" = 1 ]; then mkdir -p -m "$4" -- "$1" || exit 1; else '
    '[ -d "$(dirname -- "$1")" ] || { echo "no such file or directory: $(dirname -- "$1")" >&2; exit 2; }; '
    'mkdir -m "$4" -- "$1" || exit 1; fi; echo 1',
    "rename": _MISSING
    + 'if [ -d "$2" ] && [ ! -L "$2" ]; then if [ -d "$1" ] && [ -z "$(ls -A -- "$2")" ]; then rmdir -- "$2"; '
    'else echo "is a directory: $2" >&2; exit 4; fi; fi; exec mv -f -- "$1" "$2"',
    "list": '[ -e "$1" ] || { echo "no such file or directory: $1" >&2; exit 2; }; '
    '[ -d "$1" ] || { echo "not a directory: $1" >&2; exit 3; }; '
    'cd "$1" && find . -mindepth 1 -maxdepth "$2" -exec stat -c "%s|%f|%Y|%n" -- {} +',
    "read": '[ -e "$1" ] || { echo "no such file or directory: $1" >&2; exit 2; }; '
    '[ ! -d "$1" ] || { echo "is a directory: $1" >&2; exit 4; }; '
    'stat -L -c %s -- "$1" && tail -c +"$2" -- "$1" | head -c "$3"',
    "append": '[ "$2" = 1 ] && mkdir -p -- "$(dirname -- "$1")"; cat >> "$1"',
}
# The longest a start waits for its sandbox's guest agent to answer (then the first
# command waits, as it would have anyway).
READY_WAIT_S = 10.0
# Output entries written per Redis round trip, at most.
BATCH_BYTES = 1 << 20
# Slack on top of a command's own timeout before the worker stops waiting for the agent.
GUARD_S = 10.0
# Unread entries of an output stream past which the pump waits for its reader (each
# entry is at most ~2 * BATCH_BYTES), how long it waits, and the hard cap on entries.
LAG_ENTRIES = 32
LAG_DEADLINE_S = 60.0
MAX_STREAM_ENTRIES = 1024

_event_encode = msgspec.msgpack.Encoder().encode


class Sink:
    """Writes a streaming request's entries to its output key, batched."""

    def __init__(self, redis: Any, key: str) -> None:
        self.redis = redis
        self.key = key
        self._pipe: Any = None
        self._n = 0
        # Entries the reader has not trimmed yet, as of the last flush.
        self.unread = 0
        self.lagging = False

    def add(self, field: bytes, data: bytes) -> None:
        if self._pipe is None:
            self._pipe = self.redis.pipeline(transaction=False)
        self._pipe.xadd(self.key, {field: data}, maxlen=MAX_STREAM_ENTRIES, approximate=True)
        self._n += 1

    async def flush(self) -> None:
        if self._pipe is None:
            return
        pipe, self._pipe = self._pipe, None
        pipe.expire(self.key, keyspace.REPLY_TTL_S)
        pipe.xlen(self.key)
        res = await pipe.execute()
        self.unread = int(res[-1])

    async def wait_for_reader(self, sandbox_id: str) -> None:
        """Hold the pump (and so the command's output) while the reader is behind.
        Redis has no blocking wait for a stream to shrink, so this polls, backing off."""
        if self.unread <= LAG_ENTRIES:
            return
        self.lagging = True
        give_up = anyio.current_time() + LAG_DEADLINE_S
        delay = 0.005
        while self.unread > LAG_ENTRIES // 2:
            if anyio.current_time() > give_up:
                raise Overloaded(
                    f"the output reader is {self.unread} entries behind after "
                    f"{LAG_DEADLINE_S:g}s; the command was cancelled",
                    sandbox_id=sandbox_id, detail={"unread_entries": self.unread},
                )
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.25)
            self.unread = int(await self.redis.xlen(self.key))
        self.lagging = False

    async def finish(self, reply: Reply, request_id: str) -> None:
        self.add(b"r", protocol.encode(ReplyEnvelope(id=request_id, body=reply)))
        await self.flush()


class Collector:
    """Non-streaming output, kept up to ``cap`` bytes per stream."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.out = bytearray()
        self.err = bytearray()

    def feed(self, fd: int, data: bytes) -> None:
        buf = self.out if fd == 1 else self.err
        room = self.cap - len(buf)
        if room > 0:
            buf += data[:room]


async def pump(
    frames: MemoryObjectReceiveStream[Frame],
    *,
    sink: Sink | None,
    collect: Collector | None,
    sandbox_id: str,
) -> dict[str, Any]:
    """Move a request's frames to its sink/collector until its ``exit``; return that."""
    while True:
        try:
            first = await frames.receive()
        except anyio.EndOfStream:
            raise SandboxNotRunning(
                f"sandbox {sandbox_id}: the guest agent went away mid-command",
                sandbox_id=sandbox_id,
            ) from None
        batch = [first]
        size = len(first[1])
        while size < BATCH_BYTES:
            try:
                f = frames.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
            batch.append(f)
            size += len(f[1])
        end: dict[str, Any] | None = None
        # Consecutive chunks of one stream become one entry (fewer entries to write
        # and read); order across stdout/stderr is kept.
        run_fd, run_buf = 0, bytearray()
        for header, payload in batch:
            t = header.get("t")
            if t == "out":
                fd = int(header.get("fd", 1))
                if sink is not None:
                    if fd != run_fd and run_buf:
                        sink.add(b"o" if run_fd == 1 else b"e", bytes(run_buf))
                        run_buf.clear()
                    run_fd = fd
                    run_buf += payload
                elif collect is not None:
                    collect.feed(fd, payload)
                continue
            if run_buf and sink is not None:
                sink.add(b"o" if run_fd == 1 else b"e", bytes(run_buf))
                run_buf.clear()
            if t == "event":
                if sink is not None:
                    sink.add(b"v", _event_encode(header.get("events", [])))
            elif t == "error":
                if sink is not None:
                    await sink.flush()
                raise guest_error(header, sandbox_id)
            elif t in ("exit", "result"):
                end = header
        if run_buf and sink is not None:
            sink.add(b"o" if run_fd == 1 else b"e", bytes(run_buf))
        if sink is not None:
            await sink.flush()
            if end is None:
                await sink.wait_for_reader(sandbox_id)
        if end is not None:
            return end


def _info(d: dict[str, Any]) -> ProcessInfo:
    return msgspec.convert(d, ProcessInfo)


class ExecutionService:
    """Serves the commands in :data:`HANDLED` for one worker's sandboxes."""

    def __init__(
        self, table: SandboxTable, runtime: Runtime, *, on_channel_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.table = table
        self.runtime = runtime
        self._on_channel_lost = on_channel_lost
        self.guests: GuestManager | None = None
        self._guestless = False
        # (sandbox id, client request id) -> (channel, guest request id), for Cancel,
        # PtyInput and PtyResize naming a running request.
        self._active: dict[tuple[str, str], tuple[GuestChannel, int]] = {}
        self._arrivals: dict[tuple[str, str], anyio.Event] = {}
        self._ended: dict[tuple[str, str], None] = {}

    def _began(self, key: tuple[str, str], ch: GuestChannel, gid: int) -> None:
        self._active[key] = (ch, gid)
        arrived = self._arrivals.pop(key, None)
        if arrived is not None:
            arrived.set()

    def _done(self, key: tuple[str, str], *, terminal: bool = False) -> None:
        self._active.pop(key, None)
        if terminal:
            # Only terminals get keys and resizes after they end; an exec need not pay.
            self._ended[key] = None
            if len(self._ended) > ENDED_KEPT:
                del self._ended[next(iter(self._ended))]

    async def _arrival(self, key: tuple[str, str], wait: float) -> tuple[GuestChannel, int] | None:
        """The running request ``key`` names, waiting up to ``wait`` for one that has not
        started yet; None for one that ended, or never came."""
        if key in self._ended:
            return None
        arrived = self._arrivals.setdefault(key, anyio.Event())
        with anyio.move_on_after(max(0.0, wait)):
            await arrived.wait()
        if not arrived.is_set() and self._arrivals.get(key) is arrived:
            del self._arrivals[key]
        return self._active.get(key)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.guests = GuestManager(self._attach, on_violation=self._violated, on_lost=self._on_channel_lost)
        try:
            await self.guests.run(task_status=task_status)
        finally:
            self.guests = None

    async def _attach(self, sandbox_id: str) -> AttachedStdio | None:
        stdio = await self.runtime.attach(sandbox_id)
        if stdio is None:
            # The runtime has no guest agent at all (Runtime.attach): stop asking it, so
            # a start or exec on it (the simulated fleet: thousands a second) costs no
            # attach task, lock or call.
            self._guestless = True
        return stdio

    async def _violated(self, sandbox_id: str, reason: str) -> None:
        """The sandbox wrote outside the channel's frame limits: it is ended."""
        try:
            await self.table.end(sandbox_id, reason=f"guest channel violation: {reason}", state="failed")
        except Exception as exc:  # the expiry/health loops end it later
            log.warning("could not end sandbox: %s", exc, extra={"sandbox_id": sandbox_id})

    def prepare(self, sandbox_id: str) -> None:
        if self.guests is not None and not self._guestless:
            self.guests.prepare(sandbox_id)

    async def wait_ready(self, sandbox_id: str, *, warm_up: bool = False) -> None:
        """Attach now and wait for the guest agent's first answer (and, with
        ``warm_up``, for one spawned ``true``), so the sandbox's first command finds
        it serving. A start or restore returns ~0.5 s before its agent answers; a
        restored agent's first spawn takes twice its later ones. Never fails the
        start: a sandbox whose agent stays silent is left to the first command, as
        before, which then reports why."""
        if self.guests is None or self._guestless:
            return
        with anyio.move_on_after(READY_WAIT_S):
            try:
                ch = await self.guests.channel(sandbox_id)
                if ch is not None and warm_up:
                    async with ch.open({"t": "run", "argv": ["true"], "timeout": READY_WAIT_S,
                                        "max_output": 4096}) as (_gid, frames):
                        async for header, _payload in frames:
                            if header.get("t") in ("exit", "error"):
                                break
            except HotbedError as exc:
                log.info("guest agent not ready after start: %s", exc,
                         extra={"sandbox_id": sandbox_id})

    def forget(self, sandbox_id: str) -> None:
        if self.guests is not None:
            self.guests.forget(sandbox_id)

    async def _channel(self, sandbox_id: str) -> GuestChannel | None:
        if self.guests is None or self._guestless:
            return None
        return await self.guests.channel(sandbox_id)

    async def _need_channel(self, sandbox_id: str, what: str) -> GuestChannel:
        ch = await self._channel(sandbox_id)
        if ch is None:
            raise UnsupportedRequest(
                f"{what} needs the guest agent, and sandbox {sandbox_id}'s image has no python3",
                sandbox_id=sandbox_id,
            )
        return ch

    # ------------------------------------------------------------------ dispatch

    async def dispatch(self, env: Envelope) -> Reply:
        body: Any = env.body
        # The output key comes from the request id, whatever key the message names.
        stream_to = getattr(body, "stream_to", "")
        sink = Sink(self.table.redis, self.table.keys.output(env.id)) if stream_to else None
        try:
            # In use while it runs (never auto-paused); an auto-paused one resumes first.
            async with self.table.serving(body.sandbox_id, deadline=env.deadline) as local:
                if local.env:
                    body = with_sandbox_env(body, local.env)
                    env = msgspec.structs.replace(env, body=body)
                reply = await self._dispatch(env, body, local.user, sink)
        except HotbedError as exc:
            if sink is not None:
                if exc.worker_id is None:
                    exc.worker_id = self.table.worker_id
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await sink.finish(protocol.error_reply(exc), env.id)
            raise
        if sink is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await sink.finish(reply, env.id)
        return reply

    async def _dispatch(self, env: Envelope, body: Any, user: str, sink: Sink | None) -> Reply:
        sid = body.sandbox_id
        if isinstance(body, Exec):
            return await self._exec(env, body, user, sink)
        if isinstance(body, (ReadFile, WriteFile, ListFiles)):
            return await self._file(body, user)
        if isinstance(body, PATH_OPS):
            return await self._path_op(body, user)
        ch = await self._need_channel(sid, type(body).__name__)
        match body:
            case SessionRun():
                limits.check_timeout(body.timeout)
                max_output = _output_cap(body.max_output, streaming=sink is not None)
                header = {
                    "t": "session_run", "session": body.session, "command": body.command,
                    "timeout": body.timeout, "max_output": max_output,
                    "merge_stderr": body.merge_stderr, "env": body.env, "cwd": body.cwd,
                }
                return await self._run(env, ch, header, b"", sink, max_output, body.timeout)
            case SessionInterrupt():
                await ch.call({"t": "session_interrupt", "session": body.session})
                return Ack()
            case SessionClose():
                await ch.call({"t": "session_close", "session": body.session})
                return Ack()
            case ProcessStart():
                # stdin given (even empty): kept open for ProcessInput.
                limits.check_exec(body.exec, background=True)
                h, _ = await ch.call(
                    {"t": "start", **_spec_header(body.exec, streaming=True),
                     "stdin_open": body.exec.stdin is not None},
                    body.exec.stdin or b"",
                )
                return _info(h["proc"])
            case ProcessList():
                h, _ = await ch.call({"t": "list"})
                return ProcessListing(procs=[_info(p) for p in h["procs"]])
            case ProcessRead():
                max_bytes = limits.clamp(body.max_bytes, limits.MAX_READ_BYTES)
                h, p = await ch.call({
                    "t": "read", "pid": body.pid, "stdout_offset": body.stdout_offset,
                    "stderr_offset": body.stderr_offset, "max_bytes": max_bytes,
                }, max_payload=2 * max_bytes)
                n = int(h.get("stdout_len", 0))
                return ProcessOutput(
                    info=_info(h["proc"]), stdout=p[:n], stderr=p[n:],
                    stdout_offset=int(h["stdout_offset"]), stderr_offset=int(h["stderr_offset"]),
                )
            case ProcessWait():
                limits.check_timeout(body.timeout)
                h, _ = await ch.call(
                    {"t": "wait", "pid": body.pid, "timeout": body.timeout},
                    timeout=body.timeout + GUARD_S,
                )
                return _info(h["proc"])
            case ProcessSignal():
                h, _ = await ch.call(
                    {"t": "signal", "pid": body.pid, "signal": body.signal, "group": body.group}
                )
                return _info(h["proc"]) if h.get("proc") else Ack()
            case ProcessInput():
                await ch.call({"t": "input", "pid": body.pid, "eof": body.eof}, body.data)
                return Ack()
            case PtyOpen():
                limits.check_timeout(body.timeout)
                header = {
                    "t": "pty", "argv": body.argv, "rows": body.rows, "cols": body.cols,
                    "env": {"TERM": "xterm-256color", **body.env}, "cwd": body.cwd,
                    "timeout": body.timeout,
                }
                return await self._run(env, ch, header, b"", sink, 0, body.timeout)
            case ExecInput():
                # Waits on the command's pace: as long as the request may (its deadline).
                active = self._active.get((sid, body.target))
                if active is None:
                    return StdinState(closed=True)
                tch, gid = active
                wait = env.deadline - lifecycle.wall() if env.deadline else PIPE_CALL_S
                h, _ = await tch.call(
                    {"t": "input", "target": gid, "eof": body.eof, "paced": True}, body.data,
                    timeout=max(1.0, wait),
                )
                return StdinState(closed=bool(h.get("closed")))
            case PtyInput() | PtyResize() | Cancel():
                target = body.target if isinstance(body, Cancel) else body.pty
                active = self._active.get((sid, target))
                if active is None and not isinstance(body, Cancel):
                    wait = env.deadline - lifecycle.wall() if env.deadline else ARRIVAL_WAIT_S
                    active = await self._arrival((sid, target), min(ARRIVAL_WAIT_S, wait))
                if active is None:
                    return Ack()
                tch, gid = active
                if isinstance(body, PtyInput):
                    await tch.call({"t": "input", "target": gid, "eof": body.eof}, body.data)
                elif isinstance(body, PtyResize):
                    await tch.call({"t": "resize", "target": gid, "rows": body.rows, "cols": body.cols})
                else:
                    await tch.call({"t": "cancel", "target": gid})
                return Ack()
            case WatchDir():
                limits.check_timeout(body.timeout)
                if not 0.01 <= body.interval <= 3600:
                    raise InvalidRequest(f"interval must be in [0.01, 3600] seconds, got {body.interval:g}")
                header = {"t": "watch", "path": body.path, "interval": body.interval}
                return await self._watch(env, ch, header, sink, body.timeout)
            case UploadTar():
                q = shlex.quote(body.path)
                header = {
                    "t": "run", "argv": ["/bin/sh", "-c", f"mkdir -p {q} && tar -C {q} -xf -"],
                    "stdin": True, "timeout": 600.0, "max_output": 1 << 16,
                }
                res = await self._run(env, ch, header, body.data, None, 1 << 16, 600.0)
                if isinstance(res, ExecResult) and res.exit_code != 0:
                    raise FileError(
                        f"cannot unpack into {body.path}: {res.stderr.decode('utf-8', 'replace').strip()}",
                        sandbox_id=sid,
                    )
                return Ack()
            case DownloadTar():
                limits.check_timeout(body.timeout)
                q = shlex.quote(body.path)
                header = {
                    "t": "run", "argv": ["/bin/sh", "-c", f"tar -C {q} -cf - ."],
                    "timeout": body.timeout, "max_output": 1 << 62,
                }
                return await self._run(env, ch, header, b"", sink, 1 << 16, body.timeout)
            case PipeOpen() | PipeWrite() | PipeRead() | PipeClose():
                return await self._pipe(ch, body)
        raise UnsupportedRequest(f"worker does not handle {type(body).__name__}")

    # ---------------------------------------------------------------- helpers

    async def _run(
        self,
        env: Envelope,
        ch: GuestChannel,
        header: dict[str, Any],
        payload: bytes,
        sink: Sink | None,
        max_output: int,
        timeout: float,
    ) -> ExecResult:
        sid = ch.sandbox_id
        collect = None if sink is not None else Collector(max_output)
        finished = False
        async with ch.open(header, payload) as (gid, frames):
            self._began((sid, env.id), ch, gid)
            try:
                if header.get("stdin_open") and sink is not None:
                    # The reader may send input from now on (ExecInput finds it active).
                    sink.add(b"s", b"")
                    await sink.flush()
                with anyio.fail_after(timeout + GUARD_S):
                    end = await pump(frames, sink=sink, collect=collect, sandbox_id=sid)
                finished = True
            except TimeoutError:
                if sink is not None and sink.lagging:
                    raise Overloaded(
                        f"the output reader fell {sink.unread} entries behind and the "
                        "command's time ran out; it was cancelled",
                        sandbox_id=sid, detail={"unread_entries": sink.unread},
                    ) from None
                raise SandboxNotRunning(
                    f"sandbox {sid}: the guest agent did not end the command", sandbox_id=sid
                ) from None
            finally:
                self._done((sid, env.id), terminal=header.get("t") == "pty")
                if not finished and not ch.closed:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                        try:
                            await ch.send({"t": "cancel", "target": gid})
                        except HotbedError:
                            pass
        out = bytes(collect.out) if collect else b""
        err = bytes(collect.err) if collect else b""
        if end.get("timed_out") or end.get("idle_timed_out"):
            idle = bool(end.get("idle_timed_out"))
            what = (
                f"command printed nothing for {header.get('idle_timeout')}s and was killed"
                if idle else f"command ran past its {timeout:g}s timeout and was "
                + ("interrupted" if header.get("t") == "session_run" else "killed")
            )
            raise ExecTimeout(
                what, sandbox_id=sid,
                detail={
                    "stdout": out[-4096:].decode("utf-8", "replace"),
                    "stderr": err[-4096:].decode("utf-8", "replace"),
                    "timeout": timeout, "idle": idle,
                },
            )
        return ExecResult(
            exit_code=int(end.get("code") or 0),
            stdout=out,
            stderr=err,
            truncated=bool(end.get("truncated")),
            duration_s=float(end.get("duration") or 0.0),
            interrupted=bool(end.get("interrupted")),
        )

    async def _exec(self, env: Envelope, body: Exec, user: str, sink: Sink | None) -> Reply:
        spec = body.exec
        sid = body.sandbox_id
        limits.check_exec(spec)
        if sink is None and spec.max_output > limits.MAX_COLLECTED_OUTPUT:
            spec = msgspec.structs.replace(spec, max_output=limits.MAX_COLLECTED_OUTPUT)
        ch = None if spec.user not in (None, user) else await self._channel(sid)
        if body.stdin_open:
            if sink is None:
                raise InvalidRequest("stdin_open needs a streaming exec (stream_to)", sandbox_id=sid)
            if ch is None or int(ch.info.get("version") or 1) < GUEST_PACED_INPUT:
                raise UnsupportedRequest(
                    "streamed stdin needs the guest agent (an image with python3, the sandbox's "
                    "own user, not a template snapshot older than it)", sandbox_id=sid,
                )
        if ch is None:
            if spec.idle_timeout:
                raise UnsupportedRequest(
                    "idle_timeout needs the guest agent (image without python3?)", sandbox_id=sid
                )
            res = await self.runtime.exec(sid, spec, default_user=user)
            if sink is None:
                return res
            if res.stdout:
                sink.add(b"o", res.stdout)
            if res.stderr:
                sink.add(b"e", res.stderr)
            return msgspec.structs.replace(res, stdout=b"", stderr=b"")
        if not spec.argv and spec.shell is None:
            raise InvalidRequest("exec needs argv or shell", sandbox_id=sid)
        header = {"t": "run", **_spec_header(spec, streaming=sink is not None)}
        if body.stdin_open:
            header["stdin_open"] = True
        return await self._run(env, ch, header, spec.stdin or b"", sink, header["max_output"], spec.timeout)

    async def _watch(
        self, env: Envelope, ch: GuestChannel, header: dict[str, Any], sink: Sink | None,
        timeout: float,
    ) -> Reply:
        sid = ch.sandbox_id
        async with ch.open(header) as (gid, frames):
            self._began((sid, env.id), ch, gid)
            try:
                with anyio.move_on_after(timeout):
                    while True:
                        try:
                            end = await pump(frames, sink=sink, collect=None, sandbox_id=sid)
                        except SandboxNotRunning:
                            break
                        if end.get("t") == "exit":
                            break
            finally:
                self._done((sid, env.id))
                if not ch.closed:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                        try:
                            await ch.send({"t": "cancel", "target": gid})
                        except HotbedError:
                            pass
        return Ack()

    @staticmethod
    def _has_file_verbs(ch: GuestChannel | None) -> bool:
        return ch is not None and int(ch.info.get("version") or 1) >= GUEST_FILE_VERBS

    async def _pipe(self, ch: GuestChannel, body: PipeOpen | PipeWrite | PipeRead | PipeClose) -> Reply:
        sid = body.sandbox_id
        if not self._has_file_verbs(ch):
            raise UnsupportedRequest(
                f"sandbox {sid}'s guest agent predates pipes (restored from an older template)",
                sandbox_id=sid,
            )
        match body:
            case PipeOpen():
                if not body.argv:
                    raise InvalidRequest("a pipe needs a command", sandbox_id=sid)
                h, _ = await ch.call({
                    "t": "pipe_open", "argv": body.argv, "read": body.read, "write": body.write,
                    "env": body.env, "cwd": body.cwd, "timeout": body.timeout,
                    "idle_timeout": body.idle_timeout,
                })
                return ProcessInfo(pid=int(h["pid"]), argv=body.argv)
            case PipeWrite():
                if len(body.data) > protocol.MAX_FILE_BYTES:
                    raise FileTooLarge(
                        f"{len(body.data)} bytes is over {protocol.MAX_FILE_BYTES} in one write",
                        sandbox_id=sid,
                    )
                await ch.call(
                    {"t": "pipe_write", "pipe": body.pipe, "eof": body.eof}, body.data,
                    timeout=PIPE_CALL_S,
                )
                return Ack()
            case PipeRead():
                h, p = await ch.call(
                    {"t": "pipe_read", "pipe": body.pipe,
                     "max_bytes": max(1, min(body.max_bytes, protocol.MAX_FILE_BYTES))},
                    timeout=PIPE_CALL_S,
                )
                return PipeData(data=p, eof=bool(h.get("eof")))
            case PipeClose():
                h, p = await ch.call(
                    {"t": "pipe_close", "pipe": body.pipe, "kill": body.kill, "timeout": body.timeout},
                    timeout=body.timeout + GUARD_S,
                )
                return ExecResult(exit_code=int(h.get("code") or 0), stderr=p)

    async def _script(self, sid: str, name: str, args: list[str], user: str, *,
                      stdin: bytes | None = None, max_output: int = 1 << 20) -> bytes:
        """Run the fallback script ``name`` with ``args`` through the runtime's exec;
        its stdout, or the typed error its exit code stands for."""
        if self.runtime.kind != "real":
            raise UnsupportedRequest(
                f"this file operation needs the guest agent on a {self.runtime.kind} runtime",
                sandbox_id=sid,
            )
        res = await self.runtime.exec(
            sid,
            ExecSpec(argv=["/bin/sh", "-c", SCRIPTS[name], "sh", *args], stdin=stdin,
                     timeout=120.0, max_output=max_output),
            default_user=user,
        )
        if res.exit_code != 0:
            message = res.stderr.decode("utf-8", "replace").strip() or f"exit code {res.exit_code}"
            raise SCRIPT_ERRORS.get(res.exit_code, FileError)(message, sandbox_id=sid)
        return res.stdout

    async def _path_op(self, body: StatFile | RemoveFile | MakeDir | RenameFile, user: str) -> Reply:
        sid = body.sandbox_id
        ch = await self._channel(sid)
        if self._has_file_verbs(ch):
            assert ch is not None
            match body:
                case StatFile():
                    h, _ = await ch.call({"t": "stat", "path": body.path, "missing_ok": body.missing_ok})
                    row = h.get("entry")
                    return FileStat(entry=None if row is None else _entry(body.path, row, whole=True))
                case RemoveFile():
                    await ch.call(
                        {"t": "remove", "path": body.path, "recursive": body.recursive},
                        timeout=PIPE_CALL_S,
                    )
                case MakeDir():
                    await ch.call({
                        "t": "make_dir", "path": body.path, "parents": body.parents,
                        "exist_ok": body.exist_ok, "mode": body.mode,
                    })
                case RenameFile():
                    await ch.call({"t": "rename", "src": body.src, "dst": body.dst}, timeout=PIPE_CALL_S)
            return Ack()
        match body:
            case StatFile():
                try:
                    out = await self._script(sid, "stat", [body.path], user)
                except FileNotFound:
                    if body.missing_ok:
                        return FileStat()
                    raise
                lines = out.decode("utf-8", "replace").split("\n")
                link = _stat_line(lines[0])
                target = _stat_line(lines[1]) if len(lines) > 1 and lines[1] else None
                size, mode, mtime = target or link
                name = body.path.rstrip("/").rsplit("/", 1)[-1] or "/"
                return FileStat(entry=_entry(
                    body.path, [name, size, mode, mtime, (link[1] & 0o170000) == 0o120000], whole=True,
                ))
            case RemoveFile():
                await self._script(sid, "remove", [body.path, "1" if body.recursive else "0"], user)
            case MakeDir():
                await self._script(sid, "make_dir", [
                    body.path, "1" if body.parents else "0", "1" if body.exist_ok else "0",
                    f"{body.mode:o}",
                ], user)
            case RenameFile():
                await self._script(sid, "rename", [body.src, body.dst], user)
        return Ack()

    async def _file(self, body: ReadFile | WriteFile | ListFiles, user: str) -> Reply:
        sid = body.sandbox_id
        runtime = self.runtime
        ch = await self._channel(sid)
        if isinstance(body, WriteFile):
            if len(body.data) > protocol.MAX_FILE_BYTES:
                raise FileTooLarge(f"{len(body.data)} bytes is over {protocol.MAX_FILE_BYTES}")
            if ch is None:
                if body.append:
                    await self._script(
                        sid, "append", [body.path, "1" if body.make_dirs else "0"], user,
                        stdin=body.data,
                    )
                    return FileWritten(size=len(body.data))
                n = await runtime.write_file(
                    sid, body.path, body.data, mode=body.mode, make_dirs=body.make_dirs, user=user
                )
                return FileWritten(size=n)
            try:
                h, _ = await ch.call(
                    {"t": "write_file", "path": body.path, "mode": body.mode,
                     "make_dirs": body.make_dirs, "append": body.append},
                    body.data, timeout=120.0,
                )
            except FileError as exc:
                raise type(exc)(f"cannot write {body.path}: {exc.message}", sandbox_id=sid) from None
            return FileWritten(size=len(body.data))
        if isinstance(body, ReadFile):
            limit = limits.clamp(body.max_bytes, protocol.MAX_FILE_BYTES)
            if body.offset < 0:
                raise InvalidRequest(f"offset must not be negative, got {body.offset}", sandbox_id=sid)
            if ch is None:
                if body.offset or body.max_bytes < protocol.MAX_FILE_BYTES:
                    # A chunk of a larger file: where the runtime has no ranged read.
                    out = await self._script(
                        sid, "read", [body.path, str(body.offset + 1), str(limit)], user,
                        max_output=limit + 64,
                    )
                    head, _, data = out.partition(b"\n")
                    size = int(head or -1)
                    return FileContent(data=data, size=size, truncated=body.offset + len(data) < size)
                data = await runtime.read_file(sid, body.path, max_bytes=limit, user=user)
                return FileContent(data=data)
            try:
                h, p = await ch.call(
                    {"t": "read_file", "path": body.path, "offset": body.offset, "length": limit},
                    timeout=120.0, max_payload=limit,
                )
            except FileError as exc:
                raise type(exc)(
                    f"cannot read {body.path}: {exc.message}", sandbox_id=sid,
                    detail={"path": body.path},
                ) from None
            size = int(h.get("size", -1))
            truncated = body.offset + len(p) < size
            if truncated and body.offset == 0 and body.max_bytes >= protocol.MAX_FILE_BYTES:
                raise FileTooLarge(
                    f"{body.path} is larger than {limit} bytes; read it in parts", sandbox_id=sid
                )
            return FileContent(data=p, size=size, truncated=truncated)
        depth = max(1, body.depth)
        if not self._has_file_verbs(ch) and (ch is None or depth > 1):
            if depth == 1:
                return DirListing(entries=await runtime.list_files(sid, body.path, user=user))
            out = await self._script(sid, "list", [body.path, str(depth)], user, max_output=64 << 20)
            rows = []
            for line in out.decode("utf-8", "replace").splitlines():
                parts = line.split("|", 3)
                if len(parts) == 4:
                    size, mode, mtime = _stat_line("|".join(parts[:3]))
                    rel = parts[3][2:] if parts[3].startswith("./") else parts[3]
                    rows.append([rel, size, mode, mtime, (mode & 0o170000) == 0o120000])
            return DirListing(entries=sorted((_entry(body.path, r) for r in rows), key=lambda e: e.path))
        assert ch is not None
        try:
            h, _ = await ch.call({"t": "list_files", "path": body.path, "depth": depth}, timeout=60.0)
        except FileError as exc:
            raise type(exc)(f"cannot list {body.path}: {exc.message}", sandbox_id=sid) from None
        entries = [_entry(body.path, row) for row in h.get("entries", [])]
        return DirListing(
            entries=sorted(entries, key=lambda e: e.path), truncated=bool(h.get("truncated")),
        )


def _stat_line(line: str) -> tuple[int, int, float]:
    """``size|mode in hex|mtime`` (``stat -c "%s|%f|%Y"``)."""
    size, mode, mtime = line.split("|", 2)
    return int(size), int(mode, 16), float(mtime)


def _entry(base: str, row: list[Any], *, whole: bool = False) -> FileEntry:
    """A FileEntry from the guest's ``[relative path, size, mode, mtime, is link]`` row:
    the path is ``base/relative`` (``whole``: ``base`` itself, the row naming it)."""
    rel, size, mode, mtime = row[0], int(row[1]), int(row[2]), float(row[3])
    link = bool(row[4]) if len(row) > 4 else (mode & 0o170000) == 0o120000
    if whole:
        path = base
    else:
        root = base.rstrip("/") or "/"
        path = f"{root}/{rel}" if root != "/" else f"/{rel}"
    return FileEntry(
        name=rel.rsplit("/", 1)[-1], path=path, size=size,
        is_dir=(mode & 0o170000) == 0o040000, mode=mode & 0o7777, mtime=mtime, is_symlink=link,
    )


def _output_cap(max_output: int, *, streaming: bool) -> int:
    """Output collected into one reply is held by the worker, so it is clamped; streamed
    output is bounded by its reader instead (``wait_for_reader``)."""
    return max(0, max_output) if streaming else limits.clamp(max_output, limits.MAX_COLLECTED_OUTPUT)


def with_sandbox_env(body: Any, sandbox_env: dict[str, str]) -> Any:
    """``body`` with the sandbox's own env under the command's.

    A sandbox's env (API keys) is never in its container's config: PID 1 (the guest
    agent, or the idle shell) would hold it in memory, so every checkpoint of it (a
    snapshot, a template made from it) would carry it into every restore. The worker
    keeps it instead and hands it to each command as it starts, on the guest agent's
    path and on docker exec's alike."""
    match body:
        case Exec() | ProcessStart():
            return msgspec.structs.replace(
                body, exec=msgspec.structs.replace(body.exec, env={**sandbox_env, **body.exec.env})
            )
        case SessionRun() | PtyOpen() | PipeOpen():
            return msgspec.structs.replace(body, env={**sandbox_env, **body.env})
    return body


def _spec_header(spec: ExecSpec, *, streaming: bool) -> dict[str, Any]:
    return {
        "argv": spec.argv, "shell": spec.shell, "env": spec.env, "cwd": spec.cwd,
        "timeout": spec.timeout, "idle_timeout": spec.idle_timeout,
        "max_output": _output_cap(spec.max_output, streaming=streaming),
        "stdin": spec.stdin is not None,
    }
