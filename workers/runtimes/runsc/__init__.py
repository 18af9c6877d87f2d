"""Sandboxes as runsc containers driven directly on OCI bundles: no dockerd, no
containerd. For nodes without Docker (GPU hosts, Kubernetes nodes, HPC boxes) and as
a faster road where Docker is present; its sandboxes are gVisor sandboxes with the
docker runtime's limits (CPU quota, memory, pids, non-root user, no network, the
hotbed parent cgroup), and the same guest agent as PID 1.

One module per concern:

* :mod:`.cli` - runsc invocations (hotbed's own ``--root``, deadlines, errors);
* :mod:`.oci` - the bundle's ``config.json`` and an exec's ``process``, pure;
* :mod:`.images` - root file systems from the Docker engine or the node's image dir;
* :mod:`.stdio` - the guest agent's stdin/stdout as named pipes a worker re-opens;
* :mod:`.commands`, :mod:`.files` - ``runsc exec`` for images without the agent;
* :mod:`.nvidia` - device nodes, driver files and env of a GPU sandbox (``--nvproxy``);
* :mod:`.reaper` - the worker as the reaper of the processes runsc leaves it;
* :mod:`.runtime` - :class:`RunscRuntime`, the Runtime made of the above.
"""

from workers.runtimes.runsc.runtime import RunscRuntime

__all__ = ["RunscRuntime"]
