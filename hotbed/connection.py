"""Redis connections with deadlines.

Two kinds: a command client whose socket timeout bounds every call, and a blocking
client for BLPOP/XREADGROUP BLOCK whose socket timeout exceeds the longest block we
issue (redis-py #2807: a socket timeout shorter than the block time kills the call).
``rediss://`` URLs give TLS; ``redis://user:password@host`` gives an ACL user.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

# Longest single blocking call we issue; loops re-issue to wait longer.
MAX_BLOCK_S = 5.0
COMMAND_TIMEOUT_S = 10.0
# Connections one client may open. Every waiting BLPOP holds one, so this bounds the
# requests one Client can have in flight; redis-py 8 lowered its default to 100.
MAX_CONNECTIONS = 10_000
# No CLIENT SETINFO: otherwise redis-py 8 reads its package metadata (importlib.metadata,
# ~1 ms) and spends two extra round trips on every new connection, which dominated CPU
# when load opens many of them.
try:
    import redis.driver_info  # noqa: F401  (redis-py >= 7)

    NO_CLIENT_INFO: dict[str, Any] = {"driver_info": None}
except ImportError:
    NO_CLIENT_INFO = {"lib_name": None, "lib_version": None}


def connect(url: str, *, blocking: bool = False, **kwargs: Any) -> aioredis.Redis:
    socket_timeout = MAX_BLOCK_S + COMMAND_TIMEOUT_S if blocking else COMMAND_TIMEOUT_S
    opts: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 30,
        "decode_responses": False,
        "max_connections": MAX_CONNECTIONS,
        **NO_CLIENT_INFO,
    }
    opts.update(kwargs)
    return aioredis.Redis.from_url(url, **opts)
