"""One system's client loop in its own process: ``python bench/worker.py '<json>'``.

What it measures: either the time the *caller* spends in each write or log
call (the ``timed`` mode: every call timed with ``time.perf_counter_ns``,
optionally paced), or how long a batch of calls takes until its bytes are in
the file (the ``bulk`` mode: timed once, from ``go`` until the system's sync
point returns: ``sync()`` for offlog, ``close()`` for offlog 0.3.1, which has
no such barrier, ``QueueListener.stop()`` for the stdlib queue; plain files and
``FileHandler`` flush on every record already), or every call's latency
while the parent kills or stops the server (the ``outage`` mode: numbered
records, busy-paced; a call that raises ends the loop and is reported; the
bytes the client held locally at peak and the process's peak RSS come back
with the results), or how many records many slow clients got out on time
(the ``paced`` mode: a thread per sink, each on its own schedule of a record
every ``period_ns``, and how late each call started), or how long each of
many clients that sat idle takes to close (the ``idle`` mode: every sink
closed at once, one thread each, every close() timed).

How: this module is self-contained (the standard library plus whichever
``offlog`` PYTHONPATH points at: this repository's or the 0.3.1 release's),
so the parent runs it as a script and the two offlogs never meet in one
interpreter. The parent and the pytest micro benchmarks import it as
``bench.worker`` for :data:`SYSTEMS`; nothing here imports offlog before a
system is opened. (As a script, ``bench/`` is first on ``sys.path``: no module
in ``bench/`` may share a name with a stdlib or offlog module.)

Protocol with the parent, one line per step: the worker opens its sinks (one
per thread), warms up, prints ``ready``; reads ``go``; runs; prints one JSON
line of results; reads ``exit`` (or end of input); closes its sinks. Per-call
figures go to binary ``array('q')`` files named after ``out``.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
import threading
import time
from array import array
from functools import partial
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

#: The logger benchmarks' call: ``info(LOG_MESSAGE, *LOG_ARGS)``, 60 characters formatted.
LOG_MESSAGE = "GET /api/items?id=%s took %d ms: status 200, cache hit, okay"
LOG_ARGS = ("foo", 7)
#: Line format of the stdlib logging systems, close to offlog Logger's.
LINE_FORMAT = "[%(asctime)s %(name)s %(levelname)s] %(message)s"
#: Milliseconds any blocking step of an offlog client may take: stalls are measured, not failed.
TIMEOUT_MS = 300_000
#: Calls timed to measure the timer's own overhead.
OVERHEAD_SAMPLES = 20_001


def _no_backlog() -> int:
    return 0


class Sink(NamedTuple):
    """One open client of one system."""

    call: Callable[..., Any]  # the measured call, as call(*args)
    sync: Callable[[], None]  # returns once every byte written so far is in the file
    close: Callable[[], None]
    transport: str
    backlog: Callable[[], int] = _no_backlog  # bytes accepted but still held in this process


class System(NamedTuple):
    """A way of appending to a file, as the tables name it."""

    label: str
    kind: str  # "bytes": call(record); "log": call(LOG_MESSAGE, *LOG_ARGS)
    server: Optional[str]  # the server it needs: "shm", "socket", "peer" or None
    open: Callable[[str, Optional[str]], Sink]  # (target path, server socket) -> Sink


# -- the systems ----------------------------------------------------------
def open_proxy_file(target: str, sock: Optional[str], *, shm: bool, timeout_ms: int = TIMEOUT_MS) -> Sink:
    from offlog import ProxyFile

    f = ProxyFile(target, sock, timeout_ms, shm=shm)
    return Sink(f.write, f.sync, f.close, f.transport, lambda: f.backlog)


def open_peer_proxy_file(target: str, sock: Optional[str], *, timeout_ms: int = TIMEOUT_MS) -> Sink:
    from offlog import ProxyFile  # 0.3.1: close() is its only "written" confirmation

    f = ProxyFile(target, sock_path=sock, timeout=timeout_ms)
    # 0.3.1 tells nobody what it holds; its backlog is its _sendqueue.
    return Sink(f.write, f.close, f.close, "socket (0.x)", lambda: len(f._sendqueue))


def open_plain_file(target: str, sock: Optional[str]) -> Sink:
    f = open(target, "ab")

    def write(data: bytes) -> None:
        f.write(data)
        f.flush()

    return Sink(write, f.flush, f.close, "direct")


def open_offlog_logger(target: str, sock: Optional[str]) -> Sink:
    from offlog import Logger

    log = Logger(
        "bench", target, stdout_level=None, stderr_level=None, offlog_socket_path=sock, offlog_timeout=TIMEOUT_MS
    )
    return Sink(log.info, log.sync, log.close, log._file.transport)


def open_offlog_handler(target: str, sock: Optional[str]) -> Sink:
    from offlog import OfflogHandler

    handler = OfflogHandler(target, sock, timeout=TIMEOUT_MS)
    handler.setFormatter(logging.Formatter(LINE_FORMAT))
    return Sink(_stdlib_logger(handler).info, handler.sync, handler.close, handler._file.transport)


def open_peer_logger(target: str, sock: Optional[str]) -> Sink:
    from offlog import Logger  # 0.3.1: no flush(); close() waits for the server's BYE

    log = Logger(
        "bench", target, stdout_level=None, stderr_level=None, offlog_socket_path=sock, offlog_timeout=TIMEOUT_MS
    )
    return Sink(log.info, log.close, log.close, "socket (0.x)")


def _file_handler(target: str) -> logging.FileHandler:
    handler = logging.FileHandler(target, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LINE_FORMAT))
    return handler


def _stdlib_logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"bench-{id(handler):x}")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def open_logging_file(target: str, sock: Optional[str]) -> Sink:
    handler = _file_handler(target)
    return Sink(_stdlib_logger(handler).info, handler.flush, handler.close, "direct")


def open_logging_queue(target: str, sock: Optional[str]) -> Sink:
    handler = _file_handler(target)
    records: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler)
    listener.start()
    stopped: List[bool] = []

    def stop() -> None:  # QueueListener.stop() may run once only
        if not stopped:
            stopped.append(True)
            listener.stop()

    def close() -> None:
        stop()
        handler.close()

    return Sink(_stdlib_logger(logging.handlers.QueueHandler(records)).info, stop, close, "thread")


SYSTEMS: Dict[str, System] = {
    "offlog-shm": System("offlog ProxyFile shm", "bytes", "shm", partial(open_proxy_file, shm=True)),
    "offlog-socket": System("offlog ProxyFile socket", "bytes", "socket", partial(open_proxy_file, shm=False)),
    "offlog-0.3.1": System("offlog 0.3.1 ProxyFile", "bytes", "peer", open_peer_proxy_file),
    "plain-file": System("plain file write+flush", "bytes", None, open_plain_file),
    "offlog-logger-shm": System("offlog Logger.info shm", "log", "shm", open_offlog_logger),
    "offlog-0.3.1-logger": System("offlog 0.3.1 Logger.info", "log", "peer", open_peer_logger),
    "offlog-handler-shm": System("stdlib logging OfflogHandler shm", "log", "shm", open_offlog_handler),
    "logging-file": System("stdlib logging FileHandler", "log", None, open_logging_file),
    "logging-queue": System("stdlib QueueHandler+Listener", "log", None, open_logging_queue),
}


def record(size: int) -> bytes:
    """A ``size``-byte record: one line."""
    return b"x" * (size - 1) + b"\n"


def call_args(kind: str, size: int) -> Tuple[Any, ...]:
    """What a system's call receives: one record, or a log message and its two args."""
    return (LOG_MESSAGE, *LOG_ARGS) if kind == "log" else (record(size),)


