"""``python -m bench.c_client``: the C client (c/offlog.c) next to the Python ProxyFile.

What: per-call latency of one ``write`` of a 100-byte record (p50, p99, p99.9,
and the clock's own median: nothing is subtracted) and records/s of one
client end to end (from its first write until its sync returned, so the
bytes are in the file), over a ring and over the socket, for both clients,
against the same kind of server in one run.

How: c/bench.c is compiled with the system's ``cc -O2`` into a
:class:`bench.procs.Lab` and run there as its own process; the Python figures
come from :mod:`bench.worker` (its ``timed`` and ``bulk`` modes, as the
latency and throughput scenarios run them). The C client times its writes in
bursts of 10,000 with a sync after each, so that no timed write meets a full
ring (the Python client would put it in its backlog; the C client returns
EAGAIN); the Python worker writes its calls in one go. Every file must hold
exactly the bytes written. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from typing import Any, Dict, List

from . import REPO
from .procs import Lab
from .scenarios.common import expect_size, progress, read_ns, remove
from .stats import summary

RECORD = 100
WARMUP = 64  # the Python worker's warm-up writes, before its timed or bulk calls


def compile_bench(lab: Lab) -> str:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise SystemExit(f"no C compiler ({cc}) found")
    binary = str(lab.path("c-bench"))
    sources = [str(REPO / "c" / "offlog.c"), str(REPO / "c" / "bench.c")]
    subprocess.run([cc, "-std=c11", "-O2", "-pthread", *sources, "-o", binary], check=True)
    return binary


def c_run(lab: Lab, binary: str, kind: str, mode: str, calls: int) -> Dict[str, Any]:
    server = lab.server(kind)
    target = lab.path(f"c-{kind}-{mode}.log")
    argv = [binary, server.sock, str(target), mode, str(calls)] + (["socket"] if kind == "socket" else [])
    result = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True, timeout=900).stdout)
    written = 10_000 + 2 * calls if mode == "latency" else calls  # latency: warm-up, timed, untimed
    expect_size(target, written * RECORD)
    remove(target)
    return result


def python_run(lab: Lab, kind: str, mode: str, calls: int) -> Dict[str, Any]:
    target, out = lab.path(f"py-{kind}-{mode}.log"), str(lab.path(f"py-{kind}-{mode}"))
    params = {"mode": "timed" if mode == "latency" else "bulk", "targets": [str(target)], "size": RECORD}
    params.update(calls=calls, warmup=WARMUP, period_ns=0, duration_ns=0, out=out)
    result = lab.measure(f"offlog-{kind}", [params]).results[0]
    expect_size(target, (WARMUP + calls) * RECORD)
    remove(target)
    if mode == "throughput":
        seconds = (result["end_ns"] - result["start_ns"]) / 1e9
        return {"transport": result["transports"][0], "records_per_s": calls / seconds}
    figures = summary(sorted(read_ns(out + ".lat")))
    remove(out + ".lat", out + ".starts")
    figures_ns = {f"{label}_ns": value for label, value in figures.items()}
    return {"transport": result["transports"][0], "timer_ns": result["timer_ns"], **figures_ns}


def table(rows: List[Dict[str, Any]]) -> str:
    lines = [
        "| client | transport | write p50 ns | p99 ns | p99.9 ns | clock ns | untimed mean ns | records/s | MB/s |",
        "| ------ | --------- | -----------: | -----: | -------: | -------: | --------------: | --------: | ---: |",
    ]
    for r in rows:
        lat, tp = r["latency"], r["throughput"]
        untimed = f"{lat['untimed_mean_ns']:.1f}" if "untimed_mean_ns" in lat else "-"
        lines.append(
            f"| {r['client']} | {lat['transport']} | {lat['p50_ns']:,} | {lat['p99_ns']:,} | {lat['p99.9_ns']:,} "
            f"| {lat['timer_ns']:,} | {untimed} | {tp['records_per_s'] / 1e6:.2f} M "
            f"| {tp['records_per_s'] * RECORD / 1e6:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.c_client", description=__doc__.split("\n\n")[0])
    p.add_argument("--latency-calls", type=int, default=200_000)
    p.add_argument("--c-records", type=int, default=5_000_000, help="C client's records end to end (500 MB)")
    p.add_argument("--py-records", type=int, default=1_000_000, help="Python client's records end to end")
    args = p.parse_args()
    rows = []
    with Lab() as lab:
        binary = compile_bench(lab)
        for kind in ("shm", "socket"):
            c_records = args.c_records if kind == "shm" else args.py_records
            progress(f"C client, {kind}")
            latency = c_run(lab, binary, kind, "latency", args.latency_calls)
            throughput = c_run(lab, binary, kind, "throughput", c_records)
            rows.append({"client": "C offlog_write", "latency": latency, "throughput": throughput})
            progress(f"Python client, {kind}")
            latency = python_run(lab, kind, "latency", args.latency_calls)
            throughput = python_run(lab, kind, "throughput", args.py_records)
            rows.append({"client": "Python ProxyFile.write", "latency": latency, "throughput": throughput})
    print(table(rows))


if __name__ == "__main__":
    main()
