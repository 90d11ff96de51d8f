"""Scenario 2: throughput end to end, until the bytes are in the file.

What: records/s and MB/s of the file-like systems, 1 and 8 clients, records
of 16 B to 64 KiB; for offlog systems also the server's CPU time per record.

How: each client is a worker process (``bulk`` mode) with its own file; all
clients of a run are released together and the run lasts from the first
client's start to the last client's sync point returning (offlog
``sync()``, which returns once the server has written everything; 0.3.1
``close()``, which returns once its server said BYE; plain files flush every
record). Afterwards every file must have exactly the bytes written. A run
writes ``min(max records, max bytes / size)`` records, split over the
clients. Server CPU is that of all its threads between ``go`` and the last
result (:class:`bench.procs.CpuMeter`). Runs are
repeated ``cfg.throughput_rounds`` times, systems interleaved; the table
shows the median run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from .. import report
from ..config import Config
from ..procs import Lab
from ..stats import median
from .common import expect_size, median_run, progress, rates, remove, rotated

SYSTEMS = ["offlog-shm", "offlog-socket", "offlog-0.3.1", "plain-file"]
WARMUP = 64
#: Targets from the issue for one shm client: (size, figure, bound).
TARGETS = [(100, "records_per_s", 1.5e6), (4096, "bytes_per_s", 1e9)]


def run(lab: Lab, cfg: Config) -> Dict[str, Any]:
    cells = []
    for clients in cfg.throughput_clients:
        for size in cfg.throughput_sizes:
            per_client = max(1, min(cfg.throughput_max_records, cfg.throughput_max_bytes // size) // clients)
            progress(f"throughput: {clients} client(s), {size} B records, {per_client:,} records per client")
            runs: Dict[str, List[Dict[str, Any]]] = {s: [] for s in SYSTEMS}
            for r in range(cfg.throughput_rounds):
                for system in rotated(SYSTEMS, r):
                    runs[system].append(_one_run(lab, system, clients, size, per_client))
            cells.append({"clients": clients, "size": size, "records_per_client": per_client, "runs": runs})
    return {"cells": cells}


def _one_run(lab: Lab, system: str, clients: int, size: int, calls: int) -> Dict[str, Any]:
    targets = [lab.path(f"{system}-{size}.log") for _ in range(clients)]
    params = [{"mode": "bulk", "targets": [str(t)], "size": size, "calls": calls, "warmup": WARMUP} for t in targets]
    measured = lab.measure(system, params)
    for target in targets:
        expect_size(target, (WARMUP + calls) * size)
    remove(*targets)
    return rates(measured, clients * calls, size)


def _target_text(system: str, clients: int, size: int, run: Dict[str, Any]) -> str:
    if system != "offlog-shm" or clients != 1:
        return ""
    for target_size, figure, bound in TARGETS:
        if size == target_size:
            unit = "records/s" if figure == "records_per_s" else "B/s"
            return f">= {report.si(bound)} {unit} {report.check(run[figure] >= bound)}"
    return ""


def _cpu(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(data: Dict[str, Any]) -> str:
    headers = [
        "clients",
        "size",
        "system",
        "records/s",
        "MB/s",
        "server CPU us/rec",
        "records/s x vs 0.3.1",
        "x vs plain",
        "target",
    ]
    rows = []
    for cell in data["cells"]:
        best = {system: median_run(runs) for system, runs in cell["runs"].items()}
        for system, run in best.items():
            rows.append(
                [
                    cell["clients"],
                    f"{cell['size']:,} B",
                    report.label(system),
                    report.si(run["records_per_s"]),
                    f"{run['bytes_per_s'] / 1e6:,.1f}",
                    _cpu(run["server_cpu_us_per_record"]),
                    report.times_better(run["records_per_s"], best["offlog-0.3.1"]["records_per_s"], False),
                    report.times_better(run["records_per_s"], best[report.PLAIN]["records_per_s"], False),
                    _target_text(system, cell["clients"], cell["size"], run),
                ]
            )
    rounds = len(data["cells"][0]["runs"]["offlog-shm"])
    spread = f"median of {rounds} rounds; records/s spread between rounds up to {_spread(data):.0%}"
    note = (
        "Throughput until the bytes are in the file (offlog: sync() returned; 0.3.1: close() returned); "
        f"each client a process with its own file; {spread if rounds > 1 else 'one round'}. " + report.RATIO_NOTE
    )
    return f"### 2. Throughput end to end\n\n{note}\n\n" + report.markdown_table(headers, rows, left=3)


def _spread(data: Dict[str, Any]) -> float:
    """Largest (max - min) / median of records/s over the rounds of one cell."""
    worst = 0.0
    for cell in data["cells"]:
        for runs in cell["runs"].values():
            per_round = [r["records_per_s"] for r in runs]
            worst = max(worst, (max(per_round) - min(per_round)) / median(per_round))
    return worst


def plot(data: Dict[str, Any], directory: Path) -> List[Path]:
    return []
