"""Scenario 6: many slow clients on one server, paced.

What: ``N`` clients (``cfg.paced_counts``) each write ``cfg.paced_rate``
records/s of 100 B for ``cfg.paced_seconds``, as an application's modest
loggers do, to one server: ours with rings (shm), ours over the socket, and
offlog 0.3.1 with its own server. Such a load costs a server wake-ups, not
bytes, so the figures are what the server spends on it: its CPU (all its
threads, see :class:`bench.procs.CpuMeter`) over the paced window as
% of one core, per record, and against 0.3.1's (the target: at most half of
0.3.1's at 256 clients); its thread count at the window's end; what the
clients spent (the workers' CPU over the same window, % of one core); and
whether the clients got their records out: records written against those
intended, and how late the calls started against their schedule.

How: a client is a thread with its own connection (ProxyFile) and its own
file; the threads are spread evenly over ``min(N, cfg.paced_processes)``
worker processes (``paced`` mode). Client ``i`` of ``N`` makes a call at
``i / N`` of a period past go and then every period (so the clients' calls
spread over the period instead of arriving together); it sleeps between
calls, a call whose time has passed goes at once, and calls are due until
the window ends; a client still more than a period behind then stops, so
records written < intended means clients fell behind. The window is timed here, from go to
``cfg.paced_seconds`` later; then each client syncs its file (0.3.1:
close()), and every file must hold exactly the records its client wrote.
A fresh server per run, with its default flags but for the ring server's
``--max-ring-memory``: room for every client's ring (``cfg.ring_memory_per_client``
each; the default 1 GiB holds 256 rings of 4 MiB, and a ring client past it
would fail). The table shows which transport the clients got. Systems are
interleaved over ``cfg.paced_rounds`` rounds; the table shows the run with
the median server CPU.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List

from .. import report
from ..config import Config
from ..procs import Lab, check_identity
from ..stats import summary
from ..worker import SYSTEMS as ALL_SYSTEMS
from .common import expect_size, progress, read_ns, remove, ring_room, rotated, split, transports_text

SYSTEMS = ["offlog-shm", "offlog-socket", "offlog-0.3.1"]
PEER = "offlog-0.3.1"
WARMUP = 1
#: The issue's target: at this many clients, our server's CPU at most this fraction of 0.3.1's.
TARGET_CLIENTS, TARGET_CPU_FRACTION = 256, 0.5
#: Seconds a worker with hundreds of clients has to connect them all and say ready.
READY_TIMEOUT = 120.0


def run(lab: Lab, cfg: Config) -> Dict[str, Any]:
    cells = []
    for clients in cfg.paced_counts:
        processes = min(clients, cfg.paced_processes)
        progress(
            f"paced: {clients} clients in {processes} process(es), {cfg.paced_rate} records/s each "
            f"for {cfg.paced_seconds:g} s"
        )
        runs: Dict[str, List[Dict[str, Any]]] = {s: [] for s in SYSTEMS}
        for r in range(cfg.paced_rounds):
            for system in rotated(SYSTEMS, r):
                runs[system].append(_one_run(lab, cfg, system, clients, processes))
        cells.append({"clients": clients, "processes": processes, "runs": runs})
    return {
        "rate": cfg.paced_rate,
        "seconds": cfg.paced_seconds,
        "record": cfg.paced_record,
        "cells": cells,
    }


def _one_run(lab: Lab, cfg: Config, system: str, clients: int, processes: int) -> Dict[str, Any]:
    kind = ALL_SYSTEMS[system].server
    server = lab.start_server(kind, flags=ring_room(kind, clients, cfg))
    period_ns = 10**9 // cfg.paced_rate
    targets = [lab.path(f"{system}-paced{clients}.log") for _ in range(clients)]
    outs = [str(lab.path(f"{system}-paced{clients}-calls")) for _ in range(processes)]
    groups = split(range(clients), processes)
    params = [
        {
            "mode": "paced",
            "targets": [str(targets[i]) for i in indices],
            "size": cfg.paced_record,
            "warmup": WARMUP,
            "period_ns": period_ns,
            "duration_ns": int(cfg.paced_seconds * 1e9),
            "phase_ns": [period_ns * i // clients for i in indices],
            "out": out,
        }
        for indices, out in zip(groups, outs)
    ]
    try:
        group = lab.workers(system, params, server, timeout=READY_TIMEOUT)
        server_meter, clients_meter = server.cpu_meter(), group.cpu_meter()
        started = time.monotonic()
        group.go()
        time.sleep(max(0.0, started + cfg.paced_seconds - time.monotonic()))
        server_cpu, clients_cpu = server_meter.seconds(), clients_meter.seconds()
        window_s = time.monotonic() - started
        threads = server.threads()
        results = group.results()
        group.exit()
    finally:
        server.stop()
    for result in results:
        check_identity(system, result, lab.src / "offlog")
    for indices, result in zip(groups, results):
        for i, calls in zip(indices, result["calls"]):
            expect_size(targets[i], (WARMUP + calls) * cfg.paced_record)
    lateness = sorted(v for out in outs for v in read_ns(out + ".late"))
    remove(*targets, *(out + ".late" for out in outs))
    written = sum(n for r in results for n in r["calls"])
    return {
        "window_s": window_s,
        "server_cpu_s": server_cpu,
        "server_cpu_share": server_cpu / window_s,
        "server_cpu_us_per_record": server_cpu * 1e6 / written if written else None,
        "server_threads": threads,
        "clients_cpu_s": clients_cpu,
        "clients_cpu_share": clients_cpu / window_s,
        "written": written,
        "intended": sum(n for r in results for n in r["intended"]),
        "lateness_ns": summary(lateness) if lateness else None,
        "transports": dict(Counter(t for r in results for t in r["transports"])),
    }


def median_by_cpu(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    ordered = sorted(runs, key=lambda run: run["server_cpu_s"])
    return ordered[(len(ordered) - 1) // 2]


def _target(system: str, clients: int, share: float, peer_share: float) -> str:
    if system == PEER or clients != TARGET_CLIENTS or not peer_share:
        return ""
    fraction = share / peer_share
    return f"<= {TARGET_CPU_FRACTION:g}x 0.3.1's: {fraction:.2f}x {report.check(fraction <= TARGET_CPU_FRACTION)}"


def _ms(ns: int) -> str:
    return f"{ns / 1e6:,.1f}"


def table(data: Dict[str, Any]) -> str:
    headers = [
        "clients",
        "system",
        "transports",
        "records written/intended",
        "late p50 ms",
        "late p99 ms",
        "late max ms",
        "server CPU % of a core",
        "server CPU us/rec",
        "server threads",
        "clients CPU % of a core",
        "server CPU x vs 0.3.1",
        "target",
    ]
    rows = []
    for cell in data["cells"]:
        best = {system: median_by_cpu(runs) for system, runs in cell["runs"].items()}
        peer_share = best[PEER]["server_cpu_share"] if PEER in best else 0.0
        for system, run in best.items():
            late, cpu_rec = run["lateness_ns"], run["server_cpu_us_per_record"]
            rows.append(
                [
                    f"{cell['clients']:,} ({cell['processes']} proc)",
                    report.label(system),
                    transports_text(run["transports"]),
                    f"{run['written']:,}/{run['intended']:,} ({run['written'] / run['intended']:.1%})",
                    *(_ms(late[k]) if late else "-" for k in ("p50", "p99", "max")),
                    f"{run['server_cpu_share']:.1%}",
                    "-" if cpu_rec is None else f"{cpu_rec:.2f}",
                    f"{run['server_threads']:,}",
                    f"{run['clients_cpu_share']:.1%}",
                    report.times_better(run["server_cpu_share"], peer_share, lower_is_better=True),
                    _target(system, cell["clients"], run["server_cpu_share"], peer_share),
                ]
            )
    rounds = len(data["cells"][0]["runs"][SYSTEMS[0]])
    note = (
        f"Each client writes {data['rate']} records/s of {data['record']} B for {data['seconds']:g} s, its calls "
        "spread over the period; clients are threads, each with its own connection and file, spread over the "
        "processes shown; a fresh server per run, default flags but room for every client's ring. CPU: all "
        "threads over the paced window, as % of one core (the machine's cores together: 100% each); clients: all "
        "worker processes together. 'late': how long after its scheduled time a call started (a late call goes "
        "at once; a client still more than a period behind when the window ends stops there, so written < "
        "intended means clients fell behind). Server threads at the window's end. "
        f"{'Median (by server CPU) of ' + str(rounds) + ' rounds' if rounds > 1 else 'One round'}. "
        "Ratios use server CPU. " + report.RATIO_NOTE
    )
    return f"### 6. Paced clients on one server\n\n{note}\n\n" + report.markdown_table(headers, rows, left=3)


def plot(data: Dict[str, Any], directory: Path) -> List[Path]:
    """Server CPU (% of a core) against clients, one line per system."""
    from ..plots import by_clients

    series: Dict[str, List[Any]] = {}
    for cell in data["cells"]:
        for system, runs in cell["runs"].items():
            share = median_by_cpu(runs)["server_cpu_share"]
            if share:
                series.setdefault(report.label(system), []).append((cell["clients"], share * 100))
    title = f"{data['rate']} records/s per client: server CPU"
    return [by_clients(series, "server CPU, % of one core", title, directory / "paced_server_cpu.png")]
