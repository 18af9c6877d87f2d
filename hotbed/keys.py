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
``hotbed:sb:{SID}:env``                hash    the sandbox's own env, which its container
                                               never holds (workers.execution): kept by
                                               its worker for a restart to adopt it with;
                                               no tenant may read it
``hotbed:sandboxes``                   zset    sandbox id -> created_at (unix s), live only
``hotbed:req:{RID}``                   string  who handles create RID, so it makes one
                                               sandbox ever: ``lease TOKEN`` while one
                                               scheduler places it (short TTL, renewed),
                                               then ``placed WORKER`` (written by
                                               RESERVE_DISPATCH with the dispatch) or
                                               ``answered``; kept past the request's
                                               deadline (scheduler.once)
``hotbed:reply:{RID}``                 list    the one reply to request RID; expires
``hotbed:out:{RID}``                   stream  output chunks / events of streaming request
                                               RID (fields ``o`` stdout, ``e`` stderr, ``v``
                                               msgpack event, ``r`` final ReplyEnvelope);
                                               the reader trims what it read; expires
``hotbed:lock:{NAME}``                 string  leader lock, holder's token (``reaper``,
                                               ``pools``; scheduler.leader)
``hotbed:tpl:{NAME}``                  hash    template record (hotbed.records.TemplateRecord)
``hotbed:templates``                   set     template names
``hotbed:snapshots:retired``           set     snapshot ids no template uses any more (its
                                               template deleted or rebuilt): the positive
                                               proof snapshot collection needs
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
``hotbed:tenants``                     set     tenant names (hotbed.tenants)
``hotbed:{q}:requests:T``              stream  tenant T's requests to the schedulers (group
                                               ``schedulers``); only T's Redis user may
                                               write it, so the stream is T's identity
``hotbed:{w:ID}:cmds:T``               stream  tenant T's commands to worker ID (group
                                               ``worker``); likewise only T writes it
``hotbed:{t:T}:quota``                 hash    tenant T's limits (hotbed.tenants.Quota)
``hotbed:{t:T}:held``                  hash    sandbox id -> what it holds of T's quota,
                                               ``"MILLICPU MIB GPUS"``; written only by Lua
``hotbed:{t:T}:usage``                 hash    the sums of ``held``: ``n``, ``cpu``, ``mem``,
                                               ``gpu``; written only by Lua
``hotbed:{t:T}:rate``                  hash    T's create token bucket (``tokens``, ``at``
                                               in Redis ``TIME`` ms); written only by Lua
``hotbed:{t:T}:sandboxes``             zset    T's live sandbox ids -> created_at: the part
                                               of ``hotbed:sandboxes`` T may list (it may
                                               not read the whole index); written beside it
``hotbed:snapshot-token``              string  the fleet's token for copying snapshots between
                                               nodes (workers.snapshot_peers), made once
=====================================  ======  ============================================

A pooled sandbox's record shares its pool's slot: the pool controller draws the refill's
request id with three more characters chosen so that ``sb-RID`` hashes to the slot of
``{pool:NAME}`` (:meth:`Keys.pooled_request_id`). So the claim's take and its record's
flip are one script on one shard, and the record's key keeps its plain form (readers,
tenants' ACL patterns and workers still derive it from the id alone).

Tenants: a tenant's request ids start with ``T.`` and its sandboxes' ids with ``sb-T.``
(tenant names hold no ``.``), so its reply, output and sandbox record keys fall under
patterns its Redis user is granted and no other tenant's is (hotbed.tenants). Daemons
take a request's tenant from the stream it arrived on and refuse ids outside it.

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

import binascii
import functools
import re
from collections.abc import Callable

import msgspec
from redis.crc import key_slot

REQUESTS_GROUP = "schedulers"
WORKER_GROUP = "worker"
# The one field of a stream entry: the encoded Envelope.
FIELD = b"m"

REPLY_TTL_S = 120

# A tenant's name (hotbed.tenants.NAME_RE) at the head of its ids: ``T.x``, ``sb-T.x``.
_OWNED_ID = re.compile(r"(?:sb-)?([a-z0-9][a-z0-9_]{0,31})\.")


def id_tenant(some_id: str) -> str | None:
    """The tenant a request or sandbox id belongs to; None for an operator's id."""
    m = _OWNED_ID.match(some_id)
    return m.group(1) if m else None


def sandbox_id_for(request_id: str) -> str:
    """The sandbox a create makes: derived from the request id, so a redelivered request
    names the same sandbox."""
    return f"sb-{request_id}"


# Redis Cluster's slot of a hash tag is CRC16/XMODEM of it, mod 16384. That CRC is linear
# with a zero start, so crc(P + S) = crc(P + zeros) ^ crc(S) for a suffix S of a fixed
# length: a table of one 3-character suffix per low-14-bit CRC value lets an id be
# steered to any slot without a search. 36^3 suffixes cover 99.4 % of the values; an id
# whose needed value has none is drawn again.
_SUFFIX_CHARS = b"0123456789abcdefghijklmnopqrstuvwxyz"
_SLOTS = 16384


