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
    def __init__(self) -> None:
        self._bytes = bytearray()
        self._ends = array("Q")
        self._first = 0  # index of the first end not yet consumed
        self.start = 0  # absolute position of self._bytes[0]

    def __len__(self) -> int:
        return len(self._bytes)

    def __bool__(self) -> bool:
        return bool(self._bytes)

    @property
    def end(self) -> int:
        """Absolute position after the last byte."""
        return self.start + len(self._bytes)

    def append(self, data: Buffer) -> None:
        """Add one record (a copy: the caller may reuse its buffer)."""
        self._bytes += data
        self._ends.append(self.start + len(self._bytes))

    def extend(self, other: "Backlog") -> None:
        """Add every record of ``other``, in order (``other`` is left as it was)."""
        shift = self.end - other.start
        self._bytes += other._bytes
        self._ends.extend(e + shift for e in other._ends[other._first :])

    def absorb(self, other: "Backlog") -> None:
        """Move every record of ``other`` to the end of this one, leaving ``other``
        empty (no copy when this one is empty: the buffers change hands)."""
        if self._bytes:
            self.extend(other)
        else:
            self._bytes, other._bytes = other._bytes, bytearray()
            self._ends, other._ends = other._ends, array("Q")
            self._first, other._first = other._first, 0
            self.start, other.start = other.start, other.end
            return
        other.clear()

    def whole(self, limit: int) -> int:
        """Bytes of the longest run of whole records from the front that fits ``limit``
        (0 if the first record alone is larger)."""
        i = bisect_right(self._ends, self.start + limit, self._first)
        return 0 if i == self._first else self._ends[i - 1] - self.start

    def first_record(self) -> int:
        """Size of the first record."""
        return self._ends[self._first] - self.start if self._bytes else 0

    def view(self, n: int) -> memoryview:
        """The first ``n`` bytes; release it (``with``) before changing the backlog."""
        return memoryview(self._bytes)[:n]

    def consume(self, n: int) -> None:
        """Forget the first ``n`` bytes (a record cut in two keeps its end)."""
        del self._bytes[:n]
        self.start += n
        i = bisect_right(self._ends, self.start, self._first)
        self._first = i
        if i > 1024 and i * 2 > len(self._ends):
            del self._ends[:i]
            self._first = 0

    def forget_until(self, position: int) -> None:
        """Forget every byte before absolute ``position`` (if it is ahead of the start)."""
        if position > self.start:
            self.consume(min(position, self.end) - self.start)

    def records(self) -> Iterator[bytes]:
        """Each record as bytes, in order (slow: for hand-overs and tests)."""
        begin = self.start
        with memoryview(self._bytes) as view:
            for e in self._ends[self._first :]:
                yield bytes(view[begin - self.start : e - self.start])
                begin = e

    def clear(self) -> None:
        self.consume(len(self._bytes))

    def repair(self) -> None:
        """After an interrupt between the two appends of :meth:`append`: make the
        ends agree with the bytes again (an unterminated tail becomes a record)."""
        while len(self._ends) > self._first and self._ends[-1] > self.end:
            self._ends.pop()
        last = self._ends[-1] if len(self._ends) > self._first else self.start
        if last < self.end:
            self._ends.append(self.end)
