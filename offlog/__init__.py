"""offlog: a non-blocking file-append service.

Applications hand their bytes to a local offlog server, which owns the files
and does the blocking I/O. ``ProxyFile`` is the file-like client,
``Logger`` a small logger on top of it.

The names below load their modules on first use, so a process that imports
only the server (``offlog.server``) never loads the client stack.

``__with_speedups__`` says whether the ring producer's hot path runs in C
(``offlog._speedups``, built by the install where a compiler exists) or in
pure Python (no compiler then, or ``OFFLOG_PUREPYTHON=1`` in the environment).
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any, List

__version__ = "1.0.0.dev0"


def _speedups_usable() -> bool:
    if os.environ.get("OFFLOG_PUREPYTHON", "") not in ("", "0"):
        return False
    try:
        from . import _speedups  # noqa: F401
    except ImportError:
        return False
    return True


__with_speedups__ = _speedups_usable()

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
