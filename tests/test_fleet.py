"""Several nodes on one machine (cli.localfleet: each its own dockerd + runsc, snapshot
directory and worker process) on a real local Redis Cluster: a template built on one
node restores on the others, its snapshot copied once per node and checked against the
digest recorded at build; a node killed outright (worker, dockerd and its sandboxes)
loses its sandboxes and nothing else, and its pool refills on the others.

The copy itself (digest, refusal of tampered content, the token) is tested first,
without Docker.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import anyio
import msgspec
import pytest

from cli import localcluster, localfleet
from hotbed import protocol, templates
from hotbed.client import Client
from hotbed.connection import connect
from hotbed.errors import TemplateNotFound
from hotbed.keys import Keys
from hotbed.protocol import WorkerInfo
from hotbed.sandbox import Sandbox
from scheduler.config import SchedulerSettings
from scheduler.service import Scheduler
from tests.conftest import BUSYBOX_IMAGE, docker_available
from tests.test_templates import KEEPER, ask, wait_for
from workers.snapshot_peers import SnapshotPeers, manifest

pytestmark = pytest.mark.anyio


# ------------------------------------------------------------- the copy alone


def _fake_snapshot(root: Path) -> str:
    snap = f"snap-{secrets.token_hex(8)}"
    (root / snap / "checkpoint").mkdir(parents=True)
    (root / snap / "checkpoint" / "pages.img").write_bytes(secrets.token_bytes(3 << 20))
    (root / snap / "container.json").write_text('{"Image": "x"}')
    return snap


async def test_snapshot_copy_is_checked(redis_url: str, prefix: str, tmp_path: Path) -> None:
    redis = connect(redis_url)
    keys = Keys(prefix)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    snap = _fake_snapshot(a_dir)
    digest = manifest(a_dir / snap).digest
    a = SnapshotPeers(a_dir, keys=keys, worker_id="A", listen="127.0.0.1:0")
    b = SnapshotPeers(b_dir, keys=keys, worker_id="B")
    try:
        async with a.serving(redis), b.serving(redis):
            info = WorkerInfo(id="A", host="h", runtime="sim", cpu_millis=1000, memory_mb=1, snapshot_url=a.url)
            await redis.set(keys.worker_info("A"), protocol.encode(info))
            # Both found the fleet's token in Redis (the first one made it).
            assert await a.token() == await b.token()
            assert await b.fetch(snap, b_dir / snap, holders=["A", "B"], digest=digest) == "A"
            assert manifest(b_dir / snap).digest == digest
            # A record naming other content: the peer's manifest is refused.
            assert await b.fetch(snap, b_dir / "x1", holders=["A"], digest="0" * 64) is None
            # Content changed on the holder after its manifest was made: refused, and
            # nothing of the copy is left.
            pages = a_dir / snap / "checkpoint" / "pages.img"
            data = bytearray(pages.read_bytes())
            data[1000] ^= 0xFF
            pages.write_bytes(bytes(data))
            assert await b.fetch(snap, b_dir / "x2", holders=["A"], digest=digest) is None
            assert not (b_dir / "x2").exists()
            # A dead holder (no info record) is skipped; nobody left: None.
            assert await b.fetch(snap, b_dir / "x3", holders=["gone"], digest=digest) is None
            # Without the token the endpoint answers nothing.
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{a.url}/snapshots/{snap}/manifest") as resp:
                    assert resp.status == 401
                bad = {"Authorization": "Bearer nope"}
                async with s.get(f"{a.url}/snapshots/{snap}/files/container.json", headers=bad) as resp:
                    assert resp.status == 401
                good = {"Authorization": f"Bearer {await a.token()}"}
                async with s.get(f"{a.url}/snapshots/{snap}/files/../../etc/passwd", headers=good) as resp:
                    assert resp.status in (400, 404)
    finally:
        await redis.aclose()


# ------------------------------------------------------------------ the fleet


@pytest.fixture(scope="module")
def fleet() -> Iterator[localfleet.Fleet]:
    if not docker_available():
        pytest.fail("dockerd with runsc is not running: run `make test` (it sets them up)")
    try:
        f = localfleet.start(3, images=[BUSYBOX_IMAGE])
    except localfleet.FleetError as exc:
        pytest.fail(str(exc))
    try:
        yield f
    finally:
        f.stop()


class Nodes(msgspec.Struct, kw_only=True):
    fleet: localfleet.Fleet
    client: Client
    scheduler: Scheduler
    url: str
    prefix: str
    # Nodes copy a new template's snapshot only when a test asks for spare copies: the
    # other tests count the copies that restores make on demand.
    snapshot_copies: int = 1

    def worker_id(self, node: localfleet.Node) -> str:
        return f"{self.prefix}-{node.name}"

    async def start_worker(self, node: localfleet.Node) -> None:
        self.fleet.start_worker(
            node, self.url, self.prefix, HOTBED_TAGS=json.dumps({"node": node.name}),
            HOTBED_HEARTBEAT_S="0.2", HOTBED_RECONCILE_S="0.3", HOTBED_DRAIN_ON_STOP="true",
            HOTBED_CPU="8", HOTBED_MEMORY_MB="4096", HOTBED_SNAPSHOT_COPIES=str(self.snapshot_copies),
        )
        wid = self.worker_id(node)
        registry = self.scheduler.registry
        assert registry is not None
        # Placement prefers nodes advertising the image: wait for this one's list too.
        with anyio.fail_after(30):
            while wid not in registry.workers or registry.workers[wid].images is None:
                if not node.worker_pid:
                    raise AssertionError("worker stopped")
                await registry.refresh()
                await anyio.sleep(0.05)

    def copies(self, node: localfleet.Node) -> int:
        return self.fleet.worker_log(node).count("copied from")

    async def template_built_on(self, builder: localfleet.Node, seed: str, *, then: Sequence[localfleet.Node] = ()) -> str:
        """A keeper template built while only ``builder`` runs a worker (so it is built
        there); then workers on ``then``. Returns the template's name."""
        await self.start_worker(builder)
        name = (await keeper_template(self.client, seed)).name
        for node in then:
            await self.start_worker(node)
        return name


