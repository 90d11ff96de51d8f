"""Per-call micro benchmarks with pytest-benchmark: ``pytest bench/ --benchmark-only``.

What: the caller's cost of one call, in this process: ``write`` of a 100 B
record (offlog ProxyFile over shm and over the socket, a plain file with
write + flush) and ``info`` of a 60-character message with two args (offlog
Logger over shm, stdlib logging with a FileHandler, stdlib QueueHandler);
and the producer's doorbell post (``sem_post`` on a ring's semaphore through
ctypes, nobody waiting), which a write pays only when the consumer sleeps.
Tests are grouped so pytest-benchmark's table compares like with like.

How: each test opens its system through :data:`bench.worker.SYSTEMS` (the
code the ``python -m bench`` workers run), benchmarks ``sink.call``, then
syncs and checks that the file holds whole records. offlog 0.3.1 is absent:
its package is also named ``offlog`` and cannot be imported next to this
one; ``python -m bench`` measures it in separate processes. These files are
outside the project's ``testpaths`` (``tests/``), so the test suite never
collects them.
"""

from __future__ import annotations

import os

import pytest

from bench.worker import LOG_ARGS, LOG_MESSAGE, record
from offlog.shm import ClientRing, ServerRing

RECORD = record(100)


@pytest.mark.benchmark(group="write(100 B record)")
@pytest.mark.parametrize("system", ["offlog-shm", "offlog-socket", "plain-file"])
def test_write(benchmark, open_sink, system: str) -> None:
    sink, target = open_sink(system)
    benchmark(sink.call, RECORD)
    sink.sync()
    size = os.path.getsize(target)
    assert size > 0 and size % len(RECORD) == 0


@pytest.mark.benchmark(group="info(60-char message, 2 args)")
@pytest.mark.parametrize("system", ["offlog-logger-shm", "offlog-handler-shm", "logging-file", "logging-queue"])
def test_info(benchmark, open_sink, system: str) -> None:
    sink, target = open_sink(system)
    benchmark(sink.call, LOG_MESSAGE, *LOG_ARGS)
    sink.sync()
    with open(target, "rb") as f:
        lines = f.read().splitlines()
    assert lines and all(line.endswith(LOG_MESSAGE.encode() % (b"foo", 7)) for line in lines)


@pytest.mark.benchmark(group="doorbell post")
def test_doorbell_post(benchmark) -> None:
    server = ServerRing(1 << 16)
    client = ClientRing(1 << 16, server.fd, on_failed=lambda code: None)
    server.close_fd()
    try:
        benchmark(client.post)
        assert server._take_doorbell(0), "the posts reached the server's side"
    finally:
        client.close()
        server.close()
