"""System commands: up, down, status, scheduler, worker, image build, images.

``hotbed scheduler ARGS`` and ``hotbed worker ARGS`` are ``python -m scheduler ARGS``
and ``python -m workers ARGS``: every argument after the command's name is the
daemon's (``--config FILE``, ``--help``), and so are its exit codes.

``hotbed up`` is the embedded single-machine default: it starts Redis if none answers
at the configured URL, dockerd if none runs, then one scheduler and one worker as child
processes it supervises (cli.supervise: restarted when they exit, as is the Redis it
started). Foreground; ``-d`` detaches it, ``hotbed down`` stops it. ``--cluster N``
runs it on a local N-primary Redis Cluster instead (cli.localcluster), which ``hotbed
down`` stops too. State lives in
``$HOTBED_HOME`` (default ``~/.hotbed``): redis data, logs, the pid file.

The Redis ``hotbed up`` starts is not open: unless ``HOTBED_REDIS_URL`` names a Redis
without a password (the caller's choice), it gets an admin password (the ``default``
user, kept hashed in ``$HOTBED_HOME/users.acl``, its ACL file, so tenants' users survive
a restart too), and the admin URL goes into the client config file (hotbed.config),
where the SDK and CLI find it. The scheduler and the worker then run as their own
least-privileged Redis users (hotbed.tenants), their URLs in their environment, not on
a command line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cli.main import add_listing_options, print_listing, run_async, with_client
from daemon import lifecycle
from hotbed.errors import HotbedError


def home() -> Path:
    p = Path(os.environ.get("HOTBED_HOME", Path.home() / ".hotbed"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def redis_url() -> str:
    from hotbed.client import default_url

    return default_url()


def _with_admin_password(url: str) -> str:
    """``url`` with the admin password of a Redis that ``hotbed up`` is about to start,
    written to the client config; ``url`` itself if it says how to authenticate, or
    names an open Redis on purpose (``HOTBED_REDIS_URL``), or one answers there."""
    from hotbed import config as client_config
    from hotbed import tenants
    from hotbed.client import default_prefix
    from hotbed.connection import RedisURL

    if os.environ.get("HOTBED_REDIS_URL") or RedisURL(url).password or _redis_answers(url):
        return url
    import secrets

    url = tenants.with_credentials(url, "default", secrets.token_urlsafe(24))
    where = client_config.write(client_config.ClientConfig(redis_url=url, prefix=default_prefix()))
    print(f"hotbed: Redis gets an admin password; the SDK and CLI find it in {where}", file=sys.stderr)
    return url


def _acl_config(url: str) -> list[str]:
    """redis-server arguments giving the default user ``url``'s password, from an ACL
    file in ``$HOTBED_HOME`` (so ``ACL SAVE`` keeps the users hotbed makes)."""
    import hashlib

    from hotbed.connection import RedisURL

    password = RedisURL(url).password
    if not password:
        return []
    acl = home() / "users.acl"
    # The default user follows the URL's password; the other users (tenants, daemons)
    # are kept as ACL SAVE wrote them.
    digest = hashlib.sha256(password.encode()).hexdigest()
    lines = [ln for ln in (acl.read_text().splitlines() if acl.exists() else []) if not ln.startswith("user default ")]
    fd = os.open(acl, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join([f"user default on #{digest} ~* &* +@all", *lines]) + "\n")
    return ["--aclfile", str(acl)]


def _daemon_env(url: str, worker: Any, scheduler: Any) -> tuple[dict[str, str], dict[str, str]]:
    """The scheduler's and the worker's environment: their own Redis users' URLs when
    ``url`` is an admin's (it has a password), else ``url`` for both."""
    from hotbed import tenants
    from hotbed.client import Client
    from hotbed.connection import RedisURL
    from hotbed.keys import Keys

    if not RedisURL(url).password:
        return {"HOTBED_REDIS_URL": url}, {"HOTBED_REDIS_URL": url}

    async def users() -> tuple[str, str]:
        async with Client(url) as c:
            s_user, s_pw = await tenants.provision_daemon_user(c.redis, Keys(scheduler.prefix), role="scheduler")
            w_user, w_pw = await tenants.provision_daemon_user(
                c.redis, Keys(worker.prefix), role="worker", worker_id=worker.resolved_id()
            )
        return tenants.with_credentials(url, s_user, s_pw), tenants.with_credentials(url, w_user, w_pw)

    s_url, w_url = run_async(users)
    return {"HOTBED_REDIS_URL": s_url}, {"HOTBED_REDIS_URL": w_url}


