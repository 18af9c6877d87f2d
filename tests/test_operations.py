"""Operating a fleet: systemd units, config checking, Redis ACL and TLS, `hotbed top`.

``systemd-analyze verify`` runs on the units as ``hotbed service install`` renders
them (scripts/host-setup.sh installs the ``systemd`` package when it is missing).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import msgspec
import pytest
import redis
from doubles import RecordingRuntime

from cli.fleet import Frame, check_config, install_service, render, snapshot
from cli.main import main as cli_main
from daemon.config import load_settings, redact_url
from hotbed import tenants
from hotbed.client import Client
from hotbed.connection import connect
from hotbed.errors import ConfigError
from hotbed.protocol import CreateSandbox, Resources, SandboxCreated, SandboxSpec
from scheduler.config import SchedulerSettings
from tests.conftest import sync_redis
from workers.config import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- systemd


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze missing: scripts/host-setup.sh installs the systemd package")
    done = install_service(
        dest=tmp_path / "units", config_dir=tmp_path / "etc", python=sys.executable,
        enable=False, now=False,
    )
    assert any("hotbed-worker.service" in d for d in done)
    units = sorted((tmp_path / "units").glob("*.service"))
    assert [u.name for u in units] == ["hotbed-scheduler.service", "hotbed-worker.service"]
    out = subprocess.run(
        [analyze, "verify", *map(str, units)], capture_output=True, text=True, timeout=60,
        cwd=tmp_path / "units",
    )
    # verify exits 0 on unknown keys and bad values too, so its warnings must be empty.
    assert out.returncode == 0 and not out.stderr.strip() and not out.stdout.strip(), out.stderr
    for u in units:
        text = u.read_text()
        assert "Type=notify" in text and "Restart=on-failure" in text and "WatchdogSec=" in text
        assert f"ExecStart={sys.executable} -m " in text and str(tmp_path / "etc") in text
    worker = (tmp_path / "units" / "hotbed-worker.service").read_text()
    assert "After=" in worker and "docker.service" in worker and "redis" in worker
    assert "StateDirectory=hotbed" in worker and "/run/docker.sock" in worker
    # The container engine (and every sandbox it starts) runs below the control plane.
    for engine in ("docker", "containerd"):
        dropin = tmp_path / "units" / f"{engine}.service.d" / "10-hotbed-priority.conf"
        assert "[Service]" in dropin.read_text() and "Nice=10" in dropin.read_text()
    # The example configs it installed are valid as they stand, and kept on reinstall.
    assert check_config(str(tmp_path / "etc" / "scheduler.toml")) == "scheduler"
    assert check_config(str(tmp_path / "etc" / "worker.toml")) == "worker"
    (tmp_path / "etc" / "worker.toml").write_text("prefix = 'mine'\n")
    install_service(dest=tmp_path / "units", config_dir=tmp_path / "etc", python=sys.executable,
                    enable=False, now=False)
    assert (tmp_path / "etc" / "worker.toml").read_text() == "prefix = 'mine'\n"


def test_broken_unit_is_caught_by_verify(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze missing")
    install_service(dest=tmp_path, config_dir=tmp_path, python=sys.executable, enable=False, now=False)
    unit = tmp_path / "hotbed-worker.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=", "ProtectSystm="))
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "ProtectSystm" in out.stderr


# ----------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("worker.toml", "runtime = 'kubernetes'\n", "runtime"),
        ("worker.toml", "heartbeat_s = -1\n", "heartbeat_s"),
        ("worker.toml", "surprise = 1\n", "unknown field `surprise`"),
        ("worker.toml", "redis_url = 'http://x:6379'\n", "scheme must be"),
        ("worker.toml", "metrics_port = 70000\n", "metrics_port"),
        ("worker.toml", "gpus = [{uuid = 'GPU-1', model = 'H100'}, {uuid = 'GPU-1', model = 'H100'}]\n", "duplicate uuid"),
        ("scheduler.toml", "placement = 'random'\n", "placement"),
        ("scheduler.toml", "prefix = 'a:b'\n", "prefix"),
        ("scheduler.toml", "redis_url = 'redis://u:hunter2@/0'\n", "names no host"),
        ("scheduler.toml", "placement = \n", "not valid TOML"),
    ],
)
def test_config_check_rejects_bad_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, needle: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    assert cli_main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err
    assert "hunter2" not in err


def test_config_check_accepts_good_files_and_env_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("scheduler.toml", "worker.toml"):
        assert cli_main(["config", "check", str(ROOT / "deploy" / "config" / name)]) == 0
    assert "valid worker config" in capsys.readouterr().out
    path = tmp_path / "node.toml"
    path.write_text("[tags]\nzone = 'eu-1'\n")
    assert cli_main(["config", "check", str(path)]) == 0  # no name hint: whichever accepts it
    monkeypatch.setenv("HOTBED_HEARTBEAT_S", "soon")
    assert cli_main(["config", "check", "--daemon", "worker", str(path)]) == 2
    assert "heartbeat_s" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["scheduler", "workers"])
def test_daemons_exit_2_with_one_line_on_bad_config(tmp_path: Path, module: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("prefix = ''\n")
    out = subprocess.run(
        [sys.executable, "-m", module, "--config", str(path)], capture_output=True, text=True,
        timeout=60, env={k: v for k, v in os.environ.items() if not k.startswith("HOTBED_")},
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ") and "prefix" in out.stderr


def test_redact_url() -> None:
    assert redact_url("redis://app:s3cret@db:6379/0") == "redis://app:***@db:6379/0"
    assert redact_url("rediss://:s3cret@db/0") == "rediss://:***@db/0"
    assert redact_url("redis://db/0") == "redis://db/0"


# ------------------------------------------------------------ Redis ACL and TLS


async def _fleet_roundtrip(url: str, prefix: str) -> SandboxCreated:
    """A real scheduler and worker (test-double runtime) over ``url``; one create."""
    from scheduler.service import Scheduler
    from workers.agent import WorkerAgent

    common = {"redis_url": url, "prefix": prefix}
    scheduler = Scheduler(msgspec.convert({**common, "registry_refresh_s": 0.05}, SchedulerSettings))
    worker = WorkerAgent(
        msgspec.convert({**common, "worker_id": f"w-{prefix}", "heartbeat_s": 0.2, "gpu_detect": "none",
                         "cpu": 4, "memory_mb": 4096, "drain_on_stop": True}, WorkerSettings),
        RecordingRuntime(),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(scheduler.run)
        await tg.start(worker.run)
        try:
            async with Client(url, prefix=prefix) as c:
                reply = await c.request(CreateSandbox(spec=SandboxSpec(resources=Resources())), timeout=15)
        finally:
            worker.stopping.set()
            scheduler.stopping.set()
    assert isinstance(reply, SandboxCreated)
    return reply


@pytest.mark.anyio
async def test_redis_acl_user_confined_to_its_prefix(redis_url: str, prefix: str) -> None:
    """An ACL user with a password that may touch only ``PREFIX:*`` keys runs the fleet:
    every key the daemons use lives under the prefix, and the URL carries the user."""
    user, password = f"u{prefix}", secrets.token_hex(8)
    # On every node of a Redis Cluster: ACL users are per Redis process.
    admin = connect(redis_url)
    await tenants.set_user(admin, user, password, [f"~{prefix}:*", "+@all", "-@dangerous", "+info"])
    try:
        acl_url = tenants.with_credentials(redis_url, user, password)
        reply = await _fleet_roundtrip(acl_url, prefix)
        assert reply.worker_id == f"w-{prefix}"
        # The same user is refused outside its prefix, so the check above means something.
        confined = sync_redis(acl_url)
        with pytest.raises(redis.exceptions.NoPermissionError):
            confined.set("elsewhere:key", "1")
        confined.close()
        # A wrong password: the daemon exits 1 with one line that hides the password.
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOTBED_")}
        env.update(HOTBED_REDIS_URL=tenants.with_credentials(redis_url, user, f"wrong-{password}"),
                   HOTBED_PREFIX=prefix)
        out = await anyio.run_process([sys.executable, "-m", "scheduler"], env=env, check=False)
        err = out.stderr.decode()
        assert out.returncode == 1 and err.count("\n") == 1, err
        assert "invalid username-password" in err and f"{user}:***@" in err and password not in err
    finally:
        await tenants.delete_user(admin, user)
        await admin.aclose()


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[tuple[str, Path]]:
    server, openssl = shutil.which("redis-server"), shutil.which("openssl")
    if server is None or openssl is None:
        pytest.fail("redis-server and openssl are needed (scripts/host-setup.sh installs them)")
    d = Path(tempfile.mkdtemp(prefix="hotbed-tls-"))
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "key.pem"),
         "-out", str(d / "cert.pem"), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [server, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(d / "cert.pem"), "--tls-key-file", str(d / "key.pem"),
         "--tls-ca-cert-file", str(d / "cert.pem"), "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no", "--dir", str(d)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("redis-server with TLS did not start (is it built with TLS?)")
            time.sleep(0.05)
    yield f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={d / 'cert.pem'}", d
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.anyio
async def test_redis_tls_url(tls_redis: tuple[str, Path], prefix: str) -> None:
    url, _ = tls_redis
    settings = load_settings(WorkerSettings, environ={"HOTBED_REDIS_URL": url})
    assert settings.redis_url.startswith("rediss://")
    reply = await _fleet_roundtrip(url, prefix)
    assert reply.worker_id == f"w-{prefix}"


@pytest.mark.anyio
async def test_redis_tls_refuses_an_unknown_ca(tls_redis: tuple[str, Path], prefix: str) -> None:
    url, _ = tls_redis
    r = connect(url.split("?", 1)[0])  # no CA given: the self-signed cert must be refused
    with pytest.raises(redis.exceptions.ConnectionError):
        await r.ping()
    await r.aclose()


# -------------------------------------------------------------------------- top


@pytest.mark.anyio
async def test_top_shows_workers_gpus_and_rates(redis_url: str, prefix: str) -> None:
    from scheduler.service import Scheduler
    from workers.agent import WorkerAgent

    common = {"redis_url": redis_url, "prefix": prefix}
    scheduler = Scheduler(msgspec.convert({**common, "registry_refresh_s": 0.05}, SchedulerSettings))
    worker = WorkerAgent(
        msgspec.convert({**common, "worker_id": "gpu-node-1", "heartbeat_s": 0.2, "cpu": 8,
                         "memory_mb": 8192, "drain_on_stop": True, "tags": {"zone": "eu-1"},
                         "gpus": [{"uuid": "GPU-t1", "model": "NVIDIA H100 80GB HBM3"},
                                  {"uuid": "GPU-t2", "model": "NVIDIA H100 80GB HBM3"}]},
                        WorkerSettings),
        RecordingRuntime(),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(scheduler.run)
        await tg.start(worker.run)
        try:
            async with Client(redis_url, prefix=prefix) as c:
                first = await snapshot(c)
                reply = await c.request(
                    CreateSandbox(spec=SandboxSpec(resources=Resources(cpu=2, memory_mb=1024, gpu="H100"))),
                    timeout=15,
                )
                assert isinstance(reply, SandboxCreated)
                second = await snapshot(c)
        finally:
            worker.stopping.set()
            scheduler.stopping.set()
    text = render(second, msgspec.structs.replace(first, at=second.at - 1.0))
    row = next(line for line in text.splitlines() if line.startswith("gpu-node-1"))
    assert "2.0/8" in row and "1024/8192" in row and "1/2" in row
    assert "NVIDIA H100 80GB HBM3" in row and "zone=eu-1" in row
    assert "live sandboxes 1" in text and "(1.0/s)" in text
    assert isinstance(second, Frame) and second.added == first.added + 1


def test_top_once_from_the_cli(redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTBED_REDIS_URL", redis_url)
    monkeypatch.setenv("HOTBED_PREFIX", prefix)
    assert cli_main(["top", "--once"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hotbed top") and "WORKER" in out
    with pytest.raises(ConfigError):
        load_settings(SchedulerSettings, environ={"HOTBED_PREFIX": ""})


# -------------------------------------------------------------- bench/gpu_check.sh


def test_gpu_check_script_with_declared_gpus_and_a_fake_nvidia_smi(tmp_path: Path) -> None:
    """The real-GPU check script, run here on declared GPUs: it proves the script's
    plumbing (placement, UUID hand-over, running nvidia-smi in the sandbox), not the
    hardware. On a GPU machine it runs unchanged against NVML."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n# TEST DOUBLE for `nvidia-smi -L`: lists the GPUs the environment makes visible.\n"
        "i=0; for u in $(echo \"$NVIDIA_VISIBLE_DEVICES\" | tr , ' '); do\n"
        "  echo \"GPU $i: NVIDIA H100 80GB HBM3 (UUID: $u)\"; i=$((i+1)); done\n"
    )
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTBED_")}
    env.update(
        PATH=f"{bin_dir}:{env.get('PATH', '')}", PYTHON=sys.executable,
        GPU_CHECK_FAKE_GPUS='[{"uuid": "GPU-fake-1", "model": "NVIDIA H100 80GB HBM3", "memory_mb": 81559}]',
    )
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True,
                         text=True, timeout=90, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "worker gpu-node: runtime=process kind=unisolated" in text and "GPU-fake-1" in text
    assert "-> gpu-node, GPUs GPU-fake-1 (NVIDIA H100 80GB HBM3)" in text
    assert "-> cpu-node" in text
    assert "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-fake-1)" in text
    assert "gpu_check: PASSED" in text and "FAIL " not in text


