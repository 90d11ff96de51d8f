"""The offlog server: accepts clients, opens their files, writes their bytes.

Theory of operation
-------------------
The main thread only accepts connections and handles signals. Every client
gets a :class:`Session` thread that does the client's blocking work: read the
handshake, open the file, then move the client's bytes from the socket (or
from its shared-memory ring) into the file. A file that stalls therefore
stalls only the sessions writing to that file; every other client's
handshake and data go on (no head-of-line blocking). Files are shared through
:class:`~offlog.files.FileTable`, whose per-file lock keeps appends whole.

Every byte a session reads goes into its
:class:`~offlog.protocol.ServerConnection` and every byte it sends comes out
of it: the protocol (both dialects, the state tables of docs/protocol.md
5.7, every protocol error) lives there, and a session only does the I/O and
acts on events: open the file for an ``Open``, append ``Data``, answer a
``Flush`` once what came before it is written. BYE is only ever said when
every byte of the client's is written: an EOF inside a frame is a protocol
error.

A ring session drains its ring and, with nothing to drain, waits on the
ring's doorbell semaphore (:meth:`~offlog.shm.objects.ServerRing.wait`, the
nap and sleep handshake that :mod:`offlog.shm.ring` argues), so it cannot
also block in ``recv``: the control watcher (``Server.control_watcher``, a
:class:`~offlog.watcher.Watcher` thread) watches the control sockets of all
ring sessions with one ``epoll`` (one-shot) and rings a session's doorbell
when its socket has something to say (a FLUSH, an EOF, a kill).

Stopping (SIGINT/SIGTERM): stop accepting, remove the socket file, shut the
read side of every client socket (data already received stays readable),
wake every ring session; each session writes everything it has, tells its
client ``OSError: offlog server exited`` and closes.

Rotation: the :class:`~offlog.files.RotationWatcher` thread follows renamed
and deleted files. SIGHUP (handled on that thread) and a REOPEN request
(``offlog reopen``, handled on the requesting session's thread, which answers
once every file is reopened) both run :meth:`Server.reopen_all`.
"""

from __future__ import annotations

import errno
import faulthandler
import grp
import os
import select
import selectors
import signal
import socket
import stat
import threading
import time
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

from . import __version__
from . import protocol as P
from .defaults import HANDSHAKE_TIMEOUT
from .files import FileTable, OpenFile
from .loglines import LineLogger, printable
from .shm import DEFAULT_CAPACITY, RingCorrupt, ServerRing, check_capacity, unsupported_reason
from .trust import describe_uid, peer_credentials
from .watcher import Watcher

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
#: What a client turned away at accept hears (errno EAGAIN, resp. EMFILE/ENFILE).
NO_THREAD = "the offlog server cannot start a thread for this client (thread or process limit); try again later"
NO_DESCRIPTOR = "the offlog server has no file descriptor left for this client; try again later"
#: A socket session acknowledges written bytes (WRITTEN) at least this often.
ACK_EVERY = 64 * 1024


