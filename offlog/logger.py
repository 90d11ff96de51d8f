"""A small, fast logger: formats a line and hands it to a file, stdout, stderr.

Theory of operation
-------------------
``Logger`` only formats; the file is a :class:`~offlog.client.ProxyFile`
(or a plain local file) and knows nothing of levels or lines. The line is
``[YYYY-mm-dd HH:MM:SS.mmm name LEVEL] message`` plus the traceback when
``exc_info`` asks for one. The date and time up to the second are formatted
once per second and reused, so a call costs one ``time.time()``, one
f-string and the file's ``write``.
"""

from __future__ import annotations

import sys
import time
import traceback
from typing import Any, Optional, Union

from .client import DEFAULT_SOCK_PATH, DEFAULT_TIMEOUT, ProxyFile

DEBUG = 10
INFO = 20
WARNING = 30
ERROR = 40
CRITICAL = 50

LEVEL_NAMES = {DEBUG: "DEBUG", INFO: "INFO", WARNING: "WARNING", ERROR: "ERROR", CRITICAL: "CRITICAL"}


def level_name(level: int) -> str:
    return LEVEL_NAMES.get(level) or f"Level {level}"


class Logger:
    """Log to a file (through an offlog server by default), stdout and stderr."""

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
    ) -> None:
        self.name = name
        self.file_level = file_level
        self.stdout_level = stdout_level
        self.stderr_level = stderr_level
        self._prefix = f" {name} " if name is not None else " "
        self._second = -1
        self._second_text = ""
        self._file: Any = None
        if filepath is not None and file_level is not None:
            if local_file:
                self._file = open(filepath, "ab", buffering=0)
            else:
                self._file = ProxyFile(filepath, offlog_socket_path, offlog_timeout)
        # The lowest level anything is written at: calls below it return at once.
        levels = [lvl for lvl in (file_level if self._file else None, stdout_level, stderr_level) if lvl is not None]
        self._floor = min(levels) if levels else None

    def format(self, level: int, msg: str, *args: Any, exc_info: Any = False) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        if args:
            msg = msg % args
        line = f"[{self._second_text}.{int((now - second) * 1000):03d}{self._prefix}{level_name(level)}] {msg}\n"
        if exc_info:
            line += _format_exc(exc_info)
        return line

    def log(self, level: int, msg: str, *args: Any, exc_info: Any = False) -> None:
        if self._floor is None or level < self._floor:
            return
        line = self.format(level, msg, *args, exc_info=exc_info)
        if self._file is not None and level >= self.file_level:
            self._file.write(line.encode("utf-8"))
        if self.stderr_level is not None and level >= self.stderr_level:
            _emit(sys.stderr, line)
        elif self.stdout_level is not None and level >= self.stdout_level:
            _emit(sys.stdout, line)

    def debug(self, msg: str, *args: Any, exc_info: Any = False) -> None:
        self.log(DEBUG, msg, *args, exc_info=exc_info)

    def info(self, msg: str, *args: Any, exc_info: Any = False) -> None:
        self.log(INFO, msg, *args, exc_info=exc_info)

    def warning(self, msg: str, *args: Any, exc_info: Any = False) -> None:
        self.log(WARNING, msg, *args, exc_info=exc_info)

    def error(self, msg: str, *args: Any, exc_info: Any = False) -> None:
        self.log(ERROR, msg, *args, exc_info=exc_info)

    def exception(self, msg: str, *args: Any, exc_info: Any = True) -> None:
        self.log(ERROR, msg, *args, exc_info=exc_info)

    def critical(self, msg: str, *args: Any, exc_info: Any = False) -> None:
        self.log(CRITICAL, msg, *args, exc_info=exc_info)

    def flush(self, timeout: Optional[int] = None) -> None:
        """Return once the file has every line logged so far."""
        if isinstance(self._file, ProxyFile):
            self._file.flush(timeout)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()

    def close(self) -> None:
        """Close the file. Possibly blocking. Idempotent."""
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def __enter__(self) -> "Logger":
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
