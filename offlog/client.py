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
  backlog without blocking while a background thread reconnects (first try
  at once, then with back-off up to once a second). The thread hands the
  backlog to the new transport in steps, taking the writers' token only to
  swap in an empty backlog (a pointer swap) and for the last step of at
  most ``HANDOVER_STEP`` bytes; the copying happens outside it, so no
  write() waits for a re-send. It then installs the new transport and keeps
  pumping its backlog until it is empty, watching the server. Delivery is at
  least once: a record appears twice only if the server died after writing
  it and before confirming it. Errors about the file itself (permission,
  ENOSPC, ...) are raised as always; only a lost server is retried.
  ``reconnect=False`` raises instead, as offlog 0.x does.
* **Whose server.** Every connection (the first, each reconnect) is kept
  only if the server runs as this process's user, root, or a uid allowed by
  ``server_uid=`` (:mod:`offlog.trust`). The first open raises
  :class:`~offlog.trust.UntrustedServerError`; a reconnect treats such a
  server like a missing one: it keeps the bytes and tries again, so a
  process that took the socket path while the real server restarted gets
  nothing, and the real server gets everything once it is back. A close()
  that times out meanwhile says what the last try met.
* **Fork.** The child's ProxyFiles drop their transport (the parent still
  owns the ring, the socket and the backlog). The child's first write opens
  its own connection there and then: one connect and handshake, a few
  hundred microseconds on a local socket (a ring adds its mapping), paid
  once per child and only by a child that writes. So the child owns its
  connection before its first write returns, and what it writes reaches the
  server even if it ends with ``os._exit`` (only bytes still in its own
  backlog, when the server is away or the ring is full, need the child to
  run a little longer). multiprocessing children also close every
  ProxyFile at their exit (a multiprocessing finalizer), Pool workers too.
* **Exit.** Every open ProxyFile is closed (its backlog sent, the server's
  confirmation awaited) at interpreter exit, uncaught exceptions included.
  A server that vanished while nothing was pending costs no wait.
* **flush() and sync().** ``flush()`` is a file object's flush: hand over
  what can go now, never wait (loguru, ``logging.StreamHandler`` and
  ``print(flush=True)`` call it after every record). ``sync()`` is the
  barrier: it returns once the server wrote everything written before it.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable, Deque, Optional, Union

from . import protocol as P
from . import token
from .backlog import Backlog
from .token import WAIT
from .transports import (
    DEFAULT_SOCK_PATH,
    DEFAULT_TIMEOUT,
    WAIT_STEP,
    BacklogLimit,
    Deadline,
    ServerLost,
    ShmUnavailableError,
    Transport,
    Writable,
    admit_all,
    open_transport,
    reported_by_server,
    server_lost,
    server_status,
)
from .trust import ServerUid, UntrustedServerError, allowed_uids

__all__ = [
    "ProxyFile",
    "FileProxy",
    "ShmUnavailableError",
    "UntrustedServerError",
    "server_status",
    "DEFAULT_SOCK_PATH",
    "DEFAULT_TIMEOUT",
]

#: Seconds between reconnection attempts: the first at once, then doubling up to 1 s.
RETRY_FIRST = 0.05
RETRY_MAX = 1.0
#: The reconnect hands its backlog over in steps; the last one, at most this
#: many bytes, is copied with the writers' token held.
HANDOVER_STEP = 64 * 1024

_live: "weakref.WeakSet[ProxyFile]" = weakref.WeakSet()


