"""Scenario 5: the caller's latency while the server is killed and restarted, or stopped.

What: a writer calls ``write()`` of a 100 B record every ``cfg.restart_period_us``
(busy-paced: the writer spins on the clock between calls, so the pace does not
depend on sleep granularity; a call that blocked is not caught up on) and
times every call. Meanwhile this process either

* **kill**: SIGKILLs the server ``cfg.restart_lead_s`` into the run and starts
  a new one on the same socket ``cfg.restart_gap_s`` later (ours reconnects by
  itself and re-sends what the old server had not confirmed; 0.3.1 does not
  reconnect: its first write that notices raises, which ends its run and is
  reported as the outcome), or
* **stop**: SIGSTOPs the server ``cfg.restart_lead_s`` into the run and
  SIGCONTs it ``cfg.restart_stop_s`` later (the ring or socket buffer fills;
  the client keeps writes in its backlog).

Writing goes on ``cfg.restart_tail_s`` after the restart or SIGCONT, then
``close()`` is the barrier (bounded by ``cfg.restart_close_timeout_ms``; a
close that raises is reported, not fatal). Systems: our ProxyFile over the
ring and over the socket, and 0.3.1's ProxyFile with its own server.

Figures, per system and case: calls, p50/p99/p99.9/max latency and when the
slowest call started; the client's backlog at peak (our
``ProxyFile.backlog``; 0.3.1 has no such figure, so the length of its
``_sendqueue``); the writer's memory: VmHWM growth (the worker reads its own before
the loop and after close()) and the peak growth of RssAnon, sampled from
here every 10 ms (anonymous memory only: a ring that a reconnect maps, 4 MiB
prefaulted, counts in VmHWM but not here), and their ratio to the bytes held
at peak; and what reached the file: every record is numbered, so records
lost and records written twice both show.

How: a fresh server per run, ended by pid afterwards (the killed one is
reaped at once); the disruption runs in a thread of this process, timed from
the moment the worker is told to go, so event times and the writer's call
times share an origin to within a millisecond or so. A server that does not
start, or a writer that dies or hangs (no answer within its run, the close
timeout and :data:`RESULT_SLACK_S`; it is then ended), is that case's outcome
in the table; the other cases still run.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .. import report
from ..config import Config
from ..procs import Lab, Server, check_identity
from ..stats import summary
from ..worker import SYSTEMS as ALL_SYSTEMS
from ..worker import memory_kib, record
from .common import progress, read_ns, remove

SYSTEMS = ["offlog-shm", "offlog-socket", "offlog-0.3.1"]
CASES = {"kill": "SIGKILL + restart", "stop": "SIGSTOP"}
WARMUP = 200
SAMPLE_S = 0.01  # how often the writer's RssAnon is read
SLOWEST = 5  # the slowest calls kept, with their start times, in the JSON
RESULT_SLACK_S = 30.0


class Outage(threading.Thread):
    """Kills (and replaces) or stops (and resumes) a server on a schedule; records when."""

    def __init__(self, lab: Lab, server: Server, case: str, cfg: Config) -> None:
        super().__init__(name=f"outage-{case}", daemon=True)
        self.lab, self.server, self.case, self.cfg = lab, server, case, cfg
        self.events: Dict[str, float] = {}  # event -> seconds since go
        self.error: Optional[str] = None
        self.origin = 0.0

    def _mark(self, event: str) -> None:
        self.events[event] = round(time.monotonic() - self.origin, 4)

    def start(self) -> None:
        self.origin = time.monotonic()
        super().start()

    def run(self) -> None:
        time.sleep(self.cfg.restart_lead_s)
        try:
            if self.case == "kill":
                self._kill_and_restart()
            else:
                self._stop_and_resume()
        except Exception as exc:  # reported in the table; the writer's outcome shows the rest
            self.error = f"{type(exc).__name__}: {exc}"

    def _kill_and_restart(self) -> None:
        self.server.proc.kill()
        self._mark("kill")
        self.server.proc.wait()
        time.sleep(self.cfg.restart_gap_s)
        self._mark("start")
        self.server = self.lab.start_server(self.server.kind, sock=self.server.sock)
        self._mark("up")

    def _stop_and_resume(self) -> None:
        self.server.proc.send_signal(signal.SIGSTOP)
        self._mark("stop")
        try:
            time.sleep(self.cfg.restart_stop_s)
        finally:
            self.server.proc.send_signal(signal.SIGCONT)
            self._mark("cont")


class AnonSampler(threading.Thread):
    """The peak RssAnon of a process, read every :data:`SAMPLE_S` until stopped or the process is gone."""

    def __init__(self, pid: int) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.peak_kib = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.peak_kib = max(self.peak_kib, memory_kib(self.pid)["RssAnon"])
            except (OSError, KeyError):  # gone, or a zombie
                return
            self._halt.wait(SAMPLE_S)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak_kib


def run(lab: Lab, cfg: Config) -> Dict[str, Any]:
    runs: Dict[str, Dict[str, Any]] = {s: {} for s in SYSTEMS}
    for case, title in CASES.items():
        for system in SYSTEMS:
            progress(f"restart: {system}, {title}")
            runs[system][case] = _one_run(lab, cfg, system, case)
    return {
        "period_us": cfg.restart_period_us,
        "lead_s": cfg.restart_lead_s,
        "gap_s": cfg.restart_gap_s,
        "stop_s": cfg.restart_stop_s,
        "tail_s": cfg.restart_tail_s,
        "record": cfg.restart_record,
        "systems": runs,
    }


def _one_run(lab: Lab, cfg: Config, system: str, case: str) -> Dict[str, Any]:
    outage_s = cfg.restart_gap_s if case == "kill" else cfg.restart_stop_s
    target, out = lab.path(f"{system}-{case}.log"), str(lab.path(f"{system}-{case}-calls"))
    params = {
        "mode": "outage",
        "targets": [str(target)],
        "size": cfg.restart_record,
        "warmup": WARMUP,
        "period_ns": int(cfg.restart_period_us * 1000),
        "duration_ns": int((cfg.restart_lead_s + outage_s + cfg.restart_tail_s) * 1e9),
        "timeout_ms": cfg.restart_close_timeout_ms,
        "out": out,
    }
    # The writer's answer is due after its run and its close(); past that (plus slack) it blocked for good.
    due_s = params["duration_ns"] / 1e9 + cfg.restart_close_timeout_ms / 1000 + RESULT_SLACK_S
    files = (target, Path(out + ".lat"), Path(out + ".starts"))
    outage: Optional[Outage] = None
    try:
        outage = Outage(lab, lab.start_server(ALL_SYSTEMS[system].server), case, cfg)
        result, peak_anon_kib = _drive(lab, system, params, outage, due_s)
    except RuntimeError as exc:  # a server that did not start, a worker that died or hung: the outcome
        remove(*files)
        return _failed(exc, outage, due_s)
    finally:
        if outage is not None:
            outage.server.stop()
    check_identity(system, result, lab.src / "offlog")
    latencies, starts = read_ns(out + ".lat"), read_ns(out + ".starts")
    arrived = _arrivals(target, cfg.restart_record, WARMUP, result["calls"][0])
    remove(*files)
    ordered = sorted(latencies)
    slowest = sorted(range(len(latencies)), key=latencies.__getitem__)[-SLOWEST:][::-1]
    memory = result["memory_kib"]
    return {
        "transport": result["transports"][0],
        "calls": len(latencies),
        "percentiles_ns": summary(ordered) if ordered else None,
        "slowest": [{"at_s": starts[i] / 1e9, "ns": latencies[i]} for i in slowest],
        "events_s": outage.events,
        "outage_error": outage.error,
        "write_error": result["write_error"],
        "close": result["close"],
        "close_s": result["close_ns"] / 1e9,
        "writing_s": result["writing_ns"] / 1e9,
        "peak_backlog": result["peak_backlog"],
        "peak_backlog_at_s": result["peak_backlog_at_ns"] / 1e9,
        "memory_kib": memory,
        "peak_rss_growth_kib": memory["after_close"]["VmHWM"] - memory["before"]["VmHWM"],
        "peak_anon_growth_kib": max(0, peak_anon_kib - memory["before"]["RssAnon"]),
        "arrived": arrived,
    }


def _drive(lab: Lab, system: str, params: Dict[str, Any], outage: Outage, due_s: float) -> Tuple[Dict[str, Any], int]:
    """Start the writer, release it and the outage together; its result and its peak RssAnon (KiB)."""
    group = lab.workers(system, [params], outage.server)
    sampler = AnonSampler(group.procs[0].pid)
    sampler.start()
    outage.start()
    group.go()
    try:
        result = group.results(due_s)[0]
    finally:
        outage.join()
        peak_anon_kib = sampler.stop()
    group.exit()
    return result, peak_anon_kib


def _failed(exc: RuntimeError, outage: Optional[Outage], due_s: float) -> Dict[str, Any]:
    """The figures of a run that produced none: why (the last line of the message, which ends
    with the process's log; a worker that hung and was ended has no log), and what the outage did."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    why = lines[-1] if len(lines) > 1 else f"{lines[0].rstrip(':')} within {due_s:.0f} s; ended"
    return {
        "failed": why[:120],
        "failed_detail": str(exc),
        "events_s": outage.events if outage else {},
        "outage_error": outage.error if outage else None,
    }


def _arrivals(path: Path, size: int, warmup: int, written: int) -> Dict[str, int]:
    """What reached the file: the warmup records (all alike) and the numbered ones (0 .. written-1)."""
    warm, numbered, torn = record(size)[:-1], [], 0
    found_warm = 0
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    torn += 1 if lines[-1] else 0  # the file ends inside a record
    for line in lines[:-1]:
        if line == warm:
            found_warm += 1
        elif len(line) == size - 1 and line[:10].isdigit() and line[10:11] == b" ":
            numbered.append(int(line[:10]))
        else:
            torn += 1
    distinct = {n for n in numbered if n < written}
    expected = warmup + written
    present = min(found_warm, warmup) + len(distinct)
    return {
        "expected": expected,
        "present": present,
        "lost": expected - present,
        "twice": len(numbered) - len(set(numbered)) + max(0, found_warm - warmup),
        "torn": torn,
    }


def _mib(kib: float) -> str:
    return f"{kib / 1024:,.1f}"


def _outcome(fig: Dict[str, Any]) -> str:
    parts = [f"failed: {fig['failed']}"] if "failed" in fig else []
    if fig["outage_error"]:
        parts.append(f"harness: {fig['outage_error']}")
    if fig.get("write_error"):
        error = fig["write_error"]
        parts.append(f"n/a: write() raised {error['error'].split(':')[0]} at {error['at_ns'] / 1e9:.2f} s, stopped")
    if fig.get("close", "ok") != "ok":
        parts.append(f"close() raised {fig['close'].split(':')[0]}")
    return "; ".join(parts) or "ok"


def _events(fig: Dict[str, Any]) -> str:
    return ", ".join(f"{name} {at:.2f}" for name, at in fig["events_s"].items())


def _arrived(a: Dict[str, int]) -> str:
    text = f"{a['present']:,}/{a['expected']:,}"
    extra = [f"{a[k]:,} {k}" for k in ("lost", "twice", "torn") if a[k]]
    return text + (f" ({', '.join(extra)})" if extra else "")


def _max_ns(fig: Optional[Dict[str, Any]]) -> Optional[int]:
    """The max latency of a run that wrote through its outage, else None."""
    if not fig or "failed" in fig or fig["write_error"] or not fig["percentiles_ns"]:
        return None
    return fig["percentiles_ns"]["max"]


def table(data: Dict[str, Any]) -> str:
    headers = [
        "system",
        "case",
        "outcome",
        "calls",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "max ms",
        "slowest at s",
        "events s",
        "backlog at peak MiB",
        "peak RSS +MiB",
        "anon +MiB",
        "anon / backlog",
        "records in file",
        "close s",
        "max x vs 0.3.1",
    ]
    rows: List[List[Any]] = []
    peer = data["systems"].get("offlog-0.3.1", {})
    for case, title in CASES.items():
        for system, runs in data["systems"].items():
            fig = runs[case]
            if "failed" in fig:
                rows.append([report.label(system), title, _outcome(fig), *["-"] * 6, _events(fig), *["-"] * 7])
                continue
            p, max_ns = fig["percentiles_ns"], _max_ns(fig)
            timed = max_ns is not None  # latencies across the outage: only if the writer got through it
            backlog = fig["peak_backlog"]
            anon = fig["peak_anon_growth_kib"] * 1024
            rows.append(
                [
                    report.label(system),
                    title,
                    _outcome(fig),
                    f"{fig['calls']:,}",
                    *((report.us(p[k]) if timed else "-") for k in ("p50", "p99", "p99.9")),
                    f"{max_ns / 1e6:,.2f}" if timed else "-",
                    f"{fig['slowest'][0]['at_s']:.2f}" if timed else "-",
                    _events(fig),
                    _mib(backlog / 1024),
                    _mib(fig["peak_rss_growth_kib"]),
                    _mib(fig["peak_anon_growth_kib"]),
                    f"{anon / backlog:.1f}x" if backlog >= 64 * 1024 else "-",
                    _arrived(fig["arrived"]),
                    f"{fig['close_s']:.2f}",
                    report.times_better(max_ns, _max_ns(peer.get(case)), lower_is_better=True),
                ]
            )
    note = (
        f"A {data['record']} B record every {data['period_us']:g} us (busy-paced), every write() timed. "
        f"kill: the server is SIGKILLed {data['lead_s']:g} s in and a new one started on the same socket "
        f"{data['gap_s']:g} s later; stop: SIGSTOP {data['lead_s']:g} s in, SIGCONT {data['stop_s']:g} s later; "
        f"writing goes on {data['tail_s']:g} s after that, then close() is the barrier. Times in s since go. "
        "'backlog at peak': bytes the client held in its own memory (ours: ProxyFile.backlog; 0.3.1: its "
        "_sendqueue); a ring's contents are not counted (shared memory, allocated at open). 'peak RSS +': VmHWM "
        "growth over the run (includes a ring the reconnect maps); 'anon +': peak RssAnon growth, sampled every "
        "10 ms; 'anon / backlog': what each backlog byte cost (shown from a 64 KiB backlog). 'records in file': "
        "distinct records present / written (lost, written twice, torn: lines that are not one whole record). "
        "Latencies are '-' where the writer could not write through the outage. Ratios use the max latency. "
        + report.RATIO_NOTE
    )
    return f"### 5. Server restart and stall\n\n{note}\n\n" + report.markdown_table(headers, rows, left=3)


def plot(data: Dict[str, Any], directory: Path) -> List[Path]:
    return []
