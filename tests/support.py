"""Real processes for the tests: offlog servers, 0.x peers, client scripts, offlog commands.

Every process started here is remembered and ended by pid at teardown; every
temporary directory is short (Unix socket paths are limited to 108 bytes) and
removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional

import pytest

from offlog.shm.doorbells import waitv_available

REPO = Path(__file__).resolve().parent.parent
PEERS_DIR = REPO / ".peers"
PEER_VERSIONS = ("0.1.0", "0.3.1")

#: For a test that watches rings fall asleep: without futex_waitv the server keeps them awake.
needs_sleeping_rings = pytest.mark.skipif(
    not waitv_available(), reason="rings sleep only where the kernel has futex_waitv (Linux 5.16; qemu-user has not)"
)


def child_env(pythonpath: Optional[str] = None, **extra: str) -> dict:
    """Environment of a child interpreter: our package, or a 0.x peer's with ``pythonpath``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = pythonpath or str(REPO)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def shm_objects(pids: Optional[Iterable[int]] = None) -> set:
    """Entries in /dev/shm named like offlog's (only those of servers ``pids``, if given).

    A current server names nothing (each ring is a sealed memfd passed over its
    client's socket). Servers before version 3 of the protocol named their rings
    ``offlog.<pid>.<hex>.ring``: the pid lets a test ignore those of servers it did
    not start (others may run one on this machine) while it asserts its own made none.
    """
    try:
        names = {n for n in os.listdir("/dev/shm") if "offlog." in n}
    except FileNotFoundError:
        return set()
    if pids is None:
        return names
    wanted = {str(p) for p in pids}
    return {n for n in names if n.split("offlog.", 1)[1].split(".", 1)[0] in wanted}


def dev_shm_in_use(pid: int) -> set:
    """The /dev/shm files process ``pid`` has open or mapped (a ring needs none)."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed since the listing
            continue
        if target.startswith("/dev/shm/"):
            found.add(target)
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/dev/shm/"):
                found.add(fields[5].strip())
    return found


def ring_mappings(pid: int) -> int:
    """How many ring memfds process ``pid`` has mapped."""
    with open(f"/proc/{pid}/maps") as maps:
        return sum("/memfd:offlog-ring" in line for line in maps)


def open_fds(pid: int) -> int:
    """How many descriptors process ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class Processes:
    """Tracks every child process a test starts; ends them all by pid."""

    def __init__(self) -> None:
        self.procs: List[subprocess.Popen] = []

    def start(self, argv, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(argv, **kw)
        self.procs.append(proc)
        return proc

    def end_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream:
                    stream.close()


class ServerProcess:
    """One `python -m offlog` process (ours, or a 0.x peer's with ``pythonpath``)."""

    def __init__(
        self,
        procs: Processes,
        workdir: Path,
        *args: str,
        pythonpath: Optional[str] = None,
        sock: Optional[str] = None,
        env: Optional[dict] = None,
    ) -> None:
        self.procs = procs
        self.workdir = workdir
        self.sock = sock or str(workdir / "offlog.sock")
        self.args = args
        self.pythonpath = pythonpath
        self.extra_env = env or {}
        self.log_path = workdir / f"server-{len(procs.procs)}.out"
        self.proc: Optional[subprocess.Popen] = None

    def env(self) -> dict:
        return child_env(self.pythonpath, **self.extra_env)

    def start(self, wait: bool = True) -> "ServerProcess":
        self._out = open(self.log_path, "ab")
        self.proc = self.procs.start(
            [sys.executable, "-m", "offlog", "-s", self.sock, *self.args],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=str(self.workdir),
            env=self.env(),
        )
        self._out.close()
        if wait:
            wait_for(lambda: socket_answers(self.sock) or self.proc.poll() is not None, what="server socket")
            assert self.proc.poll() is None, f"server exited early:\n{self.output()}"
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        return wait_for(lambda: text in self.output() and self.output(), timeout, what=f"log line {text!r}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful stop. A server that does not stop in
        time is asked for its threads' stacks (SIGUSR1), which the failure shows."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            if self.pythonpath is None:  # ours: SIGUSR1 dumps every thread's stack
                self.proc.send_signal(signal.SIGUSR1)
                time.sleep(1.0)
            raise AssertionError(f"the server did not stop within {timeout} s:\n{self.output()[-6000:]}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def started_servers(procs: Processes, workdir: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Body of a server factory fixture (``yield from``): ``start(*args, **kw)`` starts a
    ServerProcess through ``procs`` in ``workdir``; those still running at teardown are stopped."""
    started = []

    def start(*args: str, **kw) -> ServerProcess:
        server = ServerProcess(procs, workdir, *args, **kw).start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.stop()


def peer_path(version: str) -> str:
    """offlog==version from PyPI, installed into its own directory (cached in .peers/)."""
    target = PEERS_DIR / f"offlog-{version}"
    marker = target / ".installed"
    if not marker.exists():
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--disable-pip-version-check",
                "--target",
                str(target),
                f"offlog=={version}",
            ],
            check=True,
        )
        marker.write_text(version)
    return str(target)


def client_script(
    procs: Processes,
    workdir: Path,
    code: str,
    *,
    pythonpath: Optional[str] = None,
    wait: bool = True,
    timeout: float = 60.0,
    stdout=subprocess.PIPE,
) -> subprocess.Popen:
    """Run ``code`` in a fresh interpreter (ours, or a peer's with ``pythonpath``)."""
    proc = procs.start(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        cwd=str(workdir),
        env=child_env(pythonpath),
        text=True,
    )
    if wait:
        out, err = proc.communicate(timeout=timeout)
        proc.stdout_text, proc.stderr_text = out, err
    return proc


def run_offlog(procs: Processes, workdir: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """``python -m offlog ARGS`` (our package) in ``workdir``, run to its end."""
    proc = procs.start(
        [sys.executable, "-m", "offlog", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=str(workdir),
        env=child_env(),
        text=True,
    )
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def short_tempdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="offlog-", dir="/tmp"))
