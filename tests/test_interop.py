"""Wire compatibility with the PyPI releases offlog 0.1.0 and 0.3.1.

The 0.x packages are also named ``offlog``, so they only ever run in
subprocesses (PYTHONPATH = their install dir, cwd = the test's workdir so our
source tree cannot shadow them). Our client and Logger run in-process.
Subprocesses and the test synchronise through marker files in the workdir.

0.x clients here make at most ~100 small writes per connection. That keeps
them far from a full socket buffer (~270 small sends with wmem_default), and
so away from a bug of their own: once a write has gone to their backlog
(``_sendqueue``), their write() retries the backlog, swallows EAGAIN, then
sends the *new* bytes directly, which overtake the backlog's if the server
read in between.
"""

from __future__ import annotations

import os
import re
import signal
import textwrap

import pytest
from support import PEER_VERSIONS, client_script, wait_for

import offlog

TIMEOUT_MS = 5000

#: Prepended to every peer script: marker-file handshakes with the test.
PRELUDE = """\
import os, time
def touch(name):
    open(name, "w").close()
def wait_file(name, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(name):
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for " + name)
        time.sleep(0.01)
"""


def numbered(tag: str, n: int) -> list:
    return [f"{tag} {i:05d}\n".encode() for i in range(n)]


def peer(procs, workdir, peers, version, body, *, wait=True):
    """Run ``body`` in a fresh interpreter that imports offlog==version."""
    code = PRELUDE + textwrap.dedent(body)
    return client_script(procs, workdir, code, pythonpath=peers[version], wait=wait, timeout=30)


def finished(proc, timeout=30):
    """Wait for a wait=False peer; return (stdout, stderr)."""
    out, err = proc.communicate(timeout=timeout)
    proc.stdout_text, proc.stderr_text = out, err
    return out, err


def assert_clean_exit(proc):
    assert proc.returncode == 0, f"peer failed:\n{proc.stderr_text}"
    assert proc.stderr_text == "", f"peer wrote to stderr:\n{proc.stderr_text}"


def log_line(name, level, msg):
    return re.compile(rf"\[\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{{3}} {name} {level}\] {re.escape(msg)}")


# ---------------------------------------------------------------------------
# 0.x clients against our server
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("server_args", [(), ("--shm",)], ids=["socket", "shm"])
@pytest.mark.parametrize("version", PEER_VERSIONS)
def test_0x_proxyfile_lines_land_in_order_on_our_server(version, server_args, peers, procs, workdir, start_server):
    server = start_server(*server_args)
    path = workdir / "app.log"
    # Alternate bytes and str (str with a non-ASCII character: 0.x sends UTF-8).
    items = [f"bytes {i:05d}\n".encode() if i % 2 == 0 else f"str {i:05d} é\n" for i in range(100)]
    expected = b"".join(x if isinstance(x, bytes) else x.encode("utf-8") for x in items)
    proc = peer(
        procs,
        workdir,
        peers,
        version,
        f"""
        from offlog import ProxyFile
        f = ProxyFile({str(path)!r}, {server.sock!r}, 5000)
        for item in {items!r}:
            f.write(item)
        f.close()
    """,
    )
    assert_clean_exit(proc)
    assert path.read_bytes() == expected
    out = server.wait_log("transport: socket (0.x client)")
    assert re.search(r"Client \d+ transport: socket \(0\.x client\)", out)
    assert "transport: shm" not in out


@pytest.mark.parametrize("version", PEER_VERSIONS)
def test_0x_logger_lines_land_in_their_format(version, peers, procs, workdir, server):
    path = workdir / "app.log"
    proc = peer(
        procs,
        workdir,
        peers,
        version,
        f"""
        from offlog import Logger
        log = Logger("app", {str(path)!r}, stdout_level=None, stderr_level=None,
                     offlog_socket_path={server.sock!r}, offlog_timeout=5000)
        log.info("hello %d from %s", 42, "peer")
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("it failed")
        log.warning("last line")
        log.close()
    """,
    )
    assert_clean_exit(proc)
    lines = path.read_text("utf-8").splitlines()
    assert log_line("app", "INFO", "hello 42 from peer").fullmatch(lines[0]), lines
    assert log_line("app", "ERROR", "it failed").fullmatch(lines[1]), lines
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-2] == "ZeroDivisionError: division by zero"
    assert log_line("app", "WARNING", "last line").fullmatch(lines[-1]), lines


