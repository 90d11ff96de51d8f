"""Review of the event-loop server (issue 11): one loop, writers' passes, doorbell waiters.

Each xfail test pins a bug found in review and fails on the code it was found
in; the others document edge cases that hold. Stuck files are FIFOs: one with a
reader that never reads (a write blocks once the pipe is full), or one with no
reader at all (an open for writing blocks). Real servers, real sockets, no mocks.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from pathlib import Path
from typing import Any, List

import pytest
from support import wait_for

from offlog import protocol as P
from offlog.client import server_status

MIB = 1024 * 1024


class Raw:
    """A framed client spoken by hand (P.ClientConnection) over a blocking socket."""

    def __init__(self, sock_path: str, path: Any = None, flags: int = 0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(sock_path)
        self.conn = P.ClientConnection()
        if path is not None:
            self.send(P.Open(str(path), flags))

    def send(self, *events: Any) -> None:
        self.sock.sendall(b"".join(self.conn.send(e) for e in events))

    def next_event(self) -> Any:
        """The next answer that is not a Greeting or a WRITTEN."""
        while True:
            event = self.conn.next_event()
            if event is P.NEED_DATA:
                try:
                    self.conn.receive_data(self.sock.recv(65536))
                except ConnectionResetError:
                    self.conn.receive_data(b"")
            elif not isinstance(event, (P.Greeting, P.Written)):
                return event

    def opened(self) -> "Raw":
        assert isinstance(self.next_event(), P.Opened)
        return self

    def end(self) -> Any:
        self.conn.send(P.EndOfData())
        self.sock.shutdown(socket.SHUT_WR)
        return self.next_event()

    def close(self) -> None:
        self.sock.close()


def status(server, timeout_ms: int = 30_000) -> dict:
    return server_status(server.sock, timeout_ms)


def full_fifo(workdir: Path, name: str = "stuck.fifo") -> tuple:
    """A FIFO with a reader that never reads: (path, reader fd). Writes block once 64 KiB wait."""
    path = workdir / name
    os.mkfifo(path)
    return path, os.open(path, os.O_RDONLY | os.O_NONBLOCK)


def stall(server, client: Raw, stalls: int = 1) -> None:
    """Fill ``client``'s FIFO so the writer appending it blocks; wait for the standby to take over."""
    client.send(P.Data(b"s" * (256 * 1024)))
    wait_for(lambda: status(server)["writers"]["stalls"] >= stalls, 30, what="a writer stuck on the FIFO")


def thread_states(pid: int) -> List[str]:
    """The scheduler state letter of each thread of ``pid`` (R runs or waits for a CPU)."""
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except FileNotFoundError:
            continue
        states.append(stat.rsplit(")", 1)[1].split()[0])
    return states


def main_thread_state(pid: int) -> str:
    return Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def in_fifo_open(pid: int) -> bool:
    """A thread of ``pid`` waits in open() for the other end of a FIFO."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            if Path(f"/proc/{pid}/task/{tid}/wchan").read_text() == "wait_for_partner":
                return True
        except FileNotFoundError:
            continue
    return False


def drain(reader: int, want: int) -> None:
    """Read ``want`` bytes from the FIFO's reader (a stuck writer moves on)."""
    got = 0

    def more() -> bool:
        nonlocal got
        try:
            got += len(os.read(reader, 1 << 20))
        except BlockingIOError:
            pass
        return got >= want

    wait_for(more, 30, 0.001, what="the FIFO's bytes")


# Bug: writers.py Writers._pass takes every file with queued jobs out of _jobbed
# at the start of a pass; when the leader stalls on one of them, the standby
# takes over, and the files after it in that pass are put back in _jobbed only
# when the stuck thread's pass ends. Until their client sends more, their jobs
# (a last record, a FLUSH, the FINISH of a close) wait for another client's
# stalled file: here a record of another file's client is not written while
# the FIFO stays full.
@pytest.mark.xfail(strict=True, reason="jobs taken by a pass that stalls wait for the stalled file")
def test_a_record_queued_in_the_pass_that_stalls_on_another_file_is_written(start_server, workdir):
    server = start_server()
    path, reader = full_fifo(workdir)
    stuck = Raw(server.sock, path).opened()
    other = Raw(server.sock, workdir / "other.log").opened()
    try:
        for attempt in range(12):
            other.send(P.Data(b"warm %d\n" % attempt))
            stuck.send(P.Data(b"w"))
            threading.Event().wait(0.012)  # the leader now polls every few ms: the next two jobs share a pass
            stuck.send(P.Data(b"s" * (192 * 1024)))
            other.send(P.Data(b"attempt %d\n" % attempt))
            wait_for(lambda: status(server)["writers"]["stalls"] > attempt, 30, what="a writer stuck on the FIFO")
            wait_for(
                lambda: b"attempt %d\n" % attempt in (workdir / "other.log").read_bytes(),
                10,
                what="another file's record while the FIFO is stuck",
            )
            drain(reader, 1 + 192 * 1024)
    finally:
        os.close(reader)
        stuck.close()
        other.close()
        server.kill()
