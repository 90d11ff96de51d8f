"""Numbered, self-checking records, and the checks that they arrived.

A record is one line: ``TAG NUMBER LENGTH FILL\\n``. ``TAG`` (upper case and
digits) says who wrote it, ``NUMBER`` which of its records it is, and
``FILL`` is ``LENGTH`` copies of one lower-case letter chosen by ``NUMBER``.
A record cut short, two records spliced together, or bytes repeated inside a
record no longer match their own header, so a whole record is recognisable
anywhere in a file, even right after a fragment left by a killed server.

Child interpreters import this module too (``sys.path`` gets :data:`TESTS`),
so writers and checks share one definition of a record.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Set, Tuple

TESTS = str(Path(__file__).resolve().parent)
LETTERS = b"abcdefghijklmnopqrstuvwxyz"
HEADER = re.compile(rb"([A-Z][A-Z0-9]*) (\d{6,}) (\d{7}) ")
Key = Tuple[str, int]


def record(tag: str, n: int, size: int = 0) -> bytes:
    """Record ``n`` of writer ``tag``; ``size`` adds that many filler bytes."""
    length = n % 41 + size
    return b"%s %06d %07d %s\n" % (tag.encode(), n, length, LETTERS[n % 26 : n % 26 + 1] * length)


def _whole_at(data: bytes, match: "re.Match[bytes]") -> bool:
    n, length = int(match.group(2)), int(match.group(3))
    end = match.end() + length
    return data[end : end + 1] == b"\n" and data[match.end() : end] == LETTERS[n % 26 : n % 26 + 1] * length


def strict_lines(data: bytes) -> Tuple[Counter, List[bytes]]:
    """Each line must be exactly one record: (count of every record, the lines that are not)."""
    counts: Counter = Counter()
    bad = []
    lines = data.split(b"\n")
    if lines[-1]:
        bad.append(lines[-1])  # the file does not end with a whole record
    for line in lines[:-1]:
        match = HEADER.match(line)
        if match and match.start() == 0 and _whole_at(line + b"\n", match):
            counts[(match.group(1).decode(), int(match.group(2)))] += 1
        else:
            bad.append(line)
    return counts, bad


def whole_records(data: bytes) -> Counter:
    """Count every whole record anywhere in ``data``, fragments around them ignored."""
    counts: Counter = Counter()
    pos = 0
    while True:
        match = HEADER.search(data, pos)
        if match is None:
            return counts
        if _whole_at(data, match):
            counts[(match.group(1).decode(), int(match.group(2)))] += 1
            pos = match.end() + int(match.group(3)) + 1
        else:
            pos = match.start() + 1


def describe(keys: Iterable[Key], limit: int = 12) -> str:
    """``{'A': [3, 17, ...]}``: which records, by writer."""
    by_tag: Dict[str, List[int]] = {}
    for tag, n in sorted(keys):
        by_tag.setdefault(tag, []).append(n)
    return ", ".join(
        f"{tag}: {len(ns)} ({ns[:limit]}{' ...' if len(ns) > limit else ''})" for tag, ns in by_tag.items()
    )


def keys(tag: str, numbers: Iterable[int]) -> Set[Key]:
    return {(tag, n) for n in numbers}


def assert_exactly_once(data: bytes, expected: Set[Key]) -> None:
    """Every expected record exactly once, nothing else, no torn or garbled line."""
    counts, bad = strict_lines(data)
    assert not bad, f"{len(bad)} torn or garbled lines, the first: {bad[0][:120]!r}"
    missing = expected - counts.keys()
    assert not missing, f"{len(missing)} of {len(expected)} records lost: {describe(missing)}"
    unknown = counts.keys() - expected
    assert not unknown, f"records nobody wrote: {describe(unknown)}"
    repeated = {k for k, c in counts.items() if c > 1}
    assert not repeated, f"{len(repeated)} records delivered more than once: {describe(repeated)}"


def assert_whole_lines_at_least_once(data: bytes, expected: Set[Key], written: Set[Key]) -> None:
    """No torn or garbled line; every ``expected`` record present; nothing beyond ``written``."""
    counts, bad = strict_lines(data)
    assert not bad, f"{len(bad)} torn or garbled lines, the first: {bad[0][:120]!r}"
    missing = expected - counts.keys()
    assert not missing, f"{len(missing)} of {len(expected)} accepted records lost: {describe(missing)}"
    unknown = counts.keys() - written
    assert not unknown, f"records nobody wrote: {describe(unknown)}"


def assert_at_least_once(data: bytes, expected: Set[Key], written: Set[Key]) -> None:
    """Every ``expected`` record whole somewhere in the file (a lost server may leave
    fragments and repeats); no whole record beyond ``written``."""
    counts = whole_records(data)
    missing = expected - counts.keys()
    assert not missing, f"{len(missing)} of {len(expected)} accepted records lost: {describe(missing)}"
    unknown = counts.keys() - written
    assert not unknown, f"records nobody wrote: {describe(unknown)}"
