"""Fixtures of the micro benchmarks (:mod:`bench.test_micro`).

``offlog_server``: one ``python -m offlog --shm`` subprocess for the whole
module, on its own socket in a temporary directory, ended by pid afterwards
(:class:`bench.procs.Lab`). ``open_sink``: opens a system's client in this
process, as the ``python -m bench`` workers do, and closes it after the test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import pytest

from bench.procs import Lab, Server
from bench.worker import SYSTEMS, Sink


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


@pytest.fixture(scope="module")
def offlog_server(lab: Lab) -> Server:
    """Our server with rings offered; socket clients use it too (they ask for no ring)."""
    return lab.server("shm")


@pytest.fixture
def open_sink(lab: Lab, offlog_server: Server) -> Iterator[Callable[[str], Tuple[Sink, Path]]]:
    opened: List[Sink] = []

    def open_(system: str) -> Tuple[Sink, Path]:
        target = lab.path(f"{system}.log")
        sink = SYSTEMS[system].open(str(target), offlog_server.sock)
        opened.append(sink)
        return sink, target

    yield open_
    for sink in opened:
        sink.close()