class ClientGone(Exception):
    """The client closed or broke its connection."""


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
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.socket_path = socket_path
        self.ring_size = check_capacity(ring_size) if shm else ring_size
        self.max_ring_memory = default_ring_memory() if max_ring_memory is None else max_ring_memory
        self.ring_memory = 0  # data bytes of the rings that exist now
        self._ring_memory_lock = threading.Lock()
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
        self._sessions: Dict[int, Session] = {}
        self._sessions_lock = threading.Lock()
        self._next_id = 0
        self._wake_r, self._wake_w = os.pipe()
        self._listener: Optional[socket.socket] = None
        self._spare_fd = -1  # closed to accept (and refuse) a client when descriptors run out
        self._paused_until = 0.0  # no accept() before this (time.monotonic())
        self._turned_away = _TurnedAway(self.warn, self.info)
        self.control_watcher: Optional[Watcher] = None  # control sockets of ring sessions
        self.shm_unavailable = unsupported_reason() if shm else "server started without --shm"

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
        except BaseException:
            listener.close()  # a server that cannot start leaves no socket file behind
            os.unlink(self.socket_path)
            raise
        listener.setblocking(False)
        self._listener = listener
        self._spare_fd = _spare_descriptor()
        if self.shm_unavailable is None:
            self.control_watcher = Watcher(select.EPOLLIN | select.EPOLLRDHUP, "control watcher")

    def _give_socket_to(self, group: str) -> None:
        try:
            os.chown(self.socket_path, -1, _group_id(group))
        except KeyError:
            raise LookupError(f"no group named {group!r} on this host") from None
        except OSError as exc:
            raise OSError(exc.errno, f"cannot give the socket to group {group}: {exc.strerror}") from None

    def serve_forever(self) -> None:
        assert self._listener is not None
        threading.Thread(
            target=self.files.watcher.run,
            args=(lambda: self.stopping, lambda: self.reopen_all("SIGHUP")),
            name="rotation watcher",
            daemon=True,
        ).start()
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        listening = True
        while not self.stopping:
            wake = [t for t in (None if listening else self._paused_until, self._turned_away.ends()) if t is not None]
            for key, _ in sel.select(max(0.0, min(wake) - time.monotonic()) if wake else None):
                if key.fileobj is self._listener:
                    self._accept_all()
                else:
                    os.read(self._wake_r, 4096)
            self._turned_away.over()
            paused = time.monotonic() < self._paused_until
            if paused == listening:  # stop or resume watching the listener
                if paused:
                    sel.unregister(self._listener)
                else:
                    sel.register(self._listener, selectors.EVENT_READ)
                listening = not paused
        sel.close()
        self._shutdown()

    @property
    def wakeup_fd(self) -> int:
        """Writing to it wakes serve_forever's select()."""
        return self._wake_w

    def request_stop(self) -> None:
        """Signal-safe: ask serve_forever to stop."""
        self.stopping = True
        try:
            os.write(self._wake_w, b"s")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

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

    def _accept_all(self) -> None:
        """Accept every waiting client. A limit of the host (descriptors, threads)
        turns a client away with the reason, never stops the accepting."""
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
        """Serve a client on a thread of its own, or turn it away if no thread can start."""
        sock.setblocking(True)
        with self._sessions_lock:
            sid = self._next_id
            self._next_id += 1
            session = self._sessions[sid] = Session(self, sid, sock)
        try:
            threading.Thread(target=session.run, name=f"client-{sid}", daemon=True).start()
        except RuntimeError as exc:  # "can't start new thread": a thread, process or memory limit
            self.session_done(session)
            self._turned_away.note(f"refused a client: no thread ({exc})")
            refuse_connection(sock, OSError(errno.EAGAIN, NO_THREAD))
            return
        if self._spare_fd < 0:
            self._spare_fd = _spare_descriptor()

    def status(self) -> dict:
        """What ``python -m offlog status`` shows."""
        with self._sessions_lock:
            sessions = list(self._sessions.values())
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
            "clients": [s.status() for s in sessions if s.file is not None],
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
        with self._ring_memory_lock:
            if self.ring_memory + self.ring_size > self.max_ring_memory:
                return (
                    f"ring memory limit reached ({self.ring_memory} bytes in rings, "
                    f"--max-ring-memory {self.max_ring_memory})"
                )
            self.ring_memory += self.ring_size
            return None

    def release_ring(self) -> None:
        with self._ring_memory_lock:
            self.ring_memory -= self.ring_size

    def session_done(self, session: "Session") -> None:
        with self._sessions_lock:
            self._sessions.pop(session.id, None)

    def _shutdown(self) -> None:
        self.info("Received signal, shutting down")
        self._turned_away.over(stopping=True)
        self._listener.close()
        if self._spare_fd >= 0:
            os.close(self._spare_fd)
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        with self._sessions_lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.interrupt()
        deadline = time.monotonic() + STOP_GRACE
        for session in sessions:
            session.finished.wait(max(0.0, deadline - time.monotonic()))
        if self.control_watcher is not None:
            self.control_watcher.close()
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
    """One client connection, served by its own thread."""

    def __init__(self, server: Server, sid: int, sock: socket.socket) -> None:
        self.server = server
        self.id = sid
        self.sock = sock
        self.conn = P.ServerConnection()
        self.file: Optional[OpenFile] = None
        self.fsync = False
        self.ring: Optional[ServerRing] = None
        # Other threads touch the ring too (the control watcher posts its doorbell, a
        # stop wakes it, a status query reads its header): under this lock, and never
        # once it is closed (a post to a closed semaphore could land on freed memory).
        self._ring_lock = threading.Lock()
        self._ring_closed = False
        self.sock_ready = True  # the control socket has something (at first: frames that came with the handshake)
        self.finished = threading.Event()
        self.pid, self.uid = peer_credentials(sock)
        self.connected = time.time()
        self.written = 0
        self.confirmed = 0  # `written` as last told to the client in a WRITTEN frame
        self.dropped = 0

    # -- entry point --------------------------------------------------------
    def run(self) -> None:
        server = self.server
        who = f" (pid {self.pid}, uid {self.uid})" if self.pid is not None else ""
        try:
            server.info(f"Client {self.id} connected{who}")
            self._handshake()
            if self.ring is not None:
                self._serve_ring()
            else:
                self._serve_socket()
        except ClientGone:
            pass
        except _Reported as exc:
            self._send_error(exc.error)
        except P.ProtocolError as exc:
            where = f" (state {exc.state}, {exc.event})" if exc.event else ""
            server.warn(f"Client {self.id} protocol error{where}: {exc}")
            self._send_error(exc)
        except Exception as exc:  # one client's failure never takes the server down
            server.warn(f"Client {self.id} error: {P.exception_text(exc)}")
            self._send_error(exc)
        finally:
            self._close()

    def status(self) -> dict:
        """This client's line of the status report (any thread, at any moment)."""
        with self._ring_lock:
            if self.ring is not None:
                transport, unconfirmed = "shm", 0 if self._ring_closed else self.ring.consumer.unconfirmed()
            else:
                transport, unconfirmed = "socket", self.conn.pending
        return {
            "id": self.id,
            "pid": self.pid,
            "uid": self.uid,
            "file": self.file.path,
            "transport": transport,
            "dialect": "framed" if self.conn.framed else "0.x",
            "connected": round(self.connected, 3),
            "bytes_written": self.written,
            "unconfirmed": unconfirmed,
            "dropped_bytes": self.dropped,
        }

    def interrupt(self) -> None:
        """Server stopping: make the session finish what it has and leave."""
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        self._ring_doorbell()

    # -- handshake ---------------------------------------------------------
    def _handshake(self) -> None:
        """Read the handshake (either dialect), open the file, offer a ring.
        Returns once the data phase starts; frames that came with the
        handshake wait in the connection for the data path."""
        self._handshake_ends = time.monotonic() + self.server.handshake_timeout
        steps = {
            P.Preamble: self._greet,
            P.OpenPath: self._open_legacy,
            P.Open: self._open_framed,
            P.InvalidPath: self._invalid_path,
            P.ShmAccept: self._ring_accepted,
            P.ShmDecline: self._ring_declined,
            P.StatusRequest: self._answer_status,
            P.ReopenRequest: self._answer_reopen,
            P.Closed: self._gone_in_handshake,
        }
        while self.conn.state not in ("DATA", "CLOSED"):
            event = self._next_event()
            steps[type(event)](event)

    def _next_event(self):
        """The next event of the handshake, reading (under its timeout) as needed."""
        event = self.conn.next_event()
        while event is P.NEED_DATA:
            try:
                left = self._handshake_ends - time.monotonic()
                if left <= 0:
                    raise socket.timeout()
                self.sock.settimeout(left)
                chunk = self.sock.recv(RECV_SIZE)
            except socket.timeout:
                raise TimeoutError(f"no handshake within {self.server.handshake_timeout:g} s") from None
            if not chunk and self.server.stopping:
                raise SERVER_EXITED
            self.conn.receive_data(chunk)
            event = self.conn.next_event()
        return event

    def _say(self, event) -> None:
        self.sock.sendall(self.conn.send(event))

    def _greet(self, event: P.Preamble) -> None:
        self._say(P.Greeting())

    def _gone_in_handshake(self, event: P.Closed) -> None:
        self.server.info(f"Client {self.id} disconnected during the handshake")
        raise ClientGone()

    def _invalid_path(self, event: P.InvalidPath) -> None:
        raise self._refuse(f"Client {self.id} error, {event.error}", event.error)

    def _answer_status(self, event: P.StatusRequest) -> None:
        self._say(P.StatusReply(self.server.status()))
        raise ClientGone()  # a status query ends here

    def _answer_reopen(self, event: P.ReopenRequest) -> None:
        self.sock.settimeout(None)  # a reopen may wait for busy files; the reply must not time out
        results = self.server.reopen_all(f"a reopen request from client {self.id}")
        self._say(P.Reopened(P.reopened_document(results)))
        raise ClientGone()  # so does a reopen request

    def _open_legacy(self, event: P.OpenPath) -> None:
        self._open(event.path)
        self._say(P.Opened())
        self.server.info(f"Client {self.id} transport: socket (0.x client)")

    def _open_framed(self, event: P.Open) -> None:
        self.fsync = bool(event.flags & P.FSYNC)
        self._open(event.path)
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
        else:
            self._offer()

    def _offer(self) -> None:
        """OPENED(SHM_OFFERED) + SHM_OFFER with the ring's memfd attached to their
        bytes (SCM_RIGHTS); the server's copy of the descriptor goes once sent."""
        data = self.conn.send(P.ShmOffer(self.ring.capacity))
        try:
            sent = socket.send_fds(self.sock, [data], [self.ring.fd])
            self.sock.sendall(data[sent:])
        finally:
            self.ring.close_fd()

    def _ring_accepted(self, event: P.ShmAccept) -> None:
        self.server.info(f"Client {self.id} transport: shm (ring of {self.ring.capacity} bytes)")

    def _ring_declined(self, event: P.ShmDecline) -> None:
        self._close_ring()
        with self._ring_lock:
            self.ring = None
        self.server.info(f"Client {self.id} transport: socket (client could not use the ring: {event.reason})")

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

    def _open(self, path: str) -> None:
        try:
            self.file = self.server.files.acquire(path)
        except OSError as exc:
            raise self._refuse(f"Client {self.id} access denied for {path}: {P.exception_text(exc)}", exc) from None
        self.server.info(f"Client {self.id} opened {path} (clients of this file: {self.file.clients})")

    # -- socket data path -------------------------------------------------
    def _serve_socket(self) -> None:
        self.sock.settimeout(None)
        while not self._handle_events():
            try:
                chunk = self.sock.recv(RECV_SIZE)
            except ConnectionResetError:
                chunk = b""
            self.conn.receive_data(chunk)
        self._finish()

    def _handle_events(self) -> bool:
        """Act on every event received so far; True once the client's data ended.
        DATA payloads are batched into one append; FLUSH waits for what is before it."""
        batch: List[memoryview] = []
        try:
            while True:
                event = self.conn.next_event()
                kind = type(event)
                if kind is P.Data:
                    batch.append(event.payload)
                elif kind is P.Flush:
                    self._append(batch)
                    batch = []
                    self._drain_ring()
                    if self.fsync:
                        self._write_or_report(self.file.sync)
                    self._say(P.Flushed(event.token))
                elif kind is P.Dropped:
                    self.dropped = event.count
                else:
                    self._append(batch)
                    return kind is P.EndOfData
        except P.TruncatedFrame:
            if not self.server.stopping:
                raise
            self._append(batch)
            self.server.info(f"Client {self.id} cut off in the middle of a frame: {self.conn.pending} bytes discarded")
            return True  # stopping: the shutdown error is the answer, not a protocol error

    def _append(self, parts: List) -> None:
        if parts:
            self.written += self._write_or_report(self.file.append, parts)
            if self.written - self.confirmed >= ACK_EVERY and self.conn.framed and self.ring is None:
                self._confirm()

    def _confirm(self) -> None:
        """Tell a socket client how much of its data is in the file (WRITTEN), so
        it can forget it. A WRITTEN that would block is skipped: the next will do."""
        try:
            self.sock.send(self.conn.send(P.Written(self.written)), socket.MSG_DONTWAIT)  # 13 bytes: all or nothing
            self.confirmed = self.written
        except OSError:
            pass  # full (the next WRITTEN will do) or the client left (the read side notices)

    def _write_or_report(self, operation, *args):
        """Run a file operation; an OSError ends this client with that error."""
        try:
            return operation(*args)
        except OSError as exc:
            if self.ring is not None:
                self.ring.consumer.fail(exc.errno or errno.EIO)
            raise self._refuse(f"Failed to write to {self.file.path} for client {self.id}: {exc}", exc) from None

    def _finish(self) -> None:
        """End of the client's data: everything is written; say BYE (or that we exit)."""
        self._drain_ring()
        if self.server.stopping:
            if self.ring is not None:
                self.ring.consumer.fail(errno.ESHUTDOWN)
            elif self.conn.framed:
                self._confirm()  # everything received is written: nothing to resend
            self._send_error(SERVER_EXITED)
            return
        try:
            self._say(P.Bye())
        except OSError:
            pass

    # -- ring data path -----------------------------------------------------
    def _serve_ring(self) -> None:
        """Drain the ring, else hear the control socket, else wait for the ring."""
        ring = self.ring
        self.sock.settimeout(None)
        self.sock.setblocking(False)
        watcher = self.server.control_watcher
        fd = self.sock.fileno()
        watcher.watch(fd, self._ring_doorbell)
        try:
            while True:
                if self._drain_ring():
                    continue
                if self.sock_ready:
                    self.sock_ready = False
                    if self._read_control():
                        self._finish()
                        return
                    watcher.rearm(fd)
                    continue
                ring.wait(lambda: self.sock_ready)
        finally:
            watcher.forget(fd)

    def _ring_doorbell(self) -> None:
        """Any thread: the control socket has news (or the server stops): wake the ring loop."""
        self.sock_ready = True
        with self._ring_lock:
            if self.ring is not None and not self._ring_closed:
                self.ring.ring_doorbell()

    def _drain_ring(self) -> bool:
        """Write everything published in the ring; True if there was anything."""
        if self.ring is None:
            return False
        consumer = self.ring.consumer
        head = self._published()
        if head == consumer.tail:
            return False
        self._append(consumer.views(head))
        consumer.release(head)
        return True

    def _published(self) -> int:
        """The ring's head, checked; a corrupt header ends this client (only)."""
        consumer = self.ring.consumer
        try:
            return consumer.available()
        except RingCorrupt as exc:
            consumer.fail(errno.EBADMSG)
            raise self._refuse(
                f"Client {self.id} corrupted its ring: {exc}", ValueError(f"ring corrupted: {exc}")
            ) from None

    def _read_control(self) -> bool:
        """Handle whatever the client sent on the socket; True at its end of data."""
        while not self._handle_events():
            try:
                chunk = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                return False
            except ConnectionResetError:
                chunk = b""
            self.conn.receive_data(chunk)
        return True

    # -- teardown -----------------------------------------------------------
    def _send_error(self, exc: BaseException) -> None:
        try:
            message = self.conn.send(P.Error(exc, errno.ESHUTDOWN if exc is SERVER_EXITED else None))
        except P.ProtocolError:
            return  # the connection has ended already (BYE or a reply was sent)
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(1.0)
            self.sock.sendall(message)
        except OSError:
            pass

    def _close_ring(self) -> None:
        with self._ring_lock:
            if self.ring is not None and not self._ring_closed:
                self._ring_closed = True
                self.ring.close()
                self.server.release_ring()

    def _close(self) -> None:
        """Give back what the session holds (socket, ring, file), then say so."""
        server = self.server
        try:
            self.sock.close()
            self._close_ring()
            last = self.file is not None and server.files.release(self.file)
            if self.dropped:
                server.warn(f"Client {self.id} dropped {self.dropped} bytes (its backlog was full)")
                server.dropped_closed += self.dropped
            if self.file is not None:
                server.info(f"Client {self.id} closed {self.file.path}")
                if last:
                    server.info(f"Closed {self.file.path}")
            server.info(f"Client {self.id} disconnected")
        finally:
            server.session_done(self)
            self.finished.set()


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
    os.set_blocking(server.wakeup_fd, False)
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
        handshake_timeout=args.handshake_timeout,
    )
    for output in log.outputs:
        try:
            server.files.keep_out_fd(output.fileno())  # no client appends to the server's own log
        except (OSError, ValueError):
            pass  # an output with no descriptor
    log.info("This is offlog server")
    try:
        server.bind()
    except (RuntimeError, LookupError, OSError) as exc:
        log.error(f"Cannot listen on {args.socket_file}: {exc}")
        return 1
    install_signal_handlers(server)
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
