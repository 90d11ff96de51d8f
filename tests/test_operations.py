"""Operating a server: status reports, bounded client backlogs, socket permissions, sync."""

from __future__ import annotations

import grp
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys

import pytest
from support import REPO, child_env

import offlog


def run_status(sock: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "offlog", "status", "-s", sock, *args],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        env=child_env(),
        timeout=60,
    )


def test_status_reports_clients_files_and_transports(shm_server, workdir):
    ring = offlog.ProxyFile(str(workdir / "ring.log"), shm_server.sock, shm=True)
    sock_client = offlog.ProxyFile(str(workdir / "sock.log"), shm_server.sock, shm=False)
    legacy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    legacy.connect(shm_server.sock)
    legacy.sendall(str(workdir / "sock.log").encode() + b"\0")
    assert legacy.recv(16) == b"OK\0"
    try:
        ring.write(b"r" * 1000)
        ring.sync()
        sock_client.write(b"s" * 500)
        sock_client.sync()
        result = run_status(shm_server.sock, "--json")
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        assert status["pid"] == shm_server.pid and status["shm"]["offered"] is True
        by_file = {}
        for c in status["clients"]:
            by_file.setdefault(os.path.basename(c["file"]), []).append(c)
            assert c["pid"] == os.getpid() and c["uid"] == os.getuid()
        assert [(c["transport"], c["bytes_written"]) for c in by_file["ring.log"]] == [("shm", 1000)]
        assert sorted((c["dialect"], c["bytes_written"]) for c in by_file["sock.log"]) == [("0.x", 0), ("framed", 500)]
        files = {os.path.basename(f["path"]): f for f in status["files"]}
        assert files["sock.log"]["clients"] == 2 and files["ring.log"]["bytes_written"] == 1000
        table = run_status(shm_server.sock).stdout
        assert re.search(r"^ID\s+PID\s+UID\s+TRANSPORT\s+WRITTEN\s+UNCONFIRMED\s+DROPPED\s+FILE", table, re.M)
        assert "socket (0.x)" in table and str(workdir / "ring.log") in table
    finally:
        legacy.close()
        ring.close()
        sock_client.close()


def test_status_without_a_server_says_so(workdir):
    result = run_status(str(workdir / "nobody.sock"))
    assert result.returncode == 1 and "no answer from" in result.stderr


def test_status_counts_errors(server, workdir):
    with pytest.raises(FileNotFoundError):
        offlog.ProxyFile(str(workdir / "missing" / "x.log"), server.sock)
    status = json.loads(run_status(server.sock, "--json").stdout)
    assert status["errors"] == 1 and "access denied" in status["recent_errors"][0]


# -- bounded backlogs -------------------------------------------------------------------
def stalled_proxy(start_server, workdir, transport: str, **options):
    """A ProxyFile whose server is stopped (SIGSTOP), so its writes stay in its backlog."""
    server = start_server("--shm", "--ring-size", "64K")
    f = offlog.ProxyFile(str(workdir / "q.log"), server.sock, shm=transport == "shm", **options)
    server.signal(signal.SIGSTOP)
    return server, f


def fill(f, stop_when_dropped: bool = True, limit: int = 200_000) -> int:
    """Write 100-byte records until the backlog's limit bites; return how many write() calls."""
    for i in range(limit):
        f.write(b"%099d\n" % i)
        if stop_when_dropped and f.dropped:
            return i + 1
    return limit


@pytest.mark.parametrize("transport", ["socket", "shm"])
def test_drop_policy_bounds_the_backlog_and_reports_what_it_dropped(start_server, workdir, transport):
    server, f = stalled_proxy(start_server, workdir, transport, max_queue=20_000, on_full="drop")
    try:
        calls = fill(f, stop_when_dropped=False, limit=20_000)
        assert f.backlog <= 20_000 + 100
        assert f.dropped > 0
    finally:
        server.signal(signal.SIGCONT)
    f.close()
    data = (workdir / "q.log").read_bytes()
    assert len(data) == calls * 100 - f.dropped
    records = [data[k : k + 100] for k in range(0, len(data), 100)]
    numbers = [int(r) for r in records]  # every record whole: 99 digits and a newline
    assert numbers == sorted(numbers) and numbers[0] == 0
    server.wait_log(f"dropped {f.dropped} bytes (its backlog was full)")


@pytest.mark.parametrize("transport", ["socket", "shm"])
def test_raise_policy_raises_blocking_io_error(start_server, workdir, transport):
    server, f = stalled_proxy(start_server, workdir, transport, max_queue=20_000, on_full="raise")
    try:
        with pytest.raises(BlockingIOError, match="backlog full"):
            fill(f, stop_when_dropped=False)
    finally:
        server.signal(signal.SIGCONT)
    f.close()


@pytest.mark.parametrize("transport", ["socket", "shm"])
def test_block_policy_waits_at_most_the_timeout(start_server, workdir, transport):
    server, f = stalled_proxy(start_server, workdir, transport, max_queue=20_000, on_full="block", timeout=300)
    try:
        with pytest.raises(TimeoutError, match="backlog stayed full"):
            fill(f, stop_when_dropped=False)
    finally:
        server.signal(signal.SIGCONT)
    f.close()


def test_block_policy_loses_nothing_when_the_server_keeps_up(start_server, workdir):
    server = start_server("--shm", "--ring-size", "64K")
    f = offlog.ProxyFile(str(workdir / "b.log"), server.sock, max_queue=4096, on_full="block")
    for i in range(20_000):
        f.write(b"%099d\n" % i)
    f.close()
    assert (workdir / "b.log").read_bytes() == b"".join(b"%099d\n" % i for i in range(20_000))


def test_unknown_on_full_policy_is_a_value_error(server, workdir):
    with pytest.raises(ValueError, match="on_full"):
        offlog.ProxyFile(str(workdir / "x.log"), server.sock, max_queue=10, on_full="wait")


# -- multi-user hosts ------------------------------------------------------------------
def test_socket_mode_and_group(start_server):
    group = grp.getgrgid(os.getgid()).gr_name
    server = start_server("--socket-mode", "660", "--socket-group", group)
    st = os.stat(server.sock)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == os.getgid()


def test_logger_sync_puts_every_line_in_the_file(transport_server, workdir):
    target = workdir / "l.log"
    logger = offlog.Logger("app", str(target), stdout_level=None, offlog_socket_path=transport_server.sock)
    for i in range(100):
        logger.info("line %d", i)
    logger.flush()  # hands over, never waits
    logger.sync()
    assert len(target.read_text().splitlines()) == 100
    logger.close()
