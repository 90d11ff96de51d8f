"""The client's odd corners: big descriptors, full backlogs, garbage collection, exit,
close() racing writes, closed files, flush() versus sync(), and the errors of a missing server."""

from __future__ import annotations

import signal
import socket
import subprocess

import pytest
from driver import Driver, proxy_file, run_script
from records import TESTS, assert_exactly_once, assert_whole_lines_at_least_once, keys, record

import offlog

PREAMBLE = f"""
import json, os, sys, threading, time
sys.path.insert(0, {TESTS!r})
from records import record
import offlog
"""


def run(procs, workdir, code: str, what: str) -> object:
    return run_script(procs, workdir, PREAMBLE + code, what)


def test_descriptors_above_1024(transport_server, workdir, procs):
    """Every descriptor below 1100 is taken: the ProxyFile's own are above select()'s limit."""
    target = workdir / "highfd.log"
    shm = transport_server.transport == "shm"
    code = f"""
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if hard != resource.RLIM_INFINITY and hard < 4096:
    sys.exit(f"the hard RLIMIT_NOFILE is {{hard}}: descriptors above 1024 cannot be had")
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
held = [os.open("/dev/null", os.O_RDONLY)]
while held[-1] < 1100:
    held.append(os.open("/dev/null", os.O_RDONLY))
f = offlog.ProxyFile({str(target)!r}, {transport_server.sock!r}, shm={shm!r})
for n in range(100):
    f.write(record("F", n))
f.sync()
f.close()
print(json.dumps(held[-1]))
"""
    assert run(procs, workdir, code, "a ProxyFile with descriptors above 1024") >= 1100
    assert target.read_bytes() == b"".join(record("F", n) for n in range(100))


def test_full_listen_backlog_waits_up_to_the_timeout(workdir, procs):
    """A listener that never accepts, its backlog full: the open waits (timeout=300 ms) and
    raises TimeoutError, rather than failing at once with EAGAIN."""
    path = str(workdir / "full.sock")
    code = f"""
import socket
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind({path!r})
listener.listen(0)
fillers, full = [], False
while not full and len(fillers) < 1000:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect({path!r})
        fillers.append(s)
    except BlockingIOError:
        s.close()
        full = True
t0 = time.monotonic()
try:
    offlog.ProxyFile({str(workdir / "never.log")!r}, {path!r}, timeout=300)
    error = None
except Exception as exc:
    error = type(exc).__name__ + ": " + str(exc)
print(json.dumps({{"full": full, "error": error, "elapsed": time.monotonic() - t0}}))
"""
    result = run(procs, workdir, code, "an open against a full listen backlog")
    assert result["full"], "precondition: the listen backlog filled up"
    assert result["error"] and result["error"].startswith("TimeoutError"), result["error"]
    assert result["elapsed"] >= 0.25, f"gave up after {result['elapsed']:.3f} s instead of waiting 300 ms"


def test_unclosed_ring_proxyfile_is_garbage_collected(transport_server, workdir, procs):
    """A ProxyFile nobody closed and nobody references any more is collected; collecting it
    closes it: its records are delivered and the server sees the client leave."""
    target = workdir / "collected.log"
    shm = transport_server.transport == "shm"
    client = Driver(procs, workdir, "import gc, weakref")
    collected = client.run(
        proxy_file(target, transport_server.sock, shm=shm)
        + f"""
assert f.transport == {transport_server.transport!r}
for n in range(100):
    f.write(record("G", n))
ref = weakref.ref(f)
del f
gc.collect()
result = ref() is None
"""
    )
    assert collected, "the unreferenced ProxyFile is still alive after gc.collect()"
    transport_server.wait_log("Client 1 disconnected")  # while the client process lives on (0: the probe)
    assert_exactly_once(target.read_bytes(), keys("G", range(100)))
    assert client.finish() == 0


