"""The transports under a ProxyFile: how its bytes reach the server.

Theory of operation
-------------------
* :class:`ShmTransport`: ``write`` is a copy into a shared-memory ring
  (:class:`offlog.shm.ring.Producer`); the socket carries only control.
* :class:`SocketTransport`: ``write`` is one non-blocking ``send`` of a
  DATA frame (framed dialect) or of the raw bytes (0.x server).

Both keep the same rules: a write never blocks; what cannot go out now waits
in the transport's :class:`~offlog.backlog.Backlog`, in order, and
everything newer waits behind it; a write first moves the backlog on, so a
queue limit (``max_queue``) judges the backlog as it is now. ``sync()`` and
``close()`` hand the backlog over, then wait for the server's answer.

Every wait watches the server. Waiting for room, for FLUSHED or for BYE is
a ``poll()`` on the control socket with a short timeout (never ``select``:
descriptors above 1024 are ordinary in a busy process), so an EOF, a reset or
an ERROR from the server ends the wait at once, not at its deadline.

Losing the server. Every transport knows which of its bytes the server has
not confirmed as written (its *unconfirmed* bytes): a ring's ``[TAIL, head)``
plus its backlog; on the framed socket, every DATA payload not yet covered
by a WRITTEN (or FLUSHED) from the server, plus the backlog; on a 0.x
server's socket only the backlog (that dialect confirms nothing). When the
server goes away -- EOF, a reset, ``EPIPE``, or its "server exited" error
(errno ``ESHUTDOWN``) -- and the owner gave the transport an ``on_lost``
callback, the transport *diverts*: it hands those bytes, in order, to
``on_lost`` and forwards every later write to what ``on_lost`` returned.
Errors about the file itself (permission, ENOSPC, ...) are never diverted:
they are raised. A transport whose frame stream was cut mid-send by an
exception (a ``KeyboardInterrupt`` between ``send`` returning and the
bookkeeping) cannot know what the server received: it diverts too, and the
reconnect re-sends its unconfirmed bytes (at least once, never torn).

A ring client learns of a lost server without a syscall on its hot path: the
process-wide :class:`_Hangups` thread waits for ``EPOLLRDHUP`` on the control
sockets of all rings and interrupts the producer, whose next write takes the
slow path and looks at the socket. The thread holds producers weakly: an
unclosed ProxyFile is still garbage-collected.
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
from typing import Any, Callable, Deque, Optional, Union

from . import protocol as P
from . import token
from .backlog import Backlog, Handover
from .shm import ClientRing, unsupported_reason
from .shm.ring import admit_all
from .token import WAIT
from .watcher import Watcher

DEFAULT_SOCK_PATH = "/tmp/offlog.sock"
#: Milliseconds, as in offlog 0.x's documentation (and unlike its code).
DEFAULT_TIMEOUT = 5000
#: The socket transport reads the server's WRITTEN frames after this many bytes.
ACK_POLL = 64 * 1024
#: Largest write the socket hot path sends as one header + payload copy.
QUICK_MAX = 64 * 1024
#: Most payload bytes the backlog pump puts in one DATA frame (whole records only).
BATCH_MAX = 256 * 1024
#: Seconds one step of a wait sleeps in poll() before it looks again.
WAIT_STEP = 0.0005
_DATA_HEADER = P.data_header
_WATCH = select.POLLIN | getattr(select, "POLLRDHUP", 0)
Buffer = Union[bytes, bytearray, memoryview, str]
#: on_lost(unconfirmed bytes, in order) -> the write() that takes over.
OnLost = Callable[[Backlog], Callable[[Buffer], None]]


class ShmUnavailableError(OSError):
    """``shm=True`` was asked for, but no ring could be set up."""


class ServerGone(Exception):
    """Internal: ``transport``'s server went away and its bytes were diverted."""

    def __init__(self, transport: Any) -> None:
        super().__init__("the offlog server went away")
        self.transport = transport


