"""The backlog: bytes a write() accepted that are still in this process.

Theory of operation
-------------------
Every transport keeps what it cannot hand over yet in a :class:`Backlog`,
and the socket transport also keeps the bytes the server has not confirmed
as written in one. A backlog is one ``bytearray`` of bytes, in order, and one
``array('Q')`` of record ends (absolute positions): no object per record, so
memory is the bytes plus 8 per record (1.08x for 100-byte records, about
1.1x with the bytearray's growth slack), and nothing for the garbage
collector to walk however long the backlog grows. Taking from the front is
cheap: CPython's ``bytearray`` deletes a prefix by moving its start, and the
ends array is compacted only when half of it is consumed.

Record ends let a consumer take whole records only (:meth:`whole`), so a
record that fits where it goes never arrives split.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from typing import Iterator, Union

Buffer = Union[bytes, bytearray, memoryview]


class Backlog:
    """Records in order: one bytearray, one array of record ends.

    Every method keeps the backlog usable if an exception (a
    ``KeyboardInterrupt`` from a signal handler) stops it between two of its
    statements: positions move before bytes go, so an interrupted
    :meth:`consume` can only make bytes be handed over twice, never lost; a
    tail without its end (an interrupted :meth:`append`) is taken as one
    record; the index of the first live end is re-derived on every read.
    """

    def __init__(self) -> None:
        self._bytes = bytearray()
        self._ends = array("Q")
        self._first = 0  # a hint: no end before this index is after ``start``
        self.start = 0  # absolute position of self._bytes[0]

    def __len__(self) -> int:
        return len(self._bytes)

    def __bool__(self) -> bool:
        return bool(self._bytes)

    @property
    def end(self) -> int:
        """Absolute position after the last byte."""
        return self.start + len(self._bytes)

    def _front(self) -> int:
        """Index of the first record end after ``start``."""
        self._first = i = bisect_right(self._ends, self.start, self._first)
        return i

    def append(self, data: Buffer) -> None:
        """Add one record (a copy: the caller may reuse its buffer)."""
        self._bytes += data
        self._ends.append(self.start + len(self._bytes))

    def extend(self, other: "Backlog") -> None:
        """Add every record of ``other``, in order (``other`` is left as it was)."""
        shift = self.end - other.start
        self._bytes += other._bytes
        self._ends.extend(e + shift for e in other._ends[other._front() :] if e <= other.end)
        if len(self._ends) and self._ends[-1] < self.end:
            self._ends.append(self.end)  # ``other`` ended in an unterminated tail

    def absorb(self, other: "Backlog") -> None:
        """Move every record of ``other`` to the end of this one, leaving ``other``
        empty (no copy when this one is empty: the buffers change hands)."""
        if self._bytes:
            self.extend(other)
            other.clear()
            return
        self._bytes, other._bytes = other._bytes, bytearray()
        self._ends, other._ends = other._ends, array("Q")
        self._first, other._first = other._first, 0
        self.start, other.start = other.start, other.end

    def whole(self, limit: int) -> int:
        """Bytes of the longest run of whole records from the front that fits ``limit``
        (0 if the first record alone is larger)."""
        i = self._front()
        j = bisect_right(self._ends, self.start + min(limit, len(self._bytes)), i)
        return 0 if j == i else self._ends[j - 1] - self.start

    def first_record(self) -> int:
        """Size of the first record (an unterminated tail counts as one)."""
        if not self._bytes:
            return 0
        i = self._front()
        if i < len(self._ends):
            return min(self._ends[i], self.end) - self.start
        return len(self._bytes)

    def view(self, n: int) -> memoryview:
        """The first ``n`` bytes; release it (``with``) before changing the backlog."""
        return memoryview(self._bytes)[:n]

    def consume(self, n: int) -> None:
        """Forget the first ``n`` bytes (a record cut in two keeps its end)."""
        self.start += n
        del self._bytes[:n]
        i = self._front()
        if i > 1024 and i * 2 > len(self._ends):
            self._first = 0
            del self._ends[:i]

    def forget_until(self, position: int) -> None:
        """Forget every byte before absolute ``position`` (if it is ahead of the start)."""
        if position > self.start:
            self.consume(min(position, self.end) - self.start)

    def records(self) -> Iterator[bytes]:
        """Each record as bytes, in order (slow: for hand-overs and tests)."""
        begin = self.start
        with memoryview(self._bytes) as view:
            for e in self._ends[self._front() :]:
                yield bytes(view[begin - self.start : e - self.start])
                begin = e
            if begin < self.end:
                yield bytes(view[begin - self.start :])

    def clear(self) -> None:
        self.consume(len(self._bytes))

    def repair(self) -> None:
        """After an interrupt between the two steps of :meth:`append`: make the
        ends agree with the bytes again (an unterminated tail becomes a record)."""
        while len(self._ends) > self._front() and self._ends[-1] > self.end:
            self._ends.pop()
        last = self._ends[-1] if len(self._ends) > self._front() else self.start
        if last < self.end:
            self._ends.append(self.end)


class Handover:
    """What a divert hands to the reconnect: backlogs gathered by reference.

    A divert can be cut short by an interrupt and tried again. Parts are
    kept as the objects they were (a part already taken is recognised, never
    taken twice) and copied into one backlog only by :meth:`merged`, which
    changes no part: an interrupt anywhere leaves a retry with exactly what
    the first try had.
    """

    def __init__(self) -> None:
        self.parts: list = []

    def take(self, part: Backlog) -> None:
        """Add ``part`` (whose owner then starts a new backlog) unless it is here already."""
        if part and not any(p is part for p in self.parts):
            self.parts.append(part)

    def merged(self) -> Backlog:
        out = Backlog()
        for part in self.parts:
            out.extend(part)
        return out
