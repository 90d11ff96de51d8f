"""Order statistics over per-call latencies (nanoseconds), without numpy.

Percentiles are nearest-rank on the sorted sample: p99.99 of 200,000 calls is
the 20th slowest call, so it is a real observed latency, never interpolated.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

#: The percentiles every latency table reports, as (label, fraction).
PERCENTILES: Tuple[Tuple[str, float], ...] = (
    ("p50", 0.50),
    ("p99", 0.99),
    ("p99.9", 0.999),
    ("p99.99", 0.9999),
    ("max", 1.0),
)


def percentile(ordered: Sequence[int], fraction: float) -> int:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary(ordered: Sequence[int]) -> Dict[str, int]:
    """Every percentile of :data:`PERCENTILES`, by label."""
    return {label: percentile(ordered, fraction) for label, fraction in PERCENTILES}


def quantile_curve(ordered: Sequence[int], points: int = 240) -> List[Tuple[float, int]]:
    """(fraction, latency) pairs spaced evenly in log10(1 - fraction): a compact CDF that keeps the tail."""
    n = len(ordered)
    depth = math.log10(n) if n > 1 else 1.0
    fractions = sorted({1 - 10 ** (-depth * k / points) for k in range(points + 1)} | {1.0})
    return [(round(f, 8), percentile(ordered, f)) for f in fractions if f > 0]


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