class ProxyFile:
    """Append to ``filepath`` through the offlog server at ``sock_path``.

    ``timeout`` (milliseconds) bounds every blocking step: the open, sync()
    and close(). ``shm``: None uses a shared-memory ring when the server
    offers one, True requires one (:class:`ShmUnavailableError` otherwise),
    False never uses one. ``fsync=True`` makes the server fsync on sync().

    The backlog (bytes accepted by write() that the server cannot take yet)
    is unbounded by default, as in offlog 0.x. ``max_queue=BYTES`` is its limit;
    ``on_full`` says what a write that would overflow it does: ``"drop"`` it
    (counted in :attr:`dropped` and reported to the server), ``"block"``
    until there is room (at most ``timeout``), or ``"raise"``
    BlockingIOError.

    ``reconnect=True`` rides out server restarts (see the module docstring);
    ``reconnect=False`` raises when the server is lost.

    The server must run as this process's effective uid or as root; a uid
    (int), or a collection of uids, in ``server_uid`` is allowed too. Any other
    server gets not a byte: :class:`~offlog.trust.UntrustedServerError` (a
    PermissionError) at the open, or, for a reconnect, more tries.
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
        server_uid: ServerUid = None,
    ) -> None:
        self._server_uid = allowed_uids(server_uid)
        self.filepath = os.path.abspath(os.fsdecode(filepath))
        self.sock_path = sock_path
        self.timeout = timeout
        self.reconnect = reconnect
        self._shm = shm
        self._fsync = fsync
        self._limit = BacklogLimit(max_queue, on_full, timeout) if max_queue is not None else None
        self._transport: Any = _Closed(0)
        self._closing = False
        self._close_lock = threading.Lock()  # one close() at a time; the others wait for it
        self._closer: Optional[int] = None  # the thread in close()
        self._install(self._open_transport())
        _live.add(self)

    def write(self, data: Writable) -> None:  # type: ignore[no-redef]
        """Append ``data`` (bytes, or str as UTF-8). Never blocks.

        What cannot be handed over now waits in the backlog, in order, and is
        sent before anything newer. Raises the server's error (same builtin class)
        if it reported one. (Each instance binds this name to its transport's
        ``write``; this method only serves documentation and closed files.)
        """
        raise ValueError("write to a closed ProxyFile")

    @property
    def closed(self) -> bool:
        return isinstance(self._transport, _Closed)

    @property
    def transport(self) -> str:
        """``"shm"``, ``"socket"``, ``"reconnecting"`` while the server is away, or ``"closed"``."""
        return self._transport.name

    @property
    def dropped(self) -> int:
        """Bytes dropped because the backlog was full (``max_queue``, ``on_full="drop"``)."""
        return self._limit.dropped if self._limit else 0

    @property
    def backlog(self) -> int:
        """Bytes accepted by write() but still in this process's backlog (after a
        close() that failed: the bytes it could not deliver)."""
        return self._transport.backlog_bytes

    def flush(self) -> None:
        """Hand over what can go now, as a file object's flush does; never waits
        for the server or the disk. :meth:`sync` is the barrier."""
        if self.closed:
            raise ValueError("flush of a closed ProxyFile")
        self._transport.flush()

    def sync(self, timeout: Optional[float] = None) -> None:
        """Return once the server has written everything written so far (and
        fsynced it, with ``fsync=True``).

        ``timeout`` in milliseconds, default the ProxyFile's; TimeoutError
        when it passes. Against a 0.x server this only waits until
        everything is sent.
        """
        deadline = Deadline(self.timeout if timeout is None else timeout)
        while True:
            transport = self._transport
            if isinstance(transport, _Closed):
                raise ValueError("sync of a closed ProxyFile")
            try:
                return transport.sync(deadline.left_ms())
            except ServerLost:
                continue  # it handed over: its successor is installed; sync that

    def close(self) -> None:
        """Send the backlog, wait for the server to confirm; idempotent. A close()
        racing another waits for that one to end, then returns."""
        if self.closed:
            return
        if self._closer == threading.get_ident():
            raise RuntimeError("close() from a signal handler that interrupted this ProxyFile's close()")
        with self._close_lock:
            if self.closed:
                return
            self._closer = threading.get_ident()
            try:
                self._close()
            finally:
                self._closer = None

    def _close(self) -> None:
        self._closing = True
        self.write = self._write_closed  # type: ignore[method-assign]
        _live.discard(self)
        transport = self._transport
        try:
            while True:
                try:
                    transport.close()
                    break
                except ServerLost:
                    transport = self._transport  # its successor, or _Closed if nothing was pending
        except BaseException:
            self._transport = _Closed(self._transport.backlog_bytes)
            raise
        self._transport = _Closed(0)

    # -- transports -------------------------------------------------------------
    def _open_transport(self) -> Transport:
        transport = open_transport(
            self.filepath, self.sock_path, self.timeout, self._shm, self._fsync, self._limit, self._server_uid
        )
        if self.reconnect:
            transport.on_lost = self._server_lost
        return transport

    def _install(self, transport: Any) -> None:
        self._transport = transport
        if not self._closing:
            self.write = transport.write  # type: ignore[method-assign]

    def _server_lost(self, unconfirmed: Backlog) -> Any:
        """Hand ``unconfirmed`` (a lost server's unconfirmed bytes) to a new
        reconnector, which becomes the transport; return its write."""
        if self._closing and not unconfirmed:
            self._install(_Closed(0))  # nothing pending: no reconnect, no wait
            return self._write_closed
        reconnecting = _Reconnecting(self, unconfirmed)
        self._install(reconnecting)
        return reconnecting.write

    def _write_closed(self, data: Writable) -> None:
        raise ValueError("write to a closed ProxyFile")

    def _after_fork_in_child(self) -> None:
        if not self.closed:
            self._transport.detach(self._write_after_fork)
            self._install(_AfterFork(self))

    def _write_after_fork(self, data: Writable) -> None:
        """Where a ``write`` bound before the fork sends the child's bytes."""
        self.write(data)

    def __enter__(self) -> "ProxyFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class _Closed:
    """The transport of a closed ProxyFile: it answers, and refuses writes."""

    name = "closed"

    def __init__(self, undelivered: int) -> None:
        self.backlog_bytes = undelivered

    def write(self, data: Writable) -> None:
        raise ValueError("write to a closed ProxyFile")

    def flush(self) -> None:
        raise ValueError("flush of a closed ProxyFile")

    def close(self) -> None:
        pass

    def detach(self, forward: Callable[[Writable], None]) -> None:
        pass


class _Reconnecting(token.Guarded):
    """The transport while the server is away: a backlog here, a reconnect in the background."""

    name = "reconnecting"

    def __init__(self, proxy: ProxyFile, backlog: Backlog) -> None:
        self._proxy = proxy
        self._backlog = backlog
        self._limit = proxy._limit
        self._admit = proxy._limit.admit if proxy._limit else admit_all
        self._token = token.new()
        self._reentered: Deque[bytes] = deque()
        self._forward = None  # a reconnector forwards through _replacement instead
        self._replacement: Optional[Transport] = None
        self._returned: Optional[Backlog] = None  # what a transport lost during the hand-over gave back
        self._error: Optional[BaseException] = None
        self._last_try: Optional[BaseException] = None  # what the last failed reconnect met
        self._done = threading.Event()
        self._stopped = False
        self._closed = False
        self._thread: Optional[threading.Thread] = None  # started by the first call that needs it
        self._running = threading.Lock()  # held by the one thread in _run

    @property
    def backlog_bytes(self) -> int:
        return len(self._backlog) + sum(map(len, self._reentered))

    def start(self) -> None:
        """Start the reconnect thread unless it runs or has finished its work. Not
        in ``__init__``: a hand-over gives it the bytes first (an interrupt landing
        in a thread's start-up then cannot lose them), and a host that cannot
        start a thread now gets another try on the next write, sync or close."""
        thread = self._thread
        if self._done.is_set() or self._running.locked() or (thread is not None and thread.is_alive()):
            return
        self._thread = thread = threading.Thread(target=self._run, name="offlog-reconnect", daemon=True)
        try:
            thread.start()
        except RuntimeError:
            self._thread = None

    def write(self, data: Writable) -> None:
        self._write_slow(data)  # the server is away: no hot path to take

    def _wait_for_room(self, since: float) -> None:
        self._limit.check_wait(since)  # type: ignore[union-attr]
        self._done.wait(WAIT_STEP * 10)

    def _after_exception(self) -> None:
        self._backlog.repair()

    def _write_locked(self, view: memoryview) -> Any:
        self._take_reentered()
        if self._forward is not None:  # forked: the child's own connection
            return self._forward
        if self._replacement is not None:
            return self._replacement.write  # a thread that raced the switch
        if self._closed:
            raise ValueError("write to a closed ProxyFile")
        if self._error is not None:
            raise self._error.with_traceback(None)
        self.start()
        if view.nbytes:
            verdict = self._admit(len(self._backlog), view.nbytes)
            if verdict is WAIT:
                return WAIT
            if verdict:
                self._backlog.append(view)
        return None

    def flush(self) -> None:
        pass  # nothing can go anywhere until the server is back

    # -- the reconnect thread ------------------------------------------------------
    def _run(self, until: Optional[Deadline] = None) -> None:
        """One reconnect thread per reconnector, whatever start() saw: an
        interrupt inside ``Thread.is_alive()`` can make a running thread look
        stopped (CPython's ``_wait_for_tstate_lock``), and a second thread would
        hand part of the backlog to a transport that is never installed. The
        lock is taken here, in the thread itself, where no signal handler runs.
        With ``until``, a caller that may block (sync, close) reconnects itself,
        because no thread could be started (at exit, or a thread limit)."""
        if not self._running.acquire(blocking=False):
            return
        try:
            if not self._done.is_set():
                self._reconnect(until)
        finally:
            self._running.release()

    def _reconnect(self, until: Optional[Deadline]) -> None:
        delay = 0.0
        while not self._stopped:
            try:
                time.sleep(delay if until is None else until.step(delay))
                if until is not None:
                    until.left()
            except TimeoutError:
                return
            delay = min(max(delay * 2, RETRY_FIRST), RETRY_MAX)
            try:
                transport = open_transport(
                    self._proxy.filepath,
                    self._proxy.sock_path,
                    self._proxy.timeout,
                    self._proxy._shm,
                    self._proxy._fsync,
                    self._limit,
                    self._proxy._server_uid,
                )
            except Exception as exc:
                if reported_by_server(exc) and not server_lost(exc):
                    self._fail(exc)  # the file itself: permission, a directory, ...
                    return
                self._last_try = exc  # no server, or one not trusted: try again
                continue
            transport.on_lost = self._lost_in_hand_over
            if self._hand_over(transport):
                self._done.set()
                if until is None:  # (an inline reconnect's caller drains the backlog itself)
                    self._pump(transport)
                return

    def _hand_over(self, transport: Transport) -> bool:
        """Move the backlog into ``transport`` and install it; False if it lost its
        server meanwhile (then every byte is back in the backlog, in order)."""
        while True:
            self._take()
            try:
                if self._returned is not None:
                    return self._take_back(None)
                chunk, self._backlog = self._backlog, Backlog()
                if len(chunk) <= HANDOVER_STEP or self._stopped or self._closed:
                    if not transport.take_backlog(chunk):
                        return self._take_back(chunk)
                    if self._returned is not None:
                        return self._take_back(None)
                    transport.on_lost = self._proxy._server_lost if self._proxy.reconnect else None
                    self._replacement = transport
                    if self._proxy._transport is self:
                        self._proxy._install(transport)
                    return True
            finally:
                self._token.append(True)
            if not transport.take_backlog(chunk):  # the big copy, with writers going on meanwhile
                self._take()
                try:
                    return self._take_back(chunk)
                finally:
                    self._token.append(True)

    def _lost_in_hand_over(self, unconfirmed: Backlog) -> Any:
        self._returned = unconfirmed
        return self.write

    def _take_back(self, chunk: Optional[Backlog]) -> bool:
        """Token held: the new transport's server went too. Oldest first: what it
        had, then ``chunk`` (not taken), then the backlog."""
        backlog = self._returned or Backlog()
        self._returned = None
        if chunk is not None:
            backlog.extend(chunk)
        backlog.extend(self._backlog)
        self._backlog = backlog
        return False

    def _pump(self, transport: Transport) -> None:
        """Keep handing the new transport's backlog over until it is empty."""
        try:
            while not self._stopped and transport.pump():
                transport.idle()
            if self._proxy._transport is not transport and not transport.handed_over:
                transport.close()  # never installed (the ProxyFile moved on): deliver, then let go
        except Exception:
            pass  # the file's error waits for the application's next call
        finally:
            successor = self._proxy._transport
            if isinstance(successor, _Reconnecting):
                successor.start()  # the server went again: the new reconnector takes over

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._done.set()

    def _await(self, timeout_ms: Optional[float]) -> Transport:
        self.start()
        if self._thread is None and not self._done.is_set():  # no thread to be had: reconnect here
            self._run(Deadline(timeout_ms))
        if not self._done.wait(None if timeout_ms is None else timeout_ms / 1000.0):
            last = self._last_try
            raise TimeoutError(
                f"the offlog server at {self._proxy.sock_path} did not come back in time: "
                f"{self.backlog_bytes} bytes not delivered"
                + ("" if last is None else f" (the last try: {P.exception_text(last)})")
            )
        if self._error is not None:
            raise self._error.with_traceback(None)
        return self._replacement  # type: ignore[return-value]

    def sync(self, timeout_ms: Optional[float]) -> None:
        deadline = Deadline(timeout_ms)
        self._await(timeout_ms).sync(deadline.left_ms())

    def close(self) -> None:
        try:
            transport = self._await(self._proxy.timeout)
        except BaseException:
            self._give_up()
            raise
        transport.close()

    def _give_up(self) -> None:
        """close() failed: stop reconnecting; a write racing it raises ValueError
        (under the token, so none slips into a backlog that nothing will send)."""
        if self._take():
            try:
                self._stopped = self._closed = True
            finally:
                self._token.append(True)
        else:  # a signal handler that interrupted a write of ours
            self._stopped = self._closed = True

    def detach(self, forward: Callable[[Writable], None]) -> None:
        self._stopped = True
        self._backlog = Backlog()
        self._reentered.clear()
        self._token = token.new()
        self._forward = forward


_Reconnecting.HOLDING = token.holding(_Reconnecting._hand_over)


class _AfterFork:
    """A forked child's stand-in transport until its first write, which opens
    the child's own connection synchronously (see the module docstring)."""

    name = "reconnecting"
    backlog_bytes = 0

    def __init__(self, proxy: ProxyFile) -> None:
        self._proxy = proxy
        self._lock = threading.Lock()
        self._opener: Optional[int] = None  # the thread opening the child's connection
        self._early: Deque[bytes] = deque()  # from signal handlers that interrupted the open

    def write(self, data: Writable) -> None:
        proxy = self._proxy
        if self._opener == threading.get_ident():  # a signal handler re-entering our own open
            self._early.append(data.encode("utf-8") if isinstance(data, str) else bytes(data))
            return
        with self._lock:
            try:
                self._opener = threading.get_ident()
                if proxy._transport is self:
                    try:
                        proxy._install(proxy._open_transport())
                    except Exception as exc:
                        if not proxy.reconnect or (reported_by_server(exc) and not server_lost(exc)):
                            raise
                        proxy._server_lost(Backlog())  # no server now: a backlog, a reconnect in the background
            finally:
                self._opener = None
        while self._early:
            proxy._transport.write(self._early.popleft())
        proxy._transport.write(data)

    def flush(self) -> None:
        pass

    def sync(self, timeout_ms: Optional[float]) -> None:
        pass

    def close(self) -> None:
        pass

    def detach(self, forward: Callable[[Writable], None]) -> None:
        pass


FileProxy = ProxyFile


def _close_all() -> None:
    for proxy in list(_live):
        try:
            proxy.close()
        except Exception as exc:  # at exit there is no caller left to raise to
            print(f"offlog: could not deliver to {proxy.filepath}: {P.exception_text(exc)}", file=sys.stderr)


def _after_fork_in_child() -> None:
    from .transports import _Hangups

    _Hangups.reset_after_fork()
    for proxy in list(_live):
        proxy._after_fork_in_child()


def _register_exit_in_worker(_: Any) -> None:
    """In a multiprocessing child: close every ProxyFile at its exit (it ends
    with os._exit, so atexit does not run)."""
    sys.modules["multiprocessing.util"].Finalize(None, _close_all, exitpriority=10)


class _AfterForkHook:
    """multiprocessing keeps its after-fork hooks by weak reference: this one lives here."""

    registered = False


_after_fork_hook = _AfterForkHook()


def _before_fork() -> None:
    """Just before a fork: if multiprocessing is in use (it is imported before it
    forks a worker), have its children close our ProxyFiles at their exit. Done
    here rather than at import, so a process that never uses multiprocessing
    never imports it."""
    util = sys.modules.get("multiprocessing.util")
    if util is not None and not _after_fork_hook.registered:
        util.register_after_fork(_after_fork_hook, _register_exit_in_worker)
        _after_fork_hook.registered = True


atexit.register(_close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
