"""What the scheduler and the worker share as daemons, and the SDK never needs.

``lifecycle`` (logging, signals, the survive policy, ``run_daemon``), ``config`` (TOML +
``HOTBED_*`` settings), ``metrics`` (Prometheus), ``sdnotify`` (systemd's notify protocol),
``streams`` (consumer-group intake and replies) and ``images`` (building the stock images).

Layers, from the bottom: ``hotbed`` (SDK and wire) <- ``daemon`` <- ``scheduler``, ``workers``
<- ``cli``. Nothing imports upward.
"""
