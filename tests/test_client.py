"""ProxyFile and Logger against a real server: API, order, whole writes, timeouts, exit."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time

import pytest
from support import ServerProcess, child_env, client_script

import offlog


def numbered(i: int) -> bytes:
    return b"record %08d %s\n" % (i, b"x" * (i % 97))


# -- the API of the spec ----------------------------------------------------------
def test_round_trip_of_bytes_str_and_buffers(transport_server, workdir):
    target = workdir / "out.log"
    f = offlog.ProxyFile(str(target), transport_server.sock)
    assert f.transport == transport_server.transport
    f.write(b"bytes\n")
    f.write("str \N{SNOWMAN}\n")
    f.write(bytearray(b"bytearray\n"))
    f.write(memoryview(b"..memoryview\n")[2:])
    f.write(b"")
    f.close()
    assert target.read_bytes() == "bytes\nstr \N{SNOWMAN}\nbytearray\nmemoryview\n".encode()


def test_file_proxy_is_the_same_class_and_levels_are_exported():
    assert offlog.FileProxy is offlog.ProxyFile
    assert (offlog.DEBUG, offlog.INFO, offlog.WARNING, offlog.ERROR, offlog.CRITICAL) == (10, 20, 30, 40, 50)


def test_close_is_idempotent_and_write_after_close_raises(server, workdir):
    f = offlog.ProxyFile(str(workdir / "a.log"), server.sock)
    f.close()
    f.close()
    with pytest.raises(ValueError, match="closed"):
        f.write(b"late\n")


def test_relative_path_is_made_absolute_like_0x(server, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    f = offlog.ProxyFile("relative.log", server.sock)
    f.write(b"here\n")
    f.close()
    assert (workdir / "relative.log").read_bytes() == b"here\n"


def test_sync_returns_once_the_bytes_are_in_the_file(transport_server, workdir):
    target = workdir / "flushed.log"
    f = offlog.ProxyFile(str(target), transport_server.sock, fsync=True)
    expected = b"".join(numbered(i) for i in range(5000))
    for i in range(5000):
        f.write(numbered(i))
    f.sync()
    assert target.read_bytes() == expected
    f.close()


def test_timeout_is_in_milliseconds(workdir):
    """A server that accepts nothing: the open gives up after ~timeout ms, not seconds."""
    path = str(workdir / "mute.sock")
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(path)
    mute.listen(8)  # connections queue, nobody ever answers
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            offlog.ProxyFile(str(workdir / "x.log"), path, timeout=300)
        assert time.monotonic() - t0 < 5, "300 ms must not be taken as 300 s"
    finally:
        mute.close()


def test_no_server_raises_at_open(workdir):
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
        offlog.ProxyFile(str(workdir / "x.log"), str(workdir / "nobody.sock"))


# -- order and whole writes ---------------------------------------------------------
@pytest.mark.parametrize("ring", [None, "65536"], ids=["socket", "shm"])
def test_backpressure_never_reorders(start_server, workdir, ring):
    """The server is stopped (SIGSTOP) so writes pile up locally; nothing is reordered."""
    server = start_server("--shm", "--ring-size", ring) if ring else start_server()
    target = workdir / "ordered.log"
    f = offlog.ProxyFile(str(target), server.sock, shm=bool(ring))
    server.signal(signal.SIGSTOP)
    try:
        i = 0
        while f.backlog == 0 or i < 30000:  # until writes wait in the backlog, and then some more
            f.write(numbered(i))
            i += 1
        assert f.backlog > 0
        for _ in range(1000):
            f.write(numbered(i))
            i += 1
    finally:
        server.signal(signal.SIGCONT)
    f.close()
    assert target.read_bytes() == b"".join(numbered(k) for k in range(i))


WHOLE_WRITER = """
import sys, offlog
f = offlog.ProxyFile(sys.argv[1], sys.argv[2], shm={shm})
letter = sys.argv[3].encode()
for n in range(40):
    f.write(letter * {size})
