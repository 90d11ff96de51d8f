"""The transports under a ProxyFile: how its bytes reach the server.

Theory of operation
-------------------
* :class:`ShmTransport`: ``write`` is a copy into a shared-memory ring
  (:class:`offlog.shm.ring.Producer`); the socket carries only control.
* :class:`SocketTransport`: ``write`` is one non-blocking ``sendmsg`` of a
  DATA frame (framed dialect) or of the raw bytes (0.x server).

Both keep the same rules: a write never blocks; what cannot go out now waits
in a local backlog, in order, and everything newer waits behind it; close()
sends the backlog, waits for the server's BYE and raises whatever the server
reported.

Losing the server. Every transport knows which of its bytes the server has
not confirmed as written: a ring's ``[TAIL, head)`` plus its backlog; on the
framed socket, every DATA payload not yet covered by a WRITTEN (or FLUSHED)
from the server; on a 0.x server's socket only what is still queued locally
(that dialect confirms nothing). When the server goes away -- EOF, a reset,
``EPIPE``, or its "server exited" error (errno ``ESHUTDOWN``) -- and the
owner gave the transport an ``on_lost`` callback, the transport *diverts*:
it hands those bytes, in order, to ``on_lost`` and forwards every later
write to what ``on_lost`` returned. Errors about the file itself (permission,
ENOSPC, ...) are never diverted: they are raised.

A ring client learns of a lost server without a syscall on its hot path: the
process-wide :class:`_Hangups` thread waits for ``EPOLLRDHUP`` on the control
sockets of all rings and interrupts the producer, whose next write takes the
slow path and looks at the socket.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import select
import socket
import threading
import time
from collections import deque
from typing import Callable, Deque, List, Optional, Tuple, Union

from . import protocol as P
from .shm import ClientRing, unsupported_reason
from .shm.ring import admit_all
from .watcher import Watcher

DEFAULT_SOCK_PATH = "/tmp/offlog.sock"
#: Milliseconds, as in offlog 0.x's documentation (and unlike its code).
DEFAULT_TIMEOUT = 5000
#: The socket transport reads the server's WRITTEN frames after this many bytes.
ACK_POLL = 64 * 1024
#: What a 0.x server may say that is not an error (0.3.1 sends ROTATED after a rotation).
LEGACY_NOT_ERRORS = (b"OK", b"ROTATED")
#: Largest write the socket hot path sends as one header + payload copy.
QUICK_MAX = 64 * 1024
_DATA_HEADER = P.FRAME_HEADER.pack
Buffer = Union[bytes, bytearray, memoryview, str]
#: on_lost(unwritten chunks, in order) -> the write() that takes over.
OnLost = Callable[[List[bytes]], Callable[[Buffer], None]]


class ShmUnavailableError(OSError):
    """``shm=True`` was asked for, but no ring could be set up."""


class ServerGone(Exception):
    """Internal: ``transport``'s server went away and its bytes must be diverted."""

    def __init__(self, transport: "SocketTransport") -> None:
        super().__init__("the offlog server went away")
        self.transport = transport


def server_gone(exc: BaseException) -> bool:
    """True if ``exc`` means the server went away, not that the file failed."""
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


