"""The wire protocol: every message between clients, the scheduler and workers.

Messages are frozen msgspec Structs, encoded as MessagePack. Requests and commands are
one tagged union (:data:`Message`) wrapped in an :class:`Envelope` that carries the
request id, the reply key and the deadline; replies are another tagged union
(:data:`Reply`) wrapped in a :class:`ReplyEnvelope`. docs/protocol.md describes who
sends what on which stream.

Evolution rules (msgspec's schema-evolution guide): a new field always has a default, a
field is never renamed or retyped, a new message is a new tag. Unknown fields are
ignored by older peers; an unknown tag is answered with ``UnsupportedRequest``.
``PROTOCOL_VERSION`` rises only for a change an old peer cannot ignore.

Encoders and decoders are built once at import (:data:`ENCODER`, :func:`decode_envelope`,
:func:`decode_reply`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

PROTOCOL_VERSION = 1

DEFAULT_TIMEOUT_S = 300.0
MAX_TIMEOUT_S = 24 * 3600.0
DEFAULT_EXEC_TIMEOUT_S = 60.0
DEFAULT_MAX_OUTPUT = 1 << 20
MAX_FILE_BYTES = 32 << 20

CreatePath = Literal["warm", "restore", "cold"]

# The guest contract's one path: each line written to this FIFO inside a sandbox is
# started as a child of its init (the guest agent, or the runtime's idle shell), so such
# processes are part of memory snapshots; gVisor does not restore an exec's descendants.
SPAWN_FIFO = "/tmp/.hotbed/spawn"


class Struct(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Base for value objects that are not messages themselves."""


class Msg(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="t"):
    """Base for tagged messages; the tag is the class name."""


# --------------------------------------------------------------------------- values


class Resources(Struct):
    cpu: float = 1.0
    memory_mb: int = 512
    pids: int = 1024
    # "H100", "H100:2", "any", or None for a CPU-only sandbox; the sandbox gets exactly
    # those GPUs, so only a worker with them free can take it.
    gpu: str | None = None
    disk_mb: int | None = None

    @property
    def millicpu(self) -> int:
        return int(round(self.cpu * 1000))


# How a sandbox reaches the network (docs/operations.md, "Sandbox network"): "none"
# (loopback only), "egress" (only what ``NetworkPolicy.allow`` lists) or "open" (any
# public address; never the node, other sandboxes or private ranges unless listed).
NetworkMode = Literal["none", "egress", "open"]


class NetworkPolicy(Struct):
    mode: NetworkMode = "none"
    # Entries: "10.1.2.0/24", "10.1.2.3:443", "10.1.2.0/24:8000-8099", "pypi.org",
    # "*.github.com:443" (a domain's addresses are allowed as the node's resolver
    # answers the sandbox for them; hotbed.network).
    allow: list[str] = []


class SandboxSpec(Struct):
    image: str = "hotbed/base"
    resources: Resources = Resources()
    timeout: float = DEFAULT_TIMEOUT_S
    idle_timeout: float | None = None
    # Checkpoint to disk after this many seconds without a request, resumed by the
    # next one; None: the node's default; 0: never (not even under memory pressure).
    auto_pause_after: float | None = None
    tags: dict[str, str] = {}
    env: dict[str, str] = {}
    workdir: str | None = None
    # None: the worker's default non-root user (1000:1000).
    user: str | None = None
    template: str | None = None
    # Placement constraint: only workers carrying all these tags (node pool, zone, ...).
    worker_tags: dict[str, str] = {}
    # None: no network for an image, the template's build network for a template
    # (the scheduler fills it in); a warm pool is keyed by the network its claims state.
    network: NetworkPolicy | None = None
    # Placement goes only to workers that isolate their sandboxes (gVisor) unless the
    # request opts out here: a ``process`` or ``sim`` worker runs code unisolated.
    allow_unisolated: bool = False


class ExecSpec(Struct):
    argv: list[str] | None = None
    # A shell string runs under /bin/sh -c; exactly one of argv/shell is set.
    shell: str | None = None
    env: dict[str, str] = {}
    cwd: str | None = None
    timeout: float = DEFAULT_EXEC_TIMEOUT_S
    max_output: int = DEFAULT_MAX_OUTPUT
    user: str | None = None
    stdin: bytes | None = None
    # Kill the command if it prints nothing for this long (served by the guest agent only).
    idle_timeout: float | None = None


class FileEntry(Struct):
    name: str
    path: str
    size: int
    is_dir: bool
    mode: int = 0
    mtime: float = 0.0
    is_symlink: bool = False


