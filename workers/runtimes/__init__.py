"""Runtimes a worker can drive; ``make_runtime`` picks one by name."""

from __future__ import annotations

from workers.config import WorkerSettings
from workers.runtimes.base import Runtime


def make_runtime(settings: WorkerSettings) -> Runtime:
    if settings.runtime == "docker":
        from workers.runtimes.docker import DockerRuntime
        from workers.runtimes.docker.network import SandboxNetworks

        return DockerRuntime(
            oci_runtime=settings.oci_runtime, gpu_oci_runtime=settings.gpu_oci_runtime,
            cgroup_parent=settings.cgroup_parent,
            networks=SandboxNetworks(
                oci_runtime=settings.net_oci_runtime, subnet=settings.net_subnet,
                allow_open=settings.allow_open_network, dns_upstream=settings.net_dns_upstream,
            ),
        )
    if settings.runtime == "runsc":
        from workers.runtimes.runsc import RunscRuntime

        return RunscRuntime(
            runsc=settings.runsc, root=settings.runsc_root, state_dir=settings.runsc_dir, image_dir=settings.image_dir,
            cgroup_parent=settings.cgroup_parent, flags=[f"--platform={settings.runsc_platform}"],
        )
    if settings.runtime == "sim":
        from workers.runtimes.sim import SimRuntime

        return SimRuntime()
    if settings.runtime == "process":
        from workers.runtimes.process import ProcessRuntime

        return ProcessRuntime(root=settings.process_root)
    raise ValueError(f"unknown runtime {settings.runtime!r}")
