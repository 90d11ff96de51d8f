"""The transports under a ProxyFile: how its bytes reach the server.

Theory of operation
-------------------
A :class:`Transport` is one connection: a *control channel* plus a *data
path*, composed, not inherited.

* The control channel (:class:`Control`) is the socket's control side: it
  reads the server (:class:`_Channel`), numbers FLUSH requests, reports
  DROPPED, says whether an error means a lost server or a failed file, waits
  a step at a time watching the server, and half-closes for BYE.
* The data path takes ``write()``'s bytes, and its ``write`` is bound straight
  as the transport's (and the ProxyFile's): the socket itself, as DATA frames
  (:class:`~offlog.socketpath.FramedSocket`) or raw bytes to a 0.x server
  (:class:`~offlog.socketpath.LegacySocket`); or a shared-memory ring
  (:class:`offlog.shm.ring.Producer`), and then the socket carries control
  frames only.

The transport holds what needs both: how ``sync()`` and ``close()`` end, and
what a lost server or a failed file does to the data path. Every data path
keeps the same rules: a write never blocks; what cannot go out now waits in
its :class:`~offlog.backlog.Backlog`, in order, and everything newer waits
behind it; a write first moves the backlog on, so the backlog's limit
(``max_queue``) judges it as it is now. ``sync()`` and ``close()``
hand the backlog over, then wait for the server's answer.

Every wait watches the server. Waiting for room, for FLUSHED or for BYE is
a ``poll()`` on the control socket with a short timeout (never ``select``:
descriptors above 1024 are ordinary in a busy process), so an EOF, a reset or
an ERROR from the server ends the wait at once, not at its deadline.

Losing the server. Every transport knows which of its bytes the server has
not confirmed as written (its *unconfirmed* bytes): a ring's ``[TAIL, head)``
plus its backlog; on the framed socket, every DATA payload not yet covered
by a WRITTEN (or FLUSHED) from the server, plus the backlog; on a 0.x
server's socket only the backlog (that dialect confirms nothing). When the
server is *lost* -- EOF, a reset, ``EPIPE``, or its "server exited" error
(errno ``ESHUTDOWN``) -- and the owner gave the transport an ``on_lost``
callback, the transport *hands over*: it gives those bytes, in order, to
``on_lost`` and forwards every later write to what ``on_lost`` returned.
Errors about the file itself (permission, ENOSPC, ...) are never handed
over: they are raised. A transport whose frame stream was cut mid-send by an
exception (a ``KeyboardInterrupt`` between ``send`` returning and the
bookkeeping) cannot know what the server received: it hands over too, and
the reconnect re-sends its unconfirmed bytes (at least once, never torn).

A ring client learns of a lost server without a syscall on its hot path: the
process-wide :class:`_Hangups` thread waits for ``EPOLLRDHUP`` on the control
sockets of all rings and interrupts the producer, whose next write takes the
slow path and looks at the socket. The thread holds producers weakly: an
unclosed ProxyFile is still garbage-collected.

Every connection starts in :func:`connect`, which keeps it only if the server
runs as a user the client trusts (:mod:`offlog.trust`): the open, the 0.x
fallback, every reconnect and the control requests. A refused server gets
not a byte.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import socket
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Tuple, Union

from . import protocol as P
from .backlog import Backlog, Buffer
from .defaults import DEFAULT_SOCK_PATH, DEFAULT_TIMEOUT
from .shm import ClientRing, UnsafeRing, unsupported_reason
from .shm.ring import admit_all
from .socketpath import FramedSocket, LegacySocket
from .token import WAIT
from .trust import Allowed, ServerUid, allowed_uids, check_server
from .watcher import Watcher

#: Seconds one step of a wait sleeps in poll() before it looks again.
WAIT_STEP = 0.0005
#: Descriptors one handshake read takes (SCM_RIGHTS); an offer brings one, more are refused.
MAX_FDS = 4
#: Client states in which a descriptor received may still be the offered ring's.
_OFFER_STATES = ("GREETING", "OPENING", "OFFERED", "MAPPING")
_WATCH = select.POLLIN | getattr(select, "POLLRDHUP", 0)
_RECV_FDS_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_CMSG_CLOEXEC", 0)
#: What write() takes: bytes-like, or str (encoded as UTF-8, as in 0.x).
Writable = Union[Buffer, str]
#: on_lost(unconfirmed bytes, in order) -> the write() that takes over.
OnLost = Callable[[Backlog], Callable[[Writable], None]]


class ShmUnavailableError(OSError):
    """``shm=True`` was asked for, but no ring could be set up."""


class ServerLost(Exception):
    """Internal: ``transport``'s server was lost and its unconfirmed bytes handed over."""

    def __init__(self, transport: Any) -> None:
        super().__init__("the offlog server was lost")
        self.transport = transport