class GpuDevice(Struct):
    uuid: str
    model: str
    memory_mb: int = 0
    index: int = 0


class WorkerInfo(Struct):
    id: str
    host: str
    runtime: str
    cpu_millis: int
    memory_mb: int
    gpus: list[GpuDevice] = []
    tags: dict[str, str] = {}
    version: int = PROTOCOL_VERSION
    started_at: float = 0.0
    # "simulated" for the sim runtime, so nothing measured on it passes for real.
    kind: str = "real"
    # Registry hosts this worker pulls missing images from (no credentials): placement
    # sends an image no node holds to a worker that can pull it.
    registries: list[str] = []
    # Where other nodes copy this node's snapshots from (workers.snapshot_peers); "" if
    # it serves none.
    snapshot_url: str = ""
    # Whether its runtime isolates sandboxes from the host (gVisor: runsc, or docker
    # with a runsc* runtime). Not stated (an older worker): not isolated.
    isolated: bool = False


class TemplateSpec(Struct):
    """An environment built once and restored many times (hotbed.templates)."""

    image: str = "hotbed/base"
    # Written first (path -> content), then each ``run`` shell command must exit 0.
    files: dict[str, bytes] = {}
    run: list[str] = []
    # Long-running processes started detached after ``run`` (output in /tmp/.hotbed-start-N.log).
    start: list[str] = []
    # Shell check retried until it exits 0, at most ``ready_timeout`` seconds.
    ready: str | None = None
    ready_timeout: float = 60.0
    setup_timeout: float = 600.0
    env: dict[str, str] = {}
    workdir: str | None = None
    user: str | None = None
    resources: Resources = Resources()
    # The network of its set-up (``run``), and of sandboxes made from it that state none.
    network: NetworkPolicy = NetworkPolicy()
    # Its set-up, its restores and its warm pools may run on unisolated workers.
    allow_unisolated: bool = False


# ------------------------------------------------------------- client -> scheduler


class CreateSandbox(Msg):
    spec: SandboxSpec


# ------------------------------------------------------------ -> worker command stream


class StartSandbox(Msg):
    """Scheduler -> worker: boot (or restore) a sandbox whose capacity is reserved."""

    sandbox_id: str
    spec: SandboxSpec
    path: CreatePath = "cold"
    gpu_uuids: list[str] = []
    # The template's set-up (run after a cold boot), the snapshot to restore
    # ("" = boot), and the warm pool the sandbox joins instead of being handed out.
    template: TemplateSpec | None = None
    snapshot: str = ""
    pool: str = ""


class Exec(Msg):
    sandbox_id: str
    exec: ExecSpec
    # When set, output goes to this stream key (hotbed.keys.output) as it is
    # produced and the final ExecResult carries none; the reply still ends the request.
    stream_to: str = ""
    # Streaming only: the command's stdin stays open after ``exec.stdin`` for ExecInput
    # requests naming this one, until one says ``eof``. The output stream gets an ``s``
    # entry once the command runs, and input sent before it would be lost.
    stdin_open: bool = False


class WriteFile(Msg):
    sandbox_id: str
    path: str
    data: bytes
    mode: int = 0o644
    make_dirs: bool = True
    # Append to the file instead of replacing it, so a large file is written in chunks.
    append: bool = False


class ReadFile(Msg):
    sandbox_id: str
    path: str
    max_bytes: int = MAX_FILE_BYTES
    # Read ``max_bytes`` from ``offset``, so a large file is read in chunks.
    offset: int = 0


class ListFiles(Msg):
    sandbox_id: str
    path: str
    # 1: the directory's own entries; n: n levels down (entries of subdirectories too).
    depth: int = 1


class RemoveFile(Msg):
    """Remove a file, a symlink or an empty directory; with ``recursive``, a tree."""

    sandbox_id: str
    path: str
    recursive: bool = False


class MakeDir(Msg):
    sandbox_id: str
    path: str
    parents: bool = True
    exist_ok: bool = True
    mode: int = 0o755


class RenameFile(Msg):
    """Move ``src`` to ``dst`` (replacing a file there, as ``mv`` does)."""

    sandbox_id: str
    src: str
    dst: str


class StatFile(Msg):
    """What is at ``path``: FileStat, with no entry when nothing is there and
    ``missing_ok`` (else FileNotFound)."""

    sandbox_id: str
    path: str
    missing_ok: bool = False


class Terminate(Msg):
    sandbox_id: str
    reason: str = "client"


