"""hotbed's runsc wrapper (deploy/runsc/runsc-hotbed), against a stand-in runsc that
prints the arguments it was given: the rewrites dockerd's calls go through."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

WRAPPER = Path(__file__).resolve().parent.parent / "deploy" / "runsc" / "runsc-hotbed"
GLOBAL = ["--network=none", "--root", "/run/x/moby", "--log", "/run/x/log.json", "--log-format", "json"]


@pytest.fixture
def call(tmp_path: Path):  # type: ignore[no-untyped-def]
    fake = tmp_path / "runsc"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" | python3 -c \'import json,sys; print(json.dumps(sys.stdin.read().splitlines()))\'\n')
    fake.chmod(0o755)
    marks = tmp_path / "marks"
    marks.mkdir()

    def run(*argv: str) -> tuple[int, list[str] | None]:
        env = dict(os.environ, HOTBED_RUNSC=str(fake), HOTBED_RESTORE_DIR=str(marks))
        res = subprocess.run(["sh", str(WRAPPER), *argv], env=env, capture_output=True, text=True, check=False)
        return res.returncode, json.loads(res.stdout) if res.stdout.strip() else None

    run.marks = marks  # type: ignore[attr-defined]
    return run


def test_plain_calls_pass_through_unchanged(call) -> None:  # type: ignore[no-untyped-def]
    for argv in (
        [*GLOBAL, "create", "--bundle", "/b", "--pid-file", "/p", "cid"],
        [*GLOBAL, "start", "cid"],
        [*GLOBAL, "exec", "--process", "/tmp/p.json", "--detach", "cid"],
        [*GLOBAL, "kill", "cid", "9"],
        ["--version"],
    ):
        assert call(*argv) == (0, argv)


def test_marked_create_becomes_a_restore_and_its_start_a_no_op(call) -> None:  # type: ignore[no-untyped-def]
    marks: Path = call.marks
    (marks / "cid").write_text("/snap shots/a b/checkpoint\n")
    rc, got = call(*GLOBAL, "create", "--bundle", "/b 1", "--pid-file", "/p", "cid")
    assert rc == 0
    assert got == [*GLOBAL, "restore", "--detach", "--image-path", "/snap shots/a b/checkpoint",
                   "--bundle", "/b 1", "--pid-file", "/p", "cid"]
    assert not (marks / "cid").exists() and (marks / "cid.restored").exists()
    # runsc restore has started it: dockerd's start must not run runsc start.
    assert call(*GLOBAL, "start", "cid") == (0, None)
    assert not (marks / "cid.restored").exists()
    # A later plain start of the same container (after it stopped) starts normally.
    assert call(*GLOBAL, "start", "cid") == (0, [*GLOBAL, "start", "cid"])
    # Another container's create is untouched by this one's mark.
    (marks / "cid").write_text("/snap")
    argv = [*GLOBAL, "create", "--bundle", "/b", "other"]
    assert call(*argv) == (0, argv)


def test_checkpoints_are_written_uncompressed(call) -> None:  # type: ignore[no-untyped-def]
    rc, got = call(*GLOBAL, "checkpoint", "--image-path", "/img", "--leave-running", "cid")
    assert rc == 0
    assert got == [*GLOBAL, "checkpoint", "--compression=none", "--image-path", "/img", "--leave-running", "cid"]
