"""Every error hotbed raises, and how errors cross the wire.

Tree::

    HotbedError                      root; carries optional sandbox_id / worker_id / request_id
    ├── ConfigError                  bad settings file or HOTBED_* variable
    ├── ConnectionLost               Redis unreachable from a client or daemon
    ├── RequestTimeout (TimeoutError)  no reply before the request's deadline
    ├── Overloaded                   a request stream's backlog is over its limit; retry later
    ├── InvalidRequest               malformed or out-of-range request (negative timeout, ...)
    │   └── UnsupportedRequest       a peer does not know this message type or version
    ├── ImageNotFound                no worker holds the image or could pull it
    ├── TemplateNotFound             no template of that name
    ├── SandboxNotFound              no such sandbox, or it has ended
    ├── SandboxNotRunning            the sandbox exists but cannot serve (paused, dead, ...)
    ├── CapacityExhausted            no worker can take the sandbox before its deadline
    ├── NoMatchingWorker             no live worker could ever satisfy the request (GPU model, tags)
    ├── WorkerLost                   the sandbox's worker stopped heartbeating mid-request
    ├── ExecTimeout (TimeoutError)   a command ran past its timeout and was killed
    ├── ExecFailed                   a command could not be started (no such program, ...)
    ├── ProcessNotFound              no background process with that id in the sandbox
    ├── SessionClosed                the shell session has exited (``exit`` in it, killed)
    ├── FileError                    a file operation failed inside the sandbox
    │   ├── FileTooLarge             over the per-message size limit
    │   ├── FileNotFound (FileNotFoundError)      nothing at that path
    │   ├── FileExists (FileExistsError)          something already at that path
    │   ├── IsADirectory (IsADirectoryError)      a directory where a file was needed
    │   ├── NotADirectory (NotADirectoryError)    a file where a directory was needed
    │   └── DirectoryNotEmpty        removing a non-empty directory without ``recursive``
    ├── RuntimeFailure               the container runtime failed (docker/runsc error)
    └── SetupFailed                  a template's set-up or readiness check failed

Errors cross the wire as :class:`hotbed.protocol.ErrorReply` (``code`` is the class
name); :func:`from_reply` turns one back into the matching exception, so a client sees
the same type the daemon raised. Unknown codes degrade to :class:`HotbedError`. The
file errors that have a built-in twin also subclass it, so ``except FileNotFoundError``
catches a missing file in a sandbox as it would a local one.
"""

from __future__ import annotations

from typing import Any, ClassVar


class HotbedError(Exception):
    """Root of every hotbed error."""

    code: ClassVar[str] = "HotbedError"

    def __init__(
        self,
        message: str = "",
        *,
        sandbox_id: str | None = None,
        worker_id: str | None = None,
        request_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.sandbox_id = sandbox_id
        self.worker_id = worker_id
        self.request_id = request_id
        self.detail: dict[str, Any] = detail or {}

    def __str__(self) -> str:
        return self.message


class ConfigError(HotbedError):
    code = "ConfigError"


class ConnectionLost(HotbedError):
    code = "ConnectionLost"


class RequestTimeout(HotbedError, TimeoutError):
    code = "RequestTimeout"


class Overloaded(HotbedError):
    code = "Overloaded"


class InvalidRequest(HotbedError):
    code = "InvalidRequest"


class UnsupportedRequest(InvalidRequest):
    code = "UnsupportedRequest"


class ImageNotFound(HotbedError):
    code = "ImageNotFound"


class TemplateNotFound(HotbedError):
    code = "TemplateNotFound"


class SandboxNotFound(HotbedError):
    code = "SandboxNotFound"


class SandboxNotRunning(HotbedError):
    code = "SandboxNotRunning"


class CapacityExhausted(HotbedError):
    code = "CapacityExhausted"


class NoMatchingWorker(HotbedError):
    code = "NoMatchingWorker"


class WorkerLost(HotbedError):
    code = "WorkerLost"


class ExecTimeout(HotbedError, TimeoutError):
    code = "ExecTimeout"


class ExecFailed(HotbedError):
    code = "ExecFailed"


class ProcessNotFound(HotbedError):
    code = "ProcessNotFound"


class SessionClosed(HotbedError):
    code = "SessionClosed"


class FileError(HotbedError):
    code = "FileError"


class FileTooLarge(FileError):
    code = "FileTooLarge"


class FileNotFound(FileError, FileNotFoundError):
    code = "FileNotFound"


class FileExists(FileError, FileExistsError):
    code = "FileExists"


class IsADirectory(FileError, IsADirectoryError):
    code = "IsADirectory"


class NotADirectory(FileError, NotADirectoryError):
    code = "NotADirectory"


class DirectoryNotEmpty(FileError):
    code = "DirectoryNotEmpty"


class RuntimeFailure(HotbedError):
    code = "RuntimeFailure"


class SetupFailed(HotbedError):
    code = "SetupFailed"


def _all_subclasses(cls: type[HotbedError]) -> list[type[HotbedError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def error_class(code: str) -> type[HotbedError]:
    """The exception class for a wire ``code``; :class:`HotbedError` when unknown."""
    for cls in _all_subclasses(HotbedError):
        if cls.code == code:
            return cls
    return HotbedError
