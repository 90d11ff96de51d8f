"""offlog: a non-blocking file-append service.

Applications hand their bytes to a local offlog server, which owns the files
and does the blocking I/O. ``ProxyFile`` is the file-like client,
``Logger`` a small logger on top of it.

The names below load their modules on first use, so a process that imports
only the server (``offlog.server``) never loads the client stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, List

__version__ = "1.0.0.dev0"

#: Each public name and the module that defines it.
_HOMES = {
    "ProxyFile": "client",
    "FileProxy": "client",
    "ShmUnavailableError": "client",
    "UntrustedServerError": "client",
    "DEFAULT_SOCK_PATH": "client",
    "DEFAULT_TIMEOUT": "client",
    "Logger": "logger",
    "OfflogHandler": "handler",
    "DEBUG": "loglines",
    "INFO": "loglines",
    "WARNING": "loglines",
    "ERROR": "loglines",
    "CRITICAL": "loglines",
}

__all__ = [
    "ProxyFile",
    "FileProxy",
    "Logger",
    "OfflogHandler",
    "ShmUnavailableError",
    "UntrustedServerError",
    "DEBUG",
    "INFO",
    "WARNING",
    "ERROR",
    "CRITICAL",
    "DEFAULT_SOCK_PATH",
    "DEFAULT_TIMEOUT",
]

if TYPE_CHECKING:
    from .client import (
        DEFAULT_SOCK_PATH,
        DEFAULT_TIMEOUT,
        FileProxy,
        ProxyFile,
        ShmUnavailableError,
        UntrustedServerError,
    )
    from .handler import OfflogHandler
    from .logger import Logger
    from .loglines import CRITICAL, DEBUG, ERROR, INFO, WARNING


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'offlog' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
