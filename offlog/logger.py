"""``offlog.Logger``: the line logger whose file goes through an offlog server.

Theory of operation
-------------------
:class:`Logger` is a :class:`~offlog.loglines.LineLogger` (which formats the
lines and writes them; its header explains the cost of a call) with a file
of its own making: a :class:`~offlog.client.ProxyFile` by default, or a plain
local file with ``local_file=True``. Only this module ties the logger to the
client; the server logs through ``LineLogger`` alone.
"""

from __future__ import annotations

from typing import Optional

from .client import DEFAULT_SOCK_PATH, DEFAULT_TIMEOUT, ProxyFile
from .loglines import CRITICAL, DEBUG, ERROR, INFO, WARNING, LineLogger
from .trust import ServerUid

__all__ = ["Logger", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class Logger(LineLogger):
    """Log to a file (through an offlog server by default), stdout and stderr.

    ``offlog_socket_path``, ``offlog_timeout`` and ``offlog_server_uid`` are the
    ProxyFile's ``sock_path``, ``timeout`` and ``server_uid``."""

    def __init__(
        self,
        name: Optional[str] = None,
        filepath: Optional[str] = None,
        file_level: Optional[int] = DEBUG,
        stdout_level: Optional[int] = INFO,
        stderr_level: Optional[int] = WARNING,
        local_file: bool = False,
        offlog_socket_path: str = DEFAULT_SOCK_PATH,
        offlog_timeout: int = DEFAULT_TIMEOUT,
        offlog_server_uid: ServerUid = None,
    ) -> None:
        file = None
        if filepath is not None and file_level is not None:
            if local_file:
                file = open(filepath, "ab", buffering=0)
            else:
                file = ProxyFile(filepath, offlog_socket_path, offlog_timeout, server_uid=offlog_server_uid)
        super().__init__(name, file, file_level, stdout_level, stderr_level)

    def sync(self, timeout: Optional[float] = None) -> None:
        """Return once the file has every line logged so far (``timeout`` in
        milliseconds, default the ProxyFile's)."""
        self.flush()
        if isinstance(self._file, ProxyFile):
            self._file.sync(timeout)
