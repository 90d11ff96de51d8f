"""The named objects behind one ring: a POSIX shared-memory object and a semaphore.

Theory of operation
-------------------
The server creates and names every object (``/offlog.<server pid>.<random>``,
``O_CREAT | O_EXCL``, mode 0600) and never opens a name a client chose. It
reserves the memory with ``posix_fallocate`` so a full ``/dev/shm`` fails the
offer (and the client falls back to the socket) instead of killing either
process with SIGBUS on first touch. The client opens both names and unlinks
them at once; the server unlinks them again when the client accepts or
declines, or its connection ends. After the handshake nothing is left in
``/dev/shm``.

The only window in which a name can outlive its users is a server killed
between creating the objects and the client opening them. Every server start
runs :func:`sweep_stale`, which unlinks objects named after a server pid that
is no longer alive.
"""

from __future__ import annotations

import mmap
import os
import platform
import re
import secrets
import sys
from typing import Callable, Optional

from . import layout
from .ring import Consumer, Producer

try:
    import posix_ipc
except ImportError:  # the socket transport works without it
    posix_ipc = None

SHM_DIR = "/dev/shm"
#: The client maps every page up front: a first-touch page fault (~1-2 us) per
#: 4 KiB would otherwise land on the hot path during the ring's first lap.
MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0x8000 if sys.platform.startswith("linux") else 0)
_NAME = re.compile(r"^(?:sem\.)?offlog\.(\d+)\.[0-9a-f]+\.(?:ring|bell)$")


def unsupported_reason() -> Optional[str]:
    """Why this process cannot use a ring, or None if it can."""
    if posix_ipc is None:
        return "posix_ipc is not installed"
    if not sys.platform.startswith("linux"):
        return f"rings are supported on Linux only, not {sys.platform}"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the ring's ordering argument needs x86-64 (TSO, atomic 8-byte access), not {platform.machine()}"
    return None


def _unlink(kind, name: str) -> None:
    try:
        kind(name)
    except posix_ipc.ExistentialError:
        pass


class ServerRing:
    """Server side: creates the objects and consumes the ring."""

    def __init__(self, capacity: int) -> None:
        layout.check_capacity(capacity)
        base = f"/offlog.{os.getpid()}.{secrets.token_hex(8)}"
        self.shm_name, self.sem_name = base + ".ring", base + ".bell"
        self.capacity = capacity
        size = layout.mapping_size(capacity)
        memory = posix_ipc.SharedMemory(self.shm_name, posix_ipc.O_CREX, mode=0o600)
        try:
            os.posix_fallocate(memory.fd, 0, size)
            self._map = mmap.mmap(memory.fd, size)  # the consumer's faults cost no client anything
            self.sem = posix_ipc.Semaphore(self.sem_name, posix_ipc.O_CREX, mode=0o600)
        except BaseException:
            self.unlink()
            raise
        finally:
            memory.close_fd()
        self.consumer = Consumer(self._map, capacity)

    def unlink(self) -> None:
        _unlink(posix_ipc.unlink_shared_memory, self.shm_name)
        _unlink(posix_ipc.unlink_semaphore, self.sem_name)

    def ring_doorbell(self) -> None:
        """Post the doorbell, unless the session closed the ring meanwhile (a
        server stop or the control socket's news racing the session's own end)."""
        try:
            self.sem.release()
        except posix_ipc.ExistentialError:  # "The semaphore has been closed"
            pass

    def wait(self, woken: Callable[[], bool]) -> None:
        """Nothing to drain: wait for the client's next write (the nap and sleep
        handshake of :meth:`offlog.shm.ring.Consumer.wait`)."""
        self.consumer.wait(self._take_doorbell, woken)

    def _take_doorbell(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for a post; True if this took one."""
        try:
            self.sem.acquire(timeout)
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            return False  # timed out, or a signal for the server landed on this thread
        return True

    def close(self) -> None:
        self.unlink()
        self.consumer.close()
        self._map.close()
        if hasattr(self, "sem"):
            self.sem.close()


class ClientRing:
    """Client side: opens the server's objects, unlinks them, produces into the ring."""

    def __init__(self, capacity: int, shm_name: str, sem_name: str, **producer_options) -> None:
        layout.check_capacity(capacity)
        try:
            memory = posix_ipc.SharedMemory(shm_name)
            try:
                self._map = mmap.mmap(memory.fd, memory.size, MAP_FLAGS)
            finally:
                memory.close_fd()
            self.sem = posix_ipc.Semaphore(sem_name)
        finally:
            _unlink(posix_ipc.unlink_shared_memory, shm_name)
            _unlink(posix_ipc.unlink_semaphore, sem_name)
        self.producer = Producer(self._map, capacity, self.sem.release, **producer_options)
        self._closed = False

    def close(self) -> None:
        """Close the doorbell (idempotent); the mapping stays readable for recovery."""
        if not self._closed:
            self._closed = True
            self.sem.close()


def sweep_stale() -> int:
    """Unlink ring objects whose creating server is dead; return how many."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    removed = 0
    for entry in names:
        match = _NAME.match(entry)
        if not match or _alive(int(match.group(1))):
            continue
        try:
            if os.stat(os.path.join(SHM_DIR, entry)).st_uid != os.geteuid():
                continue
            os.unlink(os.path.join(SHM_DIR, entry))
            removed += 1
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
