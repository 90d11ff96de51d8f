"""The server's files: the path a client opens is the path it gets; rotation as operators run it.

Renames, deletes, a removed directory, a reopen the server is not allowed to
do, a full disk, and ``offlog reopen``, each against a real server process.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import ServerProcess, run_offlog, wait_for

import offlog
from offlog import protocol as P
from offlog.files import SAFETY_NET_CHECK

ROUNDS = 30
RECORD = 1000  # bytes per record in the full-disk tests


def record(i: int) -> bytes:
    """A record whose every byte says which record it is: a torn one cannot pass for whole."""
    return (b"%06d:" % i).ljust(RECORD - 1, b"abcdefghij"[i % 10 : i % 10 + 1]) + b"\n"


def whole_records(data: bytes) -> int:
    """How many records ``data`` holds; fails unless it is exactly records 0, 1, 2, ... back to back."""
    assert len(data) % RECORD == 0, f"{len(data)} bytes: a record is cut ({len(data) % RECORD} bytes over)"
    count = len(data) // RECORD
    assert data == b"".join(record(i) for i in range(count))
    return count


def file_status(server: ServerProcess, path: Path) -> dict:
    """The ``files`` entry of ``path`` in ``offlog status --json`` of ``server``."""
    done = run_offlog(server.procs, server.workdir, "status", "-s", server.sock, "--json")
    assert done.returncode == 0, done.stderr
    (entry,) = [e for e in json.loads(done.stdout)["files"] if e["path"] == str(path)]
    return entry


def write_until_error(f: offlog.ProxyFile, data=lambda i: b"x\n", count: int = 3000) -> BaseException:
    """Write until the server's error reaches this client; return it."""
    try:
        for i in range(count):
            f.write(data(i))
            time.sleep(0.005)
        f.close()
    except OSError as exc:
        try:
            f.close()
        except OSError:
            pass  # the same error again
        return exc
    raise AssertionError(f"{count} writes and a close went through without an error")


def remove_directory(directory: Path) -> None:
    """``rm -r`` of a directory under a live file (retried should the rmdir find the
    file recreated, which the server's CREATE_GRACE is there to prevent)."""

    def attempt() -> bool:
        for name in os.listdir(directory):
            os.unlink(directory / name)
        try:
            os.rmdir(directory)
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise
            return False
        return True

    wait_for(attempt, what=f"{directory} to be removed")


class PeriodicCheck:
    """Waits until the rotation watcher's full check has run (no sleeping on a guess).

    The probe is a file opened through a symlinked directory. inotify watches
    the symlink's target, so pointing the symlink elsewhere is seen by the full
    check only, which then logs a reopen of the probe."""

    def __init__(self, server, workdir: Path) -> None:
        self.server = server
        self.targets = [workdir / "probe-a", workdir / "probe-b"]
        for target in self.targets:
            target.mkdir()
        (self.targets[1] / "probe.log").write_bytes(b"")
        self.link = workdir / "probe"
        os.symlink(self.targets[0], self.link)
        self.path = self.link / "probe.log"
        self.proxy = offlog.ProxyFile(str(self.path), server.sock, shm=False)
        self.seen = 0

    def wait(self) -> None:
        self.seen += 1
        swap = self.link.with_name("probe.new")
        os.symlink(self.targets[self.seen % 2], swap)
        os.rename(swap, self.link)
        line = f"Reopened {self.path} (renamed or deleted, seen by the periodic check)"
        wait_for(lambda: self.server.output().count(line) >= self.seen, timeout=10 * SAFETY_NET_CHECK, what=line)

    def close(self) -> None:
        self.proxy.close()


# -- the path a client opens is the path it gets -----------------------------------
@pytest.mark.parametrize("how", ["rename", "delete"])
def test_reopened_path_gets_the_new_file_while_another_client_holds_it(transport_server, workdir, how):
    """Close, rename or delete, open the same path again, write: every round's record is in
    the file now at the path (never in the renamed or deleted one), while another client
    holds the path throughout; that holder moves to the new file too."""
    path = workdir / "app.log"
    shm = transport_server.transport == "shm"
    holder = offlog.ProxyFile(str(path), transport_server.sock, shm=shm)
    for i in range(ROUNDS):
        f = offlog.ProxyFile(str(path), transport_server.sock, shm=shm)
        f.write(b"round %d\n" % i)
        f.close()
        assert path.read_bytes() == b"round %d\n" % i, f"round {i}"
        if i < ROUNDS - 1:
            if how == "rename":
                path.rename(workdir / f"app.log.{i}")
            else:
                path.unlink()
    holder.write(b"holder\n")
    holder.close()
    assert path.read_bytes() == b"round %d\nholder\n" % (ROUNDS - 1)
    if how == "rename":
        for i in range(ROUNDS - 1):
            assert (workdir / f"app.log.{i}").read_bytes() == b"round %d\n" % i


