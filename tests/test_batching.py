"""Auto-pipelining (hotbed.batching) and the placement index, against a real Redis."""

from __future__ import annotations

import random

import anyio
import pytest

from hotbed import batching
from hotbed.connection import connect
from hotbed.keys import Keys
from hotbed.protocol import Resources, SandboxSpec, WorkerInfo
from scheduler.placement import rank
from scheduler.registry import WorkerRegistry, WorkerView

pytestmark = pytest.mark.anyio


async def test_concurrent_callers_share_round_trips_and_get_their_own_replies(
    redis_url: str, prefix: str
) -> None:
    redis = connect(redis_url)
    ap = batching.AutoPipeline(redis)
    results: dict[int, list[object]] = {}

    async def one(i: int) -> None:
        results[i] = await ap.execute(
            ("SET", f"{prefix}:k{i}", str(i)), ("INCRBY", f"{prefix}:n", 1), ("GET", f"{prefix}:k{i}")
        )

    try:
        async with anyio.create_task_group() as tg:
            for i in range(500):
                tg.start_soon(one, i)
        assert all(results[i][0] is True and results[i][2] == str(i).encode() for i in range(500))
        # Every INCRBY ran once, in some order; far fewer round trips than callers.
        assert sorted(r[1] for r in results.values()) == list(range(1, 501))
        assert ap.round_trips < 50, ap.round_trips
    finally:
        await redis.delete(*[f"{prefix}:k{i}" for i in range(500)], f"{prefix}:n")
        await redis.aclose()


async def test_scripts_load_on_first_use_and_errors_stay_per_command(redis_url: str, prefix: str) -> None:
    redis = connect(redis_url)
    script = batching.Script(f"return redis.call('INCRBY', KEYS[1], ARGV[1]) -- {prefix}")
    ap = batching.for_client(redis)
    assert batching.for_client(redis) is ap
    try:
        # Unknown to the server until now: loaded ahead of its first use.
        (n,) = await ap.execute(script.call([f"{prefix}:s"], [5]))
        assert n == 5
        got = await ap.execute(("INCR", f"{prefix}:s"), ("HGET", f"{prefix}:s", "f"))
        assert got[0] == 6 and isinstance(got[1], Exception)
        with pytest.raises(Exception, match="WRONGTYPE"):
            batching.raise_first_error(got)
    finally:
        await redis.delete(f"{prefix}:s")
        await redis.aclose()


async def test_a_cancelled_caller_never_strands_the_others(redis_url: str, prefix: str) -> None:
    redis = connect(redis_url)
    ap = batching.AutoPipeline(redis)
    done: list[int] = []

    async def one(i: int) -> None:
        await ap.execute(("INCR", f"{prefix}:c"))
        done.append(i)

    try:
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
            # Cancel a scope holding some callers mid-flight; the rest must finish.
            with anyio.CancelScope() as scope:
                scope.cancel()
                await ap.execute(("INCR", f"{prefix}:c"))
        with anyio.fail_after(5):
            await ap.execute(("GET", f"{prefix}:c"))
        assert len(done) == 200
    finally:
        await redis.delete(f"{prefix}:c")
        await redis.aclose()


async def test_a_command_whose_connection_the_server_closes_is_sent_again(redis_url: str, prefix: str) -> None:
    """A connection Redis closes under a command (as a restart does) costs that command
    a new connection, not an error: both a plain call and an auto-pipelined batch."""
    from hotbed.connection import RedisURL

    if RedisURL(redis_url).cluster:
        pytest.skip("cluster connections fail over through hotbed.batching, not this policy")
    admin, redis = connect(redis_url), connect(redis_url)
    key = f"{prefix}:retried"

    async def blocked() -> set[int]:
        return {c["id"] for c in await admin.client_list() if c.get("cmd") == "blpop"}

    async def kill_then_push() -> None:
        # The first BLPOP's connection is closed by the server; the one sent again on
        # a new connection gets the value.
        with anyio.fail_after(5):
            while not (first := await blocked()):
                await anyio.sleep(0.01)
            await admin.execute_command("CLIENT", "KILL", "ID", str(next(iter(first))))
            while not (await blocked()) - first:
                await anyio.sleep(0.01)
        await admin.rpush(key, "value")

    got: list[object] = []
    try:
        for call in (lambda: redis.blpop([key], timeout=4),
                     lambda: batching.AutoPipeline(redis).execute(("BLPOP", key, 4))):
            async with anyio.create_task_group() as tg:
                tg.start_soon(kill_then_push)
                with anyio.fail_after(8):
                    got.append(await call())
        assert [list(got[0]), list(got[1][0])] == [[key.encode(), b"value"]] * 2, got
    finally:
        await admin.delete(key)
        await redis.aclose()
        await admin.aclose()


async def test_coalescer_hands_one_flush_everything_added_together() -> None:
    flushed: list[list[int]] = []

    async def flush(values: list[int]) -> None:
        flushed.append(values)

    co: batching.Coalescer[int] = batching.Coalescer(flush)
    async with anyio.create_task_group() as tg:
        for i in range(100):
            tg.start_soon(co.add, i)
    assert sorted(v for batch in flushed for v in batch) == list(range(100))
    assert len(flushed) <= 3


def _views(n: int, seed: int) -> dict[str, WorkerView]:
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        out[f"w{i}"] = WorkerView(
            # Every fourth one unisolated: skipped by both the index and the scan.
            info=WorkerInfo(id=f"w{i}", host="h", runtime="sim", cpu_millis=16_000, memory_mb=64_000,
                            isolated=i % 4 != 0),
            cpu_free=rng.randrange(0, 16_000), mem_free=rng.randrange(0, 64_000),
        )
    return out


async def test_registry_index_picks_what_rank_picks() -> None:
    """The heap index (common placement) agrees with the full scan, placement after
    placement, as free capacity changes."""
    reg = WorkerRegistry(None, Keys("x"), heartbeat_ttl_s=5)  # type: ignore[arg-type]
    reg.workers = _views(200, 1)
    reg._rebuild()
    spec = SandboxSpec(resources=Resources(cpu=1.5, memory_mb=3000))
    for _ in range(500):
        want = rank(reg.live(), spec)
        got = next(reg.ranked(spec), None)
        if not want:
            assert got is None
            break
        assert got is not None
        assert got[0].cpu_free == want[0][0].cpu_free
        w = got[0]
        w.cpu_free -= spec.resources.millicpu
        w.mem_free -= spec.resources.memory_mb
    # A request the index does not serve (worker tags) goes through rank itself.
    assert list(reg.ranked(spec, node_tags={"zone": "a"})) == []
