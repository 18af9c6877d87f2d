"""Files through commands in the sandbox (``cat`` in, ``cat`` out, ``stat`` for
listings), for images without the guest agent: gVisor's overlay keeps the sandbox's
writes inside the sandbox, so the host's copy of the root never shows them. Same
scripts and errors as :mod:`workers.runtimes.docker.files`; here over any function
that runs a command, so they do not depend on how it is run.
"""

from __future__ import annotations

import shlex
from collections.abc import Awaitable, Callable

from hotbed.errors import FileError, FileTooLarge
from hotbed.protocol import ExecResult, FileEntry

# (argv, stdin, max_output) -> the command's result, as the file's user, 60 s timeout.
RunAs = Callable[[list[str], bytes | None, int], Awaitable[ExecResult]]


def _why(res: ExecResult) -> str:
    return res.stderr.decode("utf-8", "replace").strip()


async def write_file(run: RunAs, sandbox_id: str, path: str, data: bytes, *, mode: int, make_dirs: bool) -> int:
    q = shlex.quote(path)
    mk = f'mkdir -p "$(dirname {q})" && ' if make_dirs else ""
    res = await run(["/bin/sh", "-c", f"{mk}cat > {q} && chmod {mode:o} {q}"], data, 4096)
    if res.exit_code != 0:
        raise FileError(f"cannot write {path}: {_why(res)}", sandbox_id=sandbox_id)
    return len(data)


async def read_file(run: RunAs, sandbox_id: str, path: str, *, max_bytes: int) -> bytes:
    q = shlex.quote(path)
    script = (
        f"if [ -d {q} ]; then echo 'is a directory' >&2; exit 3; fi; "
        f"if [ ! -e {q} ]; then echo 'no such file' >&2; exit 2; fi; cat {q}"
    )
    res = await run(["/bin/sh", "-c", script], None, max_bytes)
    if res.exit_code != 0:
        raise FileError(f"cannot read {path}: {_why(res)}", sandbox_id=sandbox_id, detail={"path": path})
    if res.truncated:
        raise FileTooLarge(f"{path} is larger than {max_bytes} bytes; read it in parts", sandbox_id=sandbox_id)
    return res.stdout


async def list_files(run: RunAs, sandbox_id: str, path: str) -> list[FileEntry]:
    q = shlex.quote(path)
    script = (
        f"cd {q} || exit 2; for f in * .[!.]* ..?*; do "
        '[ -e "$f" ] || [ -L "$f" ] || continue; stat -c "%s|%f|%Y|%n" -- "$f"; done'
    )
    res = await run(["/bin/sh", "-c", script], None, 8 << 20)
    if res.exit_code != 0:
        raise FileError(f"cannot list {path}: {_why(res)}", sandbox_id=sandbox_id)
    entries = []
    base = path.rstrip("/") or "/"
    for line in res.stdout.decode("utf-8", "replace").splitlines():
        parts = line.split("|", 3)
        if len(parts) != 4:
            continue
        size, raw_mode, mtime, name = parts
        mode = int(raw_mode, 16)
        entries.append(FileEntry(
            name=name, path=f"{base}/{name}" if base != "/" else f"/{name}", size=int(size),
            is_dir=(mode & 0o170000) == 0o040000, mode=mode & 0o7777, mtime=float(mtime),
        ))
    return sorted(entries, key=lambda e: e.name)
