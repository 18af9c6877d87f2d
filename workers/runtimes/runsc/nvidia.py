"""What a GPU sandbox under ``runsc --nvproxy`` needs from the host, found on the host.

Without Docker there is no nvidia-container-runtime hook, so the bundle says it all
(gVisor's nvproxy, non-Docker mode): the sandbox gets ``/dev/nvidiactl``,
``/dev/nvidia-uvm`` and one ``/dev/nvidiaN`` per assigned GPU as device nodes in the
spec, which runsc creates inside the sandbox and nvproxy serves; no other GPU has a
node there. ``NVIDIA_VISIBLE_DEVICES`` and ``CUDA_VISIBLE_DEVICES`` name the same
UUIDs. The driver's user-space files (``libcuda``, ``libnvidia-ml``, ``nvidia-smi``,
...) are bind-mounted read-only at their host paths, as nvidia-container-cli would.

The host is read through paths given as arguments, so tests run against a fake
``/proc`` and library tree.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any

from workers.runtimes.runsc.oci import GpuSetup

NV_MAJOR = 195
NV_CTL_MINOR = 255
# The driver's user-space parts a CUDA program or nvidia-smi opens (nvidia-container-cli's
# "utility" and "compute" capabilities).
DRIVER_LIBS = (
    "libcuda.so", "libcudadebugger.so", "libnvidia-ml.so", "libnvidia-ptxjitcompiler.so",
    "libnvidia-nvvm.so", "libnvidia-gpucomp.so", "libnvidia-allocator.so", "libnvidia-cfg.so",
    "libnvidia-opencl.so", "libnvidia-pkcs11.so",
)
DRIVER_BINS = ("nvidia-smi", "nvidia-debugdump", "nvidia-cuda-mps-control", "nvidia-cuda-mps-server")
LIB_DIRS = (
    "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
    "/usr/local/nvidia/lib64", "/usr/lib/x86_64-linux-gnu/nvidia/current",
)
BIN_DIRS = ("/usr/bin", "/usr/local/bin", "/usr/local/nvidia/bin")


class GpuHostError(Exception):
    """The host cannot give a sandbox the GPUs asked for (no driver, unknown UUID)."""


def gpu_minors(proc: Path = Path("/proc")) -> dict[str, int]:
    """GPU UUID -> device minor (``/dev/nvidia<minor>``), from the driver's ``/proc``."""
    out: dict[str, int] = {}
    for info in sorted((proc / "driver" / "nvidia" / "gpus").glob("*/information")):
        fields: dict[str, str] = {}
        for line in info.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        uuid, minor = fields.get("GPU UUID"), fields.get("Device Minor")
        if uuid and minor and minor.isdigit():
            out[uuid] = int(minor)
    return out


def uvm_major(proc: Path = Path("/proc")) -> int | None:
    """The ``nvidia-uvm`` character device's major number (dynamic), from /proc/devices."""
    try:
        text = (proc / "devices").read_text()
    except OSError:
        return None
    m = re.search(r"^\s*(\d+)\s+nvidia-uvm$", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def driver_files(
    lib_dirs: tuple[str, ...] = LIB_DIRS, bin_dirs: tuple[str, ...] = BIN_DIRS
) -> list[tuple[str, str]]:
    """(host file, path in the sandbox) of each driver library and tool: every name a
    program may open (``libcuda.so.1`` and ``libcuda.so.550.54``) at its host path,
    backed by the file it resolves to."""
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for d in lib_dirs:
        for lib in DRIVER_LIBS:
            for path in sorted(glob.glob(os.path.join(d, lib + "*"))):
                real = os.path.realpath(path)
                if path not in seen and os.path.isfile(real):
                    seen.add(path)
                    out.append((real, path))
    for d in bin_dirs:
        for name in DRIVER_BINS:
            path = os.path.join(d, name)
            real = os.path.realpath(path)
            if path not in seen and os.path.isfile(real):
                seen.add(path)
                out.append((real, path))
    return out


def _char(path: str, major: int, minor: int) -> dict[str, Any]:
    return {"path": path, "type": "c", "major": major, "minor": minor, "fileMode": 0o666, "uid": 0, "gid": 0}


def gpu_setup(
    uuids: list[str],
    *,
    proc: Path = Path("/proc"),
    files: list[tuple[str, str]] | None = None,
) -> GpuSetup:
    """Devices, read-only mounts and env giving a sandbox exactly ``uuids``.
    Blocking (reads /proc and globs library directories): run it in a thread."""
    minors = gpu_minors(proc)
    if not minors:
        raise GpuHostError("no NVIDIA GPU in /proc/driver/nvidia/gpus (is the driver loaded?)")
    missing = [u for u in uuids if u not in minors]
    if missing:
        raise GpuHostError(f"GPU {', '.join(missing)} not on this host (it has {', '.join(sorted(minors))})")
    uvm = uvm_major(proc)
    if uvm is None:
        raise GpuHostError("the nvidia-uvm module is not loaded (no nvidia-uvm in /proc/devices)")
    devices = [_char("/dev/nvidiactl", NV_MAJOR, NV_CTL_MINOR), _char("/dev/nvidia-uvm", uvm, 0),
               _char("/dev/nvidia-uvm-tools", uvm, 1)]
    devices += [_char(f"/dev/nvidia{minors[u]}", NV_MAJOR, minors[u]) for u in uuids]
    mounts = [
        {"destination": dest, "type": "bind", "source": src, "options": ["bind", "ro", "nosuid", "nodev"]}
        for src, dest in (driver_files() if files is None else files)
    ]
    visible = ",".join(uuids)
    env = {
        "NVIDIA_VISIBLE_DEVICES": visible,
        "CUDA_VISIBLE_DEVICES": visible,
        "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
    }
    return GpuSetup(devices=devices, mounts=mounts, env=env)
