"""Prometheus metrics of the scheduler and the worker (``prometheus-client``, extra ``metrics``).

Each daemon owns one :class:`Metrics` in its own ``CollectorRegistry`` (so several
daemons in one test process do not collide). Two kinds of series:

* counted on the hot path, by cheap label-child increments:
  ``hotbed_requests_total{type}``, ``hotbed_errors_total{type,code}``,
  ``hotbed_create_seconds{path}`` (worker: start-up time per path, warm / restore /
  cold), ``hotbed_placement_wait_seconds`` (scheduler: from taking a create to
  dispatching it, queueing for capacity included);
* sampled every ``SAMPLE_S`` by a background task of the daemon (never from the
  scrape thread, never per request): ``hotbed_queue_depth``,
  ``hotbed_queue_oldest_age_seconds``, ``hotbed_queue_waiting{class}`` (creates
  waiting for capacity), ``hotbed_live_sandboxes``, ``hotbed_pool_ready{pool,template}``
  vs ``hotbed_pool_target{pool,template}``, ``hotbed_worker_heartbeat_age_seconds{worker}``,
  ``hotbed_gpu_slots{worker,model,state}`` (state = used | free),
  ``hotbed_worker_capacity{worker,resource,state}``.

:func:`serve` runs the HTTP endpoint (bound to 127.0.0.1 unless configured) and the
sampler for as long as the daemon runs. Without ``prometheus-client`` installed,
:data:`NULL` stands in and a daemon asked for a port fails at start with one line.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

from daemon import lifecycle
from hotbed.errors import ConfigError

log = logging.getLogger(__name__)

SAMPLE_S = 1.0
CREATE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# name -> (help, label names)
SAMPLED: dict[str, tuple[str, tuple[str, ...]]] = {
    "hotbed_queue_depth": ("Requests in the scheduler's stream not yet handled.", ()),
    "hotbed_queue_oldest_age_seconds": ("Age of the oldest unhandled request.", ()),
    "hotbed_queue_waiting": ("Creates waiting in line for capacity, per class.", ("class",)),
    "hotbed_live_sandboxes": ("Live sandboxes (fleet-wide on the scheduler, own on a worker).", ()),
    "hotbed_pool_ready": ("Warm sandboxes ready to claim.", ("pool", "template")),
    "hotbed_pool_target": ("Warm pool target size.", ("pool", "template")),
    "hotbed_worker_heartbeat_age_seconds": ("Seconds since each worker's last heartbeat.", ("worker",)),
    "hotbed_gpu_slots": ("GPUs per worker and model, used or free.", ("worker", "model", "state")),
    "hotbed_gpu_memory_used_bytes": (
        "GPU memory in use, per GPU and the sandbox holding it (NVML).", ("worker", "gpu", "sandbox"),
    ),
    "hotbed_gpu_utilization_ratio": (
        "GPU utilisation (0-1), per GPU and the sandbox holding it (NVML).", ("worker", "gpu", "sandbox"),
    ),
    "hotbed_worker_capacity": (
        "Worker capacity (cpu in millicpu, memory in MiB), used or free.",
        ("worker", "resource", "state"),
    ),
}

Samples = dict[str, dict[tuple[str, ...], float]]


class NullMetrics:
    """Stands in when metrics are off: every hook is a no-op."""

    enabled = False

    def request(self, kind: str) -> None:
        pass

    def error(self, kind: str, code: str) -> None:
        pass

    def create(self, path: str, seconds: float) -> None:
        pass

    def placement_wait(self, seconds: float) -> None:
        pass

    def publish(self, samples: Samples) -> None:
        pass


NULL = NullMetrics()


class Metrics(NullMetrics):
    enabled = True

    def __init__(self, role: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.role = role
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "hotbed_requests", "Requests handled, by message type.", ["type"], registry=self.registry
        )
        self._errors = Counter(
            "hotbed_errors", "Requests answered with an error, by type and error code.",
            ["type", "code"], registry=self.registry,
        )
        self._create = Histogram(
            "hotbed_create_seconds", "Sandbox start-up time on the worker, by path.",
            ["path"], buckets=CREATE_BUCKETS, registry=self.registry,
        )
        self._wait = Histogram(
            "hotbed_placement_wait_seconds",
            "Scheduler time from taking a create to dispatching it (queueing included).",
            buckets=CREATE_BUCKETS, registry=self.registry,
        )
        self._children: dict[Any, Any] = {}
        self._samples: Samples = {}
        self.registry.register(_SampledCollector(self))

    def request(self, kind: str) -> None:
        child = self._children.get(kind)
        if child is None:
            child = self._children[kind] = self._requests.labels(kind)
        child.inc()

    def error(self, kind: str, code: str) -> None:
        self._errors.labels(kind, code).inc()

    def create(self, path: str, seconds: float) -> None:
        key = ("create", path)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._create.labels(path)
        child.observe(seconds)

    def placement_wait(self, seconds: float) -> None:
        self._wait.observe(seconds)

    def publish(self, samples: Samples) -> None:
        # One reference swap: the scrape thread sees the old or the new dict, whole.
        self._samples = samples

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))


class _SampledCollector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return list(self._families({}))

    def collect(self) -> Iterator[Any]:
        return self._families(self.metrics._samples)

    def _families(self, samples: Samples) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        for name, (doc, labels) in SAMPLED.items():
            fam = GaugeMetricFamily(name, doc, labels=list(labels))
            for values, v in samples.get(name, {}).items():
                fam.add_metric(list(values), v)
            yield fam


def make(role: str, port: int) -> NullMetrics:
    """Real metrics when ``port`` is set; ConfigError if the library is missing."""
    if not port:
        return NULL
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"metrics_port={port} but prometheus-client is not installed (pip install 'hotbed[metrics]')"
        ) from None
    return Metrics(role)


@asynccontextmanager
async def serve(
    metrics: NullMetrics,
    *,
    port: int,
    addr: str = "127.0.0.1",
    sample: Callable[[], Awaitable[Samples]] | None = None,
) -> AsyncIterator[None]:
    """Serve ``/metrics`` on ``addr:port`` and run ``sample`` every SAMPLE_S while inside."""
    if not isinstance(metrics, Metrics):
        yield
        return
    from prometheus_client import start_http_server

    try:
        server, thread = start_http_server(port, addr=addr, registry=metrics.registry)
    except OSError as exc:
        raise ConfigError(f"metrics endpoint {addr}:{port}: {exc.strerror}") from None
    log.info("metrics on http://%s:%d/metrics", addr, server.server_port)

    async def sampler() -> None:
        assert sample is not None

        async def step() -> None:
            metrics.publish(await sample())

        # A failed sample must not stop the daemon.
        await lifecycle.supervised_loop("metrics sample", step, interval=SAMPLE_S, log=log)

    try:
        async with anyio.create_task_group() as tg:
            if sample is not None:
                tg.start_soon(sampler)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(server.shutdown)
            server.server_close()
            await anyio.to_thread.run_sync(thread.join, 5)
