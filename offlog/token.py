"""The write token: mutual exclusion that costs two C calls and survives interrupts.

Theory of operation
-------------------
A transport's state (ring positions, the socket's frame stream, the backlog)
is guarded by a *token*, a one-element ``deque``. Taking it is
``token.pop()`` and giving it back ``token.append(True)``: single C calls
that run no Python code, so both are atomic under the GIL, and together they
cost a third of a ``threading.Lock`` round trip. Hot paths inline them.

Two things can go wrong that a lock does not guard against, and both start
in a Python signal handler (which CPython runs in the main thread, between
two bytecodes of whatever the main thread was doing):

* **A leaked token.** ``KeyboardInterrupt`` raised right after ``pop()``
  returned (CPython checks for pending signals when a C call returns) and
  before the ``try`` whose ``finally`` gives the token back: the frame that
  took the token has exited, nobody will give it back.
* **Re-entry.** A handler that writes to the ProxyFile whose ``write()`` it
  interrupted: the token is held by a frame *below* the handler on the same
  thread, which cannot go on until the handler returns.

Neither costs the hot path anything. A thread that finds the token taken
calls :func:`take`, which yields to the holder and, every few tries, asks
who holds it: it reads every thread's stack (``sys._current_frames()``) for
frames of the token's owner in one of the functions that may hold it
(``holding``). No such frame anywhere: the token leaked, and is put back
(under a lock, after a second look, so it is never put back twice). Such a
frame further out on the caller's own stack: re-entry; :func:`take` returns
False and the caller sets its bytes aside (``reentered``) for the interrupted
write's owner to pick up, or raises a clear error where it cannot (a
``sync()`` or ``close()`` from such a handler). Otherwise another thread
holds the token and finishes within a copy: keep yielding.

Frames that *wait* (:func:`take` itself) are not holders: a thread whose
innermost frame of the owner is ``take`` is in line, not holding.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from itertools import islice
from types import CodeType
from typing import Any, Deque, FrozenSet, Optional

#: Yields between two looks at the stacks of all threads.
YIELDS_PER_LOOK = 64

_restore_lock = threading.Lock()


def new() -> Deque[bool]:
    return deque([True])


def take(token: Deque[bool], owner: Any, holding: FrozenSet[CodeType]) -> bool:
    """Take ``token`` (owned by ``owner``); False if the caller's own thread holds
    it further out on its stack (a signal handler re-entering its owner)."""
    got: Deque[bool] = deque(maxlen=1)
    tries = 0
    # Signal handlers run in the main thread only: there, look at once.
    look = YIELDS_PER_LOOK - 1 if threading.current_thread() is threading.main_thread() else 0
    while True:
        try:
            # One C call pops the token and notes it in ``got``: no thread switch
            # or signal can fall between the two, so a looker reading this frame's
            # ``got`` knows whether this waiter holds the token already.
            got.extend(islice(iter(token.pop, None), 1))
            return True
        except IndexError:
            pass
        tries += 1
        if (tries + look) % YIELDS_PER_LOOK == 0:
            mine, others = _holders(owner, holding)
            if mine:
                return False
            if not others:
                _restore(token, owner, holding)
        time.sleep(0)  # let the holder finish its copy


def _holders(owner: Any, holding: FrozenSet[CodeType]):
    """(held further out on this thread's stack, held by another thread)."""
    me = threading.get_ident()
    mine = others = False
    for ident, frame in sys._current_frames().items():
        try:
            here = _held_in(frame, ident == me, owner, holding)
        except Exception:  # another thread's stack changed under us: assume it holds, look again later
            here = ident != me
        if here and ident == me:
            mine = True
        elif here:
            others = True
    return mine, others


def _held_in(frame: Any, own: bool, owner: Any, holding: FrozenSet[CodeType]) -> bool:
    """Whether the stack that ``frame`` tops holds the token (for the caller's own
    stack ``own``: further out than its call into :func:`take`)."""
    f = frame
    if own:  # skip this thread's own call: up to take(), then the owner's frames that called it
        while f is not None and f.f_code is not take.__code__:
            f = f.f_back
        f = f.f_back if f is not None else None
        while f is not None and f.f_locals.get("self") is owner:
            f = f.f_back
    while f is not None:
        code = f.f_code
        if code is take.__code__ and not own and f.f_locals.get("owner") is owner:
            return bool(f.f_locals.get("got"))  # took it and not returned yet, or waiting in line
        if code in holding and f.f_locals.get("self") is owner:
            return True
        f = f.f_back
    return False


def _restore(token: Deque[bool], owner: Any, holding: FrozenSet[CodeType]) -> None:
    """Put back a token whose holder vanished (a second look, under a lock)."""
    with _restore_lock:
        if not token and _holders(owner, holding) == (False, False):
            token.append(True)


#: What ``_write_locked`` returns to make a write wait for room in the backlog (``on_full="block"``).
WAIT = object()


class Guarded:
    """The slow path every transport shares: take the token, run the
    subclass's ``_write_locked`` with it, give it back.

    ``_write_locked(view)`` returns None (done), :data:`WAIT` (the backlog is
    full and its limit blocks: the token is given back, ``_wait_for_room``
    runs one step of the wait, and the write tries again), or the write of
    the transport that took over (after a hand-over: the bytes go there). A
    write that finds its own thread holding the token further out (a signal
    handler) sets its bytes aside in ``_reentered``; the interrupted call's
    owner moves them on first thing under the token (:meth:`_settle_locked`),
    and finishes a hand-over that an interrupt cut short (``_handover`` is
    what it was handing to ``_hand_over_to``). An exception with the token
    held calls ``_after_exception`` before the token goes back.

    Subclasses set ``_token``, ``_reentered``, ``_backlog``, ``_forward``
    (once set, where every write goes: the successor after a hand-over, the
    child's own connection after a fork), ``_closed`` and ``HOLDING`` (the
    code objects that may hold the token); those that hand over also
    ``_handover`` and ``_hand_over_to``.
    """

    HOLDING: FrozenSet[CodeType] = frozenset()
    _token: Deque[bool]
    _reentered: Deque[bytes]
    _backlog: Any
    _forward: Any
    _closed: bool
    _handover: Any = None
    _hand_over_to: Any = None
    error: Optional[BaseException] = None  # what the server reported: every later write raises it

    @property
    def handed_over(self) -> bool:
        return self._forward is not None

    def _take(self) -> bool:
        return take(self._token, self, self.HOLDING)

    def locked(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` holding the token (RuntimeError from a signal handler
        that interrupted this owner: it cannot wait for itself)."""
        if not self._take():
            raise RuntimeError("offlog: a signal handler cannot sync or close the ProxyFile whose write it interrupted")
        return self._taken(fn, *args)

    def _taken(self, fn: Any, *args: Any) -> Any:
        """The token just taken: run ``fn(*args)``, put the state right if an
        exception passes, give the token back."""
        try:
            return fn(*args)
        except BaseException:
            self._after_exception()
            raise
        finally:
            self._token.append(True)

    def pump(self) -> int:
        """Move the backlog on as far as it goes now (``_pump_step``); return the
        bytes still in the backlog. Never waits."""
        if not self._take():
            return self.backlog_bytes  # a handler that interrupted this owner: leave it be
        return self._taken(self.pump_locked)

    def pump_locked(self) -> int:
        """Token held: :meth:`pump`'s step."""
        self._settle_locked()
        self._pump_step()
        return self.backlog_bytes

    def take_backlog_locked(self, chunk: Any) -> bool:
        """Token held: take ``chunk``'s records (a Backlog) after everything else
        and move them on; False, taking nothing, once handed over, failed or closed."""
        if self._forward is not None or self.error is not None or self._closed:
            return False
        self._backlog.absorb(chunk)
        self._pump_step()
        return True

    def _write_slow(self, data: Any) -> None:
        """Every write the hot path does not finish; the token is not held."""
        view = memoryview(data.encode("utf-8") if isinstance(data, str) else data).cast("B")
        since = None
        while True:
            if not self._take():
                if self._closed:
                    raise ValueError("write to a closed ProxyFile")
                self._reentered.append(bytes(view))  # the interrupted write's owner moves it on
                self._update_hot_path()
                return
            outcome = self._taken(self._write_locked, view)
            if outcome is None:
                return
            if outcome is not WAIT:
                return outcome(view)  # handed over: the reconnect path takes it
            since = time.monotonic() if since is None else since
            self._wait_for_room(since)  # TimeoutError once the policy's timeout has passed

    def _before_write_locked(self) -> Any:
        """Token held, first thing in a slow write: :meth:`_settle_locked`, then the
        write an owner that handed over forwards to (or None); a closed or failed owner raises."""
        self._settle_locked()
        if self._forward is not None:
            return self._forward
        if self._closed:
            raise ValueError("write to a closed ProxyFile")
        if self.error is not None:
            raise self.error.with_traceback(None)
        return None

    def _settle_locked(self) -> None:
        """Token held, first thing: finish a hand-over an interrupt cut short, and move
        on what signal handlers set aside."""
        self._take_reentered()
        if self._handover is not None:
            self.hand_over_locked(self._hand_over_to)

    def _take_reentered(self) -> None:
        """Token held: bytes set aside by signal handlers go first (they came before this call)."""
        while self._reentered:
            chunk = self._reentered.popleft()
            if self._forward is not None:
                self._forward(chunk)
            elif not self._closed:
                self._backlog.append(chunk)
        self._update_hot_path()

    backlog_bytes: int

    def _write_locked(self, view: memoryview) -> Any:
        raise NotImplementedError

    def _pump_step(self) -> None:
        """Token held: move the backlog on, without waiting."""

    def _wait_for_room(self, since: float) -> None:
        raise NotImplementedError

    def hand_over_locked(self, make_handler: Any) -> None:
        """Token held: hand every byte not confirmed yet to ``make_handler``; later
        writes go to the handler it returns."""
        raise NotImplementedError

    def _update_hot_path(self) -> None:
        """Re-derive whether the next write may take the hot path (re-entered
        bytes, a hand-over, a backlog send it to the slow path)."""

    def _after_exception(self) -> None:
        """Token held, an exception passing: put the state right."""


def holding(*functions: Any) -> FrozenSet[CodeType]:
    """``HOLDING`` for a class: its functions that run with the token held, and the shared slow path."""
    shared = (Guarded._write_slow, Guarded.locked, Guarded.pump, Guarded._taken)
    return frozenset(f.__code__ for f in functions + shared)
