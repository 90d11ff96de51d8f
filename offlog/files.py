"""The server's open files: whole appends, rotation, errors.

Theory of operation
-------------------
Each path the server holds open is one :class:`OpenFile`, shared by every
client that asked for that path (a reference count closes it with the last
one). Appends go through :meth:`OpenFile.append`: the file is opened with
``O_APPEND`` and each call is one ``writev`` under the file's lock, so one
client's batch never interleaves with another client's bytes, and a partial
write (a pipe, a FIFO) is finished before anyone else may write.

The lock is per file, never global: a file whose writes block (a FIFO nobody
reads, a hung NFS mount) blocks only the threads writing to that file. The
table's own lock is held only to look up or insert an entry, never across an
``open()`` or a write, so opening a stalled path delays no one else either.

Rotation: :meth:`FileTable.check_rotation` (run every ``ROTATE_CHECK``
seconds by the server, and with ``force=True`` on SIGHUP) compares the path's
current inode with the open descriptor's and reopens the path when the file
was renamed or deleted. It only takes a file's lock if it is free; a file
that is busy writing gets ``reopen_pending`` and the writer reopens it after
its current write. Nothing is lost: bytes written before the reopen are in
the renamed file, bytes after it in the new one.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Dict, List, Optional, Sequence, Union

Buffer = Union[bytes, bytearray, memoryview]

OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
#: Seconds between rotation checks.
ROTATE_CHECK = 0.5
#: Most iovecs one writev takes (IOV_MAX on Linux is 1024).
IOV_MAX = 1024


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino)


class OpenFile:
    """One path, one descriptor, one lock. Writers call :meth:`append`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.clients = 0
        self.lock = threading.Lock()
        self.reopen_pending = False
        self.bytes_written = 0
        self.errors = 0
        self._opened = threading.Event()
        self._open_error: Optional[BaseException] = None
        self._identity: tuple = ()

    def open(self) -> None:
        """Open the path (may block, e.g. on a FIFO with no reader)."""
        try:
            fd = os.open(self.path, OPEN_FLAGS, 0o666)
            self._identity = _identity(os.fstat(fd))
            self.fd = fd
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

    def append(self, parts: Sequence[Buffer], fsync: bool = False) -> int:
        """Write ``parts`` back to back as one append; return bytes written."""
        with self.lock:
            try:
                total = _writev_all(self.fd, parts)
                if fsync:
                    os.fsync(self.fd)
            except OSError:
                self.errors += 1
                raise
            self.bytes_written += total
            if self.reopen_pending:
                self._reopen_after_write()
            return total

    def _reopen_after_write(self) -> None:
        """A rotation noticed while this file was busy: the bytes are written,
        so a failed reopen only means we keep appending to the old file."""
        try:
            self.reopen()
        except OSError:
            self.reopen_pending = False

    def sync(self) -> None:
        with self.lock:
            os.fsync(self.fd)

    def rotated(self) -> bool:
        try:
            return _identity(os.stat(self.path)) != self._identity
        except FileNotFoundError:
            return True

    def reopen(self) -> None:
        """Lock held: point the descriptor at the path again."""
        self.reopen_pending = False
        fd = os.open(self.path, OPEN_FLAGS, 0o666)
        old, self.fd = self.fd, fd
        self._identity = _identity(os.fstat(fd))
        os.close(old)

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def _writev_all(fd: int, parts: Sequence[Buffer]) -> int:
    """Append ``parts`` back to back: one ``writev`` per IOV_MAX parts.

    ``parts`` are bytes or one-dimensional byte views (``len`` is their size),
    so the common case does no per-part work in Python. A partial write (a
    pipe, a FIFO, a full disk) is finished, in order, before anything else.
    """
    total = 0
    for start in range(0, len(parts), IOV_MAX):
        chunk = parts[start : start + IOV_MAX]
        want = sum(map(len, chunk))
        written = os.writev(fd, chunk)
        if written < want:
            _finish_writev(fd, chunk, written)
        total += want
    return total


def _finish_writev(fd: int, chunk: Sequence[Buffer], written: int) -> None:
    """Write what a short ``writev`` of ``chunk`` left after its first ``written`` bytes."""
    views: List[memoryview] = [memoryview(p).cast("B") for p in chunk]
    i = 0
    while i < len(views):
        if written >= views[i].nbytes:
            written -= views[i].nbytes
            i += 1
            continue
        views[i] = views[i][written:]
        written = os.writev(fd, views[i : i + IOV_MAX])


class FileTable:
    """Paths the server holds open, shared between clients."""

    def __init__(self, info: Callable[[str], None], warn: Callable[[str], None]) -> None:
        self._files: Dict[str, OpenFile] = {}
        self._lock = threading.Lock()
        self._info = info
        self._warn = warn

    def acquire(self, path: str) -> OpenFile:
        """Return the open file for ``path``, opening it if needed (may block)."""
        with self._lock:
            entry = self._files.get(path)
            first = entry is None
            if first:
                entry = self._files[path] = OpenFile(path)
            entry.clients += 1
        try:
            if first:
                entry.open()
            else:
                entry.wait_open()
        except BaseException:
            self.release(entry)
            raise
        return entry

    def release(self, entry: OpenFile) -> bool:
        """Drop one client's reference; return True if the file was closed."""
        with self._lock:
            entry.clients -= 1
            last = entry.clients == 0
            if last and self._files.get(entry.path) is entry:
                del self._files[entry.path]
        if last:
            entry.close()
        return last

    def snapshot(self) -> List[OpenFile]:
        with self._lock:
            return list(self._files.values())

    def check_rotation(self, force: bool = False) -> None:
        """Reopen every file that was renamed or deleted (all of them if ``force``)."""
        for entry in self.snapshot():
            if entry.fd < 0 or not (force or entry.rotated()):
                continue
            if not entry.lock.acquire(blocking=False):
                entry.reopen_pending = True  # its writer reopens after this write
                continue
            try:
                if entry.fd >= 0:
                    entry.reopen()
                    self._info(f"Reopened {entry.path}" + (" (SIGHUP)" if force else " (rotated)"))
            except OSError as exc:
                self._warn(f"Could not reopen {entry.path}, still writing the old file: {exc}")
            finally:
                entry.lock.release()
