"""`hotbed up -d` / `hotbed down`: the embedded single-machine default, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis

from tests.conftest import BUSYBOX_IMAGE, _free_port, docker_available, leftover_containers


def test_up_starts_redis_and_daemons_then_down(tmp_path: Path) -> None:
    assert docker_available(), "run `make test`: it starts dockerd with runsc"
    port = _free_port()
    prefix = f"t{os.urandom(4).hex()}"
    env = dict(
        os.environ,
        HOTBED_HOME=str(tmp_path),
        HOTBED_REDIS_URL=f"redis://127.0.0.1:{port}/0",
        HOTBED_PREFIX=prefix,
        HOTBED_WORKER_ID=f"w-{prefix}",
        HOTBED_DRAIN_ON_STOP="true",
    )
    hb = [sys.executable, "-m", "cli"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*hb, *args], capture_output=True, text=True, env=env, timeout=120)

    r = redis.Redis(port=port)
    try:
        up = cli("up", "--detach")
        assert up.returncode == 0, up.stderr
        assert "starting redis-server" in up.stderr
        assert r.ping()
        assert cli("up", "--detach").stderr.startswith("hotbed: already up")
        status = cli("status")
        assert f"w-{prefix}" in status.stdout
        run = cli("run", BUSYBOX_IMAGE, "--", "echo", "from up")
        assert (run.returncode, run.stdout) == (0, "from up\n"), run.stderr
        pid = int((tmp_path / "hotbed.pid").read_text())
        down = cli("down")
        assert (down.returncode, down.stderr.strip()) == (0, "hotbed: down")
        assert not (tmp_path / "hotbed.pid").exists()
        assert not Path(f"/proc/{pid}").exists(), "hotbed up is still running after down"
        log = (tmp_path / "hotbed.log").read_text()
        assert "Traceback" not in log
    finally:
        cli("down")
        try:
            r.shutdown(nosave=True)
        except redis.exceptions.ConnectionError:
            pass
    assert leftover_containers(prefix) == []
