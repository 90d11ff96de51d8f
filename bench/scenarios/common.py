"""Helpers the scenarios share: scheduling, progress lines, checking the bytes arrived."""

from __future__ import annotations

import os
import time
from array import array
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TypeVar

from ..config import Config
from ..procs import Measured

T = TypeVar("T")
_START = time.monotonic()


def progress(message: str) -> None:
    """One progress line, with the seconds since the run started."""
    print(f"[bench {time.monotonic() - _START:6.1f}s] {message}", flush=True)


def rotated(items: Sequence[T], by: int) -> List[T]:
    """``items`` starting at position ``by``: each round starts with another system."""
    k = by % len(items) if items else 0
    return list(items[k:]) + list(items[:k])


def split(items: Sequence[T], parts: int) -> List[List[T]]:
    """``items`` in ``parts`` runs of nearly equal length (every ``parts``-th item)."""
    return [list(items[i::parts]) for i in range(parts)]


def transports_text(counts: Dict[str, int]) -> str:
    """How many clients got which transport: ``{"shm": 256, "socket": 768}`` as ``256 shm + 768 socket``."""
    return " + ".join(f"{n:,} {name}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def ring_room(kind: Optional[str], clients: int, cfg: Config) -> List[str]:
    """Flags for a server of ``kind`` that let every one of ``clients`` have a ring (the default
    --max-ring-memory, 1 GiB, holds 256 rings of 4 MiB; a ring client past it would get the socket)."""
    return ["--max-ring-memory", str(clients * cfg.ring_memory_per_client)] if kind == "shm" else []


def read_ns(path: str) -> array:
    """A worker's per-call figures (``array('q')``, nanoseconds)."""
    values = array("q")
    with open(path, "rb") as f:
        values.frombytes(f.read())
    return values


def count_lines(path: Path) -> int:
    count = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            count += chunk.count(b"\n")
    return count


def expect_lines(path: Path, lines: int) -> None:
    """The file has exactly ``lines`` lines: every record arrived, none twice."""
    found = count_lines(path)
    if found != lines:
        raise AssertionError(f"{path}: {found} lines, expected {lines}")


def expect_size(path: Path, size: int) -> None:
    found = os.path.getsize(path)
    if found != size:
        raise AssertionError(f"{path}: {found} bytes, expected {size}")


def remove(*paths: os.PathLike) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def rates(measured: Measured, records: int, size: int) -> Dict[str, Any]:
    """Throughput of a bulk run: from the first client's start to the last client's sync point."""
    results = measured.results
    seconds = (max(r["end_ns"] for r in results) - min(r["start_ns"] for r in results)) / 1e9
    cpu = measured.server_cpu_s
    return {
        "seconds": seconds,
        "records_per_s": records / seconds,
        "bytes_per_s": records * size / seconds,
        "server_cpu_us_per_record": None if cpu is None else cpu * 1e6 / records,
        "transports": sorted({t for r in results for t in r["transports"]}),
    }


def median_run(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The run with the median records/s (its other figures go with it)."""
    ordered = sorted(runs, key=lambda run: run["records_per_s"])
    return ordered[(len(ordered) - 1) // 2]
