"""A stdlib :mod:`logging` handler that appends records through an offlog server.

Theory of operation
-------------------
The handler only adapts. The :class:`logging.Logger` machinery filters the
record and the handler's :class:`logging.Formatter` turns it into text;
``emit`` adds the terminator, encodes UTF-8 and hands the bytes to a
:class:`~offlog.client.ProxyFile`, whose ``write`` never blocks and keeps each
record whole in the file. Nothing is buffered here, so nothing can be lost
here: ``flush`` hands everything over without waiting for the disk (as a
stream's flush does), ``sync`` waits until the server has written every
record emitted so far, and ``close`` (which :func:`logging.shutdown` calls
at interpreter exit) is a barrier too: it closes the ProxyFile, which waits
for the server's confirmation. Errors follow stdlib semantics: a record
that cannot be handed over goes to :meth:`logging.Handler.handleError`
(printed to stderr while ``logging.raiseExceptions`` is true), never up into
the code that logged it. ``emit`` runs under the handler's lock (taken by
``Handler.handle``), as do ``flush`` and ``close``; ``sync`` does not take
it, so records go on while it waits.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Union

from .client import DEFAULT_SOCK_PATH, DEFAULT_TIMEOUT, ProxyFile


class OfflogHandler(logging.Handler):
    """Append formatted records to ``filepath`` through the offlog server at ``sock_path``.

    ``timeout`` is in milliseconds, as for :class:`~offlog.client.ProxyFile`;
    ``proxy_options`` (``shm=``, ``fsync=``, ``server_uid=``, ...) are passed on to it. The server
    is connected to here, so a missing server or an unwritable file raises now
    (from :func:`logging.config.dictConfig`: as its ``ValueError``).
    """

    terminator = "\n"

    def __init__(
        self,
        filepath: Union[str, bytes, "os.PathLike[str]"],
        sock_path: str = DEFAULT_SOCK_PATH,
        timeout: Optional[float] = DEFAULT_TIMEOUT,
        level: Union[int, str] = logging.NOTSET,
        **proxy_options: Any,
    ) -> None:
        # Connect first: a handler that failed to open is never registered
        # with logging, so logging.shutdown() never meets a half-made one.
        self._file = ProxyFile(filepath, sock_path, timeout, **proxy_options)
        super().__init__(level)

    @property
    def filepath(self) -> str:
        return self._file.filepath

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record) + self.terminator
            self._file.write(msg.encode("utf-8"))
        except RecursionError:  # as logging.StreamHandler does
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        """Hand every record emitted so far over to the server; never waits for
        the disk (stdlib logging may call this after every record)."""
        with self.lock:
            if not self._file.closed:
                self._file.flush()

    def sync(self, timeout: Optional[float] = None) -> None:
        """Return once the server has written every record emitted so far
        (``timeout`` in milliseconds, default the ProxyFile's).

        Raises the server's error or ``TimeoutError``, as ``close`` does
        (:func:`logging.shutdown` ignores both; offlog's own exit hook then
        prints what went wrong).
        """
        if not self._file.closed:
            self._file.sync(timeout)

    def close(self) -> None:
        """Flush and close the ProxyFile, raising what went wrong; idempotent."""
        with self.lock:
            try:
                self._file.close()
            finally:
                super().close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._file.filepath} ({logging.getLevelName(self.level)})>"