@asynccontextmanager
async def nodes_on_cluster(
    fleet: localfleet.Fleet, cluster: localcluster.LocalCluster
) -> AsyncIterator[Nodes]:
    prefix = f"t{secrets.token_hex(4)}"
    settings = msgspec.convert(
        {"redis_url": cluster.url, "prefix": prefix, "registry_refresh_s": 0.1, "heartbeat_ttl_s": 3.0,
         "shutdown_grace_s": 2.0, "pool_interval_s": 0.05, "pool_refill_per_s": 50.0,
         "image_refresh_s": 0.1},
        SchedulerSettings,
    )
    scheduler = Scheduler(settings)
    client = Client(cluster.url, prefix=prefix)
    async with anyio.create_task_group() as tg:
        await tg.start(scheduler.run)
        nodes = Nodes(fleet=fleet, client=client, scheduler=scheduler, url=cluster.url, prefix=prefix)
        try:
            yield nodes
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()
                logs = {n.name: fleet.worker_log(n) for n in fleet.nodes}
                for n in fleet.nodes:
                    await anyio.to_thread.run_sync(lambda n=n: fleet.stop_worker(n))
                scheduler.stopping.set()
    for node in fleet.nodes:
        if node.dockerd_pid:
            left = node.docker("ps", "-aq", "--filter", f"label=dev.hotbed.prefix={prefix}").stdout.split()
            assert not left, f"node {node.name} kept containers: {left}"
    for name, text in logs.items():
        assert "Traceback" not in text, f"worker of {name} logged a traceback:\n{text[-3000:]}"


