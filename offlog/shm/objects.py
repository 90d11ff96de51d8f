"""The memory and the doorbell behind one ring: a sealed memfd with a semaphore in it.

Theory of operation
-------------------
The server creates each ring as an anonymous memory file (``memfd_create``),
sizes it to the header plus the capacity, reserves its pages
(``posix_fallocate``: a shortage fails the offer, and the client gets the
socket, instead of a SIGBUS at first touch) and seals it against shrinking
and growing (``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``) before anyone
maps it. A sealed size is a size nobody can change: ``ftruncate`` of the
ring, by the client or anyone it hands the descriptor to, fails with EPERM,
so no process can pull pages out from under another's mapping (which is
what SIGBUS is). The descriptor travels to the client over the control
socket (SCM_RIGHTS, with the offer). Nothing has a name: nothing appears in
/dev/shm, nothing needs unlinking or sweeping after a kill, and a client of
another user maps its ring like any other.

The client trusts nothing it is handed: before it maps anything,
:class:`ClientRing` checks that the descriptor carries those three seals and
exactly the offered size, and raises :class:`UnsafeRing` otherwise (the
client declines the offer and stays on the socket). It never opens, unlinks
or maps anything a server merely names.

The doorbell is a POSIX semaphore inside the header
(:data:`~offlog.shm.layout.DOORBELL_OFFSET`): an unnamed, process-shared
``sem_t`` that the server initialises with ``sem_init(sem, 1, 0)`` and the
client posts with ``sem_post``, both through ctypes. The server never calls
the C library's waiting or posting functions on it, because glibc's take the
futex flags from the semaphore's own bytes, and a futex call with flags a
client scribbled there makes glibc abort the whole process ("The futex
facility returned an unexpected error code"). So the server, whose ring any
client can write, touches only the semaphore's two 32-bit words (the value
and the waiter count, in glibc's layout) and makes the futex system call
itself, with flags of its own:

* waiting (:meth:`ServerRing.wait`): a non-zero value is taken whole (set to
  0: a post means "look", the count does not matter); otherwise the server
  counts itself a waiter (``sem_post`` wakes only a semaphore with waiters),
  sleeps in ``FUTEX_WAIT`` while the value is 0, for at most the timeout,
  and takes what came;
* posting its own news (:meth:`ServerRing.ring_doorbell`: the control
  socket, a stop): value + 1, then ``FUTEX_WAKE``.

These are plain loads and stores racing the client's atomic ``sem_post``.
Every interleaving leaves the value non-zero after a post until the server
takes it, except that a take can swallow a post that landed between its load
and its store; the consumer then looks at HEAD and the control socket right
after that take, and :mod:`offlog.shm.ring` argues why such a look is late
by a store buffer's drain at most. Whatever a client writes into the
semaphore, the server's calls return an error or a wrong wake-up, never an
abort, and a client that wants to keep the server awake must keep writing
(each take clears the value). The client's ``sem_post`` does read flags the
server wrote: only a server the client trusts (``offlog.trust``) gets that far.
"""

from __future__ import annotations

import fcntl
import functools
import mmap
import os
import platform
import sys
from typing import Any, Optional, Tuple

from .. import __with_speedups__
from . import layout
from .ring import Consumer, Producer

try:
    import ctypes
except ImportError:  # a Python built without libffi: the socket transport works without it
    ctypes = None  # type: ignore[assignment]

#: The client maps every page up front: a first-touch page fault (~1-2 us) per
#: 4 KiB would otherwise land on the hot path during the ring's first lap.
MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0x8000 if sys.platform.startswith("linux") else 0)

# File seals (Linux's numbers, which fcntl lacks only off Linux, where rings are not offered).
F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x1)
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x2)
F_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x4)
#: The seals of every ring, set before it is mapped and checked before the client maps it.
SEALS = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL

MAP_FAILED = (1 << 64) - 1  # (void *) -1
#: The machines rings are offered on (``platform.machine()``), and the numbers of their
#: futex system calls there: (futex, futex_waitv). The ring needs the C core's ordering on
#: every one but x86-64 (TSO), see offlog.shm.ring.
FUTEX_CALLS = {"x86_64": (202, 449), "aarch64": (98, 449)}
SYS_FUTEX, SYS_FUTEX_WAITV = FUTEX_CALLS.get(platform.machine().lower(), (-1, -1))  # -1: ENOSYS (no rings there)
FUTEX_WAIT = 0  # both without FUTEX_PRIVATE_FLAG: the futex is shared between processes
FUTEX_WAKE = 1
SEM_VALUE_MAX = 0x7FFFFFFF


