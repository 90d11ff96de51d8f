"""The watcher thread: one epoll for the sockets a process must hear while it waits elsewhere."""

from __future__ import annotations

import select
import socket
import threading

from offlog.watcher import Watcher


def test_forget_returns_only_after_the_running_callback_for_that_socket():
    """A session closes its doorbell right after forgetting its control socket: a
    callback still posting to that doorbell must have finished by then."""
    watcher = Watcher(select.EPOLLIN, "test watcher")
    ours, theirs = socket.socketpair()
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def callback() -> None:
        started.set()
        release.wait(30)
        finished.set()

    forgotten = threading.Event()

    def forget() -> None:
        watcher.forget(ours.fileno())
        forgotten.set()

    try:
        watcher.watch(ours.fileno(), callback)
        theirs.send(b"x")
        assert started.wait(30)
        forgetter = threading.Thread(target=forget)
        forgetter.start()
        forgetter.join(0.5)
        assert not forgotten.is_set(), "forget() returned while the callback was still running"
        release.set()
        forgetter.join(30)
        assert forgotten.is_set() and finished.is_set()
    finally:
        release.set()
        watcher.close()
        ours.close()
        theirs.close()


def test_a_callback_may_forget_its_own_socket():
    """The lock that makes forget() wait is re-entrant: a callback can stop its own watch."""
    watcher = Watcher(select.EPOLLIN, "test watcher")
    ours, theirs = socket.socketpair()
    done = threading.Event()

    def callback() -> None:
        watcher.forget(ours.fileno())
        done.set()

    try:
        watcher.watch(ours.fileno(), callback)
        theirs.send(b"x")
        assert done.wait(30)
        watcher.watch(ours.fileno(), callback)  # forgotten: it can be watched again
        watcher.forget(ours.fileno())
    finally:
        watcher.close()
        ours.close()
        theirs.close()
