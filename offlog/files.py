"""The server's open files: whole appends, rotation, errors.

Theory of operation
-------------------
Each path the server holds open is one :class:`OpenFile`, shared by every
client that asked for that path (a reference count closes it with the last
one). Appends go through :meth:`OpenFile.append` (parts) or
:meth:`OpenFile.append_ring` (the bytes published in a ring, drained by
:meth:`offlog.shm.ring.Consumer.drain`, in C where offlog._speedups is
built): the file is opened with ``O_APPEND`` and each call is one ``writev``
(:func:`offlog.writev.write_whole`) under the file's lock, so one client's
batch never interleaves with another client's bytes, and a partial write (a
pipe, a FIFO) is finished before anyone else may write. An append that fails
part way (``ENOSPC``, ``EFBIG``, ``EIO`` after a short write) is cut off
again: the file is truncated back to where the append began, under the same
lock, so a regular file never holds part of a batch (a ring's bytes stay in
the ring then). Both kinds of append share those steps
(:meth:`OpenFile._append`). Every error an append raises names the path.

The lock is per file, never global: a file whose writes block (a FIFO nobody
reads, a hung NFS mount) blocks only the threads writing to that file. The
table's own lock is held only to look up or insert an entry, never across an
``open()`` or a write, so opening a stalled path delays no one else either.

The path a client opens is the path it gets. A client opening a path that is
already held makes the server compare the path's device and inode with the
held descriptor's; if they differ (the file was renamed or deleted since),
the entry is reopened before the new client writes, and its other clients
move with it, as after a rotation.

Rotation: the :class:`RotationWatcher` thread keeps every open path pointing
at the file now at that path. On Linux it watches the directory of every
open file with inotify, so it learns of a rename, a deletion or a new file
within milliseconds; a full check every ``SAFETY_NET_CHECK`` seconds catches
what inotify cannot see (a directory higher up renamed or repointed, NFS).
Without inotify, or for a directory it could not watch, the full check runs
every ``ROTATE_CHECK`` seconds. A file that appears at the path (logrotate's
``create``) is followed at once. A path left without a file is given
``CREATE_GRACE`` seconds for its creator before the server creates the file
itself, so logrotate's ``create`` never finds the server's file in its way
and ``rm -r`` of the directory is not raced; meanwhile appends go on into the
old file. A reopen takes a file's lock only if it is free; a file that is
busy writing gets ``reopen_pending`` and its writer reopens it after its
current write. Nothing is lost: bytes written before the reopen are in the
renamed file, bytes after it in the new one.

Paths that are not log files. A client's path is data, not a command: the
server never opens, on a client's word, its own descriptors, another
process's, or the kernel's files. :func:`open_for_append` refuses (with
``PermissionError``, ``EACCES``):

* a path spelled under ``/proc``, ``/sys`` or ``/dev/fd``, or
  ``/dev/stdin``, ``/dev/stdout``, ``/dev/stderr`` (checked on the path as
  written, ``..`` and ``//`` resolved), before anything is opened;
* a path that reaches a ``/proc`` "magic link" (``/proc/<pid>/fd/N``,
  ``/proc/<pid>/cwd``, ...) through any symlink: the open uses ``openat2``
  with ``RESOLVE_NO_MAGICLINKS`` where the kernel has it (Linux 5.6), so the
  kernel itself refuses, without a race;
* a file that, once open, turns out to be under ``/proc`` or ``/sys`` (a
  symlink into them; the kernel's name of the open file says so), or to be
  one the server writes its own log to (:attr:`FileTable.keep_out`: its
  stdout, stderr and ``-l`` file, whatever path names them). The descriptor
  is closed again before the refusal.

The same checks apply when a rotation reopens the path.

When a reopen fails, two cases:

* the path's directory is gone (``ENOENT``, ``ENOTDIR``): the file's clients
  get that error (``FileNotFoundError`` naming the path) on their next
  append, instead of writing on into a deleted file; nothing more is written
  to it.
* anything else (the new file's owner or mode shut the server out, the path
  is now a directory): the server keeps appending to the old file, logs the
  failure once per rotation, shows it in ``status`` (``reopen_error``), and
  tries again at every later check.

:meth:`FileTable.reopen_all` is the one routine behind SIGHUP and
``offlog reopen``: it reopens every file, waiting for busy ones, and returns
what failed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import stat
import sys
import threading
import time
from typing import TYPE_CHECKING, AbstractSet, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from .backlog import Buffer
from .inotify import (
    IN_ATTRIB,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    Inotify,
    open_inotify,
)
from .writev import write_whole

if TYPE_CHECKING:
    from .shm.ring import Consumer

OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
#: Seconds between full rotation checks without inotify (or for a directory it cannot watch).
ROTATE_CHECK = 0.5
#: Seconds between full rotation checks when inotify watches every open file's directory.
SAFETY_NET_CHECK = 2.0
#: Seconds the rotation watcher leaves a path with no file to whoever renamed or
#: deleted it (logrotate's ``create`` makes the new file right after its rename).
CREATE_GRACE = 0.5
#: Seconds :meth:`FileTable.reopen_all` waits for a file that is busy writing.
REOPEN_WAIT = 5.0
#: What the rotation watcher asks inotify about an open file's directory.
DIRECTORY_EVENTS = (
    IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE | IN_CREATE | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
)

#: Trees of a process's or the kernel's files, never a log file (see the module header).
REFUSED_TREES = ("/proc", "/sys", "/dev/fd")
REFUSED_PATHS = ("/dev/stdin", "/dev/stdout", "/dev/stderr")
NOT_A_LOG_FILE = "not a log file: offlog does not open files under /proc, /sys or /dev/fd"
OWN_LOG = "not a log file: the offlog server writes its own log there"

Identity = Tuple[int, int]  # (st_dev, st_ino)


def _identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino)


def _at_path(path: str) -> Optional[Identity]:
    """The identity of the file now at ``path``, None if there is none."""
    try:
        return _identity(os.stat(path))
    except OSError:  # ENOENT, ENOTDIR, EACCES on a directory...: nothing we can open there
        return None


def _naming(exc: OSError, path: str) -> OSError:
    """``exc`` with ``path`` as its filename, so the text a client gets says which file failed."""
    if exc.filename is not None or not exc.errno:
        return exc
    return type(exc)(exc.errno, exc.strerror, path)


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _refused_name(path: str) -> bool:
    """True if ``path`` (absolute) names something in REFUSED_TREES or REFUSED_PATHS."""
    name = "/" + os.path.normpath(path).lstrip("/")
    return name in REFUSED_PATHS or any(name == tree or name.startswith(tree + "/") for tree in REFUSED_TREES)


def open_for_append(
    path: str, keep_out: AbstractSet[Identity] = frozenset(), wait: bool = True
) -> Tuple[int, Identity]:
    """Open ``path`` for appending (may block, e.g. on a FIFO with no reader,
    unless ``wait`` is False: then that is ENXIO); return the descriptor, in
    blocking mode, and the file's identity. A path that is not a log file (see
    the module header) or a file in ``keep_out`` raises PermissionError
    (EACCES) naming the path, with nothing left open."""
    if _refused_name(path):
        raise PermissionError(errno.EACCES, NOT_A_LOG_FILE, path)
    fd = _open(path, OPEN_FLAGS if wait else OPEN_FLAGS | os.O_NONBLOCK)
    try:
        if not wait:
            os.set_blocking(fd, True)  # writes wait as they should; only the open did not
        identity = _identity(os.fstat(fd))
        if identity in keep_out:
            raise PermissionError(errno.EACCES, OWN_LOG, path)
        try:
            opened = os.readlink(f"/proc/self/fd/{fd}")  # the kernel's name for what was opened
        except OSError:
            opened = path  # no /proc: the path as written was checked already
        if opened.startswith("/") and _refused_name(opened):
            raise PermissionError(errno.EACCES, NOT_A_LOG_FILE, path)
    except BaseException:
        os.close(fd)
        raise
    return fd, identity


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


SYS_OPENAT2 = 437  # the same on every Linux architecture (new system calls are numbered alike since 5.1)
AT_FDCWD = -100
RESOLVE_NO_MAGICLINKS = 0x02


def _libc_syscall() -> Optional[Callable[..., int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None


_syscall = _libc_syscall()  # None once openat2 turns out to be missing


def _resolves(path: str) -> bool:
    """True if ``path`` resolves without a symlink loop (it may name nothing)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno != errno.ELOOP
    return True


