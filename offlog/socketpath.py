"""The socket as a transport's data path: DATA frames, or raw bytes to a 0.x server.

Theory of operation
-------------------
A transport (:class:`offlog.transports.Transport`) is a control channel plus
a data path, the part that takes ``write()``'s bytes. Over a ring the data
path is :class:`offlog.shm.ring.Producer`; over the socket it is one of these:

* :class:`FramedSocket` (a current server): the hot path is one non-blocking
  ``send`` of a DATA frame. Every payload sent stays *unconfirmed* (kept in a
  :class:`~offlog.backlog.Backlog`) until the server's WRITTEN, or the
  FLUSHED that answers a sync, covers it. Control frames (FLUSH, DROPPED)
  join the same stream, right after the frame in flight
  (:meth:`FramedSocket.send_control_locked`).
* :class:`LegacySocket` (an offlog 0.x server): raw bytes, always from the
  backlog. That dialect confirms nothing, so nothing is kept once sent.

Every data path answers the same calls (``write``, ``pump``, ``locked``,
``hand_over_locked``, ``fail_locked``, ``close_locked``, ``take_backlog_locked``,
``unconfirmed_bytes``, ``wake``, ``detach``) and tells its transport, with
the token held, what went wrong: ``on_failed(EPIPE)`` when the socket fails
(the transport reads the server's error, then hands over or raises), and
``on_cut()`` when an exception cut a send short between ``send`` returning
and the bookkeeping. What the server received is then unknown, so nothing
more is sent on this connection: the transport hands over, and the reconnect
re-sends every unconfirmed payload on a new one (at least once, never a torn
frame).
"""

from __future__ import annotations

import errno
from collections import deque
from typing import Any, Callable, Deque, Optional

from . import protocol as P
from . import token
from .backlog import Backlog, Buffer, Handover
from .token import WAIT

#: Payload bytes sent between two reads of the server's WRITTEN frames.
ACK_POLL = 64 * 1024
#: Largest write the hot path sends as one header + payload copy.
QUICK_MAX = 64 * 1024
#: Most payload bytes the backlog pump puts in one DATA frame (whole records only).
BATCH_MAX = 256 * 1024
_DATA_HEADER = P.data_header