def test_daemon_threads_writing_at_exit_lose_nothing(transport_server, workdir, procs):
    """Daemon threads write while the main thread returns; a write() that returned (then logged
    to a side file with an unbuffered os.write) is in the offlog file. Five trials, with a GIL
    switch interval of a microsecond so that threads are preempted all over write() and close()."""
    shm = transport_server.transport == "shm"
    for trial in range(5):
        target, side = workdir / f"daemon-{trial}.log", workdir / f"daemon-{trial}.side"
        code = f"""
f = offlog.ProxyFile({str(target)!r}, {transport_server.sock!r}, shm={shm!r})
side = os.open({str(side)!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

def writer(t):
    n = 0
    while True:
        try:
            f.write(record("D%d" % t, n, n % 3 * 20000))
        except ValueError:  # closed at exit
            return
        os.write(side, b"D%d %d\\n" % (t, n))
        n += 1

sys.setswitchinterval(1e-6)
for t in range(8):
    threading.Thread(target=writer, args=(t,), daemon=True).start()
deadline = time.monotonic() + 10
while os.fstat(side).st_size < 50000 and time.monotonic() < deadline:
    time.sleep(0.001)
print(json.dumps(os.fstat(side).st_size))
"""
        run(procs, workdir, code, "interpreter exit with daemon threads writing")
        logged = set()
        for line in side.read_bytes().splitlines():
            tag, n = line.split()
            logged.add((tag.decode(), int(n)))
        assert logged, "precondition: the threads wrote"
        data = target.read_bytes()
        written = set().union(*(keys(f"D{t}", range(max(n for tag, n in logged) + 2)) for t in range(8)))
        try:
            assert_whole_lines_at_least_once(data, logged, written)
        except AssertionError as exc:
            raise AssertionError(f"trial {trial}: {exc}") from None


def test_write_racing_close_raises_value_error(transport_server, workdir, procs):
    """Eight threads write while the main thread closes: each write returns (and its record is
    delivered) or raises ValueError; nothing else, no thread stuck. Five trials, with a GIL
    switch interval of a microsecond so that threads are preempted all over write() and close()."""
    shm = transport_server.transport == "shm"
    for trial in range(5):
        target = workdir / f"race-{trial}.log"
        code = f"""
f = offlog.ProxyFile({str(target)!r}, {transport_server.sock!r}, shm={shm!r})
accepted = {{t: [] for t in range(8)}}
other = []

def writer(t):
    n = 0
    while True:
        try:
            f.write(record("W%d" % t, n, n % 3 * 20000))
        except ValueError:
            return
        except BaseException as exc:
            other.append(repr(exc))
            return
        accepted[t].append(n)
        n += 1

sys.setswitchinterval(1e-6)
threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
for th in threads:
    th.start()
deadline = time.monotonic() + 10
while min(len(a) for a in accepted.values()) < 300 and time.monotonic() < deadline:
    time.sleep(0.001)
f.close()
for th in threads:
    th.join(10)
print(json.dumps({{"accepted": accepted, "other": other, "stuck": sum(th.is_alive() for th in threads)}}))
"""
        result = run(procs, workdir, code, "close() racing writes")
        assert not result["other"], f"trial {trial}: writes racing close() raised {result['other'][:5]}"
        assert result["stuck"] == 0, f"trial {trial}: {result['stuck']} writer threads never returned"
        accepted = set().union(*(keys(f"W{t}", ns) for t, ns in result["accepted"].items()))
        written = set().union(*(keys(f"W{t}", range(len(ns) + 1)) for t, ns in result["accepted"].items()))
        try:
            assert_whole_lines_at_least_once(target.read_bytes(), accepted, written)
        except AssertionError as exc:
            raise AssertionError(f"trial {trial}: {exc}") from None


def test_a_write_racing_a_failed_close_raises_value_error(start_server, workdir, procs):
    """The server is lost for good and close() times out: a write through a ``write`` bound
    before (a thread that raced the close) raises ValueError, never vanishes into a backlog."""
    server = start_server("--shm")
    target = workdir / "failedclose.log"
    code = f"""
import signal
f = offlog.ProxyFile({str(target)!r}, {server.sock!r}, timeout=300)
write = f.write
write(record("A", 0))
f.sync()
os.kill({server.pid}, signal.SIGKILL)
time.sleep(0.3)
write(record("A", 1))  # accepted into the reconnect's backlog
try:
    f.close()
    outcome = "closed"
except TimeoutError:
    outcome = "timeout"
try:
    write(record("A", 2))
    late = "accepted"
except ValueError:
    late = "ValueError"
print(json.dumps([outcome, late, f.closed, f.transport, f.backlog > 0]))
"""
    result = run(procs, workdir, code, "a close() without a server hung")
    assert result == ["timeout", "ValueError", True, "closed", True]


def test_closed_proxyfile_answers(transport_server, workdir):
    f = offlog.ProxyFile(str(workdir / "closed.log"), transport_server.sock)
    f.write(b"one\n")
    f.close()
    assert f.closed is True
    assert f.transport == "closed"
    assert f.backlog == 0
    assert isinstance(f.dropped, int)
    with pytest.raises(ValueError):
        f.write(b"late\n")
    with pytest.raises(ValueError):
        f.flush()
    with pytest.raises(ValueError):
        f.sync()
    f.close()
    assert (workdir / "closed.log").read_bytes() == b"one\n"