def server_gone(exc: BaseException) -> bool:
    """True if ``exc`` means the server went away, not that the file failed.
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
        raised; an end of file is an EOFError."""
        conn = self.conn
        event = conn.next_event()
        while event is P.NEED_DATA:
            if not wait_readable(self.sock, deadline.left()):
                deadline.left()
                continue
            try:
                conn.receive_data(self.sock.recv(65536, socket.MSG_DONTWAIT))
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionResetError:
                conn.receive_data(b"")
            event = conn.next_event()
        if type(event) is P.Error:
            raise _remote(event.exception)
        if type(event) is P.Closed:
            raise EOFError("the offlog server closed the connection during the handshake")
        return event

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


class QueueLimit:
    """What happens when a write would grow the backlog past ``max_bytes``.

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

    def admit(self, queued: int, n: int) -> object:
        """True: queue it; False: dropped (counted); WAIT: wait for room; or raise."""
        if not queued or queued + n <= self.max_bytes:
            return True
        if self.on_full == "drop":
            self.dropped += n
            return False
        if self.on_full == "raise":
            raise BlockingIOError(
                errno.ENOBUFS, f"offlog queue full: {queued} bytes queued, max_queue is {self.max_bytes}"
            )
        return WAIT

    def check_wait(self, since: float) -> None:
        """Raise TimeoutError once a write has waited the whole timeout for room."""
        if self.timeout is not None and time.monotonic() - since > self.timeout / 1000.0:
            raise TimeoutError(f"offlog queue stayed full (max_queue {self.max_bytes} bytes) for the whole timeout")


class SocketTransport(token.Guarded):
    """Bytes over the socket, framed or (0.x server) raw."""

    name = "socket"

    def __init__(self, channel: _Channel, timeout_ms: Optional[float], limit: Optional[QueueLimit] = None) -> None:
        self.on_lost: Optional[OnLost] = None
        self._limit = limit
        self._admit = limit.admit if limit else admit_all
        self._dropped_reported = 0
        self._channel = channel
        self._sock = channel.sock
        self._sock.setblocking(False)
        self._framed = channel.framed
        self._timeout = timeout_ms
        self._token = token.new()
        self._reentered: Deque[bytes] = deque()
        self._backlog = Backlog()  # accepted, not yet handed to the socket
        self._partial: Optional[memoryview] = None  # the unsent rest of a frame (or of raw bytes)
        self._unconfirmed = Backlog()  # framed: payloads sent, not yet covered by WRITTEN
        self._in_send = False  # a frame is between send() and its bookkeeping
        self._broken = False  # an exception cut a send short: divert before anything else
        self._handover: Optional[Handover] = None  # what a divert is handing to on_lost
        self._tokens = itertools.count(1)
        self._error: Optional[BaseException] = None  # what the server reported, once
        self._diverted: Optional[Callable[[Buffer], None]] = None
        self._closed = False
        self._slow = not self._framed  # the hot path does not apply (see _update_slow)
        self._until_poll = ACK_POLL  # payload bytes to send before WRITTEN frames are read
        self._written = 0  # payload position the server's last WRITTEN confirmed
        channel.on_written = self._note_written

    @property
    def backlog_bytes(self) -> int:
        return len(self._backlog) + (self._partial.nbytes if self._partial is not None and not self._framed else 0)

    @property
    def diverted(self) -> bool:
        return self._diverted is not None

    def write(self, data: Buffer) -> None:
        # Socket hot path (framed, nothing queued, bytes up to 64 KiB): one send()
        # of header + payload, a syscall of ~1.5 us, and a copy of the payload
        # into the unconfirmed backlog until the server's WRITTEN covers it.
        tok = self._token
        try:
            tok.pop()
        except IndexError:
            return self._write_slow(data)
        try:
            if type(data) is bytes and not self._slow and len(data) <= QUICK_MAX:
                message = _DATA_HEADER(len(data)) + data
                self._in_send = True
                self._unconfirmed.append(data)
                try:
                    sent = self._sock.send(message)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    sent = -1
                if 0 <= sent < len(message):
                    self._partial = memoryview(message)[sent:]
                    self._slow = True
                self._in_send = False
                if sent < 0:
                    return self._lost_locked()  # the record is in _unconfirmed: it goes on
                self._until_poll -= len(data)
                if self._until_poll <= 0:
                    self._collect_written()
                return
        except BaseException:
            self._interrupted_locked()
            raise
        finally:
            tok.append(True)
        return self._write_slow(data)

    # -- slow path ---------------------------------------------------------------
    def _write_locked(self, view: memoryview):
        """Token held: None when done, WAIT, or the handler of a diverted transport."""
        self._take_reentered()
        self._divert_if_broken()
        if self._diverted is not None:
            return self._diverted
        if self._closed:
            raise ValueError("write to a closed ProxyFile")
        if self._error is not None:
            raise self._error.with_traceback(None)
        n = view.nbytes
        if not n:
            return None
        self._pump_locked()  # room first: a recovered server admits again
        if self._diverted is not None:
            return self._diverted
        if self._backlog:
            verdict = self._admit(len(self._backlog), n)
            if verdict is WAIT:
                return WAIT
            if not verdict:
                return None
        self._backlog.append(view)
        self._pump_locked()
        return None

    def _after_reentry(self) -> None:
        self._update_slow()

    def _after_exception(self) -> None:
        self._interrupted_locked()

    def _wait_for_room(self, since: float) -> None:
        self._limit.check_wait(since)  # type: ignore[union-attr]
        self.idle()

    def _update_slow(self) -> None:
        self._slow = bool(
            not self._framed
            or self._broken
            or self._backlog
            or self._partial is not None
            or self._reentered
            or self._diverted is not None
            or self._closed
            or self._error is not None
        )

    def _pump_locked(self) -> bool:
        """Token held: send what the socket takes now; True if all of it went.
        A lost server diverts (the caller then finds ``_diverted`` set)."""
        try:
            self._divert_if_broken()
            while self._diverted is None:
                if self._partial is not None and not self._send_partial():
                    return False
                if not self._backlog:
                    return True
                self._send_from_backlog()
            return False
        except OSError:
            self._in_send = False
            self._lost_locked()
            return False
        finally:
            self._collect_written()
            self._update_slow()

    def _send_partial(self) -> bool:
        """Token held: send the rest of the current frame; True once all of it went.
        From ``send`` returning to ``_partial`` updated, an exception would leave
        the stream unknown: ``_in_send`` tells :meth:`_interrupted_locked`."""
        self._in_send = True
        try:
            sent = self._sock.send(self._partial)
        except (BlockingIOError, InterruptedError):
            self._in_send = False
            return False
        if sent < self._partial.nbytes:
            self._partial = self._partial[sent:]
            self._in_send = False
            return False
        self._partial = None
        self._in_send = False
        return True

    def _send_from_backlog(self) -> None:
        """Token held, nothing partial: frame the backlog's first records and send them."""
        backlog = self._backlog
        if not self._framed:  # 0.x: raw bytes, nothing to confirm
            n = backlog.whole(BATCH_MAX) or min(backlog.first_record(), BATCH_MAX)
            self._in_send = True
            with backlog.view(n) as view:
                message = bytes(view)
            backlog.consume(n)
            self._partial = memoryview(message)
            self._in_send = False
            return
        n = backlog.whole(BATCH_MAX) or min(backlog.first_record(), P.MAX_PAYLOAD)
        with backlog.view(n) as view:
            payload = bytes(view)
        self._in_send = True
        self._unconfirmed.append(payload)
        self._until_poll -= n
        backlog.consume(n)
        self._partial = memoryview(_DATA_HEADER(n) + payload)
        self._in_send = False

    def _interrupted_locked(self) -> None:
        """Token held, an exception is passing: if it cut a send short, what the
        server got is unknown. Mark the connection broken (one store, so a second
        interrupt cannot half-do it); the next call diverts (re-sends every
        unconfirmed byte) before anything else goes out."""
        self._backlog.repair()  # an append or consume cut in two: make it whole again
        self._unconfirmed.repair()
        if self._in_send or self._channel.garbled:
            self._broken = True
            self._slow = True
            self._in_send = False

    def _divert_if_broken(self) -> None:
        """Token held: a send was interrupted; this connection is never used again."""
        if self._broken and self._diverted is None:
            self._divert_locked(BrokenPipeError("offlog: a send was interrupted; the connection was dropped"))

    def _lost_locked(self) -> None:
        """Token held: the socket broke. Divert, or raise what the server said."""
        if self._diverted is not None:
            return
        error = self._gone()
        if not isinstance(error, ServerGone):
            raise error
        self._divert_locked(error)

    def _gone(self, fallback: Optional[BaseException] = None) -> BaseException:
        """What to raise now that the server closed: read what it said, then :meth:`_verdict`."""
        if self._error is not None:
            return self._error.with_traceback(None)
        error = self._channel.server_error(Deadline(self._timeout))
        if fallback is not None and isinstance(error, BrokenPipeError):
            error = fallback
        return self._verdict(error)

    def _verdict(self, error: BaseException) -> BaseException:
        """What to raise for ``error`` from the server: ServerGone (divert) when the
        server went away and a reconnect is wanted; else the error, remembered and
        raised again on every later call (without a growing traceback)."""
        if self.on_lost is not None and server_gone(error):
            return ServerGone(self)
        self._error = error
        self._update_slow()
        return error.with_traceback(None)

    def _collect_written(self) -> None:
        """Token held: read the server's WRITTEN frames (every ACK_POLL bytes sent)
        and forget what they confirm."""
        if self._until_poll <= 0:
            self._until_poll = ACK_POLL
            self._channel.poll()
        self._forget_written()

    def _forget_written(self) -> None:
        """Token held: drop the payloads the server confirmed (not during a divert:
        the unconfirmed backlog is then new, and WRITTEN speaks of the old one)."""
        if self._handover is None:
            self._unconfirmed.forget_until(self._written)

    def _note_written(self, position: int) -> None:
        """Any thread (a WRITTEN frame): the server wrote every payload byte before
        ``position``; the unconfirmed backlog forgets them under the token. A
        position past what was sent is a lie, and forgets nothing."""
        if position <= self._unconfirmed.end:
            self._written = position

    def _divert_locked(self, why: BaseException) -> None:
        """Token held: hand every unconfirmed byte to ``on_lost``; forward later writes.
        Without ``on_lost`` (reconnect=False) ``why`` is remembered and raised."""
        if self._diverted is not None or self._closed:
            return
        if self.on_lost is None:
            self._error = self._error or why
            self._update_slow()
            return
        if self._handover is None:  # kept until on_lost took it: an interrupt in there loses nothing
            self._unconfirmed.forget_until(self._written)
            self._handover = Handover()
        # By reference, then a new backlog: a retry never takes a part twice (a
        # divert cut short also takes what was written on the dead socket since).
        self._handover.take(self._unconfirmed)
        self._unconfirmed = Backlog()
        self._handover.take(self._backlog)
        self._backlog = Backlog()
        self._partial = None
        self._release_control()
        self._diverted = self.on_lost(self._handover.merged())
        self._handover = None
        self._broken = False
        self._update_slow()

    def _release_control(self) -> None:
        self._sock.close()

    def _pump_step(self) -> None:
        if self._diverted is None and self._error is None and not self._closed:
            self._pump_locked()

    def flush(self) -> None:
        """Hand over what can go now; never waits."""
        self.pump()

    def take_backlog(self, chunk: Backlog) -> bool:
        """Queue ``chunk``'s records after everything else (a reconnect's hand-over);
        False, taking nothing, if this transport has diverted already."""
        return self.locked(self._take_backlog_locked, chunk)

    def _take_backlog_locked(self, chunk: Backlog) -> bool:
        if self._diverted is not None or self._error is not None:
            return False
        self._backlog.absorb(chunk)
        self._pump_locked()
        return True

    def idle(self) -> None:
        """One step of a wait: until the socket takes more or the server speaks
        (WAIT_STEP at most); an EOF or an ERROR ends in a divert or a raise."""
        channel = self._channel
        if self._diverted is None and not channel.closing():
            wait_readable(self._sock, WAIT_STEP, _WATCH | select.POLLOUT)
            channel.poll()
        if self._diverted is None and channel.closing() and not self._closed:
            self.locked(self._check_control)

    def _check_control(self) -> None:
        """Token held: the server closed or said something unasked: an ERROR or its exit."""
        if self._diverted is None and self._error is None:
            self._lost_locked()

    def _drain(self, deadline: Deadline) -> None:
        """Hand the whole backlog over (until the deadline), watching the server."""
        while self._pending():
            self._raise_if_diverted()
            if self._error is not None:
                raise self._error.with_traceback(None)
            try:
                deadline.left()
            except TimeoutError:
                raise TimeoutError(
                    f"timed out handing queued data to the offlog server: {self.backlog_bytes} bytes not handed over"
                ) from None
            self.idle()
        self._raise_if_diverted()

    def _pending(self) -> bool:
        """Pump; True while bytes are still queued here."""
        return bool(self.pump()) or self._partial is not None

    def _raise_if_diverted(self) -> None:
        if self.diverted:
            raise ServerGone(self)

    def sync(self, timeout_ms: Optional[float]) -> None:
        """Return once the server has written everything written before the call."""
        deadline = Deadline(timeout_ms)
        self._drain(deadline)
        if not self._framed:
            return  # a 0.x server cannot confirm writes: sent is all we know
        request = next(self._tokens)
        position = self.locked(self._send_control, P.Flush(request))
        while True:
            event = self._next_event(deadline)
            if type(event) is P.Flushed and event.token == request:
                self.locked(self._unconfirmed.forget_until, position)
                return
            if type(event) is P.Error:
                raise self.locked(self._verdict, _remote(event.exception))

    def _next_event(self, deadline: Deadline) -> Any:
        """The server's next answer, watching for its end (which diverts or raises)."""
        channel = self._channel
        while not channel.has_events():
            self._raise_if_diverted()
            if channel.eof:
                self.locked(self._check_control)
                self._raise_if_diverted()
                raise self._closed_by_server()
            self._wake_peer()
            wait_readable(self._sock, deadline.step(0.05))
            channel.poll()
            deadline.left()
        return channel.event(deadline)

    def _wake_peer(self) -> None:
        """Before a wait for the server's answer: nothing to wake on the socket."""

    def _closed_by_server(self) -> BaseException:
        """What the server's EOF means when nothing was diverted: its error, if it sent one."""
        if self._error is not None:
            return self._error.with_traceback(None)
        return BrokenPipeError("the offlog server closed the connection")

    def _send_control(self, event: Any) -> int:
        """Token held: queue a control frame after every DATA frame; return the
        payload position it follows."""
        self._report_dropped_locked()
        return self._queue_control(self._channel.say(event))

    def _queue_control(self, message: bytes) -> int:
        """Token held: the frame goes out right after the frame now in flight;
        returns the payload position it follows (what is framed after it is not
        covered by its answer)."""
        if self._partial is None and not self._backlog:
            self._partial = memoryview(message)
        else:
            self._pump_locked()
            self._partial = memoryview(bytes(self._partial or b"") + message)
        position = self._unconfirmed.end
        self._pump_locked()
        return position

    def _report_dropped_locked(self) -> None:
        """Tell the server how many bytes the queue limit dropped (for its status and log)."""
        dropped = self._limit.dropped if self._limit else 0
        if dropped != self._dropped_reported and self._framed:
            self._queue_control(self._channel.say(P.Dropped(dropped)))
            self._dropped_reported = dropped

    def close(self) -> None:
        deadline = Deadline(self._timeout)
        try:
            if self._error is not None:
                return  # already reported to the caller; the server has closed
            self._drain(deadline)
            self.locked(self._close_locked)
            while self._partial is not None:  # the DROPPED report, if any
                self.locked(self._pump_locked)
                self._raise_if_diverted()
                if self._partial is not None:
                    deadline.left()
                    self.idle()
            try:
                self._channel.end_data()
            except OSError:
                self.locked(self._lost_locked)
                self._raise_if_diverted()
            self._await_bye(deadline)
        finally:
            self._closed = True
            self._update_slow()
            self._sock.close()

    def _close_locked(self) -> None:
        self._take_reentered()
        self._pump_locked()
        self._raise_if_diverted()
        self._report_dropped_locked()
        self._closed = True  # later writes raise ValueError
        self._update_slow()

    def _await_bye(self, deadline: Deadline) -> None:
        while True:
            try:
                event = self._next_event(deadline) if self._framed else self._channel.event(deadline)
            except EOFError:
                return  # 0.x confirms nothing: what was sent is all we know
            except (ServerGone, OSError) as exc:
                if self._nothing_unconfirmed():
                    return  # every byte confirmed: nothing to re-send, nothing lost
                if not isinstance(exc, ServerGone):
                    self.locked(self._divert_on_close)
                raise
            if type(event) is P.Bye:
                return
            if type(event) is P.Error:
                raise self.locked(self._verdict, _remote(event.exception))

    def _nothing_unconfirmed(self) -> bool:
        return not self._unconfirmed and not self._backlog

    def _divert_on_close(self) -> None:
        """Token held, closing, the server gone with bytes unconfirmed: divert them
        (ServerGone: the reconnect delivers them), or raise the server's error."""
        self._closed = False
        error = self._verdict(BrokenPipeError("the offlog server closed the connection"))
        if not isinstance(error, ServerGone):
            self._closed = True
            raise error
        self._divert_locked(error)
        raise error

    def detach(self, forward: Callable[[Buffer], None]) -> None:
        """After fork: the parent owns the connection and the backlog; a write
        through a bound ``write`` kept from before the fork goes to ``forward``
        (the child's own connection)."""
        self._token = token.new()
        self._backlog = Backlog()
        self._unconfirmed = Backlog()
        self._reentered.clear()
        self._partial = None
        self._diverted = forward
        self._update_slow()
        self._sock.close()