class BuildTemplate(Msg):
    """Client -> scheduler -> a worker: build template ``name`` and snapshot it."""

    name: str
    spec: TemplateSpec
    # Filled in by the scheduler: the id the build's capacity is reserved under.
    build_id: str = ""
    # When set, the worker reports the build as it goes on the request's output stream
    # (hotbed.keys.output of its id): ``p`` entries, one progress line each, and ``o``
    # entries with each set-up step's output once it ends. The reply still comes on the
    # reply key, as for any request (not ``stream_to``: a build is no sandbox's stream).
    progress: bool = False


class SnapshotSandbox(Msg):
    """Client -> worker: checkpoint a running sandbox into the new template ``name``."""

    sandbox_id: str
    name: str


class PauseSandbox(Msg):
    sandbox_id: str


class ResumeSandbox(Msg):
    sandbox_id: str


class SandboxClaimed(Msg):
    """Client -> worker notice (no reply): a pooled sandbox was claimed; its lifetime
    starts now. Sent after the claim script, before the client returns the sandbox."""

    sandbox_id: str
    expires_at: float
    idle_timeout: float | None = None
    env: dict[str, str] = {}
    auto_pause_after: float | None = None


# --------------------------------------------- -> worker: agent-grade execution
# Served by the in-sandbox guest agent (workers/guest). ``stream_to`` names a stream
# key (hotbed.keys.output) that output chunks and events go to while the request runs;
# the request's one reply still arrives on its reply key.


class SessionRun(Msg):
    """Run ``command`` in the persistent bash session ``session`` (made on first use)."""

    sandbox_id: str
    session: str
    command: str
    timeout: float = DEFAULT_EXEC_TIMEOUT_S
    max_output: int = DEFAULT_MAX_OUTPUT
    merge_stderr: bool = False
    stream_to: str = ""
    # Used only when this call creates the session.
    env: dict[str, str] = {}
    cwd: str | None = None


class SessionInterrupt(Msg):
    """Ctrl-C for the session's running command; the session survives."""

    sandbox_id: str
    session: str


class SessionClose(Msg):
    sandbox_id: str
    session: str


class ProcessStart(Msg):
    """Start a background process; its output stays in the sandbox for any reader."""

    sandbox_id: str
    exec: ExecSpec


class ProcessList(Msg):
    sandbox_id: str


class ProcessRead(Msg):
    sandbox_id: str
    pid: int
    stdout_offset: int = 0
    stderr_offset: int = 0
    max_bytes: int = DEFAULT_MAX_OUTPUT


class ProcessWait(Msg):
    sandbox_id: str
    pid: int
    timeout: float = DEFAULT_EXEC_TIMEOUT_S


class ProcessSignal(Msg):
    sandbox_id: str
    pid: int
    signal: int = 15
    group: bool = True


class ProcessInput(Msg):
    sandbox_id: str
    pid: int
    data: bytes = b""
    eof: bool = False


class ExecInput(Msg):
    """Bytes for the stdin of a running ``Exec`` opened with ``stdin_open`` (``target``
    is its request id). Answered once the bytes are in the command's stdin, so a writer
    that waits for each answer goes at the command's pace and nothing piles up between.
    Input for a command that has ended, or that closed its stdin, is dropped (an Ack
    all the same, as a write to a closed pipe is for ``docker exec -i``)."""

    sandbox_id: str
    target: str
    data: bytes = b""
    eof: bool = False


class PtyOpen(Msg):
    """An interactive terminal; output streams to ``stream_to``, input by PtyInput
    naming this request's id. The reply comes when the terminal's process exits."""

    sandbox_id: str
    stream_to: str
    argv: list[str] = msgspec.field(default_factory=lambda: ["/bin/bash", "-l"])
    rows: int = 24
    cols: int = 80
    env: dict[str, str] = {}
    cwd: str | None = None
    timeout: float = 3600.0


class PtyInput(Msg):
    sandbox_id: str
    pty: str
    data: bytes = b""
    eof: bool = False


class PtyResize(Msg):
    sandbox_id: str
    pty: str
    rows: int
    cols: int


class Cancel(Msg):
    """End a streaming request (exec, watch, pty) by its request id."""

    sandbox_id: str
    target: str


class WatchDir(Msg):
    """Stream created/modified/deleted events under ``path`` until ``timeout`` or Cancel."""

    sandbox_id: str
    path: str
    stream_to: str
    timeout: float = 3600.0
    interval: float = 0.2


class UploadTar(Msg):
    """Unpack a tar archive (``data``) into directory ``path``."""

    sandbox_id: str
    path: str
    data: bytes


