"""Single-producer, single-consumer byte ring over shared memory.

Theory of operation
-------------------
The client process is the *producer*: ``Producer.write`` copies the caller's
bytes into the data area at ``head`` and then publishes the new ``head``. The
server is the *consumer*: it reads ``head``, writes every byte in
``[tail, head)`` to the file with one ``writev``, then publishes the new
``tail`` (:meth:`Consumer.drain`). Positions are monotonic 64-bit byte counters; the byte at position
``p`` lives at ``p & (capacity - 1)``, and ``_pieces`` is the one place that
turns a span of positions into views of the data area (two when it passes
the end; only the hot path inlines its one-piece case). ``head`` only ever
moves by whole ``write()`` calls, so the consumer never sees part of a write
that fits the ring, and one ``writev`` keeps each such write contiguous in
the file.

Layout and offsets come from :mod:`offlog.shm.layout`; this module draws none.

Where ``offlog._speedups`` is built (and ``OFFLOG_PUREPYTHON`` is not set),
the two hot paths are C twins (``offlog/_speedups.c``, over the plain-C ring
core ``offlog/_ring_core.h``): ``Producer.write`` and ``Consumer.drain``, the
same steps on the same attributes (those of the hot paths are the classes'
``__slots__``), at the cost of one C call. The Python methods stay the
references that the C ones follow step by step (``python_write``,
``python_drain``), and the fallback; every other method is Python in both.

Memory ordering (why the consumer never reads a position before its bytes)
--------------------------------------------------------------------------
With ``offlog._speedups`` the hot paths order themselves by the language, on
any machine: the producer's copy is a ``memcpy`` followed by a C11 release
store of HEAD; the consumer loads HEAD with acquire before its ``writev``
reads a byte, and stores TAIL with release after the ``writev`` returned
(``offlog/_ring_core.h`` argues each). The Python paths around them (the
producer's slow path publishing a backlog or a wrapped write, its TAIL
refresh, the consumer's :meth:`~Consumer.available` and
:meth:`~Consumer.release` for a pass that drains several rings into one
append, ERRNO before FAILED) use plain loads and stores, and put
``fence()`` (``offlog._speedups.fence``, a C11 acquire-release fence:
``dmb ish`` on aarch64) where a weakly ordered machine could reorder them:
before a store of HEAD or TAIL or STATE = FAILED, after a load of HEAD or
TAIL or STATE = FAILED. With those, rings are offered on aarch64 too
(:func:`offlog.shm.objects.unsupported_reason`), and only with the C core.

Pure Python has no fences (``fence()`` does nothing then), so there the
argument rests on three facts, and rings are offered on x86-64 only:

1. Every shared position is read and written as one aligned 8-byte access
   through ``memoryview.cast("Q")`` (``struct.pack_into`` zero-fills first
   and must never be used on a live header). An aligned 8-byte access is
   single-copy atomic on x86-64: a reader sees the old value or the new one.
2. CPython executes the producer's statements in program order: the data copy
   (``memcpy`` inside the memoryview slice assignment) is a separate C call
   that has returned before the bytecode that stores ``head`` starts, and no
   compiler can move stores across that opaque call boundary.
3. x86-64 (TSO) never makes a store visible before an earlier store, and never
   lets a load overtake an earlier load. So a consumer that loads ``head``
   and then loads the data sees every byte the producer copied before
   publishing that ``head``; and the producer, which loads ``tail`` before
   overwriting space, never overwrites bytes the consumer has not yet finished
   with (the consumer publishes ``tail`` only after ``writev`` returned).

Because fact 3 is specific to TSO machines, a ring without the C core is
offered and used on x86-64 only; elsewhere clients use the socket. (The C
core's release and acquire compile to plain stores and loads on x86-64, and
its fence to nothing but a compiler barrier: TSO gives them for free.)

The doorbell (why a wakeup is never lost for longer than a bounded wait)
----------------------------------------------------------------------
While a ring is *awake* the server polls it (:mod:`offlog.writers` drains
every awake ring of a file in one pass, about a millisecond apart while
bytes flow) and the producer posts nothing: the hot path is one load of
``STATE`` after the ``head`` store. A ring that had no new bytes for a while
*sleeps*: ``STATE`` says ``SLEEPING`` and the producer posts the doorbell (a
POSIX semaphore) after its next publish; :mod:`offlog.shm.doorbells` waits on
the doorbells of all sleeping rings.

Falling asleep is the "set my flag, then check yours" handshake that x86-64
and aarch64 alike *can* break (release and acquire do not order a store before
a later load): the producer's ``head`` store may sit in its store buffer while
its ``STATE`` load already reads ``AWAKE``, and at the same moment the
consumer's ``SLEEPING`` store may sit in its buffer while it re-reads the old
``head``. Both then skip: a missed wakeup. The consumer closes that window
instead of paying for fences on the hot path: it stores ``SLEEPING``,
re-reads ``head`` (no sleep if there is data), and re-reads it once more
``SETTLE`` (1 ms) later. A producer whose ``STATE`` load ran before
``SLEEPING`` became visible had already issued its ``head`` store; store
buffers drain in nanoseconds, far inside 1 ms, so the second re-read finds
that ``head``. A producer whose load ran after ``SLEEPING`` became visible
sees it and posts. So a missed post costs at most ``SETTLE`` of latency,
never data; the doorbell waiters also look at every sleeping ring now and
then as a second line of defence.

:class:`Consumer` holds the ring's side of this (:meth:`Consumer.sleep`,
:meth:`Consumer.awaken`, :meth:`Consumer.has_data`); who polls and who waits
is the server's business.

The shared header is hostile input for the server: :class:`Consumer` keeps
its own ``tail`` and checks ``head`` and the identity words every time.
"""

