"""``python -m bench fuzz`` (``make fuzz``): hostile input on every stream, bounded in time.

Starts a private Redis, a scheduler process and a real docker+runsc worker process,
then for ``--duration`` seconds (default 60):

* writes random and mutated msgspec messages to every stream a daemon reads: the
  scheduler's intake (``Keys.requests``) and the worker's command stream
  (``Keys.worker_cmds``), and garbage onto the reply paths (``Keys.reply``,
  ``Keys.output``) of requests the fuzzer sent, where a client reads;
  "mutated" means a valid envelope of a random message type with bytes flipped,
  truncated, spliced or with hostile values (NaN, huge numbers, long strings);
* keeps a ``hotbed/base`` sandbox writing random frames (random bytes, and frame
  heads with random lengths) to its guest agent's channel (``/proc/1/fd/1``); when the
  worker ends it for a violation a new one takes its place;
* interleaves valid requests through the SDK: an exec on a sandbox made before the
  fuzzing started (its output checked), and creates, execs and terminates of fresh
  sandboxes. Every one of them must succeed.

It prints how many messages were sent, how many daemons exited (must be 0) and how many
valid requests failed (must be 0), and writes bench/results/fuzz.json (``--out``) with
keys ``sent``, ``daemon_exits``, ``valid_failures`` (and the details), in the run block
of :mod:`bench.common.results` (machine, commit). Exits 1 if either count is not 0 or a
container leaked. Run it under the CPU lock on a shared box.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec

from bench.common import results
from bench.common.cluster import ROOT, free_port
from hotbed import protocol
from hotbed.client import Client
from hotbed.errors import HotbedError
from hotbed.keys import FIELD
from hotbed.protocol import (
    CreateSandbox,
    Envelope,
    Exec,
    ExecSpec,
    ListFiles,
    ReadFile,
    Resources,
    SandboxSpec,
    SessionRun,
    StartSandbox,
    Terminate,
    UpdateSandbox,
    WriteFile,
)
from hotbed.sandbox import Sandbox

BASE_IMAGE = "hotbed/base"
BUSYBOX_IMAGE = "hotbed/busybox"

HOSTILE_VALUES: list[Any] = [
    float("nan"), float("inf"), -float("inf"), -1, 0, 2**63 - 1, -(2**63), 2**64 - 1, "",
    "x" * 70_000, "../../etc/passwd", "sb-}{evil", "\x00", None, [], {}, b"\xff" * 64, True,
]

# Random frames for the guest channel, written by the sandbox itself (python3 in
# hotbed/base): frame heads with random lengths, and raw random bytes.
CHANNEL_CHAOS = r"""
import os, random, struct, time
fd = os.open('/proc/1/fd/1', os.O_WRONLY)
end = time.time() + 5
while time.time() < end:
    r = random.random()
    if r < 0.4:
        data = os.urandom(random.randint(1, 4096))
    elif r < 0.8:
        data = b'HBG1' + struct.pack('>II', random.getrandbits(32), random.getrandbits(32)) + os.urandom(random.randint(0, 256))
    else:
        data = b'HBG1' + struct.pack('>II', random.randint(0, 64), random.randint(0, 64)) + os.urandom(128)
    try:
        os.write(fd, data)
    except OSError:
        break
    print(len(data), flush=True)
    time.sleep(0.01)
