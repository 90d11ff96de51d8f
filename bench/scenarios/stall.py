"""Scenario 3: the caller's latency while the disk stalls.

What: each system's caller writes a 100 B record (loggers: one log line)
about every ``cfg.stall_period_ms`` for ``cfg.stall_duration_s``; every call's
latency is recorded with its start time. The target is a FIFO whose reader
(a thread of this process) reads nothing for ``cfg.stall_s``, then drains at
``cfg.stall_drain_rate`` bytes/s until the writing phase is over, then as
fast as it can until every writer has closed. The pipe's buffer is shrunk to
``cfg.stall_pipe_size`` (one page) so that, like a disk that stops, it
absorbs almost nothing: a direct write blocks within milliseconds; an offlog
caller should not notice.

How: for offlog systems the server opens the FIFO (it owns the blocking
write); plain file and stdlib handlers open it in the worker. The reader
opens the FIFO first (non-blocking), so nobody's open blocks. The worker runs
in ``timed`` mode with pacing and a duration. The reader counts the lines it
read: every call must arrive. The writing phase is small (about 100 KB/s)
so what offlog holds on the client side (ring, socket buffer, backlog) absorbs it.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

from .. import report
from ..config import Config
from ..procs import Lab
from ..stats import percentile
from ..worker import SYSTEMS
from .common import progress, read_ns, remove

WARMUP = 20
SLOW_NS = 1_000_000  # a call this slow "blocked"
#: Seconds the reader waits for the writers to close after the writing phase.
READER_TIMEOUT = 120.0


class SlowReader(threading.Thread):
    """Reads a FIFO: nothing until ``stall_s``, ``rate`` bytes/s until ``slow_until_s``, then all it can."""

    def __init__(self, fd: int, stall_s: float, slow_until_s: float, rate: int) -> None:
        super().__init__(name="fifo-reader", daemon=True)
        self.fd = fd
        self.stall_s = stall_s
        self.slow_until_s = slow_until_s
        self.rate = rate
        self.bytes = 0
        self.lines = 0
        self.eof = False

    def _allowance(self, elapsed: float) -> int:
        if elapsed >= self.slow_until_s:
            return 1 << 20
        return min(1 << 16, int(self.rate * (elapsed - self.stall_s)) - self.bytes)

    def run(self) -> None:
        origin = time.monotonic()
        time.sleep(self.stall_s)
        while time.monotonic() - origin < self.slow_until_s + READER_TIMEOUT:
            allowed = self._allowance(time.monotonic() - origin)
            try:
                data = os.read(self.fd, allowed) if allowed > 0 else None
            except BlockingIOError:
                data = None
            if data is None:
                time.sleep(0.005)
                continue
            if not data:
                self.eof = True  # every writer has closed
                return
            self.bytes += len(data)
            self.lines += data.count(b"\n")


def run(lab: Lab, cfg: Config) -> Dict[str, Any]:
    systems = {}
    for system in SYSTEMS:
        progress(f"stall: {system} ({cfg.stall_duration_s:g} s, target stalled for {cfg.stall_s:g} s)")
        systems[system] = _one_run(lab, cfg, system)
    return {
        "stall_s": cfg.stall_s,
        "duration_s": cfg.stall_duration_s,
        "drain_rate": cfg.stall_drain_rate,
        "period_ms": cfg.stall_period_ms,
        "pipe_size": cfg.stall_pipe_size,
        "systems": systems,
    }


def _one_run(lab: Lab, cfg: Config, system: str) -> Dict[str, Any]:
    fifo, out = lab.path(f"{system}.fifo"), str(lab.path(f"{system}-calls"))
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, cfg.stall_pipe_size)
    reader = SlowReader(fd, cfg.stall_s, cfg.stall_duration_s, cfg.stall_drain_rate)
    duration_ns = int(cfg.stall_duration_s * 1e9)
    period_ns = int(cfg.stall_period_ms * 1e6)
    params = {
        "mode": "timed",
        "targets": [str(fifo)],
        "size": cfg.stall_record,
        "calls": 2 * duration_ns // period_ns + 1,
        "warmup": WARMUP,
        "period_ns": period_ns,
        "duration_ns": duration_ns,
        "out": out,
    }
    try:
        result = lab.measure(system, [params], before_go=reader.start).results[0]
        reader.join(READER_TIMEOUT)
    finally:
        os.close(fd)
    starts, latencies = read_ns(out + ".starts"), read_ns(out + ".lat")
    remove(fifo, Path(out + ".starts"), Path(out + ".lat"))
    calls = len(latencies)
    return {
        "transport": result["transports"][0],
        "calls": calls,
        "lines_expected": WARMUP + calls,
        "lines_read": reader.lines,
        "reader_saw_eof": reader.eof,
        "starts_ns": list(starts),
        "latencies_ns": list(latencies),
    }


def _figures(fig: Dict[str, Any]) -> Dict[str, float]:
    ordered = sorted(fig["latencies_ns"])
    slow = [v for v in ordered if v >= SLOW_NS]
    return {
        "p50": percentile(ordered, 0.5),
        "p99": percentile(ordered, 0.99),
        "max": ordered[-1],
        "slow": len(slow),
        "blocked_s": sum(slow) / 1e9,
    }


def table(data: Dict[str, Any]) -> str:
    headers = [
        "system",
        "transport",
        "calls",
        "p50 us",
        "p99 us",
        "max ms",
        "calls >= 1 ms",
        "time blocked s",
        "lines arrived",
        "max x vs 0.3.1",
        "max x vs plain",
    ]
    figures = {s: _figures(fig) for s, fig in data["systems"].items()}
    rows = []
    for system, fig in data["systems"].items():
        f = figures[system]
        peer, plain = figures.get(report.peer_of(system)), figures.get(report.PLAIN)
        rows.append(
            [
                report.label(system),
                fig["transport"],
                f"{fig['calls']:,}",
                report.us(f["p50"]),
                report.us(f["p99"]),
                f"{f['max'] / 1e6:,.2f}",
                f["slow"],
                f"{f['blocked_s']:.2f}",
                f"{fig['lines_read']:,}/{fig['lines_expected']:,}",
                report.times_better(f["max"], peer and peer["max"], lower_is_better=True),
                report.times_better(f["max"], plain and plain["max"], lower_is_better=True),
            ]
        )
    note = (
        f"A record every ~{data['period_ms']:g} ms for {data['duration_s']:g} s into a FIFO "
        f"({data['pipe_size'] // 1024} KiB pipe buffer) read by nobody for "
        f"{data['stall_s']:g} s, then at {data['drain_rate'] / 1024:g} KiB/s. 'time blocked' sums the calls of "
        "1 ms or more; a caller that blocks makes fewer calls. Ratios use the max latency. " + report.RATIO_NOTE
    )
    return f"### 3. Stalled disk\n\n{note}\n\n" + report.markdown_table(headers, rows, left=2)


def plot(data: Dict[str, Any], directory: Path) -> List[Path]:
    from ..plots import stall_timeline

    series = {report.label(s): (fig["starts_ns"], fig["latencies_ns"]) for s, fig in data["systems"].items()}
    return [stall_timeline(series, data["stall_s"], data["duration_s"], directory / "stall_timeline.png")]