from __future__ import annotations

import errno
import time
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Tuple

from .. import __with_speedups__, token
from ..backlog import Backlog, Buffer, Handover
from ..writev import write_whole
from . import layout
from .layout import HEAD_WORD, STATE_WORD, TAIL_WORD

#: Bounded wait that closes the store-buffer window of the sleep handshake.
SETTLE = 0.001

if __with_speedups__:
    from .._speedups import fence
else:

    def fence() -> None:
        """Pure Python runs rings on x86-64 only, whose TSO keeps these accesses in order."""


class RingCorrupt(ValueError):
    """The shared header no longer describes a valid ring."""


def _words_and_data(mapping: Buffer, capacity: int):
    view = memoryview(mapping)
    words = view[: layout.HEADER_SIZE].cast("Q")
    data = view[layout.DATA_OFFSET : layout.DATA_OFFSET + capacity]
    return words, data


def _pieces(data: memoryview, position: int, n: int) -> List[memoryview]:
    """The ring's wrap-around, for both halves: the ``n`` bytes from ``position``
    on, as one view of the data area or two when they pass its end (``n`` at
    most the capacity, a power of two). Producer.write inlines the one-piece
    case: its ``_limit`` never lets a write pass the end of a lap."""
    size = len(data)
    start = position & (size - 1)
    end = start + n
    if end <= size:
        return [data[start:end]]
    return [data[start:], data[: end - size]]


