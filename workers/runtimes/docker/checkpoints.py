"""Memory snapshots: checkpoint, restore, pause and resume.

dockerd drives ``runsc checkpoint``/``restore`` (Engine API, experimental mode). A
snapshot directory holds ``checkpoint/`` (runsc's image: memory, processes and the
sandbox's in-memory overlay) and ``container.json`` (what restore re-creates).
Restores take one of two roads:

* when the container's runtime is hotbed's runsc wrapper, the worker marks the new
  container (RESTORE_MARKS/<id> = the image directory) and starts it plainly; the
  wrapper turns runsc's ``create`` into ``runsc restore`` from that directory. No copy,
  and containerd never imports the image (0.28 s instead of 0.72 s here).
* with runsc alone, dockerd only restores from
  ``<root>/containers/<id>/checkpoints/<name>``: the files are hard-linked there, plus
  a unique file (RESTORE_ID), as containerd refuses two parallel restores of
  byte-identical checkpoints ("content ... already exists"). containerd's own copy of
  the checkpoint is removed after each such start (:func:`sweep_restore_copies`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import anyio
from aiodocker.exceptions import DockerError

from hotbed.errors import RuntimeFailure, SandboxNotFound, SandboxNotRunning
from hotbed.protocol import SandboxSpec
from workers.runtimes.base import LABEL_NETWORK, Placed
from workers.runtimes.docker.engine import API_TIMEOUT_S, Engine
from workers.runtimes.docker.lifecycle import (
    apply_network,
    container_config,
    create_container,
    created,
    prepare_network,
    removed_on_failure,
)

# Checkpoint name a paused sandbox's state is kept under, in its container's folder.
PAUSED_CHECKPOINT = "hotbed-paused"
# A file with a token unique to one restore through dockerd, in the checkpoint it starts
# from: containerd refuses two parallel restores of byte-identical checkpoints
# ("content ... already exists"), and the token names containerd's copy of it.
RESTORE_ID = "hotbed-restore-id"
# containerd unpacks each checkpoint dockerd restores from into a directory of its own,
# ``ctrd-checkpoint*`` under its $XDG_RUNTIME_DIR (unset for the system service: the
# temporary directory), and never removes it: about a megabyte per restore, for good.
CONTAINERD_COPIES = Path("/tmp")
# A copy older than this belongs to a restore that has ended, whoever ran it: a restore
# ends within its API deadline.
STALE_COPY_S = 600.0
# Where the worker marks a container for restore by hotbed's runsc wrapper
# (deploy/runsc/runsc-hotbed reads the same path): <container id> -> image directory.
RESTORE_MARKS = Path("/run/hotbed/restore")


def prepare_marks() -> None:
    """Make the restore-mark folder; drop marks a worker that died mid-restore left.
    Blocking: run it in a thread."""
    RESTORE_MARKS.mkdir(parents=True, exist_ok=True)
    old = time.time() - 600
    for mark in RESTORE_MARKS.iterdir():
        try:
            if mark.stat().st_mtime < old:
                mark.unlink()
        except OSError:
            pass


async def checkpoint_post(engine: Engine, container_id: str, name: str, *, exit: bool, sandbox_id: str) -> None:
    """Checkpoint through dockerd, retrying containerd's "content ... already exists".

    A second checkpoint of one container within about two seconds of the first
    collides with the first one's blobs until containerd's garbage collector has run.
    """
    delay = 0.25
    for attempt in range(8):
        try:
            await engine.post(
                f"containers/{container_id}/checkpoints",
                body={"CheckpointID": name, "Exit": exit},
                sandbox_id=sandbox_id,
            )
            return
        except RuntimeFailure as exc:
            if "already exists" not in exc.message or attempt == 7:
                raise
            await anyio.sleep(delay)
            delay = min(delay * 1.5, 1.5)


def networked(info: dict[str, Any]) -> bool:
    return bool((info.get("Config") or {}).get("Labels", {}).get(LABEL_NETWORK))


async def checkpoint_and_stop(engine: Engine, info: dict[str, Any], name: str, *, sandbox_id: str) -> Path:
    """Checkpoint a sandbox with a network, stopping it; returns the image directory.

    Never with runsc's --leave-running: that restarts the sandbox inside the checkpoint
    call, where gVisor's network stack cannot be set up again (the namespace's address
    was handed to the first one, and runsc's own root-namespace test misfires: see
    deploy/runsc/runsc-hotbed). The caller starts it again from the image (dockerd makes
    a fresh namespace), as resume does.
    """
    made: Path = engine.root / "containers" / str(info["Id"]) / "checkpoints" / name
    try:
        await checkpoint_post(engine, info["Id"], name, exit=True, sandbox_id=sandbox_id)
    except RuntimeFailure:
        # containerd's "already exists" after runsc wrote the image and stopped the
        # sandbox: the checkpoint is there (a retry would find nothing running).
        stopped = not (await engine.show(sandbox_id))["State"]["Running"]
        if not (stopped and await anyio.Path(made, "checkpoint.img").exists()):
            raise
    # Stopped, its address is free: whoever dockerd gives it next must not inherit
    # these rules. They come back when it starts again.
    await engine.networks.remove(sandbox_id)
    return made


async def restart_from(engine: Engine, info: dict[str, Any], image: Path, *, sandbox_id: str) -> None:
    """Start a stopped sandbox again from its checkpoint ``image``, then its rules."""
    if info["HostConfig"].get("Runtime") in engine.wrapped:
        await start_restoring(engine, info["Id"], image, sandbox_id=sandbox_id)
    else:
        await start_from_checkpoint(engine, info["Id"], image, sandbox_id=sandbox_id)
    if networked(info):
        # Started again: its address may have changed, its policy has not.
        await engine.networks.reapply(sandbox_id, await engine.show(sandbox_id))


async def checkpoint(engine: Engine, sandbox_id: str, dest: Path, *, leave_running: bool) -> int:
    info = await engine.show(sandbox_id)
    if not info["State"]["Running"]:
        raise SandboxNotRunning(f"sandbox {sandbox_id} is not running", sandbox_id=sandbox_id)
    name = f"ck-{secrets.token_hex(6)}"
    restart = leave_running and networked(info)
    if restart:
        made = await checkpoint_and_stop(engine, info, name, sandbox_id=sandbox_id)
    else:
        await checkpoint_post(engine, info["Id"], name, exit=not leave_running, sandbox_id=sandbox_id)
        made = engine.root / "containers" / info["Id"] / "checkpoints" / name
    cfg = info["Config"]
    # The image's own env only: what the sandbox was given (API keys) is no part of a
    # snapshot that other sandboxes are restored from.
    with anyio.fail_after(API_TIMEOUT_S):
        image = await engine.docker.images.inspect(info["Image"])
    image_env = set((image.get("Config") or {}).get("Env") or [])
    meta = {
        "Image": info["Image"], "Cmd": cfg.get("Cmd"), "User": cfg.get("User") or "",
        "Env": [e for e in cfg.get("Env") or [] if e in image_env],
        "WorkingDir": cfg.get("WorkingDir") or "",
    }

    def store() -> int:
        # Readable by the worker (root) alone: a snapshot holds a sandbox's memory.
        dest.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(dest, 0o700)
        shutil.move(str(made), str(dest / "checkpoint"))
        for f in (dest / "checkpoint").rglob("*"):
            os.chmod(f, 0o700 if f.is_dir() else 0o600)
        fd = os.open(dest / "container.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(meta))
        return sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())

    size = await anyio.to_thread.run_sync(store)
    if restart:
        # Open TCP connections were dropped (runsc-net's --net-disconnect-ok).
        await restart_from(engine, info, dest / "checkpoint", sandbox_id=sandbox_id)
    return size


async def restore(engine: Engine, placed: Placed, spec: SandboxSpec, src: Path) -> None:
    sid = placed.sandbox_id
    try:
        meta = json.loads(await anyio.Path(src, "container.json").read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeFailure(f"snapshot {src} unreadable: {exc}", sandbox_id=sid) from None
    allows = await prepare_network(engine, placed, spec)
    config = container_config(engine, placed, spec, meta["Image"], cmd=meta["Cmd"])
    config["User"] = meta["User"]
    config["Env"] = list(meta["Env"]) + [e for e in config["Env"] if e.startswith("NVIDIA_")]
    if meta["WorkingDir"]:
        config["WorkingDir"] = meta["WorkingDir"]
    else:
        config.pop("WorkingDir", None)
    async with removed_on_failure(engine, sid, "restore"):
        container = await create_container(engine, config, sid)
        created(engine, placed, container.id)
        if config["HostConfig"]["Runtime"] in engine.wrapped:  # not GPU's runsc-nvproxy
            await start_restoring(engine, container.id, src / "checkpoint", sandbox_id=sid)
            await apply_network(engine, sid, spec, allows)
            return
        target = engine.root / "containers" / container.id / "checkpoints" / "restore"

        def link() -> None:
            target.mkdir(parents=True)
            for f in (src / "checkpoint").iterdir():
                try:
                    os.link(f, target / f.name)
                except OSError:
                    shutil.copy2(f, target / f.name)

        await anyio.to_thread.run_sync(link)
        await start_from_checkpoint(engine, container.id, target, sandbox_id=sid)
        await apply_network(engine, sid, spec, allows)


async def pause(engine: Engine, sandbox_id: str) -> None:
    info = await engine.show(sandbox_id)
    if networked(info):
        await checkpoint_and_stop(engine, info, PAUSED_CHECKPOINT, sandbox_id=sandbox_id)
        return
    # Checkpoint leaving it running, then stop it: a checkpoint with Exit=true that
    # trips containerd's "already exists" has already stopped the container, and a
    # retry would find nothing to checkpoint. What the sandbox does in the few
    # milliseconds between the two steps is not kept, as if it had paused earlier.
    await checkpoint_post(engine, info["Id"], PAUSED_CHECKPOINT, exit=False, sandbox_id=sandbox_id)
    container = engine.docker.containers.container(info["Id"])
    try:
        with anyio.fail_after(API_TIMEOUT_S):
            await container.kill(signal="SIGKILL")
            await container.wait()
    except DockerError as exc:
        raise engine.translate(exc, sandbox_id) from None


async def resume(engine: Engine, sandbox_id: str) -> None:
    info = await engine.show(sandbox_id)
    if info["State"]["Running"]:
        return
    ck = engine.root / "containers" / info["Id"] / "checkpoints" / PAUSED_CHECKPOINT
    await restart_from(engine, info, ck, sandbox_id=sandbox_id)
    # runsc has the image open by now: removing the files frees them when it is done.
    await anyio.to_thread.run_sync(lambda: shutil.rmtree(ck, ignore_errors=True))


async def start_restoring(engine: Engine, container_id: str, image: Path, *, sandbox_id: str) -> None:
    """Start ``container_id`` as a restore of ``image`` through the runsc wrapper."""
    mark = RESTORE_MARKS / container_id

    def put() -> None:
        RESTORE_MARKS.mkdir(parents=True, exist_ok=True)
        mark.write_text(str(image))

    def clear() -> None:
        for m in (mark, mark.with_name(mark.name + ".restored")):
            m.unlink(missing_ok=True)

    await anyio.to_thread.run_sync(put)
    try:
        await engine.start(container_id, sandbox_id=sandbox_id)
    except BaseException:
        # A failed restore leaves its mark: the next plain start must not restore.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(clear)
        raise


async def is_paused(engine: Engine, sandbox_id: str) -> bool:
    try:
        info = await engine.show(sandbox_id)
    except SandboxNotFound:
        return False
    ck = engine.root / "containers" / info["Id"] / "checkpoints" / PAUSED_CHECKPOINT
    return not info["State"]["Running"] and await anyio.Path(ck).is_dir()


async def start_from_checkpoint(engine: Engine, container_id: str, image: Path, *, sandbox_id: str) -> None:
    """``docker start --checkpoint``: dockerd's road, for runsc without the wrapper.
    ``image`` is the container's checkpoint folder; containerd's copy of it is removed
    once the start has returned (runsc holds what it still reads open)."""
    token = secrets.token_hex(16)
    await anyio.to_thread.run_sync((image / RESTORE_ID).write_text, token)
    try:
        await engine.start(container_id, params={"checkpoint": image.name}, sandbox_id=sandbox_id)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(sweep_restore_copies, {token})


def sweep_restore_copies(finished: Collection[str] = (), *, root: Path = CONTAINERD_COPIES) -> int:
    """Remove containerd's copies of the checkpoints hotbed restored from: those of the
    restores whose token is in ``finished``, and any older than STALE_COPY_S (a worker
    that died mid-restore left it). Never one without a hotbed token, nor a fresh one
    of a restore in flight. Returns how many were removed. Blocking: run it in a thread."""
    old = time.time() - STALE_COPY_S
    removed = 0
    for copy in root.glob("ctrd-checkpoint*"):
        try:
            token = (copy / RESTORE_ID).read_text().strip()
            if token not in finished and copy.stat().st_mtime >= old:
                continue
        except OSError:
            continue  # not ours, or gone already
        shutil.rmtree(copy, ignore_errors=True)
        removed += 1
    return removed
