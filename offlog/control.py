"""Control requests to a running server: ``offlog reopen``.

Theory of operation
-------------------
A control request is a connection whose first frame is a request instead of
OPEN: the client sends the framed preamble and the request, the server does
the work, answers with one frame and closes (docs/protocol.md, 5.5): the
client's :class:`~offlog.protocol.ClientConnection` goes IDLE -> ASKING ->
REQUESTED -> CLOSED (5.7).

:func:`request_reopen` sends REOPEN: the server reopens every file it holds
(the routine SIGHUP runs) and answers REOPENED only when that is done, so
logrotate's ``postrotate`` can run ``offlog reopen`` and know that no byte
goes to the rotated files any more once it returns.
"""

from __future__ import annotations

from typing import Optional

from . import protocol as P
from .defaults import DEFAULT_SOCK_PATH, REOPEN_TIMEOUT
from .transports import request
from .trust import ServerUid, allowed_uids


def request_reopen(
    sock_path: str = DEFAULT_SOCK_PATH, timeout: Optional[float] = REOPEN_TIMEOUT, *, server_uid: ServerUid = None
) -> dict:
    """Ask the server at ``sock_path`` to reopen every file; return once it has.

    Returns the REOPENED document, ``{"reopened": [path, ...], "failed":
    [{"path": ..., "error": "<ExceptionClass>: <message>"}, ...]}``. Raises
    the server's error if it sent one, ``TimeoutError`` after ``timeout``
    milliseconds (None: no limit), :class:`~offlog.protocol.ProtocolError`
    if the server does not take control requests (offlog 0.x), and
    :class:`~offlog.trust.UntrustedServerError` if the server runs as another
    user than this process's, root or ``server_uid`` (as for a ProxyFile).
    """
    return request(sock_path, P.ReopenRequest(), timeout, allowed_uids(server_uid)).document
