"""Scenario 7: many idle clients on one server.

What: ``cfg.idle_clients`` clients connect (ours with a ring each; ours over
the socket and offlog 0.3.1 for comparison), write one 100 B record each,
and then do nothing for ``cfg.idle_seconds``. Idle clients should cost a
server nothing but memory; the figures are what they cost it: its thread
count (``Threads`` of ``/proc/<pid>/status``, the most seen in the idle
window), its CPU over the idle window as % of one core (utime + stime of all
its threads, see :class:`bench.procs.CpuMeter`; the issue's target: below 1%), the
workers' CPU over the same window, and the memory its rings take, counted
several ways so the figure survives rings moving from /dev/shm to memfds:
the /dev/shm files (named or unlinked) and the memfds it holds or maps (see
:meth:`bench.procs.Server.shared_memory`), its RssShmem (shared pages it has
touched), and how much more of /dev/shm is in use than before it started
(statvfs: anyone's, so noisy on a shared machine). Then every client closes at once, and each
close() is timed: the slowest, and whether every one returned "ok" within its
timeout (``cfg.idle_close_timeout_ms``, the ProxyFile's timeout). Every file
must hold exactly its one record.

How: clients are spread evenly over ``cfg.idle_processes`` worker processes
(``idle`` mode), which open every client and write its record before saying
ready (the bench raised RLIMIT_NOFILE for them, see :mod:`bench.procs`). The
ring server gets ``--max-ring-memory`` of ``cfg.ring_memory_per_client`` per
client, so every client can have a ring (its default cap of 1 GiB holds 256).
After ``cfg.idle_settle_s`` the idle window is timed here; the thread count
is read about once a second in it. On go, each worker closes all its clients
at once, one thread each (so a close's time includes waiting for its own
process's GIL). A fresh server per system.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List

from .. import report
from ..config import Config
from ..procs import Lab, Server, WorkerGroup, check_identity, shm_used_bytes
from ..stats import summary
from ..worker import SYSTEMS as ALL_SYSTEMS
from .common import expect_size, progress, remove, ring_room, split, transports_text

SYSTEMS = ["offlog-shm", "offlog-socket", "offlog-0.3.1"]
OURS = ("offlog-shm", "offlog-socket")
WARMUP = 1  # the one record each client writes before it goes idle
#: The issue's target: idle clients cost the server less than this share of one core.
TARGET_CPU_SHARE = 0.01
#: Seconds a worker with hundreds of clients has to connect them all and say ready.
READY_TIMEOUT = 300.0
#: Seconds between readings of the server's thread count in the idle window.
SAMPLE_S = 1.0
#: Seconds past the close timeout after which a worker that has not answered is ended.
RESULT_SLACK_S = 60.0


def run(lab: Lab, cfg: Config) -> Dict[str, Any]:
    processes = min(cfg.idle_clients, cfg.idle_processes)
    runs = {}
    for system in SYSTEMS:
        progress(
            f"idle: {system}, {cfg.idle_clients:,} clients in {processes} process(es), idle {cfg.idle_seconds:g} s"
        )
        runs[system] = _one_run(lab, cfg, system, processes)
    return {
        "clients": cfg.idle_clients,
        "processes": processes,
        "seconds": cfg.idle_seconds,
        "close_timeout_ms": cfg.idle_close_timeout_ms,
        "record": cfg.idle_record,
        "systems": runs,
    }


def _one_run(lab: Lab, cfg: Config, system: str, processes: int) -> Dict[str, Any]:
    kind = ALL_SYSTEMS[system].server
    shm_before = shm_used_bytes()
    server = lab.start_server(kind, flags=ring_room(kind, cfg.idle_clients, cfg))
    targets = [lab.path(f"{system}-idle.log") for _ in range(cfg.idle_clients)]
    params = [
        {
            "mode": "idle",
            "targets": [str(t) for t in group],
            "size": cfg.idle_record,
            "warmup": WARMUP,
            "timeout_ms": cfg.idle_close_timeout_ms,
        }
        for group in split(targets, processes)
    ]
    try:
        started = time.monotonic()
        group = lab.workers(system, params, server, timeout=READY_TIMEOUT)
        connect_s = time.monotonic() - started
        time.sleep(cfg.idle_settle_s)
        window = _idle_window(server, group, cfg.idle_seconds)
        window["shm_used_growth"] = shm_used_bytes() - shm_before
        group.go()
        results = group.results(cfg.idle_close_timeout_ms / 1000 + RESULT_SLACK_S)
        group.exit()
    finally:
        server.stop()
    for result in results:
        check_identity(system, result, lab.src / "offlog")
    for target in targets:
        expect_size(target, WARMUP * cfg.idle_record)
    remove(*targets)
    close_ns = [ns for r in results for ns in r["close_ns"]]
    outcomes = [o for r in results for o in r["close"]]
    timeout_ns = cfg.idle_close_timeout_ms * 1_000_000
    return dict(
        window,
        connect_s=connect_s,
        transports=dict(Counter(t for r in results for t in r["transports"])),
        close_ns=summary(sorted(close_ns)),
        closed_in_time=sum(o == "ok" and ns <= timeout_ns for o, ns in zip(outcomes, close_ns)),
        close_errors=dict(Counter(o.split(":")[0] for o in outcomes if o != "ok")),
    )


def _idle_window(server: Server, group: WorkerGroup, seconds: float) -> Dict[str, Any]:
    """What the server and the workers spend while every client sits idle for ``seconds``."""
    threads = [server.threads()]
    server_cpu, clients_cpu = server.cpu_meter(), group.cpu_meter()
    started = time.monotonic()
    end = started + seconds
    while time.monotonic() < end:
        time.sleep(max(0.0, min(SAMPLE_S, end - time.monotonic())))
        threads.append(server.threads())
    server_s, clients_s = server_cpu.seconds(), clients_cpu.seconds()
    window_s = time.monotonic() - started
    return {
        "window_s": window_s,
        "server_threads": max(threads),
        "server_cpu_s": server_s,
        "server_cpu_share": server_s / window_s,
        "clients_cpu_share": clients_s / window_s,
        "shared_memory": server.shared_memory(),
        "server_rss_kib": server.memory_kib().get("VmRSS"),
    }


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f}"


def _target(system: str, fig: Dict[str, Any], clients: int) -> str:
    if system not in OURS:
        return ""
    cpu_ok = fig["server_cpu_share"] < TARGET_CPU_SHARE
    close_ok = fig["closed_in_time"] == clients
    return f"CPU < {TARGET_CPU_SHARE:.0%} {report.check(cpu_ok)}; every close in time {report.check(close_ok)}"


def table(data: Dict[str, Any]) -> str:
    headers = [
        "system",
        "transports",
        "connect s",
        "server threads",
        "server CPU % of a core",
        "clients CPU % of a core",
        "/dev/shm files MiB",
        "memfds MiB",
        "RssShmem MiB",
        "/dev/shm used +MiB",
        "server RSS MiB",
        "close p50 ms",
        "close max ms",
        "closed ok in time",
        "target",
    ]
    rows = []
    clients = data["clients"]
    for system, fig in data["systems"].items():
        shared, close = fig["shared_memory"], fig["close_ns"]
        errors = ", ".join(f"{n:,} {name}" for name, n in fig["close_errors"].items())
        rss = fig["server_rss_kib"]
        rows.append(
            [
                report.label(system),
                transports_text(fig["transports"]),
                f"{fig['connect_s']:.1f}",
                f"{fig['server_threads']:,}",
                f"{fig['server_cpu_share']:.1%}",
                f"{fig['clients_cpu_share']:.1%}",
                _mib(shared["shm_files"]),
                _mib(shared["memfds"]),
                _mib(shared["rss_shmem"]),
                _mib(fig["shm_used_growth"]),
                "-" if rss is None else _mib(rss * 1024),
                f"{close['p50'] / 1e6:,.1f}",
                f"{close['max'] / 1e6:,.1f}",
                f"{fig['closed_in_time']:,}/{clients:,}" + (f" ({errors})" if errors else ""),
                _target(system, fig, clients),
            ]
        )
    note = (
        f"{clients:,} clients in {data['processes']} processes connect, write one {data['record']} B record each "
        f"and sit idle {data['seconds']:g} s; then all close at once. 'connect s': until every worker had opened "
        "its clients. Server threads: the most seen in the idle window; CPU over the idle window, % of one core "
        "(clients: all worker processes together). Ring memory: the /dev/shm files and memfds the server holds "
        "or maps, named or not, its RssShmem (touched pages), and /dev/shm in use minus before the server "
        "started (anyone's). The ring server may have a ring for every client (--max-ring-memory). close(): each timed "
        f"in its client; 'closed ok in time': returned without error within its {data['close_timeout_ms']:,} ms "
        "timeout."
    )
    return f"### 7. Idle clients on one server\n\n{note}\n\n" + report.markdown_table(headers, rows, left=2)


def plot(data: Dict[str, Any], directory: Path) -> List[Path]:
    return []
