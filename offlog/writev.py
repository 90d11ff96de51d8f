"""Writing buffers whole to a descriptor: the server's one ``writev`` loop.

Theory of operation
-------------------
:func:`write_whole` writes its parts back to back, one ``writev`` per
``IOV_MAX`` parts, and finishes a partial write (a pipe, a FIFO, a disk
filling up) in order before it returns, so no one else's bytes can land in
the middle. It never undoes anything: an error raises the ``OSError`` with
``characters_written`` set to how many bytes of the parts were already
written, and the caller, who holds the file's lock, cuts them off
(:meth:`offlog.files.OpenFile.append` and ``append_ring``). The ring
consumer's drain (:meth:`offlog.shm.ring.Consumer.drain`) writes its one or
two pieces through it; its C twin in ``offlog/_speedups.c`` does the same
steps.
"""

from __future__ import annotations

import os
from typing import List, Sequence

from .backlog import Buffer

#: Most iovecs one writev takes (IOV_MAX on Linux is 1024).
IOV_MAX = 1024


def write_whole(fd: int, parts: Sequence[Buffer]) -> int:
    """Write ``parts`` back to back to ``fd``; return the bytes written (all of them).

    ``parts`` are bytes or one-dimensional byte views (``len`` is their size),
    so the common case does no per-part work in Python. An OSError carries in
    ``characters_written`` the bytes of ``parts`` written before it.
    """
    chunks = (parts,) if len(parts) <= IOV_MAX else [parts[i : i + IOV_MAX] for i in range(0, len(parts), IOV_MAX)]
    total = 0
    try:
        for chunk in chunks:
            start = total
            want = start + sum(map(len, chunk))
            total += os.writev(fd, chunk)
            while total < want:
                total += os.writev(fd, _after(chunk, total - start))
    except OSError as exc:
        exc.characters_written = total
        raise
    return total


def _after(chunk: Sequence[Buffer], skip: int) -> List[memoryview]:
    """The views of ``chunk`` after its first ``skip`` bytes."""
    views: List[memoryview] = []
    for part in chunk:
        view = memoryview(part).cast("B")
        if skip >= view.nbytes:
            skip -= view.nbytes
            continue
        views.append(view[skip:])
        skip = 0
    return views
