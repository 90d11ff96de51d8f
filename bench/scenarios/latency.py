"""Scenario 1: per-call latency in the caller.

What: how long the calling thread spends in one call: ``write(100-byte
record)`` for the file-like systems, ``info(60-character message, "foo", 7)``
for the loggers; p50, p99, p99.9, p99.99 and max over ``cfg.latency_calls``
calls per system.

How: ``cfg.latency_rounds`` rounds; in each, every system runs once in its own
worker process (the worker's ``timed`` mode), systems one after another and
in a rotated order, so a noisy spell of the machine hits all of them. The
rounds' calls are merged before taking percentiles. Each call is timed alone
with ``perf_counter_ns``; nothing is subtracted: the table shows the timer's
own overhead (median of an empty ``t1 - t0``) and the harness's (the same
around a no-op ``call(*args)``) next to the figures. After the loop each
worker syncs and the file must hold exactly the lines written.
"""

from __future__ import annotations

from array import array
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .. import report
from ..config import Config
from ..procs import Lab
from ..stats import PERCENTILES, median, quantile_curve, summary
from ..worker import SYSTEMS
from .common import expect_lines, progress, read_ns, remove, rotated

#: Targets from the issue: (figure, comparison, bound); "x0.3.1" is the p50 ratio against 0.3.1.
TARGETS: Dict[str, List[Tuple[str, str, float]]] = {
    "offlog-shm": [("p50", "<=", 350), ("p99", "<=", 1000), ("p99.9", "<=", 4000), ("x0.3.1", ">=", 5)],
    "offlog-logger-shm": [("p50", "<=", 1500), ("x0.3.1", ">=", 3)],
}


def run(lab: Lab, cfg: Config) -> Dict[str, Any]:
    calls = max(1, cfg.latency_calls // cfg.latency_rounds)
    samples: Dict[str, List[array]] = {s: [] for s in SYSTEMS}
    workers: Dict[str, List[Dict[str, Any]]] = {s: [] for s in SYSTEMS}
    for r in range(cfg.latency_rounds):
        progress(f"latency: round {r + 1}/{cfg.latency_rounds}, {calls:,} calls per system")
        for system in rotated(list(SYSTEMS), r):
            latencies, result = _one_run(lab, cfg, system, calls)
            samples[system].append(latencies)
            workers[system].append(result)
    return {"calls_per_round": calls, "systems": {s: _figures(samples[s], workers[s]) for s in SYSTEMS}}


def _one_run(lab: Lab, cfg: Config, system: str, calls: int) -> Tuple[array, Dict[str, Any]]:
    target, out = lab.path(f"{system}.log"), str(lab.path(f"{system}-calls"))
    params = {
        "mode": "timed",
        "targets": [str(target)],
        "size": cfg.latency_record,
        "calls": calls,
        "warmup": cfg.latency_warmup,
        "period_ns": 0,
        "duration_ns": 0,
        "out": out,
    }
    result = lab.measure(system, [params]).results[0]
    expect_lines(target, cfg.latency_warmup + calls)
    latencies = read_ns(out + ".lat")
    remove(target, Path(out + ".lat"), Path(out + ".starts"))
    return latencies, result


def _figures(samples: List[array], workers: List[Dict[str, Any]]) -> Dict[str, Any]:
    merged = sorted(v for sample in samples for v in sample)
    return {
        "calls": len(merged),
        "percentiles_ns": summary(merged),
        "rounds_ns": [summary(sorted(s)) for s in samples],
        "timer_ns": median([w["timer_ns"] for w in workers]),
        "harness_ns": median([w["harness_ns"] for w in workers]),
        "transport": workers[0]["transports"][0],
        "offlog": workers[0]["offlog"],
        "cdf": quantile_curve(merged),
    }


def _p50_ratio(data: Dict[str, Any], system: str, reference: str) -> Optional[float]:
    p50 = data["systems"][system]["percentiles_ns"]["p50"]
    ref = data["systems"].get(reference, {}).get("percentiles_ns", {}).get("p50")
    return ref / p50 if ref and p50 else None


def targets_text(data: Dict[str, Any], system: str) -> str:
    """The targets of ``system`` with ok/MISS each, or "" if it has none."""
    figures = data["systems"][system]["percentiles_ns"]
    parts = []
    for name, _op, bound in TARGETS.get(system, []):
        if name == "x0.3.1":
            value = _p50_ratio(data, system, report.peer_of(system)) or 0.0
            parts.append(f"p50 >={bound:g}x lower than 0.3.1 {report.check(value >= bound)}")
        else:
            parts.append(f"{name}<={bound / 1000:g}us {report.check(figures[name] <= bound)}")
    return "; ".join(parts)


def table(data: Dict[str, Any]) -> str:
    headers = [
        "system",
        "transport",
        "calls",
        *(f"{label} us" for label, _ in PERCENTILES),
        "p50 us per round",
        "timer / harness ns",
        "p50 x vs 0.3.1",
        "p50 x vs plain",
        "target",
    ]
    rows = []
    for system, fig in data["systems"].items():
        p = fig["percentiles_ns"]
        per_round = [r["p50"] for r in fig["rounds_ns"]]
        peer, plain = data["systems"].get(report.peer_of(system)), data["systems"].get(report.PLAIN)
        rows.append(
            [
                report.label(system),
                fig["transport"],
                f"{fig['calls']:,}",
                *(report.us(p[label]) for label, _ in PERCENTILES),
                f"{report.us(min(per_round))}-{report.us(max(per_round))}",
                f"{fig['timer_ns']:.0f} / {fig['harness_ns']:.0f}",
                report.times_better(p["p50"], peer and peer["percentiles_ns"]["p50"], lower_is_better=True),
                report.times_better(p["p50"], plain and plain["percentiles_ns"]["p50"], lower_is_better=True),
                targets_text(data, system),
            ]
        )
    note = (
        "Per-call latency in the caller (100 B records; loggers: 60-char message, 2 args). "
        "Every figure includes the timer (empty t1-t0) and the harness (t1-t0 around a no-op call(*args)); "
        "nothing is subtracted. Ratios use p50; loggers are compared with the 0.3.1 Logger. " + report.RATIO_NOTE
    )
    return f"### 1. Per-call latency\n\n{note}\n\n" + report.markdown_table(headers, rows, left=2)


def plot(data: Dict[str, Any], directory: Path) -> List[Path]:
    from ..plots import latency_cdf

    curves = {report.label(s): (fig["calls"], fig["cdf"]) for s, fig in data["systems"].items()}
    return [latency_cdf(curves, directory / "latency_cdf.png")]
