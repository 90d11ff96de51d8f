"""A client talks only to a server it trusts; the server names who holds its socket path.

The squatters here are processes of another user (``nobody``), which only root
can start: those tests are skipped when the suite does not run as root. A
*recorder* is the squatter at its simplest: it listens on the path and keeps
every byte any connection sends, so an empty record proves that a refused
client sent nothing. Sockets of other users live in a directory like /tmp
(world-writable, sticky) inside the test's workdir.
"""

from __future__ import annotations

import functools
import logging
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
from support import (
    Processes,
    ServerProcess,
    child_env,
    client_script,
    run_offlog,
    socket_answers,
    started_servers,
    wait_for,
)

import offlog
from offlog.client import server_status
from offlog.trust import describe_uid

TIMEOUT_MS = 30_000

try:
    NOBODY = pwd.getpwnam("nobody")
except KeyError:
    NOBODY = None

as_root = pytest.mark.skipif(
    os.geteuid() != 0 or NOBODY is None or NOBODY.pw_uid == 0,
    reason="starting a process of another user (nobody) needs root",
)

#: Listens on argv[1]; appends every byte received to argv[2], and a line to
#: argv[2] + ".connections" once a connection has ended (its bytes recorded).
RECORDER = """
import os, socket, sys
path, record = sys.argv[1], sys.argv[2]
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(path)
os.chmod(path, 0o666)
listener.listen(64)
open(record, "ab").close()
while True:
    conn, _ = listener.accept()
    conn.settimeout(5.0)
    try:
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            with open(record, "ab") as f:
                f.write(chunk)
    except OSError:
        pass
    conn.close()
    with open(record + ".connections", "a") as f:
        f.write("ended\\n")
"""


class AsUser:
    """Starts processes as ``user`` through a :class:`Processes` tracker, which ends them.
    ``python`` is the interpreter they run instead of ours (ours may live in a home
    directory that other users cannot enter)."""

    def __init__(self, tracker: Processes, user: pwd.struct_passwd, python: str) -> None:
        self.tracker = tracker
        self.user = user
        self.python = python

    @property
    def procs(self) -> list:
        return self.tracker.procs

    def start(self, argv, **kw) -> subprocess.Popen:
        argv = [self.python if arg == sys.executable else arg for arg in argv]
        return self.tracker.start(argv, user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[], **kw)


@functools.cache
def python_for(user: pwd.struct_passwd) -> Optional[str]:
    """An interpreter (3.9 or newer) that ``user`` can run: ours, or the system's."""
    for candidate in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if candidate is None:
            continue
        try:
            check = subprocess.run(
                [candidate, "-c", "import sys; assert sys.version_info >= (3, 9)"],
                user=user.pw_uid,
                group=user.pw_gid,
                extra_groups=[],
                cwd="/",
                capture_output=True,
            )
        except OSError:  # not executable for the user
            continue
        if check.returncode == 0:
            return candidate
    return None


class Recorder:
    """A squatter of another user on ``sock``: it answers nothing and records everything."""

    def __init__(self, as_nobody: AsUser, shared: Path, sock: str) -> None:
        self.record = shared / f"squatted-{len(as_nobody.procs)}"
        self.proc = as_nobody.start(
            [sys.executable, "-c", RECORDER, sock, str(self.record)], cwd=str(shared), env=child_env()
        )
        wait_for(self.record.exists, what="the squatter listening")  # made after listen()
        self.sock = sock

    @property
    def pid(self) -> int:
        return self.proc.pid

    def received(self) -> bytes:
        return self.record.read_bytes()

    def connections(self) -> int:
        try:
            return len(Path(f"{self.record}.connections").read_text().splitlines())
        except FileNotFoundError:
            return 0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def shared(workdir):
    """A directory like /tmp (mode 1777) in the workdir, which ``nobody`` can reach."""
    os.chmod(workdir, 0o711)
    path = workdir / "shared"
    path.mkdir()
    os.chmod(path, 0o1777)
    return path


@pytest.fixture
def as_nobody(procs):
    """Starts processes as nobody (tracked by ``procs``)."""
    python = python_for(NOBODY)
    if python is None:
        pytest.skip("no Python interpreter that nobody may run")
    return AsUser(procs, NOBODY, python)


@pytest.fixture
def start_as_nobody(as_nobody, shared):
    """Factory: an offlog server (ours, or a 0.x peer's with ``pythonpath``) running as nobody."""
    yield from started_servers(as_nobody, shared)


# -- server_uid= itself --------------------------------------------------------------
@pytest.mark.parametrize(
    "server_uid, error",
    [("nobody", TypeError), (True, TypeError), ([1000, 2.5], TypeError), (-1, ValueError), ([0, -2], ValueError)],
)
def test_server_uid_takes_uids_only_and_says_so_before_connecting(workdir, server_uid, error):
    """Not a user name, not a bool, not a negative number: the mistake is raised at
    once (before any connection: there is no server here at all)."""
    with pytest.raises(error, match="server_uid"):
        offlog.ProxyFile(str(workdir / "x.log"), str(workdir / "no.sock"), server_uid=server_uid)
    with pytest.raises(error, match="server_uid"):
        server_status(str(workdir / "no.sock"), server_uid=server_uid)


