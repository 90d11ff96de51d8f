"""offlog: a non-blocking file-append service.

Applications hand their bytes to a local offlog server, which owns the files
and does the blocking I/O. ``ProxyFile`` is the file-like client,
``Logger`` a small logger on top of it.
"""

from .client import DEFAULT_SOCK_PATH, DEFAULT_TIMEOUT, FileProxy, ProxyFile, ShmUnavailableError
from .handler import OfflogHandler
from .logger import CRITICAL, DEBUG, ERROR, INFO, WARNING, Logger

__version__ = "1.0.0.dev0"

__all__ = [
    "ProxyFile",
    "FileProxy",
    "Logger",
    "OfflogHandler",
    "ShmUnavailableError",
    "DEBUG",
    "INFO",
    "WARNING",
    "ERROR",
    "CRITICAL",
    "DEFAULT_SOCK_PATH",
    "DEFAULT_TIMEOUT",
]