class _SocketPath(token.Guarded):
    """What both dialects share: the backlog, the frame (or bytes) in flight,
    the payloads not confirmed yet (none for 0.x), the hand-over."""

    def __init__(
        self,
        channel: Any,
        on_failed: Callable[[int], None],
        on_cut: Callable[[], None],
        admit: Callable[[int, int], object],
        idle: Callable[[float], None],
    ) -> None:
        self._channel = channel
        self._sock = channel.sock
        self._on_failed = on_failed
        self._on_cut = on_cut
        self._admit = admit
        self._idle = idle
        self._token = token.new()
        self._reentered: Deque[bytes] = deque()
        self._backlog = Backlog()  # accepted, not yet handed to the socket
        self._partial: Optional[memoryview] = None  # the unsent rest of a frame (or of raw bytes)
        self._unconfirmed = Backlog()  # payloads sent, not yet covered by WRITTEN
        self._in_send = False  # a frame is between send() and its bookkeeping
        self._broken = False  # an exception cut a send short: nothing more goes out here
        self._handover: Optional[Handover] = None  # what a hand-over cut short was handing over
        self._hand_over_to: Any = None
        self._forward: Optional[Callable[[Buffer], None]] = None
        self._closed = False
        self.error: Optional[BaseException] = None  # the server's, raised by every later call
        self._slow = False  # the hot path does not apply (see _update_hot_path)
        self._until_poll = ACK_POLL  # payload bytes to send before WRITTEN frames are read
        self._written = 0  # payload position the server's last WRITTEN confirmed
        channel.on_written = self._note_written  # (a 0.x server sends none)

    @property
    def backlog_bytes(self) -> int:
        return len(self._backlog)

    def unconfirmed_bytes(self) -> int:
        return len(self._unconfirmed)

    def wake(self) -> None:
        """Before a wait: the server reads the socket by itself."""

    def _write_locked(self, view: memoryview):
        """Token held: None when done, WAIT, or the write that took over (a hand-over)."""
        if self._broken:
            self._on_cut()
        forward = self._before_write_locked()
        n = view.nbytes
        if forward is not None or not n:
            return forward
        self._send_locked()  # room first: a recovered server admits again
        if self._forward is not None:
            return self._forward
        if self._backlog:
            verdict = self._admit(len(self._backlog), n)
            if verdict is WAIT:
                return WAIT
            if not verdict:
                return None
        self._backlog.append(view)
        self._send_locked()
        return None

    def _update_hot_path(self) -> None:
        self._slow = bool(
            self._broken
            or self._backlog
            or self._partial is not None
            or self._reentered
            or self._handover is not None
            or self._forward is not None
            or self._closed
            or self.error is not None
        )

    def _after_exception(self) -> None:
        """Token held, an exception is passing: if it cut a send short, what the
        server got is unknown. Mark the connection broken (one store, so a second
        interrupt cannot half-do it); the next call hands over (re-sends every
        unconfirmed byte) before anything else goes out."""
        self._backlog.repair()  # an append or consume cut in two: make it whole again
        self._unconfirmed.repair()
        if self._in_send or self._channel.garbled:
            self._broken = True
            self._slow = True
            self._in_send = False

    def _wait_for_room(self, since: float) -> None:
        self._idle(since)

    def _pump_step(self) -> None:
        if self._forward is None and self.error is None and not self._closed:
            self._send_locked()

    def _send_locked(self) -> bool:
        """Token held: send what the socket takes now; True if all of it went.
        A cut stream or a failed socket goes to the transport, which hands over
        (the caller then finds ``_forward`` set) or raises."""
        if self._broken:
            self._on_cut()
        try:
            while self._forward is None and not self._broken and self.error is None:
                if self._partial is not None and not self._send_partial():
                    return False
                if not self._backlog:
                    return True
                self._send_from_backlog()
            return False
        except OSError:
            self._in_send = False
            self._on_failed(errno.EPIPE)
            return False
        finally:
            self._collect_written()
            self._update_hot_path()

    def _send_partial(self) -> bool:
        """Token held: send the rest of the current frame; True once all of it went.
        From ``send`` returning to ``_partial`` updated, an exception would leave
        the stream unknown: ``_in_send`` tells :meth:`_after_exception`."""
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
        raise NotImplementedError

    def sending(self) -> bool:
        """A frame (or raw bytes) is part-way out: the socket must take the rest first."""
        return self._partial is not None

    def send_rest_locked(self) -> bool:
        """Token held: send what the socket takes now; True if all of it went."""
        return self._send_locked()

    def _collect_written(self) -> None:
        """Token held: read the server's WRITTEN frames (every ACK_POLL bytes sent)
        and forget what they confirm."""
        if self._until_poll <= 0:
            self._until_poll = ACK_POLL
            self._channel.poll()
        if self._handover is None:  # (a hand-over's new backlog is not what WRITTEN speaks of)
            self._unconfirmed.forget_until(self._written)

    def _note_written(self, position: int) -> None:
        """Any thread (a WRITTEN frame): the server wrote every payload byte before
        ``position``; the unconfirmed backlog forgets them under the token. A
        position past what was sent is a lie, and forgets nothing."""
        if position <= self._unconfirmed.end:
            self._written = position

    def hand_over_locked(self, make_handler: Callable[[Backlog], Callable[[Buffer], None]]) -> None:
        """Token held: hand every unconfirmed byte -- the payloads no WRITTEN
        covered, then the backlog -- to ``make_handler``, and forward every later
        write to the handler it returns. The hand-over is kept until the handler
        took it: a hand-over cut short by an interrupt is finished by the next call
        under the token, and loses nothing."""
        if self._forward is not None:
            return
        self._hand_over_to = make_handler
        if self._handover is None:
            self._unconfirmed.forget_until(self._written)
            self._handover = Handover()
            self._update_hot_path()
        # By reference, then a new backlog: a retry never takes a part twice.
        self._handover.take(self._unconfirmed)
        self._unconfirmed = Backlog()
        self._handover.take(self._backlog)
        self._backlog = Backlog()
        self._partial = None
        self._broken = False
        self._forward = make_handler(self._handover.merged())
        self._handover = None
        self._update_hot_path()

    def fail_locked(self, error: BaseException) -> None:
        """Token held: the server reported ``error``; this and every later call raise it."""
        self.error = error
        self._update_hot_path()

    def close_locked(self) -> None:
        """Later writes raise ValueError (plain stores: also without the token)."""
        self._closed = True
        self._update_hot_path()

    def detach(self, forward: Callable[[Buffer], None]) -> None:
        """After fork: the parent owns the connection and the backlog; a write
        through a bound ``write`` kept from before the fork goes to ``forward``
        (the child's own connection)."""
        self._token = token.new()
        self._backlog = Backlog()
        self._unconfirmed = Backlog()
        self._reentered.clear()
        self._partial = None
        self._forward = forward
        self._update_hot_path()


