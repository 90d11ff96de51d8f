"""Scenario 4: one server, many clients.

What: aggregate records/s of 1, 16, 64 and 256 clients writing 100 B records
to one offlog server (shm, socket, and 0.3.1 for reference; plain files for
the baseline), with the server's CPU time per record and its memory: VmRSS
once every client has synced (all still connected) and VmHWM (its peak).

How: 256 client processes would measure process start-up on a 2-core
machine, so a client is a *thread* with its own connection (ProxyFile) and
its own file; the threads are spread evenly over
``min(clients, cfg.clients_processes)`` worker processes (``bulk`` mode).
Every run gets a fresh server, so VmHWM is that run's peak. A run writes
``cfg.clients_records`` records in all, split over the clients, and lasts
from the first client's start to the last one's sync point returning. Each
file must then hold exactly its bytes. Systems are interleaved over
``cfg.clients_rounds`` rounds; the table shows the median run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from .. import report
from ..config import Config
from ..procs import Lab
from ..worker import SYSTEMS as ALL_SYSTEMS
from .common import expect_size, median_run, progress, rates, remove, rotated

SYSTEMS = ["offlog-shm", "offlog-socket", "offlog-0.3.1", "plain-file"]
WARMUP = 16


def run(lab: Lab, cfg: Config) -> Dict[str, Any]:
    cells = []
    for clients in cfg.clients_counts:
        processes = min(clients, cfg.clients_processes)
        per_client = max(1, cfg.clients_records // clients)
        progress(f"clients: {clients} client(s) in {processes} process(es), {per_client:,} records each")
        runs: Dict[str, List[Dict[str, Any]]] = {s: [] for s in SYSTEMS}
        for r in range(cfg.clients_rounds):
            for system in rotated(SYSTEMS, r):
                runs[system].append(_one_run(lab, cfg, system, clients, processes, per_client))
        cells.append({"clients": clients, "processes": processes, "records_per_client": per_client, "runs": runs})
    return {"record": cfg.clients_record, "cells": cells}


def _split(items: List[Any], parts: int) -> List[List[Any]]:
    """``items`` in ``parts`` runs of nearly equal length."""
    return [items[i::parts] for i in range(parts)]


def _one_run(lab: Lab, cfg: Config, system: str, clients: int, processes: int, calls: int) -> Dict[str, Any]:
    kind = ALL_SYSTEMS[system].server
    server = lab.start_server(kind) if kind else None
    targets = [lab.path(f"{system}-c{clients}.log") for _ in range(clients)]
    params = [
        {
            "mode": "bulk",
            "targets": [str(t) for t in group],
            "size": cfg.clients_record,
            "calls": calls,
            "warmup": WARMUP,
        }
        for group in _split(targets, processes)
    ]
    try:
        measured = lab.measure(system, params, server=server)
    finally:
        if server is not None:
            server.stop()
    for target in targets:
        expect_size(target, (WARMUP + calls) * cfg.clients_record)
    remove(*targets)
    memory = measured.server_memory_kib
    figures = rates(measured, clients * calls, cfg.clients_record)
    return dict(figures, server_rss_kib=memory.get("VmRSS"), server_peak_rss_kib=memory.get("VmHWM"))


def _mib(kib: Optional[int]) -> str:
    return "-" if kib is None else f"{kib / 1024:,.1f}"


def table(data: Dict[str, Any]) -> str:
    headers = [
        "clients",
        "system",
        "records/s",
        "MB/s",
        "server CPU us/rec",
        "server RSS MiB",
        "server peak RSS MiB",
        "records/s x vs 0.3.1",
        "x vs plain",
    ]
    rows = []
    for cell in data["cells"]:
        best = {system: median_run(runs) for system, runs in cell["runs"].items()}
        for system, run in best.items():
            cpu = run["server_cpu_us_per_record"]
            rows.append(
                [
                    f"{cell['clients']} ({cell['processes']} proc)",
                    report.label(system),
                    report.si(run["records_per_s"]),
                    f"{run['bytes_per_s'] / 1e6:,.1f}",
                    "-" if cpu is None else f"{cpu:.2f}",
                    _mib(run["server_rss_kib"]),
                    _mib(run["server_peak_rss_kib"]),
                    report.times_better(run["records_per_s"], best["offlog-0.3.1"]["records_per_s"], False),
                    report.times_better(run["records_per_s"], best[report.PLAIN]["records_per_s"], False),
                ]
            )
    note = (
        f"{data['record']} B records; clients are threads, each with its own connection and file, spread over "
        "the processes shown; a fresh server per run; RSS once all clients synced, peak = VmHWM. " + report.RATIO_NOTE
    )
    return f"### 4. Many clients on one server\n\n{note}\n\n" + report.markdown_table(headers, rows, left=2)


def plot(data: Dict[str, Any], directory: Path) -> List[Path]:
    return []
