"""Ready means ready: a sandbox is reported started (cold, restored, or listed in a warm
pool) only once its guest agent answers, so its first command does not wait for it."""

from __future__ import annotations

import secrets

import anyio
import pytest

from hotbed import templates
from hotbed.sandbox import Sandbox
from tests.conftest import BASE_IMAGE, BUSYBOX_IMAGE, Stack

pytestmark = pytest.mark.anyio


def serving(stack: Stack, sandbox_id: str) -> bool:
    guests = stack.worker.execution.guests
    assert guests is not None
    return guests.serving(sandbox_id)


@pytest.mark.timeout(300)
async def test_started_restored_and_pooled_sandboxes_already_serve(stack: Stack) -> None:
    c = stack.client
    cold = await Sandbox.create(BASE_IMAGE, memory_mb=256, client=c)
    try:
        assert serving(stack, cold.id)
    finally:
        await cold.terminate()
    # An image without python3 has no agent to wait for: it starts as before.
    with anyio.fail_after(20):
        plain = await Sandbox.create(BUSYBOX_IMAGE, memory_mb=64, client=c)
    try:
        assert not serving(stack, plain.id)
        assert (await plain.exec("echo", "hi")).stdout == "hi\n"
    finally:
        await plain.terminate()

    name = f"ready-{secrets.token_hex(3)}"
    await templates.create_template(name, image=BASE_IMAGE, memory_mb=256, client=c)
    restored = await Sandbox.create(template=name, memory_mb=256, client=c)
    try:
        assert restored.path == "restore"
        assert serving(stack, restored.id)
    finally:
        await restored.terminate()

    pool = await templates.set_pool(name, 2, memory_mb=256, client=c)
    try:
        with anyio.fail_after(120):
            while await c.redis.llen(c.keys.pool_ready(pool)) < 2:
                await anyio.sleep(0.05)
        listed = [i.decode().split()[0] for i in await c.redis.lrange(c.keys.pool_ready(pool), 0, -1)]
        assert all(serving(stack, sid) for sid in listed)
        warm = await Sandbox.create(template=name, memory_mb=256, client=c)
        try:
            assert warm.path == "warm" and warm.id in listed
            assert (await warm.exec("echo", "hi")).stdout == "hi\n"
        finally:
            await warm.terminate()
    finally:
        await templates.set_pool(name, 0, memory_mb=256, client=c)
        await templates.delete_template(name, client=c)