class FramedSocket(_SocketPath):
    """DATA frames; payloads unconfirmed until the server's WRITTEN covers them."""

    def write(self, data: Buffer) -> None:
        # Socket hot path (empty backlog, bytes up to 64 KiB): one send() of
        # header + payload, a syscall of ~1.5 us, and a copy of the payload
        # into the unconfirmed backlog until the server's WRITTEN covers it.
        tok = self._token
        try:
            tok.pop()
        except IndexError:
            return self._write_slow(data)
        try:
            if type(data) is bytes and not self._slow and 0 < len(data) <= QUICK_MAX:  # (b"": nothing to send)
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
                    return self._on_failed(errno.EPIPE)  # the record is in _unconfirmed: it goes on
                self._until_poll -= len(data)
                if self._until_poll <= 0:
                    self._collect_written()
                return
        except BaseException:
            self._after_exception()
            raise
        finally:
            tok.append(True)
        return self._write_slow(data)

    def _send_from_backlog(self) -> None:
        """Token held, nothing partial: frame the backlog's first records."""
        backlog = self._backlog
        n = backlog.whole(BATCH_MAX) or min(backlog.first_record(), P.MAX_PAYLOAD)
        with backlog.view(n) as view:
            payload = bytes(view)
        self._in_send = True
        self._unconfirmed.append(payload)
        self._until_poll -= n
        backlog.consume(n)
        self._partial = memoryview(_DATA_HEADER(n) + payload)
        self._in_send = False

    def send_control_locked(self, message: bytes) -> int:
        """Token held: the control frame goes out right after the frame now in
        flight; returns the payload position it follows (what is framed after it
        is not covered by its answer)."""
        if self._partial is None and not self._backlog:
            self._partial = memoryview(message)
        else:
            self._send_locked()
            self._partial = memoryview(bytes(self._partial or b"") + message)
        position = self._unconfirmed.end
        self._send_locked()
        return position

    def confirmed_locked(self, position: int) -> None:
        """Token held: the server wrote every payload byte before ``position`` (a FLUSHED)."""
        if self._forward is None:
            self._unconfirmed.forget_until(position)


class LegacySocket(_SocketPath):
    """Raw bytes to a 0.x server: no hot path, nothing confirmed."""

    def write(self, data: Buffer) -> None:
        self._write_slow(data)

    @property
    def backlog_bytes(self) -> int:
        return len(self._backlog) + (self._partial.nbytes if self._partial is not None else 0)

    def _send_from_backlog(self) -> None:
        """Token held, nothing partial: the backlog's first records, as they are."""
        backlog = self._backlog
        n = backlog.whole(BATCH_MAX) or min(backlog.first_record(), BATCH_MAX)
        self._in_send = True
        with backlog.view(n) as view:
            message = bytes(view)
        backlog.consume(n)
        self._partial = memoryview(message)
        self._in_send = False


FramedSocket.HOLDING = token.holding(FramedSocket.write)
LegacySocket.HOLDING = token.holding()