def test_the_server_names_its_own_user_when_it_finds_itself_already_running(server, procs, workdir):
    """No second user needed: the refusal to start names the live server's uid and pid."""
    second = ServerProcess(procs, workdir, sock=server.sock).start(wait=False)
    assert second.proc.wait(30) == 1
    assert f"is already listening there ({describe_uid(os.getuid())}, pid {server.pid})" in second.output()


# -- the first open --------------------------------------------------------------------
@as_root
def test_a_client_refuses_a_server_of_another_user_and_sends_it_nothing(as_nobody, shared, workdir):
    sock = str(shared / "offlog.sock")
    squatter = Recorder(as_nobody, shared, sock)
    target = workdir / "secret.log"
    for shm in (None, True, False):
        with pytest.raises(offlog.UntrustedServerError) as info:
            offlog.ProxyFile(str(target), sock, TIMEOUT_MS, shm=shm)
        refusal = info.value
        assert isinstance(refusal, PermissionError)
        assert (refusal.sock_path, refusal.uid, refusal.pid) == (sock, NOBODY.pw_uid, squatter.pid)
        message = str(refusal)
        assert sock in message and f"uid {NOBODY.pw_uid} (nobody), pid {squatter.pid}" in message
        assert f"server_uid={NOBODY.pw_uid}" in message
    wait_for(lambda: squatter.connections() == 3, what="the squatter to see the three connections end")
    assert squatter.received() == b"", "a refused server must not get a single byte"
    assert not target.exists()


@as_root
@pytest.mark.parametrize("server_uid", ["int", "list"])
def test_server_uid_allows_another_users_server(start_as_nobody, shared, server_uid):
    server = start_as_nobody()
    target = shared / "allowed.log"
    allowed = NOBODY.pw_uid if server_uid == "int" else [4242, NOBODY.pw_uid]
    with offlog.ProxyFile(str(target), server.sock, TIMEOUT_MS, server_uid=allowed) as f:
        f.write(b"to nobody's server\n")
        f.sync()
    assert target.read_bytes() == b"to nobody's server\n"
    assert os.stat(target).st_uid == NOBODY.pw_uid, "the server of the other user wrote the file"


@as_root
def test_handler_and_logger_pass_server_uid_on(start_as_nobody, shared):
    server = start_as_nobody()
    with pytest.raises(offlog.UntrustedServerError):
        offlog.OfflogHandler(str(shared / "handler.log"), server.sock)
    handler = offlog.OfflogHandler(str(shared / "handler.log"), server.sock, server_uid=NOBODY.pw_uid)
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "through the handler", None, None)
    handler.handle(record)
    handler.close()
    with pytest.raises(offlog.UntrustedServerError):
        offlog.Logger("t", str(shared / "logger.log"), stdout_level=None, offlog_socket_path=server.sock)
    logger = offlog.Logger(
        "t",
        str(shared / "logger.log"),
        stdout_level=None,
        offlog_socket_path=server.sock,
        offlog_server_uid=[NOBODY.pw_uid],
    )
    logger.info("through the logger")
    logger.close()
    assert (shared / "handler.log").read_text() == "through the handler\n"
    assert (shared / "logger.log").read_text().endswith(" t INFO] through the logger\n")


@as_root
def test_a_client_of_another_user_accepts_a_root_server(start_server, as_nobody, shared):
    server = start_server("--socket-mode", "666", sock=str(shared / "root.sock"))
    target = shared / "from-nobody.log"
    code = f"""
        import offlog
        with offlog.ProxyFile({str(target)!r}, {server.sock!r}, {TIMEOUT_MS}) as f:
            f.write(b"from nobody to root\\n")
        print("closed")
    """
    client = client_script(as_nobody, shared, code)
    assert (client.returncode, client.stdout_text) == (0, "closed\n"), client.stderr_text
    assert target.read_bytes() == b"from nobody to root\n"


@as_root
def test_server_uid_reaches_the_0x_fallback_connection(start_as_nobody, peers, shared):
    """Against a 0.x server the client connects twice (the framed try, then the 0.x
    dialect): both connections are checked, and server_uid allows both."""
    server = start_as_nobody(pythonpath=peers["0.3.1"])
    target = shared / "legacy.log"
    with pytest.raises(offlog.UntrustedServerError):
        offlog.ProxyFile(str(target), server.sock, TIMEOUT_MS)
    with offlog.ProxyFile(str(target), server.sock, TIMEOUT_MS, server_uid=NOBODY.pw_uid) as f:
        assert f.transport == "socket"
        f.write(b"to a 0.x server of nobody\n")
    assert target.read_bytes() == b"to a 0.x server of nobody\n"


# -- reconnects ------------------------------------------------------------------------
def numbered(start: int, stop: int) -> bytes:
    return b"".join(b"record %05d\n" % i for i in range(start, stop))


