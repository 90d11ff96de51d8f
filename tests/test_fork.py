"""Forked children lose nothing: every record a child's write() accepted reaches the file.

Each scenario runs in a fresh interpreter (client_script), so fork and
multiprocessing never touch the test runner's own process. A child inherits
its parent's OfflogHandler, Logger or ProxyFile and ends the way children
end: a multiprocessing or Pool worker's exit (``os._exit`` after the
target), ``os._exit``, ``sys.exit``. No server restarts here, so every
record must be in the file exactly once and whole.
"""

from __future__ import annotations

import re
import signal

import pytest
from driver import run_script
from records import TESTS, assert_exactly_once, keys

PREAMBLE = f"""
import json, logging, multiprocessing, os, sys
sys.path.insert(0, {TESTS!r})
from records import record
import offlog

def line(tag, n):
    return record(tag, n).decode().rstrip("\\n")

def logging_to(target, sock, shm):
    handler = offlog.OfflogHandler(target, sock, shm=shm)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("app")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return log
"""


def run(procs, workdir, code: str):
    return run_script(procs, workdir, PREAMBLE + code, "a fork, a child's exit or a close hung")


def test_multiprocessing_fork_children_deliver_every_record(transport_server, workdir, procs):
    """An OfflogHandler configured in the parent; four fork-context children log 100 records each."""
    target = workdir / "mp.log"
    shm = transport_server.transport == "shm"
    code = f"""
log = logging_to({str(target)!r}, {transport_server.sock!r}, {shm!r})

def child(k):
    for n in range(100):
        log.info(line("C%d" % k, n))

log.info(line("P", 0))
ctx = multiprocessing.get_context("fork")
children = [ctx.Process(target=child, args=(k,)) for k in range(4)]
for c in children:
    c.start()
for c in children:
    c.join(30)
log.info(line("P", 1))
print(json.dumps([c.exitcode for c in children]))
"""
    exitcodes = run(procs, workdir, code)
    assert exitcodes == [0, 0, 0, 0]
    expected = keys("P", range(2)).union(*(keys(f"C{k}", range(100)) for k in range(4)))
    assert_exactly_once(target.read_bytes(), expected)


def test_fork_pool_workers_deliver_every_record(transport_server, workdir, procs):
    """A fork Pool whose workers exit and are replaced (maxtasksperchild) while logging."""
    target = workdir / "pool.log"
    shm = transport_server.transport == "shm"
    code = f"""
log = logging_to({str(target)!r}, {transport_server.sock!r}, {shm!r})

def task(t):
    for n in range(20):
        log.info(line("T%d" % t, n))
    return os.getpid()

log.info(line("P", 0))
pool = multiprocessing.get_context("fork").Pool(2, maxtasksperchild=3)
pids = pool.map(task, range(20), chunksize=1)
pool.close()
pool.join()
print(json.dumps(len(set(pids))))
"""
    workers = run(procs, workdir, code)
    assert workers >= 2
    expected = keys("P", [0]).union(*(keys(f"T{t}", range(20)) for t in range(20)))
    assert_exactly_once(target.read_bytes(), expected)


@pytest.mark.parametrize("exit_call", ["os._exit(0)", "sys.exit(0)"])
def test_os_fork_then_os_exit_delivers_every_record(transport_server, workdir, procs, exit_call):
    """Bare os.fork(): four children write 100 records each to the inherited ProxyFile and exit."""
    target = workdir / "fork.log"
    shm = transport_server.transport == "shm"
    code = f"""
f = offlog.ProxyFile({str(target)!r}, {transport_server.sock!r}, shm={shm!r})
f.write(record("P", 0))
pids = []
for k in range(4):
    pid = os.fork()
    if pid == 0:
        for n in range(100):
            f.write(record("C%d" % k, n))
        {exit_call}
    pids.append(pid)
statuses = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
f.write(record("P", 1))
f.close()
print(json.dumps(statuses))
"""
    assert run(procs, workdir, code) == [0, 0, 0, 0]
    expected = keys("P", range(2)).union(*(keys(f"C{k}", range(100)) for k in range(4)))
    assert_exactly_once(target.read_bytes(), expected)


