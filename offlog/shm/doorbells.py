"""The doorbells of sleeping rings: a few threads wait on all of them.

Theory of operation
-------------------
A ring whose client has stopped writing *sleeps*: its consumer's ``STATE``
word says ``SLEEPING``, so the client's next write posts the ring's doorbell
(the ``sem_t`` in its header, :mod:`offlog.shm.layout`), and someone must be
waiting on that semaphore. Linux cannot put a futex into ``epoll``, and a
thread per sleeping ring is what made 2,000 idle clients cost 2,003 threads,
so :class:`Doorbells` waits on many at once with ``futex_waitv`` (Linux 5.16):
each waiter thread watches up to :data:`GROUP` rings' doorbells plus one
private futex of its own (its *control word*, bumped whenever its set of rings
changes). Waiter threads grow with sleeping rings, one per :data:`GROUP`.

A wake costs the same with 10 or 10,000 clients: the kernel says which futex
fired (its index), the waiter takes that ring out of its set, sets ``STATE``
to ``AWAKE`` and calls the ring's ``rung`` callback (the writers poll an awake
ring; its producer posts nothing more). A waiter scans its own rings (at most
:data:`GROUP`) only when ``futex_waitv`` cannot say which (a value moved while
it armed, or its periodic check); it never looks at another waiter's rings.

Putting a ring to sleep is the sleep handshake of :mod:`offlog.shm.ring`: the
waiter stores ``SLEEPING``, marks the semaphore as having a waiter
(``sem_post`` calls ``FUTEX_WAKE`` only then), re-reads ``HEAD``, and waits
at most :data:`~offlog.shm.ring.SETTLE` before re-reading ``HEAD`` of the
rings that fell asleep since its last wait: a producer whose ``HEAD`` store
sat in its store buffer while it read ``AWAKE`` is found then. That settle is
one timed wait per batch of rings that fell asleep together, not one per ring.
The long wait is bounded (:data:`IDLE_CHECK`) as a second line of defence.

A ring is memory a client can write: a waiter touches a ring's words only
under its lock, and :meth:`Doorbells.forget` takes the ring out under that
lock, so after it returns no waiter touches the ring again and the caller may
unmap it. (A ``futex_waitv`` already armed on its address is harmless: the
kernel keys a shared futex by page, and an unmapped one simply never fires;
the next arm leaves it out.)

A client that spams its doorbell gains nothing: a post only wakes a waiter
while its ring sleeps, and the ring then stays awake (posts cost the server
nothing) until the writers have found it idle for
:data:`~offlog.writers.SLEEP_AFTER`: at most one wake per sleep.

Without ``futex_waitv`` (older kernels, other machines) :meth:`Doorbells.sleep`
returns False and the writers keep such rings awake, polling them slowly.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import time
from typing import Callable, Dict, List

from .objects import SYS_FUTEX, SYS_FUTEX_WAITV, ServerRing
from .ring import SETTLE

#: Rings one waiter thread watches (futex_waitv takes 128 futexes; one is its control word).
GROUP = 127
#: Seconds between a waiter's checks of every ring it watches, posted or not.
IDLE_CHECK = 5.0

FUTEX_32 = 2
FUTEX_PRIVATE_FLAG = 128
CLOCK_MONOTONIC = 1
EAGAIN = 11
ETIMEDOUT = 110


class _WaitV(ctypes.Structure):
    _fields_ = [
        ("val", ctypes.c_uint64),
        ("uaddr", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Calls:
    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.waitv = libc["syscall"]  # a function object of its own: argtypes of its own
        self.waitv.argtypes = [
            ctypes.c_long, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_int
        ]
        self.waitv.restype = ctypes.c_long
        self.wake = libc["syscall"]
        self.wake.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        self.wake.restype = ctypes.c_long


@functools.cache
def _calls() -> _Calls:
    return _Calls()


@functools.cache
def waitv_available() -> bool:
    """True if this kernel has futex_waitv (an empty, already expired wait answers)."""
    try:
        calls = _calls()
    except (OSError, AttributeError):
        return False
    word = ctypes.c_uint32(1)
    one = (_WaitV * 1)(_WaitV(0, ctypes.addressof(word), FUTEX_32 | FUTEX_PRIVATE_FLAG, 0))
    result = calls.waitv(SYS_FUTEX_WAITV, ctypes.addressof(one), 1, 0, None, CLOCK_MONOTONIC)
    return result >= 0 or ctypes.get_errno() == EAGAIN  # value 1 != expected 0: it looked, so it exists


class Doorbells:
    """Waits on the doorbells of sleeping rings and calls back when one rings."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        self._warn = warn
        self._lock = threading.Lock()
        self._waiters: List[_Waiter] = []
        self._where: Dict[ServerRing, _Waiter] = {}
        self._closed = False
        self.available = waitv_available()
        self.wakes = 0  # rings woken by their doorbell (or found with bytes while falling asleep)

    def sleep(self, ring: ServerRing, rung: Callable[[], None]) -> bool:
        """Put ``ring`` to sleep; ``rung()`` is called once (on a waiter thread, under the
        doorbells' lock: it must not call back into this object) when its client writes
        again. False if it cannot sleep (the caller keeps it awake)."""
        if not self.available:
            return False
        with self._lock:
            if self._closed:
                return False
            waiter = next((w for w in self._waiters if w.room()), None)
            if waiter is None:
                waiter = _Waiter(self._lock, self._gone)
                try:
                    waiter.start()
                except RuntimeError as exc:  # no thread to be had: the ring stays awake
                    self._warn(f"Rings stay awake: cannot start a doorbell thread ({exc})")
                    return False
                self._waiters.append(waiter)
            self._where[ring] = waiter
            waiter.add(ring, rung)
        return True

    def forget(self, ring: ServerRing) -> None:
        """Stop watching ``ring`` (no ``rung`` after this returns; nothing touches it)."""
        with self._lock:
            waiter = self._where.pop(ring, None)
            if waiter is not None:
                waiter.remove(ring)

    def sleeping(self) -> int:
        with self._lock:
            return len(self._where)

    def threads(self) -> int:
        with self._lock:
            return len(self._waiters)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for waiter in self._waiters:
                waiter.stop()

    def _gone(self, ring: ServerRing) -> None:
        """Lock held: a waiter let ``ring`` go (it rang)."""
        self._where.pop(ring, None)
        self.wakes += 1


