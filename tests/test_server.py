"""The server as a process: CLI, life cycle, notify, rotation, head-of-line, bad input."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from support import (
    REPO,
    ServerProcess,
    client_script,
    dev_shm_in_use,
    ring_mappings,
    shm_objects,
    socket_answers,
    wait_for,
)

import offlog
from offlog import protocol as P


def raw_connect(sock_path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(sock_path)
    return s


def read_until_nul(s: socket.socket) -> bytes:
    data = b""
    while b"\0" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


# -- CLI and life cycle -------------------------------------------------------
def test_help_lists_the_spec_options():
    out = subprocess.run(
        [sys.executable, "-m", "offlog", "-h"], capture_output=True, text=True, cwd=str(REPO), check=True
    ).stdout
    for option in ("-n, --notify", "-s SOCKET_FILE, --socket-file SOCKET_FILE", "-l LOGFILE, --logfile LOGFILE"):
        assert option in out
    assert "--shm" in out and "--ring-size" in out


def test_console_script_is_python_dash_m_offlog():
    script = os.path.join(os.path.dirname(sys.executable), "offlog")
    if not os.path.exists(script):
        pytest.fail(f"the console script is not installed next to {sys.executable}: pip install -e .")
    as_script = subprocess.run([script, "-h"], capture_output=True, text=True, check=True).stdout
    as_module = subprocess.run(
        [sys.executable, "-m", "offlog", "-h"], capture_output=True, text=True, cwd=str(REPO), check=True
    ).stdout
    assert as_script == as_module


def test_startup_lines_and_own_logfile(start_server, workdir):
    logfile = workdir / "server.log"
    server = start_server("-l", str(logfile))
    for text in ("offlog INFO] This is offlog server", f"offlog INFO] Listening on socket {server.sock}"):
        server.wait_log(text)
        wait_for(lambda text=text: text in logfile.read_text(), what=f"{text!r} in the -l file")


CLIENT_STACK = ("offlog.client", "offlog.transports", "offlog.logger", "offlog.handler")


def test_the_server_and_its_logging_load_no_client_code(procs, workdir):
    """Importing the server and its command line (what ``python -m offlog`` runs)
    and logging as it does (a LineLogger on a local file) loads none of the client
    stack, whose import registers atexit and at-fork hooks."""
    code = f"""
        import sys
        import offlog.__main__
        import offlog.server
        from offlog.loglines import LineLogger

        log = LineLogger("offlog", open({str(workdir / "server.log")!r}, "ab", buffering=0))
        log.info("logged without the client")
        log.close()
        print(sorted(name for name in {CLIENT_STACK!r} if name in sys.modules))
    """
    proc = client_script(procs, workdir, code)
    assert proc.returncode == 0, proc.stderr_text
    logged, loaded = proc.stdout_text.splitlines()
    assert loaded == "[]"
    assert logged.endswith(" offlog INFO] logged without the client")
    assert (workdir / "server.log").read_text() == logged + "\n"


def test_sigterm_writes_everything_and_tells_the_client(server, workdir):
    target = workdir / "app.log"
    f = offlog.ProxyFile(str(target), server.sock, shm=False, reconnect=False)
    f.write(b"before stop\n")
    f.sync()
    assert server.stop() == 0
    assert not os.path.exists(server.sock), "the socket file must be removed"
    assert target.read_bytes() == b"before stop\n"
    with pytest.raises(OSError, match="offlog server exited"):
        for _ in range(100):  # the next write (or close) reports it
            f.write(b"after stop\n")
            time.sleep(0.01)
        f.close()
    assert "Exit" in server.output()


def test_sigint_is_a_graceful_stop_too(server):
    server.signal(signal.SIGINT)
    assert server.proc.wait(30) == 0
    assert not os.path.exists(server.sock)


def test_refuses_to_start_when_a_live_server_answers(server, procs, workdir):
    second = ServerProcess(procs, workdir, sock=server.sock).start(wait=False)
    assert second.proc.wait(30) == 1
    assert "another offlog server is already listening" in second.output()
    assert socket_answers(server.sock), "the first server must keep its socket"


def test_replaces_a_stale_socket_file(procs, workdir):
    path = str(workdir / "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    server = ServerProcess(procs, workdir, sock=path).start()
    assert socket_answers(path)
    server.stop()


def test_refuses_to_replace_a_file_that_is_not_a_socket(procs, workdir):
    path = workdir / "not-a-socket"
    path.write_text("precious")
    server = ServerProcess(procs, workdir, sock=str(path)).start(wait=False)
    assert server.proc.wait(30) == 1
    assert path.read_text() == "precious"


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_sends_ready_datagram(procs, workdir, abstract):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"offlog-test-notify-{os.getpid()}-{time.monotonic_ns()}"
        listener.bind("\0" + name)
        address = "@" + name
    else:
        address = str(workdir / "notify.sock")
        listener.bind(address)
    listener.settimeout(20)
    try:
        server = ServerProcess(procs, workdir, "--notify", env={"NOTIFY_SOCKET": address}).start(wait=False)
        message = listener.recv(4096)
        assert message == b"READY=1"
        assert socket_answers(server.sock), "READY must come after the socket is listening"
        server.stop()
    finally:
        listener.close()


# -- rotation -----------------------------------------------------------------
@pytest.mark.parametrize("how", ["rename", "delete"])
def test_rotation_is_noticed_and_the_path_reopened(server, workdir, how):
    target = workdir / "app.log"
    f = offlog.ProxyFile(str(target), server.sock)
    f.write(b"one\n")
    f.sync()
    if how == "rename":
        target.rename(workdir / "app.log.1")
    else:
        target.unlink()
    server.wait_log(f"Reopened {target}")
    wait_for(target.exists, what="the server to recreate the file")
    f.write(b"two\n")
    f.close()
    assert target.read_bytes() == b"two\n"
    if how == "rename":
        assert (workdir / "app.log.1").read_bytes() == b"one\n"


def test_sighup_reopens_every_file(server, workdir):
    files = [offlog.ProxyFile(str(workdir / f"f{i}.log"), server.sock) for i in range(3)]
    for i, f in enumerate(files):
        f.write(b"old\n")
        f.sync()
        os.rename(workdir / f"f{i}.log", workdir / f"f{i}.log.1")
    server.signal(signal.SIGHUP)
    server.wait_log("reopening all files")
    for i in range(3):
        wait_for((workdir / f"f{i}.log").exists, what="reopen after SIGHUP")
    for f in files:
        f.write(b"new\n")
        f.close()
    for i in range(3):
        assert (workdir / f"f{i}.log.1").read_bytes() == b"old\n"
        assert (workdir / f"f{i}.log").read_bytes() == b"new\n"


# -- no head-of-line blocking ---------------------------------------------------
def test_a_stalled_file_delays_no_other_client(transport_server, workdir):
    """One client's file is a FIFO drained at 4 KiB/s; another client's open,
    writes and sync complete while the first is still stalled."""
    fifo = workdir / "slow.fifo"
    os.mkfifo(fifo)
    drained = []
    stop = threading.Event()

    def slow_reader():
        with open(fifo, "rb", buffering=0) as r:
            while not stop.is_set():
                chunk = r.read(4096)
                if not chunk:
                    return
                drained.append(len(chunk))
                time.sleep(1.0)

    reader = threading.Thread(target=slow_reader, daemon=True)
    reader.start()
    stalled = offlog.ProxyFile(str(fifo), transport_server.sock)
    stalled_bytes = 4 * 1024 * 1024
    for _ in range(stalled_bytes // 65536):
        stalled.write(b"s" * 65536)
    try:
        t0 = time.monotonic()
        other = offlog.ProxyFile(str(workdir / "fast.log"), transport_server.sock)
        for i in range(1000):
            other.write(b"fast %d\n" % i)
        other.sync()
        elapsed = time.monotonic() - t0
        other.close()
        assert (workdir / "fast.log").read_bytes() == b"".join(b"fast %d\n" % i for i in range(1000))
        assert sum(drained) < stalled_bytes, "the FIFO must still be stalled while the other client finished"
        assert elapsed < 5.0, f"another client's open+flush took {elapsed:.2f} s behind a stalled file"
    finally:
        stop.set()
        # Unblock the server: drain the FIFO so the stalled session can finish.
        drainer = threading.Thread(target=lambda: open(fifo, "rb").read(), daemon=True)
        drainer.start()
        stalled.close()
        reader.join(5)


# -- bad input: a clear error for the offender, nobody else notices -------------
@pytest.fixture
def bystander(server, workdir):
    """A client writing before and after each bad-input case: it must lose nothing."""
    f = offlog.ProxyFile(str(workdir / "bystander.log"), server.sock)
    f.write(b"before\n")
    yield f
    f.write(b"after\n")
    f.close()
    assert (workdir / "bystander.log").read_bytes() == b"before\nafter\n"
    assert server.proc.poll() is None


@pytest.mark.parametrize(
    "path, exc_type",
    [
        ("relative/path.log", ValueError),
        ("/tmp/" + "x" * 5000, ValueError),
        ("/offlog-no-such-dir/x.log", FileNotFoundError),
        ("/tmp", IsADirectoryError),
    ],
    ids=["relative", "too-long", "missing-dir", "directory"],
)
def test_bad_path_gets_the_matching_exception_over_the_wire(server, bystander, path, exc_type):
    with raw_connect(server.sock) as s:
        s.sendall(path.encode() + b"\0")
        reply = read_until_nul(s)
    name, _, message = reply.rstrip(b"\0").decode().partition(": ")
    assert name == exc_type.__name__ and message


@pytest.mark.parametrize(
    "path, exc_type",
    [
        ("/offlog-no-such-dir/x.log", FileNotFoundError),
        ("/tmp", IsADirectoryError),
        ("/tmp/" + "x" * 5000, ValueError),
        ("/tmp/nul\0byte", ValueError),
    ],
    ids=["missing-dir", "directory", "too-long", "embedded-nul"],
)
def test_bad_path_raises_in_the_client(server, bystander, path, exc_type):
    with pytest.raises(exc_type):
        offlog.ProxyFile(path, server.sock)


def test_no_permission_raises_permission_error(server, bystander, workdir):
    target = workdir / "readonly.log"
    target.write_bytes(b"")
    if os.geteuid() == 0:  # root ignores modes: make the file immutable instead
        subprocess.run(["chattr", "+i", str(target)], check=True)
    else:
        target.chmod(0o444)
    try:
        with pytest.raises(PermissionError):
            offlog.ProxyFile(str(target), server.sock)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(target)], check=True)
    server.wait_log("access denied")


def test_garbage_instead_of_a_path(server, bystander):
    with raw_connect(server.sock) as s:
        s.sendall(os.urandom(64).replace(b"\0", b"\1").replace(b"/", b"!") + b"\0")
        assert read_until_nul(s).startswith(b"ValueError: ")


def test_garbage_frames_after_the_preamble(server, bystander):
    with raw_connect(server.sock) as s:
        s.sendall(P.CLIENT_PREAMBLE + b"\xff" * 64)
        reply = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(P.SERVER_PREAMBLE)
    frames = P.FrameReader(P.SERVER_FRAMES).feed(reply[len(P.SERVER_PREAMBLE) :])
    assert frames[-1].type == P.ERROR
    assert isinstance(P.decode_error(frames[-1].payload), ValueError)


def test_silent_client_and_mid_handshake_disconnect(server, bystander, workdir):
    silent = raw_connect(server.sock)  # connects and says nothing
    half = raw_connect(server.sock)
    half.sendall(b"/tmp/half-a-pa")
    half.close()  # disconnects mid-handshake
    try:
        other = offlog.ProxyFile(str(workdir / "other.log"), server.sock)
        other.write(b"served\n")
        other.close()
        assert (workdir / "other.log").read_bytes() == b"served\n"
        server.wait_log("disconnected during the handshake")
    finally:
        silent.close()


def test_a_thousand_connections_at_once(server, bystander, workdir):
    conns = []
    try:
        for _ in range(1000):
            conns.append(raw_connect(server.sock))
        for i, s in enumerate(conns):
            s.sendall(str(workdir / f"many-{i % 10}.log").encode() + b"\0")
        for s in conns:
            assert read_until_nul(s) == b"OK\0"
        for i, s in enumerate(conns):
            s.sendall(b"%d\n" % i)
            s.shutdown(socket.SHUT_WR)
        for s in conns:
            assert read_until_nul(s) == b"BYE\0"
    finally:
        for s in conns:
            s.close()
    lines = set()
    for j in range(10):
        lines.update((workdir / f"many-{j}.log").read_bytes().split())
    assert lines == {b"%d" % i for i in range(1000)}


@pytest.mark.parametrize("shm", [False, True], ids=["socket", "shm"])
def test_write_error_reaches_the_client_with_its_errno(start_server, workdir, shm):
    """/dev/full fails every write with ENOSPC: the writer learns it, the server carries on."""
    server = start_server("--shm")
    f = offlog.ProxyFile("/dev/full", server.sock, shm=shm)
    with pytest.raises(OSError) as info:
        for _ in range(200):
            f.write(b"x" * 100)
            time.sleep(0.01)
        f.close()
    assert info.value.errno == 28  # ENOSPC
    server.wait_log("Failed to write to /dev/full")
    ok = offlog.ProxyFile(str(workdir / "fine.log"), server.sock, shm=shm)
    ok.write(b"still served\n")
    ok.close()
    assert (workdir / "fine.log").read_bytes() == b"still served\n"


def test_server_log_names_each_client_pid_and_uid(server, workdir):
    f = offlog.ProxyFile(str(workdir / "a.log"), server.sock)
    f.close()
    server.wait_log(f"(pid {os.getpid()}, uid {os.getuid()})")


def test_a_server_killed_mid_offer_leaves_nothing_in_dev_shm(start_server, workdir):
    """A ring has no name: a server killed between its offer and the client's answer
    leaves nothing behind in /dev/shm (and nothing for the next server to sweep)."""
    server = start_server("--shm")
    with raw_connect(server.sock) as s:  # asks for a ring and never answers the offer
        s.sendall(P.CLIENT_PREAMBLE + P.encode_open(str(workdir / "x.log"), P.WANT_SHM))
        wait_for(lambda: ring_mappings(server.pid) == 1, what="the offered ring")
        assert dev_shm_in_use(server.pid) == set()
        server.kill()
    assert shm_objects([server.pid]) == set()


def test_status_answers_while_ring_sessions_come_and_go(shm_server, workdir):
    """A status query reads every ring session's header; one that races a session
    closing its ring still answers (a closed ring reports an empty backlog)."""
    from offlog.client import server_status

    stop = threading.Event()
    cycles = []

    def churn() -> None:
        while not stop.is_set():
            f = offlog.ProxyFile(str(workdir / "churn.log"), shm_server.sock, shm=True)
            f.write(b"x" * 100 + b"\n")
            f.close()
            cycles.append(1)

    churner = threading.Thread(target=churn)
    churner.start()
    answers, saw_rings = 0, 0
    try:
        while (answers < 300 or saw_rings < 20) and answers < 20_000:
            answer = server_status(shm_server.sock, 30_000)  # raises if the server could not answer
            answers += 1
            saw_rings += any(client["transport"] == "shm" for client in answer["clients"])
    finally:
        stop.set()
        churner.join(60)
    assert not churner.is_alive()
    assert saw_rings >= 20, "the queries never met ring sessions: the race was not exercised"
    assert (workdir / "churn.log").read_bytes() == (b"x" * 100 + b"\n") * len(cycles)


def test_a_stop_answers_a_frame_cut_off_by_it_with_the_shutdown_error(server, workdir):
    """A stop shuts every session's read side: a client caught half-way through a
    frame is told the server exited (errno ESHUTDOWN), not that it broke the protocol,
    and the whole frames before the cut one are written."""
    target = workdir / "cut.log"
    with raw_connect(server.sock) as s:
        client = P.ClientConnection()
        s.sendall(client.send(P.Open(str(target))))
        events = []
        while len(events) < 2:
            client.receive_data(s.recv(4096))
            while (event := client.next_event()) is not P.NEED_DATA:
                events.append(event)
        assert [type(event) for event in events] == [P.Greeting, P.Opened]
        s.sendall(client.send(P.Data(memoryview(b"whole\n"))) + client.send(P.Data(memoryview(b"cut off\n")))[:-3])
        server.wait_log(f"opened {target}")
        assert server.stop() == 0
        client.receive_data(b"".join(iter(lambda: s.recv(4096), b"")))
        client.receive_data(b"")
        reply = list(iter(client.next_event, P.PAUSED))
    assert [type(event) for event in reply] == [P.Written, P.Error, P.Closed], reply
    assert reply[0].position == len(b"whole\n")  # confirmed: the client need not send it again
    assert reply[1].exception.errno == errno.ESHUTDOWN and "offlog server exited" in str(reply[1].exception)
    assert target.read_bytes() == b"whole\n"
    server.wait_log("cut off in the middle of a frame: 10 bytes discarded")
