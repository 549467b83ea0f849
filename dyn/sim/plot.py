"""Plots of a sim or bench report: latency, replicas per role and hit rate over time.

matplotlib is the optional extra `plot` and is imported only here, only when
a plot is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dyn.sim.errors import SimError


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Draw `report["timeline"]` (sim) into a PNG; a report without one gets its percentiles only."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SimError("matplotlib is not installed (pip install 'dyn[plot]')", field="--plot") from None
    timeline = report.get("timeline") or []
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    if timeline:
        t = [row["time_s"] for row in timeline]
        axes[0].plot(t, [row.get("ttft_p90_s", 0.0) * 1e3 for row in timeline], label="TTFT p90")
        axes[0].plot(t, [row.get("itl_p90_s", 0.0) * 1e3 for row in timeline], label="ITL p90 (mean/req)")
        for role in ("prefill", "decode", "starting", "draining"):
            axes[1].step(t, [row.get(role, 0) for row in timeline], where="post", label=role)
        axes[2].plot(t, [row.get("hit_rate", 0.0) for row in timeline], label="prefix hit rate")
    else:
        axes[0].bar(["TTFT p50", "TTFT p90", "TTFT p99"],
                    [report.get("ttft_ms", {}).get(k) or 0.0 for k in ("p50", "p90", "p99")])
        axes[2].axhline(report.get("prefix_hit_rate") or 0.0, label="prefix hit rate")
    slo = report.get("slo") or {}
    if slo.get("ttft_ms"):
        axes[0].axhline(slo["ttft_ms"], color="red", linestyle="--", linewidth=0.8, label="TTFT target")
    axes[0].set_ylabel("ms")
    axes[0].set_yscale("symlog")
    axes[1].set_ylabel("workers")
    axes[2].set_ylabel("hit rate")
    axes[2].set_xlabel("time (s)")
    for ax in axes:
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
