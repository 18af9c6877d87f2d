"""Placement phase: the cost of one placement decision against fleet size (pure
functions, no cluster)."""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from bench.common.loadgen import SPEC
from bench.scale.steps import (
    say,
)


def phase_placement(args: argparse.Namespace) -> dict[str, Any]:
    """CPU per placement decision against fleet size: the full scan (``rank``, used for
    GPU / tagged / pack requests) and the heap index (``WorkerRegistry.ranked``, the
    common request)."""
    from hotbed.keys import Keys
    from hotbed.protocol import WorkerInfo
    from scheduler.placement import rank
    from scheduler.registry import WorkerRegistry, WorkerView

    rows = []
    for n in (10, 100, 1_000, 10_000):
        rng = random.Random(n)
        views = {
            f"w{i}": WorkerView(
                info=WorkerInfo(id=f"w{i}", host="h", runtime="sim", cpu_millis=64_000,
                                memory_mb=256_000, kind="simulated"),
                cpu_free=rng.randrange(0, 64_000), mem_free=rng.randrange(0, 256_000))
            for i in range(n)
        }
        reps = max(20, 20_000 // n)
        t = time.perf_counter()
        for _ in range(reps):
            rank(list(views.values()), SPEC)
        scan_us = (time.perf_counter() - t) / reps * 1e6
        reg = WorkerRegistry(None, Keys("x"), heartbeat_ttl_s=5)  # type: ignore[arg-type]
        reg.workers = views
        reg._rebuild()
        reps = 20_000
        t = time.perf_counter()
        for i in range(reps):
            if i % 1000 == 0:
                reg._rebuild()  # the registry refresh does this every 0.5 s
            for w, _g in reg.ranked(SPEC):
                w.cpu_free -= SPEC.resources.millicpu  # what a placement does on success
                break
        index_us = (time.perf_counter() - t) / reps * 1e6
        rows.append({"workers": n, "rank_scan_us": round(scan_us, 1), "index_us": round(index_us, 2)})
        say(f"  placement decision over {n:>6} workers: full scan {scan_us:9.1f} us, "
            f"heap index {index_us:6.2f} us")
    return {"rank": rows}