@pytest.mark.parametrize("version", PEER_VERSIONS)
def test_0x_client_gets_open_errors_as_builtin_classes(version, peers, procs, workdir, server):
    missing = workdir / "no-such-dir" / "app.log"
    directory = workdir / "a-dir"
    directory.mkdir()
    proc = peer(
        procs,
        workdir,
        peers,
        version,
        f"""
        from offlog import ProxyFile
        for path in [{str(missing)!r}, {str(directory)!r}]:
            try:
                ProxyFile(path, {server.sock!r}, 5000)
                print("opened", path)
            except Exception as exc:
                print(type(exc).__name__, "|", exc)
    """,
    )
    assert proc.returncode == 0, proc.stderr_text
    first, second = proc.stdout_text.splitlines()
    assert first.startswith("FileNotFoundError | ") and str(missing) in first
    assert second.startswith("IsADirectoryError | ") and str(directory) in second
    assert not missing.parent.exists()
    assert directory.is_dir() and list(directory.iterdir()) == []


@pytest.mark.parametrize("version", PEER_VERSIONS)
def test_0x_client_told_server_exited_on_graceful_stop(version, peers, procs, workdir, server):
    path = workdir / "app.log"
    before = numbered("before", 50)
    proc = peer(
        procs,
        workdir,
        peers,
        version,
        f"""
        from offlog import ProxyFile
        f = ProxyFile({str(path)!r}, {server.sock!r}, 5000)
        for line in {before!r}:
            f.write(line)
        touch("written")
        wait_file("go")
        try:
            f.write(b"after the stop\\n")
            f.close()
            print("no error")
        except OSError as exc:
            print(type(exc).__name__, "|", exc)
    """,
        wait=False,
    )
    wait_for(lambda: (workdir / "written").exists() or proc.poll() is not None, what="peer's writes")
    # SIGTERM without waiting for the file: the server must drain what it received.
    server.signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0, server.output()
    assert not os.path.exists(server.sock)
    assert path.read_bytes() == b"".join(before)
    (workdir / "go").touch()
    out, _ = finished(proc)
    assert_clean_exit(proc)
    kind, _, message = out.strip().partition(" | ")
    assert kind == "OSError" and "offlog server exited" in message, out
    assert path.read_bytes() == b"".join(before)


@pytest.mark.parametrize("version", PEER_VERSIONS)
def test_0x_client_unaffected_by_rotation_on_our_server(version, peers, procs, workdir, server):
    path = workdir / "app.log"
    rotated = workdir / "app.log.1"
    old, new = numbered("old", 50), numbered("new", 50)
    proc = peer(
        procs,
        workdir,
        peers,
        version,
        f"""
        from offlog import ProxyFile
        f = ProxyFile({str(path)!r}, {server.sock!r}, 5000)
        for line in {old!r}:
            f.write(line)
        wait_file("go")
        if hasattr(f, "check_rotated"):  # 0.3.1: reads whatever the server sent
            f.check_rotated()
        for line in {new!r}:
            f.write(line)
        f.close()
        print("closed")
    """,
        wait=False,
    )
    wait_for(lambda: path.exists() and path.read_bytes() == b"".join(old), what="old lines in the file")
    os.rename(path, rotated)  # logrotate "create": rename, then create an empty file
    path.touch()
    server.wait_log("Reopened")
    (workdir / "go").touch()
    out, _ = finished(proc)
    assert_clean_exit(proc)
    assert out == "closed\n"
    assert rotated.read_bytes() == b"".join(old)
    assert path.read_bytes() == b"".join(new)


# ---------------------------------------------------------------------------
# Our client and Logger against 0.x servers
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("version", PEER_VERSIONS)
def test_our_client_falls_back_to_socket_on_0x_server(version, peers, workdir, start_server):
    server = start_server(pythonpath=peers[version])
    path = workdir / "app.log"
    lines = numbered("ours", 500)
    with offlog.ProxyFile(str(path), server.sock, TIMEOUT_MS, shm=None) as f:
        assert f.transport == "socket"
        for i, line in enumerate(lines):
            f.write(line if i % 2 else line.decode())
        f.flush()
    assert path.read_bytes() == b"".join(lines)
    # A second client on the same file appends after the first.
    with offlog.ProxyFile(str(path), server.sock, TIMEOUT_MS) as f:
        f.write(b"second client\n")
    assert path.read_bytes() == b"".join(lines) + b"second client\n"


