"""Scenario 4: one server, many clients.

What: aggregate records/s of 1, 16, 64, 256 and 1024 clients writing 100 B
records as fast as they can (a burst) to one offlog server (shm, socket, and
0.3.1 for reference; plain files for the baseline), with the server's CPU
time per record, also against the same system's figure with one client (the
issue's target: within 1.5x of it at every count), and its memory: VmRSS once
every client has synced (all still connected) and VmHWM (its peak). The
servers run with their default flags but for the ring server's
``--max-ring-memory``: room for every client's ring
(``cfg.ring_memory_per_client`` each; the default 1 GiB holds 256 rings of
4 MiB, and a ring client past it would fail). The table shows which
transport the clients got.

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

from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

from .. import report
from ..config import Config
from ..procs import Lab
from ..worker import SYSTEMS as ALL_SYSTEMS
from .common import expect_size, median_run, progress, rates, remove, ring_room, rotated, split, transports_text

SYSTEMS = ["offlog-shm", "offlog-socket", "offlog-0.3.1", "plain-file"]
OURS = ("offlog-shm", "offlog-socket")
WARMUP = 16
#: The issue's targets for our servers: server CPU per record at most this many times the 1-client
#: figure, at every count; at TARGET_CLIENTS, records/s at least this many times 0.3.1's.
TARGET_CPU_GROWTH = 1.5
TARGET_CLIENTS, TARGET_SPEEDUP = 256, 3.0


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


def _one_run(lab: Lab, cfg: Config, system: str, clients: int, processes: int, calls: int) -> Dict[str, Any]:
    kind = ALL_SYSTEMS[system].server
    server = lab.start_server(kind, flags=ring_room(kind, clients, cfg)) if kind else None
    targets = [lab.path(f"{system}-c{clients}.log") for _ in range(clients)]
    params = [
        {
            "mode": "bulk",
            "targets": [str(t) for t in group],
            "size": cfg.clients_record,
            "calls": calls,
            "warmup": WARMUP,
        }
        for group in split(targets, processes)
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
    return dict(
        figures,
        server_rss_kib=memory.get("VmRSS"),
        server_peak_rss_kib=memory.get("VmHWM"),
        transport_counts=dict(Counter(t for r in measured.results for t in r["transports"])),
    )


def _mib(kib: Optional[int]) -> str:
    return "-" if kib is None else f"{kib / 1024:,.1f}"


def _transports(run: Dict[str, Any]) -> str:
    """How many clients got which transport (runs saved before this was counted: the kinds only)."""
    counts = run.get("transport_counts")
    return transports_text(counts) if counts else ", ".join(run["transports"])


def _targets(system: str, clients: int, growth: Optional[float], speedup: Optional[float]) -> str:
    if system not in OURS:
        return ""
    parts = []
    if growth is not None and clients > 1:
        parts.append(f"CPU/rec <= {TARGET_CPU_GROWTH:g}x 1 client's {report.check(growth <= TARGET_CPU_GROWTH)}")
    if speedup is not None and clients == TARGET_CLIENTS:
        parts.append(f">= {TARGET_SPEEDUP:g}x 0.3.1 records/s {report.check(speedup >= TARGET_SPEEDUP)}")
    return "; ".join(parts)


def table(data: Dict[str, Any]) -> str:
    headers = [
        "clients",
        "system",
        "transports",
        "records/s",
        "MB/s",
        "server CPU us/rec",
        "CPU/rec vs 1 client",
        "server RSS MiB",
        "server peak RSS MiB",
        "records/s x vs 0.3.1",
        "x vs plain",
        "target",
    ]
    rows = []
    base = {  # server CPU per record with one client, by system
        system: median_run(runs)["server_cpu_us_per_record"]
        for cell in data["cells"]
        if cell["clients"] == 1
        for system, runs in cell["runs"].items()
    }
    for cell in data["cells"]:
        best = {system: median_run(runs) for system, runs in cell["runs"].items()}
        for system, run in best.items():
            cpu = run["server_cpu_us_per_record"]
            growth = cpu / base[system] if cpu is not None and base.get(system) else None
            speedup = run["records_per_s"] / best["offlog-0.3.1"]["records_per_s"]
            rows.append(
                [
                    f"{cell['clients']} ({cell['processes']} proc)",
                    report.label(system),
                    _transports(run),
                    report.si(run["records_per_s"]),
                    f"{run['bytes_per_s'] / 1e6:,.1f}",
                    "-" if cpu is None else f"{cpu:.2f}",
                    "-" if growth is None else f"{growth:.2f}x",
                    _mib(run["server_rss_kib"]),
                    _mib(run["server_peak_rss_kib"]),
                    report.times_better(run["records_per_s"], best["offlog-0.3.1"]["records_per_s"], False),
                    report.times_better(run["records_per_s"], best[report.PLAIN]["records_per_s"], False),
                    _targets(system, cell["clients"], growth, speedup),
                ]
            )
    note = (
        f"{data['record']} B records; clients are threads, each with its own connection and file, spread over "
        "the processes shown; a fresh server per run, default flags but room for every client's ring; RSS once "
        "all clients synced, peak = VmHWM. "
        "'CPU/rec vs 1 client': server CPU per record over the same system's with one client (lower is "
        "better). " + report.RATIO_NOTE
    )
    return f"### 4. Many clients on one server\n\n{note}\n\n" + report.markdown_table(headers, rows, left=3)


def plot(data: Dict[str, Any], directory: Path) -> List[Path]:
    """Server CPU per record against clients, one line per offlog system."""
    from ..plots import by_clients

    series: Dict[str, List[Any]] = {}
    for cell in data["cells"]:
        for system, runs in cell["runs"].items():
            cpu = median_run(runs)["server_cpu_us_per_record"]
            if cpu:
                series.setdefault(report.label(system), []).append((cell["clients"], cpu))
    path = directory / "clients_server_cpu.png"
    return [by_clients(series, "server CPU per record (us)", "Burst: server CPU per record", path)]