# -- the loops ------------------------------------------------------------
def timed_calls(
    call: Callable[..., Any], args: Sequence[Any], calls: int, period_ns: int = 0, duration_ns: int = 0
) -> Tuple[array, array]:
    """Time every ``call(*args)``; return (start of each call since the first, its latency) in ns.

    ``period_ns``: calls start at least this far apart (a call that blocked is
    not caught up on). ``duration_ns``: stop once this much time has passed.
    Only ``call`` runs between the two clock reads.
    """
    clock = time.perf_counter_ns
    starts = array("q", bytes(8 * calls))
    latencies = array("q", bytes(8 * calls))
    done = 0
    origin = clock()
    for i in range(calls):
        t0 = clock()
        call(*args)
        t1 = clock()
        starts[i] = t0 - origin
        latencies[i] = t1 - t0
        done = i + 1
        if duration_ns and t1 - origin >= duration_ns:
            break
        if period_ns:
            _sleep_until(t0 + period_ns)
    return starts[:done], latencies[:done]


def bulk_calls(call: Callable[..., Any], args: Sequence[Any], calls: int) -> None:
    """``calls`` untimed calls: the throughput loop."""
    for _ in range(calls):
        call(*args)


def _sleep_until(deadline_ns: int) -> None:
    delay = deadline_ns - time.perf_counter_ns()
    if delay > 0:
        time.sleep(delay / 1e9)


def _noop(*args: Any) -> None:
    pass


