"""Agent-grade execution on real runsc sandboxes through the whole stack:
SDK -> Redis -> worker -> guest agent (PID 1 of the sandbox) and back."""

from __future__ import annotations

import os
import signal
import time
from contextlib import aclosing
from pathlib import Path

import anyio
import pytest

import hotbed
from hotbed.errors import ExecTimeout
from hotbed.sandbox import Sandbox
from tests.conftest import BASE_IMAGE, Stack

pytestmark = pytest.mark.anyio


async def _base(stack: Stack) -> Sandbox:
    return await Sandbox.create(BASE_IMAGE, client=stack.client, memory_mb=256)


async def test_session_state_persists(hotbed_stack: Stack) -> None:
    async with await _base(hotbed_stack) as sb:
        sh = sb.shell("main")
        assert (await sh.run("cd /tmp && mkdir -p proj && cd proj")).exit_code == 0
        await sh.run("export GREETING=hello; greet() { echo \"$GREETING $1\"; }")
        res = await sh.run("pwd; greet world")
        assert res.stdout == "/tmp/proj\nhello world\n"
        # Exit codes come back exactly, without touching the shell.
        assert (await sh.run("false")).exit_code == 1
        assert (await sh.run("(exit 42)")).exit_code == 42
        res = await sh.run("echo out; echo err >&2; ls /nonexistent")
        assert res.stdout == "out\n" and "err" in res.stderr and res.exit_code == 2
        # Output that looks like a marker or a prompt changes nothing.
        res = await sh.run("printf '\\n0\\n$ '; echo $((6*7))")
        assert res.stdout == "\n0\n$ 42\n" and res.exit_code == 0
        # A command that breaks the shell's status pipe ends the session, not the agent.
        other_broken = sb.shell("broken")
        res = await other_broken.run("exec 3>&-", timeout=10)
        assert res.exit_code != 0
        assert (await other_broken.run("echo fresh")).stdout == "fresh\n"
        # A second session is independent.
        other = sb.shell("other")
        assert (await other.run("pwd")).stdout.strip() != "/tmp/proj"
        assert (await sh.run("echo $GREETING")).stdout == "hello\n"


async def test_interrupt_stops_sleep_and_session_survives(hotbed_stack: Stack) -> None:
    async with await _base(hotbed_stack) as sb:
        sh = sb.shell()
        await sh.run("cd /tmp; export KEEP=1")
        async with anyio.create_task_group() as tg:
            results = []

            async def run_long() -> None:
                results.append(await sh.run("sleep 100; echo not-reached", timeout=60))

            tg.start_soon(run_long)
            # Wait until the sleep is really running, then Ctrl-C.
            with anyio.fail_after(20):
                while "sleep 100" not in (await sb.exec("ps", "-eo", "args")).stdout:  # noqa: ASYNC110 (polls the sandbox)
                    await anyio.sleep(0.05)
            t0 = time.monotonic()
            await sh.interrupt()
        assert time.monotonic() - t0 < 1.0
        assert results[0].exit_code == 130 and "not-reached" not in results[0].stdout
        res = await sh.run("echo $KEEP $PWD")
        assert res.stdout == "1 /tmp\n"


async def test_session_timeout_interrupts_and_keeps_session(hotbed_stack: Stack) -> None:
    async with await _base(hotbed_stack) as sb:
        sh = sb.shell()
        await sh.run("X=7")
        with pytest.raises(ExecTimeout):
            await sh.run("sleep 30", timeout=0.5)
        assert (await sh.run("echo $X")).stdout == "7\n"


