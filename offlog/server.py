"""The offlog server: accepts clients, opens their files, writes their bytes.

Theory of operation
-------------------
One thread, the *event loop* (:meth:`Server.serve_forever`), owns every
connection: it accepts, reads, parses and answers, and never blocks. Each
connection is a :class:`Session` driving a
:class:`~offlog.protocol.ServerConnection`: every byte read goes into it and
every byte sent comes out of it; the protocol (both dialects, the state
tables of docs/protocol.md 5.7, every protocol error) lives there, and a
session only does non-blocking I/O and acts on events.

Everything that can block on a file (open, append, fsync, a ring's drain)
is the writers' (:mod:`offlog.writers`): the loop hands them jobs per file
and they report back with callbacks the loop runs (:meth:`Server.call_soon`,
woken through a pipe). A stalled file therefore delays only its own clients,
and threads grow with files stalled at once, not with clients. Sleeping
rings' doorbells are watched by :mod:`offlog.shm.doorbells`.

Bounds. A socket client whose bytes the writers have not written yet
(``SESSION_BUFFER``) is not read until they have: it waits in its own socket.
A client that does not read its answers (``OUT_LIMIT``) is not read either.
A handshake has a total deadline (``--handshake-timeout``).

Ring sessions: after the offer the ring carries the data and the control
socket carries FLUSH, DROPPED and the end; the loop reads it like any other.

Stopping (SIGINT/SIGTERM): stop accepting, remove the socket file, shut the
read side of every client socket (data already received stays readable);
each session's data is read to its end and written, then the client hears
``OSError: offlog server exited``. Sessions a stuck file holds past
``STOP_GRACE`` are closed as they are.

Rotation: the :class:`~offlog.files.RotationWatcher` thread follows renamed
and deleted files. SIGHUP (handled on that thread) and a REOPEN request
(``offlog reopen``, answered from a thread of its own once every file is
reopened) both run :meth:`Server.reopen_all`.
"""

from __future__ import annotations

import errno
import faulthandler
import grp
import heapq
import os
import selectors
import signal
import socket
import stat
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from . import __version__
from . import protocol as P
from .defaults import HANDSHAKE_TIMEOUT, MAX_FRAME_MEMORY
from .files import FileTable, OpenFile
from .loglines import LineLogger, printable
from .shm import DEFAULT_CAPACITY, ServerRing, check_capacity, unsupported_reason
from .shm.doorbells import Doorbells
from .trust import describe_uid, peer_credentials
from .writers import Writers

#: Ring memory (data bytes of all rings) at most, unless --max-ring-memory says otherwise:
#: this, or half of /dev/shm if that is smaller.
MAX_RING_MEMORY = 1 << 30
#: Seconds the server waits for sessions to finish writing when stopping.
STOP_GRACE = 10.0
RECV_SIZE = 256 * 1024
SERVER_EXITED = OSError("offlog server exited")  # framed clients also get errno ESHUTDOWN
#: Seconds the server stops accepting when it has no descriptor even to refuse a client with.
ACCEPT_PAUSE = 0.1
#: Seconds without a client turned away that end a burst of them (and log its counts).
BURST_QUIET = 5.0
#: What a client turned away at accept hears (errno EMFILE/ENFILE).
NO_DESCRIPTOR = "the offlog server has no file descriptor left for this client; try again later"
#: A socket session acknowledges written bytes (WRITTEN) at least this often.
ACK_EVERY = 64 * 1024
#: Bytes of a socket client's handed to the writers and not written yet, past which it is not read.
SESSION_BUFFER = 4 * 1024 * 1024
#: Bytes of answers a client has not read, past which it is not read either.
OUT_LIMIT = 1024 * 1024
#: Seconds a closing session waits for its last words (ERROR, BYE) to leave.
CLOSE_LINGER = 1.0
#: Frames up to this size are read as they come; a larger one waits for --max-frame-memory to admit it.
FRAME_FREE = 256 * 1024
#: Empty DATA frames a connection may send in a row (they cost a parse each and carry nothing).
EMPTY_FRAMES = 4096