class Producer(token.Guarded):
    """The client half: ``write`` never blocks and never spins.

    A transport's data path over a ring (:mod:`offlog.transports`; the
    socket's, in :mod:`offlog.socketpath`, answer the same calls).
    ``doorbell`` wakes a sleeping consumer (posts the semaphore);
    ``on_failed`` is called (token held) when the consumer has flagged an
    error, and raises it or hands over; ``on_interrupt`` (token held) by the
    first write after :meth:`interrupt` (the control socket hung up). Writes
    that do not fit wait in a local :class:`~offlog.backlog.Backlog`, in
    order, and move into the ring on later writes, on :meth:`pump` and on
    close. ``admit(backlog, n)`` is the backlog's limit for a write that
    would grow it: True to take the write, False to drop it, :data:`WAIT` to
    wait for room, or it raises. A waiting write gives the token back and
    calls ``idle(since)`` (which raises TimeoutError once the wait that began
    at ``since`` is too long) before it tries again.

    Threads: the producer's state is guarded by a write token
    (:mod:`offlog.token`), which also makes a signal handler that writes
    while it interrupted a write set its bytes aside instead of deadlocking.
    """

    # The hot path's state: slots, which offlog/_speedups.c reads and writes at fixed offsets.
    __slots__ = ("_token", "_head", "_limit", "_data", "_words")

    def __init__(
        self,
        mapping: Buffer,
        capacity: int,
        doorbell: Callable[[], None],
        on_failed: Callable[[int], None],
        on_interrupt: Callable[[], None] = lambda: None,
        admit: Optional[Callable[[int, int], object]] = None,
        idle: Optional[Callable[[float], None]] = None,
    ) -> None:
        self._words, self._data = _words_and_data(mapping, capacity)
        layout.check_header(self._words, capacity, len(memoryview(mapping)))
        self._admit = admit or admit_all
        self._idle = idle or _nap
        self._capacity = capacity
        self._mask = capacity - 1
        self._head = self._words[HEAD_WORD]
        self._tail = self._words[TAIL_WORD]
        self._backlog = Backlog()
        self._token = token.new()
        self._reentered: Deque[bytes] = deque()  # from signal handlers that interrupted a write
        self._doorbell = doorbell
        self._on_failed = on_failed
        self._on_interrupt = on_interrupt
        self._interrupted = False
        self._forward: Optional[Callable[[Buffer], None]] = None
        self._closed = False
        self.error: Optional[BaseException] = None  # the server's, raised by every later write
        self._big: Optional[Tuple[int, bytes]] = None  # (head at its start, bytes) of an oversized write
        self._handover: Optional[Handover] = None  # what a hand-over cut short was handing over
        self._hand_over_to: Any = None
        self._skip = 0
        self._limit = 0
        self._update_limit()

    @property
    def backlog_bytes(self) -> int:
        return len(self._backlog) + sum(map(len, self._reentered))

    def write(self, data: Buffer) -> None:
        # The hot path. Cost on x86-64, CPython 3.11, 100-byte record, consumer
        # awake: ~0.25 us in all -- token ~35 ns, bounds check ~30 ns, slice
        # copy ~70 ns, publish (one aligned 8-byte store) ~25 ns, STATE load
        # ~20 ns, the call itself ~30 ns. No syscall unless the consumer
        # sleeps (then one sem_post). ``_limit`` folds three checks into one:
        # room left before the cached tail, the end of this lap of the ring,
        # and "take the slow path" (backlog, interrupt, hand-over, close: -1).
        # offlog/_speedups.c is this method in C (~45 ns, ~400 instructions with
        # the call): a change here changes it there.
        tok = self._token  # (not "token": that name is an import here, and the compiler
        try:  # would look ``tok.pop`` up as an attribute instead of a method call)
            tok.pop()
        except IndexError:
            return self._write_slow(data)
        try:
            head = self._head
            end = head + len(data)
            if end <= self._limit:  # so [head, end) is one piece (see _pieces)
                pos = head & self._mask
                try:
                    self._data[pos : pos + end - head] = data
                except (TypeError, ValueError):  # str, or a buffer that is not bytes
                    pass
                else:
                    self._head = end
                    words = self._words
                    words[HEAD_WORD] = end  # publish: one aligned 8-byte store
                    if words[STATE_WORD]:
                        self._wake_or_fail()
                    return
        except BaseException:
            self._resync()  # interrupted between the copy and the publish
            raise
        finally:
            tok.append(True)
        return self._write_slow(data)

    def _pump_step(self) -> None:
        if self._backlog and self._forward is None and self.error is None:
            self._drain_backlog()

    def interrupt(self) -> None:
        """Any thread: make the next write take the slow path and call ``on_interrupt``."""
        self._interrupted = True
        self._limit = -1

    def hand_over_locked(self, make_handler: Callable[[Backlog], Callable[[Buffer], None]]) -> None:
        """Token held: hand every byte the consumer has not confirmed (the ring's
        ``[TAIL, head)``, then the backlog) to ``make_handler``, and send every
        later write to the handler it returns."""
        if self._forward is not None:
            return
        self._take_reentered()
        self._limit = -1
        self._hand_over_to = make_handler
        if self._handover is None:  # kept until the handler took it: an interrupt in there loses nothing
            unconfirmed = Backlog()
            skip = self._unconfirmed_into(unconfirmed) if self._words is not None else 0
            handover = Handover()
            handover.take(unconfirmed)
            self._handover, self._skip = handover, skip
        skip, self._skip = self._skip, 0
        if skip:
            self._backlog.consume(skip)  # an oversized write's unfed rest: it is in the handover whole
        self._handover.take(self._backlog)  # by reference, then a new backlog: never taken twice
        self._backlog = Backlog()
        self._forward = make_handler(self._handover.merged())
        self._handover = None

    def close_locked(self) -> None:
        """Every later write raises ValueError (plain stores: also without the token)."""
        self._closed = True
        self._limit = -1

    def fail_locked(self, error: BaseException) -> None:
        """Token held: the server reported ``error``; every later write raises it."""
        self.error = error
        self._limit = -1

    def unconfirmed_bytes(self) -> int:
        """Bytes published that the consumer has not confirmed (the live TAIL word;
        a TAIL outside what was published counts as nothing confirmed since the last)."""
        if self._words is None:
            return 0
        tail = self._words[TAIL_WORD]
        return self._head - (tail if self._tail <= tail <= self._head else self._tail)

    def _unconfirmed_into(self, out: Backlog) -> int:
        """Token held, handing over: the ring's unconfirmed bytes into ``out``;
        returns how many bytes at the backlog's front ``out`` holds already. An
        oversized write the consumer had not wholly confirmed goes whole, from
        its first byte: a consumer that wrote part of it and died leaves a
        fragment in the file, and the record follows whole."""
        tail = self._words[TAIL_WORD]
        if not self._tail <= tail <= self._head:
            tail = self._tail  # a consumer that lied: resend from what it last showed us
        big = self._big
        if big is None or tail >= big[0] + len(big[1]):
            out.append(self._ring_bytes(tail, self._head))
            return 0
        start, record = big
        end = start + len(record)
        if tail < start:
            out.append(self._ring_bytes(tail, start))
        out.append(record)
        if self._head > end:
            out.append(self._ring_bytes(end, self._head))
        return max(0, end - self._head)  # its unfed rest, still in the backlog: in ``record`` already

    def _ring_bytes(self, begin: int, end: int) -> bytes:
        return b"".join(_pieces(self._data, begin, end - begin))

    def wake(self) -> None:
        if self._words is not None and self._words[STATE_WORD] == layout.SLEEPING:
            self._doorbell()

    def detach(self, forward: Callable[[Buffer], None]) -> None:
        """After fork: forget the mapping (this process must never write into it);
        a write through a bound ``write`` kept from before the fork goes to ``forward``."""
        self._limit = -1
        self._words = self._data = None  # type: ignore[assignment]
        self._backlog = Backlog()
        self._reentered.clear()
        self._forward = forward
        self._token = token.new()  # another thread of the parent may have held it at the fork

    # -- slow path -------------------------------------------------------------
    def _write_locked(self, view: memoryview):
        """Token held: None when done, WAIT, or the write that took over (a hand-over)."""
        if self._interrupted and self._forward is None and not self._closed:
            self._interrupted = False
            self._update_limit()
            self._on_interrupt()
        forward = self._before_write_locked()
        n = view.nbytes
        if forward is not None or not n:
            return forward
        if self._backlog:
            self._drain_backlog()  # room first: a recovered ring admits again
        if not self._backlog and n <= self._capacity - (self._head - self._tail):
            self._copy_in(view)
            self._update_limit()
            self._wake_or_fail()
            return None
        verdict = self._admit(len(self._backlog), n) if self._backlog else True
        if verdict is WAIT:
            return WAIT
        if verdict:
            self._backlog.append(view)
            self._drain_backlog()
        return None

    def _update_hot_path(self) -> None:
        self._update_limit()

    def _after_exception(self) -> None:
        self._resync()

    def _wait_for_room(self, since: float) -> None:
        self._idle(since)

    def _drain_backlog(self) -> None:
        self._refresh_tail()
        backlog = self._backlog
        published = False
        while backlog:
            free = self._capacity - (self._head - self._tail)
            n = backlog.whole(free)
            if not n:
                if not free:
                    break
                if not self._feeding_big():
                    size = backlog.first_record()
                    if size <= self._capacity or self._big is not None:
                        break  # wait for room: whole writes stay whole; one oversized write at a time
                    with backlog.view(size) as record:
                        self._big = (self._head, bytes(record))
                n = free  # larger than the ring: feed it piecewise
            with backlog.view(n) as chunk:
                self._copy_in(chunk)
            backlog.consume(n)
            published = True
        self._update_limit()
        if published or backlog:
            self._wake_or_fail()

    def _feeding_big(self) -> bool:
        """An oversized write is part-way into the ring (the backlog's first record is its rest)."""
        return self._big is not None and self._head < self._big[0] + len(self._big[1])

    def _copy_in(self, chunk: memoryview) -> None:
        done = 0
        for piece in _pieces(self._data, self._head, chunk.nbytes):
            piece[:] = chunk[done : done + len(piece)]
            done += len(piece)
        self._head += done
        self._publish()

    def _publish(self) -> None:
        """Slow path's publish (the hot path inlines the same single 8-byte store; in C, a
        release store): the copy is ordered before HEAD."""
        fence()
        self._words[HEAD_WORD] = self._head

    def _resync(self) -> None:
        """After an exception with the token held: the published ``head`` is the
        truth (a copy not yet published is simply not written)."""
        if self._words is not None:
            self._head = self._words[HEAD_WORD]
            self._backlog.repair()
            self._limit = -1  # the next write re-derives the limit

    def _refresh_tail(self) -> None:
        tail = self._words[TAIL_WORD]
        fence()  # no copy into the space TAIL hands back before this load
        if not self._tail <= tail <= self._head:
            raise RingCorrupt(f"consumer position {tail} outside [{self._tail}, {self._head}]")
        self._tail = tail
        if self._big is not None and tail >= self._big[0] + len(self._big[1]):
            self._big = None  # confirmed whole: nothing of it to re-send

    def _update_limit(self) -> None:
        if self._backlog or self._forward is not None or self._closed or self._reentered or self.error is not None:
            self._limit = -1
        else:
            self._limit = min(self._tail + self._capacity, (self._head | self._mask) + 1)
        if self._interrupted:  # set by another thread meanwhile: keep the slow path
            self._limit = -1

    def _wake_or_fail(self) -> None:
        state = self._words[STATE_WORD]
        if state == layout.SLEEPING:
            self._doorbell()
        elif state == layout.FAILED:
            fence()  # the consumer's ERRNO, stored before FAILED
            self._on_failed(self._words[layout.ERRNO_WORD] or errno.EIO)


