"""hotbed.integrations.swerex driven by the real swe-rex package, in the order SWE-agent
calls it (deployment start, session, commands, interrupt, files, close, stop)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("swerex", reason="pip install hotbed[swerex]")

from swerex.exceptions import (  # noqa: E402
    CommandTimeoutError,
    DeploymentNotStartedError,
    NonZeroExitCodeError,
    SessionDoesNotExistError,
)
from swerex.runtime.abstract import (  # noqa: E402
    BashAction,
    BashInterruptAction,
    CloseBashSessionRequest,
    Command,
    CreateBashSessionRequest,
    ReadFileRequest,
    UploadRequest,
    WriteFileRequest,
)

from hotbed.integrations.swerex import HotbedDeployment  # noqa: E402
from tests.conftest import BASE_IMAGE, Stack  # noqa: E402
from tests.swerex_cases import CASES, make_local, outcome  # noqa: E402

pytestmark = pytest.mark.anyio


async def test_swe_agent_call_sequence(hotbed_stack: Stack, tmp_path: Path) -> None:
    deployment = HotbedDeployment(BASE_IMAGE, client=hotbed_stack.client, memory_mb=256)
    with pytest.raises(DeploymentNotStartedError):
        _ = deployment.runtime
    await deployment.start()
    try:
        assert await deployment.is_alive()
        rt = deployment.runtime
        await rt.create_session(CreateBashSessionRequest())
        obs = await rt.run_in_session(BashAction(command="mkdir -p /tmp/repo && cd /tmp/repo"))
        assert obs.exit_code == 0
        await rt.run_in_session(BashAction(command="export ROOT=$PWD; alias ll='ls -la'"))
        await rt.run_in_session(BashAction(command="source_me() { echo sourced:$1; }"))
        obs = await rt.run_in_session(BashAction(command="pwd && echo $ROOT && source_me x"))
        assert obs.output.split() == ["/tmp/repo", "/tmp/repo", "sourced:x"]
        # stderr shows in the observation, as in a terminal.
        obs = await rt.run_in_session(BashAction(command="echo to-stderr >&2"))
        assert "to-stderr" in obs.output

        with pytest.raises(NonZeroExitCodeError, match="exit code 2"):
            await rt.run_in_session(BashAction(command="ls /does-not-exist", check="raise"))
        obs = await rt.run_in_session(BashAction(command="false", check="silent"))
        assert obs.exit_code == 1
        obs = await rt.run_in_session(BashAction(command="false", check="ignore"))
        assert obs.exit_code is None

        # A long command times out (interrupted, session alive); the agent then sends
        # its interrupt action and carries on.
        with pytest.raises(CommandTimeoutError):
            await rt.run_in_session(BashAction(command="sleep 100", timeout=0.5))
        await rt.run_in_session(BashInterruptAction())
        # An interrupt of a running command, as SWE-agent's Ctrl-C does.
        async with anyio.create_task_group() as tg:
            got: list[object] = []

            async def long() -> None:
                got.append(await rt.run_in_session(
                    BashAction(command="sleep 100", timeout=60, check="silent")
                ))

            tg.start_soon(long)
            with anyio.fail_after(20):
                while "sleep 100" not in (await rt.execute(Command(command=["ps", "-eo", "args"]))).stdout:  # noqa: ASYNC110 (polls the sandbox)
                    await anyio.sleep(0.05)
            await rt.run_in_session(BashInterruptAction())
        assert got and got[0].exit_code == 130  # type: ignore[attr-defined]
        obs = await rt.run_in_session(BashAction(command="echo $ROOT"))
        assert obs.output.strip() == "/tmp/repo"

        res = await rt.execute(Command(command=["python3", "-c", "print(6*7)"]))
        assert res.stdout == "42\n" and res.exit_code == 0
        res = await rt.execute(Command(command="echo $0 && exit 3", shell=True))
        assert res.exit_code == 3
        with pytest.raises(NonZeroExitCodeError):
            await rt.execute(Command(command="exit 1", shell=True, check=True))
        with pytest.raises(CommandTimeoutError):
            await rt.execute(Command(command=["sleep", "30"], timeout=0.5))

        await rt.write_file(WriteFileRequest(path="/tmp/repo/a/b.py", content="print('hi')\n"))
        assert (await rt.read_file(ReadFileRequest(path="/tmp/repo/a/b.py"))).content == "print('hi')\n"
        (tmp_path / "up" / "pkg").mkdir(parents=True)
        (tmp_path / "up" / "pkg" / "m.py").write_text("M = 1\n")
        (tmp_path / "single.txt").write_text("one\n")
        await rt.upload(UploadRequest(source_path=str(tmp_path / "up"), target_path="/tmp/repo/up"))
        await rt.upload(UploadRequest(source_path=str(tmp_path / "single.txt"), target_path="/tmp/repo/s.txt"))
        obs = await rt.run_in_session(BashAction(command="cat up/pkg/m.py s.txt"))
        assert obs.output == "M = 1\none\n"

        await rt.close_session(CloseBashSessionRequest())
        with pytest.raises(SessionDoesNotExistError):
            await rt.run_in_session(BashAction(command="true"))
        await rt.close()
    finally:
        await deployment.stop()
    with pytest.raises(DeploymentNotStartedError):
        await deployment.is_alive()


async def test_upload_without_gzip_in_the_sandbox(hotbed_stack: Stack, tmp_path: Path) -> None:
    """The directory upload gzips its tar where the sandbox has gzip; a sandbox whose
    PATH has tar but no gzip gets the plain tar, with the same result."""
    deployment = HotbedDeployment(BASE_IMAGE, client=hotbed_stack.client, memory_mb=256,
                                  env={"PATH": "/tmp/bin"})
    await deployment.start()
    try:
        rt = deployment.runtime
        res = await rt.execute(Command(command=[
            "/bin/sh", "-c",
            "/bin/mkdir /tmp/bin && /bin/ln -s /bin/tar /bin/mkdir /bin/cat /tmp/bin/",
        ]))
        assert res.exit_code == 0, res
        res = await rt.execute(Command(command=["/bin/sh", "-c", "command -v tar; command -v gzip"]))
        assert res.stdout == "/tmp/bin/tar\n" and res.exit_code != 0, res
        (tmp_path / "up" / "pkg").mkdir(parents=True)
        (tmp_path / "up" / "pkg" / "m.py").write_text("M = 1\n" * 1000)
        await rt.upload(UploadRequest(source_path=str(tmp_path / "up"), target_path="/tmp/repo/up"))
        res = await rt.execute(Command(command=["cat", "/tmp/repo/up/pkg/m.py"]))
        assert res.stdout == "M = 1\n" * 1000
    finally:
        await deployment.stop()


_KEEP_PAST_LOOP: list[object] = []


async def _outcomes(rt: Any, local: Path) -> list[tuple[Any, ...]]:
    got = []
    for _, request in CASES:
        try:
            value = await request(rt, local)
        except Exception as exc:  # noqa: BLE001 (what it raised is the result)
            got.append(outcome(exc=exc))
        else:
            got.append(outcome(value))
    return got


@pytest.fixture(scope="module")
def swerex_image() -> str:
    from bench.common.swerex_ref import ensure_image

    try:
        return ensure_image(BASE_IMAGE)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot build swe-rex's reference image (wheels need PyPI once): {exc}")


@pytest.mark.timeout(300)
async def test_every_request_matches_swerex_own_runtime(
    hotbed_stack: Stack, tmp_path: Path, swerex_image: str
) -> None:
    """Each request, same order, same image: hotbed's runtime and swe-rex's own
    (``swerex-remote`` under runsc, through its docker deployment) return equal models
    and raise the same exception types with the same messages."""
    from bench.common.swerex_ref import swerex_docker

    make_local(tmp_path)
    hot = HotbedDeployment(BASE_IMAGE, client=hotbed_stack.client, memory_mb=256)
    async with swerex_docker(swerex_image) as ref:
        await ref.start()
        await hot.start()
        try:
            want = await _outcomes(ref.runtime, tmp_path)
            got = await _outcomes(hot.runtime, tmp_path)
        finally:
            await hot.stop()
    diffs = [
        f"{name}:\n  swe-rex: {w!r}\n  hotbed:  {g!r}"
        for (name, _), w, g in zip(CASES, want, got, strict=True) if w != g
    ]
    assert not diffs, f"{len(diffs)} of {len(CASES)} requests differ:\n" + "\n".join(diffs)


@pytest.mark.timeout(300)
async def test_swe_agent_remote_deployment_runs_on_hotbed(hotbed_stack: Stack, tmp_path: Path) -> None:
    """SWE-agent unchanged: its ``remote`` deployment config (host, port, token), built
    into a deployment by swe-rex's own ``get_deployment``, drives a hotbed sandbox
    through hotbed's server, and every request answers as hotbed's runtime does."""
    import socket

    import aiohttp
    import uvicorn
    from swerex.deployment.config import RemoteDeploymentConfig, get_deployment

    from hotbed.integrations.swerex_server import HotbedSwerexServer

    make_local(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = HotbedSwerexServer(auth_token="tok", image=BASE_IMAGE, client=hotbed_stack.client,
                                memory_mb=256)
    web = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning"))
    direct = HotbedDeployment(BASE_IMAGE, client=hotbed_stack.client, memory_mb=256)
    async with anyio.create_task_group() as tg:
        tg.start_soon(web.serve)
        try:
            with anyio.fail_after(10):
                while not web.started:  # noqa: ASYNC110 (uvicorn has no readiness event)
                    await anyio.sleep(0.01)
            config = RemoteDeploymentConfig(host="http://127.0.0.1", port=port, auth_token="tok",
                                            timeout=30)
            remote = get_deployment(config)
            # swe-rex's deployments schedule stop() from __del__, and a stopped
            # RemoteDeployment's stop() raises: keep it until the event loop is gone.
            _KEEP_PAST_LOOP.append(remote)
            await remote.start()
            got = await _outcomes(remote.runtime, tmp_path)
            assert server._runtime is None  # /close ended the episode's sandbox
            await direct.start()
            try:
                want = await _outcomes(direct.runtime, tmp_path)
            finally:
                await direct.stop()
            await remote.stop()
            # A wrong token is refused.
            async with aiohttp.ClientSession() as http, http.post(
                f"http://127.0.0.1:{port}/close", headers={"X-API-Key": "wrong"}
            ) as resp:
                assert resp.status == 401
        finally:
            web.should_exit = True
    diffs = [
        f"{name}:\n  direct: {w!r}\n  remote: {g!r}"
        for (name, _), w, g in zip(CASES, want, got, strict=True) if w != g
    ]
    assert not diffs, f"{len(diffs)} of {len(CASES)} requests differ:\n" + "\n".join(diffs)


@pytest.mark.timeout(900)
def test_real_swe_agent_runs_on_hotbed() -> None:
    """The real SWE-agent, unchanged, through its ``remote`` deployment config and
    hotbed's server (bench/swe_agent_check.py). SWE-agent 1.x is not on PyPI (its
    ``sweagent`` there is a 0.0.1 placeholder): install it from its repository into an
    environment of its own and point ``HOTBED_SWEAGENT_PYTHON`` at that Python (with
    ``SWE_AGENT_CONFIG_DIR``, ``SWE_AGENT_TOOLS_DIR``, ``SWE_AGENT_TRAJECTORY_DIR`` set
    for a non-editable install)."""
    import os
    import sys

    py = os.environ.get("HOTBED_SWEAGENT_PYTHON")
    if not py:
        pytest.skip("HOTBED_SWEAGENT_PYTHON names no SWE-agent environment")
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, "-m", "bench", "swe_agent_check", "--sweagent-python", py],
        cwd=root, capture_output=True, text=True, timeout=800,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "SWE-agent on hotbed: ok" in res.stdout
