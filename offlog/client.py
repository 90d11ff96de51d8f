"""ProxyFile: what an application holds to append to a file through offlog.

Theory of operation
-------------------
A ProxyFile owns one *transport* (:mod:`offlog.transports`) and binds its
own ``write`` straight to the transport's ``write``: the hot path is one
Python call, not two. Everything else here is about the moments between
transports:

* **Server restarts.** With ``reconnect=True`` (the default) a transport
  that loses its server hands every byte the server had not confirmed to
  :class:`_Reconnecting`, which becomes the transport: writes go on into its
  local queue without blocking while a background thread reconnects (first
  try at once, then with back-off up to once a second), re-sends the queue in
  order and installs whatever transport the new server offers. Delivery is
  at least once: a record appears twice only if the server died after
  writing it and before confirming it. Errors about the file itself
  (permission, ENOSPC, ...) are raised as always; only a lost server is
  retried. ``reconnect=False`` raises instead, as offlog 0.x does.
* **Fork.** The child's ProxyFiles drop their transport (the parent still
  owns the ring, the socket and the queue) and reconnect on their first
  write.
* **Exit.** Every open ProxyFile is closed (its queue sent, the server's
  confirmation awaited) at interpreter exit, uncaught exceptions included.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Union

from . import protocol as P
from .transports import (
    DEFAULT_SOCK_PATH,
    DEFAULT_TIMEOUT,
    Buffer,
    Deadline,
    QueueLimit,
    ServerGone,
    ShmUnavailableError,
    SocketTransport,
    admit_all,
    open_transport,
    reported_by_server,
    server_gone,
    server_status,
)

__all__ = ["ProxyFile", "FileProxy", "ShmUnavailableError", "server_status", "DEFAULT_SOCK_PATH", "DEFAULT_TIMEOUT"]

#: Seconds between reconnection attempts: the first at once, then doubling up to 1 s.
RETRY_FIRST = 0.05
RETRY_MAX = 1.0

_live: "weakref.WeakSet[ProxyFile]" = weakref.WeakSet()


class ProxyFile:
    """Append to ``filepath`` through the offlog server at ``sock_path``.

    ``timeout`` (milliseconds) bounds every blocking step: the open, flush()
    and close(). ``shm``: None uses a shared-memory ring when the server
    offers one, True requires one (:class:`ShmUnavailableError` otherwise),
    False never uses one. ``fsync=True`` makes the server fsync on flush().

    The local queue (writes the server cannot take yet) is unbounded by
    default, as in offlog 0.x. ``max_queue=BYTES`` bounds it; ``on_full``
    says what a write that would overflow it does: ``"drop"`` it (counted in
    :attr:`dropped` and reported to the server), ``"block"`` until there is
    room (at most ``timeout``), or ``"raise"`` BlockingIOError.

    ``reconnect=True`` rides out server restarts (see the module docstring);
    ``reconnect=False`` raises when the server goes away.
    """

    def __init__(
        self,
        filepath: Union[str, bytes, "os.PathLike[str]"],
        sock_path: str = DEFAULT_SOCK_PATH,
        timeout: Optional[float] = DEFAULT_TIMEOUT,
        *,
        shm: Optional[bool] = None,
        fsync: bool = False,
        max_queue: Optional[int] = None,
        on_full: str = "drop",
        reconnect: bool = True,
    ) -> None:
        self.filepath = os.path.abspath(os.fsdecode(filepath))
        self.sock_path = sock_path
        self.timeout = timeout
        self.reconnect = reconnect
        self._shm = shm
        self._fsync = fsync
        self._limit = QueueLimit(max_queue, on_full, timeout) if max_queue is not None else None
        self._transport: Any = None
        self._closing = False
        self._install(self._open_transport())
        _live.add(self)

    def write(self, data: Buffer) -> None:  # type: ignore[no-redef]
        """Append ``data`` (bytes, or str as UTF-8). Never blocks.

        What cannot be handed over now is queued locally, in order, and sent
        before anything newer. Raises the server's error (same builtin class)
        if it reported one. (Each instance binds this name to its transport's
        ``write``; this method only serves documentation and closed files.)
        """
        raise ValueError("write to a closed ProxyFile")

    @property
    def closed(self) -> bool:
        return self._transport is None

    @property
    def transport(self) -> str:
        """``"shm"``, ``"socket"``, or ``"reconnecting"`` while the server is away."""
        return self._transport.name

    @property
    def dropped(self) -> int:
        """Bytes dropped because the local queue was full (``max_queue``, ``on_full="drop"``)."""
        return self._limit.dropped if self._limit else 0

    @property
    def backlog(self) -> int:
        """Bytes accepted by write() but still queued in this process."""
        return self._transport.backlog_bytes

    def flush(self, timeout: Optional[float] = None) -> None:
        """Return once the server has written everything written so far.

        ``timeout`` in milliseconds, default the ProxyFile's. Against a 0.x
        server this only waits until everything is sent.
        """
        if self._transport is None:
            raise ValueError("flush of a closed ProxyFile")
        deadline = Deadline(self.timeout if timeout is None else timeout)
        while True:
            try:
                return self._transport.flush(deadline.left_ms())
            except ServerGone as gone:
                gone.transport.divert()  # installs a _Reconnecting; flush that

    def close(self) -> None:
        """Send what is queued, wait for the server to confirm; idempotent."""
        transport = self._transport
        if transport is None:
            return
        self._closing = True
        self.write = self._write_closed  # type: ignore[method-assign]
        _live.discard(self)
        try:
            while True:
                try:
                    transport.close()
                    return
                except ServerGone as gone:
                    gone.transport.divert()
                    transport = self._transport  # the _Reconnecting that took over
        finally:
            self._transport = None
            self.write = self._write_closed  # type: ignore[method-assign]

    # -- transports -------------------------------------------------------------
    def _open_transport(self) -> SocketTransport:
        transport = open_transport(self.filepath, self.sock_path, self.timeout, self._shm, self._fsync, self._limit)
        if self.reconnect:
            transport.on_lost = self._server_lost
        return transport

    def _install(self, transport: Any) -> None:
        self._transport = transport
        if not self._closing:
            self.write = transport.write  # type: ignore[method-assign]

    def _server_lost(self, unwritten: List[bytes]) -> Callable[[Buffer], None]:
        """Hand ``unwritten`` (a lost server's unconfirmed bytes; nothing after a fork)
        to a new reconnector, which becomes the transport."""
        reconnecting = _Reconnecting(self, unwritten)
        self._install(reconnecting)
        return reconnecting.write

    def _write_closed(self, data: Buffer) -> None:
        raise ValueError("write to a closed ProxyFile")

    def _after_fork_in_child(self) -> None:
        if self._transport is not None:
            self._transport.detach()
            self._install(_ReconnectAfterFork(self))

    def __enter__(self) -> "ProxyFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class _Reconnecting:
    """The transport while the server is away: queue locally, reconnect in the background."""

    name = "reconnecting"

    def __init__(self, proxy: ProxyFile, unwritten: List[bytes]) -> None:
        self._proxy = proxy
        self._queue: Deque[bytes] = deque(unwritten)
        self._queued = sum(len(chunk) for chunk in unwritten)
        self._admit = proxy._limit.admit if proxy._limit else admit_all
        self._lock = threading.Lock()
        self._replacement: Optional[SocketTransport] = None
        self._error: Optional[BaseException] = None
        self._done = threading.Event()
        self._stopped = False
        threading.Thread(target=self._run, name="offlog-reconnect", daemon=True).start()

    @property
    def backlog_bytes(self) -> int:
        return self._queued

    def write(self, data: Buffer) -> None:
        with self._lock:
            if self._replacement is not None:
                return self._replacement.write(data)  # a thread that raced the switch
            if self._error is not None:
                raise self._error.with_traceback(None)
            chunk = data.encode("utf-8") if isinstance(data, str) else bytes(data)
            if chunk and self._admit(self._queued, len(chunk), lambda: self._queued):
                self._queue.append(chunk)
                self._queued += len(chunk)

    def _run(self) -> None:
        delay = 0.0
        while not self._stopped:
            time.sleep(delay)
            delay = min(max(delay * 2, RETRY_FIRST), RETRY_MAX)
            try:
                transport = self._proxy._open_transport()
            except Exception as exc:
                if reported_by_server(exc) and not server_gone(exc):
                    self._fail(exc)  # the file itself: permission, a directory, ...
                    return
                continue
            with self._lock:
                if self._stopped:
                    transport.close()
                    return
                while self._queue:  # in order, before anything newer
                    transport.write(self._queue.popleft())
                self._queued = 0
                self._replacement = transport
                if self._proxy._transport is self:  # (unless that server vanished already)
                    self._proxy._install(transport)
            self._done.set()
            return

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self._error = exc
        self._done.set()

    def _await(self, timeout_ms: Optional[float]) -> SocketTransport:
        if not self._done.wait(None if timeout_ms is None else timeout_ms / 1000.0):
            raise TimeoutError(
                f"the offlog server at {self._proxy.sock_path} did not come back in time: "
                f"{self._queued} bytes not delivered"
            )
        if self._error is not None:
            raise self._error.with_traceback(None)
        return self._replacement

    def flush(self, timeout_ms: Optional[float]) -> None:
        deadline = Deadline(timeout_ms)
        self._await(timeout_ms).flush(deadline.left_ms())

    def close(self) -> None:
        try:
            transport = self._await(self._proxy.timeout)
        except BaseException:
            self._stopped = True
            raise
        transport.close()

    def divert(self) -> None:
        raise AssertionError("a reconnecting transport has no server to lose")

    def detach(self) -> None:
        self._stopped = True
        self._queue.clear()
        self._queued = 0


class _ReconnectAfterFork:
    """A forked child's stand-in transport until its first write.

    The child connects only if it writes (a child that execs or exits never
    does). With ``reconnect=True`` that first write goes to a reconnector, so
    it does not block on the handshake either; otherwise it opens a transport
    there and then, and raises what the open raises, as offlog 0.x would.
    """

    name = "reconnecting"
    backlog_bytes = 0

    def __init__(self, proxy: ProxyFile) -> None:
        self._proxy = proxy

    def write(self, data: Buffer) -> None:
        proxy = self._proxy
        if proxy.reconnect:
            proxy._server_lost([])(data)
        else:
            proxy._install(proxy._open_transport())
            proxy.write(data)

    def flush(self, timeout_ms: Optional[float]) -> None:
        pass

    def close(self) -> None:
        pass

    def detach(self) -> None:
        pass


FileProxy = ProxyFile


def _close_all() -> None:
    for proxy in list(_live):
        try:
            proxy.close()
        except Exception as exc:  # at exit there is no caller left to raise to
            print(f"offlog: could not flush {proxy.filepath}: {P.exception_text(exc)}", file=sys.stderr)


def _after_fork_in_child() -> None:
    from .transports import _Hangups

    _Hangups.reset_after_fork()
    for proxy in list(_live):
        proxy._after_fork_in_child()


atexit.register(_close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
