"""Building sandbox images: the stock ones without a registry, and any Dockerfile.

``hotbed/base``: Debian bookworm (minbase) with bash, python3, git and coreutils, made
by mmdebstrap from the host's own Debian mirror, streamed as a tarball into
``docker import``. ``hotbed/busybox``: busybox-static and a passwd file, a few hundred
KiB, for fast tests. Both carry a non-root ``user`` (1000:1000) with a home directory.

The mirror is the one the host's apt already uses, named explicitly so that other
suites in the host's sources (trixie, pinned for runsc) never leak into the image.

:func:`build_dockerfile` builds a Dockerfile through the Engine API (``POST /build``,
the classic builder), passing each line of the engine's output on as it streams in;
the context directory is sent as a gzipped tar, ``.dockerignore`` honoured.
"""

from __future__ import annotations

import fnmatch
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import aiodocker
import anyio
from aiodocker.exceptions import DockerError

from hotbed.errors import HotbedError

BASE_IMAGE = "hotbed/base"
BUSYBOX_IMAGE = "hotbed/busybox"
BASE_PACKAGES = ["bash", "python3", "git", "coreutils", "procps", "ca-certificates", "util-linux"]
PASSWD = "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n"
GROUP = "root:x:0:\nuser:x:1000:\n"

Progress = Callable[[str], None]


class ImageBuildError(HotbedError):
    code = "ImageBuildError"


def _noop(_: str) -> None:
    pass


def debian_mirror() -> str:
    """The URI of the host's own (non-security) Debian source."""
    for path in ("/etc/apt/sources.list.d/debian.sources",):
        p = Path(path)
        if p.exists():
            for line in p.read_text().splitlines():
                if line.startswith("URIs:") and "security" not in line:
                    return line.split()[1]
    p = Path("/etc/apt/sources.list")
    if p.exists():
        for line in p.read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[0] == "deb" and "security" not in parts[1]:
                return parts[1]
    return "http://deb.debian.org/debian"


async def image_exists(image: str) -> bool:
    res = await anyio.run_process(["docker", "image", "inspect", image], check=False)
    return res.returncode == 0


def busybox_rootfs_tar() -> bytes:
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        raise ImageBuildError("busybox not found: apt-get install busybox-static")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    buf = io.BytesIO()
    now = int(time.time())
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add_dir(name: str, mode: int = 0o755, uid: int = 0) -> None:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime, ti.uid, ti.gid = tarfile.DIRTYPE, mode, now, uid, uid
            tar.addfile(ti)

        def add_file(name: str, data: bytes, mode: int = 0o644) -> None:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), mode, now
            tar.addfile(ti, io.BytesIO(data))

        for d in ("bin", "etc", "root", "dev", "proc", "sys", "usr", "usr/bin"):
            add_dir(d)
        add_dir("tmp", 0o1777)
        add_dir("home")
        add_dir("home/user", 0o755, uid=1000)
        with open(busybox, "rb") as f:
            add_file("bin/busybox", f.read(), 0o755)
        for applet in applets:
            if applet == "busybox":
                continue
            ti = tarfile.TarInfo(f"bin/{applet}")
            ti.type, ti.linkname, ti.mtime = tarfile.SYMTYPE, "busybox", now
            tar.addfile(ti)
        add_file("etc/passwd", PASSWD.encode())
        add_file("etc/group", GROUP.encode())
    return buf.getvalue()


async def _docker_import(tar_source: bytes | None, image: str, changes: list[str], stdin: int | None = None) -> None:
    cmd = ["docker", "import"]
    for c in changes:
        cmd += ["-c", c]
    cmd += ["-", image]
    res = await anyio.run_process(cmd, input=tar_source, check=False)
    if res.returncode != 0:
        raise ImageBuildError(f"docker import failed: {res.stderr.decode().strip()}")


COMMON_CHANGES = [
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV HOME=/home/user",
    "WORKDIR /home/user",
]


async def build_busybox(image: str = BUSYBOX_IMAGE, *, progress: Progress = _noop) -> None:
    progress(f"building {image} from busybox-static")
    tar = await anyio.to_thread.run_sync(busybox_rootfs_tar)
    await _docker_import(tar, image, [*COMMON_CHANGES, 'CMD ["/bin/sh"]'])
    progress(f"built {image} ({len(tar) >> 10} KiB)")


