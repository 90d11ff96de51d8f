"""Limits of the host never stop the server: threads, descriptors, its own log.

The thread limit is a real one: the server is put in a cgroup whose
``pids.max`` leaves room for two client threads (RLIMIT_NPROC would count
every process of the user, including other tests', and does not bind root).
The descriptor limit is the server's RLIMIT_NOFILE, lowered with prlimit.
Requests are sent while the server is stopped (SIGSTOP), so each is there
when the server accepts it and the answer does not depend on who runs first.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import List, Tuple

import pytest
from support import REPO, child_env, socket_answers, wait_for

import offlog
from offlog import protocol as P
from offlog.loglines import REPEATS_WRITTEN, LineSink


# -- helpers ----------------------------------------------------------------------------
def open_while_stopped(server, requests: List[P.Open]) -> List[Tuple[socket.socket, P.ClientConnection]]:
    """Connect and send each request while the server is stopped; then let it run."""
    sent = []
    server.signal(signal.SIGSTOP)
    try:
        for request in requests:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(60)
            sock.connect(server.sock)
            conn = P.ClientConnection()
            sock.sendall(conn.send(request))
            sent.append((sock, conn))
    finally:
        server.signal(signal.SIGCONT)
    return sent


def answer(sock: socket.socket, conn: P.ClientConnection):
    """The server's answer to an open: "opened", the exception it sent, or "closed"."""
    while True:
        event = conn.next_event()
        if event is P.NEED_DATA:
            try:
                conn.receive_data(sock.recv(65536))
            except ConnectionResetError:
                conn.receive_data(b"")
        elif isinstance(event, P.Opened):
            return "opened"
        elif isinstance(event, P.Error):
            return event.exception
        elif isinstance(event, P.Closed):
            return "closed"


def end_session(sock: socket.socket) -> None:
    """End a held client's session the way a client does: end of data, then BYE."""
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(65536):
        pass
    sock.close()


def open_fds(pid: int) -> List[int]:
    return sorted(int(name) for name in os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def pids_cgroup():
    """A fresh cgroup of the pids controller (needs root, as in CI); removed afterwards."""
    root = Path("/sys/fs/cgroup/pids")
    if not (root / "cgroup.procs").exists():
        root = Path("/sys/fs/cgroup")
        try:
            if "pids" not in (root / "cgroup.subtree_control").read_text().split():
                pytest.skip("no pids cgroup controller here to bound the server's threads with")
        except OSError:
            pytest.skip("no cgroup file system here to bound the server's threads with")
    group = root / f"offlog-test-{uuid.uuid4().hex[:12]}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a pids cgroup to bound the server's threads with (run as root): {exc}")
    yield group
    for pid in (group / "cgroup.procs").read_text().split():
        (root / "cgroup.procs").write_text(pid)  # a server still running leaves the group first
    group.rmdir()


# -- a thread or process limit ------------------------------------------------------------
def test_clients_need_no_thread_so_a_thread_limit_turns_no_client_away(start_server, workdir, pids_cgroup):
    """Sessions live on the event loop and files on the writers the server started with, so
    with no thread to be had at all, 40 new clients of 8 files (both dialects) are opened,
    written and closed whole, and the server keeps its thread count, its socket and its
    life (before: a thread per client; RuntimeError ended the accept loop and the server).
    The one request that needs a thread of its own (reopen) is refused with EAGAIN."""
    server = start_server()
    server.wait_log("Client 0 disconnected\n")  # start_server's probe
    (pids_cgroup / "cgroup.procs").write_text(str(server.pid))
    current = int((pids_cgroup / "pids.current").read_text())
    (pids_cgroup / "pids.max").write_text(str(current))  # not one more thread
    paths = [str(workdir / f"app{i}.log") for i in range(8)]

    held = open_while_stopped(server, [P.Open(paths[i % 8], 0) for i in range(30)] + [P.OpenPath(paths[0])] * 10)
    assert [answer(*pair) for pair in held] == ["opened"] * 40
    for i, (sock, conn) in enumerate(held):
        sock.sendall(conn.send(P.Data(b"record %d\n" % i)) if conn.framed else b"record %d\n" % i)
        end_session(sock)
    expected = sorted(b"record %d\n" % i for i in range(40))
    assert sorted(line + b"\n" for p in paths for line in Path(p).read_bytes().splitlines()) == expected
    with offlog.ProxyFile(paths[1], server.sock, shm=False) as f:
        f.write(b"served again\n")
    assert Path(paths[1]).read_bytes().endswith(b"served again\n")

    [(sock, conn)] = open_while_stopped(server, [P.ReopenRequest()])
    reply = answer(sock, conn)
    sock.close()
    assert isinstance(reply, OSError) and reply.errno == errno.EAGAIN, repr(reply)
    assert "cannot start a thread to reopen files" in str(reply)
    assert int((pids_cgroup / "pids.current").read_text()) <= current
    assert server.proc.poll() is None and os.path.exists(server.sock)
    assert server.stop() == 0


