"""Files, through ``docker exec`` too (``cat`` in, ``cat`` out, ``stat`` for listings):
with gVisor's overlay the container's writes never reach the host's layer, so Docker's
archive API would not see them. The images need ``/bin/sh``, ``cat`` and ``stat``
(busybox or coreutils). Sandboxes with the guest agent take its file verbs instead
(:mod:`workers.execution`).
"""

from __future__ import annotations

import shlex

from hotbed.errors import FileError, FileTooLarge
from hotbed.protocol import FileEntry
from workers.runtimes.docker import commands
from workers.runtimes.docker.engine import Engine


async def write_file(
    engine: Engine, sandbox_id: str, path: str, data: bytes, *, mode: int, make_dirs: bool, user: str
) -> int:
    q = shlex.quote(path)
    mk = f'mkdir -p "$(dirname {q})" && ' if make_dirs else ""
    script = f"{mk}cat > {q} && chmod {mode:o} {q}"
    res = await commands.run(
        engine, sandbox_id, ["/bin/sh", "-c", script], user=user, stdin=data, timeout=60.0,
        max_output=4096,
    )
    if res.exit_code != 0:
        raise FileError(
            f"cannot write {path}: {res.stderr.decode('utf-8', 'replace').strip()}",
            sandbox_id=sandbox_id,
        )
    return len(data)


async def read_file(engine: Engine, sandbox_id: str, path: str, *, max_bytes: int, user: str) -> bytes:
    q = shlex.quote(path)
    script = (
        f"if [ -d {q} ]; then echo 'is a directory' >&2; exit 3; fi; "
        f"if [ ! -e {q} ]; then echo 'no such file' >&2; exit 2; fi; cat {q}"
    )
    res = await commands.run(
        engine, sandbox_id, ["/bin/sh", "-c", script], user=user, timeout=60.0, max_output=max_bytes
    )
    if res.exit_code != 0:
        raise FileError(
            f"cannot read {path}: {res.stderr.decode('utf-8', 'replace').strip()}",
            sandbox_id=sandbox_id,
            detail={"path": path},
        )
    if res.truncated:
        raise FileTooLarge(
            f"{path} is larger than {max_bytes} bytes; read it in parts",
            sandbox_id=sandbox_id,
        )
    return res.stdout


async def list_files(engine: Engine, sandbox_id: str, path: str, *, user: str) -> list[FileEntry]:
    q = shlex.quote(path)
    script = (
        f"cd {q} || exit 2; for f in * .[!.]* ..?*; do "
        '[ -e "$f" ] || [ -L "$f" ] || continue; stat -c "%s|%f|%Y|%n" -- "$f"; done'
    )
    res = await commands.run(
        engine, sandbox_id, ["/bin/sh", "-c", script], user=user, timeout=60.0, max_output=8 << 20
    )
    if res.exit_code != 0:
        raise FileError(
            f"cannot list {path}: {res.stderr.decode('utf-8', 'replace').strip()}",
            sandbox_id=sandbox_id,
        )
    entries = []
    base = path.rstrip("/") or "/"
    for line in res.stdout.decode("utf-8", "replace").splitlines():
        parts = line.split("|", 3)
        if len(parts) != 4:
            continue
        size, raw_mode, mtime, name = parts
        mode = int(raw_mode, 16)
        entries.append(
            FileEntry(
                name=name,
                path=f"{base}/{name}" if base != "/" else f"/{name}",
                size=int(size),
                is_dir=(mode & 0o170000) == 0o040000,
                mode=mode & 0o7777,
                mtime=float(mtime),
            )
        )
    return sorted(entries, key=lambda e: e.name)
