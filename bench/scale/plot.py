"""The plot of a scale run: latency vs offered load; memory and placement latency vs
live sandboxes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.scale.steps import LABEL, P99_LIMIT_S, say


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("  (matplotlib not installed: pip install -e '.[bench]' for the plot)")
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    tp = results.get("throughput", {}).get("steps", [])
    if tp:
        ax = axes[0]
        x = [s["offered_rate"] for s in tp]
        for key, style in (("p50_ms", "o-"), ("p90_ms", "s-"), ("p99_ms", "^-")):
            ax.plot(x, [s["control_plane_latency"][key] for s in tp], style, label=key[:3])
        ax.axhline(P99_LIMIT_S * 1000, color="grey", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered creates/s")
        ax.set_ylabel("control-plane create latency (ms)")
        ax.set_title(f"Latency vs offered load ({LABEL})")
        ax.legend()
    pts = results.get("concurrency", {}).get("points", [])
    if pts:
        ax = axes[1]
        x = [p["live"] for p in pts]
        ax.plot(x, [p["redis_used_memory_mib"] for p in pts], "o-", label="Redis used memory (MiB)")
        ax.plot(x, [p["scheduler_rss_mib"] for p in pts], "s-", label="scheduler RSS (MiB)")
        ax.set_xscale("log")
        ax.set_xlabel("live sandboxes")
        ax.set_ylabel("MiB")
        ax.set_title(f"Memory vs live sandboxes ({LABEL})")
        ax.legend()
        ax2 = axes[2]
        ax2.plot(x, [p["placement"]["control_plane_latency"]["p50_ms"] for p in pts], "o-", label="placement p50")
        ax2.plot(x, [p["placement"]["control_plane_latency"]["p99_ms"] for p in pts], "^-", label="placement p99")
        ax2.set_xscale("log")
        ax2.set_xlabel("live sandboxes")
        ax2.set_ylabel("ms")
        ax2.set_title(f"Placement latency vs live ({LABEL})")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True

