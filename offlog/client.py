"""Client side: ProxyFile and the transports under it.

Theory of operation
-------------------
:class:`ProxyFile` is what applications hold; a *transport* moves its bytes:

* :class:`ShmTransport`: ``write`` is a copy into a shared-memory ring
  (:class:`offlog.shm.ring.Producer`); the socket carries only control.
* :class:`SocketTransport`: ``write`` is one non-blocking ``sendmsg`` of a
  DATA frame (framed dialect) or of the raw bytes (0.x server).

``ProxyFile.write`` is bound straight to the transport's ``write`` (one
Python call on the hot path, not two). Both transports share the rules: a
write never blocks; what cannot go out now waits in a local backlog, in
order, and everything newer waits behind it; close() sends the backlog,
waits for the server's BYE and raises whatever the server reported.

Opening: the client speaks the framed dialect first. A 0.x server answers
with an error instead of the ``OFFLOG\\0`` greeting; the client then
reconnects and uses the 0.x handshake (unless ``shm=True`` was required).

Fork: after ``os.fork()`` the child's ProxyFiles drop their transport
(the parent still owns the ring, the socket and the backlog) and reconnect
on their first write.
"""

from __future__ import annotations

import atexit
import errno
import itertools
import json
import os
import select
import socket
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Union

from . import protocol as P
from .shm import ClientRing, unsupported_reason

DEFAULT_SOCK_PATH = "/tmp/offlog.sock"
#: Milliseconds, as in offlog 0.x's documentation (and unlike its code).
DEFAULT_TIMEOUT = 5000
Buffer = Union[bytes, bytearray, memoryview, str]


class ShmUnavailableError(OSError):
    """``shm=True`` was asked for, but no ring could be set up."""


class _Deadline:
    def __init__(self, timeout_ms: Optional[float]) -> None:
        self.end = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000.0

    def left(self) -> Optional[float]:
        if self.end is None:
            return None
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("no response from the offlog server in time")
        return left


class _Channel:
    """Blocking reads of server messages with a deadline (handshake, close, errors)."""

    def __init__(self, sock: socket.socket, framed: bool) -> None:
        self.sock = sock
        self.framed = framed
        self._reader = P.FrameReader(P.SERVER_FRAMES)
        self._frames: Deque[P.Frame] = deque()
        self._legacy = b""

    def _recv(self, deadline: _Deadline) -> bytes:
        ready, _, _ = select.select([self.sock], [], [], deadline.left())
        if not ready:
            raise TimeoutError("no response from the offlog server in time")
        try:
            return self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return self._recv(deadline)
        except ConnectionResetError:
            return b""

    def greeting(self, deadline: _Deadline) -> bytes:
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

    def frame(self, deadline: _Deadline) -> P.Frame:
        while not self._frames:
            chunk = self._recv(deadline)
            if not chunk:
                raise EOFError("the offlog server closed the connection")
            self._frames.extend(self._reader.feed(chunk))
        return self._frames.popleft()

    def feed(self, data: bytes) -> None:
        self._frames.extend(self._reader.feed(data))

    def legacy_message(self, deadline: _Deadline) -> bytes:
        while P.NUL not in self._legacy:
            chunk = self._recv(deadline)
            if not chunk:
                raise EOFError("the offlog server closed the connection")
            self._legacy += chunk
        message, _, self._legacy = self._legacy.partition(P.NUL)
        return message

    def server_error(self, deadline: _Deadline) -> BaseException:
        """The error the server sent before closing (or a BrokenPipeError)."""
        try:
            if self.framed:
                while True:
                    f = self.frame(deadline)
                    if f.type == P.ERROR:
                        return P.decode_error(f.payload)
            while True:
                message = self.legacy_message(deadline)
                if message not in (b"OK", b"ROTATED", b"BYE"):
                    return P.exception_from_text(message.decode("utf-8", "replace"))
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
        deadline = _Deadline(self.timeout)
        while True:
            queued = make_room()
            if not queued or queued + n <= self.max_bytes:
                return True
            try:
                deadline.left()
            except TimeoutError:
                raise TimeoutError(f"offlog queue stayed full ({queued} bytes) for the whole timeout") from None
            time.sleep(0.0005)


def _admit_all(queued: int, n: int, make_room: Callable[[], int]) -> bool:
    return True


