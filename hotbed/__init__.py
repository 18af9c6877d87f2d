"""hotbed: self-hosted code-execution sandboxes for AI coding agents.

    import hotbed

    async with hotbed.Client() as client:
        sb = await hotbed.Sandbox.create("hotbed/base", client=client)
        print((await sb.exec("python3", "-c", "print(6*7)")).stdout)
        await sb.terminate()

``hotbed.sync.Sandbox`` is the same API for scripts without an event loop.
"""

from hotbed.client import Client
from hotbed.errors import (
    CapacityExhausted,
    ConnectionLost,
    DirectoryNotEmpty,
    ExecFailed,
    ExecTimeout,
    FileError,
    FileExists,
    FileNotFound,
    FileTooLarge,
    HotbedError,
    ImageNotFound,
    InvalidRequest,
    IsADirectory,
    NoMatchingWorker,
    NotADirectory,
    Overloaded,
    ProcessNotFound,
    RequestTimeout,
    RuntimeFailure,
    SandboxNotFound,
    SandboxNotRunning,
    SessionClosed,
    SetupFailed,
    TemplateNotFound,
    UnsupportedRequest,
    WorkerLost,
)
from hotbed.handles import CommandResult
from hotbed.sandbox import Sandbox

__all__ = [
    "CapacityExhausted",
    "Client",
    "CommandResult",
    "ConnectionLost",
    "DirectoryNotEmpty",
    "ExecFailed",
    "ExecTimeout",
    "FileError",
    "FileExists",
    "FileNotFound",
    "FileTooLarge",
    "HotbedError",
    "ImageNotFound",
    "InvalidRequest",
    "IsADirectory",
    "NoMatchingWorker",
    "NotADirectory",
    "Overloaded",
    "ProcessNotFound",
    "RequestTimeout",
    "RuntimeFailure",
    "Sandbox",
    "SandboxNotFound",
    "SandboxNotRunning",
    "SessionClosed",
    "SetupFailed",
    "TemplateNotFound",
    "UnsupportedRequest",
    "WorkerLost",
]