@functools.cache
def _slot_suffixes() -> dict[int, bytes]:
    table: dict[int, bytes] = {}
    for a in _SUFFIX_CHARS:
        for b in _SUFFIX_CHARS:
            for c in _SUFFIX_CHARS:
                suffix = bytes((a, b, c))
                table.setdefault(binascii.crc_hqx(suffix, 0) % _SLOTS, suffix)
    return table


def prepare_slot_steering() -> None:
    """Builds the suffix table now (tens of ms: a daemon runs it off its event loop)."""
    _slot_suffixes()


def _steered(tag_head: str, slot: int) -> str | None:
    """Three characters that put the hash tag ``tag_head + them`` in ``slot``; None if
    no suffix fits this head."""
    head = binascii.crc_hqx(tag_head.encode() + b"\0\0\0", 0) % _SLOTS
    suffix = _slot_suffixes().get(head ^ slot)
    return None if suffix is None else suffix.decode()


class Keys(msgspec.Struct, frozen=True):
    """Key builder for one key-space prefix."""

    prefix: str = "hotbed"

    # -- request intake
    @property
    def requests(self) -> str:
        return f"{self.prefix}:{{q}}:requests"

    def request(self, request_id: str) -> str:
        """Who handles create ``request_id`` (scheduler.once)."""
        return f"{self.prefix}:req:{{{request_id}}}"

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
        return f"{self.sandbox_head}{sandbox_id}}}"

    @property
    def sandbox_head(self) -> str:
        """What precedes the id in a sandbox record's key, for a script that learns the
        id itself (lua.POOL_CLAIM)."""
        return f"{self.prefix}:sb:{{"

    def sandbox_env(self, sandbox_id: str) -> str:
        return f"{self.sandbox(sandbox_id)}:env"

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

    @property
    def snapshots_retired(self) -> str:
        """Snapshot ids that no template uses any more (workers may delete them)."""
        return f"{self.prefix}:snapshots:retired"

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

    def pooled_request_id(self, pool: str, draw: Callable[[], str]) -> str:
        """A request id for a refill of ``pool``: ``draw()`` and three characters that
        put its sandbox's record (``sandbox(sandbox_id_for(id))``) in the pool's slot,
        where the claim script reads and flips it."""
        slot = key_slot(self.pool_ready(pool).encode())
        while True:
            base = draw()
            suffix = _steered(sandbox_id_for(base), slot)
            if suffix is not None:
                return base + suffix

    # -- tenants
    @property
    def tenants(self) -> str:
        return f"{self.prefix}:tenants"

    def tenant_requests(self, tenant: str) -> str:
        """Tenant ``tenant``'s request stream (shares the scheduler stream's tag, so one
        XREADGROUP reads them all on a Redis Cluster too)."""
        return f"{self.requests}:{tenant}"

    def tenant_worker_cmds(self, worker_id: str, tenant: str) -> str:
        """Tenant ``tenant``'s command stream to a worker (shares the worker's tag)."""
        return f"{self.worker_cmds(worker_id)}:{tenant}"

    def stream_tenant(self, stream: str) -> str | None:
        """The tenant whose stream ``stream`` is; None for the operators' own streams."""
        if stream.startswith(self.requests + ":"):
            return stream[len(self.requests) + 1 :]
        head = f"{self.prefix}:{{w:"
        if stream.startswith(head):
            _, sep, tenant = stream.partition("}:cmds:")
            if sep:
                return tenant
        return None

    def tenant_quota(self, tenant: str) -> str:
        return f"{self.prefix}:{{t:{tenant}}}:quota"

    def tenant_held(self, tenant: str) -> str:
        return f"{self.prefix}:{{t:{tenant}}}:held"

    def tenant_usage(self, tenant: str) -> str:
        return f"{self.prefix}:{{t:{tenant}}}:usage"

    def tenant_rate(self, tenant: str) -> str:
        return f"{self.prefix}:{{t:{tenant}}}:rate"

    def tenant_sandboxes(self, tenant: str) -> str:
        return f"{self.prefix}:{{t:{tenant}}}:sandboxes"

    def sandbox_indexes(self, sandbox_id: str) -> list[str]:
        """The live-sandbox indexes that list ``sandbox_id``: ``sandboxes``, and its
        tenant's ``tenant_sandboxes`` if it has one. Whoever adds or removes a sandbox
        writes all of them (separate keys: on a Redis Cluster they may sit apart)."""
        tenant = id_tenant(sandbox_id)
        return [self.sandboxes, self.tenant_sandboxes(tenant)] if tenant else [self.sandboxes]

    @property
    def snapshot_token(self) -> str:
        return f"{self.prefix}:snapshot-token"