async def test_background_job_in_session_does_not_block(hotbed_stack: Stack) -> None:
    async with await _base(hotbed_stack) as sb:
        sh = sb.shell()
        with anyio.fail_after(10):
            assert (await sh.run("yes > /dev/null &")).exit_code == 0
            for _ in range(5):
                assert (await sh.run("echo ok")).stdout == "ok\n"
        assert (await sb.exec("pgrep", "-x", "yes")).exit_code == 0


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_streaming_50mb_truncated_without_worker_memory(hotbed_stack: Stack) -> None:
    async with await _base(hotbed_stack) as sb:
        limit = 4 << 20
        got = 0
        chunks = 0
        baseline = _rss_bytes()
        peak = baseline
        async with anyio.create_task_group() as tg:

            async def sample() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, _rss_bytes())
                    await anyio.sleep(0.01)

            tg.start_soon(sample)
            async with sb.exec_stream(
                "sh", "-c", "head -c 52428800 /dev/zero; echo done >&2", max_output=limit
            ) as out:
                async for chunk in out:
                    if chunk.stream == "stdout":
                        got += len(chunk.data)
                        chunks += 1
            # And all 50 MB through the worker, untruncated, read as it comes.
            whole = 0
            async with sb.exec_stream("head", "-c", "52428800", "/dev/zero", max_output=64 << 20) as full:
                async for chunk in full:
                    whole += len(chunk.data)
            tg.cancel_scope.cancel()
        assert out.result is not None
        assert out.result.exit_code == 0 and out.result.truncated
        assert got == limit and chunks > 1
        assert full.result is not None and not full.result.truncated and whole == 52428800
        # The worker and the client (both in this process) never held anything like it.
        assert peak - baseline < 30 << 20, f"RSS grew {(peak - baseline) >> 20} MiB"
        # Untruncated streaming of 20 MB arrives complete and in order.
        total = 0
        async with sb.exec_stream("seq", "1", "2500000", max_output=64 << 20) as out:
            tail = b""
            async for chunk in out:
                total += len(chunk.data)
                tail = (tail + chunk.data)[-20:]
        assert out.result is not None and not out.result.truncated
        assert tail.endswith(b"2499999\n2500000\n") and total == 18888896


async def test_exec_timeouts_and_stdin(hotbed_stack: Stack) -> None:
    async with await _base(hotbed_stack) as sb:
        t0 = time.monotonic()
        with pytest.raises(ExecTimeout) as exc:
            await sb.exec("sh", "-c", "echo started; sleep 60", timeout=1.0)
        assert time.monotonic() - t0 < 5 and "started" in exc.value.detail["stdout"]
        with pytest.raises(ExecTimeout) as exc:
            await sb.exec("sh", "-c", "echo a; sleep 60", timeout=30, idle_timeout=0.5)
        assert exc.value.detail["idle"]
        res = await sb.exec("python3", "-c", "import sys; print(sys.stdin.read()[::-1])", stdin="abc")
        assert res.stdout == "cba\n"
        # A command that reads stdin with none given sees EOF, not a hang.
        assert (await sb.exec("cat", timeout=5)).exit_code == 0
        # Closed stdout, a forked daemon holding the pipes, a flood: none wedge the agent.
        res = await sb.exec("sh", "-c", "exec >&-; echo gone", timeout=5)
        assert res.exit_code != 0 or res.stdout == ""
        with anyio.fail_after(5):
            res = await sb.exec("sh", "-c", "(sleep 300 &) ; echo parent-done")
        assert res.stdout == "parent-done\n"
        assert (await sb.exec("true")).exit_code == 0


async def test_plain_shell_command_runs_as_sh_would(hotbed_stack: Stack) -> None:
    # A shell command of plain words is exec'd without /bin/sh in between; what it sees
    # and what comes back must be what `sh -c` gives.
    async with await _base(hotbed_stack) as sb:
        direct = await sb.exec("env", shell=True, cwd="/tmp")
        via_sh = await sb.exec("sh", "-c", "env", cwd="/tmp")
        assert sorted(direct.stdout.splitlines()) == sorted(via_sh.stdout.splitlines())
        assert "PWD=/tmp" in direct.stdout.splitlines()
        res = await sb.exec("ls /nonexistent", shell=True)
        assert res.exit_code == 2 and "nonexistent" in res.stderr
        res = await sb.exec("no-such-command-xyz --flag", shell=True)
        assert res.exit_code == 127 and "not found" in res.stderr
        # No #! line: execve refuses it, sh runs it as a script.
        await sb.write_file("/tmp/noshebang", b"echo ran-by-sh\n", mode=0o755)
        assert (await sb.exec("/tmp/noshebang", shell=True)).stdout == "ran-by-sh\n"
        p = await sb.start_process("sleep 30", shell=True)
        assert (await p.refresh()).running
        await p.kill()
        assert (await p.wait(timeout=10)).signal == 9