class UnsafeRing(ValueError):
    """Offered ring memory that the client must not map (not sealed, or not the size offered)."""


def unsupported_reason(speedups: bool = __with_speedups__) -> Optional[str]:
    """Why this process cannot use a ring, or None if it can; ``speedups``: whether it
    runs the ring's C core (offlog._speedups), as the server and the client both ask."""
    if not sys.platform.startswith("linux"):
        return f"rings are supported on Linux only, not {sys.platform}"
    machine = platform.machine().lower()
    if machine not in FUTEX_CALLS:
        return f"rings are offered on x86-64 and aarch64 only, not {platform.machine()}"
    if sys.maxsize < 2**63 - 1:
        return f"rings need a 64-bit Python (this one is 32-bit, on {platform.machine()})"
    if machine != "x86_64" and not speedups:
        return (
            f"on {platform.machine()} the ring's ordering needs offlog's C core (offlog._speedups:"
            " C11 release and acquire); pure Python's needs x86-64 (TSO)"
        )
    if ctypes is None:
        return "ctypes is not available (the doorbell is a semaphore called through it)"
    if not hasattr(os, "memfd_create"):
        return "this Python has no os.memfd_create (built against a C library older than glibc 2.27)"
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        libc = ""
    if not libc.startswith("glibc "):
        return "rings need glibc (the doorbell is its sem_t), not this C library"
    return _probe()


@functools.cache
def _probe() -> Optional[str]:
    """Make a small sealed ring's memory and use its semaphore as a ring would: why
    that fails here (an old kernel, a semaphore laid out otherwise), or None."""
    try:
        fd = _sealed_memory(layout.HEADER_SIZE)
        try:
            memory, address = _map(fd, layout.HEADER_SIZE, mmap.MAP_SHARED)
        finally:
            os.close(fd)
    except OSError as exc:
        return f"sealed memfds are not available: {exc}"
    with memory, memory[layout.DOORBELL_OFFSET : layout.DOORBELL_OFFSET + 8].cast("I") as bell:
        sem = address + layout.DOORBELL_OFFSET
        libc = _libc()
        before = (libc.sem_init(sem, 1, 0), bell[layout.BELL_VALUE], bell[layout.BELL_WAITERS])
        libc.sem_post(sem)
        if before != (0, 0, 0) or bell[layout.BELL_VALUE] != 1:
            return "the C library's sem_t is not laid out as the ring's doorbell needs"
    return None