def _open(path: str, flags: int) -> int:
    """``open(path, flags, 0o666)``, through no /proc magic link where the
    kernel can promise that (``openat2``); a plain ``open`` where it cannot."""
    global _syscall
    if _syscall is not None:
        how = _OpenHow(flags, 0o666, RESOLVE_NO_MAGICLINKS)
        raw = os.fsencode(path)
        while True:
            fd = _syscall(
                ctypes.c_long(SYS_OPENAT2),
                ctypes.c_long(AT_FDCWD),
                ctypes.c_char_p(raw),
                ctypes.byref(how),
                ctypes.c_size_t(ctypes.sizeof(how)),
            )
            if fd >= 0:
                return fd
            code = ctypes.get_errno()
            if code == errno.ELOOP and _resolves(path):  # no loop: a magic link on the way
                raise PermissionError(errno.EACCES, NOT_A_LOG_FILE, path)
            if code == errno.ENOSYS:  # a kernel before 5.6, or a sandbox without it
                _syscall = None
                break
            if code != errno.EINTR:
                raise OSError(code, os.strerror(code), path)
    return os.open(path, flags, 0o666)


class OpenFile:
    """One path, one descriptor, one lock. Writers call :meth:`append`."""

    def __init__(
        self,
        path: str,
        info: Callable[[str], None],
        warn: Callable[[str], None],
        keep_out: AbstractSet[Identity] = frozenset(),
    ) -> None:
        self.path = path
        #: The path's directory and its name in it (as inotify names it), for the rotation watcher.
        self.directory, self.name = os.path.dirname(path), os.fsencode(os.path.basename(path))
        self._keep_out = keep_out
        self.fd = -1
        self.clients = 0
        self.lock = threading.Lock()
        #: Why a rotation check found the file busy; its writer reopens it after the current write.
        self.reopen_pending: Optional[str] = None
        self.bytes_written = 0
        self.errors = 0
        #: Why the last reopen failed (``"<ExceptionClass>: <message>"``), None once one succeeds.
        self.reopen_error: Optional[str] = None
        #: Set when the path's directory is gone: every append raises this error.
        self.gone: Optional[OSError] = None
        #: (since when, why) the path has no file, while the rotation watcher leaves it to its creator.
        self.missing: Optional[Tuple[float, str]] = None
        self._info = info
        self._warn = warn
        self._opened = threading.Event()
        self._open_error: Optional[BaseException] = None
        self._identity: Identity = (0, 0)
        self._logged: Optional[Tuple[Optional[Identity], str]] = None  # the reopen failure last logged

    def open(self) -> None:
        """Open the path (may block, e.g. on a FIFO with no reader)."""
        try:
            self.fd, self._identity = open_for_append(self.path, self._keep_out)
        except BaseException as exc:
            self._open_error = exc
            raise
        finally:
            self._opened.set()

    def wait_open(self) -> None:
        """For the second and later clients of a path: wait for the first's open."""
        self._opened.wait()
        if self._open_error is not None:
            raise self._open_error

    def append(self, parts: Sequence[Buffer]) -> int:
        """Write ``parts`` back to back as one append, all or nothing; return bytes written."""
        return self._append(lambda fd: write_whole(fd, parts))

    def append_ring(self, consumer: Consumer) -> int:
        """Write every byte published in ``consumer``'s ring as one append, all or nothing,
        then hand the space back (:meth:`~offlog.shm.ring.Consumer.drain`: a bad HEAD raises
        RingCorrupt with nothing written); return bytes written."""
        return self._append(consumer.drain)

    def _append(self, write: Callable[[int], int]) -> int:
        """``write(fd)`` under the lock, as one append: an error names the path, and the
        bytes it had written (its ``characters_written``) are cut off again."""
        with self.lock:
            try:
                if self.gone is not None:
                    raise OSError(self.gone.errno, self.gone.strerror, self.path)
                total = write(self.fd)
            except OSError as exc:
                self.errors += 1
                written = getattr(exc, "characters_written", 0)
                if written:
                    _cut_off(self.fd, written)
                raise _naming(exc, self.path) from None
            self.bytes_written += total
            if self.reopen_pending is not None:
                self.follow_path(self.reopen_pending, patient=True)
            return total

    def sync(self) -> None:
        with self.lock:
            try:
                os.fsync(self.fd)
            except OSError as exc:
                raise _naming(exc, self.path) from None

    def rotated(self) -> bool:
        """True if the file at the path is not the one the descriptor writes."""
        return _at_path(self.path) != self._identity

    def follow_path(self, why: str, force: bool = False, patient: bool = False) -> Optional[OSError]:
        """Lock held: point the descriptor at the file now at the path, if that
        changed (always, with ``force``). Returns the error if the reopen failed.

        ``patient``: if the path has no file, create it only after
        ``CREATE_GRACE`` seconds (see :meth:`_leave_to_creator`)."""
        self.reopen_pending = None
        at_path = _at_path(self.path)
        if self.fd < 0 or (at_path == self._identity and not force):
            self.missing = None
            return None
        if at_path is None and patient:
            noticed = self._leave_to_creator(why)
            if noticed is None:
                return None
            why = f"{noticed}; created after {CREATE_GRACE:g} s"
        self.missing = None
        try:  # (the lock is held: a FIFO without reader must not keep it, and whoever waits for it, forever)
            fd, identity = open_for_append(self.path, self._keep_out, wait=False)
        except OSError as exc:
            self._reopen_failed(_naming(exc, self.path), at_path, force)
            return exc
        old, self.fd = self.fd, fd
        self._identity = identity
        try:
            os.close(old)
        except OSError:
            pass  # (EIO from NFS, say) the bytes were written; nothing to tell a writer
        self.reopen_error = self.gone = self._logged = None
        self._info(f"Reopened {self.path} ({why})")
        return None

    def _leave_to_creator(self, why: str) -> Optional[str]:
        """The path has no file: None while whoever renamed or deleted it may
        still create the new one, then why it went missing. Creating it at
        once would race logrotate's ``create`` (which then finds a file in its
        way) and ``rm -r`` (whose rmdir then finds the directory not empty)."""
        now = time.monotonic()
        since, noticed = self.missing or (now, why)
        self.missing = (since, noticed)
        if now - since < CREATE_GRACE and os.path.isdir(os.path.dirname(self.path)):
            return None
        return noticed

    def _reopen_failed(self, exc: OSError, at_path: Optional[Identity], force: bool) -> None:
        """Record a failed reopen; log it once per rotation (and at every explicit request)."""
        text = self.reopen_error = _text(exc)
        if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
            self.gone = exc
            line = f"The directory of {self.path} is gone; its clients' writes fail: {text}"
        else:
            line = f"Could not reopen {self.path}, still writing the old file: {text}"
        if force or self._logged != (at_path, text):
            self._logged = (at_path, text)
            self._warn(line)

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def _cut_off(fd: int, count: int) -> None:
    """Lock held: remove the last ``count`` bytes of a regular file (a failed append's)."""
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            os.ftruncate(fd, max(0, st.st_size - count))
    except OSError:
        pass  # nothing better to do: the append's own error is what the client hears