@as_root
@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["socket", "shm"])
def test_a_reconnect_refuses_a_squatter_and_the_real_server_gets_all(procs, as_nobody, shared, workdir, transport):
    """The real server stops (an upgrade, a restart); another user binds the path in
    the gap. The client's reconnects are refused, its backlog stays, and when the real
    server is back every record reaches it, once."""
    sock = str(shared / "offlog.sock")
    target = workdir / "app.log"
    first = ServerProcess(procs, workdir, "--shm", sock=sock).start()
    proxy = offlog.ProxyFile(str(target), sock, TIMEOUT_MS, shm=transport == "shm")
    try:
        assert proxy.transport == transport
        proxy.write(numbered(0, 100))
        proxy.sync()
        first.stop()
        squatter = Recorder(as_nobody, shared, sock)
        for i in range(100, 200):
            proxy.write(numbered(i, i + 1))
        wait_for(lambda: squatter.connections() >= 2, timeout=30, what="two reconnects refused by the squatter")
        assert proxy.transport == "reconnecting" and proxy.backlog == len(numbered(100, 200))
        with pytest.raises(TimeoutError, match=f"the last try: UntrustedServerError: .*uid {NOBODY.pw_uid}"):
            proxy.sync(timeout=200)
        squatter.kill()
        second = ServerProcess(procs, workdir, "--shm", sock=sock).start()  # replaces the stale socket file
        proxy.sync(timeout=TIMEOUT_MS)
        proxy.write(numbered(200, 210))
        proxy.close()
        second.stop()
    finally:
        proxy.close()
    assert target.read_bytes() == numbered(0, 210)
    assert squatter.received() == b"", "the squatter must not get a single byte"


@as_root
@pytest.mark.timeout(120)
def test_server_uid_holds_for_reconnects_too(start_as_nobody, shared):
    """A client that allows another user's server rides out that server's restart."""
    first = start_as_nobody()
    target = shared / "restarted.log"
    proxy = offlog.ProxyFile(str(target), first.sock, TIMEOUT_MS, server_uid=NOBODY.pw_uid)
    try:
        proxy.write(numbered(0, 100))
        proxy.sync()
        first.stop()
        proxy.write(numbered(100, 200))
        start_as_nobody()
        proxy.write(numbered(200, 300))
        proxy.sync(timeout=TIMEOUT_MS)
    finally:
        proxy.close()
    assert target.read_bytes() == numbered(0, 300)


# -- the command line --------------------------------------------------------------------
@as_root
@pytest.mark.parametrize("command", ["status", "reopen"])
def test_status_and_reopen_refuse_a_squatter_in_one_line(procs, as_nobody, shared, workdir, command):
    sock = str(shared / "offlog.sock")
    squatter = Recorder(as_nobody, shared, sock)
    result = run_offlog(procs, workdir, command, "-s", sock)
    assert (result.returncode, result.stdout) == (1, "")
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"offlog {command}: refusing the offlog server at {sock}: ")
    assert f"uid {NOBODY.pw_uid} (nobody), pid {squatter.pid}" in lines[0]
    assert lines[0].endswith(f"if you trust it, pass --server-uid {NOBODY.pw_uid}")
    wait_for(lambda: squatter.connections() == 1, what="the squatter to see the connection end")
    assert squatter.received() == b""


@as_root
def test_status_and_reopen_ask_another_users_server_with_server_uid(start_as_nobody, procs, workdir):
    server = start_as_nobody()
    assert run_offlog(procs, workdir, "status", "-s", server.sock).returncode == 1
    status = run_offlog(procs, workdir, "status", "-s", server.sock, "--server-uid", "nobody")
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith(f"offlog {offlog.__version__} pid {server.pid} on {server.sock}")
    allow = ("--server-uid", "4242", "--server-uid", str(NOBODY.pw_uid))
    reopen = run_offlog(procs, workdir, "reopen", "-s", server.sock, *allow)
    assert (reopen.returncode, reopen.stderr) == (0, "")
    assert server_status(server.sock, server_uid={NOBODY.pw_uid})["pid"] == server.pid


def test_an_unknown_user_for_server_uid_is_a_usage_error(procs, workdir):
    result = run_offlog(procs, workdir, "status", "--server-uid", "offlog-no-such-user")
    assert result.returncode == 2
    assert "no user named 'offlog-no-such-user'" in result.stderr


# -- the server ------------------------------------------------------------------------
@as_root
def test_the_server_names_the_squatters_uid_when_it_refuses_to_start(procs, as_nobody, shared, workdir):
    sock = str(shared / "offlog.sock")
    squatter = Recorder(as_nobody, shared, sock)
    result = run_offlog(procs, workdir, "-s", sock)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert (
        f"Cannot listen on {sock}: another offlog server is already listening there "
        f"(uid {NOBODY.pw_uid} (nobody), pid {squatter.pid}); stop it first" in lines[0]
    )
    assert socket_answers(sock), "the squatter keeps its socket: the server took nothing over"
