"""Fleet commands: ``config check``, ``service install``, ``top``.

``hotbed config check FILE`` validates a daemon's TOML the way the daemon will at
start (HOTBED_* variables of this shell included): exit 0 and one ``ok`` line, or
exit 2 and one ``error:`` line. Which daemon: ``--daemon``, else the file name
(``*scheduler*`` / ``*worker*``), else whichever of the two accepts it.

``hotbed service install`` writes the systemd units of deploy/systemd with this
installation's interpreter, example configs into /etc/hotbed (never overwriting), and
runs ``systemctl daemon-reload`` + ``enable`` when systemd is running.

``hotbed top`` is a live view of the fleet from Redis alone: workers (capacity used,
GPUs, live sandboxes, heartbeat age), warm pools (ready / target), the request
backlog and the request rate (from the stream's ``entries-added`` counter), redrawn in
place every ``--interval`` seconds; ``--once`` prints one frame and exits.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from cli.main import print_json, run_async
from hotbed import protocol
from hotbed.errors import ConfigError, HotbedError
from hotbed.records import capacity_from_hash, pool_config_from_hash

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNITS = ("hotbed-scheduler.service", "hotbed-worker.service")
# Drop-ins that lower the container engine's CPU priority (sandboxes inherit it), so
# a burst of sandbox work never starves the control plane on the node.
ENGINE_DROPINS = ("docker.service.d/10-hotbed-priority.conf", "containerd.service.d/10-hotbed-priority.conf")
DEFAULT_PYTHON = "/opt/hotbed/.venv/bin/python"

# ------------------------------------------------------------------ config check


def _settings_classes() -> dict[str, type[msgspec.Struct]]:
    from scheduler.config import SchedulerSettings
    from workers.config import WorkerSettings

    return {"scheduler": SchedulerSettings, "worker": WorkerSettings}


def check_config(path: str, daemon: str | None = None) -> str:
    """Which daemon ``path`` configures; raises ConfigError (one line) when it is bad."""
    from daemon.config import load_settings

    classes = _settings_classes()
    if daemon is None:
        name = Path(path).name.lower()
        daemon = next((d for d in classes if d in name), None)
    if daemon is not None:
        load_settings(classes[daemon], path)
        return daemon
    errors = []
    for d, cls in classes.items():
        try:
            load_settings(cls, path)
            return d
        except ConfigError as exc:
            errors.append(f"as {d} config: {exc}")
    raise ConfigError("; ".join(errors))


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        daemon = check_config(args.file, args.daemon)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"ok: {args.file} is a valid {daemon} config")
    return 0


# --------------------------------------------------------------- service install


def render_unit(name: str, python: str, config_dir: Path = Path("/etc/hotbed")) -> str:
    text = (DEPLOY / "systemd" / name).read_text()
    text = text.replace(DEFAULT_PYTHON, python)
    return text.replace("/etc/hotbed/", f"{config_dir}/")


def install_service(
    *, dest: Path, config_dir: Path, python: str, enable: bool, now: bool
) -> list[str]:
    """Write units and example configs; returns what was done, one line each."""
    if not (DEPLOY / "systemd").is_dir():
        raise HotbedError(f"unit templates not found in {DEPLOY}; install from a source checkout")
    done = []
    dest.mkdir(parents=True, exist_ok=True)
    for unit in UNITS:
        (dest / unit).write_text(render_unit(unit, python, config_dir))
        done.append(f"wrote {dest / unit}")
    for dropin in ENGINE_DROPINS:
        (dest / dropin).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DEPLOY / "systemd" / dropin, dest / dropin)
        done.append(f"wrote {dest / dropin}")
    config_dir.mkdir(parents=True, exist_ok=True)
    for name in ("scheduler.toml", "worker.toml"):
        target = config_dir / name
        if target.exists():
            done.append(f"kept {target}")
        else:
            shutil.copyfile(DEPLOY / "config" / name, target)
            done.append(f"wrote {target}")
    if enable:
        if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
            done.append("systemd is not running here: enable with `systemctl enable hotbed-scheduler hotbed-worker`")
            return done
        subprocess.run(["systemctl", "daemon-reload"], check=True)
        subprocess.run(["systemctl", "enable", *(["--now"] if now else []), *UNITS], check=True)
        done.append("enabled " + " ".join(UNITS) + (" and started them" if now else ""))
    return done


def cmd_service_install(args: argparse.Namespace) -> int:
    python = args.python or sys.executable
    try:
        for line in install_service(
            dest=Path(args.dest), config_dir=Path(args.config_dir), python=python,
            enable=not args.no_enable, now=args.now,
        ):
            print(line)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise HotbedError(f"service install failed: {exc}") from None
    return 0


# ------------------------------------------------------------------------- top


class Frame(msgspec.Struct, kw_only=True):
    at: float
    workers: list[dict[str, Any]]
    pools: list[dict[str, Any]]
    backlog: int
    added: int
    live: int


async def snapshot(client: Any) -> Frame:
    """One consistent-enough read of the fleet (three pipelined round trips)."""
    keys, r = client.keys, client.redis
    async with r.pipeline(transaction=False) as pipe:
        pipe.zrange(keys.workers, 0, -1, withscores=True)
        pipe.xlen(keys.requests)
        pipe.zcard(keys.sandboxes)
        pipe.smembers(keys.pools)
        beats, backlog, live, pools = await pipe.execute()
    try:
        info = await r.xinfo_stream(keys.requests)
        added = int(info.get("entries-added", info.get(b"entries-added", 0)) or 0)
    except Exception:  # no stream yet, or Redis < 7
        added = 0
    wids = [m.decode() for m, _ in beats]
    pool_names = sorted(p.decode() for p in pools)
    async with r.pipeline(transaction=False) as pipe:
        for wid in wids:
            pipe.get(keys.worker_info(wid))
            pipe.hgetall(keys.worker_cap(wid))
        for n in pool_names:
            pipe.hgetall(keys.pool_conf(n))
            pipe.llen(keys.pool_ready(n))
        rows = await pipe.execute()
    now = time.time()
    workers = []
    for i, (wid, (_m, score)) in enumerate(zip(wids, beats, strict=True)):
        raw, cap = rows[2 * i], rows[2 * i + 1]
        if not raw:
            continue
        w = protocol.decode_worker_info(raw)
        free = capacity_from_hash(cap)
        taken = set(free.gpu_taken)
        gpus_used = sum(1 for g in w.gpus if g.uuid in taken)
        workers.append({
            "id": wid, "runtime": w.runtime, "kind": w.kind,
            "cpu": w.cpu_millis / 1000, "cpu_free": free.cpu_free / 1000,
            "mem": w.memory_mb, "mem_free": free.mem_free,
            "sandboxes": free.sandboxes,
            "gpus": len(w.gpus), "gpus_used": gpus_used,
            "gpu_models": sorted({g.model for g in w.gpus}),
            "tags": w.tags, "age": max(0.0, now - score / 1000),
        })
    base = 2 * len(wids)
    out_pools = []
    for j, n in enumerate(pool_names):
        conf, ready = pool_config_from_hash(rows[base + 2 * j]), rows[base + 2 * j + 1]
        if conf is None:
            continue
        out_pools.append({
            "name": n, "template": conf.template, "target": conf.size, "ready": int(ready),
        })
    return Frame(at=now, workers=workers, pools=out_pools, backlog=backlog, added=added, live=live)


def render(frame: Frame, prev: Frame | None) -> str:
    rate = ""
    if prev is not None and frame.at > prev.at and frame.added >= prev.added:
        rate = f"{(frame.added - prev.added) / (frame.at - prev.at):.1f}/s"
    lines = [
        f"hotbed top  {time.strftime('%H:%M:%S', time.localtime(frame.at))}  "
        f"workers {len(frame.workers)}  live sandboxes {frame.live}  "
        f"backlog {frame.backlog}  requests {frame.added}" + (f" ({rate})" if rate else ""),
        "",
        f"{'WORKER':<20} {'RUNTIME':<10} {'CPU used/total':>15} {'MEM MiB used/total':>19} "
        f"{'SANDBOXES':>9} {'GPUS used/total':>15}  {'HEARTBEAT':>9}  GPU MODELS / TAGS",
    ]
    for w in sorted(frame.workers, key=lambda w: w["id"]):
        cpu = f"{w['cpu'] - w['cpu_free']:.1f}/{w['cpu']:g}"
        mem = f"{w['mem'] - w['mem_free']}/{w['mem']}"
        gpus = f"{w['gpus_used']}/{w['gpus']}" if w["gpus"] else "-"
        extra = ",".join(w["gpu_models"])
        if w["tags"]:
            extra += (" " if extra else "") + " ".join(f"{k}={v}" for k, v in sorted(w["tags"].items()))
        runtime = w["runtime"] + ("!" if w["kind"] == "unisolated" else "")
        lines.append(
            f"{w['id'][:20]:<20} {runtime[:10]:<10} {cpu:>15} {mem:>19} {w['sandboxes']:>9} "
            f"{gpus:>15}  {w['age']:>8.1f}s  {extra}"
        )
    if frame.pools:
        lines += ["", f"{'POOL':<40} {'TEMPLATE':<20} {'READY/TARGET':>12}"]
        for p in frame.pools:
            lines.append(f"{p['name'][:40]:<40} {p['template'][:20]:<20} {p['ready']:>5}/{p['target']:<6}")
    return "\n".join(lines) + "\n"


def cmd_top(args: argparse.Namespace) -> int:
    from hotbed.client import Client

    async def go() -> int:
        import anyio

        prev: Frame | None = None
        async with Client() as client:
            while True:
                frame = await snapshot(client)
                if args.json:
                    print_json(frame)
                    return 0
                text = render(frame, prev)
                if args.once:
                    sys.stdout.write(text)
                    return 0
                # Home + clear to end: redraw in place without scrolling.
                sys.stdout.write("\x1b[H\x1b[J" + text)
                sys.stdout.flush()
                prev = frame
                await anyio.sleep(args.interval)

    try:
        return run_async(go)
    except KeyboardInterrupt:
        return 0


# ------------------------------------------------------------------- register


def register(sub: Any) -> None:
    p = sub.add_parser("config", help="daemon settings files")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    c = csub.add_parser("check", help="validate a scheduler or worker TOML (exit 2 if bad)")
    c.add_argument("file", help="the TOML file")
    c.add_argument("--daemon", choices=["scheduler", "worker"], help="default: from the file name")
    c.set_defaults(func=cmd_config_check)

    p = sub.add_parser("service", help="systemd units for the scheduler and worker")
    ssub = p.add_subparsers(dest="service_command", metavar="ACTION", required=True)
    s = ssub.add_parser("install", help="install (and enable) hotbed-scheduler and hotbed-worker")
    s.add_argument("--dest", default="/etc/systemd/system", help="unit directory")
    s.add_argument("--config-dir", default="/etc/hotbed", help="where the TOML configs live")
    s.add_argument("--python", help=f"interpreter with hotbed installed (default: {sys.executable})")
    s.add_argument("--no-enable", action="store_true", help="only write files")
    s.add_argument("--now", action="store_true", help="also start the services")
    s.set_defaults(func=cmd_service_install)

    p = sub.add_parser("top", help="live view of workers, GPUs, pools and request rates")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between frames (default 1)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--json", action="store_true", help="print one frame as JSON and exit")
    p.set_defaults(func=cmd_top)
