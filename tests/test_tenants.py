"""Tenants that Redis authenticates: another tenant's sandboxes, keys and the
operators' state are refused, quotas hold, and the node keeps serving.

Against a real Redis with ACL users, and real dockerd + runsc where sandboxes are
involved; the scheduler and the worker run as their own least-privileged Redis users.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.exceptions

from cli.tenants import remove
from hotbed import keys as keyspace
from hotbed import lua, protocol, templates, tenants
from hotbed.client import Client
from hotbed.errors import PermissionDenied, QuotaExceeded, SandboxNotFound
from hotbed.protocol import Envelope, Exec, ExecSpec
from hotbed.sandbox import Sandbox
from tests.conftest import (
    BUSYBOX_IMAGE,
    Stack,
    _free_port,
    docker_available,
    leftover_containers,
    running_stack,
)

pytestmark = pytest.mark.anyio

NOPERM = redis.exceptions.NoPermissionError


# ------------------------------------------------------------------ no sandboxes


def test_ids_name_their_tenant() -> None:
    assert tenants.owner("alice.0123") == "alice"
    assert tenants.owner("sb-alice.0123") == "alice"
    assert tenants.owner("sb-0123abcd") is None and tenants.owner("0123abcd") is None
    assert tenants.owner("sb-Alice.x") is None  # not a tenant name
    k = keyspace.Keys("p")
    assert k.stream_tenant(k.tenant_requests("bob")) == "bob"
    assert k.stream_tenant(k.tenant_worker_cmds("w-1", "bob")) == "bob"
    assert k.stream_tenant(k.requests) is None and k.stream_tenant(k.worker_cmds("w-1")) is None
    assert tenants.tenant_of_user("p", "p.tenant.bob") == "bob"
    assert tenants.tenant_of_user("p", "p.scheduler") is None and tenants.tenant_of_user("p", None) is None
    q = tenants.Quota(sandboxes=3, cpu=1.5, memory_mb=700, gpus=1, creates_per_s=0.5)
    assert tenants.Quota.from_hash(q.to_hash()) == q


async def test_quota_take_is_atomic_idempotent_and_rate_limited(redis_url: str, prefix: str) -> None:
    keys = keyspace.Keys(prefix)
    async with Client(redis_url, prefix=prefix) as admin:
        r = admin.redis
        await r.hset(keys.tenant_quota("t1"), mapping=tenants.Quota(sandboxes=2, cpu=2.0).to_hash())
        take = tenants.take
        assert await take(r, keys, "t1", "sb-t1.a", millicpu=1000, memory_mb=10, gpus=0) == "ok"
        assert await take(r, keys, "t1", "sb-t1.a", millicpu=1000, memory_mb=10, gpus=0) == "ok"  # again: no-op
        assert await take(r, keys, "t1", "sb-t1.b", millicpu=1500, memory_mb=10, gpus=0) == "cpu"
        assert await take(r, keys, "t1", "sb-t1.b", millicpu=1000, memory_mb=10, gpus=0) == "ok"
        assert await take(r, keys, "t1", "sb-t1.c", millicpu=0, memory_mb=0, gpus=0) == "sandboxes"
        assert await tenants.give(r, keys, "t1", "sb-t1.a") and not await tenants.give(r, keys, "t1", "sb-t1.a")
        assert await take(r, keys, "t1", "sb-t1.c", millicpu=0, memory_mb=0, gpus=0) == "ok"
        usage = {k.decode(): int(v) for k, v in (await r.hgetall(keys.tenant_usage("t1"))).items()}
        assert usage == {"n": 2, "cpu": 1000, "mem": 10, "gpu": 0}
        # One create a second, no burst beyond one second's worth.
        await r.hset(keys.tenant_quota("t2"), mapping=tenants.Quota(creates_per_s=1.0).to_hash())
        got = [await take(r, keys, "t2", f"sb-t2.{i}", millicpu=0, memory_mb=0, gpus=0) for i in range(3)]
        assert got == ["ok", "creates_per_s", "creates_per_s"]


# ------------------------------------------------------------------ with a node


@dataclass
class Tenanted:
    stack: Stack
    admin: Client
    a: Client
    b: Client
    creds_a: tenants.Credentials
    creds_b: tenants.Credentials


@asynccontextmanager
async def tenanted_stack(redis_url: str, prefix: str) -> AsyncIterator[Tenanted]:
    """A node whose scheduler and worker run as their own Redis users, and two tenants
    (``b`` limited to one sandbox)."""
    keys = keyspace.Keys(prefix)
    wid = f"w-{prefix}"
    async with Client(redis_url, prefix=prefix) as admin:
        s_user, s_pw = await tenants.provision_daemon_user(admin.redis, keys, role="scheduler")
        w_user, w_pw = await tenants.provision_daemon_user(admin.redis, keys, role="worker", worker_id=wid)
        try:
            async with running_stack(
                redis_url, prefix,
                scheduler_overrides={"redis_url": tenants.with_credentials(redis_url, s_user, s_pw)},
                worker_overrides={"redis_url": tenants.with_credentials(redis_url, w_user, w_pw)},
            ) as stack:
                try:
                    creds_a = await tenants.create_tenant(admin.redis, keys, "alice", url=redis_url)
                    creds_b = await tenants.create_tenant(
                        admin.redis, keys, "bob", url=redis_url, quota=tenants.Quota(sandboxes=1)
                    )
                    async with Client(creds_a.url, prefix=prefix) as a, Client(creds_b.url, prefix=prefix) as b:
                        assert (a.tenant, b.tenant) == ("alice", "bob")
                        yield Tenanted(stack=stack, admin=admin, a=a, b=b, creds_a=creds_a, creds_b=creds_b)
                finally:
                    # While the node still runs: a failed test leaves no sandbox behind.
                    with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                        for name in await tenants.tenant_names(admin.redis, keys):
                            await remove(admin, name)
        finally:
            for user in (s_user, w_user):
                await tenants.delete_user(admin.redis, user)


async def test_tenant_b_is_refused_on_tenant_a_and_the_node_keeps_serving(redis_url: str, prefix: str) -> None:
    async with tenanted_stack(redis_url, prefix) as t:
        keys = t.stack.client.keys
        wid = t.stack.worker.id
        sa = await Sandbox.create(BUSYBOX_IMAGE, cpu=0.5, memory_mb=128, client=t.a)
        assert sa.id.startswith("sb-alice.")
        assert (await sa.exec("echo", "mine")).stdout == "mine\n"

        # B, holding A's sandbox id and worker: exec, read, write, terminate, reattach.
        stolen = Sandbox(sa.id, sa.worker_id, client=t.b)
        with pytest.raises(PermissionDenied):
            await stolen.exec("echo", "pwned")
        with pytest.raises(PermissionDenied):
            await stolen.read_file("/etc/hostname")
        with pytest.raises(PermissionDenied):
            await stolen.write_file("/tmp/x", b"x")
        with pytest.raises(PermissionDenied):
            await stolen.terminate()
        with pytest.raises(PermissionDenied):
            await Sandbox.from_id(sa.id, client=t.b)
        assert [s.id for s in await Sandbox.list(client=t.b)] == []
        assert [s.id for s in await Sandbox.list(client=t.a)] == [sa.id]

        # B's own connection, straight at Redis: A's record, replies, output, streams.
        rid = t.a.new_request_id()
        for attempt in (
            t.b.redis.hgetall(keys.sandbox(sa.id)),
            t.b.redis.blpop([keys.reply(rid)], timeout=0.01),
            t.b.redis.xread({keys.output(rid): "0"}),
            t.b.redis.xadd(keys.tenant_worker_cmds(wid, "alice"), {"m": b"x"}),
            t.b.redis.xadd(keys.worker_cmds(wid), {"m": b"x"}),
            t.b.redis.xadd(keys.requests, {"m": b"x"}),
            t.b.redis.keys("*"),
            t.b.redis.scan(0),
            # Nor which sandboxes A (or anyone) has: the whole index, A's own index.
            t.b.redis.zrange(keys.sandboxes, 0, -1),
            t.b.redis.zrange(keys.tenant_sandboxes("alice"), 0, -1),
        ):
            with pytest.raises(NOPERM):
                await attempt

        # B's own stream, carrying a request id of A's: dropped unanswered (its reply
        # would land in A's key), then a request of B's own is answered as usual.
        forged = Envelope(
            id=rid, reply_to=keys.reply(rid), deadline=time.time() + 30,
            body=Exec(sandbox_id=sa.id, exec=ExecSpec(argv=["echo", "forged"])),
        )
        await t.b.redis.xadd(keys.tenant_worker_cmds(wid, "bob"), {"m": protocol.encode(forged)})
        with pytest.raises(PermissionDenied):
            await stolen.exec("true")
        assert await t.admin.redis.exists(keys.reply(rid)) == 0

        # Operators' state: templates, pools, workers, quotas.
        with pytest.raises(NOPERM):
            await t.b.redis.hset(keys.template("base"), "snapshot", "snap-evil")
        with pytest.raises(NOPERM):
            await templates.delete_template("base", client=t.b)
        with pytest.raises(PermissionDenied):
            await templates.create_template("evil", image=BUSYBOX_IMAGE, client=t.b, request_timeout=20)
        with pytest.raises(NOPERM):
            await t.b.redis.hset(keys.pool_conf("base:1c:512m"), "size", "100")
        with pytest.raises(NOPERM):
            await t.b.redis.hset(keys.tenant_quota("bob"), "sandboxes", "0")
        # A fake worker: no heartbeat, no capacity, no Lua to register with.
        with pytest.raises(NOPERM):
            await t.b.redis.zadd(keys.workers, {"w-fake": int(time.time() * 1000)})
        with pytest.raises(NOPERM):
            await t.b.redis.hset(keys.worker_cap("w-fake"), mapping={"cpu": 64000, "mem": 1 << 20, "n": 0})
        with pytest.raises(NOPERM):
            await lua.REGISTER.run(t.b.redis, [keys.worker_cap("w-fake"), keys.worker_sandboxes("w-fake")], [64000, 1 << 20])
        with pytest.raises(NOPERM):
            await t.b.redis.xreadgroup(keyspace.WORKER_GROUP, "thief", {keys.worker_cmds(wid): ">"})
        assert await t.admin.redis.zscore(keys.workers, "w-fake") is None

        # The worker's own user: not another worker's stream, not a tenant's quota.
        wurl = t.stack.worker.settings.redis_url
        async with Client(wurl, prefix=t.stack.prefix) as as_worker:
            with pytest.raises(NOPERM):
                await as_worker.redis.xread({keys.worker_cmds("w-other"): "0"})
            with pytest.raises(NOPERM):
                await as_worker.redis.hset(keys.tenant_quota("bob"), "sandboxes", "0")
            with pytest.raises(NOPERM):  # nor pose as a tenant to the scheduler
                await as_worker.redis.xadd(keys.tenant_requests("bob"), {"m": b"x"})

        # A is untouched and the node serves everyone.
        assert (await sa.exec("echo", "still", "mine")).stdout == "still mine\n"
        assert (await t.a.record(sa.id)).state == "running"
        async with await Sandbox.create(BUSYBOX_IMAGE, cpu=0.5, memory_mb=128, client=t.stack.client) as op:
            assert (await op.exec("echo", "operator")).stdout == "operator\n"
        assert await t.a.redis.zrange(keys.tenant_sandboxes("alice"), 0, -1) == [sa.id.encode()]
        await sa.terminate()
        with pytest.raises(SandboxNotFound):
            await Sandbox.from_id(sa.id, client=t.a)
        assert await t.a.redis.zrange(keys.tenant_sandboxes("alice"), 0, -1) == []
        assert await Sandbox.list(client=t.a) == []


async def test_quota_exceeded_and_given_back(redis_url: str, prefix: str) -> None:
    async with tenanted_stack(redis_url, prefix) as t:
        keys = t.stack.client.keys
        first = await Sandbox.create(BUSYBOX_IMAGE, cpu=0.5, memory_mb=128, client=t.b)
        with pytest.raises(QuotaExceeded) as exc:
            await Sandbox.create(BUSYBOX_IMAGE, cpu=0.5, memory_mb=128, client=t.b, request_timeout=20)
        assert exc.value.detail == {"tenant": "bob", "limit": "sandboxes"}
        # Other tenants are not held to bob's quota.
        other = await Sandbox.create(BUSYBOX_IMAGE, cpu=0.5, memory_mb=128, client=t.a)
        assert (await other.exec("echo", "ok")).stdout == "ok\n"
        # Ending the first gives its share back at once.
        await first.terminate()
        second = await Sandbox.create(BUSYBOX_IMAGE, cpu=0.5, memory_mb=128, client=t.b)
        assert (await second.exec("echo", "again")).stdout == "again\n"
        await second.terminate()
        # Memory and rate limits refuse before anything is placed.
        await tenants.set_quota(t.admin.redis, keys, "bob", sandboxes=0, memory_mb=100)
        with pytest.raises(QuotaExceeded) as exc:
            await Sandbox.create(BUSYBOX_IMAGE, cpu=0.5, memory_mb=128, client=t.b, request_timeout=20)
        assert exc.value.detail["limit"] == "memory_mb"
        await tenants.set_quota(t.admin.redis, keys, "bob", memory_mb=0, creates_per_s=0.01)
        third = await Sandbox.create(BUSYBOX_IMAGE, cpu=0.5, memory_mb=128, client=t.b)
        with pytest.raises(QuotaExceeded) as exc:
            await Sandbox.create(BUSYBOX_IMAGE, cpu=0.5, memory_mb=128, client=t.b, request_timeout=20)
        assert exc.value.detail["limit"] == "creates_per_s"
        info = await tenants.get_tenant(t.admin.redis, keys, "bob")
        assert info.usage.sandboxes == 1 and info.usage.memory_mb == 128
        # Removing bob ends its sandbox and closes its connections.
        assert await remove(t.admin, "bob") == 1
        with anyio.fail_after(10):
            while (await t.admin.record(third.id)).state != "terminated":
                await anyio.sleep(0.05)
        # (A cluster client says so as RedisClusterException: no node takes the user.)
        with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ConnectionError, NOPERM,
                            redis.exceptions.RedisClusterException)):
            await Client(t.creds_b.url, prefix=t.stack.prefix).redis.ping()
        assert (await other.exec("echo", "served")).stdout == "served\n"
        await other.terminate()


async def test_open_redis_without_tenants_is_the_operator(redis_url: str, prefix: str) -> None:
    async with Client(redis_url, prefix=prefix) as c:
        assert c.tenant is None and "." not in c.new_request_id()
        assert await c.redis.scard(c.keys.tenants) == 0


def test_up_sets_an_admin_password_and_tenants_use_the_cli(tmp_path: Path) -> None:
    """`hotbed up -d` on a fresh machine: Redis refuses the unauthenticated, the CLI finds
    the admin URL in the client config, and a tenant made with `hotbed tenant create`
    runs sandboxes with only its own URL."""
    assert docker_available(), "run `make test`: it starts dockerd with runsc"
    port = _free_port()
    prefix = f"t{os.urandom(4).hex()}"
    conf = tmp_path / "config"
    conf.write_text(f'redis_url = "redis://127.0.0.1:{port}/0"\nprefix = "{prefix}"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("HOTBED_REDIS_URL", "HOTBED_PREFIX")}
    env.update(HOTBED_HOME=str(tmp_path / "home"), HOTBED_CONFIG=str(conf),
               HOTBED_WORKER_ID=f"w-{prefix}", HOTBED_DRAIN_ON_STOP="true")

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                              env={**env, **extra}, timeout=120)

    try:
        up = cli("up", "--detach")
        assert up.returncode == 0, up.stderr
        assert "admin password" in up.stderr and "redis://" not in up.stderr.split("admin password")[1]
        assert conf.stat().st_mode & 0o777 == 0o600 and "redis://default:" in conf.read_text()
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port).ping()
        made = cli("tenant", "create", "carol", "--sandboxes", "2", "--json")
        assert made.returncode == 0, made.stderr
        creds = json.loads(made.stdout)
        assert creds["user"] == f"{prefix}.tenant.carol" and creds["password"] in creds["url"]
        listed = cli("tenant", "list")
        assert "carol" in listed.stdout and creds["password"] not in listed.stdout
        # The tenant's own URL wins over the config file's admin URL.
        run = cli("run", BUSYBOX_IMAGE, "--", "echo", "as carol", HOTBED_REDIS_URL=creds["url"])
        assert (run.returncode, run.stdout) == (0, "as carol\n"), run.stderr
        refused = cli("template", "delete", "anything", HOTBED_REDIS_URL=creds["url"])
        assert refused.returncode == 125 and "permission" in refused.stderr.lower()
        assert cli("tenant", "rm", "carol").returncode == 0
        assert cli("tenant", "list", "-q").stdout == ""
        log = (tmp_path / "home" / "hotbed.log").read_text()
        assert "Traceback" not in log and creds["password"] not in log
    finally:
        cli("down")
        subprocess.run(["redis-cli", "-p", str(port), "--user", "default", "--pass",
                        conf.read_text().split(":")[2].split("@")[0], "shutdown", "nosave"],
                       capture_output=True, timeout=10)
    assert leftover_containers(prefix) == []


async def test_tenant_claims_only_its_own_warm_pool_within_its_quota(redis_url: str, prefix: str) -> None:
    async with tenanted_stack(redis_url, prefix) as t:
        c = t.admin
        keys = c.keys
        name = f"tpool{os.getpid() % 1000}"
        await templates.create_template(name, image=BUSYBOX_IMAGE, memory_mb=128, client=c)
        try:
            pool = await templates.set_pool(name, 1, cpu=0.5, memory_mb=128, tenant="bob", client=c)
            assert pool.endswith(":t-bob")

            async def ready() -> list[str]:
                return [i.decode().split()[0] for i in await c.redis.lrange(keys.pool_ready(pool), 0, -1)]

            with anyio.fail_after(60):
                while not await ready():
                    await anyio.sleep(0.05)
            (warm_id,) = await ready()
            # Made for bob: its id is bob's, and bob's quota is not taken while it waits.
            assert tenants.owner(warm_id) == "bob"
            assert (await tenants.get_tenant(c.redis, keys, "bob")).usage.sandboxes == 0

            # Alice asks for the same template and shape: never bob's pool.
            sa = await Sandbox.create(template=name, cpu=0.5, memory_mb=128, client=t.a)
            assert sa.path != "warm" and sa.id.startswith("sb-alice.")
            assert await ready() == [warm_id]
            await sa.terminate()

            # Bob's create claims it, its quota taken at the claim; bob runs it as its own.
            sb = await Sandbox.create(template=name, cpu=0.5, memory_mb=128, env={"K": "v"}, client=t.b)
            assert sb.path == "warm" and sb.id == warm_id
            assert (await sb.run("echo $K")).stdout == "v\n"
            assert (await tenants.get_tenant(c.redis, keys, "bob")).usage.sandboxes == 1
            assert [s.id for s in await Sandbox.list(client=t.b)] == [sb.id]
            # Refilled; at its quota (one sandbox), bob's next create takes nothing from it.
            with anyio.fail_after(60):
                while not await ready():
                    await anyio.sleep(0.05)
            refill = await ready()
            with pytest.raises(QuotaExceeded):
                await Sandbox.create(template=name, cpu=0.5, memory_mb=128, client=t.b, request_timeout=20)
            assert await ready() == refill
            assert (await c.record(refill[0])).state == "pooled"
            await sb.terminate()
        finally:
            with anyio.CancelScope(shield=True):
                await templates.set_pool(name, 0, cpu=0.5, memory_mb=128, tenant="bob", client=c)
                with anyio.move_on_after(30):
                    while any(s.pool for s in t.stack.worker.sandboxes.values()):
                        await anyio.sleep(0.05)
                await templates.delete_template(name, client=c)


async def test_sync_gives_a_new_cluster_node_the_users(redis_cluster: Any) -> None:
    """A node that lacks the users (added later, or restarted without an ACL file)
    gets them, password hashes included, from the others."""
    from hotbed.connection import connect

    prefix = f"hb{os.getpid()}s"
    keys = keyspace.Keys(prefix)
    admin = connect(redis_cluster.url)
    try:
        creds = await tenants.create_tenant(admin, keys, "carol", url=redis_cluster.url)
        port = redis_cluster.ports[0]
        node = redis.Redis(port=port)
        try:
            node.execute_command("ACL", "DELUSER", creds.user)
            assert creds.user.encode() not in node.execute_command("ACL", "USERS")
            assert await tenants.copy_users(admin, keys) == 1
            assert await tenants.copy_users(admin, keys) == 0
            # Its password works on that node and its rules came along.
            as_carol = redis.Redis(port=port, username=creds.user, password=creds.password)
            assert as_carol.ping()
            with pytest.raises(NOPERM):
                as_carol.get(f"{prefix}:tpl-nope")
            as_carol.close()
        finally:
            node.close()
            await tenants.remove_tenant(admin, keys, "carol")
    finally:
        await admin.aclose()
