#!/usr/bin/env bash
# GPU check under gVisor on a real GPU machine, no Docker: Redis, a scheduler and one
# worker on the `runsc` runtime (runsc driven directly, --nvproxy for GPU sandboxes).
# It creates a GPU sandbox and a CPU-only one and checks, inside gVisor:
#   * `nvidia-smi -L` in the GPU sandbox lists exactly the assigned GPU (by UUID);
#   * a CUDA matrix multiply runs there (PyTorch), timed against the same one run
#     directly on the host in the same run (ratio);
#   * the CPU-only sandbox sees no GPU (no /dev/nvidia*, nvidia-smi finds nothing);
#   * sandbox start with a GPU against start without one.
# Results go to bench/results/gpu_check.txt (GPU_CHECK_OUT=path elsewhere).
#
# Needs root (runsc), the NVIDIA driver, python3 with hotbed's dependencies (PYTHONPATH
# to unpacked wheels will do) and the `gpu` extra (nvidia-ml-py), PyTorch for the CUDA
# part, a redis-server (REDIS_SERVER=/path) and runsc (RUNSC=/path: trixie's static
# binary carries over as one file).
#   RUNSC=/path/runsc REDIS_SERVER=/path/redis-server PYTHON=python3 bench/gpu_check_runsc.sh
# The sandboxes' image: GPU_CHECK_ROOTFS (default /: the host's own tree, which gVisor's
# overlay keeps read-only: the writes stay in the sandbox), so the host's Python,
# PyTorch and nvidia-smi are there; a carried root file system works the same. Sandbox
# user: GPU_CHECK_USER (default 0:0, root inside gVisor, so a Python environment under
# /root is readable); memory per sandbox: GPU_CHECK_MEMORY_MB (default 8192). Every step has a deadline: without a GPU this fails, it never hangs.
# Exit code 0 only if every check passed.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$([ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3)}
PYTHON=$(command -v "$PYTHON")
REDIS_SERVER=${REDIS_SERVER:-$(command -v redis-server || echo "$here/redis-server")}
RUNSC=${RUNSC:-$(command -v runsc || echo "$here/runsc")}
OUT=${GPU_CHECK_OUT:-$here/bench/results/gpu_check.txt}
ROOTFS=${GPU_CHECK_ROOTFS:-/}
export GPU_CHECK_USER=${GPU_CHECK_USER:-0:0}
fail() { echo "gpu_check_runsc: $*" >&2; exit 2; }
[ -x "$REDIS_SERVER" ] || fail "no redis-server (set REDIS_SERVER=/path/to/redis-server)"
[ -x "$RUNSC" ] || fail "no runsc (set RUNSC=/path/to/runsc)"
[ "$(id -u)" = 0 ] || fail "runsc needs root"
"$RUNSC" --version >/dev/null 2>&1 || fail "$RUNSC does not run here"

