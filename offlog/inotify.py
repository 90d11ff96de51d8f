"""Linux inotify through libc, for the server's rotation watcher.

Theory of operation
-------------------
Python has no inotify module and offlog takes no dependency for it: this
module calls ``inotify_init1``, ``inotify_add_watch`` and
``inotify_rm_watch`` from libc with :mod:`ctypes` and parses the events
read from the descriptor with :mod:`struct`. It knows nothing about files or
rotation; :class:`offlog.files.RotationWatcher` decides what to watch and
what an event means.

:func:`open_inotify` returns None (and says why) where inotify is missing:
not Linux, no libc symbol, or ``inotify_init1`` failing (e.g. the
``max_user_instances`` limit). The caller then relies on polling alone.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
from typing import List, NamedTuple, Optional, Tuple

# Event bits (linux/inotify.h).
IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name


class Event(NamedTuple):
    wd: int
    mask: int
    name: bytes  # empty for events about the watched directory itself


class Inotify:
    """One inotify descriptor (non-blocking, close-on-exec)."""

    def __init__(self, libc: ctypes.CDLL) -> None:
        self._libc = libc
        self.fd = self._check(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")

    def add_watch(self, path: str, mask: int) -> int:
        """Watch ``path`` for ``mask``; the same inode watched twice gives the same watch descriptor."""
        return self._check(self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask), path)

    def rm_watch(self, wd: int) -> None:
        self._libc.inotify_rm_watch(self.fd, wd)  # fails only if the kernel dropped it already

    def read(self) -> List[Event]:
        """The events queued now (none if there are none)."""
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return []
        events = []
        pos = 0
        while pos + _EVENT.size <= len(data):
            wd, mask, _, length = _EVENT.unpack_from(data, pos)
            pos += _EVENT.size
            events.append(Event(wd, mask, data[pos : pos + length].rstrip(b"\0")))
            pos += length
        return events

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @staticmethod
    def _check(result: int, what: str) -> int:
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), what)
        return result


def open_inotify() -> Tuple[Optional[Inotify], Optional[str]]:
    """(an Inotify, None), or (None, why inotify cannot be used here)."""
    if not sys.platform.startswith("linux"):
        return None, f"inotify is Linux only, not {sys.platform}"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for name in ("inotify_init1", "inotify_add_watch", "inotify_rm_watch"):
            getattr(libc, name)
        libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        return Inotify(libc), None
    except (OSError, AttributeError) as exc:
        return None, f"inotify unavailable: {exc}"