async def test_template_built_on_one_node_restores_on_the_others(
    fleet: localfleet.Fleet, redis_cluster: localcluster.LocalCluster
) -> None:
    n1, n2, n3 = fleet.nodes
    async with nodes_on_cluster(fleet, redis_cluster) as nodes:
        c = nodes.client
        seed = secrets.token_hex(8)
        name = await nodes.template_built_on(n1, seed, then=[n2, n3])
        rec = await templates.get_template(name, client=c)
        assert rec.holders == [nodes.worker_id(n1)] and len(rec.sha256) == 64
        # Node 2: one restore; node 3: three at once, one copy between them.
        on2 = await Sandbox.create(template=name, cpu=0.5, memory_mb=128, worker_tags={"node": n2.name}, client=c)
        on3: list[Sandbox] = []

        async def create3() -> None:
            on3.append(await Sandbox.create(template=name, cpu=0.5, memory_mb=128, worker_tags={"node": n3.name}, client=c))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(create3)
        try:
            assert on2.worker_id == nodes.worker_id(n2)
            assert {sb.worker_id for sb in on3} == {nodes.worker_id(n3)}
            # The keeper's value lived only in memory on node 1: restored, not re-run.
            for sb in [on2, *on3]:
                assert sb.path == "restore"
                assert await ask(sb) == seed
            assert nodes.copies(n2) == 1 and nodes.copies(n3) == 1
            assert (Path(n2.snapshot_dir) / rec.snapshot).is_dir()
            assert (Path(n3.snapshot_dir) / rec.snapshot).is_dir()
            after = await templates.get_template(name, client=c)
            assert sorted(after.holders) == sorted(nodes.worker_id(n) for n in (n1, n2, n3))
            assert nodes.copies(n1) == 0
        finally:
            for sb in [on2, *on3]:
                await sb.terminate()


async def keeper_template(client: Client, seed: str) -> protocol.TemplateReady:
    """test_templates' keeper: its value lives only in a process's memory."""
    return await templates.create_template(
        f"keep-{secrets.token_hex(3)}", image=BUSYBOX_IMAGE, files={"/tmp/seed": seed}, start=[KEEPER],
        ready="test ! -e /tmp/seed", client=client, memory_mb=128,
    )


async def test_a_killed_node_loses_only_its_own(
    fleet: localfleet.Fleet, redis_cluster: localcluster.LocalCluster
) -> None:
    n1, n2, n3 = fleet.nodes
    async with nodes_on_cluster(fleet, redis_cluster) as nodes:
        c = nodes.client
        seed = secrets.token_hex(8)
        name = await nodes.template_built_on(n1, seed, then=[n2, n3])
        # A pool spreads over the nodes (each copies the snapshot once).
        pool = await templates.set_pool(name, 3, memory_mb=128, client=c)

        async def ready_workers() -> list[str]:
            return [i.decode().split()[1] for i in await c.redis.lrange(c.keys.pool_ready(pool), 0, -1)]

        async def spread() -> bool:
            return sorted(await ready_workers()) == sorted(nodes.worker_id(n) for n in (n1, n2, n3))

        try:
            await wait_for(spread, "one pooled sandbox per node", timeout=60)
        except TimeoutError:
            logs = "\n".join(f"--- {n.name}\n{fleet.worker_log(n)[-1500:]}" for n in fleet.nodes)
            raise AssertionError(f"pool not spread: {await ready_workers()}\n{logs}") from None
        # A running sandbox on the builder node and one on node 3.
        doomed = await Sandbox.create(template=name, cpu=0.5, memory_mb=128, worker_tags={"node": n1.name}, client=c)
        keeps = await Sandbox.create(template=name, cpu=0.5, memory_mb=128, worker_tags={"node": n3.name}, client=c)
        try:
            await anyio.to_thread.run_sync(lambda: fleet.kill(n1))

            async def lost() -> bool:
                return (await c.redis.hget(c.keys.sandbox(doomed.id), "state")) == b"lost"

            await wait_for(lost, "the killed node's sandbox reported lost", timeout=30)
            # The other node's sandbox never noticed.
            assert (await keeps.run("echo alive")).stdout == "alive\n"
            assert await ask(keeps) == seed

            # The pool refills on the surviving nodes.
            async def refilled() -> bool:
                got = await ready_workers()
                return len(got) == 3 and nodes.worker_id(n1) not in got

            await wait_for(refilled, "the pool refilled on the other nodes", timeout=60)
            # The template outlives the node that built it: its copies serve restores.
            again = await Sandbox.create(template=name, cpu=0.5, memory_mb=128, client=c)
            assert again.worker_id in {nodes.worker_id(n2), nodes.worker_id(n3)}
            assert await ask(again) == seed
            await again.terminate()
        finally:
            await templates.set_pool(name, 0, memory_mb=128, client=c)
            await keeps.terminate()
            await fleet_restart(fleet, n1)