class FileTable:
    """Paths the server holds open, shared between clients."""

    def __init__(self, info: Callable[[str], None], warn: Callable[[str], None]) -> None:
        self._files: Dict[str, OpenFile] = {}
        self._lock = threading.Lock()
        self._info = info
        self._warn = warn
        #: Files no client may open: those the server writes its own log to (see :meth:`keep_out_fd`).
        self.keep_out: Set[Identity] = set()
        self.watcher = RotationWatcher(self, warn)

    def keep_out_fd(self, fd: int) -> None:
        """No client may open the file ``fd`` is open on (the server's stdout, say),
        whatever path names it. /dev/null stays open to all: it takes nothing."""
        try:
            st = os.fstat(fd)
        except OSError:
            return
        if _identity(st) != _at_path(os.devnull):
            self.keep_out.add(_identity(st))

    def acquire(self, path: str) -> OpenFile:
        """Return the open file for ``path``, opening it if needed (may block)."""
        entry, first = self.reserve(path)
        self.make_ready(entry, first)
        return entry

    def reserve(self, path: str) -> Tuple[OpenFile, bool]:
        """The entry for ``path``, counting one more client, and whether this client
        is its first (who opens it). Never blocks; :meth:`make_ready` does the rest."""
        with self._lock:
            entry = self._files.get(path)
            first = entry is None
            if first:
                entry = self._files[path] = OpenFile(path, self._info, self._warn, self.keep_out)
            entry.clients += 1
        return entry, first

    def make_ready(self, entry: OpenFile, first: bool) -> None:
        """Open a reserved entry (its first client) or wait for its first client's open
        (the others, in order after it) (may block). A path already held is checked:
        if another file is at the path now, the entry is reopened, so this client
        writes to the file it named. A failure gives the reservation back and raises."""
        try:
            if first:
                self.watcher.watch(entry.path)
                entry.open()
            else:
                entry.wait_open()
                if entry.rotated():
                    with entry.lock:
                        error = entry.follow_path("opened again after a rename or delete")
                    if error is not None:
                        raise error
        except BaseException:
            self.release(entry)
            raise

    def release(self, entry: OpenFile) -> bool:
        """Drop one client's reference; return True if the file was closed."""
        with self._lock:
            entry.clients -= 1
            last = entry.clients == 0
            if last and self._files.get(entry.path) is entry:
                del self._files[entry.path]
        if last:
            entry.close()
            self.watcher.unwatch(entry.path)
        return last

    def snapshot(self) -> List[OpenFile]:
        with self._lock:
            return list(self._files.values())

    def check_rotation(
        self, entries: Optional[Iterable[OpenFile]] = None, why: str = "renamed or deleted"
    ) -> Optional[float]:
        """Reopen each of ``entries`` (default: all) whose path now names another file.

        Returns when (``time.monotonic()``) to check again for paths that were
        left without a file for their creator, or busy; None if there are none."""
        again: Optional[float] = None
        for entry in self.snapshot() if entries is None else entries:
            if entry.fd < 0:
                continue
            if not entry.rotated():
                entry.missing = None  # renamed back, say
                continue
            if entry.lock.acquire(blocking=False):
                try:
                    entry.follow_path(entry.reopen_pending or why, patient=True)
                finally:
                    entry.lock.release()
                missing = entry.missing
                if missing is None:
                    continue
                due = missing[0] + CREATE_GRACE
            else:
                entry.reopen_pending = why  # its writer reopens after this write
                due = time.monotonic() + CREATE_GRACE
            again = due if again is None else min(again, due)
        return again

    def reopen_all(self, why: str) -> List[Tuple[str, Optional[str]]]:
        """Reopen every file (SIGHUP, ``offlog reopen``), waiting for busy ones.

        Returns (path, None) for each file reopened, (path, why not) for each
        that was not."""
        results: List[Tuple[str, Optional[str]]] = []
        for entry in self.snapshot():
            if not entry.lock.acquire(timeout=REOPEN_WAIT):
                entry.reopen_pending = why
                results.append((entry.path, f"busy writing for {REOPEN_WAIT:g} s; reopened after its current write"))
                continue
            try:
                error = entry.follow_path(why, force=True)
            finally:
                entry.lock.release()
            results.append((entry.path, None if error is None else _text(_naming(error, entry.path))))
        return results