class _CLibrary:
    """The C library calls a ring needs, with their argument types."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.mmap = libc.mmap
        self.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        self.mmap.restype = ctypes.c_void_p
        self.munmap = libc.munmap
        self.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.munmap.restype = ctypes.c_int
        self.sem_init = libc.sem_init
        self.sem_init.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint]
        self.sem_init.restype = ctypes.c_int
        self.sem_post = libc.sem_post
        self.sem_post.argtypes = [ctypes.c_void_p]
        self.sem_post.restype = ctypes.c_int
        self.syscall = libc.syscall
        self.syscall.argtypes = [
            ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint
        ]
        self.syscall.restype = ctypes.c_long

        class Timespec(ctypes.Structure):
            _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

        self.Timespec = Timespec

    def futex_wait(self, address: int, timeout: float) -> None:
        """Sleep while the u32 at ``address`` is 0, at most ``timeout`` seconds. Every
        outcome (woken, a value that moved, the timeout, a signal) returns; the caller
        looks at the value again."""
        seconds = int(timeout)
        delay = self.Timespec(seconds, int((timeout - seconds) * 1e9))
        self.syscall(SYS_FUTEX, address, FUTEX_WAIT, 0, ctypes.byref(delay), None, 0)

    def futex_wake(self, address: int) -> None:
        self.syscall(SYS_FUTEX, address, FUTEX_WAKE, 1, None, None, 0)


@functools.cache
def _libc() -> _CLibrary:
    return _CLibrary()


def _map(fd: int, size: int, flags: int) -> Tuple[memoryview, int]:
    """Map ``size`` bytes of ``fd`` read-write: a byte view and its address. The
    mapping holds no descriptor (Python's mmap would keep a copy of ``fd`` open as
    long as it lives) and goes when the last view of it is released."""
    libc = _libc()
    address = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
    if address is None or address == MAP_FAILED:
        code = ctypes.get_errno()
        raise OSError(code, f"cannot map the ring: {os.strerror(code)}")
    mapping = type("Mapping", (ctypes.c_ubyte * size,), {"__del__": _unmap}).from_address(address)
    return memoryview(mapping).cast("B"), address


def _unmap(mapping: Any) -> None:
    """The last view of a mapping is gone: unmap it."""
    _libc().munmap(ctypes.addressof(mapping), ctypes.sizeof(mapping))


def _sealed_memory(size: int) -> int:
    """A new memfd of ``size`` bytes, its pages reserved, sealed against any change of size."""
    fd = os.memfd_create("offlog-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)
        fcntl.fcntl(fd, F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_sealed(fd: int, size: int) -> None:
    """Raise UnsafeRing unless ``fd`` is memory sealed against shrinking, growing and
    further seals, of exactly ``size`` bytes: what a client maps without risking SIGBUS."""
    try:
        seals = fcntl.fcntl(fd, F_GET_SEALS)
    except OSError as exc:
        raise UnsafeRing(f"the offered ring is not sealable memory ({exc.strerror})") from None
    if seals & SEALS != SEALS:
        raise UnsafeRing(f"the offered ring is not sealed against resizing (seals {seals:#x}, need {SEALS:#x})")
    actual = os.fstat(fd).st_size
    if actual != size:
        raise UnsafeRing(f"the offered ring has {actual} bytes, expected {size}")


class ServerRing:
    """Server side: creates the sealed memory and its doorbell, consumes the ring.

    ``fd`` is the descriptor that the offer passes to the client; once it is
    sent, :meth:`close_fd` gives up the server's copy (the mapping stays).
    """

    def __init__(self, capacity: int) -> None:
        layout.check_capacity(capacity)
        self.capacity = capacity
        size = layout.mapping_size(capacity)
        self.fd = _sealed_memory(size)
        self._map: Optional[memoryview] = None
        self._bell: Optional[memoryview] = None
        self.consumer: Optional[Consumer] = None
        try:
            self._map, address = _map(self.fd, size, mmap.MAP_SHARED)  # the consumer's faults cost no client anything
            self._bell = self._map[layout.DOORBELL_OFFSET : layout.DOORBELL_OFFSET + 8].cast("I")
            self._value = address + layout.DOORBELL_OFFSET  # the semaphore, and its value: the futex word
            if _libc().sem_init(self._value, 1, 0):
                raise OSError(ctypes.get_errno(), f"sem_init: {os.strerror(ctypes.get_errno())}")
            self.consumer = Consumer(self._map, capacity)  # writes the header, MAGIC last
        except BaseException:
            self.close()
            raise

    def close_fd(self) -> None:
        """The offer is sent (or will not be): the server's copy of the descriptor goes."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def doorbell_address(self) -> int:
        """The semaphore's value word: the futex a sleeping ring is waited on with."""
        return self._value

    def fall_asleep(self) -> None:
        """The ring goes to sleep: its client's next write posts the doorbell."""
        self._bell[layout.BELL_WAITERS] = 1  # sem_post wakes only a semaphore with waiters
        self.consumer.sleep()

    def has_news(self) -> bool:
        """The doorbell was posted, or HEAD moved (a post a store buffer held back)."""
        return bool(self._bell[layout.BELL_VALUE]) or self.consumer.has_data()

    def awaken(self) -> None:
        """The ring is awake (polled): posts are taken and no longer wanted."""
        bell = self._bell
        bell[layout.BELL_WAITERS] = 0
        bell[layout.BELL_VALUE] = 0
        self.consumer.awaken()

    def close(self) -> None:
        """Give up the descriptor and the mapping (the mapping goes with its last view)."""
        self.close_fd()
        if self.consumer is not None:
            self.consumer.close()
        for view in (self._bell, self._map):
            if view is not None:
                view.release()


class ClientRing:
    """Client side: checks the offered memory, maps it, produces into the ring."""

    def __init__(self, capacity: int, fd: int, **producer_options) -> None:
        """``fd`` is the offered descriptor; the caller closes it (the mapping needs none),
        so no interrupt between receiving it and mapping it can leave it open."""
        layout.check_capacity(capacity)
        size = layout.mapping_size(capacity)
        check_sealed(fd, size)
        mapping, address = _map(fd, size, MAP_FLAGS)
        self._sem_post = functools.partial(_libc().sem_post, address + layout.DOORBELL_OFFSET)
        self._map: Optional[memoryview] = mapping  # while set, the doorbell's address is mapped
        self.producer = Producer(mapping, capacity, self.post, **producer_options)

    def post(self) -> None:
        """Ring the doorbell (the producer does when the consumer sleeps); nothing once closed."""
        if self._map is not None:
            self._sem_post()

    def close(self) -> None:
        """No more posts (idempotent); the mapping stays, as long as the producer's views of it, for recovery."""
        self._map = None
