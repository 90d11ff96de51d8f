"""The C client library (c/offlog.h, c/offlog.c) against real servers.

The module builds the library once with the system's C compiler (``CC``,
default ``cc``), with every warning an error, together with
tests/c_client_driver.c: a program that runs one command per line from the
test (open, write records, sync, close) and answers one line each, so a test
can stop or kill the server between two steps. Records are tests/records.py's,
so a file shows whether every record arrived whole and in order. The README's
C and C++ examples (c/README.md) are compiled and run too, the C++ one with
the system's C++ compiler (``CXX``, default ``c++``) over the header and the
object file the C compiler made.

Without a C compiler the tests are skipped, except in CI (``CI=true``), where
that is a failure; without a C++ compiler only the C++ test is skipped.
"""

from __future__ import annotations

import errno
import os
import re
import select
import shutil
import subprocess
from pathlib import Path
from typing import List, Tuple

import pytest
from records import record, strict_lines
from support import REPO, Processes, short_tempdir, wait_for
from test_trust import Recorder, as_nobody, as_root, shared  # noqa: F401 (fixtures)

from offlog.shm.objects import unsupported_reason

C = REPO / "c"
IN_CI = os.environ.get("CI") == "true"
CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread"]
TIMEOUT_MS = 30_000
RINGS = unsupported_reason() is None

needs_rings = pytest.mark.skipif(not RINGS, reason=f"no rings here: {unsupported_reason()}")


def compiler(variable: str, default: str) -> str:
    return shutil.which(os.environ.get(variable, default)) or ""