def server_lost(exc: BaseException) -> bool:
    """True if ``exc`` means the server is lost, not that the file failed.
    What the server itself reports is about the file (a FIFO's EPIPE, a network
    file system's ETIMEDOUT) unless it says it is exiting."""
    if reported_by_server(exc):
        return (isinstance(exc, OSError) and exc.errno == errno.ESHUTDOWN) or "offlog server exited" in str(exc)
    if isinstance(exc, (EOFError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ESHUTDOWN:
        return True
    return "offlog server exited" in str(exc)  # a 0.x server's words


def _remote(exc: BaseException) -> BaseException:
    """Mark an exception as reported by the server (so a reconnect won't retry it)."""
    exc.offlog_remote = True  # type: ignore[attr-defined]
    return exc


def reported_by_server(exc: BaseException) -> bool:
    return getattr(exc, "offlog_remote", False)


class Deadline:
    def __init__(self, timeout_ms: Optional[float]) -> None:
        self.end = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000.0

    def left(self) -> Optional[float]:
        if self.end is None:
            return None
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("no response from the offlog server in time")
        return left

    def left_ms(self) -> Optional[float]:
        left = self.left()
        return None if left is None else left * 1000.0

    def step(self, longest: float) -> float:
        """Seconds to wait now: ``longest``, or less if the deadline is nearer."""
        left = self.left()
        return longest if left is None else min(left, longest)


def wait_readable(sock: socket.socket, timeout: Optional[float], events: int = _WATCH) -> bool:
    """poll() one socket (any descriptor number); True if something is ready."""
    poller = select.poll()
    poller.register(sock, events)
    try:
        return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))))
    except InterruptedError:
        return False


class _Channel:
    """One connection's socket and its :class:`~offlog.protocol.ClientConnection`:
    reads the server's messages as events, blocking with a deadline or
    whatever is there now.

    Several threads may read (a writer collecting WRITTEN, a sync waiting for
    FLUSHED): each ``recv`` and the parsing of its bytes happen under a lock
    that is never held across a wait. WRITTEN events go to ``on_written`` at
    once; every other event waits in order for :meth:`event`.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = P.ClientConnection()
        self.eof = False
        self.errored = False  # an ERROR came: the server is ending this connection
        self.garbled = False  # a read was cut short: the rest of the stream cannot be parsed
        self.on_written: Callable[[int], None] = lambda position: None
        self._events: Deque[Any] = deque()
        self._lock = threading.Lock()
        self._fds: List[int] = []  # received in the handshake, for a ring offer

    @property
    def framed(self) -> bool:
        return bool(self.conn.framed)

    def say(self, event: Any) -> bytes:
        """The bytes of ``event`` (sent by the caller, in order with its DATA)."""
        return self.conn.send(event)

    def end_data(self) -> None:
        """The end of this client's data: ``shutdown(SHUT_WR)``; BYE comes back."""
        self.conn.send(P.EndOfData())
        self.sock.shutdown(socket.SHUT_WR)

    def answer(self, deadline: Deadline) -> Any:
        """Handshake only (one reader): the server's next event. Its ERROR is
        raised; an end of file is an EOFError. Descriptors that come with the
        bytes (SCM_RIGHTS) are kept for a ring offer (:meth:`take_fds`) while
        one may still come, and closed as soon as none can."""
        conn = self.conn
        try:
            event = conn.next_event()
            while event is P.NEED_DATA:
                if not wait_readable(self.sock, deadline.left()):
                    deadline.left()
                    continue
                try:
                    data, fds, _, _ = socket.recv_fds(self.sock, 65536, MAX_FDS, _RECV_FDS_FLAGS)
                except (BlockingIOError, InterruptedError):
                    continue
                except ConnectionResetError:
                    data, fds = b"", []
                self._fds += fds
                conn.receive_data(data)
                event = conn.next_event()
        except BaseException:
            self.close_fds()
            raise
        if conn.state not in _OFFER_STATES:
            self.close_fds()
        if type(event) is P.Error:
            raise _remote(event.exception)
        if type(event) is P.Closed:
            raise EOFError("the offlog server closed the connection during the handshake")
        return event

    def take_fds(self) -> List[int]:
        """The descriptors received in the handshake so far: the caller's to close."""
        fds, self._fds = self._fds, []
        return fds

    def close_fds(self) -> None:
        for fd in self.take_fds():
            os.close(fd)

    def poll(self) -> None:
        """Take in whatever the server has sent, without waiting."""
        if self._lock.locked():
            return  # another thread is reading right now
        with self._lock:
            try:
                while not self.eof:
                    try:
                        chunk = self.sock.recv(65536, socket.MSG_DONTWAIT)
                    except (BlockingIOError, InterruptedError):
                        return
                    except OSError:
                        chunk = b""
                    self.eof = not chunk
                    self.conn.receive_data(chunk)
                    self._take_events()
            except BaseException:
                # Cut short between a recv and the parse of its bytes (an interrupt,
                # or bytes that are no message): the stream cannot be followed any
                # more. The connection counts as ended; its owner gives it up.
                self.garbled = self.eof = True
                raise

    def _take_events(self) -> None:
        conn = self.conn
        while True:
            event = conn.next_event()
            kind = type(event)
            if kind is P.Written:
                self.on_written(event.position)
            elif event is P.NEED_DATA or event is P.PAUSED or kind is P.Closed:
                return
            else:
                self.errored = self.errored or kind is P.Error
                self._events.append(event)

    def _wait_and_poll(self, deadline: Deadline) -> None:
        if not wait_readable(self.sock, deadline.left()):
            deadline.left()  # raises TimeoutError when it is the deadline that passed
        self.poll()

    def has_events(self) -> bool:
        return bool(self._events)

    def closing(self) -> bool:
        """EOF, or an ERROR queued: the server is ending this connection. Other
        events (FLUSHED, BYE) are answers that the thread which asked will take."""
        return self.eof or self.errored

    def event(self, deadline: Deadline) -> Any:
        """The server's next event (FLUSHED, BYE, ERROR); EOFError once it closed."""
        while not self._events:
            if self.eof:
                raise EOFError("the offlog server closed the connection")
            self._wait_and_poll(deadline)
        return self._events.popleft()

    def put_back(self, event: Any) -> None:
        """An answer another waiter asked for (a BYE read by a sync()): first in line again."""
        self._events.appendleft(event)

    def server_error(self, deadline: Deadline) -> BaseException:
        """The error the server sent before closing (or a BrokenPipeError)."""
        try:
            while True:
                event = self.event(deadline)
                if type(event) is P.Error:
                    return _remote(event.exception)
        except (EOFError, TimeoutError, OSError, ValueError, P.ProtocolError):  # ValueError: the socket is closed
            return BrokenPipeError("the offlog server closed the connection")


