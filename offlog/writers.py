"""The writers: every blocking file operation of the server, off its event loop.

Theory of operation
-------------------
The event loop (:mod:`offlog.server`) never touches a file. It hands each
file's work to :class:`Writers` as jobs on that file's :class:`Work` (open,
append a socket client's bytes, flush, finish), and hands over each ring
session's ring. The writers do the work on their threads and report back with
callbacks that run on the loop (``report``).

Passes. One thread, the *leader*, runs *passes*: each pass visits every file
with queued jobs or awake rings, runs its jobs in order and drains its awake
rings, the bytes of all of a file's rings that have any in **one** append
(one ``writev``; each ring's span is whole writes, so records stay whole).
So the server's cost follows passes and files with data, not records or
clients: 256 clients writing 100 records a second each cost about a pass every
two milliseconds, not 25,600 wake-ups.

The period follows the size of the largest append: after a pass in which
some file took ``BIG_APPEND`` or more (a burst: the cost is per byte, and a
ring must not fill) the next runs at once; after a middling one, ``POLL``
later; after one with only small appends or nothing, the wait doubles up to
``POLL_MAX``, so that each file's bytes gather into fewer, larger appends:
many slow clients cost a pass every few tens of milliseconds, not a pass or
a ``writev`` per record. ``sync()`` does not wait for the period: a FLUSH is
a job, and a job wakes the leader at once.

A ring that had no new bytes for ``SLEEP_AFTER`` goes to sleep: the leader
stops polling it and :class:`~offlog.shm.doorbells.Doorbells` waits on its
doorbell, which calls :meth:`Writers.rung` when the client writes again (one
wake for the batch that follows). With no awake ring and no job the
leader waits without a timeout: an idle server costs nothing.

Stalls. A file operation can block for as long as the file likes (a FIFO
nobody reads, a hung mount, a full pipe). The leader marks each operation it
starts (``_ops``); a second thread, the *standby*, checks the mark every
``STALL`` while the leader is active. An operation older than ``STALL`` makes
the standby the leader (and a new standby is started): the stuck thread keeps
only its file, serves it alone until it has no work, then retires. So a
stalled file delays other clients' data by ``STALL`` once, and threads grow
with files that are stalled at the same moment, not with clients.

Who touches what. A file's :class:`Work` is served by one thread at a time
(``owner``, under the lock). A ring is *awake* (in its work's ``rings``,
polled), *asleep* (with the doorbells) or *gone*; moves between the three
are made under the lock, and the doorbells are called without it (they call
:meth:`rung` with theirs held). A ring is never closed by the loop before the
writers reported it gone (``on_released``/``on_finished``/``on_failed``).
"""

from __future__ import annotations

import errno
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from .files import FileTable, OpenFile
from .shm import RingCorrupt
from .shm.doorbells import Doorbells

#: Seconds between passes right after one that found work.
POLL = 0.002
#: Longest wait between passes while any ring is awake (empty passes double POLL up to this).
POLL_MAX = 0.032
#: An append of this many bytes: the next pass runs at once (a burst).
BIG_APPEND = 64 * 1024
#: Appends all smaller than this: the wait before the next pass doubles (up to POLL_MAX).
SMALL_APPEND = 4 * 1024
#: Seconds without new bytes after which a ring goes to sleep (its client's next write posts).
SLEEP_AFTER = 0.2
#: Seconds one file operation may take before another thread takes over the other files.
STALL = 0.002
#: Seconds a spare writer thread waits for work before it ends.
LINGER = 10.0

# Job kinds.
OPEN, DATA, FLUSH, FINISH, DROP, RELEASE = "open", "data", "flush", "finish", "drop", "release"

AWAKE, ASLEEP, GONE = "awake", "asleep", "gone"


class Work:
    """One file's jobs and awake rings."""

    __slots__ = ("file", "jobs", "rings", "owner")

    def __init__(self, file: OpenFile) -> None:
        self.file = file
        self.jobs: Deque[Tuple[str, Any, Any]] = deque()
        self.rings: List[Any] = []  # sessions whose rings are awake
        self.owner: Optional[threading.Thread] = None