"""


def random_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 3 or r < 0.35:
        return rng.choice([
            rng.randint(-(2**40), 2**40), rng.random() * 1e9, rng.choice(HOSTILE_VALUES),
            secrets.token_hex(rng.randint(0, 16)), os.urandom(rng.randint(0, 32)), None, True,
        ])
    if r < 0.7:
        return {rng.choice(["id", "t", "body", "reply_to", "deadline", "spec", "sandbox_id", "argv",
                            secrets.token_hex(2)]): random_value(rng, depth + 1)
                for _ in range(rng.randint(0, 5))}
    return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]


def base_body(rng: random.Random) -> protocol.Message:
    """A valid message of a random type that can do no harm when valid: unknown
    sandboxes, resources no worker has, a start with no reservation."""
    sid = f"sb-fuzz{secrets.token_hex(4)}"
    huge = SandboxSpec(image=BUSYBOX_IMAGE, resources=Resources(cpu=512.0, memory_mb=1 << 21))
    return rng.choice([
        CreateSandbox(spec=huge),
        StartSandbox(sandbox_id=sid, spec=SandboxSpec(image=BUSYBOX_IMAGE)),
        Exec(sandbox_id=sid, exec=ExecSpec(argv=["true"])),
        Terminate(sandbox_id=sid),
        ReadFile(sandbox_id=sid, path="/etc/hostname"),
        WriteFile(sandbox_id=sid, path="/tmp/x", data=b"x"),
        ListFiles(sandbox_id=sid, path="/"),
        SessionRun(sandbox_id=sid, session="s", command="true"),
        UpdateSandbox(sandbox_id=sid, timeout=10.0),
    ])


def fuzz_message(rng: random.Random, keys: Any) -> bytes:
    rid = secrets.token_hex(8)
    r = rng.random()
    if r < 0.2:
        return os.urandom(rng.randint(0, 512))
    if r < 0.4:
        return msgspec.msgpack.encode(random_value(rng))
    env = Envelope(id=rid, reply_to=keys.reply(rid), deadline=time.time() + 10, body=base_body(rng))
    if r < 0.6:
        # Valid shape, hostile values.
        raw = msgspec.to_builtins(env)
        target = raw if rng.random() < 0.3 else raw["body"]
        target[rng.choice(list(target))] = rng.choice(HOSTILE_VALUES)
        return msgspec.msgpack.encode(raw)
    data = bytearray(protocol.encode(env))
    op = rng.random()
    if op < 0.4:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif op < 0.7:
        del data[rng.randrange(len(data)):]
    else:
        at = rng.randrange(len(data))
        data[at:at] = os.urandom(rng.randint(1, 64))
    return bytes(data)


class Fuzz:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.prefix = f"fuzz{secrets.token_hex(4)}"
        self.dir = Path(tempfile.mkdtemp(prefix="hotbed-fuzz-"))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.worker_id = f"w-{self.prefix}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.sent: dict[str, int] = {"requests": 0, "worker_cmds": 0, "replies": 0, "outputs": 0,
                                     "channel_frames": 0}
        self.valid = 0
        self.valid_failures: list[str] = []
        self.chaos_ended = 0
        # Garbage on a reply path that the client answered with an untyped exception.
        self.client_untyped: list[str] = []

    # -------------------------------------------------------------- processes

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise SystemExit("redis-server is not installed (make install)")
        self.procs["redis"] = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--maxmemory", "1gb", "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOTBED_")}
        env.update({
            "HOTBED_REDIS_URL": self.url, "HOTBED_PREFIX": self.prefix, "PYTHONPATH": str(ROOT),
            "HOTBED_WORKER_ID": self.worker_id, "HOTBED_DRAIN_ON_STOP": "true",
            "HOTBED_HEARTBEAT_S": "0.5", "HOTBED_REGISTRY_REFRESH_S": "0.2", "HOTBED_GPU_DETECT": "none",
            "HOTBED_SNAPSHOT_DIR": str(self.dir / "snapshots"),
        })
        for module in ("scheduler", "workers"):
            log = open(self.dir / f"{module}.log", "wb")  # noqa: SIM115 - the process keeps it
            self.procs[module] = subprocess.Popen(
                [sys.executable, "-m", module], env=env, stdout=log, stderr=log, cwd=ROOT
            )

    def daemon_exits(self) -> list[str]:
        return [name for name in ("scheduler", "workers") if self.procs[name].poll() is not None]

    def stop(self) -> list[str]:
        for name in ("scheduler", "workers"):
            if self.procs[name].poll() is None:
                self.procs[name].send_signal(signal.SIGTERM)
        for name in ("scheduler", "workers"):
            try:
                self.procs[name].wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.procs[name].kill()
        out = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=dev.hotbed.prefix={self.prefix}"],
            capture_output=True, text=True,
        )
        leaked = out.stdout.split()
        if leaked:
            subprocess.run(["docker", "rm", "-f", *leaked], capture_output=True)
        self.procs["redis"].terminate()
        self.procs["redis"].wait(timeout=10)
        return leaked

    def tracebacks(self) -> dict[str, int]:
        return {
            name: (self.dir / f"{name}.log").read_text(errors="replace").count("Traceback")
            for name in ("scheduler", "workers")
        }

    # ------------------------------------------------------------------- fuzzing

    async def run(self) -> None:
        async with Client(self.url, prefix=self.prefix) as c:
            with anyio.fail_after(60):
                while await c.redis.zscore(c.keys.workers, self.worker_id) is None:
                    if self.daemon_exits():
                        raise SystemExit(f"a daemon did not start; logs in {self.dir}")
                    await anyio.sleep(0.1)
            await anyio.sleep(0.5)
            steady = await Sandbox.create(BASE_IMAGE, client=c, memory_mb=256, cpu=0.5)
            try:
                end = anyio.current_time() + self.args.duration
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._streams, c, end)
                    tg.start_soon(self._channel, c, end)
                    tg.start_soon(self._valid_execs, c, steady, end)
                    tg.start_soon(self._valid_creates, c, end)
            finally:
                await steady.terminate()

    async def _streams(self, c: Client, end: float) -> None:
        keys = c.keys
        gap = 1.0 / self.args.rate
        while anyio.current_time() < end:
            target = self.rng.random()
            data = fuzz_message(self.rng, keys)
            if target < 0.4:
                await c.redis.xadd(keys.requests, {FIELD: data})
                self.sent["requests"] += 1
            elif target < 0.8:
                await c.redis.xadd(keys.worker_cmds(self.worker_id), {FIELD: data})
                self.sent["worker_cmds"] += 1
            elif target < 0.9:
                # A request of ours whose reply path also carries garbage: the client
                # reading it gets a typed error, never a crash or a hang.
                rid = secrets.token_hex(8)
                await c.redis.lpush(keys.reply(rid), data)
                await c.redis.expire(keys.reply(rid), 30)
                try:
                    await c._wait_reply(rid, keys.reply(rid), 1.0)  # noqa: SLF001 - the client's reply path
                except (HotbedError, msgspec.DecodeError, msgspec.ValidationError):
                    pass
                except Exception as exc:
                    self.client_untyped.append(f"{type(exc).__name__}: {exc}")
                self.sent["replies"] += 1
            else:
                rid = secrets.token_hex(8)
                await c.redis.xadd(keys.output(rid), {self.rng.choice([b"o", b"e", b"v", b"r"]): data})
                await c.redis.expire(keys.output(rid), 30)
                self.sent["outputs"] += 1
            await anyio.sleep(gap)

    async def _channel(self, c: Client, end: float) -> None:
        while anyio.current_time() < end - 8:
            sb = await Sandbox.create(BASE_IMAGE, client=c, memory_mb=256, cpu=0.5)
            try:
                res = await sb.exec("python3", "-c", CHANNEL_CHAOS, timeout=30)
                self.sent["channel_frames"] += len(res.stdout.split())
            except HotbedError:
                self.sent["channel_frames"] += 1  # dropped at its first violation
                self.chaos_ended += 1
            finally:
                try:
                    await sb.terminate()
                except HotbedError:
                    pass

    async def _check(self, what: str, step: Any) -> None:
        self.valid += 1
        try:
            with anyio.fail_after(90):
                await step()
        except Exception as exc:  # every failure of a valid request is counted, typed or not
            self.valid_failures.append(f"{what}: {type(exc).__name__}: {exc}")

    async def _valid_execs(self, c: Client, sb: Sandbox, end: float) -> None:
        n = 0
        while anyio.current_time() < end:
            n += 1
            word = f"ok{n}"

            async def step(word: str = word) -> None:
                res = await sb.exec("echo", word)
                assert res.stdout == f"{word}\n", res

            await self._check("exec", step)
            await anyio.sleep(0.3)

    async def _valid_creates(self, c: Client, end: float) -> None:
        while anyio.current_time() < end:

            async def step() -> None:
                async with await Sandbox.create(BUSYBOX_IMAGE, client=c, cpu=0.25, memory_mb=64) as sb:
                    res = await sb.exec("echo", "fresh")
                    assert res.stdout == "fresh\n", res

            await self._check("create+exec+terminate", step)
            await anyio.sleep(2.0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of fuzzing (default 60)")
    parser.add_argument("--rate", type=float, default=150.0, help="fuzz messages per second")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", default=str(results.RESULTS / "fuzz.json"))
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(2**32)
    doc: dict[str, Any] = {"run": results.new_run("fuzz", argv)}
    fuzz = Fuzz(args)
    fuzz.start()
    leaked: list[str] = []
    try:
        anyio.run(fuzz.run, backend="asyncio", backend_options={"use_uvloop": True})
    finally:
        exits = fuzz.daemon_exits()
        tracebacks = fuzz.tracebacks()
        leaked = fuzz.stop()
    sent = sum(fuzz.sent.values())
    doc.update({
        "sent": sent, "daemon_exits": len(exits), "valid_failures": len(fuzz.valid_failures),
        "valid_requests": fuzz.valid, "sent_by_target": fuzz.sent, "exited": exits,
        "failures": fuzz.valid_failures[:20], "channel_sandboxes_ended": fuzz.chaos_ended,
        "daemon_tracebacks": tracebacks, "leaked_containers": len(leaked),
        "client_untyped_errors": len(fuzz.client_untyped), "client_untyped_examples": fuzz.client_untyped[:5],
        "duration_s": args.duration, "rate_per_s": args.rate, "seed": args.seed,
    })
    out = results.write(args.out, doc)
    print(f"sent {sent} fuzz messages ({fuzz.sent})")
    print(f"daemon exits: {len(exits)} {exits}")
    print(f"valid requests failed: {len(fuzz.valid_failures)} of {fuzz.valid}")
    for f in fuzz.valid_failures[:5]:
        print(f"  {f}")
    print(f"leaked containers: {len(leaked)}; results in {out}; logs in {fuzz.dir}")
    ok = not exits and not fuzz.valid_failures and not leaked
    if ok:
        shutil.rmtree(fuzz.dir, ignore_errors=True)
    return 0 if ok else 1