ON_FULL = ("drop", "block", "raise")


class BacklogLimit:
    """What happens when a write would grow the backlog past ``max_bytes`` (the
    ProxyFile's ``max_queue``).

    ``drop``: the write is discarded and counted; ``block``: the write waits
    (at most the ProxyFile's timeout, without holding anything another
    thread or the reconnect needs) until the backlog has room; ``raise``:
    BlockingIOError. A write is always admitted into an empty backlog,
    whatever its size.
    """

    def __init__(self, max_bytes: int, on_full: str, timeout_ms: Optional[float]) -> None:
        if on_full not in ON_FULL:
            raise ValueError(f"on_full must be one of {ON_FULL}, not {on_full!r}")
        if max_bytes < 0:
            raise ValueError("max_queue must be >= 0")
        self.max_bytes = max_bytes
        self.on_full = on_full
        self.timeout = timeout_ms
        self.dropped = 0

    def admit(self, backlog: int, n: int) -> object:
        """``n`` more bytes for a backlog of ``backlog`` bytes: True: take them;
        False: dropped (counted); WAIT: wait for room; or raise."""
        if not backlog or backlog + n <= self.max_bytes:
            return True
        if self.on_full == "drop":
            self.dropped += n
            return False
        if self.on_full == "raise":
            raise BlockingIOError(
                errno.ENOBUFS, f"offlog backlog full: {backlog} bytes in the backlog, max_queue is {self.max_bytes}"
            )
        return WAIT

    def check_wait(self, since: float) -> None:
        """Raise TimeoutError once a write has waited the whole timeout for room."""
        if self.timeout is not None and time.monotonic() - since > self.timeout / 1000.0:
            raise TimeoutError(f"offlog backlog stayed full (max_queue {self.max_bytes} bytes) for the whole timeout")