class DownloadTar(Msg):
    """Stream a tar archive of ``path`` to ``stream_to``."""

    sandbox_id: str
    path: str
    stream_to: str
    timeout: float = 600.0


class ExposePort(Msg):
    """Make TCP port ``port`` inside the sandbox reachable at an address on its worker
    (answered with :class:`PortExposed`); the same port again gets the same address.
    Works whatever the sandbox's network: connections travel over the guest channel.
    The address closes when the sandbox ends."""

    sandbox_id: str
    port: int


class PipeOpen(Msg):
    """Start ``argv`` with its stdin (``write``) and/or stdout (``read``) moved only on
    request, by PipeWrite / PipeRead: a transfer of any size in bounded memory, paced by
    whoever pulls or pushes. The reply's pid names the pipe; it is killed after
    ``idle_timeout`` seconds without a request, or ``timeout`` in all."""

    sandbox_id: str
    argv: list[str]
    read: bool = False
    write: bool = False
    env: dict[str, str] = {}
    cwd: str | None = None
    timeout: float = 3600.0
    idle_timeout: float = 120.0


class PipeWrite(Msg):
    """Answered once ``data`` is in the command's stdin pipe; ``eof`` then closes it."""

    sandbox_id: str
    pipe: int
    data: bytes = b""
    eof: bool = False


class PipeRead(Msg):
    """Up to ``max_bytes`` of the command's stdout, as soon as some is there (PipeData)."""

    sandbox_id: str
    pipe: int
    max_bytes: int = 8 << 20


class PipeClose(Msg):
    """Wait up to ``timeout`` for the command to exit (``kill``: kill it first) and
    drop the pipe; ExecResult with its exit code and the tail of its stderr."""

    sandbox_id: str
    pipe: int
    kill: bool = False
    timeout: float = 600.0


ExecRequest = (
    SessionRun | SessionInterrupt | SessionClose | ProcessStart | ProcessList | ProcessRead
    | ProcessWait | ProcessSignal | ProcessInput | ExecInput | PtyOpen | PtyInput | PtyResize | Cancel
    | WatchDir | UploadTar | DownloadTar | PipeOpen | PipeWrite | PipeRead | PipeClose
)

FileRequest = RemoveFile | MakeDir | RenameFile | StatFile


class UpdateSandbox(Msg):
    """Client -> worker: change a running sandbox. ``timeout``: its lifetime, in seconds
    from now (longer or shorter); ``tags``: its tags, replaced whole. None leaves it."""

    sandbox_id: str
    timeout: float | None = None
    tags: dict[str, str] | None = None


Message = (
    CreateSandbox | StartSandbox | Exec | WriteFile | ReadFile | ListFiles | Terminate
    | BuildTemplate | SnapshotSandbox | PauseSandbox | ResumeSandbox | SandboxClaimed
    | ExecRequest | FileRequest | UpdateSandbox | ExposePort
)


# Unix seconds on Redis's clock (hotbed.clock); 0: none. Bounded at decode: NaN,
# infinity or a date centuries away would overflow the millisecond TTLs derived from it.
Deadline = Annotated[float, msgspec.Meta(ge=0, le=1e10)]


