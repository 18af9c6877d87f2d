"""hotbed on a real local Redis Cluster (3 primaries, 1 replica each): URL forms,
auto-pipelining and scripts per node, the spine through the cluster, and a primary
failover in the middle of a stream of requests.

``HOTBED_TEST_CLUSTER=1`` runs the rest of the suite on the cluster too (tests/conftest.py).
"""

from __future__ import annotations

import secrets
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import hotbed
from cli import localcluster
from daemon.config import check_common
from hotbed import batching
from hotbed.connection import RedisURL, connect
from tests.conftest import BUSYBOX_IMAGE, running_stack

pytestmark = pytest.mark.anyio


def test_url_forms() -> None:
    u = RedisURL("redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2,[::1]:7002/?socket_timeout=3")
    assert (u.cluster, u.sentinel, u.tls) == (True, False, False)
    assert u.hosts == [("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002)]
    assert (u.username, u.password, u.query) == ("u", "p@ss", {"socket_timeout": "3"})
    s = RedisURL("rediss+sentinel://s1:26379,s2:26379/mymaster/2")
    assert (s.sentinel, s.tls, s.path) == (True, True, "/mymaster/2")
    check_common("redis+cluster://127.0.0.1:7000,127.0.0.1:7001", "hotbed")
    check_common("redis+sentinel://127.0.0.1:26379/mymaster", "hotbed")
    for bad, why in [
        ("redis+cluster://", "seeds"),
        ("redis+cluster://h:7000/3", "database 0"),
        ("redis+sentinel://h:26379", "Sentinel service"),
        ("redis+cluster://h:notaport", "bad port"),
    ]:
        with pytest.raises(ValueError, match=why):
            check_common(bad, "hotbed")


def _node_of(cluster: localcluster.LocalCluster, key: str) -> tuple[int, int]:
    """(primary port, its replica's port) of the shard owning ``key`` now."""
    import redis
    from redis.crc import key_slot

    slot = key_slot(key.encode())
    # A node's view of its shard's replicas can lag the cluster's start on a loaded box:
    # ask again until it converges.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for port in cluster.ports:
            r = redis.Redis(port=port, socket_timeout=2)
            try:
                shards = r.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
            except redis.RedisError:
                continue
            finally:
                r.close()
            for start, end, primary, *replicas in shards:
                if start <= slot <= end and replicas:
                    return int(primary[1]), int(replicas[0][1])
        time.sleep(0.2)
    raise AssertionError(f"no shard with a replica owns {key}")


async def test_scripts_and_pipelines_run_per_node(redis_cluster: localcluster.LocalCluster) -> None:
    prefix = f"t{secrets.token_hex(4)}"
    redis = connect(redis_cluster.url)
    script = batching.Script(f"redis.call('SET', KEYS[2], ARGV[1]); return redis.call('INCRBY', KEYS[1], ARGV[1]) -- {prefix}")
    ap = batching.for_client(redis)
    try:
        # Keys whose tags land on every shard; each script call names two keys of one tag.
        tags = [f"{prefix}:{{{i}}}" for i in range(30)]
        got = await ap.execute(*(script.call([f"{t}:n", f"{t}:v"], [i]) for i, t in enumerate(tags)))
        assert got == list(range(30))
        # One lane per primary, and the script was loaded on each (NOSCRIPT per node).
        assert len(ap._lanes) == 3
        # Concurrent callers share round trips per node.
        before = ap.round_trips

        async def one(i: int) -> None:
            (n,) = await ap.execute(script.call([f"{tags[i % 30]}:n", f"{tags[i % 30]}:v"], [1]))
            assert n >= 1

        async with anyio.create_task_group() as tg:
            for i in range(600):
                tg.start_soon(one, i)
        assert ap.round_trips - before < 40, ap.round_trips - before
        # Nodes that lost their scripts (flushed, restarted) get them loaded again.
        await redis.script_flush()
        again = await ap.execute(*(script.call([f"{t}:n", f"{t}:v"], [0]) for t in tags))
        assert all(n >= 1 for n in again)
        # A task's commands spanning shards apply in order.
        res = await ap.execute(*(("SET", f"{t}:o", "x") for t in tags), *(("GET", f"{t}:o") for t in tags))
        assert res == [True] * 30 + [b"x"] * 30
        # Stages: each stage's commands go to their nodes at once, stage after stage;
        # replies come back in the order asked, from many tasks at once.
        rounds = ap.round_trips

        async def staged(i: int) -> None:
            t, u = tags[i % 30], tags[(i * 7 + 3) % 30]
            got = await ap.execute_stages(
                (("INCR", f"{t}:s{i}"), ("INCR", f"{u}:s{i}"), ("SET", f"{t}:v", "y")),
                (("GET", f"{t}:s{i}"), ("GET", f"{u}:s{i}")),
            )
            assert got[:2] == [1, 1 if t != u else 2] and got[3:] == [b"1" if t != u else b"2"] * 2

        async with anyio.create_task_group() as tg:
            for i in range(300):
                tg.start_soon(staged, i)
        # Shared round trips: far fewer than one per node per stage per task.
        assert ap.round_trips - rounds < 300, ap.round_trips - rounds
        await redis.delete(*(f"{tags[i % 30]}:s{i}" for i in range(300)),
                           *(f"{tags[(i * 7 + 3) % 30]}:s{i}" for i in range(300)))
    finally:
        await redis.delete(*(f"{t}:{s}" for t in tags for s in "nvo"))
        await redis.aclose()


async def test_a_warm_claim_is_one_script_on_the_pools_shard(redis_cluster: localcluster.LocalCluster) -> None:
    """Pooled sandboxes are named so that their records share their pool's slot; the
    claim script then takes an entry and flips its record on that one shard, skipping
    an entry whose record is no longer pooled."""
    from redis.crc import key_slot

    from hotbed import lua, records
    from hotbed.client import new_id
    from hotbed.keys import Keys, sandbox_id_for
    from hotbed.records import SandboxRecord
    from hotbed.tenants import new_request_id

    keys = Keys(prefix=f"t{secrets.token_hex(4)}")
    redis = connect(redis_cluster.url)
    pools = [f"tpl-{i}" for i in range(20)]
    dead, live = (sandbox_id_for(keys.pooled_request_id(pools[0], new_id)) for _ in range(2))
    try:
        for pool in pools:
            slot = key_slot(keys.pool_ready(pool).encode())
            for draw in (new_id, lambda: new_request_id("acme")):
                sid = sandbox_id_for(keys.pooled_request_id(pool, draw))
                assert key_slot(keys.sandbox(sid).encode()) == slot and sid.startswith("sb-")
        assert sandbox_id_for(keys.pooled_request_id(pools[0], lambda: new_request_id("acme"))).startswith("sb-acme.")
        # Dead first, then live: the script drops the dead entry and claims the live one.
        pool = pools[0]
        ready, claims = keys.pool_ready(pool), keys.pool_claims(pool)
        await redis.hset(keys.sandbox(dead), mapping=records.to_hash(SandboxRecord(id=dead, state="failed")))
        await redis.hset(keys.sandbox(live), mapping=records.to_hash(SandboxRecord(id=live, state="pooled")))
        await redis.rpush(ready, f"{dead} w1", f"{live} w1")
        claim = records.to_claimed(now=None, timeout=30.0, idle_timeout=0.0, tags={"k": "v"}, client_id="c")
        flip = [keys.sandbox_head, " ".join(records.CLAIM_CLOCK), *(x for kv in claim.items() for x in kv)]
        item, now_ms = await lua.POOL_CLAIM.run(redis, [ready, claims], [10_000, *flip])
        assert item == f"{live} w1".encode()
        rec = records.from_hash(await redis.hgetall(keys.sandbox(live)))
        assert rec is not None and (rec.state, rec.path, rec.tags, rec.timeout) == ("running", "warm", {"k": "v"}, 30.0)
        assert rec.created_at == rec.started_at == int(now_ms) / 1000
        assert await redis.zscore(claims, item) == int(now_ms) + 10_000
        assert await redis.llen(ready) == 0
        assert (await redis.hget(keys.sandbox(dead), "state")) == b"failed"
        assert await lua.POOL_CLAIM.run(redis, [ready, claims], [10_000, *flip]) is None
    finally:
        await redis.delete(keys.pool_ready(pools[0]), keys.pool_claims(pools[0]))
        await redis.delete(*(keys.sandbox(s) for s in (dead, live)))
        await redis.aclose()


async def test_spine_through_the_cluster(redis_cluster: localcluster.LocalCluster) -> None:
    prefix = f"t{secrets.token_hex(4)}"
    async with running_stack(redis_cluster.url, prefix) as stack:
        sb = await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=stack.client)
        res = await sb.exec("sh", "-c", "echo hi; exit 3")
        assert (res.exit_code, res.stdout) == (3, "hi\n")
        assert [r.id for r in await hotbed.Sandbox.list(client=stack.client)] == [sb.id]
        await sb.terminate()
        assert (await stack.client.record(sb.id)).state == "terminated"


@pytest.fixture
def own_cluster() -> Iterator[localcluster.LocalCluster]:
    """A cluster of this test's own: a failover changes who is primary."""
    root = Path(tempfile.mkdtemp(prefix="hotbed-failover-"))
    try:
        yield localcluster.start(3, root, replicas=1)
    finally:
        localcluster.stop(root)


def _failover(replica_port: int, primary_port: int) -> None:
    subprocess.run(["redis-cli", "-p", str(replica_port), "cluster", "failover"], check=True, capture_output=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        role = subprocess.run(["redis-cli", "-p", str(replica_port), "role"], capture_output=True, text=True).stdout
        if role.startswith("master"):
            return
        time.sleep(0.05)
    raise AssertionError(f"replica {replica_port} of {primary_port} did not take over")


async def test_primary_failover_mid_stream(own_cluster: localcluster.LocalCluster) -> None:
    """Fail over the primary holding the worker's command stream while creates and
    execs stream through: every request gets its right answer, none is lost, no
    sandbox is made twice."""
    prefix = f"t{secrets.token_hex(4)}"
    url = own_cluster.url
    async with running_stack(url, prefix) as stack:
        c = stack.client
        primary, replica = _node_of(own_cluster, c.keys.worker_cmds(stack.worker.id))
        sb = await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=c)
        done: list[int] = []
        created: list[str] = []
        waits: list[float] = []
        failed_over = anyio.Event()

        async def execs(lane: int) -> None:
            i = after = 0
            while after < 10:
                after += failed_over.is_set()
                t0 = anyio.current_time()
                res = await sb.exec("echo", f"{lane}-{i}", timeout=30)
                waits.append(anyio.current_time() - t0)
                assert res.stdout == f"{lane}-{i}\n"
                done.append(lane)
                i += 1

        async def creates() -> None:
            after = 0
            while after < 2:
                after += failed_over.is_set()
                s = await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=c)
                created.append(s.id)
                await s.terminate()

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for lane in range(4):
                    tg.start_soon(execs, lane)
                tg.start_soon(creates)
                while len(done) < 20:
                    await anyio.sleep(0.05)
                await anyio.to_thread.run_sync(_failover, replica, primary)
                failed_over.set()
        assert _node_of(own_cluster, c.keys.worker_cmds(stack.worker.id))[0] == replica
        assert len(set(created)) == len(created) >= 2
        await sb.terminate()
        # No duplicate sandbox: only the ones asked for were ever recorded live.
        live = await c.redis.zrange(c.keys.sandboxes, 0, -1)
        assert live == []
        print(f"failover: {len(done)} execs, longest wait {max(waits):.2f}s")  # noqa: T201