class Writers:
    """The writer threads of a server (see the module header).

    Sessions given to it have ``file`` (an :class:`OpenFile`), ``ring`` (a
    :class:`~offlog.shm.objects.ServerRing` or None), ``fsync``, ``written``,
    ``confirm_at`` and ``reading`` (a socket client to tell: a WRITTEN is due, or
    it waits to be read) and the ``on_*`` callbacks it reports to; it sets ``ring_state``,
    ``ring_seen``, ``work``, ``has_data`` and ``failed``."""

    def __init__(
        self,
        files: FileTable,
        report: Callable[[List[Callable[[], None]]], None],
        warn: Callable[[str], None],
        doorbells: Optional[Doorbells] = None,
    ) -> None:
        self._files = files
        self._report = report
        self._warn = warn
        self.doorbells = doorbells
        self._lock = threading.Lock()
        self._lead = threading.Condition(self._lock)
        self._spare = threading.Condition(self._lock)
        self._works: Dict[OpenFile, Work] = {}  # files with jobs or awake rings
        self._jobbed: Dict[Work, None] = {}  # works with jobs queued, in order (a set)
        self._awake: List[Any] = []  # every awake ring's session, of every work
        self._leader: Optional[threading.Thread] = None
        self._standby: Optional[threading.Thread] = None
        self._ops: Dict[threading.Thread, Tuple[Work, float]] = {}  # each thread's file operation under way
        self._idle = False  # the leader waits without a timeout
        self._active = False  # the leader runs passes (the standby watches for stalls)
        self._stopping = False
        self.threads = 0
        self.stalls = 0
        self.passes = 0
        self._next_sleep_check = 0.0
        self._now = 0.0  # when the current pass began
        self._no_standby_said = False

    # -- the loop's side ------------------------------------------------------
    def start(self) -> None:
        """Start the leader and the standby (raises RuntimeError if no thread can start)."""
        self._spawn()
        self._spawn()

    def open(self, session: Any, first: bool) -> None:
        self._submit(session, OPEN, first)

    def append(self, session: Any, parts: List[Any]) -> None:
        self._submit(session, DATA, parts, urgent=False)

    def flush(self, session: Any, token: int) -> None:
        self._submit(session, FLUSH, token)

    def finish(self, session: Any) -> None:
        """Write everything the session has (its ring drained), let its ring go, then ``on_finished``."""
        self._submit(session, FINISH, None)

    def drop(self, session: Any) -> None:
        """Let the session's ring go without draining it further, then ``on_released``."""
        self._submit(session, DROP, None)

    def release(self, file: OpenFile, done: Callable[[bool], None]) -> None:
        """A client of ``file`` is gone: give its reference back (closing the file after
        its last client may wait for the file's lock, so it is the writers' work), then
        ``done(closed)`` on the writer's thread."""
        self._queue(file, (RELEASE, None, done))

    def add_ring(self, session: Any) -> None:
        """The session's ring starts carrying its data: poll it."""
        with self._lock:
            session.has_data = session.ring.consumer.has_data
            self._wake_ring(session)

    def _wake_ring(self, session: Any) -> None:
        """Lock held: the ring is awake: polled by every pass."""
        session.ring_state = AWAKE
        session.ring_seen = time.monotonic()
        session.work = self._work(session.file)
        session.work.rings.append(session)
        self._awake.append(session)
        self._wake_leader()

    def _sleep_ring(self, session: Any, state: str) -> None:
        """Lock held: the ring is no longer polled (``state``: asleep or gone)."""
        if session.ring_state == AWAKE:
            session.work.rings.remove(session)
            self._awake.remove(session)
        session.ring_state = state

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lead.notify_all()
            self._spare.notify_all()
        if self.doorbells is not None:
            self.doorbells.close()

    def status(self) -> dict:
        with self._lock:
            awake = len(self._awake)
        return {
            "threads": self.threads,
            "passes": self.passes,
            "stalls": self.stalls,
            "awake_rings": awake,
            "sleeping_rings": self.doorbells.sleeping() if self.doorbells is not None else 0,
            "doorbell_threads": self.doorbells.threads() if self.doorbells is not None else 0,
            "doorbell_wakes": self.doorbells.wakes if self.doorbells is not None else 0,
        }

    def _submit(self, session: Any, kind: str, arg: Any, urgent: bool = True) -> None:
        self._queue(session.file, (kind, session, arg), urgent)

    def _queue(self, file: OpenFile, job: Tuple[str, Any, Any], urgent: bool = True) -> None:
        with self._lock:
            work = self._work(file)
            work.jobs.append(job)
            self._jobbed[work] = None
            if urgent or self._idle:
                self._wake_leader()

    def _work(self, file: OpenFile) -> Work:
        """Lock held."""
        work = self._works.get(file)
        if work is None:
            work = self._works[file] = Work(file)
        return work

    def _wake_leader(self) -> None:
        """Lock held."""
        self._lead.notify()

    # -- the doorbells' side --------------------------------------------------
    def rung(self, session: Any) -> None:
        """A sleeping ring's client wrote (doorbell thread, doorbells' lock held)."""
        with self._lock:
            if session.ring_state == ASLEEP:
                self._wake_ring(session)

    # -- threads --------------------------------------------------------------
    def _spawn(self) -> None:
        with self._lock:
            self.threads += 1  # (before the start: a thread that ends at once must not count -1)
        try:
            threading.Thread(target=self._main, name="writer", daemon=True).start()
        except BaseException:
            with self._lock:
                self.threads -= 1
            raise

    def _main(self) -> None:
        me = threading.current_thread()
        try:
            delay = POLL
            found_at = 0.0  # when a pass last found work
            while True:
                with self._lock:
                    role = self._role(me, delay, time.monotonic() - found_at < SLEEP_AFTER)
                if role is None:
                    return
                if role == "lead":
                    largest, found = self._pass(me)
                    if found:
                        found_at = time.monotonic()
                    if largest >= BIG_APPEND:
                        delay = 0.0
                    elif largest >= SMALL_APPEND:
                        delay = POLL
                    else:
                        delay = min(POLL_MAX, max(POLL, delay * 2))
                elif role == "took over":
                    self._take_over()
        except Exception as exc:  # a mistake of ours: this thread ends, and its role passes on
            self._warn(f"Internal error in a writer thread: {exc!r}; another takes its place")
            failed = True
        else:
            failed = False
        finally:
            with self._lock:
                self.threads -= 1
                self._ops.pop(me, None)
                if self._leader is me:
                    self._leader = None  # the next thread to look takes it
                if self._standby is me:
                    self._standby = None
                self._lead.notify_all()
                self._spare.notify_all()
        if failed:
            try:
                self._spawn()  # (after the roles are free, so that it finds one)
            except RuntimeError:
                pass  # the standby, if any, takes the lead alone

    def _role(self, me: threading.Thread, delay: float, busy: bool) -> Optional[str]:
        """Lock held: wait until this thread has something to do; what. A leader that
        found work lately (``busy``) or has awake rings waits ``delay`` between passes."""
        while not self._stopping:
            if self._leader is None:  # (the first thread, or the leader's thread ended)
                self._leader = me
                if self._standby is me:
                    self._standby = None
            if self._leader is me:
                if self._pending_jobs() or (delay == 0.0 and self._awake):
                    self._set_active(True)
                    return "lead"
                if busy or self._awake:
                    self._set_active(True)
                    self._lead.wait(delay)
                    return "lead"
                self._set_active(False)
                self._idle = True
                self._lead.wait()
                self._idle = False
                continue
            if self._standby not in (None, me):
                return None  # a spare thread: one standby is enough
            self._standby = me
            op = self._ops.get(self._leader)
            if op is not None and time.monotonic() - op[1] >= STALL:
                self.stalls += 1
                self._leader, self._standby = me, None  # the stuck one keeps its file and retires after it
                return "took over"
            if self._active:
                self._spare.wait(STALL)
            elif not self._spare.wait(LINGER) and self.threads > 2:
                self._standby = None
                return None
        return None

    def _set_active(self, active: bool) -> None:
        """Lock held."""
        if active and not self._active:
            self._spare.notify()
        self._active = active

    def _pending_jobs(self) -> bool:
        return any(w.owner is None for w in self._jobbed)

    def _take_over(self) -> None:
        """This thread just became the leader: start a standby for the next stall."""
        try:
            self._spawn()
        except RuntimeError as exc:
            if not self._no_standby_said:
                self._no_standby_said = True
                self._warn(f"No standby writer thread ({exc}): a stalled file may delay others until it moves")

    def _pass(self, me: threading.Thread) -> Tuple[int, bool]:
        """Serve every file with work once; (the largest file's bytes, anything found). A file
        whose rings have nothing new and that has no job costs one look per ring.

        ``owner`` and ``_ops`` are claimed without the lock: only the leader claims
        a free work, and a stuck thread frees the one it holds as its last act on
        it, so no work is ever served by two threads (plain stores, under the GIL)."""
        with self._lock:  # (a work stays in _jobbed until served: if this thread gets stuck, the next leader sees it)
            todo: Dict[Work, Optional[List[Any]]] = {w: None for w in self._jobbed if w.owner is None}
        self._now = time.monotonic()
        for session in self._ready_rings():
            work = session.work
            if work not in todo:
                todo[work] = [session]
            elif todo[work] is not None:
                todo[work].append(session)  # (None: the work has jobs, and a full serve drains every ring)
        largest, found = 0, False
        self.passes += 1
        ops = self._ops
        for work, ready in todo.items():
            if work.owner is not None or self._leader is not me:
                continue
            work.owner = me
            self._jobbed.pop(work, None)  # its jobs are served now (one that comes meanwhile puts it back)
            ops[me] = (work, time.monotonic())
            try:
                if ready is not None:  # (listed before this thread owned the file: some may be gone since)
                    ready = [s for s in ready if s.ring_state == AWAKE]
                n = self._serve(work, ready)
                while self._leader is not me and (work.jobs or self._has_data(work)):
                    n += self._serve(work, None)  # stuck and replaced: this thread keeps its file while it has work
            except Exception as exc:  # a mistake of ours must not end the writing of every file
                self._warn(f"Internal error writing {work.file.path}: {exc!r}")
                n = -1
            finally:
                del ops[me]
                work.owner = None
            if n >= 0:
                largest = max(largest, n)
                found = True
        with self._lock:
            for work in todo:
                if work.jobs and work.owner is None and work not in self._jobbed:
                    self._jobbed[work] = None  # a job that came as its serve ended: for the next pass
                    self._wake_leader()
        now = time.monotonic()
        if now >= self._next_sleep_check and self._leader is me:  # (a replaced thread's view is stale)
            self._next_sleep_check = now + SLEEP_AFTER / 5
            self._put_idle_rings_to_sleep(now)
        return largest, found

    def _ready_rings(self) -> List[Any]:
        """The awake rings with new bytes: one look at each."""
        awake = list(self._awake)
        try:
            return [s for s in awake if s.has_data()]
        except ValueError:  # a ring let go and closed since the list was taken: look one by one
            return [s for s in awake if s.ring_state == AWAKE and _polled(s)]

    def _has_data(self, work: Work) -> bool:
        return any(s.has_data() for s in work.rings)

    def _forget_if_done(self, work: Work) -> None:
        """Lock held."""
        if not work.jobs and not work.rings and work not in self._jobbed and self._works.get(work.file) is work:
            del self._works[work.file]

    # -- one file's work --------------------------------------------------------
    def _serve(self, work: Work, ready: Optional[List[Any]]) -> int:
        """Run ``work``'s jobs and drain its awake rings (only ``ready``, those with new
        bytes, if given and there is no job): bytes moved, -1 if nothing was there."""
        if ready is not None and not work.jobs:
            if not ready:
                return -1
            if len(ready) == 1:  # the common case, one client's new bytes: the lean path
                moved = self._drain_one(work, ready[0])
                if moved >= 0:
                    return moved
            calls: List[Callable[[], None]] = []
            moved = self._drain(work, ready, calls)
            if calls:
                self._report(calls)
            return moved
        if work.jobs:
            with self._lock:
                jobs, work.jobs = work.jobs, deque()
        else:
            jobs = deque()
        calls = []
        moved = 0
        did = bool(jobs)
        batch: List[Tuple[Any, List[Any]]] = []
        for kind, session, arg in jobs:
            if kind == DATA:
                batch.append((session, arg))
                continue
            moved += self._append_sockets(work, batch, calls)
            batch = []
            if kind == OPEN:
                self._open(session, arg, calls)
            elif kind == FLUSH:
                moved += self._flush(work, session, arg, calls)
            elif kind == FINISH:
                moved += self._drain(work, [session], calls) if session.failed is None else 0
                self._let_go(session)
                if session.failed is None:
                    calls.append(session.on_finished)
            elif kind == DROP:
                self._let_go(session)
                calls.append(session.on_released)
            else:  # RELEASE
                arg(self._files.release(work.file))
        moved += self._append_sockets(work, batch, calls)
        with self._lock:
            rings = list(work.rings)
        ringed = self._drain(work, rings, calls) if rings else 0
        if calls:
            self._report(calls)
        return moved + ringed if did or ringed else -1

    def _open(self, session: Any, first: bool, calls: List[Callable[[], None]]) -> None:
        try:
            self._files.make_ready(session.file, first)
        except Exception as exc:
            calls.append(lambda error=exc: session.on_opened(error))
        else:
            calls.append(lambda: session.on_opened(None))

    def _append_sockets(self, work: Work, batch: List[Tuple[Any, List[Any]]], calls: List[Callable[[], None]]) -> int:
        """Socket clients' bytes, one append for the batch (clients that failed skipped)."""
        batch = [(session, parts) for session, parts in batch if session.failed is None]
        if not batch:
            return 0
        parts = [part for _, session_parts in batch for part in session_parts]
        try:
            work.file.append(parts)
        except OSError as exc:
            for session, _ in batch:
                self._fail(session, exc, calls)
            return 0
        total = 0
        for session, session_parts in batch:
            n = sum(map(len, session_parts))
            session.written += n
            total += n
            if session.written >= session.confirm_at or not session.reading:
                calls.append(session.on_written)  # a WRITTEN is due, or the loop waits to read on
        return total

    def _flush(self, work: Work, session: Any, token: int, calls: List[Callable[[], None]]) -> int:
        if session.failed is not None:
            return 0
        moved = self._drain(work, [session], calls) if session.ring is not None else 0
        if session.failed is None and session.fsync:
            try:
                work.file.sync()
            except OSError as exc:
                self._fail(session, exc, calls)
                return moved
        if session.failed is None:
            calls.append(lambda: session.on_flushed(token))
        return moved

    def _drain_one(self, work: Work, session: Any) -> int:
        """One awake ring's new bytes into its file; -1 to take the general path (a
        corrupt header, a failed append: :meth:`_drain` reports them)."""
        try:
            moved = work.file.append_ring(session.ring.consumer)
        except (RingCorrupt, OSError):
            return -1  # a failed append was cut off whole: the general path tries it again and reports
        session.written += moved
        session.ring_seen = self._now
        return moved

    def _drain(self, work: Work, sessions: List[Any], calls: List[Callable[[], None]]) -> int:
        """Write every byte published in these sessions' rings, in one append."""
        now = self._now
        parts: List[Any] = []
        took: List[Tuple[Any, int]] = []
        for session in sessions:
            ring = session.ring
            if ring is None or session.failed is not None or session.ring_state == GONE:
                continue
            consumer = ring.consumer
            if not consumer.has_data():
                continue
            try:
                head = consumer.available()
            except RingCorrupt as exc:
                consumer.fail(errno.EBADMSG)
                line = f"Client {session.id} corrupted its ring: {exc}"
                self._fail(session, ValueError(f"ring corrupted: {exc}"), calls, line)
                continue
            parts += consumer.views(head)
            took.append((session, head))
            session.ring_seen = now
        if not took:
            return 0
        try:
            moved = work.file.append(parts)
        except OSError as exc:
            for session, _ in took:
                session.ring.consumer.fail(exc.errno or errno.EIO)
                self._fail(session, exc, calls)
            return 0
        for session, head in took:
            consumer = session.ring.consumer
            session.written += head - consumer.tail
            consumer.release(head)
        return moved

    def _fail(self, session: Any, exc: BaseException, calls: List[Callable[[], None]], line: str = "") -> None:
        """This session's file or ring failed: it ends with ``exc`` (its ring let go first)."""
        if session.failed is not None:
            return
        session.failed = exc
        if session.ring is not None and isinstance(exc, OSError):
            session.ring.consumer.fail(exc.errno or errno.EIO)
        self._let_go(session)
        text = line or f"Failed to write to {session.file.path} for client {session.id}: {exc}"
        calls.append(lambda: session.on_failed(exc, text))

    def _let_go(self, session: Any) -> None:
        """The session's ring is neither polled nor watched any more."""
        if session.ring is None:
            return
        with self._lock:
            state = session.ring_state
            self._sleep_ring(session, GONE)
        if state == ASLEEP and self.doorbells is not None:
            self.doorbells.forget(session.ring)

    def _put_idle_rings_to_sleep(self, now: float) -> None:
        """Rings with no new bytes for SLEEP_AFTER: to the doorbells (or stay awake without them).
        Works left with nothing are forgotten."""
        sleepy: List[Any] = []
        with self._lock:
            if self.doorbells is not None and self.doorbells.available:
                for session in [s for s in self._awake if now - s.ring_seen >= SLEEP_AFTER and s.work.owner is None]:
                    self._sleep_ring(session, ASLEEP)
                    sleepy.append(session)
            for work in [w for w in self._works.values() if w.owner is None]:
                self._forget_if_done(work)
        for session in sleepy:
            slept = self.doorbells.sleep(session.ring, lambda s=session: self.rung(s))
            if slept:
                with self._lock:
                    gone = session.ring_state == GONE
                if gone:  # let go meanwhile: it must not stay watched
                    self.doorbells.forget(session.ring)
            else:
                with self._lock:
                    if session.ring_state == ASLEEP:
                        self._wake_ring(session)
                        session.ring_seen = now + LINGER  # cannot sleep: polled, at POLL_MAX, for a while


def _polled(session: Any) -> bool:
    try:
        return session.has_data()
    except ValueError:  # its ring is closed: it is gone
        return False
