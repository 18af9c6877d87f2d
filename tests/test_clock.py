"""Every time compared across hosts is Redis's: a client or a worker whose clock is off
by minutes neither has valid requests refused nor keeps expired ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import msgspec
import pytest
from conftest import process_stack

from hotbed import keys as keyspace
from hotbed import protocol
from hotbed.client import Client, new_id
from hotbed.clock import Clock
from hotbed.connection import connect
from hotbed.protocol import (
    CreateSandbox,
    Envelope,
    ErrorReply,
    Resources,
    SandboxCreated,
    SandboxSpec,
    Terminate,
)
from scheduler.config import SchedulerSettings
from scheduler.service import Scheduler

pytestmark = pytest.mark.anyio

HOUR = 3600.0
ONE_CPU = SandboxSpec(image="none", resources=Resources(cpu=1, memory_mb=64), allow_unisolated=True)


def skewed(by: float) -> Clock:
    return Clock(local=lambda: time.time() + by)


async def test_clock_reads_redis_time_through_a_skewed_local_clock(redis_url: str) -> None:
    r = connect(redis_url)
    try:
        c = skewed(HOUR)
        assert abs(c.now() - time.time() - HOUR) < 1  # not measured yet: the local clock
        await c.sync(r)
        sec, usec = await r.time()
        assert abs(c.now() - (sec + usec / 1e6)) < 0.5
        assert abs(c.offset + HOUR) < 0.5
        # A measurement with a long round trip does not replace a good one.
        c.observe(0.0, before=100.0, after=110.0)
        assert abs(c.offset + HOUR) < 0.5
    finally:
        await r.aclose()


# Runs Python with the host clock off by SKEW seconds from everyone else's: argv[1] is
# the skew, argv[2] a module to run (a daemon) or "-" for code on stdin.
SKEWED = (
    "import runpy, sys, time; _t = time.time; skew = float(sys.argv.pop(1)); "
    "time.time = lambda: _t() + skew; m = sys.argv.pop(1); "
    "exec(sys.stdin.read()) if m == '-' else runpy.run_module(m, run_name='__main__', alter_sys=True)"
)

CLIENT = """
import time
import anyio
from hotbed import keys as keyspace
from hotbed import protocol
from hotbed.client import Client, new_id
from hotbed.errors import HotbedError
from hotbed.protocol import CreateSandbox, Resources, SandboxSpec

async def main():
    async with Client(URL, prefix=PREFIX) as c:
        spec = SandboxSpec(image="none", resources=Resources(cpu=1, memory_mb=64), allow_unisolated=True)
        t0 = time.monotonic()
        try:
            r = await c.request(CreateSandbox(spec=spec), timeout=TIMEOUT)
            print("created", r.sandbox_id, flush=True)
        except HotbedError as e:
            print("error", e.code, round(time.monotonic() - t0, 1), flush=True)

anyio.run(main)
"""


async def _create_from_skewed_host(skew: float, url: str, prefix: str, timeout: float) -> list[str]:
    code = f"URL = {url!r}\nPREFIX = {prefix!r}\nTIMEOUT = {timeout!r}\n" + CLIENT
    done = await anyio.run_process([sys.executable, "-c", SKEWED, str(skew), "-"], input=code.encode(), check=False)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return done.stdout.decode().split()


async def test_skewed_clients_get_placed_and_their_deadlines_held(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    async with process_stack(redis_url, prefix, tmp_path / "sandboxes", worker_overrides={"cpu": 1.0}) as stack:
        # An hour behind: its deadline would have passed long ago on anyone's clock.
        got = await _create_from_skewed_host(-HOUR, redis_url, prefix, 20)
        assert got[0] == "created", got
        sid = got[1]
        # An hour ahead, on a full node: the scheduler answers at the request's real
        # deadline (CapacityExhausted), not an hour later (the client would give up
        # first, with RequestTimeout, after its own wait).
        got = await _create_from_skewed_host(HOUR, redis_url, prefix, 2)
        assert got[:2] == ["error", "CapacityExhausted"] and float(got[2]) < 5, got
        await stack.client.worker_request(stack.worker.id, Terminate(sandbox_id=sid), timeout=10)


@pytest.fixture
def worker_30s_ahead(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[str]:
    """A process-runtime worker (subprocess) whose host clock runs 30 s ahead."""
    wid = f"w-{prefix}"
    env = dict(
        os.environ, HOTBED_REDIS_URL=redis_url, HOTBED_PREFIX=prefix, HOTBED_WORKER_ID=wid,
        HOTBED_RUNTIME="process", HOTBED_PROCESS_ROOT=str(tmp_path / "sandboxes"), HOTBED_GPU_DETECT="none",
        HOTBED_HEARTBEAT_S="0.2", HOTBED_CPU="2", HOTBED_MEMORY_MB="2048", HOTBED_DRAIN_ON_STOP="true",
    )
    path = tmp_path / "worker.log"
    with path.open("wb") as log:
        worker = subprocess.Popen([sys.executable, "-c", SKEWED, "30", "workers"], env=env, stdout=log, stderr=log)
        try:
            yield wid
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    assert "Traceback" not in path.read_text()


async def test_worker_with_a_clock_ahead_serves_valid_starts(worker_30s_ahead: str, redis_url: str, prefix: str) -> None:
    wid = worker_30s_ahead
    scheduler = Scheduler(msgspec.convert(
        {"redis_url": redis_url, "prefix": prefix, "registry_refresh_s": 0.1, "heartbeat_ttl_s": 3.0,
         "shutdown_grace_s": 2.0}, SchedulerSettings,
    ))
    async with anyio.create_task_group() as tg:
        await tg.start(scheduler.run)
        assert scheduler.registry is not None
        with anyio.fail_after(30):
            while wid not in scheduler.registry.workers:
                await anyio.sleep(0.05)
        async with Client(redis_url, prefix=prefix) as c:
            # 10 s to go by Redis's clock; by the worker's own, 20 s past.
            created = await c.request(CreateSandbox(spec=ONE_CPU), timeout=10)
            assert isinstance(created, SandboxCreated) and created.worker_id == wid
            await c.worker_request(wid, Terminate(sandbox_id=created.sandbox_id), timeout=10)
        scheduler.stopping.set()


async def test_hostile_deadlines_get_a_typed_error_not_a_traceback(
    redis_url: str, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """NaN, infinity or a deadline centuries away would overflow the request lease's
    TTL: refused when the envelope is decoded, answered, nothing logged as a crash."""
    async with process_stack(redis_url, prefix, tmp_path / "sandboxes") as stack:
        c = stack.client
        for deadline in (float("nan"), float("inf"), float(2**63 - 1), -1.0):
            rid = new_id()
            env = Envelope(id=rid, reply_to=c.keys.reply(rid), deadline=deadline, body=CreateSandbox(spec=ONE_CPU))
            # Encoding does not check the bound; a hostile client need not use ours.
            await c.redis.xadd(c.keys.requests, {keyspace.FIELD: protocol.encode(env)})
            got = await c.redis.blpop([c.keys.reply(rid)], timeout=10)
            assert got is not None, deadline
            reply = protocol.decode_reply(got[1]).body
            assert isinstance(reply, ErrorReply) and reply.code == "UnsupportedRequest", (deadline, reply)
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
