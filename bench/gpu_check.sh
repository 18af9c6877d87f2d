#!/usr/bin/env bash
# GPU check on a real GPU machine (GPU-tagged placement): Redis, a scheduler, a worker that detects
# the real GPUs through NVML and a simulated CPU-only worker; one GPU and one CPU
# sandbox request; prints where each was placed, the GPU model and UUID the worker
# reported, and what `nvidia-smi -L` shows inside the GPU sandbox.
#
# The GPU machine has no Docker, so the GPU sandbox runs on the explicitly UNISOLATED
# `process` runtime (development machines only): its commands are host processes
# that get NVIDIA_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES set to the assigned UUID.
#
# Needs: python3 with hotbed installed (and the `gpu` extra: nvidia-ml-py), a
# redis-server binary (on PATH, or REDIS_SERVER=/path), the NVIDIA driver.
#   PYTHON=.venv/bin/python bench/gpu_check.sh
# hotbed need not be installed: the script puts the repo root on PYTHONPATH, so wheels of
# its dependencies unpacked elsewhere (pip install --target DIR; PYTHONPATH=DIR) suffice.
# A copied redis-server that needs its own shared libraries: point REDIS_SERVER at a
# wrapper that sets LD_LIBRARY_PATH and execs it (LD_LIBRARY_PATH for Redis alone).
# Result on an H200: bench/results/gpu_check.txt.
# Without a GPU (to test this script): GPU_CHECK_FAKE_GPUS='[{"uuid":"GPU-x","model":"NVIDIA H100"}]'
# declares GPUs instead of detecting them, and a fake nvidia-smi may sit on PATH.
# Exit code 0 only if every check passed.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$([ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3)}
REDIS_SERVER=${REDIS_SERVER:-$(command -v redis-server || echo "$here/redis-server")}
[ -x "$REDIS_SERVER" ] || { echo "gpu_check: no redis-server (set REDIS_SERVER=/path/to/redis-server)" >&2; exit 2; }