def test_flush_never_waits_for_a_stalled_server(transport_server, workdir, procs):
    """With the server stopped, flush() hands over what it can and returns; sync() is the call
    that waits, and it raises TimeoutError after its timeout. (The ProxyFile's own timeout is
    60 s, so a flush() that waited for the server would overrun the step's 20 s.)"""
    server = transport_server
    target = workdir / "stalled.log"
    client = Driver(procs, workdir, proxy_file(target, server.sock, shm=server.transport == "shm", timeout=60000))
    client.write("A", 0, 10)
    server.signal(signal.SIGSTOP)
    try:
        client.write("B", 0, 300, 1000)
        flushed = client.attempt("result = f.flush()", timeout=20)
        synced = client.attempt("f.sync(timeout=300)", timeout=20)
    finally:
        server.signal(signal.SIGCONT)
    assert flushed["ok"], f"flush() raised {flushed['error']}: {flushed['message']}"
    assert flushed["result"] is None
    assert not synced["ok"] and synced["error"] == "TimeoutError", f"sync(timeout=300) answered {synced}"
    client.run("f.close()")
    assert_exactly_once(target.read_bytes(), keys("A", range(10)) | keys("B", range(300)))


def test_stream_handler_and_print_do_not_block_on_a_stalled_server(transport_server, workdir, procs):
    """logging.StreamHandler and print(flush=True) call flush() after every record: with the
    server stopped, 200 records of each still return; after SIGCONT close() delivers them all."""
    server = transport_server
    target = workdir / "stream.log"
    client = Driver(procs, workdir, proxy_file(target, server.sock, shm=server.transport == "shm", timeout=60000))
    client.run("""
        import logging
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log = logging.getLogger("stream")
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    """)
    server.signal(signal.SIGSTOP)
    try:
        client.run(
            """
            for n in range(200):
                log.info(record("S", n, 1000).decode().rstrip("\\n"))
                print(record("P", n, 1000).decode().rstrip("\\n"), file=f, flush=True)
            """,
            timeout=20,
        )
    finally:
        server.signal(signal.SIGCONT)
    client.run("f.close()")
    assert "Logging error" not in client.stderr_path.read_text(), client.stderr_path.read_text()
    assert_exactly_once(target.read_bytes(), keys("S", range(200)) | keys("P", range(200)))


def test_sync_is_the_barrier(transport_server, workdir):
    """After sync() returns, every record written before it is in the file."""
    target = workdir / "barrier.log"
    f = offlog.ProxyFile(str(target), transport_server.sock, shm=transport_server.transport == "shm")
    try:
        expected = b""
        for round_ in range(3):
            for n in range(round_ * 3000, round_ * 3000 + 3000):
                data = record("B", n, n % 5 * 100)
                f.write(data)
                expected += data
            if round_ == 2:
                f.sync(timeout=None)  # no deadline at all
            else:
                f.sync()
            assert target.read_bytes() == expected, f"round {round_}: sync() returned before the file had it all"
    finally:
        f.close()


def test_missing_server_error_names_the_socket(workdir):
    path = str(workdir / "nobody.sock")
    with pytest.raises(FileNotFoundError) as caught:
        offlog.ProxyFile(str(workdir / "x.log"), path)
    assert path in str(caught.value) and "python -m offlog" in str(caught.value), str(caught.value)


def test_stale_socket_error_names_the_socket(workdir):
    path = str(workdir / "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # the file of a server that is lost: nobody listens
    stale.close()
    with pytest.raises(ConnectionRefusedError) as caught:
        offlog.ProxyFile(str(workdir / "x.log"), path)
    assert path in str(caught.value) and "python -m offlog" in str(caught.value), str(caught.value)


def test_exit_with_nothing_pending_after_the_server_vanished_is_quiet(transport_server, workdir, procs):
    """Everything synced, then the server is killed: the client's exit costs no wait for the
    lost server (bounded here at 10 s, generously) and prints nothing on stderr."""
    server = transport_server
    target = workdir / "quiet.log"
    client = Driver(procs, workdir, proxy_file(target, server.sock, shm=server.transport == "shm", timeout=60000))
    client.write("Q", 0, 10)
    client.run("f.sync()")
    server.kill()
    try:
        status = client.finish(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("the client's exit waited more than 10 s for a server that is lost")
    assert status == 0
    assert client.stderr_path.read_text() == ""
    assert_exactly_once(target.read_bytes(), keys("Q", range(10)))
