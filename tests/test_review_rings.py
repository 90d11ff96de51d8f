"""Rings under interrupts: a ring's descriptor received by a client is never leaked.

A KeyboardInterrupt can land between any two Python calls of the main thread.
The test lands one (a real SIGINT, raised by the client's main thread at itself
from a profile hook) at each function entry of opening a ProxyFile in turn, one
connection per entry, and counts the ring descriptors the client holds afterwards.
"""

from __future__ import annotations

import subprocess
import sys

from support import child_env

SWEEP = """
import gc, os, signal, sys
import offlog

def ring_descriptors():
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            found += "offlog-ring" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed since
            pass
    return found

calls = 0
target = 0

def interrupt_at_the_target_call(frame, event, arg):
    global calls
    if event == "call":
        calls += 1
        if calls == target:
            sys.setprofile(None)
            signal.raise_signal(signal.SIGINT)  # to this thread; the default handler: KeyboardInterrupt

offlog.ProxyFile(sys.argv[1], sys.argv[2], shm=True).close()  # imports done once, uninterrupted
sys.setprofile(interrupt_at_the_target_call)
f = offlog.ProxyFile(sys.argv[1], sys.argv[2], shm=True)
sys.setprofile(None)
f.close()
opening = calls  # the calls of one open, not interrupted
interrupted = 0
for target in range(1, opening + 1):
    calls = 0
    f = None
    try:
        sys.setprofile(interrupt_at_the_target_call)
        f = offlog.ProxyFile(sys.argv[1], sys.argv[2], shm=True)
    except KeyboardInterrupt:
        interrupted += 1
    finally:
        sys.setprofile(None)
    if f is not None:
        f.close()
    gc.collect()  # no finalizer of this round runs (and counts as a call) in the next
    if ring_descriptors():
        print(f"a ring descriptor left after an interrupt at call {target} of {opening}", flush=True)
        break
print(f"{opening} calls, {interrupted} interrupted, {ring_descriptors()} ring descriptors left", flush=True)
"""


def test_an_interrupt_anywhere_in_opening_a_ring_leaks_no_descriptor(start_server, workdir, procs):
    """A KeyboardInterrupt at each call of ProxyFile(..., shm=True) in turn: the ring's
    descriptor (received with the offer) is closed or kept by the ring, never left open."""
    server = start_server("--shm", "--ring-size", "65536")
    proc = procs.start(
        [sys.executable, "-c", SWEEP, str(workdir / "a.log"), server.sock],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        cwd=str(workdir),
        text=True,
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "a ring descriptor left" not in out, out
    opening, interrupted = (int(word) for word in out.split()[0:4:2])
    assert opening > 100 and interrupted > opening // 2, out  # the interrupts landed in the open
    assert out.endswith(" 0 ring descriptors left\n"), out