def _redis_answers(url: str, timeout: float = 1.0) -> bool:
    import redis

    try:
        r = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=2 * timeout)
        ok = bool(r.ping())
        r.close()
        return ok
    except redis.exceptions.RedisError:
        return False


# A control plane must refuse writes when full rather than evict state (docs/operations.md).
REDIS_MEMORY_FLAGS = ("--maxmemory", "2gb", "--maxmemory-policy", "noeviction")


def ensure_redis(url: str) -> bool:
    """Start a local Redis unless one answers at ``url``; True if it started one."""
    if _redis_answers(url):
        return False
    u = urlparse(url)
    if u.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise HotbedError(f"Redis at {url} does not answer (hotbed up only starts a local one)")
    server = shutil.which("redis-server")
    if server is None:
        raise HotbedError("redis-server not installed; run `make install` (scripts/host-setup.sh)")
    data = home() / "redis"
    data.mkdir(exist_ok=True)
    port = u.port or 6379
    print(f"hotbed: starting redis-server on 127.0.0.1:{port} (data in {data})", file=sys.stderr)
    subprocess.run(
        [server, *_acl_config(url), "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "yes",
         "--dir", str(data), "--appendonly", "yes", "--save", "", "--pidfile", str(home() / "redis.pid"),
         "--logfile", str(home() / "redis.log"), "--maxclients", "20000",
         *REDIS_MEMORY_FLAGS],
        check=True,
    )
    for _ in range(50):
        if _redis_answers(url):
            return True
        time.sleep(0.1)
    raise HotbedError(f"redis-server did not come up; see {home() / 'redis.log'}")