async def test_a_spare_copy_outlives_the_builder(
    fleet: localfleet.Fleet, redis_cluster: localcluster.LocalCluster
) -> None:
    """Built while two nodes run: the other node copies the snapshot in the background
    (no restore asked for it), so the builder dying right after loses no template, and
    the other node restores from its own copy."""
    n1, n2, _n3 = fleet.nodes
    async with nodes_on_cluster(fleet, redis_cluster) as nodes:
        c = nodes.client
        # The nodes' logs run on from the module's earlier tests: only what follows counts.
        log_from = {n.name: len(fleet.worker_log(n)) for n in (n1, n2)}
        nodes.snapshot_copies = 2
        await nodes.start_worker(n1)
        await nodes.start_worker(n2)
        seed = secrets.token_hex(8)
        ready = await keeper_template(c, seed)
        name = ready.name
        builder, spare = (n1, n2) if ready.worker_id == nodes.worker_id(n1) else (n2, n1)
        assert ready.worker_id == nodes.worker_id(builder)

        def copies() -> int:
            return fleet.worker_log(spare)[log_from[spare.name]:].count("copied from")

        both = sorted(nodes.worker_id(n) for n in (n1, n2))

        async def copied() -> bool:
            # The copy is listed among the holders a moment before the node logs it.
            return (sorted((await templates.get_template(name, client=c)).holders) == both
                    and "spare copy" in fleet.worker_log(spare)[log_from[spare.name]:])

        try:
            await wait_for(copied, "the other node holding a spare copy", timeout=30)
            rec = await templates.get_template(name, client=c)
            assert (Path(spare.snapshot_dir) / rec.snapshot).is_dir()
            assert copies() == 1
            await anyio.to_thread.run_sync(lambda: fleet.kill(builder))
            sb = await Sandbox.create(template=name, cpu=0.5, memory_mb=128,
                                      worker_tags={"node": spare.name}, client=c)
            try:
                assert sb.path == "restore" and await ask(sb) == seed
                # Restored from the copy already there: nothing fetched again.
                assert copies() == 1
            finally:
                await sb.terminate()
        finally:
            await fleet_restart(fleet, builder)


async def test_primary_failover_under_the_fleet(fleet: localfleet.Fleet, tmp_path: Path) -> None:
    """Nodes 2 and 3 serve creates and execs on a cluster of the test's own; mid-stream
    the primary of the request stream's shard hands over to its replica: every request
    gets its right answer, and no sandbox is made twice or left behind."""
    from tests.test_cluster import _failover, _node_of

    _n1, n2, n3 = fleet.nodes
    cluster = await anyio.to_thread.run_sync(lambda: localcluster.start(3, tmp_path / "cluster", replicas=1))
    try:
        async with nodes_on_cluster(fleet, cluster) as nodes:
            c = nodes.client
            await nodes.start_worker(n2)
            await nodes.start_worker(n3)
            primary, replica = await anyio.to_thread.run_sync(_node_of, cluster, c.keys.requests)
            long_lived = [await Sandbox.create(BUSYBOX_IMAGE, memory_mb=128, worker_tags={"node": n.name},
                                               client=c) for n in (n2, n3)]
            done: list[int] = []
            created: list[str] = []
            failed_over = anyio.Event()

            async def execs(lane: int) -> None:
                sb = long_lived[lane % 2]
                i = after = 0
                while after < 6:
                    after += failed_over.is_set()
                    res = await sb.exec("echo", f"{lane}-{i}", timeout=30)
                    assert res.stdout == f"{lane}-{i}\n"
                    done.append(lane)
                    i += 1

            async def creates(node: localfleet.Node) -> None:
                after = 0
                while after < 2:
                    after += failed_over.is_set()
                    sb = await Sandbox.create(BUSYBOX_IMAGE, memory_mb=128, worker_tags={"node": node.name},
                                              client=c)
                    created.append(sb.id)
                    await sb.terminate()

            try:
                with anyio.fail_after(120):
                    async with anyio.create_task_group() as tg:
                        for lane in range(4):
                            tg.start_soon(execs, lane)
                        tg.start_soon(creates, n2)
                        tg.start_soon(creates, n3)
                        while len(done) < 12:
                            await anyio.sleep(0.05)
                        await anyio.to_thread.run_sync(_failover, replica, primary)
                        failed_over.set()
            finally:
                for sb in long_lived:
                    await sb.terminate()
            assert (await anyio.to_thread.run_sync(_node_of, cluster, c.keys.requests))[0] == replica
            assert len(set(created)) == len(created) >= 4
            # Nothing made twice: no sandbox is recorded live once all asked for ended
            # (and nodes_on_cluster finds no container left on any node).
            assert await c.redis.zrange(c.keys.sandboxes, 0, -1) == []
    finally:
        await anyio.to_thread.run_sync(lambda: localcluster.stop(tmp_path / "cluster"))


