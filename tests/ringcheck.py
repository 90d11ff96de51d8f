"""Stress harness for the ring: a producer process, a consumer here, every byte checked.

The producer (a forked child) writes a deterministic stream of variable-length
records; the consumer regenerates the same stream and compares every byte it
takes from the ring. A position read torn or early shows up as
``RingCorrupt`` (a head outside [tail, tail + capacity]) or as a byte mismatch.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from typing import Type

from offlog.shm import layout
from offlog.shm.ring import Consumer, Producer

PATTERN = bytes(range(256)) * 3
RECORD_HEADER = struct.Struct("<IH")


def record(i: int) -> bytes:
    n = (i * 7919) % 300 + 1
    start = i % 251
    return RECORD_HEADER.pack(i & 0xFFFFFFFF, n) + PATTERN[start : start + n]


def _produce(producer_cls: Type[Producer], mapping: mmap.mmap, capacity: int, records: int) -> None:
    producer = producer_cls(mapping, capacity, lambda: None, lambda code: None)
    for i in range(records):
        producer.write(record(i))
        while producer.backlog_bytes:
            producer.pump()


def run(producer_cls: Type[Producer], records: int, capacity: int = 1 << 16, timeout: float = 120.0) -> int:
    """Push ``records`` through a ring; return bytes verified. Raises on any corruption."""
    mapping = mmap.mmap(-1, layout.mapping_size(capacity))  # MAP_SHARED: the child sees it
    consumer = Consumer(mapping, capacity)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            _produce(producer_cls, mapping, capacity, records)
            status = 0
        finally:
            os._exit(status)
    try:
        verified = _consume_and_check(consumer, records, pid, timeout)
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass  # reaped already: the consumer saw it exit while its last bytes were on their way
        else:
            os.waitpid(pid, 0)
    consumer.close()
    mapping.close()
    return verified


def _consume_and_check(consumer: Consumer, records: int, pid: int, timeout: float) -> int:
    expected = bytearray()
    next_record = 0
    verified = 0
    deadline = time.monotonic() + timeout
    while next_record < records or expected:
        head = consumer.available()  # raises RingCorrupt on a torn or impossible head
        if head == consumer.tail:
            if time.monotonic() > deadline:
                raise TimeoutError(f"ring stalled after {verified} bytes")
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done and consumer.available() == consumer.tail:
                raise AssertionError(f"producer exited with {verified} bytes verified and more expected")
            continue
        for view in consumer.views(head):
            n = view.nbytes
            while len(expected) < n:
                expected += record(next_record)
                next_record += 1
            if view != expected[:n]:
                raise AssertionError(f"byte mismatch within bytes {verified}..{verified + n}")
            del expected[:n]
            verified += n
        consumer.release(head)
    return verified