class Control:
    """A transport's control channel: the socket's control side.

    It reads the server (its :class:`_Channel`), says whether an error means
    the server is lost or the file failed, waits a step at a time watching
    the server, numbers the FLUSH requests and reports what the backlog limit
    dropped. Its frames go into ``stream``: the frame stream of a socket data
    path (control frames follow the DATA frames sent before them), or, beside
    a ring, this channel's own outbox (the socket carries nothing else). A
    ring's control socket is also watched for a hang-up (:class:`_Hangups`),
    and the ring's objects are closed with it.
    """

    def __init__(self, channel: _Channel, timeout_ms: Optional[float], limit: Optional[BacklogLimit]) -> None:
        self.channel = channel
        self.sock = channel.sock
        self.sock.setblocking(False)
        self.timeout = timeout_ms
        self.on_lost: Optional[OnLost] = None
        self.stream: Any = self
        self._limit = limit
        self._dropped_reported = 0
        self._requests = itertools.count(1)
        self._outbox = b""  # a ring's control frames the socket has not taken yet
        self._ring: Optional[ClientRing] = None

    @property
    def framed(self) -> bool:
        return self.channel.framed

    def lost(self, error: BaseException) -> bool:
        """Whether ``error`` means the server is lost and a reconnect wants the
        unconfirmed bytes (else it is about the file, and raised)."""
        return self.on_lost is not None and server_lost(error)

    def server_error(self) -> BaseException:
        """What the server said before it closed (a BrokenPipeError if nothing)."""
        return self.channel.server_error(Deadline(self.timeout))

    def flush_locked(self) -> Tuple[int, Optional[int]]:
        """Data path's token held: FLUSH after everything written so far; return
        its request number and the payload position it follows (None beside a
        ring, whose TAIL says what is written)."""
        self.report_dropped_locked()
        request = next(self._requests)
        return request, self.stream.send_control_locked(self.channel.say(P.Flush(request)))

    def report_dropped_locked(self) -> None:
        """Data path's token held: tell the server how many bytes the backlog
        limit dropped (for its status and log)."""
        dropped = self._limit.dropped if self._limit else 0
        if dropped != self._dropped_reported and self.framed:
            self.stream.send_control_locked(self.channel.say(P.Dropped(dropped)))
            self._dropped_reported = dropped

    def send_control_locked(self, message: bytes) -> None:
        """Beside a ring, data path's token held: send a control frame now, or
        the rest of it at the next :meth:`send_rest_locked`."""
        self._outbox += message
        self.send_rest_locked()

    def sending(self) -> bool:
        return bool(self._outbox)

    def send_rest_locked(self) -> bool:
        """Send what the outbox holds; True once all of it went. A socket that
        fails takes nothing more: the server is lost, and the wait for its
        answer sees the end of the connection."""
        try:
            while self._outbox:
                self._outbox = self._outbox[self.sock.send(self._outbox) :]
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self._outbox = b""
        return True

    def wait(self, timeout: float, writable: bool = False) -> None:
        """One step of a wait: until the server speaks or hangs up (or, with
        ``writable``, the socket takes more), ``timeout`` seconds at most."""
        wait_readable(self.sock, timeout, _WATCH | select.POLLOUT if writable else _WATCH)

    def watch(self, ring: ClientRing) -> None:
        """Beside ``ring``: the socket carries control frames only, a hang-up
        interrupts the producer (its next write looks at the socket), and the
        ring's objects close with the connection."""
        self._ring = ring
        self.stream = self
        producer = weakref.ref(ring.producer)

        def hung_up() -> None:
            alive = producer()
            if alive is not None:
                alive.interrupt()

        _Hangups.instance().watch(self.sock.fileno(), hung_up)

    def end_data(self) -> None:
        """SHUT_WR: the server answers BYE and hangs up, which the hang-up watcher
        must not take for a lost server. A failure here is read by the BYE wait."""
        self._forget_hangups()
        try:
            self.channel.end_data()
        except OSError:
            pass

    def release(self) -> None:
        """Let go of the connection (idempotent)."""
        self._forget_hangups()
        self.sock.close()
        if self._ring is not None:
            self._ring.close()

    def detach(self) -> None:
        """After fork: the parent owns the connection; the child only closes its copy."""
        self.sock.close()

    def _forget_hangups(self) -> None:
        if self._ring is not None:
            _Hangups.instance().forget(self.sock.fileno())