work=$(mktemp -d -t hotbed-gpu-runsc.XXXXXX)
pids=()
# shellcheck source=bench/gpu_check_common.sh
. "$here/bench/gpu_check_common.sh"
cleanup() {
  local rc=$?
  stop_daemons
  # Whatever a killed worker left: its sandboxes live under this run's own runsc root.
  for id in $("$RUNSC" --root "$work/root" list --quiet 2>/dev/null); do
    "$RUNSC" --root "$work/root" delete --force "$id" >/dev/null 2>&1 || true
  done
  if [ "$rc" != 0 ]; then
    show_logs 25
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT INT TERM

mkdir -p "$work/images/gpucheck"
ln -s "$ROOTFS" "$work/images/gpucheck/rootfs"

export GPU_CHECK_PYTHON="$PYTHON" GPU_CHECK_MEMORY_MB=${GPU_CHECK_MEMORY_MB:-8192}
start_control_plane

gpu_env=(HOTBED_WORKER_ID=gpu-node HOTBED_RUNTIME=runsc HOTBED_RUNSC="$RUNSC"
         HOTBED_RUNSC_DIR="$work/runsc" HOTBED_IMAGE_DIR="$work/images" HOTBED_GPU_DETECT=nvml
         HOTBED_RUNSC_ROOT="$work/root")
if [ -n "${GPU_CHECK_FAKE_GPUS:-}" ]; then
  echo "gpu_check_runsc: FAKE GPUs declared (GPU_CHECK_FAKE_GPUS): the plumbing only, not the hardware"
  gpu_env+=(HOTBED_GPUS="$GPU_CHECK_FAKE_GPUS")
fi
env "${gpu_env[@]}" "$PYTHON" -m workers >"$work/worker.log" 2>&1 &
pids+=($!)

mkdir -p "$(dirname "$OUT")"
timeout 600 "$PYTHON" - <<'PY' 2>&1 | tee "$OUT"
import os, sys, time

import anyio

from hotbed.client import Client
from hotbed.errors import HotbedError
from hotbed.protocol import (CreateSandbox, Exec, ExecSpec, Resources, SandboxCreated,
                             SandboxSpec, Terminate, decode_worker_info)

PY = os.environ["GPU_CHECK_PYTHON"]
USER = os.environ["GPU_CHECK_USER"]
MEMORY_MB = int(os.environ["GPU_CHECK_MEMORY_MB"])
# The figure: one fixed-size matrix multiply, timed after a warm-up, same code both sides.
MATMUL = r'''
import time, torch
n = 8192
print("cuda devices:", torch.cuda.device_count(), torch.cuda.get_device_name(0))
a = torch.randn(n, n, device="cuda"); b = torch.randn(n, n, device="cuda")
for _ in range(3):
    c = a @ b
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(20):
    c = a @ b
torch.cuda.synchronize()
dt = (time.perf_counter() - t0) / 20
print(f"matmul {n}x{n} fp32: {dt*1000:.2f} ms, {2*n**3/dt/1e12:.1f} TFLOP/s, checksum {float(c[0,0]):.3f}")
'''
failures = []
figures = {}


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what, flush=True)
    if not ok:
        failures.append(what)


def show(title, res):
    print(f"{title} (exit {res.exit_code}):")
    for line in (res.stdout + res.stderr).decode(errors="replace").splitlines():
        print("    " + line)


async def host_matmul():
    try:
        with anyio.fail_after(300):
            res = await anyio.run_process([PY, "-c", MATMUL], check=False)
    except (OSError, TimeoutError) as exc:
        return f"host run failed: {exc}"
    return (res.stdout + res.stderr).decode(errors="replace")


def ms(line_text):
    for word in line_text.split("matmul", 1)[-1].split(","):
        if word.strip().endswith(" ms"):
            return float(word.split(":")[-1].strip().split()[0])
    return None