class ShmTransport(SocketTransport):
    """Bytes through a shared-memory ring; the socket carries control only."""

    name = "shm"

    def __init__(self, channel: _Channel, timeout_ms: Optional[float], limit: Optional[QueueLimit] = None) -> None:
        super().__init__(channel, timeout_ms, limit)
        self._ring: Optional[ClientRing] = None
        self._producer: Any = None

    def attach(self, ring: ClientRing) -> None:
        self._ring = ring
        self._producer = ring.producer
        self.write = self._producer.write  # the hot path: see Producer.write
        producer = weakref.ref(self._producer)

        def hung_up() -> None:
            alive = producer()
            if alive is not None:
                alive.interrupt()

        _Hangups.instance().watch(self._sock.fileno(), hung_up)

    def producer_options(self) -> dict:
        return {
            "on_failed": self.failed,
            "on_interrupt": self.interrupted,
            "admit": self._limit.admit if self._limit else None,
            "idle": self._idle_for_room,
        }

    # Called by the producer, token held.
    def failed(self, code: int) -> None:
        """The consumer flagged a failure in the ring header (or the socket hung
        up): divert if the server is gone, raise if the file failed."""
        file_error = code not in (errno.ESHUTDOWN, errno.EPIPE)
        error = self._gone(fallback=OSError(code, os.strerror(code)) if file_error else None)
        if isinstance(error, ServerGone):
            self._producer.divert_locked(self._lost)
            return
        self._producer.close_locked()
        raise error

    def interrupted(self) -> None:
        """The control socket hung up (or the server said something): look at it.
        Only an EOF or an ERROR is trouble: a FLUSHED or BYE read here is left
        queued for the sync() or close() waiting for it in another thread."""
        self._channel.poll()
        if self._channel.closing():
            self.failed(errno.EPIPE)

    def _lost(self, unconfirmed: Backlog) -> Callable[[Buffer], None]:
        """The producer diverts: close the control side, hand the bytes on."""
        self._release_control()
        return self.on_lost(unconfirmed)

    def _lost_locked(self) -> None:
        self.failed(errno.EPIPE)

    def _release_control(self) -> None:
        _Hangups.instance().forget(self._sock.fileno())
        self._sock.close()
        self._ring.close()

    @property
    def backlog_bytes(self) -> int:
        return self._producer.backlog_bytes

    @property
    def diverted(self) -> bool:
        return self._producer._diverted is not None

    def pump(self) -> int:
        return self._producer.pump()

    def take_backlog(self, chunk: Backlog) -> bool:
        return self._producer.locked(self._producer.take_backlog_locked, chunk)

    def _idle_for_room(self, since: float) -> None:
        if self._limit is not None:
            self._limit.check_wait(since)
        self.idle()

    def idle(self) -> None:
        """One step of a wait for the consumer: wake it, then poll the control
        socket for WAIT_STEP; a hang-up or a word from the server is looked at
        at once (a divert, or the server's error raised)."""
        producer = self._producer
        producer.wake()
        if wait_readable(self._sock, WAIT_STEP) and not self.diverted:
            producer.interrupt()
            producer.locked(self._check_control)

    def _check_control(self) -> None:
        """Token held: a hang-up or a word from the server: divert, or raise its error."""
        producer = self._producer
        if producer._diverted is None and not producer._closed:
            producer._interrupted = False
            self.interrupted()
            producer._update_limit()

    def locked(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._producer.locked(fn, *args)

    def _pending(self) -> bool:
        return bool(self.pump())  # (control frames go out under the token, in sync and close)

    def _wake_peer(self) -> None:
        self._producer.wake()

    def sync(self, timeout_ms: Optional[float]) -> None:
        deadline = Deadline(timeout_ms)
        self._drain(deadline)
        request = next(self._tokens)
        self._producer.locked(self._send_control, P.Flush(request))
        while True:
            try:
                event = self._next_event(deadline)
            except BaseException:
                self._raise_if_diverted()
                raise
            if type(event) is P.Flushed and event.token == request:
                return
            if type(event) is P.Error:
                raise self._producer.locked(self._file_error, event)

    def _file_error(self, event: P.Error) -> BaseException:
        error = self._verdict(_remote(event.exception))
        if isinstance(error, ServerGone):
            self._producer.divert_locked(self._lost)
            return error
        self._producer.close_locked()
        return error

    def _nothing_unconfirmed(self) -> bool:
        return self._producer.unreleased_bytes() == 0 and not self._producer.backlog_bytes

    def close(self) -> None:
        deadline = Deadline(self._timeout)
        try:
            if self._error is not None:
                return
            self._drain(deadline)
            self._producer.locked(self._close_ring_locked)
            while self._partial is not None:
                self._producer.locked(self._pump_locked)
                if self._partial is not None:
                    deadline.left()
                    wait_readable(self._sock, WAIT_STEP, select.POLLOUT)
            _Hangups.instance().forget(self._sock.fileno())  # the server hangs up after BYE
            try:
                self._channel.end_data()
            except OSError:
                pass  # the BYE wait below reads what happened
            self._await_bye(deadline)
        finally:
            _Hangups.instance().forget(self._sock.fileno())
            self._closed = True
            self._sock.close()
            self._ring.close()

    def _close_ring_locked(self) -> None:
        self._producer._take_reentered()
        if self._producer._diverted is not None:
            raise ServerGone(self)
        self._report_dropped_locked()
        self._producer.close_locked()

    def _await_bye(self, deadline: Deadline) -> None:
        while True:
            try:
                event = self._channel.event(deadline)
            except EOFError:
                if self._nothing_unconfirmed():
                    return  # every byte released by the server: nothing lost
                self._producer.locked(self._reopen_for_divert)
                raise ServerGone(self) from None
            if type(event) is P.Bye:
                return
            if type(event) is P.Error:
                raise self._producer.locked(self._file_error, event)

    def _reopen_for_divert(self) -> None:
        """Token held, closing, server gone with bytes unreleased: divert them."""
        producer = self._producer
        producer._closed = False
        error = self._verdict(BrokenPipeError("the offlog server closed the connection"))
        if isinstance(error, ServerGone):
            producer.divert_locked(self._lost)
        else:
            producer._closed = True
            raise error

    def detach(self, forward: Callable[[Buffer], None]) -> None:
        self._producer.detach(forward)
        super().detach(forward)


SocketTransport.HOLDING = token.holding(SocketTransport.write)


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
    limit: Optional[QueueLimit] = None,
) -> SocketTransport:
    """Connect, handshake, negotiate a ring; return the transport to use."""
    deadline = Deadline(timeout_ms)
    flags = _open_flags(shm, fsync)
    channel = _Channel(connect(sock_path, deadline))
    try:
        try:
            channel.sock.sendall(channel.say(P.Open(path, flags)))
        except (BrokenPipeError, ConnectionResetError):
            pass  # a 0.x server may reply and close before reading it all
        if type(channel.answer(deadline)) is P.NotFramed:  # a 0.x server's error about the empty path
            channel.sock.close()
            if shm:
                raise ShmUnavailableError("shm=True but the server is offlog 0.x (socket only)")
            return _open_legacy(path, sock_path, deadline, timeout_ms, limit)
        opened = channel.answer(deadline)
        if channel.conn.state == "SOCKET":
            if shm:
                raise ShmUnavailableError(f"shm=True but the server offered no ring: {opened.note}")
            return SocketTransport(channel, timeout_ms, limit)
        return _take_offer(channel, channel.answer(deadline), shm, timeout_ms, limit)
    except BaseException:
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
    channel: _Channel, offer: P.ShmOffer, shm: Optional[bool], timeout_ms: Optional[float], limit: Optional[QueueLimit]
) -> SocketTransport:
    """Map the offered ring and accept it; decline it (a socket session) if that fails."""
    transport = ShmTransport(channel, timeout_ms, limit)
    try:
        ring = ClientRing(offer.capacity, offer.shm_name, offer.sem_name, **transport.producer_options())
    except Exception as exc:
        channel.sock.sendall(channel.say(P.ShmDecline(P.exception_text(exc))))
        if shm:
            raise ShmUnavailableError(f"shm=True but the ring could not be opened: {exc}") from exc
        return SocketTransport(channel, timeout_ms, limit)
    channel.sock.sendall(channel.say(P.ShmAccept()))
    transport.attach(ring)
    return transport