# -- EMFILE ------------------------------------------------------------------------------------
def test_no_descriptor_for_a_client_refuses_it_at_once_and_logs_the_burst_once(start_server, workdir):
    """Out of descriptors, the server accepts each waiting client with its spare
    descriptor and answers EMFILE with the reason, in the client's dialect, instead of
    leaving it to time out while logging 20 lines a second; it serves clients again
    once descriptors are free."""
    server = start_server()
    server.wait_log("Client 0 disconnected\n")  # start_server's probe: its socket is closed
    path = str(workdir / "app.log")
    fds = open_fds(server.pid)
    free = [n for n in range(max(fds) + 8) if n not in fds]
    limit = free[2] + 1  # three descriptors left: two held clients of one file take them
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (limit, limit))

    held = open_while_stopped(server, [P.Open(path, 0), P.Open(path, 0)])
    assert [answer(*pair) for pair in held] == ["opened", "opened"]
    refused = open_while_stopped(server, [P.Open(path, 0)] * 20 + [P.OpenPath(path)])
    for sock, conn in refused:
        error = answer(sock, conn)
        sock.close()
        assert isinstance(error, OSError) and error.errno == errno.EMFILE, repr(error)
        assert "no file descriptor left for this client" in str(error)

    for sock, _ in held:
        end_session(sock)
    with offlog.ProxyFile(path, server.sock, shm=False) as f:
        f.write(b"served again\n")
    assert (workdir / "app.log").read_bytes() == b"served again\n"

    assert server.stop() == 0
    output = server.output()
    assert output.count("Turning clients away") == 1, output
    assert "Clients turned away: 21 x refused a client: Too many open files" in output


