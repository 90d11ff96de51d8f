"""A small, fast logger: formats a line and hands it to a file, stdout, stderr.

Theory of operation
-------------------
:class:`LineLogger` only formats; its file is any object with ``write(bytes)``
(a local file, or the :class:`~offlog.client.ProxyFile` that
:class:`offlog.Logger` adds) and knows nothing of levels or lines. The line
is ``[YYYY-mm-dd HH:MM:SS.mmm name LEVEL] message`` plus the traceback when
``exc_info`` asks for one. This module imports no client code: the server
logs through it without loading the client stack.

Cost. A call below every enabled level is one comparison. Otherwise the
timestamp is formatted at most once per millisecond (the date and time up to
the second once per second) and reused; the `` name LEVEL] `` part is made
once per level; so a call is ``time.time()``, ``msg % args``, one f-string,
one ``encode`` and the file's ``write`` (a copy into the ring with ``--shm``).
Disabled outputs are stored as an infinite level, so the checks are plain
comparisons with no ``None`` tests.
"""

from __future__ import annotations

import sys
import time
import traceback
from typing import Any, Dict, Optional, TypeVar, Union

DEBUG = 10
INFO = 20
WARNING = 30
ERROR = 40
CRITICAL = 50

LEVEL_NAMES = {DEBUG: "DEBUG", INFO: "INFO", WARNING: "WARNING", ERROR: "ERROR", CRITICAL: "CRITICAL"}
_OFF = float("inf")
_now = time.time
_Self = TypeVar("_Self", bound="LineLogger")


def level_name(level: int) -> str:
    return LEVEL_NAMES.get(level) or f"Level {level}"


class LineLogger:
    """Log to a file object (``write(bytes)``), stdout and stderr."""

    def __init__(
        self,
        name: Optional[str] = None,
        file: Any = None,
        file_level: Optional[int] = DEBUG,
        stdout_level: Optional[int] = INFO,
        stderr_level: Optional[int] = WARNING,
    ) -> None:
        self.name = name
        self.file_level = file_level
        self.stdout_level = stdout_level
        self.stderr_level = stderr_level
        self._file: Any = file if file_level is not None else None
        self._file_at = file_level if self._file is not None else _OFF
        self._stdout_at = _OFF if stdout_level is None else stdout_level
        self._stderr_at = _OFF if stderr_level is None else stderr_level
        self._floor = min(self._file_at, self._stdout_at, self._stderr_at)
        self._name = f" {name} " if name is not None else " "
        self._tags: Dict[int, str] = {}
        self._ms = -1
        self._second = -1
        self._second_text = ""
        self._stamp = ""

    def _tag(self, level: int) -> str:
        tag = self._tags.get(level)
        if tag is None:
            tag = self._tags[level] = f"{self._name}{level_name(level)}] "
        return tag

    def _timestamp(self, ms: int) -> str:
        second = ms // 1000
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        self._ms = ms
        self._stamp = f"[{self._second_text}.{ms % 1000:03d}"
        return self._stamp

    def format(self, level: int, msg: str, *args: Any, exc_info: Any = False) -> str:
        """The line for a record, as written to every output."""
        return self._format(level, msg, args, exc_info)

    def _format(self, level: int, msg: str, args: tuple, exc_info: Any) -> str:
        ms = int(_now() * 1000)
        stamp = self._stamp if ms == self._ms else self._timestamp(ms)
        if args:
            msg = msg % args
        line = f"{stamp}{self._tags.get(level) or self._tag(level)}{msg}\n"
        if exc_info:
            line += _format_exc(exc_info)
        return line

    def _emit(self, level: int, msg: str, args: tuple, exc_info: Any) -> None:
        line = self._format(level, msg, args, exc_info)
        if level >= self._file_at:
            self._file.write(line.encode("utf-8"))
        if level >= self._stderr_at:
            _emit(sys.stderr, line)
        elif level >= self._stdout_at:
            _emit(sys.stdout, line)

    def log(self, level: int, msg: str, *args: Any, exc_info: Any = False) -> None:
        if level >= self._floor:
            self._emit(level, msg, args, exc_info)

    def debug(self, msg: str, *args: Any, exc_info: Any = False) -> None:
        if DEBUG >= self._floor:
            self._emit(DEBUG, msg, args, exc_info)

    def info(self, msg: str, *args: Any, exc_info: Any = False) -> None:
        if INFO >= self._floor:
            self._emit(INFO, msg, args, exc_info)

    def warning(self, msg: str, *args: Any, exc_info: Any = False) -> None:
        if WARNING >= self._floor:
            self._emit(WARNING, msg, args, exc_info)

    def error(self, msg: str, *args: Any, exc_info: Any = False) -> None:
        if ERROR >= self._floor:
            self._emit(ERROR, msg, args, exc_info)

    def exception(self, msg: str, *args: Any, exc_info: Any = True) -> None:
        if ERROR >= self._floor:
            self._emit(ERROR, msg, args, exc_info)

    def critical(self, msg: str, *args: Any, exc_info: Any = False) -> None:
        if CRITICAL >= self._floor:
            self._emit(CRITICAL, msg, args, exc_info)

    def flush(self) -> None:
        """Hand every line logged so far over (the file and the streams); never
        waits for the disk."""
        if self._file is not None:
            self._file.flush()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()

    def close(self) -> None:
        """Close the file. Possibly blocking. Idempotent."""
        file, self._file = self._file, None
        self._file_at = _OFF
        self._floor = min(self._stdout_at, self._stderr_at)
        if file is not None:
            file.close()

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _format_exc(exc_info: Union[bool, BaseException, tuple]) -> str:
    if isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    elif not isinstance(exc_info, tuple):
        exc_info = sys.exc_info()
    if exc_info[0] is None:
        return "NoneType: None\n"
    return "".join(traceback.format_exception(*exc_info))


def _emit(stream: Any, line: str) -> None:
    if stream is not None:
        stream.write(line)
        stream.flush()
