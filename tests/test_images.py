"""Images: pulls from a registry, Dockerfile builds, advertising, image-aware placement.

Everything stays on loopback: a private ``docker-registry`` (Debian's package, with a
login) on a free port, dockerd's build API, real scheduler + docker/runsc worker for the
pulls; for placement, a real scheduler and two worker agents whose runtimes are test
doubles holding different images (two agents on one dockerd would hold the same ones).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import pytest
from conftest import BUSYBOX_IMAGE, _free_port, image_exists, running_stack
from doubles import RecordingRuntime

import hotbed
from hotbed import records
from hotbed.errors import CapacityExhausted, ImageNotFound
from hotbed.protocol import CreateSandbox, Resources, SandboxCreated, SandboxSpec
from hotbed.records import HeldImage, HeldImages, image_ref, image_registry
from scheduler.config import SchedulerSettings
from scheduler.placement import WorkerView, image_fit
from scheduler.service import Scheduler
from workers.agent import WorkerAgent
from workers.config import WorkerSettings
from workers.images import login_from_config
from workers.runtimes.base import Placed

pytestmark = pytest.mark.anyio

USER = "hotbed"
PASSWORD = "hotbed-registry-secret"
# bcrypt (cost 4, so each authenticated request stays cheap) of PASSWORD.
HTPASSWD = f"{USER}:$2b$04$HJJ5ZnA77kKXqEcJ8WJP.OjHUSKrMJ2e87vwJa.yanQYjiPJdqDxa\n"


def docker(*args: str, config: str | None = None, input: str | None = None) -> str:
    cmd = ["docker", *(["--config", config] if config else []), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=120)
    assert res.returncode == 0, f"{' '.join(args)}: {res.stderr}"
    return res.stdout


# --------------------------------------------------------------------- unit


def test_image_names_normalize_as_dockerd_lists_them() -> None:
    assert image_ref("busybox") == "busybox:latest"
    assert image_ref("docker.io/library/python:3.11") == "python:3.11"
    assert image_ref("127.0.0.1:5000/team/img") == "127.0.0.1:5000/team/img:latest"
    assert image_ref("localhost/x:1") == "localhost/x:1"
    assert image_registry("hotbed/busybox") == "docker.io"
    assert image_registry("127.0.0.1:5000/team/img:v1") == "127.0.0.1:5000"
    assert image_registry("registry.example.com/a") == "registry.example.com"


def test_logins_come_from_a_docker_config_and_never_print() -> None:
    auth = base64.b64encode(b"u:p@ss:word").decode()
    text = json.dumps({"auths": {"https://reg.example:5000": {"auth": auth}, "other": {}}})
    assert login_from_config(text, "reg.example:5000", source="f") == ("u", "p@ss:word")
    assert login_from_config(text, "elsewhere", source="f") is None
    s = msgspec.convert({"registry_auth": {"r:1": {"username": "u", "password": PASSWORD}},
                         "snapshot_token": PASSWORD, "redis_url": f"redis://:{PASSWORD}@h:1/0"}, WorkerSettings)
    assert PASSWORD not in repr(s) and PASSWORD not in str(s)
    with pytest.raises(msgspec.ValidationError, match="registry"):
        msgspec.convert({"registries": ["http://r/x"]}, WorkerSettings)


def test_image_fit_prefers_holders_and_excludes_who_cannot_get_it() -> None:
    from hotbed.protocol import WorkerInfo

    def view(wid: str, images: set[str] | None, registries: list[str] = ()) -> WorkerView:  # type: ignore[assignment]
        info = WorkerInfo(id=wid, host="h", runtime="docker", cpu_millis=1000, memory_mb=1024,
                          registries=list(registries))
        return WorkerView(info=info, images=None if images is None else frozenset(images))

    ws = [view("a", {"x:latest"}), view("b", set(), ["reg:1"]), view("c", set())]
    assert image_fit(ws, "x") == ({"a"}, {"a"})
    assert image_fit(ws, "reg:1/y:2") == (set(), {"b"})
    # Nobody can get it: only a worker's own check can say (it may have just been built).
    assert image_fit(ws, "nowhere/z") == (set(), None)
    # A worker that advertises nothing may hold anything.
    assert image_fit([*ws, view("d", None)], "x") == ({"a"}, {"a", "d"})
    assert image_fit([view("s", None)], "x") == (set(), None)


# ----------------------------------------------------------------- registry


@pytest.fixture(scope="module")
def registry() -> Iterator[str]:
    """docker-registry on a free loopback port, with a login; stopped on teardown."""
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.fail("docker-registry not installed: run `make test` (scripts/host-setup.sh installs it)")
    port = _free_port()
    tmp = Path(tempfile.mkdtemp(prefix="hotbed-registry-"))
    (tmp / "htpasswd").write_text(HTPASSWD)
    (tmp / "config.yml").write_text(
        "version: 0.1\nlog:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        f"auth:\n  htpasswd:\n    realm: hotbed-test\n    path: {tmp / 'htpasswd'}\n"
    )
    proc = subprocess.Popen([binary, "serve", str(tmp / "config.yml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        import socket

        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("docker-registry did not start")
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def pushed(registry: str) -> Iterator[tuple[str, str]]:
    """(image, token): an image only the registry holds, whose /token is ``token``."""
    token = secrets.token_hex(8)
    image = f"{registry}/hotbed-test/pulled-{token}:v1"
    ctx = Path(tempfile.mkdtemp(prefix="hotbed-push-"))
    config = ctx / "docker-config"
    config.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {BUSYBOX_IMAGE}\nRUN echo {token} > /token\n")
    try:
        docker("build", "-q", "-t", image, str(ctx))
        # A private client config: the login never lands in the host's ~/.docker.
        docker("login", "-u", USER, "--password-stdin", registry, config=str(config), input=PASSWORD)
        docker("push", image, config=str(config))
        docker("rmi", image)
        assert not image_exists(image)
        yield image, token
    finally:
        subprocess.run(["docker", "rmi", "-f", image], capture_output=True)
        shutil.rmtree(ctx, ignore_errors=True)


async def rmi(image: str) -> None:
    """Forget ``image`` locally, so the next use must pull it."""
    await anyio.run_process(["docker", "rmi", "-f", image], check=False)


async def advertised(stack_client: hotbed.Client, worker_id: str) -> HeldImages | None:
    raw = await stack_client.redis.get(stack_client.keys.worker_images(worker_id))
    return records.images_from_value(raw)


async def test_pull_on_demand_with_a_login_never_logged(
    redis_url: str, prefix: str, registry: str, pushed: tuple[str, str], caplog: pytest.LogCaptureFixture,
) -> None:
    image, token = pushed
    await rmi(image)
    caplog.set_level(logging.DEBUG)
    async with running_stack(
        redis_url, prefix,
        # A refresh long after the test: an advertisement in time came from the pull.
        worker_overrides={"registries": [registry], "image_refresh_s": 60,
                          "registry_auth": {registry: {"username": USER, "password": PASSWORD}}},
        scheduler_overrides={"image_refresh_s": 0.1},
    ) as stack:
        wid = stack.worker.id
        before = await advertised(stack.client, wid)
        assert before is not None and image_ref(BUSYBOX_IMAGE) in before.names()
        assert image_ref(image) not in before.names()
        sb = await hotbed.Sandbox.create(image, client=stack.client, timeout=60)
        try:
            assert (await sb.exec("cat", "/token")).stdout.strip() == token
        finally:
            await sb.terminate()
        # Advertised right after the pull, not at the next refresh.
        with anyio.fail_after(5):
            while image_ref(image) not in ((await advertised(stack.client, wid)) or HeldImages()).names():
                await anyio.sleep(0.02)
        # `hotbed images` lists it under the worker.
        out = await anyio.run_process(
            [sys.executable, "-m", "cli", "--redis-url", redis_url, "--prefix", prefix, "images", "--json"],
        )
        nodes = json.loads(out.stdout)
        assert [n["worker"] for n in nodes] == [wid]
        assert image_ref(image) in {i["name"] for i in nodes[0]["images"]}
        quiet = await anyio.run_process(
            [sys.executable, "-m", "cli", "--redis-url", redis_url, "--prefix", prefix, "images", "-q"],
        )
        assert image_ref(image) in quiet.stdout.decode().split()
    logged = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records)
    assert f"pulling {image}" in logged
    assert PASSWORD not in logged


async def test_bad_images_get_typed_errors_fast_and_the_daemons_keep_serving(
    redis_url: str, prefix: str, registry: str, pushed: tuple[str, str], tmp_path: Path,
) -> None:
    image, token = pushed
    await rmi(image)
    # The login from a Docker config.json file this time.
    auth_file = tmp_path / "config.json"
    auth_file.write_text(json.dumps(
        {"auths": {registry: {"auth": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}}}
    ))
    closed = f"127.0.0.1:{_free_port()}"
    async with running_stack(
        redis_url, prefix,
        worker_overrides={"registries": [registry, closed], "registry_auth_file": str(auth_file)},
    ) as stack:
        c = stack.client
        sb = await hotbed.Sandbox.create(image, client=c, timeout=60)
        try:
            assert (await sb.exec("cat", "/token")).stdout.strip() == token
        finally:
            await sb.terminate()
        cases = {
            # Not in the registry.
            f"{registry}/hotbed-test/no-such-{token}:v1": "could not be pulled",
            # A registry the operator did not configure: no network traffic at all.
            f"registry.invalid:5000/hotbed-test/x-{token}:v1": "not a registry it pulls from",
            # A configured registry that does not answer.
            f"{closed}/hotbed-test/x-{token}:v1": "could not be pulled",
        }
        for bad, why in cases.items():
            t0 = anyio.current_time()
            with pytest.raises(ImageNotFound, match=why) as err:
                await hotbed.Sandbox.create(bad, client=c, timeout=60)
            assert anyio.current_time() - t0 < 10, f"{bad} took {anyio.current_time() - t0:.1f}s"
            assert err.value.worker_id == stack.worker.id
            assert PASSWORD not in str(err.value)
            # The daemons keep serving.
            ok = await hotbed.Sandbox.create(BUSYBOX_IMAGE, client=c)
            assert (await ok.exec("echo", "ok")).stdout == "ok\n"
            await ok.terminate()
        # Without a login, the registry refuses: still a typed error.
        auth_file.write_text(json.dumps({"auths": {}}))
        await rmi(image)
        with pytest.raises(ImageNotFound, match="could not be pulled"):
            await hotbed.Sandbox.create(image, client=c, timeout=60)


# ------------------------------------------------------------------ builds


def test_dockerfile_build_streams_progress_and_templates_take_the_image(tmp_path: Path) -> None:
    token = secrets.token_hex(6)
    name = f"hotbed-test/built-{token}:v1"
    (tmp_path / "hello.txt").write_text(f"hello {token}\n")
    (tmp_path / "skip.txt").write_text("ignored\n")
    (tmp_path / ".dockerignore").write_text("skip.txt\n")
    dockerfile = tmp_path / "build.Dockerfile"
    dockerfile.write_text(
        f"FROM {BUSYBOX_IMAGE}\nCOPY . /ctx/\nRUN echo step-one && sleep 1.5\n"
        "RUN cat /ctx/hello.txt > /hello && test ! -e /ctx/skip.txt\n"
    )
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "image", "build", "-f", str(dockerfile), "-t", name, str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        first_line_at = None
        lines = []
        for line in proc.stderr:
            first_line_at = first_line_at or time.monotonic()
            lines.append(line.rstrip())
        stdout = proc.stdout.read() if proc.stdout else ""
        assert proc.wait(timeout=120) == 0, "\n".join(lines)
        ended = time.monotonic()
        assert any(line.startswith("Step 1/4 : FROM") for line in lines), lines
        assert "step-one" in lines
        # Live: the first line came well before the build (which sleeps 1.5 s) ended.
        assert first_line_at is not None and ended - first_line_at > 1.0, (started, first_line_at, ended)
        assert stdout.strip() == name
        out = subprocess.run(["docker", "run", "--rm", "--network", "none", name, "cat", "/hello"],
                             capture_output=True, text=True, timeout=60)
        assert out.stdout == f"hello {token}\n"
        # A broken Dockerfile: one error line, exit 125.
        (tmp_path / "bad.Dockerfile").write_text(f"FROM {BUSYBOX_IMAGE}\nRUN exit 3\n")
        bad = subprocess.run(
            [sys.executable, "-m", "cli", "image", "build", "-f", str(tmp_path / "bad.Dockerfile"),
             "-t", name + "-bad", str(tmp_path)], capture_output=True, text=True, timeout=120,
        )
        assert bad.returncode == 125 and "error: build failed" in bad.stderr
    finally:
        subprocess.run(["docker", "rmi", "-f", name], capture_output=True)
        proc.kill()


async def test_a_template_builds_from_a_pulled_image(
    redis_url: str, prefix: str, registry: str, pushed: tuple[str, str],
) -> None:
    image, token = pushed
    await rmi(image)
    from hotbed.templates import create_template, delete_template

    async with running_stack(
        redis_url, prefix,
        worker_overrides={"registries": [registry],
                          "registry_auth": {registry: {"username": USER, "password": PASSWORD}},
                          "snapshot_dir": str(Path(tempfile.mkdtemp(prefix="hotbed-snap-")))},
    ) as stack:
        name = f"pulled-{token}"
        await create_template(name, image=image, run=["cat /token > /tmp/copied"], client=stack.client)
        try:
            sb = await hotbed.Sandbox.create(template=name, client=stack.client)
            try:
                assert (await sb.exec("cat", "/tmp/copied")).stdout.strip() == token
            finally:
                await sb.terminate()
        finally:
            await delete_template(name, client=stack.client)


# ---------------------------------------------------------------- placement


class ImageRuntime(RecordingRuntime):
    """TEST DOUBLE: a recording runtime that holds a set of images and "pulls" from
    the registries it is given (the pull is recorded, nothing is fetched)."""

    def __init__(self, images: set[str], registries: set[str]) -> None:
        super().__init__()
        self.images = {image_ref(i) for i in images}
        self.registries = registries
        self.pulled: list[str] = []

    async def create(self, placed: Placed, spec: SandboxSpec) -> None:
        if image_ref(spec.image) not in self.images:
            raise ImageNotFound(f"no image {spec.image}", sandbox_id=placed.sandbox_id)
        await super().create(placed, spec)

    async def list_images(self) -> HeldImages:
        return HeldImages(images=[HeldImage(name=i, id=f"sha256:{i}") for i in sorted(self.images)])

    async def has_image(self, ref: str) -> bool:
        return image_ref(ref) in self.images

    async def pull_image(self, ref: str, *, login: tuple[str, str] | None = None) -> None:
        if image_registry(ref) not in self.registries:
            raise ImageNotFound(f"{ref} could not be pulled")
        self.pulled.append(ref)
        self.images.add(image_ref(ref))


@asynccontextmanager
async def image_fleet(redis_url: str, prefix: str, nodes: dict[str, tuple[dict[str, object], ImageRuntime]]
                      ) -> AsyncIterator[tuple[Scheduler, hotbed.Client]]:
    """A real scheduler and one worker agent per node, each on its own image double."""
    scheduler = Scheduler(msgspec.convert(
        {"redis_url": redis_url, "prefix": prefix, "registry_refresh_s": 0.05,
         "image_refresh_s": 0.05, "heartbeat_ttl_s": 3.0, "shutdown_grace_s": 1.0},
        SchedulerSettings,
    ))
    workers = [
        WorkerAgent(msgspec.convert(
            {"redis_url": redis_url, "prefix": prefix, "worker_id": wid, "heartbeat_s": 0.2,
             "reconcile_s": 0.5, "shutdown_grace_s": 1.0, "drain_on_stop": True,
             "gpu_detect": "none", "memory_mb": 16384, "image_refresh_s": 0.2, **opts},
            WorkerSettings,
        ), runtime)
        for wid, (opts, runtime) in nodes.items()
    ]
    async with anyio.create_task_group() as tg:
        await tg.start(scheduler.run)
        for w in workers:
            await tg.start(w.run)
        assert scheduler.registry is not None
        with anyio.fail_after(10):
            # Every worker seen, with the images it advertises.
            while len(scheduler.registry.workers) < len(workers) or not all(
                w.images for w in scheduler.registry.live()
            ):
                await anyio.sleep(0.02)
        client = hotbed.Client(redis_url, prefix=prefix)
        try:
            yield scheduler, client
        finally:
            await client.aclose()
            for w in workers:
                w.stopping.set()
            scheduler.stopping.set()


async def test_placement_goes_to_the_holder_or_a_worker_that_can_pull(redis_url: str, prefix: str) -> None:
    reg = "127.0.0.1:9"
    small = ImageRuntime({"team/only-small:v1"}, {reg})
    big = ImageRuntime({"team/only-big:v1"}, set())
    nodes = {
        # Spread would pick "big" (more free CPU) for anything.
        "small": ({"cpu": 2, "registries": [reg]}, small),
        "big": ({"cpu": 16}, big),
    }
    async with image_fleet(redis_url, prefix, nodes) as (_, client):

        async def create(image: str, timeout: float = 10) -> SandboxCreated:
            spec = SandboxSpec(image=image, resources=Resources(cpu=0.5, memory_mb=64))
            reply = await client.request(CreateSandbox(spec=spec), timeout=timeout)
            assert isinstance(reply, SandboxCreated)
            return reply

        # Held by one: placed there, every time, although spread prefers the other.
        assert {(await create("team/only-small:v1")).worker_id for _ in range(3)} == {"small"}
        assert (await create("team/only-big:v1")).worker_id == "big"
        # Held by none: placed where it can be pulled, and pulled there.
        assert (await create(f"{reg}/team/fresh:v2")).worker_id == "small"
        assert small.pulled == [f"{reg}/team/fresh:v2"]
        assert big.pulled == []
        # Nobody can get it: a typed error, fast, and placement goes on.
        t0 = anyio.current_time()
        with pytest.raises(ImageNotFound):
            await create("elsewhere.example/team/none:v1")
        assert anyio.current_time() - t0 < 2
        # "small" is full now (4 x 0.5 CPU): its image's requests wait for it rather
        # than land where the image cannot be had, and everything else goes on.
        with pytest.raises(CapacityExhausted):
            await create("team/only-small:v1", timeout=1)
        assert (await create("team/only-big:v1")).worker_id == "big"
        assert small.pulled == [f"{reg}/team/fresh:v2"] and big.pulled == []