async def main():
    async with Client() as c:
        deadline = time.monotonic() + 60
        while b"gpu-node" not in set(await c.redis.zrange(c.keys.workers, 0, -1)):
            if time.monotonic() > deadline:
                sys.exit("gpu_check_runsc: the worker did not register within 60 s (see worker.log)")
            await anyio.sleep(0.1)
        await anyio.sleep(0.5)
        info = decode_worker_info(await c.redis.get(c.keys.worker_info("gpu-node")))
        gpus = ", ".join(f"#{g.index} {g.model} {g.uuid} {g.memory_mb} MiB" for g in info.gpus) or "none"
        print(f"worker gpu-node: runtime={info.runtime} kind={info.kind} GPUs: {gpus}")
        check(info.runtime == "runsc", "the worker runs the runsc runtime (gVisor, no Docker)")
        if not info.gpus:
            print("gpu_check_runsc: FAILED: no GPU detected (is the NVIDIA driver loaded and nvidia-ml-py installed?)")
            sys.exit(1)

        spec = lambda gpu: SandboxSpec(image="gpucheck", user=USER, env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")},
                                       resources=Resources(cpu=1, memory_mb=MEMORY_MB, gpu=gpu))
        made = []

        async def create(gpu, what):
            t0 = time.perf_counter()
            try:
                got = await c.request(CreateSandbox(spec=spec(gpu)), timeout=120)
            except HotbedError as exc:
                got = exc
            figures["start_" + ("gpu" if gpu else "cpu") + "_s"] = time.perf_counter() - t0
            check(isinstance(got, SandboxCreated), f"{what}: {got}")
            if isinstance(got, SandboxCreated):
                made.append(got)
                return got
            return None

        try:
            cpu = await create(None, "CPU-only sandbox created")
            gpu = await create("any", "GPU sandbox created under runsc --nvproxy")
            if cpu is None or gpu is None:
                return
            print(f"start: CPU-only {figures['start_cpu_s']:.2f} s, with a GPU {figures['start_gpu_s']:.2f} s "
                  f"(ratio {figures['start_gpu_s'] / figures['start_cpu_s']:.2f})")
            check(len(gpu.gpu_uuids) == 1, f"one GPU assigned: {gpu.gpu_uuids}")
            others = [g.uuid for g in info.gpus if g.uuid not in gpu.gpu_uuids]

            async def run(s, shell, timeout=240):
                return await c.worker_request(s.worker_id, Exec(sandbox_id=s.sandbox_id, exec=ExecSpec(
                    shell=shell, timeout=timeout)), timeout=timeout + 30)

            res = await run(gpu, "uname -a; dmesg 2>/dev/null | head -2; ls /dev/nvidia*; nvidia-smi -L")
            show("inside the GPU sandbox: nvidia-smi -L", res)
            out = res.stdout.decode(errors="replace")
            listed = [line for line in out.splitlines() if line.startswith("GPU ")]
            check("gVisor" in out, "the commands ran under gVisor (its dmesg)")
            check(res.exit_code == 0 and len(listed) == 1 and gpu.gpu_uuids[0] in listed[0],
                  "nvidia-smi -L inside lists exactly the assigned GPU")
            check(not any(u in out for u in others), f"none of the host's other {len(others)} GPU(s) is visible")

            res = await run(gpu, f"{PY} -c '{MATMUL}'")
            show("inside the GPU sandbox: CUDA matmul (PyTorch)", res)
            inside = res.stdout.decode(errors="replace")
            check(res.exit_code == 0 and "matmul" in inside, "a CUDA computation ran inside gVisor")
            host = await host_matmul()
            print("on the host, same run: " + " | ".join(host.strip().splitlines()))
            a, b = ms(inside), ms(host)
            if a and b:
                print(f"matmul inside gVisor / on the host: {a:.2f} ms / {b:.2f} ms = {a / b:.2f}")

            res = await run(cpu, "ls /dev/nvidia* 2>&1; nvidia-smi -L 2>&1; "
                                 f"{PY} -c 'import torch; print(\"cuda devices:\", torch.cuda.device_count())' 2>&1")
            show("inside the CPU-only sandbox", res)
            out = res.stdout.decode(errors="replace")
            check(not any(line.startswith("/dev/nvidia") for line in out.splitlines()), "the CPU-only sandbox has no /dev/nvidia*")
            check(not any(line.startswith("GPU ") for line in out.splitlines()), "nvidia-smi in the CPU-only sandbox lists no GPU")
            check("cuda devices: 0" in out or "No module named" in out, "CUDA in the CPU-only sandbox sees no device")
        except HotbedError as exc:
            check(False, f"{type(exc).__name__}: {exc}")
        finally:
            for s in made:
                with anyio.move_on_after(60, shield=True):
                    await c.worker_request(s.worker_id, Terminate(sandbox_id=s.sandbox_id), timeout=30)


anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
print("gpu_check_runsc: " + ("PASSED" if not failures else f"FAILED: {len(failures)} check(s)"))
sys.exit(1 if failures else 0)
PY