def test_a_write_method_bound_before_fork_goes_to_the_childs_connection(transport_server, workdir, procs):
    """``write = f.write`` kept from before the fork (a common hot-loop idiom): in the child it
    writes through the child's own connection, never into the parent's ring or socket."""
    target = workdir / "bound.log"
    shm = transport_server.transport == "shm"
    code = f"""
f = offlog.ProxyFile({str(target)!r}, {transport_server.sock!r}, shm={shm!r})
write = f.write
write(record("P", 0))
pid = os.fork()
if pid == 0:
    for n in range(100):
        write(record("C", n))
    os._exit(0)
status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
write(record("P", 1))
f.close()
print(json.dumps(status))
"""
    assert run(procs, workdir, code) == 0
    assert_exactly_once(target.read_bytes(), keys("P", range(2)) | keys("C", range(100)))


def test_a_signal_handler_writing_during_a_childs_first_write_is_delivered(transport_server, workdir, procs):
    """The child's first write opens its connection (the server is stopped, so the handshake
    waits); a timer's handler writes meanwhile to the same ProxyFile: its record is set aside
    and delivered, not a deadlock."""
    target = workdir / "firstwrite.log"
    shm = transport_server.transport == "shm"
    code = f"""
import signal, time
f = offlog.ProxyFile({str(target)!r}, {transport_server.sock!r}, shm={shm!r}, timeout=20000)
f.write(record("P", 0))
os.kill({transport_server.pid}, signal.SIGSTOP)
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGALRM, lambda signum, frame: f.write(record("H", 0)))
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    f.write(record("C", 0))  # opens the child's connection: waits for the stopped server
    f.write(record("C", 1))
    f.close()
    os._exit(0)
time.sleep(1.0)
os.kill({transport_server.pid}, signal.SIGCONT)
status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
f.close()
print(json.dumps(status))
"""
    try:
        assert run(procs, workdir, code) == 0
    finally:
        transport_server.signal(signal.SIGCONT)
    assert_exactly_once(target.read_bytes(), keys("P", [0]) | keys("H", [0]) | keys("C", range(2)))


def test_spawn_children_deliver_every_record(transport_server, workdir, procs):
    """Spawned children configure their own handler and end without closing it."""
    target = workdir / "spawn.log"
    shm = transport_server.transport == "shm"
    (workdir / "spawnjob.py").write_text(
        PREAMBLE
        + f"""
def child(k):
    log = logging_to({str(target)!r}, {transport_server.sock!r}, {shm!r})
    for n in range(100):
        log.info(line("S%d" % k, n))
"""
    )
    code = """
import spawnjob

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=spawnjob.child, args=(k,)) for k in range(3)]
    for c in children:
        c.start()
    for c in children:
        c.join(40)
    print(json.dumps([c.exitcode for c in children]))
"""
    assert run(procs, workdir, code) == [0, 0, 0]
    expected = set().union(*(keys(f"S{k}", range(100)) for k in range(3)))
    assert_exactly_once(target.read_bytes(), expected)


def test_logger_and_proxyfile_inherited_by_fork_children(transport_server, workdir, procs):
    """offlog.Logger and a bare ProxyFile made in the parent, used by fork-context children."""
    logged, written = workdir / "logger.log", workdir / "proxy.log"
    shm = transport_server.transport == "shm"
    code = f"""
logger = offlog.Logger("app", {str(logged)!r}, stdout_level=None, stderr_level=None,
                       offlog_socket_path={transport_server.sock!r})
f = offlog.ProxyFile({str(written)!r}, {transport_server.sock!r}, shm={shm!r})

def child(k):
    for n in range(100):
        logger.info(line("L%d" % k, n))
        f.write(record("F%d" % k, n))

ctx = multiprocessing.get_context("fork")
children = [ctx.Process(target=child, args=(k,)) for k in range(3)]
for c in children:
    c.start()
for c in children:
    c.join(30)
print(json.dumps([c.exitcode for c in children]))
"""
    assert run(procs, workdir, code) == [0, 0, 0]
    messages = re.sub(rb"(?m)^\[[^\]]*\] ", b"", logged.read_bytes())
    assert_exactly_once(messages, set().union(*(keys(f"L{k}", range(100)) for k in range(3))))
    assert_exactly_once(written.read_bytes(), set().union(*(keys(f"F{k}", range(100)) for k in range(3))))