async def build_base(
    image: str = BASE_IMAGE,
    *,
    suite: str = "bookworm",
    packages: list[str] | None = None,
    progress: Progress = _noop,
) -> None:
    """mmdebstrap | docker import, with mmdebstrap's progress lines passed on."""
    if shutil.which("mmdebstrap") is None:
        raise ImageBuildError("mmdebstrap not found: run scripts/host-setup.sh")
    pkgs = packages or BASE_PACKAGES
    mirror = debian_mirror()
    hook = (
        'chroot "$1" sh -c "groupadd -g 1000 user && useradd -m -u 1000 -g 1000 -s /bin/bash user"'
    )
    cmd = [
        "mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar",
        f"--include={','.join(pkgs)}", "--aptopt=Acquire::Languages none",
        "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        f"--customize-hook={hook}",
        suite, "-", f"deb {mirror} {suite} main",
    ]
    progress(f"mmdebstrap {suite} from {mirror}: {' '.join(pkgs)}")
    started = time.monotonic()
    importer = await anyio.open_process(
        ["docker", "import", *sum((["-c", c] for c in [*COMMON_CHANGES, "USER 1000:1000", 'CMD ["/bin/bash"]']), []), "-", image],
        stdin=subprocess.PIPE,
    )
    builder = await anyio.open_process(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert builder.stdout and builder.stderr and importer.stdin
    tail: list[str] = []

    async def pump() -> None:
        assert builder.stdout and importer.stdin
        async for chunk in builder.stdout:
            await importer.stdin.send(chunk)
        await importer.stdin.aclose()

    async def report() -> None:
        assert builder.stderr
        buf = b""
        async for chunk in builder.stderr:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").strip()
                if line:
                    tail.append(line)
                    del tail[:-20]
                    if line.startswith("I: "):
                        progress(f"[{time.monotonic() - started:5.1f}s] {line[3:]}")

    async with anyio.create_task_group() as tg:
        tg.start_soon(pump)
        tg.start_soon(report)
    rc_build = await builder.wait()
    rc_import = await importer.wait()
    if rc_build != 0:
        raise ImageBuildError("mmdebstrap failed:\n" + "\n".join(tail))
    if rc_import != 0:
        raise ImageBuildError("docker import failed")
    progress(f"built {image} in {time.monotonic() - started:.0f}s")


# A Dockerfile build gives up after this long (aiodocker has no deadline of its own).
BUILD_TIMEOUT_S = 3600.0
# Where a Dockerfile from outside the context goes inside the context's tar.
OUTSIDE_DOCKERFILE = ".hotbed.Dockerfile"


def _ignored(patterns: list[str], rel: str) -> bool:
    """``.dockerignore`` matching: the last pattern that matches wins, ``!`` re-includes."""
    out = False
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        if fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel, p.rstrip("/") + "/*"):
            out = not neg
    return out


def context_tar(context: Path, dockerfile: Path) -> tuple[IO[bytes], str]:
    """The build context as a gzipped tar in a temporary file, and the Dockerfile's
    path inside it. Blocking: run it in a thread."""
    if not context.is_dir():
        raise ImageBuildError(f"build context {context} is not a directory")
    if not dockerfile.is_file():
        raise ImageBuildError(f"no Dockerfile at {dockerfile}")
    ignore = context / ".dockerignore"
    patterns = []
    if ignore.is_file():
        for line in ignore.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                patterns.append(os.path.normpath(line.lstrip("/")))
    try:
        inner = dockerfile.resolve().relative_to(context.resolve()).as_posix()
    except ValueError:
        inner = OUTSIDE_DOCKERFILE
    out = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the caller, who closes it
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for root, dirs, files in os.walk(context):
            rel_root = os.path.relpath(root, context)
            for name in sorted(dirs + files):
                rel = os.path.normpath(os.path.join(rel_root, name))
                if _ignored(patterns, rel) and rel != inner:
                    if name in dirs:
                        dirs.remove(name)
                    continue
                tar.add(os.path.join(root, name), arcname=rel, recursive=False)
        if inner == OUTSIDE_DOCKERFILE:
            tar.add(str(dockerfile), arcname=OUTSIDE_DOCKERFILE)
    out.seek(0)
    return out, inner


async def build_dockerfile(
    context: str | os.PathLike[str],
    *,
    tag: str | None = None,
    dockerfile: str | os.PathLike[str] | None = None,
    progress: Progress = _noop,
    docker_url: str | None = None,
    timeout: float = BUILD_TIMEOUT_S,
) -> str:
    """Build ``dockerfile`` (default ``CONTEXT/Dockerfile``) with ``context`` through
    dockerd's build API, calling ``progress`` with each line of its output as it comes;
    returns the image id. ImageBuildError carries the engine's message."""
    ctx = Path(context)
    df = Path(dockerfile) if dockerfile is not None else ctx / "Dockerfile"
    fileobj, inner = await anyio.to_thread.run_sync(context_tar, ctx, df)
    image_id = ""
    try:
        docker = aiodocker.Docker(url=docker_url)
        try:
            with anyio.fail_after(timeout):
                async for event in docker.images.build(
                    fileobj=fileobj, encoding="gzip", path_dockerfile=inner, tag=tag,
                    rm=True, forcerm=True, stream=True,
                ):
                    image_id = _report(event, progress) or image_id
        finally:
            with anyio.CancelScope(shield=True):
                await docker.close()
    except DockerError as exc:
        raise ImageBuildError(f"build failed: {exc.message}") from None
    except TimeoutError:
        raise ImageBuildError(f"build did not finish within {timeout:.0f}s") from None
    finally:
        fileobj.close()
    if not image_id:
        raise ImageBuildError("build finished without an image id")
    return image_id


def _report(event: Any, progress: Progress) -> str:
    """Pass one build event on; the image id if it names one."""
    if not isinstance(event, dict):
        return ""
    if event.get("error"):
        # aiodocker before 0.27 passes error events through instead of raising.
        raise ImageBuildError(f"build failed: {str(event['error']).strip()}")
    for line in str(event.get("stream") or "").splitlines():
        if line.strip():
            progress(line.rstrip())
    if event.get("status"):
        progress(" ".join(str(event[k]) for k in ("id", "status", "progress") if event.get(k)))
    aux = event.get("aux")
    if isinstance(aux, dict) and aux.get("ID"):
        return str(aux["ID"])
    return ""