def _docker_ok() -> tuple[bool, bool]:
    try:
        out = subprocess.run(
            ["docker", "info", "--format", "{{json .Runtimes}}"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False, False
    return out.returncode == 0, b"runsc" in out.stdout


def ensure_dockerd() -> None:
    up, runsc = _docker_ok()
    if up and runsc:
        return
    if up and not runsc:
        raise HotbedError("dockerd runs without the runsc runtime; run `make install` to register gVisor")
    if shutil.which("dockerd") is None:
        raise HotbedError("dockerd not installed; run `make install` (scripts/host-setup.sh)")
    print("hotbed: starting dockerd", file=sys.stderr)
    log = open(home() / "dockerd.log", "ab")  # noqa: SIM115 - handed to the child
    subprocess.Popen(["dockerd"], stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    for _ in range(150):
        up, runsc = _docker_ok()
        if up:
            break
        time.sleep(0.2)
    if not (up and runsc):
        raise HotbedError(f"dockerd did not come up with runsc; see {home() / 'dockerd.log'}")


def ensure_cluster(primaries: int, replicas: int) -> str:
    """The URL of the local Redis Cluster under ``$HOTBED_HOME/cluster``, started if
    none runs there (cli.localcluster); ``hotbed down`` stops it."""
    from cli import localcluster

    root = home() / "cluster"
    current = localcluster.load(root)
    if current is not None and localcluster.running(current):
        return current.url
    localcluster.stop(root)
    print(f"hotbed: starting a local Redis Cluster ({primaries} primaries, {replicas} replicas each)",
          file=sys.stderr)
    try:
        cluster = localcluster.start(primaries, root, replicas=replicas)
    except localcluster.ClusterStartError as exc:
        raise HotbedError(str(exc)) from None
    print(f"hotbed: for the CLI and SDK: export HOTBED_REDIS_URL={cluster.url}", file=sys.stderr)
    return cluster.url


def cmd_up(args: argparse.Namespace) -> int:
    if args.cluster:
        url = os.environ["HOTBED_REDIS_URL"] = ensure_cluster(args.cluster, args.replicas)
        # The cluster is hotbed down's to stop; the supervisor watches no Redis of its own.
        started_redis = False
    else:
        url = _with_admin_password(redis_url())
        # Ours to keep running: started now, or by the `hotbed up -d` that started us.
        started_redis = ensure_redis(url) or (home() / "redis.pid").exists()
    if args.runtime == "docker":
        ensure_dockerd()
    if args.detach:
        return _detach(args)
    from cli import supervise
    from daemon.config import load_settings
    from hotbed import config as client_config
    from scheduler.config import SchedulerSettings
    from workers.config import WorkerSettings

    # The daemons serve the key space the client config names (unless told otherwise).
    if not os.environ.get("HOTBED_PREFIX") and (prefix := client_config.load().prefix):
        os.environ["HOTBED_PREFIX"] = prefix
    # Read here so bad settings fail `hotbed up` at once, not each child in turn.
    wsettings = load_settings(WorkerSettings, args.worker_config, overrides={"redis_url": url, "runtime": args.runtime})
    ssettings = load_settings(SchedulerSettings, args.scheduler_config, overrides={"redis_url": url})
    lifecycle.setup_logging(ssettings.log_format)
    sup = supervise.Supervisor(
        # A loaded box may be slow to answer: only a dead server is restarted.
        home(), redis_answers=(lambda: _redis_answers(url, timeout=5.0)) if started_redis else None,
        start_redis=lambda: ensure_redis(url),
    )
    s_env, w_env = _daemon_env(url, wsettings, ssettings)
    sup.add("scheduler", "scheduler", [*_config_arg(args.scheduler_config)], env=s_env)
    sup.add("worker", "workers", [
        *_config_arg(args.worker_config), "--runtime", args.runtime,
        "--worker-id", wsettings.resolved_id(),
    ], env=w_env)
    from daemon.config import redact_url

    ready = f"hotbed: up (redis {redact_url(url)}, worker {wsettings.resolved_id()}); Ctrl-C to stop"
    lifecycle.run(lambda: supervise.serve(sup, ready))
    return 0


def _config_arg(path: str | None) -> list[str]:
    return ["--config", path] if path else []


def _detach(args: argparse.Namespace) -> int:
    pidfile = home() / "hotbed.pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), 0)
            print(f"hotbed: already up (pid {pidfile.read_text().strip()})", file=sys.stderr)
            return 0
        except (OSError, ValueError):
            pidfile.unlink()
    logfile = home() / "hotbed.log"
    cmd = [sys.executable, "-m", "cli", "up", "--runtime", args.runtime]
    if args.cluster:
        cmd += ["--cluster", str(args.cluster), "--replicas", str(args.replicas)]
    if args.worker_config:
        cmd += ["--worker-config", args.worker_config]
    if args.scheduler_config:
        cmd += ["--scheduler-config", args.scheduler_config]
    with open(logfile, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    pidfile.write_text(str(proc.pid))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pidfile.unlink(missing_ok=True)
            raise HotbedError(f"hotbed exited at start; see {logfile}")
        if "hotbed: up" in logfile.read_text(errors="replace"):
            print(f"hotbed: up in the background (pid {proc.pid}, log {logfile})", file=sys.stderr)
            return 0
        time.sleep(0.1)
    proc.kill()
    pidfile.unlink(missing_ok=True)
    raise HotbedError(f"hotbed did not come up in 90s (stopped it); see {logfile}")


def cmd_down(args: argparse.Namespace) -> int:
    try:
        return _stop_hotbed()
    finally:
        from cli import localcluster

        if localcluster.stop(home() / "cluster"):
            print("hotbed: local Redis Cluster stopped", file=sys.stderr)


def _stop_hotbed() -> int:
    pidfile = home() / "hotbed.pid"
    if not pidfile.exists():
        print("hotbed: not running (no pid file)", file=sys.stderr)
        return 0
    pid = int(pidfile.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pidfile.unlink()
        return 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pidfile.unlink(missing_ok=True)
        raise HotbedError(f"hotbed (pid {pid}) did not stop within 60s of SIGTERM; killed it")
    pidfile.unlink(missing_ok=True)
    print("hotbed: down", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from hotbed.client import Client

    async def go(client: Client) -> int:
        from cli.fleet import snapshot

        frame = await snapshot(client)

        def table(workers: Sequence[dict[str, Any]]) -> None:
            print(f"{'WORKER':<20} {'RUNTIME':<8} {'CPU FREE':>9} {'MEM FREE':>10} {'SANDBOXES':>9} {'GPUS':<12} HEARTBEAT")
            for w in workers:
                runtime = w["runtime"] + ("*" if w["kind"] == "simulated" else "")
                gpus = ",".join(w["gpu_models"]) or "-"
                print(
                    f"{w['id']:<20} {runtime:<8} {w['cpu_free']:>9.2f} "
                    f"{w['mem_free']:>8}Mi {w['sandboxes']:>9} {gpus[:12]:<12} {w['age']:.1f}s ago"
                )
            print(f"\nsandboxes live: {frame.live}   request backlog: {frame.backlog}")
            if not workers:
                print("no workers: start one with `hotbed up` or `hotbed worker`")
            from cli.supervise import status_lines

            for line in status_lines(home()):
                print(line)

        return await print_listing(args, frame.workers, key=lambda w: w["id"], table=table, as_json=frame)

    return with_client(go)


def cmd_image_build(args: argparse.Namespace) -> int:
    from daemon import images

    up, _runsc = _docker_ok()
    if not up:
        raise HotbedError("dockerd does not answer (`docker info` failed); `hotbed up` starts it")

    def progress(line: str) -> None:
        print(f"hotbed: {line}", file=sys.stderr, flush=True)

    if args.file or args.kind not in ("base", "busybox"):
        return _build_dockerfile(args, progress)

    async def go() -> int:
        if args.kind == "busybox":
            await images.build_busybox(args.tag or images.BUSYBOX_IMAGE, progress=progress)
        else:
            if not args.force and await images.image_exists(args.tag or images.BASE_IMAGE):
                progress(f"{args.tag or images.BASE_IMAGE} exists (use --force to rebuild)")
                return 0
            await images.build_base(args.tag or images.BASE_IMAGE, progress=progress)
        return 0

    return run_async(go)


def _build_dockerfile(args: argparse.Namespace, progress: Any) -> int:
    """``-f FILE -t NAME DIR``: the engine's build output on stderr as it streams in,
    the image's name (or id) on stdout at the end."""
    from daemon import images

    context = args.kind if args.kind not in ("base", "busybox") else None
    if context is None or not Path(context).is_dir():
        raise HotbedError(f"image build: want a context directory (`-f Dockerfile -t NAME DIR`), got {args.kind!r}")

    def line(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    async def go() -> int:
        image_id = await images.build_dockerfile(context, tag=args.tag, dockerfile=args.file, progress=line)
        progress(f"built {args.tag or image_id}")
        print(args.tag or image_id)
        return 0

    return run_async(go)


def cmd_images(args: argparse.Namespace) -> int:
    from hotbed.client import Client

    async def go(client: Client) -> int:
        from hotbed import records

        r = client.redis
        wids = [m.decode() if isinstance(m, bytes) else str(m) for m in await r.zrange(client.keys.workers, 0, -1)]
        raws = [await r.get(client.keys.worker_images(wid)) for wid in wids]
        nodes = []
        for wid, raw in zip(wids, raws, strict=True):
            held = records.images_from_value(raw)
            if held is None:
                continue
            nodes.append((wid, held))

        def table(nodes: Sequence[tuple[str, Any]]) -> None:
            print(f"{'WORKER':<20} {'IMAGE':<48} {'ID':<12} {'SIZE':>9}")
            for wid, held in nodes:
                for i in held.images:
                    print(f"{wid:<20} {i.name:<48} {i.id.removeprefix('sha256:')[:12]:<12} {i.size / 1e6:>7.1f}MB")
                if held.truncated:
                    print(f"{wid:<20} (more not listed)")
            if not nodes:
                print("no worker advertises images (docker-runtime workers do)")

        # -q lists each image name once, over all workers.
        names = sorted({i.name for _, held in nodes for i in held.images})
        if args.quiet:
            return await print_listing(args, names, key=str, table=print)
        return await print_listing(args, nodes, key=str, table=table, as_json=[
            {"worker": wid, "truncated": held.truncated, "at": held.at,
             "images": [
                 {"name": i.name, "id": i.id, "size": i.size, "created": i.created}
                 for i in held.images
             ]}
            for wid, held in nodes
        ])

    return with_client(go)


def cmd_scheduler(args: argparse.Namespace) -> int:
    from scheduler.__main__ import main as scheduler_main

    # The daemon's own exit codes (2 bad settings, 1 failure) reach the shell unchanged.
    scheduler_main(args.rest)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.__main__ import main as worker_main

    worker_main(args.rest)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("up", help="start Redis, dockerd, a scheduler and a worker on this machine")
    p.add_argument("--detach", "-d", action="store_true", help="run in the background")
    p.add_argument("--runtime", default="docker", choices=["docker", "runsc", "sim", "process"],
                   help="sandbox runtime: docker (gVisor, default), runsc (gVisor without "
                        "dockerd), sim (no sandboxes), process (unisolated, development only)")
    p.add_argument("--worker-config", metavar="FILE", help="the worker's TOML settings")
    p.add_argument("--scheduler-config", metavar="FILE", help="the scheduler's TOML settings")
    p.add_argument("--cluster", type=int, default=0, metavar="N",
                   help="run on a local Redis Cluster of N (>= 3) primaries instead of one Redis")
    p.add_argument("--replicas", type=int, default=0, metavar="R",
                   help="with --cluster: replicas per primary (default 0)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop what `hotbed up -d` started, and its local Redis Cluster "
                                    "(a standalone Redis and dockerd keep running)")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="workers, their free capacity, live sandboxes")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print workers, pools and counts as one JSON object")
    out.add_argument("--quiet", "-q", action="store_true", help="print only worker ids, one per line")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("image", help="sandbox images")
    isub = p.add_subparsers(dest="image_cmd", metavar="ACTION", required=True)
    b = isub.add_parser(
        "build", help="build an image from a Dockerfile (-f FILE -t NAME DIR), or the stock "
                      "hotbed/base (Debian + python3 + git) or hotbed/busybox",
    )
    b.add_argument("kind", nargs="?", default="base", metavar="base|busybox|DIR",
                   help="a stock image (default base), or a build context directory")
    b.add_argument("--file", "-f", metavar="FILE", help="the Dockerfile (default DIR/Dockerfile)")
    b.add_argument("--tag", "-t", help="image name (default hotbed/base or hotbed/busybox)")
    b.add_argument("--force", action="store_true", help="rebuild even if it exists")
    b.set_defaults(func=cmd_image_build)

    p = sub.add_parser("images", help="the images each worker holds, as it advertises them")
    add_listing_options(p, "image names (over all workers)")
    p.set_defaults(func=cmd_images)

    # Everything after the name goes to the daemon's parser (cli.main.split_passthrough).
    p = sub.add_parser("scheduler", help="run the scheduler daemon (--config FILE; --help lists its options)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the daemon's arguments: --config FILE, ...")
    p.set_defaults(func=cmd_scheduler)

    p = sub.add_parser("worker", help="run the worker agent (--config FILE; --help lists its options)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the daemon's arguments: --config FILE, ...")
    p.set_defaults(func=cmd_worker)