@pytest.fixture
def sentinel_url(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A primary and one Sentinel watching it as ``svc``: (URL, the primary's port)."""
    from cli.localcluster import _free_ports

    primary_port, sentinel_port = _free_ports(2)
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor svc 127.0.0.1 {primary_port} 1\n"
    )
    procs = [
        subprocess.Popen(["redis-server", "--port", str(primary_port), "--bind", "127.0.0.1",
                          "--save", "", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL),
        subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL),
    ]
    try:
        yield f"redis+sentinel://127.0.0.1:{sentinel_port}/svc", primary_port
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


async def test_sentinel_url_reaches_the_primary(sentinel_url: tuple[str, int]) -> None:
    """``redis+sentinel://`` (one primary, no cluster) keeps working: the client asks
    the Sentinel for the primary, and auto-pipelining and scripts run there, in order."""
    url, primary_port = sentinel_url
    redis = connect(url)
    try:
        script = batching.Script("return redis.call('INCRBY', KEYS[1], ARGV[1]) -- sentinel")
        with anyio.fail_after(20):
            while True:
                try:
                    got = await batching.for_client(redis).execute(script.call(["n"], [2]), ("GET", "n"))
                    break
                except Exception:  # noqa: BLE001 - the Sentinel still discovering its primary
                    await anyio.sleep(0.1)
        assert got == [2, b"2"]
        assert int((await redis.info("server"))["tcp_port"]) == primary_port
    finally:
        await redis.aclose()


def test_up_cluster_then_down(tmp_path: Path) -> None:
    """`hotbed up --cluster 3 -d` starts a local cluster and the daemons on it; the
    printed URL serves the CLI; `hotbed down` ends the daemons and every cluster node."""
    import os
    import sys

    prefix = f"t{secrets.token_hex(4)}"
    env = dict(os.environ, HOTBED_HOME=str(tmp_path), HOTBED_PREFIX=prefix, HOTBED_WORKER_ID=f"w-{prefix}")
    env.pop("HOTBED_REDIS_URL", None)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                              env=env, timeout=120)

    try:
        up = cli("up", "--cluster", "3", "--runtime", "sim", "--detach")
        assert up.returncode == 0, up.stderr
        url = up.stderr.split("export HOTBED_REDIS_URL=", 1)[1].split()[0]
        cluster = localcluster.load(tmp_path / "cluster")
        assert cluster is not None and cluster.url == url and localcluster.running(cluster)
        env["HOTBED_REDIS_URL"] = url
        status = cli("status")
        assert f"w-{prefix}" in status.stdout, status.stderr
        down = cli("down")
        assert down.returncode == 0 and "local Redis Cluster stopped" in down.stderr, down.stderr
        assert localcluster.load(tmp_path / "cluster") is None
        assert not any(Path(f"/proc/{pid}").exists() for pid in cluster.pids)
        assert "Traceback" not in (tmp_path / "hotbed.log").read_text()
    finally:
        cli("down")