class Envelope(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    id: str
    # Redis list the reply is pushed to (hotbed.keys.reply()).
    reply_to: str
    # Absolute deadline, on Redis's clock: the only clock two hosts share.
    deadline: Deadline
    body: Message
    v: int = PROTOCOL_VERSION
    client: str = ""


class _EnvelopeHeader(msgspec.Struct, kw_only=True):
    """Lenient view used to answer a message whose body does not decode."""

    id: str
    reply_to: str
    deadline: float = 0.0
    body: msgspec.Raw = msgspec.Raw(b"")


# ------------------------------------------------------------------------- replies


class SandboxCreated(Msg):
    sandbox_id: str
    worker_id: str
    path: CreatePath = "cold"
    # Seconds the worker spent making the sandbox ready (not counting queueing).
    startup_s: float = 0.0
    gpu_uuids: list[str] = []


class ExecResult(Msg):
    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""
    truncated: bool = False
    duration_s: float = 0.0
    # A session command ended by SessionInterrupt (exit code 130).
    interrupted: bool = False


class FileContent(Msg):
    data: bytes
    truncated: bool = False
    # The file's whole size (-1: unknown), so a chunked read knows when it is done.
    size: int = -1


class FileWritten(Msg):
    size: int


class DirListing(Msg):
    entries: list[FileEntry]
    # Cut at the guest agent's limit on entries per listing (a deep listing of a huge tree).
    truncated: bool = False


class FileStat(Msg):
    # None: nothing at that path (StatFile with missing_ok).
    entry: FileEntry | None = None


class PipeData(Msg):
    data: bytes = b""
    # The command's stdout is at its end: nothing more will come.
    eof: bool = False


class Terminated(Msg):
    sandbox_id: str


class TemplateReady(Msg):
    name: str
    snapshot: str
    size_bytes: int = 0
    build_s: float = 0.0
    worker_id: str = ""


class SandboxState(Msg):
    sandbox_id: str
    state: str


class Ack(Msg):
    """A request done, nothing to return."""


class StdinState(Msg):
    """Reply to ExecInput: ``closed`` once the command's stdin is closed (it ended, it
    closed it, or the input said eof); input sent after that is dropped."""

    closed: bool = False


class ProcessInfo(Msg):
    pid: int
    argv: list[str] = []
    running: bool = True
    exit_code: int | None = None
    signal: int | None = None
    started_at: float = 0.0
    # Bytes of output produced so far (offsets for ProcessRead).
    stdout_size: int = 0
    stderr_size: int = 0


class ProcessListing(Msg):
    procs: list[ProcessInfo]


class ProcessOutput(Msg):
    info: ProcessInfo
    stdout: bytes = b""
    stderr: bytes = b""
    # Offsets the returned bytes start at (later than asked when older output was
    # dropped: a process keeps its last 8 MiB per stream).
    stdout_offset: int = 0
    stderr_offset: int = 0


class PortExposed(Msg):
    """Where a sandbox's port is reachable: ``host:host_port`` on its worker."""

    sandbox_id: str
    port: int
    host: str
    host_port: int

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.host_port}" if ":" in self.host else f"{self.host}:{self.host_port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"


class ErrorReply(Msg):
    # HotbedError subclass name, e.g. "ImageNotFound".
    code: str
    message: str
    sandbox_id: str | None = None
    worker_id: str | None = None
    detail: dict[str, Any] = {}


Reply = (
    SandboxCreated
    | ExecResult
    | FileContent
    | FileWritten
    | DirListing
    | FileStat
    | PipeData
    | Terminated
    | TemplateReady
    | SandboxState
    | Ack
    | StdinState
    | ProcessInfo
    | ProcessListing
    | ProcessOutput
    | PortExposed
    | ErrorReply
)


class ReplyEnvelope(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    id: str
    body: Reply
    v: int = PROTOCOL_VERSION


# ----------------------------------------------------------------------- codecs

ENCODER = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_header_decoder = msgspec.msgpack.Decoder(_EnvelopeHeader)
_reply_decoder = msgspec.msgpack.Decoder(ReplyEnvelope)
_worker_info_decoder = msgspec.msgpack.Decoder(WorkerInfo)


def encode(obj: Any) -> bytes:
    return ENCODER.encode(obj)


def decode_envelope(data: bytes) -> Envelope:
    """Decode a request; raises msgspec.DecodeError / ValidationError when malformed."""
    return _envelope_decoder.decode(data)


def decode_header(data: bytes) -> _EnvelopeHeader | None:
    """Best-effort id and reply key of a message whose body failed to decode."""
    try:
        return _header_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def decode_reply(data: bytes) -> ReplyEnvelope:
    return _reply_decoder.decode(data)


def decode_worker_info(data: bytes) -> WorkerInfo:
    return _worker_info_decoder.decode(data)


def error_reply(exc: BaseException) -> ErrorReply:
    """Wire form of an exception; non-hotbed exceptions become RuntimeFailure."""
    from hotbed.errors import HotbedError

    if isinstance(exc, HotbedError):
        return ErrorReply(
            code=exc.code,
            message=exc.message,
            sandbox_id=exc.sandbox_id,
            worker_id=exc.worker_id,
            detail=exc.detail,
        )
    # A bare deadline (anyio.fail_after) says nothing by itself.
    text = str(exc) or ("an internal deadline passed" if isinstance(exc, TimeoutError) else "")
    return ErrorReply(code="RuntimeFailure", message=f"{type(exc).__name__}: {text}")


def raise_for_reply(reply: Reply, *, request_id: str | None = None) -> Reply:
    """Return ``reply`` unless it is an :class:`ErrorReply`, which is raised typed."""
    if isinstance(reply, ErrorReply):
        from hotbed.errors import error_class

        raise error_class(reply.code)(
            reply.message,
            sandbox_id=reply.sandbox_id,
            worker_id=reply.worker_id,
            request_id=request_id,
            detail=dict(reply.detail),
        )
    return reply