@pytest.mark.parametrize("create", [True, False], ids=["create", "nocreate"])
def test_rotation_is_followed_by_inotify_without_waiting_for_the_periodic_check(server, workdir, create):
    """logrotate renames the file and (with ``create``) makes the new one at once: its
    exclusive create finds no file of the server's in the way, and the server follows
    the new file, told by inotify; a client that keeps its file open writes there.
    Without ``create`` the server makes the new file itself, a moment later."""
    server.wait_log("Rotation watcher: inotify on each file's directory")
    path = workdir / "app.log"
    f = offlog.ProxyFile(str(path), server.sock, shm=False)
    f.write(b"one\n")
    wait_for(lambda: path.read_bytes() == b"one\n", what="the first write")
    path.rename(workdir / "app.log.1")
    if create:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
    created = path.stat().st_ino if create else None
    server.wait_log(f"Reopened {path}")
    server.wait_log(f"Reopened {path} (renamed or deleted, seen by inotify")
    f.write(b"two\n")
    f.close()
    assert path.read_bytes() == b"two\n"
    assert (workdir / "app.log.1").read_bytes() == b"one\n"
    if create:
        assert path.stat().st_ino == created, "the server must write to the file logrotate created"


def test_periodic_check_catches_what_inotify_cannot_see(server, workdir):
    """A path that names another file because a symlinked directory was repointed (no
    inotify event) is reopened by the full check that runs as a safety net."""
    probe = PeriodicCheck(server, workdir)
    try:
        probe.proxy.write(b"a\n")
        wait_for(lambda: (probe.targets[0] / "probe.log").read_bytes() == b"a\n", what="the first write")
        probe.wait()
        probe.proxy.write(b"b\n")
    finally:
        probe.close()
    assert (probe.targets[0] / "probe.log").read_bytes() == b"a\n"
    assert (probe.targets[1] / "probe.log").read_bytes() == b"b\n"


def test_removed_directory_fails_writers_with_file_not_found(transport_server, workdir):
    """``rm -r`` of the directory under a live file: the writing client gets
    FileNotFoundError naming the path instead of writing on into a deleted file, and a
    client opening the path afterwards is refused the same way."""
    directory = workdir / "logs"
    directory.mkdir()
    path = directory / "app.log"
    shm = transport_server.transport == "shm"
    f = offlog.ProxyFile(str(path), transport_server.sock, shm=shm)
    f.write(b"before\n")
    wait_for(lambda: path.exists() and path.read_bytes() == b"before\n", what="the first write")
    remove_directory(directory)
    error = write_until_error(f)
    assert isinstance(error, FileNotFoundError), repr(error)
    assert str(path) in str(error)
    with pytest.raises(FileNotFoundError):
        offlog.ProxyFile(str(path), transport_server.sock, shm=shm)
    assert not directory.exists(), "nothing may recreate the removed directory"
    assert transport_server.output().count(f"The directory of {path} is gone") == 1


# -- a reopen that fails: keep writing the old file -----------------------------------
def rotate_to_unwritable(path: Path, rotated: Path, how: str) -> None:
    """Rename ``path`` to ``rotated`` and put in its place, in one rename, something the
    server (root, in CI) cannot open for appending: a directory, or a symlink to an
    immutable file (what a file whose owner shuts the server out is to a non-root server)."""
    staged = path.with_name(path.name + ".new")
    if how == "directory":
        staged.mkdir()
    else:
        locked = path.with_name("locked.log")
        locked.write_bytes(b"")
        subprocess.run(["chattr", "+i", str(locked)], check=True)
        os.symlink(locked.name, staged)
    path.rename(rotated)
    staged.rename(path)


@pytest.fixture
def no_immutable_leftovers(workdir):
    """An immutable file would survive the workdir's removal, whatever the test did."""
    yield
    for p in workdir.rglob("*"):
        if p.is_file() and not p.is_symlink():
            subprocess.run(["chattr", "-i", str(p)], capture_output=True)


def undo_unwritable(path: Path, how: str) -> None:
    if how == "directory":
        path.rmdir()
    else:
        subprocess.run(["chattr", "-i", str(path.with_name("locked.log"))], check=True)