def request(sock_path: str, event: Any, timeout: Optional[float]) -> Any:
    """Send a control request (STATUS or REOPEN instead of OPEN) and return the
    server's answer event; its ERROR is raised."""
    deadline = Deadline(timeout)
    channel = _Channel(connect(sock_path, deadline))
    try:
        channel.sock.sendall(channel.say(event))
        if type(channel.answer(deadline)) is P.NotFramed:
            raise P.ProtocolError("the server at this socket takes no control requests (offlog 0.x?)")
        return channel.answer(deadline)
    finally:
        channel.sock.close()


def server_status(sock_path: str = DEFAULT_SOCK_PATH, timeout: Optional[float] = DEFAULT_TIMEOUT) -> dict:
    """Ask a running server for its status (what ``python -m offlog status`` prints)."""
    return request(sock_path, P.StatusRequest(), timeout).document


def _open_legacy(
    path: str, sock_path: str, deadline: Deadline, timeout_ms: Optional[float], limit: Optional[QueueLimit]
) -> SocketTransport:
    channel = _Channel(connect(sock_path, deadline))
    try:
        channel.sock.sendall(channel.say(P.OpenPath(path)))
        channel.answer(deadline)  # OK, or the server's error raised
        return SocketTransport(channel, timeout_ms, limit)
    except BaseException:
        channel.sock.close()
        raise


def connect(sock_path: str, deadline: Deadline) -> socket.socket:
    """Connect to the server's socket. A full listen backlog (EAGAIN) is waited
    out until the deadline; a missing or dead server is said in words."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        pause = 0.001
        while True:
            try:
                sock.connect(sock_path)
                return sock
            except (BlockingIOError, InterruptedError):
                pass  # the server's listen backlog is full: it is busy, not gone
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