class Transport:
    """A ProxyFile's connection to the server: a control channel plus a data path.

    The data path takes the bytes: the socket itself (:class:`FramedSocket`,
    :class:`LegacySocket`) or a ring's :class:`~offlog.shm.ring.Producer`. Its
    ``write`` is this transport's ``write`` (and the ProxyFile's): the hot
    path is the data path's own, with nothing in between. :class:`Control` is
    the socket's control side. What needs both lives here: how ``sync()`` and
    ``close()`` end, and what happens when the server is lost or the file
    fails (the data path calls :meth:`failed` and :meth:`check_control`, and a
    socket path :meth:`_cut`, with its token held).
    """

    name = "socket"

    def __init__(self, channel: _Channel, timeout_ms: Optional[float], limit: Optional[BacklogLimit] = None) -> None:
        """A transport whose data path is the socket (DATA frames, or raw bytes
        to a 0.x server) until :meth:`attach_ring` gives it a ring."""
        self._control = Control(channel, timeout_ms, limit)
        self._limit = limit
        self._closing = False  # close() decides what an end of the connection means
        path = FramedSocket if channel.framed else LegacySocket
        self._use(path(channel, self.failed, self._cut, self._admit(), self._wait_for_room))
        self._control.stream = self._data

    def ring_options(self) -> dict:
        """The producer's callbacks (``offlog.shm.ring.Producer``'s keywords)."""
        return {
            "on_failed": self.failed,
            "on_interrupt": self.check_control,
            "admit": self._admit(),
            "idle": self._wait_for_room,
        }

    def attach_ring(self, ring: ClientRing) -> None:
        """The ring becomes the data path; the socket carries control only."""
        self.name = "shm"
        self._control.watch(ring)
        self._use(ring.producer)

    def _use(self, data: Any) -> None:
        self._data = data
        self.write = data.write  # the hot path: the data path's own (see FramedSocket.write, Producer.write)

    def _admit(self) -> Callable[[int, int], object]:
        return self._limit.admit if self._limit else admit_all

    @property
    def on_lost(self) -> Optional[OnLost]:
        return self._control.on_lost

    @on_lost.setter
    def on_lost(self, handler: Optional[OnLost]) -> None:
        self._control.on_lost = handler

    @property
    def backlog_bytes(self) -> int:
        return self._data.backlog_bytes

    @property
    def handed_over(self) -> bool:
        return self._data.handed_over

    def pump(self) -> int:
        return self._data.pump()

    def flush(self) -> None:
        """Hand over what can go now; never waits."""
        self._data.pump()

    def take_backlog(self, chunk: Backlog) -> bool:
        """Take ``chunk``'s records into the backlog after everything else (a reconnect's hand-over);
        False, taking nothing, if this transport has handed over already."""
        return self._data.locked(self._data.take_backlog_locked, chunk)

    def detach(self, forward: Callable[[Writable], None]) -> None:
        """After fork: the parent owns the connection and the backlog; a write
        through a bound ``write`` kept from before the fork goes to ``forward``
        (the child's own connection)."""
        self._data.detach(forward)
        self._control.detach()

    # -- what goes wrong (token held: called by the data path, or under its token) --
    def failed(self, code: int) -> None:
        """The data path's server side broke: the ring's consumer flagged
        ``code`` (its errno), or the socket hung up or failed (EPIPE). Read what
        the server said: hand over if it is lost, else raise its error."""
        data = self._data
        if data.handed_over:
            return
        if data.error is not None:
            raise data.error.with_traceback(None)
        channel = self._control.channel
        channel.poll()
        if not channel.closing():
            # The server has not said why yet: a stopping server shuts its read side
            # first and writes what it has before it says so, which can take long.
            # A write never waits for that: the bytes stay unconfirmed, and the next
            # call (or a sync()/close(), which wait) looks again.
            return
        error = self._control.server_error()
        if isinstance(error, BrokenPipeError) and code not in (errno.ESHUTDOWN, errno.EPIPE):
            error = OSError(code, os.strerror(code))  # a file error that only the ring's header told
        error = self._judge_locked(error)
        if not isinstance(error, ServerLost):
            raise error

    def check_control(self) -> None:
        """Look at the control socket (the hang-up watcher interrupted the
        producer, or a wait saw it readable). An EOF or an ERROR is trouble
        (:meth:`failed`); a FLUSHED or BYE read here is kept for the sync()
        or close() that waits for it in another thread."""
        channel = self._control.channel
        channel.poll()
        if channel.closing():
            self.failed(errno.EPIPE)

    def _cut(self) -> None:
        """An exception cut a socket send short: what the server received is
        unknown, and nothing more goes out on this connection. Hand over (the
        reconnect re-sends every unconfirmed byte), even in a close; without a
        reconnect, every later call raises."""
        self._closing = False
        self._judge_locked(BrokenPipeError("offlog: a send was interrupted; the connection was dropped"))

    def _judge_locked(self, error: BaseException) -> BaseException:
        """What ``error`` from the server means. The server is lost and a
        reconnect wants the bytes: ServerLost, and the data path hands over (in a
        close, :meth:`_await_bye` decides). Else the file failed: the data path
        raises ``error`` from now on; it is returned without a growing traceback."""
        if self._control.lost(error):
            if not self._closing:
                self._data.hand_over_locked(self._lost)
            return ServerLost(self)
        self._data.fail_locked(error)
        return error.with_traceback(None)

    def _answer_error(self, event: P.Error) -> BaseException:
        return self._judge_locked(_remote(event.exception))

    def _lost(self, unconfirmed: Backlog) -> Callable[[Writable], None]:
        """The data path hands over: let go of the connection, give the bytes to ``on_lost``."""
        self._control.release()
        return self._control.on_lost(unconfirmed)  # type: ignore[misc]

    # -- waits ----------------------------------------------------------------------
    def _wait_for_room(self, since: float) -> None:
        """A write waits for room in the backlog (``on_full="block"``): one step."""
        self._limit.check_wait(since)  # type: ignore[union-attr]
        self.idle()

    def idle(self) -> None:
        """One step of a wait (WAIT_STEP at most): wake a ring's consumer, then
        wait until the server speaks (or the socket takes more, while it has
        bytes to send); an EOF or an ERROR ends in a hand-over or a raise."""
        data, control = self._data, self._control
        channel = control.channel
        data.wake()
        if data.handed_over:
            return
        if not channel.closing():
            control.wait(WAIT_STEP, control.stream.sending())
            channel.poll()
        if channel.closing() and not data.handed_over and not self._closing:
            data.locked(self.check_control)  # (in a close, the end is for _await_bye to read)

    def _drain(self, deadline: Deadline) -> None:
        """Hand the whole backlog over (until the deadline), watching the server."""
        while self._pending():
            self._raise_if_handed_over()
            self._raise_if_closing()
            if self._data.error is not None:
                raise self._data.error.with_traceback(None)
            try:
                deadline.left()
            except TimeoutError:
                raise TimeoutError(
                    f"timed out handing the backlog to the offlog server: {self.backlog_bytes} bytes not handed over"
                ) from None
            self.idle()
        self._raise_if_handed_over()

    def _pending(self) -> bool:
        """Pump; True while bytes are still in the backlog (or part-way out)."""
        return bool(self._data.pump()) or self._send_rest()

    def _send_rest(self) -> bool:
        """Send the rest of a frame part-way out; True while some of it is still unsent."""
        stream = self._control.stream
        if stream.sending():
            self._data.locked(stream.send_rest_locked)
        return stream.sending()

    def _raise_if_closing(self) -> None:
        """A sync() or a write waiting for room meets a close() in another thread."""
        if self._closing:
            raise ValueError("the ProxyFile was closed meanwhile")

    def _raise_if_handed_over(self) -> None:
        if self._data.handed_over:
            raise ServerLost(self)

    def _next_event(self, deadline: Deadline) -> Any:
        """The server's next answer, watching for its end (a hand-over, or a raise)."""
        data, control = self._data, self._control
        channel = control.channel
        while not channel.has_events():
            self._raise_if_handed_over()
            if channel.eof:
                data.locked(self.check_control)
                self._raise_if_handed_over()
                raise self._closed_by_server()
            data.wake()
            control.wait(deadline.step(0.05), self._send_rest())
            channel.poll()
            deadline.left()
        return channel.event(deadline)

    def _closed_by_server(self) -> BaseException:
        """What the server's EOF means when nothing was handed over: its error, if it sent one."""
        if self._data.error is not None:
            return self._data.error.with_traceback(None)
        return BrokenPipeError("the offlog server closed the connection")

    # -- sync and close -------------------------------------------------------------
    def sync(self, timeout_ms: Optional[float]) -> None:
        """Return once the server has written everything written before the call."""
        deadline = Deadline(timeout_ms)
        self._drain(deadline)
        if not self._control.framed:
            return  # a 0.x server cannot confirm writes: sent is all we know
        data = self._data
        request, position = data.locked(self._flush_locked)
        while True:
            try:
                event = self._next_event(deadline)
            except BaseException:
                self._raise_if_handed_over()
                raise
            if type(event) is P.Bye:  # a close() in another thread asked for this one
                self._control.channel.put_back(event)
                raise ValueError("the ProxyFile was closed meanwhile")
            if type(event) is P.Flushed and event.token == request:
                if position is not None:  # what FLUSHED covers is written (a ring's TAIL says so itself)
                    data.locked(data.confirmed_locked, position)
                return
            if type(event) is P.Error:
                raise data.locked(self._answer_error, event)

    def _flush_locked(self) -> Tuple[int, Optional[int]]:
        self._raise_if_closing()  # the connection is half-closed: no FLUSH can go out
        return self._control.flush_locked()

    def close(self) -> None:
        """Hand everything over, half-close, wait for BYE (see :meth:`_await_bye`)."""
        deadline = Deadline(self._control.timeout)
        data = self._data
        try:
            if data.error is not None:
                return  # already reported to the caller; the server has closed
            self._drain(deadline)
            data.locked(self._close_locked)
            while self._send_rest() and not self._control.channel.closing():  # the DROPPED report, if any
                self._raise_if_handed_over()
                deadline.left()
                self.idle()
            self._raise_if_handed_over()
            self._control.end_data()
            self._await_bye(deadline)
        finally:
            data.close_locked()
            self._control.release()

    def _close_locked(self) -> None:
        self._data.pump_locked()
        self._raise_if_handed_over()
        self._control.report_dropped_locked()
        self._data.close_locked()  # later writes raise ValueError
        self._closing = True

    def _await_bye(self, deadline: Deadline) -> None:
        """BYE ends the close. So does the end of the connection (or the server's
        exit) if nothing is unconfirmed; else the unconfirmed bytes are handed over
        (ServerLost: the reconnect delivers them). A file error is raised."""
        control = self._control
        while True:
            try:
                event = self._next_event(deadline) if control.framed else control.channel.event(deadline)
                error = self._data.locked(self._answer_error, event) if type(event) is P.Error else None
                if isinstance(error, ServerLost):
                    raise error
            except EOFError:
                return  # 0.x confirms nothing: what was sent is all we know
            except (ServerLost, OSError):
                if self._nothing_unconfirmed():
                    return  # every byte confirmed: nothing to re-send, nothing lost
                if not self._data.handed_over:
                    self._data.locked(self._hand_over_on_close)
                raise
            if error is not None:
                raise error  # the file failed
            if type(event) is P.Bye:
                return

    def _nothing_unconfirmed(self) -> bool:
        data = self._data
        return not data.unconfirmed_bytes() and not data.backlog_bytes

    def _hand_over_on_close(self) -> None:
        """Closing, the server lost with bytes unconfirmed: hand them over (ServerLost:
        the reconnect delivers them), or raise the server's error."""
        self._closing = False
        raise self._judge_locked(BrokenPipeError("the offlog server closed the connection"))


