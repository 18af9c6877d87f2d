"""Requests of SWE-ReX's runtime interface, each run against hotbed's runtime and against
swe-rex's own (``swerex-remote`` in a runsc container of the same image, reached by
its ``RemoteRuntime``): the parity test compares what each returns or raises.

A case is ``(name, request)``: ``request(rt, local)`` makes one call on the runtime
``rt`` (``local`` is a host folder of files to upload) and returns what came back; the
cases run in order on each runtime, so session state carries from one to the next.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from swerex.runtime.abstract import (
    AbstractRuntime,
    BashAction,
    BashInterruptAction,
    CloseBashSessionRequest,
    Command,
    CreateBashSessionRequest,
    ReadFileRequest,
    UploadRequest,
    WriteFileRequest,
)

Request = Callable[[AbstractRuntime, Path], Awaitable[Any]]


def outcome(value: Any = None, exc: BaseException | None = None) -> tuple[Any, ...]:
    """What a call returned (its model, dumped) or raised (type and message)."""
    if exc is not None:
        return ("raise", f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc))
    dump = value.model_dump() if hasattr(value, "model_dump") else value
    if type(value).__name__ == "CreateBashSessionResponse":
        # The first prompt names the container's host name, which differs.
        dump["output"] = re.sub(r"@[\w.-]+:", "@HOST:", dump["output"])
    return ("ok", type(value).__name__, dump)


def make_local(root: Path) -> None:
    (root / "repo" / "pkg" / "sub").mkdir(parents=True)
    (root / "repo" / "pkg" / "__init__.py").write_text("")
    (root / "repo" / "pkg" / "m.py").write_text("M = 1\n")
    (root / "repo" / "pkg" / "sub" / "data.txt").write_text("data\n" * 3)
    (root / "repo" / "README").write_text("read me\n")
    (root / "repo" / "run.sh").write_text("#!/bin/sh\n")
    (root / "repo" / "run.sh").chmod(0o755)
    (root / "repo" / "pkg" / "sub").chmod(0o700)
    (root / "repo" / "secret").write_text("s\n")
    (root / "repo" / "secret").chmod(0o600)
    (root / "repo" / "m-link.py").symlink_to("pkg/m.py")
    (root / "repo" / "sub-link").symlink_to("pkg/sub")
    (root / "one.txt").write_text("one\n")


def _sh(command: str, **kw: Any) -> Request:
    return lambda rt, _: rt.run_in_session(BashAction(command=command, **kw))


def _ex(command: str | list[str], **kw: Any) -> Request:
    return lambda rt, _: rt.execute(Command(command=command, **kw))


CASES: list[tuple[str, Request]] = [
    ("is_alive", lambda rt, _: rt.is_alive()),
    ("run before session", _sh("echo hi")),
    ("close missing session", lambda rt, _: rt.close_session(CloseBashSessionRequest(session="nope"))),
    ("create session", lambda rt, _: rt.create_session(CreateBashSessionRequest())),
    ("create session again", lambda rt, _: rt.create_session(CreateBashSessionRequest())),
    ("echo", _sh("echo hello")),
    ("no output", _sh("true")),
    ("cd and export", _sh("mkdir -p /tmp/w && cd /tmp/w && export K=v")),
    ("state kept", _sh("pwd; echo $K")),
    ("two lines", _sh("echo a\necho b")),
    ("stderr", _sh("echo out; echo err >&2")),
    ("no trailing newline", _sh("printf abc")),
    ("function", _sh("f() { echo f:$1; }; f x")),
    ("heredoc", _sh("cat <<'EOF'\nline 1\nline 2\nEOF")),
    ("exit code raise", _sh("ls /does-not-exist")),
    ("exit code raise with error_msg", _sh("false", error_msg="it failed")),
    ("exit code silent", _sh("(exit 3)", check="silent")),
    ("exit code ignore", _sh("(exit 3)", check="ignore")),
    ("command not found", _sh("no-such-command-x")),
    ("cd to missing dir", _sh("cd /no/such/dir")),
    ("syntax error", _sh("echo (")),
    ("syntax error on a later line", _sh("echo first > /tmp/w/ran\necho (")),
    ("later line did not run", _sh("cat /tmp/w/ran")),
    ("syntax error unterminated quote", _sh("echo 'abc")),
    ("syntax error silent", _sh("if then fi", check="silent")),
    ("state after errors", _sh("echo $K; pwd")),
    ("timeout", _sh("sleep 10", timeout=0.5)),
    ("interrupt", lambda rt, _: rt.run_in_session(BashInterruptAction())),
    ("after interrupt", _sh("echo alive")),
    ("second session", lambda rt, _: rt.create_session(CreateBashSessionRequest(session="s2"))),
    ("second session is separate", _sh("pwd; echo K=$K", session="s2")),
    ("close second session", lambda rt, _: rt.close_session(CloseBashSessionRequest(session="s2"))),
    ("run in closed session", _sh("true", session="s2")),
    ("execute argv", _ex(["echo", "a b"])),
    ("execute stderr", _ex(["sh", "-c", "echo out; echo err >&2; exit 4"])),
    ("execute merged", _ex(["sh", "-c", "echo out; echo err >&2"], merge_output_streams=True)),
    ("execute shell", _ex("echo $0 && exit 3", shell=True)),
    ("execute shell list", _ex(["echo $0-$1", "zero", "one"], shell=True)),
    ("execute shell merged", _ex("echo o; echo e >&2", shell=True, merge_output_streams=True)),
    ("execute string no shell", _ex("echo hi")),
    ("execute missing program", _ex(["no-such-program-x"])),
    ("execute shell missing program", _ex("no-such-program-x", shell=True)),
    ("execute not executable", _ex(["/etc/hostname"])),
    ("execute cwd", _ex(["pwd"], cwd="/tmp")),
    ("execute missing cwd", _ex(["pwd"], cwd="/no/such/dir")),
    ("execute env replaces", _ex(["sh", "-c", "echo A=$A HOME=$HOME"], env={"A": "1"})),
    ("execute check", _ex(["false"], check=True)),
    ("execute check error_msg", _ex(["false"], check=True, error_msg="setup")),
    ("execute check ok", _ex(["true"], check=True)),
    ("execute timeout", _ex(["sleep", "10"], timeout=0.5)),
    ("execute non-utf8", _ex(["printf", "\\377ok"])),
    ("write file", lambda rt, _: rt.write_file(WriteFileRequest(path="/tmp/w/new/dir/f.txt", content="héllo\n"))),
    ("read file", lambda rt, _: rt.read_file(ReadFileRequest(path="/tmp/w/new/dir/f.txt"))),
    ("read file latin-1", lambda rt, _: rt.read_file(ReadFileRequest(path="/tmp/w/new/dir/f.txt", encoding="latin-1"))),
    ("read missing file", lambda rt, _: rt.read_file(ReadFileRequest(path="/tmp/w/missing"))),
    ("read directory", lambda rt, _: rt.read_file(ReadFileRequest(path="/tmp/w"))),
    ("make binary file", _ex(["sh", "-c", "printf '\\377ok' > /tmp/w/bin"])),
    ("read binary strict", lambda rt, _: rt.read_file(ReadFileRequest(path="/tmp/w/bin"))),
    ("read binary replace", lambda rt, _: rt.read_file(ReadFileRequest(path="/tmp/w/bin", errors="replace"))),
    ("write denied", lambda rt, _: rt.write_file(WriteFileRequest(path="/root/x", content="x"))),
    ("write under a file", lambda rt, _: rt.write_file(WriteFileRequest(path="/etc/hostname/x", content="x"))),
    ("upload dir", lambda rt, d: rt.upload(UploadRequest(source_path=str(d / "repo"), target_path="/tmp/up/repo"))),
    ("uploaded tree", _sh("cd /tmp/up/repo && find . | sort && cat pkg/m.py pkg/sub/data.txt")),
    ("uploaded owners and modes", _sh(
        "cd /tmp/up/repo && stat -c '%U %G %a %F %n' . pkg pkg/sub pkg/m.py run.sh secret m-link.py "
        "sub-link && cat m-link.py && ls -A sub-link")),
    ("upload file", lambda rt, d: rt.upload(UploadRequest(source_path=str(d / "one.txt"), target_path="/tmp/up/new/one.txt"))),
    ("uploaded file", _sh("cat /tmp/up/new/one.txt")),
    ("upload missing source", lambda rt, d: rt.upload(UploadRequest(source_path=str(d / "nope"), target_path="/tmp/x"))),
    ("close", lambda rt, _: rt.close()),
]
