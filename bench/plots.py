"""PNG figures of the scenarios (matplotlib, Agg backend: no display needed).

* :func:`latency_cdf`: scenario 1's per-call latency of every system, as a CDF
  (log latency axis) beside its complement on log-log axes, which shows the
  tail (p99.9, p99.99) that a CDF squeezes into its top edge.
* :func:`stall_timeline`: scenario 3's latency of every call against the time
  it was made, one panel per system, stall and slow-drain phases shaded.
* :func:`by_clients`: a server-side figure against the number of clients,
  one line per system (scenario 4's CPU per record, scenario 6's CPU share).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import matplotlib.ticker  # noqa: E402


def latency_cdf(curves: Dict[str, Tuple[int, List[Tuple[float, int]]]], path: Path) -> Path:
    """``curves``: label -> (calls, (fraction, latency ns) pairs as from :func:`bench.stats.quantile_curve`)."""
    fig, (cdf, tail) = plt.subplots(1, 2, figsize=(13, 5.5))
    for label, (calls, curve) in curves.items():
        fractions = [f for f, _ in curve]
        micros = [ns / 1000 for _, ns in curve]
        cdf.plot(micros, fractions, label=label)
        tail.plot(micros, [1 - f + 1 / calls for f in fractions], label=label)  # the max: 1 call in `calls`
    cdf.set(xscale="log", xlabel="latency per call (us)", ylabel="fraction of calls at most this slow")
    cdf.set_title("Per-call latency, CDF")
    tail.set(xscale="log", yscale="log", xlabel="latency per call (us)", ylabel="fraction of calls at least this slow")
    tail.set_title("Tail (1 - CDF)")
    for ax in (cdf, tail):
        ax.grid(True, which="both", alpha=0.3)
    tail.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def by_clients(series: Dict[str, Sequence[Tuple[int, float]]], ylabel: str, title: str, path: Path) -> Path:
    """``series``: label -> (clients, value) pairs; both axes logarithmic."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in series.items():
        ax.plot([c for c, _ in points], [v for _, v in points], marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="clients", ylabel=ylabel, title=title)
    ax.set_xticks(sorted({c for points in series.values() for c, _ in points}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stall_timeline(
    series: Dict[str, Tuple[Sequence[int], Sequence[int]]], stall_s: float, duration_s: float, path: Path
) -> Path:
    """``series``: label -> (call start ns since the first call, latency ns)."""
    fig, axes = plt.subplots(len(series), 1, figsize=(11, 1.7 * len(series)), sharex=True, sharey=True)
    for ax, (label, (starts, latencies)) in zip(axes, series.items()):
        ax.axvspan(0, stall_s, color="tab:red", alpha=0.12, label="reader stalled")
        ax.axvspan(stall_s, duration_s, color="tab:orange", alpha=0.10, label="reader slow")
        ax.scatter([t / 1e9 for t in starts], [max(v, 1) / 1000 for v in latencies], s=3)
        ax.set_yscale("log")
        ax.set_ylabel("us")
        ax.set_title(label, fontsize=9, loc="left")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("time since the first call (s)")
    fig.suptitle("Caller latency per call while the target FIFO stalls")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