class _Hangups:
    """The process's watcher of ring control sockets: a hang-up interrupts the producer."""

    _watcher: Optional[Watcher] = None
    _lock = threading.Lock()

    @classmethod
    def instance(cls) -> Watcher:
        with cls._lock:
            if cls._watcher is None:
                cls._watcher = Watcher(select.EPOLLRDHUP, "offlog-hangups")
            return cls._watcher

    @classmethod
    def reset_after_fork(cls) -> None:
        cls._watcher = None  # its thread did not survive the fork
        cls._lock = threading.Lock()


def open_transport(
    path: str,
    sock_path: str,
    timeout_ms: Optional[float],
    shm: Optional[bool],
    fsync: bool,
    limit: Optional[BacklogLimit] = None,
    server_uid: Allowed = frozenset(),
) -> Transport:
    """Connect (to a server of a trusted user: see :func:`connect`), handshake,
    negotiate a ring; return the transport to use."""
    deadline = Deadline(timeout_ms)
    flags = _open_flags(shm, fsync)
    channel = _Channel(connect(sock_path, deadline, server_uid))
    try:
        try:
            channel.sock.sendall(channel.say(P.Open(path, flags)))
        except (BrokenPipeError, ConnectionResetError):
            pass  # a 0.x server may reply and close before reading it all
        if type(channel.answer(deadline)) is P.NotFramed:  # a 0.x server's error about the empty path
            channel.sock.close()
            if shm:
                raise ShmUnavailableError("shm=True but the server is offlog 0.x (socket only)")
            return _open_legacy(path, sock_path, deadline, timeout_ms, limit, server_uid)
        opened = channel.answer(deadline)
        if channel.conn.state == "SOCKET":
            if shm:
                raise ShmUnavailableError(f"shm=True but the server offered no ring: {opened.note}")
            return Transport(channel, timeout_ms, limit)
        return _take_offer(channel, channel.answer(deadline), shm, timeout_ms, limit)
    except BaseException:
        channel.close_fds()  # an offer's descriptor kept between two answers
        channel.sock.close()
        raise


