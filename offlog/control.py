"""Control requests to a running server: ``offlog reopen``.

Theory of operation
-------------------
A control request is a connection whose first frame is a request instead of
OPEN: the client sends the framed preamble and the request, the server does
the work, answers with one frame and closes. Nothing else travels on such a
connection, so the client simply reads until the server closes and then
looks at what it got (docs/protocol.md, 5.5).

:func:`request_reopen` sends REOPEN: the server reopens every file it holds
(the routine SIGHUP runs) and answers REOPENED only when that is done, so
logrotate's ``postrotate`` can run ``offlog reopen`` and know that no byte
goes to the rotated files any more once it returns.
"""

from __future__ import annotations

import select
import socket
from typing import Optional

from . import protocol as P
from .transports import DEFAULT_SOCK_PATH, Deadline, connect

#: Milliseconds ``offlog reopen`` waits for the answer by default (the server
#: waits up to 5 s for each file that is busy writing).
REOPEN_TIMEOUT = 60_000


def request_reopen(sock_path: str = DEFAULT_SOCK_PATH, timeout: Optional[float] = REOPEN_TIMEOUT) -> dict:
    """Ask the server at ``sock_path`` to reopen every file; return once it has.

    Returns the REOPENED document, ``{"reopened": [path, ...], "failed":
    [{"path": ..., "error": "<ExceptionClass>: <message>"}, ...]}``. Raises
    the server's error if it sent one, ``TimeoutError`` after ``timeout``
    milliseconds (None: no limit), :class:`~offlog.protocol.ProtocolError`
    if the server does not take reopen requests (offlog 0.x).
    """
    deadline = Deadline(timeout)
    sock = connect(sock_path, deadline)
    try:
        sock.setblocking(True)
        sock.sendall(P.CLIENT_PREAMBLE + P.frame(P.REOPEN))
        reply = _read_to_eof(sock, deadline)
    finally:
        sock.close()
    if not reply.startswith(P.SERVER_PREAMBLE):
        raise P.ProtocolError("the server at this socket does not take reopen requests (offlog 0.x?)")
    for f in P.FrameReader(P.SERVER_FRAMES).feed(reply[len(P.SERVER_PREAMBLE) :]):
        if f.type == P.ERROR:
            raise P.decode_error(f.payload)
        if f.type == P.REOPENED:
            return P.decode_reopened(f.payload)
    raise EOFError("the offlog server closed the connection without answering the reopen request")


def _read_to_eof(sock: socket.socket, deadline: Deadline) -> bytes:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    data = b""
    while True:
        left = deadline.left()
        if not poller.poll(None if left is None else left * 1000.0):
            deadline.left()  # raises TimeoutError once the deadline has passed
            continue
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return data
        data += chunk