class _Waiter:
    """One thread: futex_waitv over its control word and up to GROUP doorbells."""

    def __init__(self, lock: threading.Lock, gone: Callable[[ServerRing], None]) -> None:
        self._lock = lock  # the Doorbells' lock: every touch of a ring's words is under it
        self._gone = gone
        self._rings: Dict[ServerRing, Callable[[], None]] = {}
        self._new: List[ServerRing] = []  # fell asleep since the last wait: re-read after SETTLE
        self._control = ctypes.c_uint32(0)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="doorbells", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def room(self) -> bool:
        return len(self._rings) < GROUP

    def add(self, ring: ServerRing, rung: Callable[[], None]) -> None:
        """Lock held."""
        self._rings[ring] = rung
        self._new.append(ring)
        self._bump()

    def remove(self, ring: ServerRing) -> None:
        """Lock held."""
        if self._rings.pop(ring, None) is not None:
            ring.awaken()
        if ring in self._new:
            self._new.remove(ring)
        self._bump()

    def stop(self) -> None:
        """Lock held."""
        self._stopped = True
        self._bump()

    def _bump(self) -> None:
        self._control.value = (self._control.value + 1) & 0xFFFFFFFF
        _calls().wake(SYS_FUTEX, ctypes.addressof(self._control), 1 | FUTEX_PRIVATE_FLAG, 1)  # FUTEX_WAKE_PRIVATE

    def _run(self) -> None:
        calls = _calls()
        array = (_WaitV * (GROUP + 1))()
        control_address = ctypes.addressof(self._control)
        deadline = _Timespec()
        settling: List[ServerRing] = []  # fell asleep: HEAD re-read once SETTLE has passed
        settled_at = 0.0
        while True:
            with self._lock:
                if self._stopped:
                    return
                if self._new:
                    for ring in self._new:
                        try:
                            ring.fall_asleep()  # STATE = SLEEPING, the semaphore has a waiter
                        except ValueError:
                            pass  # closed already: the look just below lets it go
                    self._ring_any(self._new)
                    settling += self._new
                    settled_at = time.monotonic() + SETTLE
                    self._new = []
                armed = list(self._rings)
                array[0] = _WaitV(self._control.value, control_address, FUTEX_32 | FUTEX_PRIVATE_FLAG, 0)
                for i, ring in enumerate(armed, 1):
                    array[i] = _WaitV(0, ring.doorbell_address, FUTEX_32, 0)
            wait = max(0.0, settled_at - time.monotonic()) if settling else IDLE_CHECK
            due = time.clock_gettime(time.CLOCK_MONOTONIC) + wait
            deadline.tv_sec = int(due)
            deadline.tv_nsec = int((due - int(due)) * 1e9)
            index = calls.waitv(
                SYS_FUTEX_WAITV, ctypes.addressof(array), len(armed) + 1, 0, ctypes.addressof(deadline), CLOCK_MONOTONIC
            )
            error = ctypes.get_errno() if index < 0 else 0
            with self._lock:
                if index > 0:  # that doorbell was posted
                    look = [armed[index - 1]]
                elif index == 0:  # our control word: the set changed, re-arm
                    look = []
                elif error == ETIMEDOUT and not settling:  # the periodic check
                    look = list(self._rings)
                elif error == ETIMEDOUT:
                    look = []
                else:  # EAGAIN (a doorbell was posted while arming), EINTR, EFAULT
                    look = list(self._rings)
                if settling and time.monotonic() >= settled_at:
                    look += settling
                    settling = []
                self._ring_any([ring for ring in dict.fromkeys(look) if ring in self._rings])

    def _ring_any(self, rings: List[ServerRing]) -> None:
        """Lock held: wake every ring of ``rings`` that was posted or has data and call
        its ``rung`` (under the lock, so that no ``rung`` follows a :meth:`Doorbells.forget`)."""
        for ring in rings:
            try:
                if not ring.has_news():
                    continue
                ring.awaken()
            except ValueError:  # closed while watched (a mistake elsewhere): watched no more, never crashes us
                pass
            self._gone(ring)
            self._rings.pop(ring)()

