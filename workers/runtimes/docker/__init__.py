"""Sandboxes as Docker containers under gVisor (``runsc``), driven through aiodocker.

Each sandbox is one container: labelled as hotbed's, networking off (``NetworkDisabled``
also skips dockerd's network hook, ~1.6x creation throughput here), CPU / memory /
pids limits from the request, a non-root user by default, a writable root filesystem.
Its main process is the guest agent where the image has python3 (commands are messages
on its attached stdin/stdout, :mod:`workers.execution`), else an idle shell, and
commands run as ``docker exec``.

One module per concern:

* :mod:`.engine` - the dockerd client, host facts, error translation;
* :mod:`.lifecycle` - container config, create, destroy, listing;
* :mod:`.commands` - ``docker exec`` with timeouts that kill the process group;
* :mod:`.files` - files through exec (gVisor's overlay hides them from the archive API);
* :mod:`.checkpoints` - checkpoint, restore, pause, resume;
* :mod:`.images` - the images the node holds, pulls from a registry;
* :mod:`._aiodocker` - the only place aiodocker's private attributes are used;
* :mod:`.runtime` - :class:`DockerRuntime`, the Runtime made of the above.

Every Docker call sits under a deadline (aiodocker has none of its own).
"""

from workers.runtimes.docker.engine import container_name
from workers.runtimes.docker.runtime import DockerRuntime

__all__ = ["DockerRuntime", "container_name"]
