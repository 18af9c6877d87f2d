"""``python -m hotbed.demo``: create a few sandboxes on a running hotbed, run Python in
them, show what happened with timings. ``make demo`` starts hotbed first."""

from __future__ import annotations

import sys
import time

import anyio

import hotbed

IMAGE = "hotbed/base"
PROGRAM = "import platform, os; print(f'{platform.python_version()} pid={os.getpid()} uid={os.getuid()} host={platform.node()}')"


def say(msg: str) -> None:
    print(msg, flush=True)


async def one(client: hotbed.Client, n: int, rows: list[tuple[int, str, float, float, str]]) -> None:
    t0 = time.perf_counter()
    sb = await hotbed.Sandbox.create(IMAGE, client=client, tags={"demo": "1"}, timeout=120)
    t1 = time.perf_counter()
    try:
        res = await sb.exec("python3", "-c", PROGRAM)
        t2 = time.perf_counter()
        await sb.write_file("/home/user/hello.txt", f"hello from sandbox {n}\n")
        back = (await sb.read_file("/home/user/hello.txt")).decode().strip()
        rows.append((n, sb.id, t1 - t0, t2 - t1, f"{res.stdout.strip()} | {back}"))
    finally:
        await sb.terminate()


async def main() -> int:
    async with hotbed.Client() as client:
        say(f"hotbed demo: {IMAGE}, Redis {client.url}")
        say("1) one sandbox, one command:")
        t0 = time.perf_counter()
        sb = await hotbed.Sandbox.create(IMAGE, client=client, timeout=120)
        created = time.perf_counter() - t0
        try:
            res = await sb.exec("python3", "-c", "print(6*7)")
            say(f"   created {sb.id} on {sb.worker_id} in {created * 1000:.0f} ms; python3 -c 'print(6*7)' -> {res.stdout.strip()}")
            t0 = time.perf_counter()
            for _ in range(20):
                await sb.exec("true")
            say(f"   exec round trip (true): {(time.perf_counter() - t0) / 20 * 1000:.1f} ms mean of 20")
        finally:
            await sb.terminate()
        say("2) three sandboxes at once, each running Python and a file round trip:")
        rows: list[tuple[int, str, float, float, str]] = []
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for n in range(3):
                tg.start_soon(one, client, n, rows)
        for n, sid, c, e, out in sorted(rows):
            say(f"   #{n} {sid}: create {c * 1000:.0f} ms, exec {e * 1000:.0f} ms: {out}")
        say(f"   all three in {time.perf_counter() - t0:.2f} s")
        left = await hotbed.Sandbox.list(tags={"demo": "1"}, client=client)
        say(f"3) terminated everything; live demo sandboxes left: {len(left)}")
        say("Try it yourself:  .venv/bin/hotbed run hotbed/base -- python3 -c 'print(6*7)'")
        return 0


if __name__ == "__main__":
    try:
        sys.exit(anyio.run(main, backend_options={"use_uvloop": True}))
    except hotbed.HotbedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
