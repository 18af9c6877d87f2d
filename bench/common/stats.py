"""The one percentile definition of every results table: nearest rank.

The q-quantile of n samples is the smallest sample with at least ``q * n`` of the
samples at or below it (sorted ascending, the sample at 1-based rank ``ceil(q * n)``).
It is always a measured value, never an interpolation between two: with 50 samples
p99 is the largest, with 500 it is the fifth largest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# q * n computed in floating point lands a hair above a whole rank (0.07 * 100 is
# 7.000000000000001); that must not push the rank up by one.
_EPS = 1e-9


def rank_index(n: int, q: float) -> int:
    """0-based index, in ``n`` sorted samples, of the nearest-rank ``q``-quantile."""
    if n <= 0:
        raise ValueError("no samples")
    return min(n - 1, max(0, math.ceil(q * n - _EPS) - 1))


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank ``q``-quantile (``q`` in [0, 1]) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[rank_index(len(s), q)]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    """Count, p50/p90/p99, max and mean of durations in seconds, as milliseconds."""
    if not values:
        nan = float("nan")
        return {"n": 0, "p50_ms": nan, "p90_ms": nan, "p99_ms": nan, "max_ms": nan, "mean_ms": nan}
    s = sorted(values)
    n = len(s)
    return {
        "n": n,
        "p50_ms": round(s[rank_index(n, 0.50)] * 1000, 2),
        "p90_ms": round(s[rank_index(n, 0.90)] * 1000, 2),
        "p99_ms": round(s[rank_index(n, 0.99)] * 1000, 2),
        "max_ms": round(s[-1] * 1000, 2),
        "mean_ms": round(math.fsum(s) / n * 1000, 2),
    }


def steady_rate(done_at: Sequence[float]) -> float:
    """Events per second over the middle 98 % of their times (p1 to p99 of the
    arrival times): the rate a system kept up, without the ramp-in and ramp-out that a
    random service time adds at a step's edges."""
    if len(done_at) < 2:
        return 0.0
    t = sorted(done_at)
    lo, hi = rank_index(len(t), 0.01), rank_index(len(t), 0.99)
    if hi <= lo or t[hi] <= t[lo]:
        return 0.0
    return round((hi - lo) / (t[hi] - t[lo]), 1)
