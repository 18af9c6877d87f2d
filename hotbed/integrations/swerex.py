"""SWE-ReX on hotbed: ``pip install hotbed[swerex]``.

SWE-agent drives sandboxes through SWE-ReX's ``AbstractDeployment`` and
``AbstractRuntime``. :class:`HotbedDeployment` makes a hotbed sandbox; its
:class:`HotbedRuntime` serves SWE-ReX's calls natively: bash sessions are hotbed shell
sessions (state persists; exit codes come from the session's status pipe, not from
prompt scraping; an interrupt is Ctrl-C that leaves the session alive), ``execute`` is
a hotbed exec, files go through the guest agent. No SWE-ReX server runs in the sandbox::

    deployment = HotbedDeployment(image="hotbed/base")
    await deployment.start()
    rt = deployment.runtime
    await rt.create_session(CreateBashSessionRequest())
    obs = await rt.run_in_session(BashAction(command="cd /repo && pytest -x", timeout=600))
    await deployment.stop()

Differences from SWE-ReX's own docker deployment: a session's stdout and stderr are
merged (as a terminal would show them) but without terminal control characters;
``is_interactive_command`` actions run as ordinary commands; a timed-out command has
already been interrupted when CommandTimeoutError is raised (a following
BashInterruptAction is harmless).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shlex
import shutil
from typing import Any

import anyio
from swerex.deployment.abstract import AbstractDeployment
from swerex.deployment.hooks.abstract import CombinedDeploymentHook, DeploymentHook
from swerex.exceptions import (
    BashIncorrectSyntaxError,
    CommandTimeoutError,
    DeploymentNotStartedError,
    NonZeroExitCodeError,
    SessionDoesNotExistError,
    SessionExistsError,
    SwerexException,
)
from swerex.runtime.abstract import (
    AbstractRuntime,
    Action,
    BashAction,
    BashInterruptAction,
    BashObservation,
    CloseBashSessionResponse,
    CloseResponse,
    CloseSessionRequest,
    CloseSessionResponse,
    Command,
    CommandResponse,
    CreateBashSessionResponse,
    CreateSessionRequest,
    CreateSessionResponse,
    IsAliveResponse,
    Observation,
    ReadFileRequest,
    ReadFileResponse,
    UploadRequest,
    UploadResponse,
    WriteFileRequest,
    WriteFileResponse,
)
from swerex.runtime.local import _split_bash_command

from hotbed.client import Client
from hotbed.errors import ExecTimeout, FileError, HotbedError
from hotbed.handles import CommandResult, Session
from hotbed.sandbox import Sandbox

__all__ = ["HotbedDeployment", "HotbedRuntime"]

# SWE-ReX's "no timeout" (None) still gets a bound here: every hotbed call has one.
MAX_COMMAND_S = 24 * 3600.0
MAX_OUTPUT = 16 << 20
# A directory upload in one request up to this size; larger ones go through upload_dir.
MAX_TAR_BYTES = 30 << 20
UPLOAD_TIMEOUT_S = 600.0
# The upload script's exit status when the sandbox has no gzip (it then sends a plain tar).
_NO_GZIP = 97


class HotbedRuntime(AbstractRuntime):
    """SWE-ReX runtime backed by one hotbed sandbox."""

    def __init__(self, sandbox: Sandbox, *, logger: logging.Logger | None = None) -> None:
        self.sandbox = sandbox
        self.logger = logger or logging.getLogger(__name__)
        self._sessions: dict[str, Session] = {}

    async def is_alive(self, *, timeout: float | None = None) -> IsAliveResponse:
        try:
            with anyio.fail_after(timeout or 10.0):
                await self.sandbox.list_files("/")
        except (HotbedError, TimeoutError) as exc:
            return IsAliveResponse(is_alive=False, message=str(exc))
        return IsAliveResponse(is_alive=True)

    async def create_session(self, request: CreateSessionRequest) -> CreateSessionResponse:
        if request.session in self._sessions:
            raise SessionExistsError(f"session {request.session} already exists")
        session = self.sandbox.shell(request.session)
        self._sessions[request.session] = session
        limit = max(request.startup_timeout, 10.0)
        prompt = ""

        async def first_prompt() -> None:
            # What SWE-ReX's interactive bash prints before its first command: the
            # prompt its rc files set (its PS1 takes over only after start-up).
            nonlocal prompt
            res = await self.sandbox.exec("bash", "-ic", 'printf %s "${PS1@P}"', timeout=limit)
            prompt = res.stdout_bytes.decode(errors="backslashreplace")

        output = ""
        async with anyio.create_task_group() as tg:
            tg.start_soon(first_prompt)
            for path in request.startup_source:
                res = await session.run(f"source {path}", timeout=limit, merge_stderr=True)
                output += _terminal_output(res.stdout_bytes)
            # Make the session exist now, so its start-up cost is not the first command's.
            if not request.startup_source:
                await session.run("true", timeout=limit)
        return CreateBashSessionResponse(output=prompt + output)

    async def run_in_session(self, action: Action) -> Observation:
        session = self._sessions.get(action.session)
        if session is None:
            raise SessionDoesNotExistError(f"session {action.session!r} does not exist")
        if isinstance(action, BashInterruptAction):
            await session.interrupt()
            return BashObservation(output="", exit_code=0, expect_string=_PS1)
        assert isinstance(action, BashAction)
        # SWE-ReX checks the syntax before it runs anything, and runs the command's
        # parts joined by " ; " (or, where bashlex cannot split it, with a marker it
        # waits for): its messages and expect_string say which.
        try:
            joined = " ; ".join(_split_bash_command(action.command))
            expect_string = _PS1
        except Exception:  # bashlex fails in many ways; SWE-ReX catches them all too
            joined = action.command + _FALLBACK_SUFFIX
            expect_string = _UNIQUE
        if "\n" in action.command.strip():
            # Bash runs a multi-line script line by line: an error on a later line
            # must be found before the earlier ones run.
            await self._check_syntax(action.command)
        timeout = action.timeout if action.timeout is not None else MAX_COMMAND_S
        try:
            res = await session.run(
                action.command, timeout=timeout, merge_stderr=True, max_output=MAX_OUTPUT
            )
        except ExecTimeout as exc:
            raise CommandTimeoutError(
                f"timeout after {action.timeout} seconds while running command {joined!r}"
            ) from exc
        if res.exit_code == 2 and _SYNTAX_ERROR.search(res.stdout_bytes):
            # Bash parses a whole line before it runs any of it: nothing ran.
            await self._check_syntax(action.command)
        output = _terminal_output(res.stdout_bytes)
        if action.check == "ignore":
            return BashObservation(output=output, exit_code=None, expect_string=expect_string)
        if action.check == "raise" and res.exit_code != 0:
            msg = (
                f"Command {action.command!r} failed with exit code {res.exit_code}. "
                f"Here is the output:\n{output!r}"
            )
            if action.error_msg:
                msg = f"{action.error_msg}: {msg}"
            raise NonZeroExitCodeError(msg)
        return BashObservation(output=output, exit_code=res.exit_code, expect_string=expect_string)

    async def _check_syntax(self, command: str) -> None:
        """``bash -n`` on the command, as SWE-ReX runs it (input as its here-document)."""
        res = await self.sandbox.exec("bash", "-n", stdin=command + "\n", timeout=60.0)
        if res.exit_code == 0:
            return
        stdout = res.stdout_bytes.decode(errors="backslashreplace")
        stderr = res.stderr_bytes.decode(errors="backslashreplace")
        raise BashIncorrectSyntaxError(
            f"Error (exit code {res.exit_code}) while checking bash command \n{command!r}\n"
            f"---- Stderr ----\n{stderr}\n---- Stdout ----\n{stdout}",
            extra_info={"bash_stdout": stdout, "bash_stderr": stderr},
        )

    async def close_session(self, request: CloseSessionRequest) -> CloseSessionResponse:
        session = self._sessions.pop(request.session, None)
        if session is None:
            raise SessionDoesNotExistError(f"session {request.session!r} does not exist")
        await session.close()
        return CloseBashSessionResponse()

    async def execute(self, command: Command) -> CommandResponse:
        # As subprocess.run: a string is one program (shell=False) or one script
        # (shell=True, any further list items are the script's $0, $1, ...).
        argv = [command.command] if isinstance(command.command, str) else list(command.command)
        shell = command.shell
        if command.merge_output_streams:
            if shell:
                argv = ["/bin/sh", "-c", "exec 2>&1\n" + argv[0], *argv[1:]]
            else:
                argv = ["/bin/sh", "-c", 'exec "$@" 2>&1', "sh", *argv]
            shell = False
        elif shell and len(argv) > 1:
            argv, shell = ["/bin/sh", "-c", *argv], False
        if command.env is not None:
            # subprocess.run's env replaces the environment; hotbed's adds to it.
            argv = ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in command.env.items()),
                    *(["/bin/sh", "-c", argv[0]] if shell else argv)]
            shell = False
        timeout = command.timeout if command.timeout is not None else MAX_COMMAND_S
        try:
            res = await self.sandbox.exec(
                *argv, shell=shell, cwd=command.cwd, timeout=timeout, max_output=MAX_OUTPUT,
            )
        except ExecTimeout as exc:
            raise CommandTimeoutError(
                f"Timeout ({command.timeout}s) exceeded while running command"
            ) from exc
        if not command.shell and res.exit_code in (126, 127) and not res.stdout_bytes:
            # The program could not be started: subprocess.run raises the OSError.
            if (spawn_error := _spawn_error(res.stderr_bytes)) is not None:
                raise spawn_error
        r = CommandResponse(
            stdout=res.stdout_bytes.decode(errors="backslashreplace"),
            stderr=res.stderr_bytes.decode(errors="backslashreplace"),
            exit_code=res.exit_code,
        )
        if command.check and res.exit_code != 0:
            msg = (
                f"Command {command.command!r} failed with exit code {res.exit_code}. "
                f"Stdout:\n{r.stdout!r}\nStderr:\n{r.stderr!r}"
            )
            if command.error_msg:
                msg = f"{command.error_msg}: {msg}"
            raise NonZeroExitCodeError(msg)
        return r

    async def read_file(self, request: ReadFileRequest) -> ReadFileResponse:
        try:
            data = await self.sandbox.read_file(request.path)
        except HotbedError as exc:
            raise _os_error(exc) from None
        try:
            content = data.decode(request.encoding or "utf-8", request.errors or "strict")
        except (UnicodeError, LookupError) as exc:
            raise _as_transferred(exc) from None
        return ReadFileResponse(content=content)

    async def write_file(self, request: WriteFileRequest) -> WriteFileResponse:
        try:
            await self.sandbox.write_file(request.path, request.content)
        except HotbedError as exc:
            raise _os_error(exc) from None
        return WriteFileResponse()

    async def upload(self, request: UploadRequest) -> UploadResponse:
        source = await anyio.Path(request.source_path).resolve()
        if await source.is_dir():
            await self._upload_dir(str(source), request.target_path)
        elif await source.is_file():
            await self.sandbox.upload_file(source, request.target_path)
        else:
            raise ValueError(f"Source path {source} is not a file or directory")
        return UploadResponse()

    async def _upload_dir(self, source: str, target: str) -> None:
        """A directory as a tar made by the host's tar (in C: a Python tarfile of a few
        thousand files costs about a second), unpacked as SWE-ReX's zip leaves files:
        owned by the sandbox's user, modification time now, folders 0777 and files 0666
        under the umask (no executable bits), a link to a file as the file's content, a
        link to a folder as an empty folder.

        The tar is gzipped where the sandbox has gzip: a checkout of small text files
        shrinks 40-50x, and each byte of a request crosses Redis, the worker and the
        runtime's attach (a 5 MB stdin costs about 140 ms on the way, 90 KB almost
        nothing), against a few tens of ms to inflate it in the sandbox."""
        tar = shutil.which("tar")
        res = None
        if tar is not None:
            names = await anyio.to_thread.run_sync(_tree, source)
            res = await self._unpack(tar, source, names, target, gzip=True)
            if res is not None and res.exit_code == _NO_GZIP:
                res = await self._unpack(tar, source, names, target, gzip=False)
        if res is None:
            await self.sandbox.upload_dir(source, target)
            return
        if res.exit_code != 0:
            # As swe-rex's server, whose unzip makes the folders with os.makedirs.
            if (m := _MKDIR_FAILED.search(res.stderr)) and m["text"].lower() in _ERRNO_BY_TEXT:
                n = _ERRNO_BY_TEXT[m["text"].lower()]
                raise OSError(n, os.strerror(n), m["path"])
            raise FileError(f"cannot unpack into {target}: {res.stderr.strip()}",
                            sandbox_id=self.sandbox.id)

    async def _unpack(self, tar: str, source: str, names: bytes, target: str, *, gzip: bool) -> CommandResult | None:
        """``names`` under ``source`` as one tar, unpacked into ``target`` in one exec;
        None where the tar is too large for one request."""
        # Not recursive: ``names`` already lists what the zip would hold. Followed links,
        # and zipfile's modes: folders a+rwx, files a+rw (X adds search to folders only,
        # once a-x has taken every executable bit away).
        done = await anyio.run_process(
            [tar, "-C", source, "--no-recursion", "--null", "--dereference", "--mode=a+rw,a-x,a+X",
             "-czf" if gzip else "-cf", "-", "-T", "-"], input=names, check=False,
        )
        if done.returncode != 0:  # a link to nowhere, a file it may not read
            raise FileError(f"cannot pack {source}: {done.stderr.decode(errors='replace').strip()}",
                            sandbox_id=self.sandbox.id)
        if len(done.stdout) > MAX_TAR_BYTES:
            return None
        q = shlex.quote(target)
        script = (
            (f"command -v gzip >/dev/null || exit {_NO_GZIP}; " if gzip else "")
            + f"mkdir -p {q} && tar -C {q} -x{'z' if gzip else ''}mf - --no-same-owner --no-same-permissions"
        )
        return await self.sandbox.exec("/bin/sh", "-c", script, stdin=done.stdout, timeout=UPLOAD_TIMEOUT_S)

    async def close(self) -> CloseResponse:
        for name in list(self._sessions):
            try:
                await self._sessions.pop(name).close()
            except HotbedError as exc:
                self.logger.warning("closing session %s: %s", name, exc)
        return CloseResponse()


# SWE-ReX's session protocol markers, which its observations report as expect_string.
_PS1 = "SHELLPS1PREFIX"
_UNIQUE = "UNIQUESTRING29234"
_FALLBACK_SUFFIX = (
    f"\n TMPEXITCODE=$? ; sleep 0.1; echo -n '{_UNIQUE}' ; (exit $TMPEXITCODE)"
)
# hotbed's guest agent sources each session command from a file, so bash starts its
# messages with that file and line where SWE-ReX's interactive bash says "bash: ".
_SOURCED_AT = re.compile(rb"^/tmp/\.hotbed-session-[^/\n]*/cmd\d+\.sh: line \d+: ", re.M)
_SYNTAX_ERROR = re.compile(
    rb"^/tmp/\.hotbed-session-[^/\n]*/cmd\d+\.sh: line \d+: "
    rb"(syntax error|unexpected EOF while looking for matching)", re.M,
)
# os.strerror text (as hotbed's errors carry it, lower-cased) back to its errno.
_ERRNO_BY_TEXT = {
    os.strerror(n).lower(): n
    for n in (errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM,
              errno.EEXIST, errno.ENOEXEC, errno.ENAMETOOLONG, errno.ELOOP, errno.EROFS,
              errno.ENOSPC, errno.ETXTBSY)
}
_HOTBED_OS_ERROR = re.compile(r"^cannot \w+ .*?: (?P<text>[^:]+): (?P<path>.*)$", re.S)
_MKDIR_FAILED = re.compile(r"^mkdir: cannot create directory ‘(?P<path>.*)’: (?P<text>.*)$", re.M)
_PY_OS_ERROR = re.compile(r"^\w+: \[Errno (?P<errno>\d+)\] (?P<text>[^:]+): (?P<path>'.*')$", re.S)


def _tree(root: str) -> bytes:
    """What shutil.make_archive puts in SWE-ReX's zip: every path under ``root``, each
    folder before what it holds, links to folders listed but not followed; NUL-separated
    and relative to ``root``, as ``tar --null -T`` reads them."""
    names = [b"."]
    for at, dirnames, filenames in os.walk(os.fsencode(root)):
        rel = os.path.relpath(at, os.fsencode(root))
        names.extend(os.path.join(rel, name) for name in dirnames + filenames)
    return b"\0".join(names)


def _terminal_output(data: bytes) -> str:
    return _SOURCED_AT.sub(b"bash: ", data).decode(errors="backslashreplace")


def _os_error(exc: HotbedError) -> Exception:
    """The OSError swe-rex's runtime raises where hotbed reports a file error."""
    message = str(exc)
    if (m := _PY_OS_ERROR.match(message)) is not None:
        path = m["path"][1:-1]
        return OSError(int(m["errno"]), m["text"], path)
    if (m := _HOTBED_OS_ERROR.match(message)) is not None and m["text"] in _ERRNO_BY_TEXT:
        n = _ERRNO_BY_TEXT[m["text"]]
        return OSError(n, os.strerror(n), m["path"])
    return exc


