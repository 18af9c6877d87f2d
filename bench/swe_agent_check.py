"""``python -m bench swe_agent_check --sweagent-python PY``: the real SWE-agent, unchanged,
on hotbed through SWE-ReX's ``remote`` deployment config.

Starts a private Redis, a scheduler and one docker+runsc worker, and
``hotbed.integrations.swerex_server`` on a loopback port; then, with the Python of an
environment where SWE-agent is installed (it needs its own dependencies: PyPI's
``sweagent`` is not SWE-agent 1.x, install it from its repository), builds SWE-agent's
``EnvironmentConfig`` with ``deployment: {type: remote, ...}`` exactly as its YAML or
command line would, and runs ``SWEEnv``: start (session with SWE-agent's start-up
source and environment variables), a local repository copied in (upload + ``execute``),
commands through ``communicate``, file reads and writes, close. Exit status 0 when every
step did what SWE-agent expects.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common.cluster import ROOT, Cluster, free_port

# Runs under SWE-agent's Python: argv = port, token, local repository.
DRIVER = r"""
import sys
from sweagent.environment.swe_env import EnvironmentConfig, SWEEnv
port, token, repo = int(sys.argv[1]), sys.argv[2], sys.argv[3]
config = EnvironmentConfig.model_validate({
    "deployment": {"type": "remote", "host": "http://127.0.0.1", "port": port,
                   "auth_token": token, "timeout": 60},
    "repo": {"type": "local", "path": repo},
    "post_startup_commands": ["echo post-startup > /tmp/post"],
})
env = SWEEnv.from_config(config)
env.start()
try:
    name = config.repo.repo_name
    assert env.communicate("cat /tmp/post").strip() == "post-startup"
    assert env.communicate(f"cat /{name}/hello.py", check="raise").strip() == "print('hi')"
    assert env.communicate("echo $PAGER $LANG").strip() == "cat C.UTF-8"
    assert env.communicate("cd /tmp && export X=1") == ""
    assert env.communicate("pwd; echo $X").split() == ["/tmp", "1"]
    env.write_file("/tmp/edit.py", "x = 1\n")
    assert env.read_file("/tmp/edit.py") == "x = 1\n"
    assert env.communicate("python3 -c 'print(6*7)'").strip() == "42"
    print("SWE-agent on hotbed: ok")
finally:
    env.close()
"""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench swe_agent_check")
    p.add_argument("--sweagent-python", required=True, help="python of an env with SWE-agent installed")
    p.add_argument("--image", default="hotbed/base")
    p.add_argument("--oci-runtime", default="runsc")
    args = p.parse_args(argv)
    prefix = f"bswe{secrets.token_hex(3)}"
    token = secrets.token_hex(8)
    port = free_port()
    with Cluster(schedulers=1, fleets=0, prefix=prefix) as cluster, \
            tempfile.TemporaryDirectory(prefix="swe-agent-check-") as tmp:
        repo = Path(tmp) / "demo"
        repo.mkdir()
        (repo / "hello.py").write_text("print('hi')\n")
        for git in (["init", "-q"], ["add", "."],
                    ["-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "init"]):
            subprocess.run(["git", "-C", str(repo), *git], check=True)
        env = cluster.env(HOTBED_DRAIN_ON_STOP="true", HOTBED_SHUTDOWN_GRACE_S="2",
                          HOTBED_OCI_RUNTIME=args.oci_runtime)
        worker = subprocess.Popen(
            [sys.executable, "-m", "workers", "--runtime", "docker", "--worker-id", f"w-{prefix}"],
            env=env, cwd=ROOT,
        )
        server = subprocess.Popen(
            [sys.executable, "-m", "hotbed.integrations.swerex_server", "--port", str(port),
             "--auth-token", token, "--image", args.image, "--memory-mb", "512"],
            env=env, cwd=ROOT,
        )
        try:
            cluster.wait_workers(1, timeout=60)
            time.sleep(2)  # uvicorn start-up; the driver's is_alive waits too
            res = subprocess.run(
                [args.sweagent_python, "-c", DRIVER, str(port), token, str(repo)],
                env={k: v for k, v in os.environ.items() if not k.startswith("PYTHONPATH")},
                timeout=600,
            )
            return res.returncode
        finally:
            for proc in (server, worker):
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
