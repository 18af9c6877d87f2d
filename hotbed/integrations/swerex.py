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

import logging
import shlex
from typing import Any

import anyio
from swerex.deployment.abstract import AbstractDeployment
from swerex.deployment.hooks.abstract import CombinedDeploymentHook, DeploymentHook
from swerex.exceptions import (
    CommandTimeoutError,
    DeploymentNotStartedError,
    NonZeroExitCodeError,
    SessionDoesNotExistError,
    SessionExistsError,
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

from hotbed.client import Client
from hotbed.errors import ExecTimeout, HotbedError
from hotbed.handles import Session
from hotbed.sandbox import Sandbox

__all__ = ["HotbedDeployment", "HotbedRuntime"]

# SWE-ReX's "no timeout" (None) still gets a bound here: every hotbed call has one.
MAX_COMMAND_S = 24 * 3600.0
MAX_OUTPUT = 16 << 20


class HotbedRuntime(AbstractRuntime):
    """SWE-ReX runtime backed by one hotbed sandbox."""

    def __init__(self, sandbox: Sandbox, *, logger: logging.Logger | None = None) -> None:
        self.sandbox = sandbox
        self.logger = logger or logging.getLogger(__name__)
        self._sessions: dict[str, Session] = {}

    async def is_alive(self, *, timeout: float | None = None) -> IsAliveResponse:
        try:
            res = await self.sandbox.exec("true", timeout=timeout or 10.0)
        except HotbedError as exc:
            return IsAliveResponse(is_alive=False, message=str(exc))
        return IsAliveResponse(is_alive=res.exit_code == 0)

    async def create_session(self, request: CreateSessionRequest) -> CreateSessionResponse:
        if request.session in self._sessions:
            raise SessionExistsError(f"session {request.session!r} already exists")
        session = self.sandbox.shell(request.session)
        output = ""
        for path in request.startup_source:
            res = await session.run(
                f"source {shlex.quote(path)}", timeout=max(request.startup_timeout, 10.0),
                merge_stderr=True,
            )
            output += res.stdout
        # Make the session exist now, so its start-up cost is not the first command's.
        await session.run("true", timeout=max(request.startup_timeout, 10.0))
        self._sessions[request.session] = session
        return CreateBashSessionResponse(output=output)

    async def run_in_session(self, action: Action) -> Observation:
        session = self._sessions.get(action.session)
        if session is None:
            raise SessionDoesNotExistError(f"session {action.session!r} does not exist")
        if isinstance(action, BashInterruptAction):
            await session.interrupt()
            return BashObservation(output="", exit_code=0)
        assert isinstance(action, BashAction)
        timeout = action.timeout if action.timeout is not None else MAX_COMMAND_S
        try:
            res = await session.run(
                action.command, timeout=timeout, merge_stderr=True, max_output=MAX_OUTPUT
            )
        except ExecTimeout as exc:
            raise CommandTimeoutError(
                f"timeout after {action.timeout} seconds while running command {action.command!r}"
            ) from exc
        output = res.stdout
        if action.check == "ignore":
            return BashObservation(output=output, exit_code=None)
        if action.check == "raise" and res.exit_code != 0:
            msg = (
                f"Command {action.command!r} failed with exit code {res.exit_code}. "
                f"Here is the output:\n{output!r}"
            )
            if action.error_msg:
                msg = f"{action.error_msg}: {msg}"
            raise NonZeroExitCodeError(msg)
        return BashObservation(output=output, exit_code=res.exit_code)

    async def close_session(self, request: CloseSessionRequest) -> CloseSessionResponse:
        session = self._sessions.pop(request.session, None)
        if session is None:
            raise SessionDoesNotExistError(f"session {request.session!r} does not exist")
        await session.close()
        return CloseBashSessionResponse()

    async def execute(self, command: Command) -> CommandResponse:
        # As subprocess.run: a string is one program (shell=False) or one script (shell=True).
        argv = [command.command] if isinstance(command.command, str) else list(command.command)
        if command.merge_output_streams:
            if command.shell:
                argv = ["/bin/sh", "-c", "{ " + " ".join(argv) + "\n} 2>&1"]
            else:
                argv = ["/bin/sh", "-c", 'exec "$@" 2>&1', "sh", *argv]
            shell = False
        else:
            shell = command.shell
        timeout = command.timeout if command.timeout is not None else MAX_COMMAND_S
        try:
            res = await self.sandbox.exec(
                *argv, shell=shell, env=command.env, cwd=command.cwd, timeout=timeout,
                max_output=MAX_OUTPUT,
            )
        except ExecTimeout as exc:
            raise CommandTimeoutError(
                f"Timeout ({command.timeout}s) exceeded while running command"
            ) from exc
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
        data = await self.sandbox.read_file(request.path)
        return ReadFileResponse(
            content=data.decode(request.encoding or "utf-8", request.errors or "strict")
        )

    async def write_file(self, request: WriteFileRequest) -> WriteFileResponse:
        await self.sandbox.write_file(request.path, request.content)
        return WriteFileResponse()

    async def upload(self, request: UploadRequest) -> UploadResponse:
        if await anyio.Path(request.source_path).is_dir():
            await self.sandbox.upload_dir(request.source_path, request.target_path)
        else:
            await self.sandbox.upload_file(request.source_path, request.target_path)
        return UploadResponse()

    async def close(self) -> CloseResponse:
        for name in list(self._sessions):
            try:
                await self._sessions.pop(name).close()
            except HotbedError as exc:
                self.logger.warning("closing session %s: %s", name, exc)
        return CloseResponse()


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
