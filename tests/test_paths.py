"""Paths are data: whatever bytes a client names, the server logs them escaped on one
line, gives back everything it took, and never opens its own descriptors, another
process's or the kernel's files on a client's word."""

from __future__ import annotations

import errno
import os
import re

import pytest
from support import wait_for

import offlog
from offlog.loglines import printable

LINE = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} offlog (INFO|WARNING|ERROR)\] ")


def open_fds(pid: int) -> set:
    return set(os.listdir(f"/proc/{pid}/fd"))


def every_line_is_the_servers(text: str) -> bool:
    return all(LINE.match(line) for line in text.splitlines())


def test_non_utf8_paths_are_served_logged_escaped_and_leak_nothing(start_server, workdir):
    """Fifty paths that are not UTF-8, each opened, written and closed: every client is
    served, its file has its exact bytes for a name, the log (stdout and -l) shows each
    byte as \\xNN, and the server holds no more descriptors than before. A missing
    directory is reported as FileNotFoundError (before: each client got TypeError or
    an OSError quoting UnicodeEncodeError, and every attempt leaked its file)."""
    logfile = workdir / "server.log"
    server = start_server("-l", str(logfile))
    server.wait_log("Client 0 disconnected\n")
    baseline = open_fds(server.pid)
    names = [b"app-%d-\xff\xfe.log" % i for i in range(50)]
    for name in names:
        with offlog.ProxyFile(os.fsdecode(os.fsencode(workdir) + b"/" + name), server.sock, shm=False) as f:
            f.write(name + b"\n")
    missing = os.fsdecode(os.fsencode(workdir) + b"/gone-\xff/app.log")
    for _ in range(20):
        with pytest.raises(FileNotFoundError):
            offlog.ProxyFile(missing, server.sock, shm=False)
    for name in names:
        assert open(os.fsencode(workdir) + b"/" + name, "rb").read() == name + b"\n"
    server.wait_log("Client 70 disconnected\n")
    wait_for(lambda: open_fds(server.pid) == baseline, what="the server's descriptors back to the baseline")
    for text in (server.output(), logfile.read_bytes().decode("utf-8")):  # strict UTF-8: no raw byte got out
        assert f"opened {workdir}/app-49-\\xff\\xfe.log (clients of this file: 1)" in text
        assert f"access denied for {workdir}/gone-\\xff/app.log" in text
        assert every_line_is_the_servers(text)


def test_printable_escapes_what_could_break_or_forge_a_line():
    assert printable("/var/log/app.log") == "/var/log/app.log"
    assert printable("/tmp/a\n[2026-01-01 00:00:00.000 offlog INFO] forged") == (
        "/tmp/a\\n[2026-01-01 00:00:00.000 offlog INFO] forged"
    )
    assert printable(os.fsdecode(b"/tmp/bad\xff\x1b[2J\r\t\x7f")) == "/tmp/bad\\xff\\x1b[2J\\r\\t\\x7f"
    assert printable("/tmp/журнал\u2028.log") == "/tmp/журнал\\u2028.log"


def test_a_newline_in_a_path_cannot_forge_a_server_log_line(start_server, workdir):
    """A file name may hold a newline and a whole fake log line: the file is served
    under that name, and the server's log shows the newline as \\n, so every line of
    the log is one the server wrote."""
    logfile = workdir / "server.log"
    server = start_server("-l", str(logfile))
    forged = "[2026-01-01 00:00:00.000 offlog INFO] Client 7 disconnected"
    path = f"{workdir}/app\n{forged}\r\x1b[2K.log"
    with offlog.ProxyFile(path, server.sock, shm=False) as f:
        f.write(b"data\n")
    assert open(path, "rb").read() == b"data\n"
    server.wait_log("Client 1 disconnected\n")
    for text in (server.output(), logfile.read_text()):
        assert f"Client 1 opened {workdir}/app\\n{forged}\\r\\x1b[2K.log (clients of this file: 1)" in text
        assert every_line_is_the_servers(text)
        assert not any(line.startswith(forged) for line in text.splitlines())


def test_paths_to_descriptors_and_kernel_files_are_refused(start_server, workdir):
    """/proc/self/fd/1 is the server's stdout; /proc/<pid>/fd/N, /dev/fd, /dev/stdout,
    /sys and /proc files are no log files either, spelled directly or through a
    symlink, nor is the file the server logs to (-l, or its stdout) under its own name.
    Each is refused with PermissionError (EACCES) saying why, nothing is written to
    any of them, and nothing stays open; /dev/null stays open to clients."""
    logfile = workdir / "server.log"
    server = start_server("-l", str(logfile))
    server.wait_log("Client 0 disconnected\n")
    baseline = open_fds(server.pid)
    os.symlink("/proc/self/fd/1", workdir / "stdout-link")
    os.symlink("/proc/self", workdir / "self-link")
    os.symlink(str(logfile), workdir / "log-link")
    refused = {
        "/proc/self/fd/1": "not a log file: offlog does not open files under /proc, /sys or /dev/fd",
        f"/proc/{server.pid}/fd/2": "under /proc, /sys or /dev/fd",
        "/proc/thread-self/fd/1": "under /proc, /sys or /dev/fd",
        "/dev/fd/1": "under /proc, /sys or /dev/fd",
        "/dev/stdout": "under /proc, /sys or /dev/fd",
        "/tmp/../proc/self/fd/1": "under /proc, /sys or /dev/fd",
        "/sys/kernel/notes": "under /proc, /sys or /dev/fd",
        str(workdir / "stdout-link"): "not a log file",
        str(workdir / "self-link" / "comm"): "under /proc, /sys or /dev/fd",
        str(logfile): "not a log file: the offlog server writes its own log there",
        str(workdir / "log-link"): "the offlog server writes its own log there",
        str(server.log_path): "the offlog server writes its own log there",
    }
    before = (server.log_path.read_bytes(), logfile.read_bytes())
    for path, why in refused.items():
        with pytest.raises(PermissionError) as caught:
            with offlog.ProxyFile(path, server.sock, shm=False) as f:
                f.write(b"INJECTED\n")
        assert caught.value.errno == errno.EACCES and why in str(caught.value), (path, caught.value)
        assert repr(os.path.abspath(path)) in str(caught.value)
    with offlog.ProxyFile("/dev/null", server.sock, shm=False) as f:
        f.write(b"discarded\n")
    wait_for(lambda: open_fds(server.pid) == baseline, what="the server's descriptors back to the baseline")
    assert server.stop() == 0
    assert b"INJECTED" not in server.log_path.read_bytes() + logfile.read_bytes()
    assert server.log_path.read_bytes().startswith(before[0]) and logfile.read_bytes().startswith(before[1])
    assert server.output().count("access denied for") == len(refused)