def _open_flags(shm: Optional[bool], fsync: bool) -> int:
    """OPEN's flags (5.6); ShmUnavailableError if a ring is required but impossible here."""
    flags = P.FSYNC if fsync else 0
    if shm is False:
        return flags
    reason = unsupported_reason()
    if shm and reason:
        raise ShmUnavailableError(f"shm=True but this client cannot map a ring: {reason}")
    return flags | (P.NO_SHM_SUPPORT if reason else P.WANT_SHM)


def _take_offer(
    channel: _Channel,
    offer: P.ShmOffer,
    shm: Optional[bool],
    timeout_ms: Optional[float],
    limit: Optional[BacklogLimit],
) -> Transport:
    """Map the offered ring and accept it; decline it (a socket session) if that
    fails. The ring is the one descriptor that came with the offer, checked
    before it is mapped (:class:`~offlog.shm.ClientRing`); every descriptor
    received is closed here (the mapping needs none), whatever cuts this short
    (an interrupt too)."""
    fds = channel.take_fds()
    try:
        transport = Transport(channel, timeout_ms, limit)
        try:
            if channel.conn.version < P.SEALED_RINGS:
                raise UnsafeRing(f"the server speaks protocol {channel.conn.version}: its rings have names, not seals")
            if len(fds) != 1:
                raise UnsafeRing(f"the offer came with {len(fds)} descriptors, expected 1")
            ring = ClientRing(offer.capacity, fds[0], **transport.ring_options())
        except Exception as exc:
            channel.sock.sendall(channel.say(P.ShmDecline(P.exception_text(exc))))
            if shm:
                raise ShmUnavailableError(f"shm=True but the ring could not be opened: {exc}") from exc
            return transport  # a socket transport
    finally:
        for fd in fds:
            os.close(fd)
    channel.sock.sendall(channel.say(P.ShmAccept()))
    transport.attach_ring(ring)
    return transport


