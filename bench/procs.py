"""Child processes of a benchmark run: offlog servers, 0.3.1 peers, workers.

What it provides: :class:`Lab`, one temporary directory and every process
started in it. Servers (``python -m offlog``, ours or the PyPI 0.3.1 release's)
run with their own socket, their cwd in the temporary directory (never the
repository, so a peer never imports this repository's ``offlog``) and their
output in a log file. Workers (:mod:`bench.worker`) run as scripts with
PYTHONPATH set to the lab's snapshot of this repository's ``offlog/`` (copied
when the lab opens, so edits made to the repository during a run never mix
two versions into one set of figures) or to the peer's directory.

How it cleans up: every process is remembered and ended by pid (SIGTERM, then
SIGKILL) when the lab closes; the temporary directory is removed. Servers are
also the source of the server-side figures: CPU time from
``/proc/<pid>/stat`` (all threads), memory from ``/proc/<pid>/status``.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional

from . import REPO
from .worker import SYSTEMS

# The test suite's helpers for child processes: one place installs the PyPI
# peers (into .peers/, shared with the tests) and probes sockets and /dev/shm.
sys.path.insert(0, str(REPO / "tests"))
from support import PEERS_DIR, child_env, peer_path, shm_objects, socket_answers  # noqa: E402, F401 (shm_objects: for __main__)

PEER_VERSION = "0.3.1"
WORKER = Path(__file__).resolve().parent / "worker.py"
#: Seconds a server has to answer on its socket, a worker to get ready, a run to finish.
START_TIMEOUT = 30.0
RUN_TIMEOUT = 900.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: Server kinds (a System.server) -> command-line flags; "peer" is the 0.3.1 release.
SERVER_FLAGS = {"shm": ["--shm"], "socket": [], "peer": []}


def _end(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; by pid, this process only."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def check_identity(system: str, result: Dict[str, Any], ours: Path) -> None:
    """The worker imported the offlog it should have: 0.3.1 for peers, the snapshot ``ours`` otherwise."""
    found = result.get("offlog")
    if SYSTEMS[system].server == "peer":
        ok = found is not None and found["version"] == PEER_VERSION and found["file"].startswith(str(PEERS_DIR))
    else:
        ok = found is None or found["file"].startswith(str(ours))
    if not ok:
        raise RuntimeError(f"{system}: the worker imported the wrong offlog: {found}")


class Server:
    """One running ``python -m offlog`` of a given kind."""

    def __init__(self, proc: subprocess.Popen, sock: str, kind: str, log: Path) -> None:
        self.proc = proc
        self.sock = sock
        self.kind = kind
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time of every thread so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15

    def memory_kib(self) -> Dict[str, int]:
        """VmRSS (now) and VmHWM (peak) in KiB."""
        wanted = {"VmRSS", "VmHWM"}
        found = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in wanted:
                    found[key] = int(value.split()[0])
        return found

    def stop(self) -> None:
        _end(self.proc)


class WorkerGroup:
    """Worker processes of one system, stepped together: ready, go, results, exit."""

    def __init__(self, procs: List[subprocess.Popen], logs: List[Path]) -> None:
        self.procs = procs
        self.logs = logs

    def _line(self, proc: subprocess.Popen, log: Path, timeout: float) -> str:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if not line:
            _end(proc, grace=1.0)
            raise RuntimeError(f"worker {proc.pid} gave no answer:\n{log.read_text(errors='replace')[-3000:]}")
        return line

    def ready(self) -> None:
        for proc, log in zip(self.procs, self.logs):
            line = self._line(proc, log, START_TIMEOUT)
            if line.strip() != "ready":
                raise RuntimeError(f"worker {proc.pid} said {line!r} instead of 'ready'")

    def go(self) -> None:
        for proc in self.procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()

    def results(self, timeout: float = RUN_TIMEOUT) -> List[Dict[str, Any]]:
        """Each worker's result line; a worker silent for ``timeout`` seconds is ended (RuntimeError)."""
        return [json.loads(self._line(p, log, timeout)) for p, log in zip(self.procs, self.logs)]

    def exit(self) -> None:
        for proc in self.procs:
            proc.stdin.close()  # end of input: close the sinks and leave
        for proc, log in zip(self.procs, self.logs):
            if proc.wait(RUN_TIMEOUT) != 0:
                raise RuntimeError(f"worker {proc.pid} failed:\n{log.read_text(errors='replace')[-3000:]}")
            proc.stdout.close()


