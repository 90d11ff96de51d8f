"""Paths are data: whatever bytes a client names, the server logs them escaped on one
line, gives back everything it took, and never opens its own descriptors, another
process's or the kernel's files on a client's word."""

from __future__ import annotations

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
