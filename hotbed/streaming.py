"""One streaming request: output read as the sandbox produces it, then one reply.

A streaming request names an output stream key (``hotbed.keys.output``) in its body.
It is submitted like any other command (:meth:`hotbed.client.Client.submit`); the
worker appends output entries to that key and, at the end, an ``r`` entry holding the
reply. The client reads the key with blocking XREADs (:meth:`Client.read_stream`, never
polling) and trims what it has read, so Redis keeps only unread output.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import redis.exceptions

from hotbed import protocol
from hotbed.client import OP_TIMEOUT_S, REPLY_GRACE_S, Client
from hotbed.errors import RequestTimeout
from hotbed.protocol import Message, Reply

# Longest single XREAD of a stream: short, so the give-up time is checked often.
READ_BLOCK_S = 1.0


class Streamed:
    """One streaming request: async-iterate its entries, then read :attr:`reply`.

    ``make(key)`` builds the request's body around its output stream key. Use as
    ``async with`` (or call :meth:`aclose`): leaving early cancels the request in the
    sandbox.
    """

    def __init__(
        self,
        client: Client,
        worker_id: str,
        sandbox_id: str,
        make: Callable[[str], Message],
        *,
        timeout: float,
    ) -> None:
        self.client = client
        self.worker_id = worker_id
        self.sandbox_id = sandbox_id
        self.request_id = client.new_request_id()
        self.key = client.keys.output(self.request_id)
        self._body: Message = make(self.key)
        self._timeout = timeout
        self._last = "0-0"
        self._started = False
        self._give_up = 0.0
        self.reply: Reply | None = None

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await self.client.submit(
            self.client.keys.worker_cmds(self.worker_id),
            self._body,
            timeout=self._timeout,
            worker_id=self.worker_id,
            request_id=self.request_id,
        )
        self._give_up = anyio.current_time() + self._timeout + REPLY_GRACE_S

    async def __aenter__(self) -> Streamed:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._started and self.reply is None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                try:
                    await self.client.worker_request(
                        self.worker_id,
                        protocol.Cancel(sandbox_id=self.sandbox_id, target=self.request_id),
                        timeout=OP_TIMEOUT_S,
                    )
                except Exception:
                    pass
        if self._started:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                try:
                    await self.client.redis.delete(self.key)
                except redis.exceptions.RedisError:
                    pass

    async def entries(self) -> AsyncIterator[tuple[bytes, bytes]]:
        """``(field, value)`` of each entry until the reply (``r``) arrives."""
        await self.start()
        reply_key = self.client.keys.reply(self.request_id)
        while self.reply is None:
            left = self._give_up - anyio.current_time()
            if left <= 0:
                raise RequestTimeout(
                    f"no end to streaming request {self.request_id}", request_id=self.request_id
                )
            got = await self.client.read_stream(
                self.key, self._last, count=512, block_s=min(left, READ_BLOCK_S)
            )
            if not got:
                # Nothing streamed: a request refused before it ran (expired in the
                # queue) only answers on its reply key.
                raw: Any = await self.client.redis.lpop(reply_key)
                if raw is not None:
                    self.reply = protocol.decode_reply(raw).body
                continue
            for entry_id, fields in got:
                self._last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                for field, value in fields.items():
                    if field == b"r":
                        self.reply = protocol.decode_reply(value).body
                    else:
                        yield field, value
            await self.client.redis.xtrim(self.key, minid=self._last, approximate=False)
        await self.client.redis.delete(self.key, reply_key)

    def final(self) -> Reply:
        assert self.reply is not None, "stream not consumed"
        return protocol.raise_for_reply(self.reply, request_id=self.request_id)