@pytest.mark.parametrize("how", ["directory", "immutable"])
def test_failed_reopen_keeps_writing_old_file_logs_once_and_shows_in_status(
    server, procs, workdir, no_immutable_leftovers, how
):
    """logrotate renamed the file and created one the server cannot open: the server
    keeps appending to the renamed file, says so once (not at every later check or
    open attempt) and in ``status``, and follows the path again once it can."""
    path = workdir / "app.log"
    rotated = workdir / "app.log.1"
    f = offlog.ProxyFile(str(path), server.sock, shm=False)
    probe = PeriodicCheck(server, workdir)
    try:
        f.write(b"one\n")
        wait_for(lambda: path.read_bytes() == b"one\n", what="the first write")
        rotate_to_unwritable(path, rotated, how)
        try:
            server.wait_log(f"Could not reopen {path}, still writing the old file")
            f.write(b"two\n")
            wait_for(lambda: rotated.read_bytes() == b"one\ntwo\n", what="the write to the old file")
            for _ in range(3):  # every open of the path tries again
                with pytest.raises(PermissionError if how == "immutable" else IsADirectoryError):
                    offlog.ProxyFile(str(path), server.sock, shm=False)
            probe.wait()  # so do the periodic checks
            probe.wait()
            assert server.output().count(f"Could not reopen {path}") == 1

            entry = file_status(server, path)
            expected = "PermissionError" if how == "immutable" else "IsADirectoryError"
            assert entry["reopen_error"].startswith(expected) and str(path) in entry["reopen_error"]
            shown = run_offlog(procs, workdir, "status", "-s", server.sock)
            assert shown.returncode == 0, shown.stderr
            assert f"{path}: {expected}" in shown.stdout
        finally:
            undo_unwritable(path, how)
        if how == "directory":
            server.wait_log(f"Reopened {path}")  # its removal is an inotify event
        else:
            assert run_offlog(procs, workdir, "reopen", "-s", server.sock).returncode == 0
        assert file_status(server, path)["reopen_error"] is None
        f.write(b"three\n")
    finally:
        probe.close()
        f.close()
    assert rotated.read_bytes() == b"one\ntwo\n"
    assert path.read_bytes() == b"three\n"


# -- a full disk leaves no torn record ------------------------------------------------
@pytest.fixture
def small_filesystem(workdir):
    """A 256 KiB tmpfs mounted inside the test's directory (needs root, as in CI)."""
    mountpoint = workdir / "small"
    mountpoint.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0777", "tmpfs", str(mountpoint)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.fail(f"this test fills a small tmpfs and could not mount one (run it as root): {done.stderr.strip()}")
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=True)


@pytest.mark.parametrize("shm", [False, True], ids=["socket", "shm"])
def test_enospc_leaves_no_torn_record(start_server, small_filesystem, shm):
    """The disk fills up in the middle of a record: the server cuts the file back to the
    record boundary, and the client gets ENOSPC naming the file."""
    server = start_server("--shm")
    path = small_filesystem / "app.log"
    f = offlog.ProxyFile(str(path), server.sock, shm=shm)
    error = write_until_error(f, record)
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC, repr(error)
    assert str(path) in str(error)
    count = whole_records(path.read_bytes())
    assert count * RECORD > 200 * 1024, "the file should have filled most of the filesystem"
    server.wait_log("Failed to write to")


def test_file_size_limit_leaves_no_torn_record(server, workdir):
    """The same without mounting anything: RLIMIT_FSIZE makes the write that crosses it
    short and the next one fail with EFBIG; the file is cut back to the boundary."""
    limit = 20 * RECORD + RECORD // 2
    resource.prlimit(server.pid, resource.RLIMIT_FSIZE, (limit, limit))
    path = workdir / "app.log"
    f = offlog.ProxyFile(str(path), server.sock, shm=False)
    error = write_until_error(f, record)
    assert isinstance(error, OSError) and error.errno == errno.EFBIG, repr(error)
    assert str(path) in str(error)
    assert whole_records(path.read_bytes()) <= 20