# -- the server's own log: stalled, full, gone ---------------------------------------------------
def test_a_server_whose_stdout_and_stderr_nobody_reads_serves_every_client(procs, workdir):
    """Its log lines fill the pipes (a 64 KiB buffer each) long before the last client:
    logging never waits for them, so no handshake does (before: every new handshake
    froze after about 130 connections). The -l file has every line; SIGTERM still
    stops the server."""
    sock, logfile = str(workdir / "offlog.sock"), workdir / "server.log"
    server = procs.start(
        [sys.executable, "-m", "offlog", "-s", sock, "-l", str(logfile)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=str(REPO),
        env=child_env(),
    )
    wait_for(lambda: socket_answers(sock) or server.poll() is not None, what="server socket")
    clients = 600
    for i in range(clients):
        with offlog.ProxyFile(str(workdir / "app.log"), sock, shm=False, timeout=60_000) as f:
            f.write(b"%d\n" % i)
    assert (workdir / "app.log").read_bytes() == b"".join(b"%d\n" % i for i in range(clients))
    last = f"Client {clients} disconnected\n".encode()  # client 0 was the socket_answers probe
    log = wait_for(lambda: last in logfile.read_bytes() and logfile.read_bytes(), what="the last client's line")
    assert len(log) > 2 * 64 * 1024, "the test should have logged more than the pipe holds"
    server.send_signal(signal.SIGTERM)
    assert server.wait(60) == 0


@pytest.mark.parametrize("sink", ["dev-full", "fifo-nobody-reads"])
def test_a_server_whose_log_file_is_full_or_stalled_serves_clients_and_leaks_nothing(start_server, workdir, sink):
    """-l on a device that is always full (every write ENOSPC), or on a FIFO whose
    reader never reads: clients are served, and each leaves no descriptor behind
    (before: /dev/full killed the server at its first line; a disk that filled up
    timed clients out and leaked a descriptor per attempt)."""
    reader = -1
    if sink == "dev-full":
        logfile = "/dev/full"
    else:
        logfile = str(workdir / "server.fifo")
        os.mkfifo(logfile)
        reader = os.open(logfile, os.O_RDONLY | os.O_NONBLOCK)  # there, never read
    try:
        server = start_server("-l", logfile)
        path = str(workdir / "app.log")
        with offlog.ProxyFile(path, server.sock, shm=False) as f:
            f.write(b"warm-up\n")
        server.wait_log("Client 1 disconnected\n")  # client 0 was start_server's probe
        server.wait_log(f"Closed {path}\n")  # the writers close the file after its last client
        baseline = open_fds(server.pid)
        for i in range(300):
            with offlog.ProxyFile(path, server.sock, shm=False, timeout=60_000) as f:
                f.write(b"%d\n" % i)
        server.wait_log("Client 301 disconnected\n")
        wait_for(lambda: open_fds(server.pid) == baseline, what="the server's descriptors back to the baseline")
        assert (workdir / "app.log").read_bytes() == b"warm-up\n" + b"".join(b"%d\n" % i for i in range(300))
        if sink == "dev-full":
            server.wait_log("Cannot write the log to /dev/full: [Errno 28] No space left on device")
        assert server.stop() == 0
    finally:
        if reader >= 0:
            os.close(reader)


def test_a_line_sink_never_blocks_counts_what_it_loses_and_says_so_later():
    """A sink on a pipe nobody reads takes every line at once; what does not fit its
    queue is counted, and once the pipe is read the next line says how many were lost."""
    r, w = os.pipe()
    sink = LineSink("test", max_bytes=4096)
    output = sink.output(w, "the pipe")
    line = b"[2026-01-01 00:00:00.000 test INFO] " + b"x" * 100 + b"\n"
    done = threading.Event()

    def flood() -> None:
        for i in range(2000):  # 274 KB: four times the pipe, sixty times the queue
            output.write(line.replace(b"x" * 10, b"%010d" % i, 1))
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    assert done.wait(60), "writing to a sink waited for its output"
    assert sink.lost > 0
    received = b""
    while b"log lines lost" not in received:
        output.write(line)
        received += os.read(r, 1 << 20)
    sink.close()
    os.close(r)
    os.close(w)
    assert re.search(rb"test WARNING\] (\d+) log lines lost: the pipe is not taking lines", received)


@pytest.mark.parametrize("trouble", ["EPIPE", "EBADF"])
def test_a_line_sink_survives_an_output_that_fails_and_tells_the_others(trouble):
    """Writes failing with EPIPE (the reader left) or EBADF (descriptor closed) cost
    the caller nothing and raise nothing; the trouble is reported once, to the callback
    that writes to another output, and the lines are counted."""
    if trouble == "EPIPE":
        r, w = os.pipe()
        os.close(r)
    else:
        w = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1  # a number nothing here opens
        with pytest.raises(OSError):
            os.fstat(w)
    told: List[str] = []
    sink = LineSink("test", on_trouble=told.append)
    output = sink.output(w, "the pipe")
    for i in range(100):
        output.write(b"[2026-01-01 00:00:00.000 test INFO] line %d\n" % i)
    wait_for(lambda: sink.lost == 100, what="every line counted as lost")
    sink.close()
    if trouble == "EPIPE":
        os.close(w)
    assert len(told) == 1 and told[0].startswith("Cannot write the log to the pipe: [Errno")


def test_a_line_sink_writes_a_burst_of_one_line_a_few_times_then_its_count():
    """1,000 equal lines (their timestamps aside): the first few are written, the rest
    become one line with their count."""
    r, w = os.pipe()
    sink = LineSink("test")
    output = sink.output(w, "the pipe")
    for i in range(1000):
        output.write(b"[2026-01-01 00:00:%02d.%03d test WARNING] Could not accept a client\n" % (i // 1000, i % 1000))
    output.write(b"[2026-01-01 00:00:01.000 test INFO] something else\n")
    sink.close()
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        lines = pipe.read().splitlines()
    assert len(lines) == REPEATS_WRITTEN + 2
    assert lines[REPEATS_WRITTEN].endswith(b"Could not accept a client (repeated %d times)" % (1000 - REPEATS_WRITTEN))
    assert lines[-1].endswith(b"something else")