work=$(mktemp -d -t hotbed-gpu-check.XXXXXX)
pids=()
# shellcheck source=bench/gpu_check_common.sh
. "$here/bench/gpu_check_common.sh"
cleanup() {
  local rc=$?
  stop_daemons
  if [ "$rc" != 0 ]; then
    show_logs 20
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT INT TERM

start_control_plane

gpu_env=(HOTBED_WORKER_ID=gpu-node HOTBED_RUNTIME=process HOTBED_PROCESS_ROOT="$work/sandboxes"
         HOTBED_GPU_DETECT=nvml HOTBED_TAGS='{"role":"gpu"}')
if [ -n "${GPU_CHECK_FAKE_GPUS:-}" ]; then
  echo "gpu_check: FAKE GPUs declared (GPU_CHECK_FAKE_GPUS); this run proves the plumbing, not the hardware"
  gpu_env+=(HOTBED_GPUS="$GPU_CHECK_FAKE_GPUS")
fi
env "${gpu_env[@]}" "$PYTHON" -m workers >"$work/gpu-worker.log" 2>&1 &
pids+=($!)

cpu_runtime=sim
[ -f "$here/workers/runtimes/sim.py" ] || cpu_runtime=process
env HOTBED_WORKER_ID=cpu-node HOTBED_RUNTIME=$cpu_runtime HOTBED_PROCESS_ROOT="$work/sandboxes" \
  HOTBED_GPU_DETECT=none HOTBED_CPU=8 HOTBED_MEMORY_MB=16384 \
  "$PYTHON" -m workers >"$work/cpu-worker.log" 2>&1 &
pids+=($!)

"$PYTHON" - <<'PY'
import sys, time

import anyio

from hotbed.client import Client
from hotbed.protocol import (CreateSandbox, Exec, ExecSpec, Resources, SandboxCreated,
                             SandboxSpec, Terminate, decode_worker_info)

failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        failures.append(what)


async def main():
    async with Client() as c:
        deadline = time.monotonic() + 30
        while {b"gpu-node", b"cpu-node"} - set(await c.redis.zrange(c.keys.workers, 0, -1)):
            if time.monotonic() > deadline:
                sys.exit("gpu_check: workers did not register within 30 s")
            await anyio.sleep(0.1)
        await anyio.sleep(0.5)  # the scheduler's registry refresh
        infos = {w: decode_worker_info(await c.redis.get(c.keys.worker_info(w)))
                 for w in ("gpu-node", "cpu-node")}
        for w, info in infos.items():
            gpus = ", ".join(f"#{g.index} {g.model} {g.uuid} {g.memory_mb} MiB" for g in info.gpus) or "none"
            print(f"worker {w}: runtime={info.runtime} kind={info.kind} cpu={info.cpu_millis/1000:g} GPUs: {gpus}")
        check(bool(infos["gpu-node"].gpus), "the GPU worker reported at least one GPU")
        check(not infos["cpu-node"].gpus, "the CPU worker reported no GPU")
        if not infos["gpu-node"].gpus:
            print("gpu_check: FAILED: no GPU detected (is the NVIDIA driver loaded and nvidia-ml-py installed?)")
            sys.exit(1)

        # Both workers run unisolated runtimes (process, sim): the creates opt out.
        gpu = await c.request(CreateSandbox(spec=SandboxSpec(
            image="none", resources=Resources(cpu=1, memory_mb=512, gpu="any"), allow_unisolated=True)), timeout=30)
        cpu = await c.request(CreateSandbox(spec=SandboxSpec(
            image="none", resources=Resources(cpu=1, memory_mb=512), allow_unisolated=True)), timeout=30)
        assert isinstance(gpu, SandboxCreated) and isinstance(cpu, SandboxCreated)
        models = {g.uuid: g.model for g in infos["gpu-node"].gpus}
        print(f"GPU sandbox {gpu.sandbox_id} -> {gpu.worker_id}, GPUs "
              + ", ".join(f"{u} ({models.get(u, '?')})" for u in gpu.gpu_uuids))
        print(f"CPU sandbox {cpu.sandbox_id} -> {cpu.worker_id}")
        check(gpu.worker_id == "gpu-node" and len(gpu.gpu_uuids) == 1, "the GPU request landed on the GPU worker with one GPU")
        check(cpu.worker_id == "cpu-node" and not cpu.gpu_uuids, "the CPU request stayed off the GPU worker")

        res = await c.worker_request(gpu.worker_id, Exec(sandbox_id=gpu.sandbox_id, exec=ExecSpec(
            shell='echo "NVIDIA_VISIBLE_DEVICES=$NVIDIA_VISIBLE_DEVICES"; nvidia-smi -L', timeout=60)), timeout=90)
        out = res.stdout.decode(errors="replace")
        print("inside the GPU sandbox (exit %d):" % res.exit_code)
        for line in (out + res.stderr.decode(errors="replace")).splitlines():
            print("    " + line)
        check(res.exit_code == 0, "nvidia-smi -L ran inside the GPU sandbox")
        check(all(u in out for u in gpu.gpu_uuids), "nvidia-smi -L inside shows the assigned GPU UUID")
        print("note: the process runtime isolates nothing, so nvidia-smi lists every GPU of the host;\n"
              "      CUDA programs see only the assigned one (CUDA_VISIBLE_DEVICES). Docker+runsc\n"
              "      nodes pass exactly the assigned UUIDs as device requests (--nvproxy).")

        for s in (gpu, cpu):
            await c.worker_request(s.worker_id, Terminate(sandbox_id=s.sandbox_id), timeout=30)
    print("gpu_check: " + ("PASSED" if not failures else f"FAILED: {len(failures)} check(s)"))
    sys.exit(1 if failures else 0)


anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
PY