async def test_background_process_reattached_by_another_client(
    hotbed_stack: Stack, redis_url: str
) -> None:
    async with await _base(hotbed_stack) as sb:
        proc = await sb.start_process(
            "sh", "-c", "for i in 1 2 3; do echo line$i; sleep 0.2; done; echo err >&2; exit 3"
        )
        assert proc.pid > 1
        async with hotbed.Client(redis_url, prefix=hotbed_stack.prefix) as other:
            again = await Sandbox.from_id(sb.id, client=other)
            listed = await again.processes()
            assert proc.pid in [p.pid for p in listed]
            p2 = again.process(proc.pid)
            info = await p2.wait(timeout=20)
            assert not info.running and info.exit_code == 3
            out = await p2.read()
            assert out.stdout == b"line1\nline2\nline3\n" and out.stderr == b"err\n"
            # Reading from an offset returns only what follows it.
            part = await p2.read_from(stdout_offset=6)
            assert part.stdout == b"line2\nline3\n"
        with pytest.raises(hotbed.ProcessNotFound):
            await sb.process(999_999).read()
        # Signals reach the process group.
        sleeper = await sb.start_process("sleep", "300")
        await sleeper.signal(signal.SIGTERM)
        info = await sleeper.wait(timeout=10)
        assert not info.running and info.signal == signal.SIGTERM


async def test_files_tar_chunks_and_watch(hotbed_stack: Stack, tmp_path: Path) -> None:
    async with await _base(hotbed_stack) as sb:
        src = tmp_path / "src"
        (src / "pkg").mkdir(parents=True)
        (src / "pkg" / "mod.py").write_text("X = 1\n")
        (src / "README").write_text("hi\n")
        await sb.upload_dir(src, "/tmp/proj")
        assert (await sb.exec("cat", "/tmp/proj/pkg/mod.py")).stdout == "X = 1\n"
        await sb.exec("sh", "-c", "echo made > /tmp/proj/new.txt")
        dst = tmp_path / "dst"
        await sb.download_dir("/tmp/proj", dst)
        assert (dst / "pkg" / "mod.py").read_text() == "X = 1\n"
        assert (dst / "new.txt").read_text() == "made\n"
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(3 << 20))
        assert await sb.upload_file(big, "/tmp/big.bin", chunk_bytes=1 << 20) == 3 << 20
        back = tmp_path / "back.bin"
        assert await sb.download_file("/tmp/big.bin", back, chunk_bytes=700_000) == 3 << 20
        assert back.read_bytes() == big.read_bytes()

        events = []
        async with aclosing(sb.watch("/tmp/proj", timeout=30, interval=0.1)) as stream:
            async with anyio.create_task_group() as tg:

                async def change() -> None:
                    await anyio.sleep(0.5)
                    await sb.exec("sh", "-c", "echo x > /tmp/proj/a.txt; rm /tmp/proj/README")

                tg.start_soon(change)
                with anyio.fail_after(20):
                    async for ev in stream:
                        events.append((ev.kind, ev.path))
                        if ("deleted", "/tmp/proj/README") in events and (
                            "created", "/tmp/proj/a.txt") in events:
                            break
        assert ("created", "/tmp/proj/a.txt") in events


