"""The one place every Redis key and stream name is built.

Keys (``{...}`` is a Redis Cluster hash tag: keys that one Lua script touches together
share it, so every script runs on one shard):

=====================================  ======  ============================================
key                                    type    meaning
=====================================  ======  ============================================
``hotbed:{q}:requests``                stream  client -> scheduler requests (group
                                               ``schedulers``); entries are deleted once
                                               handled, so XLEN is the backlog
``hotbed:{w:ID}:cmds``                 stream  scheduler/client -> worker ID commands (group
                                               ``worker``); same delete-on-ack rule
``hotbed:{w:ID}:cap``                  hash    worker ID's free capacity: ``cpu`` (millicpu),
                                               ``mem`` (MiB), ``gpu:<uuid>`` (0 free / 1
                                               taken), ``n`` (sandboxes placed); codec
                                               hotbed.records.Capacity, written only by Lua
``hotbed:{w:ID}:info``                 string  msgpack WorkerInfo (capacity, GPUs, tags)
``hotbed:{w:ID}:sandboxes``            hash    sandbox id -> its reservation on worker ID,
                                               ``"MILLICPU MIB GPU,GPU..."`` (``"0 0 GPUS"``
                                               while paused); written only by Lua
``hotbed:{w:ID}:images``               string  msgpack HeldImages: the images worker ID
                                               holds (bounded); codec hotbed.records,
                                               rewritten with a TTL by the worker
``hotbed:workers``                     zset    worker id -> last heartbeat (unix ms)
``hotbed:sb:{SID}``                    hash    sandbox record (hotbed.records.SandboxRecord)
``hotbed:sandboxes``                   zset    sandbox id -> created_at (unix s), live only
``hotbed:reply:{RID}``                 list    the one reply to request RID; expires
``hotbed:out:{RID}``                   stream  output chunks / events of streaming request
                                               RID (fields ``o`` stdout, ``e`` stderr, ``v``
                                               msgpack event, ``r`` final ReplyEnvelope);
                                               the reader trims what it read; expires
``hotbed:lock:{NAME}``                 string  leader lock, holder's token (``reaper``,
                                               ``pools``; scheduler.leader)
``hotbed:tpl:{NAME}``                  hash    template record (hotbed.records.TemplateRecord)
``hotbed:templates``                   set     template names
``hotbed:{pool:NAME}:ready``           list    ``"SID WORKER"`` of pool NAME's warm sandboxes,
                                               ready to claim (LPOP in ``POOL_CLAIM``)
``hotbed:{pool:NAME}:warming``         zset    ``SID`` being made ready for pool NAME ->
                                               give-up time (unix ms)
``hotbed:{pool:NAME}:claims``          zset    ``"SID WORKER"`` claimed, claim not finished
                                               -> lease expiry (unix ms); the pool
                                               controller takes back expired leases
``hotbed:{pool:NAME}:stale``           list    ``"SID WORKER"`` retired by a template
                                               rebuild (``POOL_RETIRE``), for the pool
                                               controller to end
``hotbed:{pool:NAME}:conf``            hash    pool NAME's ``template``, ``size`` and shape
                                               (``cpu``, ``memory_mb``, ``gpu``); codec
                                               hotbed.records.PoolConfig
``hotbed:pools``                       set     pool names
=====================================  ======  ============================================

The registries (``hotbed:workers``, ``hotbed:sandboxes``, ``hotbed:templates``,
``hotbed:pools``) have no tag of their own kind and no script touches one together with
another key: on a Redis Cluster they may sit on any shard. A write that pairs a registry
with a record is two ordered steps (record first when adding, registry first when
removing), so a race leaves at worst a listed name without a record, which readers skip.

Daemons derive a request's reply and output keys from its id (``reply``, ``output``),
never from the key names a message carries (``reply_to``, ``stream_to`` only say whether
anyone waits and whether output streams), and check every id and name against the
patterns in :mod:`hotbed.limits` first: none may contain ``{``, ``}`` or ``/``.

Everything lives under one prefix (``HOTBED_PREFIX``, default ``hotbed``), so tests can
share a Redis by giving each run its own prefix.
"""

from __future__ import annotations

import msgspec

REQUESTS_GROUP = "schedulers"
WORKER_GROUP = "worker"
# The one field of a stream entry: the encoded Envelope.
FIELD = b"m"

REPLY_TTL_S = 120


class Keys(msgspec.Struct, frozen=True):
    """Key builder for one key-space prefix."""

    prefix: str = "hotbed"

    # -- request intake
    @property
    def requests(self) -> str:
        return f"{self.prefix}:{{q}}:requests"

    def reply(self, request_id: str) -> str:
        return f"{self.prefix}:reply:{{{request_id}}}"

    def output(self, request_id: str) -> str:
        """Where a streaming request's output goes (shares the reply's tag)."""
        return f"{self.prefix}:out:{{{request_id}}}"

    # -- workers
    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker_cmds(self, worker_id: str) -> str:
        return f"{self.prefix}:{{w:{worker_id}}}:cmds"

    def worker_cap(self, worker_id: str) -> str:
        return f"{self.prefix}:{{w:{worker_id}}}:cap"

    def worker_info(self, worker_id: str) -> str:
        return f"{self.prefix}:{{w:{worker_id}}}:info"

    def worker_images(self, worker_id: str) -> str:
        return f"{self.prefix}:{{w:{worker_id}}}:images"

    def worker_sandboxes(self, worker_id: str) -> str:
        return f"{self.prefix}:{{w:{worker_id}}}:sandboxes"

    # -- sandboxes
    def sandbox(self, sandbox_id: str) -> str:
        return f"{self.prefix}:sb:{{{sandbox_id}}}"

    @property
    def sandboxes(self) -> str:
        return f"{self.prefix}:sandboxes"

    # -- coordination
    def lock(self, name: str) -> str:
        return f"{self.prefix}:lock:{{{name}}}"

    # -- templates and pools
    def template(self, name: str) -> str:
        return f"{self.prefix}:tpl:{{{name}}}"

    @property
    def templates(self) -> str:
        return f"{self.prefix}:templates"

    def pool_ready(self, pool: str) -> str:
        return f"{self.prefix}:{{pool:{pool}}}:ready"

    def pool_conf(self, pool: str) -> str:
        return f"{self.prefix}:{{pool:{pool}}}:conf"

    def pool_warming(self, pool: str) -> str:
        return f"{self.prefix}:{{pool:{pool}}}:warming"

    def pool_claims(self, pool: str) -> str:
        return f"{self.prefix}:{{pool:{pool}}}:claims"

    def pool_stale(self, pool: str) -> str:
        """Entries retired by a template rebuild, for the pool controller to end."""
        return f"{self.prefix}:{{pool:{pool}}}:stale"

    @property
    def pools(self) -> str:
        return f"{self.prefix}:pools"