def timer_overhead_ns(samples: int = OVERHEAD_SAMPLES) -> int:
    """Median of ``t1 - t0`` with nothing in between."""
    clock = time.perf_counter_ns
    gaps = array("q", bytes(8 * samples))
    for i in range(samples):
        t0 = clock()
        t1 = clock()
        gaps[i] = t1 - t0
    return sorted(gaps)[samples // 2]


def harness_overhead_ns(args: Sequence[Any], samples: int = OVERHEAD_SAMPLES) -> int:
    """Median latency :func:`timed_calls` reports for a call that does nothing."""
    return sorted(timed_calls(_noop, args, samples)[1])[samples // 2]


# -- the modes ------------------------------------------------------------
def run_timed(sinks: List[Sink], args: Sequence[Any], params: Dict[str, Any]) -> Dict[str, Any]:
    """Per-call latencies of one sink (``calls`` calls, optionally paced), saved under ``out``."""
    sink = sinks[0]
    starts, latencies = timed_calls(sink.call, args, params["calls"], params["period_ns"], params["duration_ns"])
    sink.sync()
    with open(params["out"] + ".starts", "wb") as f:
        starts.tofile(f)
    with open(params["out"] + ".lat", "wb") as f:
        latencies.tofile(f)
    return {"calls": [len(latencies)]}


def run_bulk(sinks: List[Sink], args: Sequence[Any], params: Dict[str, Any]) -> Dict[str, Any]:
    """``calls`` calls per sink, one thread per sink, all released at once; each timed until synced."""
    go = threading.Event()
    spans: List[Tuple[int, int]] = [(0, 0)] * len(sinks)

    def client(i: int) -> None:
        go.wait()
        start = time.monotonic_ns()
        bulk_calls(sinks[i].call, args, params["calls"])
        sinks[i].sync()
        spans[i] = (start, time.monotonic_ns())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(sinks))]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join()
    return {
        "calls": [params["calls"]] * len(sinks),
        "start_ns": min(s for s, _ in spans),
        "end_ns": max(e for _, e in spans),
    }


def numbered_record(number: int, size: int) -> bytes:
    """A ``size``-byte line that starts with ``number`` (10 digits and a space): loss and duplicates show."""
    return b"%010d " % number + b"x" * (size - 12) + b"\n"


