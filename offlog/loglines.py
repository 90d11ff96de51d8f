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

Outputs that must never make the caller wait (the server's own log): the
outputs of a :class:`LineSink`, given to a LineLogger as ``file``,
``stdout`` and ``stderr``. Writing one only appends the line to the sink's
bounded queue (under a lock no I/O is done under); the sink's thread writes
the queue to the descriptors. The server has two sinks, one for stdout and
stderr (which keep their order when they go to one place), one for the
``-l`` file: a stdout nobody reads, a full disk or a closed descriptor
stalls or fails a sink's thread, never a caller, and the other sink goes
on. What cannot be queued (a sink holds ``QUEUE_BYTES``) or written
(``ENOSPC``, ``EPIPE``, ``EBADF``, ...) is counted, and the next line the
sink writes is preceded by one saying how many were lost and why. A line
equal to the one before it on its output, timestamp aside, within
``REPEAT_WINDOW`` seconds of the first of them, is written the first
``REPEATS_WRITTEN`` times and then only counted; when the window ends, one
line says how many were held back (``... (repeated 312 times)``). A flood
of one message costs a comparison per line and a few lines per window.

:func:`printable` makes a text safe for a one-line log: the server passes
every message through it, so a client's path can neither break a line nor
forge one.
"""

from __future__ import annotations

import os
import re
import select
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, TypeVar, Union

DEBUG = 10
INFO = 20
WARNING = 30
ERROR = 40
CRITICAL = 50

#: Bytes of lines a LineSink holds for its output at most; past it, lines are dropped (and counted).
QUEUE_BYTES = 1 << 20
#: Seconds during which a LineSink counts repeats of a line instead of writing them...
REPEAT_WINDOW = 10.0
#: ...once it has written this many of them in the window.
REPEATS_WRITTEN = 5
#: Seconds LineSink.close() waits for the queued lines to be written.
CLOSE_WAIT = 1.0
#: Width of the ``[YYYY-mm-dd HH:MM:SS.mmm`` that starts every line; repeats are compared after it.
STAMP_WIDTH = 24

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
        *,
        stdout: Any = None,
        stderr: Any = None,
    ) -> None:
        self.name = name
        # Outputs with write(bytes) instead of sys.stdout and sys.stderr (e.g. LineSinks).
        self._stdout: Any = stdout
        self._stderr: Any = stderr
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
        data = line.encode("utf-8", "backslashreplace")  # a lone surrogate never makes logging fail
        if level >= self._file_at:
            self._file.write(data)
        if level >= self._stderr_at:
            if self._stderr is None:
                _emit(sys.stderr, line)
            else:
                self._stderr.write(data)
        elif level >= self._stdout_at:
            if self._stdout is None:
                _emit(sys.stdout, line)
            else:
                self._stdout.write(data)

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

    @property
    def outputs(self) -> List[Any]:
        """Where the lines go: the file (if any), the stdout and stderr outputs."""
        given = [self._file, sys.stdout if self._stdout is None else self._stdout]
        given.append(sys.stderr if self._stderr is None else self._stderr)
        return [output for output in given if output is not None]

    def flush(self) -> None:
        """Hand every line logged so far over (the file and the streams); never
        waits for the disk."""
        if self._file is not None:
            self._file.flush()
        for given, stream in ((self._stdout, sys.stdout), (self._stderr, sys.stderr)):
            output = stream if given is None else given
            if output is not None:
                output.flush()

    def close(self) -> None:
        """Close the file, and the ``stdout`` and ``stderr`` outputs given to
        the constructor (not sys.stdout or sys.stderr). Possibly blocking.
        Idempotent."""
        file, self._file = self._file, None
        self._file_at = _OFF
        self._floor = min(self._stdout_at, self._stderr_at)
        if file is not None:
            file.close()
        for output in (self._stdout, self._stderr):
            if output is not None:
                output.close()

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


#: What :func:`printable` escapes: C0 and C1 controls, DEL, the Unicode line and
#: paragraph separators, lone surrogates (a byte that is not UTF-8, decoded with surrogateescape).
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: "re.Match[str]") -> str:
    char = match.group()
    code = ord(char)
    if char in _ESCAPES:
        return _ESCAPES[char]
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the byte itself
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` on one line: controls become ``\\n``, ``\\r``, ``\\t`` or
    ``\\xNN``, a byte that is not UTF-8 (a surrogateescape'd path) ``\\xNN``
    of that byte, the line separators and other lone surrogates ``\\uNNNN``.
    Everything else (a backslash too) stays as it is. Costs one regex search
    when there is nothing to escape."""
    if _UNPRINTABLE.search(text) is None:
        return text
    return _UNPRINTABLE.sub(_escape, text)


class LineSink:
    """Outputs for a :class:`LineLogger` that never make the caller wait.

    A sink is one thread, one bounded queue and any number of outputs
    (:meth:`output`: a descriptor each, e.g. stdout and stderr, which then
    keep their order when they go to one place). An output's ``write(line)``
    queues one whole line (at most ``max_bytes`` queued in all) and returns;
    the sink's thread writes the queue to the descriptors. Lines that do not
    fit, or whose write fails, are counted in :attr:`lost`; the next line
    written is preceded by one saying how many were lost and why. Lines equal
    to the previous one of their output past the timestamp, within
    ``repeat_window`` seconds of the first of them, are written
    ``REPEATS_WRITTEN`` times, then only counted (see the module header).
    ``on_trouble(text)`` is called on the sink's thread when an output's
    writes start failing, so that another sink can say so.
    ``name`` is the logger's, for the lines the sink writes itself. Outputs
    must not be written from a signal handler (the sink's lock may be held by
    the code it interrupted).
    """

    def __init__(
        self,
        name: str,
        *,
        max_bytes: int = QUEUE_BYTES,
        repeat_window: float = REPEAT_WINDOW,
        on_trouble: Optional[Callable[[str], None]] = None,
    ) -> None:
        self.name = name
        #: Lines dropped (queue full) or whose write failed, in all.
        self.lost = 0
        self._max_bytes = max_bytes
        self._repeat_window = repeat_window
        self._on_trouble = on_trouble
        self._outputs: List[SinkOutput] = []
        self._cond = threading.Condition(threading.Lock())
        self._queue: Deque[Tuple[SinkOutput, bytes]] = deque()
        self._queued = 0  # bytes in _queue
        self._unreported = 0  # lines lost since the last line written
        self._why = ""  # why the last of them was lost
        self._closing = False
        self._idle = True  # nothing queued, nothing being written
        self._thread = threading.Thread(target=self._run, name=f"log writer ({name})", daemon=True)
        self._thread.start()

    def output(self, fd: int, label: str, *, close_fd: bool = False) -> "SinkOutput":
        """An output writing to ``fd`` (``label`` names it in what the sink says;
        ``close_fd``: the sink closes ``fd`` when it is closed)."""
        output = SinkOutput(self, fd, label, close_fd)
        self._outputs.append(output)
        return output

    def close(self, timeout: float = CLOSE_WAIT) -> None:
        """Let the thread write what is queued for up to ``timeout`` seconds, then
        take no more lines. Idempotent."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._closing:
                return
            for output in self._outputs:
                self._end_repeats(output)
            while not self._idle and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            self._closing = True
            self._cond.notify_all()
            idle = self._idle
        for output in self._outputs:
            if output.close_fd and idle:  # a thread still inside a write keeps its descriptor
                try:
                    os.close(output.fd)
                except OSError:
                    pass

    # -- callers' side: a lock, never I/O ---------------------------------------------
    def _take(self, output: "SinkOutput", line: bytes) -> None:
        now = time.monotonic()
        with self._cond:
            if self._closing:
                return
            key = line[STAMP_WIDTH:]
            if key == output.last and now < output.window_ends:
                if output.run < REPEATS_WRITTEN:
                    output.run += 1
                elif not output.repeats:
                    output.repeats, output.repeat_line = 1, line
                    self._cond.notify_all()  # the writer now has a window to end
                    return
                else:
                    output.repeats += 1
                    output.repeat_line = line
                    return
            else:
                self._end_repeats(output)
                output.last, output.run = key, 1
                output.window_ends = now + self._repeat_window
            self._put(output, line)

    def _put(self, output: "SinkOutput", line: bytes) -> None:
        """Lock held: queue ``line``, or count it lost."""
        if self._queued + len(line) > self._max_bytes:
            self.lost += 1
            self._unreported += 1
            self._why = f"{output.label} is not taking lines (the queue is full)"
            return
        self._queue.append((output, line))
        self._queued += len(line)
        self._idle = False
        self._cond.notify_all()

    def _end_repeats(self, output: "SinkOutput") -> None:
        """Lock held: queue the count of ``output``'s repeats held back, if any."""
        if output.repeats:
            self._put(output, output.repeat_line.rstrip(b"\n") + b" (repeated %d times)\n" % output.repeats)
            output.repeats = 0
        output.last = b""

    # -- the writer thread ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    if self._closing:
                        return
                    self._idle = True
                    self._cond.notify_all()
                    self._cond.wait(self._repeats_due())
                batch = list(self._queue)
                self._queue.clear()
                self._queued = 0
                lost, why = self._unreported, self._why
                self._unreported = 0
            if lost:
                batch.insert(0, (batch[0][0], self._lost_line(lost, why)))
            self._write_batch(batch, lost)

    def _repeats_due(self) -> Optional[float]:
        """Lock held: queue the counts whose window has ended; seconds until the next one ends."""
        now = time.monotonic()
        wait: Optional[float] = None
        for output in self._outputs:
            if output.repeats:
                if now >= output.window_ends:
                    self._end_repeats(output)
                    return 0.0
                left = output.window_ends - now
                wait = left if wait is None else min(wait, left)
        return wait

    def _write_batch(self, batch: List[Tuple["SinkOutput", bytes]], lost: int) -> None:
        """Write ``batch`` (its first line says ``lost`` lines were lost, if ``lost``)."""
        newly_lost = 0  # lines of this batch that did not reach their output
        still_unreported = 0  # the lines the failed first line was to report
        why = ""
        for index, (output, line) in enumerate(batch):
            try:
                output.write_now(line)
            except OSError as exc:
                if index == 0 and lost:
                    still_unreported = lost
                else:
                    newly_lost += 1
                why = f"writing to {output.label} failed: {exc}"
                if not output.failing:
                    output.failing = True
                    self._trouble(f"Cannot write the log to {output.label}: {exc}; lines are counted until it works")
            else:
                output.failing = False
        if why:
            with self._cond:
                self.lost += newly_lost
                self._unreported += newly_lost + still_unreported
                self._why = why

    def _trouble(self, text: str) -> None:
        if self._on_trouble is not None:
            try:
                self._on_trouble(text)
            except Exception:
                pass  # the other outputs are in trouble too: nothing left to tell

    def _lost_line(self, count: int, why: str) -> bytes:
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        return f"[{stamp}.{int(now * 1000) % 1000:03d} {self.name} WARNING] {count} log lines lost: {why}\n".encode()


class SinkOutput:
    """One descriptor of a :class:`LineSink`: what a LineLogger writes to."""

    def __init__(self, sink: LineSink, fd: int, label: str, close_fd: bool) -> None:
        self.fd = fd
        self.label = label
        self.close_fd = close_fd
        self.failing = False  # the last write failed (the sink's thread only)
        # Repeats, under the sink's lock: the last line taken (past its timestamp), how
        # many equal ones were written and held back since, the last of them, until when.
        self.last = b""
        self.run = 0
        self.repeats = 0
        self.repeat_line = b""
        self.window_ends = 0.0
        self._sink = sink

    def write(self, line: bytes) -> None:
        """Queue one whole line; never waits for the descriptor, never raises."""
        self._sink._take(self, line)

    def fileno(self) -> int:
        return self.fd

    def flush(self) -> None:
        """Nothing to do: lines are handed over as they are written."""

    def close(self) -> None:
        """Close the sink (every output of it)."""
        self._sink.close()

    def write_now(self, line: bytes) -> None:
        """The sink's thread: write ``line`` whole (raises OSError)."""
        view = memoryview(line)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:  # a descriptor someone made non-blocking: wait, as for a blocking one
                poller = select.poll()  # (not select(): a busy server's descriptors pass 1024)
                poller.register(self.fd, select.POLLOUT)
                poller.poll()
