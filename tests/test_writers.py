"""The writers on their own: real files, a real FIFO that stalls, real threads.

Sessions here are plain objects with the attributes and callbacks the server's
sessions give the writers; every callback the writers report is recorded.
"""

from __future__ import annotations

import os
import threading
import types
from typing import List

import pytest
from support import wait_for

from offlog.files import FileTable
from offlog.writers import Writers


class Reports:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: List[str] = []

    def run(self, calls) -> None:
        for call in calls:
            call()

    def add(self, what: str) -> None:
        with self.lock:
            self.calls.append(what)


def session(reports: Reports, files: FileTable, path: str, sid: int):
    s = types.SimpleNamespace(id=sid, ring=None, fsync=False, written=0, confirm_at=1 << 62, reading=True, failed=None)
    s.file, s.first = files.reserve(path)
    s.on_opened = lambda error: reports.add(f"{sid} opened {error!r}")
    s.on_written = lambda: reports.add(f"{sid} written")
    s.on_flushed = lambda token: reports.add(f"{sid} flushed {token}")
    s.on_finished = lambda: reports.add(f"{sid} finished")
    s.on_failed = lambda error, line: reports.add(f"{sid} failed {error!r}")
    s.on_released = lambda: reports.add(f"{sid} released")
    return s


@pytest.fixture
def fifo(workdir):
    """A FIFO with a reader that never reads: writes to it block once its pipe is full."""
    path = workdir / "stalled.fifo"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    yield str(path)
    os.close(reader)


def test_jobs_queued_behind_a_file_that_stalls_are_served_by_the_next_leader(workdir, fifo):
    """The leader's pass has the FIFO's append first and eight other files' opens and
    appends after it; it blocks in the FIFO, the standby takes the lead within STALL and
    serves the eight (before: they stayed in the stuck pass's list until the FIFO moved)."""
    reports, warnings = Reports(), []
    files = FileTable(lambda msg: None, warnings.append)
    writers = Writers(files, reports.run, warnings.append)
    stalled = session(reports, files, fifo, 0)
    others = [session(reports, files, str(workdir / f"other{i}.log"), i + 1) for i in range(8)]
    for s in [stalled, *others]:
        writers.open(s, s.first)
    writers.append(stalled, [b"s" * (1024 * 1024)])  # more than the pipe holds: blocks
    for s in others:
        writers.append(s, [b"record %d\n" % s.id])
        writers.flush(s, s.id)
    writers.start()
    try:
        wait_for(lambda: all(f"{s.id} flushed {s.id}" in reports.calls for s in others), what="the other files")
        for s in others:
            assert (workdir / f"other{s.id - 1}.log").read_bytes() == b"record %d\n" % s.id
        assert writers.stalls >= 1
        assert not any(c.startswith("0 flushed") for c in reports.calls)
    finally:
        drain = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        wait_for(lambda: _drained(drain) and stalled.written > 0, what="the stalled append to finish")
        os.close(drain)
        writers.stop()
    assert warnings == []


def _drained(fd: int) -> bool:
    try:
        while os.read(fd, 65536):
            pass
    except BlockingIOError:
        pass
    return True


def test_a_writer_thread_that_fails_outside_any_file_hands_on_its_role(workdir):
    """A mistake of ours in the pass itself (here: one ring's poll raising) ends that
    thread only: the failure is logged, another thread leads, and every other file's
    open, append and flush are still served."""
    reports, warnings = Reports(), []
    files = FileTable(lambda msg: None, warnings.append)
    writers = Writers(files, reports.run, warnings.append)
    failing = session(reports, files, str(workdir / "failing.log"), 0)
    raised = []

    def poll() -> bool:
        if not raised:
            raised.append(True)
            raise RuntimeError("a bug in a ring's poll")
        return False

    failing.ring = types.SimpleNamespace(consumer=types.SimpleNamespace(has_data=poll))
    writers.add_ring(failing)
    writers.start()
    try:
        wait_for(lambda: raised, what="the failing poll")
        other = session(reports, files, str(workdir / "other.log"), 1)
        writers.open(other, other.first)
        writers.append(other, [b"served\n"])
        writers.flush(other, 7)
        wait_for(lambda: "1 flushed 7" in reports.calls, what="the other file's flush")
        assert (workdir / "other.log").read_bytes() == b"served\n"
        assert any("Internal error in a writer thread: RuntimeError" in w for w in warnings), warnings
        wait_for(lambda: writers.threads == 2, what="a leader and a standby again")
    finally:
        writers.stop()