class Server:
    def __init__(
        self,
        socket_path: str,
        log: LineLogger,
        *,
        shm: bool = False,
        ring_size: int = DEFAULT_CAPACITY,
        socket_mode: Optional[int] = None,
        socket_group: Optional[str] = None,
        max_ring_memory: Optional[int] = None,
        max_frame_memory: int = MAX_FRAME_MEMORY,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.socket_path = socket_path
        self.max_frame_memory = max_frame_memory
        self.frame_memory = 0  # bytes of the large frames admitted and under way
        self._short: Deque[Session] = deque()  # sessions waiting to have their frame admitted, in order
        self.ring_size = check_capacity(ring_size) if shm else ring_size
        self.max_ring_memory = default_ring_memory() if max_ring_memory is None else max_ring_memory
        self.ring_memory = 0  # data bytes of the rings that exist now
        self.handshake_timeout = handshake_timeout
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.started = time.time()
        self.errors = 0
        self.dropped_closed = 0  # dropped bytes reported by clients that have left
        self.recent_errors: Deque[str] = deque(maxlen=20)
        self.files = FileTable(self.info, self.warn)
        self.stopping = False
        self._log = log
        self._log_lock = threading.Lock()
        self.sessions: Dict[int, Session] = {}  # by socket descriptor; the loop's thread only
        self._next_id = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector = selectors.DefaultSelector()
        self._timers: List[Tuple[float, int, "Session"]] = []  # (when, session id, session): heap
        self._calls: Deque[List[Callable[[], None]]] = deque()  # from writer threads, run by the loop
        self._poked = False  # the wake pipe has a byte for the calls already
        self._listener: Optional[socket.socket] = None
        self._listening = False
        self._spare_fd = -1  # closed to accept (and refuse) a client when descriptors run out
        self._paused_until = 0.0  # no accept() before this (time.monotonic())
        self._turned_away = _TurnedAway(self.warn, self.info)
        self.shm_unavailable = unsupported_reason() if shm else "server started without --shm"
        doorbells = Doorbells(self.warn) if self.shm_unavailable is None else None
        self.writers = Writers(self.files, self.call_soon, self.warn, doorbells)

    # -- logging ----------------------------------------------------------
    # Every line goes through printable(): a client's path or text can neither
    # break a line nor forge one, and no character makes logging fail.
    def info(self, msg: str) -> None:
        msg = printable(msg)
        with self._log_lock:
            self._log.info(msg)

    def warn(self, msg: str) -> None:
        """Log a problem; it also counts in the status report."""
        msg = printable(msg)
        with self._log_lock:
            self._log.warning(msg)
            self.errors += 1
            self.recent_errors.append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}")

    # -- life cycle -------------------------------------------------------
    def bind(self) -> None:
        """Take over the socket path, or raise if a live server answers on it."""
        _claim_socket_path(self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        try:
            if self.socket_group is not None:
                self._give_socket_to(self.socket_group)
            if self.socket_mode is not None:
                os.chmod(self.socket_path, self.socket_mode)
            listener.listen(1024)
            self.writers.start()
        except BaseException:
            listener.close()  # a server that cannot start leaves no socket file behind
            os.unlink(self.socket_path)
            raise
        listener.setblocking(False)
        self._listener = listener
        self._spare_fd = _spare_descriptor()

    def _give_socket_to(self, group: str) -> None:
        try:
            os.chown(self.socket_path, -1, _group_id(group))
        except KeyError:
            raise LookupError(f"no group named {group!r} on this host") from None
        except OSError as exc:
            raise OSError(exc.errno, f"cannot give the socket to group {group}: {exc.strerror}") from None

    def serve_forever(self) -> None:
        """The event loop: accept, read, hand bytes to the writers, answer, until stopped."""
        assert self._listener is not None
        threading.Thread(
            target=self.files.watcher.run,
            args=(lambda: self.stopping, lambda: self.reopen_all("SIGHUP")),
            name="rotation watcher",
            daemon=True,
        ).start()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._listen(True)
        grace_ends: Optional[float] = None
        while True:
            if self.stopping and grace_ends is None:
                grace_ends = time.monotonic() + STOP_GRACE
                self._stop_accepting()
            if grace_ends is not None and (not self.sessions or time.monotonic() >= grace_ends):
                break
            self._turn()
        self._shutdown()

    def _turn(self) -> None:
        """One turn of the loop: wait for the next event or timer, act on it."""
        wake = [t for t in (self._next_timer(), self._turned_away.ends()) if t is not None]
        if not self._listening and not self.stopping:
            wake.append(self._paused_until)
        if self.stopping:
            wake.append(time.monotonic() + 0.1)
        timeout = max(0.0, min(wake) - time.monotonic()) if wake else None
        for key, mask in self._selector.select(timeout):
            target = key.data
            if target is None:
                self._woken()
            elif target is self:
                self._accept_all()
            elif self.sessions.get(target.fd) is target:
                if mask & selectors.EVENT_WRITE:
                    target.on_writable()
                if mask & selectors.EVENT_READ and target.reading:
                    target.on_readable()
        self._run_calls()
        self._run_timers()
        self._turned_away.over()
        if not self._listening and not self.stopping and time.monotonic() >= self._paused_until:
            self._listen(True)

    def _listen(self, on: bool) -> None:
        if on and not self._listening:
            self._selector.register(self._listener, selectors.EVENT_READ, self)
        elif not on and self._listening:
            self._selector.unregister(self._listener)
        self._listening = on

    def _woken(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # -- calls from other threads and timers --------------------------------
    @property
    def wakeup_fd(self) -> int:
        """Writing to it wakes the loop."""
        return self._wake_w

    def call_soon(self, calls: List[Callable[[], None]]) -> None:
        """Any thread: run ``calls`` on the loop's thread, in order."""
        self._calls.append(calls)
        if not self._poked:
            self._poked = True
            self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"c")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    def _run_calls(self) -> None:
        self._poked = False  # before taking the calls: a call queued after this pokes again
        while self._calls:
            for call in self._calls.popleft():
                try:
                    call()
                except Exception as exc:  # a session's mistake never stops the loop
                    self.warn(f"Internal error: {P.exception_text(exc)}")

    def at(self, when: float, session: "Session") -> None:
        """Call ``session.on_timer()`` at ``when`` (time.monotonic()), on the loop."""
        heapq.heappush(self._timers, (when, session.id, session))

    def _next_timer(self) -> Optional[float]:
        """When the next timer that still matters is due (timers of sessions that moved
        on, say past their handshake, are dropped: an idle server is not woken by them)."""
        timers = self._timers
        while timers and not timers[0][2].wants_timer(timers[0][0]):
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, session = heapq.heappop(self._timers)
            session.on_timer(now)

    def request_stop(self) -> None:
        """Signal-safe: ask the loop to stop."""
        self.stopping = True
        self._poke()

    def request_reopen(self) -> None:
        """Signal-safe: reopen every file (SIGHUP), on the rotation watcher's thread."""
        self.files.watcher.request_reopen()

    def reopen_all(self, why: str) -> List[Tuple[str, Optional[str]]]:
        """Reopen every file: the one routine behind SIGHUP and ``offlog reopen``.
        Returns (path, None) per file reopened, (path, why not) per file that was not."""
        self.info(f"Received {why}, reopening all files")
        results = self.files.reopen_all(why)
        failed = sum(1 for _, error in results if error is not None)
        self.info(f"Reopened {len(results) - failed} of {len(results)} files, {failed} failed")
        return results

    # -- accepting ------------------------------------------------------------
    def _accept_all(self) -> None:
        """Accept every waiting client. A limit of the host (descriptors) turns a
        client away with the reason, never stops the accepting."""
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM
                refused = self._refuse_with_spare(exc)
                if refused is None:
                    return  # nobody was waiting after all (accept runs out of descriptors before it looks)
                if refused:
                    continue
                self._turned_away.note(f"accepting paused for {ACCEPT_PAUSE:g} s: {exc}")
                self._paused_until = time.monotonic() + ACCEPT_PAUSE
                self._listen(False)
                return
            self._start_session(sock)

    def _refuse_with_spare(self, exc: OSError) -> Optional[bool]:
        """Out of descriptors: close the spare one, accept the waiting client with
        it, tell it why and close it (it hears the reason at once instead of
        timing out), take the spare again. False if that cannot be done, None
        if no client was waiting."""
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            return False
        if self._spare_fd < 0:
            self._spare_fd = _spare_descriptor()
            if self._spare_fd < 0:
                return False
        os.close(self._spare_fd)
        self._spare_fd = -1
        refused: Optional[bool] = True
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            refused = None
        except OSError:
            refused = False  # another thread took the descriptor
        else:
            self._turned_away.note(f"refused a client: {exc.strerror}")
            refuse_connection(sock, OSError(exc.errno, NO_DESCRIPTOR))
        self._spare_fd = _spare_descriptor()  # the one the client had
        return refused

    def _start_session(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        session = Session(self, self._next_id, sock)
        self._next_id += 1
        self.sessions[session.fd] = session
        self._selector.register(sock, selectors.EVENT_READ, session)
        self.at(session.handshake_ends, session)
        session.start()
        if self._spare_fd < 0:
            self._spare_fd = _spare_descriptor()

    def interest(self, session: "Session") -> None:
        """The loop watches ``session``'s socket for what it wants now (read, write, both, none)."""
        mask = (selectors.EVENT_READ if session.reading else 0) | (selectors.EVENT_WRITE if session.out else 0)
        if mask == session.mask:
            return
        if session.mask == 0:
            self._selector.register(session.sock, mask, session)
        elif mask == 0:
            self._selector.unregister(session.sock)
        else:
            self._selector.modify(session.sock, mask, session)
        session.mask = mask

    def admit_frame(self, session: "Session", size: int) -> bool:
        """May ``session`` receive a frame of ``size`` bytes (a large one)? It may if the
        frames admitted so far leave room under --max-frame-memory (or none is admitted:
        a frame larger than the limit goes alone). Otherwise it waits, in order."""
        if (self.frame_memory + size <= self.max_frame_memory or not self.frame_memory) and not self._short:
            self.frame_memory += size
            return True
        self._short.append(session)
        return False

    def frame_done(self, size: int) -> None:
        """An admitted frame is whole (or its session ended): admit who waits, in order."""
        self.frame_memory -= size
        while self._short:
            session = self._short[0]
            need = session.frame_wanted()
            if need and self.frame_memory + need > self.max_frame_memory and self.frame_memory:
                return
            self._short.popleft()
            if need:
                self.frame_memory += need
                session.frame_admitted(need)

    def session_done(self, session: "Session") -> None:
        if self.sessions.get(session.fd) is session:
            del self.sessions[session.fd]

    def status(self) -> dict:
        """What ``python -m offlog status`` shows (the loop's thread)."""
        sessions = list(self.sessions.values())
        return {
            "pid": os.getpid(),
            "version": __version__,
            "socket": self.socket_path,
            "uptime": round(time.time() - self.started, 3),
            "shm": {
                "offered": self.shm_unavailable is None,
                "ring_size": self.ring_size,
                "ring_memory": self.ring_memory,
                "max_ring_memory": self.max_ring_memory,
                "why_not": self.shm_unavailable,
            },
            "writers": self.writers.status(),
            "frames": {"memory": self.frame_memory, "max_memory": self.max_frame_memory, "waiting": len(self._short)},
            "clients": [s.status() for s in sessions if s.file is not None and s.opened],
            "files": [
                {
                    "path": f.path,
                    "clients": f.clients,
                    "bytes_written": f.bytes_written,
                    "errors": f.errors,
                    "reopen_error": f.reopen_error,
                }
                for f in self.files.snapshot()
            ],
            "errors": self.errors,
            "recent_errors": list(self.recent_errors),
            "dropped_bytes": self.dropped_closed + sum(s.dropped for s in sessions),
        }

    def reserve_ring(self) -> Optional[str]:
        """Count one more ring against --max-ring-memory; or why not (the client gets the socket)."""
        if self.ring_memory + self.ring_size > self.max_ring_memory:
            return (
                f"ring memory limit reached ({self.ring_memory} bytes in rings, "
                f"--max-ring-memory {self.max_ring_memory})"
            )
        self.ring_memory += self.ring_size
        return None

    def release_ring(self) -> None:
        self.ring_memory -= self.ring_size

    def _stop_accepting(self) -> None:
        """Stopping: no new clients; every client's data already sent is still read and
        written (its read side is shut: it ends where the client's bytes end)."""
        self.info("Received signal, shutting down")
        self._turned_away.over(stopping=True)
        self._listen(False)
        self._listener.close()
        if self._spare_fd >= 0:
            os.close(self._spare_fd)
            self._spare_fd = -1
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        for session in list(self.sessions.values()):
            session.interrupt()

    def _shutdown(self) -> None:
        for session in list(self.sessions.values()):
            session.abandon()  # its writer is stuck past the grace period
        self.writers.stop()
        self._selector.close()
        self.info("Exit")


def _claim_socket_path(path: str) -> None:
    """Make ``path`` free to bind: remove a stale socket file; raise if the path is
    not a socket, or if a live server answers there (naming its user and pid)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError("the path exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    who = ""
    try:
        probe.connect(path)
        pid, uid = peer_credentials(probe)
        if uid is not None:
            who = f" ({describe_uid(uid)}, pid {'unknown' if pid is None else pid})"
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: nobody listens
        return
    except socket.timeout:
        pass  # a live server with a full backlog: who it is stays unknown
    finally:
        probe.close()
    raise RuntimeError(f"another offlog server is already listening there{who}; stop it first or choose another -s")


def _spare_descriptor() -> int:
    """A descriptor to give up when accept() finds none left; -1 if there is none to take."""
    try:
        return os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return -1


def refuse_connection(sock: socket.socket, error: OSError) -> None:
    """Turn a client away without waiting for it: if its first bytes are here
    already, answer ``error`` in its dialect (framed: the greeting, then ERROR;
    0.x: the error text); otherwise say nothing. Then close the connection."""
    try:
        conn = P.ServerConnection()
        conn.receive_data(sock.recv(RECV_SIZE, socket.MSG_DONTWAIT))
        if conn.next_event() is not P.NEED_DATA:
            sock.send(conn.send(P.Error(error)), socket.MSG_DONTWAIT)
    except (OSError, P.ProtocolError):
        pass  # nothing there yet, or the client left: closing is all there is to do
    finally:
        sock.close()


class _TurnedAway:
    """Clients the server could not serve for want of a descriptor or a thread.
    A burst of them is logged when it starts (one line per reason) and, with
    the counts, when it ends: ``BURST_QUIET`` seconds after the last one, or at
    the stop. A flood costs a few lines, not one per client. Main thread only."""

    def __init__(self, warn, info) -> None:
        self._warn = warn
        self._info = info
        self._counts: Dict[str, int] = {}
        self._last = 0.0

    def note(self, what: str) -> None:
        if what not in self._counts:
            self._warn(f"Turning clients away: {what}; accepting goes on")
        self._counts[what] = self._counts.get(what, 0) + 1
        self._last = time.monotonic()

    def ends(self) -> Optional[float]:
        """When the current burst ends if no client is turned away before; None without one."""
        return self._last + BURST_QUIET if self._counts else None

    def over(self, stopping: bool = False) -> None:
        """Log the counts of a burst that has ended (every burst, when stopping)."""
        if self._counts and (stopping or time.monotonic() >= self._last + BURST_QUIET):
            counts, self._counts = self._counts, {}
            self._info("Clients turned away: " + "; ".join(f"{count} x {what}" for what, count in counts.items()))


def _group_id(group: str) -> int:
    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid


class Session:
    """One client connection. Every method runs on the event loop's thread, but
    the ``on_*`` callbacks are what the writers report (run on the loop too)."""

    def __init__(self, server: Server, sid: int, sock: socket.socket) -> None:
        self.server = server
        self.id = sid
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = P.ServerConnection()
        self.file: Optional[OpenFile] = None
        self.opened = False  # the writers opened the file for this client
        self.fsync = False
        self.ring: Optional[ServerRing] = None
        self.ring_state: Optional[str] = None  # the writers': awake, asleep, gone
        self.ring_seen = 0.0  # the writers': when the ring last had bytes
        self.work: Any = None  # the writers': the file's work, while the ring is awake
        self.has_data: Optional[Callable[[], bool]] = None  # the writers': the ring's poll
        self.failed: Optional[BaseException] = None  # set by the writers: the file or ring failed
        self.pid, self.uid = peer_credentials(sock)
        self.connected = time.time()
        self.handshake_ends = time.monotonic() + server.handshake_timeout
        self.written = 0  # the writers'
        self.confirmed = 0  # `written` as last told to the client in a WRITTEN frame
        self.confirm_at = ACK_EVERY  # `written` from which a WRITTEN is due (the writers then call on_written)
        self.received = 0  # bytes handed to the writers (written - received: not yet written)
        self.dropped = 0
        self.out = bytearray()  # what the socket did not take yet
        self.mask = selectors.EVENT_READ  # what the loop watches the socket for
        self.reading = True
        self.phase = "handshake"  # handshake, opening, data, ending, closing, closed
        self._open_event: Any = None  # the Open being served
        self._linger_ends = 0.0
        self.frame: Tuple[int, int] = (0, -1)  # (size, number) of the large frame admitted, if any
        self.frame_ends = 0.0  # when an admitted frame must be whole, or a wait for admission ends
        self.waiting_frame = False  # not read until the server admits the large frame under way
        self.empty_frames = 0

    # -- the loop's events ----------------------------------------------------
    def start(self) -> None:
        who = f" (pid {self.pid}, uid {self.uid})" if self.pid is not None else ""
        self.server.info(f"Client {self.id} connected{who}")

    def on_readable(self) -> None:
        if not self._frame_admitted():
            return
        try:
            chunk = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # ECONNRESET: the client is gone; what it sent before is read
            chunk = b""
        if not chunk and self.server.stopping and self.phase == "handshake":
            self._end(SERVER_EXITED)
            return
        self._guarded(self.conn.receive_data, chunk)
        self._guarded(self._events)
        if self.frame[0] and self.conn.frame_under_way[1] != self.frame[1]:
            self._frame_whole()

    # -- large frames -----------------------------------------------------------
    def _frame_admitted(self) -> bool:
        """A frame over FRAME_FREE bytes is read only once the server admitted it
        (--max-frame-memory); until then the session is not read."""
        size, _ = self.conn.frame_under_way
        if size <= FRAME_FREE or self.frame[0]:
            return True
        if self.waiting_frame:  # in line already (read only by a stop's interrupt)
            self.reading = False
            self.server.interest(self)
            return False
        if self.server.admit_frame(self, size):
            self.frame_admitted(size)
            return True
        self.waiting_frame = True
        self.reading = False
        self.server.interest(self)
        self.frame_ends = time.monotonic() + self.server.handshake_timeout
        self.server.at(self.frame_ends, self)
        return False

    def frame_wanted(self) -> int:
        """The size of the frame this session waits to have admitted; 0 if it no longer waits."""
        return self.conn.frame_under_way[0] if self.waiting_frame and self.phase in ("handshake", "data") else 0

    def frame_admitted(self, size: int) -> None:
        self.frame = (size, self.conn.frame_under_way[1])
        self.frame_ends = time.monotonic() + self.server.handshake_timeout
        self.server.at(self.frame_ends, self)
        if self.waiting_frame:
            self.waiting_frame = False
            self._read_on()

    def _no_more_frames(self) -> None:
        """The session reads no more: its admitted frame's memory is free, and it is
        no longer in line for any (frame_wanted says 0 once it has left the phases)."""
        self.waiting_frame = False
        if self.frame[0]:
            self._frame_whole()

    def _frame_whole(self) -> None:
        size, self.frame = self.frame[0], (0, -1)
        self.server.frame_done(size)

    def _frame_late(self) -> None:
        size, timeout = self.conn.frame_under_way[0], self.server.handshake_timeout
        if self.waiting_frame:
            why = (
                f"waited {timeout:g} s for room for a frame of {size} bytes: "
                "other clients' frames fill --max-frame-memory"
            )
        else:
            why = f"a frame of {size} bytes not completed within {timeout:g} s"
        self.server.warn(f"Client {self.id} cut off: {why}")
        self._end(OSError(errno.ENOBUFS, why))

    def on_writable(self) -> None:
        self._flush_out()

    def wants_timer(self, when: float) -> bool:
        """Is a timer set for ``when`` still one this session needs?"""
        if self.phase == "handshake" and when == self.handshake_ends:
            return True
        if self.phase == "closing" and when == self._linger_ends:
            return True
        return (self.waiting_frame or bool(self.frame[0])) and when == self.frame_ends

    def on_timer(self, now: float) -> None:
        if self.phase == "handshake" and now >= self.handshake_ends:
            error = TimeoutError(f"no handshake within {self.server.handshake_timeout:g} s")
            self.server.warn(f"Client {self.id} error: {P.exception_text(error)}")
            self._end(error)
        elif self.phase == "closing" and now >= self._linger_ends:
            self._close_socket()
        elif (self.waiting_frame or self.frame[0]) and now >= self.frame_ends and self.phase in ("handshake", "data"):
            self._frame_late()

    def interrupt(self) -> None:
        """Server stopping: read what the client sent, then end (its read side is shut)."""
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        if self.phase in ("handshake", "data") and not self.reading:
            self.reading = True  # paused: read on, to the end
            self.server.interest(self)

    def abandon(self) -> None:
        """The stop's grace period is over and a writer still has this session's file
        (stuck): close the socket; ring and file go with the process, which exits."""
        self._close_socket()

    # -- reading events ---------------------------------------------------------
    def _guarded(self, step: Callable[..., Any], *args: Any) -> None:
        """Run one step; a failure ends this client (only) with its error."""
        if self.phase in ("ending", "closing", "closed"):
            return
        try:
            step(*args)
        except _Reported as exc:
            self._end(exc.error)
        except P.TruncatedFrame as exc:
            if not self.server.stopping:
                self._protocol_error(exc)
            else:
                cut = self.conn.pending
                self.server.info(f"Client {self.id} cut off in the middle of a frame: {cut} bytes discarded")
                self._end_of_data()
        except P.ProtocolError as exc:
            self._protocol_error(exc)
        except Exception as exc:  # one client's failure never takes the server down
            self.server.warn(f"Client {self.id} error: {P.exception_text(exc)}")
            self._end(exc)

    def _protocol_error(self, exc: P.ProtocolError) -> None:
        where = f" (state {exc.state}, {exc.event})" if exc.event else ""
        self.server.warn(f"Client {self.id} protocol error{where}: {exc}")
        self._end(exc)

    def _events(self) -> None:
        """Act on every event received so far."""
        conn = self.conn
        batch: List[memoryview] = []
        while self.phase in ("handshake", "data"):
            try:
                event = conn.next_event()
            except P.ProtocolError:
                self._append(batch)  # what came before the bad frame (or a stop's cut) is written
                raise
            kind = type(event)
            if kind is P.Data:
                if event.payload:
                    self.empty_frames = 0
                else:
                    self.empty_frames += 1
                    if self.empty_frames > EMPTY_FRAMES:
                        self._append(batch)
                        flood = f"more than {EMPTY_FRAMES} empty DATA frames in a row"
                        raise P.ProtocolError(flood, conn.state, "Data")
                batch.append(event.payload)
                continue
            self._append(batch)
            batch = []
            if event is P.NEED_DATA or event is P.PAUSED:
                return
            if kind is P.Flush:
                self.server.writers.flush(self, event.token)
            elif kind is P.Dropped:
                self.dropped = event.count
            elif kind is P.EndOfData:
                self._end_of_data()
            else:
                self._handshake_step(event)
        self._append(batch)

    def _append(self, parts: List[memoryview]) -> None:
        if parts:
            self.received += sum(map(len, parts))
            self.server.writers.append(self, parts)
            if self.received - self.written > SESSION_BUFFER and self.reading:
                self.reading = False  # the writers are behind: the client waits in its socket
                self.server.interest(self)

    def _end_of_data(self) -> None:
        """The client's data ended: the writers write the rest; then BYE (on_finished)."""
        self._no_more_frames()
        self.phase = "ending"
        self.reading = False
        self.server.interest(self)
        self.server.writers.finish(self)

    # -- handshake --------------------------------------------------------------
    def _handshake_step(self, event: Any) -> None:
        step = {
            P.Preamble: self._greet,
            P.OpenPath: self._open_legacy,
            P.Open: self._open_framed,
            P.InvalidPath: self._invalid_path,
            P.ShmAccept: self._ring_accepted,
            P.ShmDecline: self._ring_declined,
            P.StatusRequest: self._answer_status,
            P.ReopenRequest: self._answer_reopen,
            P.Closed: self._gone_in_handshake,
        }[type(event)]
        step(event)

    def _say(self, event: Any) -> None:
        self._send(self.conn.send(event))

    def _greet(self, event: P.Preamble) -> None:
        self._say(P.Greeting())

    def _gone_in_handshake(self, event: P.Closed) -> None:
        self.server.info(f"Client {self.id} disconnected during the handshake")
        self._end(None)

    def _invalid_path(self, event: P.InvalidPath) -> None:
        raise self._refuse(f"Client {self.id} error, {event.error}", event.error)

    def _answer_status(self, event: P.StatusRequest) -> None:
        self._say(P.StatusReply(self.server.status()))
        self._end(None)  # a status query ends here

    def _answer_reopen(self, event: P.ReopenRequest) -> None:
        """Reopening may wait for busy files: on a thread of its own, answered on the loop."""
        server = self.server
        self.phase = "opening"  # (waits for an answer, like an open)
        self.reading = False  # a hang-up meanwhile is heard when the answer is sent
        server.interest(self)

        def reopen() -> None:
            try:
                results = server.reopen_all(f"a reopen request from client {self.id}")
            except Exception as exc:
                server.call_soon([lambda error=exc: self._reopened(None, error)])
            else:
                server.call_soon([lambda: self._reopened(results, None)])

        try:
            threading.Thread(target=reopen, name=f"reopen-{self.id}", daemon=True).start()
        except RuntimeError as exc:
            self.phase = "handshake"
            raise _Reported(OSError(errno.EAGAIN, f"the offlog server cannot start a thread to reopen files: {exc}"))

    def _reopened(self, results: Optional[List[Tuple[str, Optional[str]]]], error: Optional[BaseException]) -> None:
        if self.phase != "opening":
            return
        self.phase = "handshake"
        if error is not None:
            self._end(error)
        else:
            self._say(P.Reopened(P.reopened_document(results)))
            self._end(None)  # so does a reopen request

    def _open_legacy(self, event: P.OpenPath) -> None:
        self._open(event, event.path)

    def _open_framed(self, event: P.Open) -> None:
        self.fsync = bool(event.flags & P.FSYNC)
        self._open(event, event.path)

    def _open(self, event: Any, path: str) -> None:
        """Reserve the file; the writers open it (or wait for its first client's open)."""
        self.file, first = self.server.files.reserve(path)
        self._open_event = event
        self.phase = "opening"
        self.reading = False  # what the client sends meanwhile waits in its socket
        self.server.interest(self)
        self.server.writers.open(self, first)

    def on_opened(self, error: Optional[BaseException]) -> None:
        """The writers opened the file (or could not: the reservation is given back)."""
        path = self.file.path
        if error is not None:
            self.file = None
        if self.phase != "opening":  # ended meanwhile (a stop, the deadline)
            self._close(None)
            return
        self.phase = "handshake"
        self.reading = True
        self.server.interest(self)
        now = time.monotonic()
        if self.handshake_ends < now + 1.0:  # the open took the client's time: the rest of the
            self.handshake_ends = now + self.server.handshake_timeout  # handshake gets a fresh deadline
            self.server.at(self.handshake_ends, self)
        if error is not None:
            self._end(error, f"Client {self.id} access denied for {path}: {P.exception_text(error)}")
            return
        self.opened = True
        self.server.info(f"Client {self.id} opened {path} (clients of this file: {self.file.clients})")
        event, self._open_event = self._open_event, None
        self._guarded(self._opened, event)
        self._guarded(self._events)  # frames that came with the handshake

    def _opened(self, event: Any) -> None:
        if isinstance(event, P.OpenPath):
            self._say(P.Opened())
            self.server.info(f"Client {self.id} transport: socket (0.x client)")
            self._data_phase()
            return
        reason = self._offer_reason(event.flags, event.version) or self.server.reserve_ring()
        if reason is None:
            try:
                self.ring = ServerRing(self.server.ring_size)
            except Exception as exc:
                self.server.release_ring()
                reason = f"could not create the ring: {exc}"
        if self.ring is None:
            self._say(P.Opened(note=reason, version=self.conn.version))
            self.server.info(f"Client {self.id} transport: socket ({reason})")
            self._data_phase()
        else:
            self._offer()

    def _data_phase(self) -> None:
        self.phase = "data"

    def _offer(self) -> None:
        """OPENED(SHM_OFFERED) + SHM_OFFER with the ring's memfd attached to their
        bytes (SCM_RIGHTS); the server's copy of the descriptor goes once sent."""
        data = self.conn.send(P.ShmOffer(self.ring.capacity))
        try:
            if self.out:
                raise BlockingIOError(errno.EAGAIN, "the client has not read the greeting")
            sent = socket.send_fds(self.sock, [data], [self.ring.fd], socket.MSG_DONTWAIT)
        except OSError as exc:
            raise _Reported(OSError(exc.errno, f"cannot pass the ring: {exc.strerror}")) from None
        finally:
            self.ring.close_fd()
        self._send(data[sent:])

    def _ring_accepted(self, event: P.ShmAccept) -> None:
        self.server.info(f"Client {self.id} transport: shm (ring of {self.ring.capacity} bytes)")
        self._data_phase()
        self.server.writers.add_ring(self)

    def _ring_declined(self, event: P.ShmDecline) -> None:
        self._close_ring()
        self.server.info(f"Client {self.id} transport: socket (client could not use the ring: {event.reason})")
        self._data_phase()

    def _refuse(self, line: str, error: BaseException) -> "_Reported":
        """Log one line about this client's problem; ``error`` goes back to the client."""
        self.server.warn(line)
        return _Reported(error)

    def _offer_reason(self, flags: int, version: int) -> Optional[str]:
        """Why this client gets no ring, or None to offer one."""
        if self.server.shm_unavailable is not None:
            return self.server.shm_unavailable
        if flags & P.NO_SHM_SUPPORT:
            return "client cannot map rings"
        if not flags & P.WANT_SHM:
            return "client asked for the socket"
        if version < P.SEALED_RINGS:
            return f"client too old for sealed rings (protocol {version})"
        return None

    # -- what the writers report ------------------------------------------------
    def on_written(self) -> None:
        """Socket bytes are in the file (the writers call when a WRITTEN is due or the
        session is paused): WRITTEN now and then; read on if paused."""
        if self.phase not in ("data", "ending"):
            return
        if self.written >= self.confirm_at and self.ring is None:
            if self.conn.framed:
                self._confirm()
            else:
                self._confirmed_to(self.written)  # 0.x has no WRITTEN: nothing is due
        self._read_on()

    def _read_on(self) -> None:
        """Read this client again if nothing holds it back: the writers have caught
        up with its bytes, it has read its answers, no large frame waits for room."""
        if (
            not self.reading
            and self.phase in ("handshake", "data")
            and self.received - self.written <= SESSION_BUFFER // 2
            and len(self.out) <= OUT_LIMIT
            and not self.waiting_frame
        ):
            self.reading = True
            self.server.interest(self)

    def on_flushed(self, token: int) -> None:
        if self.phase in ("data", "ending"):
            self._guarded_say(P.Flushed(token))

    def on_finished(self) -> None:
        """Every byte of the client's is written: BYE (or, stopping, that we exit)."""
        if self.server.stopping:
            if self.ring is not None:
                self.ring.consumer.fail(errno.ESHUTDOWN)
            elif self.conn.framed:
                self._confirm()  # everything received is written: nothing to resend
            self._close(SERVER_EXITED)
        else:
            self._close(None, P.Bye())

    def on_failed(self, error: BaseException, line: str) -> None:
        self.server.warn(line)
        self._close(error)

    def on_released(self) -> None:
        self._close(None)

    def _confirmed_to(self, position: int) -> None:
        self.confirmed = position
        self.confirm_at = position + ACK_EVERY

    def _confirm(self) -> None:
        """Tell a socket client how much of its data is in the file (WRITTEN), so
        it can forget it. A WRITTEN the socket would not take now is skipped."""
        if self.out:
            return  # the next will do
        try:
            self.sock.send(self.conn.send(P.Written(self.written)), socket.MSG_DONTWAIT)  # 13 bytes: all or nothing
            self._confirmed_to(self.written)
        except (OSError, P.ProtocolError):
            pass  # full (the next WRITTEN will do) or the client left (the read side notices)

    def _guarded_say(self, event: Any) -> None:
        try:
            self._say(event)
        except P.ProtocolError:
            pass  # the connection has ended already

    # -- sending ----------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        """Send now what the socket takes; keep the rest for when it is writable.
        A client that does not read its answers stops being read (it waits, not us)."""
        if not data or self.phase == "closed":
            return
        if not self.out:
            try:
                sent = self.sock.send(data, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return  # the client left; its read side says so
            data = data[sent:]
            if not data:
                return
        self.out += data
        if len(self.out) > OUT_LIMIT and self.reading:
            self.reading = False
        self.server.interest(self)

    def _flush_out(self) -> None:
        try:
            sent = self.sock.send(self.out, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(self.out)  # gone: nothing more to say
        del self.out[:sent]
        if not self.out:
            if self.phase == "closing":
                self._close_socket()
                return
            self._read_on()
        self.server.interest(self)

    # -- ending -----------------------------------------------------------------
    def _end(self, error: Optional[BaseException], line: Optional[str] = None) -> None:
        """End this session now: say ``error`` (if any); the writers let the ring go first."""
        if line is not None:
            self.server.warn(line)
        if self.phase in ("ending", "closing", "closed"):
            return
        self._no_more_frames()
        if error is not None:
            self._say_error(error)
        self.reading = False
        self.server.interest(self)
        if self.phase == "opening":
            self.phase = "ending"  # on_opened gives the file back
        elif self.opened:
            self.phase = "ending"
            self.server.writers.drop(self)  # then on_released
        else:
            self._close(None)

    def _say_error(self, error: BaseException) -> None:
        try:
            self._say(P.Error(error, errno.ESHUTDOWN if error is SERVER_EXITED else None))
        except P.ProtocolError:
            pass  # the connection has ended already (BYE or a reply was sent)

    def _close(self, error: Optional[BaseException], last: Any = None) -> None:
        """Give back ring and file; say ``error`` or ``last``; close once it is sent."""
        if self.phase in ("closing", "closed"):
            return
        if error is not None:
            self._say_error(error)
        elif last is not None:
            self._guarded_say(last)
        self._give_back()
        self.reading = False
        self.phase = "closing"
        if self.out:
            self._linger_ends = time.monotonic() + CLOSE_LINGER
            self.server.at(self._linger_ends, self)
            self.server.interest(self)
        else:
            self._close_socket()

    def _close_ring(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.server.release_ring()
            self.ring = None

    def _give_back(self) -> None:
        """Ring and file go (the writers have let them go); the log says so. Once."""
        server = self.server
        self._close_ring()
        if self.file is not None:
            file, self.file = self.file, None
            if self.opened:
                server.info(f"Client {self.id} closed {file.path}")
            server.writers.release(file, lambda last: last and server.info(f"Closed {file.path}"))
        if self.dropped:
            server.warn(f"Client {self.id} dropped {self.dropped} bytes (its backlog was full)")
            server.dropped_closed += self.dropped
            self.dropped = 0

    def _close_socket(self) -> None:
        if self.phase == "closed":
            return
        self.phase = "closed"
        self.reading = False
        self.out.clear()
        self._no_more_frames()
        self.server.interest(self)
        self.server.session_done(self)
        self.sock.close()
        self.server.info(f"Client {self.id} disconnected")

    def status(self) -> dict:
        """This client's line of the status report."""
        return {
            "id": self.id,
            "pid": self.pid,
            "uid": self.uid,
            "file": self.file.path,
            "transport": "shm" if self.ring is not None else "socket",
            "dialect": "framed" if self.conn.framed else "0.x",
            "connected": round(self.connected, 3),
            "bytes_written": self.written,
            "unconfirmed": (
                self.ring.consumer.unconfirmed()
                if self.ring is not None
                else self.conn.pending + self.received - self.written
            ),
            "dropped_bytes": self.dropped,
        }


class _Reported(Exception):
    """An error already logged, to be sent to the client as ``error``."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def install_signal_handlers(server: Server) -> None:
    def stop(signum, frame):
        server.request_stop()

    # The kernel may deliver a signal to any thread (a session's, the rotation
    # watcher's); CPython runs the handler in the main thread only when that
    # thread next runs bytecode. The wakeup fd makes the signal itself wake the
    # main thread's select(), so a SIGTERM is never left waiting.
    signal.set_wakeup_fd(server.wakeup_fd)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # stack dump for a stuck server
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda signum, frame: server.request_reopen())


def raise_fd_limit() -> None:
    """Allow as many clients as the hard limit permits."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def notify_systemd() -> bool:
    """Send READY=1 to $NOTIFY_SOCKET: one datagram, the whole sd_notify protocol."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | getattr(socket, "SOCK_CLOEXEC", 0)) as sock:
        sock.connect(address)
        sock.sendall(b"READY=1")
    return True


def default_ring_memory() -> int:
    """MAX_RING_MEMORY, or half of /dev/shm if that is smaller."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return MAX_RING_MEMORY
    return min(MAX_RING_MEMORY, st.f_blocks * st.f_frsize // 2)


def main_server(args, log: LineLogger) -> int:
    raise_fd_limit()
    threading.stack_size(512 * 1024)
    server = Server(
        args.socket_file,
        log,
        shm=args.shm,
        ring_size=DEFAULT_CAPACITY if args.ring_size is None else args.ring_size,
        socket_mode=args.socket_mode,
        socket_group=args.socket_group,
        max_ring_memory=args.max_ring_memory,
        max_frame_memory=args.max_frame_memory,
        handshake_timeout=args.handshake_timeout,
    )
    for output in log.outputs:
        try:
            server.files.keep_out_fd(output.fileno())  # no client appends to the server's own log
        except (OSError, ValueError):
            pass  # an output with no descriptor
    log.info("This is offlog server")
    install_signal_handlers(server)  # before the socket exists: a client may signal as soon as it connects
    try:
        server.bind()
    except (RuntimeError, LookupError, OSError) as exc:
        log.error(f"Cannot listen on {args.socket_file}: {exc}")
        return 1
    log.info(f"Listening on socket {args.socket_file}")
    log.info(f"Rotation watcher: {server.files.watcher.describe()}")
    if args.shm:
        if server.shm_unavailable:
            log.warning(f"Shared memory disabled: {server.shm_unavailable}")
        else:
            log.info(
                f"Offering shared-memory rings of {server.ring_size} bytes, "
                f"{server.max_ring_memory} bytes of rings at most"
            )
    elif args.ring_size is not None:
        log.warning("--ring-size has no effect without --shm")
    if args.notify and not notify_systemd():
        log.warning("--notify given but NOTIFY_SOCKET is not set")
    server.serve_forever()
    return 0
