"""SWE-ReX's remote protocol served by hotbed, so SWE-agent runs on hotbed unchanged.

SWE-agent builds its deployment from SWE-ReX's ``DeploymentConfig`` union; its
``remote`` member talks HTTP to a SWE-ReX server (host, port, auth token). This module
is such a server on the host, backed by :class:`~hotbed.integrations.swerex.HotbedRuntime`:
every request runs in a hotbed sandbox, and no SWE-ReX server runs inside it::

    python -m hotbed.integrations.swerex_server --image hotbed/base --port 8880 \\
        --auth-token "$TOKEN"          # HOTBED_REDIS_URL etc. as for any hotbed client
    sweagent run --env.deployment.type=remote --env.deployment.host=http://127.0.0.1 \\
        --env.deployment.port=8880 --env.deployment.auth_token="$TOKEN" ...

The protocol is swe-rex's own (``swerex/server.py``): ``GET /is_alive``; ``POST
/create_session``, ``/run_in_session``, ``/close_session``, ``/execute``,
``/read_file``, ``/write_file`` with the request model as JSON; ``POST /upload`` as a
form (``file``, ``target_path``, ``unzip``); ``POST /close``. Answers are the response
models as JSON; an exception the runtime raises travels as status 511 with
``{"swerexception": {message, class_path, traceback, extra_info}}``, which swe-rex's
``RemoteRuntime`` raises again as the same type; a wrong ``X-API-Key`` is a 401.

One sandbox per episode: it is made on the first request, and ``/close`` (what a
deployment's ``stop()`` sends) closes its sessions and ends it, so the next episode
starts fresh. One server serves one episode at a time: run one per concurrent agent.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import traceback
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse
from swerex.runtime.abstract import (
    Action,
    CloseResponse,
    CloseSessionRequest,
    Command,
    CreateSessionRequest,
    ReadFileRequest,
    UploadRequest,
    UploadResponse,
    WriteFileRequest,
    _ExceptionTransfer,
)

from hotbed.client import Client
from hotbed.integrations.swerex import HotbedRuntime
from hotbed.sandbox import Sandbox

__all__ = ["HotbedSwerexServer", "main"]

logger = logging.getLogger(__name__)


class HotbedSwerexServer:
    """The per-episode sandbox and its runtime behind the HTTP routes of :attr:`app`."""

    def __init__(self, *, auth_token: str, image: str = "hotbed/base", client: Client | None = None,
                 **create: Any) -> None:
        self.auth_token = auth_token
        self.image = image
        self.client = client
        self.create_kwargs = create
        self._runtime: HotbedRuntime | None = None
        self._lock = anyio.Lock()
        self.app = self._make_app()

    async def runtime(self) -> HotbedRuntime:
        async with self._lock:
            if self._runtime is None:
                sandbox = await Sandbox.create(self.image, client=self.client, **self.create_kwargs)
                logger.info("episode sandbox %s on %s", sandbox.id, sandbox.worker_id)
                self._runtime = HotbedRuntime(sandbox, logger=logger)
            return self._runtime

    async def end_episode(self) -> None:
        async with self._lock:
            rt, self._runtime = self._runtime, None
        if rt is not None:
            with anyio.CancelScope(shield=True):
                try:
                    await rt.close()
                finally:
                    await rt.sandbox.terminate()

    def _make_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
            yield
            await self.end_episode()

        app = FastAPI(lifespan=lifespan)

        @app.middleware("http")
        async def authenticate(request: Request, call_next: Any) -> Any:
            if self.auth_token and request.headers.get("X-API-Key") != self.auth_token:
                return JSONResponse(status_code=401, content={"detail": "Invalid API Key"})
            return await call_next(request)

        @app.exception_handler(Exception)
        async def transfer(_request: Request, exc: Exception) -> JSONResponse:
            # As swe-rex's server: RemoteRuntime rebuilds the exception from this.
            t = _ExceptionTransfer(
                message=str(exc), class_path=f"{type(exc).__module__}.{type(exc).__name__}",
                traceback="".join(traceback.format_exception(exc)),
                extra_info=getattr(exc, "extra_info", {}),
            )
            return JSONResponse(status_code=511, content={"swerexception": t.model_dump()})

        @app.get("/")
        async def root() -> dict[str, str]:
            return {"message": "hello world"}

        @app.get("/is_alive")
        async def is_alive() -> Any:
            return (await (await self.runtime()).is_alive()).model_dump()

        @app.post("/create_session")
        async def create_session(request: CreateSessionRequest) -> Any:
            return (await (await self.runtime()).create_session(request)).model_dump()

        @app.post("/run_in_session")
        async def run_in_session(action: Action) -> Any:
            return (await (await self.runtime()).run_in_session(action)).model_dump()

        @app.post("/close_session")
        async def close_session(request: CloseSessionRequest) -> Any:
            return (await (await self.runtime()).close_session(request)).model_dump()

        @app.post("/execute")
        async def execute(command: Command) -> Any:
            return (await (await self.runtime()).execute(command)).model_dump()

        @app.post("/read_file")
        async def read_file(request: ReadFileRequest) -> Any:
            return (await (await self.runtime()).read_file(request)).model_dump()

        @app.post("/write_file")
        async def write_file(request: WriteFileRequest) -> Any:
            return (await (await self.runtime()).write_file(request)).model_dump()

        @app.post("/upload")
        async def upload(
            file: UploadFile = File(...),  # noqa: B008 (FastAPI's form declaration)
            target_path: str = Form(...),  # noqa: B008
            unzip: bool = Form(False),  # noqa: B008
        ) -> Any:
            rt = await self.runtime()
            with tempfile.TemporaryDirectory(prefix="hotbed-swerex-") as tmp:
                received = Path(tmp) / "received"
                async with await anyio.open_file(received, "wb") as f:
                    while chunk := await file.read(1 << 20):
                        await f.write(chunk)
                if unzip:
                    tree = Path(tmp) / "tree"
                    await anyio.to_thread.run_sync(_unzip, received, tree)
                    await rt.upload(UploadRequest(source_path=str(tree), target_path=target_path))
                else:
                    await rt.upload(UploadRequest(source_path=str(received), target_path=target_path))
            return UploadResponse().model_dump()

        @app.post("/close")
        async def close() -> Any:
            await self.end_episode()
            return CloseResponse().model_dump()

        return app


def _unzip(path: Path, into: Path) -> None:
    with zipfile.ZipFile(path) as z:
        z.extractall(into)
    path.unlink()


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m hotbed.integrations.swerex_server",
                                description="SWE-ReX's remote protocol on hotbed sandboxes")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8880, help="port to listen on")
    p.add_argument("--auth-token", required=True, help="the X-API-Key clients must send")
    p.add_argument("--image", default="hotbed/base", help="image of each episode's sandbox")
    p.add_argument("--memory-mb", type=int, default=2048, help="memory of each sandbox")
    p.add_argument("--cpu", type=float, default=1.0, help="CPUs of each sandbox")
    p.add_argument("--timeout", type=float, default=4 * 3600.0,
                   help="seconds a sandbox may live (ended earlier by /close)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    server = HotbedSwerexServer(auth_token=args.auth_token, image=args.image,
                                memory_mb=args.memory_mb, cpu=args.cpu, timeout=args.timeout)
    uvicorn.run(server.app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