f.close()
"""


@pytest.mark.parametrize("shm", [False, True], ids=["socket", "shm"])
def test_concurrent_writes_of_64k_land_whole(shm_server, workdir, procs, shm):
    size = 64 * 1024
    target = workdir / "shared.log"
    code = WHOLE_WRITER.format(shm=shm, size=size)
    writers = [
        procs.start(
            [sys.executable, "-c", code, str(target), shm_server.sock, letter], cwd=str(workdir), env=child_env()
        )
        for letter in "abcd"
    ]
    for w in writers:
        assert w.wait(60) == 0
    data = target.read_bytes()
    assert len(data) == 4 * 40 * size
    for k in range(0, len(data), size):
        block = data[k : k + size]
        assert block == block[:1] * size, f"a 64 KiB write was interleaved at offset {k}"


def test_threads_sharing_one_proxyfile_keep_every_record_whole(transport_server, workdir):
    import threading

    target = workdir / "threads.log"
    f = offlog.ProxyFile(str(target), transport_server.sock)

    def writer(t: int) -> None:
        for i in range(5000):
            f.write(b"thread %d record %05d %s\n" % (t, i, b"y" * (i % 50)))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    f.close()
    lines = target.read_bytes().splitlines()
    assert len(lines) == 4 * 5000
    seen = {}
    for line in lines:
        m = re.fullmatch(rb"thread (\d) record (\d{5}) (y*)", line)
        assert m, f"corrupt line {line!r}"
        t, i = int(m.group(1)), int(m.group(2))
        assert len(m.group(3)) == i % 50
        assert i == seen.get(t, -1) + 1, "one thread's records must stay in its order"
        seen[t] = i


# -- exit, exceptions and fork ----------------------------------------------------------
def test_the_backlog_is_flushed_at_exit_after_an_uncaught_exception(start_server, workdir, procs):
    server = start_server()
    target = workdir / "exit.log"
    code = f"""
        import offlog
        f = offlog.ProxyFile({str(target)!r}, {server.sock!r})
        for i in range(20000):
            f.write(b"line %d\\n" % i)
        raise RuntimeError("the application crashed")
    """
    proc = client_script(procs, workdir, code)
    assert proc.returncode == 1 and "the application crashed" in proc.stderr_text
    assert target.read_bytes() == b"".join(b"line %d\n" % i for i in range(20000))


def test_forked_child_reconnects_instead_of_sharing_the_parents_connection(transport_server, workdir):
    target = workdir / "fork.log"
    f = offlog.ProxyFile(str(target), transport_server.sock)
    f.write(b"parent before fork\n")
    f.sync()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            f.write(b"child\n")
            f.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    f.write(b"parent after fork\n")
    f.close()
    lines = sorted(target.read_bytes().splitlines())
    assert lines == [b"child", b"parent after fork", b"parent before fork"]
    transport_server.wait_log(f"(pid {pid}, uid")  # the child made its own connection


# -- Logger -----------------------------------------------------------------------------
LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (?P<name>.+) (?P<level>[A-Z]+)\] (?P<msg>.*)$")


def test_logger_writes_the_spec_format_to_file_stdout_and_stderr(transport_server, workdir, procs):
    target = workdir / "myapp.log"
    code = f"""
        from offlog import Logger
        logger = Logger("my app", {str(target)!r}, offlog_socket_path={transport_server.sock!r})
        logger.debug("debug only in the file")
        logger.info("Hello world, params are %s %d", "foo", 7)
        logger.warning("careful")
        try:
            1/0
        except Exception:
            logger.exception("Got an error")
        logger.close()
        logger.close()
    """
    proc = client_script(procs, workdir, code)
    assert proc.returncode == 0, proc.stderr_text
    lines = target.read_text().splitlines()
    parsed = [LINE.match(x) for x in lines[:4]]
    assert [(m["name"], m["level"], m["msg"]) for m in parsed] == [
        ("my app", "DEBUG", "debug only in the file"),
        ("my app", "INFO", "Hello world, params are foo 7"),
        ("my app", "WARNING", "careful"),
        ("my app", "ERROR", "Got an error"),
    ]
    assert lines[4] == "Traceback (most recent call last):"
    assert lines[-1] == "ZeroDivisionError: division by zero"
    assert [LINE.match(x)["msg"] for x in proc.stdout_text.splitlines()] == ["Hello world, params are foo 7"]
    assert "careful" in proc.stderr_text and "ZeroDivisionError" in proc.stderr_text


def test_logger_local_file_and_levels(workdir, capsys):
    target = workdir / "local.log"
    logger = offlog.Logger(None, str(target), file_level=offlog.INFO, stdout_level=None, local_file=True)
    logger.debug("dropped")
    logger.info("kept %s", "here")
    logger.error("also %d%%", 100)
    logger.close()
    lines = target.read_text().splitlines()
    assert [re.sub(r"^\[[\d\- :.]+ ", "[", x) for x in lines] == ["[INFO] kept here", "[ERROR] also 100%"]
    assert capsys.readouterr().out == ""


def test_logger_millisecond_timestamps_are_zero_padded(workdir):
    logger = offlog.Logger("t", None)
    stamps = {logger.format(offlog.INFO, "m")[21:24] for _ in range(2000)}
    assert all(len(s) == 3 and s.isdigit() for s in stamps)


def test_logger_rides_out_a_server_restart(start_server, procs, workdir):
    server = start_server()
    target = workdir / "l.log"
    logger = offlog.Logger("app", str(target), stdout_level=None, offlog_socket_path=server.sock)
    logger.info("before")
    server.stop()
    for i in range(100):
        logger.info("while the server is away %d", i)
    again = ServerProcess(procs, workdir, sock=server.sock).start()
    logger.info("after")
    logger.close()
    messages = [LINE.match(x)["msg"] for x in target.read_text().splitlines()]
    assert messages == ["before"] + [f"while the server is away {i}" for i in range(100)] + ["after"]
    again.stop()


@pytest.mark.parametrize("shm", [False, True], ids=["socket", "shm"])
def test_reconnect_false_raises_when_the_server_stops(start_server, workdir, shm):
    server = start_server("--shm")
    f = offlog.ProxyFile(str(workdir / "r.log"), server.sock, shm=shm, reconnect=False)
    f.write(b"first\n")
    f.sync()
    server.stop()
    with pytest.raises(OSError, match="offlog server exited"):
        for _ in range(100):
            f.write(b"after the server is lost\n")
            time.sleep(0.01)
        f.close()
