"""What a request may ask for: upper bounds, finite numbers, and the shape of ids and names.

Checked where a request is first handled (the scheduler, for a create) and again by the
worker before it acts, because anything that can write to a worker's command stream
skips the scheduler. Every check raises :class:`~hotbed.errors.InvalidRequest`.

Ids and names end up in Redis key names (inside ``{...}`` hash tags), Docker API paths
and file paths, so they are limited to letters, digits, ``.``, ``_`` and ``-`` (pool
names also ``:``), and never start with a ``.``: no ``/``, no ``..``, no braces.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec

from hotbed import network
from hotbed.errors import InvalidRequest
from hotbed.protocol import MAX_FILE_BYTES, MAX_TIMEOUT_S, ExecSpec, Resources, SandboxSpec

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,191}")
POOL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,255}")
SNAPSHOT_RE = re.compile(r"snap-[A-Za-z0-9_-]{1,64}")

# Per-sandbox resource bounds a worker accepts (besides its own capacity).
MAX_CPU = 1024.0
MAX_MEMORY_MB = 4 << 20
MIN_MEMORY_MB = 16
MIN_PIDS = 8
MAX_PIDS = 1 << 16
# Ulimits of every process in a sandbox. gVisor enforces RLIMIT_NPROC itself, per user,
# so a fork bomb meets EAGAIN inside the sandbox (which keeps running) long before the
# host's pids cgroup is reached: that one counts the sandbox kernel's own host threads
# too, and reaching it ends the whole sandbox. Hence the host limit sits above the
# sandbox's ``pids`` (:func:`host_pids_limit`).
SANDBOX_NOFILE = 65536
# No core files: a crashing process must not write its memory to the sandbox's disk.
SANDBOX_CORE = 0


def host_pids_limit(pids: int, *, ptrace: bool = False) -> int:
    """The host pids cgroup limit of a sandbox whose processes are limited to ``pids``:
    a backstop for the host, above what gVisor itself uses for that many processes.
    Reaching it kills the whole sandbox, so the guest's own nproc limit must be what
    stops a fork bomb. Under systrap 64 guest processes take 163 host pids and a bomb
    churning inside them ~170. Under ptrace every guest task is a host thread and gVisor
    keeps the stubs of ended processes: 64 live guest processes take ~740 host pids and
    a bomb's churn inside its 64 reaches ~3,100 (measured twice: 3,095 and 2,977), so
    ptrace sandboxes get a backstop above that. scripts/host-setup.sh raises the host's
    pid_max so that a few such bombs cannot use up the host's pids."""
    return 64 * pids + 256 if ptrace else 10 * pids + 128


def sandbox_rlimits(pids: int) -> dict[str, int]:
    """``{name: limit}`` (soft = hard) of every sandbox process, names as in ulimit(1)
    (``nproc``, ``nofile``, ``core``); runtimes map them to their own form."""
    return {"nproc": pids, "nofile": SANDBOX_NOFILE, "core": SANDBOX_CORE}


# Output a worker collects into one reply (a non-streaming exec, a process read): it
# is held in the worker's memory and then in one Redis value.
MAX_COLLECTED_OUTPUT = MAX_FILE_BYTES
# A ProcessRead returns up to this much of stdout and as much of stderr.
MAX_READ_BYTES = MAX_FILE_BYTES // 2


def check_id(value: str, what: str = "id") -> str:
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise InvalidRequest(
            f"bad {what} {value!r}: letters, digits, '.', '_', '-', at most 192, not starting with '.'"
        )
    return value


def check_pool(value: str) -> str:
    if not POOL_RE.fullmatch(value):
        raise InvalidRequest(f"bad pool name {value!r}")
    return value


def check_snapshot(value: str) -> str:
    """A snapshot id as :func:`workers.snapshots.new_snapshot_id` makes them; it becomes a
    directory name, so nothing else (``../``) is accepted."""
    if not SNAPSHOT_RE.fullmatch(value):
        raise InvalidRequest(f"bad snapshot id {value!r}")
    return value


def non_finite(obj: Any) -> str | None:
    """The path of the first NaN or infinite float in a message, or None."""
    found = _non_finite(obj)
    if found is None:
        return None
    path = ""
    for part in reversed(found):
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path or "value"


