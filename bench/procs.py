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
also the source of the server-side figures: CPU time (all threads; workers'
too: see :class:`CpuMeter`), memory and thread count from
``/proc/<pid>/status``, the bytes its rings take from ``/dev/shm`` and
``/proc/<pid>/fd`` (see :meth:`Server.shared_memory`).

Descriptors: opening the lab raises this process's soft RLIMIT_NOFILE to its
hard limit, so every child inherits it: a worker holding 500 clients needs a
few descriptors each, and the 0.3.1 server (unlike ours) does not raise its own.
"""

from __future__ import annotations

import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

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
SHM_DIR = Path("/dev/shm")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of process ``pid`` so far, ever (in 10 ms ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15


def thread_runtimes(pid: int) -> Dict[int, int]:
    """Nanoseconds on a CPU of each live thread of process ``pid`` (schedstat; empty where the kernel
    keeps none)."""
    found = {}
    task_dir = f"/proc/{pid}/task"
    for tid in os.listdir(task_dir):
        try:
            with open(f"{task_dir}/{tid}/schedstat") as f:
                found[int(tid)] = int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # the thread ended since the listing
            pass
    return found


class CpuMeter:
    """CPU time processes spend from now on, all their threads together.

    ``/proc/<pid>/stat`` counts every thread, the ended ones too, but in 10 ms
    ticks: a run that costs a server 0.1 s is read to within 20%. So the meter
    also sums the threads' own nanosecond counts (``/proc/<pid>/task/*/schedstat``),
    which miss only threads that ended meanwhile, and uses that sum unless a
    thread it saw at the start has ended or the ticks exceed it by more than
    two (a thread started and ended in between).
    """

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._ticks = [cpu_seconds(pid) for pid in self.pids]
        self._threads = [thread_runtimes(pid) for pid in self.pids]

    def seconds(self) -> float:
        total = 0.0
        for pid, ticks_before, threads_before in zip(self.pids, self._ticks, self._threads):
            ticks = cpu_seconds(pid) - ticks_before
            threads = thread_runtimes(pid)
            precise = sum(ns - threads_before.get(tid, 0) for tid, ns in threads.items()) / 1e9
            ended = not threads or any(tid not in threads for tid in threads_before)
            total += ticks if ended or ticks > precise + 2 / CLOCK_TICKS else precise
        return total


def status_fields(pid: int, keys: Sequence[str]) -> Dict[str, int]:
    """The numeric fields ``keys`` of ``/proc/<pid>/status`` that it has (sizes in KiB)."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                found[key] = int(value.split()[0])
    return found


def shm_used_bytes() -> int:
    """Bytes in use on the /dev/shm file system, by anyone (statvfs)."""
    st = os.statvfs(SHM_DIR)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


#: Kinds of shared-memory file a server may hold, by the start of their path in /proc/<pid>/{fd,maps}.
SHARED_FILES = {"shm_files": "/dev/shm/", "memfds": "/memfd:"}


def _shared_kind(path: str) -> Optional[str]:
    return next((kind for kind, prefix in SHARED_FILES.items() if path.startswith(prefix)), None)


def raise_descriptor_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit, for this process and the children it starts from now on."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


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

    def cpu_meter(self) -> CpuMeter:
        """The CPU time the server spends from now on."""
        return CpuMeter([self.pid])

    def memory_kib(self) -> Dict[str, int]:
        """VmRSS (now) and VmHWM (peak) in KiB."""
        return status_fields(self.pid, ("VmRSS", "VmHWM"))

    def threads(self) -> int:
        return status_fields(self.pid, ("Threads",))["Threads"]

    def shared_memory(self) -> Dict[str, int]:
        """What the server's rings take, counted three ways so the count survives a change of design:

        * ``shm_files``: /dev/shm files (named or already unlinked) the server holds open or maps;
        * ``memfds``: the memfds it holds open or maps;
        * ``rss_shmem``: its RssShmem, the shared-memory pages it has mapped and touched.

        Each file counts once: its allocated bytes if the server holds a descriptor of it, else the
        size of its mapping (a ring's memory is reserved in full when it is made).
        """
        sizes: Dict[str, Dict[int, int]] = {kind: {} for kind in SHARED_FILES}
        fd_dir = Path(f"/proc/{self.pid}/fd")
        for fd in os.listdir(fd_dir):
            try:
                kind = _shared_kind(os.readlink(fd_dir / fd))
                if kind:
                    st = os.stat(fd_dir / fd)
                    sizes[kind][st.st_ino] = st.st_blocks * 512
            except FileNotFoundError:  # closed since the listing
                pass
        with open(f"/proc/{self.pid}/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)  # range, perms, offset, device, inode, path
                kind = _shared_kind(fields[5]) if len(fields) == 6 else None
                if kind and int(fields[4]) not in sizes[kind]:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    sizes[kind][int(fields[4])] = end - start
        shmem = status_fields(self.pid, ("RssShmem",)).get("RssShmem", 0) * 1024
        return dict({kind: sum(found.values()) for kind, found in sizes.items()}, rss_shmem=shmem)

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

    def ready(self, timeout: float = START_TIMEOUT) -> None:
        for proc, log in zip(self.procs, self.logs):
            line = self._line(proc, log, timeout)
            if line.strip() != "ready":
                raise RuntimeError(f"worker {proc.pid} said {line!r} instead of 'ready'")

    def go(self) -> None:
        for proc in self.procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()

    def cpu_meter(self) -> CpuMeter:
        """The CPU time the workers spend from now on, together."""
        return CpuMeter([proc.pid for proc in self.procs])

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
        raise_descriptor_limit()

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

    def start_server(self, kind: str, sock: Optional[str] = None, flags: Sequence[str] = ()) -> Server:
        """A new server of ``kind`` ("shm", "socket" or "peer") on its own socket, or on ``sock``
        (the socket of a server that died: its successor); ``flags``: more command-line flags."""
        sock = sock or str(self.path(f"{kind}.sock"))
        log = self.path(f"{kind}-server.log")
        argv = [sys.executable, "-m", "offlog", "-s", sock, *SERVER_FLAGS[kind], *flags]
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

    def workers(
        self, system: str, params: List[Dict[str, Any]], server: Optional[Server], timeout: float = START_TIMEOUT
    ) -> WorkerGroup:
        """One worker per entry of ``params`` (its ``system`` and ``sock`` filled in); waits until all are
        ready, each at most ``timeout`` seconds."""
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
        group.ready(timeout)
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
        meter = server.cpu_meter() if server else None
        if before_go is not None:
            before_go()
        group.go()
        results = group.results()
        cpu = meter.seconds() if meter else None
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
