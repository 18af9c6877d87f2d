"""Results files: one run, one file, with where it came from.

Every benchmark builds its whole results document in memory and writes it with
:func:`write`; nothing here reads a results file to add to it. The document's ``run``
block says which run made it: the command line, the ``make`` target (set by the
Makefile's bench targets), the git commit (and whether the tree had local changes), the
machine, the software versions, the container runtime's probed version, and the start
and end times. ``digest`` is the SHA-256 of the rest of the document: a file edited or
merged by hand no longer matches it, and :func:`load` (``--report``, ``python -m bench
verify``) refuses it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"

# The Makefile's bench targets set this to their own name.
MAKE_TARGET_ENV = "BENCH_MAKE_TARGET"

PACKAGES = ("redis", "hiredis", "anyio", "uvloop", "msgspec", "aiodocker", "orjson")


class NotOneRun(ValueError):
    """A results file without an intact ``run`` block and digest."""


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _run(argv: list[str], timeout: float = 10) -> str | None:
    """stdout of a short probe command, or None if it is missing or fails."""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def git_state() -> dict[str, Any]:
    commit = _run(["git", "rev-parse", "HEAD"])
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {"commit": commit, "dirty": bool(status) if status is not None else None,
            "branch": _run(["git", "rev-parse", "--abbrev-ref", "HEAD"])}


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    os_name = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    return {
        "cpus": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem_gib, 1),
        "os": os_name, "kernel": platform.release(),
        "python": sys.version.split()[0], "host": socket.gethostname(),
    }


def software() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def container_runtime(oci_runtime: str = "runsc") -> dict[str, Any]:
    """The Docker engine's version and what ``oci_runtime`` is there, probed: the
    runtime's binary (hotbed's runsc wrapper or runsc itself), its arguments and the
    first line of its ``--version``. Fields are None where there is no Docker."""
    out: dict[str, Any] = {"name": oci_runtime, "docker_server": None, "path": None,
                           "args": None, "version": None}
    if shutil.which("docker") is None:
        return out
    out["docker_server"] = _run(["docker", "version", "--format", "{{.Server.Version}}"])
    raw = _run(["docker", "info", "--format", "{{json .Runtimes}}"])
    try:
        spec = json.loads(raw)[oci_runtime] if raw else {}
    except (ValueError, KeyError, TypeError):
        spec = {}
    path = spec.get("path")
    out["path"], out["args"] = path, spec.get("runtimeArgs", [])
    if path:
        version = _run([path, "--version"])
        out["version"] = version.splitlines()[0] if version else None
    return out


def new_run(benchmark: str, argv: list[str]) -> dict[str, Any]:
    """The ``run`` block of a results document, at the start of the run."""
    return {
        "id": uuid.uuid4().hex,
        "benchmark": benchmark,
        "argv": list(argv),
        "command": shlex.join(["python", "-m", "bench", benchmark, *argv]),
        "make_target": os.environ.get(MAKE_TARGET_ENV),
        "git": git_state(),
        "machine": machine(),
        "software": software(),
        "started": utc_now(),
        "finished": None,
    }


def _digest(doc: dict[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != "digest"}
    # NaN (an empty summary) has no JSON form of its own; json writes it as NaN.
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write(path: Path | str, doc: dict[str, Any], *, finished: bool = True) -> Path:
    """Write ``doc`` (which has a ``run`` block from :func:`new_run`) as the whole file,
    replacing whatever was there, with its digest. ``finished=False`` for a partial
    write during a run (scale saves after every phase)."""
    if "run" not in doc or "id" not in doc["run"]:
        raise NotOneRun("a results document needs the run block of bench.common.results.new_run")
    doc["run"]["finished"] = utc_now() if finished else None
    doc["digest"] = _digest(doc)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out)
    return out


def load(path: Path | str) -> dict[str, Any]:
    """A results file written by one run, its digest checked; :class:`NotOneRun` otherwise."""
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or "run" not in doc or "digest" not in doc:
        raise NotOneRun(f"{path}: no run block or digest: written by hand, merged, or by a bench "
                        "from before results recorded their run")
    if doc["digest"] != _digest(doc):
        raise NotOneRun(f"{path}: digest does not match: edited or merged after the run wrote it")
    return doc


def describe(doc: dict[str, Any]) -> str:
    """One line naming the run a results document came from."""
    run = doc["run"]
    git = run.get("git") or {}
    commit = (git.get("commit") or "?")[:10] + ("+local changes" if git.get("dirty") else "")
    m = run.get("machine") or {}
    target = f"make {run['make_target']}" if run.get("make_target") else run.get("command", "?")
    return (f"{target}; commit {commit}; {run.get('started')} → {run.get('finished') or 'cut short'}; "
            f"{m.get('cpus')} vCPU {m.get('cpu_model')}, {m.get('memory_gib')} GiB, {m.get('os')}")