async def fleet_restart(fleet: localfleet.Fleet, node: localfleet.Node) -> None:
    """Bring a killed node's engine back for the next test (its containers are gone)."""
    if not node.dockerd_pid:
        await anyio.to_thread.run_sync(lambda: fleet.restart_engine(node))


async def test_no_holder_alive_is_template_not_found(
    fleet: localfleet.Fleet, redis_cluster: localcluster.LocalCluster
) -> None:
    """A snapshot nobody live holds (and no store) fails the restore at once, typed."""
    n1, n2, _n3 = fleet.nodes
    async with nodes_on_cluster(fleet, redis_cluster) as nodes:
        c = nodes.client
        name = await nodes.template_built_on(n1, secrets.token_hex(4))
        await anyio.to_thread.run_sync(lambda: fleet.stop_worker(n1))
        await nodes.start_worker(n2)
        with pytest.raises(TemplateNotFound, match="on no live node"):
            await Sandbox.create(template=name, memory_mb=128, worker_tags={"node": n2.name}, client=c)


# --------------------------------------------------------- placement weighs the copy


@pytest.mark.parametrize("snapshot_mb", [1, 2000])
async def test_restore_waits_for_a_holder_about_as_long_as_a_copy(
    redis_url: str, prefix: str, tmp_path: Path, snapshot_mb: int
) -> None:
    """The holder is full; it frees up 1 s later. A small snapshot (0.2 s to copy) goes
    to the other node at once; a large one (10 s to copy at 200 MB/s) waits for the
    holder and restores there, with nothing copied."""
    from hotbed.protocol import CreateSandbox, Resources, SandboxCreated, SandboxSpec, TemplateSpec
    from hotbed.records import TemplateRecord, template_to_hash
    from tests.test_gpu_placement import fleet as sim_fleet
    from tests.test_gpu_placement import terminate

    store = tmp_path / "store"
    for where in (store, tmp_path / "holder"):
        (where / "snap-1").mkdir(parents=True)
        (where / "snap-1" / "state").write_bytes(b"x")
    nodes: dict[str, dict[str, object]] = {
        "other": {"cpu": 16, "snapshot_dir": str(tmp_path / "other"), "snapshot_store": str(store)},
        "holder": {"cpu": 2, "snapshot_dir": str(tmp_path / "holder"), "snapshot_store": str(store)},
    }
    async with sim_fleet(redis_url, prefix, nodes) as f:
        keys = Keys(prefix)
        rec = TemplateRecord(name="t", state="ready", spec=TemplateSpec(image="none"), snapshot="snap-1",
                             holders=["holder"], size_bytes=snapshot_mb << 20)
        await f.client.redis.hset(keys.template("t"), mapping=template_to_hash(rec))
        await f.client.redis.sadd(keys.templates, "t")
        spec = SandboxSpec(template="t", resources=Resources(cpu=2, memory_mb=256))
        first = await f.client.request(CreateSandbox(spec=spec), timeout=10)
        assert isinstance(first, SandboxCreated) and first.worker_id == "holder"

        async def free_holder() -> None:
            await anyio.sleep(1.0)
            await terminate(f.client, first)

        async with anyio.create_task_group() as tg:
            tg.start_soon(free_holder)
            t0 = anyio.current_time()
            second = await f.client.request(CreateSandbox(spec=spec), timeout=20)
            waited = anyio.current_time() - t0
        assert isinstance(second, SandboxCreated)
        if snapshot_mb == 1:
            assert second.worker_id == "other" and waited < 1.0
            assert (tmp_path / "other" / "snap-1").is_dir()
        else:
            assert second.worker_id == "holder" and waited >= 0.9
            assert not (tmp_path / "other" / "snap-1").exists()
        await terminate(f.client, second)
