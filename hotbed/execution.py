"""Where the agent-grade execution names were first published; kept so imports such
as ``from hotbed.execution import Session`` keep working.

The code lives in one home per concept: :mod:`hotbed.handles` (command results, live
output, session/process/terminal handles), :mod:`hotbed.streaming` (one streaming
request), :mod:`hotbed.transfer` (file and directory copies); the methods that make
them are on :class:`hotbed.sandbox.Sandbox`.
"""

from hotbed.client import OP_TIMEOUT_S
from hotbed.handles import (
    CommandResult,
    ExecStream,
    OutputChunk,
    Process,
    Pty,
    Session,
    WatchEvent,
)
from hotbed.streaming import Streamed
from hotbed.transfer import CHUNK_BYTES

__all__ = [
    "CHUNK_BYTES",
    "OP_TIMEOUT_S",
    "CommandResult",
    "ExecStream",
    "OutputChunk",
    "Process",
    "Pty",
    "Session",
    "Streamed",
    "WatchEvent",
]