class RotationWatcher:
    """The thread that notices renamed, deleted and replaced files.

    inotify on the directory of every open file; a full check of every file
    every ``SAFETY_NET_CHECK`` seconds, or every ``ROTATE_CHECK`` seconds
    while inotify is missing or some directory is not watched.
    """

    def __init__(self, table: FileTable, warn: Callable[[str], None]) -> None:
        self._table = table
        self._warn = warn
        self._inotify: Optional[Inotify]
        self._inotify, self.unavailable = open_inotify()
        self._lock = threading.Lock()
        self._dirs: Dict[str, int] = {}  # directory -> open files in it
        self._wds: Dict[str, int] = {}  # directory -> its watch (missing: not watched)
        self._by_wd: Dict[int, Set[str]] = {}  # watch -> directories (two spellings may share one)
        self._wake_r, self._wake_w = os.pipe()
        self._reopen_requested = False

    def describe(self) -> str:
        if self._inotify is None:
            return f"polling every {ROTATE_CHECK:g} s ({self.unavailable})"
        return f"inotify on each file's directory, full check every {SAFETY_NET_CHECK:g} s"

    # -- what to watch (called by FileTable) ---------------------------------
    def watch(self, path: str) -> None:
        directory = os.path.dirname(path)
        with self._lock:
            self._dirs[directory] = self._dirs.get(directory, 0) + 1
            if self._dirs[directory] == 1:
                self._add_watch(directory)

    def unwatch(self, path: str) -> None:
        directory = os.path.dirname(path)
        with self._lock:
            self._dirs[directory] -= 1
            if self._dirs[directory]:
                return
            del self._dirs[directory]
            wd = self._wds.pop(directory, None)
            if wd is None:
                return
            sharing = self._by_wd[wd]
            sharing.discard(directory)
            if not sharing:
                del self._by_wd[wd]
                self._inotify.rm_watch(wd)

    def _add_watch(self, directory: str) -> None:
        """Lock held. A directory that cannot be watched is left to the full check."""
        if self._inotify is None:
            return
        try:
            wd = self._inotify.add_watch(directory, DIRECTORY_EVENTS)
        except OSError:
            return  # gone, or the max_user_watches limit: polled every ROTATE_CHECK
        self._wds[directory] = wd
        self._by_wd.setdefault(wd, set()).add(directory)

    # -- the thread ------------------------------------------------------------
    def request_reopen(self) -> None:
        """Signal-safe: have the thread run the reopen-all routine (SIGHUP)."""
        self._reopen_requested = True
        os.write(self._wake_w, b"r")

    def run(self, stopping: Callable[[], bool], reopen_all: Callable[[], None]) -> None:
        """Until ``stopping()``: follow inotify events, run the full check, and
        call ``reopen_all`` for each :meth:`request_reopen`."""
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        if self._inotify is not None:
            poller.register(self._inotify.fd, select.POLLIN)
        next_check = time.monotonic() + self._period()
        again: Optional[float] = None  # an earlier full check, for paths left to their creator
        while not stopping():
            wake = next_check if again is None else min(next_check, again)
            ready = {fd for fd, _ in poller.poll(max(0.0, wake - time.monotonic()) * 1000.0)}
            try:
                if self._wake_r in ready:
                    os.read(self._wake_r, 4096)
                    if self._reopen_requested:
                        self._reopen_requested = False
                        reopen_all()
                if self._inotify is not None and self._inotify.fd in ready:
                    again = _earliest(again, self._follow_events())
                now = time.monotonic()
                if now >= wake:
                    again = self._full_check()
                    if now >= next_check:
                        next_check = now + self._period()
            except Exception as exc:  # one bad file or call must not end the watching of all
                self._warn(f"Rotation watcher: {_text(exc)}")
                next_check = time.monotonic() + ROTATE_CHECK
                again = None

    def _period(self) -> float:
        with self._lock:
            everything_watched = self._inotify is not None and len(self._wds) == len(self._dirs)
        return SAFETY_NET_CHECK if everything_watched else ROTATE_CHECK

    def _follow_events(self) -> Optional[float]:
        """Check the files inotify says may have changed (returns as check_rotation)."""
        if self._inotify is None:
            return None
        events = self._inotify.read()
        if not events:
            return None
        names: Set[Tuple[str, bytes]] = set()  # (directory, name); name b"" means every file in it
        lost: Set[str] = set()  # directories whose watch no longer follows the path
        with self._lock:
            for event in events:
                if event.mask & IN_Q_OVERFLOW:
                    names.update((d, b"") for d in self._dirs)
                    continue
                for directory in self._by_wd.get(event.wd, ()):
                    names.add((directory, event.name))
                    if event.mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
                        lost.add(directory)
            for directory in lost:
                self._forget_watch(directory)
                self._add_watch(directory)  # a new directory at the path, if there is one already
        entries = [
            entry
            for entry in self._table.snapshot()
            if (entry.directory, b"") in names or (entry.directory, entry.name) in names
        ]
        return self._table.check_rotation(entries, "renamed or deleted, seen by inotify")

    def _forget_watch(self, directory: str) -> None:
        """Lock held: the directory was renamed or removed; its watch follows the old inode."""
        wd = self._wds.pop(directory, None)
        if wd is None:
            return
        sharing = self._by_wd.get(wd, set())
        sharing.discard(directory)
        if not sharing:
            self._by_wd.pop(wd, None)
            self._inotify.rm_watch(wd)

    def _full_check(self) -> Optional[float]:
        """Every file, whatever inotify said (events queued so far are followed first)."""
        again = self._follow_events()
        with self._lock:
            for directory in self._dirs:
                if directory not in self._wds:
                    self._add_watch(directory)
        return _earliest(again, self._table.check_rotation(why="renamed or deleted, seen by the periodic check"))


def _earliest(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return b if a is None else a if b is None else min(a, b)