@pytest.mark.parametrize("version", PEER_VERSIONS)
def test_our_client_requiring_shm_refuses_0x_server(version, peers, workdir, start_server):
    server = start_server(pythonpath=peers[version])
    path = workdir / "app.log"
    with pytest.raises(offlog.ShmUnavailableError):
        offlog.ProxyFile(str(path), server.sock, TIMEOUT_MS, shm=True)
    assert not path.exists()  # the 0.x server never opened it
    with offlog.ProxyFile(str(path), server.sock, TIMEOUT_MS, shm=False) as f:
        f.write(b"still serving\n")
    assert path.read_bytes() == b"still serving\n"


@pytest.mark.parametrize("version", PEER_VERSIONS)
def test_our_client_gets_0x_server_errors_as_builtin_classes(version, peers, workdir, start_server):
    server = start_server(pythonpath=peers[version])
    missing = workdir / "no-such-dir" / "app.log"
    with pytest.raises(FileNotFoundError) as info:
        offlog.ProxyFile(str(missing), server.sock, TIMEOUT_MS)
    assert info.value.errno == 2 and str(missing) in str(info.value)
    directory = workdir / "a-dir"
    directory.mkdir()
    with pytest.raises(IsADirectoryError):
        offlog.ProxyFile(str(directory), server.sock, TIMEOUT_MS)
    assert not missing.parent.exists() and list(directory.iterdir()) == []


@pytest.mark.parametrize("version", PEER_VERSIONS)
def test_our_logger_writes_through_0x_server(version, peers, workdir, start_server):
    server = start_server(pythonpath=peers[version])
    path = workdir / "app.log"
    log = offlog.Logger(
        "ours",
        str(path),
        stdout_level=None,
        stderr_level=None,
        offlog_socket_path=server.sock,
        offlog_timeout=TIMEOUT_MS,
    )
    try:
        for i in range(20):
            log.info("line %d", i)
        try:
            raise KeyError("boom")
        except KeyError:
            log.exception("caught")
    finally:
        log.close()
    lines = path.read_text("utf-8").splitlines()
    for i in range(20):
        assert log_line("ours", "INFO", f"line {i}").fullmatch(lines[i]), lines[i]
    assert log_line("ours", "ERROR", "caught").fullmatch(lines[20])
    assert lines[21] == "Traceback (most recent call last):"
    assert lines[-1] == "KeyError: 'boom'"


# ---------------------------------------------------------------------------
# Mixed clients on one file
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("version", PEER_VERSIONS)
def test_0x_client_and_shm_client_share_a_file(version, peers, procs, workdir, shm_server):
    path = workdir / "shared.log"
    # The 0.x client sends 50 writes of 40 lines: never in its backlog (see the top),
    # each write one segment, all under one 256 KiB recv, so lines stay whole
    # even though 0.x bytes carry no record boundaries.
    theirs, ours = numbered("0x", 2000), numbered("shm", 2000)
    batches = [b"".join(theirs[i : i + 40]) for i in range(0, len(theirs), 40)]
    proc = peer(
        procs,
        workdir,
        peers,
        version,
        f"""
        from offlog import ProxyFile
        f = ProxyFile({str(path)!r}, {shm_server.sock!r}, 5000)
        touch("ready")
        wait_file("go")
        for batch in {batches!r}:
            f.write(batch)
        f.close()
    """,
        wait=False,
    )
    wait_for(lambda: (workdir / "ready").exists() or proc.poll() is not None, what="peer connected")
    with offlog.ProxyFile(str(path), shm_server.sock, TIMEOUT_MS, shm=True) as f:
        assert f.transport == "shm"
        (workdir / "go").touch()
        for line in ours:
            f.write(line)
    finished(proc)
    assert_clean_exit(proc)
    got = path.read_bytes().splitlines(keepends=True)
    assert [line for line in got if line.startswith(b"0x ")] == theirs
    assert [line for line in got if line.startswith(b"shm ")] == ours
    assert len(got) == len(theirs) + len(ours)
    out = shm_server.output()
    assert "transport: socket (0.x client)" in out and "transport: shm" in out