# ---------------------------------------------------------------- structured logs


@pytest.mark.anyio
async def test_log_lines_carry_request_sandbox_and_worker_ids() -> None:
    import io
    import json
    import logging

    from daemon import lifecycle

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(lifecycle.JsonFormatter())
    handler.addFilter(lifecycle.ContextFilter())
    log = logging.getLogger("hotbed.test.structured")
    log.addHandler(handler)
    log.propagate = False
    lifecycle.log_defaults["worker_id"] = "w-1"
    try:
        async def handle(rid: str, sid: str) -> None:
            lifecycle.log_context.set({"request_id": rid, "sandbox_id": sid})
            await anyio.sleep(0.01)
            log.warning("handled %s", rid)

        async with anyio.create_task_group() as tg:  # each task keeps its own context
            tg.start_soon(handle, "r-1", "sb-1")
            tg.start_soon(handle, "r-2", "sb-2")
        log.warning("outside", extra={"sandbox_id": "explicit"})
    finally:
        lifecycle.log_defaults.pop("worker_id", None)
        log.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    by_msg = {line["msg"]: line for line in lines}
    assert by_msg["handled r-1"]["request_id"] == "r-1" and by_msg["handled r-1"]["sandbox_id"] == "sb-1"
    assert by_msg["handled r-2"]["sandbox_id"] == "sb-2" and by_msg["handled r-2"]["worker_id"] == "w-1"
    assert by_msg["outside"]["sandbox_id"] == "explicit" and "request_id" not in by_msg["outside"]
    text = logging.makeLogRecord({"msg": "m", "request_id": "r"})
    assert "request_id=r" in lifecycle.TextFormatter("%(message)s").format(text)