class _Channel:
    """Reads server messages: blocking with a deadline, or whatever is there now."""

    def __init__(self, sock: socket.socket, framed: bool) -> None:
        self.sock = sock
        self.framed = framed
        self.eof = False
        self.on_written: Callable[[int], None] = lambda position: None
        self._reader = P.FrameReader(P.SERVER_FRAMES)
        self._frames: Deque[P.Frame] = deque()
        self._legacy = b""

    def _recv(self, deadline: Deadline) -> bytes:
        while True:
            ready, _, _ = select.select([self.sock], [], [], deadline.left())
            if not ready:
                raise TimeoutError("no response from the offlog server in time")
            try:
                return self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionResetError:
                return b""

    def poll(self) -> None:
        """Take in whatever the server has sent, without waiting."""
        while not self.eof:
            try:
                chunk = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.eof = True
                return
            self.feed(chunk)

    def greeting(self, deadline: Deadline) -> bytes:
        """Read the server's first bytes: SERVER_PREAMBLE from a current server,
        anything else (an error message and EOF) from a 0.x server. Bytes after
        the preamble are kept for :meth:`frame`."""
        data = b""
        while len(data) < len(P.SERVER_PREAMBLE) and P.SERVER_PREAMBLE.startswith(data):
            chunk = self._recv(deadline)
            if not chunk:
                break
            data += chunk
        if data.startswith(P.SERVER_PREAMBLE):
            self.feed(data[len(P.SERVER_PREAMBLE) :])
            return P.SERVER_PREAMBLE
        return data

    def feed(self, data: bytes) -> None:
        for f in self._reader.feed(data):
            if f.type == P.WRITTEN:
                self.on_written(P.decode_u64(f.payload))
            else:
                self._frames.append(f)

    def has_frames(self) -> bool:
        return bool(self._frames)

    def frame(self, deadline: Deadline) -> P.Frame:
        while not self._frames:
            chunk = b"" if self.eof else self._recv(deadline)
            if not chunk:
                self.eof = True
                raise EOFError("the offlog server closed the connection")
            self.feed(chunk)
        return self._frames.popleft()

    def legacy_message(self, deadline: Deadline) -> bytes:
        while P.NUL not in self._legacy:
            chunk = self._recv(deadline)
            if not chunk:
                raise EOFError("the offlog server closed the connection")
            self._legacy += chunk
        message, _, self._legacy = self._legacy.partition(P.NUL)
        return message

    def server_error(self, deadline: Deadline) -> BaseException:
        """The error the server sent before closing (or a BrokenPipeError)."""
        try:
            if self.framed:
                while True:
                    f = self.frame(deadline)
                    if f.type == P.ERROR:
                        return _remote(P.decode_error(f.payload))
            while True:
                message = self.legacy_message(deadline)
                if message not in LEGACY_NOT_ERRORS and message != b"BYE":
                    return _remote(P.exception_from_text(message.decode("utf-8", "replace")))
        except (EOFError, TimeoutError, OSError):
            return BrokenPipeError("the offlog server closed the connection")


ON_FULL = ("drop", "block", "raise")


