"""Sleeping rings' doorbells: a few waiter threads watch many rings with futex_waitv.

Real sealed memfd rings, a real producer (:class:`~offlog.shm.ClientRing`) posting the
real ``sem_t``, real futex system calls; producer and consumer share this process,
which the kernel cannot tell from two (the futexes are the shared kind).
"""

from __future__ import annotations

import os
import threading
from typing import List

import pytest
from support import wait_for

from offlog.shm import ClientRing, ServerRing, layout
from offlog.shm.doorbells import GROUP, Doorbells, waitv_available

pytestmark = pytest.mark.skipif(
    not waitv_available() or not hasattr(os, "memfd_create"), reason="futex_waitv (Linux 5.16) or memfd missing"
)

CAPACITY = 64 * 1024


class Pair:
    """A server ring and the client ring mapped from its descriptor."""

    def __init__(self) -> None:
        self.server = ServerRing(CAPACITY)
        self.client = ClientRing(CAPACITY, self.server.fd, on_failed=lambda code: pytest.fail(f"failed: {code}"))
        self.server.close_fd()
        self.rung = 0
        self.lock = threading.Lock()

    def on_rung(self) -> None:
        with self.lock:
            self.rung += 1

    def state(self) -> int:
        return self.server.consumer._words[layout.STATE_WORD]

    def close(self) -> None:
        self.client.close()
        self.server.close()


@pytest.fixture
def doorbells():
    warnings: List[str] = []
    bells = Doorbells(warnings.append)
    yield bells
    bells.close()
    assert warnings == []


@pytest.fixture
def pairs():
    made: List[Pair] = []

    def make(n: int) -> List[Pair]:
        new = [Pair() for _ in range(n)]
        made.extend(new)
        return new

    yield make
    for pair in made:
        pair.close()


def test_a_write_to_a_sleeping_ring_rings_once_and_wakes_it(doorbells, pairs):
    """The ring sleeps (STATE SLEEPING): its client's write posts the doorbell, the waiter
    calls rung once, and the ring is awake again, so later writes post nothing."""
    [pair] = pairs(1)
    assert doorbells.sleep(pair.server, pair.on_rung)
    wait_for(lambda: pair.state() == layout.SLEEPING, what="the ring to fall asleep")
    pair.client.producer.write(b"wake up\n")
    wait_for(lambda: pair.rung == 1, what="the doorbell")
    assert pair.state() == layout.AWAKE
    assert doorbells.sleeping() == 0
    for _ in range(1000):
        pair.client.producer.write(b"x")
    assert pair.rung == 1


def test_a_ring_with_bytes_when_it_falls_asleep_rings_at_once(doorbells, pairs):
    """Bytes published before the ring fell asleep (no post for them: it was awake) are
    found by the re-read of HEAD, the store-buffer case of the sleep handshake."""
    [pair] = pairs(1)
    pair.client.producer.write(b"already there\n")
    assert doorbells.sleep(pair.server, pair.on_rung)
    wait_for(lambda: pair.rung == 1, what="the re-read of HEAD")
    assert pair.state() == layout.AWAKE


def test_a_forgotten_ring_is_never_rung_again(doorbells, pairs):
    [pair] = pairs(1)
    assert doorbells.sleep(pair.server, pair.on_rung)
    wait_for(lambda: pair.state() == layout.SLEEPING, what="the ring to fall asleep")
    doorbells.forget(pair.server)
    assert pair.state() == layout.AWAKE and doorbells.sleeping() == 0
    pair.client.producer.write(b"nobody listens\n")
    pair.client.post()  # and a post for good measure
    other = pairs(1)[0]  # a wake of the same waiter proves it has re-armed without the forgotten ring
    assert doorbells.sleep(other.server, other.on_rung)
    other.client.producer.write(b"me\n")
    wait_for(lambda: other.rung == 1, what="the other ring's doorbell")
    assert pair.rung == 0


def test_hundreds_of_rings_take_a_waiter_per_group_and_each_rings_once(doorbells, pairs):
    """300 sleeping rings cost ceil(300 / GROUP) threads; each write rings its own ring, once."""
    many = pairs(300)
    for pair in many:
        assert doorbells.sleep(pair.server, pair.on_rung)
    assert doorbells.threads() == -(-300 // GROUP)
    wait_for(lambda: all(p.state() == layout.SLEEPING for p in many), what="every ring to fall asleep")
    for pair in many[::7]:
        pair.client.producer.write(b"one\n")
    wait_for(lambda: sum(p.rung for p in many) == len(many[::7]), what="every written ring to ring")
    assert [p.rung for p in many] == [1 if i % 7 == 0 else 0 for i in range(300)]
    assert doorbells.sleeping() == 300 - len(many[::7])


def test_a_client_spamming_its_doorbell_costs_one_wake_per_sleep(doorbells, pairs):
    """100,000 posts (the client can post as often as it likes) wake the waiter once: the
    ring is then awake and nothing waits on its semaphore until it sleeps again."""
    [pair] = pairs(1)
    assert doorbells.sleep(pair.server, pair.on_rung)
    wait_for(lambda: pair.state() == layout.SLEEPING, what="the ring to fall asleep")
    for _ in range(100_000):
        pair.client.post()
    wait_for(lambda: pair.rung == 1, what="the doorbell")
    assert doorbells.sleeping() == 0
    for _ in range(100_000):
        pair.client.post()
    assert pair.rung == 1
    # Posts made while awake are one piece of news at the next sleep (one wake), then taken:
    assert doorbells.sleep(pair.server, pair.on_rung)
    wait_for(lambda: pair.rung == 2, what="the posts made while awake")
    assert doorbells.sleep(pair.server, pair.on_rung)
    wait_for(lambda: pair.state() == layout.SLEEPING, what="the ring to fall asleep for good")
    assert pair.rung == 2 and doorbells.sleeping() == 1


def test_a_client_that_scribbles_over_its_doorbell_costs_the_server_nothing_but_a_wake(doorbells, pairs):
    """A client may write anything into the semaphore's words: the waiter's own futex
    calls (flags of its own) survive it, and the server is woken at most once."""
    [pair] = pairs(1)
    bell = pair.client.producer._words.obj  # the client's own mapping, as a hostile client has it
    assert doorbells.sleep(pair.server, pair.on_rung)
    wait_for(lambda: pair.state() == layout.SLEEPING, what="the ring to fall asleep")
    raw = memoryview(bell).cast("B")
    raw[layout.DOORBELL_OFFSET : layout.DOORBELL_OFFSET + layout.SEM_SIZE] = b"\xff" * layout.SEM_SIZE
    wait_for(lambda: pair.rung == 1, what="the scribbled value to count as news")
    assert doorbells.sleeping() == 0


def test_a_ring_closed_while_it_sleeps_costs_its_waiter_nothing(doorbells, pairs):
    """Closing a sleeping ring without forgetting it first is a mistake of the caller; the
    waiter drops that ring (once, calling its rung so its owner can tell) and goes on
    watching the others instead of dying with them."""
    closed, other = pairs(2)
    assert doorbells.sleep(closed.server, closed.on_rung)
    assert doorbells.sleep(other.server, other.on_rung)
    wait_for(lambda: other.state() == layout.SLEEPING, what="the rings to fall asleep")
    closed.server.close()
    other.client.producer.write(b"still watched\n")
    wait_for(lambda: other.rung == 1, what="the other ring's doorbell")
    wait_for(lambda: doorbells.sleeping() == 0, what="the closed ring to be let go")
    assert closed.rung == 1