# -- offlog reopen ------------------------------------------------------------------------
def test_reopen_command_reopens_every_file_and_reports_failures(server, procs, workdir):
    """``offlog reopen`` returns once every file is reopened: after it, nothing more goes
    to the rotated files (logrotate may compress them). A file it cannot reopen makes it
    exit 1 and name the file and the reason; the other files are reopened all the same."""
    paths = [workdir / f"f{i}.log" for i in range(3)]
    clients = [offlog.ProxyFile(str(p), server.sock, shm=False) for p in paths]
    for f in clients:
        f.write(b"old\n")
    for p in paths:
        wait_for(lambda p=p: p.exists() and p.read_bytes() == b"old\n", what=f"{p} written")
        p.rename(p.with_suffix(".log.1"))
    done = run_offlog(procs, workdir, "reopen", "-s", server.sock)
    assert (done.returncode, done.stderr) == (0, "")
    assert all(p.exists() for p in paths), "every file must be reopened when the command returns"

    paths[0].rename(paths[0].with_suffix(".log.2"))
    paths[0].mkdir()
    try:
        failed = run_offlog(procs, workdir, "reopen", "-s", server.sock)
    finally:
        paths[0].rmdir()
    assert failed.returncode == 1
    assert f"could not reopen {paths[0]}: IsADirectoryError" in failed.stderr
    assert str(paths[1]) not in failed.stderr and str(paths[2]) not in failed.stderr

    for f in clients:
        f.write(b"new\n")
        f.close()
    for p in paths:
        assert p.with_suffix(".log.1").read_bytes() == b"old\n"
    for p in paths[1:]:
        assert p.read_bytes() == b"new\n"


def test_reopen_command_without_a_server_says_so(procs, workdir):
    done = run_offlog(procs, workdir, "reopen", "-s", str(workdir / "nobody.sock"), "--timeout", "2000")
    assert done.returncode == 1
    assert "offlog reopen: no answer from" in done.stderr


def test_sighup_and_reopen_command_run_the_same_routine(server, procs, workdir):
    """Both reopen every file and log the same summary."""
    f = offlog.ProxyFile(str(workdir / "app.log"), server.sock, shm=False)
    try:
        server.signal(signal.SIGHUP)
        server.wait_log("Received SIGHUP, reopening all files")
        server.wait_log("Reopened 1 of 1 files, 0 failed")
        assert run_offlog(procs, workdir, "reopen", "-s", server.sock).returncode == 0
        assert "reopening all files" in server.output().split("Received SIGHUP", 1)[1]
        wait_for(lambda: server.output().count("Reopened 1 of 1 files, 0 failed") == 2, what="the second reopen's line")
    finally:
        f.close()


def test_reopen_frames_are_the_bytes_the_protocol_document_shows():
    """docs/protocol.md 5.5 spells out a REOPEN request and a REOPENED answer byte for byte."""
    assert P.CLIENT_PREAMBLE + P.frame(P.REOPEN) == bytes.fromhex("004f46464c4f4700") + bytes.fromhex("5200000000")
    server, client = P.ServerConnection(), P.ClientConnection()
    request = client.send(P.ReopenRequest())
    assert request == bytes.fromhex("004f46464c4f47005200000000")
    server.receive_data(request)
    assert [server.next_event(), server.next_event()] == [P.Preamble(), P.PAUSED]
    greeting = server.send(P.Greeting())
    assert server.next_event() == P.ReopenRequest()
    answer = greeting + server.send(P.Reopened(P.reopened_document([("/tmp/a.log", None)])))
    assert answer == P.SERVER_PREAMBLE + bytes.fromhex("722a000000") + b'{"reopened": ["/tmp/a.log"], "failed": []}'
    client.receive_data(answer)
    client.receive_data(b"")
    assert [client.next_event(), client.next_event(), client.next_event()] == [
        P.Greeting(),
        P.Reopened({"reopened": ["/tmp/a.log"], "failed": []}),
        P.Closed(),
    ]
    with pytest.raises(P.ProtocolError):
        P.decode_reopened(b'{"reopened": []}')


def test_inotify_binding_reports_renames_and_deletions_in_a_watched_directory(workdir):
    """The ctypes binding against the real kernel: a watch on a directory reports a
    rename and a deletion there by name, and a removed directory's own end."""
    from offlog.inotify import IN_DELETE, IN_DELETE_SELF, IN_IGNORED, IN_MOVED_FROM, IN_MOVED_TO, open_inotify

    inotify, why_not = open_inotify()
    assert inotify is not None, why_not
    try:
        directory = workdir / "watched"
        directory.mkdir()
        (directory / "a.log").write_bytes(b"")
        wd = inotify.add_watch(str(directory), IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE | IN_DELETE_SELF)
        (directory / "a.log").rename(directory / "a.log.1")
        (directory / "a.log.1").unlink()
        directory.rmdir()
        assert [(e.wd, e.mask, e.name) for e in inotify.read()] == [
            (wd, IN_MOVED_FROM, b"a.log"),
            (wd, IN_MOVED_TO, b"a.log.1"),
            (wd, IN_DELETE, b"a.log.1"),
            (wd, IN_DELETE_SELF, b""),
            (wd, IN_IGNORED, b""),  # the kernel dropped the watch with the directory
        ]
        assert inotify.read() == []
        with pytest.raises(FileNotFoundError):
            inotify.add_watch(str(directory), IN_DELETE)
    finally:
        inotify.close()
