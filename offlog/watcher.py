"""One thread that calls back when a watched descriptor becomes ready.

Both sides need to hear from a socket while they wait on something else: a
server ring session sleeps on its doorbell semaphore but must notice a FLUSH
or an EOF on its control socket; a client's ring producer never makes a
syscall on its hot path but must notice that its server hung up. One
:class:`Watcher` thread per process serves all such sockets with one
``epoll`` set. Registrations are one-shot: after a callback the descriptor
stays quiet until :meth:`Watcher.rearm` (or forever, if nobody re-arms it),
so a socket whose data is not read yet cannot make the thread spin.

Callbacks run under the watcher's lock, so :meth:`Watcher.forget` returns
only once no callback for that descriptor is running: its owner may then
close what the callback touches (a server session's doorbell semaphore, a
client's ring). Callbacks must be short and take no lock of their own.
"""

from __future__ import annotations

import os
import select
import threading
from typing import Callable, Dict


class Watcher:
    def __init__(self, events: int, name: str) -> None:
        self._events = events | select.EPOLLONESHOT
        self._epoll = select.epoll()
        self._callbacks: Dict[int, Callable[[], None]] = {}
        self._lock = threading.RLock()  # a callback may forget or re-watch its own descriptor
        self._stop_r, self._stop_w = os.pipe()
        self._epoll.register(self._stop_r, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        with self._lock:
            self._callbacks[fd] = callback
            self._epoll.register(fd, self._events)

    def rearm(self, fd: int) -> None:
        self._epoll.modify(fd, self._events)

    def forget(self, fd: int) -> None:
        """Stop watching ``fd``; returns after a callback for it that is running now."""
        with self._lock:
            if self._callbacks.pop(fd, None) is None:
                return
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass  # already closed: epoll dropped it

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(1.0)

    def _run(self) -> None:
        while True:
            for fd, _ in self._epoll.poll():
                if fd == self._stop_r:
                    return
                with self._lock:
                    callback = self._callbacks.get(fd)
                    if callback is not None:
                        callback()
