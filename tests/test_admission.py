"""Admission at the node: the start gate, overcommitted capacity, the memory watch, and
a burst beyond capacity answered with typed errors while the node keeps serving.

Unit tests drive :class:`workers.admission.StartGate` and the memory arithmetic
directly; the rest run a real Redis and a docker + runsc worker (``running_stack``,
which fails a test that leaks a container).
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

import hotbed
from daemon import lifecycle
from hotbed import lua
from hotbed.records import capacity_from_hash
from tests.conftest import BUSYBOX_IMAGE, running_stack, sync_redis
from workers.admission import MemoryReading, MemoryWatch, NodeMemory, StartGate

pytestmark = pytest.mark.anyio


# ------------------------------------------------------------------ unit: the gate


async def test_gate_runs_at_most_its_slots_in_arrival_order() -> None:
    gate = StartGate(2)
    gate.start_s = 0.01
    running = 0
    peak = 0
    order: list[int] = []

    async def start(i: int) -> None:
        nonlocal running, peak
        async with gate.admitted_start(deadline=lifecycle.wall() + 30):
            order.append(i)
            running += 1
            peak = max(peak, running)
            await anyio.sleep(0.02)
            running -= 1

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(start, i)
            await anyio.lowlevel.checkpoint()  # arrival order = i
    assert peak == 2
    assert order == list(range(8))
    assert gate.running == 0 and gate.waiting == 0


async def test_gate_refuses_at_once_what_could_not_start_before_its_deadline() -> None:
    gate = StartGate(1)
    gate.start_s = 1.0
    release = anyio.Event()

    async def hold() -> None:
        async with gate.admitted_start(deadline=lifecycle.wall() + 60):
            await release.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await anyio.sleep(0.01)
        t = anyio.current_time()
        # The slot is taken and one start takes ~1 s: a deadline 1.2 s away cannot be met.
        with pytest.raises(hotbed.Overloaded) as refused:
            async with gate.admitted_start(deadline=lifecycle.wall() + 1.2, sandbox_id="sb-x"):
                pytest.fail("admitted a start that could not end before its deadline")
        assert anyio.current_time() - t < 0.1, "refused late"
        assert refused.value.sandbox_id == "sb-x"
        # One that could wait for a slot gives up once waiting no longer fits, not later.
        t = anyio.current_time()
        with pytest.raises(hotbed.Overloaded):
            async with gate.admitted_start(deadline=lifecycle.wall() + 2.8):
                pass
        waited = anyio.current_time() - t
        assert waited < 1.6, waited
        release.set()
    assert gate.refused == 2 and gate.running == 0 and gate.waiting == 0


async def test_gate_tells_the_line_early_when_starts_slow_down() -> None:
    """Starts turn out slower than estimated: those that can no longer make their
    deadline are refused within about a second, not when the deadline comes."""
    gate = StartGate(1)
    gate.start_s = 0.1
    release = anyio.Event()
    refused_after: list[float] = []

    async def hold() -> None:
        async with gate.admitted_start(deadline=lifecycle.wall() + 60):
            await release.wait()

    async def wait_in_line() -> None:
        t = anyio.current_time()
        try:
            async with gate.admitted_start(deadline=lifecycle.wall() + 8):
                pass
        except hotbed.Overloaded:
            refused_after.append(anyio.current_time() - t)

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await anyio.sleep(0.01)
        for _ in range(5):
            tg.start_soon(wait_in_line)
        await anyio.sleep(0.05)
        assert gate.waiting == 5
        gate.start_s = 3.0  # as measured by the starts that ended meanwhile
        with anyio.fail_after(3):
            while gate.waiting > 1:
                await anyio.sleep(0.05)
        release.set()
    # The head (one start ahead of it, ~6 s before its end) may still make it.
    assert len(refused_after) >= 4 and max(refused_after) < 2.0, refused_after


async def test_pool_refills_wait_behind_client_starts() -> None:
    gate = StartGate(1)
    gate.start_s = 0.01
    order: list[str] = []
    first = anyio.Event()

    async def start(name: str, *, background: bool, hold: anyio.Event | None = None) -> None:
        async with gate.admitted_start(deadline=lifecycle.wall() + 30, background=background):
            order.append(name)
            if hold is not None:
                await hold.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: start("holder", background=False, hold=first))
        await anyio.sleep(0.01)
        tg.start_soon(lambda: start("refill", background=True))
        await anyio.sleep(0.01)
        tg.start_soon(lambda: start("client", background=False))
        await anyio.sleep(0.01)
        first.set()
    assert order == ["holder", "client", "refill"]


async def test_pool_refills_hold_at_most_their_share_of_the_slots() -> None:
    """Refills alone never take every slot: a client start that arrives meanwhile
    begins at once, and the refills still all run."""
    gate = StartGate(4)
    assert gate.background_slots == 3
    gate.start_s = 0.01
    peak = 0
    done = 0
    hold = anyio.Event()

    async def refill() -> None:
        nonlocal peak, done
        async with gate.admitted_start(deadline=lifecycle.wall() + 30, background=True):
            peak = max(peak, gate.background_running)
            await hold.wait()
            done += 1

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(refill)
        await anyio.sleep(0.02)
        assert gate.running == 3 and gate.waiting == 3
        with anyio.fail_after(0.5):
            async with gate.admitted_start(deadline=lifecycle.wall() + 30):
                assert gate.running == 4
        hold.set()
    assert peak == 3 and done == 6
    assert gate.running == 0 and gate.waiting == 0 and gate.background_running == 0


async def test_memory_watch_admits_against_real_use() -> None:
    node = NodeMemory(headroom_mb=1000, psi_limit=10.0)
    watch = MemoryWatch(None, "cap", node, overcommit=8.0, worker_id="w")  # type: ignore[arg-type]
    # Sandboxes use 1 MiB per 4 requested: what 3000 free MiB back is 12000 requested.
    busy = MemoryReading(available_mb=4000, sandboxes_mb=1000, psi_some_avg10=0.0)
    assert watch.fitting_mb(busy, reserved_mb=4000) == 12000
    # Nothing measured yet: the configured ratio.
    assert watch.fitting_mb(MemoryReading(available_mb=4000, sandboxes_mb=0, psi_some_avg10=None), 0) == 24000
    # Under the headroom, or stalling on memory: nothing.
    assert watch.fitting_mb(MemoryReading(available_mb=900, sandboxes_mb=10, psi_some_avg10=0.0), 0) == 0
    assert watch.fitting_mb(MemoryReading(available_mb=9000, sandboxes_mb=10, psi_some_avg10=25.0), 0) == 0


def test_memory_headroom_is_a_tenth_of_the_host_whatever_memory_is_declared() -> None:
    from workers.config import WorkerSettings, _default_memory_mb

    host_mb = _default_memory_mb() / 0.8
    default = WorkerSettings().resolved_memory_headroom_mb()
    assert default == max(1024, int(host_mb * 0.1))
    # Declared far beyond the host (capacity as a reservation count): a headroom taken
    # from the declaration would exceed all the host's memory and admit nothing.
    assert WorkerSettings(memory_mb=int(host_mb * 16)).resolved_memory_headroom_mb() == default
    assert WorkerSettings(memory_headroom_mb=0).resolved_memory_headroom_mb() == 0


async def test_one_memory_reader_judges_room_and_pressure() -> None:
    """Admission's room and auto-pause's pressure come from one reader, its one
    sample, and one set of settings (changed in place, as a reload does)."""
    now = MemoryReading(available_mb=3000, sandboxes_mb=500, psi_some_avg10=2.0)
    reads: list[str] = []

    def read(cgroup_parent: str) -> MemoryReading:
        reads.append(cgroup_parent)
        return now

    node = NodeMemory(cgroup_parent="/hb", headroom_mb=1000, pressure_mb=500, psi_limit=10.0, read=read)
    reading = await node.sample()
    assert reads == ["/hb"] and node.last is reading
    assert node.room_mb(reading) == 2000 and node.pressure(reading) == ""
    # Short of memory: admission has no room, auto-pause sees pressure.
    node.pressure_mb = 4000
    assert node.short(reading) and "MemAvailable 3000 MiB" in node.pressure(reading)
    node.headroom_mb = 3500
    assert node.room_mb(reading) == 0
    # Stalling on memory: both, by the same PSI limit, and not "short".
    node.headroom_mb, node.pressure_mb = 0, 0
    stalled = MemoryReading(available_mb=9000, sandboxes_mb=10, psi_some_avg10=25.0)
    assert node.room_mb(stalled) == 0 and not node.short(stalled)
    assert "PSI" in node.pressure(stalled)
    node.psi_limit = 0  # PSI ignored
    assert node.room_mb(stalled) == 9000 and node.pressure(stalled) == ""
    # The real node reads as a node: some memory available.
    assert (await NodeMemory().sample()).available_mb > 0


async def test_withhold_moves_free_memory_aside_and_back(redis_url: str, prefix: str) -> None:
    r = sync_redis(redis_url)
    key = f"{prefix}:cap"
    from hotbed.connection import connect

    client = connect(redis_url)
    try:
        assert await lua.WITHHOLD.run(client, [key], [0]) == 0  # no worker: left alone
        assert not r.exists(key)
        r.hset(key, mapping={"cpu": 1000, "mem": 8000, "n": 0})
        assert await lua.WITHHOLD.run(client, [key], [3000]) == 5000
        assert int(r.hget(key, "mem")) == 3000
        r.hincrby(key, "mem", -1000)  # a reservation meanwhile
        assert await lua.WITHHOLD.run(client, [key], [100000]) == 0
        assert int(r.hget(key, "mem")) == 7000
    finally:
        await client.aclose()
        r.delete(key)
        r.close()


# ------------------------------------------------------- real node: overcommit


async def test_cpu_overcommit_runs_more_sandboxes_than_cores(redis_url: str, prefix: str) -> None:
    """A 1-CPU node at overcommit 3 runs three 1-CPU sandboxes at once; a fourth is
    refused CapacityExhausted at its deadline; ending one lets it in."""
    async with running_stack(redis_url, prefix, worker_overrides={"cpu": 1, "cpu_overcommit": 3.0}) as stack:
        c = stack.client
        assert stack.worker.info.cpu_millis == 3000
        boxes = [await hotbed.Sandbox.create(BUSYBOX_IMAGE, cpu=1, memory_mb=64, client=c) for _ in range(3)]
        try:
            for sb in boxes:
                assert (await sb.exec("true")).ok
            with pytest.raises(hotbed.CapacityExhausted):
                await hotbed.Sandbox.create(BUSYBOX_IMAGE, cpu=1, memory_mb=64, client=c, request_timeout=1.5)
            await boxes.pop().terminate()
            boxes.append(await hotbed.Sandbox.create(BUSYBOX_IMAGE, cpu=1, memory_mb=64, client=c))
            assert (await boxes[-1].exec("true")).ok
        finally:
            for sb in boxes:
                await sb.terminate()


async def test_memory_pressure_withholds_capacity_until_it_passes(redis_url: str, prefix: str) -> None:
    """The node's real memory, not the requests, decides: with a headroom larger than
    the host's free memory nothing is placed (CapacityExhausted); once it is back, the
    same create runs."""
    async with running_stack(redis_url, prefix, worker_overrides={"memory_mb": 4096}) as stack:
        c = stack.client
        with anyio.fail_after(10):
            while stack.worker.memory is None or stack.worker.memory.last is None:
                await anyio.sleep(0.05)
        watch = stack.worker.memory
        watch.node.headroom_mb = 1 << 30
        cap_key = c.keys.worker_cap(stack.worker.id)
        # The worker flags the pressure once its withholding step has returned, which may
        # be a moment after the capacity it wrote is visible here: both are waited for.
        with anyio.fail_after(10):
            while capacity_from_hash(await c.redis.hgetall(cap_key)).mem_free > 0 or not watch.under_pressure:
                await anyio.sleep(0.05)
        with pytest.raises(hotbed.CapacityExhausted):
            await hotbed.Sandbox.create(BUSYBOX_IMAGE, memory_mb=64, client=c, request_timeout=1.5)
        watch.node.headroom_mb = 0
        sb = await hotbed.Sandbox.create(BUSYBOX_IMAGE, memory_mb=64, client=c, request_timeout=20)
        try:
            assert (await sb.exec("true")).ok
            assert not watch.under_pressure
        finally:
            await sb.terminate()


# ------------------------------------------------------------- real node: burst


async def test_burst_beyond_capacity_is_answered_typed_and_the_node_keeps_serving(
    redis_url: str, prefix: str
) -> None:
    """One start at a time and two intake slots: a burst of creates with short
    deadlines is answered, each by a sandbox or a typed Overloaded / CapacityExhausted
    before its deadline; an exec on a running sandbox meanwhile does not wait behind
    the starts; afterwards nothing is held or leaked and the node serves."""
    overrides = {"max_starts": 1, "max_concurrency": 2}
    async with running_stack(redis_url, prefix, worker_overrides=overrides) as stack:
        c = stack.client
        first = await hotbed.Sandbox.create(BUSYBOX_IMAGE, cpu=0.1, memory_mb=64, client=c)
        served: list[hotbed.Sandbox] = []
        refused: list[str] = []
        late: list[float] = []
        exec_s: list[float] = []
        timeout = 3.0

        async def create() -> None:
            t = anyio.current_time()
            try:
                served.append(await hotbed.Sandbox.create(
                    BUSYBOX_IMAGE, cpu=0.1, memory_mb=64, client=c, request_timeout=timeout,
                ))
            except (hotbed.Overloaded, hotbed.CapacityExhausted) as exc:
                refused.append(type(exc).__name__)
            if anyio.current_time() - t > timeout + 1.0:
                late.append(anyio.current_time() - t)

        async def execs() -> None:
            await anyio.sleep(0.5)
            for _ in range(5):
                t = anyio.current_time()
                assert (await first.exec("true")).ok
                exec_s.append(anyio.current_time() - t)
                await anyio.sleep(0.1)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(execs)
                for _ in range(16):
                    tg.start_soon(create)
            assert served and refused, (len(served), refused)
            assert len(served) + len(refused) == 16
            assert not late, f"answered after the deadline: {late}"
            assert "Overloaded" in refused
            assert max(exec_s) < 1.0, f"exec waited behind starts: {exec_s}"
            for sb in served:
                assert (await sb.exec("true")).ok
            stats = stack.worker.starts.statistics()
            assert stats.running == 0 and stats.waiting == 0
        finally:
            for sb in served:
                await sb.terminate()
        # Every refused start gave its reservation back: one sandbox held, then none.
        cap_key = c.keys.worker_cap(stack.worker.id)
        assert capacity_from_hash(await c.redis.hgetall(cap_key)).sandboxes == 1
        again = await hotbed.Sandbox.create(BUSYBOX_IMAGE, cpu=0.1, memory_mb=64, client=c)
        assert (await again.exec("true")).ok
        await again.terminate()
        await first.terminate()
        with anyio.fail_after(10):
            while (cap := capacity_from_hash(await c.redis.hgetall(cap_key))).sandboxes:
                await anyio.sleep(0.05)
        assert cap.cpu_free == stack.worker.info.cpu_millis


def test_inflight_counts_each_id_until_its_last_operation_ends() -> None:
    from workers.inflight import InFlight

    ops = InFlight()
    with ops.holding("a"):
        with ops.holding("a"), ops.holding("b"):
            assert (ops.count("a"), ops.total(), ops.ids()) == (2, 3, {"a", "b"})
        assert "a" in ops and "b" not in ops
        try:
            with ops.holding("c"):
                raise RuntimeError("an operation that fails still ends")
        except RuntimeError:
            pass
        assert ops.ids() == {"a"}
    assert not ops and ops.total() == 0
