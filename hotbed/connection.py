"""Redis connections with deadlines, to a standalone Redis, a Sentinel-run primary or a
Redis Cluster.

Two kinds: a command client whose socket timeout bounds every call, and a blocking
client for BLPOP/XREADGROUP BLOCK whose socket timeout exceeds the longest block we
issue (redis-py #2807: a socket timeout shorter than the block time kills the call).

URL forms (``HOTBED_REDIS_URL``):

- ``redis://[user:password@]host:port/DB`` one Redis; ``rediss://`` gives TLS,
  ``unix:///path.sock`` a local socket.
- ``redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE[/DB]`` the
  primary that the listed Sentinels name SERVICE, followed through failovers
  (``rediss+sentinel://`` for TLS to the primary; ``?sentinel_password=...`` when the
  Sentinels want one).
- ``redis+cluster://[user:password@]host:port[,host:port...]`` a Redis Cluster, found
  through any of the listed seed nodes (``rediss+cluster://`` for TLS). Keys that one
  Lua script touches share a hash tag (hotbed.keys), so every script runs on one
  shard; hotbed.batching pipelines per node, and MOVED/ASK redirections and failovers
  are followed.

Query options (``?socket_timeout=...``) of a plain or cluster URL go to redis-py as for
its own ``from_url``.
Either client type offers the same commands; :func:`is_cluster` tells them apart where
the wire path differs (hotbed.batching, hotbed.client's blocking waits).
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

# Longest single blocking call we issue; loops re-issue to wait longer.
MAX_BLOCK_S = 5.0
COMMAND_TIMEOUT_S = 10.0
# Connections one client may open (per node of a cluster). Every waiting BLPOP holds
# one, so this bounds the requests one Client can have in flight; redis-py 8 lowered
# its default to 100.
MAX_CONNECTIONS = 10_000
# No CLIENT SETINFO: otherwise redis-py 8 reads its package metadata (importlib.metadata,
# ~1 ms) and spends two extra round trips on every new connection, which dominated CPU
# when load opens many of them.
try:
    import redis.driver_info  # noqa: F401  (redis-py >= 7)

    NO_CLIENT_INFO: dict[str, Any] = {"driver_info": None}
except ImportError:
    NO_CLIENT_INFO = {"lib_name": None, "lib_version": None}

# A command whose connection failed is sent again on a new one, a few times within about
# a second: a connection the server closed (Redis restarted) is met only when used.
# redis-py's constructor retries by default, but its from_url() gives connections no
# retry at all. Timeouts are not retried: COMMAND_TIMEOUT_S is the call's whole budget.
RETRIES = 3
RETRY_BACKOFF = (0.02, 0.5)  # base, cap (seconds)


def command_retry() -> Retry:
    return Retry(ExponentialWithJitterBackoff(*RETRY_BACKOFF), RETRIES, supported_errors=(RedisConnectionError,))


CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


class RedisURL:
    """A parsed ``HOTBED_REDIS_URL`` of any form above."""

    __slots__ = ("scheme", "tls", "username", "password", "hosts", "path", "query")

    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        self.scheme = u.scheme
        self.tls = u.scheme.startswith("rediss")
        userinfo, _, hostlist = u.netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        self.username = unquote(user) or None
        self.password = unquote(password) if password else None
        self.hosts: list[tuple[str, int]] = []
        for part in hostlist.split(",") if hostlist else []:
            if part.startswith("["):  # [IPv6]:port
                host, _, rest = part[1:].partition("]")
                port = rest[1:]
            else:
                host, _, port = part.partition(":")
            self.hosts.append((host, int(port or 6379)))
        self.path = u.path
        self.query = dict(parse_qsl(u.query))

    @property
    def cluster(self) -> bool:
        return self.scheme in CLUSTER_SCHEMES

    @property
    def sentinel(self) -> bool:
        return self.scheme in SENTINEL_SCHEMES

    def first_node_url(self) -> str:
        """A plain ``redis://`` URL of the first host, carrying credentials and options
        (what redis-py's own URL parser understands)."""
        host, port = self.hosts[0]
        auth = ""
        if self.username or self.password:
            auth = f"{self.username or ''}:{self.password or ''}@" if self.password else f"{self.username}@"
        query = "&".join(f"{k}={v}" for k, v in self.query.items())
        return f"{'rediss' if self.tls else 'redis'}://{auth}{host}:{port}/{'?' + query if query else ''}"


def is_cluster(redis: Any) -> bool:
    return isinstance(redis, RedisCluster)


def connect(url: str, *, blocking: bool = False, **kwargs: Any) -> aioredis.Redis:
    """A client for ``url`` (any form above). A cluster URL gives a
    :class:`redis.asyncio.cluster.RedisCluster`, typed as ``Redis`` here since hotbed
    uses only the commands both offer."""
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
    scheme = url.partition("://")[0]
    if scheme in CLUSTER_SCHEMES:
        # Cluster commands go through hotbed.batching's own failover handling, and
        # RedisCluster takes ``retry`` as its cluster-wide policy, not a connection's.
        return cast(aioredis.Redis, _connect_cluster(RedisURL(url), opts))
    opts.setdefault("retry", command_retry())
    if scheme in SENTINEL_SCHEMES:
        return _connect_sentinel(RedisURL(url), opts)
    return aioredis.Redis.from_url(url, **opts)


def _connect_cluster(u: RedisURL, opts: dict[str, Any]) -> RedisCluster:
    if not u.hosts:
        raise ValueError("a redis+cluster:// URL names at least one seed node")
    opts.pop("health_check_interval", None)  # node connections are checked on use
    seeds = [ClusterNode(host, port) for host, port in u.hosts[1:]]
    return RedisCluster.from_url(u.first_node_url(), startup_nodes=seeds, **opts)


def _connect_sentinel(u: RedisURL, opts: dict[str, Any]) -> aioredis.Redis:
    from redis.asyncio.sentinel import Sentinel

    parts = [p for p in u.path.split("/") if p]
    if not parts:
        raise ValueError("a redis+sentinel:// URL names the service: redis+sentinel://host:port/SERVICE")
    service, db = parts[0], int(parts[1]) if len(parts) > 1 else 0
    query = dict(u.query)
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": opts["socket_timeout"], "socket_connect_timeout": opts["socket_connect_timeout"],
        **NO_CLIENT_INFO,
    }
    if "sentinel_password" in query:
        sentinel_kwargs["password"] = query.pop("sentinel_password")
    opts.pop("max_connections", None)
    sentinel = Sentinel(u.hosts, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    client: aioredis.Redis = sentinel.master_for(
        service, username=u.username, password=u.password, db=db, ssl=u.tls,
        max_connections=MAX_CONNECTIONS, **opts,
    )
    return client