# Types that hold no float: most of a message's fields, skipped at once. The walk runs
# on every command a worker takes, so paths are built only for the one found.
_NO_FLOAT = (str, bytes, int, type(None), dict)


def _non_finite(obj: Any) -> list[str | int] | None:
    """The innermost-first path of the first non-finite float in ``obj``, or None."""
    if isinstance(obj, _NO_FLOAT):
        return None
    if isinstance(obj, float):
        return None if math.isfinite(obj) else []
    if isinstance(obj, msgspec.Struct):
        for name in obj.__struct_fields__:
            bad = _non_finite(getattr(obj, name))
            if bad is not None:
                bad.append(name)
                return bad
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad = _non_finite(v)
            if bad is not None:
                bad.append(i)
                return bad
    return None


def check_finite(obj: Any) -> None:
    bad = non_finite(obj)
    if bad:
        raise InvalidRequest(f"{bad} must be a finite number")


def resource_problems(r: Resources) -> list[str]:
    problems = []
    if not 0 < r.cpu <= MAX_CPU:
        problems.append(f"cpu must be in (0, {MAX_CPU:g}], got {r.cpu:g}")
    if not MIN_MEMORY_MB <= r.memory_mb <= MAX_MEMORY_MB:
        problems.append(f"memory_mb must be in [{MIN_MEMORY_MB}, {MAX_MEMORY_MB}], got {r.memory_mb}")
    if not MIN_PIDS <= r.pids <= MAX_PIDS:
        problems.append(f"pids must be in [{MIN_PIDS}, {MAX_PIDS}], got {r.pids}")
    if r.disk_mb is not None:
        # Refused, not ignored: no runtime here can hold a sandbox to it (overlay2 on
        # ext4 has no project quota for docker's size option, and runsc's root overlay
        # is backed by a host file of no fixed size).
        problems.append(
            f"disk_mb={r.disk_mb} cannot be enforced by this deployment's runtimes; "
            "leave it unset"
        )
    return problems


def spec_problems(spec: SandboxSpec) -> list[str]:
    """Everything wrong with a sandbox spec (NaN and infinity fail every range test)."""
    problems = []
    if not spec.image:
        problems.append("image is empty")
    if not 0 < spec.timeout <= MAX_TIMEOUT_S:
        problems.append(f"timeout must be in (0, {MAX_TIMEOUT_S:g}] seconds, got {spec.timeout:g}")
    if spec.idle_timeout is not None and not 0 < spec.idle_timeout <= MAX_TIMEOUT_S:
        problems.append(
            f"idle_timeout must be in (0, {MAX_TIMEOUT_S:g}] seconds, got {spec.idle_timeout:g}"
        )
    if spec.auto_pause_after is not None and not 0 <= spec.auto_pause_after <= MAX_TIMEOUT_S:
        problems.append(
            f"auto_pause_after must be in [0, {MAX_TIMEOUT_S:g}] seconds, got {spec.auto_pause_after:g}"
        )
    return problems + resource_problems(spec.resources) + network.problems(spec.network)


def check_exec(spec: ExecSpec, *, background: bool = False) -> None:
    """``background``: a background process, where timeout 0 means none."""
    problems = []
    if not (0 <= spec.timeout if background else 0 < spec.timeout) or spec.timeout > MAX_TIMEOUT_S:
        problems.append(f"timeout must be in (0, {MAX_TIMEOUT_S:g}] seconds, got {spec.timeout:g}")
    # 0 is "no idle timeout".
    if spec.idle_timeout is not None and not 0 <= spec.idle_timeout <= MAX_TIMEOUT_S:
        problems.append(f"idle_timeout must be in [0, {MAX_TIMEOUT_S:g}] seconds, got {spec.idle_timeout:g}")
    if spec.max_output < 0:
        problems.append(f"max_output must not be negative, got {spec.max_output}")
    if problems:
        raise InvalidRequest("; ".join(problems))


def check_timeout(value: float, what: str = "timeout") -> float:
    if not 0 <= value <= MAX_TIMEOUT_S:
        raise InvalidRequest(f"{what} must be in [0, {MAX_TIMEOUT_S:g}] seconds, got {value:g}")
    return value


def clamp(value: int, upper: int) -> int:
    return max(0, min(value, upper))