@pytest.fixture(scope="module")
def build():
    """A directory with the driver and offlog.o, built by the C compiler."""
    cc = compiler("CC", "cc")
    if not cc:
        if IN_CI:
            pytest.fail("CI must build the C client: no C compiler (CC or cc) found")
        pytest.skip("no C compiler (CC or cc) found")
    path = short_tempdir()
    for argv in (
        [cc, *CFLAGS, "-c", str(C / "offlog.c"), "-o", str(path / "offlog.o")],
        [cc, *CFLAGS, str(REPO / "tests" / "c_client_driver.c"), str(path / "offlog.o"), "-o", str(path / "driver")],
    ):
        built = subprocess.run(argv, capture_output=True, text=True)
        assert built.returncode == 0 and not built.stderr, f"{' '.join(argv)}:\n{built.stderr}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def sanitized(build):
    """The driver built with AddressSanitizer and UndefinedBehaviorSanitizer, every finding fatal."""
    flags = ["-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    sources = [str(C / "offlog.c"), str(REPO / "tests" / "c_client_driver.c")]
    argv = [compiler("CC", "cc"), *CFLAGS, *flags, *sources, "-o", str(build / "driver-sanitized")]
    built = subprocess.run(argv, capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"this compiler cannot build with the sanitizers: {built.stderr.strip()[-300:]}")
    return build / "driver-sanitized"


class Driver:
    """tests/c_client_driver.c in a child process: ``ask`` sends a command, returns the answer's words."""

    def __init__(self, procs: Processes, binary: Path, workdir: Path) -> None:
        self.workdir = workdir
        self.proc = procs.start(
            [str(binary)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=str(workdir),
            text=True,
        )

    def ask(self, command: str, timeout: float = 120.0) -> List[str]:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"no answer to {command!r} within {timeout} s{self.servers_say()}"
        line = self.proc.stdout.readline()
        assert line, f"the driver exited at {command!r}: {self.proc.stderr.read()}"
        return line.rstrip("\n").split(" ", 3)

    def servers_say(self) -> str:
        """The end of the logs of the servers started in the workdir, for a failure's message."""
        logs = sorted(self.workdir.glob("server-*.out"))
        return "".join(f"\n--- {log.name}:\n{log.read_text(errors='replace')[-3000:]}" for log in logs)

    def ok(self, command: str) -> List[str]:
        answer = self.ask(command)
        assert answer[0] == "ok", f"{command!r}: {answer}{self.servers_say()}"
        return answer[1:]

    def fails(self, command: str) -> Tuple[int, str]:
        """The errno and the last word (offlog_error's text, or "-") of a failed command."""
        answer = self.ask(command)
        assert answer[0] == "err", f"{command!r} should have failed: {answer}{self.servers_say()}"
        return int(answer[1]), " ".join(answer[2:])

    def open(self, path: Path, sock: str, flags: str = "-") -> str:
        return self.ok(f"open {path} {sock} {flags} {TIMEOUT_MS}")[0]


@pytest.fixture
def driver(procs, build, workdir):
    return Driver(procs, build / "driver", workdir)


def records(tag: str, first: int, stop: int, size: int) -> bytes:
    return b"".join(record(tag, n, size) for n in range(first, stop))


def flags_for(server) -> Tuple[str, str]:
    """(open flags, the transport a client gets) on a transport_server."""
    if server.transport == "shm":
        return "shm", "shm" if RINGS else "socket"
    return "-", "socket"


def assert_records_in_order(path: Path, tag: str, stop: int) -> None:
    data = path.read_bytes()
    counts, bad = strict_lines(data)
    assert not bad, f"not whole records: {bad[:3]}"
    numbers = [int(m.group(1)) for m in re.finditer(rb"^%s (\d+) " % tag.encode(), data, re.M)]
    assert numbers == list(range(stop)), "records missing, repeated or out of order"


# -- records ---------------------------------------------------------------------------------
def test_every_record_arrives_whole_and_in_order(transport_server, driver, workdir):
    flags, transport = flags_for(transport_server)
    target = workdir / "c.log"
    assert driver.open(target, transport_server.sock, flags) == transport
    driver.ok("write C 0 50000 60")
    assert int(driver.ok(f"sync {TIMEOUT_MS}")[0]) == len(records("C", 0, 50000, 60))
    driver.ok(f"close {TIMEOUT_MS}")
    assert_records_in_order(target, "C", 50000)


@needs_rings
def test_a_small_ring_wraps_fills_and_takes_writes_larger_than_itself(start_server, driver, workdir):
    """A 64 KiB ring: writes wrap past its end, find it full (EAGAIN, retried by the
    driver) and, at 100 KB, are larger than the ring (taken in parts); one client's
    records still arrive whole and in order."""
    server = start_server("--shm", "--ring-size", "65536")
    target = workdir / "small.log"
    assert driver.open(target, server.sock, "shm") == "shm"
    driver.ok("write S 0 20000 60")
    driver.ok("write S 20000 20005 100000")
    driver.ok("write S 20005 21000 60")
    driver.ok(f"close {TIMEOUT_MS}")
    assert_records_in_order(target, "S", 21000)


def test_threads_sharing_one_connection_keep_every_record_whole(transport_server, driver, workdir):
    """Four threads write through one offlog_t: each one's records arrive whole and in its order."""
    flags, _ = flags_for(transport_server)
    target = workdir / "threads.log"
    driver.open(target, transport_server.sock, flags)
    driver.ok("threads 4 0 20000 60")
    driver.ok(f"close {TIMEOUT_MS}")
    data = target.read_bytes()
    counts, bad = strict_lines(data)
    assert not bad and sum(counts.values()) == 80000
    for t in range(4):
        numbers = [int(m.group(1)) for m in re.finditer(rb"^T%d (\d+) " % t, data, re.M)]
        assert numbers == list(range(20000)), f"thread {t}'s records are missing, repeated or out of order"


@pytest.mark.parametrize("fsync", [False, True], ids=["", "fsync"])
def test_sync_returns_once_the_bytes_are_in_the_file(transport_server, driver, workdir, fsync):
    """The driver takes the file's size right after each sync returned."""
    flags, _ = flags_for(transport_server)
    target = workdir / "synced.log"
    driver.open(target, transport_server.sock, f"{flags},fsync" if fsync else flags)
    for round_ in range(5):
        first, stop = round_ * 3000, (round_ + 1) * 3000
        driver.ok(f"write Y {first} {stop} 60")
        assert int(driver.ok(f"sync {TIMEOUT_MS}")[0]) == len(records("Y", 0, stop, 60))
    driver.ok(f"close {TIMEOUT_MS}")


# -- errors ----------------------------------------------------------------------------------
def test_open_errors_come_back_as_errno(server, driver, workdir):
    cases = [
        (workdir / "missing" / "x.log", server.sock, errno.ENOENT),  # the server's open
        (workdir, server.sock, errno.EISDIR),
        ("/proc/self/fd/1", server.sock, errno.EACCES),  # not a log file
        ("relative.log", server.sock, errno.EINVAL),  # refused before connecting
        (workdir / "x.log", str(workdir / "nobody-listens.sock"), errno.ENOENT),  # no server
    ]
    for path, sock, expected in cases:
        assert driver.fails(f"open {path} {sock} shm {TIMEOUT_MS}")[0] == expected, path
    assert not (workdir / "x.log").exists()


@pytest.mark.parametrize("version", ["0.1.0", "0.3.1"])
def test_a_0x_server_is_told_apart_and_nothing_is_created(start_server, peers, driver, workdir, version):
    """The C client speaks only the framed dialect: a 0.x server reads its preamble as an
    empty path and refuses it; the open says EPROTONOSUPPORT."""
    server = start_server(pythonpath=peers[version])
    assert driver.fails(f"open {workdir / 'old.log'} {server.sock} shm {TIMEOUT_MS}")[0] == errno.EPROTONOSUPPORT
    assert not (workdir / "old.log").exists()


def test_a_write_error_comes_back_as_errno_with_the_servers_words(transport_server, driver):
    """/dev/full: the server's write fails with ENOSPC; sync says so, and so does every later call."""
    flags, _ = flags_for(transport_server)
    driver.open(Path("/dev/full"), transport_server.sock, flags)
    driver.ok("write F 0 10 0")
    err, words = driver.fails(f"sync {TIMEOUT_MS}")
    assert err == errno.ENOSPC and "No space left on device" in words
    assert driver.fails("write F 10 11 0")[0] == errno.ENOSPC
    assert driver.fails(f"sync {TIMEOUT_MS}")[0] == errno.ENOSPC
    assert driver.fails(f"close {TIMEOUT_MS}")[0] == errno.ENOSPC


def test_a_stopped_server_comes_back_as_eshutdown(transport_server, driver, workdir):
    """Everything synced before the stop is in the file; the next write says ESHUTDOWN."""
    flags, _ = flags_for(transport_server)
    target = workdir / "stopped.log"
    driver.open(target, transport_server.sock, flags)
    driver.ok("write T 0 1000 60")
    driver.ok(f"sync {TIMEOUT_MS}")
    transport_server.stop()
    err, words = driver.fails("write T 1000 1001 60")
    assert err == errno.ESHUTDOWN
    assert driver.fails(f"sync {TIMEOUT_MS}")[0] == errno.ESHUTDOWN
    assert driver.fails(f"close {TIMEOUT_MS}")[0] == errno.ESHUTDOWN
    assert_records_in_order(target, "T", 1000)


def test_a_killed_server_comes_back_as_epipe_at_the_next_wait(transport_server, driver, workdir):
    """SIGKILL sets no STATE and sends no word: a sync sees the hang-up at once."""
    flags, _ = flags_for(transport_server)
    driver.open(workdir / "killed.log", transport_server.sock, flags)
    driver.ok("write K 0 100 60")
    driver.ok(f"sync {TIMEOUT_MS}")
    transport_server.kill()
    assert driver.fails(f"sync {TIMEOUT_MS}")[0] == errno.EPIPE
    assert driver.fails(f"close {TIMEOUT_MS}")[0] == errno.EPIPE


@as_root
def test_a_server_of_another_user_is_refused_and_sent_nothing(as_nobody, shared, driver, workdir):  # noqa: F811
    squatter = Recorder(as_nobody, shared, str(shared / "offlog.sock"))
    for flags in ("shm", "-"):
        assert driver.fails(f"open {workdir / 'secret.log'} {squatter.sock} {flags} {TIMEOUT_MS}")[0] == errno.EACCES
    wait_for(lambda: squatter.connections() == 2, what="the squatter to see both connections end")
    assert squatter.received() == b"", "a refused server must not get a single byte"
    assert not (workdir / "secret.log").exists()


def test_the_sanitizers_find_nothing_in_a_session_and_its_errors(transport_server, procs, sanitized, workdir):
    """Records, syncs, a write error and the server's stop, under ASan and UBSan."""
    flags, transport = flags_for(transport_server)
    driver = Driver(procs, sanitized, workdir)
    target = workdir / "sanitized.log"
    assert driver.open(target, transport_server.sock, flags) == transport
    driver.ok("write Z 0 20000 60")
    driver.ok("write Z 20000 20003 70000")
    driver.ok(f"sync {TIMEOUT_MS}")
    driver.ok(f"close {TIMEOUT_MS}")
    assert_records_in_order(target, "Z", 20003)
    missing = workdir / "missing" / "x.log"
    assert driver.fails(f"open {missing} {transport_server.sock} {flags} {TIMEOUT_MS}")[0] == errno.ENOENT
    driver.open(Path("/dev/full"), transport_server.sock, flags)
    driver.ok("write F 0 10 0")
    assert driver.fails(f"close {TIMEOUT_MS}")[0] == errno.ENOSPC
    driver.open(workdir / "stopping.log", transport_server.sock, flags)
    transport_server.stop()
    assert driver.fails("write S 0 1 0")[0] == errno.ESHUTDOWN
    assert driver.fails(f"close {TIMEOUT_MS}")[0] == errno.ESHUTDOWN
    driver.proc.stdin.close()
    assert driver.proc.wait(60) == 0, driver.proc.stderr.read()


# -- the README's examples -------------------------------------------------------------------
def readme_example(language: str, target: Path, sock: str) -> str:
    """The README's example in ``language``, writing to ``target`` through the server at ``sock``."""
    text = (C / "README.md").read_text()
    (code,) = [block for block in re.findall(rf"```{language}\n(.*?)```", text, re.S) if "main(" in block]
    assert code.count('"/tmp/myapp.log"') == 1 and "OFFLOG_DEFAULT_SOCKET" in code
    return code.replace('"/tmp/myapp.log"', f'"{target}"').replace("OFFLOG_DEFAULT_SOCKET", f'"{sock}"')


def run_example(procs: Processes, argv: List[str], workdir: Path) -> str:
    built = subprocess.run(argv, capture_output=True, text=True, cwd=str(workdir))
    assert built.returncode == 0 and not built.stderr, f"{' '.join(argv)}:\n{built.stderr}"
    example = procs.start([str(workdir / "example")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = example.communicate(timeout=120)
    assert example.returncode == 0, err
    return out


def test_the_readme_c_example_compiles_and_writes_its_records(transport_server, build, procs, workdir):
    target = workdir / "example-c.log"
    (workdir / "example.c").write_text(readme_example("c", target, transport_server.sock))
    cc = compiler("CC", "cc")
    out = run_example(procs, [cc, *CFLAGS, f"-I{C}", "example.c", str(build / "offlog.o"), "-o", "example"], workdir)
    _, transport = flags_for(transport_server)
    assert out == f"writing over {transport}\n0 records dropped\n"
    assert target.read_text().splitlines() == [f"record {i}: hello from C" for i in range(1000)]


def test_the_readme_cxx_example_compiles_against_the_header_and_writes_its_records(
    transport_server, build, procs, workdir
):
    cxx = compiler("CXX", "c++")
    if not cxx:
        pytest.skip("no C++ compiler (CXX or c++) found")
    target = workdir / "example-cxx.log"
    (workdir / "example.cpp").write_text(readme_example("cpp", target, transport_server.sock))
    flags = ["-std=c++11", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", f"-I{C}"]
    run_example(procs, [cxx, *flags, "example.cpp", str(build / "offlog.o"), "-o", "example"], workdir)
    assert target.read_text().splitlines() == [f"record {i}: hello from C++" for i in range(1000)]
