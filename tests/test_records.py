"""The Redis shapes' codecs (hotbed.records) and the one way to run Lua (Script)."""

from __future__ import annotations

import orjson
import pytest

from hotbed import batching, lua, records
from hotbed.connection import connect
from hotbed.keys import Keys
from hotbed.protocol import TemplateSpec
from hotbed.records import SandboxRecord

pytestmark = pytest.mark.anyio


def test_sandbox_record_round_trip_and_transitions_decode() -> None:
    rec = SandboxRecord(id="sb-1", worker="w", cpu=0.5, memory_mb=64, tags={"a": "b"}, gpu_uuids=["g"])
    raw = records.to_hash(rec)
    assert records.from_hash(raw) == rec
    assert records.from_hash({k.encode(): v.encode() for k, v in raw.items()}) == rec
    steps = [
        (records.to_started(now=2.0, path="cold", worker="w"), "running"),
        (records.to_restored(now=3.0, path="restore", worker="w", pool="p", image="i", snapshot="s"), "pooled"),
        (records.to_restored(now=3.0, path="restore", worker="w", pool="", image="i", snapshot="s"), "running"),
        (records.to_claimed(now=4.0, timeout=60.0, idle_timeout=0.0, tags={"x": "y"}, client_id="c"), "running"),
        (records.touched(5.0), "creating"),
        (records.to_paused(), "paused"),
        (records.to_resumed(now=6.0), "running"),
        (records.to_unlisted(failed=True), "failed"),
        (records.to_ended(state="terminated", reason="client", now=7.0), "terminated"),
        (records.to_lost(worker="w", now=8.0), "lost"),
    ]
    for fields, state in steps:
        got = records.from_hash({**records.to_hash(SandboxRecord(id="sb-1")), **fields})
        assert got is not None and got.state == state, fields
    claimed = records.from_hash({"id": "sb-1", **steps[3][0]})
    assert claimed is not None and claimed.tags == {"x": "y"} and claimed.timeout == 60.0
    gpus = records.to_hash(SandboxRecord(id="x", gpu_uuids=["g1"]))
    assert records.from_hash(gpus).gpu_uuids == ["g1"]  # type: ignore[union-attr]
    assert records.hset("k", {"state": "paused"}) == ("HSET", "k", "state", "paused")
    assert records.field_names("state", "snapshot") == ("state", "snapshot")
    with pytest.raises(ValueError):
        records.field_names("nope")


def test_capacity_and_pool_config_codecs() -> None:
    cap = records.capacity_from_hash(
        {b"cpu": b"1500", b"mem": b"-3", b"n": b"2", b"gpu:u1": b"0", b"gpu:u2": b"1", b"gpu:u3": b"0"}
    )
    assert (cap.cpu_free, cap.mem_free, cap.sandboxes) == (1500, -3, 2)
    assert cap.gpu_free == ["u1", "u3"] and cap.gpu_taken == ["u2"]
    assert records.capacity_from_hash({}) == records.Capacity()
    conf = records.PoolConfig(template="t", size=3, cpu=0.5, memory_mb=256, gpu="H100")
    raw = records.pool_config_to_hash(conf)
    assert raw["cpu"] == "0.5"
    assert records.pool_config_from_hash({k.encode(): v.encode() for k, v in raw.items()}) == conf
    assert records.pool_config_from_hash({}) is None


def test_template_record_round_trip() -> None:
    rec = records.TemplateRecord(name="t", state="ready", spec=TemplateSpec(image="x"), holders=["a"])
    assert records.template_from_hash(records.template_to_hash(rec)) == rec
    from hotbed import templates

    assert templates.template_from_hash is records.template_from_hash


async def test_scripts_and_read_modify_write_steps(redis_url: str, prefix: str) -> None:
    redis = connect(redis_url)
    keys = Keys(prefix)
    try:
        assert await lua.LOCK.run(redis, [keys.lock("x")], ["tok", 1000]) == 1
        assert await lua.LOCK.run(redis, [keys.lock("x")], ["other", 1000]) == 0
        await redis.script_flush()
        # Unknown to the server again: loaded from the process's registry and re-sent.
        assert await lua.LOCK.run(redis, [keys.lock("x")], ["tok", 1000]) == 1

        # Template holders: concurrent adds never lose one.
        tpl = keys.template("t")
        await redis.hset(tpl, mapping=records.template_to_hash(records.TemplateRecord(name="t")))
        import anyio

        async with anyio.create_task_group() as tg:
            for w in ("w3", "w1", "w2", "w1"):
                tg.start_soon(records.add_template_holder, redis, tpl, w)
        assert orjson.loads(await redis.hget(tpl, "holders")) == ["w1", "w2", "w3"]
        assert not await records.add_template_holder(redis, tpl, "w2")
        assert records.template_from_hash(await redis.hgetall(tpl)).holders == ["w1", "w2", "w3"]  # type: ignore[union-attr]

        # The warm claim's record step takes its fields from records.to_claimed.
        sb = keys.sandbox("sb-1")
        await redis.hset(sb, mapping=records.to_hash(SandboxRecord(id="sb-1", state="pooled")))
        claim = records.to_claimed(now=1.5, timeout=30.0, idle_timeout=0.0, tags={"k": "v"}, client_id="c")
        args = [x for kv in claim.items() for x in kv]
        (ok,) = await batching.for_client(redis).execute(lua.CLAIM_RECORD.call([sb], args))
        assert ok == 1
        rec = records.from_hash(await redis.hgetall(sb))
        assert rec is not None and (rec.state, rec.path, rec.tags, rec.timeout) == ("running", "warm", {"k": "v"}, 30.0)
        assert await lua.CLAIM_RECORD.run(redis, [sb], args) == 0  # no longer pooled
    finally:
        await redis.delete(keys.lock("x"), keys.template("t"), keys.sandbox("sb-1"))
        await redis.aclose()