def _spawn_error(stderr: bytes) -> OSError | None:
    """hotbed reports a program it could not start as ``WHAT: strerror`` on stderr."""
    what, sep, text = stderr.decode(errors="replace").rstrip("\n").rpartition(": ")
    n = _ERRNO_BY_TEXT.get(text.lower())
    if not sep or n is None or "\n" in what:
        return None
    return OSError(n, os.strerror(n), what)


def _as_transferred(exc: Exception) -> Exception:
    """An exception as swe-rex's RemoteRuntime re-raises it: rebuilt from its type and
    message, or SwerexException where the type cannot be built from a message alone
    (UnicodeDecodeError)."""
    try:
        return type(exc)(str(exc))
    except TypeError:
        return SwerexException(str(exc))


class HotbedDeployment(AbstractDeployment):
    """SWE-ReX deployment: one hotbed sandbox per ``start()``.

    Keyword arguments other than ``image`` and ``client`` go to ``Sandbox.create``
    (``cpu``, ``memory_mb``, ``timeout``, ``template``, ``env``, ...).
    """

    def __init__(
        self,
        image: str = "hotbed/base",
        *,
        client: Client | None = None,
        logger: logging.Logger | None = None,
        **create: Any,
    ) -> None:
        self.image = image
        self.client = client
        self.create_kwargs = create
        self.logger = logger or logging.getLogger(__name__)
        self._hooks = CombinedDeploymentHook()
        self._sandbox: Sandbox | None = None
        self._runtime: HotbedRuntime | None = None

    def __del__(self) -> None:
        # SWE-ReX's base class schedules stop() from here; hotbed never cleans up in
        # __del__: call stop() (sandboxes also end by their own timeout).
        pass

    def add_hook(self, hook: DeploymentHook) -> None:
        self._hooks.add_hook(hook)

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            raise DeploymentNotStartedError()  # type: ignore[no-untyped-call]
        return self._sandbox

    async def start(self) -> None:
        if self._sandbox is not None:
            return
        self._hooks.on_custom_step("Starting hotbed sandbox")
        self._sandbox = await Sandbox.create(self.image, client=self.client, **self.create_kwargs)
        # Started means answering, as SWE-ReX's deployments wait until is_alive: the
        # guest agent's first answer after create is what takes time.
        await self._sandbox.list_files("/")
        self._runtime = HotbedRuntime(self._sandbox, logger=self.logger)
        self.logger.info("hotbed sandbox %s on %s", self._sandbox.id, self._sandbox.worker_id)

    async def stop(self) -> None:
        sandbox, self._sandbox = self._sandbox, None
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            try:
                await runtime.close()
            except HotbedError:
                pass
        if sandbox is not None:
            await sandbox.terminate()

    async def is_alive(self, *, timeout: float | None = None) -> IsAliveResponse:
        return await self.runtime.is_alive(timeout=timeout)

    @property
    def runtime(self) -> HotbedRuntime:
        if self._runtime is None:
            raise DeploymentNotStartedError()  # type: ignore[no-untyped-call]
        return self._runtime
