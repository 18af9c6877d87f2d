"""README.md's ``sh`` and ``python`` blocks run against a real stack, so they cannot rot.

Each block runs on its own, in order of appearance, against a fresh docker+runsc
stack (``hotbed_stack``): shell blocks under ``bash -euo pipefail`` with a ``hotbed``
command on PATH, Python blocks as scripts; each must exit 0. A block that cannot run
here (it installs packages, say) carries ``<!-- readme-test: skip: REASON -->`` on the
line before its fence; a skip without a reason fails.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import anyio
import pytest

from tests.conftest import Stack

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNABLE = {"sh": "sh", "bash": "sh", "shell": "sh", "python": "python"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b:?\s*(.*?)\s*-->\s*$")
BLOCK_TIMEOUT_S = 300


class Block:
    def __init__(self, lang: str, code: str, line: int, skip: str | None) -> None:
        self.lang, self.code, self.line, self.skip = lang, code, line, skip

    @property
    def id(self) -> str:
        return f"README.md:{self.line}:{self.lang}"


def blocks(text: str) -> list[Block]:
    """Every fenced block of a runnable language, with the skip reason marked before it."""
    out = []
    for m in FENCE.finditer(text):
        lang = RUNNABLE.get(m.group(1))
        if lang is None:
            continue
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = SKIP.search(before)
        out.append(Block(lang, m.group(2), line, marker.group(1) if marker else None))
    return out


README_BLOCKS = blocks(README.read_text())


def test_readme_blocks_are_run_or_say_why_not() -> None:
    assert sum(b.skip is None for b in README_BLOCKS) >= 3, "the README lost its runnable examples"
    for b in README_BLOCKS:
        assert b.skip is None or len(b.skip) > 10, f"{b.id}: a skipped block must say why"
    # A marker that no longer sits before a block would silently stop applying.
    markers = len(re.findall(r"^<!--\s*readme-test:", README.read_text(), re.M))
    assert markers == sum(b.skip is not None for b in README_BLOCKS), "a readme-test marker is not before a block"


def test_block_parser_reads_markers() -> None:
    text = "x\n<!-- readme-test: skip: needs root and apt -->\n```sh\nmake demo\n```\n\n```python\nprint(1)\n```\n"
    got = blocks(text)
    assert [(b.lang, b.code, b.skip) for b in got] == [
        ("sh", "make demo\n", "needs root and apt"), ("python", "print(1)\n", None),
    ]


@pytest.mark.anyio
@pytest.mark.timeout(BLOCK_TIMEOUT_S + 60)
@pytest.mark.parametrize("block", [b for b in README_BLOCKS if b.skip is None], ids=lambda b: b.id)
async def test_readme_block_runs(block: Block, hotbed_stack: Stack, tmp_path: Path) -> None:
    # The `hotbed` command a newcomer's PATH has after `make demo`.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    hb = bindir / "hotbed"
    hb.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cli "$@"\n')
    hb.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bindir}:{os.environ.get('PATH', '')}",
        "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}",
        "HOTBED_REDIS_URL": hotbed_stack.redis_url,
        "HOTBED_PREFIX": hotbed_stack.prefix,
    }
    if block.lang == "sh":
        cmd = ["bash", "-euo", "pipefail", "-c", block.code]
    else:
        script = tmp_path / "block.py"
        script.write_text(block.code)
        cmd = [sys.executable, str(script)]
    with anyio.fail_after(BLOCK_TIMEOUT_S):
        res = await anyio.run_process(cmd, env=env, cwd=tmp_path, check=False)
    out = res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")
    assert res.returncode == 0, f"{block.id} exited {res.returncode}:\n{block.code}\n---\n{out[-4000:]}"
    assert "Traceback" not in out, out