class SocketTransport:
    """Bytes over the socket, framed or (0.x server) raw."""

    name = "socket"

    def __init__(self, channel: _Channel, timeout_ms: Optional[float], limit: Optional[QueueLimit] = None) -> None:
        self._limit = limit
        self._admit = limit.admit if limit else _admit_all
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

    def _server_error(self, fallback: Optional[BaseException] = None) -> BaseException:
        """The error the server reported (read once, then remembered)."""
        if self._error is None:
            error = self._channel.server_error(_Deadline(self._timeout))
            if fallback is not None and isinstance(error, BrokenPipeError):
                error = fallback
            self._error = error
        return self._error.with_traceback(None)  # raised again on every write: no growing traceback

    @property
    def backlog_bytes(self) -> int:
        return self._queued

    def write(self, data: Buffer) -> None:
        # Socket hot path: one sendmsg (a syscall, ~1.5 us) when nothing is queued.
        with self._lock:
            if isinstance(data, str):
                data = data.encode("utf-8")
            view = memoryview(data).cast("B")
            pieces = [view]
            if self._framed:
                pieces = []
                for chunk in _split(view, P.MAX_PAYLOAD):
                    pieces += (memoryview(P.frame_header(P.DATA, chunk.nbytes)), chunk)
            if self._backlog:
                self._pump_locked()
            if self._backlog and not self._admit(self._queued, view.nbytes, self._make_room):
                return  # dropped (and counted) by the queue limit
            if not self._backlog:
                pieces = self._send(pieces)
            for piece in pieces:
                self._backlog.append(memoryview(bytes(piece)))
                self._queued += piece.nbytes

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
            raise self._server_error() from None
        return _unsent(pieces, sent)

    def _pump_locked(self) -> None:
        while self._backlog:
            batch = list(itertools.islice(self._backlog, 64))
            rest = self._send(batch)
            done = len(batch) - len(rest)
            for _ in range(done):
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

    def _drain(self, deadline: _Deadline) -> None:
        """Block (until the deadline) until the backlog is sent."""
        while self.pump():
            try:
                left = deadline.left()
            except TimeoutError:
                raise TimeoutError(
                    f"timed out sending queued data to the offlog server: {self.backlog_bytes} bytes not sent"
                ) from None
            select.select([], [self._sock], [], left)

    def flush(self, timeout_ms: Optional[float]) -> None:
        deadline = _Deadline(timeout_ms)
        self._drain(deadline)
        if not self._framed:
            return  # a 0.x server cannot confirm writes: sent is all we know
        token = next(self._tokens)
        with self._lock:
            self._report_dropped(deadline)
            self._send_control(P.encode_u64(P.FLUSH, token), deadline)
        while True:
            f = self._channel.frame(deadline)
            if f.type == P.FLUSHED and P.decode_u64(f.payload) == token:
                return
            if f.type == P.ERROR:
                raise P.decode_error(f.payload)

    def _report_dropped(self, deadline: _Deadline) -> None:
        """Tell the server how many bytes the queue limit dropped (for its status and log)."""
        dropped = self._limit.dropped if self._limit else 0
        if dropped != self._dropped_reported and self._framed:
            self._send_control(P.encode_u64(P.DROPPED, dropped), deadline)
            self._dropped_reported = dropped

    def _send_control(self, message: bytes, deadline: _Deadline) -> None:
        view = [memoryview(message)]
        while view:
            view = self._send(view)
            if view:
                select.select([], [self._sock], [], deadline.left())

    def close(self) -> None:
        deadline = _Deadline(self._timeout)
        try:
            if self._error is not None:
                return  # already reported to the caller; the server has closed
            self._drain(deadline)
            with self._lock:
                self._report_dropped(deadline)
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError:
                raise self._server_error() from None
            self._await_bye(deadline)
        finally:
            self._sock.close()

    def _await_bye(self, deadline: _Deadline) -> None:
        try:
            if self._framed:
                while True:
                    f = self._channel.frame(deadline)
                    if f.type == P.BYE:
                        return
                    if f.type == P.ERROR:
                        raise P.decode_error(f.payload)
            while True:
                message = self._channel.legacy_message(deadline)
                if message == b"BYE":
                    return
                if message not in (b"OK", b"ROTATED"):
                    raise P.exception_from_text(message.decode("utf-8", "replace"))
        except EOFError:
            raise BrokenPipeError("the offlog server closed the connection before confirming") from None

    def detach(self) -> None:
        """After fork: the parent owns the connection and the backlog."""
        self._backlog.clear()
        self._queued = 0
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

    def __init__(
        self, channel: _Channel, timeout_ms: Optional[float], ring: ClientRing, limit: Optional[QueueLimit] = None
    ) -> None:
        super().__init__(channel, timeout_ms, limit)
        self._ring = ring
        self._producer = ring.producer
        self.write = self._producer.write  # the hot path: see Producer.write

    def _failed(self, code: int) -> None:
        """The consumer flagged a failure in the ring header: raise what the server sent."""
        raise self._server_error(fallback=OSError(code, os.strerror(code)))

    @property
    def backlog_bytes(self) -> int:
        return self._producer.backlog_bytes

    def pump(self) -> int:
        return self._producer.pump()

    def _drain(self, deadline: _Deadline) -> None:
        while self._producer.pump():
            try:
                deadline.left()
            except TimeoutError:
                raise TimeoutError(
                    f"timed out moving queued data into the ring: {self._producer.backlog_bytes} bytes not sent"
                ) from None
            self._producer.wake()
            time.sleep(0.0005)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._ring.close()

    def detach(self) -> None:
        self._producer.detach()
        super().detach()