async def test_pty_runs_interactive_shell_with_resize(hotbed_stack: Stack) -> None:
    async with await _base(hotbed_stack) as sb:
        async with sb.pty(["/bin/bash", "--norc", "-i"], rows=30, cols=100) as term:
            seen = bytearray()
            await term.resize(40, 132)
            await term.write("stty size; tty; exit 5\n")
            with anyio.fail_after(20):
                async for data in term:
                    seen += data
        assert b"40 132" in seen and b"/dev/pts/" in seen
        assert term.exit_code == 5


async def test_busybox_keeps_docker_exec_path(hotbed_stack: Stack) -> None:
    async with await Sandbox.create("hotbed/busybox", client=hotbed_stack.client) as sb:
        assert (await sb.exec("echo", "hi")).stdout == "hi\n"
        async with sb.exec_stream("echo", "streamed") as out:
            chunks = [c async for c in out]
        assert b"".join(c.data for c in chunks) == b"streamed\n"
        with pytest.raises(hotbed.errors.UnsupportedRequest):
            await sb.shell().run("true")


async def test_an_exec_the_runtime_cannot_start_is_an_error_not_output(hotbed_stack: Stack) -> None:
    """When runsc fails to start an exec, dockerd writes its complaint into the output
    stream: that is a typed error (after a few tries, since nothing ran), never stdout."""
    async with await Sandbox.create("hotbed/busybox", client=hotbed_stack.client) as sb:
        assert (await sb.exec("rm", "/bin/sh", user="root")).exit_code == 0
        with pytest.raises(hotbed.errors.RuntimeFailure) as err:
            await sb.exec("echo", "hi")
        assert "did not start the command" in err.value.message
        assert "OCI runtime exec failed" in err.value.message


async def test_session_survives_snapshot_and_restore(hotbed_stack: Stack) -> None:
    from hotbed.templates import delete_template

    async with await _base(hotbed_stack) as sb:
        sh = sb.shell("dev")
        await sh.run("cd /tmp && export STAGE=before-snapshot && f() { echo \"f:$STAGE:$PWD\"; }")
        proc = await sb.start_process("sh", "-c", "echo bg-started; sleep 300")
        name = await sb.snapshot()
        try:
            restored = await Sandbox.create(
                template=name, client=hotbed_stack.client, memory_mb=256
            )
            async with restored:
                # The agent, its session and its background process came back with it.
                res = await restored.shell("dev").run("f")
                assert res.stdout == "f:before-snapshot:/tmp\n"
                info = await restored.process(proc.pid).read()
                assert info.stdout == b"bg-started\n" and info.info.running
                assert (await restored.exec("true")).exit_code == 0
            # The original keeps working too, and across pause/resume (checkpoint to
            # disk, restore in place: the worker re-attaches to the same agent).
            assert (await sh.run("f")).stdout == "f:before-snapshot:/tmp\n"
            await sb.pause()
            await sb.resume()
            assert (await sh.run("f")).stdout == "f:before-snapshot:/tmp\n"
            assert (await sb.process(proc.pid).wait(timeout=0.1)).running
        finally:
            await delete_template(name, client=hotbed_stack.client)


async def test_cli_exec_shell_and_processes(hotbed_stack: Stack) -> None:
    import sys

    env = {**os.environ, "HOTBED_REDIS_URL": hotbed_stack.redis_url,
           "HOTBED_PREFIX": hotbed_stack.prefix, "COLUMNS": "91", "LINES": "33"}
    cli = [str(Path(sys.executable).parent / "hotbed")]
    async with await _base(hotbed_stack) as sb:
        res = await anyio.run_process(
            [*cli, "exec", sb.id, "--", "sh", "-c", "echo out; echo err >&2; exit 3"],
            env=env, check=False,
        )
        assert (res.returncode, res.stdout, res.stderr) == (3, b"out\n", b"err\n")
        res = await anyio.run_process(
            [*cli, "shell", sb.id, "--", "sh", "-c", "stty size; tty"], env=env, check=False,
            stdin=None,
        )
        assert res.returncode == 0 and b"33 91" in res.stdout and b"/dev/pts/" in res.stdout
        res = await anyio.run_process([*cli, "bg", "--shell", sb.id, "--", "echo bg-out; sleep 60"], env=env, check=False)
        assert res.returncode == 0, res.stderr
        pid = int(res.stdout)
        res = await anyio.run_process([*cli, "ps", sb.id], env=env)
        assert str(pid).encode() in res.stdout and b"running" in res.stdout
        with anyio.fail_after(20):
            while b"bg-out" not in (await anyio.run_process([*cli, "logs", sb.id, str(pid)], env=env)).stdout:  # noqa: ASYNC110 (polls the sandbox)
                await anyio.sleep(0.1)
        await anyio.run_process([*cli, "kill", sb.id, str(pid), "-s", "9"], env=env)
        info = await sb.process(pid).wait(timeout=10)
        assert not info.running