WAIT = token.WAIT


def admit_all(backlog: int, n: int) -> bool:
    """The default backlog limit: none, as in offlog 0.x."""
    return True


def _nap(since: float) -> None:
    time.sleep(0.0005)


# The C write holds the token without a frame of its own: the Python it calls with the
# token held (``_wake_or_fail``; ``_resync`` when an exception passes) must say so.
Producer.HOLDING = token.holding(Producer.write, Producer._wake_or_fail, Producer._resync)

#: ``Producer.write`` in Python: the reference, and the hot path without offlog._speedups.
python_write = Producer.write
if __with_speedups__:
    from .._speedups import producer_write

    Producer.write = producer_write(Producer)  # type: ignore[method-assign]


class Consumer:
    """The server half. Never trusts the shared header."""

    # The hot path's state: slots, which offlog/_speedups.c reads and writes at fixed offsets.
    __slots__ = ("_words", "_data", "_capacity", "_tail")

    def __init__(self, mapping: Buffer, capacity: int) -> None:
        self._words, self._data = _words_and_data(mapping, capacity)
        layout.init_header(self._words, capacity)
        self._capacity = capacity
        self._tail = 0

    @property
    def tail(self) -> int:
        return self._tail

    def available(self) -> int:
        """Published head, checked: raises RingCorrupt if the producer lied."""
        words = self._words
        head = words[HEAD_WORD]
        fence()  # no byte before HEAD is read before this load
        if not self._tail <= head <= self._tail + self._capacity:
            raise RingCorrupt(f"producer position {head} outside [{self._tail}, {self._tail + self._capacity}]")
        if words[layout.MAGIC_WORD] != layout.MAGIC or words[layout.CAPACITY_WORD] != self._capacity:
            raise RingCorrupt("ring header identity (magic or capacity) was overwritten")
        if words[layout.VERSION_WORD] != layout.VERSION or words[layout.DATA_OFFSET_WORD] != layout.DATA_OFFSET:
            raise RingCorrupt("ring header identity (version or data offset) was overwritten")
        return head

    def views(self, head: int) -> List[memoryview]:
        """The bytes in [tail, head) as one or two views (two when they wrap)."""
        return _pieces(self._data, self._tail, head - self._tail)

    def unconfirmed(self) -> int:
        """Bytes published but not yet written (released), as far as a status report needs (unchecked)."""
        return max(0, self._words[HEAD_WORD] - self._tail)

    def release(self, position: int) -> None:
        """Everything before ``position`` is written: hand the space back."""
        self._tail = position
        fence()  # every read of those bytes is done before TAIL says so
        self._words[TAIL_WORD] = position

    def drain(self, fd: int) -> int:
        """The server's hot path: write every byte published to ``fd`` in one ``writev``
        (:func:`~offlog.writev.write_whole`; HEAD checked as by :meth:`available`, which
        raises RingCorrupt before anything is written), then hand the space back; bytes
        moved. An OSError leaves the ring as it was; its ``characters_written`` says how
        many of the bytes reached ``fd`` (the caller cuts them off). In C where
        offlog._speedups is built; this is the reference (``python_drain``)."""
        head = self.available()
        tail = self._tail
        if head != tail:
            write_whole(fd, _pieces(self._data, tail, head - tail))
            self.release(head)
        return head - tail

    def has_data(self) -> bool:
        """HEAD moved (unchecked: a poll; :meth:`available` checks before anything is read)."""
        return self._words[HEAD_WORD] != self._tail

    def sleep(self) -> None:
        """STATE = SLEEPING: the producer posts the doorbell after its next publish
        (a failed ring stays FAILED)."""
        if self._words[STATE_WORD] != layout.FAILED:
            self._words[STATE_WORD] = layout.SLEEPING

    def awaken(self) -> None:
        """STATE = AWAKE: the consumer polls; the producer posts nothing."""
        if self._words[STATE_WORD] != layout.FAILED:
            self._words[STATE_WORD] = layout.AWAKE

    def fail(self, code: int) -> None:
        """Flag a write error for the producer's next write()."""
        self._words[layout.ERRNO_WORD] = code
        fence()  # ERRNO before FAILED
        self._words[STATE_WORD] = layout.FAILED

    def close(self) -> None:
        self._words.release()
        self._data.release()


#: ``Consumer.drain`` in Python: the reference, and the server's hot path without offlog._speedups.
python_drain = Consumer.drain
if __with_speedups__:
    from .._speedups import consumer_drain

    Consumer.drain = consumer_drain(Consumer, RingCorrupt)  # type: ignore[method-assign]
