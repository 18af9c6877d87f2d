"""Attacks on a node, against real Redis and dockerd + runsc: each is refused with a
typed error or contained, other sandboxes are untouched, and the node keeps serving."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import anyio
import pytest

from hotbed import keys as keyspace
from hotbed import limits, protocol
from hotbed.client import new_id
from hotbed.errors import HotbedError, InvalidRequest
from hotbed.protocol import (
    Envelope,
    Exec,
    ExecSpec,
    ProcessWait,
    Resources,
    SandboxSpec,
    StartSandbox,
    WatchDir,
)
from hotbed.sandbox import Sandbox
from tests.conftest import BASE_IMAGE, BUSYBOX_IMAGE, Stack, leftover_containers, running_stack
from workers import execution
from workers.guest.channel import (
    HEAD,
    MAGIC,
    MAX_HEADER_BYTES,
    FrameParser,
    FrameViolation,
    encode_frame,
)

pytestmark = pytest.mark.anyio


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _record(stack: Stack, sid: str) -> dict[str, str]:
    raw = await stack.client.redis.hgetall(stack.client.keys.sandbox(sid))
    return {k.decode(): v.decode() for k, v in raw.items()}


async def _direct(stack: Stack, body: protocol.Message, *, reply_to: str | None = None) -> protocol.Reply:
    """Write ``body`` straight to the worker's command stream (no scheduler) and wait
    for its reply on the key derived from its id."""
    c = stack.client
    rid = new_id()
    env = Envelope(
        id=rid, reply_to=reply_to if reply_to is not None else c.keys.reply(rid),
        deadline=time.time() + 30, body=body,
    )
    await c.redis.xadd(c.keys.worker_cmds(stack.worker.id), {keyspace.FIELD: protocol.encode(env)})
    got = await c.redis.blpop([c.keys.reply(rid)], timeout=20)
    assert got is not None, "no reply on the derived reply key"
    return protocol.decode_reply(got[1]).body


# ------------------------------------------------------------------ guest channel


def test_frame_parser_refuses_oversized_frames_before_buffering() -> None:
    # An 8 GiB frame (4 GiB header + 4 GiB payload): refused on its 12-byte head.
    parser = FrameParser()
    with pytest.raises(FrameViolation):
        parser.feed(HEAD.pack(MAGIC, 0xFFFFFFFF, 0xFFFFFFFF))
    with pytest.raises(FrameViolation):
        FrameParser().feed(HEAD.pack(MAGIC, 16, 0xFFFFFFFF))
    with pytest.raises(FrameViolation):
        FrameParser().feed(HEAD.pack(MAGIC, MAX_HEADER_BYTES + 1, 0))
    # A reply larger than what was asked (a 10-byte read answered with 11 bytes).
    asked = FrameParser(lambda h: 10 if h.get("t") == "result" else 1 << 20)
    assert asked.feed(encode_frame({"t": "result", "id": 5}, b"x" * 10))[0][1] == b"x" * 10
    with pytest.raises(FrameViolation):
        asked.feed(encode_frame({"t": "result", "id": 5}, b"x" * 11))
    # A frame nobody waits for is skipped unread, in pieces, and parsing goes on.
    skip = FrameParser(lambda h: None if h.get("id") == 9 else 1 << 20)
    data = encode_frame({"t": "out", "id": 9}, b"y" * 5000) + encode_frame({"t": "exit", "id": 3})
    got = []
    for i in range(0, len(data), 700):
        got += skip.feed(data[i : i + 700])
    assert [h["id"] for h, _ in got] == [3] and len(skip.buf) == 0


async def test_sandbox_forging_an_8gib_frame_is_ended(hotbed_stack: Stack) -> None:
    c = hotbed_stack.client
    other = await Sandbox.create(BASE_IMAGE, client=c, memory_mb=256)
    attacker = await Sandbox.create(BASE_IMAGE, client=c, memory_mb=256)
    try:
        assert (await attacker.exec("true")).ok
        baseline = _rss_bytes()
        # A head claiming a 4 GiB header and a 4 GiB payload on the agent's stdout (as
        # the agent's uid; gVisor lets it through /proc/1/fd/1), then 64 MiB of "payload".
        forge = (
            r"printf 'HBG1\377\377\377\377\377\377\377\377' > /proc/1/fd/1; "
            "head -c 67108864 /dev/zero > /proc/1/fd/1"
        )
        try:
            await attacker.exec("sh", "-c", forge, timeout=20)
        except HotbedError:
            pass  # the channel it ran on was dropped
        with anyio.fail_after(20):
            while (rec := await _record(hotbed_stack, attacker.id)).get("state") != "failed":
                await anyio.sleep(0.05)
        assert "guest channel violation" in rec["reason"]
        assert _rss_bytes() - baseline < 32 << 20, "the worker buffered the forged frame"
        # The other sandbox and the node keep serving.
        assert (await other.exec("echo", "fine")).stdout == "fine\n"
        async with await Sandbox.create(BUSYBOX_IMAGE, client=c) as fresh:
            assert (await fresh.exec("true")).ok
    finally:
        await other.terminate()
        await attacker.terminate()


# ------------------------------------------------------------ workers verify


@pytest.mark.parametrize(
    "resources, gpus",
    [
        (Resources(cpu=0.0), []),
        (Resources(memory_mb=0), []),
        (Resources(pids=-1), []),
        (Resources(cpu=float("nan")), []),
        (Resources(), ["GPU-not-reserved"]),
        # In bounds, but no reservation: the scheduler never placed it.
        (Resources(), []),
    ],
)
async def test_start_written_to_a_worker_stream_is_refused(
    hotbed_stack: Stack, resources: Resources, gpus: list[str]
) -> None:
    sid = f"sb-{secrets.token_hex(6)}"
    body = StartSandbox(
        sandbox_id=sid, spec=SandboxSpec(image=BUSYBOX_IMAGE, resources=resources), gpu_uuids=gpus
    )
    reply = await _direct(hotbed_stack, body)
    assert isinstance(reply, protocol.ErrorReply) and reply.code == "InvalidRequest", reply
    # Nothing ran: no container, no record, no reservation.
    assert not leftover_containers(hotbed_stack.prefix)
    assert await _record(hotbed_stack, sid) == {}
    r = hotbed_stack.client.redis
    assert not await r.hexists(hotbed_stack.client.keys.worker_sandboxes(hotbed_stack.worker.id), sid)


async def test_traversal_snapshot_and_bad_ids_are_refused(hotbed_stack: Stack) -> None:
    for body in (
        StartSandbox(sandbox_id="sb-x", spec=SandboxSpec(), snapshot="../../tmp/evil"),
        StartSandbox(sandbox_id="../../x", spec=SandboxSpec()),
        Exec(sandbox_id="sb-}{evil", exec=ExecSpec(argv=["true"])),
    ):
        reply = await _direct(hotbed_stack, body)
        assert isinstance(reply, protocol.ErrorReply) and reply.code == "InvalidRequest", reply
    with pytest.raises(InvalidRequest):
        hotbed_stack.worker.snapshots.path("../../etc")
    with pytest.raises(InvalidRequest):
        limits.check_snapshot("snap-../x")


async def test_reply_and_output_keys_come_from_the_request_id(hotbed_stack: Stack) -> None:
    c = hotbed_stack.client
    r = c.redis
    victim = f"{hotbed_stack.prefix}:victim"
    await r.rpush(victim, b"keep")
    async with await Sandbox.create(BUSYBOX_IMAGE, client=c) as sb:
        rid = new_id()
        env = Envelope(
            id=rid, reply_to=victim, deadline=time.time() + 30,
            body=Exec(sandbox_id=sb.id, exec=ExecSpec(argv=["echo", "hi"]), stream_to=victim),
        )
        await r.xadd(c.keys.worker_cmds(sb.worker_id), {keyspace.FIELD: protocol.encode(env)})
        got = await r.blpop([c.keys.reply(rid)], timeout=20)
        assert got is not None
        assert isinstance(protocol.decode_reply(got[1]).body, protocol.ExecResult)
        # The output went to the stream derived from the id; the named key is untouched.
        assert await r.xlen(c.keys.output(rid)) >= 1
        assert await r.lrange(victim, 0, -1) == [b"keep"]
        assert await r.ttl(victim) == -1
        await r.delete(victim, c.keys.output(rid))


# ------------------------------------------------------------- input validation


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
async def test_non_finite_or_negative_idle_timeout_is_refused(hotbed_stack: Stack, bad: float) -> None:
    with pytest.raises(InvalidRequest):
        await Sandbox.create(BUSYBOX_IMAGE, client=hotbed_stack.client, idle_timeout=bad)
    with pytest.raises(InvalidRequest):
        await Sandbox.create(BUSYBOX_IMAGE, client=hotbed_stack.client, cpu=bad)


async def test_nan_in_a_command_is_refused_by_the_worker(hotbed_stack: Stack) -> None:
    async with await Sandbox.create(BUSYBOX_IMAGE, client=hotbed_stack.client) as sb:
        for body, field in (
            (Exec(sandbox_id=sb.id, exec=ExecSpec(argv=["true"], timeout=float("nan"))), "exec.timeout"),
            (ProcessWait(sandbox_id=sb.id, pid=1, timeout=float("inf")), "timeout"),
        ):
            reply = await _direct(hotbed_stack, body)
            assert isinstance(reply, protocol.ErrorReply) and reply.code == "InvalidRequest", reply
            # The reply names the field, nested path and all.
            assert reply.message == f"{field} must be a finite number", reply
        assert (await sb.exec("true")).ok


# -------------------------------------------------------------- output bounds


async def test_max_output_is_clamped_on_the_worker(hotbed_stack: Stack) -> None:
    async with await Sandbox.create(BASE_IMAGE, client=hotbed_stack.client, memory_mb=256) as sb:
        res = await sb.exec(
            "head", "-c", str(limits.MAX_COLLECTED_OUTPUT + (4 << 20)), "/dev/zero",
            max_output=1 << 40, timeout=60,
        )
        assert res.truncated and len(res.stdout_bytes) == limits.MAX_COLLECTED_OUTPUT


async def test_an_unread_output_stream_stays_bounded(
    hotbed_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(execution, "LAG_DEADLINE_S", 3.0)
    c = hotbed_stack.client
    async with await Sandbox.create(BASE_IMAGE, client=c, memory_mb=256) as sb:
        rid = new_id()
        key = c.keys.output(rid)
        spec = ExecSpec(argv=["yes", "x" * 200], timeout=60, max_output=1 << 40)
        body = Exec(sandbox_id=sb.id, exec=spec, stream_to=key)
        await c.submit(c.keys.worker_cmds(sb.worker_id), body, timeout=60, worker_id=sb.worker_id, request_id=rid)
        longest = 0
        end = None
        with anyio.fail_after(30):
            while end is None:
                longest = max(longest, await c.redis.xlen(key))
                last = await c.redis.xrevrange(key, count=1)
                if last and b"r" in last[0][1]:
                    end = protocol.decode_reply(last[0][1][b"r"]).body
                await anyio.sleep(0.05)
        assert longest <= execution.LAG_ENTRIES + 4, longest
        assert isinstance(end, protocol.ErrorReply) and end.code == "Overloaded", end
        await c.redis.delete(key, c.keys.reply(rid))
        # The sandbox still serves.
        assert (await sb.exec("echo", "ok")).stdout == "ok\n"


# ------------------------------------------------------------------- intake


async def test_long_lived_requests_do_not_take_the_intake(redis_url: str, prefix: str) -> None:
    async with running_stack(redis_url, prefix, worker_overrides={"max_concurrency": 2}) as stack:
        c = stack.client
        stack.worker.long_lived_per_sandbox = 4
        async with await Sandbox.create(BASE_IMAGE, client=c, memory_mb=256) as sb:
            rids = []
            for _ in range(4):  # twice the intake
                rid = new_id()
                rids.append(rid)
                body = WatchDir(sandbox_id=sb.id, path="/tmp", stream_to=c.keys.output(rid), timeout=120)
                await c.submit(c.keys.worker_cmds(sb.worker_id), body, timeout=120,
                               worker_id=sb.worker_id, request_id=rid)
            with anyio.fail_after(10):
                while stack.worker._long.total() < 4:
                    await anyio.sleep(0.05)
            # A plain exec still runs at once.
            with anyio.fail_after(5):
                assert (await sb.exec("echo", "through")).stdout == "through\n"
            # The sandbox's long-lived limit is full: the next is refused, typed.
            rid = new_id()
            body = WatchDir(sandbox_id=sb.id, path="/tmp", stream_to=c.keys.output(rid), timeout=120)
            reply = await c.call(c.keys.worker_cmds(sb.worker_id), body, timeout=10, worker_id=sb.worker_id)
            assert isinstance(reply, protocol.ErrorReply) and reply.code == "Overloaded", reply
        for rid in rids:
            await c.redis.delete(c.keys.output(rid), c.keys.reply(rid))