def request(sock_path: str, event: Any, timeout: Optional[float], server_uid: Allowed = frozenset()) -> Any:
    """Send a control request (STATUS or REOPEN instead of OPEN) and return the
    server's answer event; its ERROR is raised."""
    deadline = Deadline(timeout)
    channel = _Channel(connect(sock_path, deadline, server_uid))
    try:
        channel.sock.sendall(channel.say(event))
        if type(channel.answer(deadline)) is P.NotFramed:
            raise P.ProtocolError("the server at this socket takes no control requests (offlog 0.x?)")
        return channel.answer(deadline)
    finally:
        channel.sock.close()


def server_status(
    sock_path: str = DEFAULT_SOCK_PATH, timeout: Optional[float] = DEFAULT_TIMEOUT, *, server_uid: ServerUid = None
) -> dict:
    """Ask a running server for its status (what ``python -m offlog status`` prints).
    ``server_uid`` as for :class:`~offlog.client.ProxyFile`."""
    return request(sock_path, P.StatusRequest(), timeout, allowed_uids(server_uid)).document


def _open_legacy(
    path: str,
    sock_path: str,
    deadline: Deadline,
    timeout_ms: Optional[float],
    limit: Optional[BacklogLimit],
    server_uid: Allowed,
) -> Transport:
    channel = _Channel(connect(sock_path, deadline, server_uid))
    try:
        channel.sock.sendall(channel.say(P.OpenPath(path)))
        channel.answer(deadline)  # OK, or the server's error raised
        return Transport(channel, timeout_ms, limit)
    except BaseException:
        channel.sock.close()
        raise


def connect(sock_path: str, deadline: Deadline, server_uid: Allowed = frozenset()) -> socket.socket:
    """Connect to the server's socket, and keep the connection only if the server
    runs as this process's user, root, or a uid in ``server_uid``
    (:func:`offlog.trust.check_server`: an UntrustedServerError, nothing sent).
    A full listen backlog (EAGAIN) is waited out until the deadline; a missing or
    dead server is said in words."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        pause = 0.001
        while True:
            try:
                sock.connect(sock_path)
                check_server(sock, sock_path, server_uid)
                return sock
            except (BlockingIOError, InterruptedError):
                pass  # the server's listen backlog is full: it is busy, not lost
            except FileNotFoundError:
                raise FileNotFoundError(
                    errno.ENOENT,
                    f"no offlog server: the socket {sock_path} does not exist "
                    f"(start one with: python -m offlog -s {sock_path})",
                    sock_path,
                ) from None
            except ConnectionRefusedError:
                raise ConnectionRefusedError(
                    errno.ECONNREFUSED,
                    f"no offlog server is listening on {sock_path} (a stale socket file: "
                    f"start one with: python -m offlog -s {sock_path})",
                    sock_path,
                ) from None
            try:
                time.sleep(deadline.step(pause))
            except TimeoutError:
                raise TimeoutError(f"the offlog server at {sock_path} accepted no connection in time") from None
            pause = min(pause * 2, 0.05)
    except BaseException:
        sock.close()
        raise
