"""Interrupts and signal handlers never wedge a ProxyFile, never tear a record.

A Python signal handler runs in the main thread between two bytecodes of
whatever it was doing, so it can land inside write(): a KeyboardInterrupt
raised there must leave no lock or token taken and no half record on the
wire, and a handler that writes to the ProxyFile it interrupted must have
its record set aside and delivered, not deadlock. The interrupts come from a timer
(``ITIMER_REAL``, SIGALRM) in the client's own interpreter, at random
intervals of a fraction of a millisecond, so they land all over the write
path. (A signal does not queue: a client descheduled for a while gets one
late interrupt, not a burst.)
"""

from __future__ import annotations

from driver import run_script
from records import TESTS, assert_whole_lines_at_least_once, keys

PREAMBLE = f"""
import json, random, signal, sys, time
sys.path.insert(0, {TESTS!r})
from records import record
import offlog

rng = random.Random(20261124)

LAST = 4_000_000  # a bound only: 400 interrupts end the loop first (with the C write after ~1 M records)

def size(n):
    return 70000 if n % 2000 == 1999 else 0  # now and then a write bigger than one socket frame
"""


def run(procs, workdir, code: str, what: str) -> dict:
    return run_script(procs, workdir, PREAMBLE + code, what)


def test_keyboard_interrupts_never_wedge_a_proxyfile(transport_server, workdir, procs):
    """400 KeyboardInterrupts raised inside write(); afterwards writes and close() still work, every
    write that returned is in the file, and every line is one whole record."""
    target = workdir / "interrupted.log"
    shm = transport_server.transport == "shm"
    code = f"""
f = offlog.ProxyFile({str(target)!r}, {transport_server.sock!r}, shm={shm!r})
interrupts = 0
armed = False

def on_timer(signum, frame):
    global interrupts
    signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0002, 0.001))
    if armed and interrupts < 400:
        interrupts += 1
        raise KeyboardInterrupt

signal.signal(signal.SIGALRM, on_timer)
signal.setitimer(signal.ITIMER_REAL, 0.0005)
accepted = set()
n = 0
deadline = time.monotonic() + 30
try:
    while interrupts < 400 and n < LAST and time.monotonic() < deadline:
        try:
            try:
                data = record("K", n, size(n))
                armed = True
                f.write(data)
                armed = False
                accepted.add(n)
            except KeyboardInterrupt:
                armed = False
        except KeyboardInterrupt:  # one more, landing in the handler above
            armed = False
        n += 1
finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
f.write(record("E", 0))
f.close()
print(json.dumps({{"written": n, "interrupts": interrupts, "lost": sorted(set(range(n)) - accepted)}}))
"""
    result = run(procs, workdir, code, "a KeyboardInterrupt inside write() wedged the ProxyFile")
    assert result["interrupts"] == 400, f"only {result['interrupts']} interrupts landed in 30 s"
    written = keys("K", range(result["written"])) | keys("E", [0])
    accepted = written - keys("K", result["lost"])
    assert_whole_lines_at_least_once(target.read_bytes(), accepted, written)


def test_signal_handler_writing_to_the_proxyfile_it_interrupted(transport_server, workdir, procs):
    """A timer's handler writes 300 records to the ProxyFile whose write() it interrupted:
    no deadlock, and every handler record and every main-loop record is delivered."""
    target = workdir / "reentered.log"
    shm = transport_server.transport == "shm"
    code = f"""
f = offlog.ProxyFile({str(target)!r}, {transport_server.sock!r}, shm={shm!r})
handled = 0

def on_timer(signum, frame):
    global handled
    if handled < 300:
        f.write(record("H", handled))
        handled += 1
        signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0001, 0.0005))

signal.signal(signal.SIGALRM, on_timer)
signal.setitimer(signal.ITIMER_REAL, 0.0003)
n = 0
deadline = time.monotonic() + 30
try:
    while handled < 300 and n < LAST and time.monotonic() < deadline:
        f.write(record("M", n, size(n)))
        n += 1
finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
f.close()
print(json.dumps({{"written": n, "handled": handled}}))
"""
    result = run(procs, workdir, code, "a handler's write() deadlocked with the write() it interrupted")
    assert result["handled"] == 300, f"only {result['handled']} handler writes in 30 s"
    written = keys("M", range(result["written"])) | keys("H", range(300))
    assert_whole_lines_at_least_once(target.read_bytes(), written, written)