async def test_session_and_process_survive_worker_restart(redis_url: str, prefix: str) -> None:
    """A new worker process re-attaches to the agent: session state and background
    processes are still there (they live in the sandbox, not in the worker)."""
    from tests.conftest import leftover_containers, restart_worker, start_stack, stop_stack

    async with anyio.create_task_group() as tg:
        stack = await start_stack(redis_url, prefix, tg=tg, worker_overrides={"drain_on_stop": False})
        sb = await _base(stack)
        try:
            await sb.shell().run("cd /tmp; export MARK=kept")
            proc = await sb.start_process("sh", "-c", "echo one; sleep 300")
            await restart_worker(stack, tg)
            assert (await sb.shell().run("echo $MARK $PWD")).stdout == "kept /tmp\n"
            out = await sb.process(proc.pid).read()
            assert out.stdout == b"one\n" and out.info.running
        finally:
            await sb.terminate()
            await stop_stack(stack)
    assert leftover_containers(prefix) == []


async def test_streaming_errors_arrive_at_once(hotbed_stack: Stack) -> None:
    async with await _base(hotbed_stack) as sb:
        pass
    # The sandbox has ended: the stream ends with the typed error, not after a wait.
    t0 = time.monotonic()
    with pytest.raises(hotbed.errors.SandboxNotFound):
        async with sb.exec_stream("true") as out:
            async for _ in out:
                pass
    assert time.monotonic() - t0 < 0.9


async def test_output_arrives_while_the_command_runs(hotbed_stack: Stack) -> None:
    async with await _base(hotbed_stack) as sb:
        seen: list[tuple[str, bytes]] = []
        gate = "/tmp/go-on"
        async with sb.exec_stream(
            "sh", "-c", f"echo first; echo warn >&2; while [ ! -e {gate} ]; do sleep 0.05; done; echo second",
            timeout=60,
        ) as out:
            async for chunk in out:
                seen.append((chunk.stream, chunk.data))
                if chunk.data == b"first\n":
                    # Only now let the command finish: this chunk came while it ran.
                    await sb.exec("touch", gate)
        assert seen[0] == ("stdout", b"first\n")
        assert ("stderr", b"warn\n") in seen and seen[-1] == ("stdout", b"second\n")
        assert out.result is not None and out.result.exit_code == 0


async def test_sync_facade_sessions_and_processes(
    hotbed_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blocking API (hotbed.sync, its own loop thread) drives sessions and processes."""
    from hotbed import sync

    monkeypatch.setenv("HOTBED_REDIS_URL", hotbed_stack.redis_url)
    monkeypatch.setenv("HOTBED_PREFIX", hotbed_stack.prefix)

    def script() -> None:
        try:
            with sync.Sandbox.create(BASE_IMAGE, memory_mb=256) as sb:
                sh = sb.shell()
                sh.run("cd /tmp && export N=5")
                assert sh.run("echo $N $PWD").stdout == "5 /tmp\n"
                proc = sb.start_process("sh", "-c", "echo bg; exit 4")
                assert proc.wait(timeout=20).exit_code == 4
                assert proc.read().stdout == b"bg\n"
                assert [p.pid for p in sb.processes()] == [proc.pid]
        finally:
            sync.close()

    await anyio.to_thread.run_sync(script)
