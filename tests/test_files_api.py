"""The files and lifecycle API: path verbs, deep listings, streamed transfers of any
size, set_timeout / set_tags, list handles, output callbacks and sync streaming.

The guest agent's new verbs are checked first as a child process (no Docker, as in
test_guest_agent); then everything through the whole stack on real runsc sandboxes,
on hotbed/base (guest agent) and on hotbed/busybox (no python3: the shell fallback).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import anyio
import pytest

import hotbed
from hotbed import errors
from hotbed.records import SandboxRecord
from hotbed.sandbox import Sandbox
from tests.conftest import BASE_IMAGE, BUSYBOX_IMAGE, Stack
from tests.test_guest_agent import agent_channel

pytestmark = pytest.mark.anyio


# ------------------------------------------------------------ the guest agent's verbs


async def test_guest_path_verbs_and_typed_errors(tmp_path: Path) -> None:
    async with agent_channel(tmp_path) as (ch, _proc):
        root = tmp_path / "root"
        h, _ = await ch.call({"t": "make_dir", "path": str(root / "a" / "b")})
        assert h["created"] is True
        h, _ = await ch.call({"t": "make_dir", "path": str(root / "a" / "b")})
        assert h["created"] is False
        with pytest.raises(errors.FileExists):
            await ch.call({"t": "make_dir", "path": str(root / "a"), "exist_ok": False})
        with pytest.raises(errors.FileNotFound):
            await ch.call({"t": "make_dir", "path": str(root / "x" / "y"), "parents": False})
        (root / "a" / "b" / "f.txt").write_text("hello")
        (root / "a" / "link").symlink_to(root / "a" / "b")

        h, _ = await ch.call({"t": "list_files", "path": str(root), "depth": 3})
        assert sorted(e[0] for e in h["entries"]) == ["a", "a/b", "a/b/f.txt", "a/link"]
        h, _ = await ch.call({"t": "list_files", "path": str(root)})
        assert [e[0] for e in h["entries"]] == ["a"]

        h, _ = await ch.call({"t": "stat", "path": str(root / "a" / "link")})
        assert h["entry"][4] is True  # a link, reported with its target's mode
        h, _ = await ch.call({"t": "stat", "path": str(root / "nope"), "missing_ok": True})
        assert h["entry"] is None
        with pytest.raises(errors.FileNotFound):
            await ch.call({"t": "stat", "path": str(root / "nope")})

        await ch.call({"t": "rename", "src": str(root / "a" / "b" / "f.txt"), "dst": str(root / "g.txt")})
        assert (root / "g.txt").read_text() == "hello"
        with pytest.raises(errors.DirectoryNotEmpty):
            await ch.call({"t": "remove", "path": str(root / "a")})
        with pytest.raises(errors.NotADirectory):
            await ch.call({"t": "list_files", "path": str(root / "g.txt")})
        await ch.call({"t": "remove", "path": str(root / "a"), "recursive": True})
        await ch.call({"t": "remove", "path": str(root / "g.txt")})
        assert list(root.iterdir()) == []


async def test_guest_pipes_move_only_on_request(tmp_path: Path) -> None:
    async with agent_channel(tmp_path) as (ch, _proc):
        # Upload side: what is written comes out of the command, in order.
        out = tmp_path / "copy.bin"
        h, _ = await ch.call({"t": "pipe_open", "argv": ["/bin/sh", "-c", f"cat > {out}"], "write": True})
        pid = h["pid"]
        blob = os.urandom(3 << 20)
        for i in range(0, len(blob), 1 << 20):
            await ch.call({"t": "pipe_write", "pipe": pid}, blob[i : i + (1 << 20)])
        await ch.call({"t": "pipe_write", "pipe": pid, "eof": True})
        h, err = await ch.call({"t": "pipe_close", "pipe": pid})
        assert (h["code"], err) == (0, b"")
        assert out.read_bytes() == blob

        # Download side: a command that could write far more than a chunk is only read
        # as asked; a pipe nobody reads holds the command, and closing it ends it.
        h, _ = await ch.call({"t": "pipe_open", "argv": ["cat", str(out)], "read": True})
        pid = h["pid"]
        got = bytearray()
        while True:
            h, data = await ch.call({"t": "pipe_read", "pipe": pid, "max_bytes": 700_000})
            assert len(data) <= 700_000
            got += data
            if h["eof"]:
                break
        assert bytes(got) == blob
        h, _ = await ch.call({"t": "pipe_close", "pipe": pid})
        assert h["code"] == 0

        h, _ = await ch.call({"t": "pipe_open", "argv": ["yes"], "read": True})
        pid = h["pid"]
        h, data = await ch.call({"t": "pipe_read", "pipe": pid, "max_bytes": 4096})
        assert len(data) == 4096 and data.startswith(b"y\n")
        h, _ = await ch.call({"t": "pipe_close", "pipe": pid})
        assert h["signal"] == 13  # SIGPIPE: nobody reads it any more

        # A failing command's stderr comes back with its exit code.
        h, _ = await ch.call({"t": "pipe_open", "argv": ["/bin/sh", "-c", "echo bad >&2; exit 3"], "write": True})
        pid = h["pid"]
        h, err = await ch.call({"t": "pipe_close", "pipe": pid})
        assert (h["code"], err) == (3, b"bad\n")
        with pytest.raises(errors.ProcessNotFound):
            await ch.call({"t": "pipe_read", "pipe": pid})


# ----------------------------------------------------------------- the whole stack


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("image", [BASE_IMAGE, BUSYBOX_IMAGE])
async def test_path_verbs(hotbed_stack: Stack, image: str) -> None:
    """The same calls and the same typed errors with the guest agent and without it."""
    async with await Sandbox.create(image, client=hotbed_stack.client, memory_mb=256) as sb:
        await sb.make_dir("/tmp/w/a/b")
        await sb.make_dir("/tmp/w/a/b")  # exist_ok
        with pytest.raises(hotbed.FileExists):
            await sb.make_dir("/tmp/w/a", exist_ok=False)
        with pytest.raises(FileNotFoundError):  # the built-in twin catches it too
            await sb.make_dir("/tmp/w/x/y", parents=False)
        await sb.write_file("/tmp/w/a/b/f.txt", "hello")
        await sb.write_file("/tmp/w/top.txt", "x")

        st = await sb.stat("/tmp/w/a/b/f.txt")
        assert (st.name, st.path, st.size, st.is_dir) == ("f.txt", "/tmp/w/a/b/f.txt", 5, False)
        assert (await sb.stat("/tmp/w/a")).is_dir
        assert await sb.exists("/tmp/w/top.txt")
        assert not await sb.exists("/tmp/w/nope")
        with pytest.raises(hotbed.FileNotFound):
            await sb.stat("/tmp/w/nope")

        deep = await sb.list_files("/tmp/w", depth=3)
        assert [(e.path, e.name, e.is_dir) for e in deep] == [
            ("/tmp/w/a", "a", True), ("/tmp/w/a/b", "b", True),
            ("/tmp/w/a/b/f.txt", "f.txt", False), ("/tmp/w/top.txt", "top.txt", False),
        ]
        assert [e.name for e in await sb.list_files("/tmp/w")] == ["a", "top.txt"]
        assert [e.path for e in await sb.list_files("/tmp/w", depth=2)] == [
            "/tmp/w/a", "/tmp/w/a/b", "/tmp/w/top.txt",
        ]
        with pytest.raises(hotbed.NotADirectory):
            await sb.list_files("/tmp/w/top.txt", depth=2)

        await sb.rename("/tmp/w/a/b/f.txt", "/tmp/w/g.txt")
        assert await sb.read_file("/tmp/w/g.txt") == b"hello"
        assert not await sb.exists("/tmp/w/a/b/f.txt")
        with pytest.raises(hotbed.FileNotFound):
            await sb.rename("/tmp/w/nope", "/tmp/w/nope2")

        with pytest.raises(hotbed.DirectoryNotEmpty):
            await sb.remove("/tmp/w/a")
        await sb.remove("/tmp/w/a/b")  # empty now
        await sb.remove("/tmp/w/g.txt")
        with pytest.raises(hotbed.FileNotFound):
            await sb.remove("/tmp/w/g.txt")
        await sb.remove("/tmp/w", recursive=True)
        assert not await sb.exists("/tmp/w")


async def test_large_file_and_directory_stream_both_ways(hotbed_stack: Stack, tmp_path: Path) -> None:
    """80 MiB files and a tree of 2,000 files, over the 32 MiB limit of one message:
    checksums match both ways, and what this process (client and worker both) holds at
    any moment stays a few chunks, not the transfer."""
    import tracemalloc

    chunk = 4 << 20
    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        for _ in range(80):
            f.write(os.urandom(1 << 20))
    src = tmp_path / "src"
    for i in range(2000):
        d = src / f"d{i % 20}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_text(f"file {i}\n" * (i % 7))
    (src / "blob.bin").write_bytes(big.read_bytes()[: 40 << 20])

    async with await Sandbox.create(BASE_IMAGE, client=hotbed_stack.client, memory_mb=512) as sb:
        tracemalloc.start()
        try:
            assert await sb.upload_file(big, "/tmp/big.bin", chunk_bytes=chunk) == 80 << 20
            back = tmp_path / "back.bin"
            assert await sb.download_file("/tmp/big.bin", back, chunk_bytes=chunk) == 80 << 20
            sent = await sb.upload_dir(src, "/tmp/tree", chunk_bytes=chunk)
            assert sent > 43 << 20  # the tar of 40 MiB + 2,000 files
            dst = tmp_path / "dst"
            assert await sb.download_dir("/tmp/tree", dst, chunk_bytes=chunk) > 40 << 20
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 12 * chunk, f"peak {peak >> 20} MiB held for {chunk >> 20} MiB chunks"
        assert _sha(back) == _sha(big)
        # The sandbox's own checksum agrees with ours.
        res = await sb.exec("sha256sum", "/tmp/big.bin")
        assert res.stdout.split()[0] == _sha(big)
        assert (await sb.exec("sh", "-c", "find /tmp/tree -type f | wc -l")).stdout.strip() == "2001"
        assert _tree(dst) == _tree(src)


async def test_transfers_without_the_guest_agent(hotbed_stack: Stack, tmp_path: Path) -> None:
    """busybox (no python3): chunked appends and ranged reads through the runtime's
    exec, and directories through a temporary tar; errors still typed."""
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(9 << 20))
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "mod.py").write_text("X = 1\n")
    (src / "data.bin").write_bytes(os.urandom(3 << 20))
    async with await Sandbox.create(BUSYBOX_IMAGE, client=hotbed_stack.client, memory_mb=256) as sb:
        assert await sb.upload_file(blob, "/tmp/blob.bin", chunk_bytes=2 << 20) == 9 << 20
        back = tmp_path / "back.bin"
        assert await sb.download_file("/tmp/blob.bin", back, chunk_bytes=2 << 20) == 9 << 20
        assert _sha(back) == _sha(blob)
        await sb.upload_dir(src, "/tmp/proj", chunk_bytes=1 << 20)  # several chunks
        dst = tmp_path / "dst"
        await sb.download_dir("/tmp/proj", dst, chunk_bytes=1 << 20)
        assert _tree(dst) == _tree(src)
        await sb.upload_dir(src / "pkg", "/tmp/small")  # one chunk
        assert await sb.read_file("/tmp/small/mod.py") == b"X = 1\n"
        assert not [e for e in await sb.list_files("/tmp") if e.name.startswith(".hotbed-transfer")]
        with pytest.raises(hotbed.FileNotFound):
            await sb.download_dir("/tmp/nope", tmp_path / "nope")


async def test_download_of_a_missing_directory_is_typed(hotbed_stack: Stack, tmp_path: Path) -> None:
    async with await Sandbox.create(BASE_IMAGE, client=hotbed_stack.client, memory_mb=256) as sb:
        with pytest.raises(hotbed.FileNotFound):
            await sb.download_dir("/tmp/nope", tmp_path / "x")
        await sb.write_file("/tmp/file", "x")
        with pytest.raises(hotbed.NotADirectory):
            await sb.download_dir("/tmp/file", tmp_path / "y")
        # Nothing is left running in the sandbox: no pipe, no tar.
        assert "tar" not in (await sb.exec("ps", "-eo", "comm")).stdout


# --------------------------------------------------------------------- lifecycle


async def _ended(c: hotbed.Client, sid: str, within: float) -> SandboxRecord:
    with anyio.fail_after(within):
        while True:
            rec = await c.record(sid)
            if rec.ended:
                return rec
            await anyio.sleep(0.1)


async def test_set_timeout_extends_and_shortens(hotbed_stack: Stack) -> None:
    c = hotbed_stack.client
    sb = await Sandbox.create(BUSYBOX_IMAGE, client=c, timeout=2)
    try:
        await sb.set_timeout(60)
        rec = await sb.info()
        assert abs(rec.created_at + rec.timeout - (time.time() + 60)) < 2
        await anyio.sleep(3)  # past its create-time timeout
        assert (await sb.exec("true")).ok
        await sb.set_timeout(0.5)
        rec = await _ended(c, sb.id, 10)
        assert (rec.state, rec.reason) == ("terminated", "timeout")
        with pytest.raises(hotbed.SandboxNotFound):
            await sb.set_timeout(10)
        with pytest.raises(hotbed.InvalidRequest):
            await sb.set_timeout(-1)
    finally:
        await sb.terminate()


async def test_set_tags_and_list_handles(hotbed_stack: Stack) -> None:
    c = hotbed_stack.client
    async with await Sandbox.create(BUSYBOX_IMAGE, client=c, tags={"stage": "a"}) as sb:
        await sb.set_tags({"stage": "b", "owner": "me"})
        assert await Sandbox.list(tags={"stage": "a"}, client=c) == []
        listed = await Sandbox.list(tags={"stage": "b"}, client=c)
        assert [type(x) for x in listed] == [Sandbox]
        handle = listed[0]
        assert (handle.id, handle.worker_id) == (sb.id, sb.worker_id)
        assert handle.record is not None and handle.record.tags == {"stage": "b", "owner": "me"}
        assert (await handle.exec("echo", "hi")).stdout == "hi\n"
        records = await Sandbox.list_records(tags={"owner": "me"}, client=c)
        assert [r.id for r in records] == [sb.id]


async def test_output_callbacks(hotbed_stack: Stack) -> None:
    seen: list[tuple[str, str]] = []

    async def on_err(text: str) -> None:
        seen.append(("err", text))

    async with await Sandbox.create(BASE_IMAGE, client=hotbed_stack.client, memory_mb=256) as sb:
        res = await sb.exec(
            "sh", "-c", "echo one; echo oops >&2; sleep 0.2; printf 'caf\\303\\251\\n'; exit 3",
            on_stdout=lambda t: seen.append(("out", t)), on_stderr=on_err,
        )
        assert res.exit_code == 3
        assert res.stdout == "one\ncafé\n" and res.stderr == "oops\n"
        assert "".join(t for k, t in seen if k == "out") == "one\ncafé\n"
        assert "".join(t for k, t in seen if k == "err") == "oops\n"
        # The first line arrived before the command ended.
        assert seen[0] in (("out", "one\n"), ("err", "oops\n"))
        with pytest.raises(hotbed.ExecTimeout):
            await sb.exec("sleep", "5", timeout=0.5, on_stdout=print)


def test_sync_streaming_and_handles(daemons: tuple[str, str]) -> None:
    from hotbed import sync

    with sync.Sandbox.create(BASE_IMAGE, memory_mb=256, tags={"suite": "files"}) as sb:
        chunks = []
        with sb.exec_stream("sh", "-c", "echo a; sleep 0.2; echo b >&2; exit 4") as out:
            for chunk in out:
                chunks.append((chunk.stream, chunk.text))
        assert out.result is not None and out.result.exit_code == 4
        assert "".join(t for s, t in chunks if s == "stdout") == "a\n"
        assert "".join(t for s, t in chunks if s == "stderr") == "b\n"
        lines: list[str] = []
        assert sb.exec("echo", "cb", on_stdout=lines.append).ok and lines == ["cb\n"]
        sb.make_dir("/tmp/s/t")
        assert sb.exists("/tmp/s/t") and sb.stat("/tmp/s").is_dir
        sb.set_tags({"suite": "files2"})
        assert [x.id for x in sync.Sandbox.list(tags={"suite": "files2"})] == [sb.id]
        assert [r.id for r in sync.Sandbox.list_records(tags={"suite": "files2"})] == [sb.id]
    sync.close()
