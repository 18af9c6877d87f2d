"""Finding this node's GPUs, behind a small interface.

:class:`GpuDetector` is anything with ``detect() -> list[GpuDevice]``. Three exist:

* :class:`NvmlDetector` asks NVML (the ``nvidia-ml-py`` binding, optional extra
  ``gpu``) for each device's model, memory and UUID. A node without the binding,
  without the NVIDIA driver, or with no device has no GPUs: that is logged at INFO
  and is not an error. The NVML module can be injected, so tests run it against
  NVML-shaped fakes.
* :class:`StaticDetector` returns a fixed list: GPUs declared in the worker's config
  (``gpus = [{uuid = ..., model = ...}]``), for simulated fleets and tests.
* :class:`NoGpuDetector` returns nothing (``gpu_detect = "none"``).

``detector_for(settings)`` picks one: declared GPUs win, then ``gpu_detect``
(``auto`` and ``nvml`` both use NVML; ``nvml`` logs a warning when none is found,
because the operator said to expect some).

:class:`NvmlUsage` reads each GPU's memory in use and utilisation for the worker's
metrics; :func:`usage_samples` labels them with the sandbox holding the GPU (a GPU
belongs to one sandbox at a time, so per GPU is per sandbox).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import msgspec

from hotbed.protocol import GpuDevice

log = logging.getLogger(__name__)


class GpuDetector(Protocol):
    def detect(self) -> list[GpuDevice]: ...


class NoGpuDetector:
    def detect(self) -> list[GpuDevice]:
        return []


class StaticDetector:
    def __init__(self, gpus: list[GpuDevice]) -> None:
        self.gpus = list(gpus)

    def detect(self) -> list[GpuDevice]:
        return [
            GpuDevice(uuid=g.uuid, model=g.model, memory_mb=g.memory_mb, index=g.index or i)
            for i, g in enumerate(self.gpus)
        ]


def _text(value: Any) -> str:
    # Older NVML bindings return bytes, newer ones str.
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlDetector:
    """GPUs as NVML reports them. ``nvml``: a pynvml-shaped module (default: import it)."""

    def __init__(self, nvml: Any | None = None, *, expect: bool = False) -> None:
        self._nvml = nvml
        self.expect = expect

    def _module(self) -> Any | None:
        if self._nvml is not None:
            return self._nvml
        try:
            import pynvml  # the nvidia-ml-py distribution
        except ImportError:
            self._report("nvidia-ml-py is not installed (pip install 'hotbed[gpu]')")
            return None
        return pynvml

    def _report(self, why: str) -> None:
        if self.expect:
            log.warning("no GPUs detected: %s", why)
        else:
            log.info("no GPUs: %s", why)

    def detect(self) -> list[GpuDevice]:
        nvml = self._module()
        if nvml is None:
            return []
        error: type[BaseException] = getattr(nvml, "NVMLError", Exception)
        try:
            nvml.nvmlInit()
        except error as exc:
            # No driver, no library, no device: a CPU-only node.
            self._report(f"NVML unavailable ({exc})")
            return []
        try:
            out = []
            for i in range(int(nvml.nvmlDeviceGetCount())):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                out.append(
                    GpuDevice(
                        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                        model=_text(nvml.nvmlDeviceGetName(handle)),
                        memory_mb=int(memory.total) >> 20,
                        index=i,
                    )
                )
        except error as exc:
            self._report(f"NVML failed while listing devices ({exc})")
            return []
        finally:
            try:
                nvml.nvmlShutdown()
            except error:
                pass
        if not out:
            self._report("NVML lists no devices")
        else:
            log.info("GPUs: %s", ", ".join(f"{g.index}:{g.model} {g.uuid}" for g in out))
        return out


def detector_for(gpu_detect: str, declared: list[GpuDevice]) -> GpuDetector:
    if declared:
        return StaticDetector(declared)
    if gpu_detect == "none":
        return NoGpuDetector()
    return NvmlDetector(expect=gpu_detect == "nvml")


# ------------------------------------------------------------------ usage


class GpuUsage(msgspec.Struct, frozen=True, kw_only=True):
    uuid: str
    memory_used_bytes: int
    # Percent of the last sample period in which a kernel ran (NVML's "gpu" rate).
    utilization_pct: int


class NvmlUsage:
    """GPU memory in use and utilisation now, from NVML, kept initialised between
    reads. ``nvml``: a pynvml-shaped module (default: import it). Blocking calls (a
    few microseconds each): the metrics sampler runs :meth:`read` in a thread."""

    def __init__(self, nvml: Any | None = None) -> None:
        self._nvml = nvml
        self._ready = False
        self._failed = False

    def _init(self) -> Any | None:
        if self._ready:
            return self._nvml
        if self._failed:
            return None
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                self._failed = True
                return None
            self._nvml = pynvml
        error: type[BaseException] = getattr(self._nvml, "NVMLError", Exception)
        try:
            self._nvml.nvmlInit()
        except error as exc:
            log.info("no GPU metrics: NVML unavailable (%s)", exc)
            self._failed = True
            return None
        self._ready = True
        return self._nvml

    def read(self) -> list[GpuUsage]:
        nvml = self._init()
        if nvml is None:
            return []
        error: type[BaseException] = getattr(nvml, "NVMLError", Exception)
        out = []
        try:
            for i in range(int(nvml.nvmlDeviceGetCount())):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                out.append(GpuUsage(
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    memory_used_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).used),
                    utilization_pct=int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                ))
        except error as exc:
            log.warning("GPU metrics: NVML failed (%s)", exc)
            return []
        return out

    def close(self) -> None:
        nvml = self._nvml
        if self._ready and nvml is not None:
            self._ready = False
            error: type[BaseException] = getattr(nvml, "NVMLError", Exception)
            try:
                nvml.nvmlShutdown()
            except error:
                pass


def usage_samples(
    worker_id: str, usage: list[GpuUsage], holders: dict[str, str]
) -> dict[str, dict[tuple[str, ...], float]]:
    """Metric samples of ``usage``, labelled (worker, gpu, sandbox); ``holders`` maps a
    GPU's UUID to the sandbox holding it ("" for a free GPU)."""
    memory: dict[tuple[str, ...], float] = {}
    util: dict[tuple[str, ...], float] = {}
    for u in usage:
        key = (worker_id, u.uuid, holders.get(u.uuid, ""))
        memory[key] = float(u.memory_used_bytes)
        util[key] = u.utilization_pct / 100.0
    return {"hotbed_gpu_memory_used_bytes": memory, "hotbed_gpu_utilization_ratio": util}
