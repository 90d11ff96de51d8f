"""The backlog and the write token, in-process: the two pieces every transport stands on."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from offlog import backlog as backlog_module
from offlog import token
from offlog.backlog import Backlog, Handover

records = st.lists(st.binary(min_size=1, max_size=40), max_size=30)


class Model:
    """The backlog as a plain list of the bytes of each record still (partly) in it."""

    def __init__(self) -> None:
        self.parts: list = []

    def consume(self, n: int) -> None:
        while n:
            first = self.parts[0]
            if n >= len(first):
                self.parts.pop(0)
                n -= len(first)
            else:
                self.parts[0] = first[n:]
                n = 0


@settings(max_examples=300, deadline=None)
@given(
    records,
    st.lists(st.tuples(st.sampled_from(["consume", "whole", "absorb", "append"]), st.integers(0, 200)), max_size=30),
    st.sampled_from([16, 1 << 20]),
)
def test_backlog_keeps_bytes_and_record_ends_through_any_sequence(first, steps, segment):
    saved, backlog_module.SEGMENT = backlog_module.SEGMENT, segment  # small segments: many of them
    try:
        run_steps(first, steps)
    finally:
        backlog_module.SEGMENT = saved


def run_steps(first, steps):
    backlog, model = Backlog(), Model()
    for r in first:
        backlog.append(r)
        model.parts.append(r)
    for action, n in steps:
        if action == "consume":
            n = min(n, len(backlog))
            backlog.consume(n)
            model.consume(n)
        elif action == "append":
            record = bytes([n % 256]) * (n % 37 + 1)
            backlog.append(record)
            model.parts.append(record)
        elif action == "whole":
            expected, total = 0, 0
            for part in model.parts:
                if total + len(part) > n:
                    break
                total += len(part)
                expected = total
            if backlog:  # whole records, and all of them in the first segment: view() shows them in one piece
                with backlog.view(backlog.whole(n)) as piece:
                    assert bytes(piece) == b"".join(model.parts)[: backlog.whole(n)]
                assert backlog.whole(n) <= expected
                boundaries, total = {0}, 0
                for part in model.parts:
                    total += len(part)
                    boundaries.add(total)
                assert backlog.whole(n) in boundaries  # never a record cut short
            else:
                assert backlog.whole(n) == 0
        else:  # absorb: move everything into a new backlog that already holds a record
            other = Backlog()
            other.append(b"#")
            other.absorb(backlog)
            assert not backlog
            other.consume(1)
            backlog = other
        assert len(backlog) == sum(map(len, model.parts))
        assert list(backlog.records()) == model.parts
        assert backlog.first_record() == (len(model.parts[0]) if model.parts else 0)


def test_backlog_absorb_into_an_empty_backlog_hands_the_buffer_over():
    source, target = Backlog(), Backlog()
    for r in (b"one\n", b"two\n"):
        source.append(r)
    target.absorb(source)
    assert list(target.records()) == [b"one\n", b"two\n"] and not source
    source.append(b"three\n")  # the emptied source is usable again
    assert list(source.records()) == [b"three\n"]


def test_a_handover_merges_its_parts_in_order_without_touching_them():
    parts = []
    for start, records in ((0, [b"a1", b"a2"]), (5000, [b"b1"]), (77, [b"c1", b"c22"])):
        part = Backlog()
        part.start = start
        for r in records:
            part.append(r)
        parts.append(part)
    handover = Handover()
    for part in parts + parts[:1]:  # a retry offers a part again: taken once
        handover.take(part)
    merged = handover.merged()
    assert list(merged.records()) == [b"a1", b"a2", b"b1", b"c1", b"c22"]
    assert [list(p.records()) for p in parts] == [[b"a1", b"a2"], [b"b1"], [b"c1", b"c22"]]
    merged.append(b"d1")
    assert list(merged.records())[-1] == b"d1"


def test_taking_batches_across_segments_never_skips_a_byte():
    """What the 0.x socket send and the framed pump do: whole records up to a batch, from the first
    segment only; a view past the first segment is refused, never cut short."""
    saved, backlog_module.SEGMENT = backlog_module.SEGMENT, 8
    try:
        backlog, sent = Backlog(), b""
        for r in (b"\x01" * 9, b"\x02" * 9, b"\x01", b"\x03" * 5):
            backlog.append(r)
        while backlog:
            n = backlog.whole(19) or min(backlog.first_record(), 19)
            with backlog.view(n) as piece:
                sent += bytes(piece)
            backlog.consume(n)
        assert sent == b"\x01" * 9 + b"\x02" * 9 + b"\x01" + b"\x03" * 5
        backlog.append(b"ab")
        backlog.append(b"cdefghi")  # does not fit the first segment's 8 bytes: a second segment
        try:
            backlog.view(8)
        except ValueError:
            pass
        else:
            raise AssertionError("a view reached past the first segment")
    finally:
        backlog_module.SEGMENT = saved


def test_an_unterminated_tail_becomes_a_record():
    """What an append interrupted between its two steps leaves behind is still in the backlog, as one record."""
    backlog = Backlog()
    backlog.append(b"whole\n")
    backlog._segments[-1] += b"tail"  # the first half of an interrupted append
    assert backlog.first_record() == 6 and backlog.whole(100) == 6
    backlog.repair()
    assert list(backlog.records()) == [b"whole\n", b"tail"]


class Owner:
    def __init__(self) -> None:
        self._token = token.new()

    def hold(self, inside) -> None:
        assert token.take(self._token, self, HOLDING)
        try:
            inside()
        finally:
            self._token.append(True)

    def leak(self) -> None:
        self._token.pop()  # as an interrupt right after pop() leaves it
        raise KeyboardInterrupt


HOLDING = frozenset({Owner.hold.__code__, Owner.leak.__code__})


def test_a_token_leaked_by_an_interrupt_is_put_back():
    owner = Owner()
    try:
        owner.leak()
    except KeyboardInterrupt:
        pass
    assert not owner._token
    assert token.take(owner._token, owner, HOLDING)  # nobody holds it: restored, then taken
    assert not owner._token
    owner._token.append(True)


def test_a_token_held_further_out_on_the_same_thread_is_reentry_not_a_deadlock():
    owner = Owner()
    answers = []
    owner.hold(lambda: answers.append(token.take(owner._token, owner, HOLDING)))
    assert answers == [False]
    assert list(owner._token) == [True]


def test_a_token_held_by_another_thread_is_waited_for():
    owner = Owner()
    inside, release, taken = threading.Event(), threading.Event(), []

    def holder() -> None:
        owner.hold(lambda: (inside.set(), release.wait(10)))

    thread = threading.Thread(target=holder)
    thread.start()
    inside.wait(10)
    waiter = threading.Thread(target=lambda: taken.append(token.take(owner._token, owner, HOLDING)))
    waiter.start()
    waiter.join(0.2)
    assert not taken, "took a token another thread holds"
    release.set()
    waiter.join(10)
    thread.join(10)
    assert taken == [True]