def memory_kib(pid: object = "self") -> Dict[str, int]:
    """VmHWM (peak resident set) and RssAnon (anonymous memory now) of a process, KiB."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon"):
                found[key] = int(value.split()[0])
    return found


def _outcome(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run_outage(sinks: List[Sink], args: Sequence[Any], params: Dict[str, Any]) -> Dict[str, Any]:
    """Numbered records, one every ``period_ns`` (busy-paced), for ``duration_ns``, while the parent
    kills or stops the server; then close() as the barrier. Never raises: a write that raises ends
    the loop and is reported, as is a close() that raises.

    Each record is a new bytes object, as an application's would be (a client that keeps a reference
    instead of a copy pays for it in memory). Only the call runs between the two clock reads; building
    the record and reading the sink's backlog happen outside. A call that blocked is not caught up on.
    """
    sink = sinks[0]
    size, period_ns, duration_ns = params["size"], params["period_ns"], params["duration_ns"]
    capacity = duration_ns // period_ns + 1
    starts = array("q", [0]) * capacity
    latencies = array("q", [0]) * capacity
    head, tail = b"%010d ", numbered_record(0, size)[11:]
    call, backlog, clock = sink.call, sink.backlog, time.perf_counter_ns
    peak_backlog = peak_backlog_ns = done = 0
    failure: Optional[Dict[str, Any]] = None
    before = memory_kib()
    origin = clock()
    t0 = origin - period_ns
    for i in range(capacity):
        data = head % i + tail
        next_start = t0 + period_ns
        while clock() < next_start:
            pass
        t0 = clock()
        try:
            call(data)
        except Exception as exc:
            failure = {"call": i, "at_ns": t0 - origin, "error": _outcome(exc)}
            break
        t1 = clock()
        starts[i] = t0 - origin
        latencies[i] = t1 - t0
        done = i + 1
        held = backlog()
        if held > peak_backlog:
            peak_backlog, peak_backlog_ns = held, t1 - origin
        if t1 - origin >= duration_ns:
            break
    writing_ns = clock() - origin
    writing = memory_kib()
    t0 = clock()
    try:
        sink.close()
        closed = "ok"
    except Exception as exc:
        closed = _outcome(exc)
    close_ns = clock() - t0
    after = memory_kib()
    with open(params["out"] + ".starts", "wb") as f:
        starts[:done].tofile(f)
    with open(params["out"] + ".lat", "wb") as f:
        latencies[:done].tofile(f)
    return {
        "calls": [done],
        "write_error": failure,
        "writing_ns": writing_ns,
        "close": closed,
        "close_ns": close_ns,
        "peak_backlog": peak_backlog,
        "peak_backlog_at_ns": peak_backlog_ns,
        "memory_kib": {"before": before, "writing": writing, "after_close": after},
    }


def paced_calls(
    call: Callable[..., Any], args: Sequence[Any], origin_ns: int, period_ns: int, end_ns: int
) -> Tuple[int, array]:
    """A call at ``origin_ns + k * period_ns`` for every such slot before ``end_ns`` (sleeping between
    slots). A call whose slot has passed goes at once (caught up on), unless it would start a period or
    more after ``end_ns``: then it and the rest are not made (a client that far behind fell behind; one
    that woke a little late for its last slot did not). Return the slots and how late each call made
    started (ns)."""
    clock = time.perf_counter_ns
    slots = max(0, -(-(end_ns - origin_ns) // period_ns))
    lateness = array("q", bytes(8 * slots))
    slot, made = origin_ns, 0
    while slot < end_ns:
        now = clock()
        if now < slot:
            time.sleep((slot - now) / 1e9)
            now = clock()
        if now >= end_ns + period_ns:
            break
        call(*args)
        lateness[made] = now - slot
        made += 1
        slot += period_ns
    return slots, lateness[:made]


def run_paced(sinks: List[Sink], args: Sequence[Any], params: Dict[str, Any]) -> Dict[str, Any]:
    """One thread per sink, each making a call every ``period_ns`` for ``duration_ns`` from ``go``
    (:func:`paced_calls`; sink i's schedule is offset by ``phase_ns[i]``, so the clients' calls spread
    over the period instead of coming at once), then syncing its sink. Every call's lateness is saved
    under ``out``; per sink: the calls made and the calls intended."""
    period_ns, duration_ns, phases = params["period_ns"], params["duration_ns"], params["phase_ns"]
    go = threading.Event()
    made: List[int] = [0] * len(sinks)
    intended: List[int] = [0] * len(sinks)
    lateness: List[array] = [array("q")] * len(sinks)
    origin: List[int] = []

    def client(i: int) -> None:
        go.wait()
        intended[i], lateness[i] = paced_calls(
            sinks[i].call, args, origin[0] + phases[i], period_ns, origin[0] + duration_ns
        )
        made[i] = len(lateness[i])
        sinks[i].sync()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(sinks))]
    for t in threads:
        t.start()
    origin.append(time.perf_counter_ns())
    go.set()
    for t in threads:
        t.join()
    with open(params["out"] + ".late", "wb") as f:
        for late in lateness:
            late.tofile(f)
    return {"calls": made, "intended": intended}


def run_idle(sinks: List[Sink], args: Sequence[Any], params: Dict[str, Any]) -> Dict[str, Any]:
    """The sinks sat idle from ``ready`` until ``go``; now every one is closed at once, each in its own
    thread, and timed. Per sink: close() in ns and "ok" or what it raised."""
    go = threading.Event()
    close_ns: List[int] = [0] * len(sinks)
    outcomes: List[str] = ["not run"] * len(sinks)

    def closer(i: int) -> None:
        go.wait()
        t0 = time.perf_counter_ns()
        try:
            sinks[i].close()
            outcomes[i] = "ok"
        except Exception as exc:
            outcomes[i] = _outcome(exc)
        close_ns[i] = time.perf_counter_ns() - t0

    threads = [threading.Thread(target=closer, args=(i,)) for i in range(len(sinks))]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join()
    return {"calls": [0] * len(sinks), "close_ns": close_ns, "close": outcomes}


MODES = {"timed": run_timed, "bulk": run_bulk, "outage": run_outage, "paced": run_paced, "idle": run_idle}


def _offlog_identity() -> Optional[Dict[str, str]]:
    module = sys.modules.get("offlog")
    if module is None:
        return None
    return {"version": getattr(module, "__version__", "?"), "file": getattr(module, "__file__", "?")}


def main(argv: List[str]) -> int:
    params = json.loads(argv[1])
    system = SYSTEMS[params["system"]]
    args = call_args(system.kind, params["size"])
    open_sink = partial(system.open, timeout_ms=params["timeout_ms"]) if "timeout_ms" in params else system.open
    sinks = [open_sink(target, params.get("sock")) for target in params["targets"]]
    for sink in sinks:
        bulk_calls(sink.call, args, params["warmup"])
    overheads = {"timer_ns": timer_overhead_ns(), "harness_ns": harness_overhead_ns(args)}
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    result = MODES[params["mode"]](sinks, args, params)
    result.update(overheads, offlog=_offlog_identity(), transports=[s.transport for s in sinks])
    print(json.dumps(result), flush=True)
    sys.stdin.readline()  # "exit", or end of input
    for sink in sinks:
        sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