class QueueLimit:
    """What happens when a write would grow the local queue past ``max_bytes``.

    ``drop``: the write is discarded and counted; ``block``: wait (at most the
    ProxyFile's timeout) until the queue has room; ``raise``: BlockingIOError.
    A write is always admitted into an empty queue, whatever its size.
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

    def admit(self, queued: int, n: int, make_room: Callable[[], int]) -> bool:
        if not queued or queued + n <= self.max_bytes:
            return True
        if self.on_full == "drop":
            self.dropped += n
            return False
        if self.on_full == "raise":
            raise BlockingIOError(
                errno.ENOBUFS, f"offlog queue full: {queued} bytes queued, max_queue is {self.max_bytes}"
            )
        deadline = Deadline(self.timeout)
        while True:
            queued = make_room()
            if not queued or queued + n <= self.max_bytes:
                return True
            try:
                deadline.left()
            except TimeoutError:
                raise TimeoutError(f"offlog queue stayed full ({queued} bytes) for the whole timeout") from None
            time.sleep(0.0005)


class SocketTransport:
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
        self._backlog: Deque[memoryview] = deque()
        self._queued = 0
        self._lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._error: Optional[BaseException] = None  # what the server reported, once
        self._diverted: Optional[Callable[[Buffer], None]] = None
        self._taken = False  # whether the write in progress is already in _unacked/_backlog
        self._quick = self._framed  # the hot path applies (framed, not diverted)
        # Framed only: DATA payloads the server has not confirmed as written.
        self._unacked: Deque[Tuple[int, bytes]] = deque()
        self._position = 0
        self._next_poll = ACK_POLL
        channel.on_written = self._forget_written

    @property
    def backlog_bytes(self) -> int:
        return self._queued

    def write(self, data: Buffer) -> None:
        # Socket hot path (framed, nothing queued, bytes up to 64 KiB): one send()
        # of header + payload, a syscall of ~1.5 us; the payload is kept (bytes:
        # no copy) until the server's WRITTEN covers it. Anything else: _write_any.
        lock = self._lock
        lock.acquire()
        try:
            if type(data) is not bytes or not self._quick or self._backlog or len(data) > QUICK_MAX:
                return self._write_any(data)
            n = len(data)
            self._position = position = self._position + n
            self._unacked.append((position, data))
            message = _DATA_HEADER(P.DATA, n) + data
            try:
                sent = self._sock.send(message)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except (BrokenPipeError, ConnectionResetError):
                return self._lost(data, taken=True)
            if sent < len(message):
                self._enqueue([memoryview(message)[sent:]])
            if position >= self._next_poll:
                self._next_poll = position + ACK_POLL
                self._channel.poll()  # collects WRITTEN frames
        finally:
            lock.release()

    def _write_any(self, data: Buffer) -> None:
        """Lock held: every write the hot path does not take."""
        if self._diverted is not None:
            return self._diverted(data)
        self._taken = False
        try:
            self._write_locked(data)
        except ServerGone:
            self._lost(data, self._taken)

    def _lost(self, data: Buffer, taken: bool) -> None:
        """Lock held: the server is gone (or failed) during this write."""
        error = self._gone()
        if not isinstance(error, ServerGone):
            raise error
        self._divert_locked()
        if not taken:  # lost while sending older bytes: this write goes on too
            self._diverted(data)

    def _write_locked(self, data: Buffer) -> None:
        view = memoryview(data.encode("utf-8") if isinstance(data, str) else data).cast("B")
        if self._backlog:
            self._pump_locked()
            if self._backlog and not self._admit(self._queued, view.nbytes, self._make_room):
                return  # dropped (and counted) by the queue limit
        if not self._framed:  # 0.x: queue first, so a lost server leaves it in the backlog
            self._enqueue([view])
            self._taken = True
            self._pump_locked()
            return
        payload = data if type(data) is bytes else bytes(view)  # kept until WRITTEN
        self._position += view.nbytes
        self._unacked.append((self._position, payload))
        self._taken = True
        pieces: List[memoryview] = []
        for chunk in _split(view, P.MAX_PAYLOAD):
            pieces += (memoryview(_DATA_HEADER(P.DATA, chunk.nbytes)), chunk)
        if not self._backlog:
            pieces = self._send(pieces)
        self._enqueue(pieces)

    def _enqueue(self, pieces: List[memoryview]) -> None:
        for piece in pieces:
            self._backlog.append(memoryview(bytes(piece)))
            self._queued += piece.nbytes

    def _forget_written(self, position: int) -> None:
        """The server wrote every payload byte up to ``position``."""
        unacked = self._unacked
        while unacked and unacked[0][0] <= position:
            unacked.popleft()

    def _make_room(self) -> int:
        self._pump_locked()
        return self._queued

    def _send(self, pieces: List[memoryview]) -> List[memoryview]:
        """Send what the socket takes now; return the unsent rest."""
        try:
            sent = self._sock.sendmsg(pieces)
        except (BlockingIOError, InterruptedError):
            return pieces
        except (BrokenPipeError, ConnectionResetError):
            raise self._gone() from None
        return _unsent(pieces, sent)

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
        return error.with_traceback(None)

    def unwritten(self) -> List[bytes]:
        """Lock held: the bytes the server has not confirmed, in order."""
        if self._framed:
            return [payload for _, payload in self._unacked]
        return [bytes(piece) for piece in self._backlog]

    def divert(self) -> None:
        """Hand every unconfirmed byte to ``on_lost``; forward later writes."""
        with self._lock:
            self._divert_locked()

    def _divert_locked(self) -> None:
        if self._diverted is None:
            self._quick = False
            self._diverted = self.on_lost(self.unwritten())
            self._backlog.clear()
            self._queued = 0
            self._unacked.clear()
            self._sock.close()

    def _pump_locked(self) -> None:
        while self._backlog:
            batch = list(itertools.islice(self._backlog, 64))
            rest = self._send(batch)
            for _ in range(len(batch) - len(rest)):
                self._queued -= self._backlog.popleft().nbytes
            if rest:
                if rest[0].nbytes != self._backlog[0].nbytes:
                    self._queued -= self._backlog[0].nbytes - rest[0].nbytes
                    self._backlog[0] = rest[0]
                return

    def pump(self) -> int:
        with self._lock:
            self._pump_locked()
            return self._queued

    def _drain(self, deadline: Deadline) -> None:
        """Block (until the deadline) until the backlog is handed over."""
        while self.pump():
            try:
                left = deadline.left()
            except TimeoutError:
                raise TimeoutError(
                    f"timed out handing queued data to the offlog server: {self.backlog_bytes} bytes not sent"
                ) from None
            self._wait_for_room(left)

    def _wait_for_room(self, timeout: Optional[float]) -> None:
        select.select([], [self._sock], [], timeout)

    def flush(self, timeout_ms: Optional[float]) -> None:
        deadline = Deadline(timeout_ms)
        self._drain(deadline)
        if not self._framed:
            return  # a 0.x server cannot confirm writes: sent is all we know
        token = next(self._tokens)
        with self._lock:
            position = self._position
            self._report_dropped(deadline)
            self._send_control(P.encode_u64(P.FLUSH, token), deadline)
        while True:
            f = self._next_frame(deadline)
            if f.type == P.FLUSHED and P.decode_u64(f.payload) == token:
                with self._lock:
                    self._forget_written(position)
                return
            if f.type == P.ERROR:
                raise self._verdict(_remote(P.decode_error(f.payload)))

    def _next_frame(self, deadline: Deadline) -> P.Frame:
        try:
            return self._channel.frame(deadline)
        except EOFError:
            raise self._gone() from None

    def _report_dropped(self, deadline: Deadline) -> None:
        """Tell the server how many bytes the queue limit dropped (for its status and log)."""
        dropped = self._limit.dropped if self._limit else 0
        if dropped != self._dropped_reported and self._framed:
            self._send_control(P.encode_u64(P.DROPPED, dropped), deadline)
            self._dropped_reported = dropped

    def _send_control(self, message: bytes, deadline: Deadline) -> None:
        view = [memoryview(message)]
        while view:
            view = self._send(view)
            if view:
                select.select([], [self._sock], [], deadline.left())

    def close(self) -> None:
        deadline = Deadline(self._timeout)
        try:
            if self._error is not None:
                return  # already reported to the caller; the server has closed
            self._drain(deadline)
            with self._lock:
                self._report_dropped(deadline)
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError:
                raise self._gone() from None
            self._await_bye(deadline)
        finally:
            self._sock.close()

    def _await_bye(self, deadline: Deadline) -> None:
        if self._framed:
            while True:
                f = self._next_frame(deadline)
                if f.type == P.BYE:
                    return
                if f.type == P.ERROR:
                    raise self._verdict(_remote(P.decode_error(f.payload)))
        while True:
            try:
                message = self._channel.legacy_message(deadline)
            except EOFError:
                raise self._gone() from None
            if message == b"BYE":
                return
            if message not in LEGACY_NOT_ERRORS:
                raise self._verdict(_remote(P.exception_from_text(message.decode("utf-8", "replace"))))

    def detach(self) -> None:
        """After fork: the parent owns the connection and the backlog."""
        self._backlog.clear()
        self._queued = 0
        self._unacked.clear()
        self._sock.close()


def _unsent(pieces: List[memoryview], sent: int) -> List[memoryview]:
    """The part of ``pieces`` after the first ``sent`` bytes (a new list)."""
    for i, piece in enumerate(pieces):
        if sent < piece.nbytes:
            return [piece[sent:]] + pieces[i + 1 :]
        sent -= piece.nbytes
    return []


def _split(view: memoryview, size: int) -> List[memoryview]:
    if view.nbytes <= size:
        return [view]
    return [view[i : i + size] for i in range(0, view.nbytes, size)]


class ShmTransport(SocketTransport):
    """Bytes through a shared-memory ring; the socket carries control only."""

    name = "shm"

    def __init__(self, channel: _Channel, timeout_ms: Optional[float], limit: Optional[QueueLimit] = None) -> None:
        super().__init__(channel, timeout_ms, limit)
        self._ring: Optional[ClientRing] = None
        self._producer = None

    def attach(self, ring: ClientRing) -> None:
        self._ring = ring
        self._producer = ring.producer
        self.write = self._producer.write  # the hot path: see Producer.write
        _Hangups.instance().watch(self._sock.fileno(), self._producer.interrupt)

    # Called by the producer, token held.
    def failed(self, code: int) -> None:
        """The consumer flagged a failure in the ring header (or the socket hung
        up): divert if the server is gone, raise if the file failed."""
        file_error = code not in (errno.ESHUTDOWN, errno.EPIPE)
        error = self._gone(fallback=OSError(code, os.strerror(code)) if file_error else None)
        if isinstance(error, ServerGone):
            self._producer.divert_locked(self._lost)
            return
        raise error

    def interrupted(self) -> None:
        """The control socket hung up (or the server said something): look at it."""
        self._channel.poll()
        if self._channel.eof or self._channel.has_frames():
            self.failed(errno.EPIPE)

    def _lost(self, chunks: List[bytes]) -> Callable[[Buffer], None]:
        self._close_control()
        return self.on_lost(chunks)

    def _close_control(self) -> None:
        _Hangups.instance().forget(self._sock.fileno())
        self._sock.close()
        self._ring.close()

    @property
    def backlog_bytes(self) -> int:
        return self._producer.backlog_bytes

    def pump(self) -> int:
        return self._producer.pump()

    def divert(self) -> None:
        self._producer.divert(self._lost)

    def _wait_for_room(self, timeout: Optional[float]) -> None:
        self._producer.wake()  # the consumer frees room; nothing to select on
        time.sleep(0.0005)

    def close(self) -> None:
        _Hangups.instance().forget(self._sock.fileno())  # the server hangs up after BYE
        try:
            super().close()
        finally:
            self._ring.close()

    def detach(self) -> None:
        self._producer.detach()
        super().detach()


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
    reason = unsupported_reason() if shm is not False else None
    flags = P.FSYNC if fsync else 0
    if shm is not False:
        flags |= P.NO_SHM_SUPPORT if reason else P.WANT_SHM
    if shm and reason:
        raise ShmUnavailableError(f"shm=True but this client cannot map a ring: {reason}")
    channel = _Channel(connect(sock_path, deadline), framed=True)
    sock = channel.sock
    try:
        try:
            sock.sendall(P.CLIENT_PREAMBLE + P.encode_open(path, flags))
        except (BrokenPipeError, ConnectionResetError):
            pass  # a 0.x server may reply and close before reading it all
        greeting = channel.greeting(deadline)
        if not greeting:
            raise EOFError("the offlog server closed the connection during the handshake")
        if greeting != P.SERVER_PREAMBLE:  # a 0.x server's error about the empty path
            sock.close()
            if shm:
                raise ShmUnavailableError("shm=True but the server is offlog 0.x (socket only)")
            return _open_legacy(path, sock_path, deadline, timeout_ms, limit)
        f = channel.frame(deadline)
        if f.type == P.ERROR:
            raise _remote(P.decode_error(f.payload))
        if f.type != P.OPENED:
            raise P.ProtocolError(f"expected OPENED, got frame {f.type:#04x}")
        version, opened_flags, note = P.decode_opened(f.payload)
        if version != P.VERSION:
            raise P.ProtocolError(f"server speaks protocol version {version}, this client {P.VERSION}")
        if not opened_flags & P.SHM_OFFERED:
            if shm:
                raise ShmUnavailableError(f"shm=True but the server offered no ring: {note}")
            return SocketTransport(channel, timeout_ms, limit)
        offer = channel.frame(deadline)
        if offer.type != P.SHM_OFFER:
            raise P.ProtocolError("expected SHM_OFFER")
        capacity, shm_name, sem_name = P.decode_offer(offer.payload)
        transport = ShmTransport(channel, timeout_ms, limit)
        try:
            ring = ClientRing(
                capacity,
                shm_name,
                sem_name,
                on_failed=transport.failed,
                on_interrupt=transport.interrupted,
                admit=limit.admit if limit else None,
            )
        except Exception as exc:
            sock.sendall(P.frame(P.SHM_DECLINE, P.exception_text(exc).encode()))
            if shm:
                raise ShmUnavailableError(f"shm=True but the ring could not be opened: {exc}") from exc
            return SocketTransport(channel, timeout_ms, limit)
        sock.sendall(P.frame(P.SHM_ACCEPT))
        transport.attach(ring)
        return transport
    except BaseException:
        sock.close()
        raise


def server_status(sock_path: str = DEFAULT_SOCK_PATH, timeout: Optional[float] = DEFAULT_TIMEOUT) -> dict:
    """Ask a running server for its status (what ``python -m offlog status`` prints)."""
    deadline = Deadline(timeout)
    channel = _Channel(connect(sock_path, deadline), framed=True)
    try:
        channel.sock.sendall(P.CLIENT_PREAMBLE + P.frame(P.STATUS))
        if channel.greeting(deadline) != P.SERVER_PREAMBLE:
            raise P.ProtocolError("the server at this socket does not report status (offlog 0.x?)")
        reply = channel.frame(deadline)
        if reply.type == P.ERROR:
            raise P.decode_error(reply.payload)
        if reply.type != P.STATUS_REPLY:
            raise P.ProtocolError(f"expected STATUS_REPLY, got frame {reply.type:#04x}")
        return json.loads(bytes(reply.payload))
    finally:
        channel.sock.close()


def _open_legacy(
    path: str, sock_path: str, deadline: Deadline, timeout_ms: Optional[float], limit: Optional[QueueLimit]
) -> SocketTransport:
    channel = _Channel(connect(sock_path, deadline), framed=False)
    try:
        channel.sock.sendall(P.encode_path(path) + P.NUL)
        reply = channel.legacy_message(deadline)
        if reply != b"OK":
            raise _remote(P.exception_from_text(reply.decode("utf-8", "replace")))
        return SocketTransport(channel, timeout_ms, limit)
    except BaseException:
        channel.sock.close()
        raise


def connect(sock_path: str, deadline: Deadline) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(deadline.left())
        sock.connect(sock_path)
        sock.settimeout(None)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
