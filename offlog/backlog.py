"""The backlog: bytes a write() accepted that are still in this process.

Theory of operation
-------------------
Every transport keeps what it cannot hand over yet in a :class:`Backlog`,
and the socket transport also keeps the bytes the server has not confirmed
as written in one. A backlog is a deque of *segments* (``bytearray``\\ s of
about ``SEGMENT`` bytes) and one ``array('Q')`` of record ends (absolute
positions): no object per record, so memory is the bytes plus 8 per record
(1.08x for 100-byte records, about 1.1x with the bytearrays' growth slack),
and nothing for the garbage collector to walk however long it grows.

Segments keep every step short whatever the backlog's size. A record never
spans two segments (one larger than ``SEGMENT`` gets a segment of its own),
so whole records are always taken from the first segment. Taking from the
front deletes a prefix of the first segment (CPython moves the bytearray's
start; when it shrinks below half it copies at most a segment) or drops a
whole segment; moving a backlog into another (:meth:`absorb`, a hand-over)
moves segments, never bytes.

Record ends let a consumer take whole records only (:meth:`whole`), so a
record that fits where it goes never arrives split.

Every method keeps the backlog usable if an exception (a ``KeyboardInterrupt``
from a signal handler) stops it between two statements: positions move before
bytes go, so an interrupted :meth:`consume` can make bytes be handed over
twice, never lost; :meth:`repair` re-derives the byte count and turns a tail
without its end (an interrupted :meth:`append`) into a record; the index of
the first live end is re-derived on every read.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections import deque
from typing import Deque, Iterator, List, Optional, Union

#: What a bytes-like argument may be, here and in every layer above (files, ring).
Buffer = Union[bytes, bytearray, memoryview]

#: Bytes a segment grows to before the next record starts a new one.
SEGMENT = 1 << 20


class Backlog:
    """Records in order: segments of bytes, one array of record ends."""

    def __init__(self) -> None:
        self._segments: Deque[bytearray] = deque()
        self._sealed = 0  # bytes in every segment but the last
        self._ends = array("Q")
        self._first = 0  # a hint: no end before this index is after ``start``
        self.start = 0  # absolute position of the first byte

    def __len__(self) -> int:
        return self._sealed + len(self._segments[-1]) if self._segments else 0

    def __bool__(self) -> bool:
        return len(self) > 0

    @property
    def end(self) -> int:
        """Absolute position after the last byte."""
        return self.start + len(self)

    def _front(self) -> int:
        """Index of the first record end after ``start``."""
        self._first = i = bisect_right(self._ends, self.start, min(self._first, len(self._ends)))
        return i

    def append(self, data: Buffer) -> None:
        """Add one record (a copy: the caller may reuse its buffer). On the socket's
        hot path: a bytearray extend and an array append, no other call."""
        segments = self._segments
        last = segments[-1] if segments else None
        if last is None or (last and len(last) + len(data) > SEGMENT):
            self._seal()
            last = segments[-1]
        last += data
        self._ends.append(self.start + self._sealed + len(last))

    def _recount(self) -> None:
        segments = self._segments
        self._sealed = sum(map(len, segments)) - (len(segments[-1]) if segments else 0)

    def _seal(self) -> None:
        """Start a new last segment."""
        if self._segments:
            self._sealed += len(self._segments[-1])
        self._segments.append(bytearray())

    def extend(self, other: "Backlog") -> None:
        """Add every record of ``other``, in order (a copy; ``other`` is left as it was)."""
        shift = self.end - other.start
        for segment in other._segments:
            self._seal()
            self._segments[-1] += segment
        self._add_ends(other, shift)

    def _add_ends(self, other: "Backlog", shift: int) -> None:
        ends = other._ends[other._front() :]
        while len(ends) and ends[-1] > other.end:
            ends.pop()
        if shift == 0:
            self._ends.extend(ends)  # at C speed
        else:
            self._ends.extend(e + shift for e in ends)
        if (self._ends[-1] if len(self._ends) else self.start) < self.end:
            self._ends.append(self.end)  # ``other`` ended in a tail without its end

    def absorb(self, other: "Backlog") -> None:
        """Move every record of ``other`` to the end of this one, leaving ``other``
        empty. Segments change hands; no byte is copied."""
        if not other:
            return
        if not self:
            self._first = 0
            self.start = other.start
            self._ends = array("Q")
        shift = self.end - other.start
        self._segments.extend(segment for segment in other._segments if segment)
        self._segments.append(bytearray())  # appends go to a fresh segment
        self._recount()
        self._add_ends(other, shift)
        end = self.end
        other.__init__()  # type: ignore[misc]
        other.start = end

    def whole(self, limit: int) -> int:
        """Bytes of the longest run of whole records from the front that fits
        ``limit`` (0 if the first record alone is larger); always within the
        first segment, so :meth:`view` can show them in one piece."""
        if not self:
            return 0
        self._drop_empty()
        i = self._front()
        in_segment = len(self._segments[0])
        j = bisect_right(self._ends, self.start + min(limit, in_segment), i)
        if j > i:
            return self._ends[j - 1] - self.start
        return in_segment if in_segment <= limit else 0  # a segment's end is a record's end

    def first_record(self) -> int:
        """Size of the first record (a tail without its end counts as one)."""
        if not self:
            return 0
        self._drop_empty()
        i = self._front()
        in_segment = len(self._segments[0])
        return min(self._ends[i] - self.start, in_segment) if i < len(self._ends) else in_segment

    def view(self, n: int) -> memoryview:
        """The first ``n`` bytes (at most what :meth:`whole` or :meth:`first_record`
        returned); release it (``with``) before changing the backlog."""
        self._drop_empty()
        first = self._segments[0] if self._segments else bytearray()
        if n > len(first):
            raise ValueError(f"view({n}) reaches past the first segment ({len(first)} bytes)")
        return memoryview(first)[:n]

    def consume(self, n: int) -> None:
        """Forget the first ``n`` bytes (a record cut in two keeps its end)."""
        self.start += n
        segments = self._segments
        while n and segments:
            first = segments[0]
            if n < len(first):
                if len(segments) > 1:
                    self._sealed -= n
                del first[:n]
                break
            n -= len(first)
            if len(segments) == 1:
                first.clear()
                break
            segments.popleft()
            self._sealed -= len(first)
        i = self._front()
        if i > 1024 and i * 2 > len(self._ends):
            self._first = 0
            del self._ends[:i]

    def _drop_empty(self) -> None:
        """Empty segments at the front (after a consume, or an absorb) go."""
        segments = self._segments
        while len(segments) > 1 and not segments[0]:
            segments.popleft()

    def forget_until(self, position: int) -> None:
        """Forget every byte before absolute ``position`` (if it is ahead of the start)."""
        if position > self.start:
            self.consume(min(position, self.end) - self.start)

    def records(self) -> Iterator[bytes]:
        """Each record as bytes, in order (slow: for hand-overs and tests)."""
        data = b"".join(self._segments)
        begin = self.start
        for e in self._ends[self._front() :]:
            if e > self.end:
                break
            yield data[begin - self.start : e - self.start]
            begin = e
        if begin < self.end:
            yield data[begin - self.start :]

    def clear(self) -> None:
        self.consume(len(self))

    def repair(self) -> None:
        """After an interrupt inside a method: re-derive the byte count, and make
        the ends agree with the bytes (a tail without its end becomes a record)."""
        self._recount()
        while len(self._ends) > self._front() and self._ends[-1] > self.end:
            self._ends.pop()
        last = self._ends[-1] if len(self._ends) > self._front() else self.start
        if last < self.end:
            self._ends.append(self.end)


class Handover:
    """What a hand-over gives the reconnect: backlogs gathered by reference.

    A hand-over can be cut short by an interrupt and tried again. Parts are
    kept as the objects they were (a part already taken is recognised, never
    taken twice), and :meth:`merged` only reads them: an interrupt anywhere
    leaves a retry with exactly what the first try had.
    """

    def __init__(self) -> None:
        self.parts: List[Backlog] = []
        self._merged: Optional[Backlog] = None

    def take(self, part: Backlog) -> None:
        """Add ``part`` (whose owner then starts a new backlog) unless it is here already."""
        if part and not any(p is part for p in self.parts):
            self.parts.append(part)

    def merged(self) -> Backlog:
        """One backlog of every part, in order. Its segments are the parts'
        (no byte is copied: the parts are never used again), and its positions
        are the last part's (usually the largest), so only the others' record
        ends are shifted. A retry gets the same backlog again: two never share segments."""
        if self._merged is not None:
            return self._merged
        self._merged = out = Backlog()
        if not self.parts:
            return out
        out.start = max(0, self.parts[-1].start - sum(len(p) for p in self.parts[:-1]))
        for part in self.parts:
            shift = out.end - part.start
            out._segments.extend(s for s in part._segments if s)
            out._recount()
            out._add_ends(part, shift)
        out._segments.append(bytearray())
        out._recount()
        return out
