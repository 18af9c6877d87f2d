"""systemd's notify protocol, without libsystemd: datagrams to ``$NOTIFY_SOCKET``.

A ``Type=notify`` unit starts the daemon with ``NOTIFY_SOCKET`` set to a Unix datagram
socket (a path, or ``@name`` for the abstract namespace). The daemon sends
``READY=1`` once it can serve, ``WATCHDOG=1`` at least every ``WATCHDOG_USEC / 2``
when the unit has ``WatchdogSec=``, ``RELOADING=1`` / ``READY=1`` around a reload, and
``STOPPING=1`` when it begins to shut down. Without ``NOTIFY_SOCKET`` every call is a
no-op, so the daemons call it unconditionally.

Sending is one non-blocking ``sendto`` on a datagram socket: it never blocks the
event loop. A failed send is logged once and otherwise ignored (systemd gone away is
not a reason to stop serving).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if addr.startswith("@"):
            self.address = b"\0" + addr[1:].encode()
        elif addr.startswith("/"):
            self.address = addr
        self.watchdog_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *states: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True if it was sent."""
        if self.address is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        try:
            self._sock.sendto("\n".join(states).encode(), self.address)
        except OSError as exc:
            if not self._warned:
                log.warning("sd_notify to %r failed: %s", self.address, exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        return self.notify("RELOADING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