class Measured(NamedTuple):
    """One run of a worker group: the workers' results and what the server spent meanwhile."""

    results: List[Dict[str, Any]]
    server_cpu_s: Optional[float]  # CPU time between go and the last result
    server_memory_kib: Dict[str, int]  # VmRSS and VmHWM once the last result is in, clients still connected


class Lab:
    """A temporary directory and every process started in it; ``with Lab() as lab``."""

    def __init__(self, offlog: Path = REPO / "offlog") -> None:
        """``offlog``: the package directory to measure (a copy is taken now)."""
        self.dir = Path(tempfile.mkdtemp(prefix="offbench-", dir="/tmp"))  # short: socket paths <= 108 bytes
        self._procs: List[subprocess.Popen] = []
        self._servers: Dict[str, Server] = {}
        self._count = 0
        self._peer: Optional[str] = None
        self.src = self.dir / "src"  # PYTHONPATH of our servers and workers
        shutil.copytree(offlog, self.src / "offlog", ignore=shutil.ignore_patterns("__pycache__"))

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def path(self, stem: str) -> Path:
        """A fresh path in the lab directory."""
        self._count += 1
        return self.dir / f"{self._count:04d}-{stem}"

    def pythonpath(self, server_kind: Optional[str]) -> str:
        if server_kind != "peer":
            return str(self.src)
        if self._peer is None:
            self._peer = peer_path(PEER_VERSION)
        return self._peer

    def _spawn(self, argv: List[str], pythonpath: str, log: Path, **kw: Any) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv, cwd=self.dir, env=child_env(pythonpath), stderr=out, start_new_session=True, **kw
            )
        self._procs.append(proc)
        return proc

    def start_server(self, kind: str, sock: Optional[str] = None) -> Server:
        """A new server of ``kind`` ("shm", "socket" or "peer") on its own socket, or on ``sock``
        (the socket of a server that died: its successor)."""
        sock = sock or str(self.path(f"{kind}.sock"))
        log = self.path(f"{kind}-server.log")
        argv = [sys.executable, "-m", "offlog", "-s", sock, *SERVER_FLAGS[kind]]
        proc = self._spawn(argv, self.pythonpath(kind), log, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not socket_answers(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} server did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.02)
        return Server(proc, sock, kind, log)

    def server(self, kind: str) -> Server:
        """The lab's shared server of ``kind``, started on first use."""
        if kind not in self._servers:
            self._servers[kind] = self.start_server(kind)
        return self._servers[kind]

    def workers(self, system: str, params: List[Dict[str, Any]], server: Optional[Server]) -> WorkerGroup:
        """One worker per entry of ``params`` (its ``system`` and ``sock`` filled in); waits until all are ready."""
        kind = SYSTEMS[system].server
        procs, logs = [], []
        for p in params:
            p = dict(p, system=system, sock=server.sock if server else None)
            log = self.path(f"{system}-worker.log")
            argv = [sys.executable, str(WORKER), json.dumps(p)]
            procs.append(
                self._spawn(argv, self.pythonpath(kind), log, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
            logs.append(log)
        group = WorkerGroup(procs, logs)
        group.ready()
        return group

    def measure(
        self,
        system: str,
        params: List[Dict[str, Any]],
        server: Optional[Server] = None,
        before_go: Optional[Callable[[], None]] = None,
    ) -> Measured:
        """Start the workers, release them together, collect their results and the server's costs."""
        kind = SYSTEMS[system].server
        if kind is not None and server is None:
            server = self.server(kind)
        group = self.workers(system, params, server)
        cpu_before = server.cpu_seconds() if server else 0.0
        if before_go is not None:
            before_go()
        group.go()
        results = group.results()
        cpu = server.cpu_seconds() - cpu_before if server else None
        memory = server.memory_kib() if server else {}
        group.exit()
        for result in results:
            check_identity(system, result, self.src / "offlog")
        return Measured(results, cpu, memory)

    def close(self) -> None:
        for proc in reversed(self._procs):
            _end(proc)
            for stream in (proc.stdin, proc.stdout):
                if stream and not stream.closed:
                    stream.close()
        shutil.rmtree(self.dir, ignore_errors=True)