def open_transport(
    path: str,
    sock_path: str,
    timeout_ms: Optional[float],
    shm: Optional[bool],
    fsync: bool,
    limit: Optional[QueueLimit] = None,
) -> SocketTransport:
    """Connect, handshake, negotiate a ring; return the transport to use."""
    deadline = _Deadline(timeout_ms)
    reason = unsupported_reason() if shm is not False else None
    flags = P.FSYNC if fsync else 0
    if shm is not False:
        flags |= P.NO_SHM_SUPPORT if reason else P.WANT_SHM
    if shm and reason:
        raise ShmUnavailableError(f"shm=True but this client cannot map a ring: {reason}")
    channel = _Channel(_connect(sock_path, deadline), framed=True)
    sock = channel.sock
    try:
        try:
            sock.sendall(P.CLIENT_PREAMBLE + P.encode_open(path, flags))
        except (BrokenPipeError, ConnectionResetError):
            pass  # a 0.x server may reply and close before reading it all
        if channel.greeting(deadline) != P.SERVER_PREAMBLE:
            sock.close()
            if shm:
                raise ShmUnavailableError("shm=True but the server is offlog 0.x (socket only)")
            return _open_legacy(path, sock_path, deadline, timeout_ms, limit)
        f = channel.frame(deadline)
        if f.type == P.ERROR:
            raise P.decode_error(f.payload)
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
        transport: List[ShmTransport] = []
        try:
            ring = ClientRing(
                capacity, shm_name, sem_name, lambda code: transport[0]._failed(code), limit.admit if limit else None
            )
        except Exception as exc:
            sock.sendall(P.frame(P.SHM_DECLINE, P.exception_text(exc).encode()))
            if shm:
                raise ShmUnavailableError(f"shm=True but the ring could not be opened: {exc}") from exc
            return SocketTransport(channel, timeout_ms, limit)
        sock.sendall(P.frame(P.SHM_ACCEPT))
        transport.append(ShmTransport(channel, timeout_ms, ring, limit))
        return transport[0]
    except BaseException:
        sock.close()
        raise


def server_status(sock_path: str = DEFAULT_SOCK_PATH, timeout: Optional[float] = DEFAULT_TIMEOUT) -> dict:
    """Ask a running server for its status (what ``python -m offlog status`` prints)."""
    deadline = _Deadline(timeout)
    channel = _Channel(_connect(sock_path, deadline), framed=True)
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
    path: str, sock_path: str, deadline: _Deadline, timeout_ms: Optional[float], limit: Optional[QueueLimit]
) -> SocketTransport:
    channel = _Channel(_connect(sock_path, deadline), framed=False)
    try:
        channel.sock.sendall(P.encode_path(path) + P.NUL)
        reply = channel.legacy_message(deadline)
        if reply != b"OK":
            raise P.exception_from_text(reply.decode("utf-8", "replace"))
        return SocketTransport(channel, timeout_ms, limit)
    except BaseException:
        channel.sock.close()
        raise


def _connect(sock_path: str, deadline: _Deadline) -> socket.socket:
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
    ) -> None:
        self.filepath = os.path.abspath(os.fsdecode(filepath))
        self.sock_path = sock_path
        self.timeout = timeout
        self._shm = shm
        self._fsync = fsync
        self._limit = QueueLimit(max_queue, on_full, timeout) if max_queue is not None else None
        self._transport = open_transport(self.filepath, sock_path, timeout, shm, fsync, self._limit)
        self.write = self._transport.write  # type: ignore[method-assign]
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
        """``"shm"`` or ``"socket"``."""
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
        self._transport.flush(self.timeout if timeout is None else timeout)

    def close(self) -> None:
        """Send what is queued, wait for the server to confirm; idempotent."""
        transport = self._transport
        if transport is None:
            return
        self._transport = None
        self.write = self._write_closed  # type: ignore[method-assign]
        _live.discard(self)
        transport.close()

    def _write_closed(self, data: Buffer) -> None:
        raise ValueError("write to a closed ProxyFile")

    def _after_fork_in_child(self) -> None:
        if self._transport is not None:
            self._transport.detach()
            self._transport = _Reconnect(self)
            self.write = self._transport.write  # type: ignore[method-assign]

    def _reconnect(self) -> None:
        self._transport = open_transport(
            self.filepath, self.sock_path, self.timeout, self._shm, self._fsync, self._limit
        )
        self.write = self._transport.write  # type: ignore[method-assign]

    def __enter__(self) -> "ProxyFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class _Reconnect:
    """Stand-in transport of a forked child until its first write reconnects it."""

    name = "socket"
    backlog_bytes = 0

    def __init__(self, proxy: ProxyFile) -> None:
        self._proxy = proxy

    def write(self, data: Buffer) -> None:
        self._proxy._reconnect()
        self._proxy.write(data)

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
            import sys

            print(f"offlog: could not flush {proxy.filepath}: {P.exception_text(exc)}", file=sys.stderr)


def _after_fork_in_child() -> None:
    for proxy in list(_live):
        proxy._after_fork_in_child()


atexit.register(_close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
