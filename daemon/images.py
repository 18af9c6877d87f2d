"""Building sandbox images without a registry.

``hotbed/base``: Debian bookworm (minbase) with bash, python3, git and coreutils, made
by mmdebstrap from the host's own Debian mirror, streamed as a tarball into
``docker import``. ``hotbed/busybox``: busybox-static and a passwd file, a few hundred
KiB, for fast tests. Both carry a non-root ``user`` (1000:1000) with a home directory.

The mirror is the one the host's apt already uses, named explicitly so that other
suites in the host's sources (trixie, pinned for runsc) never leak into the image.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import anyio

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
